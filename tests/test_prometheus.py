"""Prometheus metrics and the audit trail, from a real node's database and the queue's own
functions: what reception, workers and dispatch committed is what /metrics says."""

from __future__ import annotations

import subprocess
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from factory import nm_files
from mibi_node.config import Config, DispatchConfig
from mibi_node.dispatch.deliveries import deliver
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job, fail_job
from mibi_node.metrics import render_metrics
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.models import AuditEvent, Job, Study, StudyState, WorkerStatus, utcnow
from node import dcmtk_env, storescu


def _samples(database: Database, config: Config | None = None) -> dict[tuple[str, tuple], float]:
    body, content_type = render_metrics(database, config or Config())
    assert content_type.startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.peers
def test_reception_counts_come_from_the_audit_trail(
    node_factory, require_tool, tmp_path: Path
) -> None:
    require_tool("storescu")
    echoscu = require_tool("echoscu")
    node = node_factory(
        {"reception": {"allowed_peers": [{"ae_title": "STORESCU"}], "acceptors": 2}}
    )
    files = nm_files(tmp_path / "in", 3)
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files[:1]).returncode == 0  # the same instance again: duplicate
    intruder = subprocess.run(
        [echoscu, "-aet", "INTRUDER", "-aec", "MIBI_NODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=30,
        check=False,
    )
    assert intruder.returncode != 0
    wrong_called = storescu(node.port, files[:1], called="SOMEONE")
    assert wrong_called.returncode != 0
    node.stop()

    database = Database(f"sqlite:///{node.data_dir / 'mibi-node.sqlite3'}")
    samples = _samples(database)
    assert _value(samples, "mibi_node_associations_total", outcome="released", reason="") == 2
    rejected = {"outcome": "rejected"}
    assert (
        _value(samples, "mibi_node_associations_total", **rejected, reason="calling_ae_title") == 1
    )
    assert (
        _value(samples, "mibi_node_associations_total", **rejected, reason="called_ae_title") == 1
    )
    assert _value(samples, "mibi_node_instances_received_total", outcome="stored") == 3
    assert _value(samples, "mibi_node_instances_received_total", outcome="duplicates") == 1
    assert sum(v for (name, _), v in samples.items() if name == "mibi_node_studies") == 1
    with database.session() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    actors = [event.actor for event in events]
    assert (
        "INTRUDER@127.0.0.1" in actors and actors.count("STORESCU@127.0.0.1") == 3
    )  # 2 stores, 1 wrong called AE
    # The audit trail names peers and counts, never patients.
    log = node.log()
    assert "audit association released actor=STORESCU@127.0.0.1" in log
    assert "Phantom" not in log and "^" not in "".join(event.message for event in events)
    database.dispose()


def _queued(database: Database, count: int) -> None:
    received = utcnow() - timedelta(seconds=40)
    with database.session() as session, session.begin():
        for index in range(count):
            study = Study(
                study_instance_uid=f"1.2.3.{index}",
                state=StudyState.QUEUED,
                last_received_at=received,
            )
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, version=1))


def test_results_deliveries_and_workers(tmp_path: Path) -> None:
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    _queued(database, 3)
    empty = _samples(database)
    assert _value(empty, "mibi_node_queue_depth") == 3
    assert _value(empty, "mibi_node_jobs", state="QUEUED") == 3
    assert _value(empty, "mibi_node_stable_to_result_seconds_count") == 0

    one, two = claim_jobs(database, "worker-a", 60, 2)
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "sr.dcm").write_bytes(b"not sent anyway")
    done = CompletedJob(
        result={"predicted": "adenoma"},
        timings={"read": 0.004, "denoise": 0.02, "inference": 0.3, "sr": 0.09},
        bundle="demo 0.1.0",
        sr_path="sr.dcm",
        sr_sop_instance_uid="1.2.9",
        sr_series_instance_uid="1.2.8",
        files=("sr.dcm",),
        # Nothing listens on port 9: the delivery fails and is retried later.
        destinations=({"ae_title": "PACS", "host": "127.0.0.1", "port": 9},),
    )
    [delivery] = complete_job(database, "worker-a", one.id, done)
    fail_job(database, "worker-a", two.id, "no delayed image", retry=False, max_attempts=3)
    outcomes = deliver(
        database,
        tmp_path / "results",
        DispatchConfig(timeout=2),
        calling_ae_title="MIBI_NODE",
        owner="dispatch",
        delivery_ids=[delivery],
    )
    assert [outcome.state.value for outcome in outcomes] == ["PENDING"]
    with database.session() as session, session.begin():
        session.add(WorkerStatus(name="gpu0", pid=1, device="cuda:0", heartbeat_at=utcnow()))
        session.add(
            WorkerStatus(
                name="gpu1", pid=2, device="cuda:1", heartbeat_at=utcnow() - timedelta(hours=1)
            )
        )

    samples = _samples(database)
    assert _value(samples, "mibi_node_jobs_finished_total", outcome="done") == 1
    assert _value(samples, "mibi_node_jobs_finished_total", outcome="failed") == 1
    assert _value(samples, "mibi_node_delivery_attempts_total", outcome="retry") == 1
    assert _value(samples, "mibi_node_delivery_attempts_total", outcome="sent") == 0
    assert _value(samples, "mibi_node_queue_depth") == 1
    assert _value(samples, "mibi_node_studies", state="DONE") == 1
    assert _value(samples, "mibi_node_studies", state="FAILED") == 1
    assert _value(samples, "mibi_node_deliveries", state="PENDING") == 1
    assert _value(samples, "mibi_node_oldest_undelivered_result_age_seconds") >= 0
    assert _value(samples, "mibi_node_worker_up", worker="gpu0", device="cuda:0") == 1
    assert _value(samples, "mibi_node_worker_up", worker="gpu1", device="cuda:1") == 0
    # The job's stage timings land in the right buckets.
    stage = "mibi_node_analysis_stage_seconds"
    assert _value(samples, f"{stage}_count", stage="inference") == 1
    assert _value(samples, f"{stage}_bucket", stage="inference", le="0.25") == 0
    assert _value(samples, f"{stage}_bucket", stage="inference", le="0.5") == 1
    assert _value(samples, f"{stage}_sum", stage="sr") == pytest.approx(0.09)
    # Queued 40 s after the last instance: the receive-to-stable histogram says so.
    assert _value(samples, "mibi_node_receive_to_stable_seconds_bucket", le="30.0") == 0
    assert _value(samples, "mibi_node_receive_to_stable_seconds_bucket", le="60.0") == 1

    # A second scrape folds in only what is new, and the counters keep counting.
    [three] = claim_jobs(database, "worker-b", 60, 1)
    complete_job(database, "worker-b", three.id, done)
    again = _samples(database)
    assert _value(again, "mibi_node_jobs_finished_total", outcome="done") == 2
    assert _value(again, f"{stage}_count", stage="inference") == 2
    # A fresh collector (a restarted node) reads the whole trail and gets the same totals.
    fresh = Database(database.url)
    assert _value(_samples(fresh), "mibi_node_jobs_finished_total", outcome="done") == 2
    fresh.dispose()
    database.dispose()


def test_a_row_that_commits_after_a_higher_id_is_still_counted(tmp_path: Path) -> None:
    # On PostgreSQL ids are taken at insert and rows become visible at commit: id 3 may
    # appear after id 4 was scraped. Both are counted, each once.
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")

    def add(event_id: int) -> None:
        with database.session() as session, session.begin():
            session.add(AuditEvent(id=event_id, kind="operator", outcome="requeue", actor="cli:x"))

    for event_id in (1, 2, 4):
        add(event_id)
    name = "mibi_node_operator_actions_total"
    assert _value(_samples(database), name, outcome="requeue") == 3
    add(3)
    assert _value(_samples(database), name, outcome="requeue") == 4
    assert _value(_samples(database), name, outcome="requeue") == 4
    database.dispose()
