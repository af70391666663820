"""The ``gradtool`` command line, through typer's CliRunner (the library is tested elsewhere)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradtool import __version__
from gradtool.cli import app
from gradtool.errors import SpecError
from gradtool.spec.loader import builtin_specs

BUILTINS = sorted(builtin_specs())
runner = CliRunner()

HEADER = """\
import sympy
from gradtool.lang import Spec, Sum, exp

spec = Spec("bad", "a spec with a mistake")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
"""
HEADER_LINES = HEADER.count("\n")  # a body's first line is HEADER_LINES + 1

LINEAR_HEADER = """\
from gradtool.lang import Spec, Sum

spec = Spec("bad", "linear with W indexed the wrong way round")
N, I, O = spec.dims("N I O")
n, i, o = spec.indices(n=N, i=I, o=O)
X = spec.input("X", N, I)
W = spec.param("W", O, I)
"""

RMSNORM = """\
from gradtool.lang import Spec, Sum, sqrt

spec = Spec("rmsnorm", "RMS normalisation over the last axis")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
g = spec.param("g", D, init="ones")
eps = spec.hyper("eps", 1e-6)

ms = spec.let("ms", [n], Sum(X[n, k] ** 2, k) / D)
spec.output("Y", [n, d], g[d] * X[n, d] / sqrt(ms[n] + eps))
"""


def invoke(*args: str):
    return runner.invoke(app, list(args))


def ok(*args: str) -> str:
    """Run a command that must succeed; return its standard output."""
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def ok_json(*args: str):
    return json.loads(ok(*args, "--json"))


def fails(*args: str) -> str:
    """Run a command that must fail cleanly: exit 1, one error line on stderr, no traceback."""
    result = invoke(*args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error:"), result.stderr
    return result.stderr


def body_lines(output: str) -> list[str]:
    """Output lines with rich panel borders stripped."""
    return [line.strip("│ ") for line in output.splitlines()]


def write(tmp_path: Path, body: str, header: str = HEADER, name: str = "bad.py") -> Path:
    path = tmp_path / name
    path.write_text(header + textwrap.dedent(body))
    return path


# -- help and version ------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_commands(flag):
    out = ok(flag)
    assert "Usage" in out
    for command in ("specs", "derive"):
        assert command in out


def test_no_arguments_shows_help():
    result = invoke()
    assert "derive" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("command", ["specs", "derive"])
def test_command_help(command):
    assert "Usage" in ok(command, "-h")


def test_version():
    assert ok("--version").strip() == f"gradtool {__version__}"


def test_help_imports_no_heavy_modules():
    code = textwrap.dedent("""\
        import sys
        sys.argv = ["gradtool", "--help"]
        import gradtool.cli
        try:
            gradtool.cli.app()
        except SystemExit:
            pass
        print("HEAVY", sorted(m for m in ("torch", "sympy", "numpy") if m in sys.modules))
        """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert "Usage" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1] == "HEAVY []"


# -- specs -----------------------------------------------------------------------------------

def test_specs_lists_every_builtin():
    out = ok("specs")
    for name in BUILTINS:
        assert name in out


def test_specs_json():
    rows = ok_json("specs")
    assert isinstance(rows, list)
    assert [r["name"] for r in rows] == BUILTINS
    for r in rows:
        assert r["description"], r["name"]


# -- derive: built-ins -----------------------------------------------------------------------

@pytest.mark.parametrize("name", BUILTINS)
def test_derive_builtin(name):
    out = ok("derive", name)
    assert "backward" in out
    lines = body_lines(out)
    for g in ok_json("derive", name)["gradients"]:
        lhs = g["text"].split(" = ")[0]  # "dX[n,d]", "dγ[c]"
        assert any(line.startswith(f"{lhs} = ") for line in lines), (lhs, out)


@pytest.mark.parametrize("name", BUILTINS)
def test_derive_builtin_json(name):
    report = ok_json("derive", name)
    assert report["spec"] == name
    assert report["forward"]
    assert report["gradients"]
    for g in report["gradients"]:
        assert {"wrt", "text", "matrix", "latex"} <= set(g)
        assert "sympy" not in g
        assert g["text"].startswith("d")


def test_derive_text_shows_each_gradient():
    out = ok("derive", "linear")
    lines = body_lines(out)
    for lhs in ("dX[n,i] = ", "dW[o,i] = ", "db[o] = "):
        assert any(line.startswith(lhs) for line in lines), out


def test_derive_linear_matrix_forms():
    report = ok_json("derive", "linear")
    assert [g["wrt"] for g in report["gradients"]] == ["X", "W", "b"]
    assert [g["matrix"] for g in report["gradients"]] == ["G W", "Gᵀ X", "Σ_n G"]


def test_derive_softmax_jacobian_matrix():
    report = ok_json("derive", "softmax", "--jacobian", "--shape", "N=1,C=3")
    jac = report["jacobians"][0]
    assert (jac["output"], jac["wrt"]) == ("S", "X")
    assert len(jac["matrix"]) == 3
    assert all(len(row) == 3 for row in jac["matrix"])
    assert "δ(" in jac["text"]


def test_derive_jacobian_table():
    out = ok("derive", "softmax", "--jacobian", "--shape", "N=1,C=2")
    assert "Jacobian" in out
    assert "X[0,1]" in out


@pytest.mark.parametrize("shape", ["N=1,C=3,Q=2", "Q=2", "N=x", "N=0,C=3", "N"])
def test_derive_bad_shape(shape):
    err = fails("derive", "softmax", "--jacobian", "--shape", shape)
    assert "--shape" in err


def test_shape_takes_a_zero_padding_and_names_a_size_below_its_minimum():
    """A padding may be 0 (spec.min_size(P=0)): the unpadded Jacobian is shown; N=0 says
    that N must be at least 1, for derive and check alike."""
    out = ok("derive", "conv1d", "--jacobian", "--shape", "N=1,C=1,O=1,L=3,K=2,S=1,P=0")
    assert "Y[0,0,1]" in out and "Y[0,0,2]" not in out  # (3 − 2)/1 + 1 = 2 positions
    for command in (["derive", "softmax", "--jacobian"], ["check", "softmax"]):
        err = fails(*command, "--shape", "N=0,C=3")
        assert "--shape N=0: softmax needs N ≥ 1" in err


def test_derive_shape_names_the_unknown_dimension():
    err = fails("derive", "softmax", "--shape", "N=1,C=3,Q=2")
    assert "Q" in err


def test_derive_layernorm_steps():
    report = ok_json("derive", "layernorm", "--steps")
    steps = {s["tensor"]: s for s in report["steps"]}
    for name in ("xhat", "rstd", "var", "xc", "mu", "X"):
        assert steps[name]["contributions"], name
        for c in steps[name]["contributions"]:
            assert c["rule"], (name, c)
    assert len(steps["X"]["contributions"]) == 2  # through xc directly and through mu


def test_derive_steps_table():
    assert "chain rule" in ok("derive", "layernorm", "--steps")


def test_derive_layernorm_latex():
    out = ok("derive", "layernorm", "--latex")
    assert r"\frac" in out
    assert r"\sum" in out
    assert "╭" not in out  # plain lines to paste, no panels


# -- derive: a user's spec file --------------------------------------------------------------

def test_derive_user_spec_file(tmp_path):
    path = tmp_path / "rmsnorm.py"
    path.write_text(RMSNORM)
    out = ok("derive", str(path))
    lines = body_lines(out)
    assert "rmsnorm" in out
    assert any(line.startswith("dX[n,d] = ") for line in lines), out
    assert any(line.startswith("dg[d] = ") for line in lines), out


def test_derive_user_spec_file_json(tmp_path):
    path = tmp_path / "rmsnorm.py"
    path.write_text(RMSNORM)
    report = ok_json("derive", str(path))
    assert report["file"] == str(path)
    assert [g["wrt"] for g in report["gradients"]] == ["X", "g"]


# -- errors ----------------------------------------------------------------------------------

BAD_SPECS = {
    # id: (body, header, line of the mistake in the file, text the error must contain)
    "syntax": ('spec.output("Y", [n, d], exp(X[n, d])\n', HEADER, HEADER_LINES + 1,
               "syntax error"),
    "undefined_name": ('H = spec.let("H", [n, d], X[n, d] * 2)\n'
                       'spec.output("Y", [n, d], gelu(H[n, d]))\n', HEADER, HEADER_LINES + 2,
                       "`gelu` is not defined"),
    "wrong_dimension": ('spec.output("Y", [n, o], Sum(X[n, i] * W[i, o], i))\n', LINEAR_HEADER,
                        LINEAR_HEADER.count("\n") + 1, "runs over"),
    "free_index": ('spec.output("Y", [n], X[n, d] * 2)\n', HEADER, HEADER_LINES + 1,
                   "free index `d`"),
    "unknown_function": ('f = sympy.Function("f")\n'
                         'spec.output("Y", [n, d], f(X[n, d]))\n', HEADER, HEADER_LINES + 2,
                         "unknown function `f`"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_derive_bad_spec(tmp_path, case):
    body, header, line, message = BAD_SPECS[case]
    path = write(tmp_path, body, header)
    err = fails("derive", str(path))
    assert f"{path}:{line}:" in err
    assert message in err


def test_error_keeps_square_brackets_of_the_hint(tmp_path):
    # the hint suggests the fixed left-hand side, "[n, d]"; it must not be eaten as rich markup
    path = write(tmp_path, 'spec.output("Y", [n], X[n, d] * 2)\n')
    err = fails("derive", str(path))
    assert "add it to the left: [n, d]" in err


def test_derive_empty_file(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("\n  \n")
    err = fails("derive", str(path))
    assert str(path) in err
    assert "empty" in err


def test_derive_missing_file(tmp_path):
    path = tmp_path / "nowhere.py"
    err = fails("derive", str(path))
    assert str(path) in err
    assert "does not exist" in err


def test_derive_unknown_builtin():
    err = fails("derive", "no_such_layer")
    assert "no_such_layer" in err
    assert "gradtool specs" in err


@pytest.mark.parametrize("args", [
    ["derive", "missing.py", "--debug"],
    ["--debug", "derive", "missing.py"],
])
def test_debug_lets_the_exception_through(args):
    result = invoke(*args)
    assert isinstance(result.exception, SpecError)
    assert "missing.py" in str(result.exception)


def test_debug_is_not_sticky():
    # the global flag lives in module state; a later run without it must fail cleanly again
    invoke("--debug", "derive", "missing.py")
    fails("derive", "missing.py")


@pytest.mark.parametrize("command", ["derive", "check", "specs"])
def test_help_ends_with_examples_and_a_doc_page(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0
    tail = result.output[result.output.index("Examples"):]
    assert f"$ gradtool {command}" in tail and "Docs: docs/" in tail


@pytest.mark.parametrize("option", [["--latex"], ["--json"], ["--steps"], ["--jacobian"],
                                    ["--shape", "N=1,D=2"]])
def test_code_refuses_options_it_would_ignore(option):
    result = CliRunner().invoke(app, ["derive", "relu", "--code", "numpy", *option])
    assert result.exit_code == 1 and "cannot be combined" in result.output
    assert option[0] in result.output


def test_derive_names_a_builtin_spec_as_specs_name_from_any_folder(tmp_path, monkeypatch):
    """The header line names a built-in spec as the docs do (``specs/layernorm.py``), not by
    the absolute path of wherever gradtool is installed; a user's file relative to the
    working folder."""
    monkeypatch.chdir(tmp_path)
    assert ok("derive", "layernorm").splitlines()[1].strip() == "specs/layernorm.py"
    (tmp_path / "sub").mkdir()
    spec = tmp_path / "sub" / "square.py"
    spec.write_text('from gradtool.lang import Spec\nspec = Spec("square", "x²")\n'
                    'N = spec.dims("N")\nn = spec.indices(n=N)\nX = spec.input("X", N)\n'
                    'spec.output("Y", [n], X[n] ** 2)\n')
    assert ok("derive", str(spec)).splitlines()[1].strip() == "sub/square.py"


def test_a_float_in_a_spec_prints_as_python_writes_it(tmp_path):
    """Max(X, 0.5·X, Min(X, 1)): 0.5 and 1.0 in the closed form and its matrix form, not
    SymPy's 0.500000000000000."""
    spec = tmp_path / "minmax.py"
    spec.write_text('from gradtool.lang import Spec, Max, Min\nspec = Spec("mm", "max")\n'
                    'N, D = spec.dims("N D")\nn, d = spec.indices(n=N, d=D)\n'
                    'X = spec.input("X", N, D)\n'
                    'spec.output("Y", [n, d], Max(X[n, d], 0.5 * X[n, d], Min(X[n, d], 1)))\n')
    out = ok("derive", str(spec))
    assert "0.5" in out and "00000" not in out, out
