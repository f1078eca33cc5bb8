"""The test module's figures: scikit-learn metrics with bootstrap 95% intervals.

For K classes, N studies, true labels ``y`` and probabilities ``p`` (N, K):

* ``accuracy``: share of correct predictions;
* ``macro_auc``: mean over classes of the one-vs-rest ROC AUC (classes with no positive or no
  negative study are left out, as their AUC is undefined);
* ``macro_f1``: unweighted mean of the per-class F1 scores;
* ``kappa``: Cohen's kappa of prediction against truth (agreement beyond chance);
* ``nll``: mean negative log-likelihood of the true class (log loss);
* ``brier``: mean over studies of ``sum_k (p_k - y_k)^2`` (0 perfect, 2 worst);
* ``ece``: expected calibration error of the top-class confidence (15 equal-width bins);
* per class ``sensitivity`` (recall) and ``specificity`` (one-vs-rest true-negative rate).

Every figure but ECE is computed by scikit-learn (ECE has no scikit-learn function). The
intervals are percentile bootstrap intervals over studies resampled with replacement.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "SCALAR_METRICS",
    "MetricValue",
    "bootstrap_intervals",
    "classification_metrics",
    "expected_calibration_error",
    "metrics_to_dict",
    "summarise",
]

logger = logging.getLogger(__name__)

#: The study-level figures, in table order.
SCALAR_METRICS: tuple[str, ...] = (
    "accuracy",
    "macro_auc",
    "macro_f1",
    "kappa",
    "nll",
    "brier",
    "ece",
)


def _check(labels: Any, probabilities: Any) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels)
    p = np.asarray(probabilities, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f'Argument "probabilities" should be (studies, classes), got {p.shape}.')
    if y.ndim != 1 or len(y) != len(p):
        raise ValueError(
            f'Argument "labels" should hold one class index per row of "probabilities" '
            f"({len(p)}), got shape {y.shape}."
        )
    if len(y) == 0:
        raise ValueError('Argument "labels" should not be empty.')
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= p.shape[1]:
        raise ValueError(f'Argument "labels" should be class indices in [0, {p.shape[1]}).')
    return y.astype(np.int64), p


def expected_calibration_error(labels: Any, probabilities: Any, n_bins: int = 15) -> float:
    """Expected calibration error of the top-class confidence.

    The studies are binned by the probability of their predicted class into ``n_bins``
    equal-width bins; ECE is the study-weighted mean of |accuracy - mean confidence| per bin.
    """
    y, p = _check(labels, probabilities)
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f'Argument "n_bins" should be a positive integer, got {n_bins!r}.')
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    total = 0.0
    for b in np.unique(bins):
        members = bins == b
        total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / len(y))


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    scores = [
        roc_auc_score(y == k, p[:, k])
        for k in range(p.shape[1])
        if 0 < int((y == k).sum()) < len(y)
    ]
    return float(np.mean(scores)) if scores else float("nan")


def classification_metrics(
    labels: Any, probabilities: Any, predicted: Any = None
) -> dict[str, Any]:
    """Point estimates of every figure (see the module docstring).

    Parameters
    ----------
    labels
        (N,) true class indices.
    probabilities
        (N, K) predicted probabilities.
    predicted
        (N,) predicted class indices (e.g. from majority voting); the most probable class
        when ``None``.

    Returns
    -------
    dict
        :data:`SCALAR_METRICS` as floats plus ``sensitivity`` and ``specificity`` as lists of
        K floats (NaN where a class has no positive or no negative study).
    """
    from sklearn.metrics import (
        accuracy_score,
        brier_score_loss,
        cohen_kappa_score,
        f1_score,
        log_loss,
        multilabel_confusion_matrix,
    )

    y, p = _check(labels, probabilities)
    k = p.shape[1]
    pred = p.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=np.int64)
    if pred.shape != y.shape:
        raise ValueError(f'Argument "predicted" should have shape {y.shape}, got {pred.shape}.')
    classes = list(range(k))
    normalised = p / p.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        kappa = float(cohen_kappa_score(y, pred, labels=classes))
    matrices = multilabel_confusion_matrix(y, pred, labels=classes)
    tn, fp, fn, tp = (matrices[:, i // 2, i % 2].astype(np.float64) for i in range(4))
    with np.errstate(invalid="ignore", divide="ignore"):
        sensitivity = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        specificity = np.where(tn + fp > 0, tn / (tn + fp), np.nan)
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "macro_auc": _macro_auc(y, p),
        "macro_f1": float(f1_score(y, pred, labels=classes, average="macro", zero_division=0)),
        "kappa": kappa,
        "nll": float(log_loss(y, np.clip(normalised, 1e-15, 1.0), labels=classes)),
        "brier": float(brier_score_loss(y, normalised, labels=classes, scale_by_half=False)),
        "ece": expected_calibration_error(y, normalised),
        "sensitivity": [float(v) for v in sensitivity],
        "specificity": [float(v) for v in specificity],
    }


@dataclass(frozen=True)
class MetricValue:
    """A figure with its bootstrap 95% interval (NaN bounds without bootstrap)."""

    value: float
    low: float
    high: float

    def to_dict(self) -> dict[str, float | None]:
        """JSON-ready, NaN as ``None``."""
        return {
            k: (None if math.isnan(v) else round(v, 6))
            for k, v in (("value", self.value), ("low", self.low), ("high", self.high))
        }

    def format(self, digits: int = 3) -> str:
        """``0.912 (0.884-0.937)``, or the value alone without an interval."""
        if math.isnan(self.value):
            return "n/a"
        if math.isnan(self.low):
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} ({self.low:.{digits}f}-{self.high:.{digits}f})"


def bootstrap_intervals(
    labels: Any,
    probabilities: Any,
    predicted: Any = None,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Percentile bootstrap intervals of every figure of :func:`classification_metrics`.

    Returns
    -------
    dict
        Figure -> (low, high); ``sensitivity``/``specificity`` -> list of (low, high) per class.
        Resamples where a figure is undefined are left out of that figure's interval.
    """
    y, p = _check(labels, probabilities)
    pred = p.argmax(axis=1) if predicted is None else np.asarray(predicted, dtype=np.int64)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(
            f'Argument "n_resamples" should be a positive integer, got {n_resamples!r}.'
        )
    if not 0 < level < 1:
        raise ValueError(f'Argument "level" should be in (0, 1), got {level}.')
    rng = np.random.default_rng([seed, 11])
    k = p.shape[1]
    scalars = np.full((n_resamples, len(SCALAR_METRICS)), np.nan)
    per_class = np.full((n_resamples, 2, k), np.nan)
    for b in range(n_resamples):
        rows = rng.integers(0, len(y), len(y))
        figures = classification_metrics(y[rows], p[rows], pred[rows])
        scalars[b] = [figures[name] for name in SCALAR_METRICS]
        per_class[b, 0] = figures["sensitivity"]
        per_class[b, 1] = figures["specificity"]
    tail = (1 - level) / 2 * 100

    def interval(values: np.ndarray) -> tuple[float, float]:
        finite = values[np.isfinite(values)]
        if len(finite) == 0:
            return float("nan"), float("nan")
        low, high = np.percentile(finite, [tail, 100 - tail])
        return float(low), float(high)

    out: dict[str, Any] = {name: interval(scalars[:, i]) for i, name in enumerate(SCALAR_METRICS)}
    out["sensitivity"] = [interval(per_class[:, 0, c]) for c in range(k)]
    out["specificity"] = [interval(per_class[:, 1, c]) for c in range(k)]
    return out


def summarise(
    labels: Any,
    probabilities: Any,
    predicted: Any = None,
    *,
    n_resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every figure as a :class:`MetricValue` (value and bootstrap 95% interval).

    ``n_resamples = 0`` skips the bootstrap (NaN bounds).

    Returns
    -------
    dict
        Figure -> MetricValue; ``sensitivity``/``specificity`` -> list of MetricValue.
    """
    point = classification_metrics(labels, probabilities, predicted)
    nan = (float("nan"), float("nan"))
    k = len(point["sensitivity"])
    if n_resamples:
        bounds = bootstrap_intervals(
            labels, probabilities, predicted, n_resamples=n_resamples, seed=seed
        )
    else:
        bounds = {name: nan for name in SCALAR_METRICS}
        bounds["sensitivity"] = bounds["specificity"] = [nan] * k
    out: dict[str, Any] = {name: MetricValue(point[name], *bounds[name]) for name in SCALAR_METRICS}
    for name in ("sensitivity", "specificity"):
        out[name] = [MetricValue(v, *b) for v, b in zip(point[name], bounds[name], strict=True)]
    return out


def metrics_to_dict(summary: dict[str, Any], classes: Sequence[str]) -> dict[str, Any]:
    """A :func:`summarise` result as JSON-ready dicts (per-class figures keyed by class)."""
    out: dict[str, Any] = {name: summary[name].to_dict() for name in SCALAR_METRICS}
    for name in ("sensitivity", "specificity"):
        out[name] = {c: v.to_dict() for c, v in zip(classes, summary[name], strict=True)}
    return out
