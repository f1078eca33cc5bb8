"""Reading a MIBI study's instances into named phase images (early, delayed, thyroid).

Gamma cameras store dual-phase parathyroid studies in many ways: one instance per phase in
separate series, both phases in one series, both as frames of one multi-frame instance
with detector and phase vectors, or as screen captures from older consoles. This module
turns any of them into :class:`~mibi_node.imaging.study.StudyInput`, and says in one
sentence a technologist understands why a study cannot be used.

The rules, in order:

1. Instances are grouped by study; NM images and Secondary Captures are kept.
2. Multi-frame NM is split by its Frame Increment Pointer vectors: the Energy Window,
   Detector and Phase vectors give each frame's window, head and phase.
3. Frames seen by a head whose View Code Sequence says posterior are dropped when an
   anterior one exists; frames whose energy window misses 140 keV are dropped.
4. A frame's phase comes from its text (Series Description, Image Comments, Series/Study
   descriptions; English and common German, French, Spanish and Italian words), else from
   its time after injection (Radiopharmaceutical Start Time), else from series order.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from scipy import ndimage

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.study import PHASES, PhaseImage, StudyInput

__all__ = ["read_datasets", "read_study"]

logger = logging.getLogger(__name__)

_NM = "1.2.840.10008.5.1.4.1.1.20"
_SC_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_TC99M_KEV = 140.5
_DELAYED_AFTER_MINUTES = 60.0

_PHASE_WORDS: dict[str, re.Pattern[str]] = {
    "thyroid": re.compile(
        r"thyroid|schilddr|thyro[iï]d|tiroid|pertechnet|tco4|99m?tc-?o4|na99mtco4", re.I
    ),
    "delayed": re.compile(
        r"delay|late\b|later|washout|wash-out|\b[2-4](\.\d)?\s*h|\b[2-4]\s*hr|\b[2-4]\s*hours?"
        r"|\b(9\d|1\d\d|2[0-4]\d)\s*min|sp[aä]t|tardi|retard|ritard|\bdel\b|\blate\b",
        re.I,
    ),
    "early": re.compile(
        r"early|\b(5|10|15|20|30)\s*min|\bfr[uü]h|pr[eé]coce|precoz|tempran|precoce|\bearly\b",
        re.I,
    ),
}


@dataclass
class _Frame:
    pixels: np.ndarray
    spacing: tuple[float, float] | None
    dataset: Dataset
    frame_number: int | None
    view: str | None
    phase_index: int | None
    phase_count: int
    minutes: float | None
    order: tuple[int, int, int]
    screen_capture: bool


def read_study(
    paths: Sequence[str | Path] | str | Path, required: Sequence[str] = ("early", "delayed")
) -> StudyInput:
    """Read one study's files (folders are searched recursively) into phase images.

    Parameters
    ----------
    paths
        Files or folders holding the instances of one study.
    required
        Phases the caller needs, from ``early``, ``delayed`` and ``thyroid``.

    Raises
    ------
    UnusableStudyError
        No readable image, several studies, a required phase missing, or an image that
        cannot be used (all zero, saturated, wrong isotope window, mismatched sizes).
    """
    if isinstance(paths, str | Path):
        paths = [paths]
    files = list(_expand(Path(p) for p in paths))
    if not files:
        raise UnusableStudyError("no files were given")
    datasets = []
    unreadable = []
    for path in files:
        try:
            datasets.append(dcmread(path))
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            unreadable.append(f"{path.name} ({type(exc).__name__})")
    if not datasets:
        raise UnusableStudyError(
            "none of the files is a readable DICOM instance: " + ", ".join(unreadable[:5])
        )
    if unreadable:
        logger.warning("skipped %d unreadable file(s)", len(unreadable))
    return read_datasets(datasets, required)


def _expand(paths: Iterable[Path]) -> Iterable[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file() and p.name != "labels.csv")
        elif path.is_file():
            yield path
        else:
            raise UnusableStudyError(f"{path}: no such file or folder")


def read_datasets(
    datasets: Sequence[Dataset], required: Sequence[str] = ("early", "delayed")
) -> StudyInput:
    """The same as :func:`read_study`, for instances already in memory."""
    unknown = [name for name in required if name not in PHASES]
    if unknown:
        raise ValueError(f'Argument "required" names unknown phases: {", ".join(unknown)}.')
    studies = {str(ds.get("StudyInstanceUID", "")) for ds in datasets}
    if len(studies) > 1:
        raise UnusableStudyError(
            f"the files belong to {len(studies)} different studies; give one study at a time"
        )
    images = [ds for ds in datasets if _is_image(ds)]
    if not images:
        raise UnusableStudyError("the study holds no NM or Secondary Capture image")
    warnings: list[str] = []
    frames: list[_Frame] = []
    for ds in images:
        frames.extend(_frames(ds, warnings))
    if not frames:
        raise UnusableStudyError(
            "no image of the study was acquired in a 99mTc energy window (140 keV)"
        )
    chosen = _assign_phases(frames, warnings)
    missing = [name for name in required if name not in chosen]
    if missing:
        present = ", ".join(sorted(chosen)) or "none"
        raise UnusableStudyError(
            f"the model needs the {' and '.join(missing)} image(s) but the study has only: "
            f"{present}"
        )
    selected = {name: chosen[name] for name in PHASES if name in chosen}
    _check_counts(selected)
    selected = _match_sizes(selected, warnings)
    if any(frame.screen_capture for frame in selected.values()):
        warnings.append(
            "screen capture (Secondary Capture): grey levels from a console display, not counts"
        )
    study_uid = next(iter(studies))
    return StudyInput(
        study_instance_uid=study_uid,
        images={
            name: PhaseImage(
                name=name,
                pixels=frame.pixels.astype(np.float32, copy=False),
                pixel_spacing=frame.spacing,
                sop_instance_uid=str(frame.dataset.SOPInstanceUID),
                sop_class_uid=str(frame.dataset.SOPClassUID),
                series_instance_uid=str(frame.dataset.get("SeriesInstanceUID", "")),
                frame_number=frame.frame_number,
            )
            for name, frame in selected.items()
        },
        warnings=tuple(dict.fromkeys(warnings)),
    )


def _is_image(ds: Dataset) -> bool:
    sop_class = str(ds.get("SOPClassUID", ""))
    return "PixelData" in ds and (sop_class == _NM or sop_class.startswith(_SC_PREFIX))


def _pixels(ds: Dataset) -> np.ndarray:
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom raises many kinds for undecodable pixel data
        raise UnusableStudyError(
            f"the pixel data of instance {ds.get('InstanceNumber', '?')} "
            f"(series {ds.get('SeriesNumber', '?')}) cannot be decoded: {exc}"
        ) from None
    array = np.asarray(array)
    if str(ds.get("PhotometricInterpretation", "")).startswith(("RGB", "YBR")):
        if str(ds.PhotometricInterpretation).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            array = convert_color_space(array, str(ds.PhotometricInterpretation), "RGB")
        weights = np.array([0.299, 0.587, 0.114])
        array = array[..., :3].astype(np.float64) @ weights
    elif str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        array = array.max() - array
    return array.astype(np.float32)


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "NominalScannedPixelSpacing"):
        value = ds.get(keyword)
        if value is not None and len(value) == 2:
            try:
                spacing = (float(value[0]), float(value[1]))
            except (TypeError, ValueError):
                continue
            if spacing[0] > 0 and spacing[1] > 0:
                return spacing
    return None


def _view(item: Dataset | None) -> str | None:
    if item is None:
        return None
    for code in item.get("ViewCodeSequence", []):
        meaning = str(code.get("CodeMeaning", "")).lower()
        if "anterior" in meaning:
            return "anterior"
        if "posterior" in meaning:
            return "posterior"
    return None


def _window_is_tc99m(item: Dataset | None) -> bool:
    if item is None:
        return True
    ranges = item.get("EnergyWindowRangeSequence", [])
    if not ranges:
        return True
    for window in ranges:
        try:
            lower = float(window.EnergyWindowLowerLimit)
            upper = float(window.EnergyWindowUpperLimit)
        except (AttributeError, TypeError, ValueError):
            return True
        if lower <= _TC99M_KEV <= upper:
            return True
    return False


def _minutes_after_injection(ds: Dataset) -> float | None:
    date = str(ds.get("AcquisitionDate", "") or ds.get("SeriesDate", "") or "")
    time = str(ds.get("AcquisitionTime", "") or ds.get("SeriesTime", "") or "")
    items = ds.get("RadiopharmaceuticalInformationSequence", [])
    if not date or not time or not items:
        return None
    item = items[0]
    start = str(item.get("RadiopharmaceuticalStartDateTime", "") or "")
    if not start and item.get("RadiopharmaceuticalStartTime"):
        start = date + str(item.RadiopharmaceuticalStartTime)
    try:
        acquired = _parse_datetime(date + time)
        injected = _parse_datetime(start)
    except ValueError:
        return None
    return (acquired - injected).total_seconds() / 60.0


def _parse_datetime(text: str) -> datetime:
    text = text.split("+")[0].split("-")[0] if len(text) > 8 else text
    digits, _, fraction = text.partition(".")
    digits = (digits + "000000")[:14]
    moment = datetime.strptime(digits, "%Y%m%d%H%M%S")
    return moment.replace(microsecond=int((fraction + "000000")[:6]) if fraction else 0)


def _frames(ds: Dataset, warnings: list[str]) -> list[_Frame]:
    screen_capture = str(ds.SOPClassUID).startswith(_SC_PREFIX)
    pixels = _pixels(ds)
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    spacing = _spacing(ds)
    minutes = _minutes_after_injection(ds)
    order = (int(ds.get("SeriesNumber", 0) or 0), int(ds.get("InstanceNumber", 0) or 0), 0)
    if screen_capture or count == 1:
        detectors = ds.get("DetectorInformationSequence", [])
        windows = ds.get("EnergyWindowInformationSequence", [])
        if not _window_is_tc99m(windows[0] if windows else None):
            warnings.append("an image acquired outside the 99mTc window was ignored")
            return []
        # The NM Image IOD is multi-frame by definition: its one frame is frame 1.
        number = None if screen_capture and "NumberOfFrames" not in ds else 1
        return [
            _Frame(
                pixels[0],
                spacing,
                ds,
                number,
                _view(detectors[0] if detectors else None),
                None,
                1,
                minutes,
                order,
                screen_capture,
            )
        ]
    pointers = [int(tag) for tag in _as_list(ds.get("FrameIncrementPointer"))]

    def vector(keyword: str, tag: int) -> list[int]:
        if tag in pointers and keyword in ds:
            values = ds[keyword].value
            values = (
                list(values)
                if isinstance(values, list | tuple) or hasattr(values, "__iter__")
                else [values]
            )
            if len(values) == count:
                return [int(v) for v in values]
        return [1] * count

    energy = vector("EnergyWindowVector", 0x00540010)
    detector = vector("DetectorVector", 0x00540020)
    phase = vector("PhaseVector", 0x00540030)
    detectors = ds.get("DetectorInformationSequence", [])
    windows = ds.get("EnergyWindowInformationSequence", [])
    phase_count = max(phase)
    frames = []
    for index in range(count):
        window = windows[energy[index] - 1] if 0 < energy[index] <= len(windows) else None
        if not _window_is_tc99m(window):
            continue
        head = detectors[detector[index] - 1] if 0 < detector[index] <= len(detectors) else None
        view = _view(head) or ("anterior" if detector[index] == 1 else None)
        frames.append(
            _Frame(
                pixels[index],
                spacing,
                ds,
                index + 1,
                view,
                phase[index],
                phase_count,
                minutes,
                (order[0], order[1], index),
                False,
            )
        )
    if len(frames) < count:
        warnings.append("frames acquired outside the 99mTc window were ignored")
    return frames


def _as_list(value: object) -> list[int]:
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [int(v) for v in value]
    return [int(value)]  # type: ignore[call-overload]


def _text_phase(ds: Dataset) -> str | None:
    texts = [
        str(ds.get(keyword, "") or "")
        for keyword in ("ImageComments", "SeriesDescription", "ProtocolName")
    ]
    for text in texts:
        for name in ("thyroid", "delayed", "early"):
            if text and _PHASE_WORDS[name].search(text):
                return name
    return None


def _assign_phases(frames: list[_Frame], warnings: list[str]) -> dict[str, _Frame]:
    # Prefer anterior views: drop posterior frames whenever an anterior one exists.
    if any(frame.view == "anterior" for frame in frames):
        frames = [frame for frame in frames if frame.view != "posterior"]
    labelled: dict[str, list[_Frame]] = {}
    undecided: list[_Frame] = []
    for frame in frames:
        name = None
        if frame.phase_count > 1 and frame.phase_index is not None:
            name = "early" if frame.phase_index == 1 else "delayed"
        else:
            name = _text_phase(frame.dataset)
            if name is None and frame.minutes is not None:
                name = "early" if frame.minutes < _DELAYED_AFTER_MINUTES else "delayed"
        if name is None:
            undecided.append(frame)
        else:
            labelled.setdefault(name, []).append(frame)
    if undecided:
        # Last resort: series order. The first undecided frame is early, the last delayed.
        undecided.sort(key=lambda f: f.order)
        for name, frame in (("early", undecided[0]), ("delayed", undecided[-1])):
            if name not in labelled and (name == "early" or frame is not undecided[0]):
                labelled.setdefault(name, []).append(frame)
        warnings.append("phases were told apart by series order (no description or time)")
    chosen = {}
    for name, candidates in labelled.items():
        candidates.sort(key=lambda f: (f.screen_capture, f.view != "anterior", f.order))
        chosen[name] = candidates[0]
    return chosen


def _check_counts(selected: dict[str, _Frame]) -> None:
    for name, frame in selected.items():
        pixels = frame.pixels
        if not np.isfinite(pixels).all() or float(pixels.max()) <= 0:
            raise UnusableStudyError(f"the {name} image is empty (all pixels zero)")
        bits = int(frame.dataset.get("BitsStored", 16) or 16)
        ceiling = float(2**bits - 1)
        if float(pixels.max()) == float(pixels.min()) or (
            not frame.screen_capture and float(np.mean(pixels >= ceiling)) > 0.2
        ):
            raise UnusableStudyError(
                f"the {name} image is saturated or flat; it cannot be analysed"
            )


def _match_sizes(selected: dict[str, _Frame], warnings: list[str]) -> dict[str, _Frame]:
    shapes = {frame.pixels.shape for frame in selected.values()}
    if len(shapes) == 1:
        return selected
    reference = max(selected.values(), key=lambda f: f.pixels.size)
    if any(frame.spacing is None for frame in selected.values()) or reference.spacing is None:
        sizes = ", ".join(
            f"{n} {f.pixels.shape[1]}x{f.pixels.shape[0]}" for n, f in selected.items()
        )
        raise UnusableStudyError(
            f"the phase images have different matrix sizes ({sizes}) and no pixel spacing "
            "to resample them"
        )
    out = {}
    for name, frame in selected.items():
        if frame.pixels.shape == reference.pixels.shape:
            out[name] = frame
            continue
        assert frame.spacing is not None
        zoom = (
            reference.pixels.shape[0] / frame.pixels.shape[0],
            reference.pixels.shape[1] / frame.pixels.shape[1],
        )
        scale = float(np.prod(zoom))
        resampled = ndimage.zoom(frame.pixels, zoom, order=1) / scale  # keep total counts
        out[name] = _Frame(
            resampled.astype(np.float32),
            reference.spacing,
            frame.dataset,
            frame.frame_number,
            frame.view,
            frame.phase_index,
            frame.phase_count,
            frame.minutes,
            frame.order,
            frame.screen_capture,
        )
        warnings.append(
            f"the {name} image was resampled from {frame.pixels.shape[1]}x"
            f"{frame.pixels.shape[0]} to {reference.pixels.shape[1]}x{reference.pixels.shape[0]}"
        )
    return out
