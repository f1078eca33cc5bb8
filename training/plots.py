"""PNG figures of the training and test modules (matplotlib, Agg backend, no display)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["plot_confusion", "plot_learning_curve", "plot_roc"]

logger = logging.getLogger(__name__)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(history: Sequence[Mapping[str, float]], path: Path, title: str) -> Path:
    """Training and validation loss, and validation accuracy, per epoch.

    Parameters
    ----------
    history
        One mapping per epoch with ``epoch``, ``train_loss`` and optionally ``val_loss`` and
        ``val_accuracy``.
    path
        The PNG to write.
    title
        Figure title (the member's name).
    """
    plt = _pyplot()
    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(9, 3.4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], "o-", label="train")
    if history and not np.isnan(history[0].get("val_loss", np.nan)):
        loss_axis.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation")
        accuracy_axis.plot(epochs, [row["val_accuracy"] for row in history], "o-", color="C2")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_axis.legend()
    accuracy_axis.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy", ylim=(0, 1))
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_confusion(matrix: np.ndarray, classes: Sequence[str], path: Path, title: str) -> Path:
    """A confusion matrix (rows: truth, columns: prediction) with counts in the cells."""
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(6, 5))
    ConfusionMatrixDisplay(np.asarray(matrix), display_labels=list(classes)).plot(
        ax=axis, cmap="Blues", colorbar=False, xticks_rotation=30
    )
    axis.set_title(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def plot_roc(
    labels: np.ndarray, probabilities: np.ndarray, classes: Sequence[str], path: Path, title: str
) -> Path:
    """One-vs-rest ROC curves, one per class present in ``labels``, with their AUC."""
    from sklearn.metrics import auc, roc_curve

    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        positive = labels == k
        if positive.all() or not positive.any():
            continue
        fpr, tpr, _ = roc_curve(positive, probabilities[:, k])
        axis.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    axis.plot([0, 1], [0, 1], ":", color="grey")
    axis.set(
        xlabel="1 - specificity", ylabel="sensitivity", title=title, xlim=(0, 1), ylim=(0, 1.01)
    )
    axis.legend(loc="lower right", fontsize="small")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
