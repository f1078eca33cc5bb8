"""The knee analysis' DICOM SEG and SR: valid (dciodvfy), readable, and the voxels come back.

Synthetic MR series are built here with pydicom (sagittal and oblique); one test uses the
knee phantom study as the node writes and reads it. Each SEG is read back twice, by highdicom
and by dcmqi's ``segimage2itkimage`` (an independent reader: NRRD files in patient space),
and compared voxel for voxel with the result's labels.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, SegmentationStorage, generate_uid

from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURE_NAMES, STRUCTURES
from mibi_node.analyses.knee.measure import measure_structures
from mibi_node.analyses.knee.report import (
    NOT_FOUND,
    build_knee_documents,
    build_knee_sr,
    seg_series_instance_uid,
)
from mibi_node.analyses.knee.result import KneeResult
from mibi_node.analyses.knee.seg import STRUCTURE_CODES, build_knee_seg
from mibi_node.imaging.volume import Volume, VolumeSlice
from mibi_node.report._common import DEMONSTRATION_DISCLAIMER

SHAPE = (16, 40, 48)
SPACING = (1.2, 0.7, 0.6)

# dciodvfy warns about every code of a local scheme (it knows only the standard ones); the
# scheme is declared in the Coding Scheme Identification Sequence. Any other warning fails.
ALLOWED_WARNINGS = (
    "Unrecognized defined term <99MIBINODE>",
    # The algorithm's Device UID in Contributing Equipment (IHE AIR): PS3.3 added it to that
    # sequence after dicom3tools' (2022) dictionary was made.
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",
)


def _rotation(axis: tuple[float, float, float], degrees: float) -> np.ndarray:
    a = np.asarray(axis, dtype=float)
    a /= np.linalg.norm(a)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _series(
    tilt: float = 0.0, shape: tuple[int, int, int] = SHAPE, laterality: str = "R"
) -> tuple[Volume, list[Dataset]]:
    """A sagittal MR series (rows anterior to posterior, columns head to foot), tilted."""
    rotation = _rotation((1.0, 1.0, 0.3), tilt)
    row = rotation @ np.array([0.0, 1.0, 0.0])
    column = rotation @ np.array([0.0, 0.0, -1.0])
    normal = np.cross(row, column)
    origin = np.array([10.0, -20.0, 30.0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    orientation = [float(f"{v:.8f}") for v in (*row, *column)]
    datasets, slices = [], []
    for k in range(shape[0]):
        position = [float(f"{v:.6f}") for v in origin + k * SPACING[0] * normal]
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.FrameOfReferenceUID = frame
        ds.PositionReferenceIndicator = ""
        ds.Modality = "MR"
        ds.PatientName, ds.PatientID = "TEST^KNEE", "KNEE-1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
        ds.StudyDate, ds.StudyTime, ds.StudyID = "20240101", "120000", "1"
        ds.AccessionNumber, ds.ReferringPhysicianName = "A1", ""
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.ImageLaterality = laterality
        ds.ImagePositionPatient = position
        ds.ImageOrientationPatient = orientation
        ds.PixelSpacing = [SPACING[1], SPACING[2]]
        ds.SliceThickness = SPACING[0]
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.zeros(shape[1:], dtype="<u2").tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        datasets.append(ds)
        x, y, z = position
        slices.append(VolumeSlice(ds.SOPInstanceUID, MRImageStorage, series, k + 1, (x, y, z)))
    volume = Volume(
        study_instance_uid=study,
        series_instance_uid=series,
        frame_of_reference_uid=frame,
        image=np.zeros(shape, dtype=np.float32),
        spacing=SPACING,
        origin=slices[0].position,
        row_cosines=(orientation[0], orientation[1], orientation[2]),
        column_cosines=(orientation[3], orientation[4], orientation[5]),
        slices=tuple(slices),
        modality="MR",
    )
    return volume, datasets


def _labels(absent: tuple[str, ...] = ()) -> np.ndarray:
    """Four plates over several slices with gaps between them; the patellar one is a fragment
    too small to have a thickness (its group gives the volume alone)."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:15, 5:9, 6:38] = LABEL_OF["femoral_cartilage"]
    labels[2:14, 20:23, 4:20] = LABEL_OF["medial_tibial_cartilage"]
    labels[2:13, 20:22, 26:44] = LABEL_OF["lateral_tibial_cartilage"]
    labels[1:5, 30:36, 40:43] = LABEL_OF["patellar_cartilage"]
    labels[4, 6, 7] = 0  # a hole, so a frame is not a plain rectangle
    for structure in absent:
        labels[labels == LABEL_OF[structure]] = 0
    return labels


def _result(volume: Volume, labels: np.ndarray, **kwargs: object) -> KneeResult:
    return KneeResult(
        study_instance_uid=volume.study_instance_uid,
        volume=volume,
        labels=labels,
        measurements=measure_structures(labels, volume.spacing),
        bundle_name="knee-demo",
        bundle_version="1.0.0",
        **kwargs,  # type: ignore[arg-type]
    )


def _context(**kwargs: object) -> EncodeContext:
    values: dict[str, object] = {
        "device_uid": "1.2.826.0.1.3680043.8.498.1",
        "series_number": 30,
        "instance_number": 1,
        "series_instance_uid": generate_uid(),
        "institution_name": "Test Hospital",
    }
    values.update(kwargs)
    return EncodeContext(**values)  # type: ignore[arg-type]


def _dciodvfy(tool: str, path: Path) -> list[str]:
    """Run dciodvfy; fail on any error or unexpected warning, return the warnings."""
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    warnings = [line for line in lines if line.startswith("Warning")]
    unexpected = [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)
    return warnings


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _segments_by_structure(seg: Dataset) -> dict[str, int]:
    by_code = {(c.value, c.scheme_designator): s for s, c in STRUCTURE_CODES.items()}
    out = {}
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        out[by_code[(code.CodeValue, code.CodingSchemeDesignator)]] = int(item.SegmentNumber)
    return out


# -- the SEG ------------------------------------------------------------------------------


@pytest.mark.parametrize("tilt", [0.0, 23.0], ids=["sagittal", "oblique"])
def test_seg_is_valid_and_gives_back_the_labels(tilt, tmp_path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    volume, sources = _series(tilt)
    labels = _labels()
    result = _result(volume, labels)
    seg = build_knee_seg(result, sources[::-1], series_number=31, institution_name="Test Hospital")
    path = _save(seg, tmp_path / "seg.dcm")
    _dciodvfy(dciodvfy, path)

    back = hd.seg.segread(path)
    assert back.StudyInstanceUID == volume.study_instance_uid
    assert back.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert back.PatientID == "KNEE-1"
    assert back.SegmentationType == "BINARY"
    assert back.Manufacturer == "mibi-node"
    assert "not for diagnostic use" in back.SeriesDescription
    assert back.ImageComments == DEMONSTRATION_DISCLAIMER
    numbers = _segments_by_structure(back)
    assert numbers == {s: LABEL_OF[s] for s in STRUCTURES}  # all found: numbers = labels
    for structure, number in numbers.items():
        description = back.get_segment_description(number)
        assert description.segment_label == STRUCTURE_NAMES[structure]
        assert description.segmented_property_category.value == "91723000"
        assert description.algorithm_type.value == "AUTOMATIC"
        algorithm = description.algorithm_identification
        assert algorithm is not None
        assert algorithm[0].AlgorithmName == "knee-demo"
        assert algorithm[0].AlgorithmVersion == "1.0.0"
    # Only frames with voxels: one per (slice, plate) pair that has any.
    pairs = sum(int(np.any(labels[k] == LABEL_OF[s])) for k in range(SHAPE[0]) for s in STRUCTURES)
    assert back.NumberOfFrames == pairs
    uids = [s.sop_instance_uid for s in volume.slices]
    pixels = back.get_pixels_by_source_instance(
        uids, segment_numbers=list(numbers.values()), assert_missing_frames_are_empty=True
    )
    assert pixels.shape == (*SHAPE, len(numbers))
    for index, structure in enumerate(numbers):
        np.testing.assert_array_equal(pixels[..., index], labels == LABEL_OF[structure])
    # Each frame references the very slice it lies on.
    for frame in back.PerFrameFunctionalGroupsSequence:
        source = frame.DerivationImageSequence[0].SourceImageSequence[0]
        k = uids.index(source.ReferencedSOPInstanceUID)
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(position, volume.slices[k].position, atol=1e-4)


def test_seg_survives_dcmqi(tmp_path, require_tool) -> None:
    """dcmqi writes each segment as an NRRD in patient space; map it back to our grid."""
    tool = shutil.which("segimage2itkimage") or str(
        Path(sys.executable).parent / "segimage2itkimage"
    )
    if not Path(tool).exists():
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
    nrrd = pytest.importorskip("nrrd", reason="pynrrd is not installed")
    volume, sources = _series(23.0)
    labels = _labels(absent=("medial_tibial_cartilage",))
    result = _result(volume, labels)
    seg = build_knee_seg(result, sources, series_number=31)
    path = _save(seg, tmp_path / "seg.dcm")
    out = tmp_path / "dcmqi"
    out.mkdir()
    run = subprocess.run(
        [tool, "--inputDICOM", str(path), "--outputDirectory", str(out), "--outputType", "nrrd"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    meta = json.loads((out / "meta.json").read_text())
    by_label = {
        attributes[0]["labelID"]: attributes[0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
        for attributes in meta["segmentAttributes"]
    }
    by_code = {code.value: structure for structure, code in STRUCTURE_CODES.items()}
    inverse = np.linalg.inv(volume.affine())
    seen = set()
    for file in sorted(out.glob("*.nrrd")):
        data, header = nrrd.read(str(file))  # Fortran order: data[column, row, slice]
        assert header["space"] == "left-posterior-superior"  # = DICOM patient space
        values = set(np.unique(data).tolist()) - {0}
        assert len(values) == 1
        (label_id,) = values
        structure = by_code[by_label[label_id]]
        seen.add(structure)
        index = np.argwhere(data != 0)
        patient = header["space origin"] + index @ header["space directions"]
        ours = (np.c_[patient, np.ones(len(patient))] @ inverse.T)[:, :3]
        rounded = np.rint(ours).astype(int)
        np.testing.assert_allclose(ours, rounded, atol=1e-3)
        mask = np.zeros(SHAPE, dtype=bool)
        mask[tuple(rounded.T)] = True
        np.testing.assert_array_equal(mask, labels == LABEL_OF[structure])
    assert seen == {s for s in STRUCTURES if s != "medial_tibial_cartilage"}


def test_seg_numbers_the_plates_found_from_one(tmp_path) -> None:
    volume, sources = _series()
    labels = _labels(absent=("femoral_cartilage", "lateral_tibial_cartilage"))
    seg = build_knee_seg(_result(volume, labels), sources, series_number=31)
    assert _segments_by_structure(seg) == {
        "medial_tibial_cartilage": 1,
        "patellar_cartilage": 2,
    }
    back = hd.seg.segread(_save(seg, tmp_path / "seg.dcm"))
    pixels = back.get_pixels_by_source_instance(
        [s.sop_instance_uid for s in volume.slices],
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(pixels[..., 0], labels == LABEL_OF["medial_tibial_cartilage"])
    np.testing.assert_array_equal(pixels[..., 1], labels == LABEL_OF["patellar_cartilage"])


# -- the SR -------------------------------------------------------------------------------


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _name(item: Dataset) -> tuple[str, str] | None:
    sequence = item.get("ConceptNameCodeSequence")
    if not sequence:
        return None
    return str(sequence[0].CodeValue), str(sequence[0].CodingSchemeDesignator)


def _groups(sr: Dataset) -> dict[str, dict]:
    """Each plate's measurement group of the SR: its plate, segment reference and values."""
    by_code = {(c.value, c.scheme_designator): s for s, c in STRUCTURE_CODES.items()}
    groups = {}
    for item in _walk(sr.ContentSequence):
        if _name(item) != ("125007", "DCM"):  # Measurement Group
            continue
        group: dict = {"values": {}}
        for child in item.ContentSequence:
            name = _name(child)
            if name == ("363698007", "SCT"):  # Finding Site
                code = child.ConceptCodeSequence[0]
                group["structure"] = by_code.get((code.CodeValue, code.CodingSchemeDesignator))
            elif name == ("112039", "DCM"):  # Tracking Identifier
                group["tracking_id"] = child.TextValue
            elif name == ("112040", "DCM"):  # Tracking Unique Identifier
                group["tracking_uid"] = child.UID
            elif child.ValueType == "IMAGE" and name == ("121191", "DCM"):  # Referenced Segment
                reference = child.ReferencedSOPSequence[0]
                group["seg"] = (
                    reference.ReferencedSOPClassUID,
                    reference.ReferencedSOPInstanceUID,
                    int(reference.ReferencedSegmentNumber),
                )
            elif child.ValueType == "NUM":
                derivation = [
                    m.ConceptCodeSequence[0].CodeMeaning
                    for m in child.get("ContentSequence", [])
                    if _name(m) == ("121401", "DCM")
                ]
                key = (child.ConceptNameCodeSequence[0].CodeMeaning, *derivation)
                group["values"][key] = float(child.MeasuredValueSequence[0].NumericValue)
        if "seg" in group:  # a plate's group, not the group of the plates not found
            groups[group["structure"]] = group
    return groups


def _not_found(sr: Dataset) -> list[str]:
    by_code = {(c.value, c.scheme_designator): s for s, c in STRUCTURE_CODES.items()}
    return [
        by_code[
            (
                item.ConceptCodeSequence[0].CodeValue,
                item.ConceptCodeSequence[0].CodingSchemeDesignator,
            )
        ]
        for item in _walk(sr.ContentSequence)
        if _name(item) == (NOT_FOUND.value, NOT_FOUND.scheme_designator)
    ]


def test_documents_are_sr_then_seg_and_the_sr_references_the_segments(
    tmp_path, require_tool
) -> None:
    dciodvfy = require_tool("dciodvfy")
    dsrdump = require_tool("dsrdump")
    volume, sources = _series(23.0)
    labels = _labels(absent=("lateral_tibial_cartilage",))
    result = _result(volume, labels, warnings=("slice spacing varies by 0.01 mm",))
    context = _context()
    documents = build_knee_documents(result, sources, context)
    assert [d.Modality for d in documents] == ["SR", "SEG"]
    sr, seg = documents
    assert sr.SeriesNumber == 30 and seg.SeriesNumber == 31
    assert sr.SeriesInstanceUID == context.series_instance_uid
    assert seg.SeriesInstanceUID == seg_series_instance_uid(context.series_instance_uid)
    assert seg.SeriesInstanceUID != sr.SeriesInstanceUID
    assert sr.StudyInstanceUID == seg.StudyInstanceUID == volume.study_instance_uid
    assert sr.InstitutionName == seg.InstitutionName == "Test Hospital"
    assert seg.DeviceSerialNumber == context.device_uid
    sr_path = _save(sr, tmp_path / "sr.dcm")
    seg_path = _save(seg, tmp_path / "seg.dcm")
    _dciodvfy(dciodvfy, sr_path)
    _dciodvfy(dciodvfy, seg_path)

    sr = pydicom.dcmread(sr_path)
    seg = pydicom.dcmread(seg_path)
    numbers = _segments_by_structure(seg)
    assert "lateral_tibial_cartilage" not in numbers
    groups = _groups(sr)
    assert set(groups) == set(numbers)
    tracking = {item.SegmentNumber: item.TrackingUID for item in seg.SegmentSequence}
    measured = {m.structure: m for m in result.measurements}
    assert measured["femoral_cartilage"].mean_thickness_mm == pytest.approx(4 * 0.7, abs=0.1)
    assert measured["medial_tibial_cartilage"].mean_thickness_mm == pytest.approx(3 * 0.7, abs=0.1)
    for structure, group in groups.items():
        assert group["seg"] == (SegmentationStorage, seg.SOPInstanceUID, numbers[structure])
        assert group["tracking_uid"] == tracking[numbers[structure]]
        assert group["tracking_id"] == f"mibi-node knee {structure}"
        m = measured[structure]
        assert group["values"][("Volume",)] == pytest.approx(m.volume_mm3, abs=0.05)
        assert group["values"][("Volume",)] == pytest.approx(
            np.count_nonzero(labels == LABEL_OF[structure]) * np.prod(SPACING), abs=0.05
        )
        if m.mean_thickness_mm is None:
            assert structure == "patellar_cartilage"
            assert set(group["values"]) == {("Volume",)}
            continue
        assert group["values"][("Cartilage thickness", "Mean")] == pytest.approx(
            m.mean_thickness_mm, abs=0.005
        )
        assert group["values"][("Cartilage thickness", "Minimum")] == pytest.approx(
            m.min_thickness_mm, abs=0.005
        )
    assert _not_found(sr) == ["lateral_tibial_cartilage"]
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert {s.sop_instance_uid for s in volume.slices} <= evidence

    dump = subprocess.run(
        [dsrdump, "+Pc", "+Pl", "+Pu", str(sr_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Imaging Measurement Report" in dump
    assert "24802-1" in dump and "MR Knee" in dump
    assert (
        '(MNK011,99MIBINODE,"Structure not found")=(MNK003,99MIBINODE,"Lateral tibial cartilage")'
        in dump
    )
    assert "Referenced Segment" in dump
    assert DEMONSTRATION_DISCLAIMER in dump
    assert "slice spacing varies by 0.01 mm" in dump
    assert '(24028007,SCT,"Right")' in dump


def test_a_later_version_supersedes_and_keeps_the_series(tmp_path) -> None:
    volume, sources = _series()
    result = _result(volume, _labels())
    first = build_knee_documents(result, sources, _context(series_instance_uid="1.2.3.4"))
    second = build_knee_documents(
        result,
        sources,
        _context(series_instance_uid="1.2.3.4", instance_number=2, predecessor=first[0]),
    )
    assert second[0].SeriesInstanceUID == first[0].SeriesInstanceUID == "1.2.3.4"
    assert second[1].SeriesInstanceUID == first[1].SeriesInstanceUID
    assert second[0].InstanceNumber == second[1].InstanceNumber == 2
    predecessors = second[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessors.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[0].SOPInstanceUID
    comments = [i.TextValue for i in _walk(second[0].ContentSequence) if i.ValueType == "TEXT"]
    assert any(first[0].SOPInstanceUID in c and "supersedes" in c for c in comments)


def test_nothing_found_gives_an_sr_alone(tmp_path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    volume, sources = _series()
    result = _result(volume, np.zeros(SHAPE, dtype=np.uint8))
    with pytest.raises(ValueError, match='"result" has no cartilage'):
        build_knee_seg(result, sources, series_number=31)
    documents = build_knee_documents(result, sources, _context())
    assert [d.Modality for d in documents] == ["SR"]
    _dciodvfy(dciodvfy, _save(documents[0], tmp_path / "sr.dcm"))
    assert _not_found(documents[0]) == list(STRUCTURES)
    assert _groups(documents[0]) == {}


def test_clinical_bundle_states_its_use() -> None:
    volume, sources = _series()
    result = _result(volume, _labels(), intended_use="clinical")
    sr, seg = build_knee_documents(result, sources, _context())
    assert "not for diagnostic use" not in seg.SeriesDescription
    assert "supports, and does not replace" in seg.ImageComments
    texts = [i.TextValue for i in _walk(sr.ContentSequence) if i.ValueType == "TEXT"]
    assert seg.ImageComments in texts
    assert DEMONSTRATION_DISCLAIMER not in texts


# -- the phantom study, as the node reads it ------------------------------------------------


def test_phantom_study_round_trip(tmp_path, require_tool) -> None:
    """The knee phantom's default 48 x 128 x 128 study, written, read and encoded."""
    dciodvfy = require_tool("dciodvfy")
    phantom = pytest.importorskip("mibi_node.analyses.knee.phantom")
    from mibi_node.imaging.volume_reader import read_volume

    case = phantom.make_knee_case(3)
    paths = phantom.write_knee_study(case, tmp_path / "study", extra_series=False)
    volume = read_volume(paths)
    sources = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    result = _result(volume, case.labels)
    sr, seg = build_knee_documents(result, sources[::-1], _context())
    _dciodvfy(dciodvfy, _save(sr, tmp_path / "sr.dcm"))
    _dciodvfy(dciodvfy, _save(seg, tmp_path / "seg.dcm"))
    back = hd.seg.segread(tmp_path / "seg.dcm")
    numbers = _segments_by_structure(back)
    pixels = back.get_pixels_by_source_instance(
        [s.sop_instance_uid for s in volume.slices],
        segment_numbers=[numbers[s] for s in STRUCTURES],
        assert_missing_frames_are_empty=True,
    )
    for index, structure in enumerate(STRUCTURES):
        np.testing.assert_array_equal(pixels[..., index], case.labels == LABEL_OF[structure])
    side = {"R": "Right", "L": "Left"}[case.side]
    sites = [
        m.ConceptCodeSequence[0].CodeMeaning
        for i in _walk(sr.ContentSequence)
        if _name(i) == ("363698007", "SCT")
        for m in i.get("ContentSequence", [])
    ]
    assert sites == [side] * len(STRUCTURES)


# -- bad input ----------------------------------------------------------------------------


def test_labels_of_another_shape_are_refused() -> None:
    volume, sources = _series()
    with pytest.raises(ValueError, match="labels"):
        _result(volume, np.zeros((3, 4, 5), dtype=np.uint8))
    result = _result(volume, _labels())
    broken = dataclasses.replace(result)
    object.__setattr__(broken, "labels", np.zeros((3, 4, 5), dtype=np.uint8))
    with pytest.raises(ValueError, match='Argument "result" has labels of shape'):
        build_knee_seg(broken, sources, series_number=31)


def test_sources_missing_a_slice_are_named() -> None:
    volume, sources = _series()
    result = _result(volume, _labels())
    missing = sources[5].SOPInstanceUID
    del sources[5]
    with pytest.raises(ValueError, match=f'"sources" lacks slice 5 \\({missing}\\)'):
        build_knee_seg(result, sources, series_number=31)
    with pytest.raises(ValueError, match='"sources" lacks slice 5'):
        build_knee_documents(result, sources, _context())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda ds: setattr(ds, "StudyInstanceUID", generate_uid()), "another study"),
        (lambda ds: setattr(ds, "Rows", 41), "pixels"),
        (lambda ds: setattr(ds, "ImagePositionPatient", [0.0, 0.0, 0.0]), "not at the volume"),
        (lambda ds: delattr(ds, "PixelSpacing"), "without PixelSpacing"),
    ],
)
def test_sources_that_do_not_match_the_volume_are_refused(change, message) -> None:
    volume, sources = _series()
    result = _result(volume, _labels())
    change(sources[3])
    with pytest.raises(ValueError, match=message):
        build_knee_seg(result, sources, series_number=31)


def test_other_bad_arguments_name_themselves() -> None:
    volume, sources = _series()
    result = _result(volume, _labels())
    with pytest.raises(ValueError, match='"series_number"'):
        build_knee_seg(result, sources, series_number=0)
    with pytest.raises(TypeError, match='"sources"'):
        build_knee_seg(result, sources[0], series_number=31)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"result"'):
        build_knee_seg("result", sources, series_number=31)  # type: ignore[arg-type]
    unnamed = dataclasses.replace(result, bundle_name="")
    with pytest.raises(ValueError, match="bundle"):
        build_knee_seg(unnamed, sources, series_number=31)
    seg = build_knee_seg(result, sources, series_number=31)
    with pytest.raises(ValueError, match='"device_uid"'):
        build_knee_sr(result, seg, sources, device_uid="not a uid", series_number=30)
    with pytest.raises(ValueError, match='"seg" is needed'):
        build_knee_sr(result, None, sources, device_uid="1.2.3", series_number=30)
    other = build_knee_seg(
        _result(volume, _labels(absent=("patellar_cartilage",))), sources, series_number=31
    )
    with pytest.raises(ValueError, match='"seg" has segments for'):
        build_knee_sr(result, other, sources, device_uid="1.2.3", series_number=30)
    with pytest.raises(ValueError, match='"predecessor"'):
        build_knee_sr(result, seg, sources, device_uid="1.2.3", series_number=30, predecessor=seg)
    miscounted = dataclasses.replace(
        result,
        measurements=(
            dataclasses.replace(result.measurements[0], voxels=1),
            *result.measurements[1:],
        ),
    )
    with pytest.raises(ValueError, match="measures 1 voxels of femoral_cartilage"):
        build_knee_seg(miscounted, sources, series_number=31)


def test_read_knee_seg_gives_back_the_label_volume(tmp_path) -> None:
    """The SEG reader the demo and the end-to-end test use: labels by code, not number."""
    from mibi_node.analyses.knee.seg import read_knee_seg

    volume, headers = _series(tilt=0.0)
    labels = _labels(absent=("medial_tibial_cartilage",))  # segment numbers shift by one
    seg = build_knee_seg(_result(volume, labels), headers, series_number=9932)
    back = read_knee_seg(
        pydicom.dcmread(_save(seg, tmp_path / "seg.dcm")),
        [s.sop_instance_uid for s in volume.slices],
    )
    np.testing.assert_array_equal(back, labels)
