"""Two analyses in one node with one worker, end to end to a real PACS (DCMTK storescp).

A parathyroid subtraction study (sestamibi images plus a pertechnetate thyroid image), a
thyroid scan and a CT go in; one MIBI SR and one thyroid SR come out, each in its own study
and series, the CT is IGNORED with both analyses' reasons, and the status shows each
analysis' jobs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest

from bundles import random_bundle, random_thyroid_bundle
from factory import CT_STORAGE, nm_dataset, write
from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.report import read_probabilities
from node import storescu
from test_pipeline import StoreSCP, _dciodvfy_errors, _status, _wait

pytestmark = pytest.mark.peers


def test_two_analyses_in_one_node_each_send_their_sr(
    node_factory, require_tool, tmp_path: Path
) -> None:
    dciodvfy = require_tool("dciodvfy")
    require_tool("storescp")
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        mibi_bundle = random_bundle(tmp_path / "mibi")
        thyroid_bundle = random_thyroid_bundle(tmp_path / "thy")
        mibi = tmp_path / "mibi-study"
        subprocess.run(
            [sys.executable, "-m", "mibi_node.cli", "synth", "--out", str(mibi), "--studies", "1",
             "--seed", "21", "--with-thyroid-scan"],
            check=True, capture_output=True,
        )  # fmt: skip
        thyroid = tmp_path / "thyroid-study"
        generate_thyroid_studies(thyroid, 1, 22, matrix=64)
        ct = nm_dataset(seed=23, sop_class_uid=CT_STORAGE)
        ct.Modality, ct.StudyDescription = "CT", "NECK"
        mibi_files = sorted(mibi.glob("study-*/*.dcm"))
        thyroid_files = sorted(thyroid.glob("study-*/*.dcm"))
        assert len(mibi_files) == 3  # early, delayed and the pertechnetate thyroid image
        node = node_factory(
            {
                "workers": {"count": 1, "device": "cpu", "bundle": str(mibi_bundle),
                            "poll_seconds": 0.1},
                "analyses.thyroid": {"bundle": str(thyroid_bundle)},
                "dispatch": {"destinations": [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]},
                "reception": {"accept_all_storage": True},
            }
        )  # fmt: skip
        files = [*mibi_files, *thyroid_files, write(ct, tmp_path / "ct.dcm")]
        assert storescu(node.port, files, calling="GAMMA_CAM1").returncode == 0
        # Two SRs, and the key image the parathyroid analysis sends beside its SR by default
        # (the thyroid analysis makes none).
        _wait(lambda: len(pacs.files()) >= 3, 120, "two SRs and a key image at the PACS", node)
        time.sleep(1.0)
        assert pacs.modalities() == ["OT", "SR", "SR"]
        srs = {
            str(ds.StudyInstanceUID): p
            for p, ds in ((p, pydicom.dcmread(p, stop_before_pixels=True)) for p in pacs.files())
            if ds.Modality == "SR"
        }
        assert len(srs) == 2
        [key_image] = pacs.received("OT")
        mibi_uid = str(pydicom.dcmread(mibi_files[0], stop_before_pixels=True).StudyInstanceUID)
        thyroid_uid = str(
            pydicom.dcmread(thyroid_files[0], stop_before_pixels=True).StudyInstanceUID
        )
        assert set(srs) == {mibi_uid, thyroid_uid}
        assert key_image.StudyInstanceUID == mibi_uid and key_image.SeriesNumber == 9902
        mibi_sr, thyroid_sr = pydicom.dcmread(srs[mibi_uid]), pydicom.dcmread(srs[thyroid_uid])
        assert sum(read_probabilities(mibi_sr).values()) == pytest.approx(1.0, abs=1e-6)
        assert (mibi_sr.SeriesNumber, thyroid_sr.SeriesNumber) == (9901, 9911)
        for path in srs.values():
            assert _dciodvfy_errors(dciodvfy, path) == []
        status = _status(node)
        by_uid = {s["study_instance_uid"]: s for s in status["studies"]}
        assert by_uid[mibi_uid]["state"] == "DONE" and by_uid[thyroid_uid]["state"] == "DONE"
        [ignored] = [s for s in status["studies"] if s["state"] == "IGNORED"]
        assert ignored["state_reason"].startswith("no analysis takes it: parathyroid: modality CT")
        assert "thyroid: modality CT" in ignored["state_reason"]
        assert status["analyses"] == {"parathyroid": {"DONE": 1}, "thyroid": {"DONE": 1}}
        assert set(by_uid[thyroid_uid]["results"]) == {"thyroid"}
        assert set(by_uid[mibi_uid]["results"]) == {"parathyroid"}
        rows = node.query("SELECT analysis, result FROM job ORDER BY id")
        results = {a: r if isinstance(r, dict) else json.loads(r) for a, r in rows}
        assert set(results) == {"parathyroid", "thyroid"}
        assert sum(results["thyroid"]["lobe_uptake"].values()) == pytest.approx(1.0)
    finally:
        pacs.stop()
