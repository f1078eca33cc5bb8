"""``mibi-node predict`` and ``init-bundle``: readable output, exit codes, no tracebacks."""

from __future__ import annotations

import json
import sys
import types
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import typer
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from typer.testing import CliRunner

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.study import PhaseImage, StudyInput
from mibi_node.inference.command import init_bundle, predict

DEMO = Path(__file__).resolve().parents[1] / "config" / "ensemble-demo.toml"

app = typer.Typer(pretty_exceptions_enable=False)
app.command("predict")(predict)
app.command("init-bundle")(init_bundle)
runner = CliRunner()


def write_instance(path: Path, study_uid: str, sop_uid: str) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def fake_read_study(paths: Sequence[Path], required: Sequence[str] = ("early", "delayed")):  # type: ignore[no-untyped-def]
    """Stands in for the NM reader: synthetic pixels, or a refusal for '.bad' studies."""
    uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
    if uid.endswith(".9"):
        raise UnusableStudyError(f"study {uid} has no delayed image (only early found)")
    rng = np.random.default_rng(len(paths))
    images = {
        name: PhaseImage(
            name,
            rng.poisson(20, (64, 64)).astype(np.float32),
            None,
            f"{uid}.{i}",
            "1.2.840.10008.5.1.4.1.1.20",
            f"{uid}.100",
        )
        for i, name in enumerate(required)
    }
    return StudyInput(uid, images)


@pytest.fixture
def fake_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    module = types.ModuleType("mibi_node.imaging.nm")
    module.read_study = fake_read_study  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "mibi_node.imaging.nm", module)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "demo"
    result = runner.invoke(app, ["init-bundle", str(DEMO), "--out", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert "wrote demonstration bundle mibi-demo" in result.output
    return out


def test_init_bundle_errors(bundle_dir: Path, tmp_path: Path) -> None:
    again = runner.invoke(app, ["init-bundle", str(DEMO), "--out", str(bundle_dir)])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = runner.invoke(app, ["init-bundle", str(tmp_path / "x.toml"), "--out", "b"])
    assert missing.exit_code == 2 and "no such file" in missing.output
    assert "Traceback" not in again.output + missing.output


def test_predict_prints_each_study(bundle_dir: Path, tmp_path: Path, fake_reader: None) -> None:
    write_instance(tmp_path / "a" / "1.dcm", "1.2.826.1", "1.2.826.1.1")
    write_instance(tmp_path / "a" / "2.dcm", "1.2.826.1", "1.2.826.1.2")
    write_instance(tmp_path / "b" / "1.dcm", "1.2.826.2", "1.2.826.2.1")
    (tmp_path / "a" / "labels.csv").write_text("not dicom")
    result = runner.invoke(app, ["predict", str(tmp_path), "--bundle", str(bundle_dir)])
    assert result.exit_code == 0, result.output
    for text in ("study 1.2.826.1", "study 1.2.826.2", "adenoma", "prediction:", "agreement"):
        assert text in result.output
    assert "labels.csv: skipped (not DICOM)" in result.output


def test_predict_json_and_unusable_study(
    bundle_dir: Path, tmp_path: Path, fake_reader: None
) -> None:
    write_instance(tmp_path / "good.dcm", "1.2.826.3", "1.2.826.3.1")
    write_instance(tmp_path / "bad.dcm", "1.2.826.9", "1.2.826.9.1")
    result = runner.invoke(
        app,
        [
            "predict",
            str(tmp_path / "good.dcm"),
            str(tmp_path / "bad.dcm"),
            "--bundle",
            str(bundle_dir),
            "--json",
            "--device",
            "cpu",
        ],
    )
    assert result.exit_code == 1
    document = json.loads(result.stdout)
    (study,) = document["studies"]
    assert study["study_instance_uid"] == "1.2.826.3"
    assert abs(sum(study["probabilities"].values()) - 1) < 1e-9
    assert document["errors"] == [
        {
            "study_instance_uid": "1.2.826.9",
            "error": "study 1.2.826.9 has no delayed image (only early found)",
        }
    ]
    assert document["bundle"]["intended_use"] == "demonstration"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{tmp}/nothing"], "no such file or folder"),
        (["{tmp}"], "no DICOM study"),
    ],
)
def test_predict_bad_paths(
    bundle_dir: Path, tmp_path: Path, fake_reader: None, args: list[str], message: str
) -> None:
    argv = ["predict", *[a.format(tmp=tmp_path) for a in args], "--bundle", str(bundle_dir)]
    result = runner.invoke(app, argv)
    assert result.exit_code == 2 and message in result.output
    assert "Traceback" not in result.output


def test_predict_bad_bundle_and_device(bundle_dir: Path, tmp_path: Path, fake_reader: None) -> None:
    write_instance(tmp_path / "1.dcm", "1.2.826.4", "1.2.826.4.1")
    result = runner.invoke(app, ["predict", str(tmp_path), "--bundle", str(tmp_path / "none")])
    assert result.exit_code == 2 and "no such folder" in result.output
    result = runner.invoke(
        app, ["predict", str(tmp_path), "--bundle", str(bundle_dir), "--device", "tpu"]
    )
    assert result.exit_code == 2 and '"device"' in result.output


@pytest.mark.slow
def test_predict_on_phantom_studies(bundle_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("mibi_node.imaging.nm", reason="the NM reader has not landed yet")
    phantom = pytest.importorskip("mibi_node.phantom")
    phantom.generate_studies(tmp_path / "studies", 2, seed=5)
    result = runner.invoke(
        app, ["predict", str(tmp_path / "studies"), "--bundle", str(bundle_dir), "--json"]
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert len(document["studies"]) == 2
    for study in document["studies"]:
        assert abs(sum(study["probabilities"].values()) - 1) < 1e-9
