"""What the knee analysis reads and returns for one study: frozen dataclasses.

The input is the chosen 3-D MR series as a :class:`~mibi_node.imaging.volume.Volume`; the
result is a label volume on the same grid (so the DICOM SEG's frames are the source slices)
with one measurement group per cartilage plate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mibi_node.analyses.knee.labels import STRUCTURES
from mibi_node.imaging.volume import Volume

__all__ = ["KneeInput", "KneeResult", "StructureMeasurement"]


@dataclass(frozen=True)
class KneeInput:
    """The model input of one knee MR study.

    Attributes
    ----------
    volume
        The chosen series, raw grey values on its own grid.
    reason
        How the series was chosen ("sagittal, 3-D, 60 slices, 'SAG 3D DESS'").
    warnings
        Remarks carried into the result (the volume's own warnings included).
    laterality
        The knee's side from the headers, ``"L"`` or ``"R"`` (``None``: unknown or the
        headers disagree); with the slice normal it decides which tibial plate is medial.
    """

    volume: Volume
    reason: str = ""
    warnings: tuple[str, ...] = ()
    laterality: str | None = None

    def __post_init__(self) -> None:
        if self.laterality not in (None, "L", "R"):
            raise ValueError(
                f'Argument "laterality" should be "L", "R" or None, not {self.laterality!r}.'
            )

    @property
    def study_instance_uid(self) -> str:
        return self.volume.study_instance_uid


@dataclass(frozen=True)
class StructureMeasurement:
    """The biomarkers of one cartilage plate (seed 003 [0002]: volume and thickness).

    Attributes
    ----------
    structure
        One of :data:`~mibi_node.analyses.knee.labels.STRUCTURES`.
    voxels
        Voxels labelled with it on the source grid.
    volume_mm3
        ``voxels`` x the voxel volume.
    mean_thickness_mm, min_thickness_mm
        Plate thickness (``None`` when the plate is absent or too small to measure).
    remark
        Why a present plate's thickness was not measured (a mask too large or too deep to
        be cartilage), "" otherwise.
    """

    structure: str
    voxels: int
    volume_mm3: float
    mean_thickness_mm: float | None
    min_thickness_mm: float | None
    remark: str = ""

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"unknown structure {self.structure!r}")


@dataclass(frozen=True)
class KneeResult:
    """The analysis' answer for one knee MR study.

    Attributes
    ----------
    study_instance_uid
        The study.
    volume
        The source series (its geometry and slices; the SEG references every slice).
    labels
        ``uint8`` label volume of ``volume.shape``: 0 background, else the structure's
        value in :data:`~mibi_node.analyses.knee.labels.LABEL_OF`.
    measurements
        One per structure, in :data:`STRUCTURES` order (absent ones with 0 voxels).
    coarse_box
        The stage-1 crop on the source grid: ``((k0, k1), (j0, j1), (i0, i1))``, half open.
    timings, warnings, bundle_name, bundle_version, intended_use
        As in the other analyses' results.
    """

    study_instance_uid: str
    volume: Volume
    labels: np.ndarray
    measurements: tuple[StructureMeasurement, ...]
    coarse_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    bundle_name: str = ""
    bundle_version: str = ""
    intended_use: str = "demonstration"

    def __post_init__(self) -> None:
        if self.labels.shape != self.volume.image.shape:
            raise ValueError(
                f"labels {self.labels.shape} and volume {self.volume.image.shape} differ"
            )

    @property
    def found(self) -> tuple[StructureMeasurement, ...]:
        """The structures with at least one voxel."""
        return tuple(m for m in self.measurements if m.voxels > 0)

    @property
    def predicted(self) -> str:
        """A short key: the structures found, or ``no cartilage found``."""
        found = self.found
        if not found:
            return "no cartilage found"
        return f"{len(found)} of {len(STRUCTURES)} cartilage plates"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no voxels), the shape the job row stores."""
        volume = self.volume
        return {
            "study_instance_uid": self.study_instance_uid,
            "predicted": self.predicted,
            "series_instance_uid": volume.series_instance_uid,
            "shape": list(volume.shape),
            "spacing": list(volume.spacing),
            "measurements": [
                {
                    "structure": m.structure,
                    "voxels": m.voxels,
                    "volume_mm3": m.volume_mm3,
                    "mean_thickness_mm": m.mean_thickness_mm,
                    "min_thickness_mm": m.min_thickness_mm,
                }
                for m in self.measurements
            ],
            "coarse_box": [list(axis) for axis in self.coarse_box] if self.coarse_box else None,
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "bundle": {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "intended_use": self.intended_use,
            },
        }
