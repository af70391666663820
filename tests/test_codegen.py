"""Generated kernels: readable and deterministic, cached safely, and numerically right."""

import subprocess
import sys
import textwrap
import traceback

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.codegen.cache import compile_spec
from gradtool.codegen.emit import class_name, generate
from gradtool.spec.loader import builtin_specs, load_spec

SPECS = sorted(builtin_specs())

RELU_NUMPY = '''\
def forward(X):
    """The forward of relu; returns the output, what backward needs."""
    Y = np.maximum(X, 0)
    return Y, (X,)


def backward(G, X, *, need=(True,)):
    """Closed-form gradients ∂L/∂X from the upstream gradient;
    ``need`` flags which to compute (in that order); the others are None."""
    need_X, = need
    dX = None
    if need_X:
        dX = (X > 0) * G
    return dX,
'''


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))
    for name in [m for m in sys.modules if m.startswith("gradtool_kernels.")]:
        del sys.modules[name]


def test_generated_source_reads_like_hand_written_code():
    source = generate("relu", "numpy")
    assert source.startswith("# @generated from specs/relu.py by gradtool")
    assert RELU_NUMPY in source


def test_generation_is_deterministic():
    for target in ("numpy", "torch"):
        assert generate("layernorm", target) == generate("layernorm", target)


def test_contractions_are_matrix_products_and_common_terms_are_named():
    linear = generate("linear", "torch")
    # Σ_i X[n,i]·W[o,i] + b[o] is one addmm; the backward's contractions are matmuls
    assert "Y = torch.addmm(b, X, W.T)" in linear
    assert "dX = G @ W" in linear and "dW = G.T @ X" in linear and "einsum" not in linear
    assert "Y = X @ W.T + b" in generate("linear", "numpy")
    assert "dX = torch.ops.aten.threshold_backward(G, X, 0)" in generate("relu", "torch")
    source = generate("layernorm", "torch")
    # G·x̂, which dγ sums over n and dX's Σ_d' G·γ·x̂ sums over d', is computed once and named
    # after the math; the sums against γ are matrix-vector products
    assert "G_xhat = G * xhat" in source and "dgamma = G_xhat.sum(0)" in source
    assert "(G_xhat @ gamma)" in source and "(G @ gamma)" in source
    assert source.count("gamma * G") == 1  # G·γ once, updated in place into dX
    batchnorm = generate("batchnorm", "torch")
    assert batchnorm.count("(G * xhat).sum(0)") == 1  # shared by dX and dgamma
    # each saved tensor is kept only when a gradient that reads it is requested
    assert "keep = (need[0], need[0], need[0] or need[1])" in source
    assert "ctx.save_for_backward(*[t if k else None for t, k in zip(saved, keep)])" in source
    assert "ctx.save_for_backward(*saved)" in generate("softmax", "torch")
    assert "def use_torch_compile(**options):" in source  # the optional fusion switch
    # (a comment over 100 characters goes on over the next lines)
    assert "saved for backward, by the gradients that read them: gamma (dX), rstd (dX), " \
           "xhat (dX, dgamma)" in source.replace("\n        # ", " ")


def _function_case(name, requires=None):
    """(spec, module, Function, its positional arguments, the sizes it needs after them, dims)
    on float64 sample data; ``requires``: the names whose tensors require grad (default: every
    differentiable input)."""
    import inspect

    from gradtool.check.sampling import sample_dims, sample_inputs

    spec = load_spec(name)
    mod = compile_spec(spec, "torch")
    fn = getattr(mod, class_name(spec) + "Function")
    rng = np.random.default_rng(0)
    dims = sample_dims(spec, rng, low=2, high=4)
    values = sample_inputs(spec, dims, rng)
    grad = {t.name for t in spec.grad_inputs} if requires is None else set(requires)
    args = [torch.tensor(values[t.name], requires_grad=t.name in grad)
            for t in spec.tensors.values() if t.kind in ("input", "param", "state")]
    args += [h.default for h in spec.hypers.values()]
    # sizes the forward cannot read off its inputs (expand's D, a convolution's stride) come
    # after the hyper-parameters, in the order of the forward's keyword-only parameters
    sizes = [p for p, v in inspect.signature(mod.forward).parameters.items()
             if v.kind == v.KEYWORD_ONLY and p not in spec.hypers]
    extra = [int(dims[spec.dim_symbols[p]]) for p in sizes]
    return spec, mod, fn, args, extra, dims


@pytest.mark.parametrize("name", SPECS)
def test_torch_function_passes_gradcheck(name):
    _, _, fn, args, extra, _ = _function_case(name)

    def f(*xs):  # state buffers are updated in place; Y does not depend on them
        return fn.apply(*xs, *extra)

    assert torch.autograd.gradcheck(f, tuple(args), eps=1e-6, atol=1e-7, rtol=1e-5)


def _upstream(out, gen):
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs)


@pytest.mark.parametrize("name", SPECS)
def test_function_computes_only_the_gradients_asked_for(name):
    """One differentiable input at a time requires grad: the Function's backward returns None
    for every other input, and its gradient equals torch.autograd's through the generated
    forward (float64); gradcheck passes for that input alone."""
    from gradtool.check.kernels import Kernels

    spec = load_spec(name)
    grads = [t.name for t in spec.grad_inputs]
    inputs = [t.name for t in spec.tensors.values() if t.kind in ("input", "param", "state")]
    gen = torch.Generator().manual_seed(1)
    for wanted in grads:
        _, mod, fn, args, extra, dims = _function_case(name, requires=[wanted])
        out = fn.apply(*args, *extra)
        ups = _upstream(out, gen)
        with torch.no_grad():  # as the autograd engine calls backward (no create_graph)
            returned = (out[0] if isinstance(out, tuple) else out).grad_fn.apply(*ups)
        returned = returned if isinstance(returned, tuple) else (returned,)
        k = inputs.index(wanted)
        assert all(g is None for j, g in enumerate(returned) if j != k), (wanted, returned)
        # oracle: autograd through the forward in primitive torch ops
        tensors = [a.detach().requires_grad_(a.requires_grad) for a in args[:len(inputs)]]
        kw = Kernels(spec, "torch", module=mod)._keywords(mod.forward, dims)
        ref_out = mod.forward(*tensors, **kw)[0]
        ref_outs = ref_out if isinstance(ref_out, tuple) else (ref_out,)
        expected, = torch.autograd.grad(ref_outs, [tensors[k]], ups)
        torch.testing.assert_close(returned[k], expected, rtol=1e-10, atol=1e-12)
        assert torch.autograd.gradcheck(lambda *xs, fn=fn, extra=extra: fn.apply(*xs, *extra),
                                        tuple(args),
                                        eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("name", SPECS)
def test_numpy_backward_skips_gradients_not_needed(name):
    """``backward(..., need=flags)`` returns None where a flag is false and the very same
    arrays as the full backward where it is true; the layer class takes names."""
    from gradtool.check.kernels import Kernels
    from gradtool.check.sampling import sample_dims, sample_inputs

    spec = load_spec(name)
    kernels = Kernels(spec, "numpy")
    rng = np.random.default_rng(2)
    dims = sample_dims(spec, rng, low=2, high=4)
    outs, saved, _ = kernels.forward(sample_inputs(spec, dims, rng), dims)
    ups = [rng.standard_normal(np.shape(outs[o])) for o in kernels.outputs]
    if not any(np.ndim(u) for u in ups):
        ups = [float(u) for u in ups]
    kw = kernels._keywords(kernels.module.backward, dims)
    full = kernels.module.backward(*ups, *saved, **kw)
    n = len(kernels.grads)
    for k in range(n):
        flags = tuple(j == k for j in range(n))
        some = kernels.module.backward(*ups, *saved, **kw, need=flags)
        assert all(g is None for j, g in enumerate(some) if j != k)
        np.testing.assert_array_equal(some[k], full[k])


def test_numpy_layer_skips_the_input_gradient():
    mod = compile_spec("linear", "numpy")
    layer = mod.Linear(O=3, I=4, rng=np.random.default_rng(0))
    X = np.random.default_rng(1).standard_normal((5, 4))
    G = np.random.default_rng(2).standard_normal((5, 3))
    layer.forward(X)
    dX = layer.backward(G)
    full = dict(layer.grads)
    assert dX is not None
    assert layer.backward(G, need={"W", "b"}) is None  # a network's first layer
    assert set(layer.grads) == {"W", "b"}
    for k in full:
        np.testing.assert_array_equal(layer.grads[k], full[k])
    np.testing.assert_allclose(dX, G @ layer.params["W"])  # Σ_o G[n,o]·W[o,i]
    layer.backward(G, need={"b"})
    assert set(layer.grads) == {"b"}
    with pytest.raises(ValueError, match="no gradient for"):
        layer.backward(G, need={"Wt"})


def test_module_owns_initialised_parameters():
    mod = compile_spec("linear", "torch")
    layer = mod.Linear(O=4, I=3)
    assert layer.W.shape == (4, 3) and layer.b.shape == (4,)
    assert torch.all(layer.b == 0) and layer.W.abs().max() <= (6 / 3) ** 0.5
    y = layer(torch.randn(5, 3))
    y.sum().backward()
    assert torch.allclose(layer.b.grad, torch.full((4,), 5.0))


def test_batchnorm_module_updates_running_statistics_like_pytorch():
    mod = compile_spec("batchnorm", "torch")
    ours = mod.BatchNorm1d(C=3, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    assert torch.allclose(ours(x), ref(x))
    assert torch.allclose(ours.running_mean, ref.running_mean)
    assert torch.allclose(ours.running_var, ref.running_var)


def test_numpy_layer_in_course_style():
    mod = compile_spec("layernorm", "numpy")
    layer = mod.LayerNorm(4, rng=np.random.default_rng(0))
    x = np.random.default_rng(1).standard_normal((3, 4))
    y = layer.forward(x)
    dx = layer.backward(np.ones_like(y))
    assert dx.shape == x.shape
    assert set(layer.grads) == {"gamma", "beta"}
    assert np.allclose(layer.grads["beta"], 3.0)


def test_cache_is_reused_and_written_atomically(tmp_path):
    first = compile_spec("tanh", "numpy")
    files = list((tmp_path / "cache").glob("tanh_numpy_*.py"))
    assert len(files) == 1 and not list((tmp_path / "cache").glob(".*.tmp"))
    assert compile_spec("tanh", "numpy") is first


def test_two_processes_compiling_at_once(tmp_path):
    script = textwrap.dedent("""
        import sys
        from gradtool.codegen.cache import compile_spec
        mod = compile_spec("softmax", "numpy")
        print(mod.__file__)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert len(list((tmp_path / "cache").glob("softmax_numpy_*.py"))) == 1


def test_traceback_shows_generated_lines():
    mod = compile_spec("matmul", "numpy")
    with pytest.raises(ValueError) as info:
        mod.forward(np.ones((2, 3)), np.ones((4, 5)))
    frames = traceback.extract_tb(info.tb)
    generated = [f for f in frames if "matmul_numpy_" in f.filename]
    assert generated and " @ " in generated[-1].line


def test_cli_writes_code_to_a_file(tmp_path):
    out = tmp_path / "ln.py"
    result = CliRunner().invoke(app, ["derive", "layernorm", "--code", "torch", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text().splitlines()[0].startswith("# @generated from specs/layernorm.py")
    result = CliRunner().invoke(app, ["derive", "layernorm", "--code", "jax"])
    assert result.exit_code == 1 and "unknown code target 'jax'" in result.output


@pytest.mark.parametrize("target", ["numpy", "torch"])
def test_normalised_exponentials_do_not_overflow(target):
    """exp(X − max X) in the generated forward: logits of ±1000 give F.cross_entropy's values."""
    logits = np.array([[1000.0, 0.0, -1000.0], [3.0, 2.0, 1.0]])
    targets = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    expected = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(targets))
    soft = torch.softmax(torch.tensor(logits), -1).numpy()
    conv = (lambda a: a) if target == "numpy" else torch.tensor
    ce = compile_spec("softmax_cross_entropy", target)
    loss, _ = ce.forward(conv(logits), conv(targets))
    assert np.isclose(float(loss), float(expected), rtol=1e-12)
    sm = compile_spec("softmax", target)
    probs, _ = sm.forward(conv(logits))
    assert np.allclose(np.asarray(probs), soft, rtol=1e-12, atol=0)


def test_constant_gradient_of_a_loss(tmp_path):
    """Found by the fuzzer: dB of a mean loss is a constant; the torch kernel builds it from a
    tensor it has (not from the scalar upstream gradient)."""
    from gradtool.check.runner import CheckOptions, check_spec

    path = tmp_path / "mean_loss.py"
    path.write_text(textwrap.dedent("""
        from gradtool.lang import *

        spec = Spec("mean_loss", "a mean whose gradient in B is constant")
        E = spec.dims("E")
        e, j = spec.indices(e=E, j=E)
        A = spec.input("A", E, domain="positive")
        B = spec.input("B", E, domain="positive")
        t0 = spec.let("t0", [e], sigmoid(A[e]))
        t1 = spec.let("t1", [e], t0[e] + Sum(B[j], j) / E)
        spec.output("Y", [], Sum(t1[j], j) / E)
    """))
    rows = check_spec(load_spec(path), CheckOptions(cases=2))
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]


BATCHED = '''\
from gradtool.lang import Spec, Sum

spec = Spec("scores", "Attention scores S[b] = Q[b] K[b]ᵀ plus a bias, batched over b")
Bt, Q, K, D = spec.dims("Bt Q K D")
b, q, k, d = spec.indices(b=Bt, q=Q, k=K, d=D)
Qm = spec.input("Qm", Bt, Q, D)
Km = spec.input("Km", Bt, K, D)
c = spec.param("c", K, init="zeros")
spec.output("S", [b, q, k], Sum(Qm[b, q, d] * Km[b, k, d], d) + c[k])
'''


def test_batched_and_transposed_contractions_are_matmuls(tmp_path):
    from gradtool.check.runner import CheckOptions, check_spec

    path = tmp_path / "scores.py"
    path.write_text(BATCHED)
    spec = load_spec(path)
    for target, forward in (("numpy", "S = Qm @ Km.mT + c"),
                            ("torch", "S = (Qm @ Km.mT).add_(c)")):
        source = generate(spec, target)
        # Σ_d Q[b,q,d]·K[b,k,d]: b is a batch axis, K is read transposed; no addmm for 3-d,
        # but torch adds the bias in place into the product it just made
        assert forward in source
        assert "dQm = G @ Km" in source and "dKm = G.mT @ Qm" in source
        assert "einsum" not in source
    rows = check_spec(spec, CheckOptions(cases=1, oracles=("fd", "autograd", "backends")))
    assert rows and all(r.passed for r in rows)


ZERO_D_TERM = '''\
from gradtool.lang import *

spec = Spec("fuzz", "a random spec")
E = spec.dims("E")
e, j = spec.indices(e=E, j=E)
A = spec.input("A", E, domain="positive")
B = spec.input("B", E)
W = spec.param("W", E, init="uniform")
t0 = spec.let("t0", [e], exp((B[e]) / 4))
t1 = spec.let("t1", [e], tanh(t0[e]))
t2 = spec.let("t2", [e], (Sum((W[j])*(A[j]), j))*(t1[e]))
t3 = spec.let("t3", [e], (Max(A[j], j)) + (t2[e]))
spec.output("Y", [e], ((Sum((t1[j])*(A[j]), j)) / (1 + (B[e])**2)) + (t3[e]))
'''


def test_named_0d_term_is_a_tensor_so_the_backward_differentiates(tmp_path):
    """``sum_B_G = (…).sum(0)`` is a 0-d tensor: ``x.add_(t1, alpha=sum_B_G)`` raised a
    TypeError under autograd (found by the need= fuzz property); it is an addcmul now, and the
    gradients of the generated backward (check --order 2) match."""
    from gradtool.check.runner import CheckOptions, check_spec

    path = tmp_path / "zero_d.py"
    path.write_text(ZERO_D_TERM)
    spec = load_spec(path)
    source = generate(spec, "torch")
    assert "alpha=sum_" not in source and ".addcmul_(sum_B_G, t1)" in source
    rows = check_spec(spec, CheckOptions(cases=1, order=2))
    assert any("2nd order" in r.oracle for r in rows)
    assert rows and all(r.passed for r in rows), [r for r in rows if not r.passed]
