"""Jacobians ∂out/∂in: index form with Kronecker deltas, and explicit matrices for small shapes.

The index form comes from the closed-form gradient by seeding the upstream gradient with
deltas, ``G[a, b] → δ(a, n)·δ(b, c)``: the vector-Jacobian product against a unit vector is a
row of the Jacobian. Delta elimination then leaves softmax's ``S[n,j](δ(j,c) − S[n,c])·δ(i,n)``.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass

import sympy as sp

from gradtool.errors import GradtoolError
from gradtool.symbolic.ir import rename
from gradtool.symbolic.reverse import Derivation

LETTERS = "ijklpqrsuvwabe"


@dataclass
class Jacobian:
    output: str
    wrt: str
    out_idx: tuple
    in_idx: tuple
    expr: sp.Expr  # ∂output[out_idx] / ∂wrt[in_idx]


def _input_indices(d: Derivation, wrt: str, out_idx: tuple) -> tuple:
    taken = {s.name for s in d.program.ranges} | {str(x) for x in out_idx} \
        | set(d.spec.dim_symbols) | set(d.spec.tensors)
    made = []
    pool = iter(list(LETTERS) + [f"{c}{k}" for k in range(1, 100) for c in LETTERS])
    for dim in d.spec.tensors[wrt].dims:
        name = next(c for c in pool if c not in taken)
        sym = sp.Symbol(name, integer=True)
        d.program.ranges[sym] = dim
        made.append(sym)
    return tuple(made)


def jacobian(d: Derivation, output: str, wrt: str) -> Jacobian:
    """∂output/∂wrt in index notation (computed once per derivation)."""
    cache = d.__dict__.setdefault("_jacobians", {})
    if (output, wrt) not in cache:
        cache[(output, wrt)] = _jacobian(d, output, wrt)
    return cache[(output, wrt)]


def _jacobian(d: Derivation, output: str, wrt: str) -> Jacobian:
    if output not in d.seeds:
        raise GradtoolError(f"`{output}` is not a differentiable output of {d.spec.name}",
                            hint="outputs: " + ", ".join(d.seeds))
    if wrt not in d.closed:
        raise GradtoolError(f"`{wrt}` is not a differentiable input of {d.spec.name}",
                            hint="inputs: " + ", ".join(t.name for t in d.spec.grad_inputs))
    out_idx = tuple(d.canon[output])
    in_idx = _input_indices(d, wrt, out_idx)
    expr = rename(d.closed[wrt], dict(zip(d.canon[wrt], in_idx, strict=True)))
    seed = d.seeds[output]
    if isinstance(seed, sp.Indexed):
        subs = {}
        for node in sp.preorder_traversal(expr):
            if isinstance(node, sp.Indexed) and node.base == seed.base:
                subs[node] = sp.Mul(*[sp.KroneckerDelta(a, b)
                                      for a, b in zip(node.indices, out_idx, strict=True)])
        expr = expr.xreplace(subs)
    elif isinstance(seed, sp.Symbol):
        expr = expr.xreplace({seed: sp.Integer(1)})
    for other, s in d.seeds.items():  # other outputs contribute nothing to ∂output
        if other != output and isinstance(s, sp.Indexed):
            expr = expr.replace(lambda e, b=s.base: isinstance(e, sp.Indexed) and e.base == b,
                                lambda e: sp.Integer(0))
        elif other != output and isinstance(s, sp.Symbol):
            expr = expr.xreplace({s: sp.Integer(0)})
    expr = d.simplifier(expr)
    expr = _prefer_output_indices(expr, in_idx, out_idx)
    return Jacobian(output, wrt, out_idx, in_idx, expr)


def _prefer_output_indices(expr, in_idx, out_idx):
    """In a term with δ(i, n), write the other factors with n: f(i)·δ(i,n) = f(n)·δ(i,n)."""
    terms = []
    for term in sp.Add.make_args(expr):
        factors = sp.Mul.make_args(term)
        deltas = [f for f in factors if isinstance(f, sp.KroneckerDelta)]
        mapping = {}
        for f in deltas:
            a, b = f.args
            if a in out_idx and b in in_idx:
                a, b = b, a
            if a in in_idx and b in out_idx:
                mapping.setdefault(a, b)
        rest = sp.Mul(*[f for f in factors if f not in deltas])
        terms.append(rename(rest, mapping) * sp.Mul(*deltas))
    return sp.Add(*terms)


def explicit_matrix(d: Derivation, jac: Jacobian, sizes: dict[str, int],
                    limit: int = 4096, progress=None,
                    seconds: float = 60.0) -> tuple[sp.Matrix, list, list]:
    """The Jacobian for concrete sizes: rows are output elements, columns input elements.

    ``progress(done, total)`` is called before each row (a convolution's matrix takes
    seconds). Raises :class:`GradtoolError` when it would have more than ``limit`` entries,
    or when expanding its entries takes longer than ``seconds`` (each entry is the index
    expression with every sum written out at these sizes: for attention followed by layer
    norm, thousands of terms per entry), with the time it would take in all."""
    spec = d.spec
    unknown = set(sizes) - set(spec.dim_symbols)
    if unknown:
        raise GradtoolError(f"--shape names unknown dimensions {', '.join(sorted(unknown))}",
                            hint="dimensions of this spec: " + ", ".join(spec.base_dims))
    spec.check_given_sizes(sizes)
    sizes = spec.sizes_from(sizes) if spec.derived else sizes  # OH from H, K, S, P
    wanted = {sym for t in (jac.output, jac.wrt) for dim in spec.tensors[t].dims
              for sym in dim.free_symbols}
    for name, formula in spec.derived.items():  # a derived size needs the sizes it is from
        if spec.dim_symbols[name] in wanted:
            wanted |= formula.free_symbols
    missing = [str(sym) for sym in wanted
               if str(sym) not in sizes and str(sym) not in spec.derived]
    if missing:
        raise GradtoolError(f"--shape gives no size for {', '.join(sorted(set(missing)))}",
                            hint="give every dimension, e.g. --shape "
                                 + ",".join(f"{k}=2" for k in spec.base_dims))
    values = {spec.dim_symbols[k]: v for k, v in sizes.items() if k in spec.dim_symbols}
    out_dims = [int(d.program.ranges[i].subs(values)) for i in jac.out_idx]
    in_dims = [int(d.program.ranges[i].subs(values)) for i in jac.in_idx]
    # count before listing: --shape N=100000 must fail at once, not after building the lists
    n_rows, n_cols = math.prod(out_dims), math.prod(in_dims)
    if n_rows * n_cols > limit:
        raise GradtoolError(f"the explicit Jacobian would have {n_rows}×{n_cols} entries "
                            f"(at most {limit} are shown)",
                            hint="choose smaller sizes with --shape")
    rows = list(itertools.product(*[range(n) for n in out_dims]))
    cols = list(itertools.product(*[range(n) for n in in_dims]))
    base = jac.expr.xreplace(values)
    matrix = sp.zeros(len(rows), len(cols))
    start, total = time.monotonic(), len(rows) * len(cols)
    for r, row in enumerate(rows):
        if progress is not None:
            progress(r, len(rows))
        at_row = base.xreplace(dict(zip(jac.out_idx, map(sp.Integer, row), strict=True)))
        for c, col in enumerate(cols):
            entry = at_row.xreplace(dict(zip(jac.in_idx, map(sp.Integer, col), strict=True)))
            matrix[r, c] = sp.factor_terms(_restore_bases(entry.doit(), spec))
            spent = time.monotonic() - start
            done = r * len(cols) + c + 1
            if spent > seconds and done < total:
                raise GradtoolError(
                    f"the explicit Jacobian ∂{jac.output}/∂{jac.wrt} at these sizes is slow to "
                    f"expand: {done} of {total} entries in {spent:.0f} s (about "
                    f"{spent * total / done:.0f} s in all); each entry writes out every sum "
                    f"at these sizes", hint="choose smaller sizes with --shape, or read the "
                    "Jacobian in index notation (derive without --shape)")
    return matrix, rows, cols


def _restore_bases(expr, spec):
    """Substituting sizes also rewrote the shapes inside each IndexedBase; put back the spec's
    own bases so that entries can be evaluated with the spec's symbols."""
    subs = {}
    for node in expr.atoms(sp.Indexed):
        t = spec.tensors.get(node.base.label.name)
        if t is not None:
            subs[node] = t.base[node.indices]
    return expr.xreplace(subs)
