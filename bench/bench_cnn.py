"""CNN training throughput: gradtool's layers against the same CNN written in plain torch.nn.

Run it from the repository root::

    PYTHONPATH=. python bench/bench_cnn.py                     # --model cnn on 8×8 digits, batch 32
    PYTHONPATH=. python bench/bench_cnn.py --image 28 --batch 128      # the same CNN at MNIST size
    PYTHONPATH=. python bench/bench_cnn.py --model vu-mnist-cnn --image 28 --batch 128
    PYTHONPATH=. python bench/bench_cnn.py --json out.json
    PYTHONPATH=. python bench/bench_cnn.py --compile both --no-numpy   # torch.compile'd, both

Three variants of one CNN (``gradtool.nn.cnn``, or a model file) with the same initial weights,
the same optimiser (torch.optim.Adam, lr 1e-3) and the same batches (random float32 images,
already in memory, so no data loading is timed):

* ``plain``: ``torch.nn.Conv2d``/``BatchNorm2d``/``ReLU``/``MaxPool2d``/``Linear`` (and
  ``x.mean((2, 3))`` for global average pooling) with autograd and ``F.cross_entropy``;
* ``torch``: gradtool's torch backend, ``SpecModule``s over the generated autograd.Functions
  (each run of consecutive ones as one node, ``gradtool.nn.fused``; ``--layer-by-layer``: one
  node per layer, for A/B runs);
* ``numpy``: gradtool's NumPy backend, the chain of generated NumPy backwards, with torch.optim
  stepping the arrays in place.

One training step is forward, loss, backward and the optimiser step, in training mode (batch
statistics). The variants run in the same process, interleaved step by step, each a median
over ``--iters`` steps after ``--warmup`` untimed ones, torch and NumPy's BLAS on ``--threads``
threads (default 1). Reported: samples/s of each and the ratios torch/plain (goal ≥ 0.9) and
numpy/plain (goal ≥ 0.25). A missed goal is printed, not raised.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def plain_model(desc):
    """The same layers as ``desc`` from torch.nn (one module per gradtool layer, so that the
    parameters line up one to one)."""
    import torch

    class GlobalAvgPool(torch.nn.Module):
        def forward(self, x):
            return x.mean((2, 3))

    layers = []
    for e in desc.layers:
        o = e.options
        if e.flatten:
            layers.append(torch.nn.Flatten())
        elif e.spec == "conv2d":
            layers.append(torch.nn.Conv2d(o["C"], o["O"], o["K"], o["S"], o["P"]))
        elif e.spec == "batchnorm2d":
            layers.append(torch.nn.BatchNorm2d(o["C"]))
        elif e.spec == "maxpool2d":
            layers.append(torch.nn.MaxPool2d(o["K"], o["S"], o["P"]))
        elif e.spec == "global_avgpool":
            layers.append(GlobalAvgPool())
        elif e.spec == "relu":
            layers.append(torch.nn.ReLU())
        elif e.spec == "dropout":
            layers.append(torch.nn.Dropout(o["p"]))
        elif e.spec == "linear":
            layers.append(torch.nn.Linear(o["I"], o["O"]))
        else:
            raise SystemExit(f"bench_cnn: no torch.nn counterpart for {e.spec}")
    return torch.nn.Sequential(*layers)


def copy_weights(ours, plain) -> None:
    """gradtool's layers hold W[O, C, K, K] / W[O, I], b, gamma, beta in torch's layouts and
    in the same order as torch.nn's weight, bias."""
    import torch

    with torch.no_grad():
        for mine, theirs in zip(ours, plain, strict=True):
            for a, b in zip(mine.parameters(), theirs.parameters(), strict=True):
                b.copy_(a)


def layer_times(ours, plain, x, iters: int) -> None:
    """Each layer's forward + backward (upstream gradient of ones) on the activations the
    model feeds it, gradtool's torch layer against its torch.nn twin, interleaved; medians
    (on a GPU, each to torch.cuda.synchronize())."""
    import torch

    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    ours.train()
    plain.train()
    print("  layer-by-layer, forward + backward (median ms): torch backend, plain, ratio")
    h = x
    for k, (mine, theirs) in enumerate(zip(ours, plain, strict=True)):
        inp = h.detach().requires_grad_(k > 0)
        times = {"ours": [], "plain": []}
        for _ in range(max(iters, 5)):
            for name, layer in (("ours", mine), ("plain", theirs)):
                t0 = time.perf_counter()
                y = layer(inp)
                y.backward(torch.ones_like(y))
                sync()
                times[name].append(time.perf_counter() - t0)
        a, b = (statistics.median(times[n]) * 1e3 for n in ("ours", "plain"))
        print(f"    {k:2d} {type(theirs).__name__:12s} {tuple(inp.shape)!s:20s} "
              f"{a:8.2f} {b:8.2f}  {a / b:5.2f}×")
        with torch.no_grad():
            h = theirs(inp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="cnn", help="cnn, a shipped model name or a .toml file")
    ap.add_argument("--image", type=int, default=8, help="image height and width")
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu",
                    help="cpu or cuda[:k] (the NumPy backend is skipped on a GPU); each step "
                         "is timed to torch.cuda.synchronize()")
    ap.add_argument("--compile", choices=("none", "gradtool", "both"), default="none",
                    help="run gradtool's model (and with both, plain's too) through "
                         "torch.compile(dynamic=False); compile time is not timed")
    ap.add_argument("--no-numpy", action="store_true", help="skip the NumPy backend")
    ap.add_argument("--layer-by-layer", action="store_true",
                    help="torch backend: one autograd node per layer (SpecSequential.fused = "
                         "False), not one per run of SpecModules")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--layers", action="store_true",
                    help="also time each layer's forward + backward against its torch.nn twin")
    args = ap.parse_args()
    # BLAS reads its thread count at import: set it first (NumPy's matmul/einsum use it)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch
    from training_steps import interleaved_times, report, step_functions

    from gradtool.nn import build, cnn, load_model_file

    torch.set_num_threads(args.threads)
    shape = (args.channels, args.image, args.image)
    desc = cnn(shape, args.classes) if args.model == "cnn" else load_model_file(args.model)

    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        args.no_numpy = True
    tmodel, tloss = build(desc, "torch", seed=0)
    tmodel.fused = not args.layer_by_layer
    pmodel = plain_model(desc)
    copy_weights(tmodel, pmodel)
    tmodel, tloss, pmodel = tmodel.to(device), tloss.to(device), pmodel.to(device)
    opts = {"plain": torch.optim.Adam(pmodel.parameters(), lr=1e-3),
            "torch": torch.optim.Adam(tmodel.parameters(), lr=1e-3)}
    if not args.no_numpy:
        nmodel, nloss = build(desc, "numpy", seed=0)
        opts["numpy"] = torch.optim.Adam(nmodel.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, *shape)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, args.classes, args.batch))
    x, y = x.to(device), y.to(device)
    if args.compile != "none":
        from gradtool.nn.fused import prepare_calls

        prepare_calls(tmodel, [tuple(x.shape)], x.dtype, device)
        tmodel = torch.compile(tmodel, dynamic=False)
        if args.compile == "both":
            pmodel = torch.compile(pmodel, dynamic=False)
    steps = step_functions(x, y, opts, plain=pmodel, torch_model=(tmodel, tloss),
                           numpy_model=None if args.no_numpy else (nmodel, nloss))
    times = interleaved_times(steps, args.warmup, args.iters,
                              torch.cuda.synchronize if on_gpu else None)
    where = f" on {torch.cuda.get_device_name(device)}" if on_gpu else ""
    where += {"none": "", "gradtool": ", gradtool's model compiled",
              "both": ", both models compiled"}[args.compile]
    report(f"{args.model} on {args.batch}×{'×'.join(map(str, shape))}{where}", times, args.batch,
           {"torch/plain": 0.9, "numpy/plain": 0.25}, args.threads, args.json_out)
    if args.layers:
        layer_times(tmodel, pmodel, x, args.iters)

if __name__ == "__main__":
    main()
