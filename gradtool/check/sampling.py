"""Random shapes and inputs for checks: each input's declared domain and the spec's facts."""

from __future__ import annotations

import numpy as np
import sympy as sp

from gradtool.spec.lang import Spec, SumOver


def sample_dims(spec: Spec, rng: np.random.Generator, low: int = 1, high: int = 5,
                fixed: dict[str, int] | None = None) -> dict[sp.Symbol, int]:
    """A random size for every dimension; ``fixed`` pins some by name (``{"N": 1}``)."""
    fixed = fixed or {}
    out = {}
    for name, sym in spec.dim_symbols.items():
        least = spec.min_sizes.get(name, 1)
        value = fixed.get(name, rng.integers(max(low, least), max(high, least) + 1))
        out[sym] = max(int(value), least)
    return out


def _draw(domain: str, shape, rng: np.random.Generator) -> np.ndarray:
    if domain == "positive":
        return rng.uniform(0.5, 2.0, shape)
    if domain == "nonzero":
        return rng.choice([-1.0, 1.0], shape) * rng.uniform(0.5, 2.0, shape)
    if domain == "unit":
        return rng.uniform(0.05, 0.95, shape)
    if domain == "binary":
        return rng.integers(0, 2, shape).astype(np.float64)
    return rng.standard_normal(shape)


def sample_inputs(spec: Spec, dims: dict[sp.Symbol, int],
                  rng: np.random.Generator) -> dict[str, np.ndarray]:
    """float64 values for every input, parameter and state tensor of ``spec``."""
    values = {}
    for t in spec.of_kind("input", "param", "state"):
        shape = tuple(int(sp.sympify(d).subs(dims)) for d in t.dims)
        domain = "positive" if t.kind == "state" else t.domain
        values[t.name] = _draw(domain, shape, rng)
    _apply_facts(spec, values)
    return values


def _apply_facts(spec: Spec, values: dict[str, np.ndarray]) -> None:
    """Rescale inputs so that stated sums hold, e.g. rows of T summing to one."""
    for fact in spec.facts:
        lhs = fact.lhs
        if not (isinstance(lhs, SumOver) and isinstance(lhs.body, sp.Indexed)
                and len(lhs.over) == 1):
            continue
        name = lhs.body.base.label.name
        if name not in values:
            continue
        axis = list(lhs.body.indices).index(lhs.over[0])
        total = values[name].sum(axis=axis, keepdims=True)
        values[name] = values[name] / total * float(fact.rhs)
