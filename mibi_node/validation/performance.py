"""How the models do on this hospital's own studies: per analysis, bundle version, camera
(Station Name / Manufacturer Model Name / Device Serial Number) and sending AE.

A *case* is the latest finished job of one analysis of one study. Its *reference* is the
study's latest imported final diagnosis for that analysis, else the latest verdict on its
``diagnosis`` finding (accepted: the model's class; corrected: the reader's; rejected: no
reference, since the right class is not known). For classifying analyses the figures are
scikit-learn's on the cases with a reference; ECE and the reliability table are computed
here (docs/validation.md gives the formulas). For every analysis the verdicts are counted
per finding type, and where a case has both, the readers' verdicts are compared with the
final diagnoses.
"""

from __future__ import annotations

import logging
import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import (
    accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    f1_score,
    roc_auc_score,
)
from sqlalchemy import select

from mibi_node.analyses.base import Analysis, TaskKind
from mibi_node.analyses.registry import available_analyses
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import Job, JobState, Study, Truth, VerdictDecision
from mibi_node.validation.headers import StudyHeader, study_headers
from mibi_node.validation.verdicts import standing_verdicts

__all__ = [
    "ALL",
    "BINS",
    "Case",
    "Classification",
    "GroupPerformance",
    "calibration",
    "cases",
    "classification",
    "classify_cases",
    "performance",
]

logger = logging.getLogger(__name__)

#: Equal-width confidence bins of the ECE and the reliability table.
BINS = 10
#: The label of a dimension summed over.
ALL = "*"


@dataclass(frozen=True)
class Case:
    """One assessed study of one analysis (its latest finished job)."""

    job_id: int
    study_id: int
    analysis: str
    bundle_version: str
    station: str
    calling_ae_title: str
    predicted: str
    probabilities: dict[str, float]
    #: The final diagnosis, if one was imported.
    truth: str | None
    #: finding key -> (decision, corrected value) of the latest verdict on it.
    verdicts: dict[str, tuple[str, str | None]]
    #: finding key -> (finding type, the model's value).
    findings: dict[str, tuple[str, str]]

    @property
    def reference(self) -> str | None:
        """The final diagnosis, else the reader's class from the ``diagnosis`` verdict."""
        if self.truth is not None:
            return self.truth
        decision, value = self.verdicts.get("diagnosis", ("", None))
        if decision == VerdictDecision.ACCEPTED.value:
            return self.predicted
        if decision == VerdictDecision.CORRECTED.value:
            return value
        return None


@dataclass
class Classification:
    """The figures of a classifier on the cases with a reference.

    ``intervals`` holds the bootstrap 95 % interval (2.5th and 97.5th percentile over
    resamples of the cases) of each figure; ``None`` where a figure is undefined (one class
    only for the AUC).
    """

    n: int
    classes: list[str]
    accuracy: float
    macro_f1: float
    kappa: float | None
    macro_auc: float | None
    ece: float
    reliability: list[dict[str, float]]
    confusion: list[list[int]]
    intervals: dict[str, tuple[float, float] | None] = field(default_factory=dict)


@dataclass
class GroupPerformance:
    """The figures of one analysis on one group of cases (``*`` where a dimension is summed
    over)."""

    analysis: str
    bundle_version: str
    station: str
    calling_ae_title: str
    cases: int
    with_truth: int
    with_verdict: int
    classification: Classification | None
    #: finding type -> {"accepted": n, "rejected": n, "corrected": n, "total": n, and shares}.
    verdicts: dict[str, dict[str, float]]
    #: Cases whose verdict and final diagnosis can be compared, and the share that agree.
    agreement: dict[str, float | int | None]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


def cases(
    database: Database, files: FileStore | None = None, analysis: str | None = None
) -> list[Case]:
    """Every analysis' latest finished job per study, with its verdicts and final diagnosis.

    Without ``files`` the station is not read (``*``): what the metrics use at each scrape.
    """
    analyses = available_analyses()
    with database.session() as session:
        query = (
            select(Job, Study.calling_ae_title)
            .join(Study, Study.id == Job.study_id)
            .where(Job.state == JobState.DONE, Job.shadow.is_(False))
            .order_by(Job.study_id, Job.analysis, Job.version.desc(), Job.id.desc())
        )
        if analysis is not None:
            query = query.where(Job.analysis == analysis)
        latest: dict[tuple[int, str], tuple[Job, str]] = {}
        for job, ae in session.execute(query).all():
            latest.setdefault((job.study_id, job.analysis), (job, ae))
        verdicts = {
            job_id: {
                key: (VerdictDecision(row.decision).value, row.value) for key, row in rows.items()
            }
            for job_id, rows in standing_verdicts(
                session, [job for job, _ in latest.values()]
            ).items()
        }
        truths: dict[tuple[int, str], str] = {}
        for truth in session.scalars(select(Truth).order_by(Truth.id)):
            truths[(truth.study_id, truth.analysis)] = truth.diagnosis
    headers: dict[int, StudyHeader] = (
        study_headers(database, files, [k[0] for k in latest]) if files is not None else {}
    )
    found: list[Case] = []
    for (study_id, name), (job, ae) in sorted(latest.items()):
        result: dict[str, Any] = dict(job.result or {})
        unit = analyses.get(name)
        findings = unit.findings(result) if unit is not None else ()
        bundle = dict(result.get("bundle") or {})
        found.append(
            Case(
                job_id=job.id,
                study_id=study_id,
                analysis=name,
                bundle_version=str(bundle.get("version") or "?"),
                station=headers[study_id].station if study_id in headers else ALL,
                calling_ae_title=ae or "",
                predicted=str(result.get("predicted") or ""),
                probabilities={
                    str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()
                },
                truth=truths.get((study_id, name)),
                verdicts=dict(verdicts.get(job.id, {})),
                findings={f.key: (f.type, f.value) for f in findings},
            )
        )
    return found


def calibration(
    confidence: Sequence[float] | np.ndarray,
    correct: Sequence[bool] | np.ndarray,
    bins: int = BINS,
) -> tuple[float, list[dict[str, float]]]:
    """ECE and the reliability table of top-label confidences.

    Bin ``b`` holds the confidences in ``(b/B, (b+1)/B]`` (the first also 0). ECE is
    ``sum_b n_b / N * |accuracy_b - confidence_b|``; empty bins are left out of the table.
    """
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    index = np.clip(np.ceil(conf * bins).astype(int) - 1, 0, bins - 1)
    ece = 0.0
    table: list[dict[str, float]] = []
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if not count:
            continue
        accuracy, mean = float(hit[members].mean()), float(conf[members].mean())
        ece += count / len(conf) * abs(accuracy - mean)
        table.append(
            {"low": b / bins, "high": (b + 1) / bins, "count": count,
             "confidence": mean, "accuracy": accuracy}
        )  # fmt: skip
    return ece, table


def _macro_auc(truth: np.ndarray, scores: np.ndarray, classes: list[str]) -> float | None:
    """Mean one-vs-rest AUC over the classes that occur (and do not make up every case)."""
    aucs = []
    for column, name in enumerate(classes):
        positive = truth == name
        if positive.any() and not positive.all():
            aucs.append(roc_auc_score(positive, scores[:, column]))
    return float(np.mean(aucs)) if aucs and len(set(truth)) > 1 else None


def classification(
    truth: Sequence[str],
    predicted: Sequence[str],
    scores: np.ndarray,
    classes: list[str],
    resamples: int = 500,
    seed: int = 0,
) -> Classification:
    """The figures of one classifier; ``scores`` rows are each case's class probabilities
    (scaled to sum 1) in ``classes`` order."""
    y_true, y_pred = np.asarray(truth), np.asarray(predicted)
    confidence = scores[np.arange(len(y_pred)), [classes.index(p) for p in y_pred]]

    def figures(rows: np.ndarray) -> dict[str, float | None]:
        t, p = y_true[rows], y_pred[rows]
        with warnings.catch_warnings():  # a resample of one class: kappa undefined (None)
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            kappa = cohen_kappa_score(t, p, labels=classes)
        return {
            "accuracy": float(accuracy_score(t, p)),
            "macro_f1": float(f1_score(t, p, labels=classes, average="macro", zero_division=0)),
            "kappa": None if np.isnan(kappa) else float(kappa),
            "macro_auc": _macro_auc(t, scores[rows], classes),
            "ece": calibration(confidence[rows], t == p)[0],
        }

    everything = np.arange(len(y_true))
    point = figures(everything)
    ece, table = calibration(confidence, y_true == y_pred)
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(resamples if len(y_true) > 1 else 0):
        for name, value in figures(rng.integers(0, len(y_true), len(y_true))).items():
            if value is not None:
                samples[name].append(value)
    intervals: dict[str, tuple[float, float] | None] = {
        name: (
            (float(np.percentile(samples[name], 2.5)), float(np.percentile(samples[name], 97.5)))
            if samples.get(name)
            else None
        )
        for name in point
    }
    return Classification(
        n=len(y_true),
        classes=classes,
        accuracy=float(point["accuracy"] or 0.0),
        macro_f1=float(point["macro_f1"] or 0.0),
        kappa=point["kappa"],
        macro_auc=point["macro_auc"],
        ece=ece,
        reliability=table,
        confusion=confusion_matrix(y_true, y_pred, labels=classes).tolist(),
        intervals=intervals,
    )


def classify_cases(
    unit: Analysis | None, group: list[Case], resamples: int
) -> Classification | None:
    """The figures of a classifying analysis on the cases of ``group`` with a reference
    (``None`` for other analyses, or without such cases)."""
    if unit is None or unit.task is not TaskKind.CLASSIFICATION:
        return None
    assessed = [c for c in group if c.reference is not None and c.probabilities]
    classes = list(unit.diagnoses) or sorted({k for c in assessed for k in c.probabilities})
    assessed = [c for c in assessed if c.reference in classes and c.predicted in classes]
    if not assessed:
        return None
    scores = np.array([[c.probabilities.get(k, 0.0) for k in classes] for c in assessed])
    totals = scores.sum(axis=1, keepdims=True)
    scores = np.divide(scores, totals, out=np.full_like(scores, 1 / len(classes)), where=totals > 0)
    return classification(
        [str(c.reference) for c in assessed],
        [c.predicted for c in assessed],
        scores,
        classes,
        resamples=resamples,
    )


def _verdict_counts(group: list[Case]) -> dict[str, dict[str, float]]:
    counts: dict[str, dict[str, float]] = {}
    for case in group:
        for key, (decision, _value) in case.verdicts.items():
            kind = case.findings.get(key, (key, ""))[0]
            row = counts.setdefault(kind, {d.value: 0.0 for d in VerdictDecision} | {"total": 0.0})
            row[decision] += 1
            row["total"] += 1
    for row in counts.values():
        for decision in VerdictDecision:
            row[f"{decision.value}_share"] = row[decision.value] / row["total"]
    return counts


def _agreement(group: list[Case]) -> dict[str, float | int | None]:
    """Verdicts against final diagnoses: the ``diagnosis`` finding (the reader's class) and
    present/absent findings keyed by class (present exactly when the diagnosis is that)."""
    compared = agreeing = 0
    for case in group:
        if case.truth is None:
            continue
        for key, (decision, value) in case.verdicts.items():
            model = case.findings.get(key, ("", ""))[1]
            if key == "diagnosis":
                said, right = (value if decision == "corrected" else model), case.truth
            elif model in ("present", "absent"):
                said, right = (
                    (value if decision == "corrected" else model),
                    ("present" if case.truth == key else "absent"),
                )
            else:
                continue
            compared += 1
            agreeing += (said != right) if decision == "rejected" else (said == right)
    return {"compared": compared, "agreeing": agreeing,
            "share": agreeing / compared if compared else None}  # fmt: skip


def performance(
    database: Database,
    files: FileStore | None = None,
    analysis: str | None = None,
    resamples: int = 500,
) -> list[GroupPerformance]:
    """The figures of each analysis: first over all its cases, then per (bundle version,
    station, sending AE).

    Parameters
    ----------
    files
        The store, to read each study's camera from its headers; ``None``: no per-station
        groups (station ``*``).
    analysis
        Only this analysis.
    resamples
        Bootstrap resamples of the cases for the 95 % intervals (0: none).
    """
    found = cases(database, files, analysis)
    units = available_analyses()
    groups: dict[tuple[str, str, str, str], list[Case]] = defaultdict(list)
    for case in found:
        groups[(case.analysis, ALL, ALL, ALL)].append(case)
        key = (case.analysis, case.bundle_version, case.station, case.calling_ae_title)
        groups[key].append(case)
    return [
        GroupPerformance(
            analysis=key[0],
            bundle_version=key[1],
            station=key[2],
            calling_ae_title=key[3],
            cases=len(group),
            with_truth=sum(c.truth is not None for c in group),
            with_verdict=sum(bool(c.verdicts) for c in group),
            classification=classify_cases(units.get(key[0]), group, resamples),
            verdicts=_verdict_counts(group),
            agreement=_agreement(group),
        )
        for key, group in sorted(groups.items())  # "*" sorts before any version
    ]
