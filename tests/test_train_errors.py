"""gradtool train on bad input: one clear error naming the option, model file and layer, raised
before the run folder is written; and --resume, which runs longer on the schedule of the new
number of epochs and refuses the options it would otherwise ignore. Tiny runs on 300 digits."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.nn import SpecModule
from gradtool.nn.models import ModelError
from gradtool.nn.plan import LayerError
from gradtool.train import TrainConfig, train
from gradtool.train.config import ConfigError

QUICK = dict(limit=300, hidden=(16,), batch_size=32)
CLI_QUICK = ["--limit", "300", "--hidden", "16", "--epochs", "1"]
# for a model file, which has its own layers (--hidden would be refused)
FILE_QUICK = dict(limit=300, batch_size=32)
CLI_FILE_QUICK = ["--limit", "300", "--epochs", "1"]

# a user's spec with three inputs, as an attention layer has
THREE_INPUTS = """\
from gradtool.lang import Spec

spec = Spec("attn", "three inputs")
N, D = spec.dims("N D")
n, d = spec.indices(n=N, d=D)
Q = spec.input("Q", N, D)
K = spec.input("K", N, D)
V = spec.input("V", N, D)
spec.output("Y", [n, d], Q[n, d] * K[n, d] + V[n, d])
"""


def _model_file(tmp_path, last: str, loss: str | None = None, name: str = "m.toml"):
    """flatten → linear 64 → 16 → relu → ``last`` (TOML lines of the last layer's table)."""
    text = f'loss = "{loss}"\n' if loss else ""
    text += ('[[layers]]\nflatten = true\n\n[[layers]]\nspec = "linear"\nI = 64\nO = 16\n\n'
             f'[[layers]]\nspec = "relu"\n\n[[layers]]\n{last}\n')
    path = tmp_path / name
    path.write_text(text)
    return path


def _cli_error(tmp_path, monkeypatch, args) -> str:
    """The output of a ``gradtool train`` that must fail with one error line and write no
    run folder."""
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", *args])
    assert result.exit_code == 1, result.output
    assert "internal error" not in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists() and not (tmp_path / "runs").exists()
    return " ".join(result.output.split())  # rich may wrap the line


@pytest.mark.parametrize("hidden", ["0", "16,-3"])
def test_hidden_sizes_must_be_positive(tmp_path, monkeypatch, hidden):
    out = _cli_error(tmp_path, monkeypatch, [*CLI_QUICK, "--hidden", hidden, "--out", "r"])
    assert f"--hidden {hidden}: every hidden size must be a positive integer" in out


@pytest.mark.parametrize("option, value, message", [
    ("threads", -1, "--threads must be a number ≥ 0, got -1"),
    ("momentum", -0.5, "--momentum must be a number ≥ 0"),
    ("weight_decay", float("nan"), "--weight-decay must be a number ≥ 0, got nan"),
    ("lr", float("nan"), "--lr must be a positive number, got nan"),
    ("lr", float("inf"), "--lr must be a positive number, got inf")])
def test_option_values_out_of_range_are_refused(option, value, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**{option: value}).validate()


def test_a_batch_size_the_model_cannot_train_on_is_refused(tmp_path, monkeypatch):
    """Batch norm over one sample: every batch, not only a last short one, so no epoch could
    run; refused before the run folder is written."""
    out = _cli_error(tmp_path, monkeypatch, [*CLI_QUICK, "--norm", "batchnorm",
                                             "--batch-size", "1", "--out", "r"])
    assert "--batch-size 1 gives batches of 1 sample per process, which the model cannot " \
           "train on: batchnorm in training mode needs N ≥ 2" in out


@pytest.mark.parametrize("value", ["-10", "0", "7.5", '"ten"', "true"])
def test_model_file_sizes_must_be_positive_integers(tmp_path, value):
    path = _model_file(tmp_path, f'spec = "linear"\nI = 16\nO = {value}')
    with pytest.raises(ModelError, match=r"layer 4 \(linear\): linear: size O must be a "
                                         r"positive integer") as info:
        train(TrainConfig(model=str(path), out=str(tmp_path / "r"), epochs=1, **FILE_QUICK))
    assert info.value.file == str(path)
    assert not (tmp_path / "r").exists()


def test_a_size_the_spec_lets_be_zero_may_be_zero():
    """maxpool2d declares min_size(P=0): no padding is P = 0, but a stride of 0 is no size."""
    pool = SpecModule("maxpool2d", K=2, S=2, P=0)
    assert pool(torch.zeros(1, 1, 4, 4)).shape == (1, 1, 2, 2)
    with pytest.raises(LayerError, match="size P must be an integer ≥ 0, got -1"):
        SpecModule("maxpool2d", K=2, S=2, P=-1)
    with pytest.raises(LayerError, match="size S must be a positive integer, got 0"):
        SpecModule("maxpool2d", K=2, S=0, P=0)
    with pytest.raises(LayerError, match="hyper-parameter eps must be a number"):
        SpecModule("layernorm", D=4, eps="small")


@pytest.mark.parametrize("loss, backend", [(None, "torch"), (None, "numpy"), ("mse", "torch")])
def test_output_width_must_equal_the_number_of_classes(tmp_path, loss, backend):
    """Digits have 10 classes: a last linear with O = 7 is named (its file, layer and size)
    before anything is written, for the label loss and for mse's one-hot targets; a relu
    after it does not hide which layer sets the width."""
    path = _model_file(tmp_path, 'spec = "linear"\nI = 16\nO = 7\n\n[[layers]]\nspec = "relu"',
                       loss=loss)
    with pytest.raises(ModelError, match=r"the model gives samples of shape \(7,\) \(from layer "
                                         r"4, linear, its O = 7\), but the data has 10 "
                                         r"classes") as info:
        train(TrainConfig(model=str(path), out=str(tmp_path / "r"), epochs=1, backend=backend,
                          **FILE_QUICK))
    assert info.value.file == str(path) and info.value.hint == "set O = 10 in layer 4"
    assert not (tmp_path / "r").exists()


def test_a_model_without_parameters_is_refused(tmp_path, monkeypatch):
    (tmp_path / "m.toml").write_text('[[layers]]\nflatten = true\n\n[[layers]]\n'
                                     'spec = "softmax"\n')
    out = _cli_error(tmp_path, monkeypatch, [*CLI_FILE_QUICK, "--model", "m.toml", "--out", "r"])
    assert "m.toml: the model has no parameters to train (its layers: flatten, softmax)" in out


@pytest.mark.parametrize("activation, why", [
    ("attn.py", "attn takes 3 inputs (Q, K, V), but a layer of a sequential model gets one"),
    ("softmax_cross_entropy", "softmax_cross_entropy takes 2 inputs (X, T)")])
def test_activation_must_take_one_input(tmp_path, monkeypatch, activation, why):
    (tmp_path / "attn.py").write_text(THREE_INPUTS)
    out = _cli_error(tmp_path, monkeypatch, [*CLI_QUICK, "--activation", activation,
                                             "--out", "r"])
    # a spec file is named by its absolute path, as the run records it
    named = tmp_path / activation if activation.endswith(".py") else activation
    assert f"--activation {named}: {why}" in out
    assert "an element-wise spec" in out


def test_model_file_layer_and_loss_specs_of_the_wrong_kind(tmp_path):
    layer = _model_file(tmp_path, 'spec = "mse"', name="layer.toml")
    with pytest.raises(ModelError, match="layer 4: mse takes 2 inputs") as info:
        train(TrainConfig(model=str(layer), out=str(tmp_path / "r"), epochs=1, **FILE_QUICK))
    assert info.value.file == str(layer)
    loss = _model_file(tmp_path, 'spec = "linear"\nI = 16\nO = 10', loss="relu",
                       name="loss.toml")
    with pytest.raises(ModelError, match=r"loss: relu takes 1 input \(X\), but a loss takes "
                                         "two"):
        train(TrainConfig(model=str(loss), out=str(tmp_path / "r"), epochs=1, **FILE_QUICK))
    assert not (tmp_path / "r").exists()


# --resume ---------------------------------------------------------------------------------

def _untimed(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
            for r in history]


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("schedule, backend", [("cosine", "torch"), ("step", "numpy")])
def test_resume_to_run_longer_equals_the_longer_run(tmp_path, schedule, backend):
    """A 1-epoch run resumed with epochs=2 trains its second epoch at the 2-epoch schedule's
    learning rate (cosine: lr₀/2, not the 1-epoch cosine's 0) and ends with the weights of
    an uninterrupted 2-epoch run, bit for bit: both first epochs ran at lr₀."""
    cfg = dict(QUICK, schedule=schedule, backend=backend, seed=3)
    if schedule == "step":
        cfg.update(step_size=1, gamma=0.5)
    train(TrainConfig(out=str(tmp_path / "short"), epochs=1, **cfg))
    resumed = train(TrainConfig(resume=str(tmp_path / "short"), epochs=2))
    whole = train(TrainConfig(out=str(tmp_path / "whole"), epochs=2, **cfg))
    assert [r["lr"] for r in resumed.history] == pytest.approx([1e-3, 5e-4], rel=1e-12)
    assert _untimed(resumed.history) == _untimed(whole.history)
    a, b = _weights(tmp_path / "short"), _weights(tmp_path / "whole")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_follows_the_new_cosine_from_the_epoch_reached(tmp_path):
    """2 epochs of a 2-epoch cosine, resumed to 4: epochs 3 and 4 run at the 4-epoch cosine's
    lr₀(1 + cos(πe/4))/2 for e = 2, 3; the epochs already run keep their learning rates."""
    train(TrainConfig(out=str(tmp_path / "r"), epochs=2, **QUICK))
    resumed = train(TrainConfig(resume=str(tmp_path / "r"), epochs=4))
    cosine = [1e-3 * (1 + math.cos(math.pi * e / 4)) / 2 for e in (2, 3)]
    assert [r["lr"] for r in resumed.history] == pytest.approx([1e-3, 5e-4, *cosine],
                                                               rel=1e-12)
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]
    with pytest.raises(ConfigError, match="--epochs 3, but .* has already completed 4 epochs"):
        train(TrainConfig(resume=str(tmp_path / "r"), epochs=3))


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("resume") / "base"
    train(TrainConfig(out=str(run), epochs=1, **QUICK))
    return run


@pytest.mark.parametrize("args", [["--backend", "numpy"], ["--backend", "torch"],
                                  ["--lr", "0.1", "--epochs", "2"], ["--out", "elsewhere"]])
def test_cli_resume_refuses_other_options(tmp_path, monkeypatch, one_epoch_run, args):
    """Even one equal to the run's (--backend torch): a resumed run keeps its own."""
    run = tmp_path / "R"
    shutil.copytree(one_epoch_run, run)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--resume", "R", *args])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert f"{args[0]} given with --resume: a resumed run keeps the options in " \
           "R/config.json" in out
    assert "only --epochs (to run longer), --threads, --json" in out
    assert json.loads((run / "result.json").read_text())["epochs"] == 1  # nothing ran


def test_cli_resume_takes_epochs_threads_and_json(tmp_path, monkeypatch, one_epoch_run):
    shutil.copytree(one_epoch_run, tmp_path / "R")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--resume", "R", "--epochs", "2", "--threads",
                                      "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["epochs"] == 2 and data["history"][1]["lr"] > 0


def test_library_resume_refuses_a_field_that_differs_from_the_run(tmp_path, one_epoch_run):
    shutil.copytree(one_epoch_run, tmp_path / "R")
    with pytest.raises(ConfigError, match="--backend numpy given with --resume"):
        train(TrainConfig(resume=str(tmp_path / "R"), backend="numpy"))
    with pytest.raises(ConfigError, match="--hidden 32,8, --no-verify given with --resume"):
        train(TrainConfig(resume=str(tmp_path / "R"), hidden=(32, 8), verify=False))
    # the run's own values, and the defaults, are no conflict
    result = train(TrainConfig(resume=str(tmp_path / "R"), hidden=(16,), limit=300, epochs=2,
                               out=str(tmp_path / "R")))
    assert result.epochs == 2


# a resumed run trains what it started with --------------------------------------------------

def _npz_data(path, n_train=48, classes=3, seed=0):
    """A small npz of 10 features: class c's samples are centred at c."""
    import numpy as np

    rng = np.random.default_rng(seed)
    y_train, y_test = np.arange(n_train) % classes, np.arange(12) % classes
    np.savez(path, x_train=rng.normal(size=(n_train, 10)) + y_train[:, None],
             y_train=y_train, x_test=rng.normal(size=(12, 10)) + y_test[:, None],
             y_test=y_test)


SMALL_MODEL = ('[[layers]]\nspec = "linear"\nI = 10\nO = 8\n\n[[layers]]\nspec = '
               '"sub/rmsnorm.py"\nD = 8\n\n[[layers]]\nspec = "linear"\nI = 8\nO = 3\n')


@pytest.mark.parametrize("model", [["--model", "m.toml"],
                                   ["--norm", "sub/rmsnorm.py", "--hidden", "8"]])
def test_resume_from_another_directory_reads_the_same_files(tmp_path, monkeypatch, model):
    """A run started with relative paths (the data file, a model file, a spec file) records
    them absolute, so that it resumes from another directory; the run's record keeps its
    spec hashes and gains an entry for the resume. A data set whose sizes changed since is
    refused."""
    from tests.test_nn import RMSNORM

    start, other = tmp_path / "start", tmp_path / "other"
    (start / "sub").mkdir(parents=True)
    other.mkdir()
    (start / "sub" / "rmsnorm.py").write_text(RMSNORM)
    (start / "m.toml").write_text(SMALL_MODEL)
    _npz_data(start / "d.npz")
    monkeypatch.chdir(start)
    first = CliRunner().invoke(app, ["train", *model, "--data", "npz", "--data-dir", "d.npz",
                                     "--epochs", "1", "--out", "../R", "--json"])
    assert first.exit_code == 0, first.output
    record = json.loads((tmp_path / "R" / "config.json").read_text())
    config = record["config"]
    assert config["data_dir"] == str(start / "d.npz")
    if model[0] == "--model":
        assert config["model"] == str(start / "m.toml")
    else:
        assert config["norm"] == str(start / "sub" / "rmsnorm.py")
    assert str(start / "sub" / "rmsnorm.py") in record["spec_sha256"]

    monkeypatch.chdir(other)
    resumed = CliRunner().invoke(app, ["train", "--resume", "../R", "--epochs", "2", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert [r["epoch"] for r in json.loads(resumed.stdout)["history"]] == [1, 2]
    after = json.loads((tmp_path / "R" / "config.json").read_text())
    assert after["spec_sha256"] == record["spec_sha256"]
    assert after["versions"] == record["versions"] and after["config"]["epochs"] == 2
    assert [(r["from_epoch"], r["epochs"]) for r in after["resumed"]] == [(1, 2)]

    _npz_data(start / "d.npz", n_train=60)
    with pytest.raises(ConfigError, match=r"the data set changed since the run started: "
                                          r"sizes \[54, 6, 12\], the run recorded "
                                          r"\[43, 5, 12\]") as err:
        train(TrainConfig(resume=str(tmp_path / "R"), epochs=3))
    assert err.value.file == str(start / "d.npz")


def test_resume_refuses_a_spec_or_model_file_edited_since_the_run_started(tmp_path):
    """A spec's sha256 or the model file's layers differ from the run's config.json: one
    error naming the spec (or model) file, nothing trained, and the record's hashes kept;
    with the files put back the run resumes."""
    from tests.test_nn import RMSNORM

    (tmp_path / "sub").mkdir()
    spec, model = tmp_path / "sub" / "rmsnorm.py", tmp_path / "m.toml"
    spec.write_text(RMSNORM)
    model.write_text(SMALL_MODEL)
    _npz_data(tmp_path / "d.npz")
    run = tmp_path / "R"
    train(TrainConfig(model=str(model), data="npz", data_dir=str(tmp_path / "d.npz"),
                      epochs=1, out=str(run)))
    record = (run / "config.json").read_text()

    spec.write_text(RMSNORM.replace("1e-6", "1e-2"))  # another eps: another model
    with pytest.raises(ConfigError, match=r"spec rmsnorm.py changed since the run started: "
                                          r"its sha256 is \w+…, the run recorded \w+… in "
                                          ".*config.json") as err:
        train(TrainConfig(resume=str(run), epochs=2))
    assert err.value.file == str(spec)
    assert "put the spec back as it was, or start a new run" in err.value.hint
    spec.write_text("this is not python (")  # refused by its hash, not by loading it
    with pytest.raises(ConfigError, match="spec rmsnorm.py changed"):
        train(TrainConfig(resume=str(run), epochs=2))
    spec.write_text(RMSNORM)

    model.write_text(SMALL_MODEL.replace("O = 8", "O = 6").replace("D = 8", "D = 6")
                     .replace("I = 8", "I = 6"))
    with pytest.raises(ConfigError, match=r"the model changed since the run started: layer 1 "
                                          r"was \{'spec': 'linear', 'I': 10, 'O': 8\}, is now "
                                          r"\{'spec': 'linear', 'I': 10, 'O': 6\}") as err:
        train(TrainConfig(resume=str(run), epochs=2))
    assert err.value.file == str(model)
    assert (run / "config.json").read_text() == record  # nothing rewritten
    assert json.loads((run / "result.json").read_text())["epochs"] == 1  # nothing trained

    model.write_text(SMALL_MODEL)
    assert train(TrainConfig(resume=str(run), epochs=2)).epochs == 2


# options the run's choices would ignore ----------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--optimizer", "adam", "--nesterov"], "--nesterov given with --optimizer adam, which does "
     "not use it: only --optimizer sgd does — drop --nesterov, or choose --optimizer sgd"),
    (["--momentum", "0.9"], "--momentum given with --optimizer adam"),  # the default's value
    (["--optimizer", "adamw", "--momentum", "0.5", "--nesterov"], "--momentum and --nesterov "
     "given with --optimizer adamw, which does not use them: only --optimizer sgd does"),
    (["--model", "cnn", "--hidden", "8", "--norm", "batchnorm"], "--hidden and --norm given "
     "with --model cnn, which does not use them: only --model mlp does"),
    (["--model", "vu-mnist-cnn", "--dropout", "0.1"], "--dropout given with --model "
     "vu-mnist-cnn (a model file's layers are its own), which does not use it: only --model "
     "mlp or cnn do"),
    (["--data-dir", "somewhere"], "--data-dir given with --data digits, which does not use it"),
    (["--optimizer", "sgd", "--momentum", "0", "--nesterov"], "--nesterov with --momentum 0"),
])
def test_cli_refuses_an_option_the_run_would_ignore(tmp_path, monkeypatch, args, message):
    """Typed options are refused by what the command line says, whatever their value."""
    out = _cli_error(tmp_path, monkeypatch, ["--epochs", "1", *args, "--out", "r"])
    assert message in out


def test_library_refuses_a_field_the_run_would_ignore(tmp_path):
    """From Python, a field whose value differs from its default and that the run's choices
    ignore is refused; the same options with the choices that use them train."""
    for options, message in ((dict(nesterov=True), "--nesterov given with --optimizer adam"),
                             (dict(momentum=0.5, optimizer="adamw"), "--momentum given"),
                             (dict(step_size=2), "--step-size given with --schedule cosine"),
                             (dict(model="cnn", hidden=(8,)), "--hidden given with --model "
                                                              "cnn")):
        with pytest.raises(ConfigError, match=message):
            train(TrainConfig(out=str(tmp_path / "r"), epochs=1, **options))
    assert not (tmp_path / "r").exists()
    result = train(TrainConfig(out=str(tmp_path / "r"), epochs=1, optimizer="sgd",
                               momentum=0.5, nesterov=True, schedule="step", step_size=2,
                               **QUICK))
    assert result.epochs == 1
