"""Where a layer is not differentiable, and how far random inputs are from there.

A kink is where the forward switches branch: a ``Piecewise`` condition, the arguments of an
element-wise ``Max``/``Min`` crossing, ``Abs``/``Heaviside``/``sign`` at zero, or a tie in a
``Max`` reduction. Finite differences across a kink are meaningless, so checks sample inputs
whose distance to every kink exceeds a margin far larger than the finite-difference step.
"""

from __future__ import annotations

import numpy as np
import sympy as sp

from gradtool.spec.lang import MaxOver
from gradtool.symbolic.evaluate import Evaluator, ops_for, sizes_for
from gradtool.symbolic.ir import Program


def switches(program: Program) -> list[tuple[str, sp.Expr, tuple, tuple]]:
    """(kind, expression that is zero at the kink, free indices, reduced indices)."""
    out = []
    for a in program.assigns:
        free = tuple(a.lhs) + tuple(a.over)
        for node in sp.preorder_traversal(a.body):
            if isinstance(node, sp.Piecewise):
                for _, cond in node.args:
                    for rel in ([cond] if isinstance(cond, sp.core.relational.Relational)
                                else cond.atoms(sp.core.relational.Relational)):
                        out.append(("piecewise", rel.lhs - rel.rhs, free, ()))
            elif isinstance(node, (sp.Max, sp.Min)) and len(node.args) == 2:
                out.append((type(node).__name__.lower(), node.args[0] - node.args[1], free, ()))
            elif isinstance(node, (sp.Max, sp.Min)):
                # Max(X, 0, d): the winner changes where two arguments cross; two that read
                # no tensor (0 and the index d, equal at d = 0) switch no gradient
                kind, args = type(node).__name__.lower(), node.args
                out += [(kind, a - b, free, ()) for k, a in enumerate(args) for b in args[k + 1:]
                        if _reads_tensor(a, program) or _reads_tensor(b, program)]
            elif isinstance(node, (sp.Abs, sp.Heaviside, sp.sign)):
                out.append((type(node).__name__.lower(), node.args[0], free, ()))
        if a.reduce == "max":
            out.append(("max tie", a.body, tuple(a.lhs), tuple(a.over)))
    return out


def _reads_tensor(expr, program: Program) -> bool:
    """Does ``expr`` read a tensor (not only numbers, sizes, indices and hyper-parameters)?"""
    hypers = set(program.spec.hypers)
    return bool(expr.atoms(sp.Indexed)) or any(
        not s.is_integer and s.name not in hypers for s in expr.free_symbols)


def kink_distance(program: Program, env: dict, dims: dict, hypers=None,
                  which: list | None = None) -> float:
    """The smallest distance of any switch (of ``which``, default all of them) to its kink
    (inf for a smooth layer)."""
    best = np.inf
    values = {**dims, **(hypers if hypers is not None else program.spec.hyper_defaults())}
    for kind, expr, free, over in (switches(program) if which is None else which):
        ev = Evaluator(env, values, sizes_for(program, dims), ops_for("numpy"))
        arr = np.asarray(ev.run(expr, free + over), dtype=np.float64)
        if kind == "max tie":
            flat = arr.reshape(arr.shape[:len(free)] + (-1,))
            if flat.shape[-1] < 2:
                continue
            top = np.sort(flat, axis=-1)
            gap = top[..., -1] - top[..., -2]
            best = min(best, float(gap.min())) if gap.size else best
        elif arr.size:
            best = min(best, float(np.abs(arr).min()))
    return best


def max_tie_gap(program: Program, env: dict, dims: dict, hypers=None) -> float:
    """The smallest gap between the largest and the second largest candidate of any ``Max``
    reduction (0 where a window has tied maxima; inf where the spec has no such reduction)."""
    ties = [s for s in switches(program) if s[0] == "max tie"]
    return kink_distance(program, env, dims, hypers, ties) if ties else np.inf


def has_kinks(program: Program) -> bool:
    return bool(switches(program)) or any(isinstance(n, MaxOver) for a in program.assigns
                                           for n in sp.preorder_traversal(a.body))
