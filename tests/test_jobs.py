"""The analysis queue on real databases: claims, leases, retries, routing, versions.

Every test with a database runs on SQLite and on PostgreSQL (``database_url``): leases,
retries and delivery scheduling must behave the same on both.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy import select

from factory import CT_STORAGE, nm_dataset, write
from mibi_node.assembly.routing import decide, route_stable_studies
from mibi_node.config import DispatchConfig, RoutingConfig
from mibi_node.dispatch.deliveries import _claim as _claim_deliveries
from mibi_node.dispatch.deliveries import backoff_seconds, deliver, resend_study
from mibi_node.jobs.queue import (
    CompletedJob,
    claim_jobs,
    complete_job,
    defer_job,
    device_uid,
    fail_job,
    release_expired_jobs,
    renew_leases,
    requeue_study,
)
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import (
    Delivery,
    DeliveryState,
    InvalidTransitionError,
    Job,
    JobState,
    Study,
    StudyState,
    check_job_transition,
    utcnow,
)


@pytest.fixture
def database(database_url: str) -> Iterator[Database]:
    """A fresh database: an SQLite file, then a PostgreSQL database."""
    database = open_database(database_url)
    yield database
    database.dispose()


def _queued_studies(database: Database, count: int) -> list[int]:
    ids = []
    with database.session() as session, session.begin():
        for index in range(count):
            study = Study(study_instance_uid=f"1.2.3.{index}", state=StudyState.QUEUED)
            session.add(study)
            session.flush()
            session.add(Job(study_id=study.id, version=1))
            ids.append(study.id)
    return ids


def _claim_all(url: str, owner: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    database = Database(url)
    mine: list[int] = []
    while batch := claim_jobs(database, owner, 60, 2):
        mine.extend(job.id for job in batch)
    queue.put(mine)


def test_two_processes_never_claim_the_same_job(database: Database) -> None:
    _queued_studies(database, 40)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_claim_all, args=(database.url, f"w{i}", queue)) for i in range(2)
    ]
    for worker in workers:
        worker.start()
    claimed = [queue.get(timeout=60) for _ in workers]
    for worker in workers:
        worker.join(30)
    assert sorted(claimed[0] + claimed[1]) == list(range(1, 41))
    assert not set(claimed[0]) & set(claimed[1])
    with database.session() as session:
        states = set(session.scalars(select(Study.state)))
    assert states == {StudyState.RUNNING}


def test_expired_lease_requeues_then_fails_with_the_reason(database: Database) -> None:
    _queued_studies(database, 1)
    for attempt in (1, 2):
        [job] = claim_jobs(database, "dead-worker", 60, 4)
        assert job.attempts == attempt
        with database.session() as session, session.begin():
            session.get_one(Job, job.id).lease_expires_at = utcnow() - timedelta(seconds=1)
        assert release_expired_jobs(database, max_attempts=2) == [job.id]
    with database.session() as session:
        row = session.get_one(Job, 1)
        study = session.get_one(Study, row.study_id)
        assert row.state is JobState.FAILED and row.attempts == 2
        assert "worker stopped" in (row.error or "") and "no attempts left" in (row.error or "")
        assert study.state is StudyState.FAILED
    # A lease that is still valid is left alone.
    _queued_studies_more = claim_jobs(database, "w", 60, 4)
    assert _queued_studies_more == []


def test_leases_are_renewed_only_for_the_jobs_the_worker_is_working_on(
    database: Database,
) -> None:
    _queued_studies(database, 3)
    one, two, three = claim_jobs(database, "w", 1, 3)
    # The worker knows of two (the third claim's commit was never seen, say): only those
    # two are extended; the third runs out and goes back to the queue.
    assert renew_leases(database, "w", 60, {one.id, two.id}) == 2
    assert renew_leases(database, "someone-else", 60, {three.id}) == 0
    assert renew_leases(database, "w", 60, set()) == 0
    time.sleep(1.1)
    assert release_expired_jobs(database, max_attempts=3) == [three.id]
    [again] = claim_jobs(database, "w2", 60, 4)
    assert (again.id, again.attempts) == (three.id, 2)


def test_a_retried_job_is_claimed_alone(database: Database) -> None:
    _queued_studies(database, 3)
    [first, *_] = claim_jobs(database, "w1", 60, 1)
    assert fail_job(database, "w1", first.id, "boom", retry=True, max_attempts=3) is JobState.QUEUED
    batch = claim_jobs(database, "w2", 60, 4)
    assert [job.id for job in batch] == [first.id]  # alone, though four were allowed
    assert len(claim_jobs(database, "w2", 60, 4)) == 2


def test_unusable_study_fails_at_once_and_lost_lease_records_nothing(database: Database) -> None:
    _queued_studies(database, 2)
    one, two = claim_jobs(database, "w1", 60, 2)
    state = fail_job(database, "w1", one.id, "no delayed image", retry=False, max_attempts=3)
    assert state is JobState.FAILED
    assert fail_job(database, "someone-else", two.id, "x", retry=True, max_attempts=3) is None
    done = CompletedJob(
        result={"predicted": "adenoma"},
        timings={"read": 0.1},
        bundle="b 1",
        sr_path="sr.dcm",
        sr_sop_instance_uid="1.2.9",
        sr_series_instance_uid="1.2.8",
        files=("sr.dcm",),
        destinations=({"ae_title": "PACS", "host": "127.0.0.1", "port": 104},),
    )
    assert complete_job(database, "someone-else", two.id, done) == []
    [delivery_id] = complete_job(database, "w1", two.id, done)
    with database.session() as session:
        job = session.get_one(Job, two.id)
        assert job.state is JobState.DONE and job.result == {"predicted": "adenoma"}
        assert session.get_one(Study, job.study_id).state is StudyState.DONE
        delivery = session.get_one(Delivery, delivery_id)
        assert delivery.label == "PACS@127.0.0.1:104"
        assert delivery.destination["files"] == ["sr.dcm"]


def test_deferred_job_waits_until_its_time(database: Database) -> None:
    _queued_studies(database, 1)
    [job] = claim_jobs(database, "w", 60, 1)
    assert defer_job(database, "w", job.id, utcnow() + timedelta(seconds=1.5), "waiting")
    with database.session() as session:
        assert session.get_one(Study, job.study_id).state is StudyState.AWAITING_PHASE
    assert claim_jobs(database, "w", 60, 1) == []
    time.sleep(1.6)
    [again] = claim_jobs(database, "w", 60, 1)
    assert again.partial and again.attempts == 1  # the wait did not count as an attempt


def test_requeue_failed_and_done_studies(database: Database) -> None:
    _queued_studies(database, 2)
    one, two = claim_jobs(database, "w", 60, 2)
    fail_job(database, "w", one.id, "bad", retry=False, max_attempts=3)
    assert requeue_study(database, "1.2.3.0") == one.id
    with database.session() as session:
        row = session.get_one(Job, one.id)
        assert row.state is JobState.QUEUED and row.attempts == 0
    done = CompletedJob({}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",), ())
    complete_job(database, "w", two.id, done)
    new = requeue_study(database, "1.2.3.1")
    with database.session() as session:
        assert session.get_one(Job, new).version == 2
    with pytest.raises(Exception, match="no study"):
        requeue_study(database, "9.9.9")


def _done_job_with_delivery(database: Database, port: int) -> int:
    _queued_studies(database, 1)
    [job] = claim_jobs(database, "w", 60, 1)
    done = CompletedJob(
        {}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",),
        ({"ae_title": "PACS", "host": "127.0.0.1", "port": port},),
    )  # fmt: skip
    [delivery_id] = complete_job(database, "w", job.id, done)
    return delivery_id


def test_delivery_backoff_retries_and_gives_up(database: Database, tmp_path: Path) -> None:
    from ports import free_port

    delivery_id = _done_job_with_delivery(database, free_port())  # nothing listens there
    (tmp_path / "sr.dcm").write_bytes(b"not sent anyway")
    config = DispatchConfig(max_attempts=2, initial_backoff_seconds=30, timeout=2)
    [outcome] = deliver(database, tmp_path, config, calling_ae_title="NODE", owner="s1")
    assert outcome.state is DeliveryState.PENDING
    with database.session() as session:
        row = session.get_one(Delivery, delivery_id)
        wait = (row.next_attempt_at - utcnow()).total_seconds()
        assert row.attempts == 1 and 25 < wait <= 30 and row.lease_owner is None
    assert deliver(database, tmp_path, config, calling_ae_title="NODE", owner="s2") == []
    with database.session() as session, session.begin():
        session.get_one(Delivery, delivery_id).next_attempt_at = utcnow()
    [outcome] = deliver(database, tmp_path, config, calling_ae_title="NODE", owner="s2")
    assert outcome.state is DeliveryState.FAILED  # two attempts were all it had
    assert resend_study(database, "1.2.3.0") == 1
    with database.session() as session:
        row = session.get_one(Delivery, delivery_id)
        assert row.state is DeliveryState.PENDING and row.attempts == 0


def test_a_stopped_senders_delivery_is_taken_over_after_its_lease(database: Database) -> None:
    delivery_id = _done_job_with_delivery(database, 104)
    [claimed] = _claim_deliveries(database, "dead-sender", None, 8, 1.0)
    assert claimed.id == delivery_id
    assert _claim_deliveries(database, "other", None, 8, 1.0) == []  # its lease holds
    with database.session() as session, session.begin():
        session.get_one(Delivery, delivery_id).lease_expires_at = utcnow() - timedelta(seconds=1)
    [again] = _claim_deliveries(database, "other", None, 8, 1.0)
    with database.session() as session:
        row = session.get_one(Delivery, again.id)
        assert row.state is DeliveryState.SENDING and row.lease_owner == "other"
        assert row.attempts == 2


def _claim_deliveries_all(url: str, owner: str, queue: multiprocessing.Queue) -> None:  # type: ignore[type-arg]
    database = Database(url)
    mine: list[int] = []
    while batch := _claim_deliveries(database, owner, None, 2, 60.0):
        mine.extend(item.id for item in batch)
    queue.put(mine)


def test_two_processes_never_claim_the_same_delivery(database: Database) -> None:
    _queued_studies(database, 30)
    done = CompletedJob(
        {}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",),
        ({"ae_title": "PACS", "host": "127.0.0.1", "port": 104},),
    )  # fmt: skip
    while batch := claim_jobs(database, "w", 60, 8):
        for job in batch:
            complete_job(database, "w", job.id, done)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    senders = [
        context.Process(target=_claim_deliveries_all, args=(database.url, f"s{i}", queue))
        for i in range(2)
    ]
    for sender in senders:
        sender.start()
    claimed = [queue.get(timeout=60) for _ in senders]
    for sender in senders:
        sender.join(30)
    assert sorted(claimed[0] + claimed[1]) == list(range(1, 31))
    assert not set(claimed[0]) & set(claimed[1])


def test_job_state_machine() -> None:
    check_job_transition(JobState.QUEUED, JobState.RUNNING)
    check_job_transition(JobState.FAILED, JobState.QUEUED)
    with pytest.raises(InvalidTransitionError, match="DONE to QUEUED"):
        check_job_transition(JobState.DONE, JobState.QUEUED)
    with pytest.raises(InvalidTransitionError):
        check_job_transition(JobState.QUEUED, JobState.DONE)


def test_backoff_doubles_from_30_s_to_an_hour() -> None:
    config = DispatchConfig()
    waits = [backoff_seconds(n, config) for n in range(1, 10)]
    assert waits[:4] == [30, 60, 120, 240]
    assert waits[-1] == 3600 and max(waits) == 3600


def test_device_uid_is_made_once(database: Database) -> None:
    uid = device_uid(database)
    assert uid == device_uid(database) and uid.startswith(("1.", "2."))
    assert device_uid(database, "1.2.3.4") == "1.2.3.4"


# -- routing ------------------------------------------------------------------------------


def _header(modality: str = "NM", **attributes: object) -> Dataset:
    ds = Dataset()
    ds.Modality = modality
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def _radiopharmaceutical(code: str) -> Sequence:
    item, concept = Dataset(), Dataset()
    concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning = code, "SCT", "x"
    item.RadiopharmaceuticalCodeSequence = Sequence([concept])
    return Sequence([item])


def test_routing_rules() -> None:
    rules = RoutingConfig()
    sestamibi = _header(RadiopharmaceuticalInformationSequence=_radiopharmaceutical("424299003"))
    assert decide([sestamibi], "CAM", rules).analyse
    assert decide([_header(StudyDescription="Nebenschilddrüse SPECT")], "CAM", rules).analyse
    assert decide([_header(SeriesDescription="PTH delayed 2h")], "CAM", rules).analyse
    thyroid = decide(
        [
            _header(
                StudyDescription="THYROID",
                RadiopharmaceuticalInformationSequence=_radiopharmaceutical("C-B1180"),
            )
        ],
        "CAM",
        rules,
    )
    assert not thyroid.analyse and "no routing rule matched" in thyroid.reason
    assert "'THYROID'" in thyroid.reason and "C-B1180" in thyroid.reason
    ct = decide([_header("CT", StudyDescription="PARATHYROID")], "CAM", rules)
    assert not ct.analyse and "modality CT" in ct.reason
    assert not decide([], "CAM", rules).analyse
    by_ae = RoutingConfig(calling_ae_titles=("MIBI_CAM",))
    assert decide([_header(StudyDescription="neck")], "MIBI_CAM", by_ae).analyse
    sc = _header("OT", SOPClassUID="1.2.840.10008.5.1.4.1.1.7", StudyDescription="MIBI")
    assert not decide([sc], "CAM", rules).analyse
    assert decide([sc], "CAM", RoutingConfig(secondary_capture=True)).analyse
    with pytest.raises(ValueError, match="regular expression"):
        RoutingConfig(description_pattern="(")


def _store(store: InstanceStore, tmp_path: Path, ds: Dataset, name: str, modality: str) -> None:
    source = write(ds, tmp_path / f"{name}.dcm")
    incoming = store.files.incoming / f"{name}.part"
    incoming.write_bytes(source.read_bytes())
    meta = InstanceMeta(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality=modality,
    )
    store.store(incoming, meta, "GAMMA1")


def test_routing_queues_versions_and_ignores_others(database: Database, tmp_path: Path) -> None:
    files = FileStore(tmp_path / "store")
    store = InstanceStore(database, files)
    mibi = nm_dataset(seed=1)
    ct = nm_dataset(seed=2, sop_class_uid=CT_STORAGE)
    ct.Modality, ct.StudyDescription = "CT", "CHEST"
    _store(store, tmp_path, mibi, "a", "NM")
    _store(store, tmp_path, ct, "b", "CT")
    with database.session() as session, session.begin():
        for study in session.scalars(select(Study)):
            study.transition(StudyState.STABLE)
    assert route_stable_studies(database, files, RoutingConfig()) == [1]
    with database.session() as session:
        by_uid = {s.study_instance_uid: s for s in session.scalars(select(Study))}
    assert by_uid[mibi.StudyInstanceUID].state is StudyState.QUEUED
    assert by_uid[ct.StudyInstanceUID].state is StudyState.IGNORED
    assert "modality CT" in (by_uid[ct.StudyInstanceUID].state_reason or "")
    [job] = claim_jobs(database, "w", 60, 4)
    done = CompletedJob({}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",), ())
    complete_job(database, "w", job.id, done)
    # Our own SR coming back (PACS forwards it) does not reopen the study ...
    sr = nm_dataset(mibi.StudyInstanceUID, seed=3, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34")
    _store(store, tmp_path, sr, "c", "SR")
    with database.session() as session:
        assert session.get_one(Study, job.study_id).state is StudyState.DONE
    # ... a late image does, and its analysis is version 2, superseding version 1.
    _store(store, tmp_path, nm_dataset(mibi.StudyInstanceUID, seed=4), "d", "NM")
    with database.session() as session, session.begin():
        session.get_one(Study, job.study_id).transition(StudyState.STABLE)
    route_stable_studies(database, files, RoutingConfig())
    [second] = claim_jobs(database, "w", 60, 4)
    assert second.version == 2 and second.predecessor_sr_path == "sr.dcm"
    assert second.sr_series_instance_uid == "1.2.8" and len(second.paths) == 2
