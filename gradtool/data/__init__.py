"""Data sets for ``gradtool train``, read from local files only (nothing is downloaded).

    from gradtool.data import load_dataset, loaders
    ds = load_dataset("digits", seed=0)            # Dataset: train / val / test Splits
    train, val, test = loaders(ds, 64, seed=0)    # torch.utils.data.DataLoader objects

Importing this package imports NumPy only; torch and scikit-learn are imported when a function
needs them, so ``gradtool --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from gradtool.data.base import DataError, Dataset, Split, stratified_split

if TYPE_CHECKING:
    from gradtool.data.batching import EpochShuffleSampler

__all__ = ["DATASETS", "DataError", "Dataset", "EpochShuffleSampler", "Split", "load_dataset",
           "loaders", "stratified_split"]

DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "npz")


def load_dataset(name: str, data_dir: str | Path | None = None, *, val_fraction: float = 0.1,
                 seed: int = 0, limit: int | None = None) -> Dataset:
    """Load data set ``name`` (one of :data:`DATASETS`) as train / validation / test splits.

    ``data_dir``: where the files are (ignored by digits; for npz, the ``.npz`` file itself).
    ``val_fraction``: the share of the training set held out for validation, stratified by
    class and fixed by ``seed``. ``limit``: keep only the first ``limit`` training samples
    (before the validation split), for quick runs. Normalisation statistics come from the
    training part only.

    Raises :class:`DataError` naming the file for a missing, truncated or corrupt file, or image
    and label counts that differ, and for an unknown ``name``.
    """
    from gradtool.data import sets

    opts = {"val_fraction": val_fraction, "seed": seed, "limit": limit}
    if name == "digits":
        return sets.load_digits(**opts)
    if name == "mnist":
        return sets.load_idx_set("mnist", data_dir, classes=[str(d) for d in range(10)], **opts)
    if name == "fashion-mnist":
        return sets.load_idx_set("fashion-mnist", data_dir, classes=sets.FASHION_MNIST_CLASSES,
                                 system_dir=sets.FASHION_MNIST_DEBIAN_DIR, **opts)
    if name == "cifar10":
        return sets.load_cifar10(data_dir, **opts)
    if name == "npz":
        return sets.load_npz(data_dir, **opts)
    raise DataError(f"unknown data set {name!r}", hint=f"choose one of {', '.join(DATASETS)}")


def loaders(ds: Dataset, batch_size: int, *, seed: int, dtype: Any = None, **options: Any):
    """``(train_loader, val_loader, test_loader)`` over ``ds``; the training order of epoch
    ``e`` is a function of ``(seed, e)`` alone. See :func:`gradtool.data.batching.loaders`
    for the options (``eval_batch_size``, ``drop_last``, ``num_workers``, ``num_replicas``,
    ``rank``)."""
    from gradtool.data.batching import loaders as make_loaders

    return make_loaders(ds, batch_size, seed=seed, dtype=dtype, **options)


def __getattr__(name: str) -> Any:
    if name == "EpochShuffleSampler":  # imports torch, so only on demand
        from gradtool.data.batching import EpochShuffleSampler

        return EpochShuffleSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
