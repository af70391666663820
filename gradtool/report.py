"""``derive_report``: everything ``gradtool derive`` shows, as plain data (the library API).

>>> report = derive_report("linear")
>>> [g["matrix"] for g in report["gradients"]]
['G W', 'Gᵀ X', 'Σ_n G']
"""

from __future__ import annotations

from collections.abc import Callable

import sympy as sp

from gradtool.errors import GradtoolError
from gradtool.spec.lang import Spec
from gradtool.spec.loader import load_spec
from gradtool.symbolic.jacobian import explicit_matrix, jacobian
from gradtool.symbolic.printing import display_name, latex, matrix, present, text
from gradtool.symbolic.reverse import Derivation, derive


def parse_shape(shape: str | None) -> dict[str, int] | None:
    """``"N=2,D=3"`` → ``{"N": 2, "D": 3}``."""
    if shape is None:
        return None
    sizes = {}
    for part in shape.replace(" ", "").split(","):
        name, sep, value = part.partition("=")
        # isdigit alone accepts '²'; sizes are plain ASCII decimals
        if not sep or not name or not (value.isascii() and value.isdigit()) or int(value) < 1:
            raise GradtoolError(f"cannot read --shape part {part!r}",
                                hint="write sizes as NAME=INT pairs, e.g. --shape N=2,D=3")
        if name in sizes:
            raise GradtoolError(f"--shape gives {name} twice", hint="give each size once")
        if len(value) > 6:
            raise GradtoolError(f"--shape {name}={value} is too large for an explicit matrix",
                                hint="choose small sizes, e.g. --shape N=2,D=3")
        sizes[name] = int(value)
    return sizes


def _access_text(name: str, idx) -> str:
    idx = ",".join(str(i) for i in idx)
    return f"{display_name(name)}[{idx}]" if idx else display_name(name)


def _access_latex(name: str, idx) -> str:
    sym = latex(sp.Symbol(name))
    return f"{{{sym}}}_{{{','.join(map(str, idx))}}}" if idx else sym


def _forward(d: Derivation) -> list[dict]:
    """The statements in SSA form: a reduction nested inside a larger expression shows up as
    its own line (``s_Y``), because the backward refers to it by that name."""
    rows = []
    for name, formula in d.spec.derived.items():  # sizes that follow from the input's
        rows.append({"target": name, "indices": [], "kind": "size", "line": None,
                     "text": f"{name} = {text(formula)}",
                     "latex": f"{latex(sp.Symbol(name))} = {latex(formula)}"})
    for a in d.program.assigns:
        rhs = present(a.rhs(d.program))
        rows.append({
            "target": a.target, "indices": [str(i) for i in a.lhs], "kind": a.kind,
            "line": a.line, "text": f"{_access_text(a.target, a.lhs)} = {text(rhs)}"
            + (f"   (lifted from line {a.line})" if a.kind == "lifted" else ""),
            "latex": f"{_access_latex(a.target, a.lhs)} = {latex(rhs)}",
        })
    return rows


def _gradients(d: Derivation, names=None) -> list[dict]:
    """A row per differentiable input (or, with ``names``, per named intermediate adjoint);
    a gradient written through a named adjoint (dQ = dS·K/√d) is shown in that form."""
    rows = []
    tensors = [d.spec.tensors[n] for n in names] if names is not None else d.spec.grad_inputs
    for t in tensors:
        closed = d.via.get(t.name, d.closed[t.name])
        expr = present(closed)
        idx = d.canon[t.name]
        lhs = "d" + _access_text(t.name, idx)
        rows.append({
            "wrt": t.name, "kind": t.kind, "indices": [str(i) for i in idx],
            "text": f"{lhs} = {text(expr)}", "expression": text(expr),
            "matrix": matrix(closed, idx),
            "latex": rf"\frac{{\partial L}}{{\partial {_access_latex(t.name, idx)}}}"
                     f" = {latex(expr)}",
            "sympy": sp.srepr(closed),
        })
    return rows


def _steps(d: Derivation) -> list[dict]:
    """The chain rule through every intermediate, from the outputs back to the inputs."""
    order = [a.target for a in reversed(d.program.assigns) if a.target in d.active
             and a.kind != "update"]
    order += [t.name for t in d.spec.grad_inputs if t.name in d.active]
    rows = []
    for name in dict.fromkeys(order):
        idx = d.canon[name]
        adj = present(d.steps[name])
        contributions = []
        for c in d.contributions[name]:
            contributions.append({
                "from": c.statement.target, "rule": c.rule,
                "local": f"∂{display_name(c.statement.target)}/∂{display_name(name)} = "
                         f"{text(present(c.local))}",
                "text": text(present(c.expr)),
            })
        seed = name in d.seeds
        rows.append({
            "tensor": name, "indices": [str(i) for i in idx],
            "text": f"{_access_text(d.adjoint_names[name], idx)} = {text(adj)}",
            "latex": f"{_access_latex(d.adjoint_names[name], idx)} = {latex(adj)}",
            "seed": seed, "contributions": contributions,
        })
    return rows


def _jacobians(d: Derivation, shape: dict[str, int] | None) -> list[dict]:
    rows = []
    for out in d.seeds:
        for t in d.spec.grad_inputs:
            if d.closed[t.name] == 0:
                continue
            jac = jacobian(d, out, t.name)
            expr = present(jac.expr)
            lhs = f"∂{_access_text(out, jac.out_idx)}/∂{_access_text(t.name, jac.in_idx)}"
            row = {
                "output": out, "wrt": t.name,
                "output_indices": [str(i) for i in jac.out_idx],
                "input_indices": [str(i) for i in jac.in_idx],
                "text": f"{lhs} = {text(expr)}",
                "latex": rf"\frac{{\partial {_access_latex(out, jac.out_idx)}}}"
                         rf"{{\partial {_access_latex(t.name, jac.in_idx)}}} = {latex(expr)}",
            }
            if shape is not None:
                mat, rws, cols = explicit_matrix(d, jac, shape)
                row["rows"] = [_access_text(out, r) for r in rws]
                row["columns"] = [_access_text(t.name, c) for c in cols]
                row["matrix"] = [[text(mat[i, j]) for j in range(mat.cols)]
                                 for i in range(mat.rows)]
                row["matrix_latex"] = latex(mat)
            rows.append(row)
    return rows


def derive_report(spec_or_path: str | Spec, *, jacobians: bool = False,
                  shape: dict[str, int] | None = None, steps: bool = False,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Derive a spec and return its forward, gradients and, on request, Jacobians and steps.

    ``progress`` is called with the name of each step as it starts (see
    :func:`gradtool.symbolic.reverse.derive`)."""
    say = progress or (lambda step: None)
    say("loading the spec")
    spec = spec_or_path if isinstance(spec_or_path, Spec) else load_spec(spec_or_path)
    d = derive(spec, progress=progress)
    say("printing the closed forms")
    seeds = {name: (str(s.base) if isinstance(s, sp.Indexed) else str(s))
             for name, s in d.seeds.items()}
    report = {
        "spec": spec.name, "description": spec.description, "file": spec.file,
        "reference": spec.reference, "seeds": seeds,
        "forward": _forward(d), "gradients": _gradients(d),
        "intermediates": _gradients(d, list(d.named)),
    }
    if jacobians or shape is not None:
        say("Jacobians")
        report["jacobians"] = _jacobians(d, shape)
    if steps:
        say("chain-rule steps")
        report["steps"] = _steps(d)
    return report
