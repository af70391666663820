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


def term_magnitude(expr: sp.Expr) -> sp.Expr:
    """``expr`` with every term and factor taken in absolute value: |a| + |b| for a + b, the
    product of the factors' magnitudes, Σ of the body's magnitude. Anything else (a
    quotient's denominator, a function) is its own absolute value; 0/1 switches (arg-max
    masks, steps, Kronecker deltas) stay as they are.

    Evaluating a formula in floating point with unit roundoff u leaves an error of at most
    about k·u times this magnitude, k the number of operations a value goes through (the
    running error bound of a sum of products: Higham, *Accuracy and Stability of Numerical
    Algorithms*, 2nd ed., §3.1 and §4.2). Where the terms cancel to a value much smaller than
    themselves, that bound, not the value, is the accuracy an exact computation can have."""
    from gradtool.symbolic.ir import ArgMaxMask

    if isinstance(expr, sp.Add):
        return sp.Add(*[term_magnitude(a) for a in expr.args])
    if isinstance(expr, sp.Mul):
        return sp.Mul(*[term_magnitude(a) for a in expr.args])
    if isinstance(expr, sp.Pow) and expr.exp.is_Integer and expr.exp > 0:
        return term_magnitude(expr.base) ** expr.exp
    if isinstance(expr, sp.Sum):
        return sp.Sum(term_magnitude(expr.function), *expr.limits)
    if isinstance(expr, (ArgMaxMask, sp.Heaviside, sp.KroneckerDelta)):
        return expr
    if expr.is_Number:
        return abs(expr)
    return sp.Abs(expr)


def derived_magnitudes(d: Derivation, inputs: dict, dims: dict,
                       upstream: dict) -> dict[str, np.ndarray]:
    """:func:`term_magnitude` of each closed-form gradient, evaluated as
    :func:`derived_gradients` evaluates the gradient (non-finite values read 0)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        env = run_forward(d.program, inputs, dims)
    env.update(upstream)
    out = {}
    for t in d.spec.grad_inputs:
        with np.errstate(all="ignore"):
            value = np.asarray(evaluate(d.program, term_magnitude(d.closed[t.name]),
                                        d.canon[t.name], env, dims), dtype=np.float64)
        out[t.name] = np.where(np.isfinite(value), np.abs(value), 0.0)
    return out


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
