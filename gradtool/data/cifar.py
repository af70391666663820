"""A reader for CIFAR-10's "python version" batches (Krizhevsky, 2009;
https://www.cs.toronto.edu/~kriz/cifar.html).

Each of ``data_batch_1`` … ``data_batch_5`` and ``test_batch`` is a pickled dict with
``b"data"``, a uint8 array (10000, 3072) whose rows hold a 32×32 image as three row-major
planes, red, green then blue, and ``b"labels"``, a list of 10000 integers in 0..9;
``batches.meta`` holds ``b"label_names"``, the ten class names.

Unpickling can run arbitrary code, so these files are read with an unpickler that refuses every
global except the few NumPy needs to rebuild an array (``_reconstruct``, ``ndarray``, ``dtype``,
``_frombuffer``) and ``_codecs.encode`` (how Python 3's protocol 2 stores bytes): a file that
names anything else is rejected before any of it runs.
"""

from __future__ import annotations

import importlib
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from gradtool.data.base import DataError

ALLOWED_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})
IMAGE_SHAPE = (3, 32, 32)


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refused to load the global {module}.{name}: a CIFAR batch holds only dicts, "
                "lists, bytes and NumPy arrays")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module.removeprefix("numpy.core.")  # NumPy 2's name
        return getattr(importlib.import_module(module), name)


def unpickle(path: str | Path) -> Any:
    """The object pickled in ``path``, read with ``encoding="bytes"`` (the batches were written
    by Python 2) through the restricted unpickler. Raises :class:`DataError` naming the file
    when it is missing, truncated, corrupt, or names a global outside ``ALLOWED_GLOBALS``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        # the pure-Python unpickler raises EOFError at the end of the data, the C one an
        # UnpicklingError("pickle data was truncated")
        if isinstance(exc, EOFError) or "truncated" in str(exc):
            raise DataError("truncated pickle: the file ends before the object does",
                            file=path, hint="download or extract the file again") from None
        raise DataError(f"not a readable CIFAR batch: {type(exc).__name__}: {exc}",
                        file=path) from None


def _get(batch: dict, key: str, path: Path) -> Any:
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"no {key!r} entry (keys: {sorted(map(repr, batch))})", file=path)


def read_batch(path: str | Path, num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one batch file: images uint8 (N, 3, 32, 32) (channels R, G, B),
    labels int64 (N,) in [0, num_classes). Raises :class:`DataError` naming the file when it
    cannot be read or its data and labels disagree in count, shape or range."""
    path = Path(path)
    batch = unpickle(path)
    if not isinstance(batch, dict):
        raise DataError(f"expected a pickled dict, found {type(batch).__name__}", file=path)
    data = _get(batch, "data", path)
    labels = _get(batch, "labels", path)
    size = int(np.prod(IMAGE_SHAPE))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
            and data.shape[1] == size):
        got = (f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray)
               else type(data).__name__)
        raise DataError(f"'data' must be a uint8 array (N, {size}), found {got}", file=path)
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"'labels' must be a list of integers, found {labels.dtype} "
                        f"{labels.shape}", file=path)
    if len(labels) != len(data):
        raise DataError(f"{len(data)} images but {len(labels)} labels: counts differ",
                        file=path)
    if len(labels) and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DataError(f"labels range over {labels.min()}..{labels.max()}, outside "
                        f"0..{num_classes - 1}", file=path)
    return data.reshape(-1, *IMAGE_SHAPE), labels.astype(np.int64)


def read_label_names(path: str | Path) -> list[str]:
    """The class names in ``batches.meta`` (``b"label_names"``), decoded as UTF-8."""
    path = Path(path)
    meta = unpickle(path)
    if not isinstance(meta, dict):
        raise DataError(f"expected a pickled dict, found {type(meta).__name__}", file=path)
    names = _get(meta, "label_names", path)
    if not isinstance(names, list | tuple) or not names:
        raise DataError(f"'label_names' must be a list of names, found {type(names).__name__}",
                        file=path)
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]
