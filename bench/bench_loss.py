"""The label loss layer against ``F.cross_entropy`` (CPU, one thread).

Run it from the repository root::

    PYTHONPATH=. python bench/bench_loss.py     # float32, 32×10 and 128×10

(without ``PYTHONPATH=.`` the script imports whichever gradtool is installed).

One step is forward + backward of softmax cross-entropy over integer labels at N×C:

* ``torch``: ``SoftmaxCrossEntropyLabelsFunction.apply(X, y).backward()`` of the generated
  module (``compile_spec("softmax_cross_entropy_labels", "torch")``), the loss of the CNN
  and MLP models;
* ``numpy``: the generated NumPy ``forward`` then ``backward``;
* ``native`` (the peer): ``F.cross_entropy(X, y).backward()``.

The three run interleaved step by step in one process, each the median of ``--iters`` steps
after ``--warmup`` untimed ones. Ratio = variant / native of the same run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="32x10,128x10", help="N×C cases, comma-separated")
    ap.add_argument("--iters", type=int, default=2000)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = "1"
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gradtool.codegen.cache import compile_spec

    torch.set_num_threads(1)
    tmod = compile_spec("softmax_cross_entropy_labels", "torch")
    nmod = compile_spec("softmax_cross_entropy_labels", "numpy")
    dtype = getattr(torch, args.dtype)
    print(f"softmax cross-entropy over labels, {args.dtype}, forward + backward, "
          f"median of {args.iters} (µs): generated torch, generated numpy, F.cross_entropy")
    for case in args.sizes.split(","):
        n, c = (int(v) for v in case.split("x"))
        rng = np.random.default_rng(0)
        X = torch.from_numpy(rng.standard_normal((n, c))).to(dtype).requires_grad_()
        y = torch.from_numpy(rng.integers(0, c, n))
        Xn, yn = X.detach().numpy(), y.numpy()

        def ours(X=X, y=y):
            tmod.SoftmaxCrossEntropyLabelsFunction.apply(X, y).backward()

        def numpy_(X=Xn, y=yn):
            _, saved = nmod.forward(X, y)
            nmod.backward(1.0, *saved)

        def native(X=X, y=y):
            F.cross_entropy(X, y).backward()

        steps = {"torch": ours, "numpy": numpy_, "native": native}
        times: dict = {k: [] for k in steps}
        for k in range(args.warmup + args.iters):
            for name, step in steps.items():
                t0 = time.perf_counter()
                step()
                if k >= args.warmup:
                    times[name].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e6 for k, v in times.items()}
        print(f"  {n}×{c}: torch {med['torch']:6.1f}  numpy {med['numpy']:6.1f}  "
              f"native {med['native']:6.1f}  torch/native {med['torch'] / med['native']:.2f}×")


if __name__ == "__main__":
    main()
