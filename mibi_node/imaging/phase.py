"""Which phase and which view an image shows, from its text, codes and timing.

Consoles label MIBI images in free text ("EARLY 10MIN ANT", "Spät 2h", "TARDIVE 120'"), so
the rules here read the common words and time expressions of several languages. Times are
minutes after the radiopharmaceutical injection: up to 45 is early, from 60 on delayed.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime, timedelta

from pydicom.dataset import Dataset

__all__ = [
    "EARLY_MAX_MINUTES",
    "DELAYED_MIN_MINUTES",
    "acquisition_start",
    "injection_time",
    "is_pertechnetate",
    "phase_from_minutes",
    "phase_from_text",
    "view_from_code",
    "view_from_text",
]

logger = logging.getLogger(__name__)

#: Latest start (minutes after injection) still called early.
EARLY_MAX_MINUTES = 45.0
#: Earliest start (minutes after injection) called delayed.
DELAYED_MIN_MINUTES = 60.0

_EARLY = re.compile(
    r"\b(EARLY|EARLIER|INITIAL|IMMEDIATE|FR(?:U|Ü|UE)H\w*|PR[EÉ]COCE|PRECOZ|TEMPRAN[OA]|"
    r"VROEG|TIDIG|WCZESN\w*|RANN\w*|1ST\s+PHASE|PHASE\s*1)\b"
)
_DELAYED = re.compile(
    r"\b(DELAY(?:ED)?|LATE|LATER|SP(?:Ä|AE)T\w*|SPAT|TARDI(?:F|VE|O|A)|TARD[IÍ]A|TARDÍO|LAAT|"
    r"P[OÓ](?:Z|Ź)N\w*|POZDN\w*|RITARDAT\w*|WASH[- ]?OUT|2ND\s+PHASE|PHASE\s*2)\b"
)
_NUMBER = r"(?<![A-Z\d.\-^])(\d+(?:[.,]\d+)?)\s*"
_MINUTES = re.compile(_NUMBER + r"(?:MIN(?:UTES?|UTEN|S)?\b|M\b|')")
_HOURS = re.compile(_NUMBER + r"(?:H|HR|HRS|HOURS?|STD|STUNDEN?|HEURES?|UUR|ORE)\b")
_THYROID = re.compile(r"\b(THYR\w*|TIROID\w*|SCHILDDR\w*|PERTECH\w*|TCO4|TC-?99M?-?O4)\b")

_PARATHYROID = re.compile(r"\b(PARA|NEBEN)[\s_-]*(THYR|TIROID|SCHILDDR)\w*")

_ANTERIOR_CODES = {"399321004", "R-10206", "G-A117"}
_POSTERIOR_CODES = {"399001007", "R-10214", "G-A106"}
_VIEW_WORDS = (
    ("oblique", re.compile(r"\b(LAO|RAO|LPO|RPO|OBL\w*)\b")),
    ("posterior", re.compile(r"\b(POST(?:ERIOR)?|PA)\b(?!\s*[-.]?\s*INJ)")),
    ("anterior", re.compile(r"\b(ANT(?:ERIOR)?|AP|VENTRAL)\b")),
)
_PERTECHNETATE_CODES = {"19495007", "C-B1062", "C-B1014"}


def _minutes(text: str) -> float | None:
    hours = _HOURS.search(text)
    if hours:
        return float(hours.group(1).replace(",", ".")) * 60.0
    minutes = _MINUTES.search(text)
    if minutes:
        return float(minutes.group(1).replace(",", "."))
    return None


def phase_from_minutes(minutes: float | None) -> str | None:
    """``"early"``, ``"delayed"`` or ``None`` (unknown or between the two) for a start time."""
    if minutes is None or minutes < 0:
        return None
    if minutes <= EARLY_MAX_MINUTES:
        return "early"
    if minutes >= DELAYED_MIN_MINUTES:
        return "delayed"
    return None


def phase_from_text(text: str) -> str | None:
    """The phase a description names, or ``None`` when it names none or contradicts itself.

    Parameters
    ----------
    text
        Series description, image comments and similar free text, in any case.

    Returns
    -------
    str or None
        ``"thyroid"`` for a thyroid (pertechnetate) scan, ``"early"`` or ``"delayed"``.
    """
    upper = _PARATHYROID.sub(" ", text.upper())
    if _THYROID.search(upper):
        return "thyroid"
    words = {
        phase
        for phase, pattern in (("early", _EARLY), ("delayed", _DELAYED))
        if pattern.search(upper)
    }
    timed = phase_from_minutes(_minutes(upper))
    if timed is not None:
        words.add(timed)
    return words.pop() if len(words) == 1 else None


def view_from_text(text: str) -> str | None:
    """``"anterior"``, ``"posterior"``, ``"oblique"`` or ``None`` from free text."""
    upper = text.upper()
    for view, pattern in _VIEW_WORDS:
        if pattern.search(upper):
            return view
    return None


def view_from_code(item: Dataset | None) -> str | None:
    """The view that a Detector Information item's View Code Sequence names, if any."""
    if item is None or not item.get("ViewCodeSequence"):
        return None
    code = item.ViewCodeSequence[0]
    value = str(code.get("CodeValue", ""))
    meaning = str(code.get("CodeMeaning", "")).lower()
    if value in _ANTERIOR_CODES or meaning in ("anterior", "anterior projection"):
        return "anterior"
    if value in _POSTERIOR_CODES or meaning in ("posterior", "posterior projection"):
        return "posterior"
    return "oblique" if "oblique" in meaning else "other"


def is_pertechnetate(ds: Dataset) -> bool:
    """Whether the radiopharmaceutical is 99mTc-pertechnetate (a thyroid scan)."""
    for item in ds.get("RadiopharmaceuticalInformationSequence", None) or []:
        for code in item.get("RadiopharmaceuticalCodeSequence", None) or []:
            if str(code.get("CodeValue", "")) in _PERTECHNETATE_CODES:
                return True
        if "PERTECH" in str(item.get("Radiopharmaceutical", "")).upper():
            return True
    return False


def _combine(date: object, time: object) -> datetime | None:
    date_text, time_text = str(date or "").strip(), str(time or "").strip()
    if len(date_text) < 8 or len(time_text) < 4:
        return None
    try:
        clock = time_text.split(".")[0].replace(":", "").ljust(6, "0")[:6]
        return datetime.strptime(date_text[:8] + clock, "%Y%m%d%H%M%S")
    except ValueError:
        return None


def acquisition_start(ds: Dataset) -> datetime | None:
    """When the acquisition of an instance started, from the most specific attribute."""
    value = str(ds.get("AcquisitionDateTime", "") or "")
    if len(value) >= 12:
        moment = _combine(value[:8], value[8:14])
        if moment is not None:
            return moment
    for date, time in (
        ("AcquisitionDate", "AcquisitionTime"),
        ("ContentDate", "ContentTime"),
        ("SeriesDate", "SeriesTime"),
    ):
        date_value = ds.get(date) or ds.get("StudyDate")
        moment = _combine(date_value, ds.get(time))
        if moment is not None:
            return moment
    return None


def injection_time(ds: Dataset, reference: datetime | None) -> datetime | None:
    """The radiopharmaceutical start, dated like ``reference`` when only a time is given."""
    items = ds.get("RadiopharmaceuticalInformationSequence", None) or []
    if not items:
        return None
    item = items[0]
    value = str(item.get("RadiopharmaceuticalStartDateTime", "") or "")
    if len(value) >= 12:
        moment = _combine(value[:8], value[8:14])
        if moment is not None:
            return moment
    time = item.get("RadiopharmaceuticalStartTime")
    if reference is None or not time:
        return None
    moment = _combine(reference.strftime("%Y%m%d"), time)
    if moment is not None and moment > reference:
        moment -= timedelta(days=1)  # injected before midnight
    return moment
