"""Scoring a lung bundle over a data folder, and fitting its linking on validation cases.

Each case is read as it comes (:func:`~training.lung_data.iter_lung_cases`), run through
:class:`~mibi_node.analyses.lung.runner.LungRunner` as the node runs it, and its lesions
(the result's lesion map, one lesion per number with its probability) are scored against
the truth lesions by :func:`training.lung_metric.evaluate`: per-lesion FROC and CPM, AP at
IoU 0.5, mask Dice, with bootstrap intervals over scans. The report adds the seconds per
scan and the process' peak memory; :func:`figures` is what a bundle records of it.

:func:`fit_linking` runs the detector once per validation case and tries the linking
parameters of a small grid on the same detections, keeping those with the best CPM
(class-aware), then the best Dice.
"""

from __future__ import annotations

import itertools
import logging
import math
import resource
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mibi_node.analyses.lung.bundle import LinkingSection
from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.result import LungResult
from mibi_node.errors import ConfigError
from training.lung_data import LungTrainingCase, iter_lung_cases, truth_lesions
from training.lung_metric import (
    AWARE,
    LungEvaluation,
    Outcome,
    ScanLesions,
    evaluate,
    goal_check,
    match_scan,
)

__all__ = [
    "evaluate_lung",
    "figures",
    "fit_linking",
    "Outcomes",
    "predicted_lesions",
    "score_cases",
]

logger = logging.getLogger(__name__)

#: The linking grid :func:`fit_linking` searches.
LINKING_GRID: dict[str, tuple[float | int, ...]] = {
    "min_iou": (0.1, 0.2, 0.3),
    "max_gap": (0, 1),
    "min_slices": (1, 2),
    "top_k": (1, 2, 3),
    "lesion_nms_iou": (0.1, 0.3),
}


def predicted_lesions(result: LungResult) -> tuple[Lesion3D, ...]:
    """The lesions of a result's lesion map (what the node reports), with their scores."""
    out = []
    for finding in result.lesions:
        mask = result.lesions_map == finding.number
        out.append(Lesion3D.from_mask(finding.label, finding.probability, mask))
    return tuple(out)


def score_cases(
    runner: Any, cases: Iterable[LungTrainingCase], *, bootstrap: int, seed: int
) -> tuple[LungEvaluation, dict[str, Any], Outcomes]:
    """Run every case (read as they come) and score every candidate lesion; the evaluation,
    a report (with the figures at the bundle's reporting threshold) and the candidates'
    outcomes (to choose another threshold on)."""
    scans, seconds, timings = [], [], []
    for case in cases:
        (result,) = runner.predict([case.input], every_lesion=True)
        scans.append(ScanLesions(case.case_id, truth_lesions(case), predicted_lesions(result)))
        seconds.append(result.timings["total"])
        timings.append(result.timings)
    if not scans:
        raise ConfigError("lung evaluation: no case to score")
    evaluation = evaluate(scans, bootstrap=bootstrap, seed=seed)
    threshold = runner.bundle.manifest.report.min_probability
    outcomes = Outcomes.of(scans)
    sensitivity, fp = outcomes.at(threshold)
    report = {
        "operating_point": {
            "min_probability": threshold,
            "sensitivity": round(sensitivity, 4),
            "fp_per_scan": round(fp, 4),
        },
        "bundle": f"{runner.bundle_name} {runner.bundle_version}",
        "cases": len(scans),
        "seconds_per_scan": float(np.mean(seconds)),
        "timings": {k: round(float(np.mean([t[k] for t in timings])), 4) for k in timings[0]},
    }
    return evaluation, report, outcomes


@dataclass(frozen=True)
class Outcomes:
    """Every candidate's class-aware match, kept to read any reporting threshold off.

    Dropping the candidates below a threshold changes no outcome above it (a truth lesion's
    true positive is its highest-scoring hit, and hits stay hits), so one match serves all.

    Attributes
    ----------
    false
        Scores of the false positives.
    true
        Scores of the true positives, one per truth lesion found.
    truths, scans
        Truth lesions and scans.
    """

    false: np.ndarray
    true: np.ndarray
    truths: int
    scans: int

    @classmethod
    def of(cls, scans: Sequence[ScanLesions]) -> Outcomes:
        """Match every scan's candidates with its truth, once."""
        false, true, truths = [], [], 0
        for scan in scans:
            match = match_scan(scan, class_aware=True)
            truths += len(match.detected_by)
            true += [scan.predictions[i].score for i in match.detected_by if i is not None]
            false += [p.score for p, o in zip(scan.predictions, match.outcomes, strict=True)
                      if o == Outcome.FP]  # fmt: skip
        return cls(np.array(false), np.array(true), truths, len(scans))

    def at(self, threshold: float) -> tuple[float, float]:
        """Class-aware sensitivity and false positives per scan of the lesions scoring at
        least ``threshold`` (what the node reports at that operating point)."""
        sensitivity = (
            float((self.true >= threshold).sum() / self.truths) if self.truths else math.nan
        )
        return sensitivity, float((self.false >= threshold).sum() / max(self.scans, 1))

    def threshold_for(self, fp_per_scan: float) -> float:
        """The lowest score at which false positives per scan stay within ``fp_per_scan``:
        the reporting threshold training writes into the bundle (1.0 when no candidate
        scored; just above the highest false positive's score when even the best ones
        exceed it)."""
        allowed = int(math.floor(fp_per_scan * max(self.scans, 1)))
        scores = np.sort(np.concatenate([self.false, self.true]))[::-1]
        if scores.size == 0:
            return 1.0
        falses = np.sort(self.false)[::-1]
        if falses.size <= allowed:
            return float(scores[-1])
        # the (allowed + 1)-th highest false positive must fall below the threshold
        limit = float(falses[allowed])
        above = scores[scores > limit]
        return float(above[-1]) if above.size else float(np.nextafter(limit, 2.0))


def fit_linking(
    runner: Any, cases: Sequence[LungTrainingCase], base: LinkingSection
) -> tuple[LinkingSection, dict[str, float]]:
    """The linking parameters of :data:`LINKING_GRID` (the rest from ``base``) that give the
    validation cases the best class-aware CPM, then Dice; with their figures."""
    found = [(case.case_id, runner.detect(case.input), truth_lesions(case)) for case in cases]
    best: tuple[tuple[float, float], LinkingSection, dict[str, float]] | None = None
    names = list(LINKING_GRID)
    for values in itertools.product(*LINKING_GRID.values()):
        linking = base.model_copy(update=dict(zip(names, values, strict=True)))
        scans = [
            ScanLesions(case_id, truth, tuple(runner.link(detections, linking)))
            for case_id, detections, truth in found
        ]
        row = evaluate(scans, bootstrap=0).row(AWARE)
        cpm = row.cpm.value if math.isfinite(row.cpm.value) else 0.0
        dice = row.dice.value if math.isfinite(row.dice.value) else 0.0
        if best is None or (cpm, dice) > best[0]:
            best = ((cpm, dice), linking, {"cpm": cpm, "dice": dice, "fp": float(row.n_fp)})
    assert best is not None  # noqa: S101 - the grid is not empty
    return best[1], best[2]


def _clean(value: float) -> float | None:
    return round(float(value), 4) if math.isfinite(value) else None


def figures(evaluation: LungEvaluation, report: dict[str, Any]) -> dict[str, Any]:
    """The figures a bundle records: per row CPM, AP, Dice (with intervals) and the FROC."""
    out: dict[str, Any] = {"cases": report["cases"], "lesions": evaluation.n_truth}
    for row in evaluation.rows:
        out[row.name] = {
            "cpm": _clean(row.cpm.value),
            "cpm_low": _clean(row.cpm.low),
            "cpm_high": _clean(row.cpm.high),
            "froc": [_clean(s.value) for s in row.sensitivity],
            "ap": _clean(row.ap.value),
            "dice": _clean(row.dice.value),
            "dice_low": _clean(row.dice.low),
            "dice_high": _clean(row.dice.high),
            "detected": row.n_detected,
            "false_positives": row.n_fp,
        }
    out["goals"] = {text: met for text, _, _, met in goal_check(evaluation)}
    out["seconds_per_scan"] = round(report["seconds_per_scan"], 3)
    if "operating_point" in report:
        out["operating_point"] = report["operating_point"]
    return out


def evaluate_lung(
    bundle: Path | str,
    data: Path | str,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    split: str | None = None,
) -> tuple[LungEvaluation, dict[str, Any]]:
    """Run a bundle on a lung data folder and score it.

    Parameters
    ----------
    bundle, data
        The bundle and the cases.
    bootstrap, seed
        Resamples of scans for the intervals.
    split
        Score only the bundle's ``train``, ``validation`` or ``test`` cases (for the folder
        it was trained on); default every case.

    Returns
    -------
    tuple
        The :class:`~training.lung_metric.LungEvaluation` and a JSON-ready dict (its
        ``to_dict()``, the bundle, seconds per scan, peak memory).
    """
    from mibi_node.analyses.lung.bundle import load_lung_bundle
    from mibi_node.analyses.lung.runner import LungRunner

    started = time.perf_counter()
    loaded = load_lung_bundle(bundle)
    names = None
    if split is not None:
        if split not in loaded.manifest.split:
            raise ConfigError(f"lung bundle {bundle}: it records no {split!r} split")
        names = loaded.manifest.split[split]
    runner = LungRunner(loaded)
    evaluation, report, _ = score_cases(
        runner, iter_lung_cases(data, names=names), bootstrap=bootstrap, seed=seed
    )
    report |= {
        **evaluation.to_dict(),
        "data": str(data),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return evaluation, report
