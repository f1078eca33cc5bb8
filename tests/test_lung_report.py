"""The lung analysis' SEG, SR and key image on a phantom CT study as the node reads it.

The study is written by the lung phantom and read back with ``read_volume``; the result is
the phantom's truth lesions measured by ``measure_lesions``. Each document goes through
``dciodvfy``; the SEG is read back by highdicom and by dcmqi's ``segimage2itkimage``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage, SegmentationStorage, generate_uid

from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.measure import measure_lesions
from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
from mibi_node.analyses.lung.report import (
    NO_LESION_FOUND,
    build_lung_documents,
    build_lung_sr,
    seg_series_instance_uid,
)
from mibi_node.analyses.lung.result import LungResult
from mibi_node.analyses.lung.seg import CLASS_CODES, build_lung_seg, read_lung_seg
from mibi_node.imaging.volume_reader import read_volume
from mibi_node.report._common import DEMONSTRATION_DISCLAIMER

SHAPE = (40, 128, 128)
CLASSES_DRAWN = ["ground_glass_opacity", "bronchiectasis", "ground_glass_opacity"]
SCORES = (0.93, 0.81, 0.62)

# dciodvfy warns about every code of a local scheme (it knows only the standard ones); the
# scheme is declared in the Coding Scheme Identification Sequence. Any other warning fails.
ALLOWED_WARNINGS = (
    "Unrecognized defined term <99MIBINODE>",
    # The algorithm's Device UID in Contributing Equipment (IHE AIR): PS3.3 added it to that
    # sequence after dicom3tools' (2022) dictionary was made.
    "(0x0018,0x1002) UI Device UID",
    "this is a Standard Extended SOP Class",
)


@dataclasses.dataclass(frozen=True)
class Study:
    result: LungResult
    sources: list[Dataset]
    truth_sides: tuple[str, ...]


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Study:
    case = make_lung_case(2028, shape=SHAPE, lesions=CLASSES_DRAWN)
    paths = write_lung_study(case, tmp_path_factory.mktemp("lung") / "study")
    volume = read_volume(paths)
    sources: list[Dataset] = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
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
        warnings=("slice spacing varies by 0.01 mm",),
        bundle_name="lung-demo",
        bundle_version="1.0.0",
    )
    sides = tuple(truth.side for truth in case.lesions)
    assert set(sides) == {"R", "L"}  # the seed puts lesions on both sides
    return Study(result, sources, sides)


def _empty(result: LungResult) -> LungResult:
    return dataclasses.replace(result, lesions_map=np.zeros_like(result.lesions_map), lesions=())


def _context(**kwargs: object) -> EncodeContext:
    values: dict[str, object] = {
        "device_uid": "1.2.826.0.1.3680043.8.498.1",
        "series_number": 40,
        "instance_number": 1,
        "series_instance_uid": generate_uid(),
        "institution_name": "Test Hospital",
        "key_image": True,
    }
    values.update(kwargs)
    return EncodeContext(**values)  # type: ignore[arg-type]


def _dciodvfy(tool: str, path: Path) -> None:
    """Run dciodvfy; fail on any error or unexpected warning."""
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=120)
    lines = [line.strip() for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("Error")]
    assert not errors, "\n".join(errors)
    warnings = [line for line in lines if line.startswith("Warning")]
    unexpected = [w for w in warnings if not any(a in w for a in ALLOWED_WARNINGS)]
    assert not unexpected, "\n".join(unexpected)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _walk(items):
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _name(item: Dataset) -> tuple[str, str] | None:
    sequence = item.get("ConceptNameCodeSequence")
    if not sequence:
        return None
    return str(sequence[0].CodeValue), str(sequence[0].CodingSchemeDesignator)


def _groups(sr: Dataset) -> list[dict]:
    """Every lesion group of the SR: class, site, segment reference and values, in order."""
    classes = {(c.value, c.scheme_designator): name for name, c in CLASS_CODES.items()}
    groups = []
    for item in _walk(sr.ContentSequence):
        if _name(item) != ("125007", "DCM"):  # Measurement Group
            continue
        group: dict = {"values": {}}
        for child in item.ContentSequence:
            name = _name(child)
            if name == ("121071", "DCM"):  # Finding
                code = child.ConceptCodeSequence[0]
                group["class"] = classes[(code.CodeValue, code.CodingSchemeDesignator)]
            elif name == ("363698007", "SCT"):  # Finding Site
                group["site"] = child.ConceptCodeSequence[0].CodeMeaning
                group["laterality"] = [
                    m.ConceptCodeSequence[0].CodeMeaning for m in child.get("ContentSequence", [])
                ]
            elif name == ("112040", "DCM"):  # Tracking Unique Identifier
                group["tracking_uid"] = child.UID
            elif name == ("112039", "DCM"):  # Tracking Identifier
                group["tracking_id"] = child.TextValue
            elif child.ValueType == "IMAGE" and name == ("121191", "DCM"):  # Referenced Segment
                reference = child.ReferencedSOPSequence[0]
                group["seg"] = (
                    reference.ReferencedSOPClassUID,
                    reference.ReferencedSOPInstanceUID,
                    int(reference.ReferencedSegmentNumber),
                )
            elif child.ValueType == "NUM":
                meaning = child.ConceptNameCodeSequence[0].CodeMeaning
                group["values"][meaning] = (
                    float(child.MeasuredValueSequence[0].NumericValue),
                    child.MeasuredValueSequence[0].MeasurementUnitsCodeSequence[0].CodeValue,
                )
            elif child.ValueType == "CODE" and name in classes:
                group.setdefault("absent", []).append(classes[name])
        groups.append(group)
    return groups


def _texts(sr: Dataset) -> list[str]:
    return [str(item.TextValue) for item in _walk(sr.ContentSequence) if item.ValueType == "TEXT"]


def test_documents_are_valid_and_say_what_was_found(study, tmp_path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    dsrdump = require_tool("dsrdump")
    result = study.result
    context = _context()
    documents = build_lung_documents(result, study.sources[::-1], context)
    assert [d.Modality for d in documents] == ["SR", "SEG", "OT"]
    sr, seg, key = documents
    assert [d.SeriesNumber for d in documents] == [40, 41, 42]
    assert sr.SeriesInstanceUID == context.series_instance_uid
    assert seg.SeriesInstanceUID == seg_series_instance_uid(context.series_instance_uid)
    assert len({d.SeriesInstanceUID for d in documents}) == 3
    assert {d.StudyInstanceUID for d in documents} == {result.study_instance_uid}
    paths = [
        _save(d, tmp_path / f"{n}.dcm")
        for d, n in zip(documents, ("sr", "seg", "key"), strict=True)
    ]
    for path in paths:
        _dciodvfy(dciodvfy, path)

    # The SEG: one coded segment per lesion, numbered as the lesions, voxels given back.
    seg = pydicom.dcmread(paths[1])
    assert seg.SegmentationType == "BINARY"
    assert seg.ImageComments == DEMONSTRATION_DISCLAIMER
    assert "not for diagnostic use" in seg.SeriesDescription
    for item, lesion in zip(seg.SegmentSequence, result.lesions, strict=True):
        assert int(item.SegmentNumber) == lesion.number
        code = item.SegmentedPropertyTypeCodeSequence[0]
        assert (code.CodeValue, code.CodingSchemeDesignator) == (
            CLASS_CODES[lesion.name].value,
            "SCT",
        )
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert item.AnatomicRegionSequence[0].CodeValue == "39607008"
        assert item.SegmentAlgorithmName == "lung-demo"
    slice_uids = [s.sop_instance_uid for s in result.volume.slices]
    np.testing.assert_array_equal(read_lung_seg(seg, slice_uids), result.lesions_map)
    pairs = sum(
        int(np.any(result.lesions_map[k] == lesion.number))
        for k in range(SHAPE[0])
        for lesion in result.lesions
    )
    assert seg.NumberOfFrames == pairs  # only frames where a segment is present

    # The SR: one group per lesion, by number, referencing its segment.
    sr = pydicom.dcmread(paths[0])
    groups = [g for g in _groups(sr) if "seg" in g]
    tracking = {int(item.SegmentNumber): item.TrackingUID for item in seg.SegmentSequence}
    assert len(groups) == len(result.lesions) == len(CLASSES_DRAWN)
    for group, lesion, side in zip(groups, result.lesions, study.truth_sides, strict=True):
        assert group["class"] == lesion.name
        assert group["seg"] == (SegmentationStorage, seg.SOPInstanceUID, lesion.number)
        assert group["tracking_uid"] == tracking[lesion.number]
        assert group["tracking_id"] == f"mibi-node lung lesion {lesion.number}"
        assert group["site"] == "Lung"
        assert group["laterality"] == [{"R": "Right", "L": "Left"}[side]]
        values = group["values"]
        assert values["Probability"] == (pytest.approx(lesion.probability), "1")
        assert values["Volume"] == (pytest.approx(lesion.volume_mm3, abs=0.05), "mm3")
        assert values["Volume"][0] == pytest.approx(
            np.count_nonzero(result.lesions_map == lesion.number) * result.volume.voxel_volume_mm3,
            abs=0.05,
        )
        assert values["Attenuation Coefficient"] == (
            pytest.approx(lesion.mean_hu, abs=0.05),
            "[hnsf'U]",
        )
        assert values["Long axis"] == (pytest.approx(lesion.diameter_mm, abs=0.05), "mm")
    assert [g["class"] for g in groups] == [
        lesion.name for lesion in sorted(result.lesions, key=lambda f: -f.probability)
    ]
    assert [lesion.probability for lesion in result.lesions] == list(SCORES)
    assert not [g for g in _groups(sr) if "absent" in g]  # both classes were found
    evidence = {
        ref.ReferencedSOPInstanceUID
        for study_item in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for ref in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence
    assert set(slice_uids) <= evidence
    dump = subprocess.run(
        [dsrdump, "+Pc", "+Pl", "+Pu", str(paths[0])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "Imaging Measurement Report" in dump
    assert "24627-2" in dump and "CT Chest" in dump
    assert "Referenced Segment" in dump
    assert '(1217294009,SCT,"Ground glass opacity")' in dump
    assert '(12295008,SCT,"Bronchiectasis")' in dump
    assert DEMONSTRATION_DISCLAIMER in dump
    assert "slice spacing varies by 0.01 mm" in dump

    # The key image: the largest lesion's key slice, a valid SC in the source study.
    key = pydicom.dcmread(paths[2])
    largest = max(result.lesions, key=lambda f: f.volume_mm3)
    assert key.SOPClassUID == SecondaryCaptureImageStorage
    assert key.BurnedInAnnotation == "YES"
    assert key.PatientID == study.sources[0].PatientID
    assert key.InstitutionName == "Test Hospital"
    source = key.SourceImageSequence[0]
    assert source.ReferencedSOPInstanceUID == slice_uids[largest.key_slice]
    assert tuple(key.PatientOrientation) == ("L", "P")
    pixels = key.pixel_array
    assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.shape[1] == 512
    orange = np.all(pixels == (230, 159, 0), axis=-1)
    assert orange.any() or np.all(pixels == (86, 180, 233), axis=-1).any()  # an outline


def test_seg_survives_dcmqi(study, tmp_path) -> None:
    """dcmqi writes each segment as an NRRD in patient space; map one back to our grid."""
    tool = shutil.which("segimage2itkimage") or str(
        Path(sys.executable).parent / "segimage2itkimage"
    )
    if not Path(tool).exists():
        pytest.skip("dcmqi's segimage2itkimage is not installed (pip install dcmqi)")
    nrrd = pytest.importorskip("nrrd", reason="pynrrd is not installed")
    result = study.result
    seg = build_lung_seg(result, study.sources, series_number=41)
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
    bronchiectasis = next(f for f in result.lesions if f.name == "bronchiectasis")
    files = sorted(out.glob("*.nrrd"))
    assert len(files) == len(meta["segmentAttributes"]) == len(result.lesions)
    number = bronchiectasis.number
    data, header = nrrd.read(str(out / f"{number}.nrrd"))  # Fortran order: [column, row, slice]
    assert header["space"] == "left-posterior-superior"  # = DICOM patient space
    assert (
        meta["segmentAttributes"][number - 1][0]["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
        == CLASS_CODES["bronchiectasis"].value
    )
    index = np.argwhere(data != 0)
    patient = header["space origin"] + index @ header["space directions"]
    ours = (np.c_[patient, np.ones(len(patient))] @ np.linalg.inv(result.volume.affine()).T)[:, :3]
    rounded = np.rint(ours).astype(int)
    np.testing.assert_allclose(ours, rounded, atol=1e-3)
    mask = np.zeros(SHAPE, dtype=bool)
    mask[tuple(rounded.T)] = True
    np.testing.assert_array_equal(mask, result.lesions_map == number)


def test_nothing_found_gives_an_sr_alone(study, tmp_path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    empty = _empty(study.result)
    with pytest.raises(ValueError, match='"result" has no lesion'):
        build_lung_seg(empty, study.sources, series_number=41)
    documents = build_lung_documents(empty, study.sources, _context(key_image=True))
    assert [d.Modality for d in documents] == ["SR"]
    _dciodvfy(dciodvfy, _save(documents[0], tmp_path / "sr.dcm"))
    groups = _groups(documents[0])
    assert [g.get("absent") for g in groups] == [["ground_glass_opacity", "bronchiectasis"]]
    texts = _texts(documents[0])
    assert NO_LESION_FOUND in texts and DEMONSTRATION_DISCLAIMER in texts


def test_no_key_image_unless_asked(study) -> None:
    documents = build_lung_documents(study.result, study.sources, _context(key_image=False))
    assert [d.Modality for d in documents] == ["SR", "SEG"]


def test_a_later_version_supersedes_and_keeps_the_series(study) -> None:
    result, sources = study.result, study.sources
    first = build_lung_documents(result, sources, _context(series_instance_uid="1.2.3.4"))
    second = build_lung_documents(
        result,
        sources,
        _context(series_instance_uid="1.2.3.4", instance_number=2, predecessor=first[0]),
    )
    assert [d.SeriesInstanceUID for d in second] == [d.SeriesInstanceUID for d in first]
    assert {d.InstanceNumber for d in second} == {2}
    predecessors = second[0].PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessors.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first[0].SOPInstanceUID
    assert any(first[0].SOPInstanceUID in t and "supersedes" in t for t in _texts(second[0]))


def test_clinical_bundle_states_its_use(study) -> None:
    result = dataclasses.replace(study.result, intended_use="clinical")
    sr, seg, _ = build_lung_documents(result, study.sources, _context())
    assert "not for diagnostic use" not in seg.SeriesDescription
    assert "supports, and does not replace" in seg.ImageComments
    assert seg.ImageComments in _texts(sr)
    assert DEMONSTRATION_DISCLAIMER not in _texts(sr)


# -- bad input ----------------------------------------------------------------------------


def test_sources_that_do_not_match_the_result_are_refused(study) -> None:
    result, sources = study.result, list(study.sources)
    missing = result.volume.slices[5].sop_instance_uid
    kept = [s for s in sources if s.SOPInstanceUID != missing]
    with pytest.raises(ValueError, match=f'"sources" lacks slice 5 \\({missing}\\)'):
        build_lung_documents(result, kept, _context())
    other = [pydicom.dcmread(s.filename, stop_before_pixels=True) for s in sources]
    other[3].StudyInstanceUID = generate_uid()
    with pytest.raises(ValueError, match="another study"):
        build_lung_documents(result, other, _context())
    other[3] = sources[3]
    other[7].ImagePositionPatient = [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="not at the volume"):
        build_lung_seg(result, other, series_number=41)
    with pytest.raises(TypeError, match='"sources"'):
        build_lung_seg(result, sources[0], series_number=41)  # type: ignore[arg-type]


def test_a_result_that_does_not_hold_together_is_refused(study) -> None:
    result, sources = study.result, study.sources
    miscounted = dataclasses.replace(
        result,
        lesions=(dataclasses.replace(result.lesions[0], voxels=1), *result.lesions[1:]),
    )
    with pytest.raises(ValueError, match="measures 1 voxels of lesion 1"):
        build_lung_documents(miscounted, sources, _context())
    unmapped = dataclasses.replace(result, lesions=result.lesions[:1])
    with pytest.raises(ValueError, match="lesion map values outside 0-1"):
        build_lung_seg(unmapped, sources, series_number=41)
    unnamed = dataclasses.replace(result, bundle_name="")
    with pytest.raises(ValueError, match="bundle"):
        build_lung_seg(unnamed, sources, series_number=41)
    with pytest.raises(TypeError, match='"result"'):
        build_lung_seg("result", sources, series_number=41)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"series_number"'):
        build_lung_seg(result, sources, series_number=0)


def test_an_sr_refuses_a_seg_of_other_lesions(study) -> None:
    result, sources = study.result, study.sources
    seg = build_lung_seg(result, sources, series_number=41)
    with pytest.raises(ValueError, match='"seg" is needed'):
        build_lung_sr(result, None, sources, device_uid="1.2.3", series_number=40)
    fewer = dataclasses.replace(
        result,
        lesions_map=np.where(result.lesions_map == 3, 0, result.lesions_map).astype(np.uint16),
        lesions=result.lesions[:2],
    )
    other = build_lung_seg(fewer, sources, series_number=41)
    with pytest.raises(ValueError, match='"seg" has segments'):
        build_lung_sr(result, other, sources, device_uid="1.2.3", series_number=40)
    with pytest.raises(ValueError, match='"device_uid"'):
        build_lung_sr(result, seg, sources, device_uid="not a uid", series_number=40)
    with pytest.raises(ValueError, match='"predecessor"'):
        build_lung_sr(result, seg, sources, device_uid="1.2.3", series_number=40, predecessor=seg)
