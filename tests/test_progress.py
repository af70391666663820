"""Nothing slow is silent: a spinner on a terminal's stderr while torch is imported and specs
load before check's first bar, during a long step that reports nothing (an explicit Jacobian
matrix row by row), and never on stdout, in a pipe or with --json."""

from __future__ import annotations

import io
import json
import time

import pytest
from rich.console import Console
from typer.testing import CliRunner

import gradtool.cli as cli
from gradtool.report import derive_report


def _terminal(monkeypatch) -> io.StringIO:
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=screen, force_terminal=True,
                                                    width=100))
    monkeypatch.setattr(cli._Working, "DELAY", 0.0)
    return screen


def test_check_shows_a_status_before_its_first_bar(monkeypatch):
    screen = _terminal(monkeypatch)
    result = CliRunner().invoke(cli.app, ["check", "relu", "--shapes", "1"])
    assert result.exit_code == 0, result.output
    shown = screen.getvalue()
    assert "preparing the check" in shown and "importing torch" in shown
    assert "checking" in shown  # the bar
    assert "importing torch" not in result.stdout


def test_check_json_shows_nothing_on_stderr(monkeypatch):
    screen = _terminal(monkeypatch)
    result = CliRunner().invoke(cli.app, ["check", "relu", "--shapes", "1", "--json"])
    assert result.exit_code == 0, result.output
    assert screen.getvalue() == ""
    json.loads(result.stdout)


def test_a_long_silent_step_still_gets_a_spinner(monkeypatch):
    """The watcher thread starts the spinner although the step never reports again."""
    screen = _terminal(monkeypatch)
    monkeypatch.setattr(cli._Working, "DELAY", 0.05)
    with cli._Working(what="deriving") as working:
        working.step("one long step")
        assert "one long step" not in screen.getvalue()  # quick so far: nothing shown
        time.sleep(0.5)
    assert "deriving:" in screen.getvalue() and "one long step" in screen.getvalue()


def test_no_spinner_off_a_terminal(monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(cli, "err_console", Console(file=screen, force_terminal=False))
    monkeypatch.setattr(cli._Working, "DELAY", 0.0)
    with cli._Working() as working:
        working.step("a step")
        time.sleep(0.2)
    assert screen.getvalue() == ""


def test_explicit_matrix_reports_each_row():
    steps: list[str] = []
    derive_report("softmax", shape={"N": 1, "C": 3}, progress=steps.append)
    rows = [s for s in steps if "as a matrix" in s]
    assert rows == [f"Jacobian ∂S/∂X as a matrix, row {r} of 3" for r in (1, 2, 3)], steps


def test_code_generation_shows_a_spinner_on_stderr_only(monkeypatch):
    screen = _terminal(monkeypatch)
    result = CliRunner().invoke(cli.app, ["derive", "relu", "--code", "numpy"])
    assert result.exit_code == 0, result.output
    assert "generating numpy code" in screen.getvalue()
    assert "generating" not in result.stdout and result.stdout.startswith(("#", '"""', "@"))


def test_an_explicit_matrix_past_its_time_budget_stops_with_an_estimate():
    """Expanding the entries of an explicit Jacobian stops once it has taken longer than its
    budget (60 s from the command line; 0 here), saying how many entries were done and how
    long all would take, instead of running on for minutes (attention + layer norm at T = D =
    4: about 9 minutes)."""
    from gradtool.errors import GradtoolError
    from gradtool.spec.loader import load_spec
    from gradtool.symbolic.jacobian import explicit_matrix, jacobian
    from gradtool.symbolic.reverse import derive

    d = derive(load_spec("softmax"))
    jac = jacobian(d, "S", "X")
    matrix, rows, cols = explicit_matrix(d, jac, {"N": 1, "C": 3})
    assert matrix.shape == (3, 3)
    with pytest.raises(GradtoolError, match=r"1 of 9 entries in \d+ s \(about \d+ s in all\)"):
        explicit_matrix(d, jac, {"N": 1, "C": 3}, seconds=0.0)
