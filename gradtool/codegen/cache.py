"""Compile generated kernels once and cache them by the spec's content hash.

The cache key covers the spec file's bytes, the code that generates kernels and the target, so
a cached module is reused without deriving anything. Files are written to a temporary name and
renamed into place (atomic on POSIX), so two processes compiling the same spec at once both
succeed. Each file ends with a checksum of its text: a file that was truncated, overwritten or
emptied is detected, regenerated once and reported on stderr. A cache folder that cannot be
used (a file in its place, read-only, under /proc) is replaced by a private temporary folder
with a one-line warning naming ``GRADTOOL_CACHE``. File names come from the spec's name made
into an identifier plus the content hash, so no spec name can point outside the cache folder.
Modules are imported from their files, so a traceback into a kernel shows the generated lines.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from gradtool import __version__
from gradtool.codegen.emit import generate
from gradtool.fileio import write_atomic
from gradtool.spec.lang import Spec
from gradtool.spec.loader import load_spec

__all__ = ["cache_dir", "compile_spec", "spec_key", "write_atomic"]

_CHECKSUM = "# gradtool-checksum: "
_fallback: list[Path] = []  # the private folder used once the configured one failed


def cache_dir() -> Path:
    """``$GRADTOOL_CACHE``, else ``$XDG_CACHE_HOME/gradtool``, else ``~/.cache/gradtool``."""
    if os.environ.get("GRADTOOL_CACHE"):
        return Path(os.environ["GRADTOOL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradtool"


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


@functools.cache
def generator_fingerprint() -> bytes:
    """A hash of the code that turns specs into kernels: a changed engine or printer makes
    new kernels even when the version number stays the same (as in a development checkout)."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256(__version__.encode())
    for folder in ("spec", "symbolic", "codegen"):
        for path in sorted((root / folder).glob("*.py")):
            digest.update(path.read_bytes())
    return digest.digest()


def spec_key(spec: Spec, target: str) -> str:
    text = Path(spec.file).read_bytes() if spec.file and Path(spec.file).exists() \
        else (repr(spec.statements) + repr(spec.class_name)).encode()
    digest = hashlib.sha256(text + generator_fingerprint() + target.encode()).hexdigest()
    return digest[:20]


def _with_checksum(source: str) -> str:
    return f"{source}{_CHECKSUM}{hashlib.sha256(source.encode()).hexdigest()}\n"


def _intact(path: Path) -> bool:
    """Whether ``path`` is a regular file whose text matches its checksum line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, sep, tail = text.rpartition(_CHECKSUM)
    return bool(sep) and tail.strip() == hashlib.sha256(body.encode()).hexdigest()


def _private_dir() -> Path:
    if not _fallback:
        folder = Path(tempfile.mkdtemp(prefix="gradtool-cache-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _fallback.append(folder)
    return _fallback[0]


def _kernel_file(filename: str, source) -> Path:
    """The path of an intact cached file called ``filename``, written if missing or damaged;
    falls back to a private folder when the cache folder cannot be used."""
    folder = _fallback[0] if _fallback else cache_dir()
    path = folder / filename
    if _intact(path):
        return path
    damaged = path.exists() or path.is_symlink()
    # generated before the try: only the file operations may fall back to the private folder
    # (an OSError out of code generation, or the fuzz time limit's old TimeoutError, an OSError
    # too, was taken for an unusable cache and the kernel generated a second time)
    text = _with_checksum(source())
    try:
        if damaged and not path.is_file():
            raise OSError(f"{path} is not a regular file")
        write_atomic(path, text)
        if damaged:
            _warn(f"the cached kernel {path} was damaged; regenerated it")
        return path
    except OSError as exc:
        if _fallback:
            raise
        private = _private_dir()
        reason = f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc)
        _warn(f"cannot use the kernel cache {folder} ({reason}); using {private} "
              "for this run (set GRADTOOL_CACHE to a writable folder)")
        path = private / filename
        write_atomic(path, text)
        return path


def compile_spec(spec: Spec | str, target: str = "torch") -> ModuleType:
    """The generated module for ``spec`` on ``target``, compiled once and cached.

    >>> mod = compile_spec("relu", "numpy")
    >>> sorted(n for n in ("forward", "backward", "Relu") if hasattr(mod, n))
    ['Relu', 'backward', 'forward']
    """
    if isinstance(spec, str):
        spec = load_spec(spec)
    key = spec_key(spec, target)
    stem = re.sub(r"\W", "_", spec.name, flags=re.ASCII).strip("_")[:40] or "spec"
    name = f"gradtool_kernels.{stem}_{target}_{key}"
    if name in sys.modules:
        return sys.modules[name]
    path = _kernel_file(f"{stem}_{target}_{key}.py", lambda: generate(spec, target))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
