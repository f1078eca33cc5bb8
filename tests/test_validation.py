"""Local validation (issue 19): findings of each analysis, verdicts, final diagnoses and the
performance figures, against a fresh SQLite database filled through the storage layer.

Studies are real NM files stored by the instance store (their headers carry the camera and
the accession number); jobs are rows with results made by each analysis' own result class.
The figures are checked against scikit-learn on the same cases.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydicom.uid import generate_uid
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sqlalchemy import select
from typer.testing import CliRunner

from factory import nm_dataset, write
from mibi_node.analyses.registry import get_analysis
from mibi_node.analyses.spine.levels import CLASSES as SPINE_CLASSES
from mibi_node.analyses.spine.levels import LEVEL_KIND, LEVELS
from mibi_node.analyses.spine.result import SliceRef, SpinePoint, SpineResult
from mibi_node.analyses.thyroid.result import ThyroidResult
from mibi_node.cli import app
from mibi_node.config import Config
from mibi_node.imaging.study import PhaseImage
from mibi_node.inference.result import StudyResult
from mibi_node.reception.validation import read_instance_meta
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import AuditEvent, Job, JobState, Study, Truth, Verdict
from mibi_node.validation.headers import study_headers
from mibi_node.validation.performance import calibration, cases, performance
from mibi_node.validation.truth import TruthImportError, import_truth
from mibi_node.validation.verdicts import record_verdict, standing_verdicts
from mibi_node.web import create_app
from test_knee_report import _labels, _series
from test_knee_report import _result as _knee_result

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")


def _image(name: str = "early") -> PhaseImage:
    return PhaseImage(
        name=name,
        pixels=np.zeros((4, 4), dtype=np.float32),
        pixel_spacing=None,
        sop_instance_uid=generate_uid(),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.20",
        series_instance_uid=generate_uid(),
    )


def _parathyroid(uid: str, probabilities: tuple[float, ...], version: str = "1.0") -> StudyResult:
    probs = dict(zip(CLASSES, probabilities, strict=True))
    return StudyResult(
        study_instance_uid=uid,
        probabilities=probs,
        predicted=max(probs, key=probs.__getitem__),
        member_probabilities={"resnet10t": probs},
        agreement=1.0,
        normalised_entropy=0.3,
        focus=None,
        source_images={"early": _image()},
        timings={},
        bundle_name="parathyroid-test",
        bundle_version=version,
    )


def _thyroid(uid: str = "1.2.3") -> ThyroidResult:
    probabilities = {"normal": 0.05, "graves": 0.1, "toxic_multinodular_goitre": 0.2,
                     "toxic_adenoma": 0.8, "cold_nodule": 0.6, "thyroiditis": 0.02}  # fmt: skip
    return ThyroidResult(
        study_instance_uid=uid,
        probabilities=probabilities,
        findings=("toxic_adenoma", "cold_nodule"),
        thresholds=dict.fromkeys(probabilities, 0.5),
        lobe_uptake={"right": 0.6, "left": 0.4},
        nodules=(),
        source_image=_image("thyroid"),
        bundle_name="thyroid-test",
        bundle_version="0.0.1",
    )


def _spine() -> SpineResult:
    ref = SliceRef(generate_uid(), "1.2.840.10008.5.1.4.1.1.4", generate_uid(), 7)
    points = []
    for index, level in enumerate(LEVELS[:3]):
        names = SPINE_CLASSES[LEVEL_KIND[level]]
        label = names[-1] if index == 1 else "normal"
        probabilities = {name: (0.7 if name == label else 0.3 / (len(names) - 1)) for name in names}
        points.append(SpinePoint(level, 10.0 * index, 5.0, label, probabilities))
    return SpineResult(
        study_instance_uid="1.2.3",
        points=tuple(points),
        pixel_spacing=(0.5, 0.5),
        middle=ref,
        neighbours=(),
        bundle_name="spine-test",
        bundle_version="0.0.1",
    )


# -- findings --------------------------------------------------------------------------------


def test_parathyroid_has_one_finding_its_class_among_the_five() -> None:
    result = _parathyroid("1.2.3", (0.05, 0.81, 0.08, 0.03, 0.03)).to_dict()
    [finding] = get_analysis("parathyroid").findings(result)
    assert (finding.key, finding.value, finding.choices) == ("diagnosis", "adenoma", CLASSES)
    assert finding.probability == pytest.approx(0.81)


def test_thyroid_has_one_present_or_absent_finding_per_class() -> None:
    findings = {f.key: f for f in get_analysis("thyroid").findings(_thyroid().to_dict())}
    assert set(findings) == set(get_analysis("thyroid").diagnoses)
    assert findings["toxic_adenoma"].value == "present"
    assert findings["toxic_adenoma"].probability == pytest.approx(0.8)
    assert findings["graves"].value == "absent"
    assert findings["graves"].probability == pytest.approx(0.9)
    assert findings["cold_nodule"].choices == ("present", "absent")


def test_spine_has_one_finding_per_level_with_its_kinds_classes() -> None:
    findings = get_analysis("spine").findings(_spine().to_dict())
    assert [f.key for f in findings] == list(LEVELS[:3])
    disc = findings[1]
    assert disc.type == LEVEL_KIND[LEVELS[1]]
    assert disc.value == SPINE_CLASSES[disc.type][-1]
    assert disc.choices == SPINE_CLASSES[disc.type] and disc.probability == pytest.approx(0.7)


def test_knee_has_one_finding_per_plate_found() -> None:
    volume, _ = _series()
    result = _knee_result(volume, _labels(absent=("patellar_cartilage",))).to_dict()
    findings = get_analysis("knee").findings(result)
    assert [f.key for f in findings] == [
        "femoral_cartilage", "medial_tibial_cartilage", "lateral_tibial_cartilage"
    ]  # fmt: skip
    assert {f.value for f in findings} == {"segmented"} and findings[0].choices == ()


def test_lung_has_one_finding_per_lesion_with_no_lesion_as_a_correction() -> None:
    result = {
        "predicted": "1 ground-glass opacity, 1 bronchiectasis",
        "lesions": [
            {"number": 1, "class": "bronchiectasis", "probability": 0.91},
            {"number": 2, "class": "ground_glass_opacity", "probability": 0.4},
        ],
    }
    findings = get_analysis("lung").findings(result)
    assert [(f.key, f.value, f.type) for f in findings] == [
        ("lesion-1", "bronchiectasis", "lesion"),
        ("lesion-2", "ground_glass_opacity", "lesion"),
    ]
    assert findings[0].choices == ("ground_glass_opacity", "bronchiectasis", "no_lesion")
    assert findings[1].probability == pytest.approx(0.4)
    assert get_analysis("lung").findings({"predicted": "no lesion found", "lesions": []}) == ()


def test_an_analysis_without_its_own_findings_has_its_predicted_one() -> None:
    from mibi_node.analyses.base import Analysis

    class Wrist(Analysis):
        name = "wrist"
        title = "Wrist X-ray"

        def read(self, paths, runner):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def load(self, bundle, device):  # type: ignore[no-untyped-def]
            raise NotImplementedError

        def source_uids(self, result):  # type: ignore[no-untyped-def]
            return set()

        def encode(self, result, sources, context):  # type: ignore[no-untyped-def]
            return []

        def panel(self, result):  # type: ignore[no-untyped-def]
            raise NotImplementedError

    [finding] = Wrist().findings({"predicted": "fracture"})
    assert (finding.key, finding.value, finding.label) == ("predicted", "fracture", "Wrist X-ray")


# -- a node's database -----------------------------------------------------------------------


def _store_study(
    store: InstanceStore, folder: Path, station: str, ae: str, *, on_row: bool = False
) -> tuple[str, str]:
    """Store one NM instance of a new study; returns its (Study Instance UID, accession).

    ``on_row``: the meta as reception reads it (camera and accession on the study row);
    else as before revision 0005, so they are read back from the stored header.
    """
    ds = nm_dataset(frames=1, rows=16, columns=16)
    accession = f"ACC{ds.StudyInstanceUID[-6:]}"
    ds.AccessionNumber = accession
    ds.StationName, ds.ManufacturerModelName, ds.DeviceSerialNumber = station, "Symbia", "42"
    source = write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    incoming = store.files.incoming / f"{ds.SOPInstanceUID}.part"
    shutil.copyfile(source, incoming)
    if on_row:
        meta = read_instance_meta(incoming, ds.SOPClassUID, ds.SOPInstanceUID)
    else:
        meta = InstanceMeta(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            modality="NM",
        )
    store.store(incoming, meta, ae)
    return str(ds.StudyInstanceUID), accession


def _add_job(database: Database, uid: str, analysis: str, result: dict[str, Any]) -> int:
    with database.session() as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = Job(study_id=study.id, analysis=analysis, state=JobState.DONE, result=result)
        session.add(job)
        session.flush()
        return job.id


#: (probabilities, final diagnosis or None, station); a fixed mix of right and wrong.
CASES = [
    ((0.05, 0.81, 0.08, 0.03, 0.03), "adenoma", "CAM1"),
    ((0.60, 0.20, 0.10, 0.05, 0.05), "normal", "CAM1"),
    ((0.10, 0.55, 0.30, 0.03, 0.02), "hyperplasia", "CAM1"),
    ((0.20, 0.30, 0.40, 0.05, 0.05), "hyperplasia", "CAM2"),
    ((0.70, 0.10, 0.10, 0.05, 0.05), "adenoma", "CAM2"),
    ((0.10, 0.10, 0.10, 0.60, 0.10), "carcinoma", "CAM2"),
    ((0.05, 0.05, 0.05, 0.05, 0.80), "cyst", "CAM1"),
    ((0.30, 0.50, 0.10, 0.05, 0.05), "adenoma", "CAM2"),
    ((0.40, 0.35, 0.15, 0.05, 0.05), None, "CAM1"),  # judged by a reader only
]


@pytest.fixture
def node(data_dir: Path, tmp_path: Path) -> dict[str, Any]:
    config = Config.model_validate(
        {"node": {"data_dir": str(data_dir), "host": "127.0.0.1"}, "web": {"port": 0}}
    )
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    studies = []
    for index, (probabilities, truth, station) in enumerate(CASES):
        # Half recorded as reception does now, half as before revision 0005.
        uid, accession = _store_study(
            store, tmp_path / "in", station, "GAMMA1", on_row=bool(index % 2)
        )
        job = _add_job(database, uid, "parathyroid", _parathyroid(uid, probabilities).to_dict())
        studies.append({"uid": uid, "accession": accession, "job": job, "truth": truth})
    spine_uid, _ = _store_study(store, tmp_path / "in", "MR1", "MRI")
    spine_job = _add_job(database, spine_uid, "spine", _spine().to_dict())
    yield {"config": config, "database": database, "files": files, "studies": studies,
           "spine_job": spine_job, "store": store}  # fmt: skip
    database.dispose()


def _client(config: Config, database: Database) -> TestClient:
    app = create_app(config, database, lambda: True)
    return TestClient(app, base_url="http://127.0.0.1:8080", follow_redirects=False)


def _audit(database: Database, kind: str) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))


def _truth_csv(studies: list[dict[str, Any]]) -> str:
    lines = ["study_instance_uid,accession_number,analysis,diagnosis,date,source"]
    for index, study in enumerate(studies):
        if study["truth"] is None:
            continue
        # Half by UID, half by accession number.
        key = f"{study['uid']}," if index % 2 else f",{study['accession']}"
        lines.append(f"{key},parathyroid,{study['truth']},2026-11-{index + 1:02d},histology")
    return "\n".join(lines) + "\n"


# -- verdicts ---------------------------------------------------------------------------------


def test_verdicts_through_the_cli_land_in_the_database_and_the_audit(node, data_dir) -> None:
    runner = CliRunner()
    job = node["studies"][1]["job"]
    base = ["--data-dir", str(data_dir)]
    ok = runner.invoke(app, ["verdict", str(job), "diagnosis", "corrected", "--value",
                             "adenoma", "--reader", "Dr Rossi", *base])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    assert "corrected -> adenoma" in ok.output
    for arguments, reason in (
        (["diagnosis", "corrected", "--value", "tumour"], "should be one of normal, adenoma"),
        (["diagnosis", "corrected"], 'Argument "value" should give the right value'),
        (["diagnosis", "accepted", "--value", "cyst"], "only for a corrected finding"),
        (["diagnosis", "corrected", "--value", "normal"], "what the model said"),
        (["L4", "accepted"], "has no finding 'L4'; its findings: diagnosis"),
        (["diagnosis", "maybe"], 'Argument "decision" should be one of accepted'),
    ):
        bad = runner.invoke(app, ["verdict", str(job), *arguments, "--reader", "Dr Rossi", *base])
        assert bad.exit_code == 2, bad.output
        assert reason in bad.output.replace("\n", " "), bad.output
        assert "Traceback" not in bad.output
    missing = runner.invoke(
        app, ["verdict", "999", "diagnosis", "accepted", "--reader", "x", *base]
    )
    assert missing.exit_code == 2 and "there is no job #999" in missing.output
    with node["database"].session() as session:
        [row] = session.scalars(select(Verdict)).all()
    assert (row.job_id, row.finding, row.decision.value, row.value, row.reader) == (
        job, "diagnosis", "corrected", "adenoma", "Dr Rossi"
    )  # fmt: skip
    [event] = _audit(node["database"], "verdict")
    assert event.outcome == "corrected" and event.actor.startswith("Dr Rossi (cli:")
    assert event.detail["finding"] == "diagnosis" and event.detail["value"] == "adenoma"


def test_verdicts_through_rest_need_the_token_and_are_checked(node) -> None:
    settings = node["config"].model_dump(mode="json")
    settings["web"]["token"] = "s3cret"
    client = _client(Config.model_validate(settings), node["database"])
    job, spine = node["studies"][0]["job"], node["spine_job"]
    body = {"finding": "diagnosis", "decision": "accepted", "reader": "Dr Weber"}
    assert client.post(f"/api/jobs/{job}/verdicts", json=body).status_code == 401
    headers = {"Authorization": "Bearer s3cret"}
    answer = client.post(f"/api/jobs/{job}/verdicts", json=body, headers=headers)
    assert answer.status_code == 201, answer.text
    assert answer.json()["decision"] == "accepted"
    level = LEVELS[1]
    corrected = {"finding": level, "decision": "corrected", "value": "normal", "reader": "Dr W"}
    answer = client.post(f"/api/jobs/{spine}/verdicts", json=corrected, headers=headers)
    assert answer.status_code == 201, answer.text
    bad = {**corrected, "value": "degenerated" if LEVEL_KIND[level] == "disc" else "bulge"}
    refused = client.post(f"/api/jobs/{spine}/verdicts", json=bad, headers=headers)
    assert refused.status_code == 422 and "should be one of" in refused.json()["error"]
    assert client.post("/api/jobs/999/verdicts", json=body, headers=headers).status_code == 404
    with node["database"].session() as session:
        rows = session.scalars(select(Verdict).order_by(Verdict.id)).all()
        assert [(r.job_id, r.decision.value) for r in rows] == [
            (job, "accepted"), (spine, "corrected")
        ]  # fmt: skip
    assert [e.actor for e in _audit(node["database"], "verdict")] == [
        "Dr Weber (web)", "Dr W (web)"
    ]  # fmt: skip


# -- final diagnoses --------------------------------------------------------------------------


def test_a_truth_file_with_a_bad_line_imports_nothing_and_names_each_line(node) -> None:
    studies = node["studies"]
    good = _truth_csv(studies)
    bad = good + (
        "1.2.3.999,,parathyroid,adenoma,2026-11-20,histology\n"
        f"{studies[0]['uid']},,parathyroid,tumour,2026-11-20,histology\n"
        f"{studies[0]['uid']},,parathyroid,adenoma,20.11.2026,histology\n"
        f"{studies[0]['uid']},,liver,adenoma,2026-11-20,histology\n"
    )
    with pytest.raises(TruthImportError) as caught:
        import_truth(node["database"], node["files"], bad, imported_by="test")
    problems = caught.value.problems
    first = len(good.splitlines()) + 1
    assert problems[0] == f"line {first}: no study with Study Instance UID 1.2.3.999"
    assert problems[1].startswith(f"line {first + 1}: 'tumour' is not a parathyroid diagnosis")
    assert problems[2] == f"line {first + 2}: date '20.11.2026' is not YYYY-MM-DD"
    assert problems[3].startswith(f"line {first + 3}: unknown analysis 'liver'")
    with node["database"].session() as session:
        assert session.scalars(select(Truth)).all() == []
    assert _audit(node["database"], "truth") == []


def test_truth_import_through_the_cli_and_rest(node, data_dir, tmp_path) -> None:
    path = tmp_path / "truth.csv"
    path.write_text(_truth_csv(node["studies"]))
    runner = CliRunner()
    run = runner.invoke(app, ["truth", "import", str(path), "--data-dir", str(data_dir)])
    assert run.exit_code == 0, run.output
    assert "imported 8 final diagnoses" in run.output
    broken = tmp_path / "broken.csv"
    broken.write_text("study_instance_uid,analysis,diagnosis\n1.2,parathyroid,cyst\n")
    run = runner.invoke(app, ["truth", "import", str(broken), "--data-dir", str(data_dir)])
    assert run.exit_code == 2 and "line 1: the header lacks date" in run.output, run.output
    client = _client(node["config"], node["database"])
    study = node["studies"][0]
    rows = [{"study_instance_uid": study["uid"], "analysis": "parathyroid",
             "diagnosis": "hyperplasia", "date": "2026-12-01", "source": "follow-up"}]  # fmt: skip
    answer = client.post("/api/truth", json=rows)
    assert answer.status_code == 201 and answer.json() == {"imported": 1}
    rows[0]["diagnosis"] = "tumour"
    answer = client.post("/api/truth", json={"rows": rows})
    assert answer.status_code == 422 and answer.json()["problems"][0].startswith("line 2:")
    csv_body = "study_instance_uid,analysis,diagnosis,date,source\n" + (
        f"{study['uid']},parathyroid,adenoma,2026-12-02,histology\n"
    )
    answer = client.post("/api/truth", content=csv_body, headers={"content-type": "text/csv"})
    assert answer.status_code == 201, answer.text
    with node["database"].session() as session:
        assert len(session.scalars(select(Truth)).all()) == 10
    assert [e.detail["rows"] for e in _audit(node["database"], "truth")] == [8, 1, 1]


# -- performance ------------------------------------------------------------------------------


def test_performance_equals_scikit_learn_on_the_same_cases(node, data_dir) -> None:
    database, files, studies = node["database"], node["files"], node["studies"]
    import_truth(database, files, _truth_csv(studies), imported_by="test")
    # The study without a final diagnosis counts through its reader's correction.
    record_verdict(database, studies[-1]["job"], "diagnosis", "corrected", value="adenoma",
                   reader="Dr A")  # fmt: skip
    # Verdicts on studies with a final diagnosis: one agrees with it, one does not.
    record_verdict(database, studies[0]["job"], "diagnosis", "accepted", reader="Dr A")
    record_verdict(database, studies[1]["job"], "diagnosis", "rejected", reader="Dr A")
    truth = [s["truth"] or "adenoma" for s in studies]
    scores = np.array([case[0] for case in CASES])
    predicted = [CLASSES[int(i)] for i in scores.argmax(axis=1)]

    groups = performance(database, files, "parathyroid", resamples=50)
    overall = groups[0]
    assert (overall.bundle_version, overall.station, overall.cases) == ("*", "*", len(CASES))
    c = overall.classification
    assert c is not None and c.n == len(CASES)
    assert c.accuracy == pytest.approx(accuracy_score(truth, predicted))
    assert c.macro_f1 == pytest.approx(
        f1_score(truth, predicted, labels=list(CLASSES), average="macro", zero_division=0)
    )
    assert c.kappa == pytest.approx(cohen_kappa_score(truth, predicted, labels=list(CLASSES)))
    ordered = sorted(CLASSES)  # scikit-learn wants the labels sorted, the columns alike
    columns = scores[:, [CLASSES.index(name) for name in ordered]]
    assert c.macro_auc == pytest.approx(
        roc_auc_score(truth, columns, multi_class="ovr", average="macro", labels=ordered)
    )
    assert c.confusion == confusion_matrix(truth, predicted, labels=list(CLASSES)).tolist()
    confidence = scores.max(axis=1)
    hits = np.array(truth) == np.array(predicted)
    ece = sum(
        abs(hits[m].mean() - confidence[m].mean()) * m.sum() / len(hits)
        for m in (np.ceil(confidence * 10) == b for b in range(1, 11))
        if m.any()
    )
    assert c.ece == pytest.approx(ece)
    assert sum(row["count"] for row in c.reliability) == len(CASES)
    low, high = c.intervals["accuracy"]
    assert 0.0 <= low <= c.accuracy <= high <= 1.0
    assert overall.verdicts["diagnosis"]["total"] == 3
    assert overall.verdicts["diagnosis"]["corrected_share"] == pytest.approx(1 / 3)
    # Case 0: accepted adenoma, truth adenoma (agrees); case 1: rejected normal, truth normal.
    assert overall.agreement == {"compared": 2, "agreeing": 1, "share": 0.5}
    # Per camera: read from the stored headers.
    stations = {g.station: g.cases for g in groups[1:]}
    assert stations == {"CAM1 / Symbia / 42": 5, "CAM2 / Symbia / 42": 4}
    assert {g.calling_ae_title for g in groups[1:]} == {"GAMMA1"}

    runner = CliRunner()
    run = runner.invoke(app, ["performance", "--json", "--resamples", "20",
                              "--data-dir", str(data_dir)])  # fmt: skip
    assert run.exit_code == 0, run.output
    printed = json.loads(run.output)
    assert printed[0]["classification"]["accuracy"] == pytest.approx(c.accuracy)
    assert {g["analysis"] for g in printed} == {"parathyroid", "spine"}
    table = runner.invoke(app, ["performance", "--data-dir", str(data_dir)])
    assert table.exit_code == 0 and "parathyroid" in table.output
    wrong = runner.invoke(app, ["performance", "--analysis", "liver", "--data-dir", str(data_dir)])
    assert wrong.exit_code == 2 and "unknown analysis 'liver'" in wrong.output
    client = _client(node["config"], database)
    answer = client.get("/api/performance", params={"analysis": "parathyroid", "resamples": 0})
    assert answer.status_code == 200
    assert answer.json()[0]["classification"]["accuracy"] == pytest.approx(c.accuracy)
    scraped = client.get("/metrics").text
    share = accuracy_score(truth, predicted)
    assert f'mibi_node_local_accuracy{{analysis="parathyroid",bundle_version="1.0"}} {share}' in (
        scraped
    )
    assert 'mibi_node_verdicts{analysis="parathyroid",decision="corrected"} 1.0' in scraped


def test_ece_of_a_perfectly_calibrated_bin_is_zero() -> None:
    ece, table = calibration([0.75, 0.75, 0.75, 0.75], [True, True, True, False])
    assert ece == pytest.approx(0.0)
    assert table == [{"low": 0.7, "high": 0.8, "count": 4, "confidence": 0.75, "accuracy": 0.75}]


# -- the camera on the study row, verdicts across versions ------------------------------------


def test_reception_records_the_camera_and_accession_and_they_outlive_the_files(
    node, tmp_path
) -> None:
    database, files = node["database"], node["files"]
    uid, accession = _store_study(node["store"], tmp_path / "row", "CAM9", "GAMMA1", on_row=True)
    with database.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        row = (study.accession_number, study.station_name, study.manufacturer_model_name,
               study.device_serial_number)  # fmt: skip
        paths = [files.absolute(i.path) for i in study.instances]
    assert row == (accession, "CAM9", "Symbia", "42")
    for path in paths:  # as retention does: the files go, the row stays
        path.unlink()
    [header] = study_headers(database, files, [study.id]).values()
    assert (header.station, header.accession_number) == ("CAM9 / Symbia / 42", accession)


def _next_version(database: Database, job_id: int, result: dict[str, Any]) -> int:
    """A later version of the job's study (a late instance) with its own DONE result."""
    with database.session() as session, session.begin():
        job = session.get(Job, job_id)
        assert job is not None
        later = Job(study_id=job.study_id, analysis=job.analysis, version=job.version + 1,
                    state=JobState.DONE, result=result)  # fmt: skip
        session.add(later)
        session.flush()
        return later.id


def _standing(database: Database, job_id: int) -> dict[str, tuple[str, str | None, int]]:
    with database.session() as session:
        job = session.get(Job, job_id)
        rows = standing_verdicts(session, [job]).get(job_id, {})
        return {key: (row.decision.value, row.value, row.job_id) for key, row in rows.items()}


def test_a_verdict_stands_on_a_later_version_only_while_the_model_says_the_same(node) -> None:
    database = node["database"]
    first = node["studies"][0]  # the model said adenoma
    record_verdict(database, first["job"], "diagnosis", "accepted", reader="Dr Rossi")
    same = _next_version(
        database, first["job"], _parathyroid(first["uid"], CASES[0][0], "1.1").to_dict()
    )
    assert _standing(database, same) == {"diagnosis": ("accepted", None, first["job"])}
    changed = _next_version(
        database, same, _parathyroid(first["uid"], (0.1, 0.2, 0.6, 0.05, 0.05)).to_dict()
    )
    assert _standing(database, changed) == {}  # the model now says hyperplasia: judge anew
    # The performance case is the latest version; with its verdict gone, the final
    # diagnosis is its reference again (none imported here: no reference).
    case = next(c for c in cases(database) if c.job_id == changed)
    assert case.verdicts == {} and case.reference is None
    record_verdict(database, changed, "diagnosis", "corrected", value="adenoma", reader="Dr Bo")
    assert _standing(database, changed)["diagnosis"] == ("corrected", "adenoma", changed)


def test_a_truth_file_that_is_not_csv_is_refused_by_line(node, tmp_path) -> None:
    big = tmp_path / "big.csv"
    header = "study_instance_uid,accession_number,analysis,diagnosis,date,source\n"
    big.write_text(header + "1.2.3,," + "x" * 200_000 + ",adenoma,2026-11-01,histology\n")
    with pytest.raises(TruthImportError) as caught:
        import_truth(node["database"], node["files"], big, imported_by="test")
    assert caught.value.problems[0].startswith("line 2: not CSV: field larger than field limit")
