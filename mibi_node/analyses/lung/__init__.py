"""Lung CT (seed 004): ground-glass opacity and bronchiectasis detected with their masks.

A chest CT series -> the lesions of two classes, each with its 3-D mask: the series is read
in HU and resampled to the bundle's working grid, torchvision's Mask R-CNN (a ResNet + FPN
backbone, a region proposal network and a joint class / box / mask head, NMS after) detects
lesions on every axial slice with its neighbours as channels, and the detections of
neighbouring slices are linked into 3-D lesions (NMS in 2-D and again between linked
lesions); the masks are mapped back to the source grid and each lesion is measured (volume,
mean HU, longest diameter, side). The node returns a DICOM Segmentation with one segment per
lesion, a TID 1500 SR with one volumetric group per lesion referencing its segment, and a
key image of the slice with the largest lesion.

Its parts: :mod:`.labels` (the classes), :mod:`.phantom` and :mod:`.anatomy` (synthetic
chest CT studies with truth masks), :mod:`.reader` (the series choice; the volume itself
is read by :mod:`mibi_node.imaging.volume_reader`), :mod:`.model`, :mod:`.linking`,
:mod:`.bundle` and :mod:`.runner`, :mod:`.measure`, :mod:`.seg` and :mod:`.report`;
training and evaluation in ``training/lung.py`` and ``training/lung_metric.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydicom.dataset import Dataset

from mibi_node.analyses.base import (
    Analysis,
    Completeness,
    EncodeContext,
    Finding,
    OutputKind,
    Panel,
    TaskKind,
)
from mibi_node.analyses.lung.labels import CLASS_NAMES, CLASSES
from mibi_node.analyses.selection import SelectionRule

if TYPE_CHECKING:
    from mibi_node.analyses.lung.result import LungInput, LungResult

__all__ = ["LUNG_SELECTION", "NO_LESION", "LungAnalysis"]

#: The correction of a lesion that is not one.
NO_LESION = "no_lesion"

#: Chest CT studies by their description or body part (English, German, French, Italian,
#: Spanish, Chinese); head, spine and cardiac studies are ruled out first.
LUNG_SELECTION = SelectionRule(
    modalities=("CT",),
    description_pattern=r"chest|thorax|lung|lunge|poumon|polmon|pulmo|torace|t[oó]rax|胸|肺",
    exclude_description_pattern=r"\bhead\b|brain|sch[aä]del|spine|cardiac|coronar|calcium",
)


class LungAnalysis(Analysis):
    """Chest CT: ground-glass opacities and bronchiectasis, returned as DICOM SEG and SR."""

    name: ClassVar[str] = "lung"
    version: ClassVar[str] = "1.0"
    title: ClassVar[str] = "Chest CT: ground-glass opacity and bronchiectasis"
    label: ClassVar[str] = "chest CT study"
    task: ClassVar[TaskKind] = TaskKind.DETECTION
    outputs: ClassVar[tuple[OutputKind, ...]] = (
        OutputKind.SR,
        OutputKind.SEG,
        OutputKind.KEY_IMAGE,
    )
    default_selection: ClassVar[SelectionRule] = LUNG_SELECTION
    completeness: ClassVar[Completeness] = Completeness(parts=("axial chest CT series",))
    series_offset: ClassVar[int] = 40
    # CT Image Storage (one slice per instance); Enhanced CT (multi-frame) is not read yet.
    storage_sop_classes: ClassVar[tuple[str, ...]] = ("1.2.840.10008.5.1.4.1.1.2",)
    key_image_default: ClassVar[bool | None] = True
    recipe: ClassVar[Path | None] = Path("config/lung-demo.toml")
    default_bundle: ClassVar[Path | None] = Path("var/bundles/lung-demo")
    # A 300 x 512 x 512 series in float32 is 300 MiB, its working copy and the detector's
    # activations on a batch of slices about as much again.
    working_memory_mb: ClassVar[float] = 900.0

    def read(self, paths: Sequence[Path], runner: Any) -> LungInput:
        from mibi_node.analyses.lung.reader import read_lung_study

        return read_lung_study(paths)

    def load(self, bundle: Path, device: str) -> Any:
        from mibi_node.analyses.lung.runner import LungRunner

        runner = LungRunner(bundle, device=device)
        runner.memory = self.memory_needs(bundle, device)
        return runner

    def source_uids(self, result: LungResult) -> set[str]:
        return {item.sop_instance_uid for item in result.volume.slices}

    def encode(
        self, result: LungResult, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        from mibi_node.analyses.lung.report import build_lung_documents

        return build_lung_documents(result, sources, context)

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """One finding per lesion: its class, which a correction may change to the other
        class or to "no lesion" (a false positive); editing its region is not built yet."""
        return tuple(
            Finding(
                key=f"lesion-{item.get('number')}",
                label=f"lesion {item.get('number')}",
                value=str(item.get("class")),
                choices=(*CLASSES, NO_LESION),
                probability=float(item.get("probability") or 0.0),
                kind="lesion",
            )
            for item in result.get("lesions") or []
        )

    def panel(self, result: dict[str, Any]) -> Panel:
        lesions = [dict(item) for item in result.get("lesions") or []]
        bars = tuple(
            (
                f"{item.get('number')}. {CLASS_NAMES.get(str(item.get('class')), '?')}",
                float(item.get("probability") or 0.0),
            )
            for item in lesions
        )
        measurements: list[tuple[str, str]] = []
        for item in lesions:
            side = {"R": "right", "L": "left"}.get(str(item.get("side")), "side unknown")
            slices = "-".join(str(k) for k in item.get("slices") or [])
            measurements.append(
                (
                    f"lesion {item.get('number')}",
                    f"{float(item.get('volume_mm3') or 0.0):.0f} mm³, "
                    f"{float(item.get('diameter_mm') or 0.0):.1f} mm, "
                    f"mean {float(item.get('mean_hu') or 0.0):.0f} HU, {side}, "
                    f"slices {slices}",
                )
            )
        counts = [
            f"{sum(1 for i in lesions if i.get('class') == name)} {CLASS_NAMES[name].lower()}"
            for name in CLASSES
        ]
        headline = (
            "no lesion found" if not lesions else f"{len(lesions)} lesion(s): " + ", ".join(counts)
        )
        return Panel(
            headline=headline,
            bars=bars,
            measurements=tuple(measurements),
            note="each bar is one lesion's detection score" if lesions else "",
        )
