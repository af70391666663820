"""Declared names against the names gradtool makes: the upstream gradient, lifted sums,
kernel variables and helpers, and names that are one identifier after NFKC normalisation.
Each spec either derives and computes the right gradient (vs torch.autograd, float64) or is
refused at its declaring line with the name to change."""

import numpy as np
import pytest
import torch

from gradtool.check.runner import CheckOptions, check_spec
from gradtool.codegen.emit import generate
from gradtool.errors import SpecError
from gradtool.report import _gradients
from gradtool.symbolic.reverse import derive
from tests.helpers import assert_matches_autograd
from tests.test_lowering import assert_all_close, spec_from, three_ways


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def test_a_size_called_G_keeps_its_name_and_the_upstream_gradient_takes_another(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("squares", "element-wise square over a size called G")
N, G = spec.dims("N G")
n, g = spec.indices(n=N, g=G)
X = spec.input("X", N, G)
spec.output("Y", [n, g], X[n, g] ** 2)
""")
    d = derive(spec)
    seed = d.seeds["Y"].base.label.name
    assert seed != "G"
    assert f"2·{seed}[n,g]·X[n,g]" in _gradients(d)[0]["text"]
    source = generate(spec, "torch")
    # the backward reads no size here (h7 reads sizes only where a line needs them)
    assert f"def backward({seed}, X, *, need=(True,))" in source
    x, up = np.random.default_rng(0).standard_normal((2, 2, 3))
    xt = torch.tensor(x, requires_grad=True)
    (xt ** 2).backward(torch.tensor(up))
    results = three_ways(spec, {"X": x}, {"N": 2, "G": 3}, {seed: up})
    assert_all_close(results, "X", xt.grad.numpy())


def test_a_tensor_called_G_is_not_the_upstream_gradient(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("gated", "a product with a gate tensor called G")
N = spec.dims("N")
n = spec.indices(n=N)
X = spec.input("X", N)
G = spec.input("G", N, grad=False)
spec.output("Y", [n], X[n] * G[n] ** 2)
""")
    d = derive(spec)
    seed = d.seeds["Y"].base.label.name
    assert seed not in ("G",)
    x, gate, up = np.random.default_rng(1).standard_normal((3, 4))
    xt = torch.tensor(x, requires_grad=True)
    (xt * torch.tensor(gate) ** 2).backward(torch.tensor(up))
    results = three_ways(spec, {"X": x, "G": gate}, {"N": 4}, {seed: up})
    assert_all_close(results, "X", xt.grad.numpy())  # G²·G_Y, not G·G


def test_a_let_called_like_a_lifted_sum_keeps_its_value(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("lifted_clash", "a let named s_Y beside Y's own lifted sums")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
s_Y = spec.let("s_Y", [n, d], 3 * X[n, d])
spec.output("Y", [n], Sum(s_Y[n, d], d) * Sum(X[n, d] ** 2, d))
""")
    d = derive(spec)
    lifted = [t.name for t in spec.tensors.values() if t.kind == "lifted"]
    assert "s_Y" not in lifted and len(lifted) == 2
    for seed in (0, 1):
        assert_matches_autograd(d, seed)
    x, up = np.random.default_rng(2).standard_normal((2, 3, 4))
    up = up[:, 0]
    xt = torch.tensor(x, requires_grad=True)
    y = (3 * xt).sum(1) * (xt ** 2).sum(1)
    y.backward(torch.tensor(up))
    results = three_ways(spec, {"X": x}, {"N": 3, "D": 4}, {"G": up})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())


def test_kernel_variables_helpers_and_keywords_are_ordinary_names(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("clashes", "every declared name is one the kernels use for themselves")
S, NP = spec.dims("self np")
n, d, k = spec.indices(n=S, d=NP, k=NP)
X = spec.input("saved", S, NP)
W = spec.param("forward", NP)
T = spec.input("ctx", S, NP, grad=False)
lam = spec.hyper("lambda", 0.5)
floor = spec.hyper("max", 0.1)
t = spec.let("torch", [n, d], Max(X[n, d] * W[d], floor) + lam * T[n, d])
spec.output("dtype", [n], log(Sum(exp(t[n, k]), k)))
""")
    rng = np.random.default_rng(3)
    x, w, c, up = rng.standard_normal((3, 4)), rng.standard_normal(4), \
        rng.standard_normal((3, 4)), rng.standard_normal(3)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = torch.logsumexp(torch.clamp(xt * wt, min=0.1) + 0.5 * torch.tensor(c), dim=1)
    y.backward(torch.tensor(up))
    results = three_ways(spec, {"saved": x, "forward": w, "ctx": c}, {"self": 3, "np": 4},
                         {"G": up})
    assert_all_close(results, "dtype", y.detach().numpy(), what="out")
    assert_all_close(results, "saved", xt.grad.numpy())
    assert_all_close(results, "forward", wt.grad.numpy())
    rows = check_spec(spec, CheckOptions(cases=1, oracles=("autograd", "backends")))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]


@pytest.mark.parametrize("second, line, plain", [
    ('X2 = spec.input("ℕ", N)', 7, "N"),        # a tensor ℕ beside a size N
    ('X2 = spec.input("ﬁ", N)', 7, "fi"),       # the ligature ﬁ beside a tensor fi
    ('k = spec.indices(ｎ=N)', 7, "n"),          # a full-width index beside n
])
def test_names_that_are_one_identifier_after_nfkc_are_refused(tmp_path, second, line, plain):
    source = f"""\
spec = Spec("nfkc", "two names Python reads as one")
N = spec.dims("N")
n = spec.indices(n=N)
X = spec.input("fi", N)
{second}
spec.output("Y", [n], X[n])
"""
    with pytest.raises(SpecError) as err:
        spec_from(tmp_path, source)
    assert err.value.line == line and f"`{plain}`" in str(err.value)


@pytest.mark.parametrize("decl, name", [
    ('spec.input("dX", N)', "dX"),
    ('spec.indices(k_1=N)', "k_1"),
])
def test_names_that_read_as_gradtool_names_are_refused(tmp_path, decl, name):
    source = f"""\
spec = Spec("names", "a name gradtool prints for itself")
N = spec.dims("N")
n = spec.indices(n=N)
X = spec.input("X", N)
{decl}
spec.output("Y", [n], X[n])
"""
    with pytest.raises(SpecError) as err:
        spec_from(tmp_path, source)
    assert err.value.line == 7 and f"`{name}`" in str(err.value)


def test_a_shared_adjoint_is_named_beside_a_tensor_called_g_t(tmp_path):
    """t's adjoint is g_t_ when the spec declares g_t; the textbook form still writes the
    gradients through dt (not the inlined adjoint), and matches autograd."""
    spec = spec_from(tmp_path, """\
spec = Spec("shared", "a shared intermediate beside a tensor g_t")
N = spec.dims("N")
n = spec.indices(n=N)
X = spec.input("X", N)
W = spec.input("W", N)
t = spec.let("t", [n], X[n] * W[n])
gt = spec.let("g_t", [n], X[n] ** 2)
spec.output("Y", [n], tanh(t[n]) * gt[n] + t[n] ** 2)
""")
    d = derive(spec)
    assert d.adjoint_names["t"] == "g_t_" and "t" in d.named
    assert all("dt" in str(d.via[x]) for x in ("X", "W"))
    assert_matches_autograd(d, seed=1)
