"""What the lung analysis reads and returns for one study: frozen dataclasses.

The input is the chosen chest CT series as a :class:`~mibi_node.imaging.volume.Volume` (HU);
the result is a lesion map on the same grid (so the DICOM SEG's frames are the source slices)
with one :class:`LesionFinding` per detected 3-D lesion.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mibi_node.analyses.lung.labels import CLASS_NAMES, CLASSES
from mibi_node.imaging.volume import Volume

__all__ = ["LesionFinding", "LungInput", "LungResult"]

#: What :attr:`LesionFinding.side` may be: the patient's right or left.
SIDES = ("R", "L")


@dataclass(frozen=True)
class LungInput:
    """The model input of one chest CT study.

    Attributes
    ----------
    volume
        The chosen series in HU on its own grid.
    reason
        How the series was chosen ("axial CT, 300 slices of 1.0 mm, 'LUNG 1.0 B60f'").
    warnings
        Remarks carried into the result (the volume's own warnings included).
    """

    volume: Volume
    reason: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def study_instance_uid(self) -> str:
        return self.volume.study_instance_uid


@dataclass(frozen=True)
class LesionFinding:
    """One detected 3-D lesion and its measurements on the source grid.

    Attributes
    ----------
    number
        1..n: its value in :attr:`LungResult.lesions_map` and its SEG segment number.
    label
        Its class' label value (:data:`~mibi_node.analyses.lung.labels.LABEL_OF`).
    probability
        The detector's lesion score, 0-1 (the linked slices' best scores' mean).
    voxels
        Voxels of the lesion in :attr:`LungResult.lesions_map`.
    volume_mm3
        ``voxels`` x the voxel volume.
    mean_hu
        Mean HU of the source image under the lesion.
    centroid
        ``(slice, row, column)`` voxel index of its centroid (fractional).
    position_mm
        The centroid in patient coordinates (DICOM LPS), mm.
    slices
        ``(first, last)`` slice index it covers, inclusive.
    key_slice
        The slice where its cross-section is largest.
    diameter_mm
        Its longest in-plane extent on :attr:`key_slice`: the largest distance between two of
        its pixel centres there, mm.
    side
        ``"R"`` or ``"L"``: the patient's side of the body midline; ``None`` when unknown.
    lobe
        ``"upper"``, ``"middle"`` (right side only) or ``"lower"`` with :attr:`side`, when a
        lobe map is known (never from the phantom); ``None`` otherwise.
    """

    number: int
    label: int
    probability: float
    voxels: int
    volume_mm3: float
    mean_hu: float
    centroid: tuple[float, float, float]
    position_mm: tuple[float, float, float]
    slices: tuple[int, int]
    key_slice: int
    diameter_mm: float
    side: str | None = None
    lobe: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.label <= len(CLASSES):
            raise ValueError(f"lesion label {self.label} is not one of 1..{len(CLASSES)}")
        if self.number < 1:
            raise ValueError(f"lesion number {self.number} should be >= 1")
        if not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"lesion probability {self.probability} is not in [0, 1]")
        if self.side not in (None, *SIDES):
            raise ValueError(f'lesion side should be "R", "L" or None, not {self.side!r}')

    @property
    def name(self) -> str:
        """Its class key (``ground_glass_opacity`` or ``bronchiectasis``)."""
        return CLASSES[self.label - 1]

    @property
    def title(self) -> str:
        """What a radiologist reads ("Ground-glass opacity")."""
        return CLASS_NAMES[self.name]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {
            "number": self.number,
            "class": self.name,
            "probability": self.probability,
            "voxels": self.voxels,
            "volume_mm3": self.volume_mm3,
            "mean_hu": self.mean_hu,
            "centroid": list(self.centroid),
            "position_mm": list(self.position_mm),
            "slices": list(self.slices),
            "key_slice": self.key_slice,
            "diameter_mm": self.diameter_mm,
            "side": self.side,
            "lobe": self.lobe,
        }


@dataclass(frozen=True)
class LungResult:
    """The analysis' answer for one chest CT study.

    Attributes
    ----------
    study_instance_uid
        The study.
    volume
        The source series (its geometry and slices; the SEG references them).
    lesions_map
        ``uint16`` map of ``volume.shape``: 0 none, else the :attr:`LesionFinding.number` of
        the lesion there (where two linked lesions overlapped, the higher-scoring one).
    lesions
        By number (1..n), which is by decreasing probability.
    timings, warnings, bundle_name, bundle_version, intended_use
        As in the other analyses' results.
    """

    study_instance_uid: str
    volume: Volume
    lesions_map: np.ndarray
    lesions: tuple[LesionFinding, ...]
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    bundle_name: str = ""
    bundle_version: str = ""
    intended_use: str = "demonstration"

    def __post_init__(self) -> None:
        if self.lesions_map.shape != self.volume.image.shape:
            raise ValueError(
                f"lesion map {self.lesions_map.shape} and volume {self.volume.image.shape} differ"
            )
        numbers = [lesion.number for lesion in self.lesions]
        if numbers != list(range(1, len(numbers) + 1)):
            raise ValueError(f"lesions should be numbered 1..n in order, got {numbers}")

    def count(self, name: str) -> int:
        """Lesions of class ``name``."""
        return sum(1 for lesion in self.lesions if lesion.name == name)

    @property
    def predicted(self) -> str:
        """A short key: ``no lesion found`` or the count per class."""
        if not self.lesions:
            return "no lesion found"
        parts = [
            f"{self.count(name)} {CLASS_NAMES[name].lower()}"
            for name in CLASSES
            if self.count(name)
        ]
        return ", ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no voxels), the shape the job row stores."""
        volume = self.volume
        return {
            "study_instance_uid": self.study_instance_uid,
            "predicted": self.predicted,
            "series_instance_uid": volume.series_instance_uid,
            "shape": list(volume.shape),
            "spacing": list(volume.spacing),
            "lesions": [lesion.to_dict() for lesion in self.lesions],
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "bundle": {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "intended_use": self.intended_use,
            },
        }
