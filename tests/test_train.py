"""gradtool train: resume equals an uninterrupted run, NaN stop, the verification gate, model
files with user specs, and the command's --json output. Tiny models on a slice of digits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradtool import __version__
from gradtool.cli import app
from gradtool.codegen.cache import _with_checksum, cache_dir, spec_key
from gradtool.codegen.emit import generate
from gradtool.spec.loader import load_spec
from gradtool.train import DivergenceError, TrainConfig, train
from gradtool.train.verify import VerificationError, verify_spec
from tests.json_schemas import valid
from tests.test_nn import RMSNORM

QUICK = dict(limit=300, hidden=(16,), batch_size=32)


class Stop(Exception):  # noqa: N818 - a signal, not an error
    pass


def _weights(run_dir):
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, backend):
    cfg = dict(QUICK, epochs=3, dropout=0.3, norm="batchnorm", optimizer="sgd",
               schedule="step", step_size=1, gamma=0.5, backend=backend, seed=4)
    whole = train(TrainConfig(out=str(tmp_path / "whole"), **cfg))

    def kill(epoch, step, model):
        if epoch == 1 and step == 3:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(out=str(tmp_path / "cut"), **cfg), on_step=kill)
    resumed = train(TrainConfig(resume=str(tmp_path / "cut")))
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "cut")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on the CPU
    untimed = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
               for r in whole.history]
    assert untimed == [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                       for r in resumed.history]
    assert resumed.test_acc == whole.test_acc


def test_a_resumed_runs_time_covers_the_epochs_before_it(tmp_path):
    """The result's seconds (the table's "time") count the epochs trained before --resume
    too (they counted only this process's; newcomer trial): an epoch recorded as 1000 s in
    the checkpoint shows in the resumed run's time."""
    from gradtool.train import checkpoint

    def stop(epoch, step, model):
        if epoch == 1:
            raise Stop

    with pytest.raises(Stop):
        train(TrainConfig(out=str(tmp_path / "r"), epochs=2, **QUICK), on_step=stop)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    state = checkpoint.load(last)
    state["history"][0]["seconds"] = 1000.0
    checkpoint.save_atomic(state, last)
    resumed = train(TrainConfig(resume=str(tmp_path / "r")))
    assert 1000.0 <= resumed.seconds < 1000.0 + 600


def test_ctrl_c_says_what_is_kept_and_how_to_continue(tmp_path, monkeypatch):
    """Ctrl-C in the second epoch: `gradtool train` exits 130 with one line naming the
    checkpoint kept (after epoch 1) and the `--resume` command (it printed an empty line,
    newcomer trial); in the first epoch, that there is nothing to resume."""
    import gradtool.train as gtrain

    real = gtrain.train
    for at_epoch, expect in ((1, "checkpoint after epoch 1"), (0, "before the first epoch")):
        def interrupted(config, progress=None, at_epoch=at_epoch):
            def ctrl_c(epoch, step, model):
                if epoch == at_epoch and step == 1:
                    raise KeyboardInterrupt
            return real(config, progress=progress, on_step=ctrl_c)

        monkeypatch.setattr(gtrain, "train", interrupted)
        run = tmp_path / f"r{at_epoch}"
        result = CliRunner().invoke(app, ["train", "--limit", "300", "--hidden", "16",
                                          "--epochs", "3", "--out", str(run)])
        assert result.exit_code == 130, result.output
        assert expect in result.output and "Traceback" not in result.output
        if at_epoch:
            assert f"gradtool train --resume {run}" in " ".join(result.output.split())


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(epoch, step, model):
        if epoch == 1 and step == 2:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    with pytest.raises(DivergenceError, match="loss became nan at epoch 2"):
        train(TrainConfig(out=str(tmp_path / "r"), epochs=3, **QUICK), on_step=poison)
    ckpt = torch.load(tmp_path / "r" / "checkpoints" / "last.pt", weights_only=False)
    assert ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def _tampered_relu(tmp_path, monkeypatch):
    """A spec file whose cached NumPy kernel has a wrong backward (twice the gradient), as a
    hand-edited or corrupted generated file would."""
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "myrelu.py"
    path.write_text(Path(load_spec("relu").file).read_text()
                    .replace('Spec("relu"', 'Spec("myrelu"'))
    spec = load_spec(path)
    source = generate(spec, "numpy")
    assert "    dX = (X > 0) * G\n" in source
    kernel = cache_dir() / f"{spec.name}_numpy_{spec_key(spec, 'numpy')}.py"
    kernel.parent.mkdir(parents=True, exist_ok=True)
    # with a matching checksum, or the cache would regenerate it as a damaged file
    kernel.write_text(_with_checksum(
        source.replace("    dX = (X > 0) * G\n", "    dX = 2 * (X > 0) * G\n")))
    return path


def test_verification_gate_refuses_a_wrong_backward(tmp_path, monkeypatch):
    path = _tampered_relu(tmp_path, monkeypatch)
    with pytest.raises(VerificationError,
                       match="myrelu failed verification.*code-generation fault"):
        verify_spec(str(path))
    cfg = dict(QUICK, epochs=1, activation=str(path))
    with pytest.raises(VerificationError):
        train(TrainConfig(out=str(tmp_path / "refused"), **cfg))
    result = train(TrainConfig(out=str(tmp_path / "anyway"), verify=False, **cfg))
    assert result.unverified
    record = json.loads((tmp_path / "anyway" / "config.json").read_text())
    assert record["verified"].startswith("unverified")


@pytest.mark.parametrize("backend", ["torch", "numpy"])
def test_a_last_batch_the_model_cannot_train_on_is_dropped(tmp_path, backend):
    """270 training samples in batches of 269 leave a last batch of one: batch norm cannot
    train on it (N ≥ 2), so it is dropped from every epoch and the run folder says why; a
    model without batch norm keeps it, and batch norm over channels trains on one 8×8 image
    (N·H·W ≥ 2), as nn.BatchNorm2d does."""
    cfg = dict(QUICK, batch_size=269, epochs=1, backend=backend)
    runs = {"bn": dict(cfg, norm="batchnorm"), "plain": cfg}
    if backend == "torch":
        runs["cnn"] = dict({k: v for k, v in cfg.items() if k != "hidden"}, model="cnn")
    for name, options in runs.items():
        train(TrainConfig(out=str(tmp_path / name), **options))
    records = {name: json.loads((tmp_path / name / "config.json").read_text())
               for name in runs}
    assert records["bn"]["data"]["sizes"][0] == 270
    dropped = records["bn"]["dropped_last_batch"]
    assert dropped["samples"] == 1 and "needs N ≥ 2, got N = 1" in dropped["reason"]
    assert records["plain"]["dropped_last_batch"] is None
    if backend == "torch":
        assert records["cnn"]["dropped_last_batch"] is None


def test_verification_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADTOOL_CACHE", str(tmp_path / "cache"))
    first = verify_spec("dropout")
    assert not first.cached and first.forms == ["dropout", "dropout_eval"]
    assert verify_spec("dropout").cached


def test_model_file_with_a_user_spec_trains(tmp_path):
    (tmp_path / "rmsnorm.py").write_text(RMSNORM)
    (tmp_path / "model.toml").write_text(
        '[[layers]]\nflatten = true\n\n[[layers]]\nspec = "linear"\nI = 64\nO = 24\n\n'
        '[[layers]]\nspec = "rmsnorm.py"\nD = 24\n\n[[layers]]\nspec = "relu"\n\n'
        '[[layers]]\nspec = "linear"\nI = 24\nO = 10\n')
    result = train(TrainConfig(model=str(tmp_path / "model.toml"), epochs=3, lr=1e-2,
                               out=str(tmp_path / "run"), limit=300, batch_size=32))
    assert result.test_acc > 0.5  # ten classes: chance is 0.1
    assert [v["spec"] for v in result.verified] == ["linear", "rmsnorm", "relu",
                                                    "softmax_cross_entropy_labels"]
    record = json.loads((tmp_path / "run" / "config.json").read_text())
    sha = record["spec_sha256"][str((tmp_path / "rmsnorm.py").resolve())]
    assert sha == hashlib.sha256(RMSNORM.encode()).hexdigest()
    for name in ("metrics.csv", "curves.png", "confusion.png", "model.pt",
                 "checkpoints/last.pt", "checkpoints/best.pt"):
        assert (tmp_path / "run" / name).exists(), name
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("epoch,train_loss,train_acc,val_loss,val_acc,lr")
    assert len(lines) == 4  # a header and one row per epoch


def test_cli_json_prints_one_object(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["train", "--epochs", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = valid("train", result.stdout)
    assert data["epochs"] == 1 and 0 <= data["test_acc"] <= 1
    assert data["version"]["gradtool"] == __version__
    assert len(list((tmp_path / "runs").iterdir())) == 1


def test_load_model_gives_the_trained_weights(tmp_path):
    from gradtool.train import load_model

    train(TrainConfig(out=str(tmp_path / "r"), epochs=1, **QUICK))
    model = load_model(tmp_path / "r")
    saved = _weights(tmp_path / "r")
    for k, v in model.state_dict().items():
        assert torch.equal(v, saved[k])


def test_load_model_gives_the_best_and_last_checkpoints_weights_too(tmp_path):
    from gradtool.train import load_model
    from gradtool.train.config import ConfigError

    run = tmp_path / "r"
    train(TrainConfig(out=str(run), epochs=2, **QUICK))
    for weights, file in (("best", run / "checkpoints" / "best.pt"),
                          ("last", run / "checkpoints" / "last.pt")):
        saved = torch.load(file, map_location="cpu", weights_only=False)["model"]
        model = load_model(run, weights=weights)
        assert not model.training
        for k, v in model.state_dict().items():
            assert torch.equal(v, saved[k]), (weights, k)
    (run / "checkpoints" / "best.pt").unlink()
    with pytest.raises(ConfigError, match="no best weights"):
        load_model(run, weights="best")
    with pytest.raises(ConfigError, match="no such weights"):
        load_model(run, weights="worst")


def test_load_model_refuses_a_run_whose_spec_file_changed(tmp_path):
    """A run recorded its spec files' sha256 (config.json): after one is edited,
    load_model raises a ConfigError naming the spec, as --resume does (a newcomer trial found
    an edited RMSNorm loading silently and classifying at 1.7 %); put back, it loads."""
    from gradtool.train import load_model
    from gradtool.train.config import ConfigError

    (tmp_path / "rmsnorm.py").write_text(RMSNORM)
    (tmp_path / "m.toml").write_text('loss = "softmax_cross_entropy_labels"\n'
                                     '[[layers]]\nflatten = true\n'
                                     '[[layers]]\nspec = "linear"\nI = 64\nO = 8\n'
                                     '[[layers]]\nspec = "rmsnorm.py"\nD = 8\n'
                                     '[[layers]]\nspec = "linear"\nI = 8\nO = 10\n')
    train(TrainConfig(out=str(tmp_path / "r"), epochs=1, model=str(tmp_path / "m.toml"),
                      limit=300, batch_size=32))
    (tmp_path / "rmsnorm.py").write_text(RMSNORM.replace("** 2, k) / D", "** 2, k) / (2 * D)"))
    with pytest.raises(ConfigError, match="rmsnorm.py changed since this run trained it"):
        load_model(tmp_path / "r")
    (tmp_path / "rmsnorm.py").write_text(RMSNORM)
    load_model(tmp_path / "r")


def test_cli_error_is_one_line_and_exit_1(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m.toml").write_text('[[layers]]\nspec = "linear"\nI = 64\n')
    result = CliRunner().invoke(app, ["train", "--model", "m.toml", "--epochs", "1"])
    assert result.exit_code == 1
    assert "layer 1 (linear)" in result.output and "needs the size O" in result.output
    assert "Traceback" not in result.output


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_trains_the_same_closed_forms_in_one_graph(tmp_path):
    """--compile (torch.compile, inductor on the CPU): the MLP with batch norm and dropout
    takes the same steps as without it, to rounding, the running statistics included, with
    no graph break (each layer's call is prepared before dynamo traces the model). Inductor
    draws the dropout masks with torch's own generator here, as eager does."""
    import torch._dynamo
    import torch._inductor.config

    # torch's own patch, not monkeypatch: pytest ≥ 9.2 undoes a module attribute it did not
    # find in the module's __dict__ with delattr, which removes the option from inductor's
    # config for the rest of the session
    cfg = dict(QUICK, epochs=1, norm="batchnorm", dropout=0.2, seed=3, dtype="float64")
    with torch._inductor.config.patch(fallback_random=True):
        plain = train(TrainConfig(out=str(tmp_path / "eager"), **cfg))
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        compiled = train(TrainConfig(out=str(tmp_path / "compiled"), compile=True, **cfg))
    assert not torch._dynamo.utils.counters["graph_break"], \
        dict(torch._dynamo.utils.counters["graph_break"])
    assert compiled.history[0]["train_loss"] == pytest.approx(plain.history[0]["train_loss"],
                                                              rel=1e-9)
    assert compiled.test_loss == pytest.approx(plain.test_loss, rel=1e-9)
    ours, ref = _weights(tmp_path / "compiled"), _weights(tmp_path / "eager")
    assert ours.keys() == ref.keys()  # the model's own keys, not torch.compile's wrapper's
    for k in ref:  # Adam divides by √v: rounding differences of 1e-16 grow to ~1e-8
        torch.testing.assert_close(ours[k], ref[k], rtol=1e-6, atol=1e-9)


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_a_failing_compile_is_one_message_that_says_to_drop_it(tmp_path, monkeypatch):
    import torch._dynamo

    def no_backend(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")

    original = torch.compile
    monkeypatch.setattr(torch, "compile",
                        lambda model, **kw: original(model, **{**kw, "backend": no_backend}))
    torch._dynamo.reset()
    result = CliRunner().invoke(app, ["train", "--limit", "64", "--hidden", "8", "--epochs",
                                      "1", "--compile", "--out", str(tmp_path / "r")])
    torch._dynamo.reset()
    assert result.exit_code == 1
    assert "--compile: torch.compile failed" in result.output
    assert "train without --compile" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["train", "--backend", "numpy", "--compile"])
    assert result.exit_code == 1 and "drop --compile" in result.output


class _TwiceTheGradient(torch.autograd.Function):
    """Identity forward, twice the upstream gradient backward: a 'compiler' that keeps every
    output and breaks every gradient."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_compile_is_refused_when_the_compiled_gradients_differ(tmp_path, monkeypatch):
    """Before training, --compile compares one random batch's loss and gradients through the
    compiled model with the model's own: a compiled model whose outputs are right but whose
    gradients are not (as inductor's CNN on one GPU) stops the run with a message naming the
    parameter, before any step."""
    class Broken(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return _TwiceTheGradient.apply(self.net(x))

    monkeypatch.setattr(torch, "compile", lambda net, **kw: Broken(net))
    result = CliRunner().invoke(app, ["train", "--limit", "64", "--hidden", "8", "--epochs",
                                      "1", "--compile", "--out", str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "--compile: torch.compile changed the gradient of" in result.output
    assert "train without --compile" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "r").exists()  # nothing written: the run never started


@pytest.mark.parametrize("optimizer, given, used", [
    ("adamw", None, 0.01), ("adamw", 0.0, 0.0), ("adamw", 0.05, 0.05), ("adam", None, 0.0),
    ("sgd", None, 0.0), ("sgd", 1e-3, 1e-3)])
def test_weight_decay_is_the_optimizers_default_unless_given(optimizer, given, used):
    """--weight-decay 0 with adamw is 0 (it was AdamW's default 0.01); without the option,
    each optimizer keeps torch's default."""
    from gradtool.train.loop import _optimizer

    param = torch.nn.Parameter(torch.zeros(2))
    opt = _optimizer(TrainConfig(optimizer=optimizer, weight_decay=given), [param])
    assert opt.param_groups[0]["weight_decay"] == used
