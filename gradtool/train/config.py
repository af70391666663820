"""A training run's configuration: everything ``gradtool train`` can be told, as one dataclass."""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from gradtool.errors import GradtoolError

DEFAULT_EPOCHS = 30
DEFAULT_THREADS = 1
# what a resumed run may be given: the CLI and the library say the same
RESUME_HINT = ("only --epochs (to run longer), --threads, --json and --nproc-per-node may be "
               "given with --resume; to change another option, start a new run (--out)")
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine")
BACKENDS = ("torch", "numpy")
DTYPES = ("float32", "float64")

# the options only some runs use: option -> (the option that chooses, the choices that use it).
# Any other choice would ignore the option, so it is refused rather than dropped silently.
USED_ONLY_WITH = {
    "momentum": ("optimizer", ("sgd",)),
    "nesterov": ("optimizer", ("sgd",)),
    "step_size": ("schedule", ("step",)),
    "gamma": ("schedule", ("step",)),
    "hidden": ("model", ("mlp",)),
    "norm": ("model", ("mlp",)),
    "activation": ("model", ("mlp", "cnn")),
    "dropout": ("model", ("mlp", "cnn")),
    "data_dir": ("data", ("mnist", "fashion-mnist", "cifar10", "npz")),
}


def _flag(name: str) -> str:
    return f"--{name.replace('_', '-')}"


def _either(choices) -> str:
    return " or ".join(choices) if len(choices) < 3 else \
        f"{', '.join(choices[:-1])} or {choices[-1]}"


class ConfigError(GradtoolError):
    """An option value gradtool train cannot use."""


@dataclass
class TrainConfig:
    """One training run. ``model`` is ``"mlp"`` (built from ``hidden``, ``activation``,
    ``norm``, ``dropout``), ``"cnn"`` (:func:`gradtool.nn.cnn`, with ``activation`` and
    ``dropout``), a shipped model's name (``vu-mnist-cnn``) or a TOML model file.
    ``epochs=None`` means 30 for a new run and the recorded number for ``resume``.
    ``device="auto"`` is cuda where present, else cpu.
    ``compile``: training steps run the model through ``torch.compile`` (torch backend only).
    ``limit`` keeps only the first samples of the training set (quick runs). ``threads``: CPU
    threads for torch and NumPy's BLAS (``None``: 1 for a new run, the recorded number for
    ``resume``; small models gain nothing from more, and on a busy machine spinning threads
    cost 30×); 0 leaves the libraries' defaults.

    With ``resume``, the run's recorded configuration is used; ``epochs`` (to run longer) and
    ``threads`` may be given again, and any other field given with a value that is neither
    its default nor the run's raises :class:`ConfigError` (:meth:`resume_conflicts`)."""

    data: str = "digits"
    data_dir: str | None = None
    model: str = "mlp"
    hidden: tuple[int, ...] = (256, 128)
    activation: str = "relu"
    norm: str | None = None
    dropout: float = 0.0
    loss: str | None = None
    backend: str = "torch"
    epochs: int | None = None
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float | None = None  # None: the optimizer's default (adamw 0.01, else 0)
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    threads: int | None = None
    out: str | None = None
    resume: str | None = None
    verify: bool = True
    compile: bool = False
    val_fraction: float = 0.1
    limit: int | None = None

    def refuse_unused(self, given) -> None:
        """Raise :class:`ConfigError` when an option in ``given`` (field names) is one that
        this run's choices ignore (:data:`USED_ONLY_WITH`): ``--nesterov`` with
        ``--optimizer adam``, ``--hidden`` with a model file, ``--data-dir`` with digits. The
        CLI passes the options typed on its command line; :meth:`validate`, the fields that
        differ from their defaults."""
        unused = {}
        for name in given:
            if name in USED_ONLY_WITH:
                chooser, users = USED_ONLY_WITH[name]
                if getattr(self, chooser) not in users:
                    unused.setdefault(chooser, []).append(name)
        for chooser, names in unused.items():
            users = USED_ONLY_WITH[names[0]][1]
            chosen = getattr(self, chooser)
            if chooser == "model" and chosen not in ("mlp", "cnn"):
                chosen = f"{chosen} (a model file's layers are its own)"
            options = " and ".join(_flag(n) for n in names)
            raise ConfigError(
                f"{options} given with {_flag(chooser)} {chosen}, which does not use "
                f"{'them' if len(names) > 1 else 'it'}: only {_flag(chooser)} "
                f"{_either(users)} {'do' if len(users) > 1 else 'does'}",
                hint=f"drop {options}, or choose {_flag(chooser)} {_either(users)}")

    def validate(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                              ("backend", BACKENDS), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name} {getattr(self, name)!r} is not one of "
                                  f"{', '.join(allowed)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ConfigError(f"--device {self.device!r}", hint="use auto, cpu or cuda[:k]")
        if self.backend == "numpy" and self.device.startswith("cuda"):
            raise ConfigError("the numpy backend runs on the CPU", hint="drop --device cuda")
        if self.backend == "numpy" and self.compile:
            raise ConfigError("--compile compiles the torch backend's model with torch.compile; "
                              "the numpy backend has no torch model",
                              hint="drop --compile, or use --backend torch")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout {self.dropout} is not in [0, 1)")
        for name in ("batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.epochs is not None and self.epochs < 0:
            raise ConfigError("--epochs must not be negative")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ConfigError(f"--lr must be a positive number, got {self.lr}")
        for size in self.hidden:
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or \
                    size < 1:
                raise ConfigError(f"--hidden {','.join(map(str, self.hidden))}: every hidden "
                                  f"size must be a positive integer, got {size!r}",
                                  hint="write e.g. --hidden 128,64")
        for name in ("threads", "momentum", "weight_decay"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a number ≥ 0, got "
                                  f"{value}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ConfigError(f"gamma (the step schedule's factor) must be positive, got "
                              f"{self.gamma}")
        if self.nesterov and self.momentum == 0:
            raise ConfigError("--nesterov with --momentum 0: Nesterov's method is a form of "
                              "momentum", hint="give a --momentum > 0, or drop --nesterov")
        if not self.resume:  # a run's record was accepted when it started
            default = TrainConfig()
            self.refuse_unused([f.name for f in fields(self) if f.name in USED_ONLY_WITH and
                                _differs(getattr(self, f.name), getattr(default, f.name))])

    def with_absolute_paths(self) -> TrainConfig:
        """This configuration with every file it names made absolute (against the current
        directory, as the loaders read them): ``data_dir``, a model file ``model``, and
        spec files given as ``activation``, ``norm`` or ``loss``. A run records these, so that
        ``--resume`` from another directory reads the same files. Built-in names (``relu``,
        ``mlp``, a shipped model) are kept as they are."""
        from gradtool.model_files import shipped_models

        def spec(name: str | None) -> str | None:
            # the spec loader's rule (gradtool.spec.loader.resolve): a .py name, a name with
            # a path separator, or an existing file is a path; anything else a built-in
            if name is None or not (Path(name).suffix == ".py" or os.sep in name
                                    or Path(name).exists()):
                return name
            return str(Path(name).resolve())

        model = self.model
        if model not in ("mlp", "cnn") and model not in shipped_models() and (
                Path(model).suffix == ".toml" or Path(model).exists()):
            model = str(Path(model).resolve())
        data_dir = None if self.data_dir is None else \
            str(Path(self.data_dir).expanduser().resolve())
        return replace(self, model=model, data_dir=data_dir, activation=spec(self.activation),
                       norm=spec(self.norm), loss=spec(self.loss))

    def to_json(self) -> dict:
        out = asdict(self)
        out["hidden"] = list(self.hidden)
        return out

    @classmethod
    def from_json(cls, data: dict) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        cfg = cls(**{k: v for k, v in data.items() if k in names})
        cfg.hidden = tuple(cfg.hidden)
        return cfg

    def resume_conflicts(self, stored: TrainConfig) -> list[str]:
        """The fields of this configuration (one with ``resume`` set) that ask for something
        other than the run it resumes (``stored``): a value that is neither the default nor
        the run's, for every field but ``epochs``, ``threads``, ``resume`` and ``out`` (which
        may name the run's own folder)."""
        default = TrainConfig()
        out = []
        for f in fields(self):
            if f.name in ("epochs", "threads", "resume"):
                continue
            mine = getattr(self, f.name)
            if f.name == "out":
                if mine is not None and Path(mine).resolve() != Path(self.resume).resolve():
                    out.append(f.name)
                continue
            if f.name == "hidden":
                mine = tuple(mine)
            if mine != getattr(default, f.name) and mine != getattr(stored, f.name):
                out.append(f.name)
        return out

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise ConfigError(f"{run_dir} is not a run folder (no config.json)",
                              hint="give the folder a previous gradtool train wrote")
        return cls.from_json(json.loads(path.read_text())["config"])


def _differs(value, default) -> bool:
    return (tuple(value) if isinstance(value, list) else value) != default
