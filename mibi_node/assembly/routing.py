"""Which stable studies each analysis takes: the selection rules, one job per match.

A stable study is read header by header (one instance per series, never the pixels: pixel
decoding belongs in the worker processes, where a crash cannot touch reception) and every
enabled analysis' rule (:class:`~mibi_node.analyses.selection.SelectionRule`) is applied to
it. Each analysis that takes the study gets a job for the study's next version of that
analysis (a study can match several: each gets its own result and SR); a study that no
analysis takes is IGNORED with every analysis' reason, which ``mibi-node status`` shows.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from mibi_node.analyses.selection import HEADER_TAGS, SelectionRule, radiopharmaceutical_codes
from mibi_node.jobs.queue import queue_shadow_job
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import Instance, Job, JobState, Study, StudyState
from mibi_node.validation.shadow import bundle_choices

if TYPE_CHECKING:
    from mibi_node.config import Config

__all__ = ["RoutingDecision", "decide", "route_stable_studies", "select_analyses"]

logger = logging.getLogger(__name__)

#: The analysis a single rule stands for (what ``[routing]`` has always meant).
_DEFAULT_ANALYSIS = "parathyroid"


@dataclass(frozen=True)
class RoutingDecision:
    """Which analyses take a study, and why (a sentence for ``mibi-node status``)."""

    analyse: bool
    reason: str
    #: Analysis name -> why it takes the study, for those that do.
    analyses: Mapping[str, str] | None = None


def decide(
    headers: Sequence[Dataset], calling_ae_title: str, rules: SelectionRule
) -> RoutingDecision:
    """Apply one analysis' rule (the parathyroid one: ``[routing]``) to a study's headers.

    Parameters
    ----------
    headers
        One header per series at least (pixel data not needed).
    calling_ae_title
        The AE title that sent the study.
    rules
        The rule.
    """
    return select_analyses(headers, calling_ae_title, {_DEFAULT_ANALYSIS: rules})


def select_analyses(
    headers: Sequence[Dataset],
    calling_ae_title: str,
    selections: Mapping[str, SelectionRule],
    labels: Mapping[str, str] | None = None,
) -> RoutingDecision:
    """Apply every analysis' rule; the decision names those that take the study."""
    labels = labels or {}
    taken: dict[str, str] = {}
    refused: dict[str, str] = {}
    for name, rule in selections.items():
        match = rule.match(headers, calling_ae_title)
        (taken if match.matched else refused)[name] = match.reason
    if taken:
        reason = "; ".join(
            f"{labels.get(name) or _label(name)} ({why})" for name, why in taken.items()
        )
        return RoutingDecision(True, reason, taken)
    if not headers:
        return RoutingDecision(False, "no images in the study (only reports or other objects)")
    if len(refused) == 1:
        [(name, why)] = refused.items()
        return RoutingDecision(False, f"not a {labels.get(name) or _label(name)}: {why}")
    if not refused:
        return RoutingDecision(False, "no analysis is enabled on this node")
    return RoutingDecision(
        False,
        "no analysis takes it: " + "; ".join(f"{name}: {why}" for name, why in refused.items()),
    )


def _label(name: str) -> str:
    return "MIBI study" if name == _DEFAULT_ANALYSIS else f"{name} study"


def _headers(files: FileStore, paths: Sequence[str]) -> list[Dataset]:
    headers: list[Dataset] = []
    for relative in paths:
        try:
            header = pydicom.dcmread(
                files.absolute(relative), stop_before_pixels=True, specific_tags=HEADER_TAGS
            )
        except Exception as exc:  # noqa: BLE001 - pydicom raises many kinds on damaged files
            logger.warning(
                "routing could not read a stored instance (%s): %s", relative, type(exc).__name__
            )
            continue
        headers.append(_without_damaged_elements(header, relative))
    return headers


def _without_damaged_elements(header: Dataset, relative: str) -> Dataset:
    """Drop the routing elements that cannot be parsed (pydicom parses on first use).

    Reception stores instances as sent and checks only their identifying UIDs, so a stored
    header may hold an element with an unknown VR or a bad length: it must not stop routing
    (of this study, or of every study after it). Such an element simply matches no rule.
    """
    for keyword in HEADER_TAGS:
        try:
            value = header.get(keyword)
            if keyword == "RadiopharmaceuticalInformationSequence" and value is not None:
                radiopharmaceutical_codes(header)
        except Exception as exc:  # noqa: BLE001 - any parse error of that one element
            logger.warning(
                "routing ignores a damaged %s in a stored instance (%s): %s",
                keyword,
                relative,
                type(exc).__name__,
            )
            delattr(header, keyword)
    return header


def route_stable_studies(
    database: Database,
    files: FileStore,
    rules: SelectionRule | Mapping[str, SelectionRule],
    labels: Mapping[str, str] | None = None,
    config: Config | None = None,
) -> list[int]:
    """Queue a job for every analysis that takes a STABLE study; ignore the others.

    ``rules`` is analysis name -> rule (a single rule is the parathyroid analysis').
    A study that still has a job of an analysis waiting in the queue keeps it (the job will
    read every instance there is when it runs); otherwise the analysis gets a job for its
    next version of the study. With ``config``, an analysis with a candidate bundle
    (``shadow_bundle``, not promoted) also gets a shadow job of the same version
    (:func:`~mibi_node.jobs.queue.queue_shadow_job`).

    Returns
    -------
    list of int
        Ids of the jobs queued or refreshed.
    """
    selections = {_DEFAULT_ANALYSIS: rules} if isinstance(rules, SelectionRule) else dict(rules)
    with database.session() as session:
        stable = session.execute(
            select(Study.id, Study.calling_ae_title).where(Study.state == StudyState.STABLE)
        ).all()
        plans: list[tuple[int, RoutingDecision]] = []
        for study_id, calling_ae_title in stable:
            rows = session.execute(
                select(
                    Instance.path,
                    Instance.series_instance_uid,
                    Instance.modality,
                    Instance.sop_class_uid,
                )
                .where(Instance.study_id == study_id)
                .order_by(Instance.id)
            ).all()
            first_per_series: dict[str, str] = {}
            for path, series, modality, sop_class in rows:
                if is_image_instance(modality, sop_class):
                    first_per_series.setdefault(series, path)
            headers = _headers(files, list(first_per_series.values()))
            try:
                decision = select_analyses(headers, calling_ae_title, selections, labels)
            except Exception as exc:  # noqa: BLE001 - one study must never stop the sweep
                logger.exception("routing study #%d failed", study_id)
                reason = f"routing failed ({type(exc).__name__}); requeue it to analyse it"
                decision = RoutingDecision(False, reason)
            plans.append((study_id, decision))
    queued: list[int] = []
    if not plans:
        return queued
    with database.write_lock(), database.session() as session, session.begin():
        candidates: set[str] = set()
        if config is not None:
            choices = bundle_choices(session, config, selections)
            candidates = {name for name, choice in choices.items() if choice.candidate}
        for study_id, decision in plans:
            study = session.get(Study, study_id, with_for_update=True)  # PostgreSQL: row lock
            if study is None or study.state is not StudyState.STABLE:
                continue  # an instance arrived meanwhile: the study is RECEIVING again
            queued_jobs = session.scalars(
                select(Job).where(Job.study_id == study_id, Job.state == JobState.QUEUED)
            ).all()
            waiting = {job.analysis: job for job in queued_jobs if not job.shadow}
            taken = dict(decision.analyses or {})
            for job in queued_jobs:
                if job.analysis not in taken:
                    job.transition(JobState.FAILED, "the study is no longer routed for analysis")
            if not taken:
                study.transition(StudyState.IGNORED, decision.reason)
                logger.info("study #%d ignored: not routed for analysis", study_id)
                continue
            versions = []
            for name in taken:
                found = waiting.get(name)
                if found is None:
                    latest = session.scalar(
                        select(func.max(Job.version)).where(
                            Job.study_id == study_id, Job.analysis == name
                        )
                    )
                    job = Job(study_id=study_id, analysis=name, version=(latest or 0) + 1)
                    session.add(job)
                else:
                    job = found
                    job.not_before = None
                    job.partial = False
                session.flush()
                queued.append(job.id)
                versions.append((name, job))
                if name in candidates and (shadow := queue_shadow_job(session, job)) is not None:
                    queued.append(shadow.id)
                logger.info(
                    "study #%d queued for %s as job #%d (version %d)",
                    study_id,
                    name,
                    job.id,
                    job.version,
                )
            numbers = ", ".join(
                f"version {job.version}" if len(versions) == 1 else f"{name} v{job.version}"
                for name, job in versions
            )
            study.transition(StudyState.QUEUED, f"{decision.reason}; {numbers}")
    return queued
