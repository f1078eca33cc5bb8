"""A study is complete when it has been quiet: no instance for ``assembly.quiet_seconds``.

Gamma cameras send the early and delayed phases hours apart and PACS forwards in bursts,
so "complete" can only be inferred from silence; the sweep runs on a schedule and every
study it marks is one committed transaction.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select

from mibi_node.storage.database import Database
from mibi_node.storage.models import Study, StudyState, utcnow

__all__ = ["mark_stable_studies"]

logger = logging.getLogger(__name__)


def mark_stable_studies(database: Database, quiet_seconds: float) -> list[int]:
    """Mark every RECEIVING study quiet for ``quiet_seconds`` as STABLE.

    Returns
    -------
    list of int
        Database ids of the studies that became stable.
    """
    cutoff = utcnow() - timedelta(seconds=quiet_seconds)
    with database.write_lock(), database.session() as session, session.begin():
        studies = session.scalars(
            select(Study)
            .where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
            .order_by(Study.last_received_at)
            .with_for_update(skip_locked=True)  # PostgreSQL: another receiver's sweep has those
        ).all()
        for study in studies:
            study.transition(StudyState.STABLE, f"no instance for {quiet_seconds:g} s")
            logger.info(
                "study #%d stable: %d instances (%s) from %s",
                study.id,
                study.instance_count,
                study.modalities or "no modality",
                study.calling_ae_title,
            )
        return [study.id for study in studies]
