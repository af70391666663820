"""Run-folder figures: the confusion matrix against scikit-learn, and PNGs that are written."""

from __future__ import annotations

import math

import numpy as np
import pytest

from gradtool.train.plots import (
    confusion_figure,
    confusion_matrix,
    curves_figure,
    plot_confusion,
    plot_curves,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history(epochs=4, val=True):
    rows = []
    for e in range(1, epochs + 1):
        row = {"epoch": e, "train_loss": 1.0 / e, "train_acc": 1 - 0.5 / e, "lr": 0.1}
        if val:
            row.update(val_loss=1.2 / e, val_acc=[0.5, 0.8, 0.7, 0.75][(e - 1) % 4])
        rows.append(row)
    return rows


def test_confusion_matrix_matches_scikit_learn():
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix

    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 200)
    y_pred = np.where(rng.random(200) < 0.7, y_true, rng.integers(0, 5, 200))
    y_pred[y_pred == 3] = 4  # class 3 never predicted: an empty column
    ours = confusion_matrix(y_true, y_pred, 6)  # class 5 absent: an empty row and column
    assert ours.shape == (6, 6) and ours.dtype == np.int64
    np.testing.assert_array_equal(ours, sk_confusion_matrix(y_true, y_pred, labels=range(6)))
    assert confusion_matrix([], [], 3).tolist() == [[0] * 3] * 3


def test_confusion_matrix_rejects_bad_labels():
    with pytest.raises(ValueError, match="outside 0..2"):
        confusion_matrix([0, 3], [0, 1], 3)
    with pytest.raises(ValueError, match="2 true labels but 1 predictions"):
        confusion_matrix([0, 1], [0], 3)


def test_plots_write_png_files(tmp_path):
    from matplotlib.image import imread

    plot_curves(_history(), tmp_path / "run" / "curves.png")
    matrix = confusion_matrix([0, 1, 2, 2, 1], [0, 2, 2, 2, 1], 3)
    plot_confusion(matrix, ["cat", "dog", "bird"], tmp_path / "run" / "confusion.png", "test")
    for name in ("curves.png", "confusion.png"):
        path = tmp_path / "run" / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        pixels = imread(path)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels[..., :3].std() > 0.05  # not a blank canvas
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["confusion.png",
                                                                    "curves.png"]


def test_png_files_get_the_umask_permissions_not_private_ones(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        plot_curves(_history(), tmp_path / "curves.png")
    finally:
        os.umask(old)
    assert (tmp_path / "curves.png").stat().st_mode & 0o777 == 0o644


def test_curves_figure_has_a_loss_and_an_accuracy_panel_train_vs_validation():
    fig = curves_figure(_history())
    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_title() == "Loss" and acc_ax.get_title() == "Accuracy"
    for ax, key in ((loss_ax, "loss"), (acc_ax, "acc")):
        assert [line.get_label() for line in ax.lines] == ["training", "validation"]
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3, 4]
        assert list(ax.lines[1].get_ydata()) == [r[f"val_{key}"] for r in _history()]
    assert "best 80.0%" in [t.get_text() for t in acc_ax.texts]
    assert "4 epochs" in fig._suptitle.get_text()


def test_curves_without_validation_draw_training_only():
    fig = curves_figure(_history(val=False))
    assert [line.get_label() for line in fig.axes[0].lines] == ["training"]
    rows = _history()
    rows[1]["val_loss"] = None  # a missing value is a gap, not a failure
    assert math.isnan(curves_figure(rows).axes[0].lines[1].get_ydata()[1])
    with pytest.raises(ValueError, match="history is empty"):
        curves_figure([])


def test_confusion_figure_colours_by_row_share_and_titles_the_accuracy():
    matrix = np.array([[8, 2, 0], [0, 1, 0], [5, 0, 5]])
    fig = confusion_figure(matrix, ["a", "b", "c"], "test set")
    ax = fig.axes[0]
    assert ax.get_title() == "test set: accuracy 66.67% (14/21)"
    np.testing.assert_allclose(ax.images[0].get_array(),
                               matrix / matrix.sum(axis=1, keepdims=True))
    assert [t.get_text() for t in ax.texts] == [str(v) for v in matrix.ravel()]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b", "c"]
    empty = confusion_figure(np.zeros((2, 2), int), ["x", "y"], "val")
    assert empty.axes[0].get_title() == "val: no samples"
    with pytest.raises(ValueError, match=r"must be \(2, 2\)"):
        confusion_figure(matrix, ["x", "y"], "t")
