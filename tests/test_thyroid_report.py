"""The thyroid analysis' SR: what it says, read back from the file, and what dciodvfy says.

The result is written by hand (two reported findings, a hot and a cold area, a lobe split)
so that every value in the SR is known; the source is a real thyroid phantom study.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.report import (
    build_thyroid_sr,
    read_thyroid_probabilities,
    read_thyroid_report,
)
from mibi_node.analyses.thyroid.result import FINDINGS, Nodule, ThyroidResult
from mibi_node.report import DEMONSTRATION_DISCLAIMER

PROBABILITIES = {
    "normal": 0.02,
    "graves": 0.05,
    "toxic_multinodular_goitre": 0.11,
    "toxic_adenoma": 0.91,
    "cold_nodule": 0.64,
    "thyroiditis": 0.01,
}


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> tuple[ThyroidResult, list[pydicom.Dataset]]:
    out = tmp_path_factory.mktemp("thyroid-sr")
    generate_thyroid_studies(out, 1, 31, matrix=64)
    folder = out / "study-0001"
    study = read_thyroid_study([folder])
    image = study.images["thyroid"]
    result = ThyroidResult(
        study_instance_uid=study.study_instance_uid,
        probabilities=dict(PROBABILITIES),
        findings=("toxic_adenoma", "cold_nodule"),
        thresholds=dict.fromkeys(FINDINGS, 0.5),
        lobe_uptake={"right": 0.62, "left": 0.38},
        nodules=(
            Nodule(row=20.0, col=24.0, radius=3.5, kind="hot", lobe="right"),
            Nodule(row=30.0, col=40.0, radius=4.0, kind="cold", lobe="left"),
        ),
        source_image=image,
        bundle_name="thyroid-test",
        bundle_version="0.0.1",
        intended_use="demonstration",
    )
    sources = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    return result, sources


def _sr(scan: tuple[ThyroidResult, list[pydicom.Dataset]], path: Path) -> Path:
    result, sources = scan
    sr = build_thyroid_sr(result, sources, device_uid=generate_uid(), series_number=9911)
    sr.save_as(path, enforce_file_format=True)
    return path


def test_sr_read_back_from_the_file_says_what_the_result_says(scan, tmp_path: Path) -> None:
    result, _ = scan
    sr = pydicom.dcmread(_sr(scan, tmp_path / "sr.dcm"))
    report = read_thyroid_report(sr)
    assert report.probabilities == pytest.approx(PROBABILITIES)
    assert read_thyroid_probabilities(sr) == report.probabilities
    assert report.reported == ("toxic_adenoma", "cold_nodule")
    assert report.lobe_uptake == pytest.approx({"right": 0.62, "left": 0.38})
    assert sr.StudyInstanceUID == result.study_instance_uid
    assert sr.SeriesNumber == 9911 and sr.Modality == "SR"
    text = " ".join(str(v.value) for v in sr.iterall() if v.VR in ("UT", "LT", "ST"))
    assert DEMONSTRATION_DISCLAIMER in text
    graphics = [v.value for v in sr.iterall() if v.keyword == "GraphicType"]
    assert graphics.count("CIRCLE") == 2
    referenced = {str(v.value) for v in sr.iterall() if v.keyword == "ReferencedSOPInstanceUID"}
    assert result.source_image.sop_instance_uid in referenced


def test_sr_has_no_dciodvfy_errors(scan, tmp_path: Path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    path = _sr(scan, tmp_path / "sr.dcm")
    run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_a_result_without_its_source_image_is_refused(scan) -> None:
    result, sources = scan
    others = [s for s in sources if s.SOPInstanceUID != result.source_image.sop_instance_uid]
    with pytest.raises(ValueError, match="lacks the thyroid image"):
        build_thyroid_sr(result, others or sources[:0], device_uid=generate_uid(), series_number=1)


def test_a_probability_outside_0_1_is_refused(scan) -> None:
    result, sources = scan
    bad = ThyroidResult(**{**result.__dict__, "probabilities": {**PROBABILITIES, "graves": 1.5}})
    with pytest.raises(ValueError, match="probabilit"):
        build_thyroid_sr(bad, sources, device_uid=generate_uid(), series_number=1)


def test_a_clinical_bundle_states_the_thyroid_use_not_the_parathyroid_one(scan) -> None:
    from dataclasses import replace

    from mibi_node.analyses.thyroid.report import THYROID_CLINICAL_USE

    result, sources = scan
    clinical = replace(result, intended_use="clinical")
    sr = build_thyroid_sr(clinical, sources, device_uid=generate_uid(), series_number=9911)
    text = " ".join(str(v.value) for v in sr.iterall() if v.VR in ("UT", "LT", "ST"))
    assert THYROID_CLINICAL_USE in text
    assert "sestamibi" not in text and DEMONSTRATION_DISCLAIMER not in text
