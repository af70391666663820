"""In-process time to derive every built-in spec, beside one torch.autograd step as the peer.

Run it from the repository root::

    python bench/bench_derive.py                  # table on stdout
    python bench/bench_derive.py --json out.json  # and the numbers as JSON

For each built-in spec, in one process (imports already paid):

* ``report``: ``derive_report(name)``, i.e. load the spec file, derive, build the report;
* ``full``: ``derive_report(name, jacobians=True, steps=True)``;
* peer ``autograd``: one forward + backward with ``torch.autograd`` through gradtool's own torch
  evaluation of the spec's forward (:func:`gradtool.check.numeric.autograd_gradients`), float64,
  the first input 64×256 (its first dimension 64, every other dimension 256).

SymPy's cache is cleared before every timed derivation, so each one costs what it costs in a
fresh ``gradtool derive`` process. Each derivation time is a median of ``--repeat`` runs
(default 5); the peer's is a median of 25, after one untimed warm-up, with torch on one thread
(``--threads``): on a 2-core machine two torch threads made the peer jump between runs in
steps of ~8 ms. ``ratio`` is report / autograd: how many autograd steps one symbolic
derivation costs. The two do different work; the ratio is a scale, not a race. The evaluator
is a reference one: a contraction such as ``linear`` materialises its N×O×I product, so the
peer is slower there than ``torch.nn.functional.linear`` would be.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
from sympy.core.cache import clear_cache

from gradtool.check.numeric import autograd_gradients, random_upstream
from gradtool.check.sampling import sample_inputs
from gradtool.report import derive_report
from gradtool.spec.loader import builtin_specs, load_spec
from gradtool.symbolic.reverse import derive

ROWS, COLS = 64, 256
PEER_REPEAT = 25  # the peer takes milliseconds and is noisier; more runs are cheap


def median_time(fn, repeat: int, clear: bool = True) -> float:
    times = []
    for _ in range(repeat):
        if clear:
            clear_cache()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peer_setup(name: str, rng: np.random.Generator):
    """The derivation, inputs, sizes and upstream gradients for one autograd step."""
    spec = load_spec(name)
    d = derive(spec)
    first = spec.of_kind("input")[0].dims[0]
    # a convolution has sizes inside sizes ((OH − 1)·S + K): there every other size is small
    other = COLS if len(spec.dim_symbols) <= 3 else 6
    dims = {sym: (ROWS if sym == first else other) for sym in spec.dim_symbols.values()}
    inputs = sample_inputs(spec, dims, rng)
    return d, inputs, dims, random_upstream(d, dims, rng)


def bench_spec(name: str, repeat: int, rng: np.random.Generator) -> dict:
    report = median_time(lambda: derive_report(name), repeat)
    full = median_time(lambda: derive_report(name, jacobians=True, steps=True), repeat)
    d, inputs, dims, upstream = peer_setup(name, rng)
    autograd_gradients(d, inputs, dims, upstream)  # warm-up: torch's first call is slow
    peer = median_time(lambda: autograd_gradients(d, inputs, dims, upstream), PEER_REPEAT,
                       clear=False)
    return {"spec": name, "report_s": report, "full_s": full, "autograd_s": peer,
            "ratio": report / peer}


def print_table(rows: list[dict]) -> None:
    head = f"{'spec':<23}{'report':>10}{'full':>10}{'autograd':>10}{'ratio':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['spec']:<23}{r['report_s'] * 1e3:>8.1f}ms{r['full_s'] * 1e3:>8.1f}ms"
              f"{r['autograd_s'] * 1e3:>8.2f}ms{r['ratio']:>7.1f}x")
    total = sum(r["report_s"] for r in rows)
    total_full = sum(r["full_s"] for r in rows)
    print("-" * len(head))
    print(f"{'all specs':<23}{total * 1e3:>8.1f}ms{total_full * 1e3:>8.1f}ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the peer (default 1; see the docstring)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads; "
          f"peer input {ROWS}x{COLS} float64\n")
    rng = np.random.default_rng(0)
    rows = [bench_spec(name, args.repeat, rng) for name in builtin_specs()]
    print_table(rows)
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "cpus": os.cpu_count(), "platform": platform.platform()}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
