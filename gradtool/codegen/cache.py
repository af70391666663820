"""Compile generated kernels once and cache them by the spec's content hash.

The cache key covers the spec file's bytes, the gradtool version and the target, so a cached
module is reused without deriving anything. Files are written to a temporary name and renamed
into place (atomic on POSIX), so two processes compiling the same spec at once both succeed.
Modules are imported from their files, so a traceback into a kernel shows the generated lines.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
from pathlib import Path
from types import ModuleType

from gradtool import __version__
from gradtool.codegen.emit import generate
from gradtool.spec.lang import Spec
from gradtool.spec.loader import load_spec


def cache_dir() -> Path:
    """``$GRADTOOL_CACHE``, else ``$XDG_CACHE_HOME/gradtool``, else ``~/.cache/gradtool``."""
    if os.environ.get("GRADTOOL_CACHE"):
        return Path(os.environ["GRADTOOL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gradtool"


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
        else repr(spec.statements).encode()
    digest = hashlib.sha256(text + generator_fingerprint() + target.encode()).hexdigest()
    return digest[:20]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def compile_spec(spec: Spec | str, target: str = "torch") -> ModuleType:
    """The generated module for ``spec`` on ``target``, compiled once and cached.

    >>> mod = compile_spec("relu", "numpy")
    >>> sorted(n for n in ("forward", "backward", "Relu") if hasattr(mod, n))
    ['Relu', 'backward', 'forward']
    """
    if isinstance(spec, str):
        spec = load_spec(spec)
    key = spec_key(spec, target)
    name = f"gradtool_kernels.{spec.name}_{target}_{key}"
    if name in sys.modules:
        return sys.modules[name]
    path = cache_dir() / f"{spec.name}_{target}_{key}.py"
    if not path.exists():
        write_atomic(path, generate(spec, target))
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module
