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
from gradtool.symbolic.ir import access_name
from gradtool.symbolic.jacobian import explicit_matrix, jacobian
from gradtool.symbolic.printing import (
    display_name,
    latex,
    latex_access,
    latex_equation,
    latex_name,
    matrix,
    matrix_latex,
    present,
    text,
)
from gradtool.symbolic.reverse import Derivation, derive


def parse_shape(shape: str | None) -> dict[str, int] | None:
    """``"N=2,D=3"`` → ``{"N": 2, "D": 3}``."""
    if shape is None:
        return None
    sizes = {}
    for part in shape.replace(" ", "").split(","):
        name, sep, value = part.partition("=")
        # isdigit alone accepts '²'; sizes are plain ASCII decimals
        # 0 is read here: a padding may be 0 (spec.min_size(P=0)); each spec's minimum is
        # checked where the sizes are used (Spec.check_given_sizes)
        if not sep or not name or not (value.isascii() and value.isdigit()):
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
    return latex_access(name, [str(i) for i in idx])


def _names(exprs) -> set[str]:
    """The tensors read by ``exprs``."""
    return {access_name(node) for e in exprs for node in e.atoms(sp.Indexed)}


def _forward(d: Derivation, shown: set[str] | None = None) -> list[dict]:
    """The statements in SSA form. A reduction the engine lifted out of a larger expression
    (``s_Y``, linear's Σ_i W·X) is printed inside that expression again, as the spec wrote
    it, unless what is printed of the backward (``shown``: the tensors it reads) refers to
    it by its lifted name; then it keeps its own line. ``shown=None``: every line (the
    generated kernels' docstrings, whose code names the lifted sums)."""
    lifted = {} if shown is None else {a.target: a for a in d.program.assigns
                                       if a.kind == "lifted" and a.target not in shown}

    def inline(expr):
        def body(node):
            a = lifted[access_name(node)]
            return inline(a.rhs(d.program)).xreplace(dict(zip(a.lhs, node.indices,
                                                             strict=True)))
        return expr.replace(lambda e: isinstance(e, sp.Indexed)
                            and access_name(e) in lifted, body)

    rows = []
    for name, formula in d.spec.derived.items():  # sizes that follow from the input's
        rows.append({"target": name, "indices": [], "kind": "size", "line": None,
                     "text": f"{name} = {text(formula)}",
                     "latex": f"{latex(sp.Symbol(name))} = {latex(formula)}"})
    for a in d.program.assigns:
        if a.target in lifted:
            continue
        rhs = present(inline(a.rhs(d.program)))
        rows.append({
            "target": a.target, "indices": [str(i) for i in a.lhs], "kind": a.kind,
            "line": a.line, "text": f"{_access_text(a.target, a.lhs)} = {text(rhs)}"
            + (f"   (lifted from line {a.line})" if a.kind == "lifted" else ""),
            "latex": latex_equation(_access_latex(a.target, a.lhs), latex(rhs)),
        })
    return rows


def _as_written(d: Derivation, expr: sp.Expr) -> sp.Expr:
    """``expr`` with each centred difference the engine named (``xc = X − μ``, lifted from a
    spec that wrote X − μ inline) written out again as one factor, as the spec wrote it."""
    lifted = {a.target: a for a in d.program.assigns
              if a.kind == "lifted" and a.reduce is None}
    subs = {node: a.body.xreplace(dict(zip(a.lhs, node.indices, strict=True)))
            for node in expr.atoms(sp.Indexed)
            if (a := lifted.get(access_name(node))) is not None}
    return expr.xreplace(subs) if subs else expr


def _gradients(d: Derivation, names=None) -> list[dict]:
    """A row per differentiable input (or, with ``names``, per named intermediate adjoint);
    a gradient written through a named adjoint (dQ = dS·K/√d) is shown in that form."""
    rows = []
    tensors = [d.spec.tensors[n] for n in names] if names is not None else d.spec.grad_inputs
    for t in tensors:
        closed = _as_written(d, d.via.get(t.name, d.closed[t.name]))
        expr = present(closed)
        idx = d.canon[t.name]
        lhs = "d" + _access_text(t.name, idx)
        mat = matrix_latex(closed, idx)
        partial = rf"\frac{{\partial L}}{{\partial {_access_latex(t.name, idx)}}}"
        rows.append({
            "wrt": t.name, "kind": t.kind, "indices": [str(i) for i in idx],
            "text": f"{lhs} = {text(expr)}", "expression": text(expr),
            "matrix": matrix(closed, idx),
            "latex": latex_equation(partial, latex(expr)),
            "matrix_latex": None if mat is None else
            rf"\frac{{\partial L}}{{\partial {latex_name(t.name)}}} = {mat}",
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
            local = present(c.local)
            partial = rf"\frac{{\partial {latex_name(c.statement.target)}}}" \
                      rf"{{\partial {latex_name(name)}}}"
            contributions.append({
                "from": c.statement.target, "rule": c.rule,
                "local": f"∂{display_name(c.statement.target)}/∂{display_name(name)} = "
                         f"{text(local)}",
                "local_latex": latex_equation(partial, latex(local)),
                "text": text(present(c.expr)),
            })
        seed = name in d.seeds
        rows.append({
            "tensor": name, "indices": [str(i) for i in idx],
            "text": f"{_access_text(d.adjoint_names[name], idx)} = {text(adj)}",
            "latex": latex_equation(_access_latex(d.adjoint_names[name], idx), latex(adj)),
            "seed": seed, "contributions": contributions,
        })
    return rows


def _jacobians(d: Derivation, shape: dict[str, int] | None, say=lambda step: None,
               reads: set | None = None) -> list[dict]:
    """Each output's Jacobian for each differentiable input; the tensors they read are
    added to ``reads``."""
    rows = []
    for out in d.seeds:
        for t in d.spec.grad_inputs:
            if d.closed[t.name] == 0:
                continue
            say(f"Jacobian ∂{out}/∂{t.name}")
            jac = jacobian(d, out, t.name)
            expr = present(_as_written(d, jac.expr))
            if reads is not None:
                reads |= _names([_as_written(d, jac.expr)])
            lhs = f"∂{_access_text(out, jac.out_idx)}/∂{_access_text(t.name, jac.in_idx)}"
            row = {
                "output": out, "wrt": t.name,
                "output_indices": [str(i) for i in jac.out_idx],
                "input_indices": [str(i) for i in jac.in_idx],
                "text": f"{lhs} = {text(expr)}",
                "latex": latex_equation(
                    rf"\frac{{\partial {_access_latex(out, jac.out_idx)}}}"
                    rf"{{\partial {_access_latex(t.name, jac.in_idx)}}}", latex(expr)),
            }
            if shape is not None:
                mat, rws, cols = explicit_matrix(
                    d, jac, shape, progress=lambda r, n, out=out, wrt=t.name:
                    say(f"Jacobian ∂{out}/∂{wrt} as a matrix, row {r + 1} of {n}"))
                mat = mat.applyfunc(lambda e: _as_written(d, e))
                row["rows"] = [_access_text(out, r) for r in rws]
                row["columns"] = [_access_text(t.name, c) for c in cols]
                row["matrix"] = [[text(mat[i, j]) for j in range(mat.cols)]
                                 for i in range(mat.rows)]
                row["matrix_latex"] = _labelled_matrix(out, t.name, mat, rws, cols)
            rows.append(row)
    return rows


def _labelled_matrix(out: str, wrt: str, mat: sp.Matrix, rows: list, cols: list) -> str:
    """``∂S/∂X = `` and the matrix as an array whose first row names the input entries and
    first column the output entries (as the terminal table shows them)."""
    head = " & ".join([""] + [_access_latex(wrt, c) for c in cols])
    body = [" & ".join([_access_latex(out, r)] + [latex(mat[i, j]) for j in range(mat.cols)])
            for i, r in enumerate(rows)]
    array = (rf"\left[\begin{{array}}{{c|{'c' * mat.cols}}}" + head + r" \\ \hline "
             + r" \\ ".join(body) + r"\end{array}\right]")
    return rf"\frac{{\partial {latex_name(out)}}}{{\partial {latex_name(wrt)}}} = {array}"


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
    shown = _names([_as_written(d, e) for e in [d.via.get(t.name, d.closed[t.name])
                                                for t in spec.grad_inputs]
                    + list(d.named.values())])
    report = {
        "spec": spec.name, "description": spec.description, "file": spec.file,
        "reference": spec.reference, "seeds": seeds, "forward": [],
        "gradients": _gradients(d), "intermediates": _gradients(d, list(d.named)),
    }
    if jacobians or shape is not None:
        report["jacobians"] = _jacobians(d, shape, say, shown)
    if steps:  # the chain rule goes through every statement, lifted ones included
        say("chain-rule steps")
        report["steps"] = _steps(d)
        shown |= {a.target for a in d.program.assigns}
    report["forward"] = _forward(d, shown)
    return report
