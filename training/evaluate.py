"""The test module: a bundle against labelled studies, through the serving path.

Studies are read and classified by the same :class:`~mibi_node.inference.engine.InferenceEngine`
the daemon uses, once with the bundle's TTA views and once with the identity view only. The
report has one row per member and one for the fused ensemble, each with and without TTA:
accuracy, macro AUC, macro F1, Cohen's kappa, NLL, Brier score and ECE with bootstrap 95%
intervals, plus per-class sensitivity and specificity of the ensemble, a confusion matrix and
ROC curves (PNG), and for phantom data the localisation hit rate: the share of lesion studies
whose suspected focus lies within 10 mm of a true lesion centre. Everything is written as
Markdown and JSON into the bundle's ``reports/`` folder.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mibi_node.errors import MibiNodeError
from mibi_node.imaging.study import StudyInput
from mibi_node.inference.result import StudyResult
from training.data import CLASS_KEYS, DataError, DataSource, Sample, discover, read_sample
from training.metrics import SCALAR_METRICS, metrics_to_dict, summarise
from training.plots import plot_confusion, plot_roc
from training.split import Split

__all__ = [
    "HIT_RADIUS_MM",
    "EvaluationReport",
    "evaluate_bundle",
    "localisation_hits",
    "split_path",
]

logger = logging.getLogger(__name__)

#: A focus within this distance of a true lesion centre is a hit.
HIT_RADIUS_MM = 10.0
#: Classes whose phantom studies have foci to localise.
_FOCAL = ("adenoma", "hyperplasia", "carcinoma")
_BATCH = 16
_LABELS = {
    "accuracy": "Accuracy",
    "macro_auc": "Macro AUC",
    "macro_f1": "Macro F1",
    "kappa": "Kappa",
    "nll": "NLL",
    "brier": "Brier",
    "ece": "ECE",
}


def split_path(bundle_dir: Path) -> Path:
    """Where training saved the split of a bundle."""
    return Path(bundle_dir) / "training" / "split.json"


def _foci(truth: dict[str, str]) -> list[tuple[float, float]]:
    centres = []
    for focus in (truth.get("foci") or "").split(";"):
        parts = focus.split("/")
        if len(parts) >= 4:
            try:
                centres.append((float(parts[2]), float(parts[3])))
            except ValueError:
                continue
    return centres


def localisation_hits(
    samples: Sequence[Sample],
    results: Sequence[StudyResult],
    studies: Sequence[StudyInput],
    radius_mm: float = HIT_RADIUS_MM,
) -> dict[str, Any] | None:
    """Localisation against the phantom's true lesion centres (``foci`` of ``labels.csv``).

    Only studies of a focal class (adenoma, hyperplasia, carcinoma) with known centres count.
    A hit is a suspected focus within ``radius_mm`` of any true centre, measured with the
    image's pixel spacing.

    Returns
    -------
    dict or None
        ``studies`` (focal studies with known centres), ``localised`` (those with a focus,
        i.e. not predicted normal), ``hits``, ``hit_rate`` (hits / localised),
        ``hit_rate_all`` (hits / studies) and ``median_distance_mm``; ``None`` when no study
        has known centres (real data).
    """
    n = hits = localised = 0
    distances = []
    for sample, result, study in zip(samples, results, studies, strict=True):
        centres = _foci(sample.truth)
        if CLASS_KEYS[sample.label] not in _FOCAL or not centres:
            continue
        n += 1
        if result.focus is None:
            continue
        localised += 1
        spacing = study.images[result.focus.phase].pixel_spacing
        if spacing is None:
            try:
                value = float(sample.truth.get("pixel_spacing_mm", ""))
            except ValueError:
                continue
            spacing = (value, value)
        distance = min(
            math.hypot((result.focus.row - r) * spacing[0], (result.focus.col - c) * spacing[1])
            for r, c in centres
        )
        distances.append(distance)
        hits += distance <= radius_mm
    if n == 0:
        return None
    return {
        "radius_mm": radius_mm,
        "studies": n,
        "localised": localised,
        "hits": hits,
        "hit_rate": hits / localised if localised else float("nan"),
        "hit_rate_all": hits / n,
        "median_distance_mm": float(np.median(distances)) if distances else float("nan"),
    }


@dataclass
class EvaluationReport:
    """What :func:`evaluate_bundle` found.

    Attributes
    ----------
    rows
        Row name -> figure -> :class:`~training.metrics.MetricValue` (per-class figures are
        lists), in table order: members with TTA, ensemble with TTA, then without TTA.
    confusion
        (K, K) confusion matrix of the ensemble with TTA (rows truth, columns prediction).
    localisation
        See :func:`localisation_hits`; ``None`` for data without lesion centres.
    n_studies
        Studies evaluated; ``skipped`` lists the unreadable ones with the reason.
    files
        The written report files.
    beats_best_member
        Figure -> whether the ensemble (TTA) beats the best member (TTA) on it.
    """

    bundle_name: str
    bundle_version: str
    split: str
    rows: dict[str, dict[str, Any]]
    confusion: np.ndarray
    localisation: dict[str, Any] | None
    n_studies: int
    skipped: dict[str, str] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    beats_best_member: dict[str, bool] = field(default_factory=dict)
    class_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""

        def clean(value: Any) -> Any:
            if isinstance(value, float) and math.isnan(value):
                return None
            if isinstance(value, dict):
                return {k: clean(v) for k, v in value.items()}
            return value

        return {
            "bundle": {"name": self.bundle_name, "version": self.bundle_version},
            "split": self.split,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "n_studies": self.n_studies,
            "class_counts": self.class_counts,
            "skipped": self.skipped,
            "rows": {name: metrics_to_dict(row, CLASS_KEYS) for name, row in self.rows.items()},
            "confusion": {"classes": list(CLASS_KEYS), "matrix": self.confusion.tolist()},
            "localisation": clean(self.localisation),
            "ensemble_beats_best_member": self.beats_best_member,
            "seconds": round(self.seconds, 2),
        }

    def markdown(self) -> str:
        """The patent's table and the ensemble's per-class figures as Markdown."""
        lines = [
            f"# Evaluation of {self.bundle_name} {self.bundle_version} on split `{self.split}`",
            "",
            f"{self.n_studies} studies ("
            + ", ".join(f"{k} {n}" for k, n in self.class_counts.items())
            + "). Values with bootstrap 95% intervals.",
            "",
            "| Model | " + " | ".join(_LABELS[m] for m in SCALAR_METRICS) + " |",
            "|---|" + "---|" * len(SCALAR_METRICS),
        ]
        for name, row in self.rows.items():
            lines.append(
                f"| {name} | " + " | ".join(row[m].format() for m in SCALAR_METRICS) + " |"
            )
        ensemble = self.rows.get("ensemble")
        if ensemble is not None:
            lines += [
                "",
                "## Ensemble (TTA) per class",
                "",
                "| Class | Sensitivity | Specificity |",
                "|---|---|---|",
            ]
            for k, key in enumerate(CLASS_KEYS):
                sens, spec = ensemble["sensitivity"][k], ensemble["specificity"][k]
                lines.append(f"| {key} | {sens.format()} | {spec.format()} |")
        if self.beats_best_member:
            better = [m for m, won in self.beats_best_member.items() if won]
            lines += [
                "",
                "Ensemble better than its best member on: " + (", ".join(better) or "none") + ".",
            ]
        if self.localisation:
            loc = self.localisation
            lines += [
                "",
                "## Localisation",
                "",
                f"{loc['hits']} of {loc['localised']} localised lesion studies have the focus "
                f"within {loc['radius_mm']:g} mm of a true lesion centre (hit rate "
                f"{loc['hit_rate']:.3f}; {loc['hit_rate_all']:.3f} of all {loc['studies']} "
                f"lesion studies; median distance {loc['median_distance_mm']:.1f} mm).",
            ]
        if self.skipped:
            lines += ["", f"{len(self.skipped)} studies could not be read and were left out."]
        return "\n".join(lines) + "\n"


def _engine_predictions(
    engine: Any, studies: Sequence[StudyInput], on_batch: Callable[[int], None] | None
) -> list[StudyResult]:
    results: list[StudyResult] = []
    for start in range(0, len(studies), _BATCH):
        chunk = list(studies[start : start + _BATCH])
        results.extend(engine.predict(chunk))
        if on_batch is not None:
            on_batch(len(chunk))
    return results


def _probabilities(
    results: Sequence[StudyResult], members: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    fused = np.asarray([[r.probabilities[k] for k in CLASS_KEYS] for r in results])
    predicted = np.asarray([CLASS_KEYS.index(r.predicted) for r in results])
    member = np.asarray(
        [[[r.member_probabilities[m][k] for k in CLASS_KEYS] for r in results] for m in members]
    )
    return fused, predicted, member


def evaluate_bundle(
    bundle_dir: Path | str,
    data_dir: Path | str | DataSource,
    split: str = "test",
    *,
    device: str = "auto",
    n_resamples: int = 1000,
    seed: int = 0,
    out_dir: Path | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> EvaluationReport:
    """Evaluate a bundle on labelled studies and write the reports.

    Parameters
    ----------
    bundle_dir
        The model bundle.
    data_dir
        A data folder (see :mod:`training.data`) or an already discovered one.
    split
        ``"test"``, ``"val"`` or ``"train"`` (the split saved with the bundle at training), or
        ``"all"`` for every study of the folder (a fresh test set).
    device
        Where the engine runs.
    n_resamples
        Bootstrap resamples for the 95% intervals (0: none).
    seed
        Seed of the bootstrap.
    out_dir
        Where the reports go; the bundle's ``reports/`` folder by default.
    progress
        Called with (stage, done, total).

    Returns
    -------
    EvaluationReport

    Raises
    ------
    DataError
        The split is unknown, or was drawn from other data, or no study can be read.
    BundleError
        The bundle cannot be loaded.
    """
    import time

    from mibi_node.imaging.tta import parse_views
    from mibi_node.inference.engine import InferenceEngine

    started = time.perf_counter()
    if split not in ("test", "val", "train", "all"):
        raise ValueError(f'Argument "split" should be test, val, train or all, got {split!r}.')
    bundle_dir = Path(bundle_dir)
    engine = InferenceEngine(bundle_dir, device=device)
    bundle = engine.bundle
    source = data_dir if isinstance(data_dir, DataSource) else discover(data_dir)
    if split == "all":
        samples = list(source.samples)
    else:
        saved = Split.load(split_path(bundle_dir))
        if saved.data_fingerprint != source.fingerprint:
            raise DataError(
                f"the {split} split of bundle {bundle_dir} was drawn from other data than "
                f"{source.root}; evaluate a fresh data folder with split 'all'"
            )
        samples = source.subset(saved.keys(split))
    if not samples:
        raise DataError(f"split {split!r} of {source.root} holds no studies")

    studies: list[StudyInput] = []
    kept: list[Sample] = []
    skipped: dict[str, str] = {}
    for done, sample in enumerate(samples, 1):
        try:
            studies.append(read_sample(sample, bundle.channels))
            kept.append(sample)
        except MibiNodeError as exc:
            skipped[sample.key] = str(exc)
            logger.warning("study %s left out: %s", sample.key, exc)
        if progress is not None:
            progress("read", done, len(samples))
    if not studies:
        raise DataError(
            f"no study of split {split!r} could be read (first: {next(iter(skipped.values()))})"
        )

    done_count = [0]
    total = 2 * len(studies)

    def on_batch(n: int) -> None:
        done_count[0] += n
        if progress is not None:
            progress("classify", done_count[0], total)

    with_tta = _engine_predictions(engine, studies, on_batch)
    engine.views = parse_views(["identity"])
    without_tta = _engine_predictions(engine, studies, on_batch)

    labels = np.asarray([sample.label for sample in kept])
    members = bundle.member_names
    rows: dict[str, dict[str, Any]] = {}
    fused, predicted, member = _probabilities(with_tta, members)
    for m, name in enumerate(members):
        rows[name] = summarise(labels, member[m], n_resamples=n_resamples, seed=seed)
    rows["ensemble"] = summarise(labels, fused, predicted, n_resamples=n_resamples, seed=seed)
    plain_fused, plain_predicted, plain_member = _probabilities(without_tta, members)
    for m, name in enumerate(members):
        rows[f"{name} (no TTA)"] = summarise(
            labels, plain_member[m], n_resamples=n_resamples, seed=seed
        )
    rows["ensemble (no TTA)"] = summarise(
        labels, plain_fused, plain_predicted, n_resamples=n_resamples, seed=seed
    )

    from sklearn.metrics import confusion_matrix

    confusion = confusion_matrix(labels, predicted, labels=list(range(len(CLASS_KEYS))))
    beats = {}
    for metric, higher_is_better in (("accuracy", True), ("nll", False), ("ece", False)):
        best = [rows[name][metric].value for name in members]
        ensemble_value = rows["ensemble"][metric].value
        beats[metric] = bool(
            ensemble_value > max(best) if higher_is_better else ensemble_value < min(best)
        )
    counts = np.bincount(labels, minlength=len(CLASS_KEYS))
    report = EvaluationReport(
        bundle_name=bundle.name,
        bundle_version=bundle.version,
        split=split,
        rows=rows,
        confusion=confusion,
        localisation=localisation_hits(kept, with_tta, studies),
        n_studies=len(kept),
        skipped=skipped,
        beats_best_member=beats,
        class_counts={k: int(n) for k, n in zip(CLASS_KEYS, counts, strict=True)},
    )

    out = Path(out_dir) if out_dir is not None else bundle_dir / "reports"
    out.mkdir(parents=True, exist_ok=True)
    title = f"{bundle.name} {bundle.version}, ensemble with TTA, split {split}"
    report.files.append(
        plot_confusion(confusion, CLASS_KEYS, out / f"confusion-{split}.png", title)
    )
    report.files.append(plot_roc(labels, fused, CLASS_KEYS, out / f"roc-{split}.png", title))
    report.seconds = time.perf_counter() - started
    markdown = out / f"evaluation-{split}.md"
    markdown.write_text(report.markdown(), encoding="utf-8")
    document = out / f"evaluation-{split}.json"
    document.write_text(json.dumps(report.to_dict(), indent=1) + "\n", encoding="utf-8")
    report.files[:0] = [markdown, document]
    logger.info(
        "evaluated %s on %d studies of split %s: ensemble accuracy %.3f, macro AUC %.3f",
        bundle.name,
        len(kept),
        split,
        rows["ensemble"]["accuracy"].value,
        rows["ensemble"]["macro_auc"].value,
    )
    return report
