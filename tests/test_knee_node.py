"""The knee analysis in a node, end to end to a real PACS (DCMTK storescp).

A knee MR phantom study (a 3-D sagittal DESS series and a coronal PD series) goes in as MR
Image Storage; its DICOM SEG and SR come out in the source study, both dciodvfy-clean, the
SEG's voxels those the runner gives for the same series in this process, the SR's groups
referencing the SEG's segments. A study whose sagittal series has a gap fails naming the
gap; a hip MR study is IGNORED with the knee rule's reason. The bundle is a small one
trained here on small phantoms (a minute on one core), so the segmentation is real.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node import storescu
from test_pipeline import StoreSCP, _dciodvfy_errors, _status, _wait
from test_spine_node import _relabel

pytestmark = pytest.mark.peers

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
#: Small phantoms (the same field of view as the default, coarser voxels) keep training short.
SHAPE = (24, 64, 64)
SPACING = (3.0, 1.6, 1.6)

SMALL_RECIPE = """
name = "knee-small"
version = "0.0.1"
[preprocessing]
spacing_mm = 1.6
coarse_factor = 2
[stage1]
epochs = 60
batch_size = 4
validate_every = 100
[stage2]
epochs = 12
batch_size = 4
patch = [24, 24, 24]
patches_per_case = 8
validate_every = 100
[split]
train = 0.8
validation = 0.2
test = 0.0
"""


@pytest.fixture(scope="module")
def small_knee_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A knee bundle trained on 8 small phantoms (2 validate; ~20 s), through the training command."""
    from mibi_node.analyses.knee.phantom import write_knee_dataset
    from training.knee import main

    work = tmp_path_factory.mktemp("knee-small")
    write_knee_dataset(work / "data", 10, 3, shape=SHAPE, spacing=SPACING)
    (work / "small.toml").write_text(SMALL_RECIPE)
    code = main(["train", str(work / "small.toml"), str(work / "data"), "--out", str(work / "b")])
    assert code == 0
    return work / "b"


def _sr_references(sr: pydicom.Dataset) -> set[tuple[str, int | None]]:
    """(SOP Instance UID, segment number) of every image reference in the SR's tree."""
    found: set[tuple[str, int | None]] = set()

    def walk(items: pydicom.Sequence) -> None:
        for item in items:
            for ref in item.get("ReferencedSOPSequence", []):
                numbers = ref.get("ReferencedSegmentNumber")
                found.add((str(ref.ReferencedSOPInstanceUID), int(numbers) if numbers else None))
            walk(item.get("ContentSequence", []))

    walk(sr.ContentSequence)
    return found


def test_a_knee_study_gets_its_seg_and_sr_and_bad_ones_a_reason(
    node_factory, require_tool, small_knee_bundle: Path, tmp_path: Path
) -> None:
    from mibi_node.analyses.knee.labels import LABEL_OF
    from mibi_node.analyses.knee.phantom import make_knee_case, write_knee_study
    from mibi_node.analyses.knee.reader import read_knee_study
    from mibi_node.analyses.knee.runner import KneeRunner
    from mibi_node.analyses.knee.seg import read_knee_seg

    dciodvfy = require_tool("dciodvfy")
    require_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        case = make_knee_case(41, shape=SHAPE, spacing=SPACING)
        knee = write_knee_study(case, tmp_path / "knee", index=0)
        sagittal = [p for p in knee if "-sag-" in p.name]
        gapped = write_knee_study(
            make_knee_case(42, shape=SHAPE, spacing=SPACING), tmp_path / "gap", index=1
        )
        missing = sorted(p for p in gapped if "-sag-" in p.name)[SHAPE[0] // 2]
        gapped.remove(missing)
        hip = _relabel(
            write_knee_study(
                make_knee_case(43, shape=SHAPE, spacing=SPACING), tmp_path / "h", extra_series=False
            ),
            tmp_path / "hip",
            "MRI HIP LEFT",
        )
        node = node_factory(
            {
                "workers": {"count": 1, "device": "cpu", "poll_seconds": 0.1},
                "analyses.parathyroid": {"enabled": False},
                "analyses.knee": {"bundle": str(small_knee_bundle), "max_wait": 0},
                "dispatch": {"destinations": [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]},
            }
        )  # fmt: skip
        assert storescu(node.port, knee, calling="MR_SCANNER").returncode == 0
        assert storescu(node.port, gapped, calling="MR_SCANNER").returncode == 0
        assert storescu(node.port, hip, calling="MR_SCANNER").returncode == 0
        _wait(lambda: len(pacs.files()) >= 2, 180, "the SR and the SEG at the PACS", node)
        arrived = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in pacs.files()
        }
        assert len(arrived) == 2
        [sr_path] = [p for uid, p in arrived.items() if uid.startswith(SR_PREFIX)]
        sr, seg = pydicom.dcmread(sr_path), pydicom.dcmread(arrived[SEGMENTATION_STORAGE])
        source = pydicom.dcmread(sagittal[0], stop_before_pixels=True)
        assert sr.StudyInstanceUID == seg.StudyInstanceUID == source.StudyInstanceUID
        assert (sr.SeriesNumber, seg.SeriesNumber) == (9931, 9932)
        for path in arrived.values():
            assert _dciodvfy_errors(dciodvfy, path) == []

        # The SEG holds what the runner gives for the sagittal series here, voxel for voxel
        # up to the odd voxel where another thread count rounds a probability the other way.
        study = read_knee_study(sagittal)
        [expected] = KneeRunner(small_knee_bundle).predict([study])
        uids = [s.sop_instance_uid for s in study.volume.slices]
        labels = read_knee_seg(seg, uids)
        assert labels.shape == case.labels.shape
        assert np.mean(labels == expected.labels) > 0.999
        femoral = LABEL_OF["femoral_cartilage"]
        got, want = labels == femoral, case.labels == femoral
        assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.5  # a real segmentation
        # Every segment is referenced by an SR group; every frame by its source slice.
        numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
        assert {(seg.SOPInstanceUID, n) for n in numbers} <= _sr_references(sr)
        for frame in seg.PerFrameFunctionalGroupsSequence:
            ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID in uids

        _wait(
            lambda: {s["state"] for s in _status(node)["studies"]} >= {"DONE", "FAILED"},
            60,
            "the study with a gap to fail",
            node,
        )
        by_uid = {s["study_instance_uid"]: s for s in _status(node)["studies"]}
        assert by_uid[source.StudyInstanceUID]["state"] == "DONE"
        gap_uid = str(pydicom.dcmread(gapped[0], stop_before_pixels=True).StudyInstanceUID)
        assert by_uid[gap_uid]["state"] == "FAILED"
        [(error,)] = node.query(
            "SELECT j.error FROM job j JOIN study s ON s.id = j.study_id "
            f"WHERE s.study_instance_uid = '{gap_uid}'"
        )
        assert "gap" in error, error
        [ignored] = [s for s in by_uid.values() if s["state"] == "IGNORED"]
        assert ignored["state_reason"] == (
            "not a knee MR study: ruled out by description 'MRI HIP LEFT'"
        )
        [(result,)] = node.query(
            "SELECT result FROM job WHERE analysis = 'knee' AND state = 'DONE'"
        )
        stored = result if isinstance(result, dict) else json.loads(result)
        assert [m["structure"] for m in stored["measurements"]] == [
            m.structure for m in expected.measurements
        ]
    finally:
        pacs.stop()
        shutil.rmtree(tmp_path / "knee", ignore_errors=True)
