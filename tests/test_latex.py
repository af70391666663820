"""``--latex`` a student can paste: every line of every built-in spec is well-formed LaTeX
(a structural check always; KaTeX with throwOnError where ``node`` has the ``katex`` package),
and the forms people write, tested by string: subscripts on σ² and adjoints, no lifted names,
matrix forms, labelled --shape matrices, aligned long equations, --steps with the local
derivatives, a hyper-parameter ``delta`` as δ."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.report import derive_report
from gradtool.spec.loader import builtin_specs
from gradtool.symbolic.printing import latex_equation

HERE = Path(__file__).parent
SHAPES = {"softmax": {"N": 1, "C": 3}, "linear": {"N": 2, "I": 2, "O": 2},
          "layernorm": {"N": 1, "D": 2}}


@functools.cache
def report(name: str) -> dict:
    return derive_report(name, jacobians=True, steps=True, shape=SHAPES.get(name))


def every_latex(rep: dict) -> list[str]:
    out = [r["latex"] for r in rep["forward"]]
    for g in rep["intermediates"] + rep["gradients"]:
        out += [g["latex"]] + ([g["matrix_latex"]] if g["matrix_latex"] else [])
    for j in rep.get("jacobians", []):
        out += [j["latex"]] + ([j["matrix_latex"]] if "matrix_latex" in j else [])
    for s in rep.get("steps", []):
        out += [s["latex"]] + [c["local_latex"] for c in s["contributions"]]
    return out


def structural_errors(tex: str) -> list[str]:
    """Balanced braces, ``\\left``/``\\right`` pairs within one line of an aligned block,
    matched environments, and no double super- or subscript (``a^2^3``, ``x_{n}_{d}``)."""
    errors = []
    for line in tex.splitlines():  # an aligned block has one line of output per row
        opened = len(re.findall(r"\\left(?![a-z])", line))
        closed = len(re.findall(r"\\right(?![a-z])", line))
        if opened != closed:
            errors.append(f"\\left/\\right unbalanced in {line!r}")
    if re.findall(r"\\begin\{(\w+)\}", tex) != re.findall(r"\\end\{(\w+)\}", tex)[::-1]:
        errors.append("\\begin/\\end unmatched")
    try:
        end = _group(tex, 0, errors)
    except IndexError:
        return errors + ["unbalanced {"]
    if end != len(tex):
        errors.append("unbalanced }")
    return errors


def _token(tex: str, k: int, errors: list) -> int:
    """The end of the token at ``k``: a group (checked inside), a command or a character."""
    if tex[k] == "{":
        end = _group(tex, k + 1, errors)
        if tex[end] != "}":
            raise IndexError
        return end + 1
    if tex[k] == "\\":
        m = re.match(r"\\([A-Za-z]+|.)", tex[k:])
        return k + len(m.group(0))
    return k + 1


def _group(tex: str, k: int, errors: list) -> int:
    """Check tokens from ``k`` to the closing brace (or the end): at most one ``^`` and one
    ``_`` per atom. Returns the position of the closing brace."""
    scripts: set = set()
    while k < len(tex) and tex[k] != "}":
        ch = tex[k]
        if ch in "^_":
            if ch in scripts:
                errors.append(f"double {ch} near {tex[max(0, k - 20):k + 10]!r}")
            scripts.add(ch)
            k += 1
            while tex[k].isspace():
                k += 1
            k = _token(tex, k, errors)  # the script's argument
            continue
        if not ch.isspace():
            scripts = set()
        k = _token(tex, k, errors)
    return k


def test_structural_checker_finds_what_katex_refuses():
    assert structural_errors(r"\sigma^2_{n}") == []
    assert structural_errors(r"{\sigma^2}^{2}") == []
    assert structural_errors(r"\sigma^2_{n}^{2}") != []
    assert structural_errors("\\left(a \\\\\nb\\right)") != []
    assert structural_errors(r"\frac{a}{b") != []


@pytest.mark.parametrize("name", list(builtin_specs()))
def test_every_latex_line_is_well_formed(name):
    for tex in every_latex(report(name)):
        assert structural_errors(tex) == [], tex


def _katex() -> str | None:
    node = shutil.which("node")
    if node is None:
        return None
    probe = subprocess.run([node, "-e", "require('katex')"], capture_output=True,
                           env=os.environ, check=False)
    return node if probe.returncode == 0 else None


@pytest.mark.skipif(_katex() is None, reason="node cannot require('katex') "
                                             "(npm install katex; set NODE_PATH)")
def test_katex_renders_every_latex_line_of_every_builtin():
    texts = [t for name in builtin_specs() for t in every_latex(report(name))]
    done = subprocess.run([_katex(), str(HERE / "katex_render.js")], input=json.dumps(texts),
                          capture_output=True, text=True, check=True, env=os.environ)
    failed = json.loads(done.stdout)
    assert failed == [], [(texts[k], why) for k, why in failed]


# -- the forms people write ---------------------------------------------------------------

def test_subscripts_go_where_people_put_them():
    rep = report("layernorm")
    forward = "\n".join(r["latex"] for r in rep["forward"])
    assert r"\sigma^2_{n} = " in forward and r"{\sigma^2}_{n}" not in forward
    assert r"\hat{x}_{n,d} = \mathrm{rstd}_{n} \mathrm{xc}_{n,d}" in forward
    steps = "\n".join(s["latex"] for s in rep["steps"])
    assert r"g_{\mathrm{rstd},n} = \sum_{d} g_{\hat{x},n,d} \mathrm{xc}_{n,d}" in steps
    assert r"g_{\sigma^2,n} = " in steps


@pytest.mark.parametrize("name", ["linear", "conv2d"])
def test_no_lifted_names_in_the_forward(name):
    rep = derive_report(name)
    for row in rep["forward"]:
        assert "s_Y" not in row["text"] and r"s\_Y" not in row["latex"], row
    # conv2d's forward also defines its derived sizes and padded input before Y
    assert [r["target"] for r in rep["forward"]][-1] == "Y"
    assert not any(r["target"].startswith("s_") for r in rep["forward"])
    assert rep["forward"][-1]["latex"].startswith("Y_{")


def test_lifted_line_stays_where_the_backward_reads_it():
    """softmax-like specs whose backward is written with the lifted sum keep its line."""
    rep = derive_report("linear", steps=True)
    assert "s_Y" in [r["target"] for r in rep["forward"]]  # the chain rule goes through it


def test_matrix_forms_in_latex_and_json():
    result = CliRunner().invoke(app, ["derive", "linear", "--json"])
    grads = {g["wrt"]: g for g in json.loads(result.stdout)["gradients"]}
    assert grads["X"]["matrix_latex"] == r"\frac{\partial L}{\partial X} = G W"
    assert grads["W"]["matrix_latex"] == r"\frac{\partial L}{\partial W} = G^{\top} X"
    assert grads["b"]["matrix_latex"] == r"\frac{\partial L}{\partial b} = \sum_{n} G"
    out = CliRunner().invoke(app, ["derive", "linear", "--latex"]).stdout
    assert r"\frac{\partial L}{\partial W} = G^{\top} X" in out.splitlines()


def test_shape_matrix_has_its_left_hand_side_and_labels():
    (jac,) = report("softmax")["jacobians"]
    tex = jac["matrix_latex"]
    assert tex.startswith(r"\frac{\partial S}{\partial X} = \left[\begin{array}{c|ccc}")
    assert r" & X_{0,0} & X_{0,1} & X_{0,2} \\ \hline S_{0,0} & " in tex


def test_long_equations_are_aligned():
    (dx,) = [g for g in report("layernorm")["gradients"] if g["wrt"] == "X"]
    lines = dx["latex"].splitlines()
    assert lines[0] == r"\begin{aligned}" and lines[-1] == r"\end{aligned}"
    assert lines[1].startswith(r"\frac{\partial L}{\partial X_{n,d}} ={}& \Bigl(")
    assert all(line.startswith(r"&\quad ") for line in lines[2:-1])
    assert latex_equation("y", "a + b") == "y = a + b"  # short ones stay on one line


def test_steps_in_latex_carry_the_local_derivatives():
    out = CliRunner().invoke(app, ["derive", "layernorm", "--latex", "--steps"]).stdout
    assert "% chain rule, from the outputs back" in out
    assert "% from Y: element-wise: multiply by the local derivative" in out
    assert r"\frac{\partial Y}{\partial \hat{x}} = \gamma_{d}" in out.splitlines()
    assert r"\frac{\partial \mathrm{rstd}}{\partial \sigma^2} = - \frac{\mathrm{rstd}_{n}^{3}}{2}" \
        in out.splitlines()


DELTA = """\
from gradtool.lang import Spec, exp, Sum

spec = Spec("scaled_softmax", "softmax of delta·X")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
delta = spec.hyper("delta", 0.5)
spec.output("Y", [n, c], exp(delta * X[n, c]) / Sum(exp(delta * X[n, k]), k))
"""


def test_a_hyper_parameter_named_delta_is_the_letter(tmp_path):
    path = tmp_path / "scaled.py"
    path.write_text(DELTA)
    rep = derive_report(str(path), jacobians=True)
    (jac,) = rep["jacobians"]
    assert "delta" not in jac["text"] and "δ·" in jac["text"] and "δ(c,j)" in jac["text"]
    assert r"\mathrm{delta}" not in jac["latex"] and r"\delta_{c j}" in jac["latex"]
    assert r"e^{\delta X_{n,c}}" in jac["latex"]
