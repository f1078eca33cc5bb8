"""Reading a knee MR study: find the 3-D sagittal series and read it as a volume.

A knee study arrives as loose instances of several series: localisers, 2-D proton-density
series in three planes, perhaps a 3-D sequence (DESS, SPGR, FLASH) for the cartilage. The
instances are grouped by series and each series is judged by its headers: it must be MR,
single-frame, sagittal by its Image Orientation (the slice normal within about 37 degrees
of the patient's left-right axis) and hold at least
:data:`~mibi_node.imaging.volume_reader.MIN_SLICES` slices. Among those the reader prefers
MR Acquisition Type 3D, then the most slices, then a Series Description that names a
cartilage sequence (DESS, SPGR, FLASH, 3D, PD), and reads the first that forms a regular
volume (:func:`~mibi_node.imaging.volume_reader.read_volume`). Every series left out is
named with its reason in the input's warnings.

The knee's laterality (which decides which tibial plate is medial) is read from the chosen
series' headers (:func:`knee_laterality`): Laterality (0020,0060), Image Laterality
(0020,0062), then the words of the Study and Series Descriptions and Body Part Examined
(LEFT/RIGHT and their German, French, Italian, Spanish, Chinese and Japanese words). Sources
that disagree leave it unknown, with a warning naming them.

A study without any sagittal MR series raises
:class:`~mibi_node.errors.MissingPhaseError`: the 3-D series may still come (a scanner sends
series as they finish), so the job waits for it before it fails. A study whose sagittal
series are all unusable for a reason that will not change (a gap, uneven spacing) raises
:class:`~mibi_node.errors.UnusableStudyError` naming each.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from mibi_node.analyses.knee.result import KneeInput
from mibi_node.errors import MissingPhaseError, UnusableStudyError
from mibi_node.imaging.volume_reader import MIN_SLICES, group_series, read_volume

__all__ = ["PART", "knee_laterality", "read_knee_study"]

logger = logging.getLogger(__name__)

#: What a :class:`~mibi_node.errors.MissingPhaseError` names as missing.
PART = "3-D sagittal knee series"

_CARTILAGE_TEXT = re.compile(r"dess|spgr|flash|3d|pd", re.IGNORECASE)
_MULTI_FRAME_CLASSES = ("1.2.840.10008.5.1.4.1.1.4.1", "1.2.840.10008.5.1.4.1.1.4.4")

#: Words naming a side, each bounded by non-letters (the CJK characters need no bounds).
_SIDE_WORDS = {
    "L": ("left", "links", "gauche", "sinistro", "sinistra", "izquierda", "izquierdo"),
    "R": ("right", "rechts", "droit", "droite", "destro", "destra", "derecha", "derecho"),
}
_SIDE_TEXT = {
    side: re.compile(
        rf"(?<![^\W\d_])(?:{'|'.join(words)})(?![^\W\d_])|{'左' if side == 'L' else '右'}",
        re.IGNORECASE,
    )
    for side, words in _SIDE_WORDS.items()
}
_SIDE_NAME = {"L": "left", "R": "right"}


@dataclass(frozen=True)
class _Candidate:
    uid: str
    paths: list[Path]
    name: str
    is_3d: bool
    text: str
    laterality: str | None = None
    laterality_warning: str = ""

    @property
    def rank(self) -> tuple[int, int, int]:
        return (int(self.is_3d), len(self.paths), int(bool(_CARTILAGE_TEXT.search(self.text))))

    @property
    def reason(self) -> str:
        kind = "3-D" if self.is_3d else "2-D"
        return f"sagittal, {kind}, {len(self.paths)} slices, {self.name}"


def _name(ds: pydicom.Dataset) -> str:
    text = str(ds.get("SeriesDescription", "") or "")
    number = ds.get("SeriesNumber", "?")
    return f"series {number} '{text}'" if text else f"series {number} (no description)"


def _plane(ds: pydicom.Dataset) -> str | None:
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


def knee_laterality(ds: pydicom.Dataset) -> tuple[str | None, str]:
    """The knee's side from a series' headers: ``"L"``, ``"R"`` or ``None``, and a warning.

    Laterality (0020,0060) and Image Laterality (0020,0062) count when they are ``L`` or
    ``R``; each of Study Description, Series Description and Body Part Examined counts when
    its words name one side only. Every source that names a side must agree.

    Returns
    -------
    tuple
        The side, or ``None`` when no source names one or sources disagree; the warning
        naming the disagreement ("" otherwise).
    """
    found: list[tuple[str, str]] = []
    for keyword in ("Laterality", "ImageLaterality"):
        value = str(ds.get(keyword, "") or "").strip().upper()
        if value in ("L", "R"):
            found.append((keyword, value))
    for keyword in ("StudyDescription", "SeriesDescription", "BodyPartExamined"):
        text = str(ds.get(keyword, "") or "")
        named = [side for side, pattern in _SIDE_TEXT.items() if pattern.search(text)]
        found.extend((f"{keyword} {text.strip()!r}", side) for side in named)
    sides = {side for _, side in found}
    if len(sides) == 1:
        return sides.pop(), ""
    if not sides:
        return None, ""
    sources = ", ".join(f"{source} {_SIDE_NAME[side]}" for source, side in found)
    return None, f"the headers disagree on the knee's side ({sources})"


def _judge(uid: str, paths: list[Path]) -> tuple[_Candidate | None, str]:
    """A candidate, or ``None`` and why the series is left out."""
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    name = _name(ds)
    modality = str(ds.get("Modality", "") or "")
    if modality != "MR":
        return None, f"{name} is {modality or 'of no modality'}, not MR"
    frames = ds.get("NumberOfFrames")
    if str(ds.get("SOPClassUID", "")) in _MULTI_FRAME_CLASSES or (frames and int(frames) > 1):
        return None, f"{name} is a multi-frame (Enhanced) series, which is not read yet"
    plane = _plane(ds)
    if plane is None:
        return None, f"{name} has no usable Image Orientation (Patient)"
    if plane != "sagittal":
        return None, f"{name} is {plane}, not sagittal"
    text = " ".join(
        str(ds.get(keyword, "") or "")
        for keyword in ("SeriesDescription", "ProtocolName", "SequenceName")
    )
    is_3d = str(ds.get("MRAcquisitionType", "") or "").upper() == "3D"
    laterality, warning = knee_laterality(ds)
    return _Candidate(uid, paths, name, is_3d, text, laterality, warning), ""


def read_knee_study(paths: Sequence[Path]) -> KneeInput:
    """Choose a knee MR study's 3-D sagittal series and read it as the model input.

    Parameters
    ----------
    paths
        The study's files, in any order, of any series (non-image instances are ignored).

    Raises
    ------
    MissingPhaseError
        No series is a sagittal MR series of at least three slices (each series' refusal
        is listed); it may still arrive.
    UnusableStudyError
        A file cannot be read, or every sagittal series fails to form a regular volume
        (each named with its problem).
    """
    if isinstance(paths, (str, Path)):
        raise TypeError('Argument "paths" should be a sequence of paths, not one path.')
    if not paths:
        raise UnusableStudyError("the study has no files")
    groups = group_series(paths)
    if not groups:
        raise UnusableStudyError(f"the study has no images ({len(paths)} non-image files)")
    refusals: list[str] = []
    candidates: list[_Candidate] = []
    for uid, members in groups.items():
        candidate, why = _judge(uid, members)
        if candidate is None:
            refusals.append(why)
        elif len(members) < MIN_SLICES:
            refusals.append(f"{candidate.name} has only {len(members)} slice(s) so far")
        else:
            candidates.append(candidate)
    if not candidates:
        raise MissingPhaseError(
            f"no {PART}: {'; '.join(refusals)}",
            missing=(PART,),
            found=tuple(
                _name(pydicom.dcmread(m[0], stop_before_pixels=True)) for m in groups.values()
            ),  # fmt: skip
        )
    candidates.sort(key=lambda c: c.rank, reverse=True)
    failures: list[str] = []
    for at, candidate in enumerate(candidates):
        try:
            volume = read_volume(candidate.paths)
        except UnusableStudyError as error:
            failures.append(f"{candidate.name}: {error}")
            continue
        warnings = [f"{why}; not used" for why in refusals]
        warnings += [f"not used: {failure}" for failure in failures]
        warnings += [f"{c.name} also sagittal, not used" for c in candidates[at + 1 :]]
        if not candidate.is_3d:
            warnings.append(f"{candidate.name} is a 2-D series; a 3-D series segments better")
        if candidate.laterality_warning:
            warnings.append(candidate.laterality_warning)
        warnings.extend(volume.warnings)
        logger.debug("knee input from %s (side %s)", candidate.reason, candidate.laterality)
        return KneeInput(
            volume=volume,
            reason=candidate.reason,
            warnings=tuple(warnings),
            laterality=candidate.laterality,
        )
    raise UnusableStudyError(f"no usable {PART}: {'; '.join(failures)}")
