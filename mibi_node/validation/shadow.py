"""Shadow mode: a candidate bundle runs beside the current one, and is promoted by a person.

An analysis with ``[analyses.<name>] shadow_bundle`` gets, beside each job of a study
version, a *shadow* job of the same version (``job.shadow``) that the workers run with the
candidate bundle. Its result, bundle and timings are stored (and its SR kept in the results
store), but it has no delivery and the study's state does not depend on it. This module says
which bundle is current and which is the candidate, compares the two on the studies both
analysed (and, where the right answer is known, against it), and promotes the candidate.

A promotion is a row in the ``setting`` table (``bundle.<analysis>``), so it survives
restarts and reaches every worker at its next poll without editing the TOML. It holds while
the configuration's ``bundle`` of the analysis is the one it replaced: once the TOML names
another bundle, the TOML rules again.

scikit-learn (through :mod:`mibi_node.validation.performance`) is imported on first use, so
the routing sweep and the workers, which ask only which bundles run, do not load it.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from mibi_node import audit
from mibi_node.analyses.base import TaskKind
from mibi_node.analyses.registry import available_analyses, get_analysis
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.models import Job, JobState, Setting, utcnow

if TYPE_CHECKING:
    from mibi_node.config import Config
    from mibi_node.validation.performance import Classification

__all__ = [
    "BundleChoice",
    "PromotionError",
    "Promotion",
    "ShadowComparison",
    "bundle_choices",
    "check_candidate",
    "current_bundle",
    "promote",
    "promotion_candidate",
    "revert_promotion",
    "shadow_comparison",
    "shadow_comparisons",
]

logger = logging.getLogger(__name__)

#: The error of a job of a candidate that was promoted before the job ran.
PROMOTED_BEFORE_RUN = "its candidate bundle was promoted before it ran"


class PromotionError(MibiNodeError):
    """A promotion (or its revert) that cannot be made; the message names the problem."""


def _key(analysis: str) -> str:
    return f"bundle.{analysis}"


def _folder(path: Path | str) -> Path:
    """A bundle folder as compared and recorded: absolute, links resolved."""
    return Path(path).expanduser().resolve()


def _same(one: Path | str, other: Path | str) -> bool:
    """Whether two bundle folders are one: as written in the TOML (a relative path means the
    same to every process of the node), or once resolved here."""
    return str(one) == str(other) or _folder(one) == _folder(other)


@dataclass(frozen=True)
class BundleChoice:
    """The bundle folders one analysis runs now."""

    analysis: str
    #: Whose results are sent: the promoted bundle, else the configuration's ``bundle``.
    current: Path
    #: The candidate run in shadow: ``shadow_bundle`` unless it is the current one.
    candidate: Path | None
    #: The promotion in force (``bundle``, ``replaces``, ``name``, ``version``, ``by``,
    #: ``at``), if any.
    promotion: dict[str, Any] | None = None


def _promotions(session: Session, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for row in session.scalars(select(Setting).where(Setting.key.in_([_key(n) for n in names]))):
        try:
            value = json.loads(row.value)
        except ValueError:
            logger.warning("setting %s is not JSON; the configuration's bundle runs", row.key)
            continue
        if isinstance(value, dict) and value.get("bundle") and value.get("replaces"):
            found[row.key.removeprefix("bundle.")] = value
    return found


def bundle_choices(
    source: Database | Session, config: Config, analyses: Iterable[str] | None = None
) -> dict[str, BundleChoice]:
    """The current and candidate bundle of each analysis (default: the enabled ones).

    One read of the ``setting`` table, in ``source``'s transaction when it is a session.
    """
    names = list(analyses if analyses is not None else config.enabled_analyses)
    if isinstance(source, Session):
        promotions = _promotions(source, names)
    else:
        with source.session() as session:
            promotions = _promotions(session, names)
    choices = {}
    for name in names:
        configured = config.bundle_for(name)
        current, promotion = configured, promotions.get(name)
        if promotion is not None and _same(promotion["replaces"], configured):
            current = Path(promotion["bundle"])
        else:
            promotion = None  # the TOML names another bundle since: it rules
        candidate = config.shadow_bundle_for(name)
        if candidate is not None and _same(candidate, current):
            candidate = None
        choices[name] = BundleChoice(name, current, candidate, promotion)
    return choices


def current_bundle(database: Database, config: Config, analysis: str) -> Path:
    """The bundle folder whose results analysis ``analysis`` sends now."""
    return bundle_choices(database, config, [analysis])[analysis].current


# -- the comparison ---------------------------------------------------------------------------


@dataclass
class ShadowComparison:
    """The candidate against the current bundle on the studies both analysed.

    A study counts when its latest finished (non-shadow) job and the shadow job of the same
    version are both DONE. Figures are ``None`` where they are undefined (nothing compared,
    one class only for kappa).
    """

    analysis: str
    #: Folders now (with a configuration): the current bundle and the candidate.
    current_folder: str | None
    candidate_folder: str | None
    #: Shadow jobs of the analysis by state (QUEUED, RUNNING, DONE, FAILED).
    shadow_jobs: dict[str, int]
    #: "name version" of the bundles of the compared jobs -> studies.
    current_bundles: dict[str, int]
    candidate_bundles: dict[str, int]
    compared: int
    #: Studies where both said the same main finding (the result's ``predicted``).
    same_prediction: int
    agreement: float | None
    #: Cohen's kappa of the two predicted classes (classifying analyses).
    kappa: float | None
    #: Findings (``Analysis.findings``, matched by key) over the studies, and those with the
    #: same value in both (a finding only one result has disagrees).
    findings_compared: int
    findings_agreeing: int
    findings_agreement: float | None
    #: Compared studies with a reference (final diagnosis, else standing verdict), and how
    #: many of them have a final diagnosis.
    assessed: int
    with_truth: int
    #: The figures of each on the assessed studies (classifying analyses).
    current: Classification | None = None
    candidate: Classification | None = None
    #: Candidate minus current (accuracy, macro_f1), and their paired bootstrap 95 %
    #: intervals.
    difference: dict[str, float | None] = field(default_factory=dict)
    difference_intervals: dict[str, tuple[float, float] | None] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)

    def figures(self) -> dict[str, Any]:
        """The headline figures, for the audit row of a promotion."""
        return {
            "compared": self.compared,
            "agreement": self.agreement,
            "kappa": self.kappa,
            "findings_agreement": self.findings_agreement,
            "assessed": self.assessed,
            "with_truth": self.with_truth,
            "accuracy": _pair(self.current, self.candidate, "accuracy"),
            "macro_f1": _pair(self.current, self.candidate, "macro_f1"),
            "difference": dict(self.difference),
        }


def _pair(current: Any, candidate: Any, name: str) -> dict[str, float] | None:
    if current is None or candidate is None:
        return None
    return {"current": getattr(current, name), "candidate": getattr(candidate, name)}


def _share(part: int, whole: int) -> float | None:
    return part / whole if whole else None


def shadow_comparison(
    database: Database,
    analysis: str,
    *,
    bundle: str | None = None,
    config: Config | None = None,
    resamples: int = 500,
) -> ShadowComparison:
    """Compare analysis ``analysis``'s shadow results with its current ones.

    Parameters
    ----------
    bundle
        Only the shadow jobs of this candidate ("name version", as ``job.bundle``).
    config
        To name the current and candidate folders.
    resamples
        Paired bootstrap resamples of the assessed studies for the intervals of the
        differences (0: none).
    """
    from mibi_node.validation.performance import cases, classify_cases

    unit = available_analyses().get(analysis)
    with database.session() as session:
        states = {
            JobState(state).value: int(count)
            for state, count in session.execute(
                select(Job.state, func.count())
                .where(Job.analysis == analysis, Job.shadow.is_(True))
                .group_by(Job.state)
            ).all()
        }
        rows = session.execute(
            select(Job.id, Job.study_id, Job.version, Job.shadow, Job.bundle, Job.result)
            .where(Job.analysis == analysis, Job.state == JobState.DONE)
            .order_by(Job.study_id, Job.version.desc(), Job.id.desc())
        ).all()
    latest: dict[int, Any] = {}
    shadows: dict[tuple[int, int], Any] = {}
    for row in rows:
        if not row.shadow:
            latest.setdefault(row.study_id, row)
        elif bundle is None or row.bundle == bundle:
            shadows.setdefault((row.study_id, row.version), row)
    pairs = [
        (latest[study], shadows[(study, latest[study].version)])
        for study in sorted(latest)
        if (study, latest[study].version) in shadows
    ]
    said = [(_predicted(a), _predicted(b)) for a, b in pairs]
    findings_compared = findings_agreeing = 0
    for a, b in pairs:
        mine, theirs = _findings(unit, a), _findings(unit, b)
        for key in mine.keys() | theirs.keys():
            findings_compared += 1
            findings_agreeing += mine.get(key) == theirs.get(key)
    same = sum(x == y for x, y in said)
    choices = bundle_choices(database, config, [analysis])[analysis] if config else None
    comparison = ShadowComparison(
        analysis=analysis,
        current_folder=str(choices.current) if choices else None,
        candidate_folder=str(choices.candidate) if choices and choices.candidate else None,
        shadow_jobs=states,
        current_bundles=dict(Counter(str(a.bundle or "?") for a, _ in pairs)),
        candidate_bundles=dict(Counter(str(b.bundle or "?") for _, b in pairs)),
        compared=len(pairs),
        same_prediction=same,
        agreement=_share(same, len(pairs)),
        kappa=_kappa(unit.diagnoses if unit else (), said)
        if unit is not None and unit.task is TaskKind.CLASSIFICATION
        else None,
        findings_compared=findings_compared,
        findings_agreeing=findings_agreeing,
        findings_agreement=_share(findings_agreeing, findings_compared),
        assessed=0,
        with_truth=0,
    )
    # The reference of each study is fixed on its current case (performance.cases): both
    # bundles are measured against the same answer.
    known = {case.job_id: case for case in cases(database, None, analysis)}
    current, candidate = [], []
    for a, b in pairs:
        case = known.get(a.id)
        if case is None or case.reference is None:
            continue
        fixed = replace(case, truth=case.reference, verdicts={})
        result = dict(b.result or {})
        current.append(fixed)
        candidate.append(
            replace(
                fixed,
                job_id=b.id,
                bundle_version=str(dict(result.get("bundle") or {}).get("version") or "?"),
                predicted=_predicted(b),
                probabilities={
                    str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()
                },
            )
        )
        comparison.with_truth += case.truth is not None
    comparison.assessed = len(current)
    comparison.current = classify_cases(unit, current, 0)
    comparison.candidate = classify_cases(unit, candidate, 0)
    if comparison.current is not None and comparison.candidate is not None:
        comparison.difference = {
            name: getattr(comparison.candidate, name) - getattr(comparison.current, name)
            for name in ("accuracy", "macro_f1")
        }
        comparison.difference_intervals = _paired_intervals(
            current, candidate, comparison.current.classes, resamples
        )
    return comparison


def _predicted(row: Any) -> str:
    return str(dict(row.result or {}).get("predicted") or "")


def _findings(unit: Any, row: Any) -> dict[str, str]:
    if unit is None:
        return {"predicted": _predicted(row)}
    try:
        return {f.key: f.value for f in unit.findings(dict(row.result or {}))}
    except (KeyError, TypeError, ValueError):  # a result its analysis cannot read
        logger.warning("job #%d: the findings of its result cannot be read", row.id)
        return {}


def _kappa(diagnoses: Sequence[str], said: list[tuple[str, str]]) -> float | None:
    if not said:
        return None
    import numpy as np
    from sklearn.exceptions import UndefinedMetricWarning
    from sklearn.metrics import cohen_kappa_score

    first, second = [a for a, _ in said], [b for _, b in said]
    labels = list(dict.fromkeys([*diagnoses, *first, *second]))
    with warnings.catch_warnings():  # both said one and the same class: undefined (None)
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        kappa = float(cohen_kappa_score(first, second, labels=labels))
    return None if np.isnan(kappa) else kappa


def _paired_intervals(
    current: Sequence[Any], candidate: Sequence[Any], classes: list[str], resamples: int
) -> dict[str, tuple[float, float] | None]:
    """2.5th and 97.5th percentiles of candidate minus current over resamples of the
    assessed studies (the same studies for both: a paired bootstrap)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, f1_score

    usable = [
        (str(a.reference), a.predicted, b.predicted)
        for a, b in zip(current, candidate, strict=True)
        if a.reference in classes and a.predicted in classes and b.predicted in classes
    ]
    truth, mine, theirs = (np.array(column) for column in zip(*usable, strict=True)) if usable \
        else (np.array([]),) * 3  # fmt: skip
    samples: dict[str, list[float]] = {"accuracy": [], "macro_f1": []}
    rng = np.random.default_rng(0)
    for _ in range(resamples if len(truth) > 1 else 0):
        rows = rng.integers(0, len(truth), len(truth))
        t = truth[rows]
        samples["accuracy"].append(
            float(accuracy_score(t, theirs[rows]) - accuracy_score(t, mine[rows]))
        )
        samples["macro_f1"].append(
            float(
                f1_score(t, theirs[rows], labels=classes, average="macro", zero_division=0)
                - f1_score(t, mine[rows], labels=classes, average="macro", zero_division=0)
            )
        )
    return {
        name: (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if v else None
        for name, v in samples.items()
    }


def shadow_comparisons(
    database: Database,
    config: Config | None = None,
    analysis: str | None = None,
    resamples: int = 500,
) -> list[ShadowComparison]:
    """One comparison per analysis with a candidate configured or shadow jobs stored (only
    ``analysis`` when given).

    With ``config``, an analysis whose candidate is configured (and not promoted) is compared
    on that candidate's own shadow results only: those of its manifest's name and version.
    """
    if analysis is not None:
        names = [analysis]
    else:
        with database.session() as session:
            stored = set(
                session.scalars(select(Job.analysis).where(Job.shadow.is_(True)).distinct())
            )
        configured = {
            name for name in (config.analyses if config else {})
            if config is not None and config.shadow_bundle_for(name) is not None
        }  # fmt: skip
        names = sorted(stored | configured)
    choices = bundle_choices(database, config, names) if config is not None else {}
    comparisons = []
    for name in names:
        candidate = choices[name].candidate if name in choices else None
        identity = _identity(candidate) if candidate is not None else None
        bundle = (
            f"{identity['name']} {identity['version']}"
            if identity is not None and identity["name"] != "?"
            else None
        )
        comparisons.append(
            shadow_comparison(database, name, bundle=bundle, config=config, resamples=resamples)
        )
    return comparisons


# -- promotion --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Promotion:
    """What a promotion (or its revert) changed."""

    analysis: str
    outcome: str
    #: ``folder``, ``name`` and ``version`` of the bundle that was current, and of the new.
    old: dict[str, str]
    new: dict[str, str]
    #: Queued shadow jobs of the promoted candidate failed (they would compare it with itself).
    cancelled: int = 0


def _identity(folder: Path) -> dict[str, str]:
    """Folder, name and version of a bundle from its manifest (``?`` where unreadable)."""
    from mibi_node.analyses.bundles import MANIFEST_NAMES

    try:
        data = json.loads((folder / MANIFEST_NAMES[0]).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        data = {}
    data = data if isinstance(data, dict) else {}
    return {
        "folder": str(_folder(folder)),
        "name": str(data.get("name") or "?"),
        "version": str(data.get("version") or "?"),
    }


def check_candidate(analysis: str, folder: Path) -> dict[str, str]:
    """Load ``folder`` as ``analysis``'s bundle on the CPU (every weight file's hash is
    checked), as a worker will once it is current; its identity.

    Raises
    ------
    PromotionError
        The folder is missing, is another analysis' bundle, or cannot be loaded.
    """
    from mibi_node.analyses.bundles import bundle_analysis

    if not folder.is_dir():
        raise PromotionError(f"the candidate bundle {folder} of {analysis} does not exist")
    made_for = bundle_analysis(folder)
    if made_for is None:
        raise PromotionError(f"the candidate bundle {folder} has no readable bundle.json")
    if made_for != analysis:
        raise PromotionError(
            f"the candidate bundle {folder} is a {made_for} bundle, not a {analysis} one"
        )
    try:
        runner = get_analysis(analysis).load(folder, "cpu")
    except (MibiNodeError, ValueError, OSError, RuntimeError) as exc:
        raise PromotionError(f"the candidate bundle {folder} cannot be loaded: {exc}") from None
    return {
        "folder": str(_folder(folder)),
        "name": runner.bundle_name,
        "version": runner.bundle_version,
    }


def _actor(by: str, actor: str) -> str:
    by = (by or "").strip()
    if not by:
        raise PromotionError('Argument "by" should name who decided the promotion.')
    return f"{by} ({actor})" if actor else by


def _analysis(config: Config, analysis: str) -> None:
    if analysis not in available_analyses():
        known = ", ".join(sorted(available_analyses()))
        raise PromotionError(f"unknown analysis {analysis!r} (known: {known})")
    if analysis not in config.enabled_analyses:
        raise PromotionError(f"the analysis {analysis} is not enabled on this node")


def promotion_candidate(
    database: Database, config: Config, analysis: str
) -> tuple[BundleChoice, Path]:
    """The analysis' bundles and the candidate to promote.

    Raises
    ------
    PromotionError
        Unknown or disabled analysis, no ``shadow_bundle``, or the candidate is current.
    """
    _analysis(config, analysis)
    configured = config.shadow_bundle_for(analysis)
    if configured is None:
        raise PromotionError(
            f"analyses.{analysis}.shadow_bundle is not set: {analysis} has no candidate bundle"
        )
    choice = bundle_choices(database, config, [analysis])[analysis]
    if choice.candidate is None:
        raise PromotionError(
            f"the candidate bundle {configured} is already the current bundle of {analysis}"
        )
    return choice, choice.candidate


def promote(
    database: Database,
    config: Config,
    analysis: str,
    *,
    by: str,
    actor: str = "",
    comparison: ShadowComparison | None = None,
    checked: dict[str, str] | None = None,
) -> Promotion:
    """Make analysis ``analysis``'s candidate bundle its current one, with its audit row.

    The candidate is loaded first (:func:`check_candidate`); the queued shadow jobs of the
    analysis are failed (they would run the candidate beside itself). Running workers switch
    at their next poll; a job already running finishes with the bundle it started with.

    Parameters
    ----------
    by
        Who decided it (kept in the setting and the audit's actor).
    actor
        Through what it came (``cli:<login>``, ``web``).
    comparison
        The comparison shown before (computed here when not given); its figures go into
        the audit row.
    checked
        What :func:`check_candidate` said of the candidate, when it was called already.

    Raises
    ------
    PromotionError
        No candidate, the candidate cannot be loaded, or no ``by``.
    """
    who = _actor(by, actor)
    choice, candidate = promotion_candidate(database, config, analysis)
    new = checked or check_candidate(analysis, candidate)
    old = _identity(choice.current)
    if comparison is None:
        comparison = shadow_comparison(
            database, analysis, bundle=f"{new['name']} {new['version']}", resamples=0
        )
    value = {  # the folders as the TOML writes them: resolved by each process of the node
        "bundle": str(candidate),
        "replaces": str(config.bundle_for(analysis)),
        "name": new["name"],
        "version": new["version"],
        "by": by.strip(),
        "at": utcnow().isoformat(),
    }
    with database.write_lock(), database.session() as session, session.begin():
        row = session.get(Setting, _key(analysis), with_for_update=True)
        if row is None:
            session.add(Setting(key=_key(analysis), value=json.dumps(value)))
        else:
            row.value = json.dumps(value)
        queued = session.scalars(
            select(Job)
            .where(Job.analysis == analysis, Job.shadow.is_(True), Job.state == JobState.QUEUED)
            .with_for_update()
        ).all()
        for job in queued:
            job.transition(JobState.FAILED, PROMOTED_BEFORE_RUN)
        audit.add(
            session,
            "promote",
            "promoted",
            actor=who,
            message=f"{analysis}: {new['name']} {new['version']} replaces "
            f"{old['name']} {old['version']}",
            detail={
                "analysis": analysis,
                "old": old,
                "new": new,
                "cancelled": len(queued),
                **comparison.figures(),
            },
        )
    return Promotion(analysis, "promoted", old, new, len(queued))


def revert_promotion(
    database: Database, config: Config, analysis: str, *, by: str, actor: str = ""
) -> Promotion:
    """Undo the promotion in force: the configuration's ``bundle`` is current again (and
    the configured candidate runs in shadow again); audited.

    Raises
    ------
    PromotionError
        No promotion is in force for the analysis, or no ``by``.
    """
    who = _actor(by, actor)
    _analysis(config, analysis)
    choice = bundle_choices(database, config, [analysis])[analysis]
    if choice.promotion is None:
        raise PromotionError(
            f"{analysis} has no promotion in force: its current bundle is the "
            f"configuration's, {config.bundle_for(analysis)}"
        )
    old, new = _identity(choice.current), _identity(config.bundle_for(analysis))
    with database.write_lock(), database.session() as session, session.begin():
        session.execute(delete(Setting).where(Setting.key == _key(analysis)))
        audit.add(
            session,
            "promote",
            "reverted",
            actor=who,
            message=f"{analysis}: back to {new['name']} {new['version']} from the configuration",
            detail={"analysis": analysis, "old": old, "new": new},
        )
    return Promotion(analysis, "reverted", old, new)
