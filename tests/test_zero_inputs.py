"""Gradients at exact zeros of the inputs, and the tie rule of element-wise Max/Min.

Random draws are never exactly 0, so a backward that is 0/0 there passes every comparison at
sampled inputs: ``Y = X^p`` with a hyper-parameter ``p`` used to derive ``dX = p·G·Y/X``, NaN
at X = 0 where the derivative is 0 (p > 1). Each gradient here is compared in float64 with
torch.autograd on a forward written in torch (not gradtool's), or with its analytic value.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gradtool.check.kernels import Kernels, to_numpy
from gradtool.check.runner import CheckOptions, Subject, check_spec, zero_probe
from gradtool.spec.loader import load_spec
from gradtool.symbolic.printing import text
from gradtool.symbolic.reverse import derive

HEAD = """\
from gradtool.lang import Spec, Max, Min, tanh

spec = Spec("{name}", "a test spec")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
"""

POWER = HEAD + """\
X = spec.input("X", N, D{domain})
p = spec.hyper("p", {p})
spec.output("Y", [n, d], X[n, d] ** p)
"""

# a named power of a let that is 0 where X is: t = tanh(X)^p
POWER_OF_LET = HEAD + """\
X = spec.input("X", N, D)
p = spec.hyper("p", 3.0)
h = spec.let("h", [n, d], tanh(X[n, d]))
t = spec.let("t", [n, d], h[n, d] ** p)
spec.output("Y", [n, d], t[n, d] + X[n, d] * t[n, d])
"""


def _spec(tmp_path, source: str, name: str = "power"):
    path = tmp_path / f"{name}.py"
    path.write_text(source)
    return load_spec(path)


def _dims(spec, **sizes):
    return {spec.dim_symbols[k]: v for k, v in sizes.items()}


def _kernel_grads(spec, inputs: dict, dims: dict, upstream: dict) -> dict:
    """∂L/∂x of the generated NumPy and torch kernels: {target: {name: array}}."""
    out = {}
    for target in ("numpy", "torch"):
        k = Kernels(spec, target)
        with np.errstate(all="ignore"):
            _, saved, _ = k.forward(inputs, dims)
            out[target] = {n: to_numpy(g) for n, g in k.backward(upstream, saved, dims).items()}
    return out


def _torch_grads(fn, inputs: dict, upstream: np.ndarray) -> dict:
    """∂⟨G, fn(inputs)⟩/∂x by torch.autograd, float64."""
    leaves = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True)
              for k, v in inputs.items()}
    loss = (torch.tensor(upstream) * fn(**leaves)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return {k: g.numpy() for k, g in zip(leaves, grads, strict=True)}


# X with exact zeros (and, for p = 1.5, without negatives: X^1.5 is real only there)
X_ZEROS = np.array([[0.0, -1.5, 0.7], [2.0, 0.0, -0.3]])


@pytest.mark.parametrize("p", [2.0, 3.0, 1.5])
def test_hyper_power_has_its_derivative_at_zero(tmp_path, p):
    """The issue's example: Y = X^p at X = 0. dX = p·X^(p−1)·G is 0 there for p > 1; both
    kernels agree with torch.autograd of X**p and with the analytic value, and the printed
    backward divides by nothing."""
    spec = _spec(tmp_path, POWER.format(name="power", domain="", p=p))
    x = np.abs(X_ZEROS) if p % 1 else X_ZEROS
    g = np.random.default_rng(0).standard_normal(x.shape)
    got = _kernel_grads(spec, {"X": x}, _dims(spec, N=2, D=3), {"Y": g})
    expect = _torch_grads(lambda X: X ** p, {"X": x}, g)["X"]
    analytic = p * np.abs(x) ** (p - 1) * np.sign(x) ** round(p - 1) * g
    np.testing.assert_allclose(expect, analytic, rtol=1e-14, atol=0)
    for target, grads in got.items():
        np.testing.assert_allclose(grads["X"], expect, rtol=1e-12, atol=0, err_msg=target)
    assert np.all(got["numpy"]["X"][x == 0] == 0)
    assert "/" not in text(derive(spec).closed["X"])


def test_named_power_of_a_let_is_finite_where_its_base_is_zero(tmp_path):
    """t = tanh(X)^p named: the adjoint of h is p·h^(p−1)·g_t, not p·t·g_t/h (h = 0 at
    X = 0)."""
    spec = _spec(tmp_path, POWER_OF_LET.format(name="power_let"), "power_let")
    g = np.random.default_rng(1).standard_normal(X_ZEROS.shape)
    got = _kernel_grads(spec, {"X": X_ZEROS}, _dims(spec, N=2, D=3), {"Y": g})
    expect = _torch_grads(lambda X: torch.tanh(X) ** 3.0 * (1 + X), {"X": X_ZEROS}, g)["X"]
    for target, grads in got.items():
        np.testing.assert_allclose(grads["X"], expect, rtol=1e-12, atol=1e-15, err_msg=target)


def test_a_positive_input_may_be_divided_by(tmp_path):
    """Where the input's domain excludes 0, the output may stand for the power:
    dX = p·G·Y/X (shorter, and right on the whole domain)."""
    spec = _spec(tmp_path, POWER.format(name="power_pos", domain=', domain="positive"',
                                        p=2.5), "power_pos")
    d = derive(spec)
    assert text(d.closed["X"]) == "p·G[n,d]·Y[n,d]/X[n,d]"
    x = np.array([[0.5, 1.5], [2.0, 0.25]])
    g = np.random.default_rng(2).standard_normal(x.shape)
    got = _kernel_grads(spec, {"X": x}, _dims(spec, N=2, D=2), {"Y": g})
    expect = _torch_grads(lambda X: X ** 2.5, {"X": x}, g)["X"]
    for target, grads in got.items():
        np.testing.assert_allclose(grads["X"], expect, rtol=1e-12, err_msg=target)


def test_a_quotient_that_was_already_there_may_name_the_output(tmp_path):
    """d√X = 1/(2·√X) divides by zero at X = 0 already: naming √X as Y adds no pole, so
    dX = G/(2·Y), and it agrees with autograd of torch.sqrt."""
    spec = _spec(tmp_path, HEAD.format(name="root").replace("tanh", "sqrt") + """\
X = spec.input("X", N, D)  # real: Y/X would not be allowed, 1/Y is
spec.output("Y", [n, d], sqrt(X[n, d]))
""", "root")
    assert text(derive(spec).closed["X"]) == "G[n,d]/(2·Y[n,d])"
    x = np.array([[0.5, 1.5], [2.0, 0.25]])
    g = np.random.default_rng(4).standard_normal(x.shape)
    got = _kernel_grads(spec, {"X": x}, _dims(spec, N=2, D=2), {"Y": g})
    expect = _torch_grads(lambda X: torch.sqrt(X), {"X": x}, g)["X"]
    for target, grads in got.items():
        np.testing.assert_allclose(grads["X"], expect, rtol=1e-13, err_msg=target)


def test_zero_probe_zeroes_only_inputs_whose_domain_holds_zero(tmp_path):
    spec = _spec(tmp_path, HEAD.format(name="domains") + """\
X = spec.input("X", N, D)
P = spec.input("P", N, D, domain="positive")
spec.output("Y", [n, d], X[n, d] * P[n, d])
""", "domains")
    inputs = {"X": np.full((2, 3), 0.5), "P": np.full((2, 3), 0.5)}
    probed = zero_probe(spec, inputs)
    assert set(probed) == {"X"}
    np.testing.assert_array_equal(probed["X"], [[0.0, 0.5, 0.0], [0.5, 0.0, 0.5]])
    assert np.all(inputs["X"] == 0.5)  # the sampled inputs are left as they were


class _QuotientBackward(Subject):
    """The generated kernels, with the backward of X^p replaced by p·G·Y/X: the old derived
    form, right wherever X ≠ 0."""

    def run(self, inputs, dims, upstream):
        outs, grads, state = super().run(inputs, dims, upstream)
        with np.errstate(all="ignore"):
            grads = {"X": 2.0 * upstream["Y"] * outs["Y"] / inputs["X"]}
        return outs, grads, state


def test_check_finds_a_backward_that_is_nan_at_zero_inputs(tmp_path):
    """``check`` compares the gradients at exact zeros of X with torch.autograd: p·G·Y/X
    passes at every sampled input and fails there, with its NaN named."""
    spec = _spec(tmp_path, POWER.format(name="power", domain="", p=2.0))
    options = CheckOptions(cases=2, oracles=("fd", "autograd"))
    rows = check_spec(spec, options, subject=_QuotientBackward(spec))
    failed = [r for r in rows if not r.passed]
    assert [r.oracle for r in failed] == ["torch.autograd at zeros of X"], failed
    assert failed[0].analytic != failed[0].analytic  # NaN
    assert failed[0].numeric == 0.0
    # the derived formula (p·X^(p−1)·G) agrees with autograd there: the kernel is at fault
    assert [dg.code for dg in failed[0].diagnoses] == ["codegen_fault"]
    assert "kernel nan, formula" in failed[0].note
    rows = check_spec(spec, options)
    assert rows and all(r.passed for r in rows)
    assert any(r.oracle == "torch.autograd at zeros of X" for r in rows)


def test_zero_probe_skips_zeros_at_a_kink(tmp_path):
    """ReLU at 0 is a kink: both one-sided slopes are valid there, so no zero row."""
    spec = _spec(tmp_path, HEAD.format(name="relu0") + """\
X = spec.input("X", N, D)
spec.output("Y", [n, d], Max(X[n, d], 0))
""", "relu0")
    rows = check_spec(spec, CheckOptions(cases=1, oracles=("autograd",)))
    assert rows and all(r.passed for r in rows)
    assert not any("zeros" in r.oracle for r in rows)


# -- element-wise Max/Min ties ----------------------------------------------------------------

MIN_MAX = HEAD + """\
X = spec.input("X", N, D)
Z = spec.input("Z", N, D)
spec.output("Y", [n, d], {body})
"""


def _stack_max(*args):
    return torch.stack(args).max(0).values  # ties: the gradient goes to the first argument


def _stack_min(*args):
    return torch.stack(args).min(0).values


@pytest.mark.parametrize("body, reference", [
    # the breaker's minmax2: Max and Min of the same pair
    ("Max(X[n, d], Z[n, d]) + 2 * Min(X[n, d], Z[n, d])",
     lambda X, Z: _stack_max(X, Z) + 2 * _stack_min(X, Z)),
    # Z is read before the Max (3·Z comes first), X is its first printed argument
    ("3 * Z[n, d] + Max(X[n, d], Z[n, d])", lambda X, Z: 3 * Z + _stack_max(X, Z)),
])
def test_elementwise_ties_go_to_the_first_printed_argument(tmp_path, body, reference):
    """At X == Z the whole gradient of Max(X, Z) (and Min) goes to X, its first argument as
    derive prints it, whatever order the reads are met in; torch.max(stack, 0) breaks ties
    the same way. Away from ties the same kernels agree with it too."""
    spec = _spec(tmp_path, MIN_MAX.format(name="ties", body=body), "ties")
    assert "Max(X[n,d], Z[n,d])" in text(spec.statements[-1].rhs)
    rng = np.random.default_rng(3)
    z = np.round(rng.standard_normal((3, 4)))
    x = np.where(rng.random((3, 4)) < 0.5, z, z + rng.choice([-1.0, 1.0], (3, 4)))
    assert (x == z).any() and (x != z).any()
    g = rng.standard_normal((3, 4))
    got = _kernel_grads(spec, {"X": x, "Z": z}, _dims(spec, N=3, D=4), {"Y": g})
    expect = _torch_grads(reference, {"X": x, "Z": z}, g)
    for target, grads in got.items():
        for name in ("X", "Z"):
            np.testing.assert_allclose(grads[name], expect[name], rtol=1e-14, atol=0,
                                       err_msg=f"{target} d{name}")


def test_check_impl_fails_a_hand_written_backward_that_is_nan_at_zero_inputs(tmp_path):
    """An autograder's case: a student's power layer whose backward is p·G·Y/X passes at every
    random input and fails ``check --impl`` at the exact zeros; the right p·G·X^(p−1)
    passes."""
    import json

    from typer.testing import CliRunner

    from gradtool.cli import app

    spec = tmp_path / "power.py"
    spec.write_text(POWER.format(name="power", domain="", p=2.0))
    layer = tmp_path / "power_layer.py"
    layer.write_text("import numpy as np\n\n\n"
                     "class Power:\n"
                     "    def __init__(self, p=2.0):\n"
                     "        self.p = p\n\n"
                     "    def forward(self, X):\n"
                     "        self.X, self.Y = X, X ** self.p\n"
                     "        return self.Y\n\n"
                     "    def backward(self, G):\n"
                     "        return self.p * G * self.X ** (self.p - 1)\n\n\n"
                     "class PowerByQuotient(Power):\n"
                     "    def backward(self, G):\n"
                     "        return self.p * G * self.Y / self.X\n")
    runner = CliRunner()
    ok = runner.invoke(app, ["check", str(spec), "--impl", f"{layer}:Power", "--json"])
    assert ok.exit_code == 0, ok.output
    bad = runner.invoke(app, ["check", str(spec), "--impl", f"{layer}:PowerByQuotient",
                              "--json"])
    assert bad.exit_code == 1, bad.output
    failed = [r for r in json.loads(bad.stdout)["rows"] if not r["passed"]]
    assert {r["oracle"] for r in failed} == {"torch.autograd at zeros of X"}, failed
