"""Reads through strided windows lowered to native kernels (issue 9, item 4): torch's
convolution, transposed convolution, weight gradient and max pooling; NumPy's sliding windows
and strided slice-adds. Each rule against the reference op's values and gradients
(torch.autograd, float64), on both targets, and the lowered path checked in the source."""

import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from hypothesis import given, settings
from hypothesis import strategies as st

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.codegen.emit import generate
from gradtool.spec.loader import load_spec

TARGETS = ("numpy", "torch")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def write(tmp_path, name: str, body: str):
    path = tmp_path / f"{name}.py"
    path.write_text("from gradtool.lang import *\n" + textwrap.dedent(body))
    return load_spec(path)


def kernels(spec, target, inputs, dims, upstream):
    """(outputs, gradients) of the generated kernels, float64 arrays."""
    k = Kernels(spec, target)
    outs, saved, _ = k.forward(inputs, dims)
    grads = k.backward(upstream, saved, dims)
    return ({n: to_numpy(v) for n, v in outs.items()},
            {n: to_numpy(v) for n, v in grads.items()})


def reference(fn, inputs: dict, upstream):
    """Output and gradients of the reference op ``fn`` by torch.autograd, float64."""
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    out = fn(**leaves)
    grads = torch.autograd.grad(out, list(leaves.values()), torch.tensor(upstream))
    return out.detach().numpy(), {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


def assert_matches(spec, target, inputs, dims, fn):
    rng = np.random.default_rng(1)
    leaves = {k: torch.tensor(v) for k, v in inputs.items()}
    shape = fn(**leaves).shape
    g = rng.standard_normal(tuple(shape))
    ref_out, ref_grads = reference(fn, inputs, g)
    outs, grads = kernels(spec, target, inputs, dims, {"Y": g})
    np.testing.assert_allclose(outs["Y"], ref_out, rtol=1e-10, atol=1e-12)
    for name, want in ref_grads.items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-10, atol=1e-12, err_msg=name)


def kernel_lines(spec, target) -> list[str]:
    """The lines of the generated forward and backward functions."""
    source = generate(spec, target)
    body = source[source.index("\ndef forward("):source.index("\ndef backward(")]
    body += source[source.index("\ndef backward("):]
    body = body[:body.index("\n\n\n", body.index("\ndef backward("))]
    return body.splitlines()


# -- the built-in padded specs against torch's own ops ------------------------------------------

# (stride, padding, size): stride 1 and 2, padding 0 and 1, sizes a stride of 2 does not tile
CASES = [(1, 0, 6), (1, 1, 5), (2, 0, 7), (2, 1, 8), (2, 1, 7)]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stride, pad, size", CASES)
def test_conv2d_matches_f_conv2d(target, stride, pad, size):
    rng = np.random.default_rng(size + 10 * stride + pad)
    inputs = {"X": rng.standard_normal((2, 3, size, size + 1)),
              "weight": rng.standard_normal((4, 3, 3, 3)), "bias": rng.standard_normal(4)}
    dims = {"N": 2, "C": 3, "O": 4, "H": size, "W": size + 1, "K": 3, "S": stride, "P": pad}
    assert_matches(load_spec("conv2d"), target, inputs, dims,
                   lambda X, weight, bias: F.conv2d(X, weight, bias, stride=stride,
                                                    padding=pad))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stride, pad, size", CASES)
def test_conv1d_matches_f_conv1d(target, stride, pad, size):
    rng = np.random.default_rng(size + 10 * stride + pad)
    inputs = {"X": rng.standard_normal((2, 3, size)),
              "weight": rng.standard_normal((2, 3, 3)), "bias": rng.standard_normal(2)}
    dims = {"N": 2, "C": 3, "O": 2, "L": size, "K": 3, "S": stride, "P": pad}
    assert_matches(load_spec("conv1d"), target, inputs, dims,
                   lambda X, weight, bias: F.conv1d(X, weight, bias, stride=stride,
                                                    padding=pad))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stride, pad, size", CASES)
def test_maxpool2d_matches_f_max_pool2d(target, stride, pad, size):
    rng = np.random.default_rng(size + 10 * stride + pad)
    x = rng.standard_normal((2, 3, size, size + 1))
    dims = {"N": 2, "C": 3, "H": size, "W": size + 1, "K": 3, "S": stride, "P": pad}
    assert_matches(load_spec("maxpool2d"), target, {"X": x}, dims,
                   lambda X: F.max_pool2d(X, 3, stride=stride, padding=pad))


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stride, pad, size", CASES)
def test_avgpool2d_matches_f_avg_pool2d(target, stride, pad, size):
    rng = np.random.default_rng(size + 10 * stride + pad)
    x = rng.standard_normal((2, 3, size, size + 1))
    dims = {"N": 2, "C": 3, "H": size, "W": size + 1, "K": 3, "S": stride, "P": pad}
    assert_matches(load_spec("avgpool2d"), target, {"X": x}, dims,
                   lambda X: F.avg_pool2d(X, 3, stride=stride, padding=pad))


@pytest.mark.parametrize("target", TARGETS)
def test_max_pool_ties_route_to_the_first_maximum(target):
    """Ties inside a window and between overlapping windows: each window's gradient goes to
    one element, its first maximum in row-major order, as F.max_pool2d's does."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, size=(2, 2, 6, 6)).astype(np.float64)  # mostly ties
    x[0, 0, :2, :2] = 1.0  # a whole window tied
    dims = {"N": 2, "C": 2, "H": 6, "W": 6, "K": 2, "S": 1, "P": 0}
    assert_matches(load_spec("maxpool2d"), target, {"X": x}, dims,
                   lambda X: F.max_pool2d(X, 2, stride=1))
    g = np.ones((1, 1, 1, 1))
    outs, grads = kernels(load_spec("maxpool2d"), target, {"X": np.ones((1, 1, 2, 2))},
                          {"N": 1, "C": 1, "H": 2, "W": 2, "K": 2, "S": 1, "P": 0}, {"Y": g})
    assert grads["X"].ravel().tolist() == [1.0, 0.0, 0.0, 0.0]


# -- the lowered path is the one taken ------------------------------------------------------

LOWERED = {
    ("conv2d", "torch"): ["torch.conv2d(X, weight, bias, stride=S, padding=P)",
                          "conv_backward(G, X, weight, (S, S), (P, P), "
                          "(need_X, need_weight, need_bias))", "dbias = conv_grads[2]"],
    ("conv2d", "numpy"): ["sliding_window_view(", "window_add(", "np.einsum("],
    ("conv1d", "torch"): ["torch.conv1d(X, weight, bias, stride=S, padding=P)",
                          "conv_backward(G, X, weight, (S,), (P,), (need_X, need_weight, "
                          "need_bias))"],
    ("maxpool2d", "torch"): ["torch.ops.aten.max_pool2d_with_indices(Xm, (K, K), (S, S))",
                             "window_max_grad(G, Xm, (K, K), (S, S), argmax)"],
    ("maxpool2d", "numpy"): ["sliding_window_view(", "window_max(", "window_max_grad("],
    ("avgpool2d", "torch"): [".unfold(2, K, S)", "window_sum(", "window_add("],
    ("avgpool2d", "numpy"): ["sliding_window_view(", "window_sum(", "window_add("],
}


@pytest.mark.parametrize("name, target", sorted(LOWERED))
def test_window_reads_take_the_lowered_path(name, target):
    """No integer-array gather, no scatter-add; the generated lines stay under 100 chars."""
    spec = load_spec(name)
    lines = kernel_lines(spec, target)
    code = "\n".join(lines)
    for call in LOWERED[name, target]:
        assert call in code, (call, code)
    for general in ("scatter_add(", "np.add.at", "index_add_", "arange("):
        assert general not in code, (general, code)
    assert max(map(len, lines)) <= 100, max(lines, key=len)


# -- the rules read the index pattern, not a spec: layouts and the general path ---------------

LAYOUT = """
    spec = Spec("conv_cin", "1-D convolution over (C, L, N) data, weight (K, C, O)")
    N, C, O, T, K, S = spec.dims("N C O T K S")
    c, o, t, k, n = spec.indices(c=C, o=O, t=T, k=K, n=N)
    X = spec.input("X", C, (T - 1) * S + K, N)
    W = spec.param("W", K, C, O)
    b = spec.param("b", O)
    spec.output("Y", [t, o, n], Sum(W[k, c, o] * X[c, t * S + k, n], c, k) + b[o])
"""


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("stride", [1, 2])
def test_convolution_in_another_layout_is_lowered(tmp_path, target, stride):
    """Batch last, channels first, the weight's taps first: still torch's convolution (the
    bias passed to it), with the axes permuted around it."""
    spec = write(tmp_path, "conv_cin", LAYOUT)
    if target == "torch":
        code = "\n".join(kernel_lines(spec, target))
        assert "torch.conv1d(" in code and ", b, stride=" in code and \
            "conv_backward(" in code and "(need_X, need_W))" in code, code
    rng = np.random.default_rng(stride)
    size = 3 * stride + 3
    inputs = {"X": rng.standard_normal((3, size, 2)), "W": rng.standard_normal((3, 3, 4)),
              "b": rng.standard_normal(4)}
    dims = {"N": 2, "C": 3, "O": 4, "T": 4, "K": 3, "S": stride}

    def conv(X, W, b):
        return F.conv1d(X.permute(2, 0, 1), W.permute(2, 1, 0), b,
                        stride=stride).permute(2, 1, 0)

    assert_matches(spec, target, inputs, dims, conv)


SHIFTED = """
    spec = Spec("shifted", "1-D correlation that skips the first entry")
    N, C, O, T, K = spec.dims("N C O T K")
    n, c, o, t, k = spec.indices(n=N, c=C, o=O, t=T, k=K)
    X = spec.input("X", N, C, T + K)
    W = spec.param("W", O, C, K)
    spec.output("Y", [n, o, t], Sum(W[o, c, k] * X[n, c, t + k + 1], c, k))
"""


@pytest.mark.parametrize("target", TARGETS)
def test_a_pattern_no_rule_matches_takes_the_general_path(tmp_path, target):
    """X[n, c, t + k + 1] is no window read (an offset): gather and scatter-add, still right.
    (A dilation, X[t + 2k], is one: windows of T entries, 2 apart.)"""
    spec = write(tmp_path, "shifted", SHIFTED)
    code = "\n".join(kernel_lines(spec, target))
    assert "scatter_add(" in code and "window_add(" not in code, code
    assert "conv" not in code.replace("Conv", ""), code
    rng = np.random.default_rng(3)
    inputs = {"X": rng.standard_normal((2, 3, 7)), "W": rng.standard_normal((2, 3, 3))}
    dims = {"N": 2, "C": 3, "O": 2, "T": 4, "K": 3}
    assert_matches(spec, target, inputs, dims, lambda X, W: F.conv1d(X[:, :, 1:], W))


DILATED = """
    spec = Spec("dilated", "1-D correlation with dilation 2")
    N, C, O, T, K = spec.dims("N C O T K")
    n, c, o, t, k = spec.indices(n=N, c=C, o=O, t=T, k=K)
    X = spec.input("X", N, C, T + 2 * K - 2)
    W = spec.param("W", O, C, K)
    spec.output("Y", [n, o, t], Sum(W[o, c, k] * X[n, c, t + 2 * k], c, k))
"""


@pytest.mark.parametrize("target", TARGETS)
def test_a_dilated_read_is_a_window_read_the_other_way_round(tmp_path, target):
    """X[n, c, t + 2k]: windows of T entries (the tap t steps by one), 2 apart (k): a view
    and slice-adds, against F.conv1d(dilation=2)."""
    spec = write(tmp_path, "dilated", DILATED)
    code = "\n".join(kernel_lines(spec, target))
    assert "scatter_add(" not in code and "arange(" not in code, code
    rng = np.random.default_rng(3)
    inputs = {"X": rng.standard_normal((2, 3, 8)), "W": rng.standard_normal((2, 3, 3))}
    dims = {"N": 2, "C": 3, "O": 2, "T": 4, "K": 3}
    assert_matches(spec, target, inputs, dims, lambda X, W: F.conv1d(X, W, dilation=2))


DEPTHWISE = """
    spec = Spec("depthwise", "depthwise 2-D convolution, stride S")
    N, C, OH, OW, K, S = spec.dims("N C OH OW K S")
    n, c, i, j, p, q = spec.indices(n=N, c=C, i=OH, j=OW, p=K, q=K)
    X = spec.input("X", N, C, (OH - 1) * S + K, (OW - 1) * S + K)
    W = spec.param("W", C, K, K)
    spec.output("Y", [n, c, i, j], Sum(W[c, p, q] * X[n, c, i * S + p, j * S + q], p, q))
"""


@pytest.mark.parametrize("target", TARGETS)
def test_depthwise_convolution_reads_a_view_and_slice_adds_its_adjoint(tmp_path, target):
    """The channel is in both operands and kept (depthwise): no convolution call matches, so
    the contraction is an einsum over the window view and the adjoint strided slice-adds."""
    spec = write(tmp_path, "depthwise", DEPTHWISE)
    code = "\n".join(kernel_lines(spec, target))
    assert "window_add(" in code and "scatter_add(" not in code, code
    assert "torch.conv" not in code, code
    rng = np.random.default_rng(4)
    inputs = {"X": rng.standard_normal((2, 3, 7, 5)), "W": rng.standard_normal((3, 3, 3))}
    dims = {"N": 2, "C": 3, "OH": 3, "OW": 2, "K": 3, "S": 2}
    assert_matches(spec, target, inputs, dims,
                   lambda X, W: F.conv2d(X, W[:, None], stride=2, groups=3))


def test_window_read_needs_the_windows_to_number_the_output():
    """A view is taken only when ⌊(E − K)/S⌋ + 1 is the window positions' range."""
    import sympy as sp

    from gradtool.codegen.windows import fits

    T, K, S, H, P, R = sp.symbols("T K S H P R", integer=True, positive=True)
    assert fits((T - 1) * S + K, K, S, T)
    assert fits(H + 2 * P, K, S, T, {T: sp.floor((H + 2 * P - K) / S) + 1})
    assert not fits((T - 1) * S + K + R, K, S, T)  # R could be S or more
    assert not fits(T * S + K, K, S, T)


def test_generated_names_do_not_clash_with_declared_ones(tmp_path):
    """A spec that declares the names the lowering binds (X_windows, window_add, ...)."""
    spec = write(tmp_path, "clash", """
        spec = Spec("clash", "names the window lowering uses")
        N, C, H, K = spec.dims("N C H K")
        n, c, i, p = spec.indices(n=N, c=C, i=H - K + 1, p=K)
        X = spec.input("X", N, C, H)
        window_add = spec.param("window_add", C, K)
        spec.output("X_windows", [n, i], Sum(window_add[c, p] * X[n, c, i + p], c, p))
    """)
    rng = np.random.default_rng(5)
    x, w = rng.standard_normal((2, 3, 6)), rng.standard_normal((3, 2))
    g = rng.standard_normal((2, 5))
    want = reference(lambda X, W: F.conv1d(X, W[None])[:, 0], {"X": x, "W": w}, g)
    for target in TARGETS:
        k = Kernels(spec, target)
        outs, saved, _ = k.forward({"X": x, "window_add": w}, {"N": 2, "C": 3, "H": 6, "K": 2})
        grads = k.backward({"X_windows": g}, saved, {"N": 2, "C": 3, "H": 6, "K": 2})
        np.testing.assert_allclose(to_numpy(outs["X_windows"]), want[0], rtol=1e-10)
        np.testing.assert_allclose(to_numpy(grads["X"]), want[1]["X"], rtol=1e-10)
        np.testing.assert_allclose(to_numpy(grads["window_add"]), want[1]["W"], rtol=1e-10)
        assert "window_add_" in generate(spec, target)  # the parameter, renamed


CONV3D = """
    spec = Spec("conv3d", "3-D convolution, stride S")
    N, C, O, A, B, D, K, S = spec.dims("N C O A B D K S")
    n, c, o, a, b, d, p, q, r = spec.indices(n=N, c=C, o=O, a=A, b=B, d=D, p=K, q=K, r=K)
    X = spec.input("X", N, C, (A - 1) * S + K, (B - 1) * S + K, (D - 1) * S + K)
    W = spec.param("W", O, C, K, K, K)
    spec.output("Y", [n, o, a, b, d],
                Sum(W[o, c, p, q, r] * X[n, c, a * S + p, b * S + q, d * S + r], c, p, q, r))
"""

MAXPOOL3D = """
    spec = Spec("maxpool3d", "3-D max pooling, stride S")
    N, C, A, B, D, K, S = spec.dims("N C A B D K S")
    n, c, a, b, d, p, q, r = spec.indices(n=N, c=C, a=A, b=B, d=D, p=K, q=K, r=K)
    X = spec.input("X", N, C, (A - 1) * S + K, (B - 1) * S + K, (D - 1) * S + K)
    spec.output("Y", [n, c, a, b, d], Max(X[n, c, a * S + p, b * S + q, d * S + r], p, q, r))
"""


@pytest.mark.parametrize("target", TARGETS)
def test_three_window_axes_lower_to_conv3d_and_max_pool3d(tmp_path, target):
    conv = write(tmp_path, "conv3d", CONV3D)
    pool = write(tmp_path, "maxpool3d", MAXPOOL3D)
    if target == "torch":
        code = "\n".join(kernel_lines(conv, target) + kernel_lines(pool, target))
        for call in ("torch.conv3d(", "max_pool3d_with_indices(X,",
                     "conv_backward(G, X, W, (S, S, S), (0, 0, 0), (need_X, need_W))",
                     "window_max_grad(G, X, (K, K, K), (S, S, S), argmax)"):
            assert call in code, (call, code)
    rng = np.random.default_rng(6)
    dims = {"N": 2, "C": 2, "O": 3, "A": 2, "B": 3, "D": 2, "K": 2, "S": 2}
    inputs = {"X": rng.standard_normal((2, 2, 4, 6, 4)), "W": rng.standard_normal((3, 2, 2, 2, 2))}
    assert_matches(conv, target, inputs, dims, lambda X, W: F.conv3d(X, W, stride=2))
    dims["K"], dims["S"] = 3, 1
    x = rng.standard_normal((2, 2, 4, 5, 4))
    assert_matches(pool, target, {"X": x}, dims, lambda X: F.max_pool3d(X, 3, stride=1))


# -- property: a convolution in any layout --------------------------------------------------

@st.composite
def conv_layouts(draw) -> dict:
    """A 1-D or 2-D convolution whose input, weight and output list their axes in a drawn
    order, with a drawn stride and an optional bias."""
    d = draw(st.sampled_from([1, 2]))
    spatial = ["i", "j"][:d]
    x_axes = draw(st.permutations(["n", "c"] + spatial))
    w_axes = draw(st.permutations(["o", "c"] + ["p", "q"][:d]))
    y_axes = draw(st.permutations(["n", "o"] + spatial))
    return {"d": d, "x": x_axes, "w": w_axes, "y": y_axes, "stride": draw(st.sampled_from([1, 2])),
            "bias": draw(st.booleans())}


def layout_source(layout: dict) -> str:
    sizes = {"n": "N", "c": "C", "o": "O", "i": "(A - 1) * S + K", "j": "(B - 1) * S + K",
             "p": "K", "q": "K"}
    read = {"i": "i * S + p", "j": "j * S + q"}
    taps = ", ".join(["p", "q"][:layout["d"]])
    body = (f"Sum(W[{', '.join(layout['w'])}] * "
            f"X[{', '.join(read.get(a, a) for a in layout['x'])}], c, {taps})")
    return f"""
        spec = Spec("layout", "a convolution in a drawn layout")
        N, C, O, A, B, K, S = spec.dims("N C O A B K S")
        n, c, o, i, j, p, q = spec.indices(n=N, c=C, o=O, i=A, j=B, p=K, q=K)
        X = spec.input("X", {', '.join(sizes[a] for a in layout['x'])})
        W = spec.param("W", {', '.join(sizes[a] for a in layout['w'])})
        b = spec.param("b", O)
        spec.output("Y", [{', '.join(layout['y'])}], {body}{' + b[o]' if layout['bias'] else ''})
    """


@settings(max_examples=6, deadline=None, derandomize=True)
@given(layout=conv_layouts())
def test_a_convolution_in_any_layout_matches_f_conv(tmp_path_factory, layout):
    """Both targets against F.conv1d / F.conv2d with the axes permuted to and from
    (N, C, H, W): the lowering reads the index pattern, whatever the order of the axes."""
    tmp_path = tmp_path_factory.mktemp("layout")
    spec = write(tmp_path, "layout", layout_source(layout))
    d, stride = layout["d"], layout["stride"]
    sizes = {"n": 2, "c": 3, "o": 2, "i": 2 * stride + 2, "j": stride + 2, "p": 2, "q": 2}
    rng = np.random.default_rng(7)
    inputs = {"X": rng.standard_normal([sizes[a] for a in layout["x"]]),
              "W": rng.standard_normal([sizes[a] for a in layout["w"]]),
              "b": rng.standard_normal(2)}
    dims = {"N": 2, "C": 3, "O": 2, "A": 3, "B": 2, "K": 2, "S": stride}
    spatial = ["i", "j"][:d]
    conv = F.conv1d if d == 1 else F.conv2d

    def reference_op(X, W, b):
        x = X.permute(*[layout["x"].index(a) for a in ["n", "c"] + spatial])
        w = W.permute(*[layout["w"].index(a) for a in ["o", "c"] + ["p", "q"][:d]])
        y = conv(x, w, b if layout["bias"] else None, stride=stride)
        y = y + 0 * b.sum()  # b reaches the graph either way: its gradient is 0 without bias
        std = ["n", "o"] + spatial
        return y.permute(*[std.index(a) for a in layout["y"]])

    code = "\n".join(kernel_lines(spec, "torch"))
    assert f"torch.conv{d}d(" in code and "conv_backward(" in code, code
    for target in TARGETS:
        assert_matches(spec, target, inputs, dims, reference_op)
