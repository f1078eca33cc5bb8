"""Reading one series of single-frame image instances as a 3-D :class:`Volume`.

A series arrives as loose files in any order, and their Instance Numbers may lie; what a
volume needs is in the geometry tags. The reader checks that every file is a single-frame
image of one series and one frame of reference with the same matrix, Pixel Spacing and
Image Orientation (Patient) (within :data:`TOLERANCE`), sorts the slices by the projection
of their Image Position (Patient) on the slice normal (``row_cosines x column_cosines``),
and derives the slice spacing from those positions (Slice Thickness and Spacing Between
Slices are not trusted). It refuses what a volume cannot represent, each time with an
:class:`~mibi_node.errors.UnusableStudyError` whose sentence names the file(s) and the
problem, for the technologist:

- a missing slice (a step more than :data:`GAP_FACTOR` times the median step);
- a slice spacing that varies by more than :data:`SPACING_ERROR` of the median step
  (between :data:`SPACING_WARNING` and that, a warning);
- positions that drift sideways off the normal line (a tilted CT gantry, a mixed series);
- two different images at one position (an exact copy of an image is dropped, with a
  warning, keeping the first by Instance Number);
- multi-frame (Enhanced) instances, which this reader does not read yet;
- fewer than :data:`MIN_SLICES` slices, or a file without Image Position (Patient),
  Image Orientation (Patient) or Pixel Spacing.

Shared by the knee MR and the lung CT analyses.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.volume import Volume, VolumeSlice

__all__ = [
    "GAP_FACTOR",
    "MIN_SLICES",
    "SPACING_ERROR",
    "SPACING_WARNING",
    "TOLERANCE",
    "group_series",
    "read_volume",
]

logger = logging.getLogger(__name__)

#: How far Image Orientation (cosines) and Pixel Spacing (mm) may differ between slices.
TOLERANCE: Final[float] = 1e-3
#: A step longer than this many median steps is a gap (missing slices).
GAP_FACTOR: Final[float] = 1.5
#: Relative deviation of a step from the median step that is refused.
SPACING_ERROR: Final[float] = 0.10
#: Relative deviation of a step from the median step that is reported as a warning.
SPACING_WARNING: Final[float] = 0.01
#: The fewest slices a volume may have.
MIN_SLICES: Final[int] = 3

#: Two positions closer than this (mm, along the normal) are the same position.
_SAME_POSITION_MM = 0.01
_DAMAGED = (
    InvalidDicomError, OSError, ValueError, TypeError, LookupError, AttributeError,
    NotImplementedError, RecursionError, struct.error, EOFError, OverflowError,
)  # fmt: skip
#: Multi-frame image storage classes (Enhanced MR/CT/PET, Legacy Converted Enhanced, ...).
_MULTI_FRAME = {
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.3": "Enhanced MR Color Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.128.1": "Legacy Converted Enhanced PET Image Storage",
    "1.2.840.10008.5.1.4.1.1.130": "Enhanced PET Image Storage",
}


@dataclass(frozen=True)
class _Slice:
    path: Path
    ds: Dataset
    position: np.ndarray  # Image Position (Patient)
    distance: float  # along the normal
    number: int | None  # Instance Number

    @property
    def name(self) -> str:
        return self.path.name


def _read(path: Path, *, pixels: bool) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=not pixels)
    except _DAMAGED as error:
        raise UnusableStudyError(f"{path.name} is damaged or not DICOM ({error})") from None


def group_series(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Group files by Series Instance UID, reading headers only.

    Parameters
    ----------
    paths
        Files of one or more series, in any order.

    Returns
    -------
    dict
        Series Instance UID -> its image files, in the order given and the series in the
        order first seen. Files without Rows/Columns (an SR, a presentation state) are
        left out; a file without a Series Instance UID forms its own group keyed
        ``"no-series-uid/<file name>"``.

    Raises
    ------
    UnusableStudyError
        A file is damaged or not DICOM.
    """
    groups: dict[str, list[Path]] = {}
    for path in map(Path, paths):
        ds = _read(path, pixels=False)
        if "Rows" not in ds or "Columns" not in ds:
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-series-uid/{path.name}")
        groups.setdefault(uid, []).append(path)
    return groups


def _floats(ds: Dataset, path: Path, keyword: str, count: int) -> np.ndarray:
    """A required multi-valued decimal attribute, or an error naming the file."""
    value = ds.get(keyword)
    if value is None or value == "":
        raise UnusableStudyError(f"{path.name} has no {_spaced(keyword)}")
    try:
        values = np.array([float(v) for v in value], dtype=np.float64)
    except _DAMAGED:
        raise UnusableStudyError(f"{path.name} has an unreadable {_spaced(keyword)}") from None
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise UnusableStudyError(
            f"{path.name} has an invalid {_spaced(keyword)} ({count} numbers expected)"
        )
    return values


def _spaced(keyword: str) -> str:
    return {
        "ImagePositionPatient": "Image Position (Patient)",
        "ImageOrientationPatient": "Image Orientation (Patient)",
        "PixelSpacing": "Pixel Spacing",
    }.get(keyword, keyword)


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else float(value)
    except _DAMAGED:
        return None


def _check_single_frame(ds: Dataset, path: Path) -> None:
    sop_class = str(ds.get("SOPClassUID", ""))
    frames = _number(ds, "NumberOfFrames")
    if sop_class in _MULTI_FRAME or (frames is not None and frames > 1):
        kind = _MULTI_FRAME.get(sop_class, f"{int(frames or 0)} frames")
        raise UnusableStudyError(
            f"{path.name} is a multi-frame instance ({kind}); multi-frame (Enhanced) "
            "series are not read yet: send the series as one instance per slice"
        )
    if "Rows" not in ds or "Columns" not in ds:
        raise UnusableStudyError(f"{path.name} is not an image (no Rows/Columns)")


def _geometry(ds: Dataset, path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    position = _floats(ds, path, "ImagePositionPatient", 3)
    orientation = _floats(ds, path, "ImageOrientationPatient", 6)
    spacing = _floats(ds, path, "PixelSpacing", 2)
    if np.any(spacing <= 0):
        raise UnusableStudyError(f"{path.name} has a Pixel Spacing that is not positive")
    rows, cols = orientation[:3], orientation[3:]
    if (abs(np.linalg.norm(rows) - 1) > 0.01 or abs(np.linalg.norm(cols) - 1) > 0.01
            or abs(float(rows @ cols)) > 0.01):  # fmt: skip
        raise UnusableStudyError(
            f"{path.name} has an Image Orientation (Patient) whose cosines are not two "
            "orthogonal unit vectors"
        )
    return position, orientation, spacing


def _same(a: Dataset, b: Dataset, keyword: str) -> bool:
    return str(a.get(keyword, "") or "") == str(b.get(keyword, "") or "")


def _check_consistent(
    items: list[tuple[Path, Dataset, np.ndarray, np.ndarray, np.ndarray]],
) -> None:
    """Every slice like the first: series, frame of reference, matrix, spacing, orientation."""
    path0, ds0, _, orientation0, spacing0 = items[0]
    for path, ds, _, orientation, spacing in items[1:]:
        both = f"{path0.name} and {path.name}"
        if not _same(ds0, ds, "SeriesInstanceUID"):
            raise UnusableStudyError(
                f"{both} belong to different series ({ds0.get('SeriesInstanceUID', '')} "
                f"and {ds.get('SeriesInstanceUID', '')})"
            )
        if not _same(ds0, ds, "FrameOfReferenceUID"):
            raise UnusableStudyError(f"{both} have different Frames of Reference")
        if (int(ds0.Rows), int(ds0.Columns)) != (int(ds.Rows), int(ds.Columns)):
            raise UnusableStudyError(
                f"{both} differ in size ({ds0.Rows}x{ds0.Columns} and {ds.Rows}x{ds.Columns})"
            )
        if np.max(np.abs(spacing - spacing0)) > TOLERANCE:
            raise UnusableStudyError(
                f"{both} differ in Pixel Spacing ({_mm(spacing0)} and {_mm(spacing)} mm)"
            )
        if np.max(np.abs(orientation - orientation0)) > TOLERANCE:
            raise UnusableStudyError(
                f"{both} differ in Image Orientation (Patient) "
                f"({_mm(orientation0)} and {_mm(orientation)})"
            )


def _mm(values: np.ndarray) -> str:
    return "\\".join(f"{v:g}" for v in values)


def _deduplicate(ordered: list[_Slice], warnings: list[str]) -> list[_Slice]:
    """Drop exact copies of an image at one position; refuse two different images there."""
    kept: list[_Slice] = []
    i = 0
    while i < len(ordered):
        run = [ordered[i]]
        while i + len(run) < len(ordered) and (
            ordered[i + len(run)].distance - run[0].distance < _SAME_POSITION_MM
        ):
            run.append(ordered[i + len(run)])
        i += len(run)
        if len(run) > 1:
            run.sort(key=lambda s: (s.number is None, s.number or 0, s.name))
            first = run[0]
            reference = _pixels(first)
            for other in run[1:]:
                if not np.array_equal(_pixels(other), reference):
                    raise UnusableStudyError(
                        f"{first.name} and {other.name} are different images at the same "
                        f"position ({first.distance:.2f} mm along the slice normal)"
                    )
                warnings.append(
                    f"{other.name} repeats {first.name} (same position and pixels); dropped"
                )
        kept.append(run[0])
    return kept


def _pixels(item: _Slice) -> np.ndarray:
    """The slice's grey values with Rescale Slope and Intercept applied (float32)."""
    ds = item.ds
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise UnusableStudyError(f"{item.name} is a colour image; grey-level slices expected")
    if "PixelData" not in ds:
        raise UnusableStudyError(f"{item.name} has no pixel data")
    try:
        data = np.asarray(ds.pixel_array, dtype=np.float32)
    except (*_DAMAGED, RuntimeError) as error:  # RuntimeError: no decoder for the syntax
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UnusableStudyError(f"{item.name}: the pixel data cannot be read ({first})") from None
    if data.shape != (int(ds.Rows), int(ds.Columns)):
        raise UnusableStudyError(
            f"{item.name}: pixel data of shape {data.shape}, expected one "
            f"{ds.Rows}x{ds.Columns} slice"
        )
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None and slope != 1.0:
        data *= np.float32(slope)
    if intercept:
        data += np.float32(intercept)
    return data


def _check_steps(ordered: list[_Slice], warnings: list[str]) -> float:
    """Refuse gaps and uneven spacing; the mean step (mm) when the spacing is usable."""
    distances = np.array([s.distance for s in ordered])
    steps = np.diff(distances)
    median = float(np.median(steps))
    for n, step in enumerate(steps):
        if step > GAP_FACTOR * median:
            a, b = ordered[n], ordered[n + 1]
            missing = max(int(round(step / median)) - 1, 1)
            where = ", ".join(
                f"{a.distance + median * m:.2f}" for m in range(1, min(missing, 5) + 1)
            ) + (", ..." if missing > 5 else "")
            raise UnusableStudyError(
                f"gap in the series: {step:.2f} mm between {a.name} ({a.distance:.2f} mm) "
                f"and {b.name} ({b.distance:.2f} mm) where the slices are {median:.2f} mm "
                f"apart; about {missing} slice(s) missing at {where} mm along the normal"
            )
    deviation = np.abs(steps - median) / median
    worst = int(np.argmax(deviation))
    a, b = ordered[worst], ordered[worst + 1]
    text = (
        f"the slice spacing varies by {100 * deviation[worst]:.0f} % ({steps[worst]:.3f} mm "
        f"between {a.name} and {b.name}, median {median:.3f} mm)"
    )
    if deviation[worst] > SPACING_ERROR:
        raise UnusableStudyError(text)
    if deviation[worst] > SPACING_WARNING:
        warnings.append(text)
    return float((distances[-1] - distances[0]) / (len(distances) - 1))


def read_volume(paths: Sequence[Path]) -> Volume:
    """Read one series of single-frame image instances as a volume.

    Parameters
    ----------
    paths
        The series' files, in any order (MR, CT or any image storage with Image Position
        and Orientation (Patient) and Pixel Spacing).

    Returns
    -------
    Volume
        Slices sorted along the normal, rescaled grey values, the spacing derived from the
        positions; what was tolerated is in its ``warnings``.

    Raises
    ------
    UnusableStudyError
        The files do not form one regular volume (see the module text for the rules).
    """
    if isinstance(paths, (str, Path)):
        raise TypeError('Argument "paths" should be a sequence of paths, not one path.')
    paths = [Path(p) for p in paths]
    if not paths:
        raise UnusableStudyError("no files to read as a volume")
    items = []
    for path in paths:
        ds = _read(path, pixels=True)
        _check_single_frame(ds, path)
        items.append((path, ds, *_geometry(ds, path)))
    _check_consistent(items)
    orientation, spacing = items[0][3], items[0][4]
    row_cosines, column_cosines = orientation[:3], orientation[3:]
    normal = np.cross(row_cosines, column_cosines)
    normal /= np.linalg.norm(normal)
    slices = []
    for path, ds, position, _, _ in items:
        number = _number(ds, "InstanceNumber")
        slices.append(_Slice(path, ds, position, float(position @ normal),
                             int(number) if number is not None else None))  # fmt: skip
    slices.sort(key=lambda s: (s.distance, s.number is None, s.number or 0, s.name))
    warnings: list[str] = []
    slices = _deduplicate(slices, warnings)
    if len(slices) < MIN_SLICES:
        raise UnusableStudyError(
            f"only {len(slices)} slice position(s) in {slices[0].name}'s series; "
            f"a volume needs at least {MIN_SLICES}"
        )
    _check_line(slices, normal, float(np.min(spacing)))
    step = _check_steps(slices, warnings)
    image = np.stack([_pixels(s) for s in slices])
    first = slices[0].ds
    volume = Volume(
        study_instance_uid=str(first.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(first.get("SeriesInstanceUID", "") or ""),
        frame_of_reference_uid=str(first.get("FrameOfReferenceUID", "") or ""),
        image=image,
        spacing=(step, float(spacing[0]), float(spacing[1])),
        origin=_triple(slices[0].position),
        row_cosines=_triple(row_cosines),
        column_cosines=_triple(column_cosines),
        slices=tuple(
            VolumeSlice(
                sop_instance_uid=str(s.ds.get("SOPInstanceUID", "") or ""),
                sop_class_uid=str(s.ds.get("SOPClassUID", "") or ""),
                series_instance_uid=str(s.ds.get("SeriesInstanceUID", "") or ""),
                instance_number=s.number,
                position=_triple(s.position),
            )
            for s in slices
        ),
        modality=str(first.get("Modality", "") or ""),
        series_description=str(first.get("SeriesDescription", "") or ""),
        warnings=tuple(warnings),
    )
    logger.debug("read %d slices of %s: %s", len(slices), volume.series_instance_uid, warnings)
    return volume


def _check_line(slices: list[_Slice], normal: np.ndarray, pixel: float) -> None:
    """Refuse positions that move sideways: the slices must stack along the normal."""
    limit = max(0.01, 0.1 * pixel)
    origin = slices[0].position
    for s in slices[1:]:
        offset = s.position - origin
        sideways = float(np.linalg.norm(offset - (offset @ normal) * normal))
        if sideways > limit:
            raise UnusableStudyError(
                f"{s.name} lies {sideways:.2f} mm off the line of slices through "
                f"{slices[0].name} along the slice normal (a tilted gantry or a mixed "
                "series): the slices do not stack into a volume"
            )


def _triple(values: np.ndarray) -> tuple[float, float, float]:
    return float(values[0]), float(values[1]), float(values[2])
