"""Training and evaluation of the thyroid analysis' bundle (seed 001).

Seed 001 trains its improved ResNet on single-finding images first, then retrains it on the
"cross-training set" (single *and* mixed findings) so it learns the overlapping features
of mixed scans without forgetting the single ones. :func:`train_thyroid` does that per
member (``schedule = "cross_training"``), or trains on everything from the start
(``"all_at_once"``, for the comparison); the loss is a per-finding binary cross-entropy
(multi-label), the fusion weights and the per-finding thresholds are fitted on a held-out
validation split. :func:`evaluate_thyroid` runs the bundle through
:class:`~mibi_node.analyses.thyroid.runner.ThyroidRunner` on a labelled folder of studies
and gives per-finding recall, precision, specificity and F1, the exact-match accuracy, and
the same for each member alone (the cross-feature ResNet against the plain ResNet).

Usage::

    python -m training.thyroid synth DATA --studies 1200 --seed 0
    python -m training.thyroid train config/thyroid-demo.toml DATA --out var/bundles/thyroid-demo
    python -m training.thyroid evaluate var/bundles/thyroid-demo DATA
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import hashlib
import logging
import math
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import BaseModel, ConfigDict, Field

import mibi_node
import mibi_node.analyses.thyroid.model  # noqa: F401  (registers the cross-feature members)
from mibi_node.analyses.memory import record_measured_memory
from mibi_node.analyses.thyroid.bundle import load_thyroid_bundle, write_thyroid_bundle
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.result import FINDINGS
from mibi_node.analyses.thyroid.runner import ThyroidRunner, decide_findings, prepare_thyroid_input
from mibi_node.errors import ConfigError
from mibi_node.imaging.study import StudyInput
from mibi_node.inference.members import Member, create_member
from mibi_node.inference.recipe import (
    DenoiseSection,
    NormalisationSection,
    read_recipe,
)
from mibi_node.validation.drift import record_training_inputs

__all__ = [
    "ThyroidRecipe",
    "evaluate_thyroid",
    "finding_metrics",
    "fit_thresholds",
    "format_thyroid_table",
    "load_thyroid_arrays",
    "load_thyroid_recipe",
    "train_thyroid",
]

logger = logging.getLogger(__name__)

Schedule = Literal["cross_training", "all_at_once"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Input(_Section):
    size: int = Field(default=64, ge=16, le=512)
    field_mm: float | None = Field(default=None, gt=0)


class _Member(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_\-]+$")
    arch: str
    heads: int = Field(default=4, ge=1)
    embed_dim: int = Field(default=64, ge=8)


class _Augment(_Section):
    hflip: float = Field(default=0.5, ge=0, le=1)
    shift: int = Field(default=3, ge=0, le=16)
    gain: tuple[float, float] = (0.9, 1.1)


class _Training(_Section):
    seed: int = 0
    threads: int = Field(default=1, ge=1)
    schedule: Schedule = "cross_training"
    single_epochs: int = Field(default=10, ge=0)
    cross_epochs: int = Field(default=8, ge=0)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    cross_lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=20, ge=0)
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5)
    augment: _Augment = _Augment()


class ThyroidRecipe(_Section):
    """The parsed thyroid recipe (``config/thyroid-demo.toml``)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"] = "demonstration"
    description: str = ""
    input: _Input = _Input()
    normalisation: NormalisationSection = NormalisationSection()
    denoise: DenoiseSection = DenoiseSection()
    members: tuple[_Member, ...] = Field(min_length=1)
    training: _Training = _Training()


def load_thyroid_recipe(path: Path | str) -> ThyroidRecipe:
    """Read and validate a thyroid recipe.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names file and key.
    """
    path = Path(path)
    recipe = read_recipe(path, ThyroidRecipe, "thyroid recipe")
    from mibi_node.inference.members import is_member

    for i, member in enumerate(recipe.members):
        if not is_member(member.arch):
            raise ConfigError(
                f"thyroid recipe {path}: key 'members.{i}.arch': {member.arch!r} is not a "
                "registered member"
            )
    return recipe


# -- data ------------------------------------------------------------------------------------


def _read_labels(data: Path) -> list[dict[str, str]]:
    path = Path(data) / "labels.csv"
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            return list(csv.DictReader(handle))
    except FileNotFoundError:
        raise ConfigError(f"thyroid data {data}: it has no labels.csv") from None


def _targets(rows: Sequence[dict[str, str]]) -> np.ndarray:
    y = np.zeros((len(rows), len(FINDINGS)), dtype=np.float32)
    for i, row in enumerate(rows):
        for key in row["findings"].split(";"):
            y[i, FINDINGS.index(key)] = 1.0
    return y


def _read_studies(data: Path, rows: Sequence[dict[str, str]]) -> list[StudyInput]:
    return [read_thyroid_study([Path(data) / row["folder"]]) for row in rows]


def _inputs(studies: Sequence[StudyInput], recipe: ThyroidRecipe) -> np.ndarray:
    normalisation = recipe.normalisation.to_normalisation()
    smax = recipe.denoise.smax if recipe.denoise.enabled else None
    return np.stack(
        [
            prepare_thyroid_input(
                s.images["thyroid"].pixels,
                recipe.input.size,
                normalisation,
                smax,
                pixel_spacing=s.images["thyroid"].pixel_spacing,
                field_mm=recipe.input.field_mm,
            )[0]
            for s in studies
        ]
    )


def load_thyroid_arrays(
    recipe: ThyroidRecipe | Path | str, data: Path | str
) -> tuple[np.ndarray, np.ndarray]:
    """A labelled folder of studies as the model sees it: (inputs, targets).

    ``inputs`` is (N, 1, size, size) float32, read and prepared exactly as training and the
    node's runner prepare them (crop, resize, normalisation, denoise); ``targets`` is
    (N, findings) 0/1 in :data:`~mibi_node.analyses.thyroid.result.FINDINGS` order. Data
    generators (the GAN, the ablation) work on these arrays.
    """
    parsed = recipe if isinstance(recipe, ThyroidRecipe) else load_thyroid_recipe(recipe)
    rows = _read_labels(Path(data))
    return _inputs(_read_studies(Path(data), rows), parsed), _targets(rows)


def _split(
    rows: Sequence[dict[str, str]], fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified by finding combination: (train indices, validation indices)."""
    rng = np.random.default_rng([seed, 7001])
    groups: dict[str, list[int]] = {}
    for i, row in enumerate(rows):
        groups.setdefault(row["findings"], []).append(i)
    train, val = [], []
    for key in sorted(groups):
        members = np.array(groups[key])
        rng.shuffle(members)
        n_val = int(round(len(members) * fraction)) if len(members) > 1 else 0
        val.extend(members[:n_val].tolist())
        train.extend(members[n_val:].tolist())
    if not val and len(train) >= 4:  # tiny sets: every combination is unique
        picked = rng.choice(len(train), max(1, int(round(len(train) * fraction))), replace=False)
        val = [train[i] for i in picked]
        train = [i for i in train if i not in set(val)]
    return np.array(sorted(train), dtype=int), np.array(sorted(val), dtype=int)


def _fingerprint(data: Path) -> str:
    return hashlib.sha256((Path(data) / "labels.csv").read_bytes()).hexdigest()


# -- training --------------------------------------------------------------------------------


def _augment(x: torch.Tensor, config: _Augment, generator: torch.Generator) -> torch.Tensor:
    batch = x.shape[0]
    if config.hflip > 0:
        flip = torch.rand(batch, generator=generator) < config.hflip
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if config.shift > 0:
        shifts = torch.randint(-config.shift, config.shift + 1, (batch, 2), generator=generator)
        x = torch.stack(
            [torch.roll(x[i], (int(s[0]), int(s[1])), dims=(-2, -1)) for i, s in enumerate(shifts)]
        )
    low, high = config.gain
    if high > low:
        x = x * (low + (high - low) * torch.rand(batch, 1, 1, 1, generator=generator))
    return x


def _fit_stage(
    member: Member,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    lr: float,
    config: _Training,
    generator: torch.Generator,
    history: list[dict[str, float]],
    stage: str,
    val: tuple[torch.Tensor, torch.Tensor],
) -> None:
    if epochs == 0 or len(x) == 0:
        return
    optimiser = torch.optim.AdamW(member.parameters(), lr=lr, weight_decay=config.weight_decay)
    steps = epochs * math.ceil(len(x) / config.batch_size)
    warmup = min(config.warmup_steps, steps // 4)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, factor)
    for epoch in range(epochs):
        started = time.perf_counter()
        member.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for chunk in order.split(config.batch_size):
            if len(chunk) < 2:
                continue  # batch norm needs two samples
            batch = _augment(x[chunk], config.augment, generator)
            loss = F.binary_cross_entropy_with_logits(member(batch), y[chunk])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(chunk)
        val_loss = _val_loss(member, *val)
        history.append(
            {
                "stage": 1.0 if stage == "single" else 2.0,
                "epoch": float(len(history) + 1),
                "train_loss": total / len(x),
                "val_loss": val_loss,
                "seconds": time.perf_counter() - started,
            }
        )
        logger.info("%s epoch %d: train %.4f val %.4f", stage, epoch + 1, total / len(x), val_loss)


def _probabilities(member: Member, x: torch.Tensor, batch: int = 128) -> np.ndarray:
    if len(x) == 0:
        return np.zeros((0, len(FINDINGS)))
    member.eval()
    with torch.inference_mode():
        out = [torch.sigmoid(member(c)).double() for c in x.split(batch)]
    return torch.cat(out).numpy()


def _val_loss(member: Member, x: torch.Tensor, y: torch.Tensor) -> float:
    if len(x) == 0:
        return float("nan")
    p = np.clip(_probabilities(member, x), 1e-7, 1 - 1e-7)
    t = y.numpy()
    return float(-(t * np.log(p) + (1 - t) * np.log(1 - p)).mean())


def fit_thresholds(labels: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Per finding, the threshold that maximises F1 on validation (centre of the best range).

    A finding without positives (or negatives) in the validation set keeps 0.5.
    """
    from sklearn.metrics import f1_score

    grid = np.round(np.arange(0.05, 0.951, 0.025), 3)
    thresholds = {}
    for j, key in enumerate(FINDINGS):
        truth = labels[:, j] > 0.5
        if truth.all() or not truth.any():
            thresholds[key] = 0.5
            continue
        scores = np.array(
            [f1_score(truth, probabilities[:, j] >= t, zero_division=0) for t in grid]
        )
        best = np.flatnonzero(scores >= scores.max() - 1e-9)
        thresholds[key] = float(grid[best[len(best) // 2]])
    return thresholds


def train_thyroid(
    recipe: Path,
    data: Path,
    out: Path,
    *,
    seed: int = 0,
    schedule: Schedule | None = None,
    overwrite: bool = True,
    extra: tuple[np.ndarray, np.ndarray] | None = None,
) -> Path:
    """Train the recipe's members on a labelled folder of phantom studies; write the bundle.

    Parameters
    ----------
    recipe
        A thyroid recipe (``config/thyroid-demo.toml``).
    data
        A folder written by
        :func:`~mibi_node.analyses.thyroid.phantom.generate_thyroid_studies`
        (``labels.csv`` and ``study-NNNN/``).
    out
        The bundle folder to write.
    seed
        Added to the recipe's seed: fixes the split, initialisation, batches, augmentation.
    schedule
        Overrides the recipe's ``training.schedule``.
    overwrite
        Replace a bundle already in ``out``.
    extra
        Extra training examples, (inputs, targets) as :func:`load_thyroid_arrays` gives
        them (e.g. GAN-generated images). They join the training split only, never the
        validation split that fits thresholds and weights; single-finding ones also join
        the first stage of cross-training.

    Returns
    -------
    Path
        ``out``.
    """
    started = time.perf_counter()
    parsed = load_thyroid_recipe(recipe)
    config = parsed.training
    schedule = schedule or config.schedule
    if schedule not in ("cross_training", "all_at_once"):
        raise ValueError(
            f'Argument "schedule" should be "cross_training" or "all_at_once", got {schedule!r}.'
        )
    run_seed = config.seed + seed
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        rows = _read_labels(Path(data))
        studies = _read_studies(Path(data), rows)
        x_all = torch.from_numpy(_inputs(studies, parsed))
        y_all = torch.from_numpy(_targets(rows))
        read_seconds = time.perf_counter() - started
        train_idx, val_idx = _split(rows, config.validation_fraction, run_seed)
        val = (x_all[val_idx], y_all[val_idx])
        if extra is not None:
            x_extra, y_extra = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in extra)
            if x_extra.shape[1:] != x_all.shape[1:] or y_extra.shape != (
                len(x_extra),
                len(FINDINGS),
            ):
                raise ValueError(
                    f"extra examples are {tuple(x_extra.shape)} / {tuple(y_extra.shape)}; "
                    f"the recipe makes {tuple(x_all.shape[1:])} inputs and {len(FINDINGS)} findings"
                )
            train_idx = np.concatenate([train_idx, len(x_all) + np.arange(len(x_extra))])
            x_all = torch.cat([x_all, x_extra])
            y_all = torch.cat([y_all, y_extra])
        single = np.array([i for i in train_idx if y_all[i].sum() == 1], dtype=int)
        modules: dict[str, Member] = {}
        histories: dict[str, list[dict[str, float]]] = {}
        val_probs = []
        for index, spec in enumerate(parsed.members):
            torch.manual_seed(run_seed * 1000 + index)
            generator = torch.Generator().manual_seed(run_seed * 1000 + index)
            member = create_member(
                spec.arch,
                num_classes=len(FINDINGS),
                in_chans=1,
                heads=spec.heads,
                embed_dim=spec.embed_dim,
                input_size=parsed.input.size,
            )
            history: list[dict[str, float]] = []
            if schedule == "cross_training":
                _fit_stage(member, x_all[single], y_all[single], config.single_epochs,
                           config.lr, config, generator, history, "single", val)  # fmt: skip
                _fit_stage(member, x_all[train_idx], y_all[train_idx], config.cross_epochs,
                           config.cross_lr, config, generator, history, "cross", val)  # fmt: skip
            else:
                _fit_stage(member, x_all[train_idx], y_all[train_idx],
                           config.single_epochs + config.cross_epochs, config.lr, config,
                           generator, history, "all", val)  # fmt: skip
            modules[spec.name] = member.eval()
            histories[spec.name] = history
            val_probs.append(_probabilities(member, val[0]))
        labels = val[1].numpy()
        losses = np.array([_bce(labels, p) for p in val_probs])
        inverse = 1.0 / np.maximum(losses, 1e-6)
        weights = inverse / inverse.sum() if np.isfinite(inverse).all() else None
        if weights is None or len(val_idx) == 0:
            weights = np.full(len(modules), 1.0 / len(modules))
        weights = np.round(weights, 6)
        weights[-1] = 1.0 - weights[:-1].sum()
        fused = np.tensordot(weights, np.stack(val_probs), axes=1)
        thresholds = fit_thresholds(labels, fused) if len(val_idx) else dict.fromkeys(FINDINGS, 0.5)
        validation = finding_metrics(labels, _decisions(fused, thresholds))
        seconds = time.perf_counter() - started
        command = shlex.join(
            ["python", "-m", "training.thyroid", "train", str(recipe), str(data), "--out",
             str(out), "--seed", str(seed), "--schedule", schedule]
        )  # fmt: skip
        manifest = {
            "name": parsed.name,
            "version": parsed.version,
            "intended_use": parsed.intended_use,
            "description": parsed.description,
            "input": {"image": "thyroid", **parsed.input.model_dump()},
            "normalisation": parsed.normalisation.model_dump(),
            "denoise": parsed.denoise.model_dump(),
            "members": [{"name": spec.name} for spec in parsed.members],
            "fusion_weights": [float(w) for w in weights],
            "thresholds": thresholds,
            "evaluation": {
                parsed.version: {
                    "split": "validation",
                    "studies": len(val_idx),
                    "schedule": schedule,
                    "extra_examples": 0 if extra is None else len(extra[0]),
                    "train_seconds": round(seconds, 1),
                    "read_seconds": round(read_seconds, 1),
                    "member_val_loss": {
                        s.name: float(loss) for s, loss in zip(parsed.members, losses, strict=True)
                    },
                    **_jsonable(validation),
                }
            },
            "changelog": {parsed.version: f"trained on {len(rows)} phantom studies ({schedule})"},
            "provenance": {
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "package_version": mibi_node.__version__,
                "training_command": command,
                "data_fingerprint": _fingerprint(Path(data)),
                "seed": run_seed,
                "notes": f"{len(train_idx)} training ({len(single)} single-finding), "
                f"{len(val_idx)} validation studies; {seconds:.0f} s",
            },
        }
        write_thyroid_bundle(Path(out), manifest, modules, overwrite=overwrite)
        _write_history(Path(out) / "history.csv", histories)
        record_measured_memory("thyroid", out, [[Path(data) / rows[i]["folder"]] for i in val_idx])
        # The training inputs' summary that input drift is measured against.
        record_training_inputs(out, [Path(data) / row["folder"] for row in rows])
    finally:
        torch.set_num_threads(threads)
    logger.info("trained thyroid bundle %s in %.1f s", out, seconds)
    return Path(out)


def _bce(labels: np.ndarray, p: np.ndarray) -> float:
    if len(labels) == 0:
        return float("nan")
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(labels * np.log(p) + (1 - labels) * np.log(1 - p)).mean())


def _write_history(path: Path, histories: dict[str, list[dict[str, float]]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["member", "stage", "epoch", "train_loss", "val_loss", "seconds"])
        for name, rows in histories.items():
            for r in rows:
                writer.writerow(
                    [name, int(r["stage"]), int(r["epoch"]), f"{r['train_loss']:.5f}",
                     f"{r['val_loss']:.5f}", f"{r['seconds']:.2f}"]
                )  # fmt: skip


# -- evaluation ------------------------------------------------------------------------------


def _decisions(probabilities: np.ndarray, thresholds: dict[str, float]) -> np.ndarray:
    out = np.zeros(probabilities.shape, dtype=bool)
    for i, row in enumerate(probabilities):
        found = decide_findings({k: float(row[j]) for j, k in enumerate(FINDINGS)}, thresholds)
        for key in found:
            out[i, FINDINGS.index(key)] = True
    return out


def finding_metrics(labels: np.ndarray, predicted: np.ndarray) -> dict[str, Any]:
    """Per-finding recall, precision, specificity and F1, their macro means, exact match.

    Parameters
    ----------
    labels, predicted
        (N, findings) ground truth and decisions, 0/1.
    """
    from sklearn.metrics import f1_score, precision_score, recall_score

    truth = np.asarray(labels) > 0.5
    decided = np.asarray(predicted).astype(bool)
    per: dict[str, dict[str, float]] = {}
    for j, key in enumerate(FINDINGS):
        t, p = truth[:, j], decided[:, j]
        negatives = int((~t).sum())
        per[key] = {
            "recall": float(recall_score(t, p, zero_division=0)),
            "precision": float(precision_score(t, p, zero_division=0)),
            "specificity": float(((~t) & (~p)).sum() / negatives) if negatives else float("nan"),
            "f1": float(f1_score(t, p, zero_division=0)),
            "support": float(t.sum()),
        }
    names = ("recall", "precision", "specificity", "f1")
    macro = {n: float(np.nanmean([per[k][n] for k in FINDINGS])) for n in names}
    worst = float(np.nanmin([per[k][n] for k in FINDINGS for n in names]))
    return {
        "studies": int(len(truth)),
        "exact_match": float((truth == decided).all(axis=1).mean()) if len(truth) else 0.0,
        "per_finding": per,
        "macro": macro,
        "worst": worst,
    }


def _jsonable(metrics: dict[str, Any]) -> dict[str, Any]:
    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    return clean(metrics)  # type: ignore[no-any-return]


def evaluate_thyroid(bundle: Path, data: Path, *, batch: int = 64) -> dict[str, Any]:
    """Run a bundle on a labelled folder of studies and score its findings.

    The studies go through the node's own path (reader, then
    :class:`~mibi_node.analyses.thyroid.runner.ThyroidRunner`); each member is also scored
    alone with the bundle's thresholds, which compares the cross-feature ResNet with the
    plain ResNet beside it.

    Returns
    -------
    dict
        :func:`finding_metrics` of the ensemble, plus ``members`` (member name -> the same
        for that member alone), ``bundle`` and ``seconds``.
    """
    started = time.perf_counter()
    runner = ThyroidRunner(load_thyroid_bundle(bundle))
    rows = _read_labels(Path(data))
    labels = _targets(rows)
    fused: list[list[float]] = []
    per_member: dict[str, list[np.ndarray]] = {name: [] for name in runner.members}
    for start in range(0, len(rows), batch):
        studies = _read_studies(Path(data), rows[start : start + batch])
        for result in runner.predict(studies):
            fused.append([result.probabilities[k] for k in FINDINGS])
            for name, probs in result.member_probabilities.items():
                per_member[name].append(np.array([probs[k] for k in FINDINGS]))
    fused_array = np.array(fused)
    metrics = finding_metrics(labels, _decisions(fused_array, runner.thresholds))
    metrics["members"] = {
        name: finding_metrics(labels, _decisions(np.array(p), runner.thresholds))
        for name, p in per_member.items()
    }
    metrics["member_archs"] = {m.name: m.arch for m in runner.bundle.manifest.members}
    metrics["bundle"] = f"{runner.bundle_name} {runner.bundle_version}"
    metrics["seconds"] = time.perf_counter() - started
    return metrics


def format_thyroid_table(metrics: dict[str, Any]) -> str:
    """A printable table: one row per finding, macro means, exact match, members."""
    names = ("recall", "precision", "specificity", "f1")
    lines = [
        f"{metrics.get('bundle', 'thyroid')}: {metrics['studies']} studies",
        f"{'finding':<28}" + "".join(f"{n:>12}" for n in names) + f"{'support':>9}",
    ]
    for key in FINDINGS:
        row = metrics["per_finding"][key]
        lines.append(
            f"{key:<28}" + "".join(f"{row[n]:>12.3f}" for n in names) + f"{int(row['support']):>9d}"
        )
    lines.append(f"{'macro':<28}" + "".join(f"{metrics['macro'][n]:>12.3f}" for n in names))
    lines.append(f"exact match {metrics['exact_match']:.3f}; worst metric {metrics['worst']:.3f}")
    archs = metrics.get("member_archs", {})
    for name, member in metrics.get("members", {}).items():
        lines.append(
            f"  member {name} ({archs.get(name, '?')}): exact match {member['exact_match']:.3f}, "
            f"macro F1 {member['macro']['f1']:.3f}, worst metric {member['worst']:.3f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.thyroid train|evaluate ...``."""
    parser = argparse.ArgumentParser(prog="python -m training.thyroid")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a thyroid bundle")
    train.add_argument("recipe", type=Path)
    train.add_argument("data", type=Path)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--schedule", choices=["cross_training", "all_at_once"], default=None)
    synth = sub.add_parser("synth", help="write labelled thyroid phantom studies")
    synth.add_argument("out", type=Path)
    synth.add_argument("--studies", type=int, default=400)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--mixed-fraction", type=float, default=0.3)
    synth.add_argument("--matrix", type=int, default=128)
    evaluate = sub.add_parser("evaluate", help="score a thyroid bundle on labelled studies")
    evaluate.add_argument("bundle", type=Path)
    evaluate.add_argument("data", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.command == "train":
        started = time.perf_counter()
        train_thyroid(args.recipe, args.data, args.out, seed=args.seed, schedule=args.schedule)
        print(f"wrote {args.out} in {time.perf_counter() - started:.1f} s")
    elif args.command == "synth":
        from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies

        if args.studies < 1 or not 0.0 <= args.mixed_fraction <= 1.0 or args.matrix < 32:
            parser.error("--studies must be >= 1, --mixed-fraction in [0, 1], --matrix >= 32")
        started = time.perf_counter()
        generate_thyroid_studies(
            args.out, args.studies, args.seed, mixed_fraction=args.mixed_fraction,
            matrix=args.matrix,
        )  # fmt: skip
        print(
            f"wrote {args.studies} studies to {args.out} in {time.perf_counter() - started:.1f} s"
        )
    else:
        torch.set_num_threads(1)
        print(format_thyroid_table(evaluate_thyroid(args.bundle, args.data)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
