"""A 3-D image series as one volume: voxels, spacing, orientation and the slices behind it.

The shared input type of the node's 3-D analyses (knee MR now, lung CT next). The reader
(:mod:`mibi_node.imaging.volume_reader`) sorts a series' slices by their position along the
slice normal and fills it; analyses resample, crop and segment it, and map their masks back
to this grid, whose slices are the stored instances a DICOM SEG references.

Index order is ``(slice, row, column)`` = ``(k, j, i)``. The patient-space position (mm, the
DICOM patient coordinate system) of voxel ``(k, j, i)`` is::

    origin + i * column_spacing * row_cosines
           + j * row_spacing * column_cosines
           + k * slice_spacing * normal

where ``row_cosines`` and ``column_cosines`` are the two halves of Image Orientation
(Patient) (the direction of increasing column index and of increasing row index),
``normal`` is their cross product, and ``origin`` is the Image Position (Patient) of slice 0.
Slices are in the order of increasing position along ``normal``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Volume", "VolumeSlice"]


@dataclass(frozen=True)
class VolumeSlice:
    """One stored instance that is one slice of a volume.

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, series_instance_uid
        Identify the instance.
    instance_number
        Its Instance Number, or ``None`` when the file has none.
    position
        Its Image Position (Patient), mm.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    instance_number: int | None
    position: tuple[float, float, float]


@dataclass(frozen=True)
class Volume:
    """One series read as a volume.

    Attributes
    ----------
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        Where it comes from (the frame of reference a SEG shares).
    image
        ``(slices, rows, columns)`` float32, rescaled grey values (Rescale Slope/Intercept
        applied), slices sorted along the normal.
    spacing
        ``(slice, row, column)`` spacing in mm; the slice spacing is the distance between
        consecutive slice positions, not Slice Thickness.
    origin
        Image Position (Patient) of slice 0, mm.
    row_cosines, column_cosines
        Image Orientation (Patient): direction of increasing column index, then of
        increasing row index.
    slices
        One per slice index, in the same order as ``image``.
    modality, series_description
        From the series' headers ("" when absent).
    warnings
        What the reader noticed and tolerated (a slice spacing that varies within
        tolerance, a duplicate position dropped), for the result and the status page.
    """

    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    image: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    row_cosines: tuple[float, float, float]
    column_cosines: tuple[float, float, float]
    slices: tuple[VolumeSlice, ...]
    modality: str = ""
    series_description: str = ""
    warnings: tuple[str, ...] = ()

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        k, j, i = self.image.shape
        return int(k), int(j), int(i)

    @property
    def normal(self) -> np.ndarray:
        """The slice normal: ``row_cosines x column_cosines``."""
        return np.cross(np.asarray(self.row_cosines), np.asarray(self.column_cosines))

    @property
    def voxel_volume_mm3(self) -> float:
        """The volume of one voxel in mm3."""
        return float(np.prod(self.spacing))

    def affine(self) -> np.ndarray:
        """4x4 matrix from ``(k, j, i, 1)`` indices to patient mm (see the module text)."""
        matrix = np.eye(4)
        matrix[:3, 0] = self.normal * self.spacing[0]
        matrix[:3, 1] = np.asarray(self.column_cosines) * self.spacing[1]
        matrix[:3, 2] = np.asarray(self.row_cosines) * self.spacing[2]
        matrix[:3, 3] = self.origin
        return matrix
