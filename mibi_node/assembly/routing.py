"""Which stable studies are MIBI studies: the routing rules of ``[routing]``.

A stable study is read header by header (one instance per series, never the pixels: pixel
decoding belongs in the worker processes, where a crash cannot touch reception). It is a
MIBI study when it holds an image of an accepted modality and at least one rule matches:
the radiopharmaceutical code, a study or series description, or the calling AE title.
A MIBI study gets a job (a new version when an earlier one was analysed); any other study
is IGNORED with the reason, which ``mibi-node status`` shows.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pydicom
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from mibi_node.config import RoutingConfig
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import Instance, Job, JobState, Study, StudyState

__all__ = ["RoutingDecision", "decide", "route_stable_studies"]

logger = logging.getLogger(__name__)

_SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_HEADER_TAGS = [
    "Modality",
    "SOPClassUID",
    "StudyDescription",
    "SeriesDescription",
    "RadiopharmaceuticalInformationSequence",
]


@dataclass(frozen=True)
class RoutingDecision:
    """Whether a study is analysed, and why (a sentence for ``mibi-node status``)."""

    analyse: bool
    reason: str


def _radiopharmaceutical_codes(header: Dataset) -> set[str]:
    codes = set()
    for item in header.get("RadiopharmaceuticalInformationSequence", []):
        for code in item.get("RadiopharmaceuticalCodeSequence", []):
            value = str(code.get("CodeValue", "")).strip()
            if value:
                codes.add(value)
    return codes


def decide(
    headers: Sequence[Dataset], calling_ae_title: str, rules: RoutingConfig
) -> RoutingDecision:
    """Apply the routing rules to the headers of a study's image instances.

    Parameters
    ----------
    headers
        One header per series at least (pixel data not needed).
    calling_ae_title
        The AE title that sent the study.
    rules
        The ``[routing]`` section.
    """
    modalities = sorted({str(h.get("Modality", "")).upper() or "none" for h in headers})
    accepted = [
        h
        for h in headers
        if str(h.get("Modality", "")).upper() in rules.modalities
        or (rules.secondary_capture and str(h.get("SOPClassUID", "")).startswith(_SC_CLASS_PREFIX))
    ]
    if not headers:
        return RoutingDecision(False, "no images in the study (only reports or other objects)")
    if not accepted:
        wanted = " or ".join(rules.modalities) or "no modality"
        if rules.secondary_capture:
            wanted += " or Secondary Capture"
        return RoutingDecision(
            False, f"not a MIBI study: modality {', '.join(modalities)}, routing wants {wanted}"
        )
    codes: set[str] = set()
    for header in accepted:
        codes |= _radiopharmaceutical_codes(header)
    matched = codes & set(rules.radiopharmaceutical_codes)
    if matched:
        return RoutingDecision(True, f"radiopharmaceutical code {sorted(matched)[0]}")
    pattern = re.compile(rules.description_pattern, re.IGNORECASE)
    descriptions = sorted(
        {
            str(h.get(keyword, "")).strip()
            for h in accepted
            for keyword in ("StudyDescription", "SeriesDescription")
        }
        - {""}
    )
    for description in descriptions:
        if pattern.search(description):
            return RoutingDecision(True, f"description {description!r}")
    if calling_ae_title in rules.calling_ae_titles:
        return RoutingDecision(True, f"calling AE title {calling_ae_title}")
    seen = ", ".join(repr(d) for d in descriptions) or "none"
    return RoutingDecision(
        False,
        "not a MIBI study: no routing rule matched (radiopharmaceutical codes "
        f"{', '.join(sorted(codes)) or 'none'}; descriptions {seen}; "
        f"calling AE {calling_ae_title or 'unknown'})",
    )


def _headers(files: FileStore, paths: Sequence[str]) -> list[Dataset]:
    headers: list[Dataset] = []
    for relative in paths:
        try:
            header = pydicom.dcmread(
                files.absolute(relative), stop_before_pixels=True, specific_tags=_HEADER_TAGS
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
    for keyword in _HEADER_TAGS:
        try:
            value = header.get(keyword)
            if keyword == "RadiopharmaceuticalInformationSequence" and value is not None:
                _radiopharmaceutical_codes(header)
        except Exception as exc:  # noqa: BLE001 - any parse error of that one element
            logger.warning(
                "routing ignores a damaged %s in a stored instance (%s): %s",
                keyword,
                relative,
                type(exc).__name__,
            )
            delattr(header, keyword)
    return header


def route_stable_studies(database: Database, files: FileStore, rules: RoutingConfig) -> list[int]:
    """Queue every STABLE MIBI study and ignore the others.

    A study that still has a job waiting in the queue keeps it (the job will read every
    instance there is when it runs); otherwise the study gets a job for its next version.

    Returns
    -------
    list of int
        Ids of the jobs queued or refreshed.
    """
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
                plans.append((study_id, decide(headers, calling_ae_title, rules)))
            except Exception as exc:  # noqa: BLE001 - one study must never stop the sweep
                logger.exception("routing study #%d failed", study_id)
                reason = f"routing failed ({type(exc).__name__}); requeue it to analyse it"
                plans.append((study_id, RoutingDecision(False, reason)))
    queued: list[int] = []
    if not plans:
        return queued
    with database.write_lock(), database.session() as session, session.begin():
        for study_id, decision in plans:
            study = session.get(Study, study_id, with_for_update=True)  # PostgreSQL: row lock
            if study is None or study.state is not StudyState.STABLE:
                continue  # an instance arrived meanwhile: the study is RECEIVING again
            waiting = session.scalars(
                select(Job).where(Job.study_id == study_id, Job.state == JobState.QUEUED)
            ).first()
            if not decision.analyse:
                study.transition(StudyState.IGNORED, decision.reason)
                if waiting is not None:
                    waiting.transition(
                        JobState.FAILED, "the study is no longer routed for analysis"
                    )
                logger.info("study #%d ignored: not routed for analysis", study_id)
                continue
            if waiting is None:
                latest = session.scalar(
                    select(func.max(Job.version)).where(Job.study_id == study_id)
                )
                waiting = Job(study_id=study_id, version=(latest or 0) + 1)
                session.add(waiting)
            else:
                waiting.not_before = None
                waiting.partial = False
            session.flush()
            study.transition(
                StudyState.QUEUED, f"MIBI study ({decision.reason}); version {waiting.version}"
            )
            queued.append(waiting.id)
            logger.info(
                "study #%d queued as job #%d (version %d)", study_id, waiting.id, waiting.version
            )
    return queued
