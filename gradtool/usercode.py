"""Running code gradtool is given: spec files and people's own layers.

gradtool imports and executes the files it is pointed at, as a test runner does. This module is
the one guard around that code:

* its output goes to stderr, so stdout carries only gradtool's report (``--json``): ``print``
  (``sys.stdout``) and, where the process has a real standard output, writes to file
  descriptor 1 as well (``os.write(1, …)``, a C library's ``printf``);
* ``sys.exit``, ``KeyboardInterrupt`` raised by the code, and any exception become one
  :class:`UserCodeError` naming the file and line and the call that was running;
* so do the ways out of the process that skip exceptions, ``os._exit`` and ``os.abort``, and
  an exit handler the file itself registers (``atexit.register``, which could change the
  exit status after the report): each call raises instead. Code that kills its own process by
  other means (a signal to itself) cannot be caught in-process; an autograder should also
  require the report (``--json``) and not only the exit status;
* a time limit (``GRADTOOL_TIMEOUT`` seconds, 60 by default; ``0`` turns it off) stops an
  endless loop with an error naming the call;
* a file is imported with its own folder (and the root of the package it sits in) on the import
  path and with ``sys.argv`` set to ``[file]``, as ``python file.py`` would see it.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from gradtool.errors import GradtoolError

DEFAULT_TIMEOUT = 60.0


class UserCodeError(GradtoolError):
    """Code gradtool was given (a spec file, a layer) raised, exited or ran past its time."""


class _TimeLimit(BaseException):
    """Raised by the alarm; a BaseException so that the user's ``except Exception`` cannot
    swallow it."""


class _ProcessExit(BaseException):
    """Raised in place of a call that would end the process (``os._exit``); a BaseException
    so that the user's ``except Exception`` cannot swallow it."""

    def __init__(self, call: str):
        super().__init__(call)
        self.call = call


@contextlib.contextmanager
def _no_process_exit(filename: str) -> Iterator[None]:
    """``os._exit`` and ``os.abort`` raise :class:`_ProcessExit` while the body runs, and so
    does ``atexit.register`` called from ``filename`` itself (libraries it imports may still
    register their handlers)."""
    real = os._exit, os.abort, atexit.register

    def _exit(status=0, *args):
        raise _ProcessExit(f"os._exit({status})")

    def abort():
        raise _ProcessExit("os.abort()")

    def register(func, *args, **kwargs):
        if sys._getframe(1).f_code.co_filename == filename:
            raise _ProcessExit("atexit.register(...)")
        return real[2](func, *args, **kwargs)

    os._exit, os.abort, atexit.register = _exit, abort, register
    try:
        yield
    finally:
        os._exit, os.abort, atexit.register = real


@contextlib.contextmanager
def _stdout_fd_to_stderr() -> Iterator[None]:
    """File descriptor 1 points at descriptor 2 while the body runs (what Python's
    ``redirect_stdout`` cannot reach: ``os.write(1, …)``, output from C code); nothing
    happens where either descriptor is not usable."""
    try:
        sys.__stdout__.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
    except (OSError, AttributeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            os.dup2(saved, 1)
        os.close(saved)


def time_limit() -> float:
    """Seconds user code may run per call: ``$GRADTOOL_TIMEOUT``, else 60; 0 means none."""
    text = os.environ.get("GRADTOOL_TIMEOUT", "")
    try:
        value = float(text) if text else DEFAULT_TIMEOUT
    except ValueError:
        raise GradtoolError(f"GRADTOOL_TIMEOUT={text!r} is not a number of seconds",
                            hint="e.g. GRADTOOL_TIMEOUT=120, or 0 for no limit") from None
    if value < 0 or value != value:
        raise GradtoolError(f"GRADTOOL_TIMEOUT={text!r} is not a number of seconds",
                            hint="e.g. GRADTOOL_TIMEOUT=120, or 0 for no limit")
    return value


def line_in(tb, filename: str) -> int | None:
    """The deepest line of ``filename`` in a traceback."""
    line = None
    for frame in traceback.extract_tb(tb):
        if frame.filename == filename:
            line = frame.lineno
    return line


@contextlib.contextmanager
def _alarm(seconds: float) -> Iterator[None]:
    usable = seconds > 0 and hasattr(signal, "setitimer") \
        and threading.current_thread() is threading.main_thread()
    if not usable:
        yield
        return

    def ring(signum, frame):
        raise _TimeLimit

    previous = signal.signal(signal.SIGALRM, ring)
    outer = signal.setitimer(signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer:  # an enclosing limit keeps running (minus nothing: it is the outer bound)
            signal.setitimer(signal.ITIMER_REAL, outer)


@contextlib.contextmanager
def running(what: str, file: str | os.PathLike, *,
            timeout: float | None = None, passthrough: tuple = ()) -> Iterator[None]:
    """Run the body as user code from ``file``; ``what`` names the call for messages
    ("importing it", "your layer's backward at N=1, D=3").

    Exceptions listed in ``passthrough`` (gradtool's own errors raised on the user's behalf,
    such as a :class:`SpecError` from the spec language) pass unchanged. Raises
    :class:`UserCodeError` for everything else the code raised, for ``sys.exit``,
    ``os._exit``, ``os.abort`` and an ``atexit.register`` in ``file``, and for the time limit.
    """
    filename = str(file)
    limit = time_limit() if timeout is None else timeout
    try:
        with contextlib.redirect_stdout(sys.stderr), _stdout_fd_to_stderr(), _alarm(limit), \
                _no_process_exit(filename):
            yield
    except passthrough:
        raise
    except _ProcessExit as exc:
        raise UserCodeError(f"{what} called {exc.call}", file=filename,
                            line=line_in(exc.__traceback__, filename),
                            hint="gradtool runs this code in its own process; it must not end "
                                 "the process or change how it exits") from None
    except _TimeLimit as exc:
        raise UserCodeError(f"{what} ran past the time limit of {limit:g} s", file=filename,
                            line=line_in(exc.__traceback__, filename),
                            hint="look for an endless loop, or raise the limit with "
                                 "GRADTOOL_TIMEOUT=SECONDS (0: none)") from None
    except SystemExit as exc:
        code = exc.code
        raise UserCodeError(f"{what} called sys.exit({code if code is not None else ''})",
                            file=filename, line=line_in(exc.__traceback__, filename),
                            hint="gradtool runs this code; it must not exit the process "
                                 "(put script code under `if __name__ == \"__main__\":`)"
                            ) from None
    except KeyboardInterrupt as exc:
        line = line_in(exc.__traceback__, filename)
        if line is None:  # a real Ctrl-C, not raised by the code itself
            raise
        raise UserCodeError(f"{what} raised KeyboardInterrupt", file=filename, line=line,
                            hint="gradtool runs this code; it must not raise "
                                 "KeyboardInterrupt") from None
    except GradtoolError:
        raise
    except SyntaxError as exc:
        if exc.filename != filename:
            raise
        raise UserCodeError(f"syntax error: {exc.msg}", file=filename, line=exc.lineno,
                            hint="fix the Python syntax on that line") from None
    except Exception as exc:
        # no line in the file: the call itself failed (a wrong number of arguments)
        line = line_in(exc.__traceback__, filename)
        raise UserCodeError(f"{what} raised {type(exc).__name__}: {exc}", file=filename,
                            line=line, hint="fix that line") from None


def _package_root(folder: Path) -> Path:
    """The folder above the outermost package that contains ``folder`` (``folder`` itself
    when it is not a package), so ``from mytorch.nn import Linear`` resolves."""
    root = folder
    while (root / "__init__.py").exists() and root.parent != root:
        root = root.parent
    return root


def import_file(path: Path, module_name: str) -> ModuleType:
    """Import ``path`` as ``module_name`` inside :func:`running`: its folder and package root
    on ``sys.path``, ``sys.argv`` as for ``python path``. Raises :class:`UserCodeError`."""
    path = path.resolve()
    folders = [str(p) for p in dict.fromkeys([path.parent, _package_root(path.parent)])]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    saved_argv = list(sys.argv)
    # the folders stay on the path: the file's functions may import siblings when called
    sys.path[:0] = [f for f in folders if f not in sys.path]
    sys.argv[:] = [str(path)]
    try:
        with running("importing it", path):
            spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        sys.argv[:] = saved_argv
    return module
