"""``train(config) -> TrainResult``: the training loop behind ``gradtool train``.

    from gradtool.train import TrainConfig, train
    result = train(TrainConfig(epochs=5))          # digits, MLP, torch backend
    print(result.test_acc, result.run_dir)

A run is a folder (``config.out``, default ``runs/<data>-<model>-<time>``):

    config.json         resolved configuration, spec sha256s, versions, seed, verification
    metrics.csv         per epoch: train/val loss and accuracy, learning rate, seconds, samples/s
    curves.png          loss and accuracy curves
    confusion.png/.csv  confusion matrix of the test set
    checkpoints/        last.pt (every epoch) and best.pt (best validation accuracy), atomic
    model.pt            final weights, loadable with :func:`load_model`
    result.json         the final result (what ``--json`` prints)

Both backends take their update rule from ``torch.optim``: the NumPy model's arrays are viewed
as tensors (no copy), the chain of generated backwards fills their ``.grad``, and the optimiser
steps them in place.
"""

from __future__ import annotations

import contextlib
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from gradtool import __version__
from gradtool.errors import GradtoolError
from gradtool.train.config import (
    DEFAULT_EPOCHS,
    DEFAULT_THREADS,
    RESUME_HINT,
    ConfigError,
    TrainConfig,
)

METRICS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds",
           "samples_per_s")


class DivergenceError(GradtoolError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterruptedError(GradtoolError):
    """Ctrl-C (SIGINT) during the epochs: the run folder keeps the last epoch's checkpoint,
    and the message says how to continue. The command exits 130, as an interrupted program
    does."""

    exit_code = 130


@contextlib.contextmanager
def _report_interrupt(run: Path, ckpt_dir: Path):
    """Turn a KeyboardInterrupt in the block (the epochs) into :class:`TrainingInterruptedError`
    naming what is kept and the command that continues the run."""
    try:
        yield
    except KeyboardInterrupt:
        done = start_epoch_of(ckpt_dir)
        if done:
            raise TrainingInterruptedError(
                f"interrupted; {run} keeps the checkpoint after epoch {done} "
                f"({ckpt_dir / 'last.pt'})",
                hint=f"continue with: gradtool train --resume {run}") from None
        raise TrainingInterruptedError(f"interrupted before the first epoch ended; {run} has no "
                                  "checkpoint to resume from",
                                  hint="start the run again") from None


@dataclass
class TrainResult:
    run_dir: str
    epochs: int
    test_loss: float
    test_acc: float
    best_val_acc: float
    best_epoch: int
    seconds: float
    samples_per_s: float
    verified: list = field(default_factory=list)
    unverified: bool = False
    history: list = field(default_factory=list)
    world_size: int = 1

    def to_json(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


Progress = Callable[[str, dict], None]


def _device(config: TrainConfig, world=None):
    import torch

    from gradtool.train import distributed

    if world is not None and world.parallel:
        return distributed.device(config, world)
    if config.backend == "numpy":
        return torch.device("cpu")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if config.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA device",
                          hint="use --device cpu (or auto)")
    return torch.device(config.device)


def _model_desc(config: TrainConfig, input_shape, classes: int):
    from gradtool.nn import cnn, load_model_file, mlp
    from gradtool.nn.models import layer_refusal

    if config.model in ("mlp", "cnn"):
        for option in ("activation", "norm"):
            name = getattr(config, option)
            why = layer_refusal(name) if name and (option == "activation" or
                                                   config.model == "mlp") else None
            if why is not None:
                raise ConfigError(f"--{option} {name}: {why}", hint=(
                    "the activation is a layer with one input and one output of its shape: "
                    "an element-wise spec (relu, tanh, gelu) or a file like them"
                    if option == "activation" else
                    "the norm is a layer with one input and one output of its shape: "
                    "batchnorm, layernorm or a file like them"))
    if config.model == "mlp":
        desc = mlp(math.prod(input_shape), classes, hidden=config.hidden,
                   activation=config.activation, norm=config.norm, dropout=config.dropout)
    elif config.model == "cnn":
        desc = cnn(input_shape, classes, activation=config.activation, dropout=config.dropout)
    else:
        desc = load_model_file(config.model)
    if config.loss:
        desc.loss = config.loss
    return desc


def _optimizer(config: TrainConfig, params):
    import torch

    # no --weight-decay: the optimizer's own default (AdamW's 0.01); a given 0 is 0 for all
    decay = config.weight_decay if config.weight_decay is not None else \
        0.01 if config.optimizer == "adamw" else 0.0
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum,
                               nesterov=config.nesterov, weight_decay=decay)
    cls = torch.optim.Adam if config.optimizer == "adam" else torch.optim.AdamW
    return cls(params, lr=config.lr, weight_decay=decay)


def _scheduler(config: TrainConfig, optimizer, epochs: int, reached: int = 0):
    """The learning-rate schedule of a run of ``epochs`` epochs, positioned after ``reached``
    of them: built afresh from the optimiser's initial learning rate and stepped ``reached``
    times, the calls an uninterrupted run makes, so that its learning rates are the same to
    the bit. A resumed run gets its schedule this way, for its own (maybe new) number of
    epochs, rather than from the checkpoint (sized for the number it was started with)."""
    import warnings

    import torch

    for group in optimizer.param_groups:  # a restored optimiser holds the last epoch's lr
        group["lr"] = group.get("initial_lr", config.lr)
    if config.schedule == "step":
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, config.step_size, config.gamma)
    elif config.schedule == "cosine":
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(epochs, 1))
    else:
        return None
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": a replay
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(reached):
            scheduler.step()
    return scheduler


def _compiled(net, model, input_shape, batches: list[int], dtype, device):
    """``torch.compile(net, dynamic=False)`` (one graph per batch size) once every layer of
    ``model`` has prepared its training-mode call for each of ``batches``
    (:func:`gradtool.nn.fused.prepare_calls`), so that dynamo traces each step as one graph.
    What a compiled step computes is the same closed forms, to rounding
    (tests/test_train.py)."""
    import torch

    from gradtool.nn.fused import prepare_calls

    prepare_calls(model, [(batch, *input_shape) for batch in batches], dtype, device)
    return torch.compile(net, dynamic=False)


@contextlib.contextmanager
def _compile_errors():
    """A torch.compile that fails (no C++ compiler for inductor on a CPU, an unsupported op)
    becomes a ConfigError that says to drop ``--compile``."""
    import torch

    try:
        yield
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--compile: torch.compile failed: {first[:300]}",
                          hint="train without --compile (on a CPU, inductor needs a C++ "
                               "compiler such as gcc)") from exc


def _verify_compiled(net, model, loss, input_shape, batch: int, classes: int, dtype,
                     device) -> None:
    """Compare the compiled model with the model itself on one random batch (``batch``
    samples of ``input_shape``, labels in ``[0, classes)``): the loss and every parameter's
    gradient must agree to the dtype's rounding, else :class:`ConfigError` names the
    parameter. Nothing the run computes changes: the buffers and torch's random generators
    are put back, and the gradients are not accumulated. The dropout masks are drawn by
    torch's own generator in both (``torch._inductor.config.fallback_random``, set while the
    check compiles the graph the run then uses).

    Why: on a GPU (an H200, torch 2.11) inductor's compiled CNN gave other parameter gradients
    than the same kernels run eagerly (docs/training.md); a compiled model is trusted only once
    it has matched the eager one here."""
    import torch
    import torch._inductor.config

    from gradtool.nn.fused import restored_state

    tol = 1e-7 if dtype == torch.float64 else 2e-3
    gen = torch.Generator().manual_seed(12345)
    x = torch.randn((batch, *input_shape), generator=gen, dtype=dtype).to(device)
    y = torch.randint(0, classes, (batch,), generator=gen).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    got = {}
    with restored_state(model, device), torch._inductor.config.patch(fallback_random=True), \
            _compile_errors():
        for tag, run in (("eager", model), ("compiled", net)):
            with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                torch.manual_seed(0)
                value = loss(run(x), y)
                got[tag] = (value.detach(), torch.autograd.grad(value, params))
    (l0, g0), (l1, g1) = got["eager"], got["compiled"]
    scale = max((g.abs().max().item() for g in g0), default=0.0) or 1.0
    if not torch.isclose(l1, l0, rtol=tol, atol=tol).item():
        raise ConfigError(f"--compile: the compiled model's loss on a test batch is "
                          f"{l1.item():.6g}, the model's own {l0.item():.6g}",
                          hint="train without --compile")
    for name, a, b in zip(names, g0, g1, strict=True):
        # each gradient to the dtype's rounding of the largest gradient of the model (a bias
        # ahead of batch norm has a gradient of rounding noise only)
        err = (a - b).abs().max().item()
        if not err <= tol * max(a.abs().max().item(), 1e-3 * scale):
            raise ConfigError(f"--compile: torch.compile changed the gradient of {name} on a "
                              f"test batch (largest difference {err:.3g}, largest entry "
                              f"{a.abs().max().item():.3g}); the run would not train the "
                              f"derived backward",
                              hint="train without --compile (docs/training.md: --compile)")


class _Backend:
    """One training step and one evaluation pass, on either backend. ``net`` is what a step
    runs (the model, or its ``DistributedDataParallel`` wrapper); evaluation runs ``model``."""

    def __init__(self, config, model, loss, device, net=None):
        self.numpy = config.backend == "numpy"
        self.model, self.loss, self.device = model, loss, device
        self.net = model if net is None else net

    def step(self, optimizer, x, y) -> tuple[float, int]:
        if self.numpy:
            out = self.model.forward(x.numpy())
            value = float(self.loss.forward(out, y.numpy()))
            self.model.backward(self.loss.backward())
            self.model.attach_grads()
            optimizer.step()
            return value, int((out.argmax(1) == y.numpy()).sum())
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        out = self._forward(x)
        loss = self.loss(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return float(loss.detach()), int((out.detach().argmax(1) == y).sum())

    def _forward(self, x):
        with _compile_errors():
            return self.net(x)

    def evaluate(self, loader) -> tuple[float, float, list, list]:
        import torch

        self.model.eval()
        total, correct, count, preds, labels = 0.0, 0, 0, [], []
        with torch.no_grad():
            for x, y in loader:
                if self.numpy:
                    out = self.model.forward(x.numpy())
                    value = float(self.loss.forward(out, y.numpy()))
                    pred = torch.from_numpy(out.argmax(1))
                else:
                    x, y = x.to(self.device), y.to(self.device)
                    out = self.model(x)
                    value = float(self.loss(out, y))
                    pred = out.argmax(1).cpu()
                    y = y.cpu()
                total += value * len(y)
                correct += int((pred == y).sum())
                count += len(y)
                preds.append(pred)
                labels.append(y)
        self.model.train()
        return total / max(count, 1), correct / max(count, 1), preds, labels


def _default_out(config: TrainConfig) -> str:
    model = Path(config.model).stem  # mlp, cnn, a shipped model's name, a file's stem
    return str(Path("runs") / f"{config.data}-{model}-{time.strftime('%Y%m%d-%H%M%S')}")


def _write_metrics(run: Path, history: list) -> None:
    from gradtool.codegen.cache import write_atomic

    lines = [",".join(METRICS)]
    lines += [",".join(repr(row[k]) if isinstance(row[k], float) else str(row[k])
                       for k in METRICS) for row in history]
    write_atomic(run / "metrics.csv", "\n".join(lines) + "\n")


def _versions() -> dict:
    import numpy
    import sympy
    import torch

    return {"gradtool": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "sympy": sympy.__version__, "python": platform.python_version()}


def _as_option(config: TrainConfig, name: str) -> str:
    """A field of ``config`` as the command-line option that sets it: ``--backend numpy``,
    ``--hidden 32,16``, ``--no-verify``."""
    value = getattr(config, name)
    if name == "verify":
        return "--verify" if value else "--no-verify"
    if name == "hidden":
        value = ",".join(map(str, value))
    return f"--{name.replace('_', '-')} {value}"


def _resolve(config: TrainConfig) -> tuple[TrainConfig, Path, dict | None, dict | None]:
    """The configuration to run, its folder, and the checkpoint and the record (config.json)
    of the run to resume, None for a new run. A new run's paths are made absolute
    (:meth:`TrainConfig.with_absolute_paths`)."""
    from gradtool.train import checkpoint

    if config.resume:
        run = Path(config.resume)
        stored = TrainConfig.from_run(run)
        record = json.loads((run / "config.json").read_text())
        conflicts = config.resume_conflicts(stored)
        if conflicts:
            given = ", ".join(_as_option(config, n) for n in conflicts)
            raise ConfigError(f"{given} given with --resume: a resumed run keeps the options "
                              f"in {run / 'config.json'}", hint=RESUME_HINT)
        epochs = config.epochs if config.epochs is not None else stored.epochs
        threads = config.threads if config.threads is not None else stored.threads
        stored = replace(stored, epochs=epochs, threads=threads, resume=str(run), out=str(run))
        last = run / "checkpoints" / "last.pt"
        if not last.exists():
            raise ConfigError(f"{run} has no checkpoint to resume from",
                              file=str(last), hint="start the run again without --resume")
        ckpt = checkpoint.load(last)
        if epochs < ckpt["epoch"]:
            raise ConfigError(f"--epochs {epochs}, but {run} has already completed "
                              f"{ckpt['epoch']} epochs",
                              hint=f"give --epochs {ckpt['epoch'] + 1} or more to run longer, "
                                   "or leave --epochs out to finish the run as started")
        return stored, run, ckpt, record
    config = replace(config.with_absolute_paths(),
                     epochs=DEFAULT_EPOCHS if config.epochs is None else config.epochs,
                     threads=DEFAULT_THREADS if config.threads is None else config.threads)
    run = Path(config.out or _default_out(config))
    if (run / "checkpoints" / "last.pt").exists():
        raise ConfigError(f"{run} already holds a run", hint=f"--resume {run} continues it; "
                                                             "or choose another --out")
    return replace(config, out=str(run)), run, None, None


def _check_resumable(record: dict, run: Path, desc, hashes: dict, data: dict) -> None:
    """Refuse to resume ``run`` when what it trains is no longer what it recorded in
    ``record`` (its config.json): a spec file whose sha256 changed, a model whose layers
    changed (an edited model file), or a data set of other classes, shapes or sizes. A resumed
    run would otherwise load its checkpoint into another model, or another model's weights
    into this one, and train on silently."""
    where = run / "config.json"
    model = json.loads(json.dumps(desc.to_json()))  # as config.json holds it
    before = record.get("model")
    if before is not None and before != model:
        layers = list(zip(before["layers"], model["layers"], strict=False))
        diff = next((f"layer {k} was {a}, is now {b}" for k, (a, b) in enumerate(layers, 1)
                     if a != b), None)
        if diff is None:
            diff = (f"{len(before['layers'])} layers, now {len(model['layers'])}"
                    if len(before["layers"]) != len(model["layers"]) else
                    f"loss {before['loss']}, now {model['loss']}")
        raise ConfigError(f"the model changed since the run started: {diff} (the run "
                          f"recorded its model in {where})", file=model["source"],
                          hint="a resumed run trains the model it started with: put the model "
                               "file back as it was, or start a new run (--out)")
    for name, sha in hashes.items():
        before = record.get("spec_sha256", {}).get(name)
        if before is not None and before != sha:
            from gradtool.spec.loader import resolve

            file = resolve(name)
            shown = file.name if file.name != f"{name}.py" else name  # a path, or a built-in
            raise ConfigError(f"spec {shown} changed since the run started: its sha256 is "
                              f"{sha[:12]}…, the run recorded {before[:12]}… in {where}",
                              file=str(file),
                              hint="a resumed run trains the model it started with: put the "
                                   "spec back as it was, or start a new run (--out) with the "
                                   "new spec")
    before = record.get("data")
    if before is not None:
        for key in ("classes", "input_shape", "sizes"):
            if before.get(key) != data[key]:
                raise ConfigError(f"the data set changed since the run started: {key} "
                                  f"{data[key]}, the run recorded {before.get(key)} in "
                                  f"{where}", file=(data["sources"] or [None])[0],
                                  hint="resume with the data the run started with, or start "
                                       "a new run (--out)")


def train(config: TrainConfig, progress: Progress | None = None,
          on_step: Callable[[int, int, object], None] | None = None) -> TrainResult:
    """Verify the model's specs, train, evaluate, and write the run folder.

    ``progress(kind, info)`` is called with kind "verified", "start", "step", "epoch" and
    "done". ``on_step(epoch, step, model)`` is called after every optimiser step (tests use it
    to stop a run part-way). Raises :class:`DivergenceError` on a NaN or infinite loss (the
    last good checkpoint stays), :class:`gradtool.train.verify.VerificationError` when a spec
    fails its check, and :class:`ConfigError` / ``DataError`` / ``ModelError`` for bad input.

    Started by ``torchrun`` (``RANK``, ``WORLD_SIZE`` > 1 in the environment), each process
    trains its share of every global batch of ``config.batch_size`` samples, the torch model
    wrapped in ``DistributedDataParallel`` (see :mod:`gradtool.train.distributed`); rank 0
    alone calls ``progress``, evaluates the full validation and test sets and writes the run
    folder, and every rank returns rank 0's result.
    """
    from gradtool.train import distributed

    config.validate()
    world = distributed.from_env()
    base = TrainConfig.from_run(config.resume) if config.resume else config
    distributed.check(base, world)
    device = _device(base, world)
    started = distributed.start(world, device)
    try:
        return _train(config, world, device, progress, on_step)
    finally:
        distributed.stop(started)


def _train(config: TrainConfig, world, device, progress, on_step) -> TrainResult:
    import torch

    from gradtool.codegen.cache import write_atomic
    from gradtool.data import load_dataset, loaders
    from gradtool.data.batching import EpochShuffleSampler
    from gradtool.nn import build
    from gradtool.nn.models import check_input, check_trainable, refused_batch, spec_hash
    from gradtool.train import checkpoint, distributed
    from gradtool.train.verify import verify_all

    if world.parallel and not config.resume and not config.out:  # one folder, rank 0's time
        config = replace(config, out=distributed.broadcast(world, _default_out(config)))
    config, run, ckpt, stored = _resolve(config)
    config.validate()
    distributed.barrier(world)  # every rank has read the folder before rank 0 writes to it
    emit = progress if progress is not None and world.main else (lambda kind, info: None)
    if config.threads:
        torch.set_num_threads(config.threads)
        from threadpoolctl import threadpool_limits  # NumPy's BLAS (installed with sklearn)

        threadpool_limits(config.threads)
    ds = load_dataset(config.data, config.data_dir, val_fraction=config.val_fraction,
                      seed=config.seed, limit=config.limit)
    desc = _model_desc(config, ds.input_shape, len(ds.classes))
    names = desc.spec_names()
    hashes = {n: spec_hash(n) for n in names}
    data = {"name": ds.name, "sources": ds.sources, "classes": ds.classes,
            "input_shape": list(ds.input_shape),
            "sizes": [len(ds.train), len(ds.val), len(ds.test)]}
    if stored is not None:  # before verifying a spec the run did not start with
        _check_resumable(stored, run, desc, hashes, data)
    verified = []
    if config.verify:
        if not world.main:  # rank 0 generates and verifies; the others then read its cache
            distributed.barrier(world)
        verified = [v.to_json() for v in verify_all(names, lambda v: emit("verified",
                                                                           v.to_json()))]
        if world.main:
            distributed.barrier(world)

    torch.manual_seed(config.seed)
    tdtype = getattr(torch, config.dtype)
    model, loss = build(desc, config.backend, dtype=config.dtype, device=device,
                        seed=config.seed)
    check_trainable(model, desc)
    # a model for other inputs or another number of classes fails here, not mid-epoch
    check_input(model, desc, ds.input_shape, classes=len(ds.classes))
    if config.backend == "torch":
        loss = loss.to(device)
    if not world.main:  # the same initial weights, but masks of its own on each rank
        torch.manual_seed(distributed.rank_seed(config.seed, world.rank, 0))
    optimizer = _optimizer(config, model.parameters())
    per_rank = config.batch_size // world.world_size
    # this process's share of an epoch, as its train loader's sampler will draw it
    samples = len(EpochShuffleSampler(len(ds.train), config.seed,
                                      num_replicas=world.world_size, rank=world.rank))
    if samples >= per_rank:  # a model that can train on no full batch
        why = refused_batch(model, ds.input_shape, per_rank)
        if why is not None:
            raise ConfigError(f"--batch-size {config.batch_size} gives batches of {per_rank} "
                              f"sample{'s' if per_rank > 1 else ''} per process, which the "
                              f"model cannot train on: {why}",
                              hint="use a larger --batch-size")
    # a last short batch the model cannot train on (batch norm over one sample) is dropped
    # from every epoch, as DataLoader's drop_last, instead of failing at the end of epoch 1
    last = samples % per_rank
    dropped = None
    why = refused_batch(model, ds.input_shape, last) if last else None
    if why is not None:
        dropped = {"samples": last, "reason": why}
        if samples < per_rank:
            raise ConfigError(f"the training set has {samples} samples per process, fewer "
                              f"than a batch the model can train on: {why}",
                              hint="use a smaller --batch-size or more data (--limit)")
    train_loader, val_loader, test_loader = loaders(
        ds, per_rank, seed=config.seed, dtype=tdtype, drop_last=dropped is not None,
        eval_batch_size=config.batch_size, num_replicas=world.world_size, rank=world.rank)
    history, best, start_epoch = [], {"val_acc": -1.0, "epoch": 0}, 0
    ckpt_dir = run / "checkpoints"
    if ckpt is not None:
        if not checkpoint.restore(ckpt, model, optimizer, None, rank=world.rank,
                                  world_size=world.world_size):
            torch.manual_seed(distributed.rank_seed(config.seed, world.rank, ckpt["epoch"]))
        history, best, start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"]
    scheduler = _scheduler(config, optimizer, config.epochs, start_epoch)
    net = distributed.wrap(model, device) if world.parallel else model
    if config.compile:  # the batch sizes a step sees: full batches and a kept last one
        emit("compiling", {})
        compile_start = time.perf_counter()
        net = _compiled(net, model, ds.input_shape, [per_rank] + (
            [last] if last and dropped is None else []), tdtype, device)
        # under DistributedDataParallel a gradient taken outside a step would upset its
        # reduction: the check compiles the bare model on its own (each rank checks its own)
        _verify_compiled(torch.compile(model, dynamic=False) if world.parallel else net, model,
                         loss, ds.input_shape, per_rank, len(ds.classes), tdtype, device)
        emit("compiled", {"seconds": round(time.perf_counter() - compile_start, 3)})
    setting = {"versions": _versions(), "device": str(device), "world_size": world.world_size,
               "process_group": distributed.backend_name(), "dropped_last_batch": dropped}
    if stored is None:
        record = {"config": config.to_json(), "model": desc.to_json(), "spec_sha256": hashes,
                  "seed": config.seed, **setting, "data": data,
                  "verified": verified if config.verify else "unverified (--no-verify)"}
    else:  # the run's record stays; the resume (its epochs, threads, setting) is added to it
        record = dict(stored, config=config.to_json())
        record["resumed"] = [*stored.get("resumed", []),
                             {"from_epoch": ckpt["epoch"], "epochs": config.epochs,
                              "threads": config.threads, **setting}]

    def save(epoch: int, best_too: bool = False) -> None:
        """Rank 0 writes the checkpoints of ``epoch`` (every rank's generators in them)."""
        rngs = distributed.gather(world, checkpoint.rng_state(model))
        if world.main:
            state = checkpoint.make(model, optimizer, scheduler, epoch, history, best,
                                    rank_rngs=rngs if world.parallel else None)
            if best_too:
                checkpoint.save_atomic(state, ckpt_dir / "best.pt")
            checkpoint.save_atomic(state, ckpt_dir / "last.pt")
            _write_metrics(run, history)

    if world.main:
        run.mkdir(parents=True, exist_ok=True)
        write_atomic(run / "config.json", json.dumps(record, indent=2) + "\n")
    if ckpt is None:  # the initial state: a run killed in its first epoch resumes from here
        save(0)
    elif world.main:
        _write_metrics(run, history)
    distributed.barrier(world)  # rank 0's files are written before any rank goes on

    backend = _Backend(config, model, loss, device, net)
    steps = len(train_loader)
    emit("start", {"epochs": config.epochs, "steps": steps, "start_epoch": start_epoch,
                   "run_dir": str(run), "device": str(device), "world_size": world.world_size,
                   "dropped_last_batch": dropped})
    model.train()
    started = time.perf_counter()
    earlier = sum(r["seconds"] for r in history)  # a resumed run's epochs before this process
    with _report_interrupt(run, ckpt_dir):
        for epoch in range(start_epoch, config.epochs):
            train_loader.sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            total, correct, seen = 0.0, 0, 0
            for k, (x, y) in enumerate(train_loader):
                value, right = backend.step(optimizer, x, y)
                count = len(y)
                if world.parallel:  # the global batch's mean loss, the same on every rank
                    summed, right, count = distributed.all_sum(world, [value * count, right, count],
                                                               device)
                    value, right, count = summed / count, int(right), int(count)
                if not math.isfinite(value):
                    raise DivergenceError(
                        f"the loss became {value} at epoch {epoch + 1}, step {k + 1}; stopped",
                        file=str(ckpt_dir / "last.pt"),
                        hint=f"the last good checkpoint (after epoch {start_epoch_of(ckpt_dir)}) "
                             "is kept; lower --lr, or check the data and the specs")
                total += value * count
                correct += right
                seen += count
                emit("step", {"epoch": epoch, "step": k + 1, "steps": steps, "loss": total / seen,
                              "acc": correct / seen,
                              "samples_per_s": seen / max(time.perf_counter() - t0, 1e-9)})
                if on_step is not None:
                    on_step(epoch, k, model)
            seconds = time.perf_counter() - t0
            lr = optimizer.param_groups[0]["lr"]
            if scheduler is not None:
                scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": total / max(seen, 1),
                   "train_acc": correct / max(seen, 1), "val_loss": None, "val_acc": None,
                   "lr": lr, "seconds": round(seconds, 4),
                   "samples_per_s": round(seen / seconds, 1)}
            if world.main:  # rank 0 evaluates the whole validation set; the others wait below
                row["val_loss"], row["val_acc"], _, _ = backend.evaluate(val_loader)
            history.append(row)
            improved = world.main and row["val_acc"] > best["val_acc"]
            if improved:
                best = {"val_acc": row["val_acc"], "epoch": epoch + 1}
            save(epoch + 1, best_too=improved)
            distributed.barrier(world)  # the epoch's checkpoint is on disk before any rank goes on
            emit("epoch", row)

    result = None
    if world.main:
        result = _finish(config, run, desc, model, backend, test_loader, history, best,
                         started - earlier, verified, ds.classes, world.world_size)
        emit("done", result.to_json())
    return distributed.broadcast(world, result)


def _finish(config, run, desc, model, backend, test_loader, history, best, started, verified,
            classes, world_size) -> TrainResult:
    """Rank 0's end of a run: the test set, model.pt, the figures and result.json. The
    result's ``seconds`` count from ``started`` (moved back, for a resumed run, by the
    training seconds of the epochs before it, so that they cover the whole run)."""
    import torch

    from gradtool.codegen.cache import write_atomic

    test_loss, test_acc, preds, labels = backend.evaluate(test_loader)
    elapsed = time.perf_counter() - started
    trained = sum(r["seconds"] for r in history)
    samples = sum(r["samples_per_s"] * r["seconds"] for r in history)
    torch.save({"state_dict": model.state_dict(), "config": config.to_json(),
                "model": desc.to_json()}, run / "model.pt")
    _figures(run, history, preds, labels, classes)
    result = TrainResult(str(run), config.epochs, test_loss, test_acc, best["val_acc"],
                         best["epoch"], round(elapsed, 3),
                         round(samples / trained, 1) if trained else 0.0,
                         verified, not config.verify, history, world_size)
    write_atomic(run / "result.json", json.dumps(result.to_json(), indent=2) + "\n")
    return result


def start_epoch_of(ckpt_dir: Path) -> int:
    from gradtool.train import checkpoint

    path = ckpt_dir / "last.pt"
    return checkpoint.load(path)["epoch"] if path.exists() else 0


def _figures(run: Path, history: list, preds: list, labels: list, classes: list) -> None:
    """curves.png, and the test set's confusion matrix as confusion.png and confusion.csv."""
    import numpy as np
    import torch

    from gradtool.train import plots

    y_pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    y_true = torch.cat(labels).numpy() if labels else np.zeros(0, dtype=np.int64)
    matrix = plots.confusion_matrix(y_true, y_pred, len(classes))
    np.savetxt(run / "confusion.csv", matrix, fmt="%d", delimiter=",")
    if history:
        plots.plot_curves(history, run / "curves.png")
    plots.plot_confusion(matrix, classes, run / "confusion.png", "test set")


def load_model(run_dir: str | Path, backend: str | None = None, weights: str = "final"):
    """The trained model of a run folder, in eval mode, on the CPU: with ``weights="final"``
    the weights at the end of training (``model.pt``), ``"best"`` those of the epoch with the
    best validation accuracy (``checkpoints/best.pt``), ``"last"`` those of the last completed
    epoch (``checkpoints/last.pt``, also of a run that was stopped). Raises
    :class:`ConfigError` when a spec file the run recorded (its sha256 in ``config.json``)
    has changed since (the weights were trained for the spec as it was, and the edited one
    would compute something else with them, silently), or when the run has no such weights."""
    import torch

    from gradtool.nn import LayerEntry, ModelDesc, build
    from gradtool.nn.models import spec_hash

    record = Path(run_dir) / "config.json"
    kept = json.loads(record.read_text()) if record.exists() else {}
    for name, before in kept.get("spec_sha256", {}).items():
        try:
            now = spec_hash(name)
        except GradtoolError:
            continue  # gone: building the model below says so
        if now != before:
            raise ConfigError(f"spec {name} changed since this run trained it: its sha256 is "
                              f"{now[:12]}…, the run recorded {before[:12]}… in {record}",
                              file=str(name) if name.endswith(".py") else None,
                              hint="put the spec back as it was to use these weights, or "
                                   "train again with the new spec")
    files = {"final": Path(run_dir) / "model.pt",
             "best": Path(run_dir) / "checkpoints" / "best.pt",
             "last": Path(run_dir) / "checkpoints" / "last.pt"}
    if weights not in files:
        raise ConfigError(f"weights={weights!r}: no such weights",
                          hint="use final (model.pt), best or last (checkpoints/)")
    if not files[weights].exists():
        raise ConfigError(f"{run_dir} has no {weights} weights ({files[weights]} is missing)",
                          hint="a run writes model.pt when it ends and its checkpoints after "
                               "each epoch; use weights='last' for a run that was stopped")
    if weights == "final":
        saved = torch.load(files["final"], map_location="cpu", weights_only=False)
        cfg, m, state = TrainConfig.from_json(saved["config"]), saved["model"], \
            saved["state_dict"]
    else:  # a checkpoint holds the weights; the run's record holds what they belong to
        cfg, m = TrainConfig.from_json(kept["config"]), kept["model"]
        state = torch.load(files[weights], map_location="cpu", weights_only=False)["model"]
    layers = [LayerEntry(None, flatten=True) if e.get("flatten") else
              LayerEntry(e["spec"], {k: v for k, v in e.items() if k != "spec"})
              for e in m["layers"]]
    model, _ = build(ModelDesc(layers, m["loss"], m["source"]), backend or cfg.backend,
                     dtype=cfg.dtype)
    model.load_state_dict(state)
    return model.eval()
