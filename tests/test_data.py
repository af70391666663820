"""Data sets: splits, normalisation, batching order, and the file readers' errors."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from gradtool.data import DataError, load_dataset, loaders, stratified_split
from gradtool.data.base import assemble

torch = pytest.importorskip("torch")


def _toy(n_train=200, n_test=50, classes=4, seed=0):
    rng = np.random.default_rng(seed)
    x_train = rng.integers(0, 256, (n_train, 3, 5, 4), dtype=np.uint8)
    y_train = rng.integers(0, classes, n_train)
    x_test = rng.integers(0, 256, (n_test, 3, 5, 4), dtype=np.uint8)
    y_test = rng.integers(0, classes, n_test)
    return x_train, y_train, x_test, y_test


def _assemble(x_train, y_train, x_test, y_test, **kw):
    opts = dict(classes=["a", "b", "c", "d"], sources=[], scale=255.0, val_fraction=0.2,
                seed=3, limit=None)
    opts.update(kw)
    return assemble("toy", x_train, y_train, x_test, y_test, **opts)


# ---------------------------------------------------------------- import cost


def test_importing_data_and_plots_imports_no_torch_sklearn_or_matplotlib():
    code = ("import sys, gradtool.data, gradtool.train.plots; "
            "print(sorted(m for m in ('torch', 'sklearn', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- splits


def test_stratified_split_keeps_class_proportions_and_is_fixed_by_seed():
    y = np.repeat(np.arange(3), [50, 30, 20])
    keep, taken = stratified_split(y, 0.1, seed=7)
    assert np.bincount(y[taken]).tolist() == [5, 3, 2]
    assert sorted(np.concatenate([keep, taken]).tolist()) == list(range(100))
    again_keep, again_taken = stratified_split(y, 0.1, seed=7)
    assert np.array_equal(taken, again_taken) and np.array_equal(keep, again_keep)
    _, other = stratified_split(y, 0.1, seed=8)
    assert not np.array_equal(taken, other)


def test_stratified_split_total_is_rounded_fraction_with_largest_remainders():
    # quotas 0.25 * [3, 3, 2] = [0.75, 0.75, 0.5]: round(2.0) = 2 taken, to the two
    # largest remainders (the first two classes)
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    _, taken = stratified_split(y, 0.25, seed=0)
    assert np.bincount(y[taken], minlength=3).tolist() == [1, 1, 0]
    _, none = stratified_split(y, 0.0, seed=0)
    assert none.size == 0


def test_digits_splits_are_stratified_and_fixed_by_seed():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", seed=0)
    assert ds.name == "digits" and ds.input_shape == (1, 8, 8)
    assert ds.classes == [str(d) for d in range(10)]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1294, 144, 359)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.shape == (len(split.y), 1, 8, 8)
    # each class's share within one sample of its quota: 20 % of all, then 10 % of the rest
    per_class = np.bincount(load_digits().target)
    test_counts = np.bincount(ds.test.y, minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * per_class) < 1)
    rest = per_class - test_counts
    assert np.all(np.abs(np.bincount(ds.val.y, minlength=10) - 0.1 * rest) < 1)
    same = load_dataset("digits", seed=0)
    assert np.array_equal(same.test.x, ds.test.x) and np.array_equal(same.val.y, ds.val.y)
    other = load_dataset("digits", seed=1)
    assert not np.array_equal(other.test.y, ds.test.y)


def test_digits_parts_partition_sklearns_images_on_the_0_to_16_scale():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", seed=2)
    parts = np.concatenate([ds.train.x, ds.val.x, ds.test.x])
    raw = (parts * ds.std.reshape(1, -1, 1, 1) + ds.mean.reshape(1, -1, 1, 1)) * 16
    assert np.abs(raw - np.round(raw)).max() < 1e-4
    # every sklearn image lands in exactly one part: equal as multisets of rows
    ours = np.round(raw).reshape(1797, -1)
    theirs = load_digits().images.reshape(1797, -1)
    assert np.array_equal(ours[np.lexsort(ours.T)], theirs[np.lexsort(theirs.T)])
    assert ds.sources[0].startswith("sklearn.datasets.load_digits")


def test_limit_keeps_the_first_training_samples():
    full = load_dataset("digits", seed=0, val_fraction=0)
    small = load_dataset("digits", seed=0, val_fraction=0, limit=100)
    assert len(small.train) == 100 and len(small.test) == len(full.test)
    assert np.array_equal(small.train.y, full.train.y[:100])


def test_bad_val_fraction_limit_and_name_are_data_errors():
    with pytest.raises(DataError, match="validation fraction"):
        load_dataset("digits", val_fraction=1.0)
    with pytest.raises(DataError, match="limit"):
        load_dataset("digits", limit=0)
    with pytest.raises(DataError, match="leave none to train on"):
        load_dataset("digits", limit=1, val_fraction=0.5)
    with pytest.raises(DataError, match="unknown data set 'imagenet'"):
        load_dataset("imagenet")


# ---------------------------------------------------------------- normalisation


def test_normalisation_statistics_come_from_the_training_part_only():
    x_train, y_train, x_test, y_test = _toy()
    ds = _assemble(x_train, y_train, x_test, y_test)
    keep, _ = stratified_split(y_train, 0.2, seed=3, purpose=1)
    part = x_train[keep].astype(np.float64) / 255
    np.testing.assert_allclose(ds.mean, part.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, part.std(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(ds.train.x, (part - part.mean(axis=(0, 2, 3))[:, None, None])
                               / part.std(axis=(0, 2, 3))[:, None, None], atol=1e-5)
    # different test data: same statistics and same training inputs
    shifted = _assemble(x_train, y_train, 255 - x_test // 4, y_test)
    assert np.array_equal(shifted.mean, ds.mean) and np.array_equal(shifted.std, ds.std)
    assert np.array_equal(shifted.train.x, ds.train.x)
    # the test split is normalised with the training statistics, not its own
    np.testing.assert_allclose(ds.test.x * ds.std[None, :, None, None]
                               + ds.mean[None, :, None, None], x_test / 255, atol=1e-5)


def test_flat_features_get_per_feature_statistics_and_constant_features_std_one():
    rng = np.random.default_rng(1)
    x = rng.normal(3.0, 2.0, (40, 3)).astype(np.float32)
    x[:, 1] = 5.0
    y = np.arange(40) % 4
    ds = _assemble(x, y, x[:8], y[:8], scale=1.0, val_fraction=0.0)
    np.testing.assert_allclose(ds.mean, x.astype(np.float64).mean(axis=0), rtol=1e-6)
    assert ds.std[1] == 1.0 and ds.input_shape == (3,)
    np.testing.assert_allclose(ds.train.x[:, 1], 0.0)


# ---------------------------------------------------------------- batching


def _epoch_labels(loader):
    return torch.cat([yb for _, yb in loader]).tolist()


def test_train_order_of_each_epoch_is_a_function_of_seed_and_epoch_alone():
    x_train, y_train, x_test, y_test = _toy(n_train=90)
    ds = _assemble(x_train, np.arange(90) % 4, x_test, y_test, val_fraction=0.0)
    ds.train.y = np.arange(90)  # labels as sample ids, to read the order off the batches
    train, val, test = loaders(ds, 16, seed=11)
    epochs = [_epoch_labels(train) for _ in range(3)]
    assert all(sorted(e) == list(range(90)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    expected = torch.randperm(90, generator=torch.Generator().manual_seed(11 * 1_000_003 + 2))
    assert epochs[2] == expected.tolist()
    # a fresh loader (a resumed run) that jumps straight to epoch 2 sees the same order
    resumed, _, _ = loaders(ds, 16, seed=11)
    resumed.sampler.set_epoch(2)
    assert _epoch_labels(resumed) == epochs[2]
    # set_epoch each epoch, as with DistributedSampler, gives the same sequence
    again, _, _ = loaders(ds, 16, seed=11)
    for e in range(3):
        again.sampler.set_epoch(e)
        assert _epoch_labels(again) == epochs[e]
    other, _, _ = loaders(ds, 16, seed=12)
    assert _epoch_labels(other) != epochs[0]


def test_loaders_batches_dtypes_and_evaluation_order():
    ds = load_dataset("digits", seed=0)
    train, val, test = loaders(ds, 100, seed=0, dtype=torch.float64, eval_batch_size=64)
    xb, yb = next(iter(train))
    assert xb.shape == (100, 1, 8, 8) and xb.dtype == torch.float64 and yb.dtype == torch.int64
    assert len(train) == -(-len(ds.train) // 100) and len(test) == -(-len(ds.test) // 64)
    assert torch.cat([y for _, y in test]).tolist() == ds.test.y.tolist()
    np.testing.assert_array_equal(torch.cat([x for x, _ in val]).numpy(),
                                  ds.val.x.astype(np.float64))
    dropped, _, _ = loaders(ds, 100, seed=0, drop_last=True)
    assert len(dropped) == len(ds.train) // 100


def test_replicas_shard_each_epoch_into_equal_parts_covering_every_sample():
    from gradtool.data import EpochShuffleSampler

    shards = []
    for rank in range(3):
        sampler = EpochShuffleSampler(10, seed=4, num_replicas=3, rank=rank)
        sampler.set_epoch(5)
        shards.append(list(sampler))
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set().union(*map(set, shards)) == set(range(10))
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4 * 1_000_003 + 5))
    padded = order.tolist() + order.tolist()[:2]
    assert [padded[r::3] for r in range(3)] == shards


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

IDX_NAMES = {"train_x": "train-images-idx3-ubyte", "train_y": "train-labels-idx1-ubyte",
             "test_x": "t10k-images-idx3-ubyte", "test_y": "t10k-labels-idx1-ubyte"}


def _idx_bytes(array: np.ndarray) -> bytes:
    """IDX as documented: 0x00 0x00, type 0x08 (ubyte), ndim, big-endian uint32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write(path, payload: bytes, gz: bool):
    import gzip

    path.write_bytes(gzip.compress(payload) if gz else payload)
    return path


def _idx_folder(folder, n_train=60, n_test=20, gz=True, seed=0, dotted=False):
    rng = np.random.default_rng(seed)
    arrays = {"train_x": rng.integers(0, 256, (n_train, 6, 5)),
              "train_y": np.arange(n_train) % 10,
              "test_x": rng.integers(0, 256, (n_test, 6, 5)),
              "test_y": rng.integers(0, 10, n_test)}
    folder.mkdir(exist_ok=True)
    for key, name in IDX_NAMES.items():
        name = name.replace("-idx", ".idx") if dotted else name
        _write(folder / (name + (".gz" if gz else "")), _idx_bytes(arrays[key]), gz)
    return arrays


@pytest.mark.parametrize("gz, dotted", [(True, False), (False, False), (False, True)])
def test_mnist_folder_of_idx_files_gzipped_or_not(tmp_path, gz, dotted):
    arrays = _idx_folder(tmp_path, gz=gz, dotted=dotted)
    ds = load_dataset("mnist", tmp_path, val_fraction=0.0)
    assert ds.input_shape == (1, 6, 5) and ds.classes == [str(d) for d in range(10)]
    assert ds.train.y.tolist() == arrays["train_y"].tolist()
    assert ds.test.y.tolist() == arrays["test_y"].tolist()
    raw = ds.test.x * ds.std[0] + ds.mean[0]
    np.testing.assert_allclose(raw[:, 0], arrays["test_x"] / 255, atol=1e-5)
    assert len(ds.sources) == 4 and all(str(tmp_path) in s for s in ds.sources)


def test_read_idx_matches_the_bytes_written_for_each_type(tmp_path):
    from gradtool.data.idx import read_idx

    values = np.array([[-2.5, 1.0], [3.25, 0.0]], dtype=">f4")
    payload = bytes([0, 0, 0x0D, 2]) + (2).to_bytes(4, "big") * 2 + values.tobytes()
    out = read_idx(_write(tmp_path / "f.idx", payload, gz=False), ndim=2)
    assert out.dtype == np.float32 and out.dtype.isnative and out.flags.writeable
    assert out.tolist() == [[-2.5, 1.0], [3.25, 0.0]]


def _break(folder, key, payload_of):
    """Replace the gzipped IDX file ``key`` in ``folder`` by ``payload_of(original bytes)``."""
    import gzip

    path = folder / (IDX_NAMES[key] + ".gz")
    path.write_bytes(payload_of(gzip.decompress(path.read_bytes())))
    return path


@pytest.mark.parametrize("case, key, mutate, message", [
    ("truncated", "train_x", lambda b: b[:1000], "expected 1816 bytes, found 1000"),
    ("longer", "test_x", lambda b: b + b"\0", "expected 616 bytes, found 617"),
    ("header cut", "train_y", lambda b: b[:6], "truncated IDX file: expected at least 8"),
    ("tiny", "train_y", lambda b: b[:2], "shorter than the 4-byte magic"),
    ("bad magic", "train_x", lambda b: b"\x12\x34" + b[2:], "bad magic number 0x12340803"),
    ("bad type", "train_x", lambda b: b[:2] + b"\x07" + b[3:], "bad magic number 0x00000703"),
    ("swapped", "train_y", lambda b: b[:3] + b"\x03" + b[4:], "expected 1 (magic 0x00000801)"),
    ("count", "train_y", lambda b: b[:7] + b"\x3b" + b[8:-1], "60 images in train-images"),
    ("label range", "test_y", lambda b: b[:-1] + b"\x0a", "label 10 is outside 0..9"),
])
def test_broken_idx_files_are_one_error_naming_the_file(tmp_path, case, key, mutate, message):
    _idx_folder(tmp_path)
    path = _break(tmp_path, key, mutate)
    with pytest.raises(DataError) as err:
        load_dataset("mnist", tmp_path)
    assert err.value.file == str(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def test_corrupt_and_truncated_gzip_are_errors_naming_the_file(tmp_path):
    _idx_folder(tmp_path)
    path = tmp_path / (IDX_NAMES["train_x"] + ".gz")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="truncated gzip file") as err:
        load_dataset("mnist", tmp_path)
    assert err.value.file == str(path)
    path.write_bytes(data[:12] + bytes(255 - b for b in data[12:]))
    with pytest.raises(DataError, match="corrupt gzip file") as err:
        load_dataset("mnist", tmp_path)
    assert err.value.file == str(path)


def test_missing_idx_file_or_folder_says_what_to_pass(tmp_path, monkeypatch):
    _idx_folder(tmp_path)
    (tmp_path / (IDX_NAMES["test_y"] + ".gz")).unlink()
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found") as err:
        load_dataset("mnist", tmp_path)
    assert err.value.file == str(tmp_path) and "train-images-idx3-ubyte" in err.value.hint
    with pytest.raises(DataError, match="folder not found"):
        load_dataset("mnist", tmp_path / "nowhere")
    monkeypatch.setenv("GRADTOOL_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(DataError, match="no folder given for mnist") as err:
        load_dataset("mnist")
    assert "--data-dir FOLDER" in err.value.hint


def test_mnist_default_folder_comes_from_gradtool_data(tmp_path, monkeypatch):
    arrays = _idx_folder(tmp_path / "mnist", gz=False)
    monkeypatch.setenv("GRADTOOL_DATA", str(tmp_path))
    ds = load_dataset("mnist", val_fraction=0.0, limit=30)
    assert ds.train.y.tolist() == arrays["train_y"][:30].tolist()


def test_fashion_mnist_reads_the_given_folder_with_its_class_names(tmp_path, monkeypatch):
    monkeypatch.delenv("GRADTOOL_DATA", raising=False)
    arrays = _idx_folder(tmp_path, seed=3)
    ds = load_dataset("fashion-mnist", tmp_path, val_fraction=0.0)
    assert ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    assert ds.test.y.tolist() == arrays["test_y"].tolist()


def test_fashion_mnist_default_folder_is_debians_then_says_to_pass_data_dir(tmp_path,
                                                                           monkeypatch):
    from gradtool.data import sets

    monkeypatch.delenv("GRADTOOL_DATA", raising=False)
    arrays = _idx_folder(tmp_path / "debian", seed=4)
    monkeypatch.setattr(sets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "debian")
    assert load_dataset("fashion-mnist", val_fraction=0).test.y.tolist() == \
        arrays["test_y"].tolist()
    monkeypatch.setattr(sets, "FASHION_MNIST_DEBIAN_DIR", tmp_path / "absent")
    with pytest.raises(DataError, match="no folder given for fashion-mnist") as err:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "absent") in err.value.message
    assert "--data-dir FOLDER" in err.value.hint


def _shared_data(name):
    # CI clones the repository with the project's shared/ folder beside it
    import os
    from pathlib import Path

    folders = [Path(__file__).resolve().parents[2] / "shared" / "data" / name]
    if os.environ.get("GRADTOOL_DATA"):
        folders.insert(0, Path(os.environ["GRADTOOL_DATA"]) / name)
    return next((f for f in folders if f.is_dir()), None)


def test_real_mnist_when_present():
    folder = _shared_data("mnist")
    if folder is None:
        pytest.skip("MNIST's IDX files are not in ../shared/data/mnist or $GRADTOOL_DATA/mnist")
    ds = load_dataset("mnist", folder, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (54000, 6000, 10000)
    assert ds.input_shape == (1, 28, 28)
    # MNIST's published pixel statistics on [0, 1] (all 60000 training images): 0.1307, 0.3081
    assert abs(float(ds.mean[0]) - 0.1307) < 2e-3 and abs(float(ds.std[0]) - 0.3081) < 2e-3
    assert np.bincount(ds.test.y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028,
                                               974, 1009]


def test_real_fashion_mnist_when_installed():
    from gradtool.data.sets import FASHION_MNIST_DEBIAN_DIR

    if not FASHION_MNIST_DEBIAN_DIR.is_dir():
        pytest.skip("Debian's dataset-fashion-mnist package is not installed")
    ds = load_dataset("fashion-mnist", limit=2000, seed=0)
    assert len(ds.test) == 10000 and np.bincount(ds.test.y).tolist() == [1000] * 10


# ---------------------------------------------------------------- CIFAR-10 python batches

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
               "truck"]


def _cifar_folder(folder, per_batch=12, n_test=10, protocol=2, seed=0):
    """Batches in the documented format: {b"data": uint8 (N, 3072), b"labels": [...]}.
    protocol "numpy1": protocol 2 naming numpy.core.multiarray, as the official files do."""
    import pickle

    def dumps(obj):
        if protocol != "numpy1":
            return pickle.dumps(obj, protocol=protocol)
        return pickle.dumps(obj, protocol=2).replace(b"cnumpy._core.multiarray\n",
                                                     b"cnumpy.core.multiarray\n")

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    images, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        images[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels[name] = rng.integers(0, 10, n).tolist()
        batch = {b"batch_label": name.encode(), b"data": images[name],
                 b"labels": labels[name], b"filenames": [b"x.png"] * n}
        (folder / name).write_bytes(dumps(batch))
    meta = {b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(dumps(meta))
    return images, labels


@pytest.mark.parametrize("protocol", [2, 5, "numpy1"])
def test_cifar10_reader_on_generated_batches(tmp_path, protocol):
    images, labels = _cifar_folder(tmp_path / "cifar-10-batches-py", protocol=protocol)
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.0)  # finds the subfolder
    assert ds.classes == CIFAR_NAMES and ds.input_shape == (3, 32, 32)
    assert len(ds.train) == 60 and len(ds.test) == 10
    assert ds.train.y.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    # row-major R, G, B planes of 32×32: pixel (row 2, column 5) of the green plane of image 3
    raw = ds.test.x * ds.std[None, :, None, None] + ds.mean[None, :, None, None]
    assert abs(raw[3, 1, 2, 5] * 255 - images["test_batch"][3, 1024 + 2 * 32 + 5]) < 1e-3
    assert ds.mean.shape == (3,)
    train_raw = np.concatenate([images[f"data_batch_{i}"] for i in range(1, 6)])
    np.testing.assert_allclose(ds.mean, (train_raw.reshape(60, 3, 1024) / 255).mean(axis=(0, 2)),
                               rtol=1e-5)


def test_cifar10_limit_reads_only_the_batches_it_needs(tmp_path):
    _cifar_folder(tmp_path, per_batch=12)
    (tmp_path / "data_batch_3").write_bytes(b"")  # would fail if read
    ds = load_dataset("cifar10", tmp_path, val_fraction=0.0, limit=20)
    assert len(ds.train) == 20
    assert [s.rsplit("/", 1)[1] for s in ds.sources] == ["batches.meta", "data_batch_1",
                                                         "data_batch_2", "test_batch"]


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    import os
    import pickle

    _cifar_folder(tmp_path)
    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(DataError, match="refused to load the global (posix|os).system") as err:
        load_dataset("cifar10", tmp_path)
    assert err.value.file == str(tmp_path / "data_batch_2") and not marker.exists()


@pytest.mark.parametrize("name, batch, message", [
    ("data_batch_1", {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2]},
     "4 images but 3 labels: counts differ"),
    ("test_batch", {b"data": np.zeros((2, 3071), np.uint8), b"labels": [0, 1]},
     "'data' must be a uint8 array (N, 3072), found uint8 (2, 3071)"),
    ("data_batch_4", {b"labels": [0]}, "no 'data' entry"),
    ("data_batch_5", {b"data": np.zeros((1, 3072), np.uint8), b"labels": [10]},
     "labels range over 10..10, outside 0..9"),
    ("data_batch_1", [1, 2], "expected a pickled dict, found list"),
])
def test_cifar10_bad_batches_name_the_file(tmp_path, name, batch, message):
    import pickle

    _cifar_folder(tmp_path)
    (tmp_path / name).write_bytes(pickle.dumps(batch))
    with pytest.raises(DataError) as err:
        load_dataset("cifar10", tmp_path)
    assert err.value.file == str(tmp_path / name) and message in err.value.message


def test_cifar10_truncated_or_missing_files_name_the_file(tmp_path):
    _cifar_folder(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="truncated pickle") as err:
        load_dataset("cifar10", tmp_path)
    assert err.value.file == str(path)
    (tmp_path / "test_batch").unlink()
    with pytest.raises(DataError, match="missing: test_batch") as err:
        load_dataset("cifar10", tmp_path)
    assert err.value.file == str(tmp_path / "test_batch")


# ---------------------------------------------------------------- npz


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_flat_features_and_one_hot_labels(tmp_path):
    rng = np.random.default_rng(0)
    x_train, x_test = rng.normal(size=(30, 5)), rng.normal(size=(8, 5))
    y_train, y_test = np.arange(30) % 3, np.arange(8) % 3
    path = _npz(tmp_path / "d.npz", x_train=x_train, y_train=np.eye(3)[y_train],
                x_test=x_test, y_test=np.eye(3)[y_test])
    ds = load_dataset("npz", path, val_fraction=0.0)
    assert ds.input_shape == (5,) and ds.classes == ["0", "1", "2"]
    assert ds.train.y.tolist() == y_train.tolist() and ds.test.y.tolist() == y_test.tolist()
    np.testing.assert_allclose(ds.mean, x_train.mean(axis=0), rtol=1e-5)
    np.testing.assert_allclose(ds.train.x, (x_train - x_train.mean(0)) / x_train.std(0),
                               atol=1e-5)
    assert ds.sources == [str(path.resolve())]
    column = _npz(tmp_path / "c.npz", x_train=x_train, y_train=y_train[:, None], x_test=x_test,
                  y_test=y_test[:, None])  # labels as a column (N, 1): not one-hot
    assert load_dataset("npz", column, val_fraction=0.0).train.y.tolist() == y_train.tolist()


def test_npz_uint8_images_get_a_channel_axis_and_the_0_1_scale(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (20, 4, 4), dtype=np.uint8)
    path = _npz(tmp_path / "img.npz", x_train=x, y_train=np.arange(20) % 8, x_test=x[:6],
                y_test=np.array([0, 1, 2, 3, 3, 5]))
    ds = load_dataset("npz", path, val_fraction=0.0)
    assert ds.input_shape == (1, 4, 4) and len(ds.classes) == 8  # largest label 7
    np.testing.assert_allclose(ds.mean[0], x.mean() / 255, rtol=1e-5)


@pytest.mark.parametrize("arrays, message", [
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(3, int)},
     "bad npz keys: missing x_test, y_test (found: x_train, y_train)"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(4, int), "x_test": np.zeros((1, 2)),
      "y_test": np.zeros(1, int)}, "x_train holds 3 samples but y_train 4: counts differ"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.array([0, 1.5, 1]), "x_test": np.zeros((1, 2)),
      "y_test": np.zeros(1, int)}, "y_train must hold class numbers"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.zeros(3, int), "x_test": np.zeros((1, 3)),
      "y_test": np.zeros(1, int)}, "x_train samples are (2,) but x_test samples (3,)"),
    ({"x_train": np.zeros(3), "y_train": np.zeros(3, int), "x_test": np.zeros(1),
      "y_test": np.zeros(1, int)}, "x_train must be (N, D), (N, H, W) or (N, C, H, W)"),
    ({"x_train": np.array([[np.nan]] * 3), "y_train": np.zeros(3, int),
      "x_test": np.zeros((1, 1)), "y_test": np.zeros(1, int)}, "x_train holds NaN"),
    ({"x_train": np.zeros((3, 2)), "y_train": np.array([[0, 1], [1, 0], [0.3, 0.7]]),
      "x_test": np.zeros((1, 2)), "y_test": np.array([[1, 0]])},
     "y_train has 2 columns but row 2 is not one-hot ([0.3, 0.7])"),
    ({"x_train": np.zeros((3, 8, 8, 3)), "y_train": np.zeros(3, int),
      "x_test": np.zeros((1, 8, 8, 3)), "y_test": np.zeros(1, int)},
     "x_train (3, 8, 8, 3) looks channels-last"),
])
def test_bad_npz_files_are_one_error_naming_the_file(tmp_path, arrays, message):
    path = _npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError) as err:
        load_dataset("npz", path)
    assert err.value.file == str(path) and message in err.value.message


_X = np.zeros((6, 2))


@pytest.mark.parametrize("y_train, y_test, message", [
    (np.array([0, 1, 2, -1, 0, 1]), np.zeros(2, int), "y_train must hold class numbers 0, 1, "
     "2, …; found values such as -1"),
    (np.array([0, 1.0, 2, 2.5, 0, 1]), np.zeros(2, int), "found values such as 2.5"),
    (np.arange(6) + 10**9, np.zeros(2, int), "y_train holds label 1000000005, which would make "
     "1000000005 + 1 classes (at most 100,000 are taken)"),
    (np.array([0, 1, 1e30, 0, 1, 0]), np.zeros(2, int), "y_train holds label "
     "1000000000000000019884624838656, which"),
    (np.zeros(6, int), np.array([0, 10**12]), "y_test holds label 1000000000000"),
    (np.array([0, 1, 2, 3, 4, 9]), np.zeros(2, int), "y_train's largest label is 9, which "
     "makes 10 classes, more than its 6 samples"),
    (np.array([0, 1, 2, 0, 1, 2]), np.array([0, 7]), "y_test holds label 7, but the training "
     "labels are 0..2: a class no training sample has"),
])
def test_npz_labels_that_are_not_class_numbers_are_refused(tmp_path, y_train, y_test,
                                                           message):
    """Negative, fractional or huge labels, more classes than training samples, or a test
    label above every training label: one error naming the file and the label, before any
    class list or output layer is sized by it."""
    path = _npz(tmp_path / "labels.npz", x_train=_X, y_train=y_train, x_test=_X[:2],
                y_test=y_test)
    with pytest.raises(DataError) as err:
        load_dataset("npz", path, val_fraction=0.0)
    assert err.value.file == str(path) and message in err.value.message, err.value.message


def test_npz_label_at_the_limits_is_taken(tmp_path):
    """As many classes as training samples, float labels that are integers, and a test set
    without some classes: all accepted."""
    path = _npz(tmp_path / "edge.npz", x_train=_X, y_train=np.array([5., 4, 3, 2, 1, 0]),
                x_test=_X[:2], y_test=np.array([5, 5]))
    ds = load_dataset("npz", path, val_fraction=0.0)
    assert len(ds.classes) == 6 and ds.train.y.dtype == np.int64
    assert ds.test.y.tolist() == [5, 5]


def test_npz_labels_of_1e9_fail_fast_under_a_memory_limit(tmp_path):
    """The class count was the largest label + 1: labels near 1e9 built a list of 1e9 class
    names (the process was OOM-killed). Under a 3 GB address-space limit it is one error."""
    path = _npz(tmp_path / "big.npz", x_train=np.zeros((300, 10), np.float32),
                y_train=np.arange(300) % 3 + 10**9, x_test=np.zeros((10, 10), np.float32),
                y_test=np.zeros(10, int))
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))\n"
            "from gradtool.data import DataError, load_dataset\n"
            f"try: load_dataset('npz', {str(path)!r})\n"
            "except DataError as e: print('refused:', e.message)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: y_train holds label 1000000002" in out.stdout


def test_truncated_or_missing_npz_and_pickled_objects_are_errors(tmp_path):
    path = _npz(tmp_path / "d.npz", x_train=np.zeros((3, 2)), y_train=np.zeros(3, int),
                x_test=np.array([object()] * 2, dtype=object), y_test=np.zeros(2, int))
    with pytest.raises(DataError, match="not a readable .npz file") as err:
        load_dataset("npz", path)  # the object array would need pickle
    assert err.value.file == str(path)
    good = _npz(tmp_path / "g.npz", x_train=np.zeros((30, 2)), y_train=np.zeros(30, int),
                x_test=np.zeros((10, 2)), y_test=np.zeros(10, int))
    good.write_bytes(good.read_bytes()[:300])
    with pytest.raises(DataError, match="not a readable .npz file") as err:
        load_dataset("npz", good)
    assert err.value.file == str(good)
    with pytest.raises(DataError, match="file not found"):
        load_dataset("npz", tmp_path / "none.npz")
    with pytest.raises(DataError, match="needs the path of a .npz file"):
        load_dataset("npz")
