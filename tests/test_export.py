"""Retraining from the node (issue 19): ``mibi-node train --from-node`` exports the assessed
studies, de-identified, as the labelled data set ``train`` reads, and a bundle trains on it.

The node is a fresh SQLite database and store holding real phantom studies (early and
delayed NM images) whose headers carry a made-up patient's name, IDs, accession number,
institution, referring physician, a private tag and the surname inside the series
description; their jobs are DONE and their references come through ``import_truth`` and
``record_verdict``. A case is matched back to its study by its pixels, the one thing the
export does not touch.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select
from typer.testing import CliRunner

from factory import write
from mibi_node.analyses.thyroid.phantom import make_thyroid_study
from mibi_node.analyses.thyroid.result import FINDINGS, ThyroidResult
from mibi_node.cli import app
from mibi_node.config import Config
from mibi_node.imaging.nm import read_study
from mibi_node.imaging.study import PhaseImage
from mibi_node.inference.bundle import load_bundle
from mibi_node.inference.result import StudyResult
from mibi_node.phantom.generator import make_study
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import AuditEvent, Instance, Job, JobState, Study
from mibi_node.validation.export import ExportError, export_assessed
from mibi_node.validation.truth import import_truth
from mibi_node.validation.verdicts import record_verdict

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")
SURNAMES = ("MUSTERMANN", "ROSSIGNOL", "KOWALCZYK", "FERNANDES", "LINDQVIST", "OKONKWO",
            "VANDERBERG", "HATZIDAKIS", "MAGNUSSON", "PETRAKIS", "DELACROIX", "SZYMANSKA",
            "ABERNATHY", "QUISPE", "NAKAMURA", "WOJCIECHOWSKI", "THORVALDSEN")  # fmt: skip
#: Studies 0-14 are assessed (three per class: the fewest that give ``train`` a test and a
#: validation study of every class); 15 only has a rejection; 16's files are removed.
REJECTED, REMOVED = 15, 16

TINY_RECIPE = """\
name = "from-node"
version = "0.0.1"
intended_use = "demonstration"

[input]
channels = ["early", "delayed"]
size = 32

[tta]
views = ["identity"]

[[members]]
arch = "resnet10t"
heads = 2
embed_dim = 16

[training]
epochs = 1
batch_size = 4
bootstrap = 10
val_fraction = 0.3
threads = 2
"""


def _pixels_key(ds: pydicom.Dataset) -> str:
    return hashlib.sha256(ds.PixelData).hexdigest()


def _identify(ds: pydicom.Dataset, index: int) -> dict[str, str]:
    """Give a phantom instance a patient's identity, as a real camera's header has."""
    surname = SURNAMES[index]
    ds.PatientName = f"{surname}^ERIKA^M"
    ds.PatientID = f"MRN{734100 + index}"
    ds.OtherPatientIDs = f"KIS{88200 + index}"
    ds.AccessionNumber = f"ACC{51000 + index}"
    ds.PatientBirthDate = "19580221"
    ds.InstitutionName = "ST ELSEWHERE HOSPITAL"
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.OperatorsName = "NIGHTINGALE^FLORENCE"
    ds.StationName = "GAMMA1"
    ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} {surname}".strip()
    block = ds.private_block(0x0029, "ACME CAMERA", create=True)
    block.add_new(0x10, "LO", f"{surname} {ds.PatientID}")
    return {"name": surname, "id": str(ds.PatientID), "other": str(ds.OtherPatientIDs),
            "accession": str(ds.AccessionNumber)}  # fmt: skip


def _store(store: InstanceStore, folder: Path, ds: pydicom.Dataset) -> None:
    source = write(ds, folder / f"{len(list(folder.glob('*')))}.dcm")
    incoming = store.files.incoming / "export-test.part"
    shutil.copyfile(source, incoming)
    meta = InstanceMeta(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality=str(ds.Modality),
    )
    store.store(incoming, meta, "GAMMA_CAM1")


def _image(name: str) -> PhaseImage:
    return PhaseImage(name, np.zeros((4, 4), np.float32), None, generate_uid(),
                      "1.2.840.10008.5.1.4.1.1.20", generate_uid())  # fmt: skip


def _add_job(database: Database, uid: str, analysis: str, result: dict[str, Any]) -> int:
    with database.session() as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = Job(study_id=study.id, analysis=analysis, state=JobState.DONE, result=result)
        session.add(job)
        session.flush()
        return job.id


def _parathyroid(uid: str, predicted: str) -> dict[str, Any]:
    probabilities = {c: (0.8 if c == predicted else 0.05) for c in CLASSES}
    return StudyResult(
        study_instance_uid=uid, probabilities=probabilities, predicted=predicted,
        member_probabilities={}, agreement=1.0, normalised_entropy=0.3, focus=None,
        source_images={"early": _image("early")}, timings={},
        bundle_name="parathyroid-demo", bundle_version="1.2.0",
    ).to_dict()  # fmt: skip


def _config(data_dir: Path) -> Config:
    return Config.model_validate({"node": {"data_dir": str(data_dir), "host": "127.0.0.1"}})


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Seventeen parathyroid studies: fifteen assessed (by histology, by a reader accepting
    the model or correcting it), one only rejected, one assessed whose files retention
    removed."""
    root = tmp_path_factory.mktemp("export-node")
    config = _config(root / "var")
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    studies: list[dict[str, Any]] = []
    truth = ["study_instance_uid,analysis,diagnosis,date,source"]
    for index in range(17):
        label = CLASSES[index % 5]
        phantom = make_study(label, seed=3, index=index)
        identity: dict[str, str] = {}
        uids: set[str] = set()
        pixels = []
        for ds in phantom.datasets:
            identity = _identify(ds, index)
            uids |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)}
            pixels.append(_pixels_key(ds))
            _store(store, root / f"in-{index}", ds)
        uid = phantom.study_instance_uid
        # Every third model is wrong (the reader corrects it); study 4's reader accepts a
        # wrong class but histology, which wins, says otherwise.
        predicted = CLASSES[(index + 1) % 5] if index % 3 == 0 or index == 4 else label
        job = _add_job(database, uid, "parathyroid", _parathyroid(uid, predicted))
        if index == REJECTED:
            record_verdict(database, job, "diagnosis", "rejected", reader="Dr Weber")
        elif predicted == label or index == 4:
            record_verdict(database, job, "diagnosis", "accepted", reader="Dr Weber")
        else:
            record_verdict(database, job, "diagnosis", "corrected", value=label, reader="Dr W")
        from_truth = (index % 2 == 0 and index < REJECTED) or index == REMOVED
        if from_truth:
            truth.append(f"{uid},parathyroid,{label},2026-11-0{1 + index % 9},histology")
        studies.append({"label": label, "uid": uid, "identity": identity, "uids": uids,
                        "pixels": pixels, "from_truth": from_truth})  # fmt: skip
    import_truth(database, files, "\n".join(truth) + "\n", imported_by="test")
    with database.session() as session:
        gone = session.scalars(
            select(Instance.path)
            .join(Study)
            .where(Study.study_instance_uid == studies[REMOVED]["uid"])
        ).all()
    for path in gone:  # as the retention sweep does: rows stay, files go
        files.remove(path)
    yield {"config": config, "database": database, "files": files, "studies": studies,
           "data_dir": root / "var"}  # fmt: skip
    database.dispose()


def _rows(folder: Path) -> dict[str, str]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        assert reader.fieldnames == ["path", "label"]
        return {row["path"]: row["label"] for row in reader}


def test_the_export_is_labelled_by_the_references_and_de_identified(
    node: dict[str, Any], tmp_path: Path, require_tool: Any
) -> None:
    out = tmp_path / "export"
    outcome = export_assessed(node["database"], node["files"], "parathyroid", out, actor="test")
    assert outcome.cases == 15 and outcome.files == 30
    assert outcome.labels == dict.fromkeys(CLASSES, 3)
    assert outcome.skipped == {"files removed": 1, "not assessed": 1}
    assert outcome.references == {"truth": 8, "verdict": 7}
    assert sorted(p.name for p in out.iterdir()) == [
        *(f"case-{n:04d}" for n in range(1, 16)), "labels.csv", "manifest.json"
    ]  # fmt: skip
    rows = _rows(out)
    manifest = {
        entry["case"]: entry for entry in json.loads((out / "manifest.json").read_text())["cases"]
    }
    by_pixels = {key: study for study in node["studies"] for key in study["pixels"]}
    dciodvfy = require_tool("dciodvfy")
    new_study_uids = set()
    for case, label in rows.items():
        folder = out / case
        assert re.fullmatch(r"case-\d{4}", case)
        paths = sorted(folder.iterdir())
        assert [p.name for p in paths] == ["01.dcm", "02.dcm"]
        datasets = [pydicom.dcmread(p) for p in paths]
        [study] = {
            id(by_pixels[_pixels_key(ds)]): by_pixels[_pixels_key(ds)] for ds in datasets
        }.values()
        # labels = the references: histology where imported, else the reader's class
        assert label == study["label"]
        assert manifest[case]["labels"] == [label]
        assert manifest[case]["reference"] == ("truth" if study["from_truth"] else "verdict")
        assert manifest[case]["bundle_version"] == "1.2.0"
        for ds in datasets:
            assert str(ds.PatientName) == str(ds.PatientID) == case
            assert ds.PatientIdentityRemoved == "YES" and ds.DeidentificationMethod
            assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
            assert "InstitutionName" not in ds and "OtherPatientIDs" not in ds
            assert not any(elem.tag.is_private for elem in ds.iterall())
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        # one new Study Instance UID per study, not the old one
        assert len({ds.StudyInstanceUID for ds in datasets}) == 1
        new_study_uids.add(datasets[0].StudyInstanceUID)
        # the phases are still told apart (descriptions cleaned, intervals kept)
        assert set(read_study(paths).images) == {"early", "delayed"}
        assert {ds.SeriesDescription.split()[0] for ds in datasets} == {"EARLY", "DELAYED"}
        assert [line for path in paths for line in _dciodvfy(dciodvfy, path)] == []
    assert len(new_study_uids) == 15
    assert Counter(rows.values()) == Counter(dict.fromkeys(CLASSES, 3))
    # nothing identifying anywhere in the exported bytes or names
    secrets = [b"ST ELSEWHERE", b"HOUSE", b"NIGHTINGALE", b"19580221", b"GAMMA1"]
    for study in node["studies"]:
        identity = study["identity"]
        secrets += [value.encode() for value in identity.values()]
        secrets += [uid.encode() for uid in study["uids"]]
    for path in out.rglob("*"):
        assert not any(secret.decode() in str(path.relative_to(out)) for secret in secrets)
        if path.is_file():
            content = path.read_bytes()
            found = [secret for secret in secrets if secret in content]
            assert found == [], f"{path.relative_to(out)} holds {found}"
    with node["database"].session() as session:
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.kind == "export")).all()
    assert event.outcome == "exported" and event.actor == "test"
    assert event.detail["cases"] == 15 and len(event.detail["studies"]) == 15
    assert event.detail["skipped"] == {"files removed": 1, "not assessed": 1}
    assert not any(secret.decode() in json.dumps(event.detail) for secret in secrets)


def _dciodvfy(tool: str, path: Path) -> list[str]:
    import subprocess

    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_train_from_node_trains_a_bundle_that_loads(node: dict[str, Any], tmp_path: Path) -> None:
    runner = CliRunner()
    base = ["--data-dir", str(node["data_dir"])]
    printed = runner.invoke(app, ["train", "--from-node", str(tmp_path / "first"), *base])
    assert printed.exit_code == 0, printed.output
    assert "exported 15 parathyroid cases (30 files" in printed.output
    assert f"mibi-node train --data {tmp_path / 'first'} --out BUNDLE" in printed.output
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    bundle = tmp_path / "bundle"
    trained = runner.invoke(app, [
        "train", "--from-node", str(tmp_path / "second"), *base, "--out", str(bundle),
        "--recipe", str(recipe), "--device", "cpu", "--cache", str(tmp_path / "cache"),
    ])  # fmt: skip
    assert trained.exit_code == 0, trained.output
    loaded = load_bundle(bundle)  # checks every weight file's sha256 and shapes
    assert loaded.name == "from-node" and loaded.channels == ("early", "delayed")
    split = json.loads((bundle / "training" / "split.json").read_text())
    keys = split["train"] + split["val"] + split["test"]
    assert sorted(keys) == sorted(_rows(tmp_path / "second"))


def test_from_node_refusals_are_one_sentence_and_exit_2(
    node: dict[str, Any], tmp_path: Path
) -> None:
    runner = CliRunner()
    base = ["--data-dir", str(node["data_dir"])]
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    empty = tmp_path / "empty-var"
    empty.mkdir()
    for arguments, reason in (
        (["--from-node", str(used), *base], "is not empty; give a new or empty folder"),
        (["--from-node", str(tmp_path / "a"), "--analysis", "liver", *base], "unknown analysis 'liver'"),
        (["--from-node", str(tmp_path / "b"), "--analysis", "spine", *base],
         "only classifying analyses (parathyroid, thyroid) can be exported"),
        (["--from-node", str(tmp_path / "c"), "--analysis", "thyroid", *base],
         "no assessed thyroid study to export"),
        (["--from-node", str(tmp_path / "d"), "--data", str(used), *base], "not both"),
        (["--from-node", str(tmp_path / "e"), "--data-dir", str(empty)], "no mibi-node database"),
        ([], "--data and --out are needed"),
    ):  # fmt: skip
        run = runner.invoke(app, ["train", *arguments])
        assert run.exit_code == 2, run.output
        assert reason in run.output.replace("\n", " "), run.output
        assert "Traceback" not in run.output
    assert (used / "notes.txt").read_text() == "mine"
    assert not any(p.name.startswith(".export-") for p in tmp_path.iterdir())
    with pytest.raises(ExportError, match="not empty"):
        export_assessed(node["database"], node["files"], "parathyroid", used)


def test_thyroid_export_reads_as_the_thyroid_training_data(tmp_path: Path) -> None:
    from training.thyroid import load_thyroid_arrays

    config = _config(tmp_path / "var")
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    # (true findings, model's findings, how the reference comes)
    plan = [
        (("graves",), ("graves",), "truth"),
        (("toxic_adenoma", "cold_nodule"), ("toxic_adenoma",), "verdicts"),
        (("normal",), ("graves",), "verdicts"),
        (("thyroiditis",), ("thyroiditis",), "partial"),  # not every finding judged
    ]
    pixels = {}
    try:
        for index, (true, said, how) in enumerate(plan):
            phantom = make_thyroid_study(
                4, true, index=index, matrix=64, with_markers=False, extra_view=False
            )
            for ds in phantom.datasets:
                _identify(ds, index)
                pixels[_pixels_key(ds)] = true
                _store(store, tmp_path / f"in-{index}", ds)
            uid = str(phantom.datasets[0].StudyInstanceUID)
            probabilities = {k: (0.9 if k in said else 0.1) for k in FINDINGS}
            result = ThyroidResult(
                study_instance_uid=uid, probabilities=probabilities, findings=said,
                thresholds=dict.fromkeys(FINDINGS, 0.5), lobe_uptake={"right": 0.5, "left": 0.5},
                nodules=(), source_image=_image("thyroid"), bundle_name="t", bundle_version="0.1",
            ).to_dict()  # fmt: skip
            job = _add_job(database, uid, "thyroid", result)
            if how == "truth":
                import_truth(database, files, "study_instance_uid,analysis,diagnosis,date,source\n"
                             f"{uid},thyroid,{true[0]},2026-11-02,follow-up\n", imported_by="t")  # fmt: skip
                continue
            for key in FINDINGS[: 3 if how == "partial" else None]:
                right, model = key in true, key in said
                if right == model:
                    record_verdict(database, job, key, "accepted", reader="Dr T")
                elif key == "cold_nodule":  # a rejection of a binary finding: the other one
                    record_verdict(database, job, key, "rejected", reader="Dr T")
                else:
                    value = "present" if right else "absent"
                    record_verdict(database, job, key, "corrected", value=value, reader="Dr T")
        out = tmp_path / "thyroid-export"
        outcome = export_assessed(database, files, "thyroid", out)
    finally:
        database.dispose()
    assert outcome.cases == 3 and outcome.skipped == {"not assessed": 1}
    assert outcome.references == {"truth": 1, "verdict": 2}
    assert outcome.train_command("B") == [
        "mibi-node", "train", "--analysis", "thyroid", "--data", str(out), "--out", "B"
    ]  # fmt: skip
    with (out / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [list(row) for row in rows[:1]] == [["folder", "findings"]]
    inputs, targets = load_thyroid_arrays(Path("config/thyroid-demo.toml"), out)
    assert inputs.shape[0] == 3
    for row, target in zip(rows, targets, strict=True):
        [path] = sorted((out / row["folder"]).iterdir())
        true = pixels[_pixels_key(pydicom.dcmread(path))]
        assert tuple(row["findings"].split(";")) == true
        assert {FINDINGS[i] for i in np.flatnonzero(target)} == set(true)
