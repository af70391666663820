"""Generated PyTorch kernels against torch.autograd and torch's native fused ops (CPU).

Run it from the repository root::

    python bench/bench_kernels.py                      # float32, 256×1024, table on stdout
    python bench/bench_kernels.py --compile            # also torch.compile'd generated kernels
    python bench/bench_kernels.py --dtypes float32,float64 --json out.json
    python bench/bench_kernels.py --profile            # where the generated code spends time
    python bench/bench_kernels.py --compile --rows 1024 --cols 4096   # another size

For layernorm, batchnorm and softmax_cross_entropy at 256×1024, the time of one forward +
backward (inputs already built, ``.grad`` reset to None before each step) of:

* ``generated``: ``<Name>Function.apply`` from ``compile_spec(spec, "torch")``, the generated
  closed-form backward behind an ``autograd.Function``;
* ``autograd``: torch.autograd through the generated ``forward`` function, i.e. the same
  forward in primitive torch ops, with ``out.backward(G)``;
* ``native``: the fused op with autograd: ``F.layer_norm``, ``F.batch_norm(training=True)``,
  ``F.cross_entropy`` with probability targets;
* ``compiled`` (``--compile``): ``torch.compile`` (default mode, inductor on CPU) of the
  generated ``<Name>Function.apply``, as when a model that uses the generated module is
  compiled; the compile time is paid in the warm-up and reported apart;
* ``floor`` (with ``--compile``): the same compiled wrapping around an identity Function
  (forward ``X * 1``, backward returns G): the fixed cost of the compiled path (guards,
  AOTAutograd wrappers, the autograd node, one allocation) that no kernel goes below.

Every variant runs in the same process, interleaved step by step (one step of each in turn),
each a median of ``--iters`` steps (default 50) after ``--warmup`` untimed steps (default 5),
torch on one thread (``--threads``; on this 2-core machine two threads made the medians jump).
Upstream gradient: standard normal for layernorm and batchnorm, 1 for the scalar loss.

``--malloc-tuned`` calls glibc's ``mallopt`` so that freed blocks stay in the process: with
the defaults, glibc hands a freed 1 MB tensor back to the kernel and the next one page-faults
in again, which on this VM costs ~0.7 ms per fresh 256×1024 float32 temporary and dominates
code that keeps several temporaries alive (see docs/benchmarks.md).

Targets (from the issue): generated / autograd ≤ 0.7; compiled generated within 1.2× of native
fused (compiled / native ≤ 1.2). A missed target is printed, not raised.
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
import torch.nn.functional as F

from gradtool.codegen.cache import compile_spec

ROWS, COLS = 256, 1024
SPECS = ("layernorm", "batchnorm", "softmax_cross_entropy")
EPS, MOMENTUM = 1e-5, 0.1
TARGET_AUTOGRAD = 0.7
TARGET_NATIVE = 1.2


class Case:
    """Inputs and the four ways to run forward + backward for one spec."""

    def __init__(self, name: str, dtype: torch.dtype, gen: torch.Generator):
        self.name, self.mod = name, compile_spec(name, "torch")
        self.fn_cls = next(v for k, v in vars(self.mod).items() if k.endswith("Function"))

        def randn(*shape):
            return torch.randn(*shape, generator=gen, dtype=dtype)

        X = randn(ROWS, COLS).requires_grad_()
        if name == "softmax_cross_entropy":
            T = torch.rand(ROWS, COLS, generator=gen, dtype=dtype) + 0.05
            self.leaves = [X]
            self.args = [X, T / T.sum(1, keepdim=True)]
            self.kw, self.extra = {}, []
            self.G = None  # scalar loss: backward() seeds 1
        else:
            gamma, beta = randn(COLS).requires_grad_(), randn(COLS).requires_grad_()
            self.leaves = [X, gamma, beta]
            self.args = [X, gamma, beta]
            self.kw, self.extra = {"eps": EPS}, [EPS]
            if name == "batchnorm":
                self.state = [torch.zeros(COLS, dtype=dtype), torch.ones(COLS, dtype=dtype)]
                self.args += self.state
                self.kw["momentum"] = MOMENTUM
                self.extra += [MOMENTUM, 1.0]  # correction 1: the unbiased running variance
            self.G = randn(ROWS, COLS)

    def _backward(self, out):
        if self.G is None:
            out.backward()
        else:
            out.backward(self.G)

    def _reset(self):
        for t in self.leaves:
            t.grad = None

    # -- the variants: each runs one forward + backward -------------------------------------

    def generated(self):
        self._backward(self.fn_cls.apply(*self.args, *self.extra))

    def autograd(self):
        self._backward(self.mod.forward(*self.args, **self.kw)[0])

    def native(self):
        if self.name == "layernorm":
            X, gamma, beta = self.args
            out = F.layer_norm(X, (COLS,), gamma, beta, EPS)
        elif self.name == "batchnorm":
            X, gamma, beta, rm, rv = self.args
            out = F.batch_norm(X, rm, rv, gamma, beta, training=True, momentum=MOMENTUM,
                               eps=EPS)
        else:
            out = F.cross_entropy(*self.args)
        self._backward(out)

    def make_compiled(self):
        """torch.compile of the generated autograd.Function's application, the way a model
        using the generated module is compiled: Dynamo traces the Function's forward and
        backward, AOTAutograd partitions them and inductor fuses each into C++ kernels."""
        fn_cls, n = self.fn_cls, len(self.args)
        extra = list(self.extra)
        compiled = torch.compile(lambda *args: fn_cls.apply(*args, *extra))

        def run():
            self._backward(compiled(*self.args[:n]))

        return run

    def make_floor(self):
        """The fixed cost of the compiled path: the same wrapping around an identity
        (forward X * 1, backward returns G), i.e. what no kernel can go below."""
        class Identity(torch.autograd.Function):
            @staticmethod
            def forward(ctx, X, *rest):
                ctx.n = len(rest)
                return X * 1.0 if self.G is not None else (X * 1.0).sum()

            @staticmethod
            def backward(ctx, G):
                return (G if G.dim() else G.expand(ROWS, COLS)), *[None] * ctx.n

        compiled = torch.compile(lambda *args: Identity.apply(*args))

        def run():
            self._backward(compiled(*self.args))

        return run

    def step(self, fn) -> float:
        self._reset()
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start

    def agree(self, fns: dict) -> dict:
        """Max |grad − native grad| of each variant, to show they compute the same thing."""
        self._reset()
        self.native()
        ref = [t.grad.clone() for t in self.leaves]
        out = {}
        for label, fn in fns.items():
            self._reset()
            fn()
            out[label] = max(float((t.grad - r).abs().max()) for t, r in
                             zip(self.leaves, ref, strict=True))
        return out


def bench(name: str, dtype: torch.dtype, iters: int, warmup: int, compile_: bool, log) -> dict:
    case = Case(name, dtype, torch.Generator().manual_seed(0))
    fns = {"generated": case.generated, "autograd": case.autograd, "native": case.native}
    row = {"spec": name, "dtype": str(dtype).removeprefix("torch."), "shape": f"{ROWS}x{COLS}",
           "iters": iters}
    if compile_:
        try:
            compiled = case.make_compiled()
            start = time.perf_counter()
            case.step(compiled)
            row["compile_s"] = time.perf_counter() - start
            fns["compiled"] = compiled
            floor = case.make_floor()
            case.step(floor)
            fns["floor"] = floor
        except Exception as exc:  # noqa: BLE001 - report and go on without it
            row["compile_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log(f"{name}: torch.compile failed: {row['compile_error']}")
    for _ in range(warmup):
        for fn in fns.values():
            case.step(fn)
    times = {k: [] for k in fns}
    for _ in range(iters):
        for label, fn in fns.items():
            times[label].append(case.step(fn))
    for label, ts in times.items():
        row[f"{label}_ms"] = 1e3 * statistics.median(ts)
    row["max_grad_diff_vs_native"] = case.agree({k: v for k, v in fns.items()
                                                 if k not in ("native", "floor")})
    row["generated_over_autograd"] = row["generated_ms"] / row["autograd_ms"]
    row["generated_over_native"] = row["generated_ms"] / row["native_ms"]
    if "compiled_ms" in row:
        row["compiled_over_native"] = row["compiled_ms"] / row["native_ms"]
        row["floor_over_native"] = row["floor_ms"] / row["native_ms"]
    log(f"{name} {row['dtype']}: done")
    return row


def profile(name: str, dtype: torch.dtype, steps: int = 50) -> None:
    """torch.profiler over ``steps`` forward + backward of the generated Function."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    case = Case(name, dtype, torch.Generator().manual_seed(0))
    for _ in range(5):
        case.step(case.generated)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            case.step(case.generated)
    print(f"\n== {name} {dtype}: generated Function, {steps} steps, by self CPU time ==")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14))


def print_table(rows: list[dict]) -> None:
    compiled = any("compiled_ms" in r for r in rows)
    head = f"{'spec':<23}{'dtype':<9}{'generated':>11}{'autograd':>10}{'native':>9}" + \
        (f"{'compiled':>10}{'floor':>9}" if compiled else "") + \
        f"{'gen/auto':>10}{'gen/nat':>9}" + (f"{'comp/nat':>10}{'floor/nat':>11}"
                                            if compiled else "")
    print(head)
    print("-" * len(head))
    for r in rows:
        line = f"{r['spec']:<23}{r['dtype']:<9}{r['generated_ms']:>9.3f}ms" \
               f"{r['autograd_ms']:>8.3f}ms{r['native_ms']:>7.3f}ms"
        if compiled:
            line += f"{r['compiled_ms']:>8.3f}ms{r['floor_ms']:>7.3f}ms" if "compiled_ms" in r \
                else f"{'failed':>10}{'-':>9}"
        line += f"{r['generated_over_autograd']:>10.2f}{r['generated_over_native']:>9.2f}"
        if compiled:
            line += f"{r['compiled_over_native']:>10.2f}{r['floor_over_native']:>11.2f}" \
                if "compiled_ms" in r else f"{'-':>10}{'-':>11}"
        print(line)
    print(f"\nmedians of forward + backward, {rows[0]['iters']} steps each; target gen/auto "
          f"<= {TARGET_AUTOGRAD}, comp/nat <= {TARGET_NATIVE}")
    for r in rows:
        ok = r["generated_over_autograd"] <= TARGET_AUTOGRAD
        msg = f"{r['spec']} {r['dtype']}: generated/autograd {r['generated_over_autograd']:.2f} " \
              f"{'met' if ok else 'NOT met'}"
        if "compiled_ms" in r:
            ok = r["compiled_over_native"] <= TARGET_NATIVE
            msg += f"; compiled/native {r['compiled_over_native']:.2f} " \
                   f"{'met' if ok else 'NOT met'} (compile {r['compile_s']:.1f} s)"
        elif "compile_error" in r:
            msg += f"; compile failed: {r['compile_error']}"
        diffs = ", ".join(f"{k} {v:.1e}" for k, v in r["max_grad_diff_vs_native"].items())
        print(msg + f"; max |grad - native grad|: {diffs}")


def tune_malloc() -> bool:
    """Keep freed memory in the process (glibc): no mmap for big blocks, no trimming."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and \
            bool(libc.mallopt(m_trim_threshold, 1 << 30))
    except (OSError, AttributeError):
        return False


def main() -> None:
    global ROWS, COLS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=50, help="timed steps (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--dtypes", default="float32", help="comma-separated (default float32)")
    parser.add_argument("--specs", default=",".join(SPECS), help="comma-separated spec names")
    parser.add_argument("--compile", action="store_true", help="also torch.compile'd kernels")
    parser.add_argument("--rows", type=int, default=ROWS, help=f"batch size (default {ROWS})")
    parser.add_argument("--cols", type=int, default=COLS, help=f"features (default {COLS})")
    parser.add_argument("--profile", action="store_true",
                        help="also print torch.profiler tables of the generated Function")
    parser.add_argument("--malloc-tuned", action="store_true",
                        help="glibc mallopt: keep freed blocks (no mmap/trim), see the docs")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    ROWS, COLS = args.rows, args.cols
    torch.set_num_threads(args.threads)
    tuned = tune_malloc() if args.malloc_tuned else False
    print(f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} "
          f"CPUs, {torch.get_num_threads()} torch threads; {ROWS}x{COLS}; malloc "
          f"{'tuned (mallopt)' if tuned else 'default'}\n")
    rows = []
    for dt in args.dtypes.split(","):
        for name in args.specs.split(","):
            rows.append(bench(name, getattr(torch, dt), args.iters, args.warmup, args.compile,
                              lambda msg: print("  " + msg, flush=True)))
    print()
    print_table(rows)
    if args.profile:
        for dt in args.dtypes.split(","):
            for name in args.specs.split(","):
                profile(name, getattr(torch, dt))
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "platform": platform.platform(), "malloc_tuned": tuned}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
