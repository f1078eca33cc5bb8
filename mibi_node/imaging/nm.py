"""Reading the NM and Secondary Capture instances of a MIBI study into named phase images.

The rules, applied in this order:

1. Files are read (folders recursively); they must belong to one study.
2. Each NM instance is split into frames by its Frame Increment Pointer vectors: energy
   window, detector, phase and R-R interval separate images, time slices and time slots of
   one of them are summed. Frames outside the 99mTc window (140 keV) are dropped, and of the
   views the anterior one is kept (View Code Sequence, else the description, else detector 1).
3. Secondary Capture images (screen captures from older consoles; 8-bit, RGB or palette)
   become grayscale, and the result carries a warning that they are not original counts.
4. Phase: from the instance's and series' descriptions and comments, else from the
   acquisition time after the radiopharmaceutical start, else from series order (with a
   warning). A 99mTc-pertechnetate image is the ``thyroid`` phase.
5. The chosen images must hold counts (not all zero, not saturated); images of different
   matrix sizes are resampled onto the early image's grid when their pixel spacing is known.

Everything that makes a study unusable raises :class:`~mibi_node.errors.UnusableStudyError`
with a sentence a technologist can act on.
"""

from __future__ import annotations

import copy
import logging
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.uid import JPEGBaseline8Bit, JPEGExtended12Bit

from mibi_node.errors import MissingPhaseError, UnusableStudyError
from mibi_node.imaging.phase import (
    acquisition_start,
    injection_time,
    is_pertechnetate,
    phase_from_minutes,
    phase_from_text,
    view_from_code,
    view_from_text,
)
from mibi_node.imaging.study import PHASES, PhaseImage, StudyInput

__all__ = ["read_datasets", "read_study"]

logger = logging.getLogger(__name__)

_NM_CLASSES = {"1.2.840.10008.5.1.4.1.1.20", "1.2.840.10008.5.1.4.1.1.5"}
_SC_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.7",
    "1.2.840.10008.5.1.4.1.1.7.1",
    "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3",
    "1.2.840.10008.5.1.4.1.1.7.4",
}
_TC99M_KEV = 140.5
#: Share of pixels at the largest storable value from which an image counts as saturated.
_SATURATED_SHARE = 0.05
#: Vectors that separate frames into different images; the others are summed over.
_SEPARATING = ("EnergyWindowVector", "DetectorVector", "PhaseVector", "RRIntervalVector")
#: What pydicom raises on a damaged file, when reading it or (it parses lazily) when an
#: element is first used: the reader turns each into a sentence, never a traceback.
_DAMAGED = (
    BytesLengthException,
    RecursionError,
    ValueError,
    TypeError,
    LookupError,
    AttributeError,
    NotImplementedError,
    struct.error,
    EOFError,
    OverflowError,
)
_MAX_REASON = 160


def _reason(error: BaseException) -> str:
    """One short line saying what pydicom found wrong."""
    text = " ".join(str(error).split()) or "no detail"
    if len(text) > _MAX_REASON:
        text = text[: _MAX_REASON - 3] + "..."
    return f"{type(error).__name__}: {text}"


@dataclass(frozen=True)
class _Candidate:
    """One planar image that could serve as a phase, with what is known about it."""

    pixels: np.ndarray
    spacing: tuple[float, float] | None
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    frame_number: int | None
    where: str
    hint: str | None
    minutes: float | None
    start: datetime | None
    order: tuple[int, int, int]
    screen_capture: bool
    view: str | None
    saturated: float
    summed: int


def read_study(
    paths: Sequence[str | Path], required: Sequence[str] = ("early", "delayed")
) -> StudyInput:
    """Read the files of one study into model input.

    Parameters
    ----------
    paths
        Files and folders (read recursively); files that are not DICOM are skipped.
    required
        Phases the caller needs (names from :data:`~mibi_node.imaging.study.PHASES`).

    Returns
    -------
    StudyInput

    Raises
    ------
    UnusableStudyError
        The files hold no usable study; the message says why in a technologist's words.
    """
    if isinstance(paths, str | Path):
        raise TypeError('Argument "paths" should be a sequence of paths, not a single path.')
    files = list(_expand(Path(p) for p in paths))
    datasets = []
    damaged: list[str] = []
    for file in files:
        try:
            datasets.append(pydicom.dcmread(file))
        except (InvalidDicomError, OSError) as error:
            logger.info("skipping %s: not a readable DICOM file (%s)", file, error)
        except _DAMAGED as error:
            logger.warning("skipping %s: a damaged DICOM file (%s)", file, _reason(error))
            damaged.append(f"{file.name} ({_reason(error)})")
    if not datasets and not damaged:
        raise UnusableStudyError(
            f"No DICOM files were found in {', '.join(str(p) for p in paths) or 'nothing'}."
        )
    try:
        if not datasets:
            raise UnusableStudyError("No file of the study could be read.")
        return read_datasets(datasets, required)
    except UnusableStudyError as error:
        if not damaged:
            raise
        # The damaged files are the likely cause: name them in the same sentence.
        message = f"{error} Damaged file(s) that could not be read: {'; '.join(damaged)}."
        if isinstance(error, MissingPhaseError):
            raise MissingPhaseError(message, error.missing, error.found) from error
        raise UnusableStudyError(message) from error


def read_datasets(
    datasets: Sequence[Dataset], required: Sequence[str] = ("early", "delayed")
) -> StudyInput:
    """Turn the instances of one study, already in memory, into model input.

    Parameters
    ----------
    datasets
        The study's instances (non-image instances such as SR are ignored).
    required
        Phases the caller needs (names from :data:`~mibi_node.imaging.study.PHASES`).

    Returns
    -------
    StudyInput
        Holds every phase found, at least the required ones, on one pixel grid.

    Raises
    ------
    UnusableStudyError
        The instances hold no usable study; the message says why.
    """
    required = _check_required(required)
    try:
        return _interpret(datasets, required)
    except UnusableStudyError:
        raise
    except _DAMAGED as error:  # an element pydicom cannot parse, or a missing attribute
        raise UnusableStudyError(
            f"An image of this study is damaged or incomplete: {_reason(error)}."
        ) from error


def _interpret(datasets: Sequence[Dataset], required: tuple[str, ...]) -> StudyInput:
    if not datasets:
        raise UnusableStudyError("The study holds no instances.")
    studies = sorted({str(ds.get("StudyInstanceUID", "")) for ds in datasets})
    if len(studies) > 1:
        raise UnusableStudyError(
            f"The files belong to {len(studies)} different studies ({', '.join(studies)}); "
            "send the images of one study at a time."
        )
    images = [ds for ds in datasets if _is_image(ds)]
    if not images:
        found = sorted({str(ds.get("Modality", "?")) for ds in datasets})
        raise UnusableStudyError(
            "The study holds no NM or Secondary Capture images "
            f"(found modality {', '.join(found)})."
        )
    warnings: list[str] = []
    rejected_windows: list[str] = []
    candidates: list[_Candidate] = []
    for ds in images:
        candidates.extend(_candidates(ds, warnings, rejected_windows))
    if not candidates:
        windows = ", ".join(sorted(set(rejected_windows))) or "unknown"
        raise UnusableStudyError(
            "No image of this study was acquired in the 99mTc energy window (140 keV); "
            f"found {windows}. MIBI images need the 99mTc window."
        )
    candidates = _keep_anterior(candidates, warnings)
    chosen = _assign_phases(candidates, warnings)
    missing = [phase for phase in required if phase not in chosen]
    if missing:
        raise MissingPhaseError(
            _missing_message(missing, chosen), missing=tuple(missing), found=tuple(chosen)
        )
    for phase, candidate in chosen.items():
        _check_counts(phase, candidate)
        if candidate.screen_capture:
            warnings.append(
                f"The {phase} image ({candidate.where}) is a screen capture (Secondary "
                "Capture), not the camera's original counts; the result is less reliable."
            )
        if candidate.summed > 1:
            warnings.append(
                f"The {phase} image is the sum of {candidate.summed} frames of "
                f"{candidate.where}, starting at frame {candidate.frame_number}."
            )
    chosen = _match_grids(chosen, warnings)
    study_uid = studies[0]
    result = {
        phase: PhaseImage(
            name=phase,
            pixels=c.pixels.astype(np.float32, copy=False),
            pixel_spacing=c.spacing,
            sop_instance_uid=c.sop_instance_uid,
            sop_class_uid=c.sop_class_uid,
            series_instance_uid=c.series_instance_uid,
            frame_number=c.frame_number,
        )
        for phase, c in sorted(chosen.items(), key=lambda item: PHASES.index(item[0]))
    }
    for warning in warnings:
        logger.warning("study %s: %s", study_uid, warning)
    return StudyInput(study_instance_uid=study_uid, images=result, warnings=tuple(warnings))


def _check_required(required: object) -> tuple[str, ...]:
    if isinstance(required, str) or not isinstance(required, Sequence):
        raise TypeError('Argument "required" should be a sequence of phase names.')
    unknown = [name for name in required if name not in PHASES]
    if unknown:
        raise ValueError(
            f'Argument "required" should hold names from {", ".join(PHASES)}, got {unknown}.'
        )
    return tuple(required)


def _expand(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and not child.name.startswith("."):
                    if child.name.upper() == "DICOMDIR":
                        continue
                    yield child
        elif path.is_file():
            yield path
        else:
            raise UnusableStudyError(f"{path} does not exist.")


def _is_image(ds: Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", ""))
    if "PixelData" not in ds:
        return False
    return sop_class in _NM_CLASSES or sop_class in _SC_CLASSES or ds.get("Modality") == "NM"


def _missing_message(missing: list[str], found: dict[str, _Candidate]) -> str:
    have = [phase for phase in PHASES if phase in found]
    if not have:
        return f"No {' or '.join(missing)} image could be identified in this study."
    listed = " and ".join(missing)
    verb = "is" if len(missing) == 1 else "are"
    return (
        f"Only the {' and '.join(have)} image {'was' if len(have) == 1 else 'were'} found; "
        f"the {listed} image {verb} missing. The model needs both the early and the delayed "
        "image: send the missing acquisition, or label its series (e.g. 'DELAYED 2H')."
    )


def _where(ds: Dataset) -> str:
    series = ds.get("SeriesNumber", "?")
    description = str(ds.get("SeriesDescription", "") or "").strip()
    text = f'series {series} "{description}"' if description else f"series {series}"
    return f"{text}, image {ds.get('InstanceNumber', '?')}"


def _decode(ds: Dataset) -> np.ndarray:
    """The pixel data as (frames, rows, columns[, samples]), repairing known JPEG defects."""
    data: np.ndarray | None
    try:
        data = np.asarray(ds.pixel_array)
    except Exception as error:  # noqa: BLE001 - any decoder failure is reported the same way
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID") if meta is not None else None
        data = None
        if syntax in (JPEGBaseline8Bit, JPEGExtended12Bit):
            data = _decode_repaired_jpeg(ds)
        if data is None:
            name = getattr(syntax, "name", syntax) or "unknown transfer syntax"
            raise UnusableStudyError(
                f"The pixel data of {_where(ds)} cannot be decoded ({name}): {error}"
            ) from error
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames == 1 and data.ndim == (2 if samples == 1 else 3):
        data = data[np.newaxis]
    return np.asarray(data)


def _decode_repaired_jpeg(ds: Dataset) -> np.ndarray | None:
    """Retry a sequential JPEG whose start-of-scan says Se=0 (it must say 63).

    Some older NM consoles wrote such streams (pydicom's ``JPEG-lossy.dcm`` is one); the
    data are otherwise intact, and libjpeg decodes them once the header byte is corrected.
    """
    from pydicom.encaps import encapsulate, generate_frames

    frames = int(ds.get("NumberOfFrames", 1) or 1)
    repaired = []
    for frame in generate_frames(ds.PixelData, number_of_frames=frames):
        data = bytearray(frame)
        start = data.find(b"\xff\xda")
        if start < 0:
            return None
        components = data[start + 4]
        spectral = start + 5 + 2 * components
        if data[spectral] == 0 and data[spectral + 1] == 0:
            data[spectral + 1] = 63
        repaired.append(bytes(data))
    fixed = copy.deepcopy(ds)
    fixed.PixelData = encapsulate(repaired)
    try:
        data_array = fixed.pixel_array
    except Exception:  # noqa: BLE001
        return None
    logger.info("decoded %s after correcting its JPEG start-of-scan", _where(ds))
    return np.asarray(data_array)


def _grayscale(ds: Dataset, data: np.ndarray) -> np.ndarray:
    """Float frames (frames, rows, columns) in display order (high = more activity)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if photometric == "PALETTE COLOR":
        data = apply_color_lut(data, ds)
    if data.ndim == 4:  # RGB (pydicom converts YBR to RGB)
        weights = np.array([0.299, 0.587, 0.114])
        return (data[..., :3].astype(np.float64) @ weights).astype(np.float32)
    if photometric == "MONOCHROME1":
        bits = int(ds.get("BitsStored", 16))
        data = (2**bits - 1) - data.astype(np.int64)
    else:
        data = apply_modality_lut(data, ds)
    return np.asarray(data, dtype=np.float32)


def _saturation_level(ds: Dataset, data: np.ndarray) -> float:
    if data.ndim == 4 or str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        return 255.0
    bits = int(ds.get("BitsStored", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)


def _vector(ds: Dataset, keyword: str, frames: int) -> list[int]:
    values = ds.get(keyword)
    if values is None:
        return [1] * frames
    values = [int(v) for v in (values if isinstance(values, Sequence) else [values])]
    if len(values) != frames:
        raise UnusableStudyError(
            f"{_where(ds)} has {frames} frames but its {keyword} lists {len(values)} values."
        )
    return values


def _window_is_tc(ds: Dataset, index: int) -> tuple[bool | None, str]:
    """Whether energy window ``index`` (1-based) covers 140 keV, and how to describe it."""
    items = ds.get("EnergyWindowInformationSequence", None) or []
    if not 0 < index <= len(items):
        return None, ""
    ranges = items[index - 1].get("EnergyWindowRangeSequence", None) or []
    limits = []
    for item in ranges:
        try:
            lower = float(item.EnergyWindowLowerLimit)
            upper = float(item.EnergyWindowUpperLimit)
        except (AttributeError, TypeError, ValueError):
            continue
        limits.append((lower, upper))
    if not limits:
        return None, ""
    text = ", ".join(f"{lo:g}-{hi:g} keV" for lo, hi in limits)
    return any(lo <= _TC99M_KEV <= hi for lo, hi in limits), text


def _text(ds: Dataset) -> str:
    parts = [
        ds.get(keyword)
        for keyword in ("ImageComments", "SeriesDescription", "ProtocolName", "ImageID")
    ]
    return " | ".join(str(p) for p in parts if p)


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    value = ds.get("PixelSpacing")
    try:
        row, col = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (row, col) if row > 0 and col > 0 else None


def _candidates(ds: Dataset, warnings: list[str], rejected: list[str]) -> list[_Candidate]:
    """Split one instance into the planar images it holds."""
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    if any(kind in image_type for kind in ("TOMO", "GATED TOMO", "RECON TOMO", "RECON GATED TOMO")):
        logger.info("ignoring tomographic %s", _where(ds))
        return []
    screen_capture = str(ds.get("SOPClassUID", "")) in _SC_CLASSES
    raw = _decode(ds)
    frames = raw.shape[0]
    saturation = _saturation_level(ds, raw)
    pixels = _grayscale(ds, raw)
    multiframe = "NumberOfFrames" in ds
    where = _where(ds)
    start = acquisition_start(ds)
    injected = injection_time(ds, start)
    text_hint = "thyroid" if is_pertechnetate(ds) else phase_from_text(_text(ds))
    text_view = view_from_text(_text(ds))
    detectors = ds.get("DetectorInformationSequence", None) or []
    phases = ds.get("PhaseInformationSequence", None) or []
    pointers = ds.get("FrameIncrementPointer")
    if pointers is not None and not isinstance(pointers, Sequence):
        pointers = [pointers]
    if pointers and not screen_capture:
        keys = list(zip(*(_vector(ds, k, frames) for k in _SEPARATING), strict=True))
    else:  # no vectors: every frame is its own image
        keys = [(1, 1, i + 1, 1) for i in range(frames)]
    groups: dict[tuple[int, ...], list[int]] = {}
    for frame, key in enumerate(keys):
        groups.setdefault(key, []).append(frame)
    several_phases = len({key[2] for key in groups}) > 1
    coded_views = any(view_from_code(item) for item in detectors)
    out = []
    for (window, detector, phase, _rr), members in groups.items():
        is_tc, window_text = _window_is_tc(ds, window)
        if is_tc is False:
            rejected.append(window_text)
            logger.info("dropping frames of %s in energy window %s", where, window_text)
            continue
        item = detectors[detector - 1] if 0 < detector <= len(detectors) else None
        view = view_from_code(item) if coded_views else None
        if view is None and len({key[1] for key in groups}) > 1:
            view = "anterior" if detector == 1 else "other"  # detector 1, by convention
        view = view or text_view
        frame_start = start
        if phases and 0 < phase <= len(phases) and start is not None:
            delay = float(phases[phase - 1].get("PhaseDelay", 0) or 0)
            frame_start = start + timedelta(milliseconds=delay)
        minutes = None
        if frame_start is not None and injected is not None:
            minutes = (frame_start - injected).total_seconds() / 60.0
        hint = text_hint
        if several_phases and hint != "thyroid":
            hint = None  # one description for several phases says nothing about each
        image = pixels[members].sum(axis=0) if len(members) > 1 else pixels[members[0]]
        out.append(
            _Candidate(
                pixels=image,
                spacing=_spacing(ds),
                sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID),
                series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
                frame_number=members[0] + 1 if multiframe else None,
                where=where,
                hint=hint,
                minutes=minutes,
                start=frame_start,
                order=(
                    int(ds.get("SeriesNumber", 0) or 0),
                    int(ds.get("InstanceNumber", 0) or 0),
                    members[0],
                ),
                screen_capture=screen_capture,
                view=view,
                saturated=float(np.mean(raw[members] >= saturation)),
                summed=len(members),
            )
        )
    return out


def _keep_anterior(candidates: list[_Candidate], warnings: list[str]) -> list[_Candidate]:
    """Drop posterior, oblique and other views when anterior (or unlabelled) ones exist."""
    kept = [c for c in candidates if c.view in ("anterior", None)]
    if kept:
        return kept
    views = sorted({str(c.view) for c in candidates})
    warnings.append(f"No anterior view was found; using the {', '.join(views)} view instead.")
    return candidates


def _sort_key(c: _Candidate) -> tuple[object, ...]:
    return (c.start or datetime.max, c.order)


def _assign_phases(candidates: list[_Candidate], warnings: list[str]) -> dict[str, _Candidate]:
    """Name each candidate's phase and pick one image per phase."""
    named: dict[str, list[_Candidate]] = {}
    unnamed = []
    for c in candidates:
        phase = c.hint or phase_from_minutes(c.minutes)
        if phase is None:
            unnamed.append(c)
        else:
            named.setdefault(phase, []).append(c)
    if unnamed:
        use_time = all(c.start is not None for c in unnamed)
        unnamed.sort(key=_sort_key if use_time else (lambda c: c.order))
        how = "acquisition time order" if use_time else "series order"
        if "early" not in named and "delayed" not in named:
            picks = {"early": unnamed[0]}
            if len(unnamed) > 1:
                picks["delayed"] = unnamed[-1]
        elif "early" not in named:
            first = min(named["delayed"], key=_sort_key)
            before = [c for c in unnamed if _sort_key(c) < _sort_key(first)] or unnamed
            picks = {"early": before[0]}
        elif "delayed" not in named:
            first = min(named["early"], key=_sort_key)
            after = [c for c in unnamed if _sort_key(c) > _sort_key(first)] or unnamed
            picks = {"delayed": after[-1]}
        else:
            picks = {}
        for phase, c in picks.items():
            named[phase] = [c]
            warnings.append(
                f"The {phase} image ({c.where}) was identified by {how}: neither its "
                "description nor its timing after injection names the phase."
            )
    chosen = {}
    for phase, options in named.items():
        options.sort(key=lambda c: (c.screen_capture, c.view != "anterior", c.order))
        chosen[phase] = options[0]
        if len(options) > 1:
            warnings.append(
                f"{len(options)} images look like the {phase} phase; using {options[0].where}."
            )
    return chosen


def _check_counts(phase: str, c: _Candidate) -> None:
    pixels = c.pixels
    if not np.any(pixels):
        raise UnusableStudyError(f"The {phase} image ({c.where}) is empty: every pixel is zero.")
    if c.saturated >= _SATURATED_SHARE:
        raise UnusableStudyError(
            f"The {phase} image ({c.where}) is saturated: {100 * c.saturated:.0f}% of its "
            "pixels are at the largest value the file can store. Repeat or re-export it."
        )
    if float(pixels.min()) == float(pixels.max()):
        raise UnusableStudyError(
            f"The {phase} image ({c.where}) has no contrast: every pixel reads "
            f"{float(pixels.min()):g}."
        )


def _match_grids(chosen: dict[str, _Candidate], warnings: list[str]) -> dict[str, _Candidate]:
    """Resample every image onto the grid of the early image (or the first phase)."""
    from scipy import ndimage

    reference_phase = next(phase for phase in PHASES if phase in chosen)
    ref = chosen[reference_phase]
    out = dict(chosen)
    for phase, c in chosen.items():
        same_shape = c.pixels.shape == ref.pixels.shape
        same_spacing = (
            c.spacing is None
            or ref.spacing is None
            or np.allclose(c.spacing, ref.spacing, rtol=0.01)
        )
        if same_shape and same_spacing:
            continue
        if c.spacing is None or ref.spacing is None:
            raise UnusableStudyError(
                f"The {phase} image is {_size(c.pixels)} and the {reference_phase} image "
                f"{_size(ref.pixels)}, and the files do not give the pixel spacing, so the "
                "two cannot be matched. Acquire both with the same matrix and zoom."
            )
        factors = (c.spacing[0] / ref.spacing[0], c.spacing[1] / ref.spacing[1])
        zoomed = ndimage.zoom(c.pixels.astype(np.float64), factors, order=1, mode="nearest")
        zoomed *= (ref.spacing[0] * ref.spacing[1]) / (c.spacing[0] * c.spacing[1])
        resampled = _fit(np.clip(zoomed, 0.0, None), ref.pixels.shape)
        warnings.append(
            f"The {phase} image ({_size(c.pixels)}, {c.spacing[0]:g} mm pixels) was resampled "
            f"to {_size(ref.pixels)} with {ref.spacing[0]:g} mm pixels to match the "
            f"{reference_phase} image."
        )
        out[phase] = replace(c, pixels=resampled.astype(np.float32), spacing=ref.spacing)
    return out


def _size(pixels: np.ndarray) -> str:
    return f"{pixels.shape[0]}x{pixels.shape[1]}"


def _fit(image: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Crop or zero-pad ``image`` about its centre to ``shape``."""
    out = np.zeros(shape, dtype=image.dtype)
    slices_in, slices_out = [], []
    for have, want in zip(image.shape, shape, strict=True):
        if have >= want:
            start = (have - want) // 2
            slices_in.append(slice(start, start + want))
            slices_out.append(slice(0, want))
        else:
            start = (want - have) // 2
            slices_in.append(slice(0, have))
            slices_out.append(slice(start, start + have))
    out[tuple(slices_out)] = image[tuple(slices_in)]
    return out
