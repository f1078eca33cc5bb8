"""The lung analysis in a node, end to end to a real PACS (Orthanc).

A chest CT phantom of 300 slices (1 mm apart, 128 x 128 pixels) goes in as 300 CT Image
Storage instances over one association; it becomes one stable study, is analysed once, and
its DICOM SEG, SR and key image land in the source study in Orthanc, all three
dciodvfy-clean, the SEG's lesions those the runner gives for the same series in this
process, the SR's groups referencing the SEG's segments. A chest CT whose series misses a
slice fails naming the gap; a head CT is IGNORED with the lung rule's reason. The bundle is
a small one trained here on small phantoms through the training command.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node import storescu
from orthanc import OrthancServer, find_orthanc
from test_knee_node import _sr_references
from test_pipeline import _dciodvfy_errors, _status, _wait
from test_spine_node import _relabel

pytestmark = pytest.mark.peers

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
#: The CT-sized series: 300 instances.
LONG_SHAPE, LONG_SPACING = (300, 128, 128), (1.0, 1.5, 1.5)
#: Small phantoms for training and for the studies that fail or are ignored.
SMALL_SHAPE, SMALL_SPACING = (24, 96, 96), (3.0, 2.0, 2.0)

SMALL_RECIPE = """
name = "lung-small"
version = "0.0.1"
[preprocessing]
slice_spacing_mm = 3.0
pixel_spacing_mm = 2.0
[detector]
arch = "maskrcnn_resnet18_fpn_s"
batch = 12
[detector.options]
rpn_post_nms_top_n_test = 50
box_detections_per_img = 5
[linking]
fit = false
[report]
fp_per_scan = 100.0
[split]
train = 0.9
validation = 0.1
test = 0.0
[training]
steps = 60
batch_size = 4
roi_batch = 64
"""


@pytest.fixture(scope="module")
def small_lung_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A lung bundle trained briefly on 10 small phantoms through the training command."""
    from mibi_node.analyses.lung.phantom import write_lung_dataset
    from training.lung import main

    work = tmp_path_factory.mktemp("lung-small")
    write_lung_dataset(work / "data", 10, 3, shape=SMALL_SHAPE, spacing=SMALL_SPACING)
    (work / "small.toml").write_text(SMALL_RECIPE)
    code = main(["train", str(work / "small.toml"), str(work / "data"), "--out", str(work / "b")])
    assert code == 0
    return work / "b"


def test_a_300_slice_chest_ct_gets_seg_sr_and_key_image_once_and_bad_ones_a_reason(
    node_factory, require_tool, small_lung_bundle: Path, tmp_path: Path
) -> None:
    from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
    from mibi_node.analyses.lung.reader import read_lung_study
    from mibi_node.analyses.lung.runner import LungRunner
    from mibi_node.analyses.lung.seg import read_lung_seg

    dciodvfy = require_tool("dciodvfy")
    require_tool("storescu")
    if find_orthanc() is None:
        pytest.skip("Orthanc is not installed: run scripts/install-peers.sh")
    pacs = OrthancServer(tmp_path / "orthanc").start()
    try:
        case = make_lung_case(
            61,
            shape=LONG_SHAPE,
            spacing=LONG_SPACING,
            lesions=["ground_glass_opacity", "bronchiectasis"],
        )
        chest = write_lung_study(case, tmp_path / "chest", series_description="CHEST LUNG 1 MM")
        gapped = write_lung_study(
            make_lung_case(62, shape=SMALL_SHAPE, spacing=SMALL_SPACING), tmp_path / "gap", index=1
        )
        gapped.pop(SMALL_SHAPE[0] // 2)
        head = _relabel(
            write_lung_study(
                make_lung_case(63, shape=SMALL_SHAPE, spacing=SMALL_SPACING),
                tmp_path / "h",
                index=2,
            ),
            tmp_path / "head",
            "CT HEAD",
        )
        node = node_factory(
            {
                "workers": {"count": 1, "device": "cpu", "poll_seconds": 0.1},
                "analyses.parathyroid": {"enabled": False},
                "analyses.lung": {"bundle": str(small_lung_bundle), "max_wait": 0},
                "dispatch": {"destinations": [
                    {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.dicom_port}]},
            }
        )  # fmt: skip
        sent = storescu(node.port, chest, calling="CT_SCANNER", timeout=300)
        assert sent.returncode == 0, sent.stderr
        assert storescu(node.port, gapped, calling="CT_SCANNER").returncode == 0
        assert storescu(node.port, head, calling="CT_SCANNER").returncode == 0
        source = pydicom.dcmread(chest[0], stop_before_pixels=True)
        uid = str(source.StudyInstanceUID)

        def arrived() -> list[dict]:
            return pacs.instances_of_study(uid)

        _wait(lambda: len(arrived()) >= 3, 300, "the SR, the SEG and the key image", node)
        documents = {}
        for tags in arrived():
            data = pacs.instance_file(tags["SOPInstanceUID"])
            path = tmp_path / f"out-{len(documents)}.dcm"
            path.write_bytes(data)
            dataset = pydicom.dcmread(io.BytesIO(data))
            documents[str(dataset.SOPClassUID)] = (dataset, path)
        assert len(documents) == 3, sorted(documents)
        [sr_class] = [c for c in documents if c.startswith(SR_PREFIX)]
        sr, seg = documents[sr_class][0], documents[SEGMENTATION_STORAGE][0]
        key_image = documents[SECONDARY_CAPTURE][0]
        assert (sr.SeriesNumber, seg.SeriesNumber, key_image.SeriesNumber) == (9941, 9942, 9943)
        for dataset, path in documents.values():
            assert dataset.StudyInstanceUID == uid
            assert _dciodvfy_errors(dciodvfy, path) == []

        # 300 instances received over one association, one study, analysed once.
        [(count,)] = node.query(
            "SELECT count(*) FROM instance i JOIN study s ON s.id = i.study_id "
            f"WHERE s.study_instance_uid = '{uid}'"
        )
        assert count == LONG_SHAPE[0]
        jobs = node.query(
            "SELECT j.analysis, j.version, j.state FROM job j JOIN study s ON s.id = j.study_id "
            f"WHERE s.study_instance_uid = '{uid}'"
        )
        assert jobs == [("lung", 1, "DONE")]

        # The SEG holds what the runner gives for the series here.
        study = read_lung_study(chest)
        [expected] = LungRunner(small_lung_bundle).predict([study])
        uids = [s.sop_instance_uid for s in study.volume.slices]
        found = read_lung_seg(seg, uids)
        assert found.shape == LONG_SHAPE
        assert len(expected.lesions) == len(seg.SegmentSequence) >= 1
        assert np.mean(found == expected.lesions_map) > 0.999
        numbers = {int(item.SegmentNumber) for item in seg.SegmentSequence}
        assert {(seg.SOPInstanceUID, n) for n in numbers} <= _sr_references(sr)
        for frame in seg.PerFrameFunctionalGroupsSequence:
            ref = frame.DerivationImageSequence[0].SourceImageSequence[0]
            assert ref.ReferencedSOPInstanceUID in uids

        _wait(
            lambda: {s["state"] for s in _status(node)["studies"]} >= {"DONE", "FAILED", "IGNORED"},
            120,
            "the study with a gap to fail and the head CT to be ignored",
            node,
        )
        by_uid = {s["study_instance_uid"]: s for s in _status(node)["studies"]}
        assert by_uid[uid]["state"] == "DONE"
        gap_uid = str(pydicom.dcmread(gapped[0], stop_before_pixels=True).StudyInstanceUID)
        assert by_uid[gap_uid]["state"] == "FAILED"
        [(error,)] = node.query(
            "SELECT j.error FROM job j JOIN study s ON s.id = j.study_id "
            f"WHERE s.study_instance_uid = '{gap_uid}'"
        )
        assert "gap" in error, error
        [ignored] = [s for s in by_uid.values() if s["state"] == "IGNORED"]
        assert ignored["state_reason"] == "not a chest CT study: ruled out by description 'CT HEAD'"
        [(result,)] = node.query(
            "SELECT result FROM job WHERE analysis = 'lung' AND state = 'DONE'"
        )
        stored = result if isinstance(result, dict) else json.loads(result)
        assert [lesion["number"] for lesion in stored["lesions"]] == [
            lesion.number for lesion in expected.lesions
        ]
    finally:
        pacs.stop()
        shutil.rmtree(tmp_path / "chest", ignore_errors=True)
