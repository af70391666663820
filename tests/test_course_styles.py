"""Layers written the way course assignments write them (tests/course_styles/) pass as
written, with at most a documented option, and a buggy twin of each fails with the right
diagnosis. Files are loaded as ``gradtool check --impl FILE:NAME`` loads them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gradtool.check.impl import load_impl, make_subject
from gradtool.check.runner import CheckOptions, check_spec
from gradtool.cli import app
from gradtool.spec.loader import load_spec

HERE = Path(__file__).parent / "course_styles"
CMU_BN = {"C": "num_features", "gamma": "BW", "beta": "Bb", "running_mean": "running_M",
          "running_var": "running_V"}
SIZES = {"I": "in_features", "O": "out_features"}
UVA_LINEAR = {**SIZES, "W": "weight", "b": "bias"}
ONE_HOT = {"one_hot": ("T",)}


def check(spec_name, target, mapping=None, settings=None, **options):
    spec = load_spec(spec_name)
    file, name = target.split(":")
    subject = make_subject(spec, load_impl(f"{HERE / file}:{name}"), mapping, settings)
    return check_spec(spec, CheckOptions(**options), subject=subject)


def failed(rows):
    return [r for r in rows if not r.passed]


def settings_note(rows):
    return " ".join(r.note for r in rows if r.input == "settings")


# (spec, correct layer, --map, --set, options, what the settings row says)
CORRECT = [
    ("mse", "losses_cmu.py:MSELoss", None, None, {}, ""),
    ("cross_entropy", "losses_uva.py:CrossEntropyModule", None, None, {}, ""),
    ("cross_entropy", "losses_uva.py:CrossEntropyModule", None, None, ONE_HOT, ""),
    ("cross_entropy", "losses_uva.py:OneHotCrossEntropy", None, None, ONE_HOT, ""),
    ("batchnorm", "batchnorm_cmu.py:BatchNorm1d", CMU_BN, None, {},
     "eps=1e-08 (your layer's `eps`); gamma stored as (1, C)"),
    ("batchnorm", "batchnorm_cmu.py:BatchNorm1dBiased", CMU_BN, {"correction": 0.0}, {},
     "correction=0 (--set)"),
    ("linear", "linear_layouts.py:LinearModule", UVA_LINEAR, None, {},
     "W stored transposed, as (I, O); b stored as (1, O)"),
    ("linear", "linear_layouts.py:Linear", SIZES, None, {}, "b stored as (O, 1)"),
    ("sigmoid", "script_style.py:Sigmoid", None, None, {}, ""),
    ("batchnorm", "torch_functions.py:BatchNormFunction", None, None, {},
     "eps=0.001 (the default of `eps` in forward)"),
    ("relu", "torch_functions.py:ReLUInPlace", None, None, {}, ""),
]

# (spec, buggy twin, --map, options, input whose check fails, part of the diagnosis)
BUGGY = [
    ("mse", "losses_cmu.py:MSELossSum", None, {}, "X", "global scale"),
    ("cross_entropy", "losses_uva.py:CrossEntropyModuleNoMean", None, {}, "X", "global scale"),
    ("cross_entropy", "losses_uva.py:OneHotCrossEntropyWrongSign", None, ONE_HOT, "X",
     "wrong sign"),
    ("batchnorm", "batchnorm_cmu.py:BatchNorm1dSwapped", CMU_BN, {}, {"gamma", "beta"},
     "swapped: the gradients of gamma and beta are each other's expected values"),
    ("batchnorm", "batchnorm_cmu.py:BatchNorm1dNoEpsInBackward", CMU_BN, {}, "X", ""),
    ("linear", "linear_layouts.py:LinearModuleMeanBias", UVA_LINEAR, {}, "b", "global scale"),
    ("linear", "linear_layouts.py:LinearWrongSign", SIZES, {}, "X", "wrong sign"),
    ("sigmoid", "script_style.py:SigmoidOfInput", None, {}, "X", ""),
    ("batchnorm", "torch_functions.py:BatchNormFunctionSwapped", None, {}, {"gamma", "beta"},
     "swapped"),
]


@pytest.mark.parametrize("case", CORRECT, ids=lambda c: c[1].split(":")[1] + str(c[4] or ""))
def test_course_style_layer_passes_as_written(case):
    spec, target, mapping, settings, options, says = case
    rows = check(spec, target, mapping, settings, **options)
    assert rows and not failed(rows), [(r.shape, r.input, r.oracle, r.note)
                                       for r in failed(rows)]
    assert says in settings_note(rows)


@pytest.mark.parametrize("case", BUGGY, ids=lambda c: c[1].split(":")[1])
def test_course_style_twin_is_caught(case):
    spec, target, mapping, options, wrong, diagnosis = case
    bad = failed(check(spec, target, mapping, **options))
    wrong = {wrong} if isinstance(wrong, str) else wrong
    assert {r.input for r in bad} == wrong, [(r.input, r.oracle, r.note) for r in bad]
    assert {"finite differences", "torch.autograd"} <= {r.oracle for r in bad}
    # one diagnosis per input and shape, whichever oracle saw it
    for name, shape in {(r.input, r.shape) for r in bad}:
        notes = {r.note.rpartition("; ")[2] for r in bad
                 if (r.input, r.shape) == (name, shape)}
        assert len(notes) == 1, notes
        assert diagnosis in notes.pop()


def test_no_argument_loss_backward_gets_the_contract_checks_that_fit():
    rows = check("mse", "losses_cmu.py:MSELoss")
    contracts = {r.oracle for r in rows if r.oracle.startswith("contract")}
    assert contracts == {"contract: repeatable", "contract: inputs not mutated"}


def test_missing_mark_dirty_is_flagged():
    rows = check("relu", "torch_functions.py:ReLUInPlaceUnmarked")
    assert [(r.oracle, r.passed) for r in failed(rows)] == [
        ("contract: in-place inputs marked dirty", False)]
    assert "ctx.mark_dirty(X)" in failed(rows)[0].note


def test_one_hot_only_loss_fails_on_soft_targets_in_its_forward():
    bad = failed(check("cross_entropy", "losses_uva.py:OneHotCrossEntropy"))
    assert any(r.input == "L (forward)" for r in bad)


def test_float32_layer_is_named_as_precision():
    rows = check("sigmoid", "script_style.py:SigmoidFloat32")
    assert not failed(rows)
    assert any("float32 precision" in r.note for r in rows)
    bad = failed(check("sigmoid", "script_style.py:SigmoidFloat32", tol=1e-9))
    assert bad and all("float32 precision" in r.note for r in bad), [r.note for r in bad]


def test_epsilon_stabiliser_is_a_note_not_a_failure():
    rows = check("cross_entropy", "losses_uva.py:CrossEntropyModule", cases=2)
    assert not failed(rows)
    assert any("harmless" in r.note for r in rows)
    assert any("inputs×0.1" in r.shape for r in rows)


def test_set_overrides_a_hyper_parameter_read_from_the_layer():
    rows = check("batchnorm", "batchnorm_cmu.py:BatchNorm1d", CMU_BN, {"eps": 1e-5}, cases=2)
    assert failed(rows)  # the layer keeps its own 1e-8; the oracles now use 1e-5
    assert "eps=1e-05 (--set)" in settings_note(rows)


def test_biased_running_variance_fails_only_its_update_without_set():
    bad = failed(check("batchnorm", "batchnorm_cmu.py:BatchNorm1dBiased", CMU_BN, cases=2))
    assert {r.input for r in bad} == {"running_var (state update)"}
    assert {r.oracle for r in bad} == {"spec evaluator", "reference"}


runner = CliRunner()


def test_script_style_file_from_the_command_line():
    result = runner.invoke(app, ["check", "sigmoid", "--impl",
                                 f"{HERE / 'script_style.py'}:Sigmoid", "--json"])
    assert result.exit_code == 0, result.output
    assert all(row["passed"] for row in json.loads(result.stdout)["rows"])
    assert "learning rate 0.1" in result.stderr and "forward" in result.stderr


def test_cli_options_for_course_styles():
    args = ["check", "batchnorm", "--impl", f"{HERE / 'batchnorm_cmu.py'}:BatchNorm1d",
            "--shape", "N=4,C=3", "--shapes", "2", "--json"]
    for key, value in CMU_BN.items():
        args += ["--map", f"{key}={value}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {(tuple(sorted(r["shape"].items())), r["input_scale"]) for r in rows
            if r["shape"]} == {((("C", 3), ("N", 4)), 1.0), ((("C", 3), ("N", 4)), 0.1)}
    result = runner.invoke(app, args + ["--set", "eps=1e-5"])
    assert result.exit_code == 1
    result = runner.invoke(app, args + ["--set", "nothere=1"])
    assert result.exit_code == 1  # with --json, the error is a JSON object on stdout
    assert "not a hyper-parameter of batchnorm" in json.loads(result.stdout)["error"]["message"]


def test_gradient_name_mapped_on_its_own(tmp_path):
    path = tmp_path / "lin.py"
    path.write_text((HERE / "linear_layouts.py").read_text().replace("dLdW", "weight_gradient"))
    args = ["check", "linear", "--impl", f"{path}:Linear", "--map", "I=in_features",
            "--map", "O=out_features", "--show", "summary"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and "holds no gradient for `W`" in result.stderr
    assert "--map dW=" in result.stderr
    result = runner.invoke(app, args + ["--map", "dW=weight_gradient"])
    assert result.exit_code == 0, result.output


def test_transposed_weight_stated_with_map():
    mapping = {**UVA_LINEAR, "W": "weight.T"}
    rows = check("linear", "linear_layouts.py:LinearModule", mapping, cases=2)
    assert not failed(rows)
    assert "W stored transposed (--map)" in settings_note(rows)


def test_squeeze_at_batch_one_names_n_1(tmp_path):
    path = tmp_path / "squeezing.py"
    path.write_text(
        "import numpy as np\n\n\nclass Linear:\n"
        "    def __init__(self, I, O):\n        self.W, self.b = np.zeros((O, I)), np.zeros(O)\n\n"
        "    def forward(self, X):\n        self.X = X.squeeze()\n"
        "        return self.X @ self.W.T + self.b\n\n"
        "    def backward(self, G):\n        self.dW = G.T @ self.X\n"
        "        self.db = G.sum(axis=0)\n        return G @ self.W\n")
    result = runner.invoke(app, ["check", "linear", "--impl", f"{path}:Linear"])
    assert result.exit_code == 1
    assert "N=1" in result.stderr.strip().splitlines()[-1]
    result = runner.invoke(app, ["check", "linear", "--impl", f"{path}:Linear", "--no-batch-one",
                                 "--show", "summary"])
    assert result.exit_code == 0, result.output


def test_option_errors_are_one_line():
    target = f"{HERE / 'losses_uva.py'}:CrossEntropyModule"
    for extra, says in ((["--one-hot", "Q"], "--one-hot Q: not an input of cross_entropy"),
                        (["--shape", "Q=2"], "--shape names Q"),
                        (["--set", "eps=1"], "not a hyper-parameter of cross_entropy"),
                        (["--set", "eps=abc"], "'abc' is not a number"),
                        (["--map", "dQ=x"], "--map names `dQ`")):
        result = runner.invoke(app, ["check", "cross_entropy", "--impl", target, *extra])
        assert result.exit_code == 1 and says in result.stderr, (extra, result.stderr)
    result = runner.invoke(app, ["check", "relu", "--set", "eps=1"])
    assert result.exit_code == 1 and "apply to a layer checked with --impl" in result.stderr


def test_failure_lines_tell_values_apart_and_count_the_rest():
    from rich.console import Console

    from gradtool.check.runner import Row
    from gradtool.render import render_check

    rows = [Row("s", f"X{k}", "torch.autograd", "N=2", 1e-6, 1e-6, [0], 3.2600001, 3.26,
                1e-9, False, "") for k in range(12)]
    console = Console(width=200, record=True)
    render_check(console, rows, show="summary")
    text = console.export_text()
    assert "ours 3.2600001, expected 3.26," in text
    assert "2 more failures not shown" in text


def test_function_backward_returning_none_is_named(tmp_path):
    path = tmp_path / "bn_none.py"
    path.write_text((HERE / "torch_functions.py").read_text().replace(
        "dbeta = G.sum(dim=0) if need_beta else None", "dbeta = None"))
    result = runner.invoke(app, ["check", "batchnorm", "--impl", f"{path}:BatchNormFunction"])
    assert result.exit_code == 1
    assert "BatchNormFunction.backward returned None for `beta`" in result.stderr


def test_every_course_style_has_a_buggy_twin():
    files = {target.split(":")[0] for _, target, *_ in CORRECT}
    twins = {target.split(":")[0] for _, target, *_ in BUGGY} | {"torch_functions.py"}
    assert files == twins
    assert files == {p.name for p in HERE.glob("*.py")} - {"__init__.py",
                                                          "activation_helpers.py"}


def test_a_backward_that_takes_star_grads_gets_the_upstream_gradient(tmp_path):
    """``backward(self, *grads)`` takes the upstream gradient(s), as a backward with named
    arguments does; a wrong one of that form still fails."""
    path = tmp_path / "varargs.py"
    path.write_text("import numpy as np\n\n\n"
                    "class Tanh:\n"
                    "    def forward(self, *inputs):\n"
                    "        self.Y = np.tanh(inputs[0])\n"
                    "        return self.Y\n\n"
                    "    def backward(self, *grads):\n"
                    "        return grads[0] * (1 - self.Y ** 2)\n\n\n"
                    "class WrongTanh(Tanh):\n"
                    "    def backward(self, *grads):\n"
                    "        return grads[0] * (1 - self.Y)\n")
    assert runner.invoke(app, ["check", "tanh", "--impl", f"{path}:Tanh"]).exit_code == 0
    assert runner.invoke(app, ["check", "tanh", "--impl", f"{path}:WrongTanh"]).exit_code == 1
