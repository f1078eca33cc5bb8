"""Per-lesion evaluation of lung CT detection: FROC and CPM (LUNA16), AP at IoU 0.5, Dice.

Issue 18 scores the 3-D lesions of :func:`mibi_node.analyses.lung.linking.link_detections`
against the truth lesions of each scan as LUNA16 scores nodule candidates, and adds the AP at
IoU 0.5 and the mask Dice of the lesions found.

How this module reads the rules
-------------------------------
* Hit (``hit="centroid"``, default, LUNA16's rule): a prediction hits a truth lesion when its
  centroid, rounded to the nearest voxel, is a voxel of the truth mask. ``hit="iou"``: when
  the 3-D mask IoU is ``>= min_iou`` (0.1). Truth lesions are disjoint, so under the centroid
  rule a prediction hits at most one; under the IoU rule it may hit two, and then it detects
  both (as in LUNA16's script, where a candidate counts for every nodule it lies in).
* Each truth lesion is counted once: the highest-scoring prediction hitting it is its TP
  (ties: input order); the other predictions hitting it and nothing else are *ignored*
  (neither TP nor FP, left out of every FROC figure); a prediction hitting nothing is an FP.
* Class-agnostic (``all (class-agnostic)``): labels play no part. Class-aware
  (``all (class-aware)``): a hit also needs the same label, so a lesion found in the right
  place with the wrong class is a miss *and* an FP. A class's row is the class-aware match
  restricted to that class' truth and predictions; its FP rate still divides by every scan.
* FROC, as LUNA16's script: the TPs (one per detected truth lesion, with the score of its TP)
  and the FPs are ranked by score; after each distinct score (ties enter together) the curve
  has the point (FPs / scans, TPs / truth lesions), and it starts at (0, 0). At equal FP
  rates the curve takes the highest sensitivity. The sensitivity at 1/8, 1/4, 1/2, 1, 2, 4
  and 8 FPs per scan is linearly interpolated between those points (``numpy.interp``, as
  LUNA16's script does), and held at its last value beyond the last point. CPM is their mean.
  A row without truth lesions has NaN sensitivities and CPM.
* AP at IoU 0.5: per class, PASCAL VOC matching (predictions by decreasing score, each takes
  the not yet taken truth lesion of its class with IoU ``>= 0.5`` of the highest IoU, else
  it is an FP; duplicates are FPs here, unlike in the FROC) and the all-point interpolated
  area of :func:`training.spine_metric.average_precision`. The class-aware row shows the
  mean over classes with truth lesions (mAP); the class-agnostic row the AP with labels
  ignored.
* Dice: of each TP pair of the row's FROC match (truth lesion and its TP prediction), the
  mean over the pairs; NaN without any.
* Bootstrap: scans resampled with replacement (``numpy.random.default_rng([seed, 16])``),
  percentile 95 % intervals; a resample where a figure is undefined is left out of its
  interval.
* Goal (issue 18): CPM >= 0.93 and Dice >= 0.80, on the class-aware row by default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from enum import StrEnum
from numbers import Integral, Real
from typing import Any

import numpy as np

from mibi_node.analyses.lung.labels import CLASSES, LABEL_OF
from mibi_node.analyses.lung.linking import Lesion3D, lesion_iou
from training.metrics import MetricValue
from training.spine_metric import average_precision

__all__ = [
    "FP_RATES",
    "GOALS",
    "LungEvaluation",
    "Outcome",
    "RowFigures",
    "ScanLesions",
    "ScanMatch",
    "evaluate",
    "goal_check",
    "match_scan",
]

logger = logging.getLogger(__name__)

#: False positives per scan at which the FROC is read (LUNA16).
FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: Issue 18's goal: figure -> threshold.
GOALS: dict[str, float] = {"cpm": 0.93, "dice": 0.80}
AGNOSTIC, AWARE = "all (class-agnostic)", "all (class-aware)"
_HITS = ("centroid", "iou")


class Outcome(StrEnum):
    """What a prediction counts as in the FROC."""

    TP = "tp"
    FP = "fp"
    IGNORED = "ignored"


@dataclass(frozen=True)
class ScanLesions:
    """The truth and predicted lesions of one scan.

    Attributes
    ----------
    scan_id
        Unique among the evaluated scans (e.g. the SeriesInstanceUID).
    truth
        Truth lesions (their scores are not used); may be empty.
    predictions
        Predicted lesions with their scores; may be empty.
    """

    scan_id: str
    truth: tuple[Lesion3D, ...]
    predictions: tuple[Lesion3D, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.scan_id, str) or not self.scan_id:
            raise ValueError(
                f'Argument "scan_id" should be a non-empty string, got {self.scan_id!r}.'
            )
        for name in ("truth", "predictions"):
            value = tuple(getattr(self, name))
            if not all(isinstance(v, Lesion3D) for v in value):
                raise TypeError(f'Argument "{name}" should hold Lesion3D objects.')
            object.__setattr__(self, name, value)


@dataclass(frozen=True)
class ScanMatch:
    """One scan's FROC match under one rule.

    Attributes
    ----------
    outcomes
        Per prediction.
    detected_by
        Per truth lesion: the index of its TP prediction, or ``None`` when missed.
    dice
        Per truth lesion: Dice with its TP prediction, NaN when missed.
    """

    scan_id: str
    outcomes: tuple[Outcome, ...]
    detected_by: tuple[int | None, ...]
    dice: tuple[float, ...]


def _hits(truth: Lesion3D, prediction: Lesion3D, hit: str, min_iou: float) -> bool:
    if hit == "centroid":
        return truth.contains(prediction.centroid)
    return lesion_iou(truth, prediction) >= min_iou


def match_scan(
    scan: ScanLesions, *, hit: str = "centroid", min_iou: float = 0.1, class_aware: bool = False
) -> ScanMatch:
    """Match one scan's predictions to its truth lesions (see the module docstring).

    Parameters
    ----------
    scan
        The lesions.
    hit
        ``"centroid"`` (the prediction's centroid in the truth mask) or ``"iou"``.
    min_iou
        The 3-D mask IoU a hit needs under ``hit="iou"``.
    class_aware
        Whether a hit also needs the same label.
    """
    truth, preds = scan.truth, scan.predictions
    hits = np.array(
        [
            [(not class_aware or t.label == p.label) and _hits(t, p, hit, min_iou) for t in truth]
            for p in preds
        ],
        dtype=bool,
    ).reshape(len(preds), len(truth))
    scores = np.array([p.score for p in preds])
    detected_by: list[int | None] = []
    dice: list[float] = []
    for t in range(len(truth)):
        hitters = np.flatnonzero(hits[:, t])
        if len(hitters) == 0:
            detected_by.append(None)
            dice.append(math.nan)
            continue
        best = int(hitters[np.argmax(scores[hitters])])  # first of the highest scores
        iou = lesion_iou(truth[t], preds[best])
        detected_by.append(best)
        dice.append(2 * iou / (1 + iou))
    tps = {p for p in detected_by if p is not None}
    outcomes = tuple(
        Outcome.TP if p in tps else Outcome.IGNORED if hits[p].any() else Outcome.FP
        for p in range(len(preds))
    )
    return ScanMatch(scan.scan_id, outcomes, tuple(detected_by), tuple(dice))


@dataclass(frozen=True)
class _Entries:
    """One row's ranked TPs and FPs over the scans, and its truth lesions per scan."""

    scan: np.ndarray
    is_tp: np.ndarray
    dice: np.ndarray  # NaN for FPs
    ends: np.ndarray  # last index of each distinct score
    positives: np.ndarray  # (scans,)

    @classmethod
    def build(cls, rows: list[tuple[int, float, bool, float]], positives: np.ndarray) -> _Entries:
        scores = np.array([r[1] for r in rows], dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if len(rows) else order
        return cls(
            scan=np.array([r[0] for r in rows], dtype=np.int64)[order],
            is_tp=np.array([r[2] for r in rows], dtype=np.float64)[order],
            dice=np.array([r[3] for r in rows], dtype=np.float64)[order],
            ends=ends.astype(np.int64),
            positives=positives,
        )

    def figures(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """Sensitivities at :data:`FP_RATES` (rows x 7), CPM and Dice (rows) per weight row."""
        n_rows = len(weights)
        positives = weights @ self.positives
        sens = np.full((n_rows, len(FP_RATES)), np.nan)
        w = weights[:, self.scan]
        tp = np.cumsum(w * self.is_tp, axis=1)[:, self.ends]
        fp = np.cumsum(w * (1.0 - self.is_tp), axis=1)[:, self.ends]
        n_scans = weights.sum(axis=1)
        for r in range(n_rows):
            if positives[r] <= 0:
                continue
            fps = np.concatenate([[0.0], fp[r] / n_scans[r]])
            tpr = np.concatenate([[0.0], tp[r] / positives[r]])
            last = np.flatnonzero(np.append(fps[1:] != fps[:-1], True))  # best at equal rate
            sens[r] = np.interp(FP_RATES, fps[last], tpr[last])
        tp_w = w * self.is_tp
        n_tp = tp_w.sum(axis=1)
        dice_sum = (tp_w * np.nan_to_num(self.dice)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(n_tp > 0, dice_sum / n_tp, np.nan)
        return {"sensitivity": sens, "cpm": sens.mean(axis=1), "dice": dice}


@dataclass(frozen=True)
class _APEntries:
    scan: np.ndarray
    score: np.ndarray
    is_tp: np.ndarray
    positives: np.ndarray  # (scans,)

    def ap(self, weights: np.ndarray) -> np.ndarray:
        out = np.full(len(weights), np.nan)
        for r, row in enumerate(weights):
            n_pos = float(row @ self.positives)
            if n_pos <= 0:
                continue
            repeat = row[self.scan].astype(np.int64)
            out[r] = average_precision(
                np.repeat(self.score, repeat).tolist(),
                np.repeat(self.is_tp, repeat).tolist(),
                round(n_pos),
            )
        return out


def _voc(scans: Sequence[ScanLesions], label: int | None, iou: float) -> _APEntries:
    """VOC matching of one class (``None``: labels ignored) over the scans."""
    scan_idx: list[int] = []
    scores: list[float] = []
    is_tp: list[bool] = []
    positives = np.zeros(len(scans))
    for s, scan in enumerate(scans):
        truth = [t for t in scan.truth if label is None or t.label == label]
        preds = [p for p in scan.predictions if label is None or p.label == label]
        positives[s] = len(truth)
        taken: set[int] = set()
        for p in sorted(preds, key=lambda p: -p.score):
            ious = [lesion_iou(t, p) for t in truth]
            best = int(np.argmax(ious)) if ious else -1
            tp = best >= 0 and ious[best] >= iou and best not in taken
            if tp:
                taken.add(best)
            scan_idx.append(s)
            scores.append(p.score)
            is_tp.append(tp)
    return _APEntries(
        np.array(scan_idx, dtype=np.int64),
        np.array(scores, dtype=np.float64),
        np.array(is_tp, dtype=bool),
        positives,
    )


def _froc_entries(
    scans: Sequence[ScanLesions], matches: Sequence[ScanMatch], label: int | None
) -> tuple[_Entries, tuple[int, int, int, int]]:
    """The FROC entries of the matches, restricted to one label (``None``: all)."""
    rows: list[tuple[int, float, bool, float]] = []
    positives = np.zeros(len(scans))
    fp = ignored = 0
    for s, (scan, match) in enumerate(zip(scans, matches, strict=True)):
        for truth, by, dice in zip(scan.truth, match.detected_by, match.dice, strict=True):
            if label is not None and truth.label != label:
                continue
            positives[s] += 1
            if by is not None:
                rows.append((s, scan.predictions[by].score, True, dice))
        for pred, outcome in zip(scan.predictions, match.outcomes, strict=True):
            if label is not None and pred.label != label:
                continue
            if outcome is Outcome.FP:
                rows.append((s, pred.score, False, math.nan))
                fp += 1
            elif outcome is Outcome.IGNORED:
                ignored += 1
    n_truth, n_tp = int(positives.sum()), sum(1 for r in rows if r[2])
    return _Entries.build(rows, positives), (n_truth, n_tp, fp, ignored)


def _interval(values: np.ndarray) -> tuple[float, float]:
    finite = values[np.isfinite(values)]
    if len(finite) == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _jsonable(value: Any) -> Any:
    if isinstance(value, MetricValue):
        return value.to_dict()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value) if f.repr}
    return value


@dataclass(frozen=True)
class RowFigures:
    """The figures of one row: all classes (class-agnostic or class-aware) or one class.

    Attributes
    ----------
    name
        ``"all (class-agnostic)"``, ``"all (class-aware)"`` or a class key.
    n_lesions, n_detected, n_fp, n_ignored
        Truth lesions, those detected, FPs and ignored predictions of the FROC match.
    sensitivity
        At each of :data:`FP_RATES`.
    cpm
        Mean of ``sensitivity``.
    ap
        AP at IoU 0.5 (class rows, class-agnostic row) or mAP (class-aware row).
    dice
        Mean Dice of the TP pairs.
    """

    name: str
    n_lesions: int
    n_detected: int
    n_fp: int
    n_ignored: int
    sensitivity: tuple[MetricValue, ...]
    cpm: MetricValue
    ap: MetricValue
    dice: MetricValue


@dataclass(frozen=True)
class LungEvaluation:
    """The per-lesion figures of a set of scans.

    Attributes
    ----------
    n_scans, n_truth, n_predictions
        What was evaluated.
    hit, min_iou, ap_iou
        The hit rule, its IoU under ``hit="iou"``, and the AP's IoU.
    rows
        ``all (class-agnostic)``, ``all (class-aware)``, then one per class of ``CLASSES``.
    bootstrap, seed
        Resamples of scans (0: no intervals) and their seed.
    matches
        Class-aware FROC matches per scan, in input order (not in :meth:`to_dict`).
    """

    n_scans: int
    n_truth: int
    n_predictions: int
    hit: str
    min_iou: float
    ap_iou: float
    rows: tuple[RowFigures, ...]
    bootstrap: int
    seed: int
    matches: tuple[ScanMatch, ...] = field(default=(), repr=False, compare=False)

    def row(self, name: str) -> RowFigures:
        """The row called ``name``."""
        for r in self.rows:
            if r.name == name:
                return r
        raise ValueError(f'Argument "name" should be one of {[r.name for r in self.rows]}.')

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``, no per-scan matches)."""
        out: dict[str, Any] = _jsonable(self)
        out["fp_rates"] = list(FP_RATES)
        return out

    def format_table(self) -> str:
        """A plain-text report: FROC, CPM, AP and Dice per row."""
        rule = "centroid in truth mask" if self.hit == "centroid" else f"IoU >= {self.min_iou:g}"
        boot = f"{self.bootstrap} bootstrap resamples of scans (seed {self.seed})"
        lines = [
            f"Lung lesions: {self.n_scans} scans, {self.n_truth} truth lesions, "
            f"{self.n_predictions} predictions; hit: {rule}; AP at IoU {self.ap_iou:g}; "
            "95% intervals from " + (boot if self.bootstrap else "no bootstrap"),
            "",
            f"{'row':<22} {'truth':>5} {'TP':>4} {'FP':>4} {'ign':>4}  "
            + " ".join(f"{r:>5g}" for r in FP_RATES)
            + f"  {'CPM':<21} {'AP':<21} Dice",
        ]
        for r in self.rows:
            sens = " ".join(
                f"{s.value:>5.3f}" if math.isfinite(s.value) else f"{'n/a':>5}"
                for s in r.sensitivity
            )
            lines.append(
                f"{r.name:<22} {r.n_lesions:>5} {r.n_detected:>4} {r.n_fp:>4} {r.n_ignored:>4}  "
                f"{sens}  {r.cpm.format():<21} {r.ap.format():<21} {r.dice.format()}"
            )
        lines.append("sensitivity at the FPs per scan above; the class-aware row's AP is the mAP")
        return "\n".join(lines)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f'Argument "{name}" should be an integer >= 0, got {value!r}.')
    return int(value)


def _check_iou(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not 0 < float(value) <= 1:
        raise ValueError(f'Argument "{name}" should be in (0, 1], got {value!r}.')
    return float(value)


def evaluate(
    scans: Sequence[ScanLesions],
    *,
    hit: str = "centroid",
    min_iou: float = 0.1,
    ap_iou: float = 0.5,
    bootstrap: int = 1000,
    seed: int = 0,
) -> LungEvaluation:
    """Score predicted lesions against the truth (see the module docstring).

    Parameters
    ----------
    scans
        One entry per scan, each scan once; scans without truth lesions count.
    hit
        ``"centroid"`` (LUNA16) or ``"iou"``.
    min_iou
        The IoU a hit needs under ``hit="iou"``.
    ap_iou
        The IoU a VOC match needs for the AP.
    bootstrap
        Resamples of scans for the 95% intervals; 0 skips them.
    seed
        Seed of the resampling.

    Returns
    -------
    LungEvaluation
        FROC, CPM, AP and Dice per row, with intervals.
    """
    if hit not in _HITS:
        raise ValueError(f'Argument "hit" should be one of {", ".join(_HITS)}, got {hit!r}.')
    min_iou, ap_iou = _check_iou("min_iou", min_iou), _check_iou("ap_iou", ap_iou)
    n_boot, seed = _check_int("bootstrap", bootstrap), _check_int("seed", seed)
    if isinstance(scans, ScanLesions | str) or not isinstance(scans, Sequence):
        raise TypeError('Argument "scans" should be a sequence of ScanLesions.')
    if not scans:
        raise ValueError('Argument "scans" should not be empty.')
    if not all(isinstance(s, ScanLesions) for s in scans):
        raise TypeError('Argument "scans" should hold ScanLesions objects.')
    if len({s.scan_id for s in scans}) != len(scans):
        raise ValueError('Argument "scans" should hold each scan_id once.')

    agnostic = [match_scan(s, hit=hit, min_iou=min_iou, class_aware=False) for s in scans]
    aware = [match_scan(s, hit=hit, min_iou=min_iou, class_aware=True) for s in scans]
    labels = [LABEL_OF[name] for name in CLASSES]
    specs: list[tuple[str, list[ScanMatch], int | None]] = [
        (AGNOSTIC, agnostic, None),
        (AWARE, aware, None),
        *((name, aware, LABEL_OF[name]) for name in CLASSES),
    ]
    froc = [_froc_entries(scans, m, label) for _, m, label in specs]
    voc = {label: _voc(scans, label, ap_iou) for label in (None, *labels)}

    n = len(scans)
    weights = np.ones((1, n))
    if n_boot:
        rng = np.random.default_rng([seed, 16])
        weights = np.vstack([weights, rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)])
    ap = {label: entries.ap(weights) for label, entries in voc.items()}
    class_ap = np.stack([ap[label] for label in labels], axis=1)
    with np.errstate(invalid="ignore"):
        n_ap = np.isfinite(class_ap).sum(axis=1)
        mean_ap = np.where(n_ap > 0, np.nansum(class_ap, axis=1) / np.maximum(n_ap, 1), np.nan)

    def value(column: np.ndarray) -> MetricValue:
        return MetricValue(float(column[0]), *_interval(column[1:]))

    rows = []
    for (name, _, label), (entries, counts) in zip(specs, froc, strict=True):
        figures = entries.figures(weights)
        row_ap = mean_ap if name == AWARE else ap[label]
        rows.append(
            RowFigures(
                name,
                *counts,
                sensitivity=tuple(
                    value(figures["sensitivity"][:, i]) for i in range(len(FP_RATES))
                ),
                cpm=value(figures["cpm"]),
                ap=value(row_ap),
                dice=value(figures["dice"]),
            )
        )
    result = LungEvaluation(
        n_scans=n,
        n_truth=sum(len(s.truth) for s in scans),
        n_predictions=sum(len(s.predictions) for s in scans),
        hit=hit,
        min_iou=min_iou,
        ap_iou=ap_iou,
        rows=tuple(rows),
        bootstrap=n_boot,
        seed=seed,
        matches=tuple(aware),
    )
    logger.info("lung evaluation: %d scans, CPM %s", n, result.row(AWARE).cpm.format())
    return result


def goal_check(
    evaluation: LungEvaluation, row: str = AWARE
) -> list[tuple[str, float, float, bool]]:
    """Issue 18's goal: CPM >= 0.93 and mask Dice >= 0.80 on one row.

    Returns
    -------
    list
        ``(goal, value, threshold, met)`` per figure of :data:`GOALS`; a NaN value is not met.
    """
    if not isinstance(evaluation, LungEvaluation):
        raise TypeError(
            f'Argument "evaluation" should be a LungEvaluation, got {type(evaluation).__name__}.'
        )
    figures = evaluation.row(row)
    out = []
    for key, threshold in GOALS.items():
        metric: MetricValue = getattr(figures, key)
        text = f"{row}: {key} {metric.format()} >= {threshold:.2f}"
        out.append((text, metric.value, threshold, bool(metric.value >= threshold)))
    return out
