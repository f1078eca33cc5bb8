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
from pathlib import Path

import pydicom

from mibi_node.analyses.knee.result import KneeInput
from mibi_node.imaging.series_choice import (
    Candidate,
    choose_series,
    is_multi_frame,
    series_name,
    series_plane,
)

__all__ = ["PART", "knee_laterality", "read_knee_study"]

logger = logging.getLogger(__name__)

#: What a :class:`~mibi_node.errors.MissingPhaseError` names as missing.
PART = "3-D sagittal knee series"

_CARTILAGE_TEXT = re.compile(r"dess|spgr|flash|3d|pd", re.IGNORECASE)

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


def _judge(ds: pydicom.Dataset, count: int) -> Candidate | str:
    """A candidate, or why the series is left out."""
    name = series_name(ds)
    modality = str(ds.get("Modality", "") or "")
    if modality != "MR":
        return f"{name} is {modality or 'of no modality'}, not MR"
    if is_multi_frame(ds):
        return f"{name} is a multi-frame (Enhanced) series, which is not read yet"
    plane = series_plane(ds)
    if plane is None:
        return f"{name} has no usable Image Orientation (Patient)"
    if plane != "sagittal":
        return f"{name} is {plane}, not sagittal"
    text = " ".join(
        str(ds.get(keyword, "") or "")
        for keyword in ("SeriesDescription", "ProtocolName", "SequenceName")
    )
    is_3d = str(ds.get("MRAcquisitionType", "") or "").upper() == "3D"
    laterality, warning = knee_laterality(ds)
    warnings = [] if is_3d else [f"{name} is a 2-D series; a 3-D series segments better"]
    if warning:
        warnings.append(warning)
    return Candidate(
        name=name,
        rank=(int(is_3d), count, int(bool(_CARTILAGE_TEXT.search(text)))),
        reason=f"sagittal, {'3-D' if is_3d else '2-D'}, {count} slices, {name}",
        warnings=tuple(warnings),
        data=laterality,
    )


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
    choice = choose_series(paths, _judge, PART)
    laterality = choice.candidate.data
    logger.debug("knee input from %s (side %s)", choice.candidate.reason, laterality)
    return KneeInput(
        volume=choice.volume,
        reason=choice.candidate.reason,
        warnings=choice.warnings,
        laterality=laterality,
    )
