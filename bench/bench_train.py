"""Training throughput: gradtool's layers against the same model written in plain torch.nn.

Run it from the repository root::

    python bench/bench_train.py                        # MNIST-sized MLP, batch 128
    python bench/bench_train.py --hidden 256,128 --features 64 --batch 32   # the digits default
    python bench/bench_train.py --json out.json

Three variants of one MLP (flatten → linear → relu → … → linear, softmax cross-entropy) with
the same initial weights, the same optimiser (torch.optim.Adam) and the same batches (random
float32 data, already in memory, so no data loading is timed):

* ``plain``: ``torch.nn.Linear``/``ReLU`` and ``F.cross_entropy`` with autograd;
* ``torch``: gradtool's torch backend, ``SpecModule``s over the generated autograd.Functions;
* ``numpy``: gradtool's NumPy backend, the chain of generated NumPy backwards, with torch.optim
  stepping the arrays in place.

One training step is forward, loss, backward and the optimiser step. The variants run in the
same process, interleaved step by step, each a median over ``--iters`` steps after ``--warmup``
untimed ones, torch and NumPy's BLAS on ``--threads`` threads (default 1: on the shared
2-core machine two threads made the medians jump). Reported: samples/s of each and the
ratios torch/plain (goal ≥ 0.9) and numpy/plain (goal ≥ 0.5). A missed goal is printed, not raised.
"""

from __future__ import annotations

import argparse
import os


def plain_model(desc_hidden, features, classes):
    import torch

    layers, width = [torch.nn.Flatten()], features
    for h in desc_hidden:
        layers += [torch.nn.Linear(width, h), torch.nn.ReLU()]
        width = h
    layers.append(torch.nn.Linear(width, classes))
    return torch.nn.Sequential(*layers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", default="256,128")
    ap.add_argument("--features", type=int, default=784)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", dest="json_out")
    args = ap.parse_args()
    # BLAS reads its thread count at import: set it first (NumPy's matmul/einsum use it)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    import numpy as np
    import torch
    from training_steps import interleaved_times, report, step_functions

    from gradtool.nn import build, mlp

    torch.set_num_threads(args.threads)
    hidden = tuple(int(h) for h in args.hidden.split(","))
    desc = mlp(args.features, args.classes, hidden=hidden)

    tmodel, tloss = build(desc, "torch", seed=0)
    nmodel, nloss = build(desc, "numpy", seed=0)
    pmodel = plain_model(hidden, args.features, args.classes)
    with torch.no_grad():  # the same initial weights: SpecModule linear holds W[O, I], b[O]
        specs = [m for m in tmodel if hasattr(m, "W")]
        for lin, spec in zip([m for m in pmodel if isinstance(m, torch.nn.Linear)], specs,
                             strict=True):
            lin.weight.copy_(spec.W)
            lin.bias.copy_(spec.b)
    opts = {"plain": torch.optim.Adam(pmodel.parameters(), lr=1e-3),
            "torch": torch.optim.Adam(tmodel.parameters(), lr=1e-3),
            "numpy": torch.optim.Adam(nmodel.parameters(), lr=1e-3)}
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((args.batch, args.features)).astype(np.float32))
    y = torch.from_numpy(rng.integers(0, args.classes, args.batch))
    steps = step_functions(x, y, opts, plain=pmodel, torch_model=(tmodel, tloss),
                           numpy_model=(nmodel, nloss))
    times = interleaved_times(steps, args.warmup, args.iters)
    shape = f"{args.features}-{'-'.join(map(str, hidden))}-{args.classes}, batch {args.batch}"
    report(f"MLP {shape}", times, args.batch, {"torch/plain": 0.9, "numpy/plain": 0.5},
           args.threads, args.json_out)

if __name__ == "__main__":
    main()
