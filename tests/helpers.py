"""One helper per kind of check, so each test case is one line."""

from __future__ import annotations

import numpy as np
import sympy as sp

from gradtool.check.numeric import autograd_gradients, derived_gradients, random_upstream
from gradtool.check.sampling import sample_dims, sample_inputs
from gradtool.symbolic.evaluate import evaluate, run_forward
from gradtool.symbolic.printing import present

# (name, fixed sizes): batch of one, then random non-square shapes
SHAPES = [("batch1", {"N": 1}), ("random-a", None), ("random-b", None)]


def max_rel_err(a: np.ndarray, b: np.ndarray, atol: float = 1e-13) -> float:
    """Largest error relative to the oracle's scale; errors below ``atol`` count as zero
    (a gradient that is exactly zero in theory comes out as round-off)."""
    assert a.shape == b.shape, f"shape {a.shape} != {b.shape}"
    if a.size == 0:
        return 0.0
    err = float(np.max(np.abs(a - b)))
    return 0.0 if err <= atol else err / max(float(np.max(np.abs(b))), atol)


def assert_matches_autograd(derivation, seed: int, fixed=None, tol: float = 1e-8) -> None:
    """Derived closed forms (and their printed form) vs torch.autograd, float64."""
    spec = derivation.spec
    rng = np.random.default_rng(seed)
    dims = sample_dims(spec, rng, low=1, high=5, fixed=fixed)
    inputs = sample_inputs(spec, dims, rng)
    upstream = random_upstream(derivation, dims, rng)
    ours = derived_gradients(derivation, inputs, dims, upstream)
    oracle = autograd_gradients(derivation, inputs, dims, upstream)
    with np.errstate(divide="ignore", invalid="ignore"):  # running var at N = 1
        env = run_forward(derivation.program, inputs, dims)
    env.update(upstream)
    for name, grad in oracle.items():
        err = max_rel_err(ours[name], grad)
        assert err < tol, f"{spec.name}: d{name} differs from autograd by {err:.2e} at {dims}"
        shown = present(derivation.closed[name])
        printed = np.asarray(evaluate(derivation.program, shown, derivation.canon[name], env,
                                      dims))
        err = max_rel_err(printed, grad)
        assert err < tol, f"{spec.name}: printed d{name} differs by {err:.2e}"


def evaluate_closed(derivation, name: str, seed: int = 0, fixed=None):
    """(closed-form gradient, every forward tensor, upstream, sizes) on random data."""
    spec = derivation.spec
    rng = np.random.default_rng(seed)
    dims = sample_dims(spec, rng, low=2, high=5, fixed=fixed)
    inputs = sample_inputs(spec, dims, rng)
    upstream = random_upstream(derivation, dims, rng)
    env = run_forward(derivation.program, inputs, dims)
    env.update(upstream)
    grad = np.asarray(evaluate(derivation.program, derivation.closed[name],
                               derivation.canon[name], env, dims))
    sizes = {str(k): v for k, v in dims.items()}
    return grad, env, sizes


def unsimplified(expr: sp.Expr) -> list[str]:
    """What a textbook would not print: deltas, guards, sums left half-done."""
    problems = []
    for node in sp.preorder_traversal(expr):
        if isinstance(node, sp.KroneckerDelta) and all(a.is_Symbol for a in node.args):
            # δ(h, S·t + k) is the scatter-add of an affine read (convolution, pooling) and
            # stays; a delta between two plain indices should have been eliminated
            problems.append(f"leftover Kronecker delta {node}")
        if isinstance(node, sp.Piecewise) and any(
                isinstance(c, sp.core.relational.Relational) and c.has(sp.Symbol)
                and all(s.is_integer for s in c.free_symbols) for _, c in node.args):
            problems.append(f"leftover index guard {node}")
        if isinstance(node, sp.Sum):
            body, var = node.function, node.limits[0][0]
            if isinstance(body, sp.Add):
                problems.append(f"sum of a sum of terms (not split): {node}")
            for f in sp.Mul.make_args(body):
                if var not in f.free_symbols:
                    problems.append(f"factor {f} does not depend on {var} but stays inside")
    return problems


# an element-wise spec that reads its own size (Y = X / D): layers run it on a merged view
PER_SIZE_SPEC = (
    "from gradtool.lang import Spec\n\n"
    "spec = Spec('per_size', 'X divided by its row length')\n"
    "N, D = spec.dims('N D')\n"
    "n, d = spec.indices(n=N, d=D)\n"
    "X = spec.input('X', N, D)\n"
    "spec.output('Y', [n, d], X[n, d] / D)\n")


def spec_layer_case(name: str, seed: int = 0):
    """(a float64 ``SpecModule`` of the built-in spec ``name`` with sizes from the checker's
    sampler, its data inputs in order from the same sampler: the real ones requiring grad
    where the spec differentiates them, integer labels as int64). The layer's sizes are its
    parameters' and those no data input carries (a kernel's K, stride S, padding P); the
    others are read from the inputs at the call."""
    import torch

    from gradtool.nn import SpecModule
    from gradtool.spec.loader import load_spec

    spec = load_spec(name)
    rng = np.random.default_rng(seed)
    dims = sample_dims(spec, rng, low=2, high=4)
    values = sample_inputs(spec, dims, rng)
    data = [t for t in spec.tensors.values() if t.kind == "input" and t.keep is None]
    carried = {s for t in data for d in t.dims for s in d.free_symbols}
    owned = {s for t in spec.tensors.values() if t.kind in ("param", "state")
             for d in t.dims for s in d.free_symbols}
    sizes = {n: int(dims[spec.dim_symbols[n]]) for n in spec.base_dims
             if spec.dim_symbols[n] not in carried or spec.dim_symbols[n] in owned}
    torch.manual_seed(seed)
    layer = SpecModule(spec, dtype=torch.float64, **sizes)
    inputs = []
    for t in data:
        v = torch.tensor(values[t.name])
        inputs.append(v.requires_grad_(t.grad) if torch.is_floating_point(v) else v)
    return layer, inputs
