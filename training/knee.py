"""Training and evaluation of the knee analysis' bundle (seed 003 [0011]-[0017]).

Training reads a folder of knee MR cases (``case-NNNN/dicom/*.dcm`` with the truth in
``case-NNNN/labels.npz``, as :func:`~mibi_node.analyses.knee.phantom.write_knee_dataset`
writes them), splits them by the recipe's ratios into training, validation and test sets
([0011]; the split is saved in the bundle), preprocesses each (denoise, isotropic working
grid, normalisation: [0013]) and trains the two stages in turn:

1. stage 1, the residual U-Net, on whole volumes average-pooled to the coarse grid; its
   targets are the plates' partial-volume fractions of each coarse voxel (average-pooled
   one-hot labels), so a plate thinner than a coarse voxel is still a target;
2. stage 2, the 3-D ResNet + ASPP, on patches cut from the truth's box (widened by the
   crop margin, each face moved at random by up to ``jitter_mm``: how stage 1's box errs);
   ``foreground_share`` of them are centred on a voxel of a plate drawn at random, the four
   plates equally often, so that the small tibial and patellar plates are seen often.

Each stage trains until its validation Dice reaches the recipe's ``target_dice`` or its
epoch limit, whichever comes first ([0015]-[0016]); the model of that last epoch is kept.
The validation Dice is the mean of the femoral, tibial (both plates as one) and patellar
cartilage's Dice, pooled over the validation cases: for stage 1 on the source grid (its
cleaned output mapped back, the evaluation's "stage 1" arm), for stage 2 on crops of the
truth's box on the working grid. The loss is Dice (over the plates, pooled over the batch)
plus cross-entropy (MONAI's ``DiceCELoss``); stage 2's counts the two tibial plates as one
tissue and adds ``side_weight`` x the five classes' cross-entropy (:class:`_TissueLoss`:
a patch rarely shows which plate is medial, which the runner decides for the whole knee).
Augmentation: intensity gain, gamma and noise, and a mirror through the sagittal plane,
which turns a right knee into a left one; as the medial and lateral tibial plates are
anatomical, the mirror swaps their labels (the network then has to tell them apart by
anatomy, not by the side of the volume they lie on; both sides occur anyway). Other flips
would put the femur below the tibia and are not used. On CPUs with bf16 matrix units (AMX)
the forward passes run in bf16 autocast (``precision = "auto"``), about twice as fast.

Evaluation runs the bundle through :class:`~mibi_node.analyses.knee.runner.KneeRunner` and
scores both arms, "stage 1" alone and "both stages", with :mod:`training.knee_metric`
(Dice, ASSD, HD95, volume error, bootstrap intervals and the paired difference), with the
seconds per knee and the peak memory of the process.

Usage::

    python -m training.knee synth DATA --count 60 --seed 0
    python -m training.knee train config/knee-demo.toml DATA --out var/bundles/knee-demo
    python -m training.knee evaluate var/bundles/knee-demo FRESH [--json OUT] [--record]
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
from typing import Any

import numpy as np
import torch

import mibi_node
from mibi_node.analyses.knee.bundle import record_knee_evaluation, write_knee_bundle
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.model import (
    NUM_CLASSES,
    KneeCoarseNet,
    KneeFineNet,
    clean_coarse_probabilities,
    create_knee_stage,
    merge_tibial_logits,
    parameter_count,
    split_tibial,
)
from mibi_node.analyses.knee.preprocess import (
    crop,
    probabilities_to_source,
)
from mibi_node.analyses.memory import record_measured_memory
from mibi_node.errors import ConfigError, MibiNodeError
from mibi_node.validation.drift import record_training_inputs
from training.knee_data import (
    KneeTrainingCase,
    PreparedCase,
    augment_intensity,
    case_folders,
    data_fingerprint,
    iter_knee_cases,
    load_knee_cases,
    mirror,
    prepare_case,
    split_cases,
    training_patch,
)
from training.knee_evaluate import evaluate_knee, figures, headline, score_cases
from training.knee_recipe import KneeRecipe, StageSection, load_knee_recipe
from training.trainer import training_bf16, warmup_cosine

__all__ = [
    "KneeRecipe",
    "KneeTrainingCase",
    "evaluate_knee",
    "iter_knee_cases",
    "load_knee_cases",
    "load_knee_recipe",
    "main",
    "train_knee",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Channels-last 3-D tensors: faster convolutions on the CPU (oneDNN).
_LAST = torch.channels_last_3d

_MEDIAL, _LATERAL = LABEL_OF["medial_tibial_cartilage"], LABEL_OF["lateral_tibial_cartilage"]
#: What the validation figures are named after: the plates, then both tibial plates.
_SCORED = (*STRUCTURES, "tibial")
#: The tissues whose mean Dice is the validation figure the targets are set on.
_TARGETED = ("femoral_cartilage", "tibial", "patellar_cartilage")


# -- training --------------------------------------------------------------------------------


def _dice_ce(*, labels: bool) -> Any:
    """Dice over the plates (pooled over the batch) plus cross-entropy; ``labels``: the
    targets are ``(B, 1, ...)`` label values, else ``(B, classes, ...)`` fractions."""
    from monai.losses import DiceCELoss

    return DiceCELoss(include_background=False, to_onehot_y=labels, softmax=True, batch=True)


class _TissueLoss:
    """Stage 2's loss: Dice + cross-entropy of the four tissues (both tibial plates as one,
    by log-sum-exp of their logits), plus ``side_weight`` x the five classes' cross-entropy.

    A patch rarely shows which tibial plate is medial; asked for both plates apart, the
    network splits the tibial probability between them and argmax loses the cartilage to
    the background. The runner decides the sides for the whole knee at once
    (:func:`~mibi_node.analyses.knee.model.split_tibial`); the small second term keeps
    what the patch does tell about them.
    """

    def __init__(self, side_weight: float) -> None:
        self.tissues = _dice_ce(labels=True)
        self.side_weight = side_weight
        lookup = torch.arange(NUM_CLASSES)
        lookup[_LATERAL:] -= 1  # 3 -> 2 (tibial), 4 -> 3 (patellar)
        self.lookup = lookup

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        merged = self.lookup[labels.long()]
        loss: torch.Tensor = self.tissues(merge_tibial_logits(logits), merged)
        if self.side_weight > 0:
            loss = loss + self.side_weight * torch.nn.functional.cross_entropy(
                logits, labels[:, 0].long()
            )
        return loss


def _count(predicted: np.ndarray, truth: Any, inter: np.ndarray, total: np.ndarray) -> None:
    """Add one case's overlaps and sizes per :data:`_SCORED` entry."""
    for index, name in enumerate(_SCORED):
        values = (_MEDIAL, _LATERAL) if name == "tibial" else (LABEL_OF[name],)
        a, b = np.isin(predicted, values), np.isin(truth, values)
        inter[index] += np.count_nonzero(a & b)
        total[index] += np.count_nonzero(a) + np.count_nonzero(b)


def _pooled_dice(inter: np.ndarray, total: np.ndarray) -> dict[str, float]:
    """Dice per :data:`_SCORED` entry pooled over cases, and ``dice``: the targeted mean."""
    dice = {
        f"dice_{name}": float(2 * inter[i] / total[i]) if total[i] else math.nan
        for i, name in enumerate(_SCORED)
    }
    values = [dice[f"dice_{name}"] for name in _TARGETED]
    finite = [v for v in values if math.isfinite(v)]
    return {"dice": float(np.mean(finite)) if finite else 0.0, **dice}


def _step(
    model: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    bf16: bool,
) -> float:
    """One optimiser step (the forward pass in bf16 autocast when asked); the loss."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(x.contiguous(memory_format=_LAST))
    loss = loss_fn(logits.float(), y)
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return float(loss.detach())


def _augment(x: torch.Tensor, recipe: KneeRecipe, generator: torch.Generator) -> torch.Tensor:
    a = recipe.augment
    return augment_intensity(x, generator, gain=a.gain, gamma=a.gamma, noise=a.noise)


def _train_stage1(
    recipe: KneeRecipe,
    train: list[PreparedCase],
    val: list[PreparedCase],
    generator: torch.Generator,
    say: Progress,
) -> tuple[KneeCoarseNet, list[dict[str, float]]]:
    config = recipe.stage1
    model = create_knee_stage(config.arch, **recipe.stage_options("stage1"))
    assert isinstance(model, KneeCoarseNet)  # noqa: S101 - checked at recipe load
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    steps = config.epochs * max(1, math.ceil(len(train) / config.batch_size))
    warmup = min(recipe.training.warmup_steps, steps // 4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps, warmup))
    loss_fn = _dice_ce(labels=False)
    bf16 = training_bf16(recipe.training.precision, torch.device("cpu"))
    model = model.to(memory_format=_LAST)
    x_all = torch.stack([p.coarse for p in train])
    y_all = torch.stack([p.fractions for p in train])
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        total = 0.0
        for chunk in torch.randperm(len(train), generator=generator).split(config.batch_size):
            x, y = mirror(x_all[chunk], y_all[chunk], recipe.augment.mirror, generator, soft=True)
            x = _augment(x, recipe, generator)
            loss = _step(model, optimiser, loss_fn, x, y, bf16)
            schedule.step()
            total += loss * len(chunk)
        row = {"epoch": float(epoch + 1), "loss": total / len(train)}
        done = _validate_epoch(epoch, config)
        if done and val:
            row.update(_validate_stage1(model, val, recipe))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        say(_progress("stage 1", epoch, config.epochs, row))
        if "dice" in row and row["dice"] >= config.target_dice:
            say(f"stage 1 reached the target Dice {config.target_dice} at epoch {epoch + 1}")
            break
    return model.eval(), history


def _validate_epoch(epoch: int, config: StageSection) -> bool:
    return (epoch + 1) % config.validate_every == 0 or epoch + 1 == config.epochs


def _progress(stage: str, epoch: int, epochs: int, row: dict[str, float]) -> str:
    text = f"{stage} epoch {epoch + 1}/{epochs}: loss {row['loss']:.4f}"
    if "dice" in row:
        plates = " ".join(f"{row[f'dice_{name}']:.3f}" for name in _SCORED)
        text += f", validation Dice {row['dice']:.3f} ({plates})"
    return text + f" ({row['seconds']:.1f} s)"


def _validate_stage1(
    model: KneeCoarseNet, val: list[PreparedCase], recipe: KneeRecipe
) -> dict[str, float]:
    """Hard Dice of each plate of stage 1's cleaned output on the source grid (pooled over
    the validation cases): the evaluation's "stage 1" arm."""
    model.eval()
    region = recipe.region
    coarse_mm = recipe.preprocessing.spacing_mm * recipe.preprocessing.coarse_factor
    inter = np.zeros(len(_SCORED))
    total = np.zeros(len(_SCORED))
    with torch.inference_mode():
        for p in val:
            probabilities = torch.softmax(model(p.coarse[None]), dim=1)[0]
            cleaned, _, _ = clean_coarse_probabilities(
                probabilities,
                coarse_mm**3,
                threshold=region.foreground_threshold,
                min_volume_mm3=region.min_volume_mm3,
                min_fraction=region.min_fraction,
            )
            predicted, _ = probabilities_to_source(cleaned, p.grid, spacing=coarse_mm)
            _count(predicted, p.source_labels, inter, total)
    model.train()
    return _pooled_dice(inter, total)


def _train_stage2(
    recipe: KneeRecipe,
    train: list[PreparedCase],
    val: list[PreparedCase],
    generator: torch.Generator,
    rng: np.random.Generator,
    say: Progress,
) -> tuple[KneeFineNet, list[dict[str, float]]]:
    config = recipe.stage2
    model = create_knee_stage(config.arch, **recipe.stage_options("stage2"))
    assert isinstance(model, KneeFineNet)  # noqa: S101 - checked at recipe load
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    per_epoch = len(train) * config.patches_per_case
    steps = config.epochs * max(1, math.ceil(per_epoch / config.batch_size))
    warmup = min(recipe.training.warmup_steps, steps // 4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(steps, warmup))
    loss_fn = _TissueLoss(config.side_weight)
    bf16 = training_bf16(recipe.training.precision, torch.device("cpu"))
    model = model.to(memory_format=_LAST)
    multiple = model.size_multiple
    jitter = config.jitter_mm / recipe.preprocessing.spacing_mm
    history: list[dict[str, float]] = []
    for epoch in range(config.epochs):
        started = time.perf_counter()
        model.train()
        order = torch.randperm(per_epoch, generator=generator) % len(train)
        total = 0.0
        for chunk in order.split(config.batch_size):
            if len(chunk) < 2 and len(order) >= 2:
                continue  # batch norm needs two samples
            pairs = [
                training_patch(
                    train[int(i)],
                    rng,
                    size=config.patch,
                    jitter=jitter,
                    foreground_share=config.foreground_share,
                    multiple=multiple,
                )  # fmt: skip
                for i in chunk
            ]
            x = torch.from_numpy(np.stack([a for a, _ in pairs]))[:, None]
            y = torch.from_numpy(np.stack([b for _, b in pairs]))[:, None]
            x, y = mirror(x, y, recipe.augment.mirror, generator, soft=False)
            x = _augment(x, recipe, generator)
            loss = _step(model, optimiser, loss_fn, x, y.long(), bf16)
            schedule.step()
            total += loss * len(chunk)
        row = {"epoch": float(epoch + 1), "loss": total / per_epoch}
        if _validate_epoch(epoch, config) and val:
            row.update(_validate_stage2(model, val, recipe))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        say(_progress("stage 2", epoch, config.epochs, row))
        if "dice" in row and row["dice"] >= config.target_dice:
            say(f"stage 2 reached the target Dice {config.target_dice} at epoch {epoch + 1}")
            break
    return model.eval(), history


def _validate_stage2(
    model: KneeFineNet, val: list[PreparedCase], recipe: KneeRecipe
) -> dict[str, float]:
    """Hard Dice of each plate on the validation cases' crops (the truth's box + margin)."""
    model.eval()
    inter = np.zeros(len(_SCORED))
    total = np.zeros(len(_SCORED))
    with torch.inference_mode():
        for p in val:
            image = crop(p.region, p.box, fill=p.fill).astype(np.float32)
            truth = crop(p.region_labels, p.box)
            probabilities = torch.softmax(model(torch.from_numpy(image)[None, None]), dim=1)[0]
            predicted = split_tibial(probabilities).argmax(0).numpy()
            _count(predicted, truth, inter, total)
    model.train()
    return _pooled_dice(inter, total)


def train_knee(
    recipe: Path | str,
    data: Path | str,
    out: Path | str,
    *,
    seed: int = 0,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Train the recipe's two stages on a knee data folder; write the bundle.

    Parameters
    ----------
    recipe
        A knee recipe (``config/knee-demo.toml``).
    data
        A folder of cases (``case-*/dicom`` and ``case-*/labels.npz``).
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
    parsed = load_knee_recipe(recipe)
    config = parsed.training
    run_seed = config.seed + seed
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if not Path(data).is_dir():
            raise ConfigError(f"knee data {data}: no such folder")
        names = [folder.name for folder in case_folders(Path(data))]
        if not names:
            raise ConfigError(f"knee data {data}: no case-* folder in it")
        train_names, val_names, test_names = split_cases(
            names, parsed.split.validation, parsed.split.test, run_seed
        )
        stage1_multiple = create_knee_stage(
            parsed.stage1.arch, **parsed.stage_options("stage1")
        ).size_multiple
        fine_multiple = create_knee_stage(
            parsed.stage2.arch, **parsed.stage_options("stage2")
        ).size_multiple
        coarse = parsed.preprocessing.coarse_factor * stage1_multiple
        multiple = coarse * fine_multiple // math.gcd(coarse, fine_multiple)
        # one case at a time: only the training grids are kept (the validation cases whole)
        config_pre = parsed.preprocessing_config()

        def prepare(case: KneeTrainingCase, keep_source: bool = False) -> PreparedCase:
            return prepare_case(
                case, config_pre, margin_mm=parsed.region.margin_mm,
                jitter_mm=parsed.stage2.jitter_mm, multiple=multiple,
                fine_multiple=fine_multiple, keep_source=keep_source,
            )  # fmt: skip

        train = [prepare(case) for case in iter_knee_cases(data, names=train_names, warn=say)]
        val_cases = load_knee_cases(data, names=val_names, warn=say) if val_names else []
        val = [prepare(case, keep_source=True) for case in val_cases]
        train_names = [p.case_id for p in train]
        val_names = [p.case_id for p in val]
        read_seconds = time.perf_counter() - started
        say(
            f"read {len(train) + len(val)} cases in {read_seconds:.1f} s: {len(train)} "
            f"training, {len(val)} validation, {len(test_names)} test"
        )
        torch.manual_seed(run_seed)
        generator = torch.Generator().manual_seed(run_seed)
        rng = np.random.default_rng([run_seed, 3])
        stage1, history1 = _train_stage1(parsed, train, val, generator, say)
        stage1_seconds = time.perf_counter() - started - read_seconds
        torch.manual_seed(run_seed + 1)
        stage2, history2 = _train_stage2(parsed, train, val, generator, rng, say)
        seconds = time.perf_counter() - started
        stage2_seconds = seconds - read_seconds - stage1_seconds
        command = shlex.join(
            ["python", "-m", "training.knee", "train", str(recipe), str(data), "--out",
             str(out), "--seed", str(seed)]
        )  # fmt: skip
        training_figures = {
            "seconds": round(seconds, 1),
            "read_seconds": round(read_seconds, 1),
            "threads": config.threads,
            "stage1": _stage_figures(parsed.stage1, history1, stage1_seconds, stage1),
            "stage2": _stage_figures(parsed.stage2, history2, stage2_seconds, stage2),
        }
        manifest = {
            "name": parsed.name,
            "version": parsed.version,
            "intended_use": parsed.intended_use,
            "description": parsed.description,
            "preprocessing": parsed.preprocessing.model_dump(),
            "normalisation": parsed.normalisation.model_dump(),
            "region": parsed.region.model_dump(),
            "split": {"train": train_names, "validation": val_names, "test": test_names},
            "training": training_figures,
            "changelog": {parsed.version: f"trained on {len(train)} cases from {data}"},
            "provenance": {
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "package_version": mibi_node.__version__,
                "training_command": command,
                "data_fingerprint": data_fingerprint(Path(data)),
                "seed": run_seed,
                "notes": f"{len(train)} training, {len(val)} validation, {len(test_names)} "
                f"test cases; stage 1 {stage1_seconds:.0f} s, stage 2 {stage2_seconds:.0f} s, "
                f"reading {read_seconds:.0f} s",
            },
        }
        write_knee_bundle(Path(out), manifest, stage1, stage2, overwrite=overwrite)
        _write_history(Path(out) / "history.csv", history1, history2)
        # The training inputs' summary that input drift is measured against.
        record_training_inputs(
            Path(out), [Path(data) / case / "dicom" for case in (*train_names, *val_names)]
        )
        if val_names:
            evaluation, report = score_cases(Path(out), val_cases, bootstrap=0, seed=0)
            record_knee_evaluation(Path(out), figures(evaluation, report), split="validation")
            say(
                "validation (runner, both stages): "
                + ", ".join(f"{k} {v:.3f}" for k, v in headline(evaluation).items())
            )
            # What the bundle costs a worker, measured on validation studies in a fresh
            # process (docs/analyses.md, "Bundles and memory").
            record_measured_memory(
                "knee",
                Path(out),
                [sorted((Path(data) / name / "dicom").glob("*.dcm")) for name in val_names[:8]],
            )
    finally:
        torch.set_num_threads(threads)
    say(f"trained knee bundle {out} in {seconds:.1f} s")
    return Path(out)


def _stage_figures(
    config: StageSection, history: list[dict[str, float]], seconds: float, model: torch.nn.Module
) -> dict[str, Any]:
    validated = [row for row in history if "dice" in row]
    last = validated[-1] if validated else {}
    return {
        "epochs": len(history),
        "epoch_limit": config.epochs,
        "target_dice": config.target_dice,
        "reached": bool(last and last["dice"] >= config.target_dice),
        "validation_dice": {k: round(v, 4) for k, v in last.items() if k.startswith("dice")},
        "seconds": round(seconds, 1),
        "parameters": parameter_count(model),
    }


def _write_history(
    path: Path, stage1: list[dict[str, float]], stage2: list[dict[str, float]]
) -> None:
    columns = ["epoch", "loss", "dice", *(f"dice_{name}" for name in _SCORED), "seconds"]
    lines = ["stage," + ",".join(columns)]
    for stage, rows in (("stage1", stage1), ("stage2", stage2)):
        for row in rows:
            values = [f"{row[c]:.5g}" if c in row else "" for c in columns]
            lines.append(f"{stage}," + ",".join(values))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _synth(out: Path, count: int, seed: int) -> None:
    from mibi_node.analyses.knee.phantom import write_knee_dataset

    write_knee_dataset(out, count, seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.knee synth|train|evaluate ...``; 2 on bad input, no traceback."""
    parser = argparse.ArgumentParser(prog="python -m training.knee")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write knee phantom cases with their truth")
    synth.add_argument("out", type=Path)
    synth.add_argument("--count", type=int, default=60)
    synth.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train a knee bundle")
    train.add_argument("recipe", type=Path)
    train.add_argument("data", type=Path)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate", help="score a knee bundle: stage 1 and both stages")
    evaluate.add_argument("bundle", type=Path)
    evaluate.add_argument("data", type=Path)
    evaluate.add_argument("--json", type=Path, default=None, help="write the figures here")
    evaluate.add_argument(
        "--record", action="store_true", help="store the figures in the bundle's evaluation"
    )
    evaluate.add_argument("--bootstrap", type=int, default=1000)
    evaluate.add_argument(
        "--split", choices=("train", "validation", "test"), default=None,
        help="only the bundle's cases of this split (for the folder it was trained on)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")

    def say(message: str) -> None:
        print(message, flush=True)

    started = time.perf_counter()
    try:
        if args.command == "synth":
            if args.count < 1:
                parser.error("--count must be >= 1")
            _synth(args.out, args.count, args.seed)
            print(
                f"wrote {args.count} cases to {args.out} in {time.perf_counter() - started:.1f} s"
            )
        elif args.command == "train":
            train_knee(args.recipe, args.data, args.out, seed=args.seed, progress=say)
        else:
            if args.bootstrap < 0:
                parser.error("--bootstrap must be >= 0")
            torch.set_num_threads(1)
            summary, report = evaluate_knee(
                args.bundle, args.data, bootstrap=args.bootstrap, split=args.split
            )
            print(f"{report['bundle']} on {args.data} ({report['cases']} cases)")
            print(summary.format_table())
            print(
                f"inference {report['seconds_per_knee']:.2f} s per knee on cpu "
                f"({torch.get_num_threads()} thread; stage 1 alone "
                f"{report['stage1_seconds_per_knee']:.2f} s), peak RSS "
                f"{report['peak_rss_mb']:.0f} MiB; stage 1's box held the whole truth in "
                f"{report['boxes_holding_the_truth']} of {report['cases']} cases"
            )
            if args.json is not None:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if args.record:
                recorded = figures(summary, report) | {
                    "data": str(args.data),
                    "bootstrap": args.bootstrap,
                    "peak_rss_mb": report["peak_rss_mb"],
                }
                record_knee_evaluation(args.bundle, recorded, split=args.split or "test")
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
