"""Spine training data: annotated studies read as the node reads them, and augmentation.

:func:`load_spine_studies` pairs the challenge's ``annotations.json`` with the DICOM files
beside it (any folder layout: files are found by their UIDs) and reads each annotated
study with the analysis' reader, the annotated instance as middle slice. An annotation
whose instance is missing, or whose study the reader refuses, is skipped with a warning
naming it. The augmentations move the keypoints with the image (:func:`augment_keypoints`)
and jitter the classifier's crops the way predicted points differ from annotated ones
(:func:`context_crops`, :func:`jitter_crops`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from mibi_node.analyses.spine.levels import LEVELS
from mibi_node.analyses.spine.model import crop_boxes
from mibi_node.analyses.spine.result import SpineInput
from mibi_node.analyses.spine.runner import study_rois
from mibi_node.errors import ConfigError, MibiNodeError
from mibi_node.imaging.preprocess import Geometry

__all__ = [
    "CONTEXT",
    "SpineStudy",
    "annotations_fingerprint",
    "augment_keypoints",
    "context_crops",
    "fill_missing",
    "jitter_crops",
    "load_spine_studies",
    "to_model_pixels",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class SpineStudy:
    """One annotated study as training and evaluation use it.

    Attributes
    ----------
    input
        What the reader made of the study (the annotated instance as middle slice).
    points
        (11, 2) annotated row, column per level in :data:`LEVELS` order (NaN: not annotated).
    labels
        The class key per level ("" when not annotated).
    """

    input: SpineInput
    points: np.ndarray
    labels: tuple[str, ...]

    @property
    def valid(self) -> np.ndarray:
        """(11,) bool: the level is annotated."""
        return np.isfinite(self.points).all(axis=1)


def _index_dicom(data: Path) -> dict[str, list[Path]]:
    """Study Instance UID -> its files, and SOP Instance UID -> [its file], from headers."""
    import pydicom

    index: dict[str, list[Path]] = {}
    found = [
        Path(top) / name for top, _, names in os.walk(data, followlinks=True) for name in names
    ]
    for path in sorted(found):
        if path.name == "annotations.json" or path.suffix.lower() in (".json", ".csv", ".txt"):
            continue
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID", "SOPInstanceUID"]
            )
        except Exception:  # not DICOM, or damaged: the reader names it if it matters
            continue
        study, sop = str(ds.get("StudyInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if study and sop:
            index.setdefault(study, []).append(path)
            index[f"sop:{sop}"] = [path]
    return index


def load_spine_studies(
    data: Path | str, *, channels: int = 3, warn: Progress | None = None
) -> list[SpineStudy]:
    """The annotated studies of a folder, read as the node reads them.

    An annotation whose study or instance is not in the folder, or whose study the reader
    cannot use, is skipped with a warning naming it.

    Raises
    ------
    ConfigError
        The folder or its ``annotations.json`` is missing or unreadable, or no annotated
        study could be read.
    """
    from mibi_node.analyses.spine.annotations import read_annotations
    from mibi_node.analyses.spine.reader import read_spine_study

    data = Path(data)
    say = warn or (lambda message: logger.warning("%s", message))
    if not data.is_dir():
        raise ConfigError(f"spine data {data}: no such folder")
    path = data / "annotations.json"
    if not path.is_file():
        raise ConfigError(f"spine data {data}: it has no annotations.json")
    try:
        annotations = read_annotations(path)
    except MibiNodeError as exc:
        raise ConfigError(str(exc)) from None  # it names the file
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not in the challenge's annotation format ({exc})") from None
    index = _index_dicom(data)
    studies = []
    for annotation in annotations:
        where = f"{path}: study {annotation.study_uid}"
        if f"sop:{annotation.instance_uid}" not in index:
            say(f"{where}: instance {annotation.instance_uid} is not in {data}; skipped")
            continue
        try:
            study_input = read_spine_study(
                index.get(annotation.study_uid, index[f"sop:{annotation.instance_uid}"]),
                channels=channels,
                middle_sop_instance_uid=annotation.instance_uid,
            )
        except MibiNodeError as exc:
            say(f"{where}: {exc}; skipped")
            continue
        points = np.full((len(LEVELS), 2), np.nan)
        labels = [""] * len(LEVELS)
        for point in annotation.points:
            if point.level in LEVELS:
                i = LEVELS.index(point.level)
                points[i] = (point.row, point.col)
                labels[i] = point.label
        if np.isfinite(points).all(axis=1).sum() < 2:
            say(f"{where}: fewer than two annotated levels; skipped")
            continue
        studies.append(SpineStudy(study_input, points, tuple(labels)))
    if not studies:
        raise ConfigError(f"spine data {data}: no annotated study could be read")
    return studies


def fill_missing(points: np.ndarray) -> np.ndarray:
    """Levels without a point get one interpolated along the level index (for crop sizes)."""
    out = points.copy()
    known = np.flatnonzero(np.isfinite(points).all(axis=1))
    if len(known) < len(LEVELS):
        index = np.arange(len(LEVELS))
        for axis in (0, 1):
            slope = np.polyfit(known, points[known, axis], 1)
            filled = np.interp(index, known, points[known, axis])
            outside = (index < known[0]) | (index > known[-1])
            filled[outside] = np.polyval(slope, index[outside])
            out[:, axis] = filled
    return out


def to_model_pixels(geometry: Geometry, points: np.ndarray) -> np.ndarray:
    """Slice pixels -> model-input pixels (the inverse of :meth:`Geometry.to_source`)."""
    factor = max(geometry.source_shape) / geometry.size
    pad = np.asarray(geometry.pad, dtype=np.float64)
    return (points + pad + 0.5) / factor - 0.5


def annotations_fingerprint(data: Path) -> str:
    """sha256 of the folder's ``annotations.json`` (the bundle's provenance)."""
    return hashlib.sha256((Path(data) / "annotations.json").read_bytes()).hexdigest()


def _uniform(low: float, high: float, n: int, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def augment_keypoints(
    x: torch.Tensor,
    points: torch.Tensor,
    generator: torch.Generator,
    *,
    scale: tuple[float, float] = (0.9, 1.1),
    rotate_deg: float = 8.0,
    shift: float = 0.08,
    gain: tuple[float, float] = (0.85, 1.15),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random scale, rotation, shift and gain of a batch; the points follow the image.

    Parameters
    ----------
    x
        (N, C, size, size) model inputs.
    points
        (N, 11, 2) row, column in model-input pixels.
    generator
        Source of the randomness.
    scale, rotate_deg, shift, gain
        Zoom range, largest rotation, largest shift (a fraction of the side) and intensity
        gain range.
    """
    n, _, size, _ = x.shape
    zoom = _uniform(*scale, n, generator)
    angle = _uniform(-1.0, 1.0, n, generator) * math.radians(rotate_deg)
    moves = _uniform(-1.0, 1.0, 2 * n, generator).reshape(n, 2) * 2 * shift
    # theta maps output (x, y) in [-1, 1] to input (x, y): input = A @ output + t
    a = torch.zeros(n, 2, 2)
    a[:, 0, 0] = torch.cos(angle) / zoom
    a[:, 0, 1] = -torch.sin(angle) / zoom
    a[:, 1, 0] = torch.sin(angle) / zoom
    a[:, 1, 1] = torch.cos(angle) / zoom
    theta = torch.cat([a, moves[:, :, None]], dim=2)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out * _uniform(*gain, n, generator)[:, None, None, None]
    xy = (points.flip(-1) + 0.5) * 2.0 / size - 1.0  # (n, 11, 2) as (x, y)
    moved = torch.linalg.solve(a[:, None], (xy - moves[:, None])[..., None])[..., 0]
    return out, ((moved + 1.0) * size / 2.0 - 0.5).flip(-1)


#: Side of the stored context patch around a point, in crop sides (room for the jitter).
CONTEXT = 1.5


def context_crops(
    study: SpineStudy, source: np.ndarray, scale: float, size: int
) -> tuple[torch.Tensor, list[str], list[str], list[float]]:
    """Patches of ``CONTEXT`` x the crop side around each annotated point (jittered later).

    Parameters
    ----------
    study
        The annotated study.
    source
        Its normalised slice stack (:func:`~mibi_node.analyses.spine.runner.prepare_spine_input`).
    scale, size
        The crop rule: side = ``scale`` x the neighbours' distance, resampled to ``size``.

    Returns
    -------
    tuple
        The patches (K, C, CONTEXT x size, ...), their levels and labels, and the
        millimetres per crop pixel.
    """
    filled = fill_missing(study.points)
    rois = study_rois(source, filled, scale * CONTEXT, round(size * CONTEXT))
    sides, _ = crop_boxes(filled, scale)
    keep = np.flatnonzero(study.valid)
    spacing = float(np.mean(study.input.pixel_spacing))
    return (
        rois[torch.as_tensor(keep)],
        [LEVELS[i] for i in keep],
        [study.labels[i] for i in keep],
        [spacing * float(sides[i]) / size for i in keep],
    )


def jitter_crops(
    patches: torch.Tensor,
    mm_per_px: torch.Tensor,
    size: int,
    generator: torch.Generator,
    *,
    jitter_mm: float = 1.5,
    jitter_scale: float = 0.1,
    jitter_deg: float = 5.0,
) -> torch.Tensor:
    """Crops of ``size`` px from the context patches, moved, scaled and turned at random.

    The centre moves by a normal shift of ``jitter_mm`` standard deviation, the side by up
    to ``jitter_scale`` and the angle by a normal turn of ``jitter_deg``: how a predicted
    point and its predicted neighbours differ from the annotated ones.
    """
    n = len(patches)
    context = CONTEXT
    scale = (1.0 + _uniform(-1, 1, n, generator) * jitter_scale) / context
    angle = torch.randn(n, generator=generator) * math.radians(jitter_deg)
    # centre shift in crop pixels -> normalised patch units (the patch is context crops wide)
    shift = torch.randn(n, 2, generator=generator) * (jitter_mm / mm_per_px)[:, None]
    shift = shift * 2.0 / (size * context)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = scale * torch.cos(angle)
    theta[:, 0, 1] = scale * torch.sin(angle)
    theta[:, 1, 0] = -scale * torch.sin(angle)
    theta[:, 1, 1] = scale * torch.cos(angle)
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, [n, patches.shape[1], size, size], align_corners=False)
    return F.grid_sample(patches, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
