"""The bug zoo: hand-written layers with one classic backward mistake each must fail
``check_spec`` on the right input (with the right diagnosis where the pattern has a name), and
their correct twins must pass every row."""

from __future__ import annotations

import importlib

import pytest

from gradtool.check.impl import make_subject
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.spec.loader import builtin_specs, load_spec

SQUARE = {"fixed": {"I": 4, "O": 4}}  # dW and dWᵀ have the same shape only when I = O
OVERLAP = {"fixed": {"S": 1, "K": 3}}  # windows overlap only when the stride is below the size


def layer(target: str):
    """``"file:Class"`` under tests/bug_zoo → the class."""
    module, name = target.split(":")
    return getattr(importlib.import_module(f"tests.bug_zoo.{module}"), name)


def check(spec_name: str, target: str, **options):
    spec = load_spec(spec_name)
    return check_spec(spec, CheckOptions(**options), subject=make_subject(spec, layer(target)))


def failed(rows):
    return [r for r in rows if not r.passed]


# (spec, buggy layer, input whose gradient is wrong, part of the diagnosis or None, options)
BUGGY = [
    ("layernorm", "layernorm:LayerNormNoMeanTerm", "X", "dropped or extra term", {}),
    ("batchnorm", "batchnorm:BatchNormWrongN", "X", None, {}),
    ("div", "elementwise:DivNoSquare", "Y", None, {}),
    ("softmax", "softmax:SoftmaxDiagonal", "X", None, {}),
    ("sigmoid", "elementwise:SigmoidOfX", "X", None, {}),
    ("relu", "elementwise:ReLUWrongMask", "X", None, {}),
    ("elu", "elementwise:ELUAlphaX", "X", None, {}),
    ("dropout", "elementwise:DropoutNoRescale", "X", "global scale: the gradient is 0.5 ×", {}),
    ("log_softmax", "softmax:LogSoftmaxSkipsFirstRow", "X", "only index 0 along axis 0", {}),
    ("mse", "losses:MSESum", "X", "global scale", {}),
    ("mse", "losses:MSENoTwo", "X", "global scale: the gradient is 0.5 ×", {}),
    ("mse", "losses:MSEWrongSign", "X", "wrong sign", {}),
    ("cross_entropy", "losses:CrossEntropyNoMean", "X", "global scale", {}),
    ("linear", "linear:LinearTransposedDW", "W", "transposed", SQUARE),
    ("tanh", "torch_functions:TanhOfX", "X", None, {}),
    ("leaky_relu", "torch_functions:LeakyReLUWrongSide", "X", None, {}),
    ("softmax_cross_entropy", "torch_functions:SoftmaxCrossEntropyNoMean", "X", "global scale",
     {}),
    ("conv2d", "conv:Conv2dOverwritesOverlap", "X", None, OVERLAP),
    ("maxpool2d", "conv:MaxPool2dEveryElement", "X", None, {}),
]

# (spec, buggy layer, contract that must fail)
BROKEN_CONTRACT = [
    ("linear", "linear:LinearAccumulating", "contract: repeatable"),
    ("relu", "elementwise:ReLUInPlace", "contract: grad_out not mutated"),
]

# (spec, correct layer, options): the twin of every layer above
CORRECT = [
    ("layernorm", "layernorm:LayerNorm", {}),
    ("batchnorm", "batchnorm:BatchNorm", {}),
    ("div", "elementwise:Div", {}),
    ("softmax", "softmax:Softmax", {}),
    ("sigmoid", "elementwise:Sigmoid", {}),
    ("relu", "elementwise:ReLU", {}),
    ("elu", "elementwise:ELU", {}),
    ("dropout", "elementwise:Dropout", {}),
    ("log_softmax", "softmax:LogSoftmax", {}),
    ("mse", "losses:MSE", {}),
    ("cross_entropy", "losses:CrossEntropy", {}),
    ("linear", "linear:Linear", {}),
    ("linear", "linear:Linear", SQUARE),
    ("tanh", "torch_functions:Tanh", {}),
    ("leaky_relu", "torch_functions:LeakyReLU", {}),
    ("softmax_cross_entropy", "torch_functions:SoftmaxCrossEntropy", {}),
    ("layernorm", "layernorm:LayerNorm", {"fixed": {"N": 32, "D": 64}, "cases": 1}),
    ("conv2d", "conv:Conv2d", {}),
    ("conv2d", "conv:Conv2d", OVERLAP),
    ("maxpool2d", "conv:MaxPool2d", {}),
]


def assert_caught(spec_name, target, wrong_input, diagnosis, options):
    bad = failed(check(spec_name, target, **options))
    assert bad, f"{target} passed every check"
    assert {r.input for r in bad} == {wrong_input}, [(r.input, r.oracle) for r in bad]
    oracles = {r.oracle for r in bad}
    assert "finite differences" in oracles and "torch.autograd" in oracles, oracles
    if diagnosis:
        notes = [r.note for r in bad]
        assert any(diagnosis in note for note in notes), notes


def assert_contract_broken(spec_name, target, contract):
    rows = check(spec_name, target)
    gradients = [r for r in rows if not r.oracle.startswith("contract")]
    assert not failed(gradients), "the gradients themselves are right"
    row = next(r for r in rows if r.oracle == contract)
    assert not row.passed and row.note, row


def assert_all_pass(spec_name, target, options):
    rows = check(spec_name, target, **options)
    assert rows and not failed(rows), [(r.shape, r.input, r.oracle, r.note) for r in failed(rows)]


@pytest.mark.parametrize("case", BUGGY, ids=lambda c: c[1].split(":")[1])
def test_bug_is_caught(case):
    assert_caught(*case)


@pytest.mark.parametrize("options", [{}, OVERLAP], ids=["disjoint", "overlapping"])
def test_gradient_to_every_tied_maximum_is_caught_at_ties(options):
    """h30 item 7: a max-pool backward that sends G to every tied maximum is right wherever
    the maximum is unique, and checks sample away from ties; the tie probe (inputs rounded
    so that windows tie) finds it, and only it, and names the rule."""
    rows = check("maxpool2d", "conv:MaxPool2dAllTies", **options)
    bad = failed(rows)
    assert bad and {(r.input, r.oracle) for r in bad} == {("X", "derived backward at tied maxima")}
    assert [d.code for d in bad[0].diagnoses][:1] == ["ties_to_every_maximum"], bad[0].note
    assert "sends the gradient to every tie" in bad[0].note


def test_tie_probe_compares_with_torch_max_pool2d_at_ties():
    """The probe's expected gradient at tied maxima (the derived backward) is torch's:
    F.max_pool2d's gradient at the same rounded inputs, so the correct twin passes it."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from gradtool.check.runner import _tied

    spec = load_spec("maxpool2d")
    rng = np.random.default_rng(0)
    x = _tied(spec, {"X": rng.standard_normal((2, 3, 5, 5))})["X"]
    g = rng.standard_normal((2, 3, 3, 3))
    xt = torch.tensor(x, requires_grad=True)
    F.max_pool2d(xt, 3, stride=2, padding=1).backward(torch.tensor(g))
    ours = layer("conv:MaxPool2d")(3, 2, 1)
    ours.forward(x)
    assert (x == 0).sum() > 10  # zeros (as after a ReLU): windows tie
    np.testing.assert_array_equal(ours.backward(g), xt.grad.numpy())
    rows = check("maxpool2d", "conv:MaxPool2d")
    assert any(r.oracle == "derived backward at tied maxima" and r.passed for r in rows)


@pytest.mark.parametrize("case", BROKEN_CONTRACT, ids=lambda c: c[1].split(":")[1])
def test_broken_contract_is_caught(case):
    assert_contract_broken(*case)


@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c[1].split(":")[1] + str(c[2] or ""))
def test_correct_twin_passes(case):
    assert_all_pass(*case)


def test_every_bug_has_a_correct_twin():
    correct = {(spec, target.split(":")[0]) for spec, target, _ in CORRECT}
    buggy = [(spec, t) for spec, t, *_ in BUGGY] + [(spec, t) for spec, t, _ in BROKEN_CONTRACT]
    assert all((spec, t.split(":")[0]) in correct for spec, t in buggy)
    assert len(buggy) >= 12


@pytest.mark.parametrize("name", sorted(builtin_specs()))
def test_float32_mode_passes_generated_kernels(name):
    rows = check_spec(load_spec(name), CheckOptions(dtype="float32"))
    assert any(r.oracle == "float32 kernels vs float64" for r in rows)
    assert not failed(rows), [(r.shape, r.input, r.oracle, r.note) for r in failed(rows)]


def test_one_jacobian_entry_off_by_1e3_in_a_32x64_layernorm():
    cls = layer("layernorm:LayerNormOneEntryOff")
    rows = check("layernorm", "layernorm:LayerNormOneEntryOff", fixed={"N": 32, "D": 64},
                 cases=1)
    assert {r.shape for r in rows} == {"D=64,N=32"}
    bad = failed(rows)
    # every oracle sees it, the probe at exact zeros of the inputs too
    assert {r.oracle for r in bad} == {"finite differences", "torch.autograd", "reference",
                                       "torch.autograd at zeros of X, beta, gamma"}
    for r in bad:
        assert (r.input, r.index) == ("X", list(cls.B)), r
        assert f"only index {cls.B[0]} along axis 0" in r.note


def test_a_loss_that_ignores_its_upstream_gradient_is_named_so():
    """A loss whose backward drops grad_out: its X rows say so (not "global scale … (sum vs
    mean?)", which the random upstream value made it look like), and the contract that the
    backward is linear in grad_out fails."""
    rows = failed(check("mse", "losses:MSEIgnoresUpstream"))
    x_rows = [r for r in rows if r.input == "X"]
    assert x_rows and all("ignores the upstream gradient" in r.note for r in x_rows)
    assert any(r.input == "backward" and "linear in grad_out" in r.oracle for r in rows)
