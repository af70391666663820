"""gradtool train over torch.distributed: two gloo processes on this machine, started by
PyTorch's launcher (``torch.distributed.run``), against one process; a crashed rank and a
resume; ``--nproc-per-node`` end to end; the refusals and the failure report.

The two-process runs cost a launcher and two Python processes each, so one module fixture
starts them all in two launches: tests/dist_worker.py runs the uninterrupted runs and a run
whose rank 1 crashes, then ``gradtool train --nproc-per-node 2 --resume`` finishes that one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gradtool.cli import app
from gradtool.train import TrainConfig, train
from gradtool.train import distributed as dist_mod
from gradtool.train.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
# the digits MLP in float64 with no dropout or batch norm: two ranks must give one process's
# update; 270 training samples = 9 global batches of 30 (15 per rank)
PLAIN = dict(limit=300, hidden=(16,), batch_size=30, epochs=2, dtype="float64",
             optimizer="sgd", lr=0.05, momentum=0.9, schedule="none", seed=3, verify=False)
# with dropout (each rank draws its own masks) and a schedule, for the crash and the resume
DROPOUT = dict(PLAIN, epochs=3, dropout=0.2, schedule="step", step_size=1, gamma=0.5)
CRASH = [1, 1, 3]  # rank 1 dies after step 4 of epoch 2 (0-based epoch 1, step 3)
TIMEOUT = 300  # seconds; a hang fails the test instead of blocking the suite


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _run(cmd: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float]:
    """``cmd`` in its own session, killed with its children if it outlives TIMEOUT."""
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for {TIMEOUT} s")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err), time.monotonic() - t0


def _job(config: dict, out: Path, crash=None) -> dict:
    job = {"config": dict(config, hidden=list(config["hidden"]), out=str(out))}
    if crash:
        job["crash"] = crash
    return job


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("dist")
    jobs = [_job(PLAIN, base / "plain"), _job(DROPOUT, base / "whole"),
            _job(DROPOUT, base / "cut", crash=CRASH)]
    (base / "jobs.json").write_text(json.dumps(jobs))
    crashed, _ = _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc-per-node", "2", "--monitor-interval", "0.1",
                       str(ROOT / "tests" / "dist_worker.py"), str(base / "jobs.json")], ROOT)
    cut_epoch = torch.load(base / "cut" / "checkpoints" / "last.pt",
                           weights_only=False)["epoch"]
    cut_finished = (base / "cut" / "model.pt").exists()
    resumed, _ = _run([sys.executable, "-m", "gradtool", "train", "--nproc-per-node", "2",
                       "--resume", str(base / "cut"), "--json"], base)
    return {"base": base, "crashed": crashed, "cut_epoch": cut_epoch,
            "cut_finished": cut_finished, "resumed": resumed}


def _weights(run_dir: Path) -> dict:
    return torch.load(run_dir / "model.pt", weights_only=False)["state_dict"]


def _untimed(history: list) -> list:
    return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_s")}
            for row in history]


def test_two_ranks_give_the_one_process_weights(runs, tmp_path):
    plain = runs["base"] / "plain"
    record = json.loads((plain / "config.json").read_text())
    assert record["world_size"] == 2 and record["process_group"] == "gloo"
    one = train(TrainConfig(out=str(tmp_path / "one"), **PLAIN))
    a, b = _weights(tmp_path / "one"), _weights(plain)
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == torch.float64
        assert float((a[k] - b[k]).abs().max()) <= 1e-10, k
    # rank 0's metrics are those of the global batches: the same as one process
    two = json.loads((plain / "result.json").read_text())
    assert two["world_size"] == 2
    for r1, r2 in zip(_untimed(one.history), _untimed(two["history"]), strict=True):
        for k in r1:
            assert r1[k] == pytest.approx(r2[k], rel=1e-9, abs=1e-12), k
    assert two["test_acc"] == one.test_acc


def test_crashed_rank_stops_the_run_and_resume_gives_the_uninterrupted_weights(runs):
    crashed, resumed, base = runs["crashed"], runs["resumed"], runs["base"]
    assert crashed.returncode != 0  # the launcher stopped rank 0 when rank 1 died
    assert runs["cut_epoch"] == 1  # the last checkpoint before the crash: epoch 1
    assert not runs["cut_finished"]
    assert resumed.returncode == 0, resumed.stderr
    result = json.loads(resumed.stdout)  # one JSON object, from rank 0 alone
    assert result["world_size"] == 2 and result["epochs"] == 3
    a, b = _weights(base / "whole"), _weights(base / "cut")
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bit for bit: the same ranks, the same order
    whole = json.loads((base / "whole" / "result.json").read_text())
    assert _untimed(whole["history"]) == _untimed(result["history"])
    assert "Traceback" not in resumed.stderr


def _as_rank(monkeypatch, rank: int, size: int = 2, error_file: Path | None = None) -> None:
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(size))
    if error_file is not None:
        monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(error_file))


def test_numpy_backend_refuses_a_world_size_above_one(tmp_path, monkeypatch):
    _as_rank(monkeypatch, 0)
    with pytest.raises(ConfigError, match="numpy backend runs on one process, but WORLD_SIZE "
                                          "is 2"):
        train(TrainConfig(out=str(tmp_path / "r"), backend="numpy", epochs=1, limit=60))
    assert not (tmp_path / "r").exists()
    result = CliRunner().invoke(app, ["train", "--backend", "numpy", "--out",
                                      str(tmp_path / "r")])
    assert result.exit_code == 1
    assert "numpy backend runs on one process" in result.output
    assert "Traceback" not in result.output


def test_global_batch_must_divide_among_the_ranks(tmp_path, monkeypatch):
    _as_rank(monkeypatch, 0, size=4)
    with pytest.raises(ConfigError, match="--batch-size 30 .* among 4 processes.*"
                                          "--batch-size 32"):
        train(TrainConfig(out=str(tmp_path / "r"), batch_size=30, epochs=1))


def test_other_ranks_leave_their_error_to_the_launcher(tmp_path, monkeypatch):
    error_file = tmp_path / "error.json"
    _as_rank(monkeypatch, 1, error_file=error_file)
    result = CliRunner().invoke(app, ["train", "--backend", "numpy"])
    assert result.exit_code == 1 and result.output == ""
    data = json.loads(error_file.read_text())
    assert "numpy backend runs on one process" in data["message"]
    assert data["gradtool"] == {"root": True, "printed": False, "rank": 1}


def _failure(tmp_path, rank: int, exitcode: int, message: str | None, root: bool,
             printed: bool = False):
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "error.json"
    if message is not None:
        os.environ["RANK"] = str(rank)
        os.environ["TORCHELASTIC_ERROR_FILE"] = str(path)
        dist_mod.record_failure(message, root=root, printed=printed)
    return ProcessFailure(local_rank=rank, pid=100 + rank, exitcode=exitcode,
                          error_file=str(path))


def test_launch_reports_the_rank_that_failed_first(tmp_path, monkeypatch):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    monkeypatch.setenv("RANK", "0")  # restored after the test; _failure sets them
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", "")
    cases = {
        # rank 0 lost its peer, rank 1 ran out of memory: rank 1's reason is the report
        "peer": ({0: _failure(tmp_path, 0, 1, "DistBackendError: connection closed", False),
                  1: _failure(tmp_path, 1, 1, "OutOfMemoryError: CUDA out of memory", True)},
                 "rank 1 of 2 failed: OutOfMemoryError: CUDA out of memory"),
        # rank 1 killed by a signal, rank 0 then stopped by the launcher
        "sigterm": ({0: _failure(tmp_path, 0, -15, None, True),
                     1: _failure(tmp_path, 1, -9, None, True)},
                    "rank 1 of 2 failed: Signal 9 (SIGKILL)"),
        # rank 1 killed by a signal, rank 0 then lost it
        "signal": ({0: _failure(tmp_path, 0, 1, "DistBackendError: closed", False),
                    1: _failure(tmp_path, 1, -9, None, True)},
                   "rank 1 of 2 failed: Signal 9 (SIGKILL)"),
    }
    for failures, expected in cases.values():
        def fake_run(args, failures=failures):
            raise ChildFailedError("gradtool", failures)

        monkeypatch.setattr("torch.distributed.run.run", fake_run)
        with pytest.raises(dist_mod.LaunchError, match=expected.replace("(", r"\(")
                           .replace(")", r"\)")):
            dist_mod.launch(2, ["train"])
    # rank 0 printed its error, then the launcher stopped it (it had seen rank 1 fail the same
    # way first): the launch only exits 1
    failures = {0: _failure(tmp_path, 0, -15, "ConfigError: bad", True, printed=True),
                1: _failure(tmp_path, 1, 1, "ConfigError: bad", True)}
    monkeypatch.setattr("torch.distributed.run.run",
                        lambda args: (_ for _ in ()).throw(ChildFailedError("g", failures)))
    with pytest.raises(SystemExit):
        dist_mod.launch(2, ["train"])


def test_nproc_per_node_passes_the_same_options_minus_itself(monkeypatch):
    seen = {}
    monkeypatch.setattr(dist_mod, "launch", lambda nproc, argv, **kw: seen.update(n=nproc,
                                                                                a=argv))
    result = CliRunner().invoke(app, ["train", "--hidden", "8,8", "--nproc-per-node", "2",
                                      "--optimizer", "sgd", "--nesterov", "--limit", "50",
                                      "--no-verify"])
    assert result.exit_code == 0, result.output
    assert seen == {"n": 2, "a": ["train", "--hidden", "8,8", "--optimizer", "sgd",
                                  "--nesterov", "--no-verify", "--limit", "50"]}


def test_nproc_per_node_checks_the_options_once_before_launching(monkeypatch):
    monkeypatch.setattr(dist_mod, "launch", lambda *a, **kw: pytest.fail("launched"))
    for args, expected in ((["--backend", "numpy"], "numpy backend runs on one process, but "
                                                    "WORLD_SIZE is 3"),
                           (["--batch-size", "32"], "--batch-size 32 (the global batch) does "
                                                    "not divide among 3 processes"),
                           (["--resume", "no/such/run"], "not a run folder")):
        result = CliRunner().invoke(app, ["train", "--nproc-per-node", "3", *args])
        assert result.exit_code == 1
        assert expected in result.output and result.output.count("error:") == 1, result.output


def test_world_is_read_from_the_launchers_environment():
    assert dist_mod.from_env({}) == dist_mod.World(0, 1, 0)
    world = dist_mod.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert world == dist_mod.World(3, 4, 1) and world.parallel and not world.main
    for env in ({"RANK": "x", "WORLD_SIZE": "2"}, {"RANK": "2", "WORLD_SIZE": "2"},
                {"RANK": "0", "WORLD_SIZE": "0"}):
        with pytest.raises(ConfigError, match="torchrun"):
            dist_mod.from_env(env)
