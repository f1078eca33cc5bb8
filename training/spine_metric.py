"""The Spinal Disease 2020 evaluation rule: keypoints matched within 6 mm, AP per class, mAP.

Seed 002 (the Tianchi task) scores the points predicted on the middle T2 sagittal frame so:
a prediction less than 6 mm from an annotated point is a TP when its class is right and an FP
when it is wrong; a prediction within 6 mm of no annotated point is an FP; an annotated point
that no prediction hits correctly is an FN; when several predictions hit one annotated point
the nearest counts as TP and the others as neither TP nor FP. Precision and recall give an
AP per class, and the mean of the APs (mAP) ranks the entries. A class is (kind, label):
``vertebra:normal``, ``vertebra:degenerated``, ``disc:normal``, ``disc:bulge``,
``disc:protrusion``, ``disc:extrusion``, ``disc:schmorl_node``.

How this module reads the parts the text leaves open
----------------------------------------------------
* Distance is Euclidean in mm, ``hypot(d_row * spacing_row, d_col * spacing_col)`` with the
  study's (row, column) pixel spacing; "within" is strict (``d < 6 mm``, the text's 小于).
* Each prediction is assigned to its nearest annotated point of the study, whatever that
  point's kind, class or level; it "hits" that point when the distance is under the
  tolerance. A prediction within 6 mm of two annotated points belongs to the nearer one only.
* A hit with the wrong class is an FP (``fp_class``); a prediction that hits nothing is an FP
  (``fp_miss``). Among the hits of the right class on one annotated point, the nearest is the
  TP and the others are ``ignored`` (neither TP nor FP, left out of every figure); wrong-class
  hits on that point stay FPs. "The nearest" is therefore chosen among right-class hits.
  Ties: smaller distance, then higher score, then input order.
* Levels play no part in matching or in any class figure. A prediction's level gives its kind
  (a level-less prediction states its kind); its identity is used only by the localisation
  error below.
* AP per class: the class's predictions (ignored ones dropped) from all studies ranked by
  score; precision and recall are taken after each distinct score (tied scores enter
  together, so input order never matters); AP is the area under the all-point interpolated
  curve of PASCAL VOC 2010+, ``sum_k (r_k - r_{k-1}) * max_{j >= k} p_j``. Recall counts all
  the class's annotated points, hit or not. A class with annotated points and no prediction
  has AP 0; a class without annotated points has no AP and is left out of the mAP, which is
  the mean over the classes with at least one annotated point.
* Precision, recall and F1 per class count every prediction given (no score threshold):
  ``P = TP / (TP + FP)``, ``R = TP / annotated``, ``F1 = 2 TP / (2 TP + FP + FN)``; NaN when
  the denominator is 0.
* Localisation error, per level: the distance in mm from each annotated point to the
  prediction of the same level (the highest-scoring one when a level was predicted several
  times, then the nearest) when the study's predictions carry levels, else to the nearest
  prediction of any kind; an annotated point without such a prediction counts as not located
  (it is left out of median/mean/95th percentile and counts against the within-6 mm
  fraction). Percentiles are numpy's linear interpolation.
* Bootstrap: studies resampled with replacement (``numpy.random.default_rng([seed, 2020])``),
  percentile 95% intervals; a resample where a figure is undefined is left out of that
  figure's interval, and a resample's mAP averages the classes annotated in that resample.
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

from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS, Kind
from training.metrics import MetricValue

__all__ = [
    "SPINE_CLASSES",
    "ClassFigures",
    "LevelError",
    "Outcome",
    "PredictedPoint",
    "SpineEvaluation",
    "StudyMatch",
    "StudyPoints",
    "TruthPoint",
    "average_precision",
    "evaluate",
    "match_study",
]

logger = logging.getLogger(__name__)

#: The seven classes, ``"kind:label"``, in table order.
SPINE_CLASSES: tuple[str, ...] = tuple(
    f"{kind}:{label}" for kind in ("vertebra", "disc") for label in CLASSES[kind]
)
_CLASS_INDEX = {name: index for index, name in enumerate(SPINE_CLASSES)}
_CHUNK_CELLS = 4_000_000  # resamples x predictions per bootstrap block (32 MB of float64)


def _real(name: str, value: object, rule: str = "finite") -> float:
    """``value`` as a float, checked: ``rule`` is "finite", "positive" or "in [0, 1]"."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f'Argument "{name}" should be a number, got {type(value).__name__}.')
    number = float(value)
    if not math.isfinite(number) or {
        "positive": number <= 0,
        "in [0, 1]": not 0 <= number <= 1,
    }.get(rule, False):
        raise ValueError(f'Argument "{name}" should be {rule}, got {value!r}.')
    return number


def _set_reals(owner: object, *names: str) -> None:
    for name in names:
        object.__setattr__(owner, name, _real(name, getattr(owner, name)))


def _check_level(level: object, *, optional: bool = False) -> None:
    if optional and level is None:
        return
    if not isinstance(level, str) or level not in LEVEL_KIND:
        raise ValueError(f'Argument "level" should be one of {", ".join(LEVELS)}, got {level!r}.')


def _check_label(label: object, kind: str) -> None:
    if not isinstance(label, str) or label not in CLASSES[kind]:
        raise ValueError(
            f'Argument "label" should be a {kind} class ({", ".join(CLASSES[kind])}), '
            f"got {label!r}."
        )


@dataclass(frozen=True)
class TruthPoint:
    """One annotated point.

    Attributes
    ----------
    level
        One of :data:`~mibi_node.analyses.spine.levels.LEVELS`; it gives the point's kind.
    row, col
        The point in the middle frame's pixels.
    label
        A class of the level's kind (a disc annotated ``v2,v5`` takes the first code).
    """

    level: str
    row: float
    col: float
    label: str

    def __post_init__(self) -> None:
        _check_level(self.level)
        _set_reals(self, "row", "col")
        _check_label(self.label, self.kind)

    @property
    def kind(self) -> Kind:
        """``"disc"`` or ``"vertebra"``."""
        return LEVEL_KIND[self.level]

    @property
    def class_name(self) -> str:
        """``"kind:label"``, one of :data:`SPINE_CLASSES`."""
        return f"{self.kind}:{self.label}"


@dataclass(frozen=True)
class PredictedPoint:
    """One predicted point with its class and confidence.

    Attributes
    ----------
    level
        The level the model named, or ``None``; used only for the localisation error.
    row, col
        The point in the middle frame's pixels.
    label
        A class of the point's kind.
    score
        Confidence in [0, 1]: the ranking key of the AP.
    kind
        ``"disc"`` or ``"vertebra"``; taken from ``level`` when omitted, needed without one.
    """

    level: str | None
    row: float
    col: float
    label: str
    score: float
    kind: Kind | None = None

    def __post_init__(self) -> None:
        _check_level(self.level, optional=True)
        if self.kind is not None and self.kind not in CLASSES:
            raise ValueError(f'Argument "kind" should be "disc" or "vertebra", got {self.kind!r}.')
        if self.level is not None:
            if self.kind is not None and self.kind != LEVEL_KIND[self.level]:
                raise ValueError(
                    f'Argument "kind" ({self.kind!r}) contradicts level {self.level!r}.'
                )
            object.__setattr__(self, "kind", LEVEL_KIND[self.level])
        elif self.kind is None:
            raise ValueError('Argument "kind" is needed when "level" is None.')
        _set_reals(self, "row", "col")
        object.__setattr__(self, "score", _real("score", self.score, "in [0, 1]"))
        _check_label(self.label, str(self.kind))

    @property
    def class_name(self) -> str:
        """``"kind:label"``, one of :data:`SPINE_CLASSES`."""
        return f"{self.kind}:{self.label}"


@dataclass(frozen=True)
class StudyPoints:
    """The annotated and the predicted points of one study's middle T2 sagittal frame.

    Attributes
    ----------
    study_uid
        The Study Instance UID (resampling unit of the bootstrap).
    pixel_spacing
        (row, column) spacing of the middle frame in mm.
    truth
        The annotated points, at most one per level.
    predictions
        The predicted points; either all carry a level or none does.
    """

    study_uid: str
    pixel_spacing: tuple[float, float]
    truth: tuple[TruthPoint, ...] = ()
    predictions: tuple[PredictedPoint, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.study_uid, str) or not self.study_uid:
            raise ValueError(
                f'Argument "study_uid" should be a non-empty string, got {self.study_uid!r}.'
            )
        spacing = self.pixel_spacing
        if isinstance(spacing, str) or not isinstance(spacing, Sequence) or len(spacing) != 2:
            raise ValueError(
                f'Argument "pixel_spacing" should be (row, column) mm, got {spacing!r}.'
            )
        row, col = (_real("pixel_spacing", v, "positive") for v in spacing)
        object.__setattr__(self, "pixel_spacing", (row, col))
        for name, kind in (("truth", TruthPoint), ("predictions", PredictedPoint)):
            points = tuple(getattr(self, name))
            if not all(isinstance(p, kind) for p in points):
                raise TypeError(f'Argument "{name}" should hold {kind.__name__} objects.')
            object.__setattr__(self, name, points)
        levels = [t.level for t in self.truth]
        if len(set(levels)) != len(levels):
            raise ValueError(f'Argument "truth" has a level twice in study {self.study_uid}.')
        if len({p.level is None for p in self.predictions}) > 1:
            raise ValueError(
                f'Argument "predictions" should all carry a level or none (study {self.study_uid}).'
            )

    @property
    def carries_levels(self) -> bool:
        """Whether there are predictions and they name their levels."""
        return bool(self.predictions) and self.predictions[0].level is not None


class Outcome(StrEnum):
    """What one prediction counts as."""

    TP = "tp"
    FP_CLASS = "fp_class"  # hits an annotated point of another class
    FP_MISS = "fp_miss"  # within the tolerance of no annotated point
    IGNORED = "ignored"  # right class on a point a nearer right-class prediction hits


@dataclass(frozen=True)
class StudyMatch:
    """The matching of one study.

    Attributes
    ----------
    study_uid
        The study.
    outcomes
        Per prediction, in input order.
    assigned
        Per prediction: index of the annotated point it hits, -1 for none.
    distance_mm
        Per prediction: distance to its nearest annotated point (inf without any).
    hit_by
        Per annotated point: index of its TP prediction, -1 for an FN.
    localisation_mm
        Per annotated point: distance to the same-level prediction (or the nearest
        prediction, see the module docstring); inf when there is none.
    """

    study_uid: str
    outcomes: tuple[Outcome, ...]
    assigned: tuple[int, ...]
    distance_mm: tuple[float, ...]
    hit_by: tuple[int, ...]
    localisation_mm: tuple[float, ...]


def match_study(study: StudyPoints, *, tolerance_mm: float = 6.0) -> StudyMatch:
    """Match one study's predictions to its annotated points by the challenge rule.

    Parameters
    ----------
    study
        The points and the pixel spacing.
    tolerance_mm
        The hit radius (the challenge's 6 mm); a hit is strictly closer.

    Returns
    -------
    StudyMatch
        Outcome of every prediction and the TP of every annotated point.
    """
    if not isinstance(study, StudyPoints):
        raise TypeError(f'Argument "study" should be a StudyPoints, got {type(study).__name__}.')
    tolerance = _real("tolerance_mm", tolerance_mm, "positive")
    truth, predictions = study.truth, study.predictions
    n_truth, n_pred = len(truth), len(predictions)
    truth_rc = np.array([(t.row, t.col) for t in truth], dtype=np.float64).reshape(n_truth, 2)
    pred_rc = np.array([(p.row, p.col) for p in predictions], dtype=np.float64).reshape(n_pred, 2)
    offset = (pred_rc[:, None, :] - truth_rc[None, :, :]) * np.asarray(study.pixel_spacing)
    dist = np.hypot(offset[..., 0], offset[..., 1])  # (predictions, annotated points)
    if n_truth:
        nearest = dist.argmin(axis=1)
        nearest_mm = dist[np.arange(n_pred), nearest]
    else:
        nearest = np.full(n_pred, -1)
        nearest_mm = np.full(n_pred, np.inf)

    outcomes = [Outcome.FP_MISS] * n_pred
    assigned = [-1] * n_pred
    hit_by = [-1] * n_truth
    for p, prediction in enumerate(predictions):
        if not nearest_mm[p] < tolerance:
            continue
        t = int(nearest[p])
        assigned[p] = t
        if prediction.class_name != truth[t].class_name:
            outcomes[p] = Outcome.FP_CLASS
            continue
        outcomes[p] = Outcome.IGNORED
        q = hit_by[t]
        if q < 0 or (nearest_mm[p], -prediction.score) < (nearest_mm[q], -predictions[q].score):
            hit_by[t] = p
    for q in hit_by:
        if q >= 0:
            outcomes[q] = Outcome.TP

    localisation = np.full(n_truth, np.inf)
    if n_pred and study.carries_levels:
        for t, point in enumerate(truth):
            same = [p for p, pred in enumerate(predictions) if pred.level == point.level]
            if same:
                best = min(same, key=lambda p: (-predictions[p].score, dist[p, t]))
                localisation[t] = dist[best, t]
    elif n_pred:
        localisation = dist.min(axis=0)
    floats = (tuple(float(d) for d in nearest_mm), tuple(float(d) for d in localisation))
    return StudyMatch(
        study.study_uid, tuple(outcomes), tuple(assigned), floats[0], tuple(hit_by), floats[1]
    )


def _ap_rows(weights: np.ndarray, ranked: _Ranked, positives: np.ndarray) -> np.ndarray:
    """AP of one class for every row of study weights (resamples x studies)."""
    ap = np.where(positives > 0, 0.0, np.nan)
    if len(ranked.study) == 0:
        return ap
    w = weights[:, ranked.study]
    tp = np.cumsum(w * ranked.is_tp, axis=1)[:, ranked.ends]
    fp = np.cumsum(w * (1.0 - ranked.is_tp), axis=1)[:, ranked.ends]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        recall = tp / positives[:, None]
    envelope = np.maximum.accumulate(precision[:, ::-1], axis=1)[:, ::-1]
    steps = np.diff(recall, axis=1, prepend=0.0)
    area = np.sum(steps * envelope, axis=1)
    return np.where(positives > 0, area, np.nan)


@dataclass(frozen=True)
class _Ranked:
    """One class's scored predictions, best first, with the last index of each score."""

    study: np.ndarray
    is_tp: np.ndarray
    ends: np.ndarray

    @classmethod
    def build(cls, study: Sequence[int], score: Sequence[float], is_tp: Sequence[bool]) -> _Ranked:
        scores = np.asarray(score, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        scores = scores[order]
        ends = np.flatnonzero(np.append(scores[1:] != scores[:-1], True)) if len(order) else order
        return cls(
            study=np.asarray(study, dtype=np.int64)[order],
            is_tp=np.asarray(is_tp, dtype=np.float64)[order],
            ends=ends.astype(np.int64),
        )


def average_precision(scores: Sequence[float], is_tp: Sequence[bool], n_positives: int) -> float:
    """All-point interpolated AP (PASCAL VOC 2010+) of a scored list of TPs and FPs.

    Parameters
    ----------
    scores
        Confidence of each prediction; tied scores enter the ranking together.
    is_tp
        Whether each prediction is a TP (else an FP; ignored predictions must be left out).
    n_positives
        The number of annotated points of the class (the recall's denominator).

    Returns
    -------
    float
        The AP; NaN when ``n_positives`` is 0.
    """
    if len(scores) != len(is_tp):
        raise ValueError('Arguments "scores" and "is_tp" should have the same length.')
    if isinstance(n_positives, bool) or not isinstance(n_positives, Integral) or n_positives < 0:
        raise ValueError(f'Argument "n_positives" should be an integer >= 0, got {n_positives!r}.')
    if sum(bool(v) for v in is_tp) > n_positives:
        raise ValueError('Argument "n_positives" should be at least the number of TPs.')
    ranked = _Ranked.build([0] * len(scores), scores, is_tp)
    return float(_ap_rows(np.ones((1, 1)), ranked, np.array([float(n_positives)]))[0])


@dataclass(frozen=True)
class _Table:
    """Per-study counts: the input of every class figure and of the bootstrap."""

    positives: np.ndarray  # (studies, classes): annotated points
    counts: np.ndarray  # (studies, classes, outcomes): predictions, in Outcome order
    located: np.ndarray  # (studies,): annotated points located within the tolerance
    annotated: np.ndarray  # (studies,)
    ranked: tuple[_Ranked, ...]  # per class

    def figures(self, weights: np.ndarray) -> dict[str, np.ndarray]:
        """AP, F1 (rows x classes), mAP and within fraction (rows) for rows of study weights."""
        positives = weights @ self.positives
        tp = weights @ self.counts[:, :, 0]
        fp = weights @ (self.counts[:, :, 1] + self.counts[:, :, 2])
        ap = np.stack([_ap_rows(weights, r, positives[:, c]) for c, r in enumerate(self.ranked)], 1)
        n_ap = np.isfinite(ap).sum(axis=1)
        annotated = weights @ self.annotated
        with np.errstate(invalid="ignore", divide="ignore"):
            return {
                "ap": ap,
                "f1": np.where(tp + fp + positives > 0, 2 * tp / (tp + fp + positives), np.nan),
                "map": np.where(n_ap > 0, np.nansum(ap, axis=1) / n_ap, np.nan),
                "within": np.where(annotated > 0, (weights @ self.located) / annotated, np.nan),
            }


def _table(studies: Sequence[StudyPoints], matches: Sequence[StudyMatch], tol: float) -> _Table:
    n, k, outcomes = len(studies), len(SPINE_CLASSES), list(Outcome)
    positives, counts = np.zeros((n, k)), np.zeros((n, k, len(outcomes)))
    scored: list[tuple[list[int], list[float], list[bool]]] = [([], [], []) for _ in range(k)]
    for s, (study, match) in enumerate(zip(studies, matches, strict=True)):
        for point in study.truth:
            positives[s, _CLASS_INDEX[point.class_name]] += 1
        for prediction, outcome in zip(study.predictions, match.outcomes, strict=True):
            c = _CLASS_INDEX[prediction.class_name]
            counts[s, c, outcomes.index(outcome)] += 1
            if outcome is not Outcome.IGNORED:
                scored[c][0].append(s)
                scored[c][1].append(prediction.score)
                scored[c][2].append(outcome is Outcome.TP)
    return _Table(
        positives=positives,
        counts=counts,
        located=np.array([sum(d < tol for d in m.localisation_mm) for m in matches], float),
        annotated=np.array([len(study.truth) for study in studies], dtype=np.float64),
        ranked=tuple(_Ranked.build(*columns) for columns in scored),
    )


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


def _num(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else f"{value:.{digits}f}"


@dataclass(frozen=True)
class ClassFigures:
    """The figures of one class at the given predictions.

    Attributes
    ----------
    name
        ``"kind:label"``.
    annotated, tp, fp, fn
        Annotated points and counts; ``fp = fp_class + fp_miss``, ``fn = annotated - tp``.
    fp_class, fp_miss, ignored
        FPs on a point of another class, FPs near no point, right-class predictions on a
        point a nearer one already hits (counted nowhere else).
    precision, recall
        ``TP / (TP + FP)`` and ``TP / annotated`` (NaN when undefined).
    f1, ap
        ``2 TP / (2 TP + FP + FN)`` and the all-point interpolated AP (NaN without
        annotated points), with bootstrap intervals.
    """

    name: str
    annotated: int
    tp: int
    fp: int
    fn: int
    fp_class: int
    fp_miss: int
    ignored: int
    precision: float
    recall: float
    f1: MetricValue
    ap: MetricValue


@dataclass(frozen=True)
class LevelError:
    """Keypoint localisation error of one level (or ``"all"``), in mm.

    Attributes
    ----------
    level
        The level, or ``"all"``.
    annotated, located
        Annotated points, and those with a prediction to measure against.
    median_mm, mean_mm, p95_mm
        Over the located points (NaN without any).
    within
        Share of the annotated points whose prediction is within the tolerance.
    """

    level: str
    annotated: int
    located: int
    median_mm: float
    mean_mm: float
    p95_mm: float
    within: float

    @classmethod
    def of(cls, level: str, distances: Sequence[float], tolerance: float) -> LevelError:
        """The figures of a level's distances (inf: no prediction to measure against)."""
        d = np.asarray(distances, dtype=np.float64)
        f = d[np.isfinite(d)]
        return cls(
            level=level,
            annotated=len(d),
            located=len(f),
            median_mm=float(np.median(f)) if len(f) else math.nan,
            mean_mm=float(np.mean(f)) if len(f) else math.nan,
            p95_mm=float(np.percentile(f, 95)) if len(f) else math.nan,
            within=float(np.mean(d < tolerance)) if len(d) else math.nan,
        )


@dataclass(frozen=True)
class SpineEvaluation:
    """The challenge figures of a set of studies.

    Attributes
    ----------
    n_studies, n_annotated, n_predictions, tolerance_mm
        What was evaluated, and the hit radius.
    classes
        One per class of :data:`SPINE_CLASSES`, in that order.
    map, map_classes
        Mean AP with its bootstrap interval, and the classes it averages (those with at
        least one annotated point).
    levels, within
        Localisation error per level in :data:`LEVELS` order then ``"all"``; the share of
        annotated points located within the tolerance, with its bootstrap interval.
    localisation_by
        ``"level"``, ``"nearest"`` or ``"mixed"``: how predictions were paired with
        annotated points for the localisation error.
    bootstrap, seed
        Resamples (0: no intervals) and their seed.
    matches
        Per study, in input order (not in :meth:`to_dict`).
    """

    n_studies: int
    n_annotated: int
    n_predictions: int
    tolerance_mm: float
    classes: tuple[ClassFigures, ...]
    map: MetricValue
    map_classes: tuple[str, ...]
    levels: tuple[LevelError, ...]
    within: MetricValue
    localisation_by: str
    bootstrap: int
    seed: int
    matches: tuple[StudyMatch, ...] = field(default=(), repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN as ``None``, no per-study matches)."""
        out: dict[str, Any] = _jsonable(self)
        return out

    def format_table(self) -> str:
        """A plain-text report: AP, mAP, P/R/F1 per class, then the localisation errors."""
        tol = f"{self.tolerance_mm:g} mm"
        boot = f"{self.bootstrap} bootstrap resamples of studies (seed {self.seed})"
        lines = [
            f"Spinal Disease 2020 rule: {self.n_studies} studies, {self.n_annotated} annotated "
            f"points, {self.n_predictions} predictions, hit < {tol}; 95% intervals from "
            + (boot if self.bootstrap else "no bootstrap"),
            "",
            f"{'class':<20} {'annot':>5} {'TP':>5} {'FP':>5} {'(cls':>5} {'miss)':>5} "
            f"{'FN':>5} {'ign':>4}  {'AP':<21} {'prec':>5} {'recall':>6}  F1",
        ]
        lines += [
            f"{c.name:<20} {c.annotated:>5} {c.tp:>5} {c.fp:>5} {c.fp_class:>5} {c.fp_miss:>5} "
            f"{c.fn:>5} {c.ignored:>4}  {c.ap.format():<21} {_num(c.precision):>5} "
            f"{_num(c.recall):>6}  {c.f1.format()}"
            for c in self.classes
        ]
        lines += [
            "",
            f"mAP over the {len(self.map_classes)} classes with annotated points: "
            + self.map.format(),
            "",
            f"Localisation error in mm (to the {self.localisation_by} prediction)",
            f"{'level':<7} {'annot':>5} {'located':>7} {'median':>7} {'mean':>7} {'p95':>7}  "
            f"within {tol}",
        ]
        lines += [
            f"{e.level:<7} {e.annotated:>5} {e.located:>7} {_num(e.median_mm, 2):>7} "
            f"{_num(e.mean_mm, 2):>7} {_num(e.p95_mm, 2):>7}  {_num(e.within)}"
            for e in self.levels
        ]
        lines.append(f"within {tol}, all levels: {self.within.format()}")
        return "\n".join(lines)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f'Argument "{name}" should be an integer >= 0, got {value!r}.')
    return int(value)


def evaluate(
    studies: Sequence[StudyPoints],
    *,
    tolerance_mm: float = 6.0,
    bootstrap: int = 1000,
    seed: int = 0,
) -> SpineEvaluation:
    """Score predictions by the Spinal Disease 2020 rule (see the module docstring).

    Parameters
    ----------
    studies
        One entry per study, each study once.
    tolerance_mm
        The hit radius (the challenge's 6 mm).
    bootstrap
        Resamples of studies for the 95% intervals; 0 skips them.
    seed
        Seed of the resampling: the same seed gives the same intervals.

    Returns
    -------
    SpineEvaluation
        AP, mAP, P/R/F1 per class, localisation errors, intervals, per-study matches.
    """
    tolerance = _real("tolerance_mm", tolerance_mm, "positive")
    n_boot, seed = _check_int("bootstrap", bootstrap), _check_int("seed", seed)
    if isinstance(studies, StudyPoints | str) or not isinstance(studies, Sequence):
        raise TypeError('Argument "studies" should be a sequence of StudyPoints.')
    if not studies:
        raise ValueError('Argument "studies" should not be empty.')
    if not all(isinstance(s, StudyPoints) for s in studies):
        raise TypeError('Argument "studies" should hold StudyPoints objects.')
    if len({s.study_uid for s in studies}) != len(studies):
        raise ValueError('Argument "studies" should hold each study_uid once.')

    matches = tuple(match_study(s, tolerance_mm=tolerance) for s in studies)
    table = _table(studies, matches, tolerance)
    n = len(studies)
    point = table.figures(np.ones((1, n)))
    draws = {key: np.full((1, *value.shape[1:]), np.nan) for key, value in point.items()}
    if n_boot:
        rng = np.random.default_rng([seed, 2020])
        chunk = max(1, _CHUNK_CELLS // max(1, n, *(len(r.study) for r in table.ranked)))
        blocks = [
            table.figures(rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - i)))
            for i in range(0, n_boot, chunk)
        ]
        draws = {key: np.concatenate([b[key] for b in blocks]) for key in point}

    def value(key: str, c: int | None = None) -> MetricValue:
        column = (slice(None),) if c is None else (slice(None), c)
        return MetricValue(float(point[key][column][0]), *_interval(draws[key][column]))

    totals = table.counts.sum(axis=0).astype(int)  # (classes, outcomes)
    classes = []
    for c, name in enumerate(SPINE_CLASSES):
        tp, fp_class, fp_miss, ignored = (int(v) for v in totals[c])
        annotated, fp = int(table.positives[:, c].sum()), fp_class + fp_miss
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / annotated if annotated else math.nan
        counts = (annotated, tp, fp, annotated - tp, fp_class, fp_miss, ignored)
        figures = (value("f1", c), value("ap", c))
        classes.append(ClassFigures(name, *counts, precision, recall, *figures))
    per_level: dict[str, list[float]] = {level: [] for level in LEVELS}
    for study, match in zip(studies, matches, strict=True):
        for truth_point, distance in zip(study.truth, match.localisation_mm, strict=True):
            per_level[truth_point.level].append(distance)
    modes = {s.carries_levels for s in studies if s.predictions}
    result = SpineEvaluation(
        n_studies=n,
        n_annotated=int(table.annotated.sum()),
        n_predictions=sum(len(s.predictions) for s in studies),
        tolerance_mm=tolerance,
        classes=tuple(classes),
        map=value("map"),
        map_classes=tuple(c.name for c in classes if c.annotated),
        levels=tuple(LevelError.of(lv, per_level[lv], tolerance) for lv in LEVELS)
        + (LevelError.of("all", [d for v in per_level.values() for d in v], tolerance),),
        within=value("within"),
        localisation_by="mixed" if len(modes) > 1 else ("level" if True in modes else "nearest"),
        bootstrap=n_boot,
        seed=seed,
        matches=matches,
    )
    logger.info("spine evaluation: %d studies, mAP %s", n, result.map.format())
    return result
