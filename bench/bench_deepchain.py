"""Derive, code generation and check time of a k-layer tanh MLP written as one spec.

Run it from the repository root::

    PYTHONPATH=. python bench/bench_deepchain.py                      # depths 3..8
    PYTHONPATH=. python bench/bench_deepchain.py --depths 3,6,10 --limit 120

The spec is h_l = tanh(Σ_d h_{l−1}[n, d]·W_l[e, d]) for l = 0..k−1 and Y = h_{k−1} (h28; the
adjoint of each layer is the next one's contracted with W_l, times 1 − h_l²). Each stage runs
in a fresh process with a time limit, so a stage that hangs reads as ``> limit``:

* ``derive``: load and derive (imports not counted);
* ``numpy``, ``torch``: ``generate(spec, target)`` after the derivation (not counted);
* ``check``: ``python -m gradtool check FILE`` wall time, imports and kernel compilation
  included, with a fresh kernel cache.

``--json PATH`` also writes the rows. Seconds depend on the machine; growth with the depth is
the point (the closed forms used to double with each layer).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SPEC = """\
from gradtool.lang import Spec, Sum, tanh
spec = Spec("deep{k}", "{k} tanh layers")
N, D = spec.dims("N D")
n, d, e = spec.indices(n=N, d=D, e=D)
X = spec.input("X", N, D)
prev = X
for layer in range({k}):
    W = spec.param(f"W{{layer}}", D, D)
    prev = spec.let(f"h{{layer}}", [n, e], tanh(Sum(prev[n, d] * W[e, d], d)))
spec.output("Y", [n, e], prev[n, e] * 1)
"""

STAGE = """\
import sys, time
from gradtool.codegen.emit import generate
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive
spec = load_spec(sys.argv[1])
start = time.perf_counter()
derive(spec)
if sys.argv[2] != "derive":
    start = time.perf_counter()
    generate(spec, sys.argv[2])
print(time.perf_counter() - start)
"""


def _timed(cmd: list[str], limit: float, env: dict) -> str:
    """The seconds a stage prints (``python -c STAGE``), else the command's wall time;
    ``> limit`` if it ran past ``limit``."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, env=env)
    except subprocess.TimeoutExpired:
        return f"> {limit:g}"
    if proc.returncode != 0:
        return f"failed ({proc.returncode})"
    out = proc.stdout.strip().splitlines()
    if cmd[1] == "-c":
        return f"{float(out[-1]):.2f}"
    return f"{time.perf_counter() - start:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="3,4,5,6,7,8")
    parser.add_argument("--limit", type=float, default=300.0, help="seconds per stage")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    rows = []
    print(f"{'layers':>6} {'derive':>9} {'numpy':>9} {'torch':>9} {'check':>9}")
    with tempfile.TemporaryDirectory() as folder:
        env = dict(os.environ, GRADTOOL_CACHE=str(Path(folder) / "cache"))
        for k in (int(x) for x in args.depths.split(",")):
            path = Path(folder) / f"deep{k}.py"
            path.write_text(SPEC.format(k=k))
            row = {"layers": k}
            for stage in ("derive", "numpy", "torch"):
                row[stage] = _timed([sys.executable, "-c", STAGE, str(path), stage], args.limit,
                                    env)
            row["check"] = _timed([sys.executable, "-m", "gradtool", "check", str(path)],
                                  args.limit, env)
            rows.append(row)
            print(f"{k:>6} {row['derive']:>9} {row['numpy']:>9} {row['torch']:>9} "
                  f"{row['check']:>9}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
