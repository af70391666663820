"""The figures of a run folder: loss and accuracy curves, and a confusion matrix.

matplotlib is imported when a figure is drawn, never at import time, and only through its
object-oriented API on the Agg canvas (no pyplot, no global figure state, no display needed).
"""

from __future__ import annotations

import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# cells are annotated with their counts up to this many classes; beyond, colour only
MAX_ANNOTATED_CLASSES = 30


def confusion_matrix(y_true: Any, y_pred: Any, num_classes: int) -> np.ndarray:
    """Counts (C, C), int64: entry [i, j] is the number of samples of true class i predicted
    as class j (rows = true class, as in scikit-learn). ``y_true``, ``y_pred``: (N,) integers
    in [0, num_classes) (NumPy arrays, lists or CPU tensors). Raises ValueError for labels out
    of range or lengths that differ."""
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    y_pred = np.asarray(y_pred, dtype=np.int64).reshape(-1)
    if y_true.shape != y_pred.shape:
        raise ValueError(f"{len(y_true)} true labels but {len(y_pred)} predictions")
    for name, y in (("true label", y_true), ("prediction", y_pred)):
        if y.size and not 0 <= y.min() <= y.max() < num_classes:
            raise ValueError(f"a {name} lies outside 0..{num_classes - 1}: "
                             f"{y.min()}..{y.max()}")
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def _save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG atomically (a reader of the run folder never sees half a file),
    with the permissions ``open(path, "wb")`` would give it (0666 less the umask)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=120)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _series(history: Sequence[dict], key: str) -> list[float] | None:
    """The values of ``key`` per epoch (NaN where a row lacks one), or None when no row has
    one (a run without a validation split has no validation curve)."""
    values = [row.get(key) for row in history]
    if all(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return [math.nan if v is None else float(v) for v in values]


def curves_figure(history: Sequence[dict]) -> Figure:
    """Two panels, loss and accuracy against the epoch, training vs validation.

    ``history`` rows: ``{"epoch", "train_loss", "val_loss", "train_acc", "val_acc", ...}``,
    accuracies as fractions in [0, 1]. Raises ValueError for an empty history.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    if not history:
        raise ValueError("no epochs to plot: the history is empty")
    epochs = [row.get("epoch", k + 1) for k, row in enumerate(history)]
    fig = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, quantity in ((loss_ax, "loss"), (acc_ax, "acc")):
        for part, style in (("train", "-o"), ("val", "--s")):
            values = _series(history, f"{part}_{quantity}")
            if values is not None:
                label = "training" if part == "train" else "validation"
                ax.plot(epochs, values, style, markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    loss_ax.set_ylabel("loss")
    loss_ax.set_title("Loss")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("Accuracy")
    acc_ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    val_acc = _series(history, "val_acc")
    if val_acc is not None and not all(math.isnan(v) for v in val_acc):
        best = int(np.nanargmax(val_acc))
        acc_ax.annotate(f"best {val_acc[best]:.1%}", (epochs[best], val_acc[best]),
                        textcoords="offset points", xytext=(0, -14), ha="center", fontsize=8)
    fig.suptitle(f"Training curves ({len(history)} epochs)")
    return fig


def plot_curves(history: list[dict], path: Path) -> None:
    """Write :func:`curves_figure` of ``history`` to the PNG file ``path``."""
    _save(curves_figure(history), path)


def confusion_figure(matrix: np.ndarray, classes: Sequence[str], title: str) -> Figure:
    """The confusion matrix ``matrix`` (C, C) (rows = true class): each cell coloured by its
    share of the true class's samples (row-normalised, so rare classes read as clearly as
    common ones) and labelled with its count; class names on both axes; the accuracy
    (trace / total) in the title. Raises ValueError when the shapes disagree."""
    from matplotlib.figure import Figure

    matrix = np.asarray(matrix)
    n = len(classes)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} classes must be ({n}, {n}), "
                         f"found {matrix.shape}")
    total = int(matrix.sum())
    correct = int(np.trace(matrix))
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape), where=rows > 0)
    side = min(max(4.0, 0.45 * n + 2.5), 24.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="share of the true class", shrink=0.8)
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=list(classes), rotation=45 if n > 3 else 0, ha="right"
                  if n > 3 else "center", rotation_mode="anchor")
    ax.set_yticks(ticks, labels=list(classes))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if n <= MAX_ANNOTATED_CLASSES:
        size = 9 if n <= 12 else 6
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=size,
                        color="white" if share[i, j] > 0.5 else "black")
    accuracy = f"accuracy {correct / total:.2%} ({correct}/{total})" if total else "no samples"
    ax.set_title(f"{title}: {accuracy}")
    return fig


def plot_confusion(matrix: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    """Write :func:`confusion_figure` to the PNG file ``path``."""
    _save(confusion_figure(matrix, classes, title), path)
