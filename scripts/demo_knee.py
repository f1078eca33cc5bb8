"""The knee part of `make demo`: its bundle build, its MR studies and its Dice table.

Kept apart from ``demo.py`` like the spine part; ``demo.py`` calls these functions in its
steps. A knee study is complete when both its SR and its SEG have reached the PACS; the
table compares the SEG's voxels with the phantom's truth labels.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
VAR = ROOT / "var"
BUNDLE = VAR / "bundles" / "knee-demo"
RECIPE = ROOT / "config" / "knee-demo.toml"
TRAIN_DATA = VAR / "demo-knee-train"
STUDIES = VAR / "demo-knee-studies"
TRAIN_CASES = 60
COUNT = 2
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


@dataclass
class KneeTruth:
    """What the phantom drew in one demo knee, and what came back."""

    labels: np.ndarray  # the truth, on the sagittal series' grid (read_volume's order)
    spacing: tuple[float, float, float]
    slice_uids: list[str]  # the sagittal series' SOP Instance UIDs in that order
    side: str
    volumes_mm3: dict[str, float] = field(default_factory=dict)  # from the SR
    dice: dict[str, float] = field(default_factory=dict)  # from the SEG against the truth
    seg_read: bool = False
    sr_read: bool = False

    @property
    def complete(self) -> bool:
        return self.seg_read and self.sr_read


def build(build_class: Callable[..., Any]) -> Any:
    """The knee bundle's background build: knee phantoms with labels, then both stages."""
    python = str(Path(sys.executable).parent / "python")
    return build_class(
        "knee",
        BUNDLE,
        TRAIN_DATA,
        [
            ("generating the knee training phantoms",
             [python, "-m", "training.knee", "synth", str(TRAIN_DATA), "--count",
              str(TRAIN_CASES), "--seed", "0"]),
            ("training the knee bundle",
             [python, "-m", "training.knee", "train", str(RECIPE), str(TRAIN_DATA), "--out",
              str(BUNDLE)]),
        ],
    )  # fmt: skip


def make_studies(seed: int = 17) -> list[tuple[str, Path, KneeTruth]]:
    """``COUNT`` knee MR phantom studies (3-D sagittal DESS and a coronal PD series)."""
    from mibi_node.analyses.knee.phantom import make_knee_case, write_knee_study
    from mibi_node.imaging.volume_reader import read_volume

    shutil.rmtree(STUDIES, ignore_errors=True)
    made = []
    for index in range(COUNT):
        folder = STUDIES / f"knee-{index + 1:02d}"
        case = make_knee_case(seed * 1000 + index)
        paths = write_knee_study(case, folder, index=index)
        sagittal = read_volume([p for p in paths if "-sag-" in p.name])
        truth = KneeTruth(
            labels=case.labels,
            spacing=case.spacing,
            slice_uids=[s.sop_instance_uid for s in sagittal.slices],
            side=case.side,
        )
        made.append((sagittal.study_instance_uid, folder, truth))
    return made


def files(folder: Path) -> list[Path]:
    """The study's files, every series."""
    return sorted(folder.rglob("*.dcm"))


def read_document(dataset: Any, truth: KneeTruth) -> None:
    """Keep what an SR (volumes) or a SEG (Dice against the truth) of the study says."""
    from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
    from mibi_node.analyses.knee.seg import read_knee_seg

    if str(dataset.SOPClassUID) == SEGMENTATION_STORAGE:
        labels = read_knee_seg(dataset, truth.slice_uids)
        for name in STRUCTURES:
            got, want = labels == LABEL_OF[name], truth.labels == LABEL_OF[name]
            total = int(got.sum() + want.sum())
            truth.dice[name] = 2.0 * int((got & want).sum()) / total if total else 1.0
        truth.seg_read = True
    else:
        truth.volumes_mm3 = _sr_volumes(dataset)
        truth.sr_read = True


def _sr_volumes(dataset: Any) -> dict[str, float]:
    """Plate -> volume (mm3) from the SR's volumetric groups, by their tracking identifier."""
    from mibi_node.analyses.knee.labels import STRUCTURES

    volumes: dict[str, float] = {}

    def walk(items: Any, plate: str | None) -> None:
        for item in items:
            name = (
                item.ConceptNameCodeSequence[0].CodeMeaning
                if "ConceptNameCodeSequence" in item
                else ""
            )
            if name == "Tracking Identifier":
                found = [s for s in STRUCTURES if str(item.TextValue).endswith(s)]
                plate = found[0] if found else plate
            if name == "Volume" and plate and "MeasuredValueSequence" in item:
                volumes[plate] = float(item.MeasuredValueSequence[0].NumericValue)
            if "ContentSequence" in item:
                walk(item.ContentSequence, plate)

    walk(dataset.get("ContentSequence", []), None)
    return volumes


def show(console: Console, rows: list[tuple[int, KneeTruth, float]]) -> None:
    """The knee table: per study, Dice of each plate (SEG against the phantom's truth)."""
    from mibi_node.analyses.knee.labels import STRUCTURE_NAMES, STRUCTURES

    table = Table(title=f"knee analysis: {len(rows)} knee MR phantom studies (SEG vs truth)")
    table.add_column("study", justify="right")
    table.add_column("side")
    for name in STRUCTURES:
        table.add_column(f"{STRUCTURE_NAMES[name]} Dice", justify="right")
    table.add_column("last image -> SR+SEG", justify="right")
    for number, truth, seconds in rows:
        table.add_row(
            f"#{number}",
            truth.side,
            *(
                f"{truth.dice.get(n, float('nan')):.3f} ({truth.volumes_mm3.get(n, 0.0):.0f} mm³)"
                for n in STRUCTURES
            ),
            f"{seconds:.1f} s",
        )
    console.print(table)
    means = {
        n: float(np.mean([t.dice.get(n, 0.0) for _, t, _ in rows])) if rows else float("nan")
        for n in STRUCTURES
    }
    console.print(
        "knee: mean Dice "
        + ", ".join(f"{STRUCTURE_NAMES[n].lower()} {means[n]:.3f}" for n in STRUCTURES)
        + " (the SEG's voxels against the phantom's labels; in brackets the SR's volume)."
    )
