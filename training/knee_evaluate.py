"""Scoring a knee bundle: both arms ("stage 1" alone, "both stages") over a data folder.

Each case is read as it comes (:func:`~training.knee_data.iter_knee_cases`), run once
through :meth:`~mibi_node.analyses.knee.runner.KneeRunner.predict_arms` and scored by
:mod:`training.knee_metric` (Dice, ASSD, HD95, volume error; bootstrap intervals over cases;
the paired difference; issue 17's goals). The report adds the seconds per knee of each arm,
how often stage 1's crop held the whole truth, every case's Dice and the process' peak
memory; :func:`figures` is what a bundle records of it.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from mibi_node.analyses.knee.preprocess import Box
from mibi_node.errors import ConfigError
from training.knee_data import KneeTrainingCase, iter_knee_cases

__all__ = ["ARMS", "evaluate_knee", "figures", "headline", "score_cases"]

logger = logging.getLogger(__name__)

ARMS = ("stage 1", "both stages")


def score_cases(
    bundle: Path, cases: Iterable[KneeTrainingCase], *, bootstrap: int, seed: int
) -> tuple[Any, dict[str, Any]]:
    """Both arms on every case (read as they come); the summary and the timings."""
    from mibi_node.analyses.knee.runner import KneeRunner
    from training.knee_metric import KneeEvaluation

    runner = KneeRunner(bundle)
    evaluation = KneeEvaluation()
    seconds, stage1_seconds, read_seconds, boxes_hold = [], [], [], 0
    started = time.perf_counter()
    for case in cases:
        read_seconds.append(time.perf_counter() - started)
        first, both = runner.predict_arms([case.input])[0]
        spacing = case.input.volume.spacing
        evaluation.add(ARMS[0], first.labels, case.labels, spacing, case_id=case.case_id)
        evaluation.add(ARMS[1], both.labels, case.labels, spacing, case_id=case.case_id)
        seconds.append(both.timings["total"])
        stage1_seconds.append(first.timings["total"])
        boxes_hold += int(_box_holds(both.coarse_box, case.labels))
        started = time.perf_counter()
    summary = evaluation.summary(bootstrap, seed)
    per_case = {
        arm: {
            row.case_id: {s.structure: _rounded(s.dice) for s in row.structures}
            for row in evaluation.rows(arm)
        }
        for arm in evaluation.arms
    }
    report = {
        "bundle": f"{runner.bundle_name} {runner.bundle_version}",
        "cases": len(seconds),
        "seconds_per_knee": float(np.mean(seconds)),
        "stage1_seconds_per_knee": float(np.mean(stage1_seconds)),
        "read_seconds_per_knee": float(np.mean(read_seconds)),
        "boxes_holding_the_truth": boxes_hold,
        "dice_per_case": per_case,
    }
    return summary, report


def _rounded(value: float) -> float | None:
    return round(float(value), 4) if math.isfinite(value) else None


def _box_holds(box: Box | None, labels: np.ndarray) -> bool:
    if box is None:
        return not labels.any()
    (k0, k1), (j0, j1), (i0, i1) = box
    inside = np.count_nonzero(labels[k0:k1, j0:j1, i0:i1])
    return inside == np.count_nonzero(labels)


def headline(summary: Any) -> dict[str, float]:
    out = {}
    for arm in summary.arms:
        for structure in ("femoral_cartilage", "tibial"):
            out[f"{arm} {structure} Dice"] = summary.figures(arm, structure).dice.value
    return out


def figures(summary: Any, report: dict[str, Any]) -> dict[str, Any]:
    """The figures a bundle records: mean Dice (with intervals) per arm and structure."""

    def clean(value: float) -> float | None:
        return round(float(value), 4) if math.isfinite(value) else None

    figures: dict[str, Any] = {"cases": report["cases"]}
    for arm in summary.arms:
        figures[arm] = {
            row.structure: {
                "dice": clean(row.dice.value),
                "dice_low": clean(row.dice.low),
                "dice_high": clean(row.dice.high),
                "assd_mm": clean(row.assd_mm.value),
                "hd95_mm": clean(row.hd95_mm.value),
            }
            for row in summary.structures
            if row.arm == arm
        }
    figures["goals"] = {text: met for text, _, _, met in _goals(summary)}
    figures["seconds_per_knee"] = round(report["seconds_per_knee"], 3)
    return figures


def _goals(summary: Any) -> list[tuple[str, float, float, bool]]:
    from training.knee_metric import goal_check

    return goal_check(summary)


def evaluate_knee(
    bundle: Path | str,
    data: Path | str,
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    split: str | None = None,
) -> tuple[Any, dict[str, Any]]:
    """Run a bundle on a knee data folder and score both arms.

    Parameters
    ----------
    bundle, data
        The bundle and the cases.
    bootstrap, seed
        Resamples of cases for the intervals.
    split
        Score only the bundle's ``train``, ``validation`` or ``test`` cases (for the folder
        it was trained on); default every case.

    Returns
    -------
    tuple
        The :class:`training.knee_metric.KneeSummary` and a JSON-ready dict (its
        ``to_dict()``, the bundle, seconds per knee, peak memory).
    """
    from mibi_node.analyses.knee.bundle import load_knee_bundle

    started = time.perf_counter()
    names = None
    if split is not None:
        manifest = load_knee_bundle(bundle, verify=False).manifest
        if split not in manifest.split:
            raise ConfigError(f"knee bundle {bundle}: it records no {split!r} split")
        names = manifest.split[split]
    cases = iter_knee_cases(data, names=names)
    summary, report = score_cases(Path(bundle), cases, bootstrap=bootstrap, seed=seed)
    report |= {
        **summary.to_dict(),
        "data": str(data),
        "seconds": round(time.perf_counter() - started, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    return summary, report
