"""A bad spec is reported as a SpecError with the spec file, the line and the problem."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import sympy

from gradtool.errors import SpecError
from gradtool.spec.loader import builtin_specs, load_spec

HEADER = """\
import sympy
from gradtool.lang import Spec, Sum, exp

spec = Spec("bad", "a spec with a mistake")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
"""
HEADER_LINES = HEADER.count("\n")  # the body's first line is HEADER_LINES + 1


def write(tmp_path: Path, body: str, header: str = HEADER) -> Path:
    path = tmp_path / "bad.py"
    path.write_text(header + textwrap.dedent(body))
    return path


def load_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        load_spec(path)
    return info.value


def test_syntax_error(tmp_path):
    path = write(tmp_path, 'spec.output("Y", [n, d], exp(X[n, d])\n')
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 1
    assert "syntax error" in str(err)


def test_undefined_name(tmp_path):
    path = write(tmp_path, """\
        H = spec.let("H", [n, d], X[n, d] * 2)
        spec.output("Y", [n, d], gelu(H[n, d]))
        """)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 2
    assert "`gelu` is not defined" in str(err)


def test_index_on_wrong_dimension(tmp_path):
    header = """\
from gradtool.lang import Spec, Sum

spec = Spec("bad", "linear with W indexed the wrong way round")
N, I, O = spec.dims("N I O")
n, i, o = spec.indices(n=N, i=I, o=O)
X = spec.input("X", N, I)
W = spec.param("W", O, I)
"""
    path = write(tmp_path, 'spec.output("Y", [n, o], Sum(X[n, i] * W[i, o], i))\n', header)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == header.count("\n") + 1
    assert "`W`" in str(err)
    assert "runs over" in str(err)


def test_free_index_not_bound_on_left(tmp_path):
    path = write(tmp_path, 'spec.output("Y", [n], X[n, d] * 2)\n')
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 1
    assert "free index `d`" in str(err)
    assert "not bound on the left" in str(err)


def test_unknown_function(tmp_path):
    path = write(tmp_path, """\
        f = sympy.Function("f")
        spec.output("Y", [n, d], f(X[n, d]))
        """)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 2
    assert "unknown function `f`" in str(err)


def test_non_differentiable_function(tmp_path):
    path = write(tmp_path, """\
        H = spec.let("H", [n, d], X[n, d] * 2)
        spec.output("Y", [n, d], sympy.floor(H[n, d]))
        """)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 2
    assert "floor" in str(err)
    assert "not differentiable" in str(err)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("\n  \n")
    err = load_error(path)
    assert err.file == str(path)
    assert err.line is None
    assert "empty" in str(err)


def test_missing_file(tmp_path):
    path = tmp_path / "nowhere.py"
    err = load_error(path)
    assert err.line is None
    assert str(path) in str(err)
    assert "does not exist" in str(err)


def test_file_without_spec(tmp_path):
    path = write(tmp_path, "", header="from gradtool.lang import Spec\n\nx = 1\n")
    err = load_error(path)
    assert err.file == str(path)
    assert "no Spec" in str(err)


def test_wrong_number_of_indices(tmp_path):
    path = write(tmp_path, 'spec.output("Y", [n], X[n] * 2)\n')
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 1
    assert "indices" in str(err)


def test_sum_over_undeclared_index(tmp_path):
    path = write(tmp_path, """\
        k = sympy.Symbol("k")
        spec.output("Y", [n], Sum(X[n, d], k))
        """)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 2
    assert "declare" in str(err)
    assert "k" in str(err)


def test_sum_over_undeclared_integer_symbol(tmp_path):
    path = write(tmp_path, """\
        k = sympy.Symbol("k", integer=True)
        spec.output("Y", [n], Sum(X[n, k], k))
        """)
    err = load_error(path)
    assert err.file == str(path)
    assert err.line == HEADER_LINES + 2
    assert "`k`" in str(err)
    assert "not declared" in str(err)


@pytest.mark.parametrize("name", sorted(builtin_specs()))
def test_builtin_spec_loads(name):
    spec = load_spec(name)
    assert spec.name == name
    assert spec.description.strip()
    assert spec.outputs
    assert spec.file == str(builtin_specs()[name])


@pytest.mark.parametrize("body, message", [
    ('Y = sympy.IndexedBase("Y")\nspec.output("Y", [n, d], X[n, d] + Y[n, d])\n',
     "`Y` reads itself"),
    ('Z = sympy.IndexedBase("Z")\nspec.let("A", [n, d], X[n, d] * Z[n, d])\n'
     'spec.output("Z", [n, d], X[n, d] ** 2)\n# the error is on the line of A\n',
     "`A` reads `Z` before it is defined"),
    ('spec.output("Y", [n, d], None)\n', "the right-hand side of `Y` is not a SymPy expression"),
    ('spec.output("Y", [n, d], X[n, d] / 0)\n', "`Y` divides by zero"),
    ('spec.output("Y", [n, d], X[n, d] + 1j)\n', "`Y` has an imaginary number"),
    ('h = spec.hyper("h", 0)\nspec.output("Y", [n, d], X[n, d] / h)\n',
     "`Y` divides by zero at the default h = 0"),
])
def test_statement_errors_name_the_line(tmp_path, body, message):
    """Cycles, forward references, non-expressions and constant division by zero are refused
    where they are written (each once derived with exit 0 and failed inside check)."""
    path = write(tmp_path, body)
    err = load_error(path)
    line = 2 if "line of A" in body else body.count("\n")
    assert err.line == HEADER_LINES + line and message in str(err)


def test_too_many_axes(tmp_path):
    body = ('dims = spec.dims(" ".join(f"A{i}" for i in range(40)))\n'
            'W = spec.input("W", *dims)\n')
    err = load_error(write(tmp_path, body))
    assert err.line == HEADER_LINES + 2 and "`W` has 40 axes" in str(err)


@pytest.mark.parametrize("body", [
    # the breaker's example: derive printed {X if X>0} and the kernels computed Y = X everywhere
    'spec.output("Y", [n, d], sympy.Piecewise((X[n, d], X[n, d] > 0)))\n',
    'h = spec.let("h", [n, d], X[n, d] ** 2)\n'
    'spec.output("Y", [n, d], exp(sympy.Piecewise((h[n, d], X[n, d] > 0),\n'
    '                                           (-h[n, d], X[n, d] < -1))))\n',
])
def test_piecewise_without_an_otherwise_branch(tmp_path, body):
    """Where no condition holds a Piecewise is undefined; it is refused at its statement."""
    err = load_error(write(tmp_path, body))
    assert err.line == HEADER_LINES + (1 if body.startswith("spec.output") else 2)
    assert "`Piecewise` has no (value, True) branch" in err.message
    assert "add a (value, True) branch for the other cases" in err.hint


def test_piecewise_with_an_otherwise_branch_loads(tmp_path):
    spec = load_spec(write(tmp_path, 'spec.output("Y", [n, d], sympy.Piecewise('
                                     '(X[n, d], X[n, d] > 0), (0, True)))\n'))
    assert spec.outputs


@pytest.mark.parametrize("body, message, hint", [
    ('a = spec.hyper("a", 0.5, domain="small")\n',
     "unknown domain 'small' for hyper-parameter `a`", "use one of real, positive"),
    ('eps = spec.hyper("eps", 0, domain="positive")\n',
     'hyper-parameter `eps` is declared positive (> 0) (domain="positive") but its default is 0',
     "give a default in the domain"),
    ('p = spec.hyper("p", 1.5, domain="unit")\n',
     'hyper-parameter `p` is declared in [0, 1] (domain="unit") but its default is 1.5',
     "give a default in the domain"),
])
def test_hyper_parameter_domain_errors(tmp_path, body, message, hint):
    err = load_error(write(tmp_path, body + 'spec.output("Y", [n, d], X[n, d])\n'))
    assert err.line == HEADER_LINES + 1 and message in err.message and hint in err.hint


def test_a_positive_default_assumes_nothing_about_the_sign(tmp_path):
    """Abs(a) stays |a| unless the spec declares a positive (then the simplifier may drop it)."""
    body = 'a = spec.hyper("a", 0.5{})\nspec.output("Y", [n, d], sympy.Abs(a) * X[n, d])\n'
    plain = load_spec(write(tmp_path, body.format("")))
    assert plain.statements[0].rhs.has(sympy.Abs)
    positive = load_spec(write(tmp_path, body.format(', domain="positive"')))
    assert not positive.statements[0].rhs.has(sympy.Abs)
