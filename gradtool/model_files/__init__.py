"""Model files shipped with gradtool, loadable by name: ``gradtool train --model NAME``.

Each ``NAME.toml`` here is an ordinary model file (see :mod:`gradtool.nn.models`); its first
comment line says what it is. Only pathlib is imported, so ``gradtool train --help`` can list
them without importing torch or SymPy.
"""

from __future__ import annotations

from pathlib import Path

FOLDER = Path(__file__).resolve().parent


def shipped_models() -> dict[str, Path]:
    """Every shipped model file by its name (the file name without ``.toml``), sorted."""
    return {p.stem: p for p in sorted(FOLDER.glob("*.toml"))}


def summary(path: Path) -> str:
    """The first comment line of a model file, without the ``#``."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
    return ""
