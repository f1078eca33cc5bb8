"""Recording a received instance: durable file first, then its row, then Success.

This is the one place that decides what happens to an instance the network hands over:
new, re-sent unchanged (idempotent), or re-sent with different content (replaced).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore, sha256_file
from mibi_node.storage.models import Instance, Study, StudyState, utcnow

__all__ = ["InstanceMeta", "InstanceStore", "StoreOutcome"]

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


class StoreOutcome(enum.StrEnum):
    """What storing one instance did."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REPLACED = "replaced"


_REOPEN_STATES = {
    StudyState.STABLE,
    StudyState.IGNORED,
    StudyState.AWAITING_PHASE,
    StudyState.QUEUED,
    StudyState.DONE,
    StudyState.FAILED,
}


class InstanceStore:
    """Files plus rows: the durable record of every acknowledged instance.

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
        with self.database.session() as session:
            existing = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
            )
            # Re-sent unchanged (and the file is really there): nothing to do.
            if (
                existing is not None
                and existing.sha256 == digest
                and self.files.absolute(existing.path).is_file()
            ):
                return StoreOutcome.DUPLICATE
        self.files.place(temporary, relative)
        try:
            return self._commit(meta, relative, digest, size, calling_ae_title)
        except IntegrityError:
            # Two associations raced with the same new SOP Instance UID: the other one won
            # the insert, so this one is now a re-send of it.
            return self._commit(meta, relative, digest, size, calling_ae_title)

    def _commit(
        self, meta: InstanceMeta, relative: str, digest: str, size: int, calling_ae_title: str
    ) -> StoreOutcome:
        now = utcnow()
        with self.database.session() as session, session.begin():
            study = session.scalar(
                select(Study).where(Study.study_instance_uid == meta.study_instance_uid)
            )
            if study is None:
                study = Study(
                    study_instance_uid=meta.study_instance_uid,
                    state=StudyState.RECEIVING,
                    calling_ae_title=calling_ae_title,
                    study_description=meta.study_description,
                    first_received_at=now,
                    last_received_at=now,
                    state_changed_at=now,
                    instance_count=0,
                    modalities="",
                )
                session.add(study)
                session.flush()
            elif study.state in _REOPEN_STATES:
                study.transition(StudyState.RECEIVING, "new instance received")
            existing = session.scalar(
                select(Instance).where(Instance.sop_instance_uid == meta.sop_instance_uid)
            )
            outcome = StoreOutcome.STORED
            old_path = None
            if existing is None:
                session.add(
                    Instance(
                        sop_instance_uid=meta.sop_instance_uid,
                        sop_class_uid=meta.sop_class_uid,
                        series_instance_uid=meta.series_instance_uid,
                        study_id=study.id,
                        modality=meta.modality,
                        transfer_syntax_uid=meta.transfer_syntax_uid,
                        path=relative,
                        sha256=digest,
                        size=size,
                        calling_ae_title=calling_ae_title,
                        received_at=now,
                    )
                )
                study.instance_count += 1
            else:
                outcome = (
                    StoreOutcome.DUPLICATE if existing.sha256 == digest else StoreOutcome.REPLACED
                )
                if existing.path != relative:
                    old_path = existing.path
                if existing.study_id != study.id:
                    existing.study.instance_count -= 1
                    study.instance_count += 1
                existing.study_id = study.id
                existing.sop_class_uid = meta.sop_class_uid
                existing.series_instance_uid = meta.series_instance_uid
                existing.modality = meta.modality
                existing.transfer_syntax_uid = meta.transfer_syntax_uid
                existing.path = relative
                existing.sha256 = digest
                existing.size = size
                existing.calling_ae_title = calling_ae_title
                existing.received_at = now
            if meta.modality and meta.modality not in study.modalities.split("\\"):
                study.modalities = "\\".join(filter(None, [study.modalities, meta.modality]))
            study.last_received_at = now
        if old_path is not None:
            self.files.remove(old_path)
        if outcome is StoreOutcome.REPLACED:
            logger.warning(
                "instance re-sent with different content replaced the stored one (%s)",
                relative,
            )
        return outcome
