"""IHE AI Results (AIR) conformance of every analysis' documents: SR, SEG and key image.

Each analysis encodes a result the way the worker does (``Analysis.encode`` with an
``EncodeContext``, key image on) for two versions of its bundle; the documents are written
to bytes and read back, and what AIR asks is checked on what was written: the algorithm's
Contributing Equipment item and its Device UID (one per bundle version), Procedure Reported,
the coded findings with their probability as NUM, Algorithm Identification (TID 4019) in
every measurement group, the evidence, and what dciodvfy says. docs/conformance.md section
8.6 maps each requirement to these tests.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    Comprehensive3DSRStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    generate_uid,
)

from cases import make_case
from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.measure import measure_lesions
from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
from mibi_node.analyses.lung.result import LungResult
from mibi_node.analyses.registry import get_analysis
from mibi_node.analyses.spine.phantom import make_spine_study
from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.result import FINDINGS, Nodule, ThyroidResult
from mibi_node.imaging.volume_reader import read_volume
from mibi_node.report._common import algorithm_device_uid
from test_knee_report import _labels as _knee_labels
from test_knee_report import _result as _knee_result
from test_knee_report import _series as _knee_series
from test_lung_report import CLASSES_DRAWN, SCORES
from test_lung_report import SHAPE as LUNG_SHAPE
from test_spine_report import _middle_series
from test_spine_report import _result as _spine_result

ANALYSES = ("parathyroid", "thyroid", "spine", "knee", "lung")
NODE_DEVICE_UID = "1.2.826.0.1.3680043.8.498.4242"
#: The bundle version each case is built with, and the one it is rebuilt with.
VERSIONS = ("1.0.0", "1.1.0")

#: What each analysis sends, in order (the key image is on).
KINDS = {
    "parathyroid": (Comprehensive3DSRStorage, SecondaryCaptureImageStorage),
    "thyroid": (Comprehensive3DSRStorage,),
    "spine": (Comprehensive3DSRStorage, SecondaryCaptureImageStorage),
    "knee": (Comprehensive3DSRStorage, SegmentationStorage),
    "lung": (Comprehensive3DSRStorage, SegmentationStorage, SecondaryCaptureImageStorage),
}

#: Procedure Reported of each SR (scheme, value): the imaging procedure analysed.
PROCEDURES = {
    "parathyroid": {("SCT", "371572003")},  # Nuclear medicine procedure
    "thyroid": {("SCT", "371572003"), ("LN", "30695-1")},  # ... and the NM thyroid scan
    "spine": {("LN", "24968-0")},  # MR Lumbar spine
    "knee": {("LN", "24802-1")},  # MR Knee
    "lung": {("LN", "24627-2")},  # CT Chest
}

PROCESSING_ALGORITHM = ("99IHE", "Newcode1", "Processing Algorithm")

# dciodvfy (dicom3tools 2022) knows neither the node's local scheme nor the Device UID that
# PS3.3 added to the Contributing Equipment Sequence after it; a source without Study ID
# draws a DICOMDIR warning. Any other warning fails.
ALLOWED_WARNINGS = (
    "Unrecognized defined term <99MIBINODE>",
    "needed to build DICOMDIR",
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",
)


# --- the five analyses' results ------------------------------------------------------------


def _parathyroid(tmp: Path) -> tuple[Any, list[Dataset]]:
    return make_case("adenoma")


def _thyroid(tmp: Path) -> tuple[Any, list[Dataset]]:
    generate_thyroid_studies(tmp, 1, 31, matrix=64)
    folder = tmp / "study-0001"
    study = read_thyroid_study([folder])
    probabilities = dict(zip(FINDINGS, (0.02, 0.05, 0.11, 0.91, 0.64, 0.01), strict=True))
    result = ThyroidResult(
        study_instance_uid=study.study_instance_uid,
        probabilities=probabilities,
        findings=("toxic_adenoma", "cold_nodule"),
        thresholds=dict.fromkeys(FINDINGS, 0.5),
        lobe_uptake={"right": 0.62, "left": 0.38},
        nodules=(Nodule(row=20.0, col=24.0, radius=3.5, kind="hot", lobe="right"),),
        source_image=study.images["thyroid"],
        bundle_name="thyroid-demo",
        bundle_version=VERSIONS[0],
        intended_use="demonstration",
    )
    return result, [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]


def _spine(tmp: Path) -> tuple[Any, list[Dataset]]:
    make_spine_study(tmp, 7)
    paths = sorted(tmp.rglob("*.dcm"))
    series = _middle_series(paths)
    used = {ds.SOPInstanceUID for ds in series}
    sources = series + [
        ds for ds in (pydicom.dcmread(p) for p in paths) if ds.SOPInstanceUID not in used
    ]
    return _spine_result(sources), sources


def _knee(tmp: Path) -> tuple[Any, list[Dataset]]:
    volume, sources = _knee_series()
    return _knee_result(volume, _knee_labels()), sources


def _lung(tmp: Path) -> tuple[Any, list[Dataset]]:
    case = make_lung_case(2028, shape=LUNG_SHAPE, lesions=CLASSES_DRAWN)
    paths = write_lung_study(case, tmp / "study")
    volume = read_volume(paths)
    lesions = [
        Lesion3D.from_mask(truth.label, score, case.instances == truth.id)
        for truth, score in zip(case.lesions, SCORES, strict=True)
    ]
    lesions_map, findings = measure_lesions(volume, lesions)
    result = LungResult(
        study_instance_uid=volume.study_instance_uid,
        volume=volume,
        lesions_map=lesions_map,
        lesions=findings,
        bundle_name="lung-demo",
        bundle_version=VERSIONS[0],
    )
    return result, [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


BUILDERS = {
    "parathyroid": _parathyroid,
    "thyroid": _thyroid,
    "spine": _spine,
    "knee": _knee,
    "lung": _lung,
}


def _read_back(ds: Dataset) -> Dataset:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _encode(name: str, result: Any, sources: list[Dataset]) -> list[Dataset]:
    context = EncodeContext(
        device_uid=NODE_DEVICE_UID,
        series_number=9901,
        instance_number=1,
        series_instance_uid=generate_uid(),
        key_image=True,
    )
    return [_read_back(ds) for ds in get_analysis(name).encode(result, sources, context)]


@dataclasses.dataclass(frozen=True)
class Case:
    """One analysis' result and sources, and its documents for three encodings."""

    name: str
    result: Any
    sources: list[Dataset]
    #: The documents of the bundle's first version, and of a second encoding of it.
    first: list[Dataset]
    again: list[Dataset]
    #: The documents of the next version of the same bundle.
    next: list[Dataset]


@pytest.fixture(scope="module", params=ANALYSES)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    name = request.param
    result, sources = BUILDERS[name](tmp_path_factory.mktemp(name))
    result = dataclasses.replace(result, bundle_version=VERSIONS[0])
    upgraded = dataclasses.replace(result, bundle_version=VERSIONS[1])
    return Case(
        name,
        result,
        sources,
        first=_encode(name, result, sources),
        again=_encode(name, result, sources),
        next=_encode(name, upgraded, sources),
    )


# --- reading the documents -----------------------------------------------------------------


def _walk(items: Any) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _concept(item: Dataset, attribute: str = "ConceptNameCodeSequence") -> tuple[str, str]:
    code = item[attribute][0] if item.get(attribute) else None
    return ("", "") if code is None else (str(code.CodingSchemeDesignator), str(code.CodeValue))


def _algorithm_items(ds: Dataset) -> list[Dataset]:
    return [
        item
        for item in ds.get("ContributingEquipmentSequence", [])
        if tuple(
            str(item.PurposeOfReferenceCodeSequence[0].get(k))
            for k in ("CodingSchemeDesignator", "CodeValue", "CodeMeaning")
        )
        == PROCESSING_ALGORITHM
    ]


def _device_uids(documents: list[Dataset]) -> set[str]:
    return {str(item.DeviceUID) for ds in documents for item in _algorithm_items(ds)}


def _groups(sr: Dataset) -> list[Dataset]:
    return [i for i in _walk(sr.ContentSequence) if _concept(i) == ("DCM", "125007")]


def _probability_value(item: Dataset) -> float:
    measured = item.MeasuredValueSequence[0]
    return float(measured.get("FloatingPointValue", measured.NumericValue))


def _expected_probabilities(case: Case) -> list[float]:
    """Every probability the result gives, as the SR must write them."""
    result = case.result
    if case.name == "parathyroid":
        focus = [result.probabilities[result.predicted]] if result.focus is not None else []
        return [*result.probabilities.values(), *focus]
    if case.name == "thyroid":
        return list(result.probabilities.values())
    if case.name == "spine":
        return [p for point in result.points for p in point.probabilities.values()]
    if case.name == "lung":
        return [round(lesion.probability, 4) for lesion in result.lesions]
    return []  # the knee model segments: it gives no probability


# --- the tests -----------------------------------------------------------------------------


def test_device_uid_is_the_bundle_versions_own() -> None:
    first = algorithm_device_uid("mibi-demo", "1.0.0")
    assert re.fullmatch(r"2\.25\.[1-9][0-9]*", first) and len(first) <= 64
    assert algorithm_device_uid("mibi-demo", "1.0.0") == first
    others = {
        algorithm_device_uid("mibi-demo", "1.0.1"),
        algorithm_device_uid("mibi-demo-x", "1.0.0"),
        algorithm_device_uid("mibi-demo", "1.0.0", manufacturer="ACME"),
        # no two fields run together: ("ab", "c") is not ("a", "bc")
        algorithm_device_uid("mibi-demo1", ".0.0"),
    }
    assert first not in others and len(others) == 4
    for name, version in (("", "1.0.0"), ("mibi-demo", "")):
        with pytest.raises(ValueError, match="should be a non-empty string"):
            algorithm_device_uid(name, version)
    with pytest.raises(TypeError, match='"version" should be a string'):
        algorithm_device_uid("mibi-demo", 1)  # type: ignore[arg-type]


def test_every_document_names_the_algorithm_as_air_asks(case: Case) -> None:
    assert tuple(str(ds.SOPClassUID) for ds in case.first) == KINDS[case.name]
    for ds in case.first:
        [item] = _algorithm_items(ds)
        assert str(item.Manufacturer) == "mibi-node"
        assert str(item.ManufacturerModelName) == case.result.bundle_name
        assert str(item.SoftwareVersions) == case.result.bundle_version == VERSIONS[0]
        assert re.fullmatch(r"[0-9.]{1,64}", str(item.DeviceUID))
        # highdicom names itself after the algorithm, as Processing Equipment.
        purposes = [
            _concept(c, "PurposeOfReferenceCodeSequence") for c in ds.ContributingEquipmentSequence
        ]
        assert purposes[-1] == ("DCM", "109102")
        assert purposes.index(PROCESSING_ALGORITHM[:2]) < len(purposes) - 1
        # The IHE scheme of the purpose is declared.
        declared = {str(s.CodingSchemeDesignator) for s in ds.CodingSchemeIdentificationSequence}
        assert "99IHE" in declared


def test_device_uid_changes_with_the_bundle_version(case: Case) -> None:
    [first] = _device_uids(case.first)  # one UID for all documents of a result
    assert _device_uids(case.again) == {first}  # the same bundle version: the same UID
    [upgraded] = _device_uids(case.next)
    assert upgraded != first
    assert [str(i.SoftwareVersions) for i in _algorithm_items(case.next[0])] == [VERSIONS[1]]


def test_observer_stays_the_node(case: Case) -> None:
    sr = case.first[0]
    observer = {
        _concept(i): str(i.get("UID") or i.get("TextValue"))
        for i in sr.ContentSequence
        if i.RelationshipType == "HAS OBS CONTEXT"
    }
    assert observer[("DCM", "121012")] == NODE_DEVICE_UID  # Device Observer UID
    assert observer[("DCM", "121015")] == case.result.bundle_name  # Device Observer Model Name
    assert NODE_DEVICE_UID not in _device_uids(case.first)


def test_sr_reports_the_imaging_procedure(case: Case) -> None:
    sr = case.first[0]
    reported = {
        _concept(i, "ConceptCodeSequence")
        for i in sr.ContentSequence
        if _concept(i) == ("DCM", "121058")  # Procedure reported
    }
    assert reported == PROCEDURES[case.name]


def test_every_group_identifies_the_algorithm(case: Case) -> None:
    for documents, version in ((case.first, VERSIONS[0]), (case.next, VERSIONS[1])):
        groups = _groups(documents[0])
        assert groups
        for group in groups:
            texts = {
                _concept(c): str(c.TextValue) for c in group.ContentSequence if "TextValue" in c
            }
            assert texts[("DCM", "111001")] == case.result.bundle_name  # Algorithm Name
            assert texts[("DCM", "111003")] == version  # Algorithm Version
    for seg in (ds for ds in case.first if ds.SOPClassUID == SegmentationStorage):
        for segment in seg.SegmentSequence:
            [algorithm] = segment.SegmentationAlgorithmIdentificationSequence
            assert (str(algorithm.AlgorithmName), str(algorithm.AlgorithmVersion)) == (
                case.result.bundle_name,
                VERSIONS[0],
            )


def test_findings_are_coded_with_their_probability_as_num(case: Case) -> None:
    sr = case.first[0]
    written: list[float] = []
    for group in _groups(sr):
        numbers = [c for c in _walk(group.ContentSequence) if _concept(c) == ("DCM", "122157")]
        if not numbers:
            continue
        # The finding is coded (a CODE Finding in the group, DCM 121071).
        assert any(
            _concept(c) == ("DCM", "121071") and c.ValueType == "CODE"
            for c in group.ContentSequence
        )
        for item in numbers:
            assert item.ValueType == "NUM"
            unit = item.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0]
            assert (unit.CodingSchemeDesignator, unit.CodeValue) == ("UCUM", "1")
            value = _probability_value(item)
            assert 0.0 <= value <= 1.0
            written.append(value)
    assert sorted(written) == pytest.approx(sorted(_expected_probabilities(case)), abs=1e-6)


def test_evidence_lists_what_the_documents_reference(case: Case) -> None:
    sources = {str(ds.SOPInstanceUID) for ds in case.sources}
    study = case.result.study_instance_uid
    sr, *others = case.first
    evidence = {
        str(item.ReferencedSOPInstanceUID)
        for entry in sr.CurrentRequestedProcedureEvidenceSequence
        for series in entry.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for item in _walk(sr.ContentSequence)
        for ref in item.get("ReferencedSOPSequence", [])
    }
    segs = {str(ds.SOPInstanceUID) for ds in others if ds.SOPClassUID == SegmentationStorage}
    assert referenced and referenced <= evidence <= sources | segs
    assert all(
        str(e.StudyInstanceUID) == study for e in sr.CurrentRequestedProcedureEvidenceSequence
    )
    for ds in others:
        assert str(ds.StudyInstanceUID) == study
        if ds.SOPClassUID == SegmentationStorage:
            used = {
                str(item.ReferencedSOPInstanceUID)
                for series in ds.ReferencedSeriesSequence
                for item in series.ReferencedInstanceSequence
            }
        else:
            used = {str(item.ReferencedSOPInstanceUID) for item in ds.SourceImageSequence}
        assert used and used <= sources


@pytest.mark.peers
def test_documents_pass_dciodvfy(case: Case, require_tool, tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    for index, ds in enumerate([*case.first, *case.next]):
        path = tmp_path / f"{index}.dcm"
        ds.save_as(path, enforce_file_format=True)
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=120)
        lines = [line.strip() for line in (run.stdout + run.stderr).splitlines()]
        assert [line for line in lines if line.startswith("Error")] == [], ds.SOPClassUID
        unexpected = [
            line
            for line in lines
            if line.startswith("Warning") and not any(w in line for w in ALLOWED_WARNINGS)
        ]
        assert unexpected == [], ds.SOPClassUID


def test_air_table_names_existing_tests() -> None:
    document = (Path(__file__).resolve().parents[1] / "docs" / "conformance.md").read_text(
        encoding="utf-8"
    )
    table = document.split("<!-- table: air -->", 1)[1].strip().split("\n\n", 1)[0]
    rows = [line for line in table.splitlines() if line.startswith("|")][2:]
    assert len(rows) >= 8
    here = Path(__file__).parent
    for row in rows:
        references = re.findall(r"`(test_\w+\.py)::(test_\w+)`", row)
        assert references, f"no test named for: {row}"
        for file, function in references:
            text = (here / file).read_text(encoding="utf-8")
            assert re.search(rf"^def {function}\(", text, re.MULTILINE), f"{file}::{function}"
