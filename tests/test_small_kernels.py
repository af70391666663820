"""Lowering rules of the torch target that cut calls at small sizes (docs/training.md,
"Measured (CNN)"), each against torch.autograd in float64 and float32, with the ``need``
flags: 1/x of a tensor as ``torch.reciprocal``, x² as ``x * x``, a number factor as add's
``alpha=`` and addcmul's ``value=``, a sum over (0, 2, 3) with a short H·W as two sums, and a
convolution's bias gradient as the third output of torch's convolution backward."""

import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtool.codegen.emit import generate
from gradtool.nn import SpecModule
from gradtool.spec.loader import load_spec

HEAD = "from gradtool.lang import *\n\n"
TOLS = {torch.float64: 1e-10, torch.float32: 2e-5}


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def _spec_file(tmp_path, body: str, name: str = "layer") -> str:
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + f"spec = Spec({name!r}, 'a test layer')\n" + body)
    return str(path)


RECIPROCALS = """N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
X = spec.input("X", N, D, domain="positive")
Z = spec.input("Z", N, D, domain="positive")
S = spec.input("S", N, domain="positive")
r = spec.let("r", [n], 1 / sqrt(S[n]))
spec.output("Y", [n, d], r[n] * X[n, d] + 1 / (X[n, d] * Z[n, d]) + 2 / Z[n, d] + Z[n, d] ** 2)
"""


def _reciprocal_oracle(x, z, s):
    return torch.rsqrt(s)[:, None] * x + 1 / (x * z) + 2 / z + z ** 2


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("wants", [(True, True, True), (False, True, False)])
def test_reciprocal_of_a_tensor_lowers_to_one_call(tmp_path, dtype, wants):
    """1/x, 1/√s and 1/(x·z) of tensors are ``torch.reciprocal`` calls (``1 / x`` is Python's
    ``__rdiv__``, the same values at more cost) and z² is ``Z * Z``, and the layer's values
    and gradients are torch.autograd's; an input that asks for no gradient gets none."""
    path = _spec_file(tmp_path, RECIPROCALS)
    source = generate(load_spec(path), "torch")
    assert "torch.reciprocal(torch.sqrt(S))" in source and "torch.reciprocal(X * Z)" in source
    assert "Z * Z" in source and "** 2" not in source
    assert not re.search(r"\b1 / [A-Za-z(]", source[source.index("def forward"):])
    rng = np.random.default_rng(0)
    data = [rng.uniform(0.5, 2, s) for s in ((3, 4), (3, 4), (3,))]
    ours = [torch.tensor(a, dtype=dtype, requires_grad=w) for a, w in zip(data, wants)]
    theirs = [torch.tensor(a, dtype=dtype, requires_grad=w) for a, w in zip(data, wants)]
    y, ref = SpecModule(path, dtype=dtype)(*ours), _reciprocal_oracle(*theirs)
    g = torch.tensor(rng.standard_normal((3, 4)), dtype=dtype)
    tol = TOLS[dtype]
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(y, [a for a in ours if a.requires_grad], g)
    want = torch.autograd.grad(ref, [a for a in theirs if a.requires_grad], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_autograd_runs_through_the_generated_forward_with_reciprocals(tmp_path):
    """torch.reciprocal keeps its output for its backward: the generated forward never
    updates one in place, so torch.autograd differentiates it (twice) to the oracle's values."""
    from gradtool.codegen.cache import compile_spec

    module = compile_spec(load_spec(_spec_file(tmp_path, RECIPROCALS)), "torch")
    rng = np.random.default_rng(1)
    data = [rng.uniform(0.5, 2, s) for s in ((3, 4), (3, 4), (3,))]
    ours = [torch.tensor(a, requires_grad=True) for a in data]
    theirs = [torch.tensor(a, requires_grad=True) for a in data]
    y, ref = module.forward(*ours)[0], _reciprocal_oracle(*theirs)
    g = torch.tensor(rng.standard_normal((3, 4)))
    got = torch.autograd.grad(y, ours, g, create_graph=True)
    want = torch.autograd.grad(ref, theirs, g, create_graph=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    second = torch.autograd.grad(sum(a.sum() for a in got), ours)
    expect = torch.autograd.grad(sum(a.sum() for a in want), theirs)
    for a, b in zip(second, expect, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name, conv", [("conv2d", F.conv2d), ("conv1d", F.conv1d)])
def test_convolution_bias_gradient_comes_from_the_convolution_backward(dtype, name, conv):
    """conv + per-channel bias: ∂L/∂b is the third output of the one convolution_backward
    call (no separate sum), with F.conv*d's gradients; with the input's gradient not asked
    for, the other two still match."""
    spec = load_spec(name)
    source = generate(spec, "torch")
    assert "dbias = conv_grads[2]" in source and ".sum(" not in source
    layer = SpecModule(name, C=2, O=3, K=3, S=2, P=1, dtype=dtype)
    rng = np.random.default_rng(2)
    shape = (2, 2, 7, 6) if name == "conv2d" else (2, 2, 9)
    tol = TOLS[dtype]
    for wants in (True, False):
        x = torch.tensor(rng.standard_normal(shape), dtype=dtype, requires_grad=wants)
        xr = x.detach().clone().requires_grad_(wants)
        w, b = (p.detach().clone().requires_grad_() for p in (layer.weight, layer.bias))
        y, ref = layer(x), conv(xr, w, b, stride=2, padding=1)
        g = torch.tensor(rng.standard_normal(tuple(ref.shape)), dtype=dtype)
        torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
        got = torch.autograd.grad(y, [x] * wants + [layer.weight, layer.bias], g)
        want = torch.autograd.grad(ref, [xr] * wants + [w, b], g)
        for a, c in zip(got, want, strict=True):
            torch.testing.assert_close(a, c, rtol=tol, atol=tol)


def _batch_norm(x, g, b):
    return F.batch_norm(x, None, None, g, b, training=True, eps=1e-5)


NORMS = {  # batch norm with H·W at most TorchPrinter.SHORT_TRAIL (16) and above it
    "batchnorm2d, H·W = 10": ("batchnorm2d", (4, 3, 5, 2), dict(C=3), _batch_norm),
    "batchnorm2d, H·W = 25": ("batchnorm2d", (3, 3, 5, 5), dict(C=3), _batch_norm),
    "layernorm": ("layernorm", (4, 6), dict(D=6),
                  lambda x, g, b: F.layer_norm(x, (6,), g, b, eps=1e-5)),
}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", sorted(NORMS))
@pytest.mark.parametrize("wants", [(True, True, True), (True, False, False),
                                   (False, True, False)])
def test_number_factors_and_channel_statistics(dtype, case, wants):
    """``a − c·s`` and ``a + c·s·x`` with c a number are one call, ``torch.sub(a, s,
    alpha=c)`` and ``a.addcmul_(s, x, value=c)``, not a call that multiplies s by c first,
    and batch norm's statistics over (0, 2, 3) sum the batch first when H·W is small; batch
    norm's and layer norm's values and gradients stay F.batch_norm's and F.layer_norm's on
    either side of that size, also when only some gradients are asked for."""
    name, shape, sizes, oracle = NORMS[case]
    source = generate(load_spec(name), "torch")
    backward = source[source.index("def backward"):source.index("class ")]
    assert "alpha=1 / " in backward and "value=-(1 / " in backward, backward
    if name == "batchnorm2d":
        assert "(G.sum(0).sum((1, 2)) if H * W <= 16 else G.sum((0, 2, 3)))" in backward
    layer = SpecModule(name, dtype=dtype, **sizes)
    rng = np.random.default_rng(3)
    x = torch.tensor(rng.standard_normal(shape) * 2 + 1, dtype=dtype)
    g = torch.tensor(rng.standard_normal(shape), dtype=dtype)
    with torch.no_grad():
        layer.gamma.copy_(torch.tensor(rng.uniform(0.5, 2, shape[1 if name != "layernorm"
                                                                 else -1])))
    ours = [x.clone().requires_grad_(wants[0]), layer.gamma, layer.beta]
    theirs = [t.detach().clone().requires_grad_(w) for t, w in zip(ours, wants)]
    for p, w in zip(ours[1:], wants[1:]):
        p.requires_grad_(w)
    y, ref = layer(ours[0]), oracle(*theirs)
    tol = TOLS[dtype] * 10
    torch.testing.assert_close(y, ref, rtol=tol, atol=tol)
    got = torch.autograd.grad(y, [t for t, w in zip(ours, wants) if w], g)
    want = torch.autograd.grad(ref, [t for t, w in zip(theirs, wants) if w], g)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_vector_broadcast_over_trailing_axes_is_a_view_call(dtype):
    """A per-channel vector broadcast over (H, W) is ``v.view(-1, 1, 1)`` (half the cost of
    ``v[:, None, None]``); batch norm's forward and backward with strided gamma and beta (a
    view of every other element) stay F.batch_norm's under torch.autograd."""
    source = generate(load_spec("batchnorm2d"), "torch")
    assert "gamma.view(-1, 1, 1)" in source and "[:, None" not in source, source
    kernel: dict = {}
    exec(compile(source, "batchnorm2d_torch", "exec"), kernel)
    rng = np.random.default_rng(5)
    x = torch.tensor(rng.standard_normal((3, 4, 5, 2)) * 2 + 1, dtype=dtype)
    g = torch.tensor(rng.standard_normal((3, 4, 5, 2)), dtype=dtype)
    gamma = torch.tensor(rng.uniform(0.5, 2, 8), dtype=dtype)[::2]
    beta = torch.tensor(rng.standard_normal(8), dtype=dtype)[1::2]
    assert not gamma.is_contiguous()
    state = (torch.zeros(4, dtype=dtype), torch.ones(4, dtype=dtype))
    y, saved, _ = kernel["forward"](x, gamma, beta, *state)
    dx, dgamma, dbeta = kernel["backward"](g, *saved)
    theirs = [t.clone().requires_grad_() for t in (x, gamma, beta)]
    ref = _batch_norm(*theirs)
    want = torch.autograd.grad(ref, theirs, g)
    tol = TOLS[dtype] * 10
    for a, b in zip((y, dx, dgamma, dbeta), (ref, *want), strict=True):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("momentum", [0.1, 0.7])  # torch.lerp's two formulas: w < ½, w ≥ ½
def test_a_running_average_is_one_lerp(dtype, momentum):
    """``(1 − m)·a + m·b`` with m a hyper-parameter is ``torch.lerp(a, b, m)``, one call; a
    sum whose weights do not add to 1 (the running variance's m·M/(M − 1)) stays a multiply
    and an add. Both running statistics stay F.batch_norm's after two training steps, also
    for float64 images through a float32 layer (the end takes the start's dtype)."""
    source = generate(load_spec("batchnorm2d"), "torch")
    assert "torch.lerp(running_mean, mu.type_as(running_mean), momentum)" in source, source
    assert source.count("torch.lerp(") == 1, source
    layer = SpecModule("batchnorm2d", C=3, momentum=momentum, dtype=dtype)
    rm, rv = torch.zeros(3, dtype=dtype), torch.ones(3, dtype=dtype)
    rng = np.random.default_rng(6)
    for _ in range(2):
        x = torch.tensor(rng.standard_normal((4, 3, 2, 3)) * 2 + 1, dtype=dtype)
        layer(x)
        F.batch_norm(x, rm, rv, training=True, momentum=momentum, eps=1e-5)
    tol = TOLS[dtype] * 10
    torch.testing.assert_close(layer.running_mean, rm, rtol=tol, atol=tol)
    torch.testing.assert_close(layer.running_var, rv, rtol=tol, atol=tol)
    mixed = SpecModule("batchnorm2d", C=3, momentum=momentum, dtype=torch.float32)
    x = torch.tensor(rng.standard_normal((4, 3, 2, 3)) + 1)  # float64
    mixed(x)
    want = momentum * x.mean((0, 2, 3))  # from running_mean = 0
    assert mixed.running_mean.dtype == torch.float32
    torch.testing.assert_close(mixed.running_mean, want.float(), rtol=1e-6, atol=1e-6)
