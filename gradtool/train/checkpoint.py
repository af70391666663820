"""Checkpoints written atomically: a reader (or a resumed run) sees the old file or the new one.

A checkpoint holds what the rest of the run depends on: the model's weights and state buffers,
the optimiser's and scheduler's state, every random generator's state, the completed epochs and
the metrics so far. Restoring one and training on gives the same weights, bit for bit on the
CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(obj, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then rename it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rng_state(model) -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    layers = getattr(model, "layers", None)
    if layers is not None:  # the numpy backend's mask generators
        state["numpy"] = [layer.rng.bit_generator.state for layer in layers
                          if hasattr(layer, "rng")]
    return state


def restore_rng(model, state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    layers = getattr(model, "layers", None)
    if layers is not None and "numpy" in state:
        gens = [layer for layer in layers if hasattr(layer, "rng")]
        for layer, s in zip(gens, state["numpy"], strict=True):
            layer.rng.bit_generator.state = s


def make(model, optimizer, scheduler, epoch: int, history: list, best: dict, *,
         rank_rngs: list | None = None) -> dict:
    """The checkpoint of ``model`` (unwrapped, never its ``DistributedDataParallel``: the
    names stay those of a one-process run). ``rank_rngs``: every rank's :func:`rng_state`, in
    rank order, for a distributed run (its ``rng`` is rank 0's)."""
    state = {"epoch": epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "scheduler": scheduler.state_dict() if scheduler is not None else None,
             "rng": rng_state(model), "history": history, "best": best}
    if rank_rngs is not None:
        state["rank_rngs"] = rank_rngs
    return state


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def restore(ckpt: dict, model, optimizer, scheduler, *, rank: int = 0,
            world_size: int = 1) -> bool:
    """Load ``ckpt`` into the model, optimiser, scheduler and random generators of process
    ``rank`` of ``world_size``. Returns whether the generators are that rank's own: True for
    rank 0 and for a rank whose state the checkpoint holds from a run of the same world size;
    False when a rank has to seed its generators afresh (they were restored to rank 0's)."""
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    rngs = ckpt.get("rank_rngs")
    own = rank == 0 or (rngs is not None and len(rngs) == world_size)
    restore_rng(model, rngs[rank] if own and rank else ckpt["rng"])
    return own
