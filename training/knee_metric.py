"""Knee cartilage segmentation scores: Dice, surface distances and volume error (issue 17).

Seed 003 scores a knee MR segmentation by the Dice ``2|P∩T| / (|P| + |T|)`` of each
cartilage plate; issue 17 adds ASSD, HD95 and volume error, for stage 1 alone and for both
stages, with bootstrap intervals over cases. Goal: mean Dice >= 0.91 femoral and >= 0.86
tibial (both tibial plates as one mask), and the two stages better than stage 1 alone.

How this module reads the parts the issue leaves open
-----------------------------------------------------
* Structures: the four plates of :data:`~mibi_node.analyses.knee.labels.STRUCTURES` and
  ``"tibial"``, the union of the two tibial plates (a voxel predicted medial that is truly
  lateral overlaps in ``"tibial"`` but in neither plate).
* Surface: the mask minus its binary erosion by the 6-connected (face) element, so a voxel
  is on the surface when one of its 6 face neighbours is outside the mask; outside the
  volume counts as outside. This is MONAI's ``get_mask_edges`` (scipy's default element).
* Surface distance: from each surface voxel centre of one mask to the nearest surface voxel
  centre of the other, in mm with the volume's anisotropic ``(slice, row, column)`` spacing
  (``scipy.ndimage.distance_transform_edt`` with ``sampling``, inside the union bounding
  box of the two masks, which holds every surface voxel, so the crop changes nothing).
  ASSD pools both directions: ``(sum d(P->T) + sum d(T->P)) / (|dP| + |dT|)``. HD95 is the
  larger of the two directed 95th percentiles (numpy's linear interpolation), as in MONAI
  and DeepMind's ``surface-distance``. Both agree with MONAI 1.6's
  ``compute_average_surface_distance``/``compute_hausdorff_distance`` (tested).
* Volume: voxel count times the voxel volume; the error is prediction minus truth, in mm3
  and in % of the truth volume.
* Empty masks. Both empty (the structure is absent and predicted absent; e.g. out of the
  field of view): every figure is NaN and the case is left out of that structure's means and
  intervals, counted as ``absent``; a Dice of 1 would lift the mean for saying nothing about
  the segmentation (nnU-Net's and MONAI's ``ignore_empty`` choice). Truth only (``missed``)
  or prediction only (``spurious``): Dice 0, counted in the Dice mean; ASSD and HD95 are
  infinite (no surface to measure to), left out of the distance means and counted apart in
  the summary (``n_missed``/``n_spurious``) and the table; a spurious structure has no
  relative volume error (NaN; its mm3 error is its volume).
* Bootstrap: cases resampled with replacement (``numpy.random.default_rng([seed, 17])``),
  one set of resamples for all arms, structures and figures, so arm differences are paired;
  percentile 95% intervals; a resample's mean takes the finite values it holds, and a
  resample without any is left out of that interval.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from numbers import Real
from typing import Any, Final

import numpy as np
from scipy import ndimage

from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES, TIBIAL
from training.metrics import MetricValue

__all__ = [
    "GOALS",
    "KNEE_STRUCTURES",
    "CaseScores",
    "KneeEvaluation",
    "KneeSummary",
    "PairedDifference",
    "StructureScores",
    "StructureSummary",
    "case_scores",
    "goal_check",
    "surface_distances",
]

logger = logging.getLogger(__name__)

#: The scored structures: the four plates, then both tibial plates as one mask.
KNEE_STRUCTURES: Final[tuple[str, ...]] = (*STRUCTURES, "tibial")
#: Issue 17's goal: mean Dice at least this much.
GOALS: Final[dict[str, float]] = {"femoral_cartilage": 0.91, "tibial": 0.86}

_LABELS: Final[dict[str, tuple[int, ...]]] = {
    **{name: (LABEL_OF[name],) for name in STRUCTURES},
    "tibial": tuple(LABEL_OF[name] for name in TIBIAL),
}
_N_LABELS = len(STRUCTURES) + 1
_FACES = ndimage.generate_binary_structure(3, 1)
#: The per-case figures averaged over cases: StructureScores and StructureSummary attributes.
_STATES = ("absent", "missed", "spurious")
_FIGURES = ("dice", "assd_mm", "hd95_mm", "abs_volume_error_pct", "volume_error_pct")


@dataclass(frozen=True)
class StructureScores:
    """The figures of one structure in one case (see the module docstring for empty masks).

    Attributes
    ----------
    structure
        One of :data:`KNEE_STRUCTURES`.
    dice
        ``2|P∩T| / (|P| + |T|)``; NaN when both masks are empty.
    assd_mm, hd95_mm
        Average symmetric surface distance and 95th percentile Hausdorff distance; inf when
        one mask is empty, NaN when both are.
    volume_prediction_mm3, volume_truth_mm3
        Mask volumes.
    volume_error_mm3, volume_error_pct
        Prediction minus truth, in mm3 and in % of the truth (NaN when the truth is empty).
    """

    structure: str
    dice: float
    assd_mm: float
    hd95_mm: float
    volume_prediction_mm3: float
    volume_truth_mm3: float
    volume_error_mm3: float
    volume_error_pct: float

    @property
    def state(self) -> str:
        """``"present"``, ``"absent"`` (both empty), ``"missed"`` or ``"spurious"``."""
        has_pred, has_truth = self.volume_prediction_mm3 > 0, self.volume_truth_mm3 > 0
        return ("absent", "spurious", "missed", "present")[2 * has_truth + has_pred]

    @property
    def abs_volume_error_pct(self) -> float:
        """``|volume_error_pct|``."""
        return abs(self.volume_error_pct)


@dataclass(frozen=True)
class CaseScores:
    """The figures of one case, one :class:`StructureScores` per structure.

    ``scores["tibial"]`` gives a structure's figures.
    """

    case_id: str
    spacing: tuple[float, float, float]
    structures: tuple[StructureScores, ...]

    def __getitem__(self, structure: str) -> StructureScores:
        for scores in self.structures:
            if scores.structure == structure:
                return scores
        raise KeyError(structure)


def _label_volume(name: str, value: object) -> np.ndarray:
    array = np.asarray(value)
    if array.ndim != 3:
        raise ValueError(
            f'Argument "{name}" should be a 3-D label volume, got shape {array.shape}.'
        )
    if array.dtype == bool:
        array = array.astype(np.uint8)
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f'Argument "{name}" should hold integer labels, got {array.dtype}.')
    if array.size and (array.min() < 0 or array.max() >= _N_LABELS):
        raise ValueError(
            f'Argument "{name}" should hold labels 0..{_N_LABELS - 1}, '
            f"got {array.min()}..{array.max()}."
        )
    return array


def _spacing(value: object) -> tuple[float, float, float]:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        raise TypeError(f'Argument "spacing" should be three numbers, got {value!r}.')
    if not all(isinstance(v, Real) and not isinstance(v, bool) for v in value):
        raise TypeError(f'Argument "spacing" should be three numbers, got {value!r}.')
    spacing = tuple(float(v) for v in value)
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f'Argument "spacing" should be 3 positive mm values, got {value!r}.')
    return spacing  # type: ignore[return-value]


def _union_box(boxes: Sequence[tuple[slice, ...] | None]) -> tuple[slice, ...]:
    present = [box for box in boxes if box is not None]
    return tuple(
        slice(min(box[axis].start for box in present), max(box[axis].stop for box in present))
        for axis in range(3)
    )


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=_FACES)


def surface_distances(
    prediction: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances in mm, prediction -> truth and truth -> prediction.

    Both masks must be non-empty boolean arrays of one shape (cropped or not).
    """
    surfaces = _surface(prediction), _surface(truth)
    to_truth = ndimage.distance_transform_edt(~surfaces[1], sampling=spacing)
    to_prediction = ndimage.distance_transform_edt(~surfaces[0], sampling=spacing)
    return to_truth[surfaces[0]], to_prediction[surfaces[1]]


def case_scores(
    prediction: np.ndarray,
    truth: np.ndarray,
    spacing: Sequence[float],
    *,
    case_id: str = "case",
) -> CaseScores:
    """Score one case's predicted label volume against its truth.

    Parameters
    ----------
    prediction, truth
        Label volumes of one shape, values 0 (background) to 4
        (:data:`~mibi_node.analyses.knee.labels.LABEL_OF`).
    spacing
        Voxel spacing in mm along the volume's three axes, ``(slice, row, column)``.
    case_id
        The case's name in an evaluation (its resampling unit).

    Returns
    -------
    CaseScores
        Dice, ASSD, HD95 and volumes per structure of :data:`KNEE_STRUCTURES`.
    """
    pred, true = _label_volume("prediction", prediction), _label_volume("truth", truth)
    if pred.shape != true.shape:
        raise ValueError(
            f'Arguments "prediction" {pred.shape} and "truth" {true.shape} differ in shape.'
        )
    sp = _spacing(spacing)
    voxel_mm3 = sp[0] * sp[1] * sp[2]
    pairs = true.ravel().astype(np.intp) * _N_LABELS + pred.ravel()
    counts = np.bincount(pairs, minlength=_N_LABELS**2).reshape(_N_LABELS, _N_LABELS)
    boxes = (ndimage.find_objects(pred, _N_LABELS - 1), ndimage.find_objects(true, _N_LABELS - 1))
    rows = []
    for structure in KNEE_STRUCTURES:
        labels = _LABELS[structure]
        index = np.asarray(labels)
        n_pred, n_true = int(counts[:, index].sum()), int(counts[index, :].sum())
        both = int(counts[np.ix_(index, index)].sum())
        dice = 2.0 * both / (n_pred + n_true) if n_pred + n_true else math.nan
        assd = hd95 = math.inf if n_pred + n_true else math.nan
        if n_pred and n_true:
            crop = _union_box([box[label - 1] for box in boxes for label in labels])
            d_pred, d_true = surface_distances(
                np.isin(pred[crop], labels), np.isin(true[crop], labels), sp
            )
            assd = float((d_pred.sum() + d_true.sum()) / (d_pred.size + d_true.size))
            hd95 = float(max(np.percentile(d_pred, 95), np.percentile(d_true, 95)))
        v_pred, v_true = n_pred * voxel_mm3, n_true * voxel_mm3
        error_pct = 100.0 * (v_pred - v_true) / v_true if n_true else math.nan
        rows.append(
            StructureScores(structure, dice, assd, hd95, v_pred, v_true, v_pred - v_true, error_pct)
        )
    return CaseScores(str(case_id), sp, tuple(rows))


@dataclass(frozen=True)
class StructureSummary:
    """One arm's figures of one structure over the cases.

    Attributes
    ----------
    arm, structure
        What is summarised.
    n_cases, n_absent, n_missed, n_spurious
        The arm's cases; those where the structure is in neither mask (left out of every
        figure), in the truth only, in the prediction only (Dice 0, no distances).
    dice, assd_mm, hd95_mm
        Means over the cases that define them, with bootstrap 95% intervals.
    abs_volume_error_pct, volume_error_pct
        Mean absolute and mean signed relative volume error (cases with a truth mask).
    """

    arm: str
    structure: str
    n_cases: int
    n_absent: int
    n_missed: int
    n_spurious: int
    dice: MetricValue
    assd_mm: MetricValue
    hd95_mm: MetricValue
    abs_volume_error_pct: MetricValue
    volume_error_pct: MetricValue


@dataclass(frozen=True)
class PairedDifference:
    """Dice of ``arm`` minus Dice of ``baseline``, case by case, for one structure.

    Attributes
    ----------
    arm, baseline, structure
        What is compared.
    n_pairs
        Cases where both arms have a Dice.
    dice_difference
        Mean paired difference with its bootstrap 95% interval.
    share_higher
        Share of the paired cases where ``arm``'s Dice is strictly higher, with its interval.
    """

    arm: str
    baseline: str
    structure: str
    n_pairs: int
    dice_difference: MetricValue
    share_higher: MetricValue


def _jsonable(value: Any) -> Any:
    if isinstance(value, MetricValue):
        return value.to_dict()
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if is_dataclass(value):
        return {f.name: _jsonable(getattr(value, f.name)) for f in fields(value)}
    return value


def _signed(value: MetricValue, digits: int = 3) -> str:
    if math.isnan(value.value):
        return "n/a"
    text = f"{value.value:+.{digits}f}"
    if math.isnan(value.low):
        return text
    return f"{text} ({value.low:+.{digits}f} to {value.high:+.{digits}f})"


@dataclass(frozen=True)
class KneeSummary:
    """Per arm and structure means with intervals, and paired arm differences.

    Attributes
    ----------
    arms, n_cases
        The arms in the order they were added, and the cases (union over the arms).
    structures
        One per arm and structure, arm by arm in :data:`KNEE_STRUCTURES` order.
    differences
        Every arm but the baseline against it, per structure.
    bootstrap, seed
        Resamples of cases (0: no intervals) and their seed.
    """

    arms: tuple[str, ...]
    n_cases: int
    structures: tuple[StructureSummary, ...]
    differences: tuple[PairedDifference, ...]
    bootstrap: int
    seed: int

    def figures(self, arm: str, structure: str) -> StructureSummary:
        """The summary of one arm and structure."""
        for row in self.structures:
            if row.arm == arm and row.structure == structure:
                return row
        raise KeyError((arm, structure))

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN and inf as ``None``), goals included."""
        out: dict[str, Any] = _jsonable(self)
        out["goals"] = [
            {"goal": g, "mean": _jsonable(m), "threshold": t, "met": ok}
            for g, m, t, ok in goal_check(self)
        ]
        return out

    def format_table(self) -> str:
        """A plain-text report: one table per arm, the paired differences, the goals."""
        boot = f"{self.bootstrap} bootstrap resamples of cases (seed {self.seed})"
        lines = [
            f"Knee cartilage: {self.n_cases} cases; means with 95% intervals from "
            + (boot if self.bootstrap else "no bootstrap"),
        ]
        head = (
            f"{'structure':<26} {'n':>4}  {'Dice':<21} {'ASSD mm':<18} {'HD95 mm':<18} "
            f"{'|vol err| %':<19} {'missed':>6} {'spur':>4}"
        )
        for arm in self.arms:
            lines += ["", arm, head]
            for s in (self.figures(arm, name) for name in KNEE_STRUCTURES):
                lines.append(
                    f"{s.structure:<26} {s.n_cases - s.n_absent:>4}  {s.dice.format():<21} "
                    f"{s.assd_mm.format(2):<18} {s.hd95_mm.format(2):<18} "
                    f"{s.abs_volume_error_pct.format(1):<19} {s.n_missed:>6} {s.n_spurious:>4}"
                )
        for arm in dict.fromkeys(d.arm for d in self.differences):
            rows = [d for d in self.differences if d.arm == arm]
            lines += [
                "",
                f"{arm} - {rows[0].baseline}, Dice, paired over cases",
                f"{'structure':<26} {'n':>4}  {'difference':<32} {'share higher'}",
            ]
            lines += [
                f"{d.structure:<26} {d.n_pairs:>4}  {_signed(d.dice_difference):<32} "
                f"{d.share_higher.format(2)}"
                for d in rows
            ]
        lines += ["", "Goals (mean Dice)"]
        lines += [f"{'met' if ok else 'NOT met':<8} {goal}" for goal, _, _, ok in goal_check(self)]
        return "\n".join(lines)


def _interval(draws: np.ndarray) -> tuple[float, float]:
    finite = draws[np.isfinite(draws)]
    if finite.size == 0:
        return math.nan, math.nan
    low, high = np.percentile(finite, [2.5, 97.5])
    return float(low), float(high)


def _weighted_means(weights: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per row of case weights (rows x cases), the mean of each figure's finite values."""
    finite = np.isfinite(values)  # (figures, cases)
    total = weights @ np.where(finite, values, 0.0).T
    count = weights @ finite.T.astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / count, np.nan)


class KneeEvaluation:
    """Per-case scores of one or more arms (e.g. "stage 1" and "both stages") and their summary.

    Arms are compared case by case through ``case_id``; the first arm added is the baseline
    of the paired differences unless :meth:`summary` names another.
    """

    def __init__(self) -> None:
        self._rows: dict[str, dict[str, CaseScores]] = {}

    @property
    def arms(self) -> tuple[str, ...]:
        """The arms, in the order they were added."""
        return tuple(self._rows)

    def rows(self, arm: str) -> tuple[CaseScores, ...]:
        """One arm's case scores, in the order they were added."""
        return tuple(self._rows[arm].values())

    def add(
        self,
        arm: str,
        prediction: np.ndarray,
        truth: np.ndarray,
        spacing: Sequence[float],
        *,
        case_id: str,
    ) -> CaseScores:
        """Score one case of one arm (:func:`case_scores`) and keep the scores."""
        scores = case_scores(prediction, truth, spacing, case_id=case_id)
        self.add_scores(arm, scores)
        return scores

    def add_scores(self, arm: str, scores: CaseScores) -> None:
        """Keep already computed scores of one case of one arm."""
        if not isinstance(arm, str) or not arm:
            raise ValueError(f'Argument "arm" should be a non-empty string, got {arm!r}.')
        if not isinstance(scores, CaseScores):
            raise TypeError(f'Argument "scores" should be CaseScores, got {type(scores).__name__}.')
        cases = self._rows.setdefault(arm, {})
        if scores.case_id in cases:
            raise ValueError(f'Argument "scores": case {scores.case_id!r} is already in {arm!r}.')
        cases[scores.case_id] = scores

    def summary(
        self, bootstrap: int = 1000, seed: int = 0, *, baseline: str | None = None
    ) -> KneeSummary:
        """Means per arm and structure with bootstrap intervals over cases, and the paired
        Dice differences of every arm against ``baseline`` (default: the first arm).
        """
        for name, value in (("bootstrap", bootstrap), ("seed", seed)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f'Argument "{name}" should be an integer >= 0, got {value!r}.')
        arms = self.arms
        if not arms:
            raise ValueError("The evaluation holds no cases.")
        base = arms[0] if baseline is None else baseline
        if base not in arms:
            raise ValueError(f'Argument "baseline" should be one of {arms}, got {base!r}.')
        cases = list(dict.fromkeys(c for rows in self._rows.values() for c in rows))
        n, n_s, n_f = len(cases), len(KNEE_STRUCTURES), len(_FIGURES)
        values = np.full((len(arms), n_s, n_f, n), np.nan)  # NaN where an arm lacks a case
        for a, rows in enumerate(self._rows.values()):
            for c, case in enumerate(cases):
                if case in rows:
                    values[a, :, :, c] = [
                        [getattr(rows[case][name], f) for f in _FIGURES] for name in KNEE_STRUCTURES
                    ]
        others = [a for a, arm in enumerate(arms) if arm != base]
        diff = values[others, :, 0] - values[arms.index(base), :, 0]  # (others, structures, cases)
        higher = np.where(np.isnan(diff), np.nan, diff > 0)
        table = np.concatenate([values.reshape(-1, n), diff.reshape(-1, n), higher.reshape(-1, n)])
        point = _weighted_means(np.ones((1, n)), table)[0]
        draws = np.full((1, len(table)), np.nan)
        if bootstrap:
            rng = np.random.default_rng([seed, 17])
            weights = rng.multinomial(n, np.full(n, 1.0 / n), size=bootstrap).astype(np.float64)
            draws = _weighted_means(weights, table)
        figure = np.empty(len(table), dtype=object)
        figure[:] = [
            MetricValue(float(v), *_interval(d)) for v, d in zip(point, draws.T, strict=True)
        ]
        per_arm = figure[: values.size // n].reshape(values.shape[:3])
        paired = figure[values.size // n :].reshape(2, *diff.shape[:2])  # difference, higher
        structures = []
        for a, (arm, rows) in enumerate(self._rows.items()):
            for s, name in enumerate(KNEE_STRUCTURES):
                states = [row[name].state for row in rows.values()]
                absent, missed, spurious = (states.count(k) for k in _STATES)
                figures = per_arm[a, s]
                structures.append(
                    StructureSummary(arm, name, len(rows), absent, missed, spurious, *figures)
                )
        differences = tuple(
            PairedDifference(
                arms[a], base, name, int(np.isfinite(diff[o, s]).sum()), *paired[:, o, s]
            )
            for o, a in enumerate(others)
            for s, name in enumerate(KNEE_STRUCTURES)
        )
        logger.info("knee evaluation: %d cases, arms %s", n, ", ".join(arms))
        return KneeSummary(arms, n, tuple(structures), differences, bootstrap, seed)

    def format_table(self, bootstrap: int = 1000, seed: int = 0) -> str:
        """:meth:`KneeSummary.format_table` of :meth:`summary`."""
        return self.summary(bootstrap, seed).format_table()

    def to_dict(self, bootstrap: int = 1000, seed: int = 0) -> dict[str, Any]:
        """The summary and every case's scores, JSON-ready."""
        return {
            "summary": self.summary(bootstrap, seed).to_dict(),
            "cases": {arm: _jsonable(list(rows.values())) for arm, rows in self._rows.items()},
        }


def goal_check(
    summary: KneeSummary, arm: str | None = None
) -> list[tuple[str, float, float, bool]]:
    """Issue 17's goal: mean Dice femoral >= 0.91 and tibial >= 0.86.

    Parameters
    ----------
    summary
        A :meth:`KneeEvaluation.summary`.
    arm
        The arm to check; every arm when ``None``.

    Returns
    -------
    list
        ``(goal, mean Dice, threshold, met)`` per arm and goal; ``goal`` reads e.g.
        ``"both stages: femoral_cartilage Dice 0.921 (0.905-0.934) >= 0.91"``. A NaN mean
        (no case with the structure) is not met.
    """
    if not isinstance(summary, KneeSummary):
        raise TypeError(f'Argument "summary" should be a KneeSummary, got {type(summary)}.')
    arms = summary.arms if arm is None else (arm,)
    out = []
    for name in arms:
        for structure, threshold in GOALS.items():
            dice = summary.figures(name, structure).dice
            text = f"{name}: {structure} Dice {dice.format()} >= {threshold:.2f}"
            out.append((text, dice.value, threshold, bool(dice.value >= threshold)))
    return out
