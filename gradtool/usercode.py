"""Running code gradtool is given: spec files and people's own layers.

gradtool imports and executes the files it is pointed at, as a test runner does. This module is
the one guard around that code:

* its output goes to stderr, so stdout carries only gradtool's report (``--json``): ``print``
  (``sys.stdout``) and, where the process has a real standard output, writes to file
  descriptor 1 as well (``os.write(1, …)``, a C library's ``printf``);
* ``sys.exit``, ``KeyboardInterrupt`` raised by the code, and any exception become one
  :class:`UserCodeError` naming the file and line and the call that was running;
* so do the ways out of the process that skip exceptions, ``os._exit`` and ``os.abort``, an
  exit handler the file itself registers (``atexit.register``, which could change the exit
  status after the report), and changes to what the time limit relies on (the ``SIGALRM``
  handler, the ``ITIMER_REAL`` timer, ``signal.alarm``, blocking ``SIGALRM``): each call
  raises instead, and a call that catches that exception still fails. Code that kills its own
  process by other means (a signal to itself) cannot be caught in-process; an autograder
  should also require the report (``--json``) and not only the exit status;
* a time limit (``GRADTOOL_TIMEOUT`` seconds, 60 by default; ``0`` turns it off) stops an
  endless loop with an error naming the call; a call that returns after the limit (its code
  caught the alarm, as a bare ``except:`` does) fails as well;
* a file is imported with its own folder (and the root of the package it sits in) on the import
  path and with ``sys.argv`` set to ``[file]``, as ``python file.py`` would see it.

:func:`running` guards one call. :func:`contained` guards a whole command that runs user code
(``gradtool check --impl``): the refusals above and the redirection of stdout hold from the
first import to the report, so that finalizers (``__del__``), threads and exit handlers cannot
end the process, change its exit status or write into the report between or after the calls
(what they tried is kept in :attr:`Containment.strays`). As the process itself (the CLI, not a
test calling it in-process) it also runs a watchdog that ends a call ignoring the alarm, and
:meth:`Containment.finish` ends the process with the report's exit status before any
finalizer, exit handler or leftover thread can run.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
import importlib.util
import io
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
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
    """Raised in place of a call that would end the process (``os._exit``) or defeat the time
    limit (``signal.signal(SIGALRM, …)``); a BaseException so that the user's ``except
    Exception`` cannot swallow it (a bare ``except:`` can: :func:`running` then still fails
    the call, from :attr:`_Guard.refused`)."""

    def __init__(self, call: str):
        super().__init__(call)
        self.call = call


# the real functions, as gradtool itself uses them while the guard replaces them
_REAL = {"_exit": os._exit, "abort": os.abort, "register": atexit.register,
         "signal": signal.signal, "setitimer": getattr(signal, "setitimer", None),
         "alarm": getattr(signal, "alarm", None),
         "pthread_sigmask": getattr(signal, "pthread_sigmask", None)}

EXIT_HINT = ("gradtool runs this code in its own process; it must not end the process or "
             "change how it exits")
ALARM_HINT = ("gradtool's time limit uses SIGALRM and the ITIMER_REAL timer; the code must not "
              "change their handler, timer or mask (raise the limit with "
              "GRADTOOL_TIMEOUT=SECONDS instead)")


@dataclass
class Refusal:
    """A refused call: what was called, from which user file and line (``None`` where no
    frame of a user file was on the stack), and the guarded call that was running then
    (``None``: between or after the calls, as from a finalizer or a thread)."""

    call: str
    file: str | None
    line: int | None
    during: str | None
    hint: str = EXIT_HINT


class _Guard:
    """The replaced functions, installed while any :func:`running` call or
    :func:`contained` session holds them (``depth``), with the user files seen so far and
    every refusal."""

    depth = 0
    files: set[str] = set()
    calls: list[str] = []  # the guarded calls running now, innermost last
    refused: list[Refusal] = []

    @classmethod
    def refuse(cls, call: str, hint: str = EXIT_HINT):
        file = line = None
        frame = sys._getframe(2)
        while frame is not None:  # the innermost frame in a user file
            if frame.f_code.co_filename in cls.files:
                file, line = frame.f_code.co_filename, frame.f_lineno
                break
            frame = frame.f_back
        cls.refused.append(Refusal(call, file, line, cls.calls[-1] if cls.calls else None,
                                   hint))
        raise _ProcessExit(call)


def _exit(status=0, *args):
    _Guard.refuse(f"os._exit({status})")


def _abort():
    _Guard.refuse("os.abort()")


def _register(func, *args, **kwargs):
    if sys._getframe(1).f_code.co_filename in _Guard.files:
        _Guard.refuse("atexit.register(...)")
    return _REAL["register"](func, *args, **kwargs)


def _signal(signalnum, handler):
    if signalnum == signal.SIGALRM:
        _Guard.refuse("signal.signal(SIGALRM, ...)", ALARM_HINT)
    return _REAL["signal"](signalnum, handler)


def _setitimer(which, seconds, interval=0.0):
    if which == signal.ITIMER_REAL:
        _Guard.refuse("signal.setitimer(ITIMER_REAL, ...)", ALARM_HINT)
    return _REAL["setitimer"](which, seconds, interval)


def _alarm_call(seconds):
    _Guard.refuse(f"signal.alarm({seconds})", ALARM_HINT)


def _pthread_sigmask(how, mask):
    if how != signal.SIG_UNBLOCK and signal.SIGALRM in set(mask):
        _Guard.refuse("signal.pthread_sigmask(..., {SIGALRM})", ALARM_HINT)
    return _REAL["pthread_sigmask"](how, mask)


_REPLACED = [(os, "_exit", _exit), (os, "abort", _abort), (atexit, "register", _register),
             (signal, "signal", _signal)] + [
    (signal, name, fn) for name, fn in (("setitimer", _setitimer), ("alarm", _alarm_call),
                                        ("pthread_sigmask", _pthread_sigmask))
    if _REAL[name] is not None]


@contextlib.contextmanager
def _guarded(filename: str | None = None) -> Iterator[None]:
    """The replacements of :data:`_REPLACED` hold while the body runs (and while any
    enclosing guard does); ``filename`` joins the user files whose ``atexit.register`` is
    refused (libraries they import may still register their handlers)."""
    if filename is not None:
        _Guard.files.add(filename)
    if _Guard.depth == 0:
        for module, name, fn in _REPLACED:
            setattr(module, name, fn)
    _Guard.depth += 1
    try:
        yield
    finally:
        _Guard.depth -= 1
        if _Guard.depth == 0:
            for module, name, _ in _REPLACED:
                setattr(module, name, _REAL[name])


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

    previous = _REAL["signal"](signal.SIGALRM, ring)
    outer = _REAL["setitimer"](signal.ITIMER_REAL, seconds)[0]
    try:
        yield
    finally:
        _REAL["setitimer"](signal.ITIMER_REAL, 0)
        _REAL["signal"](signal.SIGALRM, previous)
        if outer:  # an enclosing limit keeps running (minus nothing: it is the outer bound)
            _REAL["setitimer"](signal.ITIMER_REAL, outer)


@contextlib.contextmanager
def running(what: str, file: str | os.PathLike, *,
            timeout: float | None = None, passthrough: tuple = ()) -> Iterator[None]:
    """Run the body as user code from ``file``; ``what`` names the call for messages
    ("importing it", "your layer's backward at N=1, D=3").

    Exceptions listed in ``passthrough`` (gradtool's own errors raised on the user's behalf,
    such as a :class:`SpecError` from the spec language) pass unchanged. Raises
    :class:`UserCodeError` for everything else the code raised, for ``sys.exit``,
    ``os._exit``, ``os.abort``, an ``atexit.register`` in ``file`` and a change to the
    ``SIGALRM`` handler, timer or mask (also when the code caught the exception that refused
    it), and for the time limit (also when the code caught the alarm and returned late).
    """
    filename = str(file)
    limit = time_limit() if timeout is None else timeout
    seen = len(_Guard.refused)
    started = time.monotonic()
    try:
        with contextlib.redirect_stdout(sys.stderr), _stdout_fd_to_stderr(), \
                _guarded(filename), _calling(what, filename, limit), _alarm(limit):
            yield
    except passthrough:
        raise
    except _ProcessExit as exc:
        raise UserCodeError(f"{what} called {exc.call}", file=filename,
                            line=line_in(exc.__traceback__, filename),
                            hint=_refused_hint(exc.call)) from None
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
    elapsed = time.monotonic() - started
    caught = _Guard.refused[seen:]
    if caught:  # refused, and the code caught the exception (a bare `except:`)
        first = caught[0]
        raise UserCodeError(f"{what} called {first.call} (and caught the exception gradtool "
                            "raised in its place)", file=first.file or filename,
                            line=first.line, hint=first.hint)
    if limit and elapsed > limit:  # the alarm rang, and the code caught it
        raise UserCodeError(f"{what} ran past the time limit of {limit:g} s: it returned after "
                            f"{elapsed:.1f} s, so it caught the time-limit alarm (a bare "
                            "`except:` or `except BaseException:` around a slow step?)",
                            file=filename, hint="catch `Exception`, not everything, and look "
                            "for the slow step; or raise the limit with "
                            "GRADTOOL_TIMEOUT=SECONDS (0: none)")


def _refused_hint(call: str) -> str:
    return ALARM_HINT if call.startswith("signal.") else EXIT_HINT


@contextlib.contextmanager
def _calling(what: str, filename: str, limit: float) -> Iterator[None]:
    """Name the running call for refusals, and arm the watchdog of a :func:`contained`
    process for it."""
    _Guard.calls.append(what)
    watch = Containment.current.watch(what, filename, limit) \
        if Containment.current is not None else contextlib.nullcontext()
    try:
        with watch:
            yield
    finally:
        _Guard.calls.pop()


class Containment:
    """A command running user code (see :func:`contained`).

    ``report`` is the stream for gradtool's report: the process's real standard output, which
    user code can no longer reach (``sys.stdout`` and descriptor 1 go to stderr until the
    process ends or the session closes). ``strays`` lists what user code tried outside any
    call (a finalizer calling ``os._exit``, a thread changing the alarm): the command should
    report it as a failure."""

    current: Containment | None = None
    GRACE = 2.0  # seconds past the limit before the watchdog ends the process

    def __init__(self, process: bool, on_timeout=None):
        self.process = process
        self.on_timeout = on_timeout
        self.report = sys.stdout
        self._first = len(_Guard.refused)
        self._deadline: tuple[float, str, str, float] | None = None
        self._wake = threading.Event()

    @property
    def strays(self) -> list[Refusal]:
        return [r for r in _Guard.refused[self._first:] if r.during is None]

    def grace(self, limit: float) -> float:
        """The watchdog's grace period past ``limit``: 2 s or a tenth of the limit, whichever
        is longer."""
        return max(self.GRACE, 0.1 * limit)

    @contextlib.contextmanager
    def watch(self, what: str, filename: str, limit: float) -> Iterator[None]:
        """As the process, end it (status 1, after ``on_timeout`` reported the error) when
        the body runs past ``limit`` plus :meth:`grace`: the code ignored or blocked the alarm
        by means the guard cannot refuse. A C-level watchdog (faulthandler) ends it a grace
        period later still, should the interpreter itself be stuck."""
        if not self.process or not limit:
            yield
            return
        outer = self._deadline
        self._deadline = (time.monotonic() + limit + self.grace(limit), what, filename, limit)
        faulthandler.dump_traceback_later(limit + 2 * self.grace(limit), exit=True)
        self._wake.set()
        try:
            yield
        finally:
            faulthandler.cancel_dump_traceback_later()
            self._deadline = outer
            self._wake.set()

    def _watchdog(self) -> None:
        while True:
            deadline = self._deadline
            if deadline is None:
                self._wake.wait()
                self._wake.clear()
                continue
            left = deadline[0] - time.monotonic()
            if left > 0:
                self._wake.wait(min(left, 0.5))
                self._wake.clear()
                continue
            _, what, filename, limit = deadline
            error = UserCodeError(
                f"{what} ran past the time limit of {limit:g} s and went on "
                f"{self.grace(limit):g} s more: the code caught the time-limit alarm (a bare "
                "`except:` or `except BaseException:` around a slow step) or ignored it, so "
                "gradtool ended the process", file=filename,
                hint="catch `Exception`, not everything, and look for the slow step or an "
                     "endless loop; or raise the limit with GRADTOOL_TIMEOUT=SECONDS (0: none)")
            with contextlib.suppress(Exception):
                if self.on_timeout is not None:
                    self.on_timeout(error)
            self.finish(1)

    def finish(self, status: int) -> None:
        """As the process: flush the report and stderr and end the process with ``status`` at
        once, so no finalizer, exit handler or thread of the user's code runs after it."""
        for stream in (self.report, sys.__stderr__, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        _REAL["_exit"](status)


@contextlib.contextmanager
def contained(*, process: bool, on_timeout=None) -> Iterator[Containment]:
    """Guard a whole command that runs user code (``gradtool check --impl``).

    While the body runs, the refusals of :func:`running` hold between and after the calls as
    well (a refusal outside any call lands in :attr:`Containment.strays`), ``sys.stdout`` and
    descriptor 1 go to stderr, and :attr:`Containment.report` is the real standard output. At
    the end, garbage is collected inside the guard (finalizers of the user's objects run
    guarded), then everything is restored. ``process``: this is the command-line process
    itself, not a test calling the CLI in-process; then a watchdog thread ends a call that
    ignores the alarm (reporting through ``on_timeout(UserCodeError)``), and the caller should
    end with :meth:`Containment.finish`, which leaves the redirection in place."""
    if Containment.current is not None:  # nested: the outer session holds
        yield Containment.current
        return
    session = Containment(process, on_timeout)
    saved = None
    real_stdout = sys.stdout
    try:
        real_stdout.flush()
        if real_stdout.fileno() == 1:
            saved = os.dup(1)
            os.dup2(2, 1)
            session.report = io.TextIOWrapper(
                io.FileIO(saved, "w", closefd=False), encoding=real_stdout.encoding,
                errors=real_stdout.errors, line_buffering=True)
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        pass
    Containment.current = session
    if process:
        threading.Thread(target=session._watchdog, name="gradtool-watchdog",
                         daemon=True).start()
    hooks = sys.unraisablehook, threading.excepthook

    def unraisable(info):  # a refusal in a finalizer: reported in strays, not as a traceback
        if not isinstance(info.exc_value, _ProcessExit):
            hooks[0](info)

    def in_thread(args):  # the same in a thread the code started
        if not isinstance(args.exc_value, _ProcessExit):
            hooks[1](args)

    sys.unraisablehook, threading.excepthook = unraisable, in_thread
    try:
        with _guarded(), contextlib.redirect_stdout(sys.stderr):
            try:
                yield session
            finally:
                gc.collect()
    finally:
        sys.unraisablehook, threading.excepthook = hooks
        Containment.current = None
        if saved is not None:
            with contextlib.suppress(Exception):
                session.report.flush()
            with contextlib.suppress(OSError, ValueError):
                os.dup2(saved, 1)
            os.close(saved)


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
