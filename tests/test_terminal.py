"""A terminal that cannot encode Unicode gets ASCII renderings, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from gradtool.terminal import ASCII, ERRORS


def _run(*args):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    return subprocess.run([sys.executable, "-m", "gradtool", *args], capture_output=True,
                          env=env, timeout=300)


def test_error_handler_renders_the_math_symbols():
    text = "dX = Σ_d'(γ ⊙ G)·σ(X) − δ(i,j) x̂ ∂L/∂Y ≥ 0 é"
    assert text.encode("ascii", ERRORS).decode() == \
        "dX = sum_d'(gamma (.) G)*sigma(X) - delta(i,j) x^ dL/dY >= 0 e"
    assert all(v.isascii() for v in ASCII.values())


@pytest.mark.parametrize("args", [("derive", "layernorm", "--steps"), ("specs",),
                                  ("derive", "softmax", "--latex")])
def test_ascii_terminal_prints_ascii(args):
    done = _run(*args)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    assert done.stdout.isascii() and b"Traceback" not in done.stderr
    if args[0] == "derive" and "--latex" not in args:
        assert b"sum_" in done.stdout


def test_ascii_terminal_json_keeps_the_unicode_as_escapes():
    done = _run("derive", "layernorm", "--json")
    assert done.returncode == 0 and done.stdout.isascii()
    report = json.loads(done.stdout)
    assert any("Σ" in g["text"] for g in report["gradients"])
