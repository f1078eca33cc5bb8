"""Linked 3-D lesions painted on the source grid and measured for the SR.

The detector's lesions may overlap where two linked tracks met; one voxel is one finding, so
the lesions are painted by decreasing score and a voxel keeps the first lesion that claims
it. A lesion left without voxels is dropped; the others are numbered 1..n in score order
(the :class:`~mibi_node.analyses.lung.result.LungResult` contract), and each is measured on
what it kept.

Side: the patient's side of the body midline. On the lesion's key slice, the body is the
largest connected region above :data:`BODY_HU`; the patient ``x`` of its centre is the
midline, and a lesion whose centroid lies at larger ``x`` is on the patient's left (DICOM's
LPS axes). When the slices barely span the patient's left-right axis (a sagittal series),
or the slice shows no body, the side is unknown (``None``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.result import LesionFinding
from mibi_node.imaging.volume import Volume

__all__ = ["BODY_HU", "measure_lesions"]

logger = logging.getLogger(__name__)

#: HU above which a voxel counts as body (soft tissue, fat, bone; not lung, not air).
BODY_HU = -500.0

# The slice plane must span the patient's x axis at least this much (|in-plane x| of unit
# length: 1 for axial and coronal slices, 0 for sagittal) for a midline to mean anything.
_MIN_IN_PLANE_X = 0.5


def measure_lesions(
    volume: Volume, lesions: Sequence[Lesion3D]
) -> tuple[np.ndarray, tuple[LesionFinding, ...]]:
    """Paint ``lesions`` on the grid of ``volume`` and measure each lesion that keeps voxels.

    Parameters
    ----------
    volume
        The source series in HU; the lesions lie on its grid.
    lesions
        By decreasing score, as :func:`~mibi_node.analyses.lung.linking.link_detections`
        returns them (a stable sort by score puts any other order right).

    Returns
    -------
    lesions_map : numpy.ndarray
        ``uint16`` of ``volume.shape``: 0 none, else the number of the lesion there.
    findings : tuple of LesionFinding
        One per lesion kept, numbered 1..n by decreasing score.

    Raises
    ------
    TypeError
        ``volume`` is not a Volume, or ``lesions`` is not a sequence of Lesion3D.
    ValueError
        A lesion reaches outside the volume, or there are more lesions than ``uint16`` holds.
    """
    if not isinstance(volume, Volume):
        raise TypeError('Argument "volume" should be a Volume.')
    if isinstance(lesions, Lesion3D) or not isinstance(lesions, Sequence):
        raise TypeError('Argument "lesions" should be a sequence of Lesion3D.')
    if not all(isinstance(lesion, Lesion3D) for lesion in lesions):
        raise TypeError('Argument "lesions" should hold Lesion3D objects.')
    if len(lesions) > np.iinfo(np.uint16).max:
        raise ValueError(f'Argument "lesions" holds {len(lesions)} lesions, more than uint16.')
    shape = volume.shape
    for index, lesion in enumerate(lesions):
        if any(hi > n for hi, n in zip(lesion.bbox[3:], shape, strict=True)):
            raise ValueError(
                f'Argument "lesions" has lesion {index} with box {lesion.bbox} outside the '
                f"volume {shape}."
            )
    ordered = sorted(lesions, key=lambda lesion: -lesion.score)

    lesions_map = np.zeros(shape, dtype=np.uint16)
    kept: list[Lesion3D] = []
    for lesion in ordered:
        k0, j0, i0, k1, j1, i1 = lesion.bbox
        region = lesions_map[k0:k1, j0:j1, i0:i1]
        claimed = lesion.mask & (region == 0)
        if claimed.any():
            kept.append(lesion)
            region[claimed] = len(kept)
    if len(kept) < len(ordered):
        logger.debug("%d lesions lost every voxel to higher-scoring ones", len(ordered) - len(kept))

    affine = volume.affine()
    midlines: dict[int, float | None] = {}
    findings = []
    for number, lesion in enumerate(kept, start=1):
        k0, j0, i0, k1, j1, i1 = lesion.bbox
        box = (slice(k0, k1), slice(j0, j1), slice(i0, i1))
        crop = lesions_map[box] == number
        voxels = int(np.count_nonzero(crop))
        areas = crop.sum(axis=(1, 2))
        planes = np.flatnonzero(areas)
        key_slice = k0 + int(np.argmax(areas))
        centroid = np.argwhere(crop).mean(axis=0) + np.array([k0, j0, i0])
        position = affine @ np.array([*centroid, 1.0])
        if key_slice not in midlines:
            midlines[key_slice] = _midline_x(volume, key_slice, affine)
        midline = midlines[key_slice]
        side = None
        if midline is not None and abs(position[0] - midline) > 1e-6:
            side = "L" if position[0] > midline else "R"
        findings.append(
            LesionFinding(
                number=number,
                label=lesion.label,
                probability=lesion.score,
                voxels=voxels,
                volume_mm3=voxels * volume.voxel_volume_mm3,
                mean_hu=float(volume.image[box][crop].mean(dtype=np.float64)),
                centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                position_mm=(float(position[0]), float(position[1]), float(position[2])),
                slices=(k0 + int(planes[0]), k0 + int(planes[-1])),
                key_slice=key_slice,
                diameter_mm=_diameter_mm(
                    crop[key_slice - k0], volume.spacing[1], volume.spacing[2]
                ),
                side=side,
            )
        )
    return lesions_map, tuple(findings)


def _diameter_mm(section: np.ndarray, row_spacing: float, column_spacing: float) -> float:
    """The largest distance between two pixel centres of ``section``, mm.

    The farthest pair lies on the convex hull, so only its vertices are compared; points on a
    line (no hull) are compared all with all.
    """
    points = np.argwhere(section) * np.array([row_spacing, column_spacing])
    if len(points) < 2:
        return 0.0
    if len(points) >= 3:
        with contextlib.suppress(QhullError):  # collinear: compare the line's points
            points = points[ConvexHull(points).vertices]
    return float(pdist(points).max())


def _midline_x(volume: Volume, k: int, affine: np.ndarray) -> float | None:
    """Patient ``x`` of the centre of the body on slice ``k``; ``None`` when unknown."""
    in_plane_x = np.hypot(volume.row_cosines[0], volume.column_cosines[0])
    if in_plane_x < _MIN_IN_PLANE_X:
        return None
    regions, count = ndimage.label(volume.image[k] > BODY_HU)
    if count == 0:
        return None
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    rows, columns = np.nonzero(regions == int(np.argmax(sizes)))
    centre = affine @ np.array([float(k), rows.mean(), columns.mean(), 1.0])
    return float(centre[0])
