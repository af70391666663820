"""Batching with torch.utils.data, with a shuffle order that a resumed run can reproduce."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from gradtool.data.base import Dataset, Split

# Mixes (seed, epoch) into one torch seed; a prime, so distinct (seed, epoch) pairs with
# epoch < 1_000_003 never share a seed.
EPOCH_SEED_STRIDE = 1_000_003


def epoch_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order in which epoch ``epoch`` visits ``n`` samples:
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))``
    (the seed taken modulo 2**64). It depends on ``(n, seed, epoch)`` only, never on what ran
    before, so a run resumed at epoch e shuffles exactly as the uninterrupted run did."""
    generator = torch.Generator().manual_seed((seed * EPOCH_SEED_STRIDE + epoch) % 2**64)
    return torch.randperm(n, generator=generator)


class EpochShuffleSampler(Sampler[int]):
    """Shuffles ``n`` sample indices anew each epoch, in the order :func:`epoch_permutation`
    gives for ``(seed, epoch)``.

    Call ``set_epoch(e)`` before iterating epoch ``e``, as with torch's
    ``DistributedSampler``; each pass also advances the epoch by one, so a loop that never calls
    ``set_epoch`` sees epochs 0, 1, 2, … and a resumed run calls ``set_epoch(start)`` once.

    With ``num_replicas`` > 1 (distributed data parallel), replica ``rank`` takes every
    ``num_replicas``-th index of the permutation from position ``rank``, the permutation first
    wrapped around to a multiple of ``num_replicas`` so that every replica gets the same number
    of samples (and of batches), as ``DistributedSampler`` does.
    """

    def __init__(self, n: int, seed: int, *, num_replicas: int = 1, rank: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.n = n
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-self.n // self.num_replicas) if self.n else 0

    def __iter__(self) -> Iterator[int]:
        order = epoch_permutation(self.n, self.seed, self.epoch)
        self.epoch += 1
        if self.num_replicas > 1 and self.n:
            total = len(self) * self.num_replicas
            order = order.repeat(-(-total // self.n))[:total][self.rank::self.num_replicas]
        return iter(order.tolist())


def _tensor_dataset(split: Split, dtype: torch.dtype) -> TensorDataset:
    x = torch.from_numpy(np.ascontiguousarray(split.x)).to(dtype)  # no copy for float32
    return TensorDataset(x, torch.from_numpy(np.asarray(split.y, dtype=np.int64)))


def loaders(ds: Dataset, batch_size: int, *, seed: int, dtype: torch.dtype | None = None,
            eval_batch_size: int | None = None, drop_last: bool = False, num_workers: int = 0,
            num_replicas: int = 1, rank: int = 0,
            ) -> tuple[DataLoader, DataLoader, DataLoader]:
    """``(train_loader, val_loader, test_loader)``: ``torch.utils.data.DataLoader`` objects over
    ``TensorDataset(x, y)`` of each split, batches of ``x`` (B, *input_shape) in ``dtype``
    (default float32) and ``y`` (B,) int64.

    The train loader's sampler is an :class:`EpochShuffleSampler` (``train_loader.sampler``):
    call ``train_loader.sampler.set_epoch(e)`` before epoch ``e``; its order is a function of
    ``(seed, e)`` alone, which is what lets a killed run resume bit for bit. Validation and test
    loaders keep the file order and never drop a last short batch (``eval_batch_size`` defaults
    to ``batch_size``). ``num_replicas`` and ``rank`` shard the training set for distributed
    data parallel (see :class:`EpochShuffleSampler`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    dtype = torch.float32 if dtype is None else dtype
    sampler = EpochShuffleSampler(len(ds.train), seed, num_replicas=num_replicas, rank=rank)
    train = DataLoader(_tensor_dataset(ds.train, dtype), batch_size=batch_size, sampler=sampler,
                       drop_last=drop_last, num_workers=num_workers)
    eval_size = eval_batch_size or batch_size
    val, test = (DataLoader(_tensor_dataset(s, dtype), batch_size=eval_size, shuffle=False,
                            num_workers=num_workers) for s in (ds.val, ds.test))
    return train, val, test
