"""The knee analysis' biomarkers: each cartilage plate's volume and mean and minimum thickness.

Volume is the voxel count times the voxel volume. Thickness is read on the plate's medial
sheet, in millimetres (anisotropic voxels included), wherever the plate curves: no projection
direction and no surface mesh.

The thickness rule, for one plate (a binary mask):

1. **Medial sheet.** ``d`` = the distance of each plate voxel to the nearest background
   voxel centre, in mm (:func:`scipy.ndimage.distance_transform_edt` with
   ``sampling=spacing``). The direction from that background voxel is the local normal; a
   plate voxel ``p`` is on the sheet when its 26-neighbour ``q`` one step deeper along it is
   no further from the background, ``d(q) <= d(p)``: the plate's middle lies between them.
2. **Local thickness** at a sheet voxel is that of the flat plate which fills the same volume
   of a ball around it: a ball of radius ``R`` centred in a plate of thickness ``T`` holds
   ``pi (R^2 T - T^3 / 12)`` of it, a cubic solved for ``T``. Twice the distance map's ridge
   value is the usual reading, but on a voxel grid it is one voxel thick or thin depending on
   whether the plate is an odd or an even number of voxels across, and it overshoots on
   oblique plates, where the nearest background centre is not along the normal; the
   voxels-in-a-ball reading is unbiased at any orientation and voxel size, because voxel
   counting is. The ball's second moments about the voxel give the normal (the direction in
   which the plate is thinnest); its centroid, the offset ``delta`` of the voxel from the
   plate's middle, whose ``pi T delta^2`` shortfall is added back.
   ``R = max(1.5 * rim_mm, 2 * max(d), 2 * largest spacing)``: the measurement's spatial
   scale, so thinning over a patch narrower than about ``R`` reads shallower than it is.
3. **The rim is left out.** Near the plate's edge (or a full-thickness hole) part of the ball
   lies beyond it and the centroid shifts across the normal. A sheet voxel whose centroid
   shifts by more than ``0.1 R`` is rim (and so is the middle of a fragment that does not
   fill half of the ball's in-plane second moment): for a thin plate with a straight edge, the band
   within about ``R / 1.5 = rim_mm`` of the edge. A smaller shift is corrected for (the part
   of a disc inside a straight edge, from its centroid shift), so the interior near the rim
   reads true. A one-sided thinning shifts the centroid along the normal and is measured, and
   so is a gently curved plate; the tapering edge does not read as a thin plate.
4. **Mean thickness** is the mean over the sheet's non-rim voxels; **minimum thickness** is
   their ``percentile``-th percentile (5 by default), robust to single voxels. A plate too
   small to have a non-rim sheet (a fragment a few millimetres across) has no thickness.

The cost is the sheet's voxels times the ball's, so it is bounded twice. A sheet of more than
:data:`MAX_SHEET_POINTS` voxels is measured at that many of them, a fixed-seed sample (a
femoral plate's sheet is a few thousand voxels; the mean and the 5th percentile of the sample
stay within a few hundredths of a millimetre of the whole sheet's), and at fewer where the
ball holds many voxels (fine voxels, a deep mask), at least 500. And a mask that cannot be
a cartilage plate is not measured at all: one larger than :data:`MAX_PLATE_MM3` (adult
femoral cartilage, the largest plate, is about 5-10 cm3, the phantom's 10-15 cm3) or deeper
than :data:`MAX_DEPTH_MM` from its background (a plate over 12 mm thick; the thickest
cartilage, the patella's, is at most about 7 mm), whose ball would be large. Such a mask,
from a model that segments junk, has no thickness and a remark saying why.

On analytic plates (``tests/test_knee_measure.py``, 0.7 x 0.7 x 1.2 mm voxels) a plate aligned
with the grid reads its voxel count within 0.1 mm (the mask cannot say more), an oblique or
curved plate its true thickness within about 0.2 mm (mean) and 0.5 mm (minimum), and a focal
thinning 12 mm across its floor within 0.1 mm.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.result import StructureMeasurement

__all__ = [
    "MAX_DEPTH_MM",
    "MAX_PLATE_MM3",
    "MAX_SHEET_POINTS",
    "measure_structures",
    "plate_thickness",
]

logger = logging.getLogger(__name__)

#: The 26 neighbour offsets of a voxel, ``(26, 3)`` in index units.
_OFFSETS = np.array(
    [o for o in itertools.product((-1, 0, 1), repeat=3) if o != (0, 0, 0)], dtype=np.int64
)

#: A rim voxel's centroid shifts across the normal by more than this fraction of the ball
#: radius (a thin plate's straight edge at ``R / 1.5``: 0.099 of the radius).
_RIM_SHIFT = 0.1

#: A sheet voxel whose plate, within the ball, has less than this fraction of the in-plane
#: second moment of a plate filling the ball is on a fragment too small to measure (a
#: plate's edge, seen from the edge, keeps the whole moment: it is taken about the voxel).
_MIN_EXTENT = 0.5

#: The index pairs of the second moments.
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))

#: Sheet voxels per block of the ball sums (bounds the working memory, about 100 MB).
_BLOCK_ELEMENTS = 4_000_000

#: The most sheet voxels the thickness is evaluated at (a fixed-seed sample of a larger sheet).
MAX_SHEET_POINTS = 4000
#: Fewer where the ball is large (fine voxels, a deep mask): sheet voxels x ball voxels is
#: kept under this, but at least :data:`_MIN_SHEET_POINTS` sheet voxels are measured.
_MAX_BALL_SUMS = 20_000_000
_MIN_SHEET_POINTS = 500

#: A mask larger than this (mm3) is not a cartilage plate: its thickness is not measured.
MAX_PLATE_MM3 = 50_000.0

#: A mask with a voxel deeper than this (mm) from its background is not a cartilage plate.
MAX_DEPTH_MM = 6.0


def _check_spacing(spacing: Sequence[float]) -> np.ndarray:
    try:
        values = [float(s) for s in spacing]
    except (TypeError, ValueError) as exc:
        raise TypeError('Argument "spacing" should be three numbers (mm).') from exc
    if len(values) != 3 or not all(math.isfinite(s) and s > 0 for s in values):
        raise ValueError(
            f'Argument "spacing" should be three positive numbers (mm), not {spacing}.'
        )
    return np.asarray(values)


def _check_options(rim_mm: float, percentile: float) -> None:
    if not (math.isfinite(rim_mm) and rim_mm >= 0):
        raise ValueError(f'Argument "rim_mm" should be a non-negative number, not {rim_mm}.')
    if not 0 <= percentile <= 100:
        raise ValueError(f'Argument "percentile" should be within [0, 100], not {percentile}.')


def measure_structures(
    labels: np.ndarray,
    spacing: Sequence[float],
    *,
    rim_mm: float = 2.0,
    percentile: float = 5.0,
) -> tuple[StructureMeasurement, ...]:
    """Measure every cartilage plate of a label volume.

    Parameters
    ----------
    labels
        ``(slices, rows, columns)`` integer label volume: 0 background, else the values of
        :data:`~mibi_node.analyses.knee.labels.LABEL_OF`; other values are ignored.
    spacing
        ``(slice, row, column)`` voxel spacing in mm.
    rim_mm
        Width of the plate rim left out of the thickness (see the module text).
    percentile
        The percentile of the sheet's thickness reported as the minimum thickness.

    Returns
    -------
    tuple[StructureMeasurement, ...]
        One per structure in :data:`~mibi_node.analyses.knee.labels.STRUCTURES` order; an
        absent structure has 0 voxels, volume 0.0 and no thickness, one too small to
        measure (all rim) its volume and no thickness, and one that cannot be a plate (too
        large or too deep) its volume, no thickness and a remark saying why.

    Raises
    ------
    TypeError
        ``labels`` is not an integer numpy array, or ``spacing`` is not three numbers.
    ValueError
        ``labels`` is not 3-D, ``spacing`` is not positive, or ``rim_mm`` or ``percentile``
        is out of range.
    """
    if not isinstance(labels, np.ndarray) or not (
        np.issubdtype(labels.dtype, np.integer) or labels.dtype == np.bool_
    ):
        raise TypeError('Argument "labels" should be an integer numpy array.')
    if labels.ndim != 3:
        raise ValueError(f'Argument "labels" should be 3-D, not of shape {labels.shape}.')
    sampling = _check_spacing(spacing)
    _check_options(rim_mm, percentile)
    voxel_mm3 = float(np.prod(sampling))
    known = np.where((labels > 0) & (labels <= len(STRUCTURES)), labels, 0).astype(np.intp)
    boxes = ndimage.find_objects(known, max_label=len(STRUCTURES))
    results = []
    for name in STRUCTURES:
        value = LABEL_OF[name]
        box = boxes[value - 1]
        if box is None:
            results.append(StructureMeasurement(name, 0, 0.0, None, None))
            continue
        mask = labels[box] == value
        voxels = int(np.count_nonzero(mask))
        mean_mm, min_mm, remark = _thickness(mask, sampling, rim_mm, percentile)
        results.append(
            StructureMeasurement(name, voxels, voxels * voxel_mm3, mean_mm, min_mm, remark)
        )
    return tuple(results)


def plate_thickness(
    mask: np.ndarray,
    spacing: Sequence[float],
    *,
    rim_mm: float = 2.0,
    percentile: float = 5.0,
) -> tuple[float | None, float | None]:
    """Mean and minimum thickness of one plate (the rule is in the module text).

    Parameters
    ----------
    mask
        3-D boolean mask of the plate (any box around it).
    spacing
        ``(slice, row, column)`` voxel spacing in mm.
    rim_mm, percentile
        As in :func:`measure_structures`.

    Returns
    -------
    tuple[float | None, float | None]
        ``(mean_mm, min_mm)``; ``(None, None)`` for an empty mask, one too small to have a
        sheet away from its rim, or one that cannot be a plate (larger than
        :data:`MAX_PLATE_MM3` or deeper than :data:`MAX_DEPTH_MM`).
    """
    sampling = _check_spacing(spacing)
    _check_options(rim_mm, percentile)
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise ValueError(f'Argument "mask" should be 3-D, not of shape {mask.shape}.')
    mean_mm, min_mm, _ = _thickness(mask, sampling, rim_mm, percentile)
    return mean_mm, min_mm


def _thickness(
    mask: np.ndarray, sampling: np.ndarray, rim_mm: float, percentile: float
) -> tuple[float | None, float | None, str]:
    """:func:`plate_thickness` of a checked 3-D boolean mask, and why it has none ("" if it
    has one, or is empty or all rim)."""
    voxels = int(np.count_nonzero(mask))
    if voxels == 0:
        return None, None, ""
    volume_mm3 = voxels * float(np.prod(sampling))
    if volume_mm3 > MAX_PLATE_MM3:
        why = f"{volume_mm3 / 1000:.0f} cm3, too large for a cartilage plate"
        return None, None, f"thickness not measured: {why} (at most {MAX_PLATE_MM3 / 1000:.0f} cm3)"
    points, deepest = _medial_sheet(np.pad(mask, 1), sampling)
    if deepest > MAX_DEPTH_MM:
        why = f"{deepest:.1f} mm deep, too thick for a cartilage plate"
        return None, None, f"thickness not measured: {why} (at most {2 * MAX_DEPTH_MM:.0f} mm)"
    radius = max(1.5 * rim_mm, 2.0 * deepest, 2.0 * float(sampling.max()))
    ball = _ball(radius, sampling)
    most = min(MAX_SHEET_POINTS, max(_MIN_SHEET_POINTS, _MAX_BALL_SUMS // len(ball[0])))
    if len(points) > most:
        chosen = np.random.default_rng(0).choice(len(points), most, replace=False)
        points = points[np.sort(chosen)]
    pad = np.ceil(radius / sampling).astype(int) + 1
    plate = np.pad(mask, [(int(p), int(p)) for p in pad])
    points = points - 1 + pad

    moments = _ball_moments(plate, points, ball, sampling)
    count = moments[:, 0]
    centroid = moments[:, 1:4] / count[:, None]
    second = np.empty((len(points), 3, 3))
    for column, (a, b) in enumerate(_PAIRS, start=4):
        second[:, a, b] = second[:, b, a] = moments[:, column] / count
    # Moments about the voxel, not the centroid: half a plate at its edge is thinner across
    # the edge than across the plate about its own centroid, not about the edge.
    spread, axes = np.linalg.eigh(second)
    normal = axes[:, :, 0]
    along = (centroid * normal).sum(axis=1)
    across = np.linalg.norm(centroid - along[:, None] * normal, axis=1) / radius

    voxel_mm3 = float(np.prod(sampling))
    ball_mm3 = float(ball[1].sum()) * voxel_mm3
    volume = count * voxel_mm3 / _edge_fraction(across)
    thickness = _slab_thickness(volume, ball_mm3)
    # A ball centred off the middle by delta holds pi * T * delta**2 less of a flat plate.
    thickness = _slab_thickness(volume + np.pi * thickness * along**2, ball_mm3)
    # A fragment smaller than the ball has no rim shift at its centre, but no extent either.
    extent = spread[:, 1] / _in_plane_moment(thickness, radius)
    interior = (across <= _RIM_SHIFT) & (extent >= _MIN_EXTENT)
    if not np.any(interior):
        return None, None, ""  # all rim: too small to measure
    thickness = thickness[interior]
    return float(thickness.mean()), float(np.percentile(thickness, percentile)), ""


def _medial_sheet(plate: np.ndarray, sampling: np.ndarray) -> tuple[np.ndarray, float]:
    """The medial sheet's voxels ``(n, 3)`` and the largest distance to the background, mm.

    ``plate`` must have background all around it.
    """
    distance, nearest = ndimage.distance_transform_edt(
        plate, sampling=sampling, return_distances=True, return_indices=True
    )
    points = np.argwhere(plate)
    d_p = distance[plate]
    normal = (points - nearest[:, plate].T) * sampling
    steps = _OFFSETS * sampling
    steps /= np.linalg.norm(steps, axis=1, keepdims=True)
    deeper = points + _OFFSETS[np.argmax(normal @ steps.T, axis=1)]
    on_sheet = distance[tuple(deeper.T)] <= d_p
    return points[on_sheet], float(d_p.max())


def _ball(radius: float, sampling: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index offsets ``(n, 3)`` of the voxels of a ball of ``radius`` mm, and their weights.

    A voxel's weight is the part of it inside the sphere, to first order: 1 well inside,
    falling linearly across the sphere over the voxel's width in that direction. Without it
    the voxels a sphere cuts are in or out by the lattice's chance.
    """
    half = np.floor(radius / sampling + 1.0).astype(int)
    grid = np.stack(
        np.meshgrid(*(np.arange(-h, h + 1) for h in half), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    mm = grid * sampling
    length = np.linalg.norm(mm, axis=1)
    width = np.abs(mm) @ sampling / np.maximum(length, 1e-9)
    width[length == 0] = sampling.mean()
    weight = np.clip((radius - length) / width + 0.5, 0.0, 1.0)
    keep = weight > 0
    return grid[keep], weight[keep]


def _ball_moments(
    plate: np.ndarray,
    points: np.ndarray,
    ball: tuple[np.ndarray, np.ndarray],
    sampling: np.ndarray,
) -> np.ndarray:
    """Weighted count, first and second moments (mm) of the plate in the ball around each point.

    Returns ``(n, 10)``: the count, the sums of the offsets along the three axes and the sums
    of their products in :data:`_PAIRS` order. ``plate`` is padded by the ball's radius.
    """
    offsets, weight = ball
    mm = offsets * sampling
    monomials = weight[:, None] * np.column_stack(
        [np.ones(len(mm)), mm, *(mm[:, a] * mm[:, b] for a, b in _PAIRS)]
    )
    flat_plate = plate.ravel()
    strides = np.asarray(plate.strides) // plate.itemsize
    flat_points = points @ strides
    flat_ball = offsets @ strides
    monomials = monomials.astype(np.float32)
    moments = np.empty((len(points), monomials.shape[1]))
    block = max(1, _BLOCK_ELEMENTS // len(flat_ball))
    for start in range(0, len(points), block):
        index = flat_points[start : start + block, None] + flat_ball[None, :]
        moments[start : start + block] = flat_plate[index].astype(np.float32) @ monomials
    return moments


def _edge_fraction(shift: np.ndarray) -> np.ndarray:
    """The fraction of a disc inside a straight edge, from its centroid's shift in radii.

    A disc whose centre lies ``x`` radii inside the edge keeps
    ``A(x) = pi - acos(x) + x sqrt(1 - x^2)`` of its ``pi``, and its centroid shifts by
    ``2/3 (1 - x^2)^1.5 / A(x)``, which falls from ``4 / (3 pi)`` at the edge to 0.
    """
    x = np.linspace(0.0, 1.0, 201)
    area = np.pi - np.arccos(x) + x * np.sqrt(1.0 - x**2)
    centroid = (2.0 / 3.0) * (1.0 - x**2) ** 1.5 / area
    return np.interp(shift, centroid[::-1], (area / np.pi)[::-1])


def _in_plane_moment(thickness: np.ndarray, radius: float) -> np.ndarray:
    """Mean squared in-plane offset along one axis of a plate ``thickness`` thick in a ball.

    ``pi/4 * integral (R^2 - z^2)^2 dz / volume`` over ``|z| <= T / 2``; ``R^2 / 4`` for a
    thin plate.
    """
    h = np.minimum(np.asarray(thickness, dtype=float), 2.0 * radius) / 2.0
    r2 = radius**2
    integral = 2.0 * (r2**2 * h - 2.0 * r2 * h**3 / 3.0 + h**5 / 5.0)
    volume = np.pi * (r2 * 2.0 * h - (2.0 * h) ** 3 / 12.0)
    return np.where(volume > 0, np.pi / 4.0 * integral / np.maximum(volume, 1e-12), r2 / 4.0)


def _slab_thickness(volume: np.ndarray, ball_mm3: float) -> np.ndarray:
    """Thickness ``T`` of the flat plate through a ball's centre that fills ``volume`` of it.

    A ball of radius ``R`` holds ``pi (R^2 T - T^3 / 12)`` of the plate; with ``T = 2 R x``
    that is ``x^3 - 3 x + q = 0``, ``q = 1.5 volume / (pi R^3)`` in ``[0, 2]``, whose root in
    ``[0, 1]`` is ``2 cos((2 pi - acos(-q / 2)) / 3)``. ``R`` is that of a sphere of the
    discrete ball's volume.
    """
    radius = (3.0 * ball_mm3 / (4.0 * np.pi)) ** (1.0 / 3.0)
    q = np.clip(1.5 * np.asarray(volume, dtype=float) / (np.pi * radius**3), 0.0, 2.0)
    x = 2.0 * np.cos((2.0 * np.pi - np.arccos(-q / 2.0)) / 3.0)
    return np.asarray(2.0 * radius * x)
