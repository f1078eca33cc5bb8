"""Recording a received instance: durable file first, then its row, then Success.

This is the one place that decides what happens to an instance the network hands over:
new, re-sent unchanged (idempotent), or re-sent with different content (replaced).
"""

from __future__ import annotations

import enum
import filecmp
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Row, Table, insert, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore, sha256_file
from mibi_node.storage.models import Instance, Study, StudyState, check_transition, utcnow

__all__ = ["InstanceMeta", "InstanceStore", "StoreOutcome", "is_image_instance"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceMeta:
    """What the store needs to know of an instance (read from its header, not its pixels)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    study_description: str | None = None
    accession_number: str = ""
    #: The camera or scanner: Station Name, Manufacturer Model Name, Device Serial Number.
    station_name: str = ""
    manufacturer_model_name: str = ""
    device_serial_number: str = ""

    def station(self) -> dict[str, str]:
        """The study row's header facts this instance gives (none from a non-image)."""
        if not is_image_instance(self.modality, self.sop_class_uid):
            return {}
        values = {
            "accession_number": self.accession_number,
            "station_name": self.station_name,
            "manufacturer_model_name": self.manufacturer_model_name,
            "device_serial_number": self.device_serial_number,
        }
        return {key: value for key, value in values.items() if value}


class StoreOutcome(enum.StrEnum):
    """What storing one instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


_STUDY: Table = Study.__table__  # type: ignore[assignment]
_INSTANCE: Table = Instance.__table__  # type: ignore[assignment]

_REOPEN_STATES = {
    StudyState.STABLE,
    StudyState.RUNNING,
    StudyState.IGNORED,
    StudyState.AWAITING_PHASE,
    StudyState.QUEUED,
    StudyState.DONE,
    StudyState.FAILED,
}


#: Modalities and SOP class prefixes of objects that are not images: structured reports
#: (ours among them, when PACS forwards them back), key object selections, presentation
#: states and encapsulated documents. They are stored but never reopen an analysed study.
_NON_IMAGE_MODALITIES = frozenset({"SR", "KO", "PR", "DOC"})
_NON_IMAGE_CLASS_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports and key object selection
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated documents
)


def is_image_instance(modality: str, sop_class_uid: str) -> bool:
    """Whether an instance is an image (and so can change what the model sees)."""
    if modality.upper() in _NON_IMAGE_MODALITIES:
        return False
    return not sop_class_uid.startswith(_NON_IMAGE_CLASS_PREFIXES)


def _new_study(meta: InstanceMeta, calling_ae_title: str, now: datetime) -> dict[str, Any]:
    """The row of a study whose first instance is being stored."""
    return {
        "study_instance_uid": meta.study_instance_uid,
        "state": StudyState.RECEIVING.value,
        "calling_ae_title": calling_ae_title,
        "study_description": meta.study_description,
        "first_received_at": now,
        "last_received_at": now,
        "state_changed_at": now,
        "instance_count": 0,
        "modalities": "",
        **meta.station(),
    }


class InstanceStore:
    """Files plus rows: the durable record of every acknowledged instance.

    Writes go through SQLAlchemy Core (not the ORM): this is the node's hot path, and one
    C-STORE costs one short ``BEGIN IMMEDIATE`` transaction, taken under the database's
    writer lock (see :meth:`Database.write_lock`).

    Parameters
    ----------
    database
        The process's database.
    files
        The file store; temporary files handed to :meth:`store` must be on its filesystem.
    """

    def __init__(self, database: Database, files: FileStore) -> None:
        self.database = database
        self.files = files

    def store(self, temporary: Path, meta: InstanceMeta, calling_ae_title: str) -> StoreOutcome:
        """Make ``temporary`` a stored instance; returns only once it is durable.

        The file is renamed into the store (so ``temporary`` is gone afterwards unless the
        instance was a duplicate) and the Instance and Study rows are committed.
        """
        digest = sha256_file(temporary)
        size = temporary.stat().st_size
        relative = self.files.relative_path(meta.study_instance_uid, meta.sop_instance_uid)
        # The path is a function of the UIDs, so a file already there is the only way this
        # can be a re-send; new instances (the common case) cost no extra query. The same
        # bytes without their row are what a crash between the rename and the commit
        # leaves (the sender got no Success): that instance is recorded now.
        target = self.files.absolute(relative)
        if (
            target.is_file()
            and filecmp.cmp(temporary, target, shallow=False)
            and self._is_recorded(meta.sop_instance_uid, relative, digest)
        ):
            return StoreOutcome.DUPLICATE
        self.files.place(temporary, relative)
        with self.database.write_lock():
            outcome, old_path = self._commit(meta, relative, digest, size, calling_ae_title)
        if old_path is not None:
            self.files.remove(old_path)
        if outcome is StoreOutcome.REPLACED:
            logger.warning(
                "instance re-sent with different content replaced the stored one (%s)",
                relative,
            )
        return outcome

    def _is_recorded(self, sop_instance_uid: str, relative: str, digest: str) -> bool:
        """Whether the instance's row names this file with these bytes."""
        with self.database.engine.connect() as connection:
            row = connection.execute(
                select(_INSTANCE.c.path, _INSTANCE.c.sha256).where(
                    _INSTANCE.c.sop_instance_uid == sop_instance_uid
                )
            ).first()
        return row is not None and (row.path, row.sha256) == (relative, digest)

    def _lock_study(
        self, connection: Connection, meta: InstanceMeta, calling_ae_title: str, now: datetime
    ) -> Row[Any, Any, Any, Any, Any, Any, Any] | None:
        """The study's row, locked on PostgreSQL (``None``: the study is new, insert it).

        SQLite's ``BEGIN IMMEDIATE`` already makes this transaction the only writer. On
        PostgreSQL the instances of one study commit one at a time (the study's row lock),
        and a study that another receiver is inserting right now is waited for and used.
        """
        query = (
            select(
                _STUDY.c.id,
                _STUDY.c.state,
                _STUDY.c.modalities,
                _STUDY.c.station_name,
                _STUDY.c.manufacturer_model_name,
                _STUDY.c.device_serial_number,
                _STUDY.c.accession_number,
            )
            .where(_STUDY.c.study_instance_uid == meta.study_instance_uid)
            .with_for_update()
        )
        study = connection.execute(query).first()
        if study is not None or not self.database.is_postgresql:
            return study
        connection.execute(
            pg_insert(_STUDY)
            .values(_new_study(meta, calling_ae_title, now))
            .on_conflict_do_nothing(index_elements=["study_instance_uid"])
        )
        return connection.execute(query).first()

    def _commit(
        self, meta: InstanceMeta, relative: str, digest: str, size: int, calling_ae_title: str
    ) -> tuple[StoreOutcome, str | None]:
        now = utcnow()
        with self.database.engine.begin() as connection:
            study = self._lock_study(connection, meta, calling_ae_title, now)
            if study is None:
                inserted = connection.execute(
                    insert(_STUDY).values(_new_study(meta, calling_ae_title, now))
                ).inserted_primary_key
                study_id = cast(Row[Any], inserted)[0]  # an INSERT always has a primary key
                state, modalities = StudyState.RECEIVING, ""
            else:
                study_id, state, modalities = study.id, StudyState(study.state), study.modalities
            changes: dict[str, object] = {"last_received_at": now}
            if study is not None:
                # The first image that names the camera (or accession) fills the row in.
                known = study._mapping
                changes.update((k, v) for k, v in meta.station().items() if not known[k])
            image = is_image_instance(meta.modality, meta.sop_class_uid)
            if state in _REOPEN_STATES and image:
                check_transition(state, StudyState.RECEIVING)
                changes.update(
                    state=StudyState.RECEIVING.value,
                    state_reason="new instance received",
                    state_changed_at=now,
                )
            if meta.modality and meta.modality not in modalities.split("\\"):
                changes["modalities"] = "\\".join(filter(None, [modalities, meta.modality]))
            existing = connection.execute(
                select(
                    _INSTANCE.c.id, _INSTANCE.c.sha256, _INSTANCE.c.path, _INSTANCE.c.study_id
                ).where(_INSTANCE.c.sop_instance_uid == meta.sop_instance_uid)
            ).first()
            values = {
                "sop_class_uid": meta.sop_class_uid,
                "series_instance_uid": meta.series_instance_uid,
                "study_id": study_id,
                "modality": meta.modality,
                "transfer_syntax_uid": meta.transfer_syntax_uid,
                "path": relative,
                "sha256": digest,
                "size": size,
                "calling_ae_title": calling_ae_title,
                "received_at": now,
            }
            outcome, old_path = StoreOutcome.STORED, None
            if existing is None:
                connection.execute(
                    insert(_INSTANCE).values(sop_instance_uid=meta.sop_instance_uid, **values)
                )
                changes["instance_count"] = _STUDY.c.instance_count + 1
            else:
                same = existing.sha256 == digest
                outcome = StoreOutcome.DUPLICATE if same else StoreOutcome.REPLACED
                if existing.path != relative:
                    old_path = existing.path
                if existing.study_id != study_id:
                    connection.execute(
                        update(_STUDY)
                        .where(_STUDY.c.id == existing.study_id)
                        .values(instance_count=_STUDY.c.instance_count - 1)
                    )
                    changes["instance_count"] = _STUDY.c.instance_count + 1
                connection.execute(
                    update(_INSTANCE).where(_INSTANCE.c.id == existing.id).values(**values)
                )
            connection.execute(update(_STUDY).where(_STUDY.c.id == study_id).values(**changes))
        return outcome, old_path
