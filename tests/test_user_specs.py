"""Specs written outside the repo, as a new user would: they derive and match torch.autograd."""

import textwrap
import zlib

import pytest
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive
from tests.helpers import SHAPES, assert_matches_autograd, unsimplified

HEAD = "from gradtool.lang import *\n"

USER_SPECS = {
    "rmsnorm": """
        spec = Spec("rmsnorm", "RMS normalisation")
        N, D = spec.dims("N D")
        n, d, k = spec.indices(n=N, d=D, k=D)
        X = spec.input("X", N, D)
        g = spec.param("g", D, init="ones")
        eps = spec.hyper("eps", 1e-6)
        ms = spec.let("ms", [n], Sum(X[n, k] ** 2, k) / D)
        r = spec.let("r", [n], 1 / sqrt(ms[n] + eps))
        spec.output("Y", [n, d], g[d] * X[n, d] * r[n])
    """,
    "gelu": """
        spec = Spec("gelu", "Gaussian error linear unit")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        spec.output("Y", [n, d], X[n, d] * (1 + erf(X[n, d] / sqrt(2))) / 2)
    """,
    "swish": """
        spec = Spec("swish", "x times sigmoid x")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        beta = spec.hyper("beta", 1.5)
        spec.output("Y", [n, d], X[n, d] * sigmoid(beta * X[n, d]))
    """,
    "softplus": """
        spec = Spec("softplus", "log(1 + e^x)")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        spec.output("Y", [n, d], log(1 + exp(X[n, d])))
    """,
    "huber": """
        spec = Spec("huber", "Huber loss")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        T = spec.input("T", N, D, grad=False)
        delta = spec.hyper("delta", 0.7)
        r = spec.let("r", [n, d], X[n, d] - T[n, d])
        h = spec.let("h", [n, d], Piecewise((r[n, d] ** 2 / 2, Abs(r[n, d]) <= delta),
                                            (delta * (Abs(r[n, d]) - delta / 2), True)))
        spec.output("L", [], Sum(h[n, d], n, d) / (N * D))
    """,
    "cosine": """
        spec = Spec("cosine", "cosine similarity of rows")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        A = spec.input("A", N, D)
        B = spec.input("B", N, D)
        ab = spec.let("ab", [n], Sum(A[n, d] * B[n, d], d))
        na = spec.let("na", [n], sqrt(Sum(A[n, d] ** 2, d)))
        nb = spec.let("nb", [n], sqrt(Sum(B[n, d] ** 2, d)))
        spec.output("Y", [n], ab[n] / (na[n] * nb[n]))
    """,
    "attention_scores": """
        spec = Spec("attention_scores", "softmax(Q Kᵀ / sqrt(D))")
        N, M, D = spec.dims("N M D")
        i, j, k, d = spec.indices(i=N, j=M, k=M, d=D)
        Q = spec.input("Q", N, D)
        K = spec.input("K", M, D)
        s = spec.let("s", [i, j], Sum(Q[i, d] * K[j, d], d) / sqrt(D))
        e = spec.let("e", [i, j], exp(s[i, j]))
        Z = spec.let("Z", [i], Sum(e[i, k], k))
        spec.output("A", [i, j], e[i, j] / Z[i])
    """,
    "conv1d": """
        spec = Spec("conv1d", "1-d convolution with stride")
        N, C, O, T, K, S = spec.dims("N C O T K S")
        n, c, o, t, k = spec.indices(n=N, c=C, o=O, t=T, k=K)
        X = spec.input("X", N, C, (T - 1) * S + K)
        W = spec.param("W", O, C, K)
        b = spec.param("b", O, init="zeros")
        spec.output("Y", [n, o, t], Sum(W[o, c, k] * X[n, c, t * S + k], c, k) + b[o])
    """,
    "maxpool1d": """
        spec = Spec("maxpool1d", "max pooling, window K, stride S")
        N, T, K, S = spec.dims("N T K S")
        n, t, k = spec.indices(n=N, t=T, k=K)
        X = spec.input("X", N, (T - 1) * S + K)
        spec.output("Y", [n, t], Max(X[n, t * S + k], k))
    """,
    "max_rescaled": """
        spec = Spec("max_rescaled", "a max whose value the output rescales (fuzzer finding)")
        N = spec.dims("N")
        n, i = spec.indices(n=N, i=N)
        A = spec.input("A", N, domain="positive")
        B = spec.input("B", N, domain="positive")
        t0 = spec.let("t0", [], Max(B[i], i))
        spec.output("Y", [], 2 * t0 / (1 + tanh(Sum(A[i] * A[i], i)) ** 2))
    """,
    "min_over_time": """
        spec = Spec("min_over_time", "the smallest value of each row, Min as a reduction")
        N, T = spec.dims("N T")
        n, t = spec.indices(n=N, t=T)
        X = spec.input("X", N, T)
        spec.output("Y", [n], Min(X[n, t], t) + Sum(Min(X[n, t], 0.5 * X[n, t]), t))
    """,
    "outer": """
        spec = Spec("outer", "outer product with itself (repeated access)")
        N, D = spec.dims("N D")
        n, i, j = spec.indices(n=N, i=D, j=D)
        X = spec.input("X", N, D)
        spec.output("Y", [n, i, j], X[n, i] * X[n, j])
    """,
}


def write(tmp_path, name):
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + textwrap.dedent(USER_SPECS[name]))
    return path


@pytest.mark.parametrize("case, fixed", SHAPES, ids=[s[0] for s in SHAPES])
@pytest.mark.parametrize("name", sorted(USER_SPECS))
def test_user_spec_matches_autograd(tmp_path, name, case, fixed):
    d = derive(load_spec(write(tmp_path, name)))
    assert_matches_autograd(d, seed=zlib.crc32(f"{name}/{case}".encode()), fixed=fixed)


@pytest.mark.parametrize("name", ["rmsnorm", "gelu", "swish", "cosine", "attention_scores"])
def test_user_spec_closed_form_is_simplified(tmp_path, name):
    d = derive(load_spec(write(tmp_path, name)))
    for t in d.spec.grad_inputs:
        assert unsimplified(d.closed[t.name]) == []


@pytest.mark.parametrize("name", ["rmsnorm", "gelu"])
def test_user_spec_derives_from_the_command_line(tmp_path, name):
    path = write(tmp_path, name)
    result = CliRunner().invoke(app, ["derive", str(path)])
    assert result.exit_code == 0, result.output
    assert "dX[n,d] =" in result.output


@pytest.mark.parametrize("name", sorted(USER_SPECS))
def test_user_spec_kernels_pass_every_check(tmp_path, name):
    """Generated NumPy and torch kernels (strided convolution and pooling included: affine
    indices become integer-array indexing and their adjoint a scatter-add) against every
    oracle, and their second derivatives."""
    from gradtool.check.runner import CheckOptions, check_spec

    spec = load_spec(write(tmp_path, name))
    rows = check_spec(spec, CheckOptions(cases=2, order=2))
    failed = [r for r in rows if not r.passed]
    assert rows and not failed, failed
