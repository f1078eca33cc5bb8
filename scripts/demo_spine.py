"""The spine part of `make demo`: its bundle build, its MR studies and its results table.

Kept apart from ``demo.py`` so that each analysis' demo reads on its own; ``demo.py`` calls
these functions in its steps.
"""

from __future__ import annotations

import math
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
BUNDLE = VAR / "bundles" / "spine-demo"
RECIPE = ROOT / "config" / "spine-demo.toml"
TRAIN_DATA = VAR / "demo-spine-train"
STUDIES = VAR / "demo-spine-studies"
TRAIN_STUDIES = 240
COUNT = 4
TOLERANCE_MM = 6.0


@dataclass
class SpineTruth:
    """What the phantom drew in one demo study, and what its SR said."""

    points: dict[str, tuple[float, float, str]]  # level -> (row, col, class)
    pixel_spacing: tuple[float, float]
    reported: dict[str, tuple[float, float, str, float]] = field(default_factory=dict)


def build(build_class: Callable[..., Any]) -> Any:
    """The spine bundle's background build: T2-sagittal phantoms, then training."""
    python = str(Path(sys.executable).parent / "python")
    return build_class(
        "spine",
        BUNDLE,
        TRAIN_DATA,
        [
            ("generating the spine training phantoms",
             [python, "-m", "training.spine", "synth", str(TRAIN_DATA), "--count",
              str(TRAIN_STUDIES), "--seed", "0"]),
            ("training the spine bundle",
             [python, "-m", "training.spine", "train", str(RECIPE), str(TRAIN_DATA), "--out",
              str(BUNDLE)]),
        ],
    )  # fmt: skip


def make_studies(seed: int = 13) -> list[tuple[str, Path, SpineTruth]]:
    """``COUNT`` full lumbar MR phantom studies (T1 and T2 sagittal, T2 axial)."""
    from mibi_node.analyses.spine.phantom import make_spine_study

    shutil.rmtree(STUDIES, ignore_errors=True)
    made = []
    for index in range(COUNT):
        folder = STUDIES / f"study-{index + 1:02d}"
        study = make_spine_study(folder, seed, index=index)
        truth = SpineTruth(
            {level: (row, col, label) for level, row, col, label in study.truth},
            study.pixel_spacing,
        )
        made.append((study.study_instance_uid, folder, truth))
    return made


def files(folder: Path) -> list[Path]:
    """The study's files, every series."""
    return sorted(folder.rglob("*.dcm"))


def read_sr(dataset: Any, truth: SpineTruth) -> None:
    """Keep what the SR reports, per level."""
    from mibi_node.analyses.spine.report import read_spine_report

    report = read_spine_report(dataset)
    truth.reported = {
        p.level: (p.row, p.col, p.label, p.probabilities[p.label]) for p in report.points
    }


def _distance_mm(truth: SpineTruth, level: str) -> float:
    row, col, _ = truth.points[level]
    if level not in truth.reported:
        return math.inf
    got_row, got_col, _, _ = truth.reported[level]
    return math.hypot(
        (got_row - row) * truth.pixel_spacing[0], (got_col - col) * truth.pixel_spacing[1]
    )


def show(console: Console, rows: list[tuple[int, SpineTruth, float]]) -> None:
    """The spine table: per study, points within 6 mm, classes right, abnormal levels."""
    table = Table(title=f"spine analysis: {len(rows)} lumbar MR phantom studies (11 levels each)")
    table.add_column("study", justify="right")
    table.add_column("within 6 mm", justify="right")
    table.add_column("class right", justify="right")
    table.add_column("truth: abnormal levels")
    table.add_column("SR: abnormal levels")
    table.add_column("last image -> SR", justify="right")
    near = right = total = 0
    for number, truth, seconds in rows:
        levels = list(truth.points)
        hits = [level for level in levels if _distance_mm(truth, level) < TOLERANCE_MM]
        correct = [
            level for level in levels
            if level in truth.reported and truth.reported[level][2] == truth.points[level][2]
        ]  # fmt: skip
        near, right, total = near + len(hits), right + len(correct), total + len(levels)
        abnormal_truth = [f"{lv} {c}" for lv, (_, _, c) in truth.points.items() if c != "normal"]
        abnormal_sr = [
            f"{lv} {c} {p:.2f}" for lv, (_, _, c, p) in truth.reported.items() if c != "normal"
        ]
        table.add_row(
            f"#{number}",
            f"{len(hits)}/{len(levels)}",
            f"{len(correct)}/{len(levels)}",
            ", ".join(abnormal_truth) or "none",
            ", ".join(abnormal_sr) or "none",
            f"{seconds:.1f} s",
        )
    console.print(table)
    console.print(
        f"spine: {near}/{total} points within {TOLERANCE_MM:g} mm of the phantom's, "
        f"{right}/{total} levels with the right class. Each SR comes with a key image "
        "(the middle T2 sagittal slice with the points drawn)."
    )
