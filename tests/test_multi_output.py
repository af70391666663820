"""Specs with several outputs, where later outputs read earlier ones (issue 7, items 1 and 6),
and ``gradtool check`` telling a code-generation fault from a derivation error.

Every gradient is compared in float64 with torch.autograd through a forward written here in
plain torch, independent of gradtool.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import textwrap

import numpy as np
import pytest
import sympy as sp
import torch
from typer.testing import CliRunner

from gradtool.check.fd import diagonal_axes
from gradtool.check.kernels import Kernels
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.cli import app
from gradtool.report import derive_report
from gradtool.spec.loader import load_spec
from gradtool.symbolic.evaluate import evaluate, run_forward
from gradtool.symbolic.jacobian import explicit_matrix, jacobian
from gradtool.symbolic.printing import present
from gradtool.symbolic.reverse import derive
from tests.helpers import assert_matches_autograd

HEAD = "from gradtool.lang import *\n"

SPECS = {
    # item 1: B reads the output A
    "square_then_scale": """
        spec = Spec("square_then_scale", "A = X², B = 3·A, both outputs")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        A = spec.output("A", [n], X[n] ** 2)
        spec.output("B", [n], 3 * A[n])
    """,
    # item 1: attention with the attention weights as an output of their own
    "attention_two_outputs": """
        spec = Spec("attention_two_outputs", "A = softmax(Q Kᵀ/√D) over m, O = A V")
        N, M, D, E = spec.dims("N M D E")
        n, m, k, d, e = spec.indices(n=N, m=M, k=M, d=D, e=E)
        Q = spec.input("Q", N, D)
        K = spec.input("K", M, D)
        V = spec.input("V", M, E)
        S = spec.let("S", [n, m], Sum(Q[n, d] * K[m, d], d) / sqrt(D))
        ex = spec.let("ex", [n, m], exp(S[n, m]))
        Z = spec.let("Z", [n], Sum(ex[n, k], k))
        A = spec.output("A", [n, m], ex[n, m] / Z[n])
        spec.output("O", [n, e], Sum(A[n, m] * V[m, e], m))
    """,
    # item 6: B does not depend on X, A does not depend on Y
    "independent_outputs": """
        spec = Spec("independent_outputs", "A = X², B = 3·Y")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        Y = spec.input("Y", N)
        spec.output("A", [n], X[n] ** 2)
        spec.output("B", [n], 3 * Y[n])
    """,
    "scalar_read_by_vector": """
        spec = Spec("scalar_read_by_vector", "L = Σ X², Y = L·X")
        N = spec.dims("N")
        n, i = spec.indices(n=N, i=N)
        X = spec.input("X", N)
        L = spec.output("L", [], Sum(X[i] ** 2, i))
        spec.output("Y", [n], L * X[n])
    """,
    "three_output_chain": """
        spec = Spec("three_output_chain", "A = tanh(X·W), B = Σ_k A², C = A·B")
        N, D = spec.dims("N D")
        n, d, k = spec.indices(n=N, d=D, k=D)
        X = spec.input("X", N, D)
        W = spec.param("W", D)
        A = spec.output("A", [n, d], tanh(X[n, d] * W[d]))
        B = spec.output("B", [n], Sum(A[n, k] ** 2, k))
        spec.output("C", [n, d], A[n, d] * B[n])
    """,
    # the max's arg-max mask, counted over e and contracted with W (an int64 operand)
    "max_of_an_output": """
        spec = Spec("max_of_an_output", "t1 = A + max_j t0, Y = t0 + t1")
        D, E = spec.dims("D E")
        d, e, j = spec.indices(d=D, e=E, j=E)
        A = spec.input("A", E)
        W = spec.param("W", E, D)
        t0 = spec.let("t0", [d, e], A[e] * W[e, d] + Sum(A[j] * W[j, d], j))
        t1 = spec.output("t1", [d, e], A[e] + Max(t0[d, j], j))
        spec.output("Y", [d, e], t0[d, e] + t1[d, e])
    """,
    # dW = Σ_n [X > 0]·G: a boolean operand of an einsum
    "step_contracted": """
        spec = Spec("step_contracted", "Y = Σ_d H(X)·W")
        N, D, E = spec.dims("N D E")
        n, d, e = spec.indices(n=N, d=D, e=E)
        X = spec.input("X", N, D)
        W = spec.param("W", D, E)
        spec.output("Y", [n, e], Sum(Heaviside(X[n, d]) * W[d, e], d))
    """,
    # names the engine would otherwise give to an upstream gradient or an adjoint
    "input_named_G": """
        spec = Spec("input_named_G", "Y = X·G with G an input")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        G = spec.input("G", N)
        spec.output("Y", [n], X[n] * G[n])
    """,
    "input_named_G_B": """
        spec = Spec("input_named_G_B", "A = X·G_B, B = X² with G_B an input")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        GB = spec.input("G_B", N)
        spec.output("A", [n], X[n] * GB[n])
        spec.output("B", [n], X[n] ** 2)
    """,
    "tensor_named_g_t": """
        spec = Spec("tensor_named_g_t", "Y = t·g_t with t = X², g_t = X³")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        t = spec.let("t", [n], X[n] ** 2)
        gt = spec.let("g_t", [n], X[n] ** 3)
        spec.output("Y", [n], t[n] * gt[n])
    """,
    "no_differentiable_input": """
        spec = Spec("no_differentiable_input", "B = 3·T with T not differentiated")
        N = spec.dims("N")
        n = spec.indices(n=N)
        T = spec.input("T", N, grad=False)
        spec.output("B", [n], 3 * T[n])
    """,
}

# plain-torch forwards of the same specs: the oracle
TORCH_FORWARD = {
    "square_then_scale": lambda X: {"A": X ** 2, "B": 3 * X ** 2},
    "attention_two_outputs": lambda Q, K, V: _attention(Q, K, V),
}


def _attention(Q, K, V):
    A = torch.softmax(Q @ K.T / Q.shape[1] ** 0.5, dim=-1)
    return {"A": A, "O": A @ V}


@pytest.fixture(scope="module")
def spec_path(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multi_output_specs")

    def write(name: str):
        path = folder / f"{name}.py"
        path.write_text(HEAD + textwrap.dedent(SPECS[name]))
        return path

    return write


@pytest.fixture(autouse=True, scope="module")
def _kernel_cache(tmp_path_factory):
    """Generated kernels go to a temporary folder, not ~/.cache/gradtool."""
    old = os.environ.get("GRADTOOL_CACHE")
    os.environ["GRADTOOL_CACHE"] = str(tmp_path_factory.mktemp("kernels"))
    yield
    if old is None:
        os.environ.pop("GRADTOOL_CACHE", None)
    else:
        os.environ["GRADTOOL_CACHE"] = old


def _autograd(name: str, inputs: dict, upstream: dict) -> dict:
    """torch.autograd of Σ_outputs ⟨G_out, out⟩ through the plain-torch forward."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in inputs.items()}
    outs = TORCH_FORWARD[name](**leaves)
    loss = sum((torch.as_tensor(upstream[o], dtype=torch.float64) * y).sum()
               for o, y in outs.items())
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


def _formulas(d, inputs: dict, dims: dict, upstream: dict) -> dict:
    """Each closed form and its printed form, evaluated directly: name -> (closed, printed)."""
    env = run_forward(d.program, inputs, dims)
    env.update({d.seeds[o].base.label.name: g for o, g in upstream.items()})
    out = {}
    for t in d.spec.grad_inputs:
        out[t.name] = tuple(np.asarray(evaluate(d.program, form, d.canon[t.name], env, dims))
                            for form in (d.closed[t.name], present(d.closed[t.name])))
    return out


def _kernel_gradients(spec, inputs: dict, dims: dict, upstream: dict) -> dict:
    """target -> the generated backward's gradients, given every output's upstream gradient."""
    out = {}
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        _, saved, _ = k.forward(inputs, dims)
        out[target] = {n: np.asarray(g.detach() if hasattr(g, "detach") else g)
                       for n, g in k.backward(upstream, saved, dims).items()}
    return out


# -- item 1: an output that another output reads keeps that path ------------------------------

def test_output_read_by_an_output_keeps_that_path(spec_path):
    """X = [1, −2], G_A = [0.5, 1], G_B = [1, 1]: dX = 2·X·(G_A + 3·G_B) = [7, −16]."""
    spec = load_spec(spec_path("square_then_scale"))
    d = derive(spec)
    inputs = {"X": np.array([1.0, -2.0])}
    upstream = {"A": np.array([0.5, 1.0]), "B": np.array([1.0, 1.0])}
    dims = {spec.dim_symbols["N"]: 2}
    right = np.array([7.0, -16.0])
    np.testing.assert_allclose(_autograd("square_then_scale", inputs, upstream)["X"], right)
    closed, printed = _formulas(d, inputs, dims, upstream)["X"]
    np.testing.assert_allclose(closed, right, rtol=1e-14)
    np.testing.assert_allclose(printed, right, rtol=1e-14)
    for target, grads in _kernel_gradients(spec, inputs, dims, upstream).items():
        np.testing.assert_allclose(grads["X"], right, rtol=1e-14, err_msg=target)
    # --steps: g_A collects its own seed and B's contribution, and dX is built from g_A
    n = d.canon["A"][0]
    assert sp.expand(d.steps["A"] - (sp.IndexedBase("G_A")[n] + 3 * sp.IndexedBase("G_B")[n])) \
        == 0
    assert sp.IndexedBase("g_A")[n] in d.steps["X"].atoms(sp.Indexed)
    report = derive_report(spec, steps=True)
    assert "G_B" in report["gradients"][0]["text"]


def test_jacobian_of_an_output_that_reads_an_output(spec_path):
    """∂B/∂X for B = 3·A, A = X²: the explicit matrix at X = [1, −2] is diag(6, −12)."""
    spec = load_spec(spec_path("square_then_scale"))
    d = derive(spec)
    x = np.array([1.0, -2.0])
    oracle = torch.autograd.functional.jacobian(lambda X: 3 * X ** 2, torch.tensor(x))
    matrix, _, _ = explicit_matrix(d, jacobian(d, "B", "X"), {"N": 2})
    X = spec.tensors["X"].base
    ours = np.array(matrix.xreplace({X[0]: x[0], X[1]: x[1]}), dtype=np.float64)
    np.testing.assert_allclose(ours, oracle.numpy(), rtol=1e-14)


def test_generated_backward_takes_every_upstream_gradient(spec_path):
    """Both kernels' backward take G_A and G_B; the torch autograd.Function passes both on."""
    spec = load_spec(spec_path("square_then_scale"))
    numpy_mod, torch_mod = Kernels(spec, "numpy").module, Kernels(spec, "torch").module
    for mod in (numpy_mod, torch_mod):
        assert list(inspect.signature(mod.backward).parameters)[:2] == ["G_A", "G_B"]
    X = torch.tensor([1.0, -2.0], dtype=torch.float64, requires_grad=True)
    A, B = torch_mod.SquareThenScaleFunction.apply(X)
    ((torch.tensor([0.5, 1.0], dtype=torch.float64) * A).sum() + B.sum()).backward()
    np.testing.assert_allclose(X.grad.numpy(), [7.0, -16.0], rtol=1e-14)
    layer = numpy_mod.SquareThenScale()
    layer.forward(np.array([1.0, -2.0]))
    np.testing.assert_allclose(layer.backward(np.array([0.5, 1.0]), np.ones(2)), [7.0, -16.0])


def test_two_output_attention_matches_autograd(spec_path):
    """dQ, dK, dV of attention with A and O both outputs, through the derived formula, its
    printed form and both generated kernels, against torch.autograd (float64)."""
    spec = load_spec(spec_path("attention_two_outputs"))
    d = derive(spec)
    rng = np.random.default_rng(7)
    sizes = {"N": 3, "M": 4, "D": 2, "E": 5}
    dims = {spec.dim_symbols[k]: v for k, v in sizes.items()}
    inputs = {"Q": rng.standard_normal((3, 2)), "K": rng.standard_normal((4, 2)),
              "V": rng.standard_normal((4, 5))}
    upstream = {"A": rng.standard_normal((3, 4)), "O": rng.standard_normal((3, 5))}
    oracle = _autograd("attention_two_outputs", inputs, upstream)
    # the O path matters: without it dQ and dK would be much smaller
    only_a = _autograd("attention_two_outputs", inputs, {**upstream, "O": np.zeros((3, 5))})
    assert np.abs(oracle["Q"] - only_a["Q"]).max() > 1e-2
    for name, (closed, printed) in _formulas(d, inputs, dims, upstream).items():
        np.testing.assert_allclose(closed, oracle[name], rtol=1e-10, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(printed, oracle[name], rtol=1e-10, atol=1e-12,
                                   err_msg=name)
    for target, grads in _kernel_gradients(spec, inputs, dims, upstream).items():
        for name in ("Q", "K", "V"):
            np.testing.assert_allclose(grads[name], oracle[name], rtol=1e-10, atol=1e-12,
                                       err_msg=f"{target} d{name}")
    # the autograd.Function receives one upstream gradient per output, of each one's shape
    leaves = [torch.tensor(inputs[k], requires_grad=True) for k in ("Q", "K", "V")]
    A, O = Kernels(spec, "torch").module.AttentionTwoOutputsFunction.apply(*leaves)
    ((torch.as_tensor(upstream["A"]) * A).sum() + (torch.as_tensor(upstream["O"]) * O).sum()
     ).backward()
    for name, leaf in zip(("Q", "K", "V"), leaves, strict=True):
        np.testing.assert_allclose(leaf.grad.numpy(), oracle[name], rtol=1e-10, atol=1e-12,
                                   err_msg=f"autograd.Function d{name}")


# -- item 6: check on multi-output specs --------------------------------------------------------

runner = CliRunner()


@pytest.mark.parametrize("name", ["independent_outputs", "attention_two_outputs",
                                  "scalar_read_by_vector", "three_output_chain",
                                  "max_of_an_output", "step_contracted",
                                  "input_named_G", "input_named_G_B", "tensor_named_g_t",
                                  "no_differentiable_input"])
def test_check_passes_on_multi_output_specs(spec_path, name):
    """`gradtool check` never stops with an internal error on a spec that derives, and every
    comparison passes (finite differences, autograd, numpy vs torch kernels)."""
    result = runner.invoke(app, ["check", str(spec_path(name)), "--json"])
    assert "internal error" not in result.output
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows and all(r["passed"] for r in rows)
    if name != "no_differentiable_input":
        assert {"finite differences", "torch.autograd"} <= {r["oracle"] for r in rows}


@pytest.mark.parametrize("name", ["input_named_G", "input_named_G_B", "tensor_named_g_t"])
def test_upstream_and_adjoint_names_never_collide_with_the_spec(spec_path, name):
    """An upstream gradient or adjoint named like a tensor of the spec would be read as that
    tensor (``dX = G·G`` for ``Y = X·G``): the engine names them around the spec's names."""
    d = derive(load_spec(spec_path(name)))
    spec_names = set(d.spec.tensors)
    assert not spec_names & set(d.upstream_names.values())
    assert not spec_names & set(d.adjoint_names.values())
    for seed in (1, 2):
        assert_matches_autograd(d, seed=seed)


def test_check_second_order_and_float32_on_output_reading_output(spec_path):
    result = runner.invoke(app, ["check", str(spec_path("square_then_scale")), "--order", "2",
                                 "--float32", "--json"])
    assert "internal error" not in result.output
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {"2nd order (probes)", "float32 kernels vs float64"} <= {r["oracle"] for r in rows}


def test_finite_differences_do_not_inherit_a_zero_jacobian(spec_path):
    """Diagonal colouring maps only outputs that read the input; when the derivation claims
    ∂B/∂X = 0 for a B that reads X (the old bug), finite differences colour nothing and so
    measure B's path instead of assuming it away."""
    d = derive(load_spec(spec_path("independent_outputs")))
    assert diagonal_axes(d, "X") == {0: {"A": 0}}
    assert diagonal_axes(d, "Y") == {0: {"B": 0}}
    d = derive(load_spec(spec_path("square_then_scale")))
    assert diagonal_axes(d, "X") == {0: {"A": 0, "B": 0}}
    n = d.canon["X"][0]
    d = copy.copy(d)  # derive() shares its result: change a copy
    d.closed = {**d.closed, "X": 2 * d.spec.tensors["X"].base[n] * sp.IndexedBase("G_A")[n]}
    d.__dict__.pop("_jacobians", None)  # (drops G_B above)
    assert diagonal_axes(d, "X") == {}


# -- a kernel that disagrees with its own derived formula --------------------------------------

def _break_backward(monkeypatch, spec, target):
    """The generated backward of ``target`` with its first gradient scaled and shifted."""
    module = Kernels(spec, target).module
    right = module.backward

    def wrong(*args, **kwargs):
        grads = list(right(*args, **kwargs))
        grads[0] = grads[0] * 1.5 + 0.1
        return tuple(grads)

    monkeypatch.setattr(module, "backward", wrong)


@pytest.mark.parametrize("max_fd_calls", [4096, 2], ids=["coloured", "probes"])
def test_broken_numpy_kernel_is_a_code_generation_fault(monkeypatch, max_fd_calls):
    spec = load_spec("layernorm")
    _break_backward(monkeypatch, spec, "numpy")
    rows = check_spec(spec, CheckOptions(cases=1, max_fd_calls=max_fd_calls))
    bad = [r for r in rows if not r.passed]
    assert {r.input for r in bad} == {"X"}
    oracles = {r.oracle for r in bad}
    assert {"torch.autograd", "reference", "numpy vs torch kernels"} <= oracles
    assert any(o.startswith("finite differences") for o in oracles)
    for r in bad:
        assert "the generated numpy kernel disagrees with the derived formula" in r.note
        assert "code-generation fault, not a derivation error" in r.note
        assert "dropped or extra term" not in r.note


def test_broken_torch_kernel_is_named(monkeypatch):
    spec = load_spec("linear")
    _break_backward(monkeypatch, spec, "torch")
    rows = check_spec(spec, CheckOptions(cases=1))
    bad = [r for r in rows if not r.passed]
    assert [(r.input, r.oracle) for r in bad] == [("X", "numpy vs torch kernels")]
    assert bad[0].note.startswith("the generated torch kernel disagrees with the derived "
                                  "formula (the numpy kernel agrees with it): a "
                                  "code-generation fault")


@pytest.mark.parametrize("kernel", ["faithful", "broken"])
def test_wrong_formula_is_still_a_derivation_error(private_cache, monkeypatch, kernel):
    """A derivation with dX doubled: a kernel that computes it faithfully is reported against
    the derivation, with the pattern of the error; a kernel that is wrong in another way as
    well is reported as differing from the (wrong) formula too."""
    import gradtool.check.runner as runner_module
    import gradtool.codegen.emit as emit

    def doubled(spec):
        # a copy: derive() hands every caller the one derivation of a spec
        d = copy.copy(derive(spec))
        d.closed = {**d.closed, "X": 2 * d.closed["X"]}
        return d

    monkeypatch.setattr(runner_module, "derive", doubled)
    spec = load_spec("relu")
    if kernel == "faithful":
        monkeypatch.setattr(emit, "derive", doubled)  # the kernels compute the doubled formula
    else:
        _break_backward(monkeypatch, spec, "numpy")
    rows = check_spec(spec, CheckOptions(cases=1, oracles=("autograd",)))
    (bad,) = [r for r in rows if not r.passed]
    if kernel == "faithful":
        assert bad.note.startswith("the derived formula itself disagrees with torch.autograd; "
                                   "global scale: the gradient is 2 ×")
    else:
        assert bad.note.startswith("the derived formula disagrees with torch.autograd, and the "
                                   "generated numpy kernel differs from the formula too")
    assert "code-generation fault" not in bad.note
