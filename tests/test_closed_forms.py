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
    ("mse", "2·(X[n,d] - T[n,d])/(D·N)"),
    ("cross_entropy", "-T[n,c]/(N·X[n,c])"),
])
def test_elementwise_forms(d, name, expected):
    der = d(name)
    shown = text(present(der.closed["X"]))
    if expected is not None:
        assert shown == expected


def test_a_sum_prints_a_positive_term_first():
    """A textbook writes X − T, not −T + X; a sum of negative terms keeps its order."""
    from gradtool.symbolic.printing import latex

    x, y, z = sp.symbols("x y z")
    assert text(-x + y) == "y - x" and latex(-x + y) == "y - x"
    assert text(-x - y) == "-x - y"
    assert text(-x + y - z) == "y - x - z"
    assert text(z * (-sp.Sum(x, (x, 0, 2)) + y)) == "z·(y - Σ_x(x))"


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
spec = Spec("groupnorm4", "group norm over (Cg, L) of X[N, NG, Cg, L], NG groups")
N, NG, C, L = spec.dims("N NG Cg L")
n, g, c, l = spec.indices(n=N, g=NG, c=C, l=L)
X = spec.input("X", N, NG, C, L)
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


MISH = """\
spec = Spec("mish", "Mish: X·tanh(softplus(X))")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
sp = spec.let("sp", [n, d], log(1 + exp(X[n, d])))
spec.output("Y", [n, d], X[n, d] * tanh(sp[n, d]))
"""

SWIGLU = """\
spec = Spec("swiglu", "SwiGLU: (X·W1)·σ(X·W1)·(X·W2)")
N, I, H = spec.dims("N I H")
n, i, h = spec.indices(n=N, i=I, h=H)
X = spec.input("X", N, I)
W1 = spec.param("W1", I, H)
W2 = spec.param("W2", I, H)
a = spec.let("a", [n, h], Sum(X[n, i] * W1[i, h], i))
b = spec.let("b", [n, h], Sum(X[n, i] * W2[i, h], i))
spec.output("Y", [n, h], a[n, h] * sigmoid(a[n, h]) * b[n, h])
"""


def _sigmoid(x):
    return 1 / (1 + np.exp(-x))


def test_mish_names_sigmoid_and_groups_the_tanh_derivative(tmp_path):
    """Mish: G·(tanh(sp) + X·(1 − tanh²(sp))·σ(X)), with d softplus = σ."""
    mish = _user_spec(tmp_path, "mish", MISH)
    assert text(present(mish.closed["X"])) == \
        "((1 - tanh(sp[n,d])^2)·σ(X[n,d])·X[n,d] + tanh(sp[n,d]))·G[n,d]"
    grad, env, _ = evaluate_closed(mish, "X")
    x, t = env["X"], np.tanh(env["sp"])
    assert max_rel_err(grad, env["G"] * (t + x * (1 - t ** 2) * _sigmoid(x))) < 1e-12
    for seed in range(2):
        assert_matches_autograd(mish, seed=seed)


def test_swiglu_names_sigmoid_and_the_shared_adjoints(tmp_path):
    """SwiGLU, a = X·W1, b = X·W2: da = G·b·σ(a)·(1 + a·(1 − σ(a))), db = G·a·σ(a),
    dX = da W1ᵀ + db W2ᵀ, dW1 = Xᵀ da, dW2 = Xᵀ db."""
    path = tmp_path / "swiglu.py"
    path.write_text("from gradtool.lang import *\n" + SWIGLU)
    report = derive_report(str(path))
    shown = {g["wrt"]: (g["expression"], g["matrix"])
             for g in report["intermediates"] + report["gradients"]}
    assert shown == {
        "a": ("((1 - σ(a[n,h]))·a[n,h] + 1)·σ(a[n,h])·G[n,h]·b[n,h]",
              "(1 + (1 − σ(a)) ⊙ a) ⊙ G ⊙ b ⊙ σ(a)"),
        "b": ("σ(a[n,h])·G[n,h]·a[n,h]", "G ⊙ a ⊙ σ(a)"),
        "X": ("Σ_h(W1[i,h]·da[n,h]) + Σ_h(W2[i,h]·db[n,h])", "da W1ᵀ + db W2ᵀ"),
        "W1": ("Σ_n(X[n,i]·da[n,h])", "Xᵀ da"),
        "W2": ("Σ_n(X[n,i]·db[n,h])", "Xᵀ db"),
    }
    assert all("exp" not in text for text, _ in shown.values()), shown
    sw = derive(load_spec(path))
    grad, env, _ = evaluate_closed(sw, "W1")
    a, b, g = env["a"], env["b"], env["G"]
    da = g * b * _sigmoid(a) * (1 + a * (1 - _sigmoid(a)))
    assert max_rel_err(grad, env["X"].T @ da) < 1e-12
    for seed in range(2):
        assert_matches_autograd(sw, seed=seed)
        assert_printed_through_names_match_autograd(sw, seed)


def test_sigmoid_is_named_only_where_its_quotient_appears():
    from gradtool.symbolic.ir import Sigmoid
    from gradtool.symbolic.simplify import name_logistic

    u, v = sp.symbols("u v", real=True)
    s = Sigmoid(u)
    assert name_logistic(sp.exp(u) / (1 + sp.exp(u))) == s
    assert name_logistic(v / (1 + sp.exp(-u))) == v * s
    assert sp.expand(name_logistic(sp.exp(-u) / (1 + sp.exp(-u)) ** 2) - s * (1 - s)) == 0
    assert name_logistic(sp.exp(u) + v) == sp.exp(u) + v  # no quotient: e^u stays
    assert name_logistic(sp.exp(u) * v + 1 / (1 + sp.exp(-u))) == sp.exp(u) * v + s
    x = 0.3
    assert float(s.diff(u).subs(u, x)) == pytest.approx(_sigmoid(x) * (1 - _sigmoid(x)))


ATTENTION = """\
spec = Spec("attention1", "O = softmax(Q Kᵀ/√d) V")
T, Sd, Dk, Dv = spec.dims("T Sd Dk Dv")
t, s, s2, k, j = spec.indices(t=T, s=Sd, s2=Sd, k=Dk, j=Dv)
Q = spec.input("Q", T, Dk)
K = spec.input("K", Sd, Dk)
V = spec.input("V", Sd, Dv)
S = spec.let("S", [t, s], Sum(Q[t, k] * K[s, k], k) / sqrt(Dk))
e = spec.let("e", [t, s], exp(S[t, s]))
Z = spec.let("Z", [t], Sum(e[t, s2], s2))
A = spec.let("A", [t, s], e[t, s] / Z[t])
spec.output("O", [t, j], Sum(A[t, s] * V[s, j], s))
"""


def test_attention_prints_through_the_scores_adjoint(tmp_path):
    """dS = A ⊙ (G Vᵀ − rowsum(G ⊙ O)), dQ = dS K/√d, dK = dSᵀ Q/√d, dV = Aᵀ G."""
    path = tmp_path / "attention1.py"
    path.write_text("from gradtool.lang import *\n" + ATTENTION)
    report = derive_report(str(path))
    shown = {g["wrt"]: (g["expression"], g["matrix"])
             for g in report["intermediates"] + report["gradients"]}
    assert shown == {
        "S": ("(Σ_j(G[t,j]·V[s,j]) - Σ_j(G[t,j]·O[t,j]))·A[t,s]",
              "(G Vᵀ − (Σ_j(G ⊙ O))) ⊙ A"),
        "Q": ("Σ_s(K[s,k]·dS[t,s])/sqrt(Dk)", "(dS K)/√Dk"),
        "K": ("Σ_t(Q[t,k]·dS[t,s])/sqrt(Dk)", "(dSᵀ Q)/√Dk"),
        "V": ("Σ_t(A[t,s]·G[t,j])", "Aᵀ G"),
    }
    att = derive(load_spec(path))
    assert set(att.via) == {"Q", "K"}
    for seed in range(2):
        assert_matches_autograd(att, seed=seed)
        assert_printed_through_names_match_autograd(att, seed)


def assert_printed_through_names_match_autograd(d, seed):
    """Each named adjoint (dS) and each gradient printed through it, evaluated as printed,
    against torch.autograd in float64."""
    from gradtool.check.numeric import autograd_gradients, random_upstream
    from gradtool.check.sampling import sample_dims, sample_inputs
    from gradtool.symbolic.evaluate import evaluate, run_forward

    rng = np.random.default_rng(seed)
    dims = sample_dims(d.spec, rng, low=1, high=5)
    inputs = sample_inputs(d.spec, dims, rng)
    upstream = random_upstream(d, dims, rng)
    oracle = autograd_gradients(d, inputs, dims, upstream)
    env = run_forward(d.program, inputs, dims)
    env.update(upstream)
    for name, adjoint in d.named.items():
        env[f"d{name}"] = np.asarray(evaluate(d.program, present(adjoint), d.canon[name],
                                              env, dims))
    assert d.via
    for name, form in d.via.items():
        printed = np.asarray(evaluate(d.program, present(form), d.canon[name], env, dims))
        assert max_rel_err(printed, oracle[name]) < 1e-10, name


def test_softplus_derivative_is_sigmoid(tmp_path):
    sp_ = _user_spec(tmp_path, "softplus", """\
spec = Spec("softplus", "log(1 + e^X)")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], log(1 + exp(X[n, d])))
""")
    assert text(present(sp_.closed["X"])) == "σ(X[n,d])·G[n,d]"
    grad, env, _ = evaluate_closed(sp_, "X")
    assert max_rel_err(grad, env["G"] * _sigmoid(env["X"])) < 1e-12
    assert_matches_autograd(sp_, seed=0)


@pytest.mark.parametrize("name", ["layernorm", "batchnorm", "softmax", "linear"])
def test_unshared_adjoints_stay_inlined(name):
    """Only an intermediate read by two inputs, with a reduction in its adjoint, is named."""
    assert derive_report(name)["intermediates"] == []


def test_elementwise_swiglu_gate(tmp_path):
    """The gate alone, Y = a·σ(a)·b: da = G·b·σ(a)·(1 + a·(1 − σ(a))), db = G·a·σ(a)."""
    gate = _user_spec(tmp_path, "gate", """\
spec = Spec("gate", "a·σ(a)·b")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
a = spec.input("a", N, D)
b = spec.input("b", N, D)
spec.output("Y", [n, d], a[n, d] * sigmoid(a[n, d]) * b[n, d])
""")
    assert text(present(gate.closed["a"])) == \
        "((1 - σ(a[n,d]))·a[n,d] + 1)·σ(a[n,d])·G[n,d]·b[n,d]"
    assert text(present(gate.closed["b"])) == "σ(a[n,d])·G[n,d]·a[n,d]"
    assert_matches_autograd(gate, seed=0)


def test_a_shared_scalar_adjoint_is_named(tmp_path):
    """s = Σ X·W read by X and W: ds = (1 − tanh²(s))·Σ G·X, dW = ds·X."""
    d = _user_spec(tmp_path, "scalar_shared", """\
spec = Spec("scalar_shared", "tanh(Σ X·W)·X")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
W = spec.param("W", N, D)
s = spec.let("s", [], Sum(X[n, d] * W[n, d], n, d))
spec.output("Y", [n, d], tanh(s) * X[n, d])
""")
    assert text(present(d.named["s"])) == "(1 - tanh(s)^2)·Σ_n,d(G[n,d]·X[n,d])"
    assert text(present(d.via["W"])) == "ds·X[n,d]"
    for seed in range(2):
        assert_printed_through_names_match_autograd(d, seed)
