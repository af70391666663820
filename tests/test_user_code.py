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
from tests.json_schemas import valid as json_valid

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


# -- containment between and after the calls, the time limit, several return values ---------


def _gradtool(*args, tmp_path, env=None):
    """``python -m gradtool ARGS`` as its own process (what cannot run in-process: the
    process ends with the report's status, the watchdog ends it)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "GRADTOOL_CACHE": str(tmp_path / "cache"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "gradtool", *args], capture_output=True,
                          text=True, env=env, timeout=300)


# os._exit(0) in a finalizer or in a thread between the calls, threads that print late (on
# sys.stdout and descriptor 1) and that never end: as the process, the report and its exit
# status must survive all of them
HOSTILE = """\
import os, threading, time
import numpy as np


def _late():
    time.sleep(0.5)
    print("LATE-PRINT")
    os.write(1, b"LATE-FD1\\n")


def _forever():
    while True:
        time.sleep(1)


def _exit_when(event):
    event.wait()
    os._exit(0)


class Relu:
    def forward(self, X):
        threading.Thread(target=_late).start()
        threading.Thread(target=_forever).start()
        self.X = X
        return np.maximum(X, 0)

    def backward(self, grad_out):
        return {factor} * grad_out * (self.X > 0)

    def __del__(self):
        {on_del}
"""
EXIT_IN_DEL = "os._exit(0)"
# a thread that exits between the calls (joined here, so that it happens before the report)
EXIT_IN_THREAD = ("event = threading.Event()\n        thread = threading.Thread("
                  "target=_exit_when, args=(event,))\n        thread.start()\n"
                  "        event.set()\n        thread.join()")


@pytest.mark.parametrize("factor, on_del", [(2, EXIT_IN_DEL), (1, EXIT_IN_DEL),
                                            (1, EXIT_IN_THREAD)])
def test_finalizers_and_threads_cannot_change_the_status_or_the_report(tmp_path, factor,
                                                                       on_del):
    """A layer whose ``__del__`` called ``os._exit(0)`` made a wrong backward "pass" (exit 0,
    no output); a thread printing after the report broke ``--json``; a thread that never
    ends kept the process alive. Now the report is the one JSON document on stdout, a wrong
    backward exits 1, and the refused exit outside any call fails the check even when the
    gradients are right."""
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE.format(factor=factor, on_del=on_del))
    done = _gradtool("check", "relu", "--impl", f"{path}:Relu", "--json", tmp_path=tmp_path)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is False
    failed = [r for r in report["rows"] if not r["passed"]]
    assert "contract_stays_in_its_calls" in {d["code"] for r in failed for d in r["diagnoses"]}
    assert {r["kind"] for r in failed} == ({"contract", "gradient"} if factor == 2
                                           else {"contract"})
    assert "LATE" not in done.stdout
    assert "Traceback" not in done.stderr


def test_exit_in_a_finalizer_fails_in_process(tmp_path):
    """The same containment when the CLI runs in-process (as in these tests): the finalizer's
    os._exit is refused and named, and the test process goes on."""
    path = _relu_file(tmp_path, head="import os\n", init="Relu.__del__ = lambda self: os._exit(0)")
    result = _check(path, "--json")
    assert result.exit_code == 1, result.output
    rows = [r for r in json_valid("check", result.stdout)["rows"] if not r["passed"]]
    assert [r["oracle"] for r in rows] == ["contract: stays in its calls"]
    assert "os._exit(0) was called outside any call" in rows[0]["note"]
    assert f"{path}:" in rows[0]["note"]
    import atexit
    import os
    import signal

    from gradtool import usercode

    # the containment ended with the command: this process has its own functions back
    assert (os._exit, os.abort, atexit.register, signal.signal, signal.setitimer) == tuple(
        usercode._REAL[k] for k in ("_exit", "abort", "register", "signal", "setitimer"))


def test_correct_layer_with_lingering_threads_passes_as_a_process(tmp_path):
    """Threads that print late or never end neither break the report nor keep the process
    alive; a correct layer still passes with exit status 0."""
    path = tmp_path / "threads.py"
    path.write_text(HOSTILE.format(factor=1, on_del="pass"))
    done = _gradtool("check", "relu", "--impl", f"{path}:Relu", "--json", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["passed"] is True


@pytest.mark.parametrize("how, says", [
    ("signal.signal(signal.SIGALRM, signal.SIG_IGN)", "called signal.signal(SIGALRM, ...)"),
    ("signal.setitimer(signal.ITIMER_REAL, 0)", "called signal.setitimer(ITIMER_REAL, ...)"),
    ("signal.alarm(0)", "called signal.alarm(0)"),
    ("signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})",
     "called signal.pthread_sigmask(..., {SIGALRM})")])
@pytest.mark.parametrize("caught", [False, True])
def test_changing_the_alarm_is_refused(tmp_path, how, says, caught):
    """A layer that set SIGALRM to SIG_IGN (or stopped the timer) ran forever; it is refused
    like os._exit, and a call that catches the refusal with a bare except still fails."""
    code = f"try:\n            {how}\n        except:  # noqa: E722\n            pass" \
        if caught else how
    path = _relu_file(tmp_path, head="import signal\n", forward=code)
    _one_error_line(_check(path), f"{path}:{11 if caught else 10}:", f"Relu.forward(X) {says}",
                    *(["caught the exception"] if caught else []))


def test_exit_caught_by_a_bare_except_still_fails(tmp_path):
    code = "try:\n            os._exit(0)\n        except:  # noqa: E722\n            pass"
    path = _relu_file(tmp_path, head="import os\n", backward=code)
    _one_error_line(_check(path), f"{path}:16:", "Relu.backward called os._exit(0) (and caught")


def test_a_call_that_catches_the_alarm_fails_when_it_returns(tmp_path):
    """A student's retry loop with a bare ``except:`` swallowed the alarm and "passed" after
    8 s under GRADTOOL_TIMEOUT=2; a call that returns past the limit fails."""
    code = ("t = time.monotonic()\n        while time.monotonic() - t < 1.2:\n"
            "            try:\n                time.sleep(0.05)\n"
            "            except:  # noqa: E722\n                continue")
    path = _relu_file(tmp_path, head="import time\n", forward=code)
    _one_error_line(_check(path, env={"GRADTOOL_TIMEOUT": "0.5"}),
                    "Relu.forward(X) ran past the time limit of 0.5 s: it returned after",
                    "caught the time-limit alarm")


def test_watchdog_ends_a_call_that_never_yields_to_the_alarm(tmp_path):
    """A layer that catches every alarm and never returns ran forever: as the process,
    gradtool reports it after a grace period and exits 1 (``--json``: the error object)."""
    code = ("while True:\n            try:\n                time.sleep(0.05)\n"
            "            except BaseException:\n                pass")
    path = _relu_file(tmp_path, head="import time\n", forward=code)
    done = _gradtool("check", "relu", "--impl", f"{path}:Relu", "--json", tmp_path=tmp_path,
                     env={"GRADTOOL_TIMEOUT": "0.5"})
    assert done.returncode == 1, done.stderr
    err = json.loads(done.stdout)["error"]
    assert "Relu.forward(X) ran past the time limit of 0.5 s and went on 2 s more" \
        in err["message"], err
    assert err["file"] == str(path)


TWO_OUT_SPEC = """\
from gradtool.lang import Spec, Sum, tanh
spec = Spec("two_out", "two outputs, W read twice")
N, D = spec.dims("N D")
n, d, e, f = spec.indices(n=N, d=D, e=D, f=D)
X = spec.input("X", N, D)
W = spec.param("W", D, D)
H = spec.let("H", [n, e], tanh(Sum(W[e, d] * X[n, d], d)))
spec.output("Y", [n, f], Sum(W[f, e] * H[n, e], e))
spec.output("Z", [n, e], H[n, e] ** 2)
"""

TWO_OUT = """\
import numpy as np


class TwoOut:
    def __init__(self, D):
        self.W = np.zeros((D, D))

    def forward(self, X):
        self.X = X
        self.H = np.tanh(X @ self.W.T)
        return {returned}

    def backward(self, G_Y, G_Z):
        dH = G_Y @ self.W + {z_factor} * G_Z * self.H
        ds = dH * (1 - self.H ** 2)
        self.dW = G_Y.T @ self.H + ds.T @ self.X
        return ds @ self.W
"""

DIV = """\
class Div:
    def forward(self, X, Y):
        self.X, self.Y = X, Y
        return {returned}

    def backward(self, G):
        return {grads}
"""


@pytest.mark.parametrize("returned", ["[self.H @ self.W.T, self.H ** 2]",
                                      "(self.H @ self.W.T, self.H ** 2)"])
@pytest.mark.parametrize("z_factor, passes", [(2, True), (0, False)])
def test_two_outputs_as_a_list_or_a_tuple(tmp_path, returned, z_factor, passes):
    """A forward returning [Y, Z] was read as one stacked (2, N, D) array; a list is the
    outputs, as a tuple is. A backward that drops Z's path still fails."""
    spec = tmp_path / "two_out.py"
    spec.write_text(TWO_OUT_SPEC)
    path = tmp_path / "two_out_impl.py"
    path.write_text(TWO_OUT.format(returned=returned, z_factor=z_factor))
    result = runner.invoke(app, ["check", str(spec), "--impl", f"{path}:TwoOut", "--json"])
    assert result.exit_code == (0 if passes else 1), result.output
    assert json.loads(result.stdout)["passed"] is passes


@pytest.mark.parametrize("returned, grads", [
    ("X / Y", "[G / self.Y, -G * self.X / self.Y ** 2]"),
    ("(X / Y,)", "(G / self.Y, -G * self.X / self.Y ** 2)"),
    ("[X / Y]", "[G / self.Y, -G * self.X / self.Y ** 2, None]"),
    ("X / Y", "[G / self.Y, G * self.X / self.Y ** 2]")])
def test_one_output_and_several_gradients_as_lists_or_tuples(tmp_path, returned, grads):
    """A backward returning [dX, dY] was read as one stacked array ("returned 1
    gradient(s)"); a 1-tuple (Y,) for one output failed as shape (1, ...). The last case has
    the sign of dY wrong and must fail."""
    path = tmp_path / "div_impl.py"
    path.write_text(DIV.format(returned=returned, grads=grads))
    result = runner.invoke(app, ["check", "div", "--impl", f"{path}:Div", "--json"])
    wrong = grads.startswith("[G / self.Y, G")
    assert result.exit_code == int(wrong), result.output
    report = json.loads(result.stdout)
    assert report["failed_specs"] == (["div"] if wrong else [])
    if wrong:
        assert {r["tensor"] for r in report["rows"] if not r["passed"]} == {"Y"}


@pytest.mark.parametrize("returned, grads, says", [
    ("X / Y", "np.stack([G / self.Y, -G * self.X / self.Y ** 2])",
     "Div.backward returned one array of shape (2, "),
    ("X / Y", "(G / self.Y,)", "Div.backward returned a tuple of 1 value, but div has 2 "
                               "differentiable inputs: `X`, `Y`"),
    ("(X / Y, X)", "(G, G)", "Div.forward returned a tuple of 2 values, but div has 1 "
                             "output: `Z`")])
def test_wrong_number_of_values_is_named(tmp_path, returned, grads, says):
    path = tmp_path / "div_impl.py"
    path.write_text("import numpy as np\n\n\n" + DIV.format(returned=returned, grads=grads))
    _one_error_line(runner.invoke(app, ["check", "div", "--impl", f"{path}:Div"]), says)


def test_one_array_for_two_outputs_is_named(tmp_path):
    spec = tmp_path / "two_out.py"
    spec.write_text(TWO_OUT_SPEC)
    path = tmp_path / "two_out_impl.py"
    path.write_text(TWO_OUT.format(returned="np.stack([self.H @ self.W.T, self.H ** 2])",
                                   z_factor=2))
    _one_error_line(runner.invoke(app, ["check", str(spec), "--impl", f"{path}:TwoOut"]),
                    "TwoOut.forward returned one array of shape (2, ", "two_out has 2 outputs: "
                    "`Y`, `Z`", "as a tuple or list: (Y, Z)")


@pytest.mark.parametrize("grads, ok", [
    ('{"X": G / self.Y, "Y": -G * self.X / self.Y ** 2}', True),
    ('{"dX": G / self.Y, "dY": -G * self.X / self.Y ** 2, "note": "extra keys are ignored"}',
     True),
    ('{"X": G / self.Y, "Y": G * self.X / self.Y ** 2}', False)])
def test_gradients_as_a_dict_by_the_specs_names(tmp_path, grads, ok):
    """A backward returning its gradients in a dict keyed by the spec's names (``X`` or
    ``dX``) is read by those names; a wrong dY in a dict still fails."""
    path = tmp_path / "div_impl.py"
    path.write_text(DIV.format(returned="X / Y", grads=grads))
    result = runner.invoke(app, ["check", "div", "--impl", f"{path}:Div"])
    assert result.exit_code == (0 if ok else 1), result.output


def test_a_dict_without_a_gradient_is_named(tmp_path):
    path = tmp_path / "div_impl.py"
    path.write_text(DIV.format(returned="X / Y", grads='{"X": G / self.Y}'))
    _one_error_line(runner.invoke(app, ["check", "div", "--impl", f"{path}:Div"]),
                    "Div.backward returned a dict with keys 'X', but div has 2 differentiable "
                    "inputs: `X`, `Y`; no value for `Y` (or `dY`)")
