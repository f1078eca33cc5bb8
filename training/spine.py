"""Training and evaluation of the spine analysis' bundle (seed 002).

Training reads the Spinal Disease 2020 annotation format (``annotations.json`` beside the
DICOM files: study, series and instance UIDs, and per level the point and class on the
annotated middle T2 sagittal frame), builds each study's input with the analysis' reader
(the annotated instance as middle slice) and trains two networks in turn:

1. the keypoint network (:class:`~mibi_node.analyses.spine.model.SpineKeypointNet`) on the
   whole slice stack, with random affine and intensity augmentation, focal loss on the
   Gaussian heatmaps and L1 on the sub-pixel offsets;
2. the ROI classifier on crops cut around the *annotated* points by the bundle's crop rule,
   jittered in position, size and angle the way the keypoint network errs, so that at
   inference it copes with the predicted points.

Evaluation runs the bundle through :class:`~mibi_node.analyses.spine.runner.SpineRunner`
and scores it by the challenge's rule (:func:`training.spine_metric.evaluate`). A point's
score for the AP ranking is its heatmap peak times its class probability.

Usage::

    python -m training.spine synth DATA --count 240 --seed 0
    python -m training.spine train config/spine-demo.toml DATA --out var/bundles/spine-demo
    python -m training.spine evaluate var/bundles/spine-demo FRESH [--json OUT] [--record]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import math
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

import mibi_node
from mibi_node.analyses.memory import record_measured_memory
from mibi_node.analyses.spine.bundle import record_spine_evaluation, write_spine_bundle
from mibi_node.analyses.spine.levels import LEVELS
from mibi_node.analyses.spine.model import (
    SpineKeypointNet,
    create_keypoint_model,
    create_roi_classifier,
    keypoint_loss,
    keypoint_targets,
    kind_cross_entropy,
    kind_predictions,
    kind_targets,
    list_keypoint_encoders,
)
from mibi_node.analyses.spine.result import SpineResult
from mibi_node.analyses.spine.runner import SpineRunner, prepare_spine_input
from mibi_node.errors import ConfigError, MibiNodeError
from mibi_node.inference.members import Member, is_member
from mibi_node.inference.recipe import (
    NormalisationSection,
    read_recipe,
)
from mibi_node.validation.drift import record_training_inputs
from training.spine_data import (
    SpineStudy,
    _index_dicom,
    annotations_fingerprint,
    augment_keypoints,
    context_crops,
    jitter_crops,
    load_spine_studies,
    to_model_pixels,
)
from training.trainer import warmup_cosine

__all__ = [
    "SpineRecipe",
    "evaluate_spine",
    "load_spine_recipe",
    "main",
    "prediction_score",
    "train_spine",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Channels-last tensors: 10-25 % faster convolutions on one CPU core (oneDNN).
_LAST = torch.channels_last


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Input(_Section):
    size: int = Field(default=192, ge=32, le=1024)
    channels: int = Field(default=3, ge=1, le=9)


class _Keypoints(_Section):
    arch: str = "spine_resnet10t_s"
    decoder_channels: int = Field(default=48, ge=4)
    stride: Literal[2, 4] = 4
    sigma: float = Field(default=2.0, gt=0)
    epochs: int = Field(default=20, ge=0)
    batch_size: int = Field(default=16, ge=2)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    offset_weight: float = Field(default=1.0, ge=0)
    shift: float = Field(default=0.08, ge=0, le=0.5)  # fraction of the input side
    scale: tuple[float, float] = (0.9, 1.1)
    rotate_deg: float = Field(default=8.0, ge=0, le=45)
    gain: tuple[float, float] = (0.85, 1.15)


class _Classifier(_Section):
    arch: str = "spine_resnet10t_s"
    heads: int = Field(default=4, ge=1)
    embed_dim: int = Field(default=64, ge=8)
    epochs: int = Field(default=12, ge=0)
    batch_size: int = Field(default=64, ge=2)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    jitter_mm: float = Field(default=1.5, ge=0)  # sd of the centre's shift
    jitter_scale: float = Field(default=0.1, ge=0, lt=0.5)
    jitter_deg: float = Field(default=5.0, ge=0, le=45)


class _Crop(_Section):
    scale: float = Field(default=1.5, gt=0, le=8)
    size: int = Field(default=48, ge=16, le=256)


class _Training(_Section):
    seed: int = 0
    threads: int = Field(default=1, ge=1)
    validation_fraction: float = Field(default=0.1, ge=0, lt=0.5)
    warmup_steps: int = Field(default=20, ge=0)


class SpineRecipe(_Section):
    """The parsed spine recipe (``config/spine-demo.toml``)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"] = "demonstration"
    description: str = ""
    input: _Input = _Input()
    normalisation: NormalisationSection = NormalisationSection()
    keypoints: _Keypoints = _Keypoints()
    classifier: _Classifier = _Classifier()
    crop: _Crop = _Crop()
    training: _Training = _Training()


def load_spine_recipe(path: Path | str) -> SpineRecipe:
    """Read and validate a spine recipe.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names file and key.
    """
    path = Path(path)
    recipe = read_recipe(path, SpineRecipe, "spine recipe")
    if recipe.keypoints.arch not in list_keypoint_encoders():
        raise ConfigError(
            f"spine recipe {path}: key 'keypoints.arch': {recipe.keypoints.arch!r} is not a "
            f"registered keypoint encoder ({', '.join(list_keypoint_encoders())})"
        )
    if not is_member(recipe.classifier.arch):
        raise ConfigError(
            f"spine recipe {path}: key 'classifier.arch': {recipe.classifier.arch!r} is not a "
            "registered member"
        )
    if recipe.input.size % recipe.keypoints.stride:
        raise ConfigError(
            f"spine recipe {path}: key 'input.size': {recipe.input.size} is not a multiple of "
            f"the keypoint stride {recipe.keypoints.stride}"
        )
    return recipe


# -- training --------------------------------------------------------------------------------


def _train_keypoints(
    recipe: SpineRecipe,
    x: torch.Tensor,
    points: torch.Tensor,
    valid: torch.Tensor,
    generator: torch.Generator,
    say: Progress,
) -> tuple[SpineKeypointNet, list[dict[str, float]]]:
    config = recipe.keypoints
    model = create_keypoint_model(
        config.arch,
        in_chans=recipe.input.channels,
        decoder_channels=config.decoder_channels,
        stride=config.stride,
    ).to(memory_format=_LAST)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = config.epochs * max(1, len(x) // config.batch_size)
    warmup = min(recipe.training.warmup_steps, steps // 4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps, warmup))
    cells = recipe.input.size // config.stride
    history = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(x), generator=generator)
        totals = [0.0, 0.0]
        for chunk in order.split(config.batch_size):
            if len(chunk) < 2:
                continue  # batch norm needs two samples
            batch, moved = augment_keypoints(
                x[chunk], points[chunk], generator, scale=config.scale,
                rotate_deg=config.rotate_deg, shift=config.shift, gain=config.gain,
            )  # fmt: skip
            inside = valid[chunk] & ((moved >= 0) & (moved < recipe.input.size)).all(-1)
            targets, where, offsets = keypoint_targets(
                moved, inside, (cells, cells), config.stride, config.sigma
            )
            heatmaps, predicted = model(batch.contiguous(memory_format=_LAST))
            heat, offset = keypoint_loss(
                heatmaps, predicted, targets, where, offsets, inside,
                offset_weight=config.offset_weight,
            )  # fmt: skip
            optimiser.zero_grad(set_to_none=True)
            (heat + offset).backward()
            optimiser.step()
            schedule.step()
            totals[0] += float(heat.detach()) * len(chunk)
            totals[1] += float(offset.detach()) * len(chunk)
        row = {
            "epoch": float(epoch + 1),
            "heatmap_loss": totals[0] / len(x),
            "offset_loss": totals[1] / len(x),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        say(
            f"keypoints epoch {epoch + 1}/{config.epochs}: heatmap {row['heatmap_loss']:.4f} "
            f"offset {row['offset_loss']:.4f} ({row['seconds']:.1f} s)"
        )
    return model.eval(), history


def _train_classifier(
    recipe: SpineRecipe,
    patches: torch.Tensor,
    targets: torch.Tensor,
    mm_per_px: torch.Tensor,
    generator: torch.Generator,
    say: Progress,
) -> tuple[Member, list[dict[str, float]]]:
    config, size = recipe.classifier, recipe.crop.size
    model = create_roi_classifier(
        config.arch,
        in_chans=recipe.input.channels,
        size=size,
        heads=config.heads,
        embed_dim=config.embed_dim,
    ).to(memory_format=_LAST)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = config.epochs * max(1, len(patches) // config.batch_size)
    warmup = min(recipe.training.warmup_steps, steps // 4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps, warmup))
    history = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(len(patches), generator=generator)
        total, right = 0.0, 0
        for chunk in order.split(config.batch_size):
            if len(chunk) < 2:
                continue
            batch = jitter_crops(
                patches[chunk], mm_per_px[chunk], size, generator, jitter_mm=config.jitter_mm,
                jitter_scale=config.jitter_scale, jitter_deg=config.jitter_deg,
            )  # fmt: skip
            logits = model(batch.contiguous(memory_format=_LAST))
            loss = kind_cross_entropy(logits, targets[chunk])
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            schedule.step()
            total += float(loss.detach()) * len(chunk)
            right += int(
                (kind_predictions(logits.detach(), targets[chunk]) == targets[chunk]).sum()
            )
        row = {
            "epoch": float(epoch + 1),
            "loss": total / len(patches),
            "accuracy": right / len(patches),
            "seconds": time.perf_counter() - started,
        }
        history.append(row)
        say(
            f"classifier epoch {epoch + 1}/{config.epochs}: loss {row['loss']:.4f} "
            f"accuracy {row['accuracy']:.3f} ({row['seconds']:.1f} s)"
        )
    return model.eval(), history


def _split(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, validation indices); no validation below 10 studies."""
    rng = np.random.default_rng([seed, 2020])
    order = rng.permutation(count)
    n_val = int(round(count * fraction)) if count >= 10 else 0
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def train_spine(
    recipe: Path | str,
    data: Path | str,
    out: Path | str,
    *,
    seed: int = 0,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Train the recipe's keypoint network and ROI classifier; write the bundle.

    Parameters
    ----------
    recipe
        A spine recipe (``config/spine-demo.toml``).
    data
        A folder of DICOM studies with the challenge's ``annotations.json``.
    out
        The bundle folder to write.
    seed
        Added to the recipe's seed: fixes the split, initialisation, batches, augmentation.
    overwrite
        Replace a bundle already in ``out``.
    progress
        Called with one line per step (default: the log).

    Returns
    -------
    Path
        ``out``.
    """
    started = time.perf_counter()
    say = progress or (lambda message: logger.info("%s", message))
    parsed = load_spine_recipe(recipe)
    config = parsed.training
    run_seed = config.seed + seed
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        studies = load_spine_studies(data, channels=parsed.input.channels, warn=say)
        train_idx, val_idx = _split(len(studies), config.validation_fraction, run_seed)
        normalisation = parsed.normalisation.to_normalisation()
        arrays, points, crops = [], [], []
        for i in train_idx:
            study = studies[i]
            array, geometry, source = prepare_spine_input(
                study.input.image, parsed.input.size, parsed.input.channels, normalisation
            )
            arrays.append(array)
            points.append(np.nan_to_num(to_model_pixels(geometry, study.points), nan=-1e6))
            crops.append(context_crops(study, source, parsed.crop.scale, parsed.crop.size))
        x = torch.from_numpy(np.stack(arrays))
        y = torch.from_numpy(np.stack(points)).float()
        valid = torch.from_numpy(np.stack([studies[i].valid for i in train_idx]))
        read_seconds = time.perf_counter() - started
        say(f"read {len(studies)} studies ({len(val_idx)} for validation) in {read_seconds:.1f} s")
        torch.manual_seed(run_seed)
        generator = torch.Generator().manual_seed(run_seed)
        keypoint_model, keypoint_history = _train_keypoints(parsed, x, y, valid, generator, say)
        keypoint_seconds = time.perf_counter() - started - read_seconds
        del x
        patches = torch.cat([c[0] for c in crops])
        targets = kind_targets(
            [lv for c in crops for lv in c[1]], [lb for c in crops for lb in c[2]]
        )
        mm_per_px = torch.tensor([m for c in crops for m in c[3]])
        torch.manual_seed(run_seed + 1)
        classifier, classifier_history = _train_classifier(
            parsed, patches, targets, mm_per_px, generator, say
        )
        seconds = time.perf_counter() - started
        command = shlex.join(
            ["python", "-m", "training.spine", "train", str(recipe), str(data), "--out",
             str(out), "--seed", str(seed)]
        )  # fmt: skip
        manifest = {
            "name": parsed.name,
            "version": parsed.version,
            "intended_use": parsed.intended_use,
            "description": parsed.description,
            "input": parsed.input.model_dump(),
            "normalisation": parsed.normalisation.model_dump(),
            "keypoints": {"sigma": parsed.keypoints.sigma},
            "crop": parsed.crop.model_dump(),
            "changelog": {
                parsed.version: f"trained on {len(train_idx)} annotated studies from {data}"
            },
            "provenance": {
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "package_version": mibi_node.__version__,
                "training_command": command,
                "data_fingerprint": annotations_fingerprint(Path(data)),
                "seed": run_seed,
                "notes": f"{len(train_idx)} training, {len(val_idx)} validation studies; "
                f"keypoints {keypoint_seconds:.0f} s, classifier "
                f"{seconds - keypoint_seconds - read_seconds:.0f} s, reading {read_seconds:.0f} s",
            },
        }
        write_spine_bundle(Path(out), manifest, keypoint_model, classifier, overwrite=overwrite)
        _write_history(Path(out) / "history.csv", keypoint_history, classifier_history)
        figures: dict[str, Any] = {
            "studies": len(val_idx),
            "train_seconds": round(seconds, 1),
            "read_seconds": round(read_seconds, 1),
        }
        if len(val_idx):
            runner = SpineRunner(Path(out))
            evaluation, _ = _score(runner, [studies[i] for i in val_idx], bootstrap=0, seed=0)
            figures |= _summary(evaluation)
            say(
                f"validation: mAP {figures['map']}, within 6 mm {figures['within_6mm']}, "
                f"median error {figures['median_error_mm']} mm"
            )
        record_spine_evaluation(Path(out), figures, split="validation")
        files = _index_dicom(Path(data))
        uids = [studies[i].input.study_instance_uid for i in val_idx]
        record_measured_memory("spine", out, [files[uid] for uid in uids if uid in files])
        # The training inputs' summary that input drift is measured against.
        trained = [studies[i].input.study_instance_uid for i in (*train_idx, *val_idx)]
        record_training_inputs(out, [files[uid] for uid in trained if uid in files])
    finally:
        torch.set_num_threads(threads)
    say(f"trained spine bundle {out} in {seconds:.1f} s")
    return Path(out)


def _write_history(
    path: Path, keypoints: list[dict[str, float]], classifier: list[dict[str, float]]
) -> None:
    lines = ["network,epoch,loss,offset_loss_or_accuracy,seconds"]
    for r in keypoints:
        lines.append(
            f"keypoints,{int(r['epoch'])},{r['heatmap_loss']:.5f},{r['offset_loss']:.5f},"
            f"{r['seconds']:.2f}"
        )
    for r in classifier:
        lines.append(
            f"classifier,{int(r['epoch'])},{r['loss']:.5f},{r['accuracy']:.4f},{r['seconds']:.2f}"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


# -- evaluation ------------------------------------------------------------------------------


def prediction_score(point: Any) -> float:
    """A predicted point's ranking score for the AP: heatmap peak x class probability."""
    return float(point.score) * float(point.probabilities[point.label])


def _score(
    runner: SpineRunner, studies: Sequence[SpineStudy], *, bootstrap: int, seed: int
) -> tuple[Any, list[SpineResult]]:
    from training.spine_metric import PredictedPoint, StudyPoints, TruthPoint, evaluate

    results: list[SpineResult] = []
    for start in range(0, len(studies), 16):
        results += runner.predict([s.input for s in studies[start : start + 16]])
    entries = []
    for study, result in zip(studies, results, strict=True):
        truth = tuple(
            TruthPoint(level, float(study.points[i, 0]), float(study.points[i, 1]), study.labels[i])
            for i, level in enumerate(LEVELS)
            if study.valid[i]
        )
        predictions = tuple(
            PredictedPoint(p.level, p.row, p.col, p.label, prediction_score(p))
            for p in result.points
        )
        entries.append(
            StudyPoints(study.input.study_instance_uid, result.pixel_spacing, truth, predictions)
        )
    return evaluate(entries, bootstrap=bootstrap, seed=seed), results


def _summary(evaluation: Any) -> dict[str, Any]:
    """The headline figures (the attributes of :class:`training.spine_metric.SpineEvaluation`)."""

    def clean(value: float) -> float | None:
        return round(float(value), 4) if math.isfinite(value) else None

    every = evaluation.levels[-1]
    return {
        "map": clean(evaluation.map.value),
        "within_6mm": clean(evaluation.within.value),
        "median_error_mm": clean(every.median_mm),
        "mean_error_mm": clean(every.mean_mm),
        "p95_error_mm": clean(every.p95_mm),
        "ap": {c.name: clean(c.ap.value) for c in evaluation.classes},
        "f1": {c.name: clean(c.f1.value) for c in evaluation.classes},
    }


def evaluate_spine(
    bundle: Path | str, data: Path | str, *, bootstrap: int = 1000, seed: int = 0
) -> tuple[Any, dict[str, Any]]:
    """Run a bundle on an annotated folder and score it by the challenge's rule.

    Returns
    -------
    tuple
        The :class:`training.spine_metric.SpineEvaluation` and a JSON-ready dict: its
        ``to_dict()``, a ``summary`` (mAP, within 6 mm, errors, AP and F1 per class), the
        bundle and the seconds per study.
    """
    started = time.perf_counter()
    runner = SpineRunner(bundle)
    studies = load_spine_studies(data, channels=runner.bundle.channels)
    read = time.perf_counter() - started
    evaluation, results = _score(runner, studies, bootstrap=bootstrap, seed=seed)
    per_study = [r.timings["total"] for r in results]
    report = {
        **evaluation.to_dict(),
        "summary": _summary(evaluation),
        "bundle": f"{runner.bundle_name} {runner.bundle_version}",
        "data": str(data),
        "seconds_per_study": float(np.mean(per_study)),
        "read_seconds": round(read, 1),
        "seconds": round(time.perf_counter() - started, 1),
    }
    return evaluation, report


def _synth(out: Path, count: int, seed: int, full: bool) -> None:
    from mibi_node.analyses.spine.phantom import write_spine_dataset

    if full:  # T1 and T2 sagittal, T2 axial: the reader picks the T2 sagittal series
        write_spine_dataset(out, count, seed)
    else:  # what training reads: the T2 sagittal middle slice and its neighbours
        write_spine_dataset(out, count, seed, series=("t2_sagittal",), sagittal_slices=3)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.spine synth|train|evaluate ...``; 2 on bad input, no traceback."""
    parser = argparse.ArgumentParser(prog="python -m training.spine")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write annotated spine phantom studies")
    synth.add_argument("out", type=Path)
    synth.add_argument("--count", type=int, default=240)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument(
        "--full", action="store_true", help="all series (T1/T2 sagittal, T2 axial), 11 slices"
    )
    train = sub.add_parser("train", help="train a spine bundle")
    train.add_argument("recipe", type=Path)
    train.add_argument("data", type=Path)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate", help="score a spine bundle by the challenge's rule")
    evaluate.add_argument("bundle", type=Path)
    evaluate.add_argument("data", type=Path)
    evaluate.add_argument("--json", type=Path, default=None, help="write the figures here")
    evaluate.add_argument(
        "--record", action="store_true", help="store the figures in the bundle's evaluation"
    )
    evaluate.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    def say(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    try:
        if args.command == "synth":
            if args.count < 1:
                parser.error("--count must be >= 1")
            _synth(args.out, args.count, args.seed, args.full)
            print(
                f"wrote {args.count} studies to {args.out} in {time.perf_counter() - started:.1f} s"
            )
        elif args.command == "train":
            train_spine(args.recipe, args.data, args.out, seed=args.seed, progress=say)
        else:
            torch.set_num_threads(1)
            evaluation, report = evaluate_spine(args.bundle, args.data, bootstrap=args.bootstrap)
            print(f"{report['bundle']} on {args.data}")
            print(evaluation.format_table())
            print(f"inference {report['seconds_per_study']:.3f} s per study on cpu")
            if args.json is not None:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if args.record:
                figures = _summary(evaluation) | {
                    "data": str(args.data),
                    "studies": report["n_studies"],
                    "seconds_per_study": round(report["seconds_per_study"], 3),
                }
                record_spine_evaluation(args.bundle, figures)
                print(f"recorded the figures in {args.bundle / 'bundle.json'}")
    except MibiNodeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
