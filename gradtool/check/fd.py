"""Finite differences that use the dependency structure the engine already knows.

If an input axis is *diagonal* (output slice s depends only on input slice s, as the batch axis
of layer norm is), one forward call can perturb one element in every slice at once and read each
slice's effect from its own outputs. Layer norm's ∂L/∂X then costs 2·D forward calls instead of
2·N·D, and an element-wise layer costs two. Every estimate is made at two step sizes; their
difference measures the finite-difference noise, which sets the tolerance.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import sympy as sp

from gradtool.symbolic.ir import access_name, accesses
from gradtool.symbolic.jacobian import jacobian
from gradtool.symbolic.reverse import Derivation
from gradtool.symbolic.simplify import expand


def diagonal_axes(d: Derivation, wrt: str) -> dict[int, dict[str, int]]:
    """Input axis k → {output: axis m} where ∂output/∂wrt carries δ(i_k, o_m) in every term.

    Only outputs that read ``wrt`` (through the forward statements) are mapped: the others do
    not move when it is perturbed. If the derivation claims a zero Jacobian for an output that
    does read ``wrt``, no axis is taken as diagonal, so that finite differences do not inherit
    the claim and an effect through that output is measured.
    """
    result: dict[int, dict[str, int]] = {}
    outputs = [o for o in d.seeds if d.spec.tensors[o].dims]
    if len(outputs) != len(d.seeds):
        return {}  # a scalar output couples everything
    readers = _readers(d, wrt)
    per_output = {}
    for out in outputs:
        if out not in readers:
            continue
        jac = jacobian(d, out, wrt)
        if jac.expr == 0:
            return {}
        # within the expansion budget; past it a delta that is a factor of the whole product
        # is still found, and an axis that is not found is only checked the slower way
        terms = sp.Add.make_args(expand(jac.expr))
        axes = {}
        for k, i in enumerate(jac.in_idx):
            for m, o in enumerate(jac.out_idx):
                delta = sp.KroneckerDelta(i, o)
                if all(delta in sp.Mul.make_args(t) for t in terms):
                    axes[k] = m
                    break
        per_output[out] = axes
    if not per_output:
        return {}
    common = set.intersection(*(set(a) for a in per_output.values()))
    for k in common:
        result[k] = {out: axes[k] for out, axes in per_output.items()}
    return result


def _readers(d: Derivation, wrt: str) -> set[str]:
    """Tensors whose forward value depends on ``wrt``, from the statements alone."""
    found = {wrt}
    for a in d.program.assigns:
        if a.kind != "update" and any(access_name(x) in found
                                      for x in accesses(a.body, d.spec)):
            found.add(a.target)
    return found


def _slice_effect(delta_out: dict, upstream: dict, diag: dict, shape: tuple) -> np.ndarray:
    """Σ over each output of G·ΔY, kept per diagonal slice (in the input's diagonal axes).
    An output that ``diag`` does not map does not read the input and contributes nothing."""
    keys = sorted(diag)
    total = np.zeros(tuple(shape[k] for k in keys))
    for out, dy in delta_out.items():
        prod = np.asarray(upstream[out]) * dy
        if not keys:
            total = total + prod.sum()
            continue
        if out not in diag[keys[0]]:
            continue
        out_axes = [diag[k][out] for k in keys]
        others = tuple(a for a in range(prod.ndim) if a not in out_axes)
        reduced = prod.sum(axis=others) if others else prod
        remaining = [a for a in range(prod.ndim) if a not in others]
        total = total + np.transpose(reduced, [remaining.index(a) for a in out_axes])
    return total


def colored_fd(loss_parts: Callable[[np.ndarray], dict], x: np.ndarray, upstream: dict,
               diag: dict, h: float) -> tuple[np.ndarray, int]:
    """Central differences of Σ G·Y with respect to every element of ``x``.

    ``loss_parts(x')`` returns the outputs for input value ``x'``. Returns the estimate and
    the number of forward calls made.
    """
    shape = x.shape
    step = h * np.maximum(1.0, np.abs(x))
    grad = np.zeros(shape)
    coupled = [k for k in range(len(shape)) if k not in diag]
    calls = 0
    for coords in itertools.product(*[range(shape[k]) for k in coupled]):
        index = [slice(None)] * len(shape)
        for k, c in zip(coupled, coords, strict=True):
            index[k] = c
        index = tuple(index)
        pert = np.zeros(shape)
        pert[index] = step[index]
        plus, minus = loss_parts(x + pert), loss_parts(x - pert)
        calls += 2
        delta = {o: np.asarray(plus[o]) - np.asarray(minus[o]) for o in plus}
        effect = _slice_effect(delta, upstream, diag, shape)
        grad[index] = effect / (2 * step[index])
    return grad, calls


def fd_with_noise(loss_parts, x, upstream, diag, h: float):
    """(estimate, noise) from steps h and 2h: Richardson-extrapolated value, and its
    uncertainty: the difference between the two steps, but never less than the round-off of
    the outputs the perturbation moves (two close differences can agree by chance)."""
    g1, c1 = colored_fd(loss_parts, x, upstream, diag, h)
    g2, c2 = colored_fd(loss_parts, x, upstream, diag, 2 * h)
    estimate = (4 * g1 - g2) / 3
    floor = roundoff(loss_parts(x), upstream, diag, x, h)
    return estimate, np.maximum(np.abs(g1 - g2), floor), c1 + c2 + 1


def roundoff(outputs: dict, upstream: dict, diag: dict, x: np.ndarray, h: float) -> np.ndarray:
    """A bound on the round-off in each element's estimate: every output the element moves
    carries a relative error of about eps, which the difference divides by the step
    (eps·Σ|G·Y|/step, times 1.5 for the extrapolation)."""
    shape = x.shape
    eps = np.finfo(np.float64).eps
    step = h * np.maximum(1.0, np.abs(x))
    mags = {o: np.abs(np.asarray(v)) for o, v in outputs.items()}
    size = _slice_effect(mags, {o: np.abs(np.asarray(g)) for o, g in upstream.items()},
                         diag, shape)
    out = np.zeros(shape)
    coupled = [k for k in range(len(shape)) if k not in diag]
    for coords in itertools.product(*[range(shape[k]) for k in coupled]):
        index = [slice(None)] * len(shape)
        for k, c in zip(coupled, coords, strict=True):
            index[k] = c
        index = tuple(index)
        out[index] = 1.5 * eps * size / step[index]
    return out


def probe_fd(loss: Callable[[np.ndarray], float], x: np.ndarray, grad: np.ndarray,
             probes: int, h: float, rng: np.random.Generator,
             directions: list | None = None):
    """Random signed probes v: finite difference of L along v vs ⟨grad, v⟩.

    Returns per-probe (analytic, numeric, noise) arrays. No tolerance grows with the size of
    the tensor: each probe is judged against its own measured noise. ``directions``, if
    given, receives each v (to project another gradient on the same probes).
    """
    analytic, numeric, noise = [], [], []
    scale = h * max(1.0, float(np.abs(x).max()))
    for _ in range(probes):
        v = rng.choice([-1.0, 1.0], size=x.shape)
        if directions is not None:
            directions.append(v)
        f1 = (loss(x + scale * v) - loss(x - scale * v)) / (2 * scale)
        f2 = (loss(x + 2 * scale * v) - loss(x - 2 * scale * v)) / (4 * scale)
        analytic.append(float(np.sum(grad * v)))
        numeric.append((4 * f1 - f2) / 3)
        noise.append(abs(f1 - f2))
    return np.array(analytic), np.array(numeric), np.array(noise)
