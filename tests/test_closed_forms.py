"""The closed forms a textbook prints: checked against hand formulas and for readable shape."""

import numpy as np
import pytest
import sympy as sp

from gradtool.report import derive_report
from gradtool.spec.loader import load_spec
from gradtool.symbolic.jacobian import explicit_matrix, jacobian
from gradtool.symbolic.printing import present, text
from gradtool.symbolic.reverse import derive
from tests.helpers import assert_matches_autograd, evaluate_closed, max_rel_err, unsimplified


@pytest.fixture(scope="module")
def d():
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = derive(load_spec(name))
        return cache[name]
    return get


def sym(d, name):
    """The SymPy symbols a derivation uses, by name (tensors, indices, dimensions)."""
    out = {n: t.base for n, t in d.spec.tensors.items()}
    out.update({str(i): i for i in d.program.ranges})
    out.update(d.spec.dim_symbols)
    out["G"] = sp.IndexedBase("G")
    return out[name]


def test_softmax_jacobian_index_form(d):
    sm = d("softmax")
    jac = jacobian(sm, "S", "X")
    S = sym(sm, "S")
    n, c = jac.out_idx
    i, j = jac.in_idx
    expected = S[n, c] * (sp.KroneckerDelta(c, j) - S[n, j]) * sp.KroneckerDelta(n, i)
    assert sp.expand(jac.expr - expected) == 0
    assert text(present(jac.expr)).count("δ") == 2


def test_softmax_jacobian_per_row_is_diag_minus_outer(d):
    sm = d("softmax")
    jac = jacobian(sm, "S", "X")
    mat, rows, cols = explicit_matrix(sm, jac, {"N": 2, "C": 3})
    s = np.random.default_rng(1).dirichlet(np.ones(3), size=2)
    S = sym(sm, "S")
    values = {S[a, b]: s[a, b] for a in range(2) for b in range(3)}
    num = np.array(mat.xreplace(values).evalf(), dtype=float)
    for r in range(2):
        block = num[3 * r:3 * r + 3, 3 * r:3 * r + 3]
        assert np.allclose(block, np.diag(s[r]) - np.outer(s[r], s[r]), atol=1e-14)
    off = num.copy()
    off[:3, :3] = off[3:, 3:] = 0
    assert np.all(off == 0), "rows of different samples do not interact"


def test_softmax_cross_entropy_is_p_minus_t_over_n(d):
    sce = d("softmax_cross_entropy")
    P, T, N = sym(sce, "P"), sym(sce, "T"), sym(sce, "N")
    n, c = sce.canon["X"]
    assert sp.simplify(sce.closed["X"] - (P[n, c] - T[n, c]) / N) == 0
    assert text(present(sce.closed["X"])) == "(P[n,c] - T[n,c])/N"


def test_softmax_backward_needs_no_other_names(d):
    sm = d("softmax")
    G, S = sym(sm, "G"), sym(sm, "S")
    n, c = sm.canon["X"]
    k = sp.Symbol("k_t", integer=True)
    C = sym(sm, "C")
    expected = S[n, c] * (G[n, c] - sp.Sum(G[n, k] * S[n, k], (k, 0, C - 1)))
    grad, env, sizes = evaluate_closed(sm, "X")
    s, g = env["S"], env["G"]
    assert max_rel_err(grad, s * (g - (g * s).sum(1, keepdims=True))) < 1e-12
    assert {a.base.label.name for a in sm.closed["X"].atoms(sp.Indexed)} == {"G", "S"}
    del expected


def test_linear_closed_forms(d):
    lin = d("linear")
    grad_x, env, _ = evaluate_closed(lin, "X")
    grad_w, _, _ = evaluate_closed(lin, "W")
    grad_b, _, _ = evaluate_closed(lin, "b")
    g, x, w = env["G"], env["X"], env["W"]
    assert max_rel_err(grad_x, g @ w) < 1e-12
    assert max_rel_err(grad_w, g.T @ x) < 1e-12
    assert max_rel_err(grad_b, g.sum(0)) < 1e-12
    report = derive_report("linear")
    assert [r["matrix"] for r in report["gradients"]] == ["G W", "Gᵀ X", "Σ_n G"]


def test_matmul_matrix_forms():
    report = derive_report("matmul")
    assert [r["matrix"] for r in report["gradients"]] == ["G Bᵀ", "Aᵀ G"]


def test_layernorm_textbook_form(d):
    ln = d("layernorm")
    grad, env, sizes = evaluate_closed(ln, "X")
    g = env["G"] * env["gamma"]
    xhat, rstd = env["xhat"], env["rstd"][:, None]
    expected = rstd * (g - g.mean(1, keepdims=True) - xhat * (g * xhat).mean(1, keepdims=True))
    assert max_rel_err(grad, expected) < 1e-12
    closed = ln.closed["X"]
    names = {a.base.label.name for a in closed.atoms(sp.Indexed)}
    assert names == {"G", "gamma", "xhat", "rstd"}, "written in the saved forward names"
    assert sum(isinstance(x, sp.Sum) for x in sp.preorder_traversal(closed)) == 2
    assert unsimplified(closed) == []


def test_batchnorm_textbook_form(d):
    bn = d("batchnorm")
    grad, env, sizes = evaluate_closed(bn, "X")
    g, xhat = env["G"], env["xhat"]
    gamma, std, n = env["gamma"], env["std"], sizes["N"]
    expected = gamma / (n * std) * (n * g - g.sum(0) - xhat * (g * xhat).sum(0))
    assert max_rel_err(grad, expected) < 1e-12
    closed = bn.closed["X"]
    names = {a.base.label.name for a in closed.atoms(sp.Indexed)}
    assert names == {"G", "gamma", "xhat", "std"}
    assert sum(isinstance(x, sp.Sum) for x in sp.preorder_traversal(closed)) == 2
    assert unsimplified(closed) == []


def test_batchnorm_running_statistics_are_state_not_gradients(d):
    bn = d("batchnorm")
    assert [t.name for t in bn.spec.grad_inputs] == ["X", "gamma", "beta"]
    assert "running_mean" not in bn.closed and "running_var" not in bn.closed


@pytest.mark.parametrize("name, expected", [
    ("sigmoid", "(1 - Y[n,d])·G[n,d]·Y[n,d]"),
    ("tanh", "(1 - Y[n,d]^2)·G[n,d]"),
    ("relu", "[X[n,d] > 0]·G[n,d]"),
    ("div", None),
    ("mse", "2·(-T[n,d] + X[n,d])/(D·N)"),
    ("cross_entropy", "-T[n,c]/(N·X[n,c])"),
])
def test_elementwise_forms(d, name, expected):
    der = d(name)
    shown = text(present(der.closed["X"]))
    if expected is not None:
        assert shown == expected


def test_division_has_the_square(d):
    dv = d("div")
    X, Y, G = sym(dv, "X"), sym(dv, "Y"), sym(dv, "G")
    n, dd = dv.canon["Y"]
    assert sp.simplify(dv.closed["Y"] + G[n, dd] * X[n, dd] / Y[n, dd] ** 2) == 0


def test_steps_go_through_named_intermediates():
    report = derive_report("batchnorm", steps=True)
    tensors = [s["tensor"] for s in report["steps"]]
    for name in ("xhat", "std", "var", "xc", "mu", "X"):
        assert name in tensors
    assert tensors.index("xhat") < tensors.index("var") < tensors.index("mu")
    mu = next(s for s in report["steps"] if s["tensor"] == "mu")
    assert "g_xc" in mu["text"]


def test_polynomials_in_saved_tensors_are_factored(tmp_path):
    """tanh(tanh(A)): the textbook (1 − Y²)(1 − t0²), not Y²t0² − Y² − t0² + 1."""
    path = tmp_path / "tanh2.py"
    path.write_text("from gradtool.lang import *\n"
                    "spec = Spec('tanh2', 'tanh of tanh')\n"
                    "N = spec.dims('N')\n"
                    "n = spec.indices(n=N)\n"
                    "A = spec.input('A', N)\n"
                    "t0 = spec.let('t0', [n], tanh(A[n]))\n"
                    "spec.output('Y', [n], tanh(t0[n]))\n")
    from gradtool.spec.loader import load_spec
    from gradtool.symbolic.reverse import derive

    shown = text(present(derive(load_spec(path)).closed["A"]))
    assert shown == "(1 - Y[n]^2)·(1 - t0[n]^2)·G[n]"


# -- textbook forms of composite layers (issue 7, item 13) -----------------------------------

def _user_spec(tmp_path, name, source):
    path = tmp_path / f"{name}.py"
    path.write_text("from gradtool.lang import *\n" + source)
    return derive(load_spec(path))


GROUP_NORM = """\
spec = Spec("groupnorm4", "group norm over (Cg, L) of X[N, G, Cg, L]")
N, G, C, L = spec.dims("N G Cg L")
n, g, c, l = spec.indices(n=N, g=G, c=C, l=L)
X = spec.input("X", N, G, C, L)
eps = spec.hyper("eps", 1e-5)
mu = spec.let("mu", [n, g], Sum(Sum(X[n, g, c, l], l), c) / (C * L))
xc = spec.let("xc", [n, g, c, l], X[n, g, c, l] - mu[n, g])
var = spec.let("var", [n, g], Sum(Sum(xc[n, g, c, l] ** 2, l), c) / (C * L))
rstd = spec.let("rstd", [n, g], 1 / sqrt(var[n, g] + eps))
xhat = spec.let("xhat", [n, g, c, l], xc[n, g, c, l] * rstd[n, g])
spec.output("Y", [n, g, c, l], xhat[n, g, c, l])
"""


def test_group_norm_drops_the_vanishing_two_index_sum(tmp_path):
    """Σ_{c,l} x̂ = 0 over the two indices a group reduces, as Σ_d x̂ = 0 in layer norm."""
    gn = _user_spec(tmp_path, "groupnorm4", GROUP_NORM)
    assert text(present(gn.closed["X"])) == (
        "(G[n,g,c,l] - x̂[n,g,c,l]·Σ_c',l'(G[n,g,c',l']·x̂[n,g,c',l'])/(Cg·L) "
        "- Σ_c',l'(G[n,g,c',l'])/(Cg·L))·rstd[n,g]")
    grad, env, sizes = evaluate_closed(gn, "X")
    g, xhat, rstd = env["G"], env["xhat"], env["rstd"][:, :, None, None]
    mean = (2, 3)
    expected = rstd * (g - g.mean(mean, keepdims=True)
                       - xhat * (g * xhat).mean(mean, keepdims=True))
    assert max_rel_err(grad, expected) < 1e-12
    for seed in range(2):
        assert_matches_autograd(gn, seed=seed)
