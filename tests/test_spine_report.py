"""The spine analysis' SR and key image: what they say, read back from the files, and what
dciodvfy and dsrdump make of them.

The result is written by hand (every level, two abnormal discs and a degenerated vertebra)
so that every value in the SR is known; the sources are the MR Image Storage files of one
spine phantom study (T1 and T2 sagittal, T2 axial); the points sit on its T2 middle slice.
"""

from __future__ import annotations

import copy
import math
import subprocess
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage, generate_uid

from mibi_node.analyses.spine.keyimage import (
    ABNORMAL_COLOUR,
    NORMAL_COLOUR,
    build_spine_key_image,
    spine_key_image_caption,
)
from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS
from mibi_node.analyses.spine.phantom import make_spine_study
from mibi_node.analyses.spine.report import (
    SPINE_CLINICAL_USE,
    build_spine_sr,
    read_spine_report,
)
from mibi_node.analyses.spine.result import SliceRef, SpinePoint, SpineResult
from mibi_node.report import DEMONSTRATION_DISCLAIMER

LABELS = {"L4-L5": "protrusion", "L5-S1": "extrusion", "L3": "degenerated"}


def _middle_series(paths: list[Path]) -> list[Dataset]:
    """The largest (T2) sagittal series' slices, ordered along the normal (right to left)."""
    by_series: dict[str, list[Dataset]] = {}
    for path in paths:
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID != MRImageStorage or "ImageOrientationPatient" not in ds:
            continue
        normal = np.cross(
            np.asarray(ds.ImageOrientationPatient[:3], float),
            np.asarray(ds.ImageOrientationPatient[3:], float),
        )
        if abs(normal[0]) > 0.8:  # sagittal
            by_series.setdefault(ds.SeriesInstanceUID, []).append(ds)
    # The T2 one when the phantom writes T1 and T2 sagittal series of the same length.
    series = max(by_series.values(), key=lambda s: (len(s), float(s[0].get("EchoTime") or 0)))
    return sorted(series, key=lambda ds: float(ds.ImagePositionPatient[0]))


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """Every MR instance of one study, sorted; the sagittal series' slices come first."""
    out = tmp_path_factory.mktemp("spine-sr")
    make_spine_study(out, 7)
    paths = sorted(out.rglob("*.dcm"))
    series = _middle_series(paths)
    others = [pydicom.dcmread(p) for p in paths]
    used = {ds.SOPInstanceUID for ds in series}
    return series + [ds for ds in others if ds.SOPInstanceUID not in used]


def _ref(ds: Dataset) -> SliceRef:
    return SliceRef(
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.SeriesInstanceUID,
        instance_number=int(ds.InstanceNumber),
    )


def _probabilities(kind: str, label: str) -> dict[str, float]:
    names = CLASSES[kind]
    rest = (1.0 - 0.7) / (len(names) - 1)
    return {name: (0.7 if name == label else rest) for name in names}


def _result(study: list[Dataset], intended_use: str = "demonstration") -> SpineResult:
    series = [ds for ds in study if ds.SeriesInstanceUID == study[0].SeriesInstanceUID]
    middle_index = len(series) // 2
    middle = series[middle_index]
    neighbours = [series[i] for i in (middle_index - 1, middle_index + 1) if 0 <= i < len(series)]
    rows, columns = int(middle.Rows), int(middle.Columns)
    points = []
    for index, level in enumerate(LEVELS):
        kind = LEVEL_KIND[level]
        label = LABELS.get(level, "normal")
        points.append(
            SpinePoint(
                level=level,
                row=rows * (0.15 + 0.07 * index) + 0.123,
                col=columns * 0.55 + 0.25 * math.sin(index) - 0.377,
                label=label,
                probabilities=_probabilities(kind, label),
                score=0.5 + 0.04 * index,
            )
        )
    return SpineResult(
        study_instance_uid=middle.StudyInstanceUID,
        points=tuple(points),
        pixel_spacing=(float(middle.PixelSpacing[0]), float(middle.PixelSpacing[1])),
        middle=_ref(middle),
        neighbours=tuple(_ref(ds) for ds in neighbours),
        warnings=("test warning: one slice missing",),
        bundle_name="spine-test",
        bundle_version="0.0.1",
        intended_use=intended_use,
    )


def _sr(result: SpineResult, sources: list[Dataset], **kwargs: object) -> Dataset:
    arguments: dict = {"device_uid": "1.2.3.4", "series_number": 9921, **kwargs}
    sr = build_spine_sr(result, sources, **arguments)
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _errors(tool: str, path: Path) -> list[str]:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_read_back_from_the_file_equals_the_result(study) -> None:
    result = _result(study)
    report = read_spine_report(_sr(result, study))
    assert [p.level for p in report.points] == list(LEVELS)
    for got, want in zip(report.points, result.points, strict=True):
        assert got.row == pytest.approx(want.row, abs=1e-3)
        assert got.col == pytest.approx(want.col, abs=1e-3)
        assert got.label == want.label
        assert got.probabilities == pytest.approx(want.probabilities, abs=1e-6)
        assert list(got.probabilities) == list(CLASSES[want.kind])
        assert got.score == pytest.approx(want.score, abs=1e-6)
    assert report.labels == {p.level: p.label for p in result.points}
    assert report.image_sop_instance_uid == result.middle.sop_instance_uid
    assert (report.bundle_name, report.bundle_version) == ("spine-test", "0.0.1")
    assert report.comments == ("test warning: one slice missing",)


def test_sr_joins_the_study_in_a_new_series_and_references_every_slice(study) -> None:
    result = _result(study)
    sr = _sr(result, study, series_number=31, instance_number=2, institution_name="Klinik Süd")
    assert sr.StudyInstanceUID == result.study_instance_uid
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study}
    assert (sr.Modality, sr.SeriesNumber, sr.InstanceNumber) == ("SR", 31, 2)
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"
    assert sr.PatientName == study[0].PatientName and sr.InstitutionName == "Klinik Süd"
    wanted = {result.middle.sop_instance_uid} | {n.sop_instance_uid for n in result.neighbours}
    evidence = {
        str(instance.ReferencedSOPInstanceUID)
        for item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == wanted  # the slices used, not the rest of the study
    library = next(
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111028"  # Image Library
    )
    referenced = {
        str(ref.ReferencedSOPInstanceUID)
        for item in library.iterall()
        if item.keyword == "ReferencedSOPSequence"
        for ref in item.value
    }
    assert referenced == wanted
    procedure = [
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in procedure] == [("24968-0", "LN")]
    groups = [v.value for v in sr.iterall() if v.keyword == "GraphicType"]
    assert groups == ["POINT"] * len(LEVELS)
    schemes = {item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence}
    assert "99MIBINODE" in schemes


@pytest.mark.parametrize("intended_use", ["demonstration", "clinical"])
def test_the_disclaimer_is_there_for_demonstration_bundles_only(study, intended_use) -> None:
    result = _result(study, intended_use)
    sr = _sr(result, study)
    text = " ".join(str(v.value) for v in sr.iterall() if v.VR in ("UT", "LT", "ST"))
    caption = " ".join(spine_key_image_caption(result))
    demo = intended_use == "demonstration"
    assert (DEMONSTRATION_DISCLAIMER in text) is demo
    assert (DEMONSTRATION_DISCLAIMER in caption) is demo
    assert (SPINE_CLINICAL_USE in text) is not demo
    assert read_spine_report(sr).intended_use == (
        DEMONSTRATION_DISCLAIMER if demo else SPINE_CLINICAL_USE
    )


def test_sr_has_no_dciodvfy_errors(study, tmp_path: Path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    sr = build_spine_sr(_result(study), study, device_uid="1.2.3.4", series_number=9921)
    assert _errors(dciodvfy, _save(sr, tmp_path / "sr.dcm")) == []


def test_key_image_has_no_dciodvfy_errors(study, tmp_path: Path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    sc = build_spine_key_image(_result(study), study, series_number=9922, institution_name="K")
    assert _errors(dciodvfy, _save(sc, tmp_path / "sc.dcm")) == []


def test_dsrdump_reads_the_sr(study, tmp_path: Path, require_tool) -> None:
    dsrdump = require_tool("dsrdump")
    sr = build_spine_sr(_result(study), study, device_uid="1.2.3.4", series_number=9921)
    path = _save(sr, tmp_path / "sr.dcm")
    run = subprocess.run(
        [dsrdump, str(path)], capture_output=True, text=True, errors="replace", timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "L4/L5 disc" in run.stdout and "MR Lumbar spine" in run.stdout
    assert "Intervertebral disc protrusion" in run.stdout


def test_key_image_marks_every_point_on_the_enlarged_middle_slice(study) -> None:
    result = _result(study)
    sc = build_spine_key_image(result, study, series_number=9922, instance_number=3)
    assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert sc.StudyInstanceUID == result.study_instance_uid
    assert sc.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in study}
    assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == result.middle.sop_instance_uid
    middle = study[
        len([d for d in study if d.SeriesInstanceUID == study[0].SeriesInstanceUID]) // 2
    ]
    assert middle.SOPInstanceUID == result.middle.sop_instance_uid
    pixels = sc.pixel_array
    scale = max(1.0, 512 / max(int(middle.Rows), int(middle.Columns)))
    assert pixels.shape[1] == round(int(middle.Columns) * scale)
    assert pixels.shape[0] > round(int(middle.Rows) * scale)  # the text panel
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert ABNORMAL_COLOUR in colours and NORMAL_COLOUR in colours
    abnormal = result.abnormal[0]
    x, y = (abnormal.col + 0.5) * scale, (abnormal.row + 0.5) * scale
    window = pixels[int(y) - 12 : int(y) + 13, int(x) - 12 : int(x) + 13].reshape(-1, 3)
    assert ABNORMAL_COLOUR in {tuple(c) for c in window}
    assert sc.PatientOrientation == ["P", "F"]


def test_key_image_reads_the_pixels_of_a_header_from_its_file(study) -> None:
    result = _result(study)
    headers = [pydicom.dcmread(ds.filename, stop_before_pixels=True) for ds in study]
    assert all("PixelData" not in ds for ds in headers)
    sc = build_spine_key_image(result, headers, series_number=9922)
    assert (
        sc.pixel_array.shape
        == build_spine_key_image(result, study, series_number=1).pixel_array.shape
    )
    bare = [copy.deepcopy(ds) for ds in headers]
    for ds in bare:
        ds.filename = None
    with pytest.raises(ValueError, match="without its pixel data"):
        build_spine_key_image(result, bare, series_number=9922)


def test_predecessor_is_listed_and_named(study) -> None:
    result = _result(study)
    first = _sr(result, study)
    second = _sr(
        result,
        study,
        instance_number=2,
        series_instance_uid=first.SeriesInstanceUID,
        predecessor=first,
    )
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    predecessors = {
        str(instance.ReferencedSOPInstanceUID)
        for item in second.PredecessorDocumentsSequence
        for series in item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert predecessors == {first.SOPInstanceUID}
    assert f"supersedes the earlier mibi-node report {first.SOPInstanceUID}" in " ".join(
        read_spine_report(second).comments
    )


def test_a_result_without_points_is_refused(study) -> None:
    result = replace(_result(study), points=())
    with pytest.raises(ValueError, match="no points"):
        build_spine_sr(result, study, device_uid="1.2.3.4", series_number=1)
    with pytest.raises(ValueError, match="no points"):
        build_spine_key_image(result, study, series_number=1)
    assert "Not found: " + ", ".join(LEVELS) in spine_key_image_caption(result)


def test_a_partial_result_reads_back_its_levels_only(study) -> None:
    result = _result(study)
    partial = replace(result, points=result.points[2:9])
    report = read_spine_report(_sr(partial, study))
    assert [p.level for p in report.points] == list(LEVELS[2:9])
    assert "Not found: T12-L1, L1, L5, L5-S1" in spine_key_image_caption(partial)


def test_bad_arguments_are_refused_with_their_name(study) -> None:
    result = _result(study)
    good: dict = {"device_uid": "1.2.3.4", "series_number": 1}
    cases = [
        ({"series_number": 0}, ValueError, "series_number"),
        ({"series_number": True}, ValueError, "series_number"),
        ({"instance_number": -1}, ValueError, "instance_number"),
        ({"device_uid": "1.02.x"}, ValueError, "device_uid"),
        ({"series_instance_uid": "abc"}, ValueError, "series_instance_uid"),
        ({"institution_name": 5}, TypeError, "institution_name"),
    ]
    for change, error, name in cases:
        with pytest.raises(error, match=name):
            build_spine_sr(result, study, **{**good, **change})
    with pytest.raises(TypeError, match='"result"'):
        build_spine_sr(result.to_dict(), study, **good)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"sources"'):
        build_spine_sr(result, study[0], **good)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="series_number"):
        build_spine_key_image(result, study, series_number=0)
    with pytest.raises(ValueError, match="size"):
        build_spine_key_image(result, study, series_number=1, size=10)


def test_sources_without_the_middle_slice_or_from_another_study_are_refused(study) -> None:
    result = _result(study)
    good: dict = {"device_uid": "1.2.3.4", "series_number": 1}
    others = [ds for ds in study if ds.SOPInstanceUID != result.middle.sop_instance_uid]
    with pytest.raises(ValueError, match="lacks the middle slice"):
        build_spine_sr(result, others, **good)
    with pytest.raises(ValueError, match="lacks the middle slice"):
        build_spine_key_image(result, others, series_number=1)
    neighbour = result.neighbours[0].sop_instance_uid
    with pytest.raises(ValueError, match="lacks the neighbour slice"):
        build_spine_sr(result, [ds for ds in study if ds.SOPInstanceUID != neighbour], **good)
    stranger = copy.deepcopy(study[0])
    stranger.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="belongs to study"):
        build_spine_sr(result, [stranger, *study[1:]], **good)


def test_inconsistent_results_are_refused(study) -> None:
    result = _result(study)
    good: dict = {"device_uid": "1.2.3.4", "series_number": 1}
    first = result.points[0]
    outside = replace(first, row=-3.0)
    unnormalised = replace(first, probabilities=dict.fromkeys(first.probabilities, 0.5))
    wrong_classes = replace(first, probabilities={"normal": 1.0})
    bad_score = replace(first, score=1.5)
    for point, words in [
        (outside, "outside the"),
        (unnormalised, "sum to"),
        (wrong_classes, "a probability for each disc class"),
        (bad_score, "keypoint score"),
    ]:
        bad = replace(result, points=(point, *result.points[1:]))
        with pytest.raises(ValueError, match=words):
            build_spine_sr(bad, study, **good)
    twice = replace(result, points=(first, first))
    with pytest.raises(ValueError, match="two points for level T12-L1"):
        build_spine_sr(twice, study, **good)
    with pytest.raises(ValueError, match="bundle"):
        build_spine_sr(replace(result, bundle_version=""), study, **good)
    with pytest.raises(ValueError, match="intended_use"):
        build_spine_sr(replace(result, intended_use="research"), study, **good)


def test_a_predecessor_of_another_study_or_kind_is_refused(study) -> None:
    result = _result(study)
    good: dict = {"device_uid": "1.2.3.4", "series_number": 1}
    first = _sr(result, study)
    other = copy.deepcopy(first)
    other.StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="predecessor"):
        build_spine_sr(result, study, predecessor=other, **good)
    with pytest.raises(ValueError, match="predecessor"):
        build_spine_sr(result, study, predecessor=study[0], **good)
    with pytest.raises(TypeError, match="predecessor"):
        build_spine_sr(result, study, predecessor="1.2.3", **good)  # type: ignore[arg-type]
