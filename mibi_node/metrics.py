"""Prometheus metrics, read from the database at scrape time.

Reception runs in several acceptor processes and analysis in spawned workers, so counters
kept in one process's memory would see only that process's share. Every fact the metrics
need is already committed: the audit trail (``audit_event``: associations, results,
deliveries) and the study, job, delivery and worker tables. A :class:`DatabaseCollector`
turns them into metrics when Prometheus scrapes ``/metrics``:

- counters (``*_total``) fold the audit rows in once, in id order, and remember where they
  stopped, so a scrape reads only what is new; a restarted node folds the whole trail again
  and its totals continue where they were (they count since the database was created);
- gauges (studies by state, queue depth, deliveries waiting, workers up) are one ``GROUP BY``;
- histograms of each stage come from the jobs and deliveries the new audit rows name.

docs/operations.md lists every metric and example alert rules.
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from sqlalchemy import func, select

from mibi_node.config import Config
from mibi_node.storage.database import Database
from mibi_node.storage.models import (
    AuditEvent,
    CommitmentState,
    Delivery,
    DeliveryState,
    Job,
    JobState,
    Study,
    StudyState,
    WorkerStatus,
    utcnow,
)

__all__ = ["DatabaseCollector", "render_metrics"]

#: Bucket bounds (seconds) shared by the stage histograms: 10 ms to 2 h.
BUCKETS: tuple[float, ...] = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    7200.0,
)

#: Stages of a worker's analysis recorded on the job (``Job.timings``).
STAGES = ("read", "denoise", "inference", "sr")

#: Audit rows folded in per database round trip.
_PAGE = 5000

#: How many ids back each scrape looks for rows that committed after higher ids.
_LATE = 1000


@dataclass
class _Histogram:
    """Cumulative bucket counts and sum of one histogram."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))
    total: float = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, value)
        for index, bound in enumerate(BUCKETS):
            if value <= bound:
                self.counts[index] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        running = 0
        out: list[tuple[str, float]] = []
        for bound, count in zip([*BUCKETS, float("inf")], self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class _Totals:
    """What the audit rows read so far add up to."""

    last_id: int = 0
    associations: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    instances: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    refused: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    results: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    #: (analysis, outcome) -> results; (analysis, finding) -> results done.
    analysis_results: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    findings: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    analysis_seconds: dict[str, _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))
    deliveries: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    operator: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    retention: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    receive_to_stable: _Histogram = field(default_factory=_Histogram)
    stable_to_result: _Histogram = field(default_factory=_Histogram)
    result_to_delivered: _Histogram = field(default_factory=_Histogram)
    stages: dict[str, _Histogram] = field(default_factory=lambda: defaultdict(_Histogram))


def _seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    if later is None or earlier is None:
        return None
    return (later - earlier).total_seconds()


class DatabaseCollector:
    """A prometheus-client collector over one node's database.

    Parameters
    ----------
    database
        The node's database.
    config
        The configuration (worker staleness, configured destinations).
    """

    def __init__(self, database: Database, config: Config) -> None:
        self.database = database
        self.config = config
        self._totals = _Totals()
        #: Ids counted among the last _LATE (see :meth:`_fold`).
        self._seen: set[int] = set()
        self._lock = threading.Lock()

    # -- folding the audit trail in --------------------------------------------------------

    def _fold(self) -> None:
        totals = self._totals
        # Ids are handed out when a row is inserted, not when it commits: on PostgreSQL a
        # transaction that commits late leaves a lower id behind a higher one already read.
        # Each scrape therefore looks back _LATE ids and counts what it has not seen yet.
        cursor = max(0, totals.last_id - _LATE)
        while True:
            with self.database.session() as session:
                rows = list(
                    session.scalars(
                        select(AuditEvent)
                        .where(AuditEvent.id > cursor)
                        .order_by(AuditEvent.id)
                        .limit(_PAGE)
                    ).all()
                )
                fetched = len(rows)
                if rows:
                    cursor = rows[-1].id
                rows = [row for row in rows if row.id not in self._seen]
                done_jobs = [int(r.detail["job"]) for r in rows if self._is(r, "result", "done")]
                sent = [int(r.detail["delivery"]) for r in rows if self._is(r, "delivery", "sent")]
                jobs = self._jobs(session, done_jobs)
                deliveries = self._deliveries(session, sent)
            for row in rows:
                self._count(row)
                self._seen.add(row.id)
            for job, study_last_received in jobs:
                self._observe_job(job, study_last_received)
            for delivered_at, finished_at in deliveries:
                seconds = _seconds(delivered_at, finished_at)
                if seconds is not None:
                    totals.result_to_delivered.observe(seconds)
            totals.last_id = max(totals.last_id, cursor)
            if fetched < _PAGE:
                break
        floor = totals.last_id - _LATE
        self._seen = {seen for seen in self._seen if seen > floor}

    @staticmethod
    def _is(row: AuditEvent, kind: str, outcome: str) -> bool:
        detail = row.detail if isinstance(row.detail, dict) else {}
        key = "job" if kind == "result" else "delivery"
        return row.kind == kind and row.outcome == outcome and key in detail

    @staticmethod
    def _jobs(session: Any, ids: list[int]) -> list[tuple[Job, datetime]]:
        if not ids:
            return []
        return [
            (job, last)
            for job, last in session.execute(
                select(Job, Study.last_received_at)
                .join(Study, Study.id == Job.study_id)
                .where(Job.id.in_(ids))
            ).all()
        ]

    @staticmethod
    def _deliveries(session: Any, ids: list[int]) -> list[tuple[datetime | None, datetime | None]]:
        if not ids:
            return []
        return [
            (delivered, finished)
            for delivered, finished in session.execute(
                select(Delivery.delivered_at, Job.finished_at)
                .join(Job, Job.id == Delivery.job_id)
                .where(Delivery.id.in_(ids))
            ).all()
        ]

    def _count(self, row: AuditEvent) -> None:
        totals = self._totals
        detail = row.detail if isinstance(row.detail, dict) else {}
        if row.kind == "association":
            reason = str(detail.get("reason", "")) if row.outcome == "rejected" else ""
            totals.associations[(row.outcome, reason)] += 1
            for key in ("stored", "duplicates"):
                totals.instances[key] += int(detail.get(key, 0) or 0)
            refused = detail.get("refused_by_status")
            if isinstance(refused, dict):
                for status, count in refused.items():
                    totals.refused[str(status)] += int(count)
        elif row.kind == "result":
            totals.results[row.outcome] += 1
            analysis = str(detail.get("analysis") or "parathyroid")
            totals.analysis_results[(analysis, row.outcome)] += 1
            if row.outcome == "done" and detail.get("predicted"):
                totals.findings[(analysis, str(detail["predicted"]))] += 1
        elif row.kind == "delivery":
            totals.deliveries[row.outcome] += 1
        elif row.kind == "operator":
            totals.operator[row.outcome] += 1
        elif row.kind == "retention":
            totals.retention["studies"] += 1
            totals.retention["files"] += int(detail.get("files", 0) or 0)

    def _observe_job(self, job: Job, study_last_received: datetime) -> None:
        totals = self._totals
        if job.version == 1:
            # A first version's job is created by the sweep that found the study stable.
            seconds = _seconds(job.created_at, study_last_received)
            if seconds is not None:
                totals.receive_to_stable.observe(seconds)
        seconds = _seconds(job.finished_at, job.created_at)
        if seconds is not None and not job.partial:
            totals.stable_to_result.observe(seconds)
            totals.analysis_seconds[job.analysis].observe(seconds)
        for stage, value in (job.timings or {}).items():
            if stage in STAGES:
                totals.stages[stage].observe(float(value))

    # -- the collector protocol -------------------------------------------------------------

    def describe(self) -> Iterable[Metric]:
        """Nothing up front: metrics are built at collection (prometheus-client's protocol)."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Fold new audit rows in and yield every metric."""
        with self._lock:
            self._fold()
            yield from self._counters()
            yield from self._histograms()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        totals = self._totals
        associations = CounterMetricFamily(
            "mibi_node_associations",
            "Associations by how they ended (released, aborted, rejected) and rejection reason.",
            labels=["outcome", "reason"],
        )
        for (outcome, reason), count in sorted(totals.associations.items()):
            associations.add_metric([outcome, reason], count)
        yield associations
        instances = CounterMetricFamily(
            "mibi_node_instances_received",
            "Instances acknowledged with Success: stored, or already held (duplicates).",
            labels=["outcome"],
        )
        for outcome in ("stored", "duplicates"):
            instances.add_metric([outcome], totals.instances.get(outcome, 0))
        yield instances
        refused = CounterMetricFamily(
            "mibi_node_instances_refused",
            "Instances answered with a failure status, by DIMSE status.",
            labels=["status"],
        )
        for status, count in sorted(totals.refused.items()):
            refused.add_metric([status], count)
        yield refused
        for name, doc, values, outcomes in (
            ("mibi_node_jobs_finished", "Analyses finished, by outcome.", totals.results,
             ("done", "failed")),
            ("mibi_node_delivery_attempts", "Delivery attempts by outcome (sent, retry, failed).",
             totals.deliveries, ("sent", "retry", "failed")),
            ("mibi_node_operator_actions", "Requeue and resend actions by operators.",
             totals.operator, ("requeue", "resend")),
        ):  # fmt: skip
            family = CounterMetricFamily(name, doc, labels=["outcome"])
            for outcome in sorted({*outcomes, *values}):
                family.add_metric([outcome], values.get(outcome, 0))
            yield family
        # Per analysis: beside the node-wide families above, whose labels stay as they were
        # so that existing dashboards and alert rules keep working.
        family = CounterMetricFamily(
            "mibi_node_analysis_results",
            "Analyses finished, by analysis and outcome.",
            labels=["analysis", "outcome"],
        )
        for (analysis, outcome), count in sorted(totals.analysis_results.items()):
            family.add_metric([analysis, outcome], count)
        yield family
        family = CounterMetricFamily(
            "mibi_node_analysis_findings",
            "Results done, by analysis and main finding.",
            labels=["analysis", "finding"],
        )
        for (analysis, finding), count in sorted(totals.findings.items()):
            family.add_metric([analysis, finding], count)
        yield family
        yield CounterMetricFamily(
            "mibi_node_retention_studies_removed",
            "Studies whose instance files the retention sweep removed.",
            value=totals.retention.get("studies", 0),
        )
        yield CounterMetricFamily(
            "mibi_node_retention_files_removed",
            "Instance files the retention sweep removed.",
            value=totals.retention.get("files", 0),
        )

    def _histograms(self) -> Iterator[Metric]:
        totals = self._totals
        for name, doc, histogram in (
            ("mibi_node_receive_to_stable_seconds",
             "Last instance received -> study found stable (the quiet period and the sweep).",
             totals.receive_to_stable),
            ("mibi_node_stable_to_result_seconds",
             "Study queued -> result recorded (queueing and analysis; complete studies only).",
             totals.stable_to_result),
            ("mibi_node_result_to_delivered_seconds",
             "Result recorded -> acknowledged by the destination (retries included).",
             totals.result_to_delivered),
        ):  # fmt: skip
            family = HistogramMetricFamily(name, doc)
            family.add_metric([], histogram.buckets(), sum_value=histogram.total)
            yield family
        stages = HistogramMetricFamily(
            "mibi_node_analysis_stage_seconds",
            "Seconds per study in each stage of a worker's analysis.",
            labels=["stage"],
        )
        for stage in STAGES:
            histogram = totals.stages.get(stage, _Histogram())
            stages.add_metric([stage], histogram.buckets(), sum_value=histogram.total)
        yield stages
        per_analysis = HistogramMetricFamily(
            "mibi_node_analysis_stable_to_result_seconds",
            "Study queued -> result recorded, by analysis (complete studies only).",
            labels=["analysis"],
        )
        for analysis, histogram in sorted(totals.analysis_seconds.items()):
            per_analysis.add_metric([analysis], histogram.buckets(), sum_value=histogram.total)
        yield per_analysis

    def _gauges(self) -> Iterator[Metric]:
        now = utcnow()
        stale = now - timedelta(seconds=self.config.web.worker_stale_seconds)
        with self.database.session() as session:
            studies = dict(
                session.execute(select(Study.state, func.count()).group_by(Study.state)).all()
            )
            by_analysis = session.execute(
                select(Job.analysis, Job.state, func.count()).group_by(Job.analysis, Job.state)
            ).all()
            jobs: dict[JobState, int] = defaultdict(int)
            for _analysis, job_state, count in by_analysis:
                jobs[job_state] += count
            due = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    Job.state == JobState.QUEUED,
                    (Job.not_before.is_(None)) | (Job.not_before <= now),
                )
            )
            deliveries = dict(
                session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
            )
            oldest_pending = session.scalar(
                select(func.min(Delivery.created_at)).where(
                    Delivery.state.in_([DeliveryState.PENDING, DeliveryState.SENDING])
                )
            )
            last_sent = session.scalar(select(func.max(Delivery.delivered_at)))
            commitments = dict(
                session.execute(
                    select(Delivery.commitment, func.count()).group_by(Delivery.commitment)
                ).all()
            )
            workers = session.execute(
                select(WorkerStatus.name, WorkerStatus.device, WorkerStatus.heartbeat_at)
            ).all()
        family = GaugeMetricFamily("mibi_node_studies", "Studies by state.", labels=["state"])
        for state in StudyState:
            family.add_metric([state.value], studies.get(state, 0))
        yield family
        family = GaugeMetricFamily("mibi_node_jobs", "Analysis jobs by state.", labels=["state"])
        for job_state in JobState:
            family.add_metric([job_state.value], jobs.get(job_state, 0))
        yield family
        family = GaugeMetricFamily(
            "mibi_node_analysis_jobs",
            "Analysis jobs by analysis and state.",
            labels=["analysis", "state"],
        )
        analyses = sorted({*self.config.enabled_analyses, *(row[0] for row in by_analysis)})
        counts = {(analysis, JobState(state)): count for analysis, state, count in by_analysis}
        for analysis in analyses:
            for job_state in JobState:
                family.add_metric([analysis, job_state.value], counts.get((analysis, job_state), 0))
        yield family
        yield GaugeMetricFamily(
            "mibi_node_queue_depth", "Jobs waiting for a worker and due now.", value=due or 0
        )
        family = GaugeMetricFamily(
            "mibi_node_deliveries", "Result deliveries by state.", labels=["state"]
        )
        for delivery_state in DeliveryState:
            family.add_metric([delivery_state.value], deliveries.get(delivery_state, 0))
        yield family
        yield GaugeMetricFamily(
            "mibi_node_oldest_undelivered_result_age_seconds",
            "Age of the oldest result not yet acknowledged by its destination (0 if none).",
            value=_seconds(now, oldest_pending) or 0.0,
        )
        yield GaugeMetricFamily(
            "mibi_node_last_delivery_timestamp_seconds",
            "Unix time of the last result a destination acknowledged (0 if none yet).",
            value=last_sent.timestamp() if last_sent else 0.0,
        )
        family = GaugeMetricFamily(
            "mibi_node_delivery_commitments",
            "Deliveries by storage commitment state (NONE: not asked).",
            labels=["state"],
        )
        for commitment in CommitmentState:
            family.add_metric([commitment.value], commitments.get(commitment, 0))
        yield family
        yield GaugeMetricFamily(
            "mibi_node_deliveries_uncommitted",
            "Delivered results the PACS did not commit: it reported failures, or never "
            "answered within dispatch.commitment_attempts requests (an alert).",
            value=commitments.get(CommitmentState.FAILED, 0),
        )
        yield from _validation_gauges(self.database)
        yield from _drift_gauges(self.database, self.config)
        family = GaugeMetricFamily(
            "mibi_node_worker_up",
            "1 while a worker's heartbeat is fresher than web.worker_stale_seconds.",
            labels=["worker", "device"],
        )
        for name, device, heartbeat in workers:
            family.add_metric([name, device], 1.0 if heartbeat >= stale else 0.0)
        yield family


#: The latest assessed cases per analysis that ``mibi_node_local_accuracy_recent`` covers.
RECENT_CASES = 50


def _validation_gauges(database: Database) -> Iterator[Metric]:
    """Local validation (docs/validation.md): accuracy on the assessed cases, per analysis
    and bundle version and over the latest :data:`RECENT_CASES`, and the latest verdicts by
    decision. Read from the database only (no headers, no bootstrap), at each scrape."""
    from mibi_node.validation.performance import cases

    accuracy = GaugeMetricFamily(
        "mibi_node_local_accuracy",
        "Accuracy against final diagnoses (else verdicts) on this node's assessed studies.",
        labels=["analysis", "bundle_version"],
    )
    assessed = GaugeMetricFamily(
        "mibi_node_local_assessed_studies",
        "Studies with a reference (final diagnosis or verdict) per analysis and bundle.",
        labels=["analysis", "bundle_version"],
    )
    recent = GaugeMetricFamily(
        "mibi_node_local_accuracy_recent",
        f"Accuracy on the latest {RECENT_CASES} assessed studies of each analysis.",
        labels=["analysis"],
    )
    verdicts = GaugeMetricFamily(
        "mibi_node_verdicts",
        "Latest verdicts per finding by analysis and decision.",
        labels=["analysis", "decision"],
    )
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    latest: dict[str, list[tuple[int, bool]]] = defaultdict(list)
    decisions: dict[tuple[str, str], int] = defaultdict(int)
    for case in cases(database):
        for decision, _value in case.verdicts.values():
            decisions[(case.analysis, decision)] += 1
        if case.reference is None or not case.probabilities:
            continue
        hit = case.reference == case.predicted
        hits[(case.analysis, case.bundle_version)].append(hit)
        latest[case.analysis].append((case.job_id, hit))
    for (analysis, version), values in sorted(hits.items()):
        accuracy.add_metric([analysis, version], sum(values) / len(values))
        assessed.add_metric([analysis, version], len(values))
    for analysis, ordered in sorted(latest.items()):
        last = [right for _, right in sorted(ordered)[-RECENT_CASES:]]
        recent.add_metric([analysis], sum(last) / len(last))
    for (analysis, decision), count in sorted(decisions.items()):
        verdicts.add_metric([analysis, decision], count)
    yield from (accuracy, assessed, recent, verdicts)


def _drift_gauges(database: Database, config: Config) -> Iterator[Metric]:
    """Input drift of each camera against its bundle's training inputs (docs/validation.md):
    each feature's statistic (PSI, or the share of studies with a setting training never
    saw) and an alarm when one drifts. Cameras with too few studies have no series."""
    from mibi_node.validation.drift import drift_report

    statistic = GaugeMetricFamily(
        "mibi_node_input_drift",
        "Input drift statistic per feature: PSI against training, or the share of studies "
        "with a matrix, pixel size or setting training never saw.",
        labels=["analysis", "station", "feature"],
    )
    alarm = GaugeMetricFamily(
        "mibi_node_input_drift_alarm",
        "1 while a feature of the camera's latest studies drifts from the training inputs.",
        labels=["analysis", "station"],
    )
    studies = GaugeMetricFamily(
        "mibi_node_input_drift_studies",
        "Studies of the camera compared with the training inputs (validation.drift_window).",
        labels=["analysis", "station"],
    )
    for report in drift_report(database, config):
        for station in report.stations:
            studies.add_metric([report.analysis, station.station], station.studies)
            if not station.features:
                continue
            alarm.add_metric([report.analysis, station.station], float(station.alarm))
            for feature in station.features:
                labels = [report.analysis, station.station, feature.feature]
                statistic.add_metric(labels, feature.statistic)
    yield from (statistic, alarm, studies)


_collectors: dict[int, tuple[CollectorRegistry, DatabaseCollector]] = {}
_collectors_lock = threading.Lock()


def render_metrics(database: Database, config: Config) -> tuple[bytes, str]:
    """The Prometheus text exposition of ``database``'s metrics: (body, content type).

    One collector is kept per database object, so each scrape folds in only new audit rows.
    """
    with _collectors_lock:
        entry = _collectors.get(id(database))
        if entry is None or entry[1].database is not database:
            registry = CollectorRegistry(auto_describe=False)
            collector = DatabaseCollector(database, config)
            registry.register(collector)  # type: ignore[arg-type]
            entry = (registry, collector)
            _collectors[id(database)] = entry
    return generate_latest(entry[0]), CONTENT_TYPE_LATEST
