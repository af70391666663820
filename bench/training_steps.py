"""One training step of each variant, timed interleaved: shared by bench_train.py (MLP) and
bench_cnn.py (CNN).

The variants are the same model three ways: ``plain`` (torch.nn with autograd and
``F.cross_entropy``), ``torch`` (gradtool's generated autograd.Functions) and ``numpy``
(gradtool's NumPy backwards, torch.optim stepping the arrays in place). One step is forward,
loss, backward and the optimiser step.
"""

from __future__ import annotations

import statistics
import time


def step_functions(x, y, opts: dict, plain=None, torch_model=None, numpy_model=None) -> dict:
    """``{variant: step()}`` for the variants given: ``plain`` a torch.nn module, the other
    two ``(model, loss)`` pairs from ``gradtool.nn.build``; ``opts`` their optimisers by
    variant name. ``x`` is a float32 batch (N, …), ``y`` its int64 labels (N,)."""
    import torch.nn.functional as F

    def autograd_step(model, loss_fn, opt):
        def step():
            loss = loss_fn(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step

    steps = {}
    if plain is not None:
        steps["plain"] = autograd_step(plain, F.cross_entropy, opts["plain"])
    if torch_model is not None:
        steps["torch"] = autograd_step(*torch_model, opts["torch"])
    if numpy_model is not None:
        nmodel, nloss = numpy_model
        xn, yn = x.numpy(), y.numpy()

        def numpy_step():
            nloss.forward(nmodel.forward(xn), yn)
            nmodel.backward(nloss.backward())
            nmodel.attach_grads()
            opts["numpy"].step()
        steps["numpy"] = numpy_step
    return steps


def interleaved_times(steps: dict, warmup: int, iters: int,
                      sync=None) -> dict[str, list[float]]:
    """Each variant other than ``plain`` timed against ``plain`` in a pair of its own, the
    two alternating step by step (plain, variant, plain, variant, …: a change in the
    machine's load touches both alike, and each follows the other); ``warmup + iters`` steps
    of each, the last ``iters`` wall times kept, in seconds. ``plain``'s times in the pair
    with ``torch`` are under ``"plain@torch"``, and so on; ``"plain"`` holds them all.

    Why pairs: with all three interleaved, plain ran right after the NumPy step, and the
    NumPy step's memory traffic slowed it (8×8 digits CNN: 4.6–5.0 ms a step against
    4.4–4.5 ms after the torch step), so torch / plain read 0.90–0.92 where the pair reads
    0.85 (measured 2026-11-30, fifth session).

    ``sync``: called after each step before the clock is read (``torch.cuda.synchronize`` on a
    GPU, where a step only queues its kernels)."""
    times: dict[str, list[float]] = {"plain": []}
    for name, fn in steps.items():
        if name == "plain":
            continue
        pair = {"plain": steps["plain"], name: fn}
        got: dict[str, list[float]] = {k: [] for k in pair}
        for i in range(warmup + iters):
            for key, step in pair.items():
                t0 = time.perf_counter()
                step()
                if sync is not None:
                    sync()
                if i >= warmup:
                    got[key].append(time.perf_counter() - t0)
        times[name] = got[name]
        times[f"plain@{name}"] = got["plain"]
        times["plain"] += got["plain"]
    return times


def samples_per_s(times: dict[str, list[float]], batch: int) -> dict[str, float]:
    """Samples per second of each variant from its median step time."""
    return {k: batch / statistics.median(v) for k, v in times.items()}


def report(what: str, times: dict[str, list[float]], batch: int, goals: dict[str, float],
           threads: int, json_out: str | None) -> dict[str, float]:
    """Print each variant's samples/s and its ratio to ``plain`` against ``goals``
    (``{"torch/plain": 0.9, ...}``; a missed goal is printed, not raised); with ``json_out``
    also write them there. Returns the ratios."""
    import json
    import platform

    import torch

    rate = samples_per_s(times, batch)
    variants = [k for k in rate if k != "plain" and not k.startswith("plain@")]
    # each ratio against the plain steps of its own pair (see interleaved_times)
    ratios = {f"{k}/plain": rate[k] / rate.get(f"plain@{k}", rate["plain"]) for k in variants}
    print(f"{what}, Adam, float32, {threads} thread(s), median of "
          f"{len(times[variants[0]])} steps, each variant alternating with plain")
    for k in ["plain", *variants]:
        print(f"  {k:6s} {rate[k]:12,.0f} samples/s  "
              f"({statistics.median(times[k]) * 1e3:.3f} ms/step)")
    for k, r in ratios.items():
        print(f"  {k:12s} {r:.2f}  goal ≥ {goals[k]}  {'met' if r >= goals[k] else 'MISSED'}")
    if json_out:
        with open(json_out, "w") as fh:
            json.dump({"model": what, "threads": threads, "samples_per_s": rate,
                       "ratios": ratios, "goals": goals, "torch": torch.__version__,
                       "python": platform.python_version()}, fh, indent=2)
    return ratios
