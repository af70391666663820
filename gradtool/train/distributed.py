"""Data-parallel training over ``torch.distributed``: one process per device (or CPU core).

``gradtool train`` becomes data parallel when PyTorch's launcher started it, that is when
``torchrun`` (``python -m torch.distributed.run``) set ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; ``gradtool train --nproc-per-node K`` calls that launcher itself (:func:`launch`).
Everything here is PyTorch's own: ``init_process_group`` (gloo on the CPU, NCCL with one GPU per
local rank), ``DistributedDataParallel`` for the gradients' all-reduce, ``all_reduce`` /
``broadcast_object_list`` for metrics, and the launcher's error files for failures.

How a global batch of B samples is split: each epoch's permutation (see
:class:`gradtool.data.batching.EpochShuffleSampler`) is dealt out position by position, rank r
taking positions r, r + W, r + 2W, …, and each rank batches its share B / W at a time. So the
k-th batches of the W ranks hold exactly the samples of the one-process run's k-th batch, and
DDP's gradient average (the mean of the W per-rank means, equal-sized shards) is that batch's
mean gradient: the same update as one process, up to the order of floating-point additions.
That holds for a loss that is a mean over the batch (every built-in loss spec); a loss that sums
over the batch would get 1/W of its one-process gradient.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass

from gradtool.train.config import ConfigError


@dataclass(frozen=True)
class World:
    """Where this process stands in a distributed run: global ``rank``, ``world_size``
    processes in all, ``local_rank`` on this machine (its GPU's index)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the process that prints and writes the run folder."""
        return self.rank == 0

    @property
    def parallel(self) -> bool:
        return self.world_size > 1


def from_env(env=None) -> World:
    """The :class:`World` that ``torchrun`` describes in ``RANK``, ``WORLD_SIZE`` and
    ``LOCAL_RANK`` (one process, rank 0, where they are absent). Raises :class:`ConfigError` for
    values that are not integers or a rank outside ``[0, WORLD_SIZE)``."""
    env = os.environ if env is None else env
    values = {}
    for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = env.get(name)
        try:
            values[name] = default if raw is None else int(raw)
        except ValueError:
            raise ConfigError(f"environment variable {name}={raw!r} is not an integer",
                              hint="start distributed runs with torchrun or "
                                   "gradtool train --nproc-per-node K") from None
    rank, size = values["RANK"], values["WORLD_SIZE"]
    local = rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]
    if size < 1 or not 0 <= rank < size or local < 0:
        raise ConfigError(f"RANK={rank}, WORLD_SIZE={size}, LOCAL_RANK={local} do not describe "
                          "a process of a distributed run",
                          hint="start distributed runs with torchrun or "
                               "gradtool train --nproc-per-node K")
    return World(rank, size, local)


def rank_seed(seed: int, rank: int, epoch: int) -> int:
    """The torch seed of rank ``rank`` > 0 from epoch ``epoch`` on (its dropout masks; rank 0
    keeps the stream of a one-process run): sha256 of the three numbers, so that no two
    (seed, rank, epoch) share a stream by arithmetic coincidence."""
    import hashlib

    digest = hashlib.sha256(f"gradtool-rank:{seed}:{rank}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check(config, world: World) -> None:
    """Refuse what cannot run on ``world``: the NumPy backend on more than one process (it has
    no autograd for DDP to hook into), and a global batch size that the processes cannot share
    equally."""
    if not world.parallel:
        return
    if config.backend == "numpy":
        raise ConfigError(f"the numpy backend runs on one process, but WORLD_SIZE is "
                          f"{world.world_size}",
                          hint="use --backend torch for distributed training, or run the "
                               "numpy backend without torchrun / --nproc-per-node")
    if config.batch_size % world.world_size:
        raise ConfigError(f"--batch-size {config.batch_size} (the global batch) does not divide "
                          f"among {world.world_size} processes",
                          hint=f"use a multiple of {world.world_size}, e.g. --batch-size "
                               f"{-(-config.batch_size // world.world_size) * world.world_size}")


def check_launch(config, nproc: int) -> None:
    """The checks of :func:`check` (and the configuration's own) for a run about to be started
    on ``nproc`` processes, made once before starting them."""
    from gradtool.train.config import TrainConfig

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc} must be at least 1")
    config.validate()
    check(TrainConfig.from_run(config.resume) if config.resume else config,
          World(0, nproc, 0))


def device(config, world: World):
    """The device of this rank: ``cuda:LOCAL_RANK`` (one GPU per local rank) where the run is on
    CUDA, else the CPU. Raises :class:`ConfigError` when a local rank has no GPU of its own."""
    import torch

    if config.device == "cpu" or config.device == "auto" and not torch.cuda.is_available():
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device",
                          hint="use --device cpu (or auto)")
    count = torch.cuda.device_count()
    if world.local_rank >= count:
        raise ConfigError(f"local rank {world.local_rank} has no GPU: this machine has {count}",
                          hint=f"start at most {count} processes per machine "
                               "(--nproc-per-node), or use --device cpu")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


def start(world: World, dev) -> bool:
    """``init_process_group`` with NCCL for a CUDA ``dev``, else gloo, rendezvous through the
    ``env://`` variables the launcher set (``MASTER_ADDR``, ``MASTER_PORT``). Returns whether
    this call started the group (and so :func:`stop` should end it); a group already started by
    the caller is used as it is."""
    import torch.distributed as dist

    if not world.parallel or dist.is_initialized():
        return False
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is {world.world_size} but {', '.join(missing)} is not "
                          "set", hint="start distributed runs with torchrun or "
                                      "gradtool train --nproc-per-node K")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    kwargs = {"device_id": dev} if dev.type == "cuda" else {}
    dist.init_process_group(backend, rank=world.rank, world_size=world.world_size, **kwargs)
    return True


def stop(started: bool) -> None:
    """End the process group that :func:`start` started. The run's ``DistributedDataParallel``
    (whose reducer holds the group, and whose hooks make reference cycles) is collected first:
    a gloo group left to the interpreter's exit can abort the process ("terminate called
    without an active exception") after a run that succeeded."""
    import gc

    import torch.distributed as dist

    if started and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def backend_name() -> str | None:
    import torch.distributed as dist

    return dist.get_backend() if dist.is_initialized() else None


def barrier(world: World) -> None:
    import torch.distributed as dist

    if world.parallel:
        dist.barrier()


def all_sum(world: World, values: list[float], dev) -> list[float]:
    """Each value summed over all ranks (one ``all_reduce`` of a float64 vector on ``dev``)."""
    if not world.parallel:
        return list(values)
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def broadcast(world: World, obj):
    """Rank 0's ``obj``, on every rank (``broadcast_object_list``)."""
    if not world.parallel:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj) -> list:
    """Every rank's ``obj``, in rank order, on every rank (``all_gather_object``)."""
    if not world.parallel:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model, dev):
    """``DistributedDataParallel`` around ``model`` (which stays reachable as ``.module``)."""
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def is_peer_loss(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective that failed because another rank went away: then that
    rank, not this one, has the reason to report."""
    import torch.distributed as dist

    return isinstance(exc, dist.DistError)


def record_failure(message: str, *, root: bool, printed: bool = False) -> None:
    """Write this rank's failure where the launcher collects it (``TORCHELASTIC_ERROR_FILE``,
    the file ``torch.distributed.elastic``'s ``@record`` writes), in the launcher's format, so
    that ``torchrun``'s report and :func:`launch` show the reason. ``root`` is False for a rank
    that only lost its peers (:func:`is_peer_loss`); ``printed`` says that this rank has
    shown the message itself (rank 0), so that :func:`launch` does not repeat it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    data = {"message": message, "timestamp": str(int(time.time())),
            "gradtool": {"root": root, "printed": printed,
                         "rank": int(os.environ.get("RANK", "0"))}}
    try:
        with open(path, "w") as fp:
            json.dump(data, fp)
    except OSError:
        pass


class LaunchError(ConfigError):
    """A distributed run started by ``--nproc-per-node`` stopped because a rank failed."""


def launch(nproc: int, argv: list[str], *, monitor_interval: float = 0.1,
           quiet: bool = True) -> None:
    """Start ``nproc`` processes of ``python -m gradtool <argv>`` on this machine with PyTorch's
    launcher (``torch.distributed.run``, as ``torchrun --standalone --nproc-per-node nproc``:
    a c10d rendezvous on a free local port). Returns when all of them have finished.

    When a rank fails, the launcher stops the others; this raises :class:`LaunchError` with the
    message of the rank that failed first, or ``SystemExit(1)`` when rank 0 failed on its own
    (it has printed its error already)."""
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc-per-node {nproc} must be at least 1")
    if quiet:  # the launcher's own log lines; its failures are reported below, as one line
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    args = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
         "--monitor-interval", str(monitor_interval), "--no-python", sys.executable,
         "-m", "gradtool", *argv])
    # the launcher warns when it sets OMP_NUM_THREADS=1 itself; gradtool sets its own threads
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        run(args)
    except ChildFailedError as exc:
        if _printed(exc.failures.get(0)):
            raise SystemExit(1) from None  # rank 0 printed its error itself
        rank, failure = first_failure(exc.failures)
        raise LaunchError(f"rank {rank} of {nproc} failed: {failure.message}",
                          hint="the other ranks were stopped; rerun with --debug for "
                               "every rank's traceback") from None


def _printed(failure) -> bool:
    """Whether a failed rank printed its own error (see :func:`record_failure`)."""
    data = getattr(failure, "error_file_data", None) or {}
    return bool(data.get("gradtool", {}).get("printed"))


def _own(failure) -> bool:
    """Whether a failed rank stopped for a reason of its own: not a lost peer, and not the
    SIGTERM with which the launcher stops the other ranks once one has failed."""
    if failure.exitcode == -signal.SIGTERM:
        return False
    data = getattr(failure, "error_file_data", None) or {}
    return data.get("gradtool", {}).get("root", True)


def first_failure(failures: dict):
    """(rank, failure) of the rank whose own error stopped the run: among the failures that
    were not a lost peer (see :func:`record_failure`), the earliest, then the lowest rank."""
    items = sorted(failures.items(), key=lambda kv: (not _own(kv[1]), kv[1].timestamp, kv[0]))
    return items[0]
