"""Shadow mode (issue 19): a candidate bundle runs beside the current one, never sent, until
``mibi-node promote`` makes it current.

The queue and the comparison are checked on a fresh SQLite database filled through the
node's own functions (reception's instance store, the routing sweep, the queue); the worker
runs two tiny random-weight bundles in this process; and end to end, ``mibi-node serve``
sends only the current bundle's SRs to a real PACS (DCMTK storescp) until the candidate is
promoted through the CLI.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from sklearn.metrics import accuracy_score, cohen_kappa_score, f1_score
from sqlalchemy import select
from typer.testing import CliRunner

from bundles import TINY_RECIPE, random_bundle
from factory import nm_dataset, write
from mibi_node.assembly.routing import route_stable_studies
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.cli import app
from mibi_node.config import Config
from mibi_node.dispatch.deliveries import resend_study
from mibi_node.inference.bundle import init_random_bundle
from mibi_node.inference.worker import Worker
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job, fail_job, requeue_study
from mibi_node.phantom.generator import make_study
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import (
    AuditEvent,
    Delivery,
    Job,
    JobState,
    Setting,
    Study,
    StudyState,
    Verdict,
    VerdictDecision,
    utcnow,
)
from mibi_node.validation.shadow import bundle_choices, shadow_comparison
from mibi_node.validation.truth import import_truth
from mibi_node.web import create_app
from node import storescu, write_config
from test_pipeline import StoreSCP, _wait

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")
CANDIDATE_RECIPE = TINY_RECIPE.replace('"pipeline-test"', '"pipeline-candidate"').replace(
    'version = "0.0.1"', 'version = "0.0.2"'
)
PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 1}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The current bundle (pipeline-test 0.0.1, seed 1) and the candidate
    (pipeline-candidate 0.0.2, other weights: seed 2)."""
    current = random_bundle(tmp_path_factory.mktemp("current"))
    folder = tmp_path_factory.mktemp("candidate")
    (folder / "recipe.toml").write_text(CANDIDATE_RECIPE)
    init_random_bundle(folder / "recipe.toml", folder / "bundle", seed=2)
    return current, folder / "bundle"


def _config(data_dir: Path, workers: dict[str, Any] | None = None, **parathyroid: Any) -> Config:
    return Config.model_validate(
        {
            "node": {"data_dir": str(data_dir), "host": "127.0.0.1"},
            "storage": {"min_free_mb": 0},
            "web": {"port": 0},
            "workers": workers or {},
            "analyses": {"parathyroid": parathyroid},
        }
    )


def _store(store: InstanceStore, folder: Path, ds: pydicom.Dataset) -> str:
    source = write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
    incoming = store.files.incoming / f"{ds.SOPInstanceUID}.part"
    shutil.copyfile(source, incoming)
    meta = InstanceMeta(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality=str(ds.Modality),
        study_description=str(ds.get("StudyDescription", "")) or None,
    )
    store.store(incoming, meta, "GAMMA1")
    return str(ds.StudyInstanceUID)


def _route(database: Database, config: Config) -> list[int]:
    mark_stable_studies(database, 0)
    return route_stable_studies(
        database,
        FileStore(config.store_dir),
        config.selections(),
        config.analysis_labels(),
        config,
    )


def _jobs(database: Database, uid: str) -> list[Job]:
    with database.session() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        return list(session.scalars(select(Job).where(Job.study_id == study.id).order_by(Job.id)))


def _state(database: Database, uid: str) -> StudyState:
    with database.session() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one().state


def _deliveries(database: Database, job_id: int) -> int:
    with database.session() as session:
        return len(session.scalars(select(Delivery).where(Delivery.job_id == job_id)).all())


def _audit(database: Database, kind: str) -> list[AuditEvent]:
    with database.session() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.kind == kind)))


def _done(bundle: str, predicted: str = "adenoma") -> CompletedJob:
    return CompletedJob(
        result={"predicted": predicted, "probabilities": {predicted: 1.0}},
        timings={"inference": 0.1},
        bundle=bundle,
        sr_path="sr.dcm",
        sr_sop_instance_uid="1.2.3.4",
        sr_series_instance_uid="1.2.3.5",
        files=("sr.dcm",),
        destinations=(PACS,),
    )


# -- the queue ---------------------------------------------------------------------------------


def test_a_shadow_job_runs_beside_each_version_and_never_moves_its_study(tmp_path: Path) -> None:
    config = _config(tmp_path / "var", shadow_bundle=str(tmp_path / "candidate"))
    database = open_database(config.database_url)
    store = InstanceStore(database, FileStore(config.store_dir))
    first = _store(store, tmp_path, make_study("adenoma", seed=3, index=0).datasets[0])
    second = _store(store, tmp_path, make_study("cyst", seed=3, index=1).datasets[0])
    _route(database, config)
    for uid in (first, second):
        jobs = _jobs(database, uid)
        assert [(j.version, j.shadow, j.state) for j in jobs] == [
            (1, False, JobState.QUEUED),
            (1, True, JobState.QUEUED),
        ]
    claimed = {
        (job.study_instance_uid, job.shadow): job for job in claim_jobs(database, "w", 60, 4)
    }
    assert len(claimed) == 4
    assert claimed[(first, True)].predecessor_sr_path is None
    # A shadow result is recorded but never sent, and leaves its study RUNNING.
    shadow = claimed[(first, True)]
    assert complete_job(database, "w", shadow.id, _done("candidate 0.0.2")) == []
    assert _state(database, first) is StudyState.RUNNING
    current = claimed[(first, False)]
    assert len(complete_job(database, "w", current.id, _done("current 0.0.1"))) == 1
    assert _state(database, first) is StudyState.DONE
    assert _deliveries(database, shadow.id) == 0 and _deliveries(database, current.id) == 1
    [event] = _audit(database, "shadow")
    assert event.outcome == "done" and event.detail["bundle"] == "candidate 0.0.2"
    # The study is DONE while its shadow job still runs; that job failing changes nothing.
    complete_job(database, "w", claimed[(second, False)].id, _done("current 0.0.1"))
    assert _state(database, second) is StudyState.DONE
    fail_job(database, "w", claimed[(second, True)].id, "boom", retry=False, max_attempts=3)
    assert _state(database, second) is StudyState.DONE
    assert [e.outcome for e in _audit(database, "shadow")] == ["done", "failed"]
    assert {e.detail["job"] for e in _audit(database, "result")} == {
        current.id,
        claimed[(second, False)].id,
    }
    # Resending sends the current result, never the shadow one of the same version.
    resend_study(database, first, ())
    with database.session() as session:
        assert {d.job_id for d in session.scalars(select(Delivery))} == {
            current.id,
            claimed[(second, False)].id,
        }
    # A requeue opens version 2 with its shadow job; the failed shadow of version 1 stays.
    requeue_study(database, second, config=config)
    jobs = _jobs(database, second)
    assert [(j.version, j.shadow, j.state) for j in jobs] == [
        (1, False, JobState.DONE),
        (1, True, JobState.FAILED),
        (2, False, JobState.QUEUED),
        (2, True, JobState.QUEUED),
    ]
    # Claiming only the shadow job leaves the study QUEUED (nothing of it runs for PACS).
    with database.session() as session, session.begin():
        session.get_one(Job, jobs[2].id).not_before = utcnow() + timedelta(days=1)
    [alone] = claim_jobs(database, "w", 60, 4)
    assert alone.shadow and _state(database, second) is StudyState.QUEUED
    database.dispose()


# -- the comparison -----------------------------------------------------------------------------

#: (current probabilities, candidate probabilities, final diagnosis or None).
PAIRS = [
    ((0.05, 0.81, 0.08, 0.03, 0.03), (0.10, 0.70, 0.10, 0.05, 0.05), "adenoma"),
    ((0.60, 0.20, 0.10, 0.05, 0.05), (0.20, 0.60, 0.10, 0.05, 0.05), "normal"),
    ((0.10, 0.55, 0.30, 0.03, 0.02), (0.10, 0.30, 0.55, 0.03, 0.02), "hyperplasia"),
    ((0.20, 0.30, 0.40, 0.05, 0.05), (0.20, 0.30, 0.40, 0.05, 0.05), "adenoma"),
    ((0.10, 0.10, 0.10, 0.60, 0.10), (0.10, 0.10, 0.10, 0.60, 0.10), "carcinoma"),
    ((0.05, 0.05, 0.05, 0.05, 0.80), (0.05, 0.05, 0.05, 0.80, 0.05), "cyst"),
    ((0.40, 0.35, 0.15, 0.05, 0.05), (0.35, 0.40, 0.15, 0.05, 0.05), None),  # a verdict
    ((0.30, 0.50, 0.10, 0.05, 0.05), (0.30, 0.50, 0.10, 0.05, 0.05), None),  # unassessed
]


def _result(probabilities: tuple[float, ...], version: str) -> dict[str, Any]:
    probs = dict(zip(CLASSES, probabilities, strict=True))
    return {
        "predicted": max(probs, key=probs.__getitem__),
        "probabilities": probs,
        "bundle": {"name": "parathyroid-test", "version": version},
    }


def _add(database: Database, uid: str, version: int, shadow: bool, result: dict) -> int:
    with database.session() as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()
        job = Job(study_id=study.id, analysis="parathyroid", version=version, shadow=shadow,
                  state=JobState.DONE, result=result,
                  bundle=f"parathyroid-test {result['bundle']['version']}")  # fmt: skip
        session.add(job)
        session.flush()
        return job.id


def test_the_comparison_equals_scikit_learn_on_the_studies_both_analysed(tmp_path: Path) -> None:
    config = _config(tmp_path / "var", shadow_bundle=str(tmp_path / "candidate"))
    database = open_database(config.database_url)
    files = FileStore(config.store_dir)
    store = InstanceStore(database, files)
    uids, current_jobs = [], []
    for index, (mine, theirs, _truth) in enumerate(PAIRS):
        uid = _store(store, tmp_path, nm_dataset(frames=1, rows=8, columns=8, seed=index))
        uids.append(uid)
        current_jobs.append(_add(database, uid, 1, False, _result(mine, "1.0")))
        _add(database, uid, 1, True, _result(theirs, "2.0"))
    # Not compared: a study whose latest version has no shadow result yet, and a shadow
    # result of another candidate (filtered by ``bundle``).
    late = _store(store, tmp_path, nm_dataset(frames=1, rows=8, columns=8, seed=50))
    _add(database, late, 1, False, _result(PAIRS[0][0], "1.0"))
    _add(database, late, 1, True, _result(PAIRS[0][1], "2.0"))
    _add(database, late, 2, False, _result(PAIRS[0][0], "1.0"))
    other = _store(store, tmp_path, nm_dataset(frames=1, rows=8, columns=8, seed=51))
    _add(database, other, 1, False, _result(PAIRS[0][0], "1.0"))
    _add(database, other, 1, True, _result(PAIRS[1][1], "1.9"))
    rows = [{"study_instance_uid": uid, "analysis": "parathyroid", "diagnosis": truth,
             "date": "2026-11-01", "source": "histology"}
            for uid, (_, _, truth) in zip(uids, PAIRS, strict=True) if truth]  # fmt: skip
    import_truth(database, files, rows, imported_by="test")
    with database.session() as session, session.begin():  # the reader's class: hyperplasia
        session.add(Verdict(job_id=current_jobs[6], finding="diagnosis", reader="Dr A",
                            decision=VerdictDecision.CORRECTED, value="hyperplasia"))  # fmt: skip

    c = shadow_comparison(database, "parathyroid", bundle="parathyroid-test 2.0", resamples=50)

    mine = [CLASSES[int(np.argmax(p[0]))] for p in PAIRS]
    theirs = [CLASSES[int(np.argmax(p[1]))] for p in PAIRS]
    assert (c.compared, c.current_bundles, c.candidate_bundles) == (
        len(PAIRS),
        {"parathyroid-test 1.0": len(PAIRS)},
        {"parathyroid-test 2.0": len(PAIRS)},
    )
    assert c.agreement == pytest.approx(np.mean(np.array(mine) == np.array(theirs)))
    assert c.kappa == pytest.approx(cohen_kappa_score(mine, theirs, labels=list(CLASSES)))
    assert (c.findings_compared, c.findings_agreeing) == (len(PAIRS), c.same_prediction)
    truth = [t or "hyperplasia" for _, _, t in PAIRS[:7]]
    assert (c.assessed, c.with_truth) == (7, 6)
    assert c.current is not None and c.candidate is not None
    for figures, said in ((c.current, mine[:7]), (c.candidate, theirs[:7])):
        assert figures.accuracy == pytest.approx(accuracy_score(truth, said))
        assert figures.macro_f1 == pytest.approx(
            f1_score(truth, said, labels=list(CLASSES), average="macro", zero_division=0)
        )
    assert c.difference["accuracy"] == pytest.approx(c.candidate.accuracy - c.current.accuracy)
    low, high = c.difference_intervals["accuracy"] or (np.nan, np.nan)
    assert -1.0 <= low <= c.difference["accuracy"] <= high <= 1.0
    # Without the filter the other candidate's study counts too.
    everything = shadow_comparison(database, "parathyroid", resamples=0)
    assert everything.compared == len(PAIRS) + 1
    assert everything.candidate_bundles == {"parathyroid-test 2.0": len(PAIRS),
                                            "parathyroid-test 1.9": 1}  # fmt: skip

    # The CLI and REST compare every shadow result here: the configured candidate's folder
    # has no manifest to name its own.
    runner = CliRunner()
    run = runner.invoke(app, ["shadow", "--json", "--resamples", "0",
                              "--data-dir", str(config.node.data_dir)])  # fmt: skip
    assert run.exit_code == 0, run.output
    [printed] = json.loads(run.output)
    assert printed["compared"] == len(PAIRS) + 1
    assert printed["kappa"] == pytest.approx(everything.kappa)
    assert printed["candidate"]["accuracy"] == pytest.approx(everything.candidate.accuracy)
    table = runner.invoke(app, ["shadow", "--data-dir", str(config.node.data_dir)])
    assert table.exit_code == 0 and "same main finding" in table.output
    assert "macro f1" in table.output
    client = TestClient(create_app(config, database, lambda: True), base_url="http://127.0.0.1")
    answer = client.get("/api/shadow", params={"analysis": "parathyroid", "resamples": 0})
    assert answer.status_code == 200
    assert answer.json()[0]["kappa"] == pytest.approx(everything.kappa)
    assert answer.json()[0]["candidate_folder"] == str(tmp_path / "candidate")
    assert client.get("/api/shadow", params={"analysis": "liver"}).status_code == 404
    shown = client.get("/performance", params={"analysis": "parathyroid", "resamples": 0})
    assert shown.status_code == 200
    assert f'<td class="num" data-count="compared">{len(PAIRS) + 1}</td>' in shown.text
    assert str(tmp_path / "candidate") in shown.text
    database.dispose()


# -- the worker and the promotion ---------------------------------------------------------------


def _worker(config: Config, name: str) -> Worker:
    return Worker(config, device="cpu", name=name)


def test_a_candidate_that_cannot_be_loaded_fails_only_its_shadow_jobs(
    tmp_path: Path, bundles: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mibi_node.analyses.registry import get_analysis

    current, candidate = bundles
    baseline = 950.0  # the worker's own memory, fixed: this test process holds far more
    monkeypatch.setattr("mibi_node.analyses.memory.worker_baseline_megabytes", lambda: baseline)
    needs = get_analysis("parathyroid").memory_needs(current, "cpu").cpu_mb
    budget = {"memory_budget_mb": baseline + needs * 1.5}  # one bundle fits, not two
    config = _config(tmp_path / "var", budget, bundle=str(current), shadow_bundle=str(candidate))
    worker = _worker(config, "small")
    assert worker.load_bundle() is True
    assert set(worker.runners) == {"parathyroid"} and worker.candidates == {}
    [problem] = worker.candidate_problems.values()
    assert problem.startswith("parathyroid candidate: bundle") and "not loaded" in problem
    store = InstanceStore(worker.database, worker.files)
    uid = ""
    for ds in make_study("adenoma", seed=5, index=0).datasets:
        uid = _store(store, tmp_path, ds)
    _route(worker.database, config)
    assert worker.run_once() == 2
    current_job, shadow_job = _jobs(worker.database, uid)
    assert current_job.state is JobState.DONE and current_job.bundle == "pipeline-test 0.0.1"
    assert shadow_job.state is JobState.FAILED and problem in (shadow_job.error or "")
    assert _state(worker.database, uid) is StudyState.DONE
    worker.database.dispose()


def test_promotion_switches_a_running_worker_and_is_audited(
    tmp_path: Path, bundles: tuple[Path, Path]
) -> None:
    current, candidate = bundles
    config = _config(tmp_path / "var", bundle=str(current), shadow_bundle=str(candidate))
    worker = _worker(config, "both")
    assert worker.load_bundle() is True
    assert worker.bundles_text() == "pipeline-test 0.0.1, shadow pipeline-candidate 0.0.2"
    store = InstanceStore(worker.database, worker.files)
    uids = []
    for index in range(2):
        for ds in make_study("hyperplasia", seed=6, index=index).datasets:
            uid = _store(store, tmp_path, ds)
        uids.append(uid)
    _route(worker.database, config)
    while worker.run_once():
        pass
    for uid in uids:
        mine, theirs = _jobs(worker.database, uid)
        assert (mine.state, theirs.state) == (JobState.DONE, JobState.DONE)
        assert (mine.bundle, theirs.bundle) == ("pipeline-test 0.0.1", "pipeline-candidate 0.0.2")
        assert dict(theirs.result or {})["bundle"]["version"] == "0.0.2"
        assert theirs.timings and set(theirs.timings) >= {"read", "inference", "sr"}
        # The candidate's SR is kept in the results store: an SR of the same study.
        sr = pydicom.dcmread(worker.results.absolute(theirs.sr_path or ""))
        assert sr.StudyInstanceUID == uid and sr.SOPInstanceUID != mine.sr_sop_instance_uid
    # A third study waits in the queue while the candidate is promoted.
    for ds in make_study("adenoma", seed=6, index=2).datasets:
        waiting = _store(store, tmp_path, ds)
    _route(worker.database, config)
    shown = _promote(config, tmp_path, ["parathyroid"], input="n\n")
    assert shown.exit_code == 1 and "compared studies: 2" in shown.output
    assert "not promoted" in shown.output
    no_config = _promote(config, tmp_path, ["thyroid"])
    assert no_config.exit_code == 2 and "not enabled" in no_config.output

    promoted = _promote(config, tmp_path, ["parathyroid", "--yes"])
    assert promoted.exit_code == 0, promoted.output
    said = " ".join(promoted.output.split())  # the console wraps long lines
    assert "now sends the results of pipeline-candidate 0.0.2" in said
    assert "1 queued shadow job(s) cancelled" in said
    [event] = _audit(worker.database, "promote")
    assert (event.outcome, event.actor.split(" (")[0]) == ("promoted", "Dr A")
    assert (event.detail["old"]["version"], event.detail["new"]["version"]) == ("0.0.1", "0.0.2")
    assert event.detail["compared"] == 2 and "agreement" in event.detail
    with worker.database.session() as session:
        assert json.loads(session.get_one(Setting, "bundle.parathyroid").value)["version"] == (
            "0.0.2"
        )
    choice = bundle_choices(worker.database, config)["parathyroid"]
    assert choice.current.resolve() == candidate.resolve() and choice.candidate is None
    # The worker follows at its next poll: the loaded candidate becomes its current runner.
    loaded = worker.candidates["parathyroid"]
    assert worker.load_bundle() is True
    assert worker.runners["parathyroid"] is loaded and worker.candidates == {}
    assert worker.run_once() == 1
    mine, theirs = _jobs(worker.database, waiting)
    assert (mine.bundle, mine.state) == ("pipeline-candidate 0.0.2", JobState.DONE)
    assert theirs.shadow and theirs.state is JobState.FAILED  # cancelled by the promotion
    assert _deliveries(worker.database, theirs.id) == 0
    again = _promote(config, tmp_path, ["parathyroid", "--yes"])
    assert again.exit_code == 2 and "already the current bundle" in " ".join(again.output.split())
    # Reverting brings the configured bundle back, and the candidate into shadow again.
    reverted = _promote(config, tmp_path, ["parathyroid", "--revert"])
    assert reverted.exit_code == 0 and reverted.output.startswith("reverted")
    assert worker.load_bundle() is True
    assert worker.bundles_text() == "pipeline-test 0.0.1, shadow pipeline-candidate 0.0.2"
    assert [e.outcome for e in _audit(worker.database, "promote")] == ["promoted", "reverted"]
    worker.database.dispose()


def _promote(config: Config, tmp_path: Path, args: list[str], input: str | None = None) -> Any:
    """``mibi-node promote ARGS --by "Dr A"`` with ``config`` as the TOML file it reads."""
    settings = config.analyses["parathyroid"]
    path = write_config(
        tmp_path / "promote.toml",
        {
            "node": {"data_dir": str(config.node.data_dir)},
            "analyses.parathyroid": {
                key: str(value)
                for key, value in (("bundle", settings.bundle),
                                   ("shadow_bundle", settings.shadow_bundle))
                if value is not None
            },
        },
    )  # fmt: skip
    command = ["promote", *args, "--by", "Dr A", "-c", str(path)]
    return CliRunner().invoke(app, command, input=input)


def test_promotion_refuses_a_missing_candidate_in_one_sentence(tmp_path: Path) -> None:
    config = _config(tmp_path / "var", shadow_bundle=str(tmp_path / "nowhere"))
    open_database(config.database_url).dispose()
    missing = _promote(config, tmp_path, ["parathyroid", "--yes"])
    assert missing.exit_code == 2
    assert f"the candidate bundle {tmp_path / 'nowhere'} of parathyroid does not exist" in (
        " ".join(missing.output.split())
    )
    plain = _config(tmp_path / "var")
    unset = _promote(plain, tmp_path, ["parathyroid", "--yes"])
    assert unset.exit_code == 2
    assert "analyses.parathyroid.shadow_bundle is not set" in " ".join(unset.output.split())
    nothing = _promote(plain, tmp_path, ["parathyroid", "--revert"])
    assert nothing.exit_code == 2 and "no promotion in force" in " ".join(nothing.output.split())


# -- end to end --------------------------------------------------------------------------------


def _algorithm_versions(path: Path) -> set[str]:
    """The Algorithm Version items (DCM 111003) anywhere in an SR's content tree."""
    found: set[str] = set()

    def walk(items: Any) -> None:
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "111003":
                found.add(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(pydicom.dcmread(path).ContentSequence)
    return found


@pytest.mark.peers
def test_pacs_receives_only_the_current_bundles_sr_until_promotion(
    node_factory: Callable[..., Any],
    require_tool: Callable[[str], str],
    tmp_path: Path,
    bundles: tuple[Path, Path],
) -> None:
    require_tool("storescp")
    current, candidate = bundles
    pacs = StoreSCP(tmp_path / "pacs").start()
    try:
        node = node_factory(
            {
                "workers": {"count": 1, "device": "cpu", "bundle": str(current),
                            "poll_seconds": 0.1},
                "analyses.parathyroid": {"shadow_bundle": str(candidate)},
                "dispatch": {"destinations": [
                    {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}]},
            }
        )  # fmt: skip
        studies = [make_study("adenoma", seed=9, index=i).datasets for i in range(3)]
        files = [[write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm") for ds in study]
                 for study in studies]  # fmt: skip
        assert storescu(node.port, [*files[0], *files[1]], calling="GAMMA_CAM1").returncode == 0

        def shadows_done() -> bool:
            rows = node.query("SELECT state FROM job WHERE shadow")
            return len(rows) == 2 and all(state == "DONE" for (state,) in rows)

        def srs() -> list[Path]:
            return [p for p in pacs.files() if pydicom.dcmread(p).Modality == "SR"]

        _wait(lambda: len(pacs.files()) >= 4 and shadows_done(), 120, "two SRs", node)
        time.sleep(1.0)
        assert pacs.modalities() == ["OT", "OT", "SR", "SR"]  # each SR with its key image
        assert [_algorithm_versions(p) for p in srs()] == [{"0.0.1"}, {"0.0.1"}]
        shadows = node.query("SELECT id, bundle FROM job WHERE shadow ORDER BY id")
        assert [bundle for _, bundle in shadows] == ["pipeline-candidate 0.0.2"] * 2
        ids = ", ".join(str(job) for job, _ in shadows)
        assert node.query(f"SELECT count(*) FROM delivery WHERE job_id IN ({ids})") == [(0,)]
        assert {s for (s,) in node.query("SELECT state FROM study")} == {"DONE"}

        promoted = CliRunner().invoke(
            app, ["promote", "parathyroid", "--yes", "--reader", "Dr A",
                  "-c", str(node.config_path), "--data-dir", str(node.data_dir)],
        )  # fmt: skip
        assert promoted.exit_code == 0, promoted.output
        assert storescu(node.port, files[2], calling="GAMMA_CAM1").returncode == 0
        _wait(lambda: len(pacs.files()) >= 6, 120, "the candidate's SR", node)
        time.sleep(1.0)
        assert pacs.modalities() == ["OT"] * 3 + ["SR"] * 3
        newest = max(srs(), key=lambda p: p.stat().st_mtime)
        assert _algorithm_versions(newest) == {"0.0.2"}
        assert str(pydicom.dcmread(newest).StudyInstanceUID) == str(studies[2][0].StudyInstanceUID)
        assert len(node.query("SELECT id FROM job WHERE shadow")) == 2  # none for the third
    finally:
        pacs.stop()
