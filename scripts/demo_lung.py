"""The lung part of `make demo`: its bundle build, its chest CT studies and its lesion table.

Kept apart from ``demo.py`` like the spine and knee parts; ``demo.py`` calls these functions
in its steps. Two chest CT phantoms go in: one of 64 slices of 2.5 mm (the training grid)
and one of 300 slices of 1 mm, a CT-sized series of 300 instances sent over one association.
A lung study is complete when its SR has reached the PACS, and its SEG where the SR reports
a lesion (the key image travels with them); the table matches the SEG's lesions with the
phantom's truth lesions (a hit: the found lesion's centroid lies in the truth lesion) and
gives each hit's Dice and the SR's class and probability.
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
BUNDLE = VAR / "bundles" / "lung-demo"
RECIPE = ROOT / "config" / "lung-demo.toml"
TRAIN_DATA = VAR / "demo-lung-train"
STUDIES = VAR / "demo-lung-studies"
TRAIN_CASES = 80
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: (slices, rows, columns) and spacing (mm) of the demo studies: the training grid, and a
#: thin-slice series of 300 instances.
GRIDS = (((64, 128, 128), (2.5, 1.5, 1.5)), ((300, 128, 128), (1.0, 1.5, 1.5)))


@dataclass
class LungTruth:
    """What the phantom drew in one demo chest, and what came back."""

    instances: np.ndarray  # truth lesion ids on the series' grid (read_volume's order)
    classes: dict[int, str]  # truth lesion id -> class key
    slice_uids: list[str]  # the series' SOP Instance UIDs in that order
    slices: int
    found: np.ndarray | None = None  # the SEG's lesion map
    sr_lesions: dict[int, tuple[str, float]] = field(default_factory=dict)  # n -> class, p
    seg_read: bool = False
    sr_read: bool = False

    @property
    def complete(self) -> bool:
        # An SR that reports no lesion comes without a SEG.
        return self.sr_read and (self.seg_read or not self.sr_lesions)


def build(build_class: Callable[..., Any]) -> Any:
    """The lung bundle's background build: chest CT phantoms with masks, then the detector."""
    python = str(Path(sys.executable).parent / "python")
    return build_class(
        "lung",
        BUNDLE,
        TRAIN_DATA,
        [
            ("generating the chest CT training phantoms",
             [python, "-m", "training.lung", "synth", str(TRAIN_DATA), "--count",
              str(TRAIN_CASES), "--seed", "0"]),
            ("training the lung bundle",
             [python, "-m", "training.lung", "train", str(RECIPE), str(TRAIN_DATA), "--out",
              str(BUNDLE)]),
        ],
    )  # fmt: skip


def make_studies(seed: int = 23) -> list[tuple[str, Path, LungTruth]]:
    """The demo's chest CT phantom studies, one per grid of :data:`GRIDS`."""
    from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
    from mibi_node.imaging.volume_reader import read_volume

    shutil.rmtree(STUDIES, ignore_errors=True)
    made = []
    for index, (shape, spacing) in enumerate(GRIDS):
        folder = STUDIES / f"chest-{index + 1:02d}"
        case = make_lung_case(seed * 1000 + index, shape=shape, spacing=spacing)
        description = f"CHEST LUNG {spacing[0]:g} MM"
        paths = write_lung_study(case, folder, index=index, series_description=description)
        volume = read_volume(paths)
        truth = LungTruth(
            instances=case.instances,
            classes={lesion.id: lesion.name for lesion in case.lesions},
            slice_uids=[s.sop_instance_uid for s in volume.slices],
            slices=shape[0],
        )
        made.append((volume.study_instance_uid, folder, truth))
    return made


def read_document(dataset: Any, truth: LungTruth) -> None:
    """Keep what a SEG (the lesion map) or an SR (class and probability per lesion) says."""
    from mibi_node.analyses.lung.seg import read_lung_seg

    if str(dataset.SOPClassUID) == SEGMENTATION_STORAGE:
        truth.found = read_lung_seg(dataset, truth.slice_uids)
        truth.seg_read = True
    else:
        truth.sr_lesions = _sr_lesions(dataset)
        truth.sr_read = True


def _sr_lesions(dataset: Any) -> dict[int, tuple[str, float]]:
    """Lesion number -> (finding, probability) from the SR's volumetric groups."""
    from mibi_node.analyses.lung.labels import CLASS_NAMES, CLASSES
    from mibi_node.analyses.lung.seg import CLASS_CODES

    by_code = {CLASS_CODES[name].value: name for name in CLASSES}
    lesions: dict[int, tuple[str, float]] = {}
    for group in _items(dataset.get("ContentSequence", []), "Imaging Measurements"):
        for item in group.get("ContentSequence", []):
            number, finding, probability = None, "", float("nan")
            for child in item.get("ContentSequence", []):
                name = _meaning(child)
                if name == "Referenced Segment":
                    ref = child.ReferencedSOPSequence[0]
                    number = int(ref.ReferencedSegmentNumber)
                elif name == "Finding" and "ConceptCodeSequence" in child:
                    code = str(child.ConceptCodeSequence[0].CodeValue)
                    finding = CLASS_NAMES.get(by_code.get(code, ""), code)
                elif name == "Probability" and "MeasuredValueSequence" in child:
                    probability = float(child.MeasuredValueSequence[0].NumericValue)
            if number is not None:
                lesions[number] = (finding, probability)
    return lesions


def _meaning(item: Any) -> str:
    names = item.get("ConceptNameCodeSequence", [])
    return str(names[0].CodeMeaning) if names else ""


def _items(items: Any, name: str) -> list[Any]:
    return [item for item in items if _meaning(item) == name]


def _matches(truth: LungTruth) -> list[tuple[int, int | None, float]]:
    """Per truth lesion: (its id, the found lesion number that hits it or None, Dice)."""
    found = truth.found if truth.found is not None else np.zeros_like(truth.instances)
    rows = []
    for lesion in sorted(truth.classes):
        mask = truth.instances == lesion
        hits = []
        for number in np.unique(found[mask]):
            if number == 0:
                continue
            centre = np.round(np.argwhere(found == number).mean(axis=0)).astype(int)
            if mask[tuple(centre)]:
                hits.append(int(number))
        if not hits:
            rows.append((lesion, None, float("nan")))
            continue
        best = min(hits)  # numbered by decreasing probability
        got = found == best
        rows.append((lesion, best, 2.0 * int((got & mask).sum()) / int(got.sum() + mask.sum())))
    return rows


def show(console: Console, rows: list[tuple[int, LungTruth, float]]) -> None:
    """The lung table: per study, every truth lesion, the lesion found there and its Dice."""
    from mibi_node.analyses.lung.labels import CLASS_NAMES

    table = Table(title=f"lung analysis: {len(rows)} chest CT phantom studies (SEG vs truth)")
    for column in ("study", "slices", "truth lesion", "found (SR)", "probability", "Dice"):
        table.add_column(column, justify="left" if "lesion" in column else "right")
    table.add_column("last image -> SR+SEG", justify="right")
    hits = total = false_positives = 0
    dice: list[float] = []
    for number, truth, seconds in rows:
        matches = _matches(truth)
        matched = {n for _, n, _ in matches if n is not None}
        false_positives += len(set(truth.sr_lesions) - matched)
        first = True
        for lesion, found, score in matches or [(0, None, float("nan"))]:
            total += lesion > 0
            hits += found is not None
            if found is not None:
                dice.append(score)
            finding, probability = truth.sr_lesions.get(found or -1, ("-", float("nan")))
            table.add_row(
                f"#{number}" if first else "",
                str(truth.slices) if first else "",
                f"{lesion}. {CLASS_NAMES[truth.classes[lesion]]}" if lesion else "none",
                f"{found}. {finding}" if found is not None else "[red]missed[/]",
                f"{probability:.2f}" if found is not None else "",
                f"{score:.3f}" if found is not None else "",
                f"{seconds:.1f} s" if first else "",
            )
            first = False
    console.print(table)
    mean = float(np.mean(dice)) if dice else float("nan")
    console.print(
        f"lung: {hits} of {total} truth lesions found, {false_positives} other lesion(s) "
        f"reported, mean Dice of those found {mean:.3f} (the SEG's masks against the phantom's; "
        "a hit: the found lesion's centroid inside the truth lesion)."
    )
