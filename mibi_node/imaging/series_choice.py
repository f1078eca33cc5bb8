"""Choosing the one series of a study that an analysis reads as a volume.

A 3-D study arrives as loose instances of several series: localisers, series in other
planes or kernels, dose reports. :func:`choose_series` groups the files by series, asks the
analysis' ``judge`` about each series' first header, ranks the candidates by the judge's
rank (higher first) and reads the first one that forms a regular volume
(:func:`~mibi_node.imaging.volume_reader.read_volume`). Every series left out is named with
its reason in the returned warnings, for the status page and the result.

A study without any candidate raises :class:`~mibi_node.errors.MissingPhaseError` (the
wanted series may still come: a scanner sends series as they finish); a study whose
candidates all fail to form a volume, for a reason that will not change (a gap, uneven
spacing), raises :class:`~mibi_node.errors.UnusableStudyError` naming each.

Shared by the knee MR and the lung CT readers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from mibi_node.errors import MissingPhaseError, UnusableStudyError
from mibi_node.imaging.volume import Volume
from mibi_node.imaging.volume_reader import MIN_SLICES, group_series, read_volume

__all__ = [
    "MULTI_FRAME_CLASSES",
    "Candidate",
    "Choice",
    "choose_series",
    "is_multi_frame",
    "series_name",
    "series_plane",
]

#: Enhanced (multi-frame) MR and CT image storage classes, which the volume reader does not read.
MULTI_FRAME_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.4",  # Legacy Converted Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.2.1",  # Enhanced CT Image Storage
    "1.2.840.10008.5.1.4.1.1.2.2",  # Legacy Converted Enhanced CT Image Storage
)


@dataclass(frozen=True)
class Candidate:
    """A series an analysis could read.

    Attributes
    ----------
    name
        How the technologist knows it (:func:`series_name`).
    rank
        Higher ranks are tried first (compared as tuples).
    reason
        Why it fits, for the input's ``reason`` ("axial CT, 300 slices, ...").
    warnings
        Remarks that go into the input's warnings when this series is chosen.
    data
        Whatever else the analysis read from the header (a knee's side).
    """

    name: str
    rank: tuple[Any, ...]
    reason: str
    warnings: tuple[str, ...] = ()
    data: Any = None


@dataclass(frozen=True)
class Choice:
    """The chosen series, read, and what the choice left out."""

    candidate: Candidate
    volume: Volume
    warnings: tuple[str, ...] = field(default_factory=tuple)


#: A judge reads a series' first header and its file count and returns a candidate, or why
#: the series is left out.
Judge = Callable[[Dataset, int], "Candidate | str"]


def series_name(ds: Dataset) -> str:
    """``series 3 'SAG 3D DESS'``, or ``series 3 (no description)``."""
    text = str(ds.get("SeriesDescription", "") or "")
    number = ds.get("SeriesNumber", "?")
    return f"series {number} '{text}'" if text else f"series {number} (no description)"


def series_plane(ds: Dataset) -> str | None:
    """``sagittal``, ``coronal``, ``axial`` or ``oblique`` by the slice normal.

    A plane is named when the normal lies within about 37 degrees of its axis (a component
    of at least 0.8); ``None`` when Image Orientation (Patient) is absent or unusable.
    """
    try:
        values = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    if length < 0.5:
        return None
    normal /= length
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def is_multi_frame(ds: Dataset) -> bool:
    """Whether an instance holds several frames (an Enhanced series)."""
    frames = ds.get("NumberOfFrames")
    try:
        many = frames is not None and int(frames) > 1
    except (TypeError, ValueError):
        many = False
    return str(ds.get("SOPClassUID", "")) in MULTI_FRAME_CLASSES or many


def choose_series(paths: Sequence[Path], judge: Judge, part: str) -> Choice:
    """Choose a study's series by ``judge`` and read it as a volume.

    Parameters
    ----------
    paths
        The study's files, in any order, of any series (non-image instances are ignored).
    judge
        Reads a series' first header (no pixels) and its file count; returns a
        :class:`Candidate` or a sentence saying why the series does not fit.
    part
        What the analysis needs, as the technologist reads it ("axial chest CT series").

    Raises
    ------
    MissingPhaseError
        No series fits, or none has :data:`~mibi_node.imaging.volume_reader.MIN_SLICES`
        slices yet (each series' refusal is listed); it may still arrive.
    UnusableStudyError
        The study has no images, a file cannot be read, or every fitting series fails to
        form a regular volume (each named with its problem).
    """
    if isinstance(paths, (str, Path)):
        raise TypeError('Argument "paths" should be a sequence of paths, not one path.')
    if not paths:
        raise UnusableStudyError("the study has no files")
    groups = group_series(paths)
    if not groups:
        raise UnusableStudyError(f"the study has no images ({len(paths)} non-image files)")
    refusals: list[str] = []
    ranked: list[tuple[Candidate, list[Path]]] = []
    names: list[str] = []
    for members in groups.values():
        header = pydicom.dcmread(members[0], stop_before_pixels=True)
        names.append(series_name(header))
        judged = judge(header, len(members))
        if isinstance(judged, str):
            refusals.append(judged)
        elif len(members) < MIN_SLICES:
            refusals.append(f"{judged.name} has only {len(members)} slice(s) so far")
        else:
            ranked.append((judged, members))
    if not ranked:
        raise MissingPhaseError(
            f"no {part}: {'; '.join(refusals)}", missing=(part,), found=tuple(names)
        )
    ranked.sort(key=lambda pair: pair[0].rank, reverse=True)
    failures: list[str] = []
    for at, (candidate, members) in enumerate(ranked):
        try:
            volume = read_volume(members)
        except UnusableStudyError as error:
            failures.append(f"{candidate.name}: {error}")
            continue
        warnings = [f"{why}; not used" for why in refusals]
        warnings += [f"not used: {failure}" for failure in failures]
        warnings += [f"{other.name} also fits, not used" for other, _ in ranked[at + 1 :]]
        warnings += [*candidate.warnings, *volume.warnings]
        return Choice(candidate, volume, tuple(warnings))
    raise UnusableStudyError(f"no usable {part}: {'; '.join(failures)}")
