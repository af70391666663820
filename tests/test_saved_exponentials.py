"""A normalised exponential whose e and Z the backward reads (attention written the natural way):
the kernels compute and save the shifted e' = exp(f − M) and Z' = Σ_k e', which every gradient
reads in place of e and Z because each is homogeneous of degree 0 in (e, Z)
(docs/fuzzing.md, finding 29)."""

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.codegen.emit import Module, _scale_degree, generate
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive

ATTENTION = """\
from gradtool.lang import Spec, Sum, exp, sqrt
spec = Spec("attn", "single-head attention")
B, S, Dk, Dv = spec.dims("B S Dk Dv")
b, i, j, k, e, v = spec.indices(b=B, i=S, j=S, k=S, e=Dk, v=Dv)
Q = spec.input("Q", B, S, Dk)
K = spec.input("K", B, S, Dk)
V = spec.input("V", B, S, Dv)
sc = spec.let("sc", [b, i, j], Sum(Q[b, i, e] * K[b, j, e], e) / sqrt(Dk))
ex = spec.let("ex", [b, i, j], exp(sc[b, i, j]))
Z = spec.let("Z", [b, i], Sum(ex[b, i, k], k))
"""
OUTPUT = 'spec.output("O", [b, i, v], Sum(ex[b, i, j] * V[b, j, v], j) / Z[b, i])\n'
SIZES = {"B": 2, "S": 4, "Dk": 2, "Dv": 3}
# the normaliser over its own axis order, Z[i, b] = Σ_k ex[b, i, k]
TRANSPOSED = (ATTENTION.replace('Z = spec.let("Z", [b, i]', 'Z = spec.let("Z", [i, b]')
              + OUTPUT.replace("/ Z[b, i]", "/ Z[i, b]"))


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def _spec(tmp_path, text: str):
    path = tmp_path / "attn.py"
    path.write_text(text)
    return load_spec(path)


def _kernels(spec, target: str, inputs: dict, upstream: dict, dtype: str) -> dict:
    """Outputs and gradients of the generated kernels, as float64 arrays."""
    dims = spec.sizes_from({spec.dim_symbols[n]: s for n, s in SIZES.items()})
    k = Kernels(spec, target)
    outs, saved, _ = k.forward(inputs, dims, dtype=dtype)
    grads = k.backward({o: k.convert(g, dtype) for o, g in upstream.items()}, saved, dims,
                       dtype=dtype)
    return {n: to_numpy(x).astype(np.float64) for n, x in {**outs, **grads}.items()}


def _attention_data(peak: float | None, seed: int = 0):
    """Q, K, V, G in float32 precision (float64 arrays), with the largest score
    Σ_e Q·K/√Dk scaled to ``peak`` (None: standard normal data)."""
    rng = np.random.default_rng(seed)
    q, k = rng.standard_normal((2, 4, 2)), rng.standard_normal((2, 4, 2))
    if peak is not None:
        top = (q @ k.transpose(0, 2, 1)).max() / np.sqrt(2)
        q, k = q * np.sqrt(peak / top), k * np.sqrt(peak / top)
    v, g = rng.standard_normal((2, 4, 3)), rng.standard_normal((2, 4, 3))
    return [x.astype(np.float32).astype(np.float64) for x in (q, k, v, g)]


def _sdpa(q, k, v, g) -> dict:
    """torch's own attention and its autograd gradients, float64."""
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt)
    out.backward(torch.tensor(g))
    return {"O": out.detach().numpy(), "Q": qt.grad.numpy(), "K": kt.grad.numpy(),
            "V": vt.grad.numpy()}


def _assert_close(got: dict, want: dict, rtol: float) -> None:
    for name, w in want.items():
        assert np.all(np.isfinite(got[name])), f"{name} is not finite: {got[name]}"
        err = np.abs(got[name] - w).max() / np.abs(w).max()
        assert err < rtol, f"{name} differs from torch by {err:.2e} (relative to its largest)"


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_attention_matches_scaled_dot_product_attention_in_float64(tmp_path, target):
    spec = _spec(tmp_path, ATTENTION + OUTPUT)
    q, k, v, g = _attention_data(None)
    got = _kernels(spec, target, {"Q": q, "K": k, "V": v}, {"O": g}, "float64")
    _assert_close(got, _sdpa(q, k, v, g), rtol=1e-12)


@pytest.mark.parametrize("target", ["numpy", "torch"])
@pytest.mark.parametrize("peak", [60.0, 200.0])
@pytest.mark.parametrize("text", [ATTENTION + OUTPUT, TRANSPOSED], ids=["Z_bi", "Z_ib"])
def test_attention_in_float32_at_large_scores_is_finite_and_right(tmp_path, target, peak,
                                                                   text):
    """Unshifted, the float32 dK read ex²/Z² (off by 16.9 where |dK| ≤ 1.9 at scores of 58)
    and the forward was NaN past scores of about 90."""
    spec = _spec(tmp_path, text)
    q, k, v, g = _attention_data(peak, seed=1)
    got = _kernels(spec, target, {"Q": q, "K": k, "V": v}, {"O": g}, "float32")
    # float32 round-off in scores of size `peak` moves the gradients by about peak·2⁻²⁴
    _assert_close(got, _sdpa(q, k, v, g), rtol=2e-4)


def test_attention_kernels_save_the_shifted_exponential_and_normaliser(tmp_path):
    """The softmax lowering does not take ex and Z away: the backward reads both."""
    spec = _spec(tmp_path, ATTENTION + OUTPUT)
    for target in ("numpy", "torch"):
        source = generate(spec, target)
        forward = source[source.index("def forward("):source.index("def backward(")]
        assert "ex_max" in forward and "softmax" not in forward, forward
        assert "return O, (Q, K, V, ex, Z)" in forward, forward


SOFTMAX_TRANSPOSED = """\
from gradtool.lang import Spec, Sum, exp
spec = Spec("softmax_t", "a softmax whose normaliser has its axes in another order")
B, N, C = spec.dims("B N C")
b, n, c, k = spec.indices(b=B, n=N, c=C, k=C)
X = spec.input("X", B, N, C)
e = spec.let("e", [b, n, c], exp(X[b, n, c]))
Z = spec.let("Z", [n, b], Sum(e[b, n, k], k))
spec.output("P", [b, n, c], e[b, n, c] / Z[n, b])
"""


def test_softmax_over_a_transposed_normaliser_at_800_logits(tmp_path):
    """A read of Z through its own axes is a ratio too: shifted (torch: one softmax call)."""
    path = tmp_path / "softmax_t.py"
    path.write_text(SOFTMAX_TRANSPOSED)
    spec = load_spec(path)
    rng = np.random.default_rng(4)
    x = rng.permuted(np.concatenate([np.full((2, 3, 1), 800.0), np.full((2, 3, 1), -800.0),
                                     rng.uniform(-800, 800, (2, 3, 2))], axis=2), axis=2)
    g = rng.standard_normal(x.shape)
    xt = torch.tensor(x, requires_grad=True)
    p = torch.softmax(xt, 2)
    p.backward(torch.tensor(g))
    source = generate(spec, "torch")
    assert "torch.softmax(X, 2)" in source[:source.index("def backward(")]
    dims = spec.sizes_from({spec.dim_symbols["B"]: 2, spec.dim_symbols["N"]: 3,
                            spec.dim_symbols["C"]: 4})
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        outs, saved, _ = k.forward({"X": x}, dims)
        grads = k.backward({"P": g}, saved, dims)
        _assert_close({"P": to_numpy(outs["P"]), "X": to_numpy(grads["X"])},
                      {"P": p.detach().numpy(), "X": xt.grad.numpy()}, rtol=1e-12)


# e or Z read other than through the ratio e/Z: no shift may change what is read
NOT_RATIOS = {
    "Z_plus_one": ('spec.output("O", [b, i, v], Sum(ex[b, i, j] * V[b, j, v], j)'
                   " / (Z[b, i] + 1))\n",
                   lambda s, v: {"O": torch.exp(s) @ v / (torch.exp(s).sum(2) + 1)[..., None]}),
    "log_Z_output": (OUTPUT + 'spec.output("L", [b, i], log(Z[b, i]))\n',
                     lambda s, v: {"O": torch.softmax(s, 2) @ v,
                                   "L": torch.logsumexp(s, 2)}),
}


@pytest.mark.parametrize("case", sorted(NOT_RATIOS))
def test_exponential_read_otherwise_is_not_shifted_and_matches_autograd(tmp_path, case):
    text, reference = NOT_RATIOS[case]
    spec = _spec(tmp_path, ATTENTION.replace("exp, sqrt", "exp, log, sqrt") + text)
    assert Module(derive(spec), "numpy").stable_exponentials() == {}
    q, k, v, _ = _attention_data(None, seed=2)
    qt, kt, vt = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    outs = reference(qt @ kt.mT / np.sqrt(2), vt)
    rng = np.random.default_rng(3)
    upstream = {n: rng.standard_normal(tuple(o.shape)) for n, o in outs.items()}
    sum(torch.sum(o * torch.tensor(upstream[n])) for n, o in outs.items()).backward()
    want = {n: o.detach().numpy() for n, o in outs.items()}
    want.update({"Q": qt.grad.numpy(), "K": kt.grad.numpy(), "V": vt.grad.numpy()})
    for target in ("numpy", "torch"):
        _assert_close(_kernels(spec, target, {"Q": q, "K": k, "V": v}, upstream, "float64"),
                      want, rtol=1e-12)


def test_scale_degree_of_reads_of_e_and_z():
    """(e, Z) → (λ[n]·e, λ[n]·Z): degree 0 is a factor of 1; None is not homogeneous."""
    n, m, c, j = sp.symbols("n m c j", integer=True)
    e, z, x = sp.IndexedBase("e"), sp.IndexedBase("Z"), sp.IndexedBase("X")
    lam = sp.IndexedBase("lam", positive=True)

    def scale(node):
        if isinstance(node, sp.Indexed) and node.base == e:
            return lam[node.indices[0]]
        if isinstance(node, sp.Indexed) and node.base == z:
            return lam[node.indices]
        return None

    assert _scale_degree(e[n, c] * e[n, j] * x[n, c] / z[n] ** 2, scale) == 1
    assert _scale_degree(sp.Sum(e[n, c] / z[n], (n, 0, 3)), scale) == 1
    assert _scale_degree(x[n, c] - e[n, c] * sp.Sum(e[n, j], (j, 0, 3)) / z[n] ** 2,
                         scale) == 1
    assert _scale_degree(x[n, c] - e[n, c], scale) is None  # terms of degree 0 and 1
    assert _scale_degree(e[n, c] / z[n] ** 2, scale) == 1 / lam[n]
    assert _scale_degree(sp.Sum(e[n, c] / z[m], (n, 0, 3)), scale) is None
    assert _scale_degree(sp.log(z[n]), scale) is None
    assert _scale_degree(sp.tanh(e[n, c] / z[n]), scale) == 1
