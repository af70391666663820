"""An MLP built from generated kernels against the same MLP in plain ``torch.nn`` (CPU).

Run it from the repository root::

    python bench/bench_mlp.py                       # 1 and 2 threads, table on stdout
    python bench/bench_mlp.py --threads 1 --repeats 3 --iters 100
    python bench/bench_mlp.py --json out.json

The network is 784-256-256-10 (linear, relu, linear, relu, linear) with softmax cross-entropy,
batch 128, float32 (``--batch``, ``--dtype``). One training step is forward, backward and one
``torch.optim.SGD`` step (lr 0.01, momentum 0.9) of:

* ``nn``: ``torch.nn.Sequential(Linear, ReLU, Linear, ReLU, Linear)`` and
  ``F.cross_entropy`` with class-index targets, i.e. what a plain torch.nn user writes;
* ``torch``: the same architecture from the generated torch modules
  (``compile_spec(name, "torch")``: ``Linear``, ``Relu``, ``SoftmaxCrossEntropy``, each an
  ``nn.Module`` over the generated ``autograd.Function``), one-hot targets;
* ``numpy``: the generated NumPy layer classes chained by hand (each layer's ``backward``
  feeds the one before; the first layer is asked for its parameters' gradients only), with
  the same ``torch.optim.SGD`` over tensors that view the NumPy parameters without copying.

Per layer (forward + backward of one layer alone, no optimiser), generated torch Function
against its ``torch.nn.functional`` counterpart: the three linears (the first with an input
that needs no gradient, as in a network), relu at 128×256, and the loss at 128×10.

Every variant of a table runs in the same process, interleaved step by step, with the same
data; each time is the median of ``--iters`` steps after ``--warmup`` untimed ones, and each
ratio is the median over ``--repeats`` such runs. Ratios are samples/s of the generated
variant over samples/s of torch.nn (higher is better; 1.0 is parity). Goals (issue 8,
item 8): torch / nn ≥ 0.9, numpy / nn ≥ 0.5. A missed goal is printed, not raised.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

# this checkout's gradtool, not one installed elsewhere (``python bench/...`` puts bench/ first)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from gradtool.codegen.cache import compile_spec  # noqa: E402

SIZES = (784, 256, 256, 10)
GOAL_TORCH, GOAL_NUMPY = 0.9, 0.5


def kernels(target: str):
    return (compile_spec("linear", target), compile_spec("relu", target),
            compile_spec("softmax_cross_entropy", target))


class Data:
    def __init__(self, batch: int, dtype: torch.dtype, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.X = torch.randn(batch, SIZES[0], generator=gen, dtype=dtype)
        self.y = torch.randint(0, SIZES[-1], (batch,), generator=gen)
        self.T = F.one_hot(self.y, SIZES[-1]).to(dtype)
        self.X_np, self.T_np = self.X.numpy(), self.T.numpy()


def _weights(dtype, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One set of initial weights shared by every variant (so they train the same net)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, o in zip(SIZES[:-1], SIZES[1:], strict=True):
        bound = (6 / i) ** 0.5
        out.append(((torch.rand(o, i, generator=gen, dtype=dtype) * 2 - 1) * bound,
                    torch.zeros(o, dtype=dtype)))
    return out


class NNModel:
    def __init__(self, weights, data: Data):
        layers = []
        for k, (W, b) in enumerate(weights):
            lin = torch.nn.Linear(W.shape[1], W.shape[0], dtype=W.dtype)
            with torch.no_grad():
                lin.weight.copy_(W)
                lin.bias.copy_(b)
            layers += [lin] + ([torch.nn.ReLU()] if k < len(weights) - 1 else [])
        self.net = torch.nn.Sequential(*layers)
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.data = data

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(self.data.X), self.data.y)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class TorchModel:
    def __init__(self, weights, data: Data):
        lin, relu, loss = kernels("torch")
        layers = []
        for k, (W, b) in enumerate(weights):
            layer = lin.Linear(O=W.shape[0], I=W.shape[1], dtype=W.dtype)
            with torch.no_grad():
                layer.W.copy_(W)
                layer.b.copy_(b)
            layers += [layer] + ([relu.Relu()] if k < len(weights) - 1 else [])
        self.net = torch.nn.Sequential(*layers)
        self.loss = loss.SoftmaxCrossEntropy()
        self.opt = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.data = data

    def step(self) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss = self.loss(self.net(self.data.X), self.data.T)
        loss.backward()
        self.opt.step()
        return float(loss.detach())


class NumpyModel:
    """The generated NumPy layers as a chain: forward in order, backward in reverse, and
    torch.optim over tensors that share memory with the NumPy parameters."""

    def __init__(self, weights, data: Data):
        lin, relu, loss = kernels("numpy")
        self.layers, self.tensors = [], []
        for k, (W, b) in enumerate(weights):
            layer = lin.Linear(O=W.shape[0], I=W.shape[1])
            layer.params = {"W": W.numpy().copy(), "b": b.numpy().copy()}
            self.layers.append(layer)
            self.tensors.append({n: torch.from_numpy(a) for n, a in layer.params.items()})
            if k < len(weights) - 1:
                self.layers.append(relu.Relu())
                self.tensors.append({})
        self.loss = loss.SoftmaxCrossEntropy()
        self.opt = torch.optim.SGD([t for ts in self.tensors for t in ts.values()], lr=0.01,
                                   momentum=0.9)
        self.data = data

    def step(self) -> float:
        h = self.data.X_np
        for layer in self.layers:
            h = layer.forward(h)
        value = self.loss.forward(h, self.data.T_np)
        g = self.loss.backward()
        for k in reversed(range(len(self.layers))):
            layer = self.layers[k]
            g = backward_of(layer, g, need_input=k > 0)
            for name, t in self.tensors[k].items():
                t.grad = torch.from_numpy(layer.grads[name])
        self.opt.step()
        return float(value)


def backward_of(layer, g, need_input: bool):
    """``layer.backward(g)``, asking for the input's gradient only if ``need_input``; kernels
    from a checkout without ``need=`` (to measure "before") compute every gradient."""
    if "need" in inspect.signature(layer.backward).parameters:
        keep = set(layer.params) | ({"X"} if need_input else set())
        return layer.backward(g, need=keep)
    return layer.backward(g)


# -- per-layer cases: generated Function.apply against torch.nn.functional ---------------------

def layer_cases(batch: int, dtype) -> dict:
    lin, relu, loss = kernels("torch")
    gen = torch.Generator().manual_seed(2)
    cases = {}
    for k, (i, o) in enumerate(zip(SIZES[:-1], SIZES[1:], strict=True)):
        X = torch.randn(batch, i, generator=gen, dtype=dtype).requires_grad_(k > 0)
        W = torch.randn(o, i, generator=gen, dtype=dtype).requires_grad_()
        b = torch.randn(o, generator=gen, dtype=dtype).requires_grad_()
        G = torch.randn(batch, o, generator=gen, dtype=dtype)
        leaves = [t for t in (X, W, b) if t.requires_grad]
        cases[f"linear {i}->{o}"] = (
            leaves,
            lambda X=X, W=W, b=b, G=G: lin.LinearFunction.apply(X, W, b).backward(G),
            lambda X=X, W=W, b=b, G=G: F.linear(X, W, b).backward(G))
    X = torch.randn(batch, SIZES[1], generator=gen, dtype=dtype).requires_grad_()
    G = torch.randn(batch, SIZES[1], generator=gen, dtype=dtype)
    cases[f"relu {batch}x{SIZES[1]}"] = (
        [X], lambda X=X, G=G: relu.ReLUFunction.apply(X).backward(G),
        lambda X=X, G=G: F.relu(X).backward(G))
    Z = torch.randn(batch, SIZES[-1], generator=gen, dtype=dtype).requires_grad_()
    y = torch.randint(0, SIZES[-1], (batch,), generator=gen)
    T = F.one_hot(y, SIZES[-1]).to(dtype)
    cases[f"loss {batch}x{SIZES[-1]}"] = (
        [Z], lambda Z=Z, T=T: loss.SoftmaxCrossEntropyFunction.apply(Z, T).backward(),
        lambda Z=Z, y=y: F.cross_entropy(Z, y).backward())
    return cases


# -- timing --------------------------------------------------------------------------------------

def interleaved(fns: dict, iters: int, warmup: int, before=None) -> dict:
    """Median seconds of each function, the functions run in turn step by step."""
    for _ in range(warmup):
        for fn in fns.values():
            if before:
                before()
            fn()
    times = {k: [] for k in fns}
    for _ in range(iters):
        for label, fn in fns.items():
            if before:
                before()
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def run(threads: int, batch: int, dtype, iters: int, warmup: int, repeats: int) -> dict:
    torch.set_num_threads(threads)
    with threadpool_limits(limits=threads):
        data = Data(batch, dtype)
        weights = _weights(dtype)
        models = {"nn": NNModel(weights, data), "torch": TorchModel(weights, data),
                  "numpy": NumpyModel(weights, data)}
        first = {k: m.step() for k, m in models.items()}  # same weights: same first loss
        steps = {"torch": [], "numpy": [], "nn_ms": [], "torch_ms": [], "numpy_ms": []}
        for _ in range(repeats):
            t = interleaved({k: m.step for k, m in models.items()}, iters, warmup)
            steps["torch"].append(t["nn"] / t["torch"])
            steps["numpy"].append(t["nn"] / t["numpy"])
            for k in models:
                steps[f"{k}_ms"].append(1e3 * t[k])
        layers = {}
        cases = layer_cases(batch, dtype)
        for name, (leaves, gen_fn, nn_fn) in cases.items():
            ratios, gen_ms, nn_ms = [], [], []

            def reset(leaves=leaves):
                for x in leaves:
                    x.grad = None

            for _ in range(repeats):
                t = interleaved({"gen": gen_fn, "nn": nn_fn}, iters, warmup, reset)
                ratios.append(t["nn"] / t["gen"])
                gen_ms.append(1e3 * t["gen"])
                nn_ms.append(1e3 * t["nn"])
            layers[name] = {"ratio": statistics.median(ratios),
                            "generated_ms": statistics.median(gen_ms),
                            "nn_ms": statistics.median(nn_ms), "ratios": ratios}
    med = statistics.median
    return {"threads": threads, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
            "iters": iters, "repeats": repeats, "first_loss": first,
            "torch_over_nn": med(steps["torch"]), "numpy_over_nn": med(steps["numpy"]),
            "torch_over_nn_runs": steps["torch"], "numpy_over_nn_runs": steps["numpy"],
            "step_ms": {k: med(steps[f"{k}_ms"]) for k in models},
            "samples_per_s": {k: batch / (med(steps[f"{k}_ms"]) / 1e3) for k in models},
            "layers": layers}


def report(row: dict) -> None:
    sps = row["samples_per_s"]
    print(f"\n== {row['threads']} thread(s), batch {row['batch']}, {row['dtype']}, "
          f"median of {row['iters']} steps, {row['repeats']} repeats ==")
    print(f"{'variant':<10}{'step':>10}{'samples/s':>12}{'/ nn':>8}")
    for k in ("nn", "torch", "numpy"):
        ratio = 1.0 if k == "nn" else row[f"{k}_over_nn"]
        print(f"{k:<10}{row['step_ms'][k]:>8.3f}ms{sps[k]:>12.0f}{ratio:>8.2f}")
    print(f"\n{'layer (fwd+bwd)':<22}{'generated':>11}{'nn':>10}{'nn/gen':>8}")
    for name, r in row["layers"].items():
        print(f"{name:<22}{r['generated_ms']:>9.3f}ms{r['nn_ms']:>8.3f}ms{r['ratio']:>8.2f}")
    for k, goal in (("torch", GOAL_TORCH), ("numpy", GOAL_NUMPY)):
        ratio = row[f"{k}_over_nn"]
        print(f"{k} / nn samples/s {ratio:.2f} (runs: "
              f"{', '.join(f'{r:.2f}' for r in row[f'{k}_over_nn_runs'])}): goal >= {goal} "
              f"{'met' if ratio >= goal else 'NOT met'}")
    losses = ", ".join(f"{k} {v:.6f}" for k, v in row["first_loss"].items())
    print(f"first-step loss (same weights and data): {losses}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated (default 1,2)")
    parser.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    parser.add_argument("--dtype", default="float32", help="float32 (default) or float64")
    parser.add_argument("--iters", type=int, default=50, help="timed steps per run (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per ratio (default 5)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the rows as JSON")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    import gradtool

    print(f"python {platform.python_version()}, torch {torch.__version__}, numpy "
          f"{np.__version__}, {os.cpu_count()} CPUs; gradtool from "
          f"{Path(gradtool.__file__).parent.parent}")
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        rows.append(run(threads, args.batch, dtype, args.iters, args.warmup, args.repeats))
        report(rows[-1])
    if args.json:
        meta = {"python": platform.python_version(), "torch": torch.__version__,
                "numpy": np.__version__, "cpus": os.cpu_count(),
                "platform": platform.platform()}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
