"""Retention on a real store: files of delivered studies go after ``retention.days``; rows,
audit and anything not yet delivered stay."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from factory import nm_dataset, write
from mibi_node.assembly.routing import route_stable_studies
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.config import DispatchConfig, RetentionConfig, RoutingConfig
from mibi_node.dispatch.deliveries import deliver
from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job
from mibi_node.retention import _remove_study_files, expired_studies, sweep_retention
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore
from mibi_node.storage.models import (
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    Study,
    utcnow,
)
from node import write_config
from ports import free_port


def _receive(store: InstanceStore, folder: Path, count: int) -> str:
    """Store ``count`` NM instances of one new study as reception would; returns its UID."""
    study_uid = None
    for index in range(count):
        ds = nm_dataset(study_uid, seed=index)
        study_uid = ds.StudyInstanceUID
        source = write(ds, folder / f"{ds.SOPInstanceUID}.dcm")
        incoming = store.files.incoming / f"{ds.SOPInstanceUID}.part"
        shutil.copyfile(source, incoming)
        meta = InstanceMeta(
            study_instance_uid=ds.StudyInstanceUID,
            series_instance_uid=ds.SeriesInstanceUID,
            sop_instance_uid=ds.SOPInstanceUID,
            sop_class_uid=ds.SOPClassUID,
            transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
            modality="NM",
        )
        store.store(incoming, meta, "GAMMA1")
    assert study_uid is not None
    return str(study_uid)


@pytest.fixture
def pacs(tmp_path: Path, require_tool):
    require_tool("storescp")
    port = free_port()
    folder = tmp_path / "pacs"
    folder.mkdir()
    process = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(folder), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    yield {"ae_title": "PACS", "host": "127.0.0.1", "port": port}, folder
    process.terminate()
    process.wait(10)


def _files_of(database: Database, files: FileStore, study_uid: str) -> list[Path]:
    with database.session() as session:
        paths = session.scalars(
            select(Instance.path).join(Study).where(Study.study_instance_uid == study_uid)
        ).all()
    return [files.absolute(path) for path in paths]


@pytest.mark.peers
def test_only_delivered_studies_lose_their_files_after_the_period(tmp_path: Path, pacs) -> None:
    destination, pacs_folder = pacs
    database = open_database(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    files = FileStore(tmp_path / "store")
    store = InstanceStore(database, files)
    delivered = _receive(store, tmp_path / "a", 3)
    pending = _receive(store, tmp_path / "b", 2)
    unsent = _receive(store, tmp_path / "c", 2)
    time.sleep(0.05)
    mark_stable_studies(database, 0.01)
    route_stable_studies(database, files, RoutingConfig(modalities=("NM",)))
    jobs = {job.study_instance_uid: job for job in claim_jobs(database, "w", 60, 3)}
    assert set(jobs) == {delivered, pending, unsent}
    results = tmp_path / "results"
    results.mkdir()
    # The "result" sent is one of the study's own images: storescp takes any instance.
    shutil.copyfile(_files_of(database, files, delivered)[0], results / "sr.dcm")
    dead = {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    for uid, destinations in ((delivered, (destination,)), (pending, (dead,)), (unsent, ())):
        done = CompletedJob(
            {"predicted": "adenoma"}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",),
            destinations,
        )  # fmt: skip
        complete_job(database, "w", jobs[uid].id, done)
    outcomes = deliver(
        database, results, DispatchConfig(timeout=5), calling_ae_title="MIBI_NODE", owner="d"
    )
    assert sorted(outcome.state.value for outcome in outcomes) == ["DONE", "PENDING"]
    assert len(list(pacs_folder.iterdir())) == 1

    config = RetentionConfig(days=30)
    # Delivered a moment ago: nothing is old enough.
    assert sweep_retention(database, files, config).studies == 0
    later = utcnow() + timedelta(days=31)
    assert expired_studies(database, 30, later) != []
    outcome = sweep_retention(database, files, config, now=later)
    assert (outcome.studies, outcome.files) == (1, 3)
    with database.session() as session:
        sizes = session.scalars(
            select(Instance.size).join(Study).where(Study.study_instance_uid == delivered)
        ).all()
    assert outcome.bytes == sum(sizes) > 0
    assert not any(path.exists() for path in _files_of(database, files, delivered))
    # Pending (PACS down) and never-sent studies keep every file.
    assert all(path.exists() for path in _files_of(database, files, pending))
    assert all(path.exists() for path in _files_of(database, files, unsent))
    # The rows stay, with one audit event saying what went.
    with database.session() as session:
        assert session.scalar(select(Study).where(Study.study_instance_uid == delivered))
        [event] = session.scalars(select(AuditEvent).where(AuditEvent.kind == "retention")).all()
        assert event.detail["files"] == 3
    assert len(_files_of(database, files, delivered)) == 3
    # A second sweep finds nothing more.
    assert sweep_retention(database, files, config, now=later).studies == 0
    # days = 0 keeps everything for ever.
    assert sweep_retention(database, files, RetentionConfig(days=0), now=later).studies == 0
    database.dispose()


def test_cli_retention_refuses_when_disabled_and_dry_runs(tmp_path: Path) -> None:
    data = tmp_path / "var"
    open_database(f"sqlite:///{data / 'mibi-node.sqlite3'}").dispose()
    off = write_config(tmp_path / "off.toml", {"retention": {"days": 0}})
    command = [sys.executable, "-m", "mibi_node.cli", "retention", "--data-dir", str(data)]
    refused = subprocess.run([*command, "--config", str(off)], capture_output=True, text=True)
    assert refused.returncode != 0
    assert "retention.days is 0" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    on = write_config(tmp_path / "on.toml", {"retention": {"days": 30}})
    dry = subprocess.run(
        [*command, "--config", str(on), "--dry-run"], capture_output=True, text=True
    )
    assert dry.returncode == 0, dry.stderr
    assert "0 studies would have files removed" in dry.stdout


def _delivered_study(database: Database, files: FileStore, folder: Path) -> tuple[str, int]:
    """One received, analysed study whose result the PACS acknowledged just now."""
    store = InstanceStore(database, files)
    uid = _receive(store, folder, 2)
    time.sleep(0.05)
    mark_stable_studies(database, 0.01)
    route_stable_studies(database, files, RoutingConfig(modalities=("NM",)))
    [job] = claim_jobs(database, "w", 60, 1)
    done = CompletedJob(
        {"predicted": "adenoma"}, {}, "b", "sr.dcm", "1.2.9", "1.2.8", ("sr.dcm",),
        ({"ae_title": "PACS", "host": "127.0.0.1", "port": 104},),
    )  # fmt: skip
    [delivery_id] = complete_job(database, "w", job.id, done)
    # The acknowledgement as the dispatch sweep records it (its own tests send for real).
    with database.session() as session, session.begin():
        delivery = session.get_one(Delivery, delivery_id)
        delivery.transition(DeliveryState.SENDING)
        delivery.transition(DeliveryState.DONE)
        delivery.delivered_at = utcnow()
    return uid, job.study_id


def _retention_events(database: Database) -> int:
    with database.session() as session:
        return len(session.scalars(select(AuditEvent).where(AuditEvent.kind == "retention")).all())


def test_a_study_reopened_after_the_query_keeps_its_files(
    database_url: str, tmp_path: Path
) -> None:
    database = open_database(database_url)
    files = FileStore(tmp_path / "store")
    uid, study_id = _delivered_study(database, files, tmp_path / "a")
    later = utcnow() + timedelta(days=31)
    assert expired_studies(database, 30, later) == [study_id]
    # A late image arrives between the sweep's query and the removal: the study is being
    # received again, its files are needed for the new analysis.
    ds = nm_dataset(uid, seed=7)
    source = write(ds, tmp_path / "late.dcm")
    incoming = files.incoming / "late.part"
    shutil.copyfile(source, incoming)
    meta = InstanceMeta(
        uid, ds.SeriesInstanceUID, ds.SOPInstanceUID, ds.SOPClassUID,
        ds.file_meta.TransferSyntaxUID, "NM",
    )  # fmt: skip
    InstanceStore(database, files).store(incoming, meta, "GAMMA1")
    assert _remove_study_files(database, files, study_id, 30) is None
    assert all(path.exists() for path in _files_of(database, files, uid))
    assert len(_files_of(database, files, uid)) == 3
    assert _retention_events(database) == 0
    database.dispose()


@pytest.mark.postgresql
def test_two_receivers_sweeping_at_once_remove_a_study_once(
    postgres_server, tmp_path: Path
) -> None:
    url = str(postgres_server.create_database())
    database, other = open_database(url), Database(url)
    files = FileStore(tmp_path / "store")
    uid, study_id = _delivered_study(database, files, tmp_path / "a")
    later = utcnow() + timedelta(days=31)
    config = RetentionConfig(days=30)
    # The other receiver's sweep holds the study (it is removing its files right now):
    # this one skips it instead of waiting, and records nothing.
    with other.session() as session, session.begin():
        session.execute(select(Study.id).where(Study.id == study_id).with_for_update())
        assert sweep_retention(database, files, config, now=later).studies == 0
        assert all(path.exists() for path in _files_of(database, files, uid))
    # Once it is done (its audit row committed), neither finds the study again.
    assert sweep_retention(other, files, config, now=later).studies == 1
    assert sweep_retention(database, files, config, now=later).studies == 0
    assert not any(path.exists() for path in _files_of(database, files, uid))
    assert _retention_events(database) == 1
    database.dispose()
    other.dispose()
