"""Checking layer norm at N=64, D=256 (16,384 inputs): gradtool against torch.autograd.gradcheck.

Run it from the repository root::

    python bench/bench_check.py                  # table on stdout (about 6 minutes, ~20 GB RAM)
    python bench/bench_check.py --json out.json  # and the numbers as JSON
    python bench/bench_check.py --slow-size 16   # gradcheck's default mode on 16×256 only

All in one process, torch on one thread (``--threads``):

* ``gradtool fd``: ``check_spec(load_spec("layernorm"), CheckOptions(cases=1,
  fixed={"N": 64, "D": 256}, oracles=("fd",)))``, the finite-difference oracle alone, the one
  comparable to gradcheck. SymPy's cache is cleared before every timed run, so each pays for
  its derivation as a fresh ``gradtool check`` would. Median of ``--repeat`` runs after one
  warm-up (the warm-up writes the kernel cache if needed). ``gradtool all`` is the same with
  the default oracle set (fd, autograd, reference, backends, forward), for information.
* ``gradcheck slow``: ``torch.autograd.gradcheck(fn, (X, gamma, beta), eps=1e-6, atol=1e-5,
  rtol=1e-3)`` in its default mode (``fast_mode=False``), ``fn`` the generated
  ``LayernormFunction.apply`` (``compile_spec("layernorm", "torch")``), float64 inputs X 64×256,
  gamma and beta 256. It builds the full 16,896 × 16,384 Jacobian twice (numerically and by
  backward), so one run takes over a minute and peaks near 20 GB of memory; it is timed once.
  ``--scaling`` also times it at 16×256 and 32×256 to show how it grows.
* ``gradcheck fast``: the same call with ``fast_mode=True`` (median of ``--repeat``), for
  information.

Detection power: every tool is also run on three broken layer norms, each a
``torch.autograd.Function`` that reuses the generated forward and alters the backward's dX:

* (a) ``drop-term``: dX without the ``x̂·mean(G·γ·x̂)`` term;
* (b) ``dX×2``: dX scaled by 2 (dγ, dβ left right);
* (c) ``one-entry``: one Jacobian entry ∂Y[3,5]/∂X[3,7] off by 1e-3, i.e.
  ``dX[3,7] += 1e-3·G[3,5]``.

gradtool checks them through ``make_subject(spec, Fn)`` and ``check_spec(..., subject=...)``,
gradcheck through ``Fn.apply`` (with ``raise_exception=False``). ``ok`` says whether the correct
generated Function passes (a tool that fails everything would "catch" everything).

Targets (from the issue): gradtool's check under 2 s, and at least 10× faster than gradcheck in
its default mode. A missed target is printed, not raised.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from sympy.core.cache import clear_cache

from gradtool.check.impl import make_subject
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.codegen.cache import compile_spec
from gradtool.spec.loader import load_spec

N, D = 64, 256
EPS = 1e-5                      # the layer's epsilon
GC = dict(eps=1e-6, atol=1e-5, rtol=1e-3)
TARGET_S = 2.0
TARGET_RATIO = 10.0
ALL_ORACLES = ("fd", "autograd", "reference", "backends", "forward")
ENTRY = (3, 5, 7)               # (row, output column, input column) of the Jacobian entry in (c)


def make_variants(mod) -> dict[str, type]:
    """The generated LayernormFunction and three broken copies of it."""
    gen = mod.backward

    def fn_class(name: str, alter):
        def backward(ctx, G):
            dX, dgamma, dbeta = gen(G, *ctx.saved_tensors)
            return alter(dX, G, *ctx.saved_tensors), dgamma, dbeta, None

        return type(name, (torch.autograd.Function,), {
            "forward": staticmethod(mod.LayernormFunction.forward),
            "backward": staticmethod(backward)})

    def drop_term(dX, G, gamma, rstd, xhat):
        d = G.shape[1]
        # the generated dX is (γG − x̂·Σ(γG·x̂)/D − Σ(γG)/D)·rstd: put the x̂ term back
        return dX + xhat * ((gamma * G * xhat).sum(1) / d)[:, None] * rstd[:, None]

    def doubled(dX, G, *_):
        return 2 * dX

    def one_entry(dX, G, *_):
        r, out_col, in_col = ENTRY
        dX = dX.clone()
        dX[r, in_col] += 1e-3 * G[r, out_col]
        return dX

    return {"ok": mod.LayernormFunction,
            "a": fn_class("DropTermFunction", drop_term),
            "b": fn_class("DoubledFunction", doubled),
            "c": fn_class("OneEntryFunction", one_entry)}


def gradtool_check(spec, oracles, subject=None) -> tuple[float, bool]:
    clear_cache()
    start = time.perf_counter()
    rows = check_spec(spec, CheckOptions(cases=1, fixed={"N": N, "D": D}, oracles=oracles),
                      subject=subject)
    return time.perf_counter() - start, all(r.passed for r in rows)


def gradcheck(fn_cls, inputs, fast: bool) -> tuple[float, bool]:
    def fn(X, gamma, beta):
        return fn_cls.apply(X, gamma, beta, EPS)

    start = time.perf_counter()
    ok = torch.autograd.gradcheck(fn, inputs, fast_mode=fast, raise_exception=False, **GC)
    return time.perf_counter() - start, bool(ok)


def layer_inputs(rows: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, dtype=torch.float64, generator=g).requires_grad_()
                 for shape in ((rows, D), (D,), (D,)))


def measure(repeat: int, slow_rows: int, scaling: bool, log) -> dict:
    spec = load_spec("layernorm")
    mod = compile_spec(spec, "torch")
    variants = make_variants(mod)
    subjects = {k: make_subject(spec, f) for k, f in variants.items() if k != "ok"}
    inputs = layer_inputs(N)
    rows = []

    for label, oracles in (("fd", ("fd",)), ("all oracles", ALL_ORACLES)):
        gradtool_check(spec, oracles)  # warm-up
        times, oks = zip(*(gradtool_check(spec, oracles) for _ in range(repeat)), strict=True)
        passes = {k: gradtool_check(spec, oracles, s)[1] for k, s in subjects.items()}
        rows.append({"tool": "gradtool", "mode": label, "size": f"{N}x{D}",
                     "wall_s": statistics.median(times), "runs": repeat, "ok": all(oks),
                     "catches": {k: not v for k, v in passes.items()}})
        log(f"gradtool {label}: {statistics.median(times):.3f} s")

    gradcheck(variants["ok"], layer_inputs(4), fast=True)  # warm-up
    times, oks = zip(*(gradcheck(variants["ok"], inputs, True) for _ in range(repeat)),
                     strict=True)
    passes = {k: gradcheck(variants[k], inputs, True)[1] for k in subjects}
    rows.append({"tool": "gradcheck", "mode": "fast_mode=True", "size": f"{N}x{D}",
                 "wall_s": statistics.median(times), "runs": repeat, "ok": all(oks),
                 "catches": {k: not v for k, v in passes.items()}})
    log(f"gradcheck fast: {statistics.median(times):.4f} s")

    slow_inputs = inputs if slow_rows == N else layer_inputs(slow_rows)
    scaling_points = []
    if scaling:
        for r in (16, 32):
            if r < slow_rows:
                t, _ = gradcheck(variants["ok"], layer_inputs(r), False)
                scaling_points.append({"size": f"{r}x{D}", "inputs": r * D + 2 * D, "wall_s": t})
                log(f"gradcheck slow {r}x{D}: {t:.1f} s")
    t, ok = gradcheck(variants["ok"], slow_inputs, False)
    scaling_points.append({"size": f"{slow_rows}x{D}", "inputs": slow_rows * D + 2 * D,
                           "wall_s": t})
    log(f"gradcheck slow {slow_rows}x{D}: {t:.1f} s")
    passes = {}
    for k in subjects:
        passes[k] = gradcheck(variants[k], slow_inputs, False)[1]
        log(f"gradcheck slow on ({k}): {'passed' if passes[k] else 'failed'}")
    rows.append({"tool": "gradcheck", "mode": "default (fast_mode=False)",
                 "size": f"{slow_rows}x{D}", "wall_s": t, "runs": 1, "ok": ok,
                 "catches": {k: not v for k, v in passes.items()}})

    base = rows[0]["wall_s"]
    for r in rows:
        r["ratio_vs_gradtool_fd"] = r["wall_s"] / base
    slow = rows[-1]
    return {"rows": rows, "gradcheck_slow_points": scaling_points,
            "targets": {"gradtool_under_2s": base < TARGET_S,
                        "ratio_at_least_10x": slow["size"] == f"{N}x{D}"
                        and slow["wall_s"] / base >= TARGET_RATIO}}


def ratio_text(x: float) -> str:
    return f"{x:.1f}x" if x >= 0.95 else f"{x:.3f}x"


def print_table(result: dict) -> None:
    head = f"{'tool':<10}{'mode':<28}{'size':>8}{'wall':>11}{'runs':>6}{'ratio':>9}" \
           f"{'ok':>5}{'(a)':>5}{'(b)':>5}{'(c)':>5}"
    print(head)
    print("-" * len(head))
    yn = {True: "yes", False: "no"}
    for r in result["rows"]:
        c = r["catches"]
        print(f"{r['tool']:<10}{r['mode']:<28}{r['size']:>8}{r['wall_s']:>10.4f}s{r['runs']:>6}"
              f"{ratio_text(r['ratio_vs_gradtool_fd']):>9}{yn[r['ok']]:>5}{yn[c['a']]:>5}{yn[c['b']]:>5}"
              f"{yn[c['c']]:>5}")
    print("\nok: the correct generated Function passes; (a) drop-term, (b) dX×2, (c) one "
          "Jacobian entry off by 1e-3: yes = the tool reports the bug")
    if len(result["gradcheck_slow_points"]) > 1:
        print("gradcheck default mode by size: " + ", ".join(
            f"{p['size']} ({p['inputs']} inputs) {p['wall_s']:.1f} s"
            for p in result["gradcheck_slow_points"]))
    t = result["targets"]
    met = "met" if t["gradtool_under_2s"] else "NOT met"
    print(f"\ntarget gradtool fd < {TARGET_S:g} s: {met}")
    print(f"target gradcheck default / gradtool fd >= {TARGET_RATIO:g}x: "
          f"{'met' if t['ratio_at_least_10x'] else 'NOT met (or not measured at 64x256)'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5, help="runs per median (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--slow-size", type=int, default=N, metavar="ROWS",
                        help=f"rows for gradcheck's default mode (default {N}; it needs "
                             "~20 GB at 64)")
    parser.add_argument("--scaling", action="store_true",
                        help="also time gradcheck's default mode at 16 and 32 rows")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} "
          f"CPUs, {torch.get_num_threads()} torch threads; layer norm {N}x{D} float64\n")
    result = measure(args.repeat, args.slow_size, args.scaling,
                     lambda msg: print("  " + msg, flush=True))
    print()
    print_table(result)
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "platform": platform.platform()}
        args.json.write_text(json.dumps({"machine": meta, **result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
