"""Slice detections linked into 3-D lesions: 2-D NMS, tracking through slices, lesion NMS.

Mask R-CNN sees one axial slice (or a slab around it) at a time; a lesion is seen on every
slice it crosses. This module turns the per-slice detections into 3-D lesions with a mask.

How the detections are linked
-----------------------------
1. 2-D NMS per slice and class on the boxes (``torchvision.ops.batched_nms``, box IoU
   ``> nms_iou`` suppresses the lower score), as Mask R-CNN's own post-processing does.
2. Tracking, slice by slice in increasing ``k`` and per class: an open lesion whose last
   detection lies at most ``max_gap + 1`` slices back may take one detection of the current
   slice whose 2-D *mask* IoU with that last detection is ``>= min_iou``. Pairs are taken
   greedily by decreasing IoU (ties: the earlier lesion, then the higher score), each lesion
   and each detection at most once; a detection left over opens a new lesion. Boxes that do
   not overlap (``torchvision.ops.box_iou`` 0) are never compared mask to mask.
3. Lesions seen on fewer than ``min_slices`` slices are dropped.
4. Score: the mean of the ``top_k`` (3) best slice scores (all of them when seen on fewer).
   The maximum (``top_k=1``) lets one overconfident slice carry a spurious lesion; the mean of
   every slice punishes long lesions for their thin, weakly detected ends. Three slices
   rewards a lesion that is confidently seen more than once without either failure.
5. Lesion NMS, class-agnostic (one voxel is one finding): by decreasing score, a lesion whose
   3-D mask IoU with a kept lesion is ``> lesion_nms_iou`` is dropped.

A bridged gap leaves the skipped slice empty in the lesion's mask: the mask is the union of
the linked slice masks, nothing is interpolated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

__all__ = ["Lesion3D", "SliceDetection", "lesion_iou", "link_detections"]

logger = logging.getLogger(__name__)

Box2D = tuple[int, int, int, int]
Box3D = tuple[int, int, int, int, int, int]


def _int(name: str, value: object, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f'Argument "{name}" should be an integer, got {type(value).__name__}.')
    if value < minimum:
        raise ValueError(f'Argument "{name}" should be >= {minimum}, got {value!r}.')
    return int(value)


def _fraction(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f'Argument "{name}" should be a number, got {type(value).__name__}.')
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f'Argument "{name}" should be in [0, 1], got {value!r}.')
    return float(value)


@dataclass(frozen=True)
class SliceDetection:
    """One detection on one axial slice.

    Attributes
    ----------
    k
        Slice index in the volume (axis 0).
    label
        Class label value (:data:`~mibi_node.analyses.lung.labels.LABEL_OF`), 1 or more.
    score
        The detector's confidence in [0, 1].
    box
        ``(y0, x0, y1, x1)`` in whole pixels, half-open (row ``y1`` and column ``x1`` are
        outside), as numpy slices count.
    mask
        Boolean, *cropped to the box*: shape ``(y1 - y0, x1 - x0)``. A full 512 x 512 mask per
        detection would cost 256 kB each; :meth:`from_mask` crops a full-slice mask.
    """

    k: int
    label: int
    score: float
    box: Box2D
    mask: np.ndarray = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        _int("k", self.k)
        _int("label", self.label, 1)
        object.__setattr__(self, "score", _fraction("score", self.score))
        if len(self.box) != 4:
            raise ValueError(f'Argument "box" should be (y0, x0, y1, x1), got {self.box!r}.')
        box = tuple(_int("box", v) for v in self.box)
        if box[2] <= box[0] or box[3] <= box[1]:
            raise ValueError(f'Argument "box" should have y1 > y0 and x1 > x0, got {box!r}.')
        mask = np.asarray(self.mask)
        if mask.dtype != np.bool_:
            raise TypeError(f'Argument "mask" should be a bool array, got {mask.dtype}.')
        if mask.shape != (box[2] - box[0], box[3] - box[1]):
            raise ValueError(
                f'Argument "mask" should have the box\'s shape {(box[2] - box[0], box[3] - box[1])}'
                f", got {mask.shape}."
            )
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "mask", mask)

    @classmethod
    def from_mask(
        cls, k: int, label: int, score: float, mask: np.ndarray, box: Box2D | None = None
    ) -> SliceDetection:
        """A detection from a full-slice mask, cropped to ``box`` (default: the mask's extent).

        Raises
        ------
        ValueError
            When the mask is empty and no box is given.
        """
        full = np.asarray(mask, dtype=bool)
        if full.ndim != 2:
            raise ValueError(f'Argument "mask" should be 2-D, got shape {full.shape}.')
        if box is None:
            rows, cols = np.flatnonzero(full.any(1)), np.flatnonzero(full.any(0))
            if len(rows) == 0:
                raise ValueError('Argument "mask" should not be empty when no box is given.')
            box = (int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1)
        y0, x0, y1, x1 = box
        return cls(k, label, score, box, full[y0:y1, x0:x1].copy())


@dataclass(frozen=True)
class Lesion3D:
    """A lesion in a volume: its mask cropped to its bounding box, and where that box lies.

    Attributes
    ----------
    label
        Class label value.
    score
        Confidence (for a linked lesion: the mean of its best slice scores).
    offset
        ``(k0, j0, i0)``: the volume index of ``mask[0, 0, 0]``.
    mask
        Boolean volume, the lesion's voxels inside its bounding box (empty planes allowed
        where a gap was bridged).
    slice_scores
        The scores of the linked detections, in slice order (empty for a truth lesion).
    """

    label: int
    score: float
    offset: tuple[int, int, int]
    mask: np.ndarray = field(repr=False, compare=False)
    slice_scores: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        _int("label", self.label, 1)
        object.__setattr__(self, "score", _fraction("score", self.score))
        if len(self.offset) != 3:
            raise ValueError(f'Argument "offset" should be (k0, j0, i0), got {self.offset!r}.')
        object.__setattr__(self, "offset", tuple(_int("offset", v) for v in self.offset))
        mask = np.asarray(self.mask)
        if mask.dtype != np.bool_ or mask.ndim != 3:
            raise TypeError('Argument "mask" should be a 3-D bool array.')
        if not mask.any():
            raise ValueError('Argument "mask" should hold at least one voxel.')
        object.__setattr__(self, "mask", mask)

    @classmethod
    def from_mask(cls, label: int, score: float, mask: np.ndarray) -> Lesion3D:
        """A lesion from a full-volume mask, cropped to its bounding box."""
        full = np.asarray(mask, dtype=bool)
        if full.ndim != 3 or not full.any():
            raise ValueError('Argument "mask" should be a 3-D volume with at least one voxel.')
        lo = [
            int(np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != d)))[0])
            for d in range(3)
        ]
        hi = [
            int(np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != d)))[-1]) + 1
            for d in range(3)
        ]
        crop = full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]].copy()
        return cls(label, score, (lo[0], lo[1], lo[2]), crop)

    @property
    def voxels(self) -> int:
        """The number of voxels in the lesion."""
        return int(np.count_nonzero(self.mask))

    @property
    def bbox(self) -> Box3D:
        """``(k0, j0, i0, k1, j1, i1)``, half-open, of the stored mask's box."""
        k0, j0, i0 = self.offset
        dk, dj, di = self.mask.shape
        return (k0, j0, i0, k0 + dk, j0 + dj, i0 + di)

    @property
    def slices(self) -> tuple[int, ...]:
        """The slice indices holding at least one voxel of the lesion."""
        planes = np.flatnonzero(self.mask.any(axis=(1, 2)))
        return tuple(int(p) + self.offset[0] for p in planes)

    @property
    def centroid(self) -> tuple[float, float, float]:
        """Mean voxel index ``(k, j, i)`` in volume coordinates."""
        idx = np.argwhere(self.mask).mean(axis=0)
        return (
            float(idx[0]) + self.offset[0],
            float(idx[1]) + self.offset[1],
            float(idx[2]) + self.offset[2],
        )

    def dense(self, shape: Sequence[int]) -> np.ndarray:
        """The mask placed in a full volume of ``shape``."""
        out = np.zeros(tuple(shape), dtype=bool)
        k0, j0, i0, k1, j1, i1 = self.bbox
        out[k0:k1, j0:j1, i0:i1] = self.mask
        return out

    def contains(self, point: Sequence[float]) -> bool:
        """Whether the voxel nearest ``point`` (k, j, i) belongs to the lesion."""
        local = [int(np.floor(p + 0.5)) - o for p, o in zip(point, self.offset, strict=True)]
        if any(v < 0 or v >= n for v, n in zip(local, self.mask.shape, strict=True)):
            return False
        return bool(self.mask[local[0], local[1], local[2]])


def _overlap(a: np.ndarray, a_off: Sequence[int], b: np.ndarray, b_off: Sequence[int]) -> int:
    """Voxels (or pixels) set in both cropped masks, placed at their offsets."""
    lo = [max(p, q) for p, q in zip(a_off, b_off, strict=True)]
    hi = [min(p + n, q + m) for p, n, q, m in zip(a_off, a.shape, b_off, b.shape, strict=True)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return 0
    sa = tuple(slice(low - p, h - p) for low, h, p in zip(lo, hi, a_off, strict=True))
    sb = tuple(slice(low - q, h - q) for low, h, q in zip(lo, hi, b_off, strict=True))
    return int(np.count_nonzero(a[sa] & b[sb]))


def _iou(a: np.ndarray, a_off: Sequence[int], b: np.ndarray, b_off: Sequence[int]) -> float:
    inter = _overlap(a, a_off, b, b_off)
    union = int(np.count_nonzero(a)) + int(np.count_nonzero(b)) - inter
    return inter / union if union else 0.0


def lesion_iou(a: Lesion3D, b: Lesion3D) -> float:
    """3-D mask IoU of two lesions (0 when their boxes do not meet)."""
    return _iou(a.mask, a.offset, b.mask, b.offset)


def _nms_2d(detections: Sequence[SliceDetection], nms_iou: float) -> list[SliceDetection]:
    if not detections:
        return []
    boxes = torch.tensor(
        [[d.box[1], d.box[0], d.box[3], d.box[2]] for d in detections], dtype=torch.float64
    )
    scores = torch.tensor([d.score for d in detections], dtype=torch.float64)
    # one group per (slice, class): NMS never compares across slices or classes
    keys = {key: n for n, key in enumerate(sorted({(d.k, d.label) for d in detections}))}
    groups = torch.tensor([keys[(d.k, d.label)] for d in detections])
    keep = batched_nms(boxes, scores, groups, nms_iou)
    return [detections[int(i)] for i in keep]


@dataclass
class _Track:
    label: int
    members: list[SliceDetection]

    @property
    def last(self) -> SliceDetection:
        return self.members[-1]


def _link(detections: list[SliceDetection], min_iou: float, max_gap: int) -> list[_Track]:
    tracks: list[_Track] = []
    by_slice: dict[int, list[SliceDetection]] = {}
    for d in detections:
        by_slice.setdefault(d.k, []).append(d)
    for k in sorted(by_slice):
        current = sorted(by_slice[k], key=lambda d: -d.score)
        open_ = [t for t in tracks if 0 < k - t.last.k <= max_gap + 1]
        pairs: list[tuple[float, int, int]] = []
        if open_:
            boxes_t = torch.tensor(
                [[t.last.box[1], t.last.box[0], t.last.box[3], t.last.box[2]] for t in open_],
                dtype=torch.float64,
            )
            boxes_d = torch.tensor(
                [[d.box[1], d.box[0], d.box[3], d.box[2]] for d in current], dtype=torch.float64
            )
            touching = box_iou(boxes_t, boxes_d) > 0
            for t, n in torch.nonzero(touching).tolist():
                last, new = open_[t].last, current[n]
                if last.label != new.label:
                    continue
                iou = _iou(last.mask, last.box[:2], new.mask, new.box[:2])
                if iou >= min_iou:
                    pairs.append((iou, t, n))
        pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
        taken_t: set[int] = set()
        taken_d: set[int] = set()
        for _, t, n in pairs:
            if t in taken_t or n in taken_d:
                continue
            taken_t.add(t)
            taken_d.add(n)
            open_[t].members.append(current[n])
        tracks += [_Track(new.label, [new]) for n, new in enumerate(current) if n not in taken_d]
    return tracks


def _lesion(track: _Track, top_k: int) -> Lesion3D:
    members = track.members
    k0, k1 = members[0].k, members[-1].k + 1
    j0, i0 = min(m.box[0] for m in members), min(m.box[1] for m in members)
    j1, i1 = max(m.box[2] for m in members), max(m.box[3] for m in members)
    mask = np.zeros((k1 - k0, j1 - j0, i1 - i0), dtype=bool)
    for m in members:
        y0, x0, y1, x1 = m.box
        mask[m.k - k0, y0 - j0 : y1 - j0, x0 - i0 : x1 - i0] |= m.mask
    scores = tuple(m.score for m in members)
    best = sorted(scores, reverse=True)[:top_k]
    return Lesion3D(track.label, float(np.mean(best)), (k0, j0, i0), mask, scores)


def link_detections(
    detections: Sequence[SliceDetection],
    shape: Sequence[int],
    *,
    min_iou: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 1,
    nms_iou: float = 0.5,
    lesion_nms_iou: float = 0.3,
    top_k: int = 3,
) -> list[Lesion3D]:
    """Link the detections of a volume's slices into 3-D lesions (see the module docstring).

    Parameters
    ----------
    detections
        Every slice's detections, in any order.
    shape
        The volume's ``(slices, rows, columns)``; every detection must lie inside it.
    min_iou
        2-D mask IoU between a lesion's last detection and the next slice's one to link them.
    max_gap
        Slices a lesion may skip (0: only consecutive slices link).
    min_slices
        Lesions seen on fewer slices are dropped.
    nms_iou
        Box IoU above which 2-D NMS (per slice and class) drops the lower-scoring detection.
    lesion_nms_iou
        3-D mask IoU above which lesion NMS (any classes) drops the lower-scoring lesion.
    top_k
        The lesion's score is the mean of its ``top_k`` best slice scores (1: the maximum).

    Returns
    -------
    list of Lesion3D
        By decreasing score (ties: lower first slice first).
    """
    if isinstance(detections, SliceDetection) or not isinstance(detections, Sequence):
        raise TypeError('Argument "detections" should be a sequence of SliceDetection.')
    if not all(isinstance(d, SliceDetection) for d in detections):
        raise TypeError('Argument "detections" should hold SliceDetection objects.')
    if len(shape) != 3:
        raise ValueError(f'Argument "shape" should be (slices, rows, columns), got {shape!r}.')
    dims = tuple(_int("shape", v, 1) for v in shape)
    min_iou, nms_iou = _fraction("min_iou", min_iou), _fraction("nms_iou", nms_iou)
    lesion_nms_iou = _fraction("lesion_nms_iou", lesion_nms_iou)
    max_gap, min_slices = _int("max_gap", max_gap), _int("min_slices", min_slices, 1)
    top_k = _int("top_k", top_k, 1)
    for d in detections:
        if d.k >= dims[0] or d.box[2] > dims[1] or d.box[3] > dims[2]:
            raise ValueError(f'Argument "detections" holds one outside the volume {dims}: {d!r}.')

    kept = _nms_2d(list(detections), nms_iou)
    tracks = [t for t in _link(kept, min_iou, max_gap) if len(t.members) >= min_slices]
    lesions = sorted((_lesion(t, top_k) for t in tracks), key=lambda s: (-s.score, s.offset[0]))
    out: list[Lesion3D] = []
    for lesion in lesions:
        if all(lesion_iou(lesion, other) <= lesion_nms_iou for other in out):
            out.append(lesion)
    logger.debug(
        "linked %d detections (%d after 2-D NMS) into %d lesions (%d after lesion NMS)",
        len(detections),
        len(kept),
        len(lesions),
        len(out),
    )
    return out
