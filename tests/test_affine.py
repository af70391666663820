"""Affine, strided and split-index reads (issue 7, items 2, 7 and 8): generated kernels against
torch.autograd through the reference convolution / normalisation ops, in float64."""

import textwrap

import numpy as np
import pytest
import sympy as sp
import torch
import torch.nn.functional as F  # noqa: N812

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.spec.loader import load_spec
from tests.helpers import max_rel_err

HEAD = "from gradtool.lang import *\n"

STRIDED = """
    spec = Spec("strided", "one-channel strided correlation")
    N, T, K, S = spec.dims("N T K S")
    n, t, k = spec.indices(n=N, t=T, k=K)
    X = spec.input("X", N, (T - 1) * S + K)
    W = spec.param("W", K)
    spec.output("Y", [n, t], Sum(W[k] * X[n, t * S + k], k))
"""

DEPTHWISE = """
    spec = Spec("depthwise", "depthwise 2-D convolution, stride S")
    N, C, OH, OW, K, S = spec.dims("N C OH OW K S")
    n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
    X = spec.input("X", N, C, (OH - 1) * S + K, (OW - 1) * S + K)
    W = spec.param("W", C, K, K)
    spec.output("Y", [n, c, i, j], Sum(W[c, p, q] * X[n, c, i * S + p, j * S + q], p, q))
"""


def write(tmp_path, name, body):
    path = tmp_path / f"{name}.py"
    path.write_text(HEAD + textwrap.dedent(body))
    return path


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def kernel_gradients(spec, target, inputs, dims, upstream):
    """(outputs, gradients) of the generated kernels for ``target``, as float64 arrays."""
    kernels = Kernels(spec, target)
    outs, saved, _ = kernels.forward(inputs, dims)
    grads = kernels.backward(upstream, saved, dims)
    return ({k: to_numpy(v) for k, v in outs.items()},
            {k: to_numpy(v) for k, v in grads.items()})


def autograd(fn, inputs, upstream):
    """Outputs and gradients of ``fn`` (a reference op) by torch.autograd, float64."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(upstream))
    return out.detach().numpy(), {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


# -- item 2: a parameter times a strided read ------------------------------------------------

@pytest.mark.parametrize("target", ["numpy", "torch"])
@pytest.mark.parametrize("stride", [1, 2, 3])
def test_strided_correlation_kernels_match_conv1d(tmp_path, stride, target):
    """Y[n,t] = Σ_k W[k]·X[n, t·S + k]: dX scatters W[k]·G[n,t] to h = S·t + k (a
    conv-transpose), it is not (Σ_k W)·scatter(G)."""
    spec = load_spec(write(tmp_path, "strided", STRIDED))
    rng = np.random.default_rng(stride)
    dims = {"N": 2, "T": 4, "K": 3, "S": stride}
    inputs = {"X": rng.standard_normal((2, 3 * stride + 3)), "W": rng.standard_normal(3)}
    upstream = rng.standard_normal((2, 4))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def conv(X, W):
        return F.conv1d(X[:, None], W[None, None], stride=stride)[:, 0]

    ref, ref_grads = autograd(conv, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "W"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_depthwise_conv2d_kernels_match_grouped_conv2d(tmp_path, target):
    """W[c,p,q]·X[n,c,i·S+p,j·S+q] summed over the 2-D window (p, q) against
    F.conv2d(groups=C): both window indices and the channel stay inside the scatter."""
    spec = load_spec(write(tmp_path, "depthwise", DEPTHWISE))
    rng = np.random.default_rng(7)
    dims = {"N": 2, "C": 3, "OH": 3, "OW": 2, "K": 2, "S": 2}
    inputs = {"X": rng.standard_normal((2, 3, 6, 4)), "W": rng.standard_normal((3, 2, 2))}
    upstream = rng.standard_normal((2, 3, 3, 2))
    out, grads = kernel_gradients(spec, target, inputs, dims, {"Y": upstream})

    def conv(X, W):
        return F.conv2d(X, W[:, None], stride=2, groups=3)

    ref, ref_grads = autograd(conv, inputs, upstream)
    assert max_rel_err(out["Y"], ref) < 1e-12
    for name in ("X", "W"):
        assert max_rel_err(grads[name], ref_grads[name]) < 1e-12, name


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_scatter_keeps_a_window_index_its_sum_leaves_free(target):
    """Σ_t δ(h, S·t + k)·G[n,t] with k free is one scatter per k (axes n, k, h), as a
    common term lowered on its own would need."""
    import math

    from gradtool.codegen.emit import _printer

    n, t, k, h = sp.symbols("n t k h", integer=True)
    T, K, S, N = sp.symbols("T K S N", integer=True, positive=True)
    expr = sp.Sum(sp.KroneckerDelta(h, S * t + k) * sp.IndexedBase("G")[n, t], (t, 0, T - 1))
    printer, _ = _printer(target, {"G": "G", "T": "T", "K": "K", "S": "S"})
    printer.ref = "G"
    printer.ranges = {n: N, t: T, k: K, h: (T - 1) * S + K}
    code = printer.assign(expr, (n, k, h), ("N", "K", "H"))
    helpers = __import__(f"gradtool.codegen.{target}_target", fromlist=["HELPERS"]).HELPERS
    namespace = {"np": np, "torch": torch, "math": math}
    exec(helpers["scatter_add"], namespace)
    g = np.random.default_rng(0).standard_normal((2, 3))
    namespace.update(G=torch.tensor(g) if target == "torch" else g, T=3, K=2, S=2)
    got = to_numpy(eval(code, namespace))
    want = np.zeros((2, 2, 6))
    for kk in range(2):
        for tt in range(3):
            want[:, kk, 2 * tt + kk] += g[:, tt]
    assert np.array_equal(got, want), code
