"""Derived gradients evaluated numerically, and torch.autograd through the same forward."""

from __future__ import annotations

import numpy as np
import sympy as sp

from gradtool.symbolic.evaluate import evaluate, run_forward
from gradtool.symbolic.reverse import Derivation


def autograd_or_none(loss, tensors) -> list:
    """``torch.autograd.grad`` that also answers when ``loss`` does not depend on any of
    ``tensors`` (an output that is constant in its inputs): no gradient, ``None`` each."""
    import torch

    if not getattr(loss, "requires_grad", False):
        return [None] * len(tensors)
    return list(torch.autograd.grad(loss, tensors, allow_unused=True))


def random_upstream(d: Derivation, dims: dict, rng: np.random.Generator) -> dict[str, object]:
    """A random upstream gradient for each output that has a seed symbol."""
    out = {}
    for name, seed in d.seeds.items():
        t = d.spec.tensors[name]
        shape = tuple(int(sp.sympify(x).subs(dims)) for x in t.dims)
        if isinstance(seed, sp.Indexed):
            out[seed.base.label.name] = rng.standard_normal(shape)
        elif isinstance(seed, sp.Symbol):
            out[seed.name] = float(rng.standard_normal())
    return out


def derived_gradients(d: Derivation, inputs: dict, dims: dict,
                      upstream: dict) -> dict[str, np.ndarray]:
    """Each closed-form gradient evaluated on ``inputs`` with the given upstream gradients."""
    with np.errstate(divide="ignore", invalid="ignore"):
        env = run_forward(d.program, inputs, dims)
    env.update(upstream)
    grads = {}
    for t in d.spec.grad_inputs:
        grads[t.name] = np.asarray(evaluate(d.program, d.closed[t.name], d.canon[t.name], env,
                                            dims), dtype=np.float64)
    return grads


def autograd_gradients(d: Derivation, inputs: dict, dims: dict,
                       upstream: dict) -> dict[str, np.ndarray]:
    """torch.autograd through the spec's forward (evaluated in float64 torch)."""
    import torch

    leaves = {k: torch.tensor(v, dtype=torch.float64,
                              requires_grad=k in {t.name for t in d.spec.grad_inputs})
              for k, v in inputs.items()}
    env = run_forward(d.program, leaves, dims, backend="torch")
    loss = torch.zeros((), dtype=torch.float64)
    for name, seed in d.seeds.items():
        y = env[name]
        if isinstance(seed, sp.Indexed):
            loss = loss + (y * torch.as_tensor(upstream[seed.base.label.name])).sum()
        elif isinstance(seed, sp.Symbol):
            loss = loss + y * upstream[seed.name]
        else:
            loss = loss + y
    wrt = [t.name for t in d.spec.grad_inputs]
    grads = autograd_or_none(loss, [leaves[k] for k in wrt])
    return {k: (np.zeros(inputs[k].shape) if g is None else g.detach().numpy())
            for k, g in zip(wrt, grads)}
