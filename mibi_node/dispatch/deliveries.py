"""Deliveries: every result to every destination, with retries until it is acknowledged.

Each result gets one delivery row per destination when its job completes. A sender (the
worker right after the job, and the node's dispatch sweep for everything due) claims rows
with a lease, sends their files in one association per destination and records the
outcome: DONE with the status, or PENDING again after an exponential backoff (``30 s``
doubling to ``1 h``), or FAILED after ``dispatch.max_attempts``. A sender killed mid-send
leaves a SENDING row whose lease expires once the send's timeouts are certainly over
(``dispatch.timeout`` x (3 + files)); it is sent again (PACS treats a re-sent SOP Instance
UID as the same object, so the study never shows two copies).

DONE means the PACS acknowledged every C-STORE. Where the destination asks for it
(``commitment``), a DONE delivery's commitment becomes PENDING and the commitment sweep
(:mod:`mibi_node.dispatch.commitment`) asks the PACS whether it keeps the files.

A DICOMweb destination (``kind = "dicomweb"``) gets the same rows, retries and audit; its
files go in one STOW-RS request (:mod:`mibi_node.dispatch.dicomweb`), and DONE means the
response listed every file as stored, which is also its commitment (COMMITTED at once).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select

from mibi_node import audit
from mibi_node.config import DispatchConfig
from mibi_node.dispatch.destinations import (
    AnyDestination,
    Destination,
    DicomwebDestination,
    destination_from_row,
)
from mibi_node.dispatch.dicomweb import store_instances
from mibi_node.dispatch.scu import SendResult, send_files
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.models import (
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    utcnow,
)

__all__ = ["DeliveryOutcome", "backoff_seconds", "deliver", "resend_study"]

logger = logging.getLogger(__name__)

#: Timeouts one association may spend besides its C-STOREs: connect, associate, release.
_ASSOCIATION_TIMEOUTS = 3


@dataclass(frozen=True)
class DeliveryOutcome:
    """What one send of one delivery did."""

    delivery_id: int
    state: DeliveryState
    status: int | None
    message: str


def backoff_seconds(attempts: int, config: DispatchConfig) -> float:
    """Wait before the next try after ``attempts`` failed ones: doubling, capped."""
    return min(
        config.initial_backoff_seconds * 2 ** max(attempts - 1, 0), config.max_backoff_seconds
    )


@dataclass(frozen=True)
class _Claimed:
    id: int
    destination: AnyDestination
    files: tuple[str, ...]


def _lease_seconds(claimed: Sequence[_Claimed], timeout: float) -> float:
    """The longest the sends of ``claimed`` can take: every wait is bounded by ``timeout``.

    A sender that was killed mid-send leaves its rows SENDING; they are taken over once this
    much time has passed, not later (so a crash delays an SR by about this much).
    """
    destinations = len({item.destination for item in claimed})
    files = sum(len(item.files) for item in claimed)
    return timeout * (_ASSOCIATION_TIMEOUTS * destinations + files) + timeout


def _claim(
    database: Database, owner: str, delivery_ids: Sequence[int] | None, limit: int, timeout: float
) -> list[_Claimed]:
    now = utcnow()
    with database.write_lock(), database.session() as session, session.begin():
        query = select(Delivery).where(
            or_(
                (Delivery.state == DeliveryState.PENDING) & (Delivery.next_attempt_at <= now),
                (Delivery.state == DeliveryState.SENDING) & (Delivery.lease_expires_at < now),
            )
        )
        if delivery_ids is not None:
            query = query.where(Delivery.id.in_(delivery_ids))
        # PostgreSQL: rows another sender is claiming right now are skipped (SQLite's
        # BEGIN IMMEDIATE already makes this the only writer; its SQL has no FOR UPDATE).
        query = query.order_by(Delivery.next_attempt_at).limit(limit)
        rows = session.scalars(query.with_for_update(skip_locked=True)).all()
        claimed = []
        for row in rows:
            if row.state is DeliveryState.SENDING:
                row.transition(DeliveryState.PENDING)  # taken over from a stopped sender
            row.transition(DeliveryState.SENDING)
            row.lease_owner = owner
            row.attempts += 1
            data: dict[str, Any] = dict(row.destination)
            files = tuple(str(f) for f in data.pop("files", ()))
            try:
                destination = destination_from_row(data)
            except ValueError as exc:
                row.transition(DeliveryState.FAILED)
                row.last_message = f"the recorded destination is not valid: {exc}"
                continue
            claimed.append(_Claimed(row.id, destination, files))
        expires = now + timedelta(seconds=_lease_seconds(claimed, timeout))
        for row in rows:
            if row.state is DeliveryState.SENDING:
                row.lease_expires_at = expires
        return claimed


def _record(
    database: Database,
    delivery_id: int,
    owner: str,
    results: Sequence[SendResult],
    config: DispatchConfig,
) -> DeliveryOutcome | None:
    ok = bool(results) and all(result.success for result in results)
    failed = next((result for result in results if not result.success), None)
    shown = failed or (results[-1] if results else None)
    status = shown.status if shown else None
    message = shown.message if shown else "nothing to send"
    with database.write_lock(), database.session() as session, session.begin():
        row = session.get_one(Delivery, delivery_id, with_for_update=True)
        if row.state is not DeliveryState.SENDING or row.lease_owner != owner:
            # Another sender took the row over (this one outlived its lease): its outcome
            # counts, this one's is dropped.
            logger.warning("delivery #%d was taken over by another sender", row.id)
            return None
        row.last_status = status
        row.last_message = message
        if ok:
            row.transition(DeliveryState.DONE)
            row.delivered_at = utcnow()
            _await_commitment(row)
        elif row.attempts >= config.max_attempts:
            row.transition(DeliveryState.FAILED)
            logger.error(
                "delivery #%d to %s failed %d times; giving up: %s",
                row.id,
                row.label,
                row.attempts,
                message,
            )
        else:
            row.transition(DeliveryState.PENDING)
            wait = backoff_seconds(row.attempts, config)
            row.next_attempt_at = utcnow() + timedelta(seconds=wait)
            logger.warning(
                "delivery #%d to %s failed (attempt %d of %d), next try in %.0f s: %s",
                row.id,
                row.label,
                row.attempts,
                config.max_attempts,
                wait,
                message,
            )
        outcome = {DeliveryState.DONE: "sent", DeliveryState.FAILED: "failed"}.get(
            DeliveryState(row.state), "retry"
        )
        audit.add(
            session,
            "delivery",
            outcome,
            actor=row.label,
            study_id=session.get_one(Job, row.job_id).study_id,
            message="" if ok else message,
            detail={
                "delivery": row.id,
                "attempt": row.attempts,
                "status": None if status is None else f"0x{status:04X}",
            },
        )
        return DeliveryOutcome(row.id, DeliveryState(row.state), status, message)


def _await_commitment(row: Delivery) -> None:
    """A delivery just DONE: its commitment is due now, unless its destination asks none.

    A new Transaction UID is made at the next N-ACTION; ``commit_resends`` is kept (it
    bounds the stores sent again because the PACS reported failures). A STOW-RS delivery is
    DONE only when the response listed every file as stored: that is its commitment.
    """
    if row.destination.get("kind") == "dicomweb":
        row.commitment = CommitmentState.COMMITTED
        row.committed_at = utcnow()
        row.commit_message = "the STOW-RS response listed every instance as stored"
        row.commit_transaction_uid = None
        row.commit_attempts = 0
        row.commit_due_at = None
        return
    asked = row.destination.get("commitment", "none") != "none"
    row.commitment = CommitmentState.PENDING if asked else CommitmentState.NONE
    row.commit_transaction_uid = None
    row.commit_attempts = 0
    row.commit_due_at = utcnow() if asked else None
    row.committed_at = None
    row.commit_message = None


def deliver(
    database: Database,
    results_dir: Path,
    config: DispatchConfig,
    *,
    calling_ae_title: str,
    owner: str,
    delivery_ids: Sequence[int] | None = None,
    limit: int = 32,
) -> list[DeliveryOutcome]:
    """Send every due delivery (or just ``delivery_ids``), one association per destination.

    Never raises for a network or peer problem: each is recorded on its delivery.
    """
    claimed = _claim(database, owner, delivery_ids, limit, config.timeout)
    by_destination: dict[AnyDestination, list[_Claimed]] = {}
    for item in claimed:
        by_destination.setdefault(item.destination, []).append(item)
    outcomes = []
    for destination, items in by_destination.items():
        paths = [results_dir / name for item in items for name in item.files]
        if isinstance(destination, DicomwebDestination):
            sent = store_instances(
                paths, _with_secrets(destination, config), timeout=config.timeout
            )
        else:
            sent = send_files(
                paths, destination, calling_ae_title=calling_ae_title, timeout=config.timeout
            )
        start = 0
        for item in items:
            mine = sent[start : start + len(item.files)]
            start += len(item.files)
            outcome = _record(database, item.id, owner, mine, config)
            if outcome is not None:
                outcomes.append(outcome)
    return outcomes


def _with_secrets(destination: DicomwebDestination, config: DispatchConfig) -> DicomwebDestination:
    """The configured destination that a delivery row names, with its token or password.

    The rows never hold secrets (they are excluded from the dump); a destination that is no
    longer configured is sent to without them, and its refusal is recorded on the row.
    """
    recorded = destination.model_dump(mode="json")
    for configured in config.destinations:
        if (
            isinstance(configured, DicomwebDestination)
            and configured.model_dump(mode="json") == recorded
        ):
            return configured
    return destination


def resend_study(
    database: Database,
    study_instance_uid: str,
    destinations: Sequence[Destination] = (),
    actor: str = "cli",
) -> int:
    """Send a study's latest result again (``mibi-node resend``); returns the deliveries due.

    The latest result's deliveries become due now; ``destinations`` not among them get new
    deliveries.

    Raises
    ------
    MibiNodeError
        No such study, or it has no result yet.
    """
    with database.write_lock(), database.session() as session, session.begin():
        study = session.scalars(
            select(Study).where(Study.study_instance_uid == study_instance_uid)
        ).first()
        if study is None:
            raise MibiNodeError(f"no study with Study Instance UID {study_instance_uid}")
        job = session.scalars(
            select(Job)
            .where(Job.study_id == study.id, Job.state == JobState.DONE, Job.shadow.is_(False))
            .order_by(Job.version.desc())
        ).first()
        if job is None or not job.sr_path:
            raise MibiNodeError("the study has no result yet; nothing to resend")
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.job_id == job.id)
            .order_by(Delivery.id)  # the result's own first; assessments come later
            .with_for_update()
        ).all()
        files: list[str] = [job.sr_path]
        if rows:
            recorded = rows[0].destination.get("files")
            files = [str(f) for f in recorded] if isinstance(recorded, list) else files
        known = set()
        for row in rows:
            if row.state is DeliveryState.SENDING:
                continue
            if row.state is not DeliveryState.PENDING:
                row.transition(DeliveryState.PENDING)
            row.next_attempt_at = utcnow()
            row.attempts = 0
            row.commit_resends = 0
            known.add(row.label)
        for destination in destinations:
            if destination.label in known:
                continue
            session.add(
                Delivery(
                    job_id=job.id,
                    destination={**destination.model_dump(mode="json"), "files": files},
                    label=destination.label,
                )
            )
        session.flush()
        due = len(session.scalars(select(Delivery.id).where(Delivery.job_id == job.id)).all())
        audit.add(
            session,
            "operator",
            "resend",
            actor=actor,
            study_id=study.id,
            detail={"job": job.id, "version": job.version, "deliveries": due},
        )
        return due
