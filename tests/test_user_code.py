"""Code gradtool is given runs inside one guard: its prints go to stderr, ``sys.exit``,
``KeyboardInterrupt`` and any exception become one ``error:`` line with file and line (exit 1),
an endless loop meets a time limit, and a file imports its siblings as ``python file.py`` would."""

from __future__ import annotations

import json
import textwrap

import pytest
from typer.testing import CliRunner

from gradtool.cli import app
from tests.json_schemas import error as json_error

runner = CliRunner()

RELU = """\
import numpy as np


class Relu:
    def __init__(self):
        {init}

    def forward(self, X):
        {forward}
        self.X = X
        return np.maximum(X, 0)

    def backward(self, grad_out):
        {backward}
        return grad_out * (self.X > 0)
"""


def _relu_file(tmp_path, init="pass", forward="pass", backward="pass", head=""):
    path = tmp_path / "my_relu.py"
    path.write_text(head + RELU.format(init=init, forward=forward, backward=backward))
    return path


def _check(path, *extra, env=None):
    return runner.invoke(app, ["check", "relu", "--impl", f"{path}:Relu", *extra], env=env)


def _one_error_line(result, *needles):
    """One ``error:`` line on stderr, or with ``--json`` one JSON error object on stdout."""
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output
    if result.stdout.startswith("{"):
        err = json_error(result)
        assert err["kind"] == "error", err
        for needle in needles:
            assert needle in err["text"], err["text"]
        return
    err = result.stderr.strip().splitlines()
    assert err[-1].startswith("error:"), result.stderr
    for needle in needles:
        assert needle in err[-1], err[-1]


def test_correct_layer_passes(tmp_path):
    result = _check(_relu_file(tmp_path))
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("where, line", [("init", 6), ("forward", 9), ("backward", 14)])
@pytest.mark.parametrize("how, says", [("sys.exit(0)", "called sys.exit(0)"),
                                       ("raise KeyboardInterrupt", "raised KeyboardInterrupt"),
                                       ("os._exit(0)", "called os._exit(0)"),
                                       ("os.abort()", "called os.abort()"),
                                       ("atexit.register(print)", "called atexit.register")])
def test_exit_or_interrupt_in_a_layer_is_one_error(tmp_path, where, line, how, says):
    """Ways out of the process (os._exit, os.abort: no exception; an exit handler that could
    change the exit status after the report) are refused like sys.exit: a layer calling
    os._exit(0) in backward ended the check with exit status 0 and no report."""
    path = _relu_file(tmp_path, head="import sys, os, atexit\n", **{where: how})
    for extra in ([], ["--json"]):
        result = _check(path, *extra)
        _one_error_line(result, f"{path}:{line + 1}:", says)
        assert result.stdout == "" if not extra else result.stdout.startswith("{")


@pytest.mark.parametrize("how", ["sys.exit(0)", "os._exit(0)",
                                 "atexit.register(lambda: os._exit(0))"])
def test_exit_at_import_is_one_error(tmp_path, how):
    path = _relu_file(tmp_path, head=f"import sys, os, atexit\n{how}\n")
    _one_error_line(_check(path), f"{path}:2:", f"importing it called {how.split('(')[0]}")


def test_a_library_imported_by_the_layer_may_register_exit_handlers(tmp_path):
    """Only the file's own atexit.register is refused, not one in a module it imports."""
    (tmp_path / "helper_lib.py").write_text("import atexit\natexit.register(lambda: None)\n")
    path = _relu_file(tmp_path, head="import helper_lib  # noqa: F401\n")
    result = _check(path)
    assert result.exit_code == 0, result.output


def test_argparse_at_import_sees_no_gradtool_arguments(tmp_path):
    head = ("import argparse\nparser = argparse.ArgumentParser()\n"
            "parser.add_argument('--lr', type=float, default=0.1)\nARGS = parser.parse_args()\n")
    result = _check(_relu_file(tmp_path, head=head), "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)


def test_prints_in_a_layer_keep_json_clean(tmp_path):
    path = _relu_file(tmp_path, forward="print('forward called')",
                      head="print('importing')\n")
    result = _check(path, "--json")
    assert result.exit_code == 0, result.output
    assert all(row["passed"] for row in json.loads(result.stdout)["rows"])
    assert "forward called" in result.stderr and "importing" in result.stderr


def test_endless_loop_in_a_layer_meets_the_time_limit(tmp_path):
    path = _relu_file(tmp_path, forward="while True:\n            pass")
    result = _check(path, env={"GRADTOOL_TIMEOUT": "1"})
    _one_error_line(result, "Relu.forward(X) ran past the time limit of 1 s", "GRADTOOL_TIMEOUT")


def test_failure_names_the_sizes_it_was_called_with(tmp_path):
    # fails only for a batch of one, like a layer that squeezes its input
    path = _relu_file(tmp_path, forward="assert X.shape[0] > 1, 'batch of one'")
    _one_error_line(_check(path), "AssertionError: batch of one", "N=1")


def test_forward_that_fails_on_its_second_call(tmp_path):
    path = _relu_file(tmp_path, head="CALLS = []\n",
                      forward="CALLS.append(1)\n        if len(CALLS) == 2:\n"
                              "            raise RuntimeError('second call')")
    _one_error_line(_check(path), "raised RuntimeError: second call")


def test_layer_imports_its_siblings_and_its_package(tmp_path):
    pkg = tmp_path / "mytorch" / "nn"
    pkg.mkdir(parents=True)
    (tmp_path / "mytorch" / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("import numpy as np\n\n\ndef relu(x):\n"
                                    "    return np.maximum(x, 0)\n")
    (pkg / "grad_helpers.py").write_text("def mask(x):\n    return x > 0\n")
    layer = pkg / "activation.py"
    layer.write_text(textwrap.dedent("""\
        from grad_helpers import mask          # a sibling file
        from mytorch.nn.helpers import relu    # the package it sits in


        class Relu:
            def forward(self, X):
                self.X = X
                return relu(X)

            def backward(self, grad_out):
                return grad_out * mask(self.X)
        """))
    result = runner.invoke(app, ["check", "relu", "--impl", f"{layer}:Relu"])
    assert result.exit_code == 0, result.output


def test_spec_that_exits_or_prints(tmp_path):
    spec = tmp_path / "noisy.py"
    body = textwrap.dedent("""\
        from gradtool.lang import Spec
        print("building the spec")
        spec = Spec("noisy", "prints while it is built")
        N, D = spec.dims("N D")
        n, d = spec.indices(n=N, d=D)
        X = spec.input("X", N, D)
        spec.output("Y", [n, d], X[n, d] ** 2)
        """)
    spec.write_text(body)
    result = runner.invoke(app, ["derive", str(spec), "--json"])
    assert result.exit_code == 0 and "building the spec" in result.stderr
    assert json.loads(result.stdout)["spec"] == "noisy"
    spec.write_text(body + "import sys\nsys.exit(0)\n")
    _one_error_line(runner.invoke(app, ["derive", str(spec), "--json"]),
                    f"{spec}:9:", "called sys.exit(0)")
    spec.write_text(body + "while True:\n    pass\n")
    result = runner.invoke(app, ["derive", str(spec)], env={"GRADTOOL_TIMEOUT": "1"})
    _one_error_line(result, "running the spec ran past the time limit of 1 s")
    # the guard's error as it is, with the loop's line, not wrapped in a second message
    assert "UserCodeError" not in result.stderr and "fix that line" not in result.stderr
    assert f"{spec}:8:" in result.stderr or f"{spec}:9:" in result.stderr, result.stderr


def test_latin1_spec_with_a_coding_line(tmp_path):
    spec = tmp_path / "latin.py"
    spec.write_bytes(textwrap.dedent("""\
        # -*- coding: latin-1 -*-
        from gradtool.lang import Spec
        spec = Spec("latin", "carré: Y = X²")
        N = spec.dims("N")
        n = spec.indices(n=N)
        X = spec.input("X", N)
        spec.output("Y", [n], X[n] ** 2)
        """).encode("latin-1"))
    result = runner.invoke(app, ["derive", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["description"] == "carré: Y = X²"


@pytest.mark.parametrize("returned, says", [("None", "returned None"),
                                            ('"abc"', "returned a str, not an array")])
@pytest.mark.parametrize("where", ["forward", "backward"])
def test_layer_returning_a_non_array(tmp_path, returned, says, where):
    path = _relu_file(tmp_path, **{where: f"return {returned}"})
    _one_error_line(_check(path), f"Relu.{where} {says}".replace(
        "backward returned ", "backward returned the gradient of `X` as "))


def test_map_of_an_unknown_name_is_an_error(tmp_path):
    result = _check(_relu_file(tmp_path), "--map", "nothere=foo")
    _one_error_line(result, "--map names `nothere`, which is not in relu")


def test_writes_to_file_descriptor_1_keep_json_clean(tmp_path):
    """``os.write(1, …)`` (or a C library's printf) bypasses sys.stdout: the guard points
    descriptor 1 at stderr while user code runs, so stdout stays one JSON document."""
    import os
    import subprocess
    import sys

    path = _relu_file(tmp_path, head="import os\n", forward="os.write(1, b'{\"hi\": 1}\\n')")
    env = {**os.environ, "GRADTOOL_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "gradtool", "check", "relu", "--impl",
                           f"{path}:Relu", "--json"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True
    assert '{"hi": 1}' in done.stderr
