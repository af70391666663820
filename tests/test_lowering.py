"""Lowering rules at the edges of their domain, each against an independent float64 oracle:
ties at a maximum, Max/Min against a hyper-parameter, log-sum-exp at large logits, and a
mask in front of a term that is 0/0 on the branch it does not select (docs/spec-language.md)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.check.numeric import derived_gradients
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive

HEAD = "from gradtool.lang import *\n\n"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def spec_from(tmp_path, source: str, name: str = "layer"):
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + source)
    return load_spec(path)


def three_ways(spec, inputs: dict, dims: dict, upstream: dict) -> dict:
    """{derived, numpy, torch}: each a dict (outputs, gradients) on the same data: the
    closed form evaluated by the engine and both generated kernels, all in float64."""
    d = derive(spec)
    dims = spec.sizes_from({spec.dim_symbols[k]: v for k, v in dims.items()})
    with np.errstate(all="ignore"):
        out = {"derived": ({}, derived_gradients(d, inputs, dims, upstream))}
    by_output = {o: upstream[str(s.base.label) if hasattr(s, "base") else str(s)]
                 for o, s in d.seeds.items()}
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        with np.errstate(all="ignore"):
            outs, saved, _ = k.forward(inputs, dims)
            grads = k.backward(by_output, saved, dims)
        out[target] = ({n: to_numpy(v) for n, v in outs.items()},
                       {n: to_numpy(v) for n, v in grads.items()})
    return out


def assert_all_close(results: dict, name: str, expected, what="grad", rtol=1e-10):
    for way, (outs, grads) in results.items():
        if what == "out" and way == "derived":
            continue
        got = (outs if what == "out" else grads)[name]
        assert np.all(np.isfinite(got)), f"{way}: {what} {name} is not finite: {got}"
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=1e-12,
                                   err_msg=f"{way}: {what} {name}")


# -- ties at a maximum: one element per window gets the gradient ---------------------------

def test_maxpool_tie_goes_to_the_first_maximum_like_max_pool2d():
    spec = load_spec("maxpool2d")
    x = np.array([[[[1.0, 2.0], [2.0, 2.0]]]])
    g = np.ones((1, 1, 1, 1))
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool2d(xt, 2, stride=1).backward(torch.tensor(g))
    oracle = xt.grad.numpy()
    assert oracle.ravel().tolist() == [0, 1, 0, 0]  # the right value
    results = three_ways(spec, {"X": x}, {"N": 1, "C": 1, "H": 2, "W": 2, "K": 2, "S": 1, "P": 0},
                         {"G": g})
    assert_all_close(results, "X", oracle)


def test_overlapping_windows_with_ties_match_max_pool2d():
    spec = load_spec("maxpool2d")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(2, 2, 5, 5)).astype(np.float64)  # many ties
    g = rng.standard_normal((2, 2, 2, 2))
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool2d(xt, 3, stride=2).backward(torch.tensor(g))
    results = three_ways(spec, {"X": x}, {"N": 2, "C": 2, "H": 5, "W": 5, "K": 3, "S": 2, "P": 0},
                         {"G": g})
    assert_all_close(results, "X", xt.grad.numpy())


def test_row_max_with_ties_routes_to_the_first_like_torch_max(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("rowmax", "largest entry of each row")
N, D = spec.dims("N D")
n, k = spec.indices(n=N, k=D)
X = spec.input("X", N, D)
spec.output("Y", [n], Max(X[n, k], k))
""")
    x = np.array([[3.0, 1.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 0.5, 2.0]])
    g = np.array([0.5, -2.0, 1.5])
    xt = torch.tensor(x, requires_grad=True)
    torch.max(xt, dim=1).values.backward(torch.tensor(g))
    oracle = xt.grad.numpy()
    np.testing.assert_array_equal(oracle.sum(1), g)  # each row's gradient sums to G
    results = three_ways(spec, {"X": x}, {"N": 3, "D": 4}, {"G": g})
    assert_all_close(results, "X", oracle)


def test_elementwise_max_and_min_tie_give_one_side_the_whole_gradient(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("max2", "element-wise maximum and minimum of two inputs")
N = spec.dims("N")
n = spec.indices(n=N)
A = spec.input("A", N)
B = spec.input("B", N)
spec.output("Y", [n], Max(A[n], B[n]))
spec.output("Z", [n], Min(A[n], B[n]))
""")
    a = np.array([1.0, 2.0, -1.0, 0.5, 3.0])
    b = np.array([1.0, 1.0, 0.0, 0.5, 3.0])  # ties at 0, 3, 4
    gy, gz = np.array([1.0, -2.0, 3.0, 0.5, 2.0]), np.array([0.25, 1.0, -1.0, 4.0, -3.0])
    results = three_ways(spec, {"A": a, "B": b}, {"N": 5}, {"G_Y": gy, "G_Z": gz})
    # oracle away from ties: torch.maximum / torch.minimum through autograd
    at, bt = (torch.tensor(v, requires_grad=True) for v in (a, b))
    (torch.maximum(at, bt) * torch.tensor(gy) + torch.minimum(at, bt) * torch.tensor(gz)
     ).sum().backward()
    tie = a == b
    for way, (_, grads) in results.items():
        np.testing.assert_allclose(grads["A"][~tie], at.grad.numpy()[~tie], err_msg=way)
        np.testing.assert_allclose(grads["B"][~tie], bt.grad.numpy()[~tie], err_msg=way)
        # at a tie the whole gradient goes to one side (a valid subgradient: the two sum to G)
        np.testing.assert_allclose(grads["A"] + grads["B"], gy + gz, err_msg=way)
        np.testing.assert_allclose(grads["A"], results["derived"][1]["A"], err_msg=way)
        assert set(np.round(grads["A"][tie] / (gy + gz)[tie], 12)) <= {0.0, 1.0}


def test_max_and_min_against_a_hyper_parameter_run_on_both_targets(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("clip", "clip each entry to [floor, ceil]")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
floor = spec.hyper("floor", 0.1)
ceil = spec.hyper("ceil", 0.7)
spec.output("Y", [n, d], Min(Max(X[n, d], floor), ceil) * X[n, d])
""")
    rng = np.random.default_rng(1)
    x, g = rng.uniform(-1, 1.5, (3, 4)), rng.standard_normal((3, 4))
    xt = torch.tensor(x, requires_grad=True)
    y = torch.minimum(torch.maximum(xt, torch.tensor(0.1, dtype=torch.float64)),
                      torch.tensor(0.7, dtype=torch.float64)) * xt
    y.backward(torch.tensor(g))
    results = three_ways(spec, {"X": x}, {"N": 3, "D": 4}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())


# -- a switch in front of a term that is 0/0 where the switch is off ---------------------------

def test_l2_normalisation_at_a_zero_row_has_gradient_g_over_eps(tmp_path):
    spec = spec_from(tmp_path, """\
spec = Spec("l2norm", "L2 normalisation of each row, as F.normalize")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
eps = spec.hyper("eps", 1e-3)
spec.output("Y", [n, d], X[n, d] / Max(sqrt(Sum(X[n, k] ** 2, k)), eps))
""")
    x = np.array([[0.0, 0.0, 0.0], [0.3, -1.2, 2.0], [1e-4, 0.0, -2e-4]])
    g = np.array([[1.0, -2.0, 0.5], [0.7, 0.1, -0.3], [2.0, 1.0, 1.0]])
    xt = torch.tensor(x, requires_grad=True)
    y = F.normalize(xt, dim=1, eps=1e-3)
    y.backward(torch.tensor(g))
    oracle = xt.grad.numpy()
    np.testing.assert_allclose(oracle[0], g[0] / 1e-3)  # the right value: G/eps
    results = three_ways(spec, {"X": x}, {"N": 3, "D": 3}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", oracle)


# -- log-sum-exp: shifted by the maximum in both kernels -----------------------------------------

def kernels_only(spec, inputs: dict, dims: dict, upstream: dict) -> dict:
    return {k: v for k, v in three_ways(spec, inputs, dims, upstream).items() if k != "derived"}


LOGITS = [np.array([[-800.0, -790.0, -805.0]]), np.array([[800.0, 790.0, 805.0]]),
          np.array([[-800.0, -790.0, -805.0], [800.0, 790.0, 805.0], [0.1, -0.2, 0.3]])]


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
def test_log_softmax_at_large_logits_matches_torch(x):
    g = np.arange(1.0, 1.0 + x.size).reshape(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    y = torch.log_softmax(xt, dim=1)
    y.backward(torch.tensor(g))
    if x.shape[0] == 1 and x[0, 0] < 0:  # the right value
        np.testing.assert_allclose(y.detach().numpy(),
                                   [[-10.0000457, -0.0000457, -15.0000457]], atol=1e-7)
    results = kernels_only(load_spec("log_softmax"), {"X": x}, {"N": x.shape[0], "C": 3},
                           {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())


INLINE = """\
spec = Spec("lse_inline", "log-sum-exp and softmax written inline, with a weight")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
w = spec.input("w", C, domain="positive")
spec.output("Y", [n], log(Sum(w[k] * exp(X[n, k]), k)))
spec.output("P", [n, c], exp(X[n, c]) / Sum(exp(X[n, k]), k))
"""


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
def test_inline_log_sum_exp_and_softmax_are_shifted(tmp_path, x):
    spec = spec_from(tmp_path, INLINE)
    w = np.array([0.5, 2.0, 1.5])
    gy = np.linspace(-1, 1, x.shape[0])
    gp = np.arange(x.size, dtype=np.float64).reshape(x.shape) / 7
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = torch.logsumexp(xt + torch.log(wt), dim=1)
    p = torch.softmax(xt, dim=1)
    (y * torch.tensor(gy)).sum().add((p * torch.tensor(gp)).sum()).backward()
    results = kernels_only(spec, {"X": x, "w": w}, {"N": x.shape[0], "C": 3},
                           {"G_Y": gy, "G_P": gp})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "P", p.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    assert_all_close(results, "w", wt.grad.numpy(), rtol=1e-9)


NAMED = """\
spec = Spec("attend", "a softmax-weighted average and log-sum-exp over a named exponential")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
V = spec.param("V", C)
e = spec.let("e", [n, c], exp(X[n, c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
spec.output("Y", [n], Sum(e[n, c] * V[c], c) / Z[n] + log(Z[n]))
"""


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
def test_named_exponential_read_by_the_backward_is_shifted(tmp_path, x):
    spec = spec_from(tmp_path, NAMED)
    v = np.array([0.5, -2.0, 1.5])
    up = np.linspace(-1, 2, x.shape[0])
    xt, vt = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    y = torch.softmax(xt, 1) @ vt + torch.logsumexp(xt, 1)
    y.backward(torch.tensor(up))
    results = kernels_only(spec, {"X": x, "V": v}, {"N": x.shape[0], "C": 3}, {"G": up})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    assert_all_close(results, "V", vt.grad.numpy(), rtol=1e-9)


# -- softmax: a normalised exponential lowers to torch.softmax / torch.log_softmax -----------

def torch_forward(spec) -> str:
    """The forward kernel of the generated torch module (where the lowering shows)."""
    from gradtool.codegen.emit import generate

    source = generate(spec, "torch")
    return source[source.index("def forward("):source.index("def backward(")]


TEMPERED = """\
spec = Spec("tempered", "a temperature softmax over the rows, a weighted mean and a log-loss")
N, C = spec.dims("N C")
n, c, m = spec.indices(n=N, c=C, m=N)
X = spec.input("X", N, C)
T = spec.input("T", N, C, grad=False, domain="positive")
V = spec.param("V", N)
tau = spec.hyper("tau", 0.5)
e = spec.let("e", [n, c], exp(X[n, c] / tau))
Z = spec.let("Z", [c], Sum(e[m, c], m))
P = spec.let("P", [n, c], e[n, c] / Z[c])
spec.output("Y", [c], Sum(V[n] * P[n, c], n))
spec.output("L", [], -Sum(T[n, c] * log(P[n, c]), n, c))
"""


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
def test_temperature_softmax_over_the_rows_lowers_to_log_softmax(tmp_path, x):
    """e = exp(X/τ), Z = Σ_m e over the rows (axis 0), P = e/Z read as P and as log P: the
    torch forward is log_softmax along 0 and exp of it (no max, no sum of exponentials),
    and both kernels match torch.autograd through torch's own softmax at ±800."""
    spec = spec_from(tmp_path, TEMPERED)
    code = torch_forward(spec)
    assert "torch.log_softmax((1 / tau) * X, 0)" in code and "torch.exp(log_P)" in code
    assert "amax" not in code and ".sum(0)" not in code.split("log_P", 1)[0]
    t = np.abs(np.cos(np.arange(x.size, dtype=np.float64))).reshape(x.shape) + 0.1
    v = np.linspace(-1.0, 2.0, x.shape[0])
    gy = np.array([0.3, -1.1, 0.8])
    xt, vt = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    logp = torch.log_softmax(xt / 0.5, dim=0)
    y, loss = vt @ torch.exp(logp), -(torch.tensor(t) * logp).sum()
    ((y * torch.tensor(gy)).sum() + 1.7 * loss).backward()
    results = kernels_only(spec, {"X": x, "T": t, "V": v}, {"N": x.shape[0], "C": 3},
                           {"G_Y": gy, "G_L": np.array(1.7)})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "L", loss.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    assert_all_close(results, "V", vt.grad.numpy(), rtol=1e-9)


WEIGHTED = """\
spec = Spec("weighted", "a softmax-weighted average of V")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
V = spec.param("V", C)
e = spec.let("e", [n, c], exp(2 * X[n, c] - 3))
Z = spec.let("Z", [n], Sum(e[n, k], k))
P = spec.let("P", [n, c], e[n, c] / Z[n])
spec.output("Y", [n], Sum(P[n, c] * V[c], c){extra})
"""


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
@pytest.mark.parametrize("lse", [False, True], ids=["ratio_only", "Z_read_by_log"])
def test_softmax_lowering_needs_the_normaliser_read_only_through_the_ratio(tmp_path, x, lse):
    """P = e/Z read as P only: ``P = torch.softmax(2·X − 3, 1)``. With + log Z, Z is read
    otherwise, so the kernel keeps the max-shifted e and Z (no softmax). Either way both
    kernels match torch.autograd at ±800."""
    spec = spec_from(tmp_path, WEIGHTED.format(extra=" + log(Z[n])" if lse else ""))
    code = torch_forward(spec)
    assert ("P = torch.softmax((2 * X).sub_(3), 1)" in code) is not lse
    assert ("amax" in code) is lse and "log_softmax" not in code
    v = np.array([0.5, -2.0, 1.5])
    up = np.linspace(-1, 2, x.shape[0])
    xt, vt = torch.tensor(x, requires_grad=True), torch.tensor(v, requires_grad=True)
    f = 2 * xt - 3
    y = torch.softmax(f, 1) @ vt + (torch.logsumexp(f, 1) if lse else 0)
    y.backward(torch.tensor(up))
    results = kernels_only(spec, {"X": x, "V": v}, {"N": x.shape[0], "C": 3}, {"G": up})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    assert_all_close(results, "V", vt.grad.numpy(), rtol=1e-9)


SCALED_LOG = """\
spec = Spec("scaled_log_softmax", "log of a softmax of X·B with B learned")
N, C = spec.dims("N C")
n, c, k = spec.indices(n=N, c=C, k=C)
X = spec.input("X", N, C)
B = spec.param("B", C)
e = spec.let("e", [n, c], exp(X[n, c] * B[c]))
Z = spec.let("Z", [n], Sum(e[n, k], k))
P = spec.let("P", [n, c], e[n, c] / Z[n])
spec.output("Y", [n, c], log(P[n, c]))
"""


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
def test_log_of_a_ratio_whose_exponential_the_backward_reads_is_finite(tmp_path, x):
    """Found by the fuzzer's named-P branch: dB reads e and Z, so P = e/Z is no softmax and
    e, Z are the log-sum-exp's shifted pair; log P was log of a P that underflows to 0
    (−inf at ±800). It is read as log e − log Z = (f − M) − log Z' in both kernels. (The
    derived backward still divides by P, de = (G/P − Σ G)/Z, so the gradients are checked
    at moderate logits only: docs/spec-language.md, Known rough edges.)"""
    spec = spec_from(tmp_path, SCALED_LOG)
    b = np.array([0.5, 2.0, 1.5])
    y = torch.log_softmax(torch.tensor(x) * torch.tensor(b), 1)
    results = kernels_only(spec, {"X": x, "B": b}, {"N": x.shape[0], "C": 3},
                           {"G": np.ones(x.shape)})
    assert_all_close(results, "Y", y.numpy(), what="out")
    x = x / 200  # logits within ±8: no probability underflows
    g = np.linspace(-1, 1, x.size).reshape(x.shape)
    xt, bt = torch.tensor(x, requires_grad=True), torch.tensor(b, requires_grad=True)
    torch.log_softmax(xt * bt, 1).backward(torch.tensor(g))
    results = kernels_only(spec, {"X": x, "B": b}, {"N": x.shape[0], "C": 3}, {"G": g})
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    assert_all_close(results, "B", bt.grad.numpy(), rtol=1e-9)


def _softmax_oracles(x, y, t):
    """(spec name, inputs, torch forward of X): the built-in specs whose torch kernel
    is a softmax, with their references."""
    return [("softmax", {"X": x}, lambda X: F.softmax(X, dim=-1)),
            ("softmax_cross_entropy", {"X": x, "T": t}, lambda X: F.cross_entropy(
                X, torch.tensor(t, dtype=X.dtype))),
            ("softmax_cross_entropy_labels", {"X": x, "y": y},
             lambda X: F.cross_entropy(X, torch.tensor(y)))]


@pytest.mark.parametrize("x", LOGITS, ids=["minus800", "plus800", "mixed"])
@pytest.mark.parametrize("which", [0, 1, 2], ids=["softmax", "soft_targets", "labels"])
def test_builtin_softmax_kernels_at_large_logits(x, which):
    """The built-in softmax and cross-entropies (torch: torch.softmax, log_softmax,
    nll_loss) against torch.nn.functional and its autograd at ±800: float64 through both
    kernels, float32 through the generated torch.autograd.Function."""
    from gradtool.codegen.cache import compile_spec
    from gradtool.codegen.emit import class_name

    y = np.arange(x.shape[0]) % 3
    t = np.full(x.shape, 0.25) + 0.25 * (np.arange(x.size).reshape(x.shape) % 3 == 1)
    name, inputs, reference = _softmax_oracles(x, y, t)[which]
    spec = load_spec(name)
    xt = torch.tensor(x, requires_grad=True)
    out = reference(xt)
    up = np.linspace(0.5, 1.5, out.numel()).reshape(tuple(out.shape))
    out.backward(torch.tensor(up))
    seed = "1" if out.dim() == 0 else "G"  # a loss is seeded with 1, scaled by its G
    results = kernels_only(spec, inputs, {"N": x.shape[0], "C": 3}, {seed: up})
    assert_all_close(results, next(iter(results["torch"][0])), out.detach().numpy(),
                     what="out", rtol=1e-9)
    assert_all_close(results, "X", xt.grad.numpy(), rtol=1e-9)
    fn = getattr(compile_spec(name, "torch"), class_name(spec) + "Function")
    x32 = torch.tensor(x, dtype=torch.float32, requires_grad=True)
    args = [x32] + [torch.tensor(inputs[k], dtype=torch.float32) if k == "T" else
                    torch.tensor(inputs[k]) for k in list(inputs)[1:]]
    got = fn.apply(*args)
    got.backward(torch.tensor(up, dtype=torch.float32))
    x64 = x32.detach().double().requires_grad_()
    want = reference(x64)
    want.backward(torch.tensor(up))
    assert got.dtype == torch.float32 and torch.isfinite(x32.grad).all()
    np.testing.assert_allclose(got.detach().double().numpy(), want.detach().numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(x32.grad.double().numpy(), x64.grad.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_a_switch_inside_a_sum_in_front_of_a_zero_over_zero_term(tmp_path):
    """dW sums [‖x_n‖ > ε]·x_n·(…)/‖x_n‖ over the rows n: a zero row must add nothing."""
    spec = spec_from(tmp_path, """\
spec = Spec("scaled_l2", "L2 normalisation of each row, then a learned scale per column")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
W = spec.param("W", D)
eps = spec.hyper("eps", 1e-3)
spec.output("Y", [n, d], W[d] * X[n, d] / Max(sqrt(Sum((W[k] * X[n, k]) ** 2, k)), eps))
""")
    x = np.array([[0.0, 0.0, 0.0], [0.3, -1.2, 2.0], [1e-4, 0.0, -2e-4]])
    w = np.array([0.5, 2.0, -1.0])
    g = np.array([[1.0, -2.0, 0.5], [0.7, 0.1, -0.3], [2.0, 1.0, 1.0]])
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = F.normalize(xt * wt, dim=1, eps=1e-3)
    y.backward(torch.tensor(g))
    results = three_ways(spec, {"X": x, "W": w}, {"N": 3, "D": 3}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())
    assert_all_close(results, "W", wt.grad.numpy())


def test_a_scalar_sum_of_exponentials_saves_its_maximum(tmp_path):
    """t0 = Σ_j exp(A/4)/E has no axes: its maximum M is a 0-d value the backward reads
    (exp(−M)/t0), so forward returns it with the saved tensors (found by the fuzzer)."""
    spec = spec_from(tmp_path, """\
spec = Spec("scalar_lse", "a scalar normaliser read by the backward")
D, E = spec.dims("D E")
d, e, j = spec.indices(d=D, e=E, j=E)
A = spec.input("A", E, domain="positive")
W = spec.param("W", D)
t0 = spec.let("t0", [], Sum(exp(A[j] / 4), j) / E)
spec.output("Y", [d, e], A[e] * sqrt(1 + W[d] ** 2) / t0)
""")
    rng = np.random.default_rng(0)
    a, w, g = rng.uniform(0.5, 2, 3), rng.standard_normal(2), rng.standard_normal((2, 3))
    at, wt = (torch.tensor(v, requires_grad=True) for v in (a, w))
    y = at[None, :] * torch.sqrt(1 + wt[:, None] ** 2) / (torch.exp(at / 4).sum() / 3)
    y.backward(torch.tensor(g))
    results = three_ways(spec, {"A": a, "W": w}, {"D": 2, "E": 3}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "A", at.grad.numpy())
    assert_all_close(results, "W", wt.grad.numpy())


# -- a let broadcast along an axis its body lacks, read by a sum over it (h30 item 10) -------

# a let broadcast over d that its body does not read (h30 item 10; also a fuzz finding)
BROADCAST_EXPONENTIAL_LET = """\
spec = Spec("bcast_let", "a let broadcast over d, then summed with weights")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
c = spec.input("c", N)
p = spec.hyper("p", 1.5)
B = spec.let("B", [n, d], exp(p * c[n]))
spec.output("Y", [n], Sum(B[n, d] * X[n, d], d) * Sum(X[n, k], k) ** 2)
"""


def test_broadcast_exponential_let_summed_with_weights(tmp_path):
    """B[n, d] = exp(p·c[n]) read by Σ_d B·X: the kernels shift B by its maximum over d,
    which B does not vary over. torch's ``amax(())`` took that maximum over every axis, a
    0-d tensor then updated in place with c (shape [N]): the torch kernel crashed."""
    spec = spec_from(tmp_path, BROADCAST_EXPONENTIAL_LET)
    rng = np.random.default_rng(3)
    x, c, g = rng.standard_normal((3, 4)), rng.standard_normal(3), rng.standard_normal(3)
    xt, ct = (torch.tensor(v, requires_grad=True) for v in (x, c))
    y = (torch.exp(1.5 * ct)[:, None] * xt).sum(1) * xt.sum(1) ** 2
    y.backward(torch.tensor(g))
    results = three_ways(spec, {"X": x, "c": c}, {"N": 3, "D": 4}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())
    assert_all_close(results, "c", ct.grad.numpy())


def test_normalised_broadcast_exponential_stays_finite_at_large_values(tmp_path):
    """E[n, d] = exp(c[n]) normalised over d is 1/D whatever c is: the ratio's shift by
    max_d c[n] = c[n] keeps c = 800 finite, per row (not one maximum over every row)."""
    spec = spec_from(tmp_path, """\
spec = Spec("flat_softmax", "a softmax of a let broadcast along its own axis")
N, D = spec.dims("N D")
n, d, k = spec.indices(n=N, d=D, k=D)
X = spec.input("X", N, D)
c = spec.input("c", N)
E = spec.let("E", [n, d], exp(c[n]))
Z = spec.let("Z", [n], Sum(E[n, k], k))
spec.output("Y", [n, d], X[n, d] * E[n, d] / Z[n])
""")
    rng = np.random.default_rng(4)
    x, g = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    c = np.array([800.0, -800.0, 0.5])
    # the engine's evaluator runs the unshifted closed form: the kernels alone at ±800
    results = kernels_only(spec, {"X": x, "c": c}, {"N": 3, "D": 4}, {"G": g})
    assert_all_close(results, "Y", x / 4, what="out")
    assert_all_close(results, "X", g / 4)
    assert_all_close(results, "c", np.zeros(3))


# -- an index used as a value inside Max/Min (h30 item 11) -----------------------------------

def test_index_as_a_value_in_max_and_min_runs_on_both_targets(tmp_path):
    """Max(X, 0, d) and Min(d, X): the index d is the array 0 .. D − 1 (the torch kernel once
    wrote Python's ``max(0, torch.arange(D))``), and d·X adds it as a float array. (Min(X, d),
    like Max(X, d), is the reduction over d.)"""
    spec = spec_from(tmp_path, """\
spec = Spec("index_value", "entries floored at 0 and at their column index")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], Max(X[n, d], 0, d) + Min(d, X[n, d]) * X[n, d] + (d + n) * X[n, d])
""")
    rng = np.random.default_rng(5)
    x, g = rng.uniform(-1.0, 4.0, (3, 5)), rng.standard_normal((3, 5))
    xt = torch.tensor(x, requires_grad=True)
    col = torch.arange(5, dtype=torch.float64)
    row = torch.arange(3, dtype=torch.float64)[:, None]
    y = torch.maximum(torch.clamp(xt, min=0), col) + torch.minimum(xt, col) * xt \
        + (col + row) * xt
    y.backward(torch.tensor(g))
    results = three_ways(spec, {"X": x}, {"N": 3, "D": 5}, {"G": g})
    assert_all_close(results, "Y", y.detach().numpy(), what="out")
    assert_all_close(results, "X", xt.grad.numpy())


def test_index_value_keeps_the_kernel_dtype_in_torch(tmp_path):
    """0.5·d with float32 inputs: the index's values take the inputs' dtype (an int64
    ``arange`` times 0.5 is torch's default float32 whatever the inputs are)."""
    from gradtool.codegen.cache import compile_spec

    spec = spec_from(tmp_path, """\
spec = Spec("half_index", "an index scaled by a half")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], Max(X[n, d], d / 2) + d * X[n, d])
""")
    mod = compile_spec(spec, "torch")
    for dtype in (torch.float64, torch.float32):
        x = torch.linspace(-1, 3, 12, dtype=dtype).reshape(3, 4)
        y, _ = mod.forward(x)
        col = torch.arange(4, dtype=dtype)
        assert y.dtype == dtype
        torch.testing.assert_close(y, torch.maximum(x, col / 2) + col * x)


def test_kinks_of_a_three_argument_max_with_an_index(tmp_path):
    """Max(X, 0, d) switches where X crosses 0 or d, not where 0 and d meet (at d = 0,
    always: no gradient switches there); checks sample X away from both crossings."""
    from gradtool.check.kinks import kink_distance, switches
    from gradtool.symbolic.evaluate import run_forward

    spec = spec_from(tmp_path, """\
spec = Spec("index_floor", "entries floored at 0 and at their column index")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
spec.output("Y", [n, d], Max(X[n, d], 0, d))
""")
    program = derive(spec).program
    found = switches(program)
    assert len(found) == 2 and {k for k, *_ in found} == {"max"}
    dims = {spec.dim_symbols["N"]: 2, spec.dim_symbols["D"]: 3}
    near = np.array([[0.0005, 1.3, 2.0004], [-0.7, 1.5, 2.6]])  # X ≈ 0 at [0, 0], ≈ d at [0, 2]
    env = run_forward(program, {"X": near}, dims)
    assert kink_distance(program, env, dims) == pytest.approx(0.0004)
    away = np.array([[0.5, 1.3, 2.4], [-0.7, 1.5, 2.6]])
    env = run_forward(program, {"X": away}, dims)
    assert kink_distance(program, env, dims) == pytest.approx(0.3)  # 1.3 against d = 1
