"""The named data sets: where each one's files are and how they become a :class:`Dataset`."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from gradtool.data.base import DataError, Dataset, assemble, stratified_split

# Debian's dataset-fashion-mnist package installs the four official files here
FASHION_MNIST_DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal",
                         "Shirt", "Sneaker", "Bag", "Ankle boot"]
# the four IDX files of MNIST and Fashion-MNIST: role → official name
IDX_FILES = {
    "train images": "train-images-idx3-ubyte",
    "train labels": "train-labels-idx1-ubyte",
    "test images": "t10k-images-idx3-ubyte",
    "test labels": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
CIFAR10_FILES = [*CIFAR10_TRAIN, "test_batch", "batches.meta"]
CIFAR10_SUBFOLDER = "cifar-10-batches-py"  # what the official archive extracts to
NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
# the most classes an npz's integer labels may make (the largest label + 1): a label above it
# is an id, not a class number, and would size the output layer and class list by it
MAX_CLASSES = 100_000


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


def _folder(name: str, data_dir: str | Path | None, needs: str,
            system_dir: Path | None = None) -> Path:
    """The folder to read ``name`` from: ``data_dir`` when given, else ``$GRADTOOL_DATA/name``
    when that exists, else ``system_dir`` (a distribution package's folder) when it exists."""
    if data_dir is not None:
        folder = Path(data_dir).expanduser()
        if not folder.is_dir():
            raise DataError("folder not found" if not folder.exists() else "not a folder",
                            file=folder, hint=f"pass the folder that holds {needs}")
        return folder
    env = os.environ.get("GRADTOOL_DATA")
    candidates = [Path(env).expanduser() / name] if env else []
    if system_dir is not None:
        candidates.append(system_dir)
    for folder in candidates:
        if folder.is_dir():
            return folder
    looked = ", ".join(str(c) for c in candidates) or "$GRADTOOL_DATA is not set"
    raise DataError(f"no folder given for {name} and none found (looked in: {looked})",
                    hint=f"pass --data-dir FOLDER, a folder that holds {needs}")


def _idx_file(folder: Path, official: str) -> Path:
    # official name, gzipped or not, or the common spelling with a dot: train-images.idx3-ubyte
    dotted = official.replace("-idx", ".idx")
    for stem in (official, dotted):
        for suffix in (".gz", ""):
            path = folder / (stem + suffix)
            if path.is_file():
                return path
    raise DataError(f"{official}[.gz] not found", file=folder,
                    hint="the folder must hold the four official IDX files: "
                         + ", ".join(f"{n}[.gz]" for n in IDX_FILES.values()))


def _read_idx_pair(images_path: Path, labels_path: Path, num_classes: int,
                   ) -> tuple[np.ndarray, np.ndarray]:
    from gradtool.data.idx import read_idx

    images = read_idx(images_path, ndim=3)
    labels = read_idx(labels_path, ndim=1)
    if len(images) != len(labels):
        raise DataError(f"{len(images)} images in {images_path.name} but {len(labels)} labels "
                        "here: counts differ", file=labels_path,
                        hint="the image and label files must come from the same release")
    if len(labels) and labels.max() >= num_classes:
        raise DataError(f"label {int(labels.max())} is outside 0..{num_classes - 1}",
                        file=labels_path)
    return images[:, None], labels.astype(np.int64)


def load_idx_set(name: str, data_dir: str | Path | None, *, classes: list[str],
                 system_dir: Path | None = None, val_fraction: float, seed: int,
                 limit: int | None) -> Dataset:
    """MNIST or Fashion-MNIST from a folder of the four official IDX files (gzipped or not):
    images uint8 (N, 28, 28) become (N, 1, 28, 28) on the [0, 1] scale."""
    needs = "the four IDX files " + ", ".join(f"{n}[.gz]" for n in IDX_FILES.values())
    folder = _folder(name, data_dir, needs, system_dir)
    paths = {role: _idx_file(folder, official) for role, official in IDX_FILES.items()}
    x_train, y_train = _read_idx_pair(paths["train images"], paths["train labels"],
                                      len(classes))
    x_test, y_test = _read_idx_pair(paths["test images"], paths["test labels"], len(classes))
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"test images are {x_test.shape[2:]}, training images "
                        f"{x_train.shape[2:]}", file=paths["test images"])
    return assemble(name, x_train, y_train, x_test, y_test, classes=classes,
                    sources=[str(p.resolve()) for p in paths.values()], scale=255.0,
                    val_fraction=val_fraction, seed=seed, limit=limit)


def load_cifar10(data_dir: str | Path | None, *, val_fraction: float, seed: int,
                 limit: int | None) -> Dataset:
    """CIFAR-10 from the folder of its python batches (or the folder holding
    ``cifar-10-batches-py``): images uint8 (N, 3, 32, 32) become float on the [0, 1] scale."""
    from gradtool.data.cifar import read_batch, read_label_names

    folder = _folder("cifar10", data_dir, "CIFAR-10's python batches "
                     "(data_batch_1..5, test_batch, batches.meta)")
    if not (folder / CIFAR10_FILES[0]).exists() and (folder / CIFAR10_SUBFOLDER).is_dir():
        folder = folder / CIFAR10_SUBFOLDER
    missing = [f for f in CIFAR10_FILES if not (folder / f).is_file()]
    if missing:
        raise DataError(f"file not found (missing: {', '.join(missing)})",
                        file=folder / missing[0],
                        hint="the folder must hold " + ", ".join(CIFAR10_FILES))
    classes = read_label_names(folder / "batches.meta")
    parts, read = [], []
    for name in CIFAR10_TRAIN:  # with a limit, read no more batches than it needs
        if limit is not None and sum(len(y) for _, y in parts) >= limit:
            break
        parts.append(read_batch(folder / name, len(classes)))
        read.append(name)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    x_test, y_test = read_batch(folder / "test_batch", len(classes))
    return assemble("cifar10", x_train, y_train, x_test, y_test, classes=classes,
                    sources=[str((folder / f).resolve())
                             for f in ("batches.meta", *read, "test_batch")], scale=255.0,
                    val_fraction=val_fraction, seed=seed, limit=limit)


def _npz_labels(y: np.ndarray, key: str, path: Path) -> tuple[np.ndarray, int | None]:
    """Integer labels (N,) and, for one-hot rows (N, K), K: one-hot rows become their argmax;
    a column (N, 1) of labels counts as (N,)."""
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim == 2:
        if y.size and not (np.all((y == 0) | (y == 1)) and np.all(y.sum(axis=1) == 1)):
            bad = int(np.flatnonzero(~np.all((y == 0) | (y == 1), axis=1)
                                     | (y.sum(axis=1) != 1))[0])
            raise DataError(f"{key} has {y.shape[1]} columns but row {bad} is not one-hot "
                            f"({y[bad].tolist()[:10]})", file=path,
                            hint="store integer labels (N,) or one-hot rows of 0s and one 1")
        return np.argmax(y, axis=1).astype(np.int64), y.shape[1]
    if y.ndim != 1 or not (np.issubdtype(y.dtype, np.integer)
                           or np.issubdtype(y.dtype, np.floating)):
        raise DataError(f"{key} must hold integer labels (N,) or one-hot rows (N, K), found "
                        f"{y.dtype} {y.shape}", file=path)
    if y.size and (not np.all(np.isfinite(y)) or np.any(y != np.round(y)) or y.min() < 0):
        raise DataError(f"{key} must hold class numbers 0, 1, 2, …; found values such as "
                        f"{y[(y != np.round(y)) | (y < 0) | ~np.isfinite(y)][0]}", file=path)
    if y.size and y.max() >= MAX_CLASSES:  # before int64, which a float label may overflow
        raise DataError(f"{key} holds label {_label(y.max())}, which would make "
                        f"{_label(y.max())} + 1 classes (at most {MAX_CLASSES:,} are taken)",
                        file=path, hint="labels are class numbers 0..K-1; renumber them "
                                        "(np.unique(y, return_inverse=True)[1])")
    return y.astype(np.int64), None


def _label(value) -> str:
    """A label as the file holds it: 7 for 7.0, 1000000000 for 1e9."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _npz_classes(y_train: np.ndarray, y_test: np.ndarray, path: Path) -> int:
    """The number of classes of integer labels: the largest training label + 1, refused when
    that is more classes than training samples (most classes could hold no sample: labels
    that are ids, not class numbers), or when a test label is above every training label (a
    class the model would never be trained on)."""
    if not len(y_train):
        raise DataError("y_train holds no labels", file=path)
    top = int(y_train.max())
    if top + 1 > len(y_train):
        raise DataError(f"y_train's largest label is {top}, which makes {top + 1} classes, "
                        f"more than its {len(y_train)} samples", file=path,
                        hint="labels are class numbers 0..K-1; renumber them "
                             "(np.unique(y, return_inverse=True)[1])")
    if len(y_test) and int(y_test.max()) > top:
        raise DataError(f"y_test holds label {int(y_test.max())}, but the training labels are "
                        f"{int(y_train.min())}..{top}: a class no training sample has",
                        file=path, hint="drop those test samples, or renumber both sets "
                                        "of labels together")
    return top + 1


def _npz_inputs(x: np.ndarray, key: str, path: Path) -> np.ndarray:
    """(N, D) and (N, C, H, W) as they are; (N, H, W) gets a channel axis."""
    if not (np.issubdtype(x.dtype, np.integer) or np.issubdtype(x.dtype, np.floating)):
        raise DataError(f"{key} must hold real numbers, found {x.dtype}", file=path)
    if x.ndim not in (2, 3, 4):
        raise DataError(f"{key} must be (N, D), (N, H, W) or (N, C, H, W), found {x.shape}",
                        file=path)
    if x.ndim == 4 and x.shape[3] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        raise DataError(f"{key} {x.shape} looks channels-last (N, H, W, C); gradtool takes "
                        "images channels-first (N, C, H, W)", file=path,
                        hint="save x.transpose(0, 3, 1, 2) instead")
    if np.issubdtype(x.dtype, np.floating) and not np.all(np.isfinite(x)):
        raise DataError(f"{key} holds NaN or infinite values", file=path)
    return x[:, None] if x.ndim == 3 else x


def load_npz(data_dir: str | Path | None, *, val_fraction: float, seed: int,
             limit: int | None) -> Dataset:
    """Any ``.npz`` file with arrays ``x_train, y_train, x_test, y_test``.

    ``x``: (N, D) features, (N, H, W) or (N, C, H, W) images (channels first), any real
    dtype; uint8 inputs are divided by 255, others used as they are before normalising. ``y``:
    integer labels (N,) in 0..K-1, K = the largest label + 1, or one-hot rows (N, K), which
    become their argmax. Read with ``allow_pickle=False``: no code in the file runs.
    """
    if data_dir is None:
        raise DataError("the npz data set needs the path of a .npz file",
                        hint="pass --data-dir FILE.npz holding " + ", ".join(NPZ_KEYS))
    path = Path(data_dir).expanduser()
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", file=path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            if not hasattr(archive, "files"):
                raise DataError("a single .npy array, not an .npz archive", file=path,
                                hint="save with np.savez(path, " + "=..., ".join(NPZ_KEYS)
                                     + "=...)")
            missing = [k for k in NPZ_KEYS if k not in archive.files]
            if missing:
                raise DataError(f"bad npz keys: missing {', '.join(missing)} (found: "
                                f"{', '.join(archive.files) or 'none'})", file=path,
                                hint="the archive must hold " + ", ".join(NPZ_KEYS))
            arrays = {k: archive[k] for k in NPZ_KEYS}
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad zip, truncated member, pickled object
        raise DataError(f"not a readable .npz file: {type(exc).__name__}: {exc}",
                        file=path) from None
    x_train = _npz_inputs(arrays["x_train"], "x_train", path)
    x_test = _npz_inputs(arrays["x_test"], "x_test", path)
    y_train, k_train = _npz_labels(arrays["y_train"], "y_train", path)
    y_test, k_test = _npz_labels(arrays["y_test"], "y_test", path)
    for part, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        if len(x) != len(y):
            raise DataError(f"x_{part} holds {len(x)} samples but y_{part} {len(y)}: counts "
                            "differ", file=path)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"x_train samples are {x_train.shape[1:]} but x_test samples "
                        f"{x_test.shape[1:]}", file=path)
    if (k_train is None) != (k_test is None) or k_train != k_test:
        raise DataError("y_train and y_test must both be integer labels or both one-hot rows "
                        "of the same width", file=path)
    num_classes = k_train or _npz_classes(y_train, y_test, path)
    scale = 255.0 if x_train.dtype == np.uint8 else 1.0
    return assemble("npz", x_train, y_train, x_test, y_test,
                    classes=[str(c) for c in range(num_classes)],
                    sources=[str(path.resolve())], scale=scale, val_fraction=val_fraction,
                    seed=seed, limit=limit)
