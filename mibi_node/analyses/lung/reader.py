"""Reading a chest CT study: find the axial series for the lungs and read it in HU.

A chest CT study holds a localiser (scout), one or more axial reconstructions (a lung
kernel, a soft-tissue kernel, thin and thick slices), perhaps coronal or sagittal
reformats and a dose report. Each series is judged by its first header: it must be CT
Image Storage (single-frame), not a localiser, axial by its Image Orientation (the slice
normal within about 37 degrees of the patient's feet-head axis) and hold at least
:data:`~mibi_node.imaging.volume_reader.MIN_SLICES` slices. Among those the reader prefers a
series whose description or Convolution Kernel names the lung (a sharp lung kernel shows
ground glass and bronchial walls best), then the most slices (the thinnest reconstruction
of the same range), and reads the first that forms a regular volume in HU
(:func:`~mibi_node.imaging.volume_reader.read_volume` applies Rescale Slope and Intercept,
orders the slices by position and reports missing or duplicate ones). Every series left
out is named with its reason in the input's warnings.

A study without an axial CT series raises :class:`~mibi_node.errors.MissingPhaseError`: it
may still come. A study whose axial series all fail to form a volume (a missing slice,
uneven spacing) raises :class:`~mibi_node.errors.UnusableStudyError` naming each.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import pydicom

from mibi_node.analyses.lung.result import LungInput
from mibi_node.imaging.series_choice import (
    Candidate,
    choose_series,
    is_multi_frame,
    series_name,
    series_plane,
)

__all__ = ["CT_IMAGE_STORAGE", "PART", "read_lung_study"]

logger = logging.getLogger(__name__)

#: What a :class:`~mibi_node.errors.MissingPhaseError` names as missing.
PART = "axial chest CT series"

#: The storage class the reader takes (one slice per instance).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"

#: Descriptions and kernels that name a lung reconstruction (Siemens B60f/B70f/Br60, GE
#: LUNG/BONEPLUS, Philips YA/YB/L, Canon FC5x/FC8x, and words in several languages).
_LUNG_TEXT = re.compile(
    r"lung|lunge|poumon|polmon|pulm|\bb[67]\d|\bbr6\d|\bi7\d|boneplus|\by[ab]\b|\bfc[58]\d|肺",
    re.IGNORECASE,
)


def _judge(ds: pydicom.Dataset, count: int) -> Candidate | str:
    """A candidate, or why the series is left out."""
    name = series_name(ds)
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        return f"{name} is {modality or 'of no modality'}, not CT"
    if is_multi_frame(ds):
        return f"{name} is a multi-frame (Enhanced CT) series, which is not read yet"
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class != CT_IMAGE_STORAGE:
        return f"{name} is not CT Image Storage (SOP class {sop_class or 'missing'})"
    image_type = [str(value).upper() for value in ds.get("ImageType", []) or []]
    if "LOCALIZER" in image_type:
        return f"{name} is a localiser"
    plane = series_plane(ds)
    if plane is None:
        return f"{name} has no usable Image Orientation (Patient)"
    if plane != "axial":
        return f"{name} is {plane}, not axial"
    text = " ".join(
        str(ds.get(keyword, "") or "")
        for keyword in ("SeriesDescription", "ConvolutionKernel", "ProtocolName")
    )
    lung = bool(_LUNG_TEXT.search(text))
    warnings = () if lung else (f"{name} names no lung kernel; a sharp lung kernel reads best",)
    return Candidate(
        name=name,
        rank=(int(lung), count),
        reason=f"axial CT, {count} slices, {name}" + (", lung kernel" if lung else ""),
        warnings=warnings,
    )


def read_lung_study(paths: Sequence[Path]) -> LungInput:
    """Choose a chest CT study's axial lung series and read it in HU as the model input.

    Parameters
    ----------
    paths
        The study's files, in any order, of any series (non-image instances are ignored).

    Raises
    ------
    MissingPhaseError
        No series is an axial CT series of at least three slices (each series' refusal is
        listed); it may still arrive.
    UnusableStudyError
        A file cannot be read, or every axial series fails to form a regular volume (each
        named with its problem).
    """
    choice = choose_series(paths, _judge, PART)
    logger.debug("lung input from %s", choice.candidate.reason)
    return LungInput(volume=choice.volume, reason=choice.candidate.reason, warnings=choice.warnings)
