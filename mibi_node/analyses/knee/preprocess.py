"""The knee analysis' preprocessing (seed 003 [0013]) and its inverse.

Seed 003 preprocesses every knee MR image by filter denoising, 3-D reconstruction and
normalisation, in that order. Here, for a sagittal 3-D series of ``(slice, row, column)``
spacing ``s`` (typically 1-1.5 mm between slices, 0.3-0.7 mm in plane):

**Denoising** (:func:`denoise_volume`): a Gaussian filter with its sigma given in mm, so it
smooths the same physical distance along every axis of an anisotropic grid (in voxels
``sigma_mm / s``; an axis whose sigma falls below 0.2 voxels is left alone). MR magnitude
noise is Rician, close to Gaussian at cartilage's signal level. The demo's 0.35 mm (0.44 px
in plane at 0.8 mm) takes about a quarter off white noise's standard deviation and moves
no plate edge: it is well under the 1.5-3 mm plate thickness. A 3 x 3 x 3 median removes
more noise but rounds off the thin ends of a plate (on a phantom knee the femoral plate's
grey values spread by 60 % more) and takes thirty times as long (0.6 s against 0.02 s for
48 x 128 x 128 voxels); it is kept as an option (``method = "median"``, window
``size_mm``).

**3-D reconstruction** (:class:`WorkingGrid`, :func:`to_grid`): the volume is resampled by
trilinear interpolation onto an isotropic grid of ``spacing_mm`` (the bundle's working
grid; the demo uses the in-plane spacing, so only the slice axis is interpolated). Both
grids share the corner of voxel 0 and have their voxel centres at ``(index + 0.5) x
spacing``; the working grid covers the source's extent and is zero-padded at the far end to
a multiple of ``multiple`` voxels (what the networks' strides need). Stage 1 reads the
working image average-pooled by an integer ``coarse_factor`` (:func:`coarse_image`), which
is the same construction at ``coarse_factor x spacing_mm``.

**Normalisation**: the project's :class:`~mibi_node.imaging.preprocess.Normalisation`
(divide by a high percentile of the volume, clip to ``[0, clip]``), then ``(x - mean) / std``.

**The inverse** (:func:`probabilities_to_source`): class probabilities on the working grid
(or on a box of it, or on the coarse grid) are interpolated trilinearly at the source
voxels' centres and the label is their argmax, so a plate two source voxels thick, which
nearest-neighbour resampling of labels would thin or break, comes back whole. The result has
exactly the source shape. :func:`labels_to_grid` resamples truth labels the same way
(one-hot probabilities, argmax), for training targets on the working grid.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from scipy import ndimage

from mibi_node.imaging.preprocess import Normalisation, normalise

__all__ = [
    "Box",
    "KneePreprocessing",
    "WorkingGrid",
    "coarse_image",
    "crop",
    "denoise_volume",
    "labels_to_grid",
    "one_hot",
    "preprocess_volume",
    "probabilities_to_source",
    "to_grid",
    "upsample_to_box",
]

logger = logging.getLogger(__name__)

#: A half-open box on a grid: ``((k0, k1), (j0, j1), (i0, i1))``.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]

DenoiseMethod = Literal["gaussian", "median", "none"]


@dataclass(frozen=True)
class KneePreprocessing:
    """Everything that turns a source volume into the networks' input; kept in the bundle.

    Attributes
    ----------
    spacing_mm
        Voxel side of the isotropic working grid (stage 2 works on it).
    coarse_factor
        Stage 1's grid is the working grid average-pooled by this factor.
    denoise
        ``"gaussian"``, ``"median"`` or ``"none"``.
    denoise_mm
        The Gaussian's sigma, or the median window's side, in mm.
    normalisation
        Percentile scaling, clipping and standardisation.
    """

    spacing_mm: float = 0.8
    coarse_factor: int = 3
    denoise: DenoiseMethod = "gaussian"
    denoise_mm: float = 0.35
    normalisation: Normalisation = Normalisation()

    def __post_init__(self) -> None:
        if not (math.isfinite(self.spacing_mm) and self.spacing_mm > 0):
            raise ValueError(f'Argument "spacing_mm" should be positive, got {self.spacing_mm}.')
        if isinstance(self.coarse_factor, bool) or not isinstance(self.coarse_factor, int):
            raise TypeError('Argument "coarse_factor" should be an integer.')
        if self.coarse_factor < 1:
            raise ValueError(f'Argument "coarse_factor" should be >= 1, got {self.coarse_factor}.')
        if self.denoise not in ("gaussian", "median", "none"):
            raise ValueError(
                'Argument "denoise" should be "gaussian", "median" or "none", '
                f"got {self.denoise!r}."
            )
        if not (math.isfinite(self.denoise_mm) and self.denoise_mm >= 0):
            raise ValueError(f'Argument "denoise_mm" should be >= 0, got {self.denoise_mm}.')

    @property
    def background(self) -> float:
        """The normalised value of a zero grey value (the padding's value)."""
        norm = self.normalisation
        return float((0.0 - norm.mean[0]) / norm.std[0])

    @property
    def coarse_spacing_mm(self) -> float:
        """Voxel side of stage 1's grid."""
        return self.spacing_mm * self.coarse_factor


@dataclass(frozen=True)
class WorkingGrid:
    """The isotropic working grid of one source volume and the map between the two.

    Attributes
    ----------
    source_shape, source_spacing
        ``(slice, row, column)`` shape and spacing (mm) of the source volume.
    spacing
        The working grid's voxel side in mm.
    extent
        Working voxels that cover the source (the rest, up to :attr:`shape`, is padding).
    shape
        The working grid's shape, a multiple of the padding multiple on every axis.
    """

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    spacing: float
    extent: tuple[int, int, int]
    shape: tuple[int, int, int]

    @classmethod
    def create(
        cls,
        source_shape: Sequence[int],
        source_spacing: Sequence[float],
        spacing: float,
        multiple: int = 1,
    ) -> WorkingGrid:
        """The grid of ``spacing`` mm covering a source volume, padded to ``multiple``."""
        shape3 = tuple(int(n) for n in source_shape)
        spacing3 = tuple(float(s) for s in source_spacing)
        if len(shape3) != 3 or min(shape3) < 1:
            raise ValueError(f'Argument "source_shape" should be 3 positive sizes, got {shape3}.')
        if len(spacing3) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing3):
            raise ValueError(f'Argument "source_spacing" should be 3 positive mm, got {spacing3}.')
        if multiple < 1:
            raise ValueError(f'Argument "multiple" should be >= 1, got {multiple}.')
        extent = tuple(
            max(1, math.ceil(n * s / spacing - 1e-6)) for n, s in zip(shape3, spacing3, strict=True)
        )
        padded = tuple(-(-e // multiple) * multiple for e in extent)
        return cls(shape3, spacing3, float(spacing), extent, padded)  # type: ignore[arg-type]

    def source_in_grid(self, axis: int, spacing: float | None = None) -> np.ndarray:
        """Each source voxel centre's coordinate along ``axis`` in grid-voxel units.

        ``spacing`` selects another grid of the same corner (the coarse grid), default this.
        """
        g = self.spacing if spacing is None else spacing
        k = np.arange(self.source_shape[axis], dtype=np.float64)
        return (k + 0.5) * self.source_spacing[axis] / g - 0.5

    def grid_in_source(self, axis: int) -> np.ndarray:
        """Each working voxel centre's coordinate along ``axis`` in source-voxel units."""
        q = np.arange(self.extent[axis], dtype=np.float64)
        return (q + 0.5) * self.spacing / self.source_spacing[axis] - 0.5

    def box_to_source(self, box: Box) -> Box:
        """The source voxels whose centres fall inside a working-grid box (half open)."""
        out = []
        for axis, (start, stop) in enumerate(box):
            c = self.source_in_grid(axis)
            inside = np.flatnonzero((c >= start - 0.5) & (c < stop - 0.5))
            if inside.size == 0:
                out.append((0, 0))
            else:
                out.append((int(inside[0]), int(inside[-1]) + 1))
        return (out[0], out[1], out[2])


def denoise_volume(
    image: np.ndarray,
    spacing: Sequence[float],
    method: DenoiseMethod = "gaussian",
    size_mm: float = 0.35,
) -> np.ndarray:
    """The filtered volume (float32), see the module text for the choice of filter.

    Parameters
    ----------
    image
        ``(slice, row, column)`` grey values.
    spacing
        Their spacing in mm.
    method
        ``"gaussian"`` (sigma ``size_mm``), ``"median"`` (window ``size_mm`` a side, at least
        one voxel) or ``"none"``.
    """
    array = np.asarray(image, dtype=np.float32)
    if method == "none" or size_mm <= 0:
        return array
    if method == "gaussian":
        sigma = [size_mm / float(s) for s in spacing]
        sigma = [value if value >= 0.2 else 0.0 for value in sigma]
        if not any(sigma):
            return array
        return ndimage.gaussian_filter(array, sigma=sigma, mode="nearest", truncate=3.0)
    if method == "median":
        size = [max(1, 2 * int(round(size_mm / float(s) / 2.0)) + 1) for s in spacing]
        return ndimage.median_filter(array, size=size, mode="nearest")
    raise ValueError(f'Argument "method" should be "gaussian", "median" or "none", got {method!r}.')


def _linear_along(x: torch.Tensor, coords: np.ndarray, dim: int) -> torch.Tensor:
    """Linear interpolation of ``x`` along ``dim`` at ``coords`` (clamped to the edges)."""
    n = x.shape[dim]
    c = torch.as_tensor(np.clip(coords, 0.0, n - 1.0), dtype=torch.float64)
    lower = c.floor().long().clamp(max=n - 1)
    upper = (lower + 1).clamp(max=n - 1)
    weight = (c - lower.double()).to(x.dtype)
    shape = [1] * x.ndim
    shape[dim] = -1
    weight = weight.view(shape)
    low, high = x.index_select(dim, lower), x.index_select(dim, upper)
    return low + (high - low) * weight


def _trilinear(x: torch.Tensor, coords: Sequence[np.ndarray]) -> torch.Tensor:
    """Separable trilinear interpolation of the last three axes at per-axis coordinates."""
    offset = x.ndim - 3
    for axis, c in enumerate(coords):
        x = _linear_along(x, c, offset + axis)
    return x


def to_grid(image: np.ndarray, grid: WorkingGrid, *, fill: float = 0.0) -> np.ndarray:
    """A source-grid volume resampled onto the working grid (trilinear), padded with ``fill``."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
    resampled = _trilinear(x, [grid.grid_in_source(axis) for axis in range(3)])
    out = np.full(grid.shape, fill, dtype=np.float32)
    e = grid.extent
    out[: e[0], : e[1], : e[2]] = resampled.numpy()
    return out


def one_hot(labels: np.ndarray, classes: int) -> np.ndarray:
    """``(classes, ...)`` float32 one-hot of a label volume."""
    array = np.asarray(labels)
    return (array[None] == np.arange(classes).reshape(-1, *([1] * array.ndim))).astype(np.float32)


def labels_to_grid(labels: np.ndarray, grid: WorkingGrid, classes: int = 5) -> np.ndarray:
    """Source labels on the working grid: one-hot, resampled trilinearly, argmax (uint8).

    The padding is background. Only the working voxels whose interpolation reaches a
    labelled source voxel are computed; the rest is background without asking.
    """
    array = np.asarray(labels)
    out = np.zeros(grid.shape, dtype=np.uint8)
    where = [
        np.flatnonzero(array.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)
    ]
    if where[0].size == 0:
        return out
    boxes, coords = [], []
    for axis in range(3):
        lo, hi = max(int(where[axis][0]) - 1, 0), min(int(where[axis][-1]) + 2, array.shape[axis])
        c = grid.grid_in_source(axis)
        inside = np.flatnonzero((c > lo - 1) & (c < hi))
        if inside.size == 0:
            return out
        boxes.append((lo, hi, int(inside[0]), int(inside[-1]) + 1))
        coords.append(c[inside[0] : inside[-1] + 1] - lo)
    part = array[boxes[0][0] : boxes[0][1], boxes[1][0] : boxes[1][1], boxes[2][0] : boxes[2][1]]
    resampled = _trilinear(torch.from_numpy(one_hot(part, classes)), coords)
    (_, _, k0, k1), (_, _, j0, j1), (_, _, i0, i1) = boxes
    out[k0:k1, j0:j1, i0:i1] = resampled.argmax(0).to(torch.uint8).numpy()
    return out


def preprocess_volume(
    image: np.ndarray,
    spacing: Sequence[float],
    config: KneePreprocessing,
    *,
    multiple: int = 1,
) -> tuple[np.ndarray, WorkingGrid]:
    """Denoise, resample to the working grid, normalise: the networks' input.

    Parameters
    ----------
    image
        ``(slice, row, column)`` grey values of the source volume.
    spacing
        Its spacing in mm.
    config
        The bundle's preprocessing.
    multiple
        The working grid's shape is padded to a multiple of this (the caller's strides x
        ``coarse_factor``).

    Returns
    -------
    tuple
        The ``(slice, row, column)`` float32 working volume and its :class:`WorkingGrid`.
    """
    array = np.nan_to_num(np.asarray(image, dtype=np.float32))
    grid = WorkingGrid.create(array.shape, spacing, config.spacing_mm, multiple)
    filtered = denoise_volume(array, grid.source_spacing, config.denoise, config.denoise_mm)
    resampled = to_grid(filtered, grid)
    e = grid.extent
    inside = resampled[: e[0], : e[1], : e[2]]
    norm = config.normalisation
    (scaled,) = normalise([inside], norm)
    mean, std = np.float32(norm.mean[0]), np.float32(norm.std[0])
    out = np.full(grid.shape, (0.0 - mean) / std, dtype=np.float32)
    out[: e[0], : e[1], : e[2]] = (scaled - mean) / std
    return out, grid


def coarse_image(working: torch.Tensor | np.ndarray, factor: int) -> torch.Tensor:
    """Average pooling of a working volume (or a batch ``(B, C, ...)``) by ``factor``."""
    x = torch.as_tensor(working, dtype=torch.float32)
    squeeze = x.ndim == 3
    if squeeze:
        x = x[None, None]
    if factor > 1:
        x = F.avg_pool3d(x, kernel_size=factor, stride=factor)
    return x[0, 0] if squeeze else x


def crop(array: np.ndarray, box: Box, *, fill: float = 0.0) -> np.ndarray:
    """The box of the last three axes of ``array``; where the box leaves it, ``fill``."""
    lead = array.shape[:-3]
    size = tuple(stop - start for start, stop in box)
    out = np.full((*lead, *size), fill, dtype=array.dtype)
    src: list[Any] = [Ellipsis]
    dst: list[Any] = [Ellipsis]
    for (start, stop), n in zip(box, array.shape[-3:], strict=True):
        a, b = max(start, 0), min(stop, n)
        if b <= a:
            return out
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def probabilities_to_source(
    probabilities: torch.Tensor | np.ndarray,
    grid: WorkingGrid,
    *,
    box: Box | None = None,
    spacing: float | None = None,
) -> tuple[np.ndarray, Box]:
    """Labels on the source grid from class probabilities on the working grid.

    Parameters
    ----------
    probabilities
        ``(classes, ...)``, class 0 the background, on the working grid, on ``box`` of it,
        or (with ``spacing``) on another grid of the same corner such as the coarse grid.
    grid
        The study's working grid.
    box
        The working-grid box the probabilities cover (default: all of them, from voxel 0);
        source voxels whose centre lies outside it are background.
    spacing
        The probabilities' voxel side in mm (default: the working grid's).

    Returns
    -------
    tuple
        ``uint8`` labels of exactly the source shape (argmax of the trilinearly interpolated
        probabilities), and the source box the probabilities covered.
    """
    p = torch.as_tensor(probabilities, dtype=torch.float32)
    if p.ndim != 4:
        raise ValueError(f'Argument "probabilities" should be (classes, k, j, i), got {p.shape}.')
    g = grid.spacing if spacing is None else float(spacing)
    if box is None:
        box = ((0, p.shape[1]), (0, p.shape[2]), (0, p.shape[3]))
    source_box: list[tuple[int, int]] = []
    coords = []
    for axis, (start, stop) in enumerate(box):
        c = grid.source_in_grid(axis, g)
        inside = np.flatnonzero((c >= start - 0.5) & (c < stop - 0.5))
        if inside.size == 0:
            empty = ((0, 0), (0, 0), (0, 0))
            return np.zeros(grid.source_shape, dtype=np.uint8), empty
        lo, hi = int(inside[0]), int(inside[-1]) + 1
        source_box.append((lo, hi))
        coords.append(c[lo:hi] - start)
    labels = np.zeros(grid.source_shape, dtype=np.uint8)
    values = _trilinear(p, coords).argmax(0).to(torch.uint8).numpy()
    (k0, k1), (j0, j1), (i0, i1) = source_box
    labels[k0:k1, j0:j1, i0:i1] = values
    return labels, (source_box[0], source_box[1], source_box[2])


def upsample_to_box(coarse: torch.Tensor, factor: int, box: Box) -> torch.Tensor:
    """Coarse-grid values ``(C, ...)`` interpolated (trilinear) at a working-grid box's voxels.

    The coarse grid is the working grid average-pooled by ``factor``, so working voxel ``q``
    lies at coarse coordinate ``(q + 0.5) / factor - 0.5``; beyond the coarse grid the edge
    values hold.
    """
    coords = [
        (np.arange(start, stop, dtype=np.float64) + 0.5) / factor - 0.5 for start, stop in box
    ]
    return _trilinear(torch.as_tensor(coarse, dtype=torch.float32), coords)
