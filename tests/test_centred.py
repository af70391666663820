"""Centred statistics (a tensor minus its own mean) written inline keep X − μ as one factor
in the derived backward, so float32 kernels keep their precision at inputs far from zero
(docs/spec-language.md, "Centred differences"). Each numeric claim is checked against
float64 torch.autograd of the reference op on the same float32-rounded inputs."""

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.report import derive_report
from gradtool.spec.loader import load_spec
from gradtool.symbolic.ir import normalize

HEAD = "from gradtool.lang import Spec, Sum, sqrt\n"

INSTNORM = HEAD + """\
spec = Spec("instnorm", "instance norm 1d")
N, C, L = spec.dims("N C L")
n, c, l, m = spec.indices(n=N, c=C, l=L, m=L)
X = spec.input("X", N, C, L)
eps = spec.hyper("eps", 1e-5)
mu = spec.let("mu", [n, c], Sum(X[n, c, m], m) / L)
var = spec.let("var", [n, c], Sum((X[n, c, m] - mu[n, c]) ** 2, m) / L)
spec.output("Y", [n, c, l], (X[n, c, l] - mu[n, c]) / sqrt(var[n, c] + eps))
"""

# layer norm in one statement: both means inline, so two sums are lifted and each centred
# difference reads its own
LAYERNORM_INLINE = HEAD + """\
spec = Spec("ln_inline", "layer norm in one line")
N, D = spec.dims("N D")
n, d, k, j = spec.indices(n=N, d=D, k=D, j=D)
X = spec.input("X", N, D)
eps = spec.hyper("eps", 1e-5)
spec.output("Y", [n, d], (X[n, d] - Sum(X[n, k], k) / D)
            / sqrt(Sum((X[n, k] - Sum(X[n, j], j) / D) ** 2, k) / D + eps))
"""


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def spec_from(tmp_path, source: str, name: str = "layer"):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return load_spec(path)


def float32_error(spec, target, x, up, reference) -> tuple[float, float]:
    """(the float32 kernel's largest error in dX, that of ``reference`` run in float32), both
    against ``reference`` in float64 autograd on the same float32 numbers."""
    k = Kernels(spec, target)
    dims = dict(zip([str(s) for s in spec.tensors["X"].dims], x.shape, strict=True))
    _, saved, _ = k.forward({"X": x}, dims, "float32")
    got = to_numpy(k.backward({"Y": up}, saved, dims, "float32")["X"])
    grads = {}
    for dtype in (torch.float64, torch.float32):
        leaf = torch.tensor(x, dtype=dtype, requires_grad=True)
        reference(leaf).backward(torch.tensor(up, dtype=dtype))
        grads[dtype] = leaf.grad.double().numpy()
    want = grads[torch.float64]
    return float(np.abs(got - want).max() / np.abs(want).max()), \
        float(np.abs(grads[torch.float32] - want).max() / np.abs(want).max())


@pytest.mark.parametrize("target", ["numpy", "torch"])
@pytest.mark.parametrize("spread, offset", [(1.0, 1000.0), (0.1, 100.0)])
def test_instnorm_in_float32_at_an_offset(tmp_path, target, spread, offset):
    """Before, dX was off by 2.4e-2 at randn + 1000 and by 0.40 on a gradient of 31 at
    0.1·randn + 100 (F.instance_norm: 1.8e-5). Subtracting μ ≈ 1000 in float32 costs
    ulp(1000)/σ ≈ 6e-5 of the result, which bounds any float32 implementation."""
    spec = spec_from(tmp_path, INSTNORM)
    rng = np.random.default_rng(0)
    x = (spread * rng.standard_normal((2, 3, 16)) + offset).astype(np.float32)
    up = rng.standard_normal((2, 3, 16)).astype(np.float32)
    ours, torchs = float32_error(spec, target, x, up, lambda t: F.instance_norm(t, eps=1e-5))
    assert ours < 2e-4, (ours, torchs)
    assert ours < 10 * torchs, (ours, torchs)


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_inline_means_in_float32_at_an_offset(tmp_path, target):
    spec = spec_from(tmp_path, LAYERNORM_INLINE)
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((3, 12)) + 1000.0).astype(np.float32)
    up = rng.standard_normal((3, 12)).astype(np.float32)
    ours, torchs = float32_error(spec, target, x, up,
                                 lambda t: F.layer_norm(t, t.shape[-1:], eps=1e-5))
    assert ours < 2e-4, (ours, torchs)


def test_instnorm_backward_keeps_the_centred_difference(tmp_path):
    """The printed backward reads (X − μ) as one factor, never X·μ; the forward is printed
    as the spec wrote it (no lifted line)."""
    report = derive_report(spec_from(tmp_path, INSTNORM))
    (grad,) = report["gradients"]
    assert "(X[n,c,l] - μ[n,c])·" in grad["text"], grad["text"]
    assert "X[n,c,l]·μ" not in grad["text"] and "μ[n,c]^2" not in grad["text"], grad["text"]
    assert [row["target"] for row in report["forward"]] == ["mu", "var", "Y"]
    # the Jacobian, in index form and as a matrix, reads the difference as written too
    report = derive_report(spec_from(tmp_path, INSTNORM), jacobians=True,
                           shape={"N": 1, "C": 1, "L": 2})
    (jac,) = report["jacobians"]
    shown = [jac["text"]] + [entry for row in jac["matrix"] for entry in row]
    assert all("xc" not in t for t in shown) and "(X[0,0,1] - μ[0,0])" in str(shown), shown
    assert [row["target"] for row in report["forward"]] == ["mu", "var", "Y"]


def test_one_tensor_for_every_copy_of_a_centred_difference(tmp_path):
    """var's X[n,c,m] − μ[n,c] and Y's X[n,c,l] − μ[n,c] read the same lifted tensor, over
    X's own indices; normalising twice makes the same program."""
    spec = spec_from(tmp_path, INSTNORM)
    first = normalize(spec)
    lifted = [a for a in first.assigns if a.kind == "lifted"]
    assert [(a.target, [str(i) for i in a.lhs]) for a in lifted] == [("xc", ["n", "c", "l"])]
    readers = {a.target for a in first.assigns
               if "xc" in {x.base.label.name for x in a.body.atoms(sp.Indexed)}}
    assert readers == {"var", "Y"}
    again = normalize(spec)
    assert [(a.target, a.body) for a in again.assigns] == \
        [(a.target, a.body) for a in first.assigns]


def test_a_named_centred_let_is_read_where_the_difference_is_written(tmp_path):
    """A let that is the centred difference names it: Y's inline X − μ reads that let, and
    nothing is lifted."""
    source = HEAD + """\
spec = Spec("named", "x")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
mu = spec.let("mu", [n], Sum(X[n, d], d) / D)
xc = spec.let("xc", [n, d], X[n, d] - mu[n])
var = spec.let("var", [n], Sum(xc[n, d] ** 2, d) / D)
spec.output("Y", [n, d], (X[n, d] - mu[n]) * var[n])
"""
    program = normalize(spec_from(tmp_path, source))
    assert not [a for a in program.assigns if a.kind == "lifted"]
    assert str(program.by_target()["Y"].body) == "var[n]*xc[n, d]"


@pytest.mark.parametrize("body, lifted", [
    ("X[n, d] - Sum(X[n, k], k) / (D + 1)", False),     # not the mean: 1/(D+1)
    ("X[n, d] - Sum(X[0, k], k) / D", False),           # the mean of another row
    ("X[n, d] - Sum(X[i, d], i) / N", True),            # over the batch axis (batch norm)
    ("X[n, d] - Sum(W[n, k], k) / D", False),           # the mean of another tensor
    ("3*X[n, d] - 3*Sum(X[n, k], k) / D", True),        # c·(X − μ)
    ("X[n, d] + B[n] - Sum(X[n, k], k) / D", True),     # one pair among more terms
])
def test_what_counts_as_a_centred_difference(tmp_path, body, lifted):
    source = HEAD + f"""\
spec = Spec("which", "x")
N, D = spec.dims("N D")
n, d, k, i = spec.indices(n=N, d=D, k=D, i=N)
X = spec.input("X", N, D)
W = spec.input("W", N, D)
B = spec.input("B", N)
spec.output("Y", [n, d], ({body}) ** 2 + 0 * W[n, d] + 0 * B[n])
"""
    program = normalize(spec_from(tmp_path, source))
    assert bool([a for a in program.assigns if a.kind == "lifted" and a.reduce is None]) \
        == lifted


@pytest.mark.parametrize("source", [INSTNORM, LAYERNORM_INLINE])
def test_float64_check_passes_at_every_size_including_one(tmp_path, source):
    """gradtool check at sizes 1 (one value per instance: dX = 0 exactly) and at random
    sizes, against finite differences, torch.autograd and the other target."""
    spec = spec_from(tmp_path, source)
    ones = {name: 1 for name in spec.dim_symbols}
    for fixed in (ones, {}):
        rows = check_spec(spec, CheckOptions(cases=2, fixed=fixed))
        failed = [r for r in rows if not r.passed]
        assert rows and not failed, failed


def test_term_magnitude_adds_the_terms_in_absolute_value():
    from gradtool.check.numeric import term_magnitude

    a, b, c = sp.symbols("a b c", real=True)
    expr = (a - b) * c ** 2 / (a + 3) - 2 * sp.Sum(a * sp.Symbol("k"), (sp.Symbol("k"), 0, 2))
    mag = term_magnitude(expr)
    at = {a: 2.0, b: -5.0, c: -1.5}
    # |a − b|·c² / |a + 3| → (|a| + |b|)·|c|²/|a + 3|, and 2·Σ|a·k|
    assert float(mag.subs(at).doit()) == pytest.approx((2 + 5) * 1.5 ** 2 / 5 + 2 * 2 * 3)


class Perturbed:
    """The generated NumPy kernels with ``offset`` added to every gradient."""

    name = "derived"

    def __init__(self, spec, offset: float):
        self.kernels, self.offset = Kernels(spec, "numpy"), offset

    def run(self, inputs, dims, upstream):
        outs, saved, state = self.kernels.forward(inputs, dims)
        grads = self.kernels.backward(upstream, saved, dims)
        return outs, {k: v + self.offset for k, v in grads.items()}, state


@pytest.mark.parametrize("offset, passes", [(1e-10, True), (1e-6, False)])
def test_an_exact_zero_allows_the_rounding_of_the_terms_that_cancel(tmp_path, offset, passes):
    """Instance norm over one element with ε = 1e-12: dX = G/√ε − G/√ε = 0 exactly, from
    terms of 1e6·|G|. A float64 kernel may be off by the rounding of those terms (the old
    expanded form was off by 2.9e-9 where its terms were 1.2e8), which the allowance of
    1e-12 relative to the exact 0 called a code-generation fault; 16 unit roundoffs of the
    terms (3.6e-9·|G| here) allow 1e-10. An error of 1e-6 is still a fault."""
    spec = spec_from(tmp_path, INSTNORM.replace('"eps", 1e-5', '"eps", 1e-12'))
    ones = {name: 1 for name in spec.dim_symbols}
    rows = check_spec(spec, CheckOptions(cases=1, fixed=ones, oracles=("autograd", "fd")),
                      subject=Perturbed(spec, offset))
    grads = [r for r in rows if r.input == "X"]  # and the same at exact zeros of X
    assert len(grads) == 3 and all(r.passed == passes for r in grads), grads
    if passes:  # finite differences allow 1e-10 anyway; autograd's exact 0 needs the terms
        (auto,) = [r for r in grads if r.oracle == "torch.autograd"]
        assert "terms cancel" in auto.note, auto


def test_an_output_that_is_the_difference_stays_itself(tmp_path):
    """Y = X − μ is not rewritten as a copy of a lifted xc, and another output's X − μ is
    lifted rather than read from Y; both check."""
    source = HEAD + """\
spec = Spec("centre", "x")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D)
mu = spec.let("mu", [n], Sum(X[n, d], d) / D)
spec.output("Y", [n, d], X[n, d] - mu[n])
spec.output("Z", [n], Sum((X[n, d] - mu[n]) ** 2, d))
"""
    spec = spec_from(tmp_path, source)
    program = normalize(spec)
    by = program.by_target()
    assert str(by["Y"].body) == "X[n, d] - mu[n]" and str(by["Z"].body) == "xc[n, d]**2"
    rows = check_spec(spec, CheckOptions(cases=2))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]


def test_float32_check_passes_at_every_size_including_one(tmp_path):
    """``gradtool check --float32``: at L = 2 dX is small by cancellation (the normalised
    pair is ±1 whatever X is), and the float32 kernel is off by 3 float32 roundoffs of the
    terms, 1.1e-4 of the result; the rows allow the rounding of the terms."""
    spec = spec_from(tmp_path, INSTNORM)
    for fixed in ({"N": 1, "C": 1, "L": 1}, {"L": 2}, {}):
        rows = check_spec(spec, CheckOptions(cases=2, fixed=fixed, dtype="float32"))
        failed = [r for r in rows if not r.passed]
        assert rows and not failed, failed
