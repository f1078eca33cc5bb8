"""The assessment SR (issue 19, IHE AIRA): the readers' verdicts on an AI SR's findings go
back to PACS as an SR that references the AI SR and its findings.

The AI SRs are the node's own (parathyroid and thyroid builders over phantom NM studies);
the documents are checked with dciodvfy and dsrdump and read back with highdicom; the
end-to-end test records verdicts through the CLI and the REST API of a node database and
sends the documents to a real DCMTK storescp with the node's dispatch.
"""

from __future__ import annotations

import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest
from fastapi.testclient import TestClient
from pydicom.dataset import Dataset
from sqlalchemy import select
from typer.testing import CliRunner

from cases import make_case
from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.report import build_thyroid_sr
from mibi_node.analyses.thyroid.result import FINDINGS, ThyroidResult
from mibi_node.cli import app
from mibi_node.config import load_config
from mibi_node.dispatch.deliveries import deliver
from mibi_node.report import build_sr
from mibi_node.report import codes as report_codes
from mibi_node.report.assessment import FindingAssessment, build_assessment_sr
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    StudyState,
    Verdict,
)
from mibi_node.web import create_app
from test_dispatch_scu import received, storescp  # noqa: F401 - a fixture

DEVICE_UID = "1.2.826.0.1.3680043.8.498.1"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
WHEN = datetime(2026, 11, 3, 9, 30, 0, tzinfo=UTC)


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dciodvfy(tool: str, path: Path) -> None:
    """No errors; the only warnings those about the node's own coding scheme and DICOMDIR."""
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (run.stdout + run.stderr).splitlines() if line.strip()]
    assert not [line for line in lines if line.startswith("Error")], "\n".join(lines)
    for line in lines:
        if line.startswith("Warning"):
            assert "99MIBINODE" in line or "DICOMDIR" in line, "\n".join(lines)


def _dsrdump(tool: str, path: Path) -> str:
    run = subprocess.run(
        [tool, "+Pc", "+Pl", "+Pu", str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def _groups(ds: Dataset) -> list[Any]:
    """The TID 1501 measurement groups of an SR, parsed by highdicom."""
    return list(hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_image_measurement_groups())


def _evaluation(group: Any, code: Any) -> Any:
    [found] = [e for e in group.get_qualitative_evaluations() if e.name == code]
    return found.value


def _texts(group: Any) -> dict[str, str]:
    return {
        item.ConceptNameCodeSequence[0].CodeMeaning: item.TextValue
        for item in group[0].ContentSequence
        if item.ValueType == "TEXT" and item.RelationshipType == "CONTAINS"
    }


@pytest.fixture(scope="module")
def parathyroid() -> tuple[Dataset, list[Dataset]]:
    """An AI SR of the parathyroid builder (adenoma) and its study's NM headers."""
    result, sources = make_case("adenoma", seed=3, AccessionNumber="A123")
    return build_sr(result, sources, device_uid=DEVICE_UID), sources


# -- the document ----------------------------------------------------------------------------


@pytest.mark.peers
def test_corrected_then_accepted_pass_dciodvfy_and_dsrdump(
    parathyroid, tmp_path: Path, require_tool
) -> None:
    dciodvfy, dsrdump = require_tool("dciodvfy"), require_tool("dsrdump")
    ai_sr, _ = parathyroid
    corrected = FindingAssessment(
        "diagnosis",
        "adenoma",
        "corrected",
        "Jürgen Ärzte",
        corrected="hyperplasia",
        comment="uptake in both lower glands",
        assessed_at=WHEN,
    )
    first = build_assessment_sr(ai_sr, [corrected])
    path = _save(first, tmp_path / "first.dcm")
    _dciodvfy(dciodvfy, path)
    dump = _dsrdump(dsrdump, path)
    for text in (
        '"AI finding corrected"',
        '"Corrected value")=(76197007,SCT,"hyperplasia")',
        '"Jürgen Ärzte^"',
        '"uptake in both lower glands"',
        '(C54634,NCIt,"Reviewer")',
        "MIBI-NODE AI ASSESSMENT (#9910)",
    ):
        assert text in dump, dump

    accepted = FindingAssessment("diagnosis", "adenoma", "accepted", "Rossi^Anna")
    second = build_assessment_sr(
        ai_sr,
        [accepted],
        instance_number=2,
        series_instance_uid=first.SeriesInstanceUID,
        predecessor=first,
    )
    path = _save(second, tmp_path / "second.dcm")
    _dciodvfy(dciodvfy, path)
    dump = _dsrdump(dsrdump, path)
    assert '"AI finding accepted"' in dump and "Predecessor Docs    : 1" in dump
    assert f"supersedes the earlier mibi-node report {first.SOPInstanceUID}" in dump


def test_assessment_references_the_ai_sr_and_its_finding(parathyroid, tmp_path: Path) -> None:
    ai_sr, sources = parathyroid
    [ai_group] = [
        g for g in _groups(ai_sr) if g.tracking_identifier == "mibi-node adenoma probability"
    ]
    verdict = FindingAssessment(
        "diagnosis",
        "adenoma",
        "corrected",
        "Dr Rossi",
        corrected="hyperplasia",
        comment="two glands",
        assessed_at=WHEN,
    )
    sr = hd.sr.srread(_save(build_assessment_sr(ai_sr, [verdict]), tmp_path / "a.dcm"))

    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR
    assert sr.StudyInstanceUID == ai_sr.StudyInstanceUID
    assert sr.SeriesInstanceUID not in {
        ai_sr.SeriesInstanceUID,
        *(s.SeriesInstanceUID for s in sources),
    }
    assert (sr.SeriesNumber, sr.InstanceNumber) == (9910, 1)
    assert (sr.PatientID, sr.AccessionNumber) == ("PHANTOM-0001", "A123")
    # The AI SR is the evidence: Current Requested Procedure Evidence, nothing else.
    assert sr.get_evidence() == [
        (ai_sr.StudyInstanceUID, ai_sr.SeriesInstanceUID, ai_sr.SOPInstanceUID, COMPREHENSIVE_3D_SR)
    ]
    assert "PredecessorDocumentsSequence" not in sr
    assert sr.ConceptNameCodeSequence[0].CodeValue == "MNA001"
    [observer] = sr.content.get_observer_contexts()
    assert observer.observer_type == hd.sr.CodedConcept("121006", "DCM", "Person")
    assert str(observer.observer_identifying_attributes.name) == "Dr Rossi^"
    [procedure] = [
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121058"  # Procedure reported
    ]
    assert procedure.CodeValue == report_codes.PROCEDURE_REPORTED.value

    [group] = _groups(sr)
    # The same finding as the AI SR's: its tracking identifier, UID and finding code.
    assert group.tracking_uid == ai_group.tracking_uid
    assert group.tracking_identifier == "mibi-node adenoma probability"
    assert group.finding_type == report_codes.CLASS_CODES["adenoma"]
    assert (
        _evaluation(group, report_codes.ASSESSMENT)
        == report_codes.ASSESSMENT_DECISIONS["corrected"]
    )
    assert (
        _evaluation(group, report_codes.CORRECTED_VALUE) == report_codes.CLASS_CODES["hyperplasia"]
    )
    assert _texts(group) == {"AI value": "adenoma", "Comment": "two glands"}
    assert group[0].ObservationDateTime == "20261103093000+0000"


def test_thyroid_findings_are_matched_by_their_keys(tmp_path: Path) -> None:
    generate_thyroid_studies(tmp_path, 1, 31, matrix=64)
    study = read_thyroid_study([tmp_path / "study-0001"])
    probabilities = {
        "normal": 0.02,
        "graves": 0.05,
        "toxic_multinodular_goitre": 0.11,
        "toxic_adenoma": 0.91,
        "cold_nodule": 0.64,
        "thyroiditis": 0.01,
    }
    result = ThyroidResult(
        study_instance_uid=study.study_instance_uid,
        probabilities=probabilities,
        findings=("toxic_adenoma", "cold_nodule"),
        thresholds=dict.fromkeys(FINDINGS, 0.5),
        lobe_uptake={"right": 0.62, "left": 0.38},
        nodules=(),
        source_image=study.images["thyroid"],
        bundle_name="thyroid-test",
        bundle_version="0.0.1",
    )
    sources = [pydicom.dcmread(p) for p in sorted((tmp_path / "study-0001").glob("*.dcm"))]
    ai_sr = build_thyroid_sr(result, sources, device_uid=DEVICE_UID, series_number=9911)
    ai_groups = {g.tracking_identifier: g for g in _groups(ai_sr)}
    verdicts = [
        FindingAssessment("cold_nodule", "present", "rejected", "Dr Rossi"),
        FindingAssessment("graves", "absent", "corrected", "Dr Bianchi", corrected="present"),
    ]
    sr = build_assessment_sr(ai_sr, verdicts, series_number=9920)
    cold, graves = _groups(sr)
    expected = ai_groups["mibi-node thyroid cold_nodule probability"]
    assert (cold.tracking_uid, cold.finding_type) == (expected.tracking_uid, expected.finding_type)
    assert _evaluation(cold, report_codes.ASSESSMENT).value == "MNA004"
    assert graves.tracking_uid == ai_groups["mibi-node thyroid graves probability"].tracking_uid
    # "present" is no coded concept of the AI SR: the correction is text.
    assert _texts(graves) == {"AI value": "absent", "Corrected value": "present"}
    observers = hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_observer_contexts()
    readers = [str(o.observer_identifying_attributes.name) for o in observers]
    assert readers == ["Dr Rossi^", "Dr Bianchi^"]


@pytest.mark.parametrize(
    ("verdicts", "problem"),
    [
        ([], "at least one verdict"),
        ([FindingAssessment("diagnosis", "adenoma", "corrected", "R")], "corrected value"),
        (
            [FindingAssessment("diagnosis", "adenoma", "accepted", "R", corrected="cyst")],
            "corrected value",
        ),
        ([FindingAssessment("diagnosis", "adenoma", "maybe", "R")], "decision 'maybe'"),
        ([FindingAssessment("diagnosis", "adenoma", "accepted", " ")], "has no reader"),
        ([FindingAssessment("diagnosis", "adenoma", "accepted", "R")] * 2, "twice"),
    ],
)
def test_bad_verdicts_are_refused_by_name(parathyroid, verdicts, problem: str) -> None:
    ai_sr, _ = parathyroid
    with pytest.raises(ValueError, match=problem):
        build_assessment_sr(ai_sr, verdicts)


def test_an_image_is_no_ai_sr(parathyroid) -> None:
    _, sources = parathyroid
    verdict = FindingAssessment("diagnosis", "adenoma", "accepted", "R")
    with pytest.raises(ValueError, match='"ai_sr" is not a Structured Report'):
        build_assessment_sr(sources[0], [verdict])
    with pytest.raises(TypeError, match='"ai_sr" should be a pydicom Dataset'):
        build_assessment_sr("sr.dcm", [verdict])  # type: ignore[arg-type]


# -- sent back to PACS -----------------------------------------------------------------------

TOKEN = "s3cret"


def _node(tmp_path: Path, destination: Any, *, send: bool = True) -> dict[str, Any]:
    """A node database with one DONE parathyroid job whose AI SR went to ``destination``."""
    data_dir = tmp_path / "var"
    data_dir.mkdir(parents=True)
    config_path = tmp_path / "mibi-node.toml"
    config_path.write_text(
        f'[node]\ndata_dir = "{data_dir}"\n[web]\ntoken = "{TOKEN}"\n'
        f"[validation]\nsend_assessment = {str(send).lower()}\n[dispatch]\ntimeout = 10\n"
    )
    config = load_config(config_path)
    database = open_database(config.database_url)
    result, sources = make_case("adenoma", seed=5)
    ai_sr = build_sr(result, sources, device_uid=DEVICE_UID)
    results = FileStore(config.results_dir)
    relative = results.relative_path(result.study_instance_uid, ai_sr.SOPInstanceUID)
    results.absolute(relative).parent.mkdir(parents=True)
    _save(ai_sr, results.absolute(relative))
    with database.session() as session, session.begin():
        study = Study(study_instance_uid=result.study_instance_uid, state=StudyState.DONE)
        session.add(study)
        session.flush()
        job = Job(
            study_id=study.id,
            analysis="parathyroid",
            state=JobState.DONE,
            result=result.to_dict(),
            sr_path=relative,
            sr_sop_instance_uid=ai_sr.SOPInstanceUID,
            sr_series_instance_uid=ai_sr.SeriesInstanceUID,
        )
        session.add(job)
        session.flush()
        session.add(
            Delivery(
                job_id=job.id,
                label=destination.label,
                state=DeliveryState.DONE,
                destination={**destination.model_dump(mode="json"), "files": [relative]},
            )
        )
        job_id = job.id
    return {
        "config_path": config_path,
        "config": config,
        "database": database,
        "ai_sr": ai_sr,
        "job": job_id,
        "results": results,
    }


def _deliver(node: dict[str, Any]) -> list[DeliveryState]:
    config = node["config"]
    outcomes = deliver(
        node["database"],
        config.results_dir,
        config.dispatch,
        calling_ae_title=config.calling_ae_title,
        owner="test",
    )
    return [outcome.state for outcome in outcomes]


def _referenced(ds: Dataset) -> list[str]:
    return [
        item.ReferencedSOPInstanceUID
        for series in ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    ]


@pytest.mark.peers
def test_verdicts_from_the_cli_and_the_api_reach_pacs(
    storescp,  # noqa: F811 - the fixture imported above
    tmp_path: Path,
    require_tool,
) -> None:
    dciodvfy = require_tool("dciodvfy")
    destination, folder = storescp()
    node = _node(tmp_path, destination)
    database: Database = node["database"]
    job, ai_sr = node["job"], node["ai_sr"]
    ai_group = next(
        g for g in _groups(ai_sr) if g.finding_type == report_codes.CLASS_CODES["adenoma"]
    )

    ran = CliRunner().invoke(
        app,
        [
            "verdict",
            str(job),
            "diagnosis",
            "corrected",
            "--value",
            "hyperplasia",
            "--reader",
            "Dr Rossi",
            "--config",
            str(node["config_path"]),
        ],
    )
    assert ran.exit_code == 0, ran.output
    assert f"assessment SR 1 of job #{job} (1 finding(s)) queued for 1 destination(s)" in ran.output
    assert _deliver(node) == [DeliveryState.DONE]
    [(uid, path)] = received(folder).items()
    _dciodvfy(dciodvfy, path)
    first = pydicom.dcmread(path)
    assert first.SOPClassUID == COMPREHENSIVE_3D_SR
    assert (first.StudyInstanceUID, first.SeriesNumber, first.InstanceNumber) == (
        ai_sr.StudyInstanceUID,
        9910,
        1,
    )
    assert _referenced(first) == [ai_sr.SOPInstanceUID]
    [group] = _groups(first)
    assert group.tracking_uid == ai_group.tracking_uid
    assert (
        _evaluation(group, report_codes.ASSESSMENT)
        == report_codes.ASSESSMENT_DECISIONS["corrected"]
    )

    # The reader changes their mind on the status page's REST API: a second document
    # supersedes the first in the same series.
    client = TestClient(
        create_app(node["config"], database, lambda: True), base_url="http://127.0.0.1:8080"
    )
    body = {"finding": "diagnosis", "decision": "accepted", "reader": "Dr Rossi"}
    answer = client.post(
        f"/api/jobs/{job}/verdicts", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 201, answer.text
    assessment = answer.json()["assessment"]
    assert (assessment["instance_number"], assessment["findings"]) == (2, 1)
    assert len(assessment["deliveries"]) == 1
    assert _deliver(node) == [DeliveryState.DONE]
    files = received(folder)
    [second_uid] = set(files) - {uid}
    second = pydicom.dcmread(files[second_uid])
    _dciodvfy(dciodvfy, files[second_uid])
    assert (second.SeriesInstanceUID, second.InstanceNumber) == (first.SeriesInstanceUID, 2)
    assert (
        second.PredecessorDocumentsSequence[0]
        .ReferencedSeriesSequence[0]
        .ReferencedSOPSequence[0]
        .ReferencedSOPInstanceUID
        == first.SOPInstanceUID
    )
    assert _referenced(second) == [ai_sr.SOPInstanceUID]
    [group] = _groups(second)
    assert (
        _evaluation(group, report_codes.ASSESSMENT) == report_codes.ASSESSMENT_DECISIONS["accepted"]
    )

    with database.session() as session:
        events = session.scalars(select(AuditEvent).where(AuditEvent.kind == "assessment")).all()
        assert [(e.outcome, e.detail["instance"]) for e in events] == [("queued", 1), ("queued", 2)]
        assert events[0].actor.startswith("Dr Rossi (cli:") and events[1].actor == "Dr Rossi (web)"
        rows = session.scalars(select(Delivery).order_by(Delivery.id)).all()
        assert [r.state for r in rows] == [DeliveryState.DONE] * 3
    # One assessment file per job, replaced on disk: the result's SR and the latest one.
    stored = sorted(p for p in node["results"].root.rglob("*.dcm") if ".incoming" not in p.parts)
    assert len(stored) == 2
    assert {pydicom.dcmread(p).SOPInstanceUID for p in stored} == {ai_sr.SOPInstanceUID, second_uid}
    database.dispose()


def test_off_by_default_and_a_missing_ai_sr_is_named(tmp_path: Path) -> None:
    from mibi_node.dispatch import Destination

    destination = Destination(ae_title="PACS", host="127.0.0.1", port=11112)
    node = _node(tmp_path / "off", destination, send=False)
    client = TestClient(
        create_app(node["config"], node["database"], lambda: True), base_url="http://127.0.0.1:8080"
    )
    body = {"finding": "diagnosis", "decision": "accepted", "reader": "Dr Rossi"}
    answer = client.post(
        f"/api/jobs/{node['job']}/verdicts", json=body, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert answer.status_code == 201 and "assessment" not in answer.json()
    with node["database"].session() as session:
        assert len(session.scalars(select(Delivery)).all()) == 1
    node["database"].dispose()

    node = _node(tmp_path / "on", destination)
    with node["database"].session() as session:
        relative = session.get_one(Job, node["job"]).sr_path
    node["results"].absolute(relative).unlink()
    ran = CliRunner().invoke(
        app,
        [
            "verdict",
            str(node["job"]),
            "diagnosis",
            "accepted",
            "--reader",
            "Dr Rossi",
            "--config",
            str(node["config_path"]),
        ],
    )
    assert ran.exit_code == 1, ran.output
    assert "verdict is recorded, but no assessment SR is sent" in ran.output
    output = " ".join(ran.output.split())
    assert "the AI SR of job #1 cannot be read: No such file or directory" in output
    assert "Traceback" not in ran.output
    with node["database"].session() as session:
        [verdict] = session.scalars(select(Verdict)).all()
        assert verdict.decision.value == "accepted"
        assert len(session.scalars(select(Delivery)).all()) == 1
    node["database"].dispose()
