"""Reading a thyroid scintigraphy study: pick the anterior thyroid image among its instances.

Every frame of every NM (or Secondary Capture) instance is a candidate. Marker images
(described as markers, or holding a few isolated hot points and almost nothing else),
oblique and posterior views (View Code Sequence, else the description) and wide-field
views are set aside; of the rest, one described as a thyroid scan comes first, then the
lowest series and instance number. A wide-field anterior view is used, with a warning,
only when nothing else is left. Every failure is an
:class:`~mibi_node.errors.UnusableStudyError` naming the file and the problem.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.phase import view_from_code, view_from_text
from mibi_node.imaging.study import PhaseImage, StudyInput

__all__ = ["read_thyroid_study"]

logger = logging.getLogger(__name__)

_IMAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.20",
    "1.2.840.10008.5.1.4.1.1.5",
    "1.2.840.10008.5.1.4.1.1.7",
}
_MARKER = re.compile(r"\b(MARKER\w*|MARK|LANDMARK\w*|POINT\s*SOURCES?|ANATOM\w*)\b")
_WIDE = re.compile(r"\b(WIDE|WHOLE|OVERVIEW|UEBERSICHT|NECK\s*CHEST|TOTAL)\b")
_THYROID = re.compile(r"\b(THYR\w*|SCHILDDR\w*|TIROID\w*|PERTECH\w*|TCO4)\b")
_DAMAGED = (
    InvalidDicomError,
    OSError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
    RecursionError,
    struct.error,
    EOFError,
    OverflowError,
)


@dataclass(frozen=True)
class _Candidate:
    pixels: np.ndarray
    ds: Dataset
    frame: int | None
    where: str
    kind: str  # "thyroid", "wide", "marker", "oblique", "posterior", "empty"
    thyroid_text: bool
    order: tuple[int, int, int]


def _text(ds: Dataset) -> str:
    parts = [ds.get(k) for k in ("SeriesDescription", "ImageComments", "ProtocolName")]
    return " | ".join(str(p) for p in parts if p).upper()


def _where(path: Path, ds: Dataset, frame: int | None) -> str:
    text = f'{path.name} (series {ds.get("SeriesNumber", "?")} "{ds.get("SeriesDescription", "")}"'
    return text + (f", frame {frame})" if frame is not None else ")")


def _is_marker_image(pixels: np.ndarray) -> bool:
    """A few isolated hot points on an almost empty image."""
    total = float(pixels.sum())
    if total <= 0:
        return False
    smooth = ndimage.gaussian_filter(pixels.astype(np.float64), 1.0)
    hot = smooth > 0.2 * float(smooth.max())
    labels, count = ndimage.label(hot)
    if count == 0:
        return False
    in_spots = float(pixels[ndimage.binary_dilation(hot, iterations=3)].sum()) / total
    small = hot.sum() / count <= 0.002 * pixels.size + 12
    return bool(small and in_spots > 0.5)


def _frames(ds: Dataset) -> np.ndarray:
    data = np.asarray(ds.pixel_array)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples > 1:  # an RGB screen capture: grey by luminance
        data = data[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    if data.ndim == 2:
        data = data[np.newaxis]
    return data.astype(np.float32)


def _frame_view(ds: Dataset, frame: int, text_view: str | None) -> str | None:
    detectors = ds.get("DetectorInformationSequence", None) or []
    vector = ds.get("DetectorVector")
    detector = 1
    if vector is not None:
        values = list(vector) if isinstance(vector, Sequence) else [vector]
        if frame < len(values):
            detector = int(values[frame])
    item = detectors[detector - 1] if 0 < detector <= len(detectors) else None
    return view_from_code(item) or text_view


def _candidates(path: Path, ds: Dataset) -> list[_Candidate]:
    text = _text(ds)
    text_view = view_from_text(text)
    frames = _frames(ds)
    multi = frames.shape[0] > 1 or "NumberOfFrames" in ds
    out = []
    for i, pixels in enumerate(frames):
        frame = i + 1 if multi else None
        view = _frame_view(ds, i, text_view)
        if not np.any(pixels) or float(pixels.min()) == float(pixels.max()):
            kind = "empty"
        elif _MARKER.search(text) or _is_marker_image(pixels):
            kind = "marker"
        elif view in ("oblique", "posterior", "other") or text_view in ("oblique", "posterior"):
            kind = "oblique" if "oblique" in (view, text_view) or view == "other" else "posterior"
        elif _WIDE.search(text):
            kind = "wide"
        else:
            kind = "thyroid"
        order = (int(ds.get("SeriesNumber", 0) or 0), int(ds.get("InstanceNumber", 0) or 0), i)
        out.append(
            _Candidate(pixels, ds, frame, _where(path, ds, frame), kind,
                       bool(_THYROID.search(text)), order)
        )  # fmt: skip
    return out


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def read_thyroid_study(paths: Sequence[str | Path]) -> StudyInput:
    """Read the files of one thyroid scan into model input.

    Parameters
    ----------
    paths
        Files and folders (read recursively).

    Returns
    -------
    StudyInput
        ``images["thyroid"]`` is the anterior thyroid image.

    Raises
    ------
    UnusableStudyError
        No usable anterior thyroid image; the message names the files and the problem.
    """
    if isinstance(paths, str | Path) or not isinstance(paths, Sequence):
        raise TypeError('Argument "paths" should be a sequence of paths, not a single path.')
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files.extend(f for f in sorted(p.rglob("*")) if f.is_file() and f.name != "DICOMDIR")
        elif p.is_file():
            files.append(p)
        else:
            raise UnusableStudyError(f"{p} does not exist.")
    problems: list[str] = []
    candidates: list[_Candidate] = []
    studies: set[str] = set()
    for file in files:
        try:
            ds = pydicom.dcmread(file)
            if "PixelData" not in ds or (
                str(ds.get("SOPClassUID", "")) not in _IMAGE_CLASSES and ds.get("Modality") != "NM"
            ):
                problems.append(f"{file.name}: not an NM image")
                continue
            candidates.extend(_candidates(file, ds))
            studies.add(str(ds.get("StudyInstanceUID", "")))
        except _DAMAGED as error:
            reason = " ".join(str(error).split())[:160] or type(error).__name__
            logger.warning("skipping %s: unreadable or damaged (%s)", file, reason)
            problems.append(f"{file.name}: damaged or not DICOM ({type(error).__name__}: {reason})")
    if not files:
        raise UnusableStudyError(
            f"No files were found in {', '.join(map(str, paths)) or 'nothing'}."
        )
    if len(studies) > 1:
        raise UnusableStudyError(
            f"The files belong to {len(studies)} different studies; send one study at a time."
        )
    usable = sorted(
        (c for c in candidates if c.kind == "thyroid"), key=lambda c: (not c.thyroid_text, c.order)
    )
    warnings: list[str] = []
    if not usable:
        usable = sorted((c for c in candidates if c.kind == "wide"), key=lambda c: c.order)
        if usable:
            warnings.append(f"Only a wide-field view was found; using {usable[0].where}.")
    if not usable:
        found = [f"{c.where}: {c.kind} image" for c in candidates] + problems
        raise UnusableStudyError(
            "No anterior thyroid image could be found in this study. "
            + ("; ".join(found) if found else "No image was found.")
            + "."
        )
    if len(usable) > 1:
        warnings.append(
            f"{len(usable)} images look like the anterior thyroid view; using {usable[0].where}."
        )
    chosen = usable[0]
    chosen_ds = chosen.ds
    image = PhaseImage(
        name="thyroid",
        pixels=chosen.pixels.astype(np.float32),
        pixel_spacing=_spacing(chosen_ds),
        sop_instance_uid=str(chosen_ds.SOPInstanceUID),
        sop_class_uid=str(chosen_ds.SOPClassUID),
        series_instance_uid=str(chosen_ds.get("SeriesInstanceUID", "")),
        frame_number=chosen.frame,
    )
    for warning in warnings:
        logger.info("thyroid study: %s", warning)
    return StudyInput(
        study_instance_uid=studies.pop(), images={"thyroid": image}, warnings=tuple(warnings)
    )
