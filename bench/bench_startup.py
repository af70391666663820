"""Start-up time of the ``gradtool`` command, each run in a fresh process.

Run it from the repository root::

    python bench/bench_startup.py                 # table on stdout
    python bench/bench_startup.py --json out.json # and the numbers as JSON

Two measurements, each beside a peer timed in the same run, runs interleaved so that machine
load affects both alike:

* ``gradtool --help`` (median of 7) against the bare interpreter, ``python -c pass``;
* ``gradtool derive layernorm`` (median of 5) against ``python -c "import sympy"``, the floor
  for any command that does symbolic work.

It also reports whether ``--help`` and ``derive layernorm`` import torch. Targets (from the
issue): ``--help`` under 0.5 s, ``derive layernorm`` under 2 s. A missed target is printed,
not raised: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HELP_RUNS = 7
DERIVE_RUNS = 5
HELP_TARGET_S = 0.5
DERIVE_TARGET_S = 2.0

IMPORTS_PROBE = """\
import sys
sys.argv = ["gradtool", *sys.argv[1:]]
import gradtool.cli
try:
    gradtool.cli.app()
except SystemExit:
    pass
print("TORCH", "torch" in sys.modules)
"""


def gradtool_command() -> list[str]:
    """The installed console script beside this interpreter (not a pyenv shim), else PATH's."""
    script = Path(sys.executable).parent / "gradtool"
    if script.is_file():
        return [str(script)]
    found = shutil.which("gradtool")
    if found is None:
        sys.exit("gradtool is not installed: run `pip install -e .` first")
    return [found]


def wall_time(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def paired_medians(cmd: list[str], peer: list[str], runs: int) -> tuple[float, float]:
    """Median wall time of ``cmd`` and of ``peer``, run alternately after one warm-up each."""
    wall_time(cmd)
    wall_time(peer)
    ours, theirs = [], []
    for _ in range(runs):
        ours.append(wall_time(cmd))
        theirs.append(wall_time(peer))
    return statistics.median(ours), statistics.median(theirs)


def imports_torch(args: list[str]) -> bool:
    out = subprocess.run([sys.executable, "-c", IMPORTS_PROBE, *args], capture_output=True,
                         text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "TORCH True"


def measure() -> list[dict]:
    gradtool = gradtool_command()
    python = [sys.executable]
    rows = []
    cases = [
        ("gradtool --help", ["--help"], "python -c pass", ["-c", "pass"], HELP_RUNS,
         HELP_TARGET_S),
        ("gradtool derive layernorm", ["derive", "layernorm"], "python -c 'import sympy'",
         ["-c", "import sympy"], DERIVE_RUNS, DERIVE_TARGET_S),
    ]
    for name, args, peer_name, peer_args, runs, target in cases:
        ours, peer = paired_medians(gradtool + args, python + peer_args, runs)
        rows.append({"command": name, "median_s": ours, "runs": runs, "peer": peer_name,
                     "peer_median_s": peer, "ratio": ours / peer, "target_s": target,
                     "target_met": ours < target, "imports_torch": imports_torch(args)})
    return rows


def print_table(rows: list[dict]) -> None:
    head = f"{'command':<27}{'median':>9}{'peer':>27}{'peer med':>10}{'ratio':>7}" \
           f"{'target':>9}{'met':>5}{'torch':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['command']:<27}{r['median_s']:>8.3f}s{r['peer']:>27}"
              f"{r['peer_median_s']:>9.3f}s{r['ratio']:>6.1f}x{r['target_s']:>8.1f}s"
              f"{'yes' if r['target_met'] else 'NO':>5}{'yes' if r['imports_torch'] else 'no':>7}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    print(f"python {platform.python_version()} on {platform.machine()}, "
          f"{os.cpu_count()} CPUs; {gradtool_command()[0]}\n")
    rows = measure()
    print_table(rows)
    if args.json:
        meta = {"python": platform.python_version(), "cpus": os.cpu_count(),
                "platform": platform.platform()}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
