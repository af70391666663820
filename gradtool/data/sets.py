"""The named data sets: where each one's files are and how they become a :class:`Dataset`."""

from __future__ import annotations

import numpy as np

from gradtool.data.base import Dataset, assemble, stratified_split


def load_digits(*, val_fraction: float, seed: int, limit: int | None) -> Dataset:
    """scikit-learn's bundled 8×8 digits (1797 images, values 0..16, ten classes): a
    stratified 20 % test split fixed by ``seed``, then the validation split from the rest.
    Nothing is read from disk besides the copy that ships inside scikit-learn."""
    import sklearn
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    images = bunch.images.reshape(-1, 1, 8, 8)
    labels = bunch.target.astype(np.int64)
    train, test = stratified_split(labels, 0.2, seed, purpose=0)
    return assemble("digits", images[train], labels[train], images[test], labels[test],
                    classes=[str(d) for d in range(10)],
                    sources=[f"sklearn.datasets.load_digits (scikit-learn {sklearn.__version__})"],
                    scale=16.0, val_fraction=val_fraction, seed=seed, limit=limit)
