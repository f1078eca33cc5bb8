"""Storage and assembly in-process: rows, idempotency, state machine, stability sweep.

The tests that touch a database run on SQLite and on PostgreSQL (``database_url``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from factory import nm_dataset, write
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.storage import (
    FileStore,
    InstanceMeta,
    InstanceStore,
    StoreOutcome,
    StudyState,
    open_database,
)
from mibi_node.storage.database import Outage
from mibi_node.storage.models import InvalidTransitionError, check_transition
from mibi_node.web.reader import Reader
from mibi_node.web.summaries import StudyRow, study_rows


def _studies(store: InstanceStore) -> list[StudyRow]:
    """The studies as ``mibi-node status`` and the status page list them."""
    reader = Reader(store.database)
    try:
        return study_rows(reader, store.files)
    finally:
        reader.dispose()


@pytest.fixture
def store(tmp_path: Path, database_url: str) -> Iterator[InstanceStore]:
    """An instance store on an SQLite file, then on a PostgreSQL database."""
    database = open_database(database_url)
    yield InstanceStore(database, FileStore(tmp_path / "store"))
    database.dispose()


def _receive(store: InstanceStore, tmp_path: Path, ds, name: str) -> StoreOutcome:  # type: ignore[no-untyped-def]
    source = write(ds, tmp_path / f"{name}.dcm")
    incoming = store.files.incoming / f"{name}.part"
    shutil.copy(source, incoming)
    meta = InstanceMeta(
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
        modality="NM",
    )
    return store.store(incoming, meta, "GAMMA1")


def test_store_duplicate_replace_and_counts(store: InstanceStore, tmp_path: Path) -> None:
    first = nm_dataset(seed=1)
    assert _receive(store, tmp_path, first, "a") is StoreOutcome.STORED
    assert _receive(store, tmp_path, first, "b") is StoreOutcome.DUPLICATE
    changed = nm_dataset(first.StudyInstanceUID, seed=2, sop_instance_uid=first.SOPInstanceUID)
    assert _receive(store, tmp_path, changed, "c") is StoreOutcome.REPLACED
    other = nm_dataset(first.StudyInstanceUID, seed=3)
    assert _receive(store, tmp_path, other, "d") is StoreOutcome.STORED
    [study] = _studies(store)
    assert study.instance_count == 2
    assert study.modalities == "NM"
    assert study.calling_ae_title == "GAMMA1"
    # Nothing is left in .incoming except the duplicate's temporary file (pynetdicom deletes it).
    assert sorted(p.name for p in store.files.incoming.iterdir()) == ["b.part"]


def test_stability_sweep_and_reopening(store: InstanceStore, tmp_path: Path) -> None:
    ds = nm_dataset(seed=5)
    _receive(store, tmp_path, ds, "a")
    assert mark_stable_studies(store.database, quiet_seconds=60) == []
    time.sleep(0.3)
    assert len(mark_stable_studies(store.database, quiet_seconds=0.2)) == 1
    assert _studies(store)[0].state == "STABLE"
    # A late instance reopens the study.
    _receive(store, tmp_path, nm_dataset(ds.StudyInstanceUID, seed=6), "b")
    [study] = _studies(store)
    assert study.state == "RECEIVING" and study.instance_count == 2


def test_state_machine_refuses_invalid_transitions() -> None:
    check_transition(StudyState.RECEIVING, StudyState.STABLE)
    check_transition(StudyState.RUNNING, StudyState.DONE)
    with pytest.raises(InvalidTransitionError, match="RECEIVING to DONE"):
        check_transition(StudyState.RECEIVING, StudyState.DONE)
    with pytest.raises(InvalidTransitionError):
        check_transition(StudyState.IGNORED, StudyState.DONE)
    # An ignored study can be queued by hand (mibi-node requeue), never run directly.
    check_transition(StudyState.IGNORED, StudyState.QUEUED)
    with pytest.raises(InvalidTransitionError):
        check_transition(StudyState.IGNORED, StudyState.RUNNING)


def test_an_outage_is_logged_when_it_starts_as_a_reminder_and_when_it_ends() -> None:
    outage = Outage(remind_seconds=0.2)
    assert not outage.recovered(), "nothing to recover from yet"
    assert outage.failed(), "the first failure is logged"
    assert outage.lasting() == ""
    assert [outage.failed() for _ in range(20)] == [False] * 20, "retries are not"
    time.sleep(0.25)
    assert outage.failed(), "a reminder once remind_seconds have passed"
    assert not outage.failed()
    assert outage.recovered(), "the end is logged"
    assert not outage.recovered(), "once"
    assert outage.failed(), "a new outage is logged again"
