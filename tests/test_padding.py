"""Zero (and −∞) padding in the spec language and sizes derived from the input (issue 9,
items 1–2): the padded built-ins against F.conv1d / F.conv2d / F.max_pool2d / F.avg_pool2d in
values and gradients (torch.autograd, float64), through the derived formula and both
generated kernels; one layer on inputs of two sizes; out-of-range reads still refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.check.numeric import derived_gradients
from gradtool.codegen.emit import generate
from gradtool.errors import SpecError
from gradtool.nn import LayerError, NumpyLayer, SpecModule
from gradtool.spec.loader import load_spec
from gradtool.symbolic.reverse import derive


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))


def _conv1d(t, s):
    return F.conv1d(t["X"], t["weight"], t["bias"], stride=s["S"], padding=s["P"])


def _conv2d(t, s):
    return F.conv2d(t["X"], t["weight"], t["bias"], stride=s["S"], padding=s["P"])


def _maxpool(t, s):
    return F.max_pool2d(t["X"], s["K"], stride=s["S"], padding=s["P"])


def _avgpool(t, s):
    return F.avg_pool2d(t["X"], s["K"], stride=s["S"], padding=s["P"])


REFERENCES = {"conv1d": _conv1d, "conv2d": _conv2d, "maxpool2d": _maxpool,
              "avgpool2d": _avgpool}

# (stride, padding, H): stride 1 and 2, padding 0 and 1, odd sizes (9 − 3 + 2 = 8 rows at
# stride 2 leaves the last row unread by any window, as PyTorch's floor does)
CASES = [(1, 0, 7), (2, 1, 9), (2, 1, 7), (2, 0, 9), (1, 1, 5)]


def _sizes(name: str, stride: int, pad: int, h: int) -> dict:
    if name == "conv1d":
        return dict(N=2, C=2, O=3, L=h, K=3, S=stride, P=pad)
    if name == "conv2d":
        return dict(N=2, C=2, O=3, H=h, W=h - 2, K=3, S=stride, P=pad)
    return dict(N=2, C=2, H=h, W=h - 2, K=3, S=stride, P=pad)


def three_ways(name: str, sizes: dict, x=None, seed: int = 0):
    """(torch.autograd's values and gradients, [(way, values, gradients)] for the derived
    formula and both kernels), all float64 on the same data."""
    spec = load_spec(name)
    dims = spec.sizes_from({spec.dim_symbols[k]: v for k, v in sizes.items()})
    rng = np.random.default_rng(seed)
    inputs = {t.name: rng.standard_normal(tuple(int(d.subs(dims)) for d in t.dims))
              for t in spec.of_kind("input", "param")}
    if x is not None:
        inputs["X"] = x
    leaves = {k: torch.tensor(v, requires_grad=True) for k, v in inputs.items()}
    y = REFERENCES[name](leaves, sizes)
    g = rng.standard_normal(tuple(y.shape))
    (y * torch.tensor(g)).sum().backward()
    expect = (y.detach().numpy(), {k: v.grad.numpy() for k, v in leaves.items()})
    ways = [("derived", None, derived_gradients(derive(spec), inputs, dims, {"G": g}))]
    for target in ("numpy", "torch"):
        kernels = Kernels(spec, target)
        outs, saved, _ = kernels.forward(inputs, dims)
        grads = kernels.backward({"Y": g}, saved, dims)
        ways.append((target, to_numpy(outs["Y"]),
                     {k: to_numpy(v) for k, v in grads.items()}))
    return expect, ways


@pytest.mark.parametrize("name", sorted(REFERENCES))
@pytest.mark.parametrize("stride, pad, h", CASES)
def test_padded_builtins_match_torch(name, stride, pad, h):
    (y, grads), ways = three_ways(name, _sizes(name, stride, pad, h))
    for way, out, got in ways:
        if out is not None:
            assert out.shape == y.shape, way
            np.testing.assert_allclose(out, y, rtol=1e-10, atol=1e-12, err_msg=way)
        assert set(got) == set(grads), way
        for k, want in grads.items():
            np.testing.assert_allclose(got[k], want, rtol=1e-10, atol=1e-12,
                                       err_msg=f"{way}: d{k}")


def test_conv1d_stride_two_padding_one_output_length():
    """L = 8, K = 3, S = 2, P = 1: ⌊(8 + 2 − 3)/2⌋ + 1 = 4 outputs, as F.conv1d."""
    (y, _), ways = three_ways("conv1d", dict(N=1, C=1, O=1, L=8, K=3, S=2, P=1))
    assert y.shape == (1, 1, 4)
    assert all(out.shape == (1, 1, 4) for _, out, _ in ways if out is not None)


def test_padded_maxpool_ties_route_to_one_element():
    """Many ties in overlapping windows with −∞ padding: each window's gradient goes to its
    first maximum, as F.max_pool2d's, so every window sends exactly its G to X."""
    x = np.random.default_rng(1).integers(0, 2, size=(2, 2, 5, 5)).astype(np.float64)
    sizes = dict(N=2, C=2, H=5, W=5, K=3, S=2, P=1)
    (y, grads), ways = three_ways("maxpool2d", sizes, x=x)
    for way, _, got in ways:
        np.testing.assert_array_equal(got["X"], grads["X"], err_msg=way)


def test_padding_prints_as_a_read_inside_the_source():
    from gradtool.report import _forward
    from gradtool.symbolic.printing import latex, text

    d = derive(load_spec("maxpool2d"))
    pad = d.program.assigns[0]
    assert text(pad.rhs(d.program)) == "X[n,c,hp - P,wp - P] (inside X, else -∞)"
    assert r"\text{inside }" in latex(pad.rhs(d.program))
    assert "(inside X, else -∞)" in "\n".join(str(x) for x in _forward(d))


def test_steps_show_the_adjoint_of_the_source_as_a_slice():
    from gradtool.report import derive_report

    report = derive_report("conv2d", steps=True)
    step = next(r for r in report["steps"] if r["tensor"] == "X")
    assert step["text"] == "g_X[n,c,h,w] = g_Xp[n,c,P + h,P + w]"
    (c,) = step["contributions"]
    assert c["from"] == "Xp" and "slice of Xp's adjoint" in c["rule"]
    sizes = [r["text"] for r in report["forward"] if r["kind"] == "size"]
    assert sizes == ["OH = ⌊(H - K + 2·P)/S⌋ + 1", "OW = ⌊(2·P - K + W)/S⌋ + 1"]


def test_derived_size_is_computed_in_the_kernels(tmp_path):
    from gradtool.codegen.emit import generate

    # conv2d's kernels read their windows as views and need no OH; a mean over windows does
    path = tmp_path / "window_mean.py"
    path.write_text("""from gradtool.lang import Spec, Sum

spec = Spec("window_mean", "mean window sum of a padded signal")
N, L, K, S, P = spec.dims("N L K S P")
spec.min_size(P=0)
OL = spec.size("OL", (L + 2 * P - K) // S + 1)
n, i, p = spec.indices(n=N, i=OL, p=K)
X = spec.input("X", N, L)
Xp = spec.pad("Xp", X, (0, P))
spec.output("Y", [n], Sum(Xp[n, i * S + p], i, p) / OL)
""")
    assert "OL = (-K + L + 2 * P) // S + 1" in generate(load_spec(path), "numpy")
    code = generate(load_spec("conv2d"), "numpy")
    assert "Xp = np.pad(X, ((0, 0), (0, 0), (P, P), (P, P)))" in code
    torch_code = generate(load_spec("maxpool2d"), "torch")
    assert "torch.nn.functional.pad(X, (P, P, P, P), value=-math.inf)" in torch_code


# -- layers: one layer, any image size -------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 7, 9), (1, 3, 12, 5)])
def test_one_torch_conv_layer_on_two_input_sizes(shape):
    layer = SpecModule("conv2d", C=3, O=4, K=3, S=2, P=1, dtype=torch.float64)
    for size in (shape, (shape[0], 3, shape[2] + 3, shape[3] + 2)):
        x = torch.randn(*size, dtype=torch.float64, requires_grad=True)
        y = layer(x)
        g = torch.randn_like(y)
        ours = torch.autograd.grad(y, [x, layer.weight, layer.bias], g)
        x2 = x.detach().requires_grad_()
        w2 = layer.weight.detach().requires_grad_()
        b2 = layer.bias.detach().requires_grad_()
        ref = F.conv2d(x2, w2, b2, stride=2, padding=1)
        assert y.shape == ref.shape
        theirs = torch.autograd.grad(ref, [x2, w2, b2], g)
        for a, b in zip(ours, theirs, strict=True):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_one_numpy_pool_layer_on_two_input_sizes():
    layer = NumpyLayer("maxpool2d", K=3, S=2, P=1, dtype=np.float64)
    rng = np.random.default_rng(0)
    for size in ((2, 2, 7, 7), (1, 2, 10, 6)):
        x = rng.standard_normal(size)
        y = layer.forward(x)
        g = rng.standard_normal(y.shape)
        dx = layer.backward(g)
        xt = torch.tensor(x, requires_grad=True)
        ref = F.max_pool2d(xt, 3, stride=2, padding=1)
        ref.backward(torch.tensor(g))
        np.testing.assert_allclose(y, ref.detach().numpy(), rtol=1e-12)
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12)


def test_output_size_is_not_a_constructor_size_and_too_small_input_is_an_error():
    with pytest.raises(LayerError, match="read from the input"):
        SpecModule("conv2d", C=1, O=1, K=3, S=1, P=0, OH=4)
    layer = SpecModule("conv2d", C=1, O=1, K=3, S=1, P=0, dtype=torch.float64)
    with pytest.raises(LayerError, match="OH"):
        layer(torch.randn(1, 1, 2, 5, dtype=torch.float64))
    with pytest.raises(LayerError, match="2\\*P <= K"):
        SpecModule("maxpool2d", K=2, S=1, P=2)(torch.randn(1, 1, 6, 6))


# -- the language: derived sizes, the read-range proof, errors -------------------------------

HEAD = """\
from gradtool.lang import Spec, Sum, oo

spec = Spec("win", "a 1-D window sum")
N, L, K, S, P = spec.dims("N L K S P")
spec.min_size(P=0)
"""


def _load(tmp_path, body: str):
    path = tmp_path / "win.py"
    path.write_text(HEAD + body)
    return path, lambda: load_spec(path)


def test_window_read_with_floor_output_size_is_proved_inside(tmp_path):
    _, load = _load(tmp_path, """\
OL = spec.size("OL", (L + 2*P - K) // S + 1)
n, i, p = spec.indices(n=N, i=OL, p=K)
X = spec.input("X", N, L)
Xp = spec.pad("Xp", X, (0, P))
spec.output("Y", [n, i], Sum(Xp[n, i*S + p], p))
""")
    assert load().derived["OL"] is not None


@pytest.mark.parametrize("read, line, reaches", [
    ("X[n, i*S + p]", 10, "(i = OL - 1, p = K - 1; K = 3, L = 1, P = 1, S = 1)"),
    ("Xp[n, i*S + p + 1]", 10, "past the last entry L + 2*P - 1"),
])
def test_out_of_range_read_with_a_derived_size_is_refused(tmp_path, read, line, reaches):
    path, load = _load(tmp_path, f"""\
OL = spec.size("OL", (L + 2*P - K) // S + 1)
n, i, p = spec.indices(n=N, i=OL, p=K)
X = spec.input("X", N, L)
Xp = spec.pad("Xp", X, (0, P))
spec.output("Y", [n, i], Sum({read}, p))
""")
    with pytest.raises(SpecError) as info:
        load()
    err = info.value
    assert err.file == str(path) and err.line == line
    assert "can read outside" in err.message and reaches in err.message
    assert "spec.pad" in err.hint


def test_unpadded_read_past_the_input_is_still_refused(tmp_path):
    """Without padding, a window that starts before the input is refused with file/line."""
    path, load = _load(tmp_path, """\
OL = spec.size("OL", (L - K) // S + 1)
n, i, p = spec.indices(n=N, i=OL, p=K)
X = spec.input("X", N, L)
spec.output("Y", [n, i], Sum(X[n, i*S + p - P], p))
""")
    with pytest.raises(SpecError) as info:
        load()
    assert info.value.line == 9 and "goes below 0" in info.value.message
    assert "spec.pad" in info.value.hint


@pytest.mark.parametrize("call, message", [
    ('spec.pad("Xp", X, (0,))', "2 axes but spec.pad gives 1 widths"),
    ('spec.pad("Xp", X, (0, -1))', "not a size or a non-negative integer"),
    ('spec.pad("Xp", X, (0, P), fill=X)', "must be a number"),
    ('spec.size("OL", X)', "not a formula of declared sizes"),
    ('spec.size("OL", L / K)', "not a formula of declared sizes"),
    ("spec.require(L)", "relations between sizes"),
])
def test_language_errors_name_the_line(tmp_path, call, message):
    path, load = _load(tmp_path, f'X = spec.input("X", N, L)\n{call}\n')
    with pytest.raises(SpecError) as info:
        load()
    assert info.value.line == 7 and message in info.value.message


def test_checks_sample_sizes_that_keep_derived_sizes_and_requirements():
    from gradtool.check.sampling import sample_dims

    spec = load_spec("maxpool2d")
    rng = np.random.default_rng(0)
    seen_zero = False
    for _ in range(40):
        dims = {str(k): v for k, v in sample_dims(spec, rng, low=2, high=5).items()}
        assert 2 * dims["P"] <= dims["K"] <= dims["H"] + 2 * dims["P"]
        assert dims["OH"] == (dims["H"] + 2 * dims["P"] - dims["K"]) // dims["S"] + 1
        seen_zero |= dims["P"] == 0
    assert seen_zero


def test_a_training_only_requirement_binds_training_and_sampling_not_the_eval_form():
    """batchnorm2d's ``spec.require(M >= 2, training=True)`` (two values per channel): checks
    sample only N·H·W ≥ 2 (with N pinned to 1 as well), the training layer refuses one 1×1
    image, and the eval form has no such requirement."""
    from gradtool.check.sampling import sample_dims
    from gradtool.nn.plan import LayerPlan

    spec = load_spec("batchnorm2d")
    assert not spec.requires and len(spec.training_requires) == 1
    assert spec.eval_form().training_requires == []
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(60):
        dims = {str(k): v for k, v in sample_dims(spec, rng, high=3, fixed={"N": 1}).items()}
        assert dims["N"] * dims["H"] * dims["W"] >= 2
        seen.add((dims["H"], dims["W"]))
    assert (1, 2) in seen or (2, 1) in seen  # the smallest shapes that keep it are sampled
    plan = LayerPlan(spec, {"C": 3})
    assert plan.training_refusal([(1, 3, 2, 1)]) is None
    assert "needs H*N*W >= 2, got N = 1, H = 1, W = 1" in plan.training_refusal([(1, 3, 1, 1)])
    plan.bind({"X": (1, 3, 1, 1)}, training=False)  # eval: no requirement


ACTCONV = """\
from gradtool.lang import Spec, Sum, tanh

spec = Spec("actconv", "tanh, then a padded 1-D convolution of it")
N, C, O, L, K, S, P = spec.dims("N C O L K S P")
spec.min_size(P=0)
OL = spec.size("OL", (L + 2 * P - K) // S + 1)
n, c, o, i, p, l = spec.indices(n=N, c=C, o=O, i=OL, p=K, l=L)
X = spec.input("X", N, C, L)
weight = spec.param("weight", O, C, K)
Z = spec.let("Z", [n, c, l], tanh(X[n, c, l]))
Zp = spec.pad("Zp", Z, (0, 0, P))
spec.output("Y", [n, o, i], Sum(weight[o, c, p] * Zp[n, c, i * S + p], c, p))
"""


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_padding_an_intermediate_slices_its_adjoint(tmp_path, target):
    """A padded intermediate (tanh, then padding): the kernels scatter into the padded axis
    and slice it, dX = (1 − Z²)·g_Zp[..., P:P + L], against F.conv1d(tanh(X)) in float64."""
    from gradtool.codegen.emit import generate

    path = tmp_path / "actconv.py"
    path.write_text(ACTCONV)
    spec = load_spec(path)
    code = generate(spec, target)
    assert "== (P +" not in code
    if target == "numpy":
        assert "[:, :, P:(L + P)]" in code
    else:  # the convolution and its backward pad Z themselves: no copy, no slice
        assert "conv_backward(G, Z, weight, (S,), (P,), (need_X, need_weight))" in code and \
            "[:, :, P:(L + P)]" not in code and "functional.pad" not in code
    sizes = dict(N=2, C=2, O=3, L=9, K=3, S=2, P=1)
    dims = spec.sizes_from({spec.dim_symbols[k]: v for k, v in sizes.items()})
    rng = np.random.default_rng(3)
    x, w = rng.standard_normal((2, 2, 9)), rng.standard_normal((3, 2, 3))
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = F.conv1d(torch.tanh(xt), wt, stride=2, padding=1)
    g = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(g))
    kernels = Kernels(spec, target)
    outs, saved, _ = kernels.forward({"X": x, "weight": w}, dims)
    grads = kernels.backward({"Y": g}, saved, dims)
    np.testing.assert_allclose(to_numpy(outs["Y"]), y.detach().numpy(), rtol=1e-10)
    np.testing.assert_allclose(to_numpy(grads["X"]), xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(to_numpy(grads["weight"]), wt.grad.numpy(), rtol=1e-10,
                               atol=1e-12)


ASYMMETRIC = """\
from gradtool.lang import Spec, Sum

spec = Spec("shiftconv", "a 1-D convolution padded by 1 before and 2 after")
N, L, K = spec.dims("N L K")
OL = spec.size("OL", L + 3 - K + 1)
n, i, p = spec.indices(n=N, i=OL, p=K)
X = spec.input("X", N, L)
weight = spec.param("weight", K)
Xp = spec.pad("Xp", X, (0, (1, 2)))
spec.output("Y", [n, i], Sum(weight[p] * Xp[n, i + p], p))
"""


def test_number_and_pair_widths_pad_each_side(tmp_path):
    """Widths given as numbers, (before, after) = (1, 2), and a derived size without a
    floor: formula and both kernels against F.conv1d of F.pad(X, (1, 2))."""
    path = tmp_path / "shiftconv.py"
    path.write_text(ASYMMETRIC)
    spec = load_spec(path)
    dims = spec.sizes_from({spec.dim_symbols["N"]: 2, spec.dim_symbols["L"]: 5,
                            spec.dim_symbols["K"]: 3})
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((2, 5)), rng.standard_normal(3)
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    y = F.conv1d(F.pad(xt, (1, 2))[:, None], wt[None, None])[:, 0]
    g = rng.standard_normal(tuple(y.shape))
    y.backward(torch.tensor(g))
    got = derived_gradients(derive(spec), {"X": x, "weight": w}, dims, {"G": g})
    np.testing.assert_allclose(got["X"], xt.grad.numpy(), rtol=1e-10, atol=1e-12)
    for target in ("numpy", "torch"):
        kernels = Kernels(spec, target)
        outs, saved, _ = kernels.forward({"X": x, "weight": w}, dims)
        grads = kernels.backward({"Y": g}, saved, dims)
        np.testing.assert_allclose(to_numpy(outs["Y"]), y.detach().numpy(), rtol=1e-10)
        for name, want in (("X", xt.grad), ("weight", wt.grad)):
            np.testing.assert_allclose(to_numpy(grads[name]), want.numpy(), rtol=1e-10,
                                       atol=1e-12, err_msg=f"{target}: d{name}")


# -- what the torch Function keeps: the forward's argmax, and X itself at P = 0 ---------------

@pytest.mark.parametrize("stride, pad", [(2, 0), (1, 0), (2, 1)])
def test_maxpool_backward_reads_the_argmax_its_forward_kept(stride, pad):
    """The forward runs max_pool2d_with_indices and the Function saves its argmax (the first
    maximum, row-major, as F.max_pool2d's) for the backward; at P = 0 the indices are
    F.max_pool2d's own. Ties (0/1 data) route as torch's do, in float64."""
    layer = SpecModule("maxpool2d", K=3, S=stride, P=pad, dtype=torch.float64)
    x = torch.randint(0, 2, (2, 3, 7, 6), dtype=torch.float64, requires_grad=True)
    y = layer(x)
    x2 = x.detach().requires_grad_()
    ref, first = F.max_pool2d(x2, 3, stride=stride, padding=pad, return_indices=True)
    g = torch.randn_like(y)
    assert torch.equal(y, ref)
    kept = [t for t in y.grad_fn.saved_tensors if t is not None and t.dtype == torch.int64]
    assert len(kept) == 1 and kept[0].shape == y.shape
    if pad == 0:
        assert torch.equal(kept[0], first)
    assert torch.equal(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x2, g)[0])


@pytest.mark.parametrize("pad", [0, 1])
@pytest.mark.parametrize("name, target", [("conv2d", "numpy"), ("maxpool2d", "numpy"),
                                          ("maxpool2d", "torch")])
def test_zero_padding_is_skipped_at_run_time(name, target, pad):
    """At P = 0 the padded copy is X itself (no copy), at P = 1 a padded copy. (Values and
    gradients at P = 0 and 1 against F.*: test_padded_builtins_match_torch.)"""
    kernels = Kernels(load_spec(name), target)
    rng = np.random.default_rng(3)
    x = kernels.convert(rng.standard_normal((2, 2, 6, 5)))
    if name == "conv2d":
        w, b = kernels.convert(rng.standard_normal((3, 2, 3, 3))), kernels.convert(np.zeros(3))
        _, saved = kernels.module.forward(x, w, b, P=pad, S=1)
    else:
        _, saved = kernels.module.forward(x, K=3, P=pad, S=1)
    padded = [s for s in saved if tuple(s.shape) == (2, 2, 6 + 2 * pad, 5 + 2 * pad)]
    assert len(padded) == 1 and (padded[0] is x) == (pad == 0)


@pytest.mark.parametrize("pad", [0, 1, 2])
def test_torch_convolution_pads_its_input_itself(pad):
    """The torch conv2d kernels pass padding=P to the convolution and its backward: no
    padded copy is made or saved, X itself is kept; values and gradients match F.conv2d."""
    source = generate(load_spec("conv2d"), "torch")
    kernels_source = source[source.index("def forward"):source.index("class ")]
    assert "functional.pad" not in kernels_source and "Xp" not in kernels_source
    kernels = Kernels(load_spec("conv2d"), "torch")
    rng = np.random.default_rng(4)
    x, w, b = (torch.tensor(rng.standard_normal(s), requires_grad=True)
               for s in ((2, 3, 5, 6), (4, 3, 3, 3), (4,)))
    y, saved = kernels.module.forward(x.detach(), w.detach(), b.detach(), P=pad, S=2)
    assert any(s is not None and s.shape == x.shape for s in saved)
    assert all(s.shape[2:] != (5 + 2 * pad, 6 + 2 * pad) for s in saved) or pad == 0
    ref = F.conv2d(x, w, b, stride=2, padding=pad)
    torch.testing.assert_close(y, ref.detach(), rtol=1e-10, atol=1e-12)
    g = torch.tensor(rng.standard_normal(tuple(ref.shape)))
    got = kernels.module.backward(g, *saved, P=pad, S=2)
    for mine, theirs in zip(got, torch.autograd.grad(ref, [x, w, b], g), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("need", [(True, True, True), (False, True, True), (True, False, False),
                                  (True, True, False), (False, False, True),
                                  (False, False, False)])
@pytest.mark.parametrize("stride, pad", [(1, 1), (2, 0)])
def test_conv_gradients_in_one_call_honour_the_need_flags(need, stride, pad):
    """The torch backward computes ∂L/∂X, ∂L/∂weight and the bias's ∂L/∂b (the upstream
    gradient summed over all axes but the channels) in one convolution_backward whose output
    mask is the need flags: an unrequested gradient is None, the others match torch.autograd
    through F.conv2d (float64)."""
    spec = load_spec("conv2d")
    kernels = Kernels(spec, "torch")
    assert "conv_backward(G, X, weight, (S, S), (P, P), (need_X, need_weight, need_bias))" in \
        generate(spec, "torch")
    rng = np.random.default_rng(5)
    x, w, b = (torch.tensor(rng.standard_normal(s), requires_grad=True)
               for s in ((2, 3, 7, 6), (4, 3, 3, 3), (4,)))
    y = F.conv2d(x, w, b, stride=stride, padding=pad)
    g = torch.tensor(rng.standard_normal(tuple(y.shape)))
    want = torch.autograd.grad(y, [x, w, b], g)
    _, saved = kernels.module.forward(x.detach(), w.detach(), b.detach(), P=pad, S=stride)
    got = kernels.module.backward(g, *saved, P=pad, S=stride, need=need)
    for flag, mine, theirs in zip(need, got, want, strict=True):
        if flag:
            torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-12)
        else:
            assert mine is None
