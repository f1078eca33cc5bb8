"""What the status page and the REST API show, read from the database as plain dataclasses.

Every page and its ``/api/`` twin are built from the same summaries, so the HTML and the JSON
never disagree. Nothing here names a patient: studies are shown by database id, Study
Instance UID, description and state.

"Phases" are those the analysis used (from the latest result) once there is one; before
that, those the image headers name (description words such as EARLY or DELAYED, else the
time after injection). Header phases are read once per stored file and kept in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID
from sqlalchemy import ColumnElement, func, select

from mibi_node.analyses.base import Panel
from mibi_node.imaging.phase import (
    acquisition_start,
    injection_time,
    is_pertechnetate,
    phase_from_minutes,
    phase_from_text,
)
from mibi_node.imaging.study import PHASES
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import (
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Study,
    WorkerStatus,
    utcnow,
)
from mibi_node.web.reader import Reader

__all__ = [
    "AuditRow",
    "DeliveryRow",
    "InstanceRow",
    "JobRow",
    "ResultView",
    "StudyDetail",
    "StudyRow",
    "WorkerRow",
    "audit_rows",
    "delivery_rows",
    "image_files",
    "job_counts",
    "latest_result",
    "study_detail",
    "study_rows",
    "to_json",
    "worker_rows",
]

logger = logging.getLogger(__name__)

#: Secondary Capture SOP classes (screen captures of older consoles): may hold a phase.
_SC_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
_OPEN_DELIVERY_STATES = (DeliveryState.PENDING, DeliveryState.SENDING, DeliveryState.FAILED)


def to_json(value: Any) -> Any:
    """Dataclasses, datetimes and containers as JSON-ready data (timestamps in ISO 8601)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


@dataclass(frozen=True)
class ResultView:
    """The latest result of a study, as the worker recorded it (no pixels)."""

    job_id: int
    version: int
    predicted: str
    #: Class key -> fused probability, in the bundle's class order.
    probabilities: dict[str, float]
    agreement: float | None
    normalised_entropy: float | None
    #: Member name -> (its most probable class, that probability, agrees with the ensemble).
    members: list[tuple[str, str, float, bool]]
    focus: dict[str, Any] | None
    phases: list[str]
    warnings: list[str]
    bundle: str

    @property
    def probability(self) -> float:
        """Probability of the predicted class."""
        return float(self.probabilities.get(self.predicted, 0.0))


@dataclass(frozen=True)
class StudyRow:
    """One line of the studies page."""

    id: int
    study_instance_uid: str
    state: str
    state_reason: str | None
    description: str | None
    calling_ae_title: str
    instance_count: int
    modalities: str
    first_received_at: datetime
    last_received_at: datetime
    phases: list[str]
    #: ``analysis`` (the phases the result used) or ``headers`` (what the images say).
    phases_from: str
    version: int | None
    job_state: str | None
    predicted: str | None
    probability: float | None
    #: ``delivered``, ``pending``, ``failed``, ``not sent`` (no destination) or ``None``.
    sr: str | None
    delivered_at: datetime | None
    #: Seconds from the last instance to the result, of the analysis itself, and to PACS.
    seconds_to_result: float | None
    analysis_seconds: float | None
    seconds_to_delivery: float | None
    #: Analysis -> the headline of its latest result ("adenoma 0.93"), for every analysis
    #: that has one.
    results: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class InstanceRow:
    """One stored instance of a study."""

    id: int
    sop_instance_uid: str
    sop_class: str
    series_instance_uid: str
    modality: str
    phase: str | None
    size: int
    calling_ae_title: str
    received_at: datetime


@dataclass(frozen=True)
class JobRow:
    """One analysis (version) of a study."""

    id: int
    version: int
    state: str
    attempts: int
    partial: bool
    lease_owner: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None
    traceback: str | None
    timings: dict[str, float]
    bundle: str | None
    #: The analysis the job runs.
    analysis: str = "parathyroid"
    #: A job of the analysis' candidate bundle (shadow mode): its result is never sent.
    shadow: bool = False


@dataclass(frozen=True)
class AnalysisPanel:
    """One analysis' latest result of a study, as that analysis wants it shown."""

    analysis: str
    title: str
    job_id: int
    version: int
    panel: Panel


@dataclass(frozen=True)
class DeliveryRow:
    """One sending of a result to one destination."""

    id: int
    study_id: int
    version: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_status: str | None
    last_message: str | None
    delivered_at: datetime | None
    #: Storage commitment: NONE (not asked), PENDING, COMMITTED, FAILED or UNCONFIRMED.
    commitment: str = CommitmentState.NONE.value
    commitment_message: str | None = None
    committed_at: datetime | None = None


@dataclass(frozen=True)
class AuditRow:
    """One line of the audit trail."""

    id: int
    at: datetime
    kind: str
    outcome: str
    actor: str
    study_id: int | None
    message: str
    detail: dict[str, Any]


@dataclass(frozen=True)
class StudyDetail:
    """Everything the page of one study shows."""

    study: StudyRow
    instances: list[InstanceRow]
    jobs: list[JobRow]
    result: ResultView | None
    deliveries: list[DeliveryRow]
    audit: list[AuditRow]
    #: Each analysis' latest result, drawn by that analysis (:meth:`Analysis.panel`).
    panels: list[AnalysisPanel] = field(default_factory=list)


@dataclass(frozen=True)
class WorkerRow:
    """One worker process as it last reported itself."""

    name: str
    pid: int
    host: str
    device: str
    bundle: str | None
    state: str
    message: str | None
    started_at: datetime
    heartbeat_at: datetime
    heartbeat_age_seconds: float
    #: Silent for longer than ``web.worker_stale_seconds``, or stopped.
    stale: bool
    #: ``(job id, study id, version)`` of the jobs it holds now.
    current_jobs: list[tuple[int, int, int]]


# -- results ------------------------------------------------------------------------------


def _result_view(job: Job) -> ResultView | None:
    data: Any = job.result
    if not isinstance(data, dict):
        return None
    probabilities = {str(k): float(v) for k, v in dict(data.get("probabilities") or {}).items()}
    predicted = str(data.get("predicted") or "")
    members = []
    for name, values in dict(data.get("member_probabilities") or {}).items():
        if not values:
            continue
        top = max(values, key=lambda key: float(values[key]))
        members.append((str(name), str(top), float(values[top]), top == predicted))
    focus = data.get("focus")
    bundle = dict(data.get("bundle") or {})
    agreement = data.get("agreement")
    entropy = data.get("normalised_entropy")
    sources = dict(data.get("source_images") or {})
    return ResultView(
        job_id=job.id,
        version=job.version,
        predicted=predicted,
        probabilities=probabilities,
        agreement=None if agreement is None else float(agreement),
        normalised_entropy=None if entropy is None else float(entropy),
        members=members,
        focus=dict(focus) if isinstance(focus, dict) else None,
        phases=[phase for phase in PHASES if phase in sources],
        warnings=[str(w) for w in data.get("warnings") or []],
        bundle=" ".join(str(bundle.get(k, "")) for k in ("name", "version")).strip()
        or (job.bundle or ""),
    )


def _sr_state(deliveries: Sequence[Delivery]) -> tuple[str, datetime | None]:
    if not deliveries:
        return "not sent", None
    states = {DeliveryState(d.state) for d in deliveries}
    if states == {DeliveryState.DONE}:
        times = [d.delivered_at for d in deliveries if d.delivered_at is not None]
        return "delivered", max(times, default=None)
    if DeliveryState.FAILED in states:
        return "failed", None
    return "pending", None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 2)


# -- header phases ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8192)
def _header_phase(path: str, sha256: str) -> str | None:
    """The phase an image's header names (``sha256`` keys the cache to the file's content)."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except (InvalidDicomError, OSError, EOFError):
        return None
    if is_pertechnetate(ds):
        return "thyroid"
    text = " | ".join(
        str(ds.get(keyword))
        for keyword in ("ImageComments", "SeriesDescription", "ProtocolName", "ImageID")
        if ds.get(keyword)
    )
    phase = phase_from_text(text)
    if phase is None:
        start = acquisition_start(ds)
        injected = injection_time(ds, start)
        if start is not None and injected is not None:
            phase = phase_from_minutes((start - injected).total_seconds() / 60.0)
    return phase


#: What the phase of one instance is read from: id, store path, sha256, modality, SOP class.
_InstanceFile = tuple[int, str, str, str, str]


def _files_of(instances: Iterable[Instance]) -> list[_InstanceFile]:
    return [(i.id, i.path, i.sha256, i.modality, i.sop_class_uid) for i in instances]


def _phases(files: FileStore, instances: Iterable[_InstanceFile]) -> dict[int, str | None]:
    """Header phase of each NM or Secondary Capture instance (others have none)."""
    found: dict[int, str | None] = {}
    for instance_id, relative, sha256, modality, sop_class_uid in instances:
        found[instance_id] = None
        if modality.upper() == "NM" or sop_class_uid.startswith(_SC_CLASS_PREFIX):
            with contextlib.suppress(ValueError):
                found[instance_id] = _header_phase(str(files.absolute(relative)), sha256)
    return found


def _ordered(phases: Iterable[str | None]) -> list[str]:
    present = {p for p in phases if p}
    return [phase for phase in PHASES if phase in present]


# -- studies ------------------------------------------------------------------------------


def _latest_jobs(session: Any, study_ids: Sequence[int], done: bool = False) -> dict[int, Job]:
    """Each study's newest job (its newest DONE job with ``done``); shadow jobs left out."""
    latest = select(Job.study_id, func.max(Job.version).label("version")).where(
        Job.study_id.in_(study_ids), Job.shadow.is_(False)
    )
    if done:
        latest = latest.where(Job.state == JobState.DONE)
    newest = latest.group_by(Job.study_id).subquery()
    rows = session.scalars(
        select(Job)
        .join(newest, (Job.study_id == newest.c.study_id) & (Job.version == newest.c.version))
        .where(Job.shadow.is_(False))
    ).all()
    return {job.study_id: job for job in rows}


def _study_row(
    study: Study,
    job: Job | None,
    done: Job | None,
    deliveries: Sequence[Delivery],
    header_phases: list[str],
) -> StudyRow:
    result = _result_view(done) if done is not None else None
    sr, delivered_at = _sr_state(deliveries) if done is not None else (None, None)
    timings = (done.timings or {}) if done is not None else {}
    return StudyRow(
        id=study.id,
        study_instance_uid=study.study_instance_uid,
        state=study.state.value,
        state_reason=study.state_reason,
        description=study.study_description,
        calling_ae_title=study.calling_ae_title,
        instance_count=study.instance_count,
        modalities=study.modalities,
        first_received_at=study.first_received_at,
        last_received_at=study.last_received_at,
        phases=result.phases if result is not None and result.phases else header_phases,
        phases_from="analysis" if result is not None and result.phases else "headers",
        version=job.version if job is not None else None,
        job_state=job.state.value if job is not None else None,
        predicted=result.predicted if result is not None else None,
        probability=result.probability if result is not None else None,
        sr=sr,
        delivered_at=delivered_at,
        seconds_to_result=_seconds(
            study.last_received_at, done.finished_at if done is not None else None
        ),
        analysis_seconds=round(sum(float(v) for v in timings.values()), 2) if timings else None,
        seconds_to_delivery=_seconds(study.last_received_at, delivered_at),
    )


def study_rows(reader: Reader, files: FileStore, limit: int = 200) -> list[StudyRow]:
    """The most recently active studies first, with their latest result and delivery."""
    with reader.session() as session:
        studies = session.scalars(
            select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
        ).all()
        ids = [s.id for s in studies]
        latest = _latest_jobs(session, ids)
        done = _latest_jobs(session, ids, done=True)
        deliveries: dict[int, list[Delivery]] = {}
        done_ids = [job.id for job in done.values()]
        for delivery in session.scalars(select(Delivery).where(Delivery.job_id.in_(done_ids))):
            deliveries.setdefault(delivery.job_id, []).append(delivery)
        unanalysed = [s.id for s in studies if s.id not in done]
        instances: dict[int, list[Instance]] = {}
        for row in session.scalars(select(Instance).where(Instance.study_id.in_(unanalysed))):
            instances.setdefault(row.study_id, []).append(row)
        headlines = _headlines(session, ids)
        rows = []
        for study in studies:
            job = done.get(study.id)
            header = _phases(files, _files_of(instances.get(study.id, [])))
            summary = _study_row(
                study,
                latest.get(study.id),
                job,
                deliveries.get(job.id, []) if job is not None else [],
                _ordered(header.values()),
            )
            rows.append(dataclasses.replace(summary, results=headlines.get(study.id, {})))
        return rows


def _headlines(session: Any, study_ids: Sequence[int]) -> dict[int, dict[str, str]]:
    """Study -> analysis -> the headline of its newest DONE job (not a shadow job)."""
    jobs = session.scalars(
        select(Job)
        .where(Job.study_id.in_(study_ids), Job.state == JobState.DONE, Job.shadow.is_(False))
        .order_by(Job.version)
    ).all()
    by_study: dict[int, list[Job]] = {}
    for job in jobs:
        by_study.setdefault(job.study_id, []).append(job)
    return {
        study_id: {panel.analysis: panel.panel.headline for panel in _panels(study_jobs)}
        for study_id, study_jobs in by_study.items()
    }


def _job_row(job: Job) -> JobRow:
    return JobRow(
        id=job.id,
        version=job.version,
        state=job.state.value,
        attempts=job.attempts,
        partial=job.partial,
        lease_owner=job.lease_owner,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        error=job.error,
        traceback=job.traceback,
        timings={str(k): float(v) for k, v in (job.timings or {}).items()},
        bundle=job.bundle,
        analysis=job.analysis,
        shadow=job.shadow,
    )


def _panels(jobs: Sequence[Job]) -> list[AnalysisPanel]:
    """Each analysis' newest DONE job, as its analysis draws it (unknown ones plainly)."""
    from mibi_node.analyses.registry import available_analyses

    known = available_analyses()
    newest: dict[str, Job] = {}
    for job in jobs:
        usable = job.state is JobState.DONE and isinstance(job.result, dict)
        if usable and (job.analysis not in newest or job.version > newest[job.analysis].version):
            newest[job.analysis] = job
    panels = []
    for name, job in newest.items():
        analysis = known.get(name)
        data = dict(job.result or {})
        if analysis is None:
            panel = Panel(headline=str(data.get("predicted") or "?"), note="analysis not installed")
        else:
            try:
                panel = analysis.panel(data)
            except Exception:  # noqa: BLE001 - a result the analysis cannot draw: say so
                logger.exception("analysis %s cannot draw job #%d's result", name, job.id)
                panel = Panel(headline=str(data.get("predicted") or "?"), note="cannot be drawn")
        panels.append(
            AnalysisPanel(name, analysis.title if analysis else name, job.id, job.version, panel)
        )
    return panels


def _delivery_row(delivery: Delivery, study_id: int, version: int) -> DeliveryRow:
    return DeliveryRow(
        id=delivery.id,
        study_id=study_id,
        version=version,
        destination=delivery.label,
        state=delivery.state.value,
        attempts=delivery.attempts,
        next_attempt_at=delivery.next_attempt_at,
        last_status=None if delivery.last_status is None else f"0x{delivery.last_status:04X}",
        last_message=delivery.last_message,
        delivered_at=delivery.delivered_at,
        commitment=CommitmentState(delivery.commitment).value,
        commitment_message=delivery.commit_message,
        committed_at=delivery.committed_at,
    )


def _audit_row(event: AuditEvent) -> AuditRow:
    return AuditRow(
        id=event.id,
        at=event.at,
        kind=event.kind,
        outcome=event.outcome,
        actor=event.actor,
        study_id=event.study_id,
        message=event.message,
        detail=dict(event.detail or {}),
    )


def _sop_class(uid: str) -> str:
    name = UID(uid).name
    return name if name and name != uid else uid


def study_detail(reader: Reader, files: FileStore, study_id: int) -> StudyDetail | None:
    """One study with its instances, jobs, latest result, deliveries and audit trail."""
    with reader.session() as session:
        study = session.get(Study, study_id)
        if study is None:
            return None
        instances = session.scalars(
            select(Instance).where(Instance.study_id == study_id).order_by(Instance.id)
        ).all()
        jobs = session.scalars(
            select(Job).where(Job.study_id == study_id).order_by(Job.version.desc())
        ).all()
        sent = [job for job in jobs if not job.shadow]  # a shadow result is never the study's
        done = next((job for job in sent if job.state is JobState.DONE), None)
        versions = {job.id: job.version for job in jobs}
        deliveries = session.scalars(
            select(Delivery)
            .where(Delivery.job_id.in_(list(versions)))
            .order_by(Delivery.job_id.desc(), Delivery.id)
        ).all()
        events = session.scalars(
            select(AuditEvent)
            .where(AuditEvent.study_id == study_id)
            .order_by(AuditEvent.id.desc())
            .limit(100)
        ).all()
        phases = _phases(files, _files_of(instances))
        latest_done = [d for d in deliveries if done is not None and d.job_id == done.id]
        row = _study_row(
            study, sent[0] if sent else None, done, latest_done, _ordered(phases.values())
        )
        return StudyDetail(
            study=row,
            instances=[
                InstanceRow(
                    id=i.id,
                    sop_instance_uid=i.sop_instance_uid,
                    sop_class=_sop_class(i.sop_class_uid),
                    series_instance_uid=i.series_instance_uid,
                    modality=i.modality,
                    phase=phases.get(i.id),
                    size=i.size,
                    calling_ae_title=i.calling_ae_title,
                    received_at=i.received_at,
                )
                for i in instances
            ],
            jobs=[_job_row(job) for job in jobs],
            result=_result_view(done) if done is not None else None,
            deliveries=[_delivery_row(d, study_id, versions[d.job_id]) for d in deliveries],
            audit=[_audit_row(event) for event in events],
            panels=_panels(sent),
        )


def image_files(reader: Reader, files: FileStore, study_id: int) -> list[tuple[Path, str]]:
    """``(absolute path, sha256)`` of a study's stored image instances (the focus picture)."""
    with reader.session() as session:
        rows = session.execute(
            select(Instance.path, Instance.sha256, Instance.modality, Instance.sop_class_uid)
            .where(Instance.study_id == study_id)
            .order_by(Instance.id)
        ).all()
    return [
        (files.absolute(path), sha256)
        for path, sha256, modality, sop in rows
        if is_image_instance(modality, sop)
    ]


def latest_result(reader: Reader, study_id: int) -> dict[str, Any] | None:
    """The latest DONE job's result of a study, as recorded (``None`` before one)."""
    with reader.session() as session:
        job = session.scalars(
            select(Job)
            .where(Job.study_id == study_id, Job.state == JobState.DONE, Job.shadow.is_(False))
            .order_by(Job.version.desc())
        ).first()
        return dict(job.result) if job is not None and isinstance(job.result, dict) else None


# -- workers, deliveries, audit -----------------------------------------------------------


def worker_rows(reader: Reader, stale_seconds: float) -> list[WorkerRow]:
    """Every worker that has reported, most recent heartbeat first, stale ones marked."""
    now = utcnow()
    cutoff = now - timedelta(seconds=stale_seconds)
    with reader.session() as session:
        workers = session.scalars(
            select(WorkerStatus).order_by(WorkerStatus.heartbeat_at.desc())
        ).all()
        running = session.execute(
            select(Job.lease_owner, Job.id, Job.study_id, Job.version)
            .where(Job.state == JobState.RUNNING)
            .order_by(Job.id)
        ).all()
        held: dict[str, list[tuple[int, int, int]]] = {}
        for owner, job_id, study_id, version in running:
            held.setdefault(str(owner), []).append((job_id, study_id, version))
        return [
            WorkerRow(
                name=w.name,
                pid=w.pid,
                host=w.host,
                device=w.device,
                bundle=w.bundle,
                state=w.state,
                message=w.message,
                started_at=w.started_at,
                heartbeat_at=w.heartbeat_at,
                heartbeat_age_seconds=round((now - w.heartbeat_at).total_seconds(), 1),
                stale=w.state == "stopped" or w.heartbeat_at < cutoff,
                current_jobs=held.get(w.name, []),
            )
            for w in workers
        ]


def job_counts(reader: Reader) -> dict[str, int]:
    """Number of jobs in each state."""
    with reader.session() as session:
        rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {JobState(state).value: int(count) for state, count in rows}


def analysis_counts(reader: Reader) -> dict[str, dict[str, int]]:
    """Analysis -> number of its jobs in each state."""
    with reader.session() as session:
        rows = session.execute(
            select(Job.analysis, Job.state, func.count()).group_by(Job.analysis, Job.state)
        ).all()
    counts: dict[str, dict[str, int]] = {}
    for analysis, state, count in rows:
        counts.setdefault(str(analysis), {})[JobState(state).value] = int(count)
    return counts


def delivery_rows(
    reader: Reader,
    states: Sequence[DeliveryState] = _OPEN_DELIVERY_STATES,
    limit: int = 200,
    newest_first: bool = False,
    uncommitted: bool = True,
) -> list[DeliveryRow]:
    """Deliveries in ``states`` (by default those not delivered yet), oldest first.

    With ``uncommitted``, also the delivered ones whose storage commitment FAILED: the PACS
    acknowledged them, then reported failures or never confirmed it keeps them.
    """
    order = Delivery.id.desc() if newest_first else Delivery.id
    wanted: ColumnElement[bool] = Delivery.state.in_(list(states))
    if uncommitted:
        wanted = wanted | (
            (Delivery.state == DeliveryState.DONE) & (Delivery.commitment == CommitmentState.FAILED)
        )
    with reader.session() as session:
        rows = session.execute(
            select(Delivery, Job.study_id, Job.version)
            .join(Job, Delivery.job_id == Job.id)
            .where(wanted)
            .order_by(order)
            .limit(limit)
        ).all()
        return [_delivery_row(delivery, study_id, version) for delivery, study_id, version in rows]


def audit_rows(reader: Reader, limit: int = 200) -> list[AuditRow]:
    """The latest events of the audit trail, newest first."""
    with reader.session() as session:
        events = session.scalars(
            select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        ).all()
        return [_audit_row(event) for event in events]
