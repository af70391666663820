"""A training run's configuration: everything ``gradtool train`` can be told, as one dataclass."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from gradtool.errors import GradtoolError

DEFAULT_EPOCHS = 30
OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("none", "step", "cosine")
BACKENDS = ("torch", "numpy")
DTYPES = ("float32", "float64")


class ConfigError(GradtoolError):
    """An option value gradtool train cannot use."""


@dataclass
class TrainConfig:
    """One training run. ``model`` is ``"mlp"`` (built from ``hidden``, ``activation``,
    ``norm``, ``dropout``), ``"cnn"`` (:func:`gradtool.nn.cnn`, with ``activation`` and
    ``dropout``), a shipped model's name (``vu-mnist-cnn``) or a TOML model file.
    ``epochs=None`` means 30 for a new run and the recorded number for ``resume``.
    ``device="auto"`` is cuda where present, else cpu.
    ``limit`` keeps only the first samples of the training set (quick runs). ``threads``: CPU
    threads for torch and NumPy's BLAS (default 1: small models gain nothing from more, and on
    a busy machine spinning threads cost 30×); 0 leaves the libraries' defaults."""

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
    weight_decay: float = 0.0
    schedule: str = "cosine"
    step_size: int = 10
    gamma: float = 0.1
    seed: int = 0
    dtype: str = "float32"
    device: str = "auto"
    threads: int = 1
    out: str | None = None
    resume: str | None = None
    verify: bool = True
    val_fraction: float = 0.1
    limit: int | None = None

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
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"--dropout {self.dropout} is not in [0, 1)")
        for name in ("batch_size", "step_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive")
        if self.epochs is not None and self.epochs < 0:
            raise ConfigError("--epochs must not be negative")
        if self.lr <= 0:
            raise ConfigError("--lr must be positive")

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

    @classmethod
    def from_run(cls, run_dir: str | Path) -> TrainConfig:
        path = Path(run_dir) / "config.json"
        if not path.exists():
            raise ConfigError(f"{run_dir} is not a run folder (no config.json)",
                              hint="give the folder a previous gradtool train wrote")
        return cls.from_json(json.loads(path.read_text())["config"])
