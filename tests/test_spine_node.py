"""The spine analysis in a node, end to end to a real PACS (DCMTK storescp).

A full lumbar MR phantom study (T1 and T2 sagittal, T2 axial) goes in as MR Image Storage,
accepted because the spine analysis is enabled; its SR and key image come out in the
source study, both dciodvfy-clean, the SR's points on the middle T2 sagittal slice. A study
whose T2 sagittal series never comes fails naming every series and why it was refused; a
cervical spine MR study is IGNORED with the spine rule's reason.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from bundles import random_spine_bundle
from mibi_node.analyses.spine.levels import CLASSES, LEVELS
from mibi_node.analyses.spine.phantom import make_spine_study
from mibi_node.analyses.spine.report import read_spine_report
from node import storescu
from test_pipeline import StoreSCP, _dciodvfy_errors, _status, _wait

pytestmark = pytest.mark.peers

SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _relabel(paths: list[Path], folder: Path, description: str) -> list[Path]:
    """Copies of ``paths`` as a new study with another Study Description."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True)
    study, series = generate_uid(), {}
    out = []
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series.setdefault(str(ds.SeriesInstanceUID), generate_uid())
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyDescription = description
        ds.save_as(folder / path.name, enforce_file_format=True)
        out.append(folder / path.name)
    return out


def test_a_spine_study_gets_its_sr_and_key_image_and_bad_ones_a_reason(
    node_factory, require_tool, tmp_path: Path
) -> None:
    dciodvfy = require_tool("dciodvfy")
    require_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        bundle = random_spine_bundle(tmp_path / "bundle")
        full = make_spine_study(tmp_path / "full", 31)
        partial = make_spine_study(tmp_path / "partial", 32, series=("t1_sagittal", "t2_axial"))
        cervical = _relabel(
            list(
                make_spine_study(tmp_path / "c", 33, series=("t2_sagittal",)).paths["t2_sagittal"]
            ),
            tmp_path / "cervical",
            "MRI CERVICAL SPINE",
        )
        node = node_factory(
            {
                "workers": {"count": 1, "device": "cpu", "poll_seconds": 0.1},
                "analyses.parathyroid": {"enabled": False},
                "analyses.spine": {"bundle": str(bundle), "max_wait": 0},
                "dispatch": {"destinations": [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]},
            }
        )  # fmt: skip
        files = [p for paths in full.paths.values() for p in paths]
        assert len(files) == 25  # 11 + 11 sagittal slices, 3 axial
        assert storescu(node.port, files, calling="MR_SCANNER").returncode == 0
        assert storescu(node.port, [p for v in partial.paths.values() for p in v]).returncode == 0
        assert storescu(node.port, cervical).returncode == 0
        _wait(lambda: len(pacs.files()) >= 2, 120, "the SR and the key image at the PACS", node)
        time.sleep(1.0)
        arrived = {
            str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID): p for p in pacs.files()
        }
        assert len(pacs.files()) == 2
        [sr_path] = [p for uid, p in arrived.items() if uid.startswith(SR_PREFIX)]
        key_path = arrived[SC_STORAGE]
        sr, key = pydicom.dcmread(sr_path), pydicom.dcmread(key_path)
        assert sr.StudyInstanceUID == key.StudyInstanceUID == full.study_instance_uid
        assert (sr.SeriesNumber, key.SeriesNumber) == (9921, 9922)
        assert key.BurnedInAnnotation == "YES"
        report = read_spine_report(sr)
        assert report.image_sop_instance_uid == full.middle.sop_instance_uid
        assert [p.level for p in report.points] == list(LEVELS)
        for point in report.points:
            assert set(point.probabilities) == set(CLASSES[point.kind])
            assert sum(point.probabilities.values()) == pytest.approx(1.0, abs=1e-3)
        for path in (sr_path, key_path):
            assert _dciodvfy_errors(dciodvfy, path) == []

        _wait(
            lambda: {s["state"] for s in _status(node)["studies"]} >= {"DONE", "FAILED"},
            60,
            "the partial study to fail",
            node,
        )
        by_uid = {s["study_instance_uid"]: s for s in _status(node)["studies"]}
        assert by_uid[full.study_instance_uid]["state"] == "DONE"
        failed = by_uid[partial.study_instance_uid]
        assert failed["state"] == "FAILED"
        rows = node.query(
            "SELECT j.error FROM job j JOIN study s ON s.id = j.study_id "
            f"WHERE s.study_instance_uid = '{partial.study_instance_uid}'"
        )
        [(error,)] = rows
        assert "T2 sagittal" in error and "never arrived" in error
        assert "is T1-weighted" in error and "is axial" in error  # every series, and why
        [ignored] = [s for s in by_uid.values() if s["state"] == "IGNORED"]
        assert ignored["state_reason"] == (
            "not a lumbar spine MR study: ruled out by description 'MRI CERVICAL SPINE'"
        )
        [(result,)] = node.query(
            "SELECT result FROM job WHERE analysis = 'spine' AND state = 'DONE'"
        )
        stored = result if isinstance(result, dict) else json.loads(result)
        assert len(stored["points"]) == 11 and stored["middle"]["sop_instance_uid"] == (
            full.middle.sop_instance_uid
        )
    finally:
        pacs.stop()
        shutil.rmtree(tmp_path / "full", ignore_errors=True)


TINY_RECIPE = """
name = "spine-tiny"
version = "0.0.1"
[input]
size = 64
[keypoints]
decoder_channels = 16
epochs = 1
batch_size = 4
[classifier]
heads = 2
embed_dim = 16
epochs = 1
batch_size = 16
[crop]
size = 32
"""


def test_mibi_node_train_takes_the_analysis_and_its_data_format(tmp_path: Path) -> None:
    """``mibi-node train --analysis spine`` reads annotations.json beside the DICOM files."""
    import subprocess
    import sys

    from mibi_node.analyses.spine.bundle import load_spine_bundle
    from mibi_node.analyses.spine.phantom import write_spine_dataset

    data = tmp_path / "data"
    write_spine_dataset(data, 4, 5, series=("t2_sagittal",), sagittal_slices=3)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    cli = [sys.executable, "-m", "mibi_node.cli", "train"]
    done = subprocess.run(
        [*cli, "--analysis", "spine", "--recipe", str(recipe), "--data", str(data), "--out",
         str(tmp_path / "bundle")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert load_spine_bundle(tmp_path / "bundle").name == "spine-tiny"
    refused = subprocess.run(
        [*cli, "--analysis", "wrist", "--data", str(data), "--out", str(tmp_path / "lung")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "no analysis called 'wrist'" in refused.stderr
    assert "Traceback" not in refused.stderr
