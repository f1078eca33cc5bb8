"""Phase and view detection from the free text and timing that consoles write."""

from __future__ import annotations

from datetime import datetime

import pytest
from pydicom.dataset import Dataset

from mibi_node.imaging.phase import (
    acquisition_start,
    injection_time,
    phase_from_minutes,
    phase_from_text,
    view_from_code,
    view_from_text,
)


@pytest.mark.parametrize(
    ("text", "phase"),
    [
        ("EARLY 10MIN ANT", "early"),
        ("DELAYED 2H ANT", "delayed"),
        ("15 min p.i.", "early"),
        ("MIBI 20 MIN", "early"),
        ("MIBI 120 min", "delayed"),
        ("Late 3h", "delayed"),
        ("1.5H", "delayed"),
        ("washout", "delayed"),
        ("Frühaufnahme", "early"),
        ("Spätaufnahme 2 Std", "delayed"),
        ("précoce", "early"),
        ("TARDIVE 120'", "delayed"),
        ("temprana", "early"),
        ("tardía", "delayed"),
        ("THYROID TCO4 ANT", "thyroid"),
        ("Pertechnetate", "thyroid"),
        ("PARATHYROID MIBI ANT", None),
        ("Nebenschilddrüse früh", "early"),
        ("MIBI TC99M 140KEV", None),  # 99M is the isotope, not 99 minutes
        ("EARLY/DELAYED", None),  # contradicts itself
        ("SPATIAL RES", None),
        ("", None),
    ],
)
def test_phase_from_text(text: str, phase: str | None) -> None:
    assert phase_from_text(text) == phase


@pytest.mark.parametrize(
    ("minutes", "phase"), [(12.0, "early"), (45.0, "early"), (50.0, None), (95.0, "delayed")]
)
def test_phase_from_minutes(minutes: float, phase: str | None) -> None:
    assert phase_from_minutes(minutes) == phase
    assert phase_from_minutes(None) is None


@pytest.mark.parametrize(
    ("text", "view"),
    [
        ("EARLY 10MIN ANT", "anterior"),
        ("DELAYED POST", "posterior"),
        ("20 MIN POST INJ", None),
        ("LAO 2H", "oblique"),
        ("PARATHYROID MIBI", None),
    ],
)
def test_view_from_text(text: str, view: str | None) -> None:
    assert view_from_text(text) == view


def test_view_from_code() -> None:
    item, code = Dataset(), Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = (
        "399001007",
        "SCT",
        "Posterior projection",
    )
    item.ViewCodeSequence = [code]
    assert view_from_code(item) == "posterior"
    code.CodeValue, code.CodeMeaning = "399074003", "Left anterior oblique"
    assert view_from_code(item) == "oblique"
    assert view_from_code(Dataset()) is None


def test_times_combine_dates_and_cross_midnight() -> None:
    ds = Dataset()
    ds.StudyDate = "20260102"
    ds.AcquisitionTime = "001500.25"
    item = Dataset()
    item.RadiopharmaceuticalStartTime = "234500"
    ds.RadiopharmaceuticalInformationSequence = [item]
    start = acquisition_start(ds)
    assert start == datetime(2026, 1, 2, 0, 15)
    assert injection_time(ds, start) == datetime(2026, 1, 1, 23, 45)
