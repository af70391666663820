"""Writing files safely: atomically, with the user's umask, and never over something that is
not a regular file.

Used for the kernel cache and for every file a command writes at a path the user gave
(``gradtool derive --code numpy -o layer.py``).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from gradtool.errors import GradtoolError


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_atomic(path: Path, text: str, *, mode: int = 0o666) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never half.

    The file gets ``mode`` less the process's umask, as ``open(path, "w")`` would give it
    (``tempfile.mkstemp`` alone would leave it 0600). Raises ``OSError`` as the system does.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, mode & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_user_file(name: str, text: str) -> Path:
    """Write ``text`` to the path the user gave as ``name`` (an ``-o`` option).

    Refuses, with a :class:`GradtoolError` naming ``name``: a path that exists and is not a
    regular file (a folder, a symbolic link, a device, a pipe), a missing parent folder, and
    a folder that cannot be written. Nothing is written in those cases.
    """
    path = Path(name)
    try:
        info = path.lstat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise GradtoolError(f"cannot write {name}: {exc.strerror}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        what = ("a folder" if stat.S_ISDIR(info.st_mode) else
                "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file")
        raise GradtoolError(f"cannot write {name}: it is {what}",
                            hint="give the path of a new or an existing regular file")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise GradtoolError(f"cannot write {name}: the folder {parent} does not exist",
                            hint="create the folder first, or write elsewhere")
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise GradtoolError(f"cannot write {name}: {exc.strerror or exc}",
                            hint="check that the folder is writable") from None
    return path
