"""Knee MR cartilage (seed 003): two-stage segmentation returned as DICOM SEG and SR.

A 3-D sagittal knee MR series -> the femoral, medial and lateral tibial and patellar
cartilage plates, segmented coarse to fine: a residual U-Net on a low-resolution grid finds
the cartilage region (3-D connected components, small regions removed, the region cropped),
then a MedicalNet-style 3-D ResNet encoder with an ASPP decoder segments the crop finely;
the labels are mapped back to the source grid. The node returns a DICOM Segmentation with
one segment per plate referencing the source slices, and a TID 1500 SR with each plate's
volume and mean and minimum thickness referencing the SEG's segments.

Its parts: :mod:`.labels` (the structures), :mod:`.phantom` and :mod:`.anatomy` (synthetic
knee MR studies with truth labels), :mod:`.reader` (the series choice; the volume itself is
read by :mod:`mibi_node.imaging.volume_reader`), :mod:`.preprocess`, :mod:`.model`,
:mod:`.bundle` and :mod:`.runner`, :mod:`.measure` (the biomarkers), :mod:`.seg` and
:mod:`.report`; training and evaluation in ``training/knee.py`` and
``training/knee_metric.py``.
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
from mibi_node.analyses.knee.labels import STRUCTURE_NAMES, STRUCTURES
from mibi_node.analyses.selection import SelectionRule

if TYPE_CHECKING:
    from mibi_node.analyses.knee.result import KneeInput, KneeResult

__all__ = ["KNEE_SELECTION", "KneeAnalysis"]

#: Knee MR studies by their description (English, German, French, Italian, Spanish,
#: Chinese); other joints and the spine are ruled out first.
KNEE_SELECTION = SelectionRule(
    modalities=("MR",),
    description_pattern=r"knee|\bknie|genou|ginocchio|rodilla|膝",
    exclude_description_pattern=r"spine|lumb|cervic|\bhips?\b|ankle|shoulder|wrist|brain|\bhead\b",
)


class KneeAnalysis(Analysis):
    """Knee MR: four cartilage plates segmented, returned as DICOM SEG and SR."""

    name: ClassVar[str] = "knee"
    version: ClassVar[str] = "1.0"
    title: ClassVar[str] = "Knee MRI: cartilage segmentation"
    label: ClassVar[str] = "knee MR study"
    task: ClassVar[TaskKind] = TaskKind.SEGMENTATION
    outputs: ClassVar[tuple[OutputKind, ...]] = (OutputKind.SR, OutputKind.SEG)
    default_selection: ClassVar[SelectionRule] = KNEE_SELECTION
    completeness: ClassVar[Completeness] = Completeness(parts=("3-D sagittal knee series",))
    series_offset: ClassVar[int] = 30
    # MR Image Storage (one slice per instance); Enhanced MR (multi-frame) is not read yet.
    storage_sop_classes: ClassVar[tuple[str, ...]] = ("1.2.840.10008.5.1.4.1.1.4",)
    recipe: ClassVar[Path | None] = Path("config/knee-demo.toml")
    default_bundle: ClassVar[Path | None] = Path("var/bundles/knee-demo")
    # Measured on 48 x 128 x 128 phantom volumes: one study's peak (the working volume and
    # stage 2's activations on a ~90 x 80 x 100 crop) ~450 MiB, and MONAI's import ~330 MiB,
    # which the worker's baseline (measured before any bundle loads) does not hold.
    working_memory_mb: ClassVar[float] = 800.0

    def read(self, paths: Sequence[Path], runner: Any) -> KneeInput:
        from mibi_node.analyses.knee.reader import read_knee_study

        return read_knee_study(paths)

    def load(self, bundle: Path, device: str) -> Any:
        from mibi_node.analyses.knee.runner import KneeRunner

        runner = KneeRunner(bundle, device=device)
        runner.memory = self.memory_needs(bundle, device)
        return runner

    def source_uids(self, result: KneeResult) -> set[str]:
        return {item.sop_instance_uid for item in result.volume.slices}

    def encode(
        self, result: KneeResult, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        from mibi_node.analyses.knee.report import build_knee_documents

        return build_knee_documents(result, sources, context)

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """One finding per cartilage plate found (its segmentation); a correction says in
        words what is wrong with it (editing the region itself is not built yet)."""
        rows = {str(m.get("structure")): dict(m) for m in result.get("measurements") or []}
        return tuple(
            Finding(
                key=name,
                label=STRUCTURE_NAMES[name],
                value="segmented",
                kind="cartilage plate",
            )
            for name in STRUCTURES
            if int(rows.get(name, {}).get("voxels") or 0) > 0
        )

    def panel(self, result: dict[str, Any]) -> Panel:
        rows = {str(m.get("structure")): dict(m) for m in result.get("measurements") or []}
        found = [name for name in STRUCTURES if int(rows.get(name, {}).get("voxels") or 0) > 0]
        missing = [STRUCTURE_NAMES[name] for name in STRUCTURES if name not in found]
        measurements: list[tuple[str, str]] = []
        for name in found:
            row = rows[name]
            text = f"{float(row.get('volume_mm3') or 0.0):.0f} mm³"
            mean, least = row.get("mean_thickness_mm"), row.get("min_thickness_mm")
            if mean is not None:
                text += f", thickness mean {float(mean):.2f} mm"
            if least is not None:
                text += f", min {float(least):.2f} mm"
            measurements.append((STRUCTURE_NAMES[name], text))
        if missing:
            measurements.append(("not found", ", ".join(missing)))
        spacing = list(result.get("spacing") or [])
        if spacing:
            measurements.append(("voxel", " x ".join(f"{float(s):.2f}" for s in spacing) + " mm"))
        headline = (
            f"{len(found)} of {len(STRUCTURES)} cartilage plates segmented"
            if found
            else "no cartilage found"
        )
        return Panel(headline=headline, measurements=tuple(measurements))
