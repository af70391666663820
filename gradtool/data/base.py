"""What every data set becomes: train / validation / test splits, normalised with statistics
of the training part only. NumPy only; no torch, no scikit-learn."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gradtool.errors import GradtoolError


class DataError(GradtoolError):
    """A data file or folder that cannot be used: missing, truncated, corrupt, of the wrong
    format, or with image and label counts that differ. ``file`` names it; the message says
    what is wrong ("expected 47040016 bytes, found 1000") and the hint what to do."""

    def __init__(self, message: str, *, file: str | Path | None = None,
                 hint: str | None = None):
        super().__init__(message, file=None if file is None else str(file), hint=hint)


@dataclass
class Split:
    """One part of a data set.

    ``x``: float32, (N, C, H, W) for images (digits: (N, 1, 8, 8)) or (N, D) for flat
    features, normalised with the training part's ``mean`` and ``std``.
    ``y``: int64, (N,), class labels in [0, num_classes).
    """

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    """A data set ready for training.

    ``val`` is carved from the training set (stratified, fixed by the seed). ``mean`` and
    ``std`` are per channel, shape (C,), for images and per feature, shape (D,), for flat
    features; they are computed on ``train`` only, on the [0, 1] scale (raw 8-bit values divided
    by 255, digits' 0..16 by 16), so that every split holds ``(raw / scale - mean) / std``.
    ``sources`` lists the files read, for a run's recorded configuration.
    """

    name: str
    train: Split
    val: Split
    test: Split
    classes: list[str]
    input_shape: tuple[int, ...]
    mean: np.ndarray
    std: np.ndarray
    sources: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _rng(seed: int, purpose: int) -> np.random.Generator:
    # one independent stream per use of the seed (test split, validation split)
    return np.random.default_rng([seed % 2**63, purpose])


def stratified_split(y: np.ndarray, fraction: float, seed: int, *, purpose: int = 0,
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Split sample indices into ``(kept, taken)`` with ``taken`` holding
    ``round(fraction * N)`` samples, each class contributing in proportion to its count.

    Each class c gets ``floor(fraction * N_c)`` samples, and the samples still owed to reach
    the total go to the classes with the largest remainders (Hamilton's largest-remainder
    apportionment), ties in class order. Which samples of a class are taken is drawn from
    ``(seed, purpose)`` alone, so the same seed always gives the same split. Both index arrays
    are sorted, so the samples keep their file order.
    """
    y = np.asarray(y)
    n = len(y)
    total = int(np.floor(fraction * n + 0.5))
    labels, counts = np.unique(y, return_counts=True)
    quota = fraction * counts
    take = np.floor(quota).astype(np.int64)
    owed = total - int(take.sum())
    take[np.argsort(-(quota - take), kind="stable")[:owed]] += 1
    rng = _rng(seed, purpose)
    taken = [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(labels, take)]
    taken_idx = np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)
    mask = np.ones(n, dtype=bool)
    mask[taken_idx] = False
    return np.flatnonzero(mask), taken_idx


def _stat_axes(x: np.ndarray) -> tuple[int, ...]:
    return (0, 2, 3) if x.ndim == 4 else (0,)


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and (population) standard deviation of ``x`` (N, C, H, W), or per
    feature of ``x`` (N, D), accumulated in float64 over chunks of samples (two passes: the
    mean, then the squared deviations from it), so a float64 copy of the whole set is never
    made. A channel with zero spread gets std 1 (it is then only centred)."""
    axes = _stat_axes(x)
    n = x.shape[0]
    per_sample = int(np.prod([x.shape[a] for a in axes[1:]], dtype=np.int64))
    count = n * per_sample
    total = np.zeros(x.shape[1], np.float64)
    for start in range(0, n, chunk):
        total += x[start:start + chunk].sum(axis=axes, dtype=np.float64)
    mean = total / count
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    sq = np.zeros(x.shape[1], np.float64)
    for start in range(0, n, chunk):
        dev = x[start:start + chunk].astype(np.float64) - mean.reshape(shape)
        sq += np.square(dev).sum(axis=axes)
    std = np.sqrt(sq / count)
    std[std == 0] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def _scaled(raw: np.ndarray, scale: float) -> np.ndarray:
    x = raw.astype(np.float32)  # always a copy: normalising happens in place below
    if scale != 1:
        x /= np.float32(scale)
    return x


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    shape = (1, -1, 1, 1) if x.ndim == 4 else (1, -1)
    x -= mean.reshape(shape)
    x /= std.reshape(shape)
    return x


def assemble(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
             y_test: np.ndarray, *, classes: list[str], sources: list[str], scale: float,
             val_fraction: float, seed: int, limit: int | None) -> Dataset:
    """Build a :class:`Dataset` from raw arrays: keep the first ``limit`` training samples,
    carve the validation part (stratified by ``seed``), scale by ``1/scale``, and normalise
    every part with the mean and std of the remaining training part.

    ``x_*``: (N, C, H, W) or (N, D), any real dtype; ``y_*``: (N,) integers in
    [0, len(classes)). Raises :class:`DataError` when ``val_fraction`` or ``limit`` leave no
    training sample.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), got {val_fraction}",
                        hint="use e.g. 0.1 for 10 % of the training set")
    if limit is not None:
        if limit < 1:
            raise DataError(f"limit must be a positive number of samples, got {limit}")
        x_train, y_train = x_train[:limit], y_train[:limit]
    keep, val = stratified_split(y_train, val_fraction, seed, purpose=1)
    if len(keep) == 0:
        raise DataError(f"{name}: {len(y_train)} training samples with validation fraction "
                        f"{val_fraction} leave none to train on",
                        hint="raise the limit or lower the validation fraction")
    x_tr, x_val, x_te = (_scaled(a, scale) for a in (x_train[keep], x_train[val], x_test))
    mean, std = channel_stats(x_tr)
    splits = [Split(_normalise(x, mean, std), np.asarray(y, dtype=np.int64))
              for x, y in ((x_tr, y_train[keep]), (x_val, y_train[val]), (x_te, y_test))]
    return Dataset(name=name, train=splits[0], val=splits[1], test=splits[2],
                   classes=list(classes), input_shape=tuple(int(d) for d in x_tr.shape[1:]),
                   mean=mean, std=std, sources=list(sources))
