"""Generated convolution and max-pooling kernels against torch's native ops (CPU, one thread;
or a GPU with --device cuda).

Run it from the repository root::

    python bench/bench_conv.py                     # float32, N = 128, table on stdout
    python bench/bench_conv.py --iters 5 --json conv.json
    python bench/bench_conv.py --device cuda --iters 50     # on a GPU: generated vs native

Cases (the sizes of the MNIST CNN in issue 9): 2-D convolution with a 3×3 kernel, stride 1,
1→32 channels at 28×28 and 32→64 channels at 14×14, each twice: with padding 1 (the built-in
``conv2d`` spec pads its input with ``spec.pad``: an ``F.pad`` copy, then the convolution)
against ``F.conv2d(padding=1)``, and on the equivalent pre-padded input (30×30, 16×16; P = 0)
against ``F.conv2d`` without padding, which times the convolution lowering alone; max pooling
2×2, stride 2, 32 channels at 28×28 and 64 at 14×14. Each is one forward + backward at batch
128 of:

* ``torch``: the generated ``<Name>Function.apply`` (``compile_spec(spec, "torch")``), its
  backward the derived closed form, lowered to torch's convolution / pooling kernels;
* ``numpy``: the generated NumPy ``forward`` then ``backward`` on NumPy arrays;
* ``native`` (the peer): ``F.conv2d`` (same padding) or ``F.max_pool2d`` with autograd.

Every variant runs in the same process, interleaved step by step, each a median of
``--iters`` steps after ``--warmup`` untimed ones, torch on one thread (NumPy's BLAS too, set
before NumPy loads). Ratio = variant / native of the same run. Target (issue 9): torch conv2d
≤ 1.2. A missed target is printed, not raised.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # NumPy's BLAS: one thread, as torch
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402, N812

from gradtool.codegen.cache import compile_spec  # noqa: E402

BATCH = 128
TARGET_TORCH = 1.2
# (spec, channels in, channels out, image size, padding)
CASES = (("conv2d", 1, 32, 28, 1), ("conv2d", 32, 64, 14, 1),
         ("conv2d", 1, 32, 30, 0), ("conv2d", 32, 64, 16, 0),
         ("maxpool2d", 32, 32, 28, 0), ("maxpool2d", 64, 64, 14, 0))


def case(spec: str, c_in: int, c_out: int, size: int, pad: int,
         gen: torch.Generator, device: torch.device) -> dict:
    """The three ways to run one forward + backward, as functions of no arguments (two on a
    GPU, where there is no NumPy variant)."""
    torch_mod, numpy_mod = compile_spec(spec, "torch"), compile_spec(spec, "numpy")
    fn = next(v for k, v in vars(torch_mod).items() if k.endswith("Function"))
    X = torch.randn(BATCH, c_in, size, size, generator=gen).to(device).requires_grad_()
    if spec == "conv2d":
        weight = (torch.randn(c_out, c_in, 3, 3, generator=gen) * 0.1).to(device).requires_grad_()
        bias = torch.zeros(c_out, device=device).requires_grad_()
        leaves, hyper = [X, weight, bias], {"P": pad, "S": 1}
        args = [X, weight, bias, pad, 1]

        def native():
            return F.conv2d(X, weight, bias, padding=pad)
    else:
        leaves, hyper = [X], {"K": 2, "P": 0, "S": 2}
        args = [X, 2, 0, 2]

        def native():
            return F.max_pool2d(X, 2, stride=2)
    G = torch.randn(native().shape, generator=gen).to(device)
    arrays = [t.detach().cpu().numpy() for t in leaves]
    g_np = G.cpu().numpy()
    sizes = {"H": size, "W": size}

    def run_torch():
        for t in leaves:
            t.grad = None
        fn.apply(*args).backward(G)

    def run_native():
        for t in leaves:
            t.grad = None
        native().backward(G)

    def run_numpy():
        _, saved = numpy_mod.forward(*arrays, **hyper)
        numpy_mod.backward(g_np, *saved, **sizes, **hyper)

    if device.type == "cuda":
        return {"torch": run_torch, "native": run_native}
    return {"torch": run_torch, "numpy": run_numpy, "native": run_native}


def bench(iters: int, warmup: int, threads: int, device: str = "cpu") -> list[dict]:
    torch.set_num_threads(threads)
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for spec, c_in, c_out, size, pad in CASES:
        runs = case(spec, c_in, c_out, size, pad, gen, device)
        for _ in range(warmup):
            for run in runs.values():
                run()
        sync()
        times = {name: [] for name in runs}
        for _ in range(iters):
            for name, run in runs.items():  # interleaved: a slow spell hits all of them
                start = time.perf_counter()
                run()
                sync()  # a GPU only queues the kernels
                times[name].append(time.perf_counter() - start)
        med = {name: statistics.median(t) for name, t in times.items()}
        shape = f"{c_in}→{c_out} at {size}×{size}, P = {pad}" if spec == "conv2d" else \
            f"{c_in} ch at {size}×{size}"
        for name in [n for n in runs if n != "native"]:
            ratio = med[name] / med["native"]
            target = TARGET_TORCH if (spec, name) == ("conv2d", "torch") else None
            rows.append({"spec": spec, "shape": shape, "backend": name,
                         "ms": med[name] * 1e3, "native_ms": med["native"] * 1e3,
                         "ratio": ratio, "target": target,
                         "met": None if target is None else ratio <= target})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda[:k]; on a GPU each step is timed to "
                             "torch.cuda.synchronize() and the NumPy variant is left out")
    parser.add_argument("--json", help="also write the rows to this file")
    opts = parser.parse_args()
    rows = bench(opts.iters, opts.warmup, opts.threads, opts.device)
    where = (torch.cuda.get_device_name(opts.device) if opts.device.startswith("cuda")
             else f"{opts.threads} thread(s)")
    print(f"N = {BATCH}, float32, {where}, median of {opts.iters}")
    print("| case | size | backend | generated | native (peer) | ratio | target | met |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        target = f"≤ {r['target']}" if r["target"] else "—"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"| {r['spec']} | {r['shape']} | {r['backend']} | {r['ms']:.1f} ms | "
              f"{r['native_ms']:.1f} ms | {r['ratio']:.2f}× | {target} | {met} |")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump({"batch": BATCH, "threads": opts.threads, "iters": opts.iters,
                       "device": where,
                       "numpy": np.__version__, "torch": torch.__version__, "rows": rows},
                      f, indent=1)


if __name__ == "__main__":
    main()
