"""Training and evaluation of the lung analysis' bundle (seed 004, issue 18).

Training reads a folder of chest CT cases (``case-NNNN/dicom/*.dcm`` with the truth in
``case-NNNN/labels.npz``, as :func:`~mibi_node.analyses.lung.phantom.write_lung_dataset`
writes them), splits them by the recipe's ratios into training, validation and test sets
(the split is saved in the bundle), puts each on the recipe's working grid as the runner
does and trains torchvision's Mask R-CNN (:func:`~mibi_node.analyses.lung.model
.create_lung_detector`) end to end on single slices with their neighbours as channels: its
RPN, box, class and mask losses summed, AdamW with a linear warm-up, then cosine decay
(the knee's schedule), gradients clipped. Each step draws ``batch_size`` slices, a slice holding a
lesion ``positive_share`` of the time (a slice without one teaches the heads what is not a
lesion; ``sampling = "lesion"`` draws each training lesion alike, then one of its slices),
augmented (:func:`~training.lung_data.training_sample`) and, with ``crop``, cut to a square
round one of its lesions: the network is convolutional, so it trains on crops and detects
on whole slices, several crops for the price of one slice. The heads see ``roi_batch``
proposals per slice (torchvision samples 512 by default; lesions are few and small, and
every proposal counts on a CPU). On CPUs with bf16 matrix units (AMX) the forward passes
run in bf16 autocast (``precision = "auto"``).

Once trained, the bundle is written and run through
:class:`~mibi_node.analyses.lung.runner.LungRunner` on the validation cases: the linking of
slice detections into 3-D lesions is fit there (:func:`~training.lung_evaluate
.fit_linking`), written into the manifest, and the validation figures are recorded.

Evaluation runs the bundle through the runner and scores the lesions of each result's
lesion map with :mod:`training.lung_metric` (FROC, CPM, AP at IoU 0.5, mask Dice, bootstrap
intervals, issue 18's goals), with the seconds per scan and the peak memory.

Usage::

    python -m training.lung synth DATA --count 80 --seed 0
    python -m training.lung train config/lung-demo.toml DATA --out var/bundles/lung-demo
    python -m training.lung evaluate var/bundles/lung-demo FRESH [--json OUT] [--record]
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
from torchvision.models.detection import MaskRCNN

import mibi_node
from mibi_node.analyses.bundles import write_manifest
from mibi_node.analyses.lung.bundle import (
    ReportSection,
    record_lung_evaluation,
    write_lung_bundle,
)
from mibi_node.analyses.lung.model import create_lung_detector, parameter_count
from mibi_node.analyses.memory import record_measured_memory
from mibi_node.analyses.registry import available_analyses
from mibi_node.errors import ConfigError, MibiNodeError
from mibi_node.validation.drift import record_training_inputs
from training.lung_data import (
    PreparedCase,
    case_folders,
    data_fingerprint,
    draw_slices,
    iter_lung_cases,
    lesion_slices,
    load_lung_cases,
    prepare_case,
    split_cases,
    training_sample,
)
from training.lung_evaluate import (
    evaluate_lung,
    figures,
    fit_linking,
    score_cases,
)
from training.lung_recipe import LungRecipe, load_lung_recipe
from training.trainer import training_bf16, warmup_cosine

__all__ = ["LungRecipe", "evaluate_lung", "load_lung_recipe", "main", "train_lung"]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Steps between two progress lines.
_REPORT_EVERY = 25
#: Validation studies the bundle's memory is measured on: one worker batch (the phantoms
#: are all of one size, a second batch peaks no higher and costs the budget ~30 s).
_MEMORY_STUDIES = 4


def _fit_transform(model: MaskRCNN, rows: int, cols: int) -> None:
    """Tell torchvision's transform the slice size, so that it does not rescale slices."""
    model.transform.min_size = (min(rows, cols),)
    model.transform.max_size = max(rows, cols)


def _train_detector(
    recipe: LungRecipe, train: list[PreparedCase], say: Progress, seed: int
) -> tuple[MaskRCNN, list[dict[str, float]]]:
    config, augment = recipe.training, recipe.augment
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 18])
    model = create_lung_detector(recipe.detector.arch, **recipe.detector_options())
    model.roi_heads.fg_bg_sampler.batch_size_per_image = config.roi_batch
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimiser = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, warmup_cosine(config.steps, min(config.warmup_steps, config.steps // 4))
    )
    bf16 = training_bf16(recipe.training.precision, torch.device("cpu"))
    channels = recipe.detector.channels
    model.train()
    history: list[dict[str, float]] = []
    totals: dict[str, float] = {}
    started = time.perf_counter()
    lesions = lesion_slices(train) if config.sampling == "lesion" else None
    for step in range(config.steps):
        drawn = draw_slices(train, config.batch_size, config.positive_share, rng, lesions=lesions)
        samples = [
            training_sample(
                train[n],
                k,
                channels,
                rng,
                flip=augment.flip,
                reverse=augment.reverse,
                noise_hu=augment.noise_hu,
                shift_hu=augment.shift_hu,
                crop=config.crop,
            )  # fmt: skip
            for n, k in drawn
        ]
        _fit_transform(model, *samples[0][0].shape[1:])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses = model([x for x, _ in samples], [t for _, t in samples])
        loss = sum(v.float() for v in losses.values())
        optimiser.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        torch.nn.utils.clip_grad_norm_(parameters, config.grad_clip)
        optimiser.step()
        schedule.step()
        for name, value in losses.items():
            totals[name] = totals.get(name, 0.0) + float(value.detach())
        if (step + 1) % _REPORT_EVERY == 0 or step + 1 == config.steps:
            count = (step % _REPORT_EVERY) + 1
            row = {"step": float(step + 1), "seconds": time.perf_counter() - started}
            row |= {name.removeprefix("loss_"): value / count for name, value in totals.items()}
            row["loss"] = sum(value / count for value in totals.values())
            history.append(row)
            parts = ", ".join(
                f"{name} {value:.3f}"
                for name, value in row.items()
                if name not in ("step", "seconds")
            )
            say(f"step {step + 1}/{config.steps}: {parts} ({row['seconds']:.0f} s)")
            totals = {}
    return model.eval(), history


def train_lung(
    recipe: Path | str,
    data: Path | str,
    out: Path | str,
    *,
    seed: int = 0,
    overwrite: bool = True,
    progress: Progress | None = None,
) -> Path:
    """Train the recipe's detector on a lung data folder; write the bundle.

    Parameters
    ----------
    recipe
        A lung recipe (``config/lung-demo.toml``).
    data
        A folder of cases (``case-*/dicom`` and ``case-*/labels.npz``).
    out
        The bundle folder to write.
    seed
        Added to the recipe's seed: fixes the split, initialisation, slices, augmentation.
    overwrite
        Replace a bundle already in ``out``.
    progress
        Called with one line per step of note (default: the log).

    Returns
    -------
    Path
        ``out``.
    """
    from mibi_node.analyses.lung.runner import LungRunner

    started = time.perf_counter()
    say = progress or (lambda message: logger.info("%s", message))
    parsed = load_lung_recipe(recipe)
    config = parsed.training
    run_seed = config.seed + seed
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        if not Path(data).is_dir():
            raise ConfigError(f"lung data {data}: no such folder")
        names = [folder.name for folder in case_folders(Path(data))]
        if not names:
            raise ConfigError(f"lung data {data}: no case-* folder in it")
        train_names, val_names, test_names = split_cases(
            names, parsed.split.validation, parsed.split.test, run_seed
        )
        spacing = (
            parsed.preprocessing.slice_spacing_mm,
            parsed.preprocessing.pixel_spacing_mm,
            parsed.preprocessing.pixel_spacing_mm,
        )
        train = [
            prepare_case(case, spacing)
            for case in iter_lung_cases(data, names=train_names, warn=say)
        ]
        val_cases = load_lung_cases(data, names=val_names, warn=say) if val_names else []
        train_names = [p.case_id for p in train]
        val_names = [c.case_id for c in val_cases]
        read_seconds = time.perf_counter() - started
        say(
            f"read {len(train) + len(val_cases)} cases in {read_seconds:.1f} s: {len(train)} "
            f"training ({sum(len(p.positive) for p in train)} slices with a lesion), "
            f"{len(val_cases)} validation, {len(test_names)} test"
        )
        model, history = _train_detector(parsed, train, say, run_seed)
        train_seconds = time.perf_counter() - started - read_seconds
        command = shlex.join(
            ["python", "-m", "training.lung", "train", str(recipe), str(data), "--out",
             str(out), "--seed", str(seed)]
        )  # fmt: skip
        training_figures: dict[str, Any] = {
            "read_seconds": round(read_seconds, 1),
            "train_seconds": round(train_seconds, 1),
            "threads": config.threads,
            "bf16": training_bf16(parsed.training.precision, torch.device("cpu")),
            "steps": config.steps,
            "parameters": parameter_count(model),
            "last_losses": {k: round(v, 4) for k, v in history[-1].items() if k != "seconds"},
        }
        manifest = {
            "name": parsed.name,
            "version": parsed.version,
            "intended_use": parsed.intended_use,
            "description": parsed.description,
            "preprocessing": parsed.preprocessing.model_dump(),
            "detector": parsed.manifest_detector(),
            "linking": parsed.manifest_linking().model_dump(),
            "split": {"train": train_names, "validation": val_names, "test": test_names},
            "training": training_figures,
            "changelog": {parsed.version: f"trained on {len(train)} cases from {data}"},
            "provenance": {
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "package_version": mibi_node.__version__,
                "training_command": command,
                "data_fingerprint": data_fingerprint(Path(data)),
                "seed": run_seed,
                "notes": f"{len(train)} training, {len(val_names)} validation, "
                f"{len(test_names)} test cases; training {train_seconds:.0f} s, reading "
                f"{read_seconds:.0f} s",
            },
        }
        bundle = write_lung_bundle(Path(out), manifest, model, overwrite=overwrite)
        _write_history(Path(out) / "history.csv", history)
        # The training inputs' summary that input drift is measured against.
        record_training_inputs(
            Path(out), [Path(data) / case / "dicom" for case in (*train_names, *val_names)]
        )
        if val_cases:
            runner = LungRunner(bundle)
            if parsed.linking.fit:
                linking, fit = fit_linking(runner, val_cases, parsed.manifest_linking())
                say(
                    "linking fit on the validation cases: "
                    + ", ".join(f"{k} {v}" for k, v in linking.model_dump().items())
                    + f" (CPM {fit['cpm']:.3f}, Dice {fit['dice']:.3f})"
                )
                bundle_manifest = bundle.manifest.model_copy(update={"linking": linking})
                write_manifest(Path(out), bundle_manifest)
                runner = LungRunner(Path(out))
            evaluation, report, outcomes = score_cases(runner, val_cases, bootstrap=0, seed=0)
            fp_per_scan = parsed.report.fp_per_scan
            threshold = outcomes.threshold_for(fp_per_scan)
            sensitivity, fp = outcomes.at(threshold)
            say(
                f"reporting threshold {threshold:.3f}: sensitivity {sensitivity:.3f} at "
                f"{fp:.2f} false positives per scan on the validation cases "
                f"(wanted <= {fp_per_scan:g})"
            )
            point = ReportSection(
                min_probability=threshold,
                fp_per_scan=fp_per_scan,
                sensitivity=sensitivity if math.isfinite(sensitivity) else None,
            )
            current = bundle.load(Path(out), verify=False).manifest
            write_manifest(Path(out), current.model_copy(update={"report": point}))
            report["operating_point"] = point.model_dump()
            record_lung_evaluation(Path(out), figures(evaluation, report), split="validation")
            say(f"validation (runner):\n{evaluation.format_table()}")
        seconds = time.perf_counter() - started
        training_figures["seconds"] = round(seconds, 1)
        final = bundle.load(Path(out), verify=False).manifest
        write_manifest(Path(out), final.model_copy(update={"training": training_figures}))
        if val_names and "lung" in available_analyses():
            # What the bundle costs a worker, measured on validation studies in a fresh
            # process (docs/analyses.md, "Bundles and memory"); until the analysis is
            # registered the manifest keeps the estimate.
            record_measured_memory(
                "lung",
                Path(out),
                [
                    sorted((Path(data) / name / "dicom").glob("*.dcm"))
                    for name in val_names[:_MEMORY_STUDIES]
                ],
            )
    finally:
        torch.set_num_threads(threads)
    say(f"trained lung bundle {out} in {seconds:.1f} s")
    return Path(out)


def _write_history(path: Path, history: list[dict[str, float]]) -> None:
    columns = list(history[0]) if history else ["step"]
    lines = [",".join(columns)]
    lines += [",".join(f"{row.get(c, float('nan')):.5g}" for c in columns) for row in history]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _synth(out: Path, count: int, seed: int) -> None:
    from mibi_node.analyses.lung.phantom import write_lung_dataset

    write_lung_dataset(out, count, seed)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.lung synth|train|evaluate ...``; 2 on bad input, no traceback."""
    parser = argparse.ArgumentParser(prog="python -m training.lung")
    sub = parser.add_subparsers(dest="command", required=True)
    synth = sub.add_parser("synth", help="write chest CT phantom cases with their truth")
    synth.add_argument("out", type=Path)
    synth.add_argument("--count", type=int, default=80)
    synth.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train a lung bundle")
    train.add_argument("recipe", type=Path)
    train.add_argument("data", type=Path)
    train.add_argument("--out", type=Path, required=True)
    train.add_argument("--seed", type=int, default=0)
    evaluate = sub.add_parser("evaluate", help="score a lung bundle: FROC, CPM, AP, Dice")
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
            train_lung(args.recipe, args.data, args.out, seed=args.seed, progress=say)
        else:
            if args.bootstrap < 0:
                parser.error("--bootstrap must be >= 0")
            torch.set_num_threads(1)
            evaluation, report = evaluate_lung(
                args.bundle, args.data, bootstrap=args.bootstrap, split=args.split
            )
            print(f"{report['bundle']} on {args.data} ({report['cases']} cases)")
            print(evaluation.format_table())
            print(
                f"inference {report['seconds_per_scan']:.2f} s per scan on cpu "
                f"({torch.get_num_threads()} thread; "
                + ", ".join(f"{k} {v:.2f} s" for k, v in report["timings"].items())
                + f"), peak RSS {report['peak_rss_mb']:.0f} MiB"
            )
            point = report["operating_point"]
            print(
                f"reported at the bundle's threshold {point['min_probability']:.3f}: "
                f"sensitivity {point['sensitivity']:.3f}, {point['fp_per_scan']:.2f} false "
                "positives per scan (class-aware)"
            )
            recorded = figures(evaluation, report)
            for text, met in recorded["goals"].items():
                print(f"goal {text}: {'met' if met else 'not met'}")
            if args.json is not None:
                args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            if args.record:
                recorded |= {
                    "data": str(args.data),
                    "bootstrap": args.bootstrap,
                    "peak_rss_mb": report["peak_rss_mb"],
                }
                record_lung_evaluation(args.bundle, recorded, split=args.split or "test")
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
