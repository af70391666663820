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


def test_importing_data_imports_neither_torch_nor_sklearn():
    code = ("import sys, gradtool.data; "
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


def test_digits_splits_are_stratified_disjoint_and_fixed_by_seed():
    ds = load_dataset("digits", seed=0)
    assert ds.name == "digits" and ds.input_shape == (1, 8, 8)
    assert ds.classes == [str(d) for d in range(10)]
    assert (len(ds.train), len(ds.val), len(ds.test)) == (1294, 144, 359)
    for split in (ds.train, ds.val, ds.test):
        assert split.x.dtype == np.float32 and split.y.dtype == np.int64
        assert split.x.shape == (len(split.y), 1, 8, 8)
        counts = np.bincount(split.y, minlength=10)
        # 1797 digits hold 174..183 of each class: a stratified share varies by at most 2
        assert counts.max() - counts.min() <= 2 + int(0.01 * len(split.y))
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
