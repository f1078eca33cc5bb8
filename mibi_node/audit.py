"""The audit trail: one row (and one journal line) per association, result, delivery and
operator action.

Rows live in the ``audit_event`` table next to what they describe, so the trail survives
log rotation and answers "what did we receive from whom, and what did we answer" for as long
as the database is kept (retention removes instance files, never audit rows). The journal
line carries the same facts at INFO, with counts and reasons but no patient name, patient ID
or UID; the study is named by its database id.
"""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import Connection, Table, insert
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from mibi_node.storage.database import Database, database_problem
from mibi_node.storage.models import AuditEvent

__all__ = ["add", "record"]

logger = logging.getLogger("mibi_node.audit")

_AUDIT: Table = AuditEvent.__table__  # type: ignore[assignment]


def add(
    session: Session | Connection,
    kind: str,
    outcome: str,
    *,
    actor: str = "",
    study_id: int | None = None,
    message: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    """Log one audit event and insert it in the transaction of ``session`` (an ORM session or
    a Core connection): the row commits (or not) with the change it describes; the journal
    line is written first, whatever happens to the row.

    Parameters are those of :func:`record`.
    """
    logger.info("%s", _line(kind, outcome, actor, study_id, message, detail))
    session.execute(
        insert(_AUDIT).values(
            kind=kind,
            outcome=outcome,
            actor=actor[:128],
            study_id=study_id,
            message=message,
            detail=dict(detail or {}),
        )
    )


def _line(
    kind: str,
    outcome: str,
    actor: str,
    study_id: int | None,
    message: str,
    detail: dict[str, Any] | None,
) -> str:
    """The journal line of an event: ``audit KIND OUTCOME actor=... study=... k=v: message``."""
    facts = " ".join(f"{key}={value}" for key, value in sorted((detail or {}).items()))
    return (
        f"audit {kind} {outcome}"
        + (f" actor={actor}" if actor else "")
        + (f" study={study_id}" if study_id is not None else "")
        + (f" {facts}" if facts else "")
        + (f": {message}" if message else "")
    )


def record(
    database: Database,
    kind: str,
    outcome: str,
    *,
    actor: str = "",
    study_id: int | None = None,
    message: str = "",
    detail: dict[str, Any] | None = None,
) -> None:
    """Write one audit event (own short transaction) and log it.

    Parameters
    ----------
    kind
        ``association``, ``result``, ``delivery``, ``operator`` or ``retention``.
    outcome
        How it ended, e.g. ``accepted``, ``rejected``, ``done``, ``failed``, ``sent``.
    actor
        Who: a calling AE title and address, a worker name, ``cli:<user>`` or ``web``.
    study_id
        The study's database id, when the event concerns one study.
    message
        One sentence for people; no patient data.
    detail
        Counts and reasons (JSON-serialisable); no patient data.

    An audit write never raises: when the row cannot be written, the event's journal line
    is logged at ERROR instead, and the caller's work goes on.
    """
    try:
        with database.write_lock(), database.session() as session, session.begin():
            add(
                session,
                kind,
                outcome,
                actor=actor,
                study_id=study_id,
                message=message,
                detail=detail,
            )
    except OperationalError as exc:  # the database is down: one line, no traceback
        logger.error(
            "could not write the audit event to the database (%s): %s",
            database_problem(exc),
            _line(kind, outcome, actor, study_id, message, detail),
        )
    except Exception:
        logger.exception(
            "could not write the audit event to the database: %s",
            _line(kind, outcome, actor, study_id, message, detail),
        )
