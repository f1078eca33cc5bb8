"""The Structured Report and the key image: content, round trips, character sets, validators."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from cases import CLASSES, make_case
from factory import nm_dataset
from mibi_node.inference.result import Focus
from mibi_node.report import (
    DEMONSTRATION_DISCLAIMER,
    build_key_image,
    build_sr,
    read_probabilities,
)
from mibi_node.report import codes as report_codes

DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"

#: What dicom3tools (2022) says of the algorithm's Device UID in Contributing Equipment (IHE
#: AIR), which PS3.3 added to that sequence after its dictionary was made.
DEVICE_UID_WARNINGS = (
    "Warning - Attribute is not present in standard DICOM IOD - (0x0018,0x1002) UI Device UID",
    "Warning - Dicom dataset contains attributes not present in standard DICOM IOD - this is a "
    "Standard Extended SOP Class",
)


def round_trip(sr: Dataset) -> hd.sr.Comprehensive3DSR:
    buffer = BytesIO()
    sr.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return hd.sr.srread(buffer)


def walk(items) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from walk(item.get("ContentSequence", []))


def named(items, meaning: str) -> list[Dataset]:
    return [
        item
        for item in walk(items)
        if "ConceptNameCodeSequence" in item
        and item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def texts(sr: Dataset) -> list[str]:
    return [item.TextValue for item in walk(sr.ContentSequence) if item.ValueType == "TEXT"]


# --- content ---------------------------------------------------------------------------


def test_probabilities_read_back_exactly_through_srread() -> None:
    result, sources = make_case(seed=3)
    sr = build_sr(result, sources, device_uid=DEVICE_UID)
    back = read_probabilities(round_trip(sr))
    assert list(back) == list(result.probabilities)
    for key, p in result.probabilities.items():
        assert back[key] == pytest.approx(p, abs=1e-6)
    assert sum(back.values()) == pytest.approx(1.0, abs=1e-6)


def test_read_probabilities_takes_a_dataset_a_path_or_the_built_object(tmp_path: Path) -> None:
    result, sources = make_case("normal", focus=None)
    sr = build_sr(result, sources, device_uid=DEVICE_UID)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    expected = read_probabilities(sr)
    assert read_probabilities(path) == expected
    assert read_probabilities(dcmread(path)) == expected
    assert expected == pytest.approx(result.probabilities, abs=1e-12)


def test_sr_header_joins_the_original_study_in_a_new_series() -> None:
    result, sources = make_case(AccessionNumber="A123", PatientSex="F")
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID, series_number=77))
    assert sr.StudyInstanceUID == result.study_instance_uid
    assert sr.SeriesInstanceUID not in {ds.SeriesInstanceUID for ds in sources}
    assert sr.SeriesDescription == "MIBI-NODE AI RESULT"
    assert sr.SeriesNumber == 77
    assert sr.Modality == "SR"
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    assert (sr.PatientName, sr.PatientID) == ("PHANTOM^TEST", "PHANTOM-0001")
    assert (sr.AccessionNumber, sr.PatientSex, sr.StudyDate) == ("A123", "F", "20260101")
    assert sr.StudyDescription == "PARATHYROID MIBI"
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    evidence = {uid[2] for uid in sr.get_evidence()}
    assert evidence == {ds.SOPInstanceUID for ds in sources}
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99MIBINODE"


def test_content_tree_follows_tid_1500() -> None:
    result, sources = make_case("carcinoma", seed=5)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID, manufacturer="ACME"))
    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    containers = [item for item in walk(sr.ContentSequence) if item.ValueType == "CONTAINER"]
    assert containers and all(c.ContinuityOfContent == "SEPARATE" for c in containers)
    assert sr.ContinuityOfContent == "SEPARATE"

    (observer,) = report.get_observer_contexts()
    device = observer.observer_identifying_attributes
    assert observer.observer_type == hd.sr.CodedConcept("121007", "DCM", "Device")
    assert device.uid == DEVICE_UID
    assert device.name == "mibi-node"
    assert device.manufacturer_name == "ACME"
    assert device.model_name == "mibi-demo"
    assert device.serial_number == "0.3.1"

    (procedure,) = named(sr.ContentSequence, "Procedure reported")
    assert procedure.ConceptCodeSequence[0].CodeValue == "371572003"

    library = named(sr.ContentSequence, "Image Library")[0]
    referenced = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in walk(library.ContentSequence)
        if item.ValueType == "IMAGE"
    }
    assert referenced == {ds.SOPInstanceUID for ds in sources}

    groups = report.get_image_measurement_groups()
    assert [report_codes.class_key(g.finding_type) for g in groups] == list(CLASSES)
    for group in groups:
        (site,) = group.finding_sites
        assert (site.value.value, site.value.scheme_designator) == ("111002", "SCT")
        (probability,) = group.get_measurements(name=report_codes.PROBABILITY)
        assert probability.unit == hd.sr.CodedConcept("1", "UCUM", "no units")
        assert [i.TextValue for i in named(group, "Algorithm Name")] == ["mibi-demo"]
        assert [i.TextValue for i in named(group, "Algorithm Version")] == ["0.3.1"]
    predicted = groups[CLASSES.index("carcinoma")]
    (agreement,) = predicted.get_measurements(name=report_codes.AGREEMENT)
    assert agreement.value == pytest.approx(7 / 9, abs=1e-12)
    (entropy,) = predicted.get_measurements(name=report_codes.NORMALISED_ENTROPY)
    assert entropy.value == pytest.approx(0.4123456789, abs=1e-12)
    assert not groups[0].get_measurements(name=report_codes.AGREEMENT)

    assert DEMONSTRATION_DISCLAIMER == (
        "Demonstration model trained on synthetic phantoms. Not for diagnostic use."
    )
    (intended,) = named(sr.ContentSequence, "Intended use")
    assert intended.TextValue == DEMONSTRATION_DISCLAIMER
    assert "early image resampled to 64 x 64" in texts(sr)


def test_focus_group_marks_the_delayed_frame_with_side_and_pole() -> None:
    focus = Focus(row=40.0, col=20.25, side="left", pole="upper")
    result, sources = make_case("adenoma", focus=focus)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    assert report_codes.class_key(group.finding_type) == "adenoma"
    region = group.roi
    assert region.graphic_type == hd.sr.GraphicTypeValues.POINT
    np.testing.assert_allclose(region.value, [[20.75, 40.5]])  # (column, row) + 0.5
    (reference,) = region.ContentSequence[0].ReferencedSOPSequence
    assert reference.ReferencedSOPInstanceUID == sources[1].SOPInstanceUID  # delayed
    assert reference.ReferencedFrameNumber == 2
    (site,) = named(group, "Finding Site")
    modifiers = {
        m.ConceptNameCodeSequence[0].CodeMeaning: m.ConceptCodeSequence[0].CodeValue
        for m in site.ContentSequence
    }
    assert modifiers == {"Laterality": "7771000", "Topographical modifier": "264217000"}
    assert [i.TextValue for i in named(group, "Algorithm Name")] == ["mibi-demo"]
    (probability,) = group.get_measurements(name=report_codes.PROBABILITY)
    assert probability.value == pytest.approx(result.probabilities["adenoma"], abs=1e-12)


def test_ectopic_focus_has_laterality_only_and_single_frame_has_no_frame_number() -> None:
    focus = Focus(row=60.0, col=30.0, side="right", pole="ectopic")
    result, sources = make_case("hyperplasia", focus=focus, frames=1)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    (group,) = sr.content.get_planar_roi_measurement_groups()
    (site,) = named(group, "Finding Site")
    assert [m.ConceptCodeSequence[0].CodeValue for m in site.ContentSequence] == ["24028007"]
    (reference,) = group.roi.ContentSequence[0].ReferencedSOPSequence
    assert "ReferencedFrameNumber" not in reference


@pytest.mark.parametrize(
    "predicted, focus",
    [("normal", Focus(row=1.0, col=1.0, side="left", pole="upper")), ("cyst", None)],
)
def test_no_focus_group_for_normal_or_without_focus(predicted: str, focus: Focus | None) -> None:
    result, sources = make_case(predicted, focus=focus)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    assert sr.content.get_planar_roi_measurement_groups() == []
    assert len(sr.content.get_image_measurement_groups()) == 5


def test_superseding_sr_names_its_predecessor() -> None:
    result, sources = make_case()
    first = build_sr(result, sources, device_uid=DEVICE_UID)
    second = round_trip(build_sr(result, sources, device_uid=DEVICE_UID, predecessor=first))
    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert any("supersedes" in t and first.SOPInstanceUID in t for t in texts(second))
    assert "PredecessorDocumentsSequence" not in first


def test_clinical_bundle_carries_no_demonstration_disclaimer() -> None:
    result, sources = make_case(intended_use="clinical")
    sr = build_sr(result, sources, device_uid=DEVICE_UID)
    (intended,) = named(sr.ContentSequence, "Intended use")
    assert "Not for diagnostic use" not in intended.TextValue
    assert DEMONSTRATION_DISCLAIMER not in texts(sr)


def test_sources_without_type2_header_attributes_still_give_an_sr() -> None:
    result, sources = make_case()
    for ds in sources:
        assert "PatientBirthDate" not in ds
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    assert sr.PatientBirthDate in ("", None) and sr.StudyID in ("", None)
    assert "PatientBirthDate" not in sources[0]  # the caller's dataset is left alone


# --- character sets --------------------------------------------------------------------


def test_utf8_patient_name_survives() -> None:
    name = "Müller^Jürgen=山田^太郎"
    result, sources = make_case(SpecificCharacterSet="ISO_IR 192", PatientName=name)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == name


def test_latin1_source_is_kept_or_upgraded_to_utf8_when_our_text_needs_it() -> None:
    result, sources = make_case(SpecificCharacterSet="ISO_IR 100", PatientName="Gómez^Inés")
    kept = round_trip(build_sr(result, sources, device_uid=DEVICE_UID, manufacturer="Müller AG"))
    assert kept.SpecificCharacterSet == "ISO_IR 100"
    upgraded = round_trip(build_sr(result, sources, device_uid=DEVICE_UID, manufacturer="東芝"))
    assert upgraded.SpecificCharacterSet == "ISO_IR 192"
    for sr in (kept, upgraded):
        assert str(sr.PatientName) == "Gómez^Inés"
    (device,) = upgraded.content.get_observer_contexts()
    assert device.observer_identifying_attributes.manufacturer_name == "東芝"


@pytest.mark.parametrize(
    ("charset", "name"),
    [(["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎"), ("ISO 2022 IR 100", "Gómez^Inés")],
)
def test_character_sets_highdicom_does_not_write_become_utf8(charset, name: str) -> None:
    # Japanese with an empty first value (the usual form) and a lone code extension: the
    # SR and the key image are written in UTF-8 with the patient's name intact.
    result, sources = make_case(SpecificCharacterSet=charset, PatientName=name)
    sr = round_trip(build_sr(result, sources, device_uid=DEVICE_UID))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == name
    key = dcmread(_bytes(build_key_image(result, sources, size=128)))
    assert key.SpecificCharacterSet == "ISO_IR 192"
    assert str(key.PatientName) == name


# --- validation at the boundary --------------------------------------------------------


def test_invalid_arguments_are_named() -> None:
    result, sources = make_case()
    other_study = nm_dataset(generate_uid())
    bad = dataclasses.replace(result, probabilities={**result.probabilities, "normal": 0.9})
    cases = [
        (dict(result=bad), ValueError, '"result"'),
        (dict(result=dataclasses.replace(result, predicted="tumour")), ValueError, '"result"'),
        (dict(sources=[*sources, other_study]), ValueError, '"sources"'),
        (dict(sources=sources[2:]), ValueError, '"sources"'),
        (dict(sources=sources[0]), TypeError, '"sources"'),
        (
            dict(sources=[*sources, _without(nm_dataset(result.study_instance_uid), "Rows")]),
            ValueError,
            "not an image",
        ),
        (dict(series_number=0), ValueError, '"series_number"'),
        (dict(instance_number=True), ValueError, '"instance_number"'),
        (dict(device_uid="not a uid"), ValueError, '"device_uid"'),
        (dict(predecessor=other_study), ValueError, '"predecessor"'),
        (
            dict(result=dataclasses.replace(result, focus=Focus(99.0, 1.0, "left", "upper"))),
            ValueError,
            '"result"',
        ),
    ]
    for overrides, error, name in cases:
        kwargs = {"result": result, "sources": sources, "device_uid": DEVICE_UID, **overrides}
        with pytest.raises(error, match=name):
            build_sr(**kwargs)


def _without(ds: Dataset, keyword: str) -> Dataset:
    delattr(ds, keyword)
    return ds


def test_the_document_is_the_one_highdicoms_constructor_makes() -> None:
    # build_sr skips the constructor's copy, parse and walk of the content tree
    # (comprehensive_3d_sr); the document must not change for it.
    from mibi_node.report._common import check_sources, comprehensive_3d_sr

    result, sources = make_case("carcinoma", seed=4)
    sources = check_sources(sources, result)
    image = hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=sources[0].SOPClassUID,
        referenced_sop_instance_uid=sources[0].SOPInstanceUID,
    )
    content = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(
            observer_device_context=hd.sr.ObserverContext(
                observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
                observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
                    uid=DEVICE_UID
                ),
            )
        ),
        procedure_reported=report_codes.PROCEDURE_REPORTED,
        imaging_measurements=[
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="p"),
                finding_type=report_codes.CLASS_CODES["carcinoma"],
                measurements=[
                    hd.sr.Measurement(
                        name=report_codes.PROBABILITY, value=0.25, unit=report_codes.NO_UNITS
                    )
                ],
                source_images=[image, image],
            )
        ],
        referenced_images=sources,
    )
    arguments: dict[str, Any] = {
        "series_instance_uid": generate_uid(),
        "series_number": 5,
        "sop_instance_uid": generate_uid(),
        "instance_number": 1,
        "manufacturer": "ACME",
        "is_complete": True,
    }
    fast = comprehensive_3d_sr(content, sources, **arguments)
    slow = hd.sr.Comprehensive3DSR(evidence=sources, content=content, **arguments)

    def written(ds: Dataset) -> list[str]:
        for keyword in (
            "ContentDate",
            "ContentTime",
            "InstanceCreationDate",
            "InstanceCreationTime",
            "ContributingEquipmentSequence",
        ):
            delattr(ds, keyword)
        buffer = BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        buffer.seek(0)
        back = dcmread(buffer)
        return [str(element) for element in back.iterall()]

    (root,) = fast.content
    assert len(list(walk(root.ContentSequence))) == len(list(walk(slow.ContentSequence)))
    assert written(fast) == written(slow)
    with pytest.raises(ValueError, match='"content"'):
        comprehensive_3d_sr(hd.sr.ContentSequence(), sources, **arguments)


def test_report_package_imports_neither_torch_nor_sqlalchemy() -> None:
    code = (
        "import sys, mibi_node.report; "
        "print(sorted(m for m in ('torch', 'sqlalchemy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- key image -------------------------------------------------------------------------


def test_key_image_marks_the_focus_and_references_the_delayed_frame() -> None:
    result, sources = make_case(
        "adenoma", focus=Focus(row=10.0, col=50.0, side="left", pole="upper")
    )
    sc = build_key_image(result, sources, size=256)
    back = dcmread(_bytes(sc))
    assert back.StudyInstanceUID == result.study_instance_uid
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert back.BurnedInAnnotation == "YES"
    assert back.PatientName == "PHANTOM^TEST"
    (source,) = back.SourceImageSequence
    assert source.ReferencedSOPInstanceUID == sources[1].SOPInstanceUID
    assert source.ReferencedFrameNumber == 2
    pixels = back.pixel_array
    assert pixels.dtype == np.uint8 and pixels.shape[1] == 256 and pixels.shape[0] > 256
    red = (pixels[..., 0] > 200) & (pixels[..., 1] < 100) & (pixels[..., 2] < 100)
    rows, cols = np.nonzero(red)
    scale = 256 / 64
    assert abs(rows.mean() - 10.5 * scale) < 2 and abs(cols.mean() - 50.5 * scale) < 2
    # The disclaimer is drawn in amber in the panel below the image.
    amber = (pixels[256:, :, 0] > 200) & (pixels[256:, :, 1] > 150) & (pixels[256:, :, 2] < 80)
    assert amber.any()


def test_key_image_validates_like_the_sr() -> None:
    result, sources = make_case()
    with pytest.raises(ValueError, match='"size"'):
        build_key_image(result, sources, size=8)
    with pytest.raises(ValueError, match='"sources"'):
        build_key_image(result, sources[2:])


# --- real peers ------------------------------------------------------------------------


def _bytes(ds: Dataset) -> BytesIO:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return buffer


def _dciodvfy(tool: str, path: Path) -> str:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    output = run.stdout + run.stderr
    errors = [line for line in output.splitlines() if line.startswith("Error")]
    assert errors == [], output
    return output


@pytest.mark.peers
@pytest.mark.parametrize(
    "case",
    [
        dict(predicted="adenoma"),
        dict(predicted="normal", focus=None, intended_use="clinical"),
        dict(predicted="cyst", frames=1, SpecificCharacterSet="ISO_IR 192", PatientName="Jürgen^Ö"),
    ],
)
def test_sr_passes_dciodvfy(require_tool, tmp_path: Path, case: dict) -> None:
    tool = require_tool("dciodvfy")
    predicted = case.pop("predicted")
    result, sources = make_case(predicted, **case)
    first = build_sr(result, sources, device_uid=DEVICE_UID)
    sr = build_sr(result, sources, device_uid=DEVICE_UID, predecessor=first)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    output = _dciodvfy(tool, path)
    # Left on purpose: the node's private coding scheme is unknown to dicom3tools, and so is
    # the Device UID of Contributing Equipment (IHE AIR), newer than its 2022 dictionary.
    warnings = [line for line in output.splitlines() if line.startswith("Warning")]
    for line in warnings:
        assert any(w in line for w in ("99MIBINODE", "DICOMDIR", *DEVICE_UID_WARNINGS)), output
    assert read_probabilities(path) == pytest.approx(result.probabilities, abs=1e-6)


@pytest.mark.peers
def test_key_image_passes_dciodvfy(require_tool, tmp_path: Path) -> None:
    tool = require_tool("dciodvfy")
    result, sources = make_case(
        "carcinoma", SpecificCharacterSet="ISO_IR 192", PatientName="Ärzte^Ü"
    )
    path = tmp_path / "sc.dcm"
    build_key_image(result, sources).save_as(path, enforce_file_format=True)
    output = _dciodvfy(tool, path)
    assert [line.strip() for line in output.splitlines() if line.startswith("Warning")] == [
        "Warning - Missing attribute or value that would be needed to build DICOMDIR - Study ID",
        *DEVICE_UID_WARNINGS,
    ]


@pytest.mark.peers
def test_dcmtk_shows_every_concept_name(require_tool, tmp_path: Path) -> None:
    dsrdump = require_tool("dsrdump")
    dsr2html = require_tool("dsr2html")
    result, sources = make_case("adenoma")
    path = tmp_path / "sr.dcm"
    build_sr(result, sources, device_uid=DEVICE_UID).save_as(path, enforce_file_format=True)
    dump = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)
    html = subprocess.run([dsr2html, str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0 and html.returncode == 0, dump.stderr + html.stderr
    concepts = [
        "Imaging Measurement Report",
        "Procedure reported",
        "Image Library",
        "Measurement Group",
        "Finding Site",
        "Laterality",
        "Topographical modifier",
        "Probability",
        "Ensemble member agreement",
        "Algorithm Name",
        "Algorithm Version",
        "Image Region",
        "Intended use",
    ]
    for concept in concepts:
        assert concept in dump.stdout, concept
        assert concept in html.stdout, concept
    assert "=SEPARATE>" in dump.stdout and "=CONTINUOUS>" not in dump.stdout
    assert "Not for diagnostic use." in html.stdout
