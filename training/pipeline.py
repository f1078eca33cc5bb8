"""``mibi-node train`` end to end: data -> members -> fusion -> bundle -> test report.

The output folder becomes a complete model bundle (``bundle.json`` and one ``.safetensors``
per member, see :mod:`mibi_node.inference.bundle`) with two extra folders:

* ``training/``: ``split.json`` (reusable with ``--split``), and per member its
  ``history.csv``, ``learning-curve.png`` and, while training runs, its checkpoints;
* ``reports/``: ``training.json`` (settings, per-member epochs and times, the fusion fit and
  its comparison with equal weights and voting), the learning curves, and the test module's
  ``evaluation-test.{md,json}``, ``confusion-test.png`` and ``roc-test.png``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import shlex
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import mibi_node
from mibi_node.errors import MibiNodeError
from mibi_node.inference.recipe import Recipe, load_recipe
from training.config import TrainingConfig, training_config
from training.data import (
    CLASS_KEYS,
    DataError,
    Preprocessing,
    TrainingArrays,
    check_class_counts,
    discover,
    load_arrays,
)
from training.evaluate import EvaluationReport, evaluate_bundle, split_path
from training.fusion import FusionFit, fit_fusion
from training.split import Split, stratified_folds, stratified_split

__all__ = ["TrainingError", "TrainingResult", "train_bundle"]

logger = logging.getLogger(__name__)

#: Called with (event, details): ``"stage"`` (name), ``"read"``/``"classify"`` (done, total),
#: ``"step"`` (member, epoch, step, steps, loss), ``"epoch"`` (member, row), ``"member"``
#: (name, epochs).
ProgressCallback = Callable[..., None]


class TrainingError(MibiNodeError):
    """Training cannot start or continue; the message says why and what to do."""


@dataclass
class TrainingResult:
    """A finished ``mibi-node train``.

    Attributes
    ----------
    bundle_dir
        The written bundle.
    fusion
        The fusion fit and its comparison.
    members
        Member name -> best epoch, epochs run, seconds.
    evaluation
        The test report (``None`` when evaluation was skipped).
    seconds
        Stage -> wall seconds (``data``, each member, ``fusion``, ``evaluation``, ``total``).
    """

    bundle_dir: Path
    fusion: FusionFit
    members: dict[str, dict[str, Any]]
    evaluation: EvaluationReport | None
    seconds: dict[str, float] = field(default_factory=dict)


def _is_phantom(source_truth: dict[str, str]) -> bool:
    return "psf_fwhm_mm" in source_truth and "foci" in source_truth


def _prepare_out(out: Path, resume: bool, overwrite: bool) -> None:
    work = out / "training"
    if resume:
        return
    if (out / "bundle.json").exists() and not overwrite:
        raise TrainingError(f"{out} already holds a model bundle; pass --overwrite to replace it")
    if (work / "members").exists():
        if not overwrite:
            raise TrainingError(
                f"{out} holds an unfinished training run; pass --resume to continue it or "
                "--overwrite to start over"
            )
        shutil.rmtree(work / "members")


def _make_split(
    out: Path,
    source_fingerprint: str,
    arrays: TrainingArrays,
    config: TrainingConfig,
    resume: bool,
    split_file: Path | None,
) -> Split:
    saved = split_path(out)
    if split_file is not None or (resume and saved.is_file()):
        split = Split.load(split_file if split_file is not None else saved)
        if split.data_fingerprint != source_fingerprint:
            raise TrainingError(
                f"split {split_file or saved} was drawn from other data (fingerprint "
                f"{split.data_fingerprint[:12]}..., this folder {source_fingerprint[:12]}...)"
            )
    else:
        split = stratified_split(
            arrays.keys,
            arrays.labels,
            test_fraction=config.test_fraction,
            val_fraction=config.val_fraction,
            seed=config.seed,
            data_fingerprint=source_fingerprint,
        )
        if config.folds:
            trainval = split.train + split.val
            labels = arrays.labels[arrays.index(trainval)]
            split = Split(
                split.train,
                split.val,
                split.test,
                split.seed,
                split.data_fingerprint,
                folds=stratified_folds(trainval, labels, config.folds, seed=config.seed),
            )
    split.save(saved)
    return split


def train_bundle(
    recipe: Path | str | Recipe,
    data_dir: Path | str,
    out_dir: Path | str,
    *,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    cache_dir: Path | str | None = None,
    split_file: Path | str | None = None,
    changes: dict[str, Any] | None = None,
    max_steps: int | None = None,
    evaluate: bool = True,
    command: str | None = None,
    progress: ProgressCallback | None = None,
    stop_after_epoch: int | None = None,
) -> TrainingResult:
    """Train every member of a recipe, fit the fusion, write and evaluate the bundle.

    Parameters
    ----------
    recipe
        An ensemble recipe (path or loaded).
    data_dir
        Labelled studies (see :mod:`training.data`).
    out_dir
        The bundle folder to write.
    device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    resume
        Continue an interrupted run in ``out_dir`` from its checkpoints and split.
    overwrite
        Replace a bundle or an unfinished run in ``out_dir``.
    cache_dir
        Where preprocessed arrays are cached (see :func:`training.data.load_arrays`).
    split_file
        Reuse the split of an earlier run (its ``training/split.json``).
    changes
        Top-level ``[training]`` keys to replace (e.g. ``{"epochs": 2}``).
    max_steps
        Cap on steps per epoch (smoke tests).
    evaluate
        Run the test module on the test split at the end.
    command
        The command line, for the provenance (a ``mibi-node train`` line by default).
    progress
        See :data:`ProgressCallback`.
    stop_after_epoch
        Interrupt every member after this epoch (tests of ``--resume``).

    Returns
    -------
    TrainingResult

    Raises
    ------
    TrainingError, DataError, ConfigError, BundleError
        With one sentence saying what is wrong.
    """
    import torch

    from mibi_node.analyses.memory import record_measured_memory
    from mibi_node.inference.bundle import write_bundle
    from mibi_node.inference.engine import resolve_device
    from mibi_node.validation.drift import record_training_inputs
    from training.trainer import predict_probabilities, train_member

    started = time.perf_counter()
    seconds: dict[str, float] = {}
    notify = progress or (lambda *args: None)
    recipe_obj = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    config = training_config(recipe_obj, **(changes or {}))
    out = Path(out_dir)
    _prepare_out(out, resume, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    torch_device = resolve_device(device)
    threads = min(config.threads, os.cpu_count() or 1)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        notify("stage", "data")
        source = discover(data_dir)
        check_class_counts(source.class_counts(), f"data folder {source.root}")
        preprocessing = Preprocessing.from_recipe(recipe_obj)
        arrays = load_arrays(
            source, preprocessing, cache_dir, lambda done, total: notify("read", done, total)
        )
        split = _make_split(
            out,
            source.fingerprint,
            arrays,
            config,
            resume,
            Path(split_file) if split_file is not None else None,
        )
        seconds["data"] = time.perf_counter() - started
        logger.info(
            "split: %d train, %d validation, %d test%s",
            len(split.train),
            len(split.val),
            len(split.test),
            f", {len(split.folds)} folds" if split.folds else "",
        )

        views = recipe_obj.tta.views
        from mibi_node.imaging.tta import parse_views

        tta = parse_views(list(views))
        members: dict[str, Any] = {}
        member_info: dict[str, dict[str, Any]] = {}
        work = out / "training" / "members"
        common: dict[str, Any] = {
            "device": torch_device,
            "resume": resume,
            "max_steps": max_steps,
            "stop_after_epoch": stop_after_epoch,
            "on_step": lambda *a: notify("step", *a),
            "on_epoch": lambda *a: notify("epoch", *a),
        }
        if split.folds:
            oof, oof_labels, final_epochs = _cross_validate(
                recipe_obj, config, arrays, split, work, tta, common
            )
        for index, spec in enumerate(recipe_obj.members):
            member_config = config.for_member(spec.name)
            member_started = time.perf_counter()
            notify("member", spec.name, member_config.epochs)
            if split.folds:
                member_config = member_config.model_copy(update={"epochs": final_epochs[spec.name]})
                run = train_member(
                    spec,
                    recipe_obj,
                    member_config,
                    arrays,
                    arrays.index(split.keys("trainval")),
                    None,
                    work / spec.name,
                    seed_offset=index,
                    **common,
                )
            else:
                run = train_member(
                    spec,
                    recipe_obj,
                    member_config,
                    arrays,
                    arrays.index(split.train),
                    arrays.index(split.val),
                    work / spec.name,
                    seed_offset=index,
                    **common,
                )
            members[spec.name] = run.module
            seconds[spec.name] = time.perf_counter() - member_started
            member_info[spec.name] = {
                "arch": spec.arch,
                "best_epoch": run.best_epoch,
                "epochs": len(run.history),
                "resumed_from": run.resumed_from,
                "seconds": round(seconds[spec.name], 2),
                "seconds_per_epoch": round(
                    float(np.mean([row["seconds"] for row in run.history])) if run.history else 0.0,
                    3,
                ),
            }

        fusion_started = time.perf_counter()
        notify("stage", "fusion")
        if split.folds:
            probabilities, labels, fusion_source = oof, oof_labels, "out-of-fold"
        else:
            val_rows = arrays.index(split.val)
            if len(val_rows) == 0:
                raise TrainingError("the validation split is empty; the fusion needs it")
            probabilities = np.stack(
                [
                    predict_probabilities(
                        members[name], arrays.inputs[val_rows], tta, device=torch_device
                    )
                    for name in members
                ]
            )
            labels, fusion_source = arrays.labels[val_rows], "validation"
        fit = fit_fusion(
            probabilities,
            labels,
            choice=config.fusion,
            shrinkage=config.fusion_shrinkage,
            temperature=config.fit_temperature,
            source=fusion_source,
            member_names=tuple(members),
        )
        seconds["fusion"] = time.perf_counter() - fusion_started

        notify("stage", "bundle")
        intended_use = recipe_obj.intended_use
        if intended_use == "clinical" and _is_phantom(source.samples[0].truth):
            logger.warning("trained on phantom studies: the bundle is for demonstration only")
            intended_use = "demonstration"
        command_line = command or shlex.join(
            ["mibi-node", "train", "--data", str(data_dir), "--out", str(out_dir)]
        )
        manifest = {
            "name": recipe_obj.name,
            "version": recipe_obj.version,
            "intended_use": intended_use,
            "description": recipe_obj.description,
            "input": recipe_obj.input.model_dump(),
            "normalisation": recipe_obj.normalisation.model_dump(),
            "denoise": recipe_obj.denoise.model_dump(),
            "tta": recipe_obj.tta.model_dump(),
            "members": [{"name": name} for name in members],
            "fusion": {
                "method": fit.fusion.method,
                "weights": list(fit.fusion.weights),
                "temperature": fit.fusion.temperature,
            },
            "provenance": {
                "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "package_version": mibi_node.__version__,
                "training_command": command_line,
                "data_fingerprint": source.fingerprint,
                "seed": config.seed,
                "notes": (
                    f"trained on {len(split.keys('trainval'))} studies of {source.root.name} "
                    f"({len(split.test)} held out for test); " + fit.summary()
                ),
            },
        }
        write_bundle(out, manifest, members, overwrite=True, superres=preprocessing.superres)
        samples = {sample.key: sample for sample in source.samples}
        record_measured_memory(
            "parathyroid",
            out,
            [
                samples[key].files
                for key in (*split.val, *split.test)
                if samples[key].kind == "dicom"
            ],
        )
        # The training inputs' summary that input drift is measured against.
        record_training_inputs(
            out, [samples[k].files for k in split.keys("trainval") if samples[k].kind == "dicom"]
        )
        reports = out / "reports"
        reports.mkdir(exist_ok=True)
        for name in members:
            curve = work / name / "learning-curve.png"
            if curve.is_file():
                shutil.copyfile(curve, reports / f"learning-curve-{name}.png")
        training_record = {
            "recipe": recipe_obj.name,
            "data": {
                "folder": str(source.root),
                "layout": source.layout,
                "fingerprint": source.fingerprint,
                "class_counts": source.class_counts(),
                "skipped": arrays.skipped,
                "split": {
                    "train": len(split.train),
                    "val": len(split.val),
                    "test": len(split.test),
                    "folds": len(split.folds),
                },
            },
            "settings": config.model_dump(mode="json"),
            "device": str(torch_device),
            "threads": threads,
            "members": member_info,
            "fusion": fit.to_dict(),
        }

        evaluation = None
        if evaluate:
            notify("stage", "evaluation")
            evaluation_started = time.perf_counter()
            evaluation = evaluate_bundle(
                out,
                source,
                "test",
                device=device,
                n_resamples=config.bootstrap,
                seed=config.seed,
                progress=lambda stage, done, total: notify(
                    "read" if stage == "read" else "classify", done, total
                ),
            )
            seconds["evaluation"] = time.perf_counter() - evaluation_started
        seconds["total"] = time.perf_counter() - started
        training_record["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
        (reports / "training.json").write_text(
            json.dumps(training_record, indent=1) + "\n", encoding="utf-8"
        )
        if not config.keep_checkpoints:
            for name in members:
                for leftover in ("last.pt", "best.pt"):
                    (work / name / leftover).unlink(missing_ok=True)
                for fold_dir in (work / name).glob("fold-*"):
                    shutil.rmtree(fold_dir)
        return TrainingResult(out, fit, member_info, evaluation, seconds)
    finally:
        torch.set_num_threads(previous_threads)


def _cross_validate(
    recipe: Recipe,
    config: TrainingConfig,
    arrays: TrainingArrays,
    split: Split,
    work: Path,
    tta: Any,
    common: dict[str, Any],
) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """k-fold training of every member: out-of-fold probabilities and the epochs to keep.

    Fold models train for the full epoch count on the other folds; the held-out fold is only
    monitored (its mean validation loss per epoch picks the epoch count of the final member)
    and predicted once at the end, so the out-of-fold probabilities stay out of sample.
    """
    from training.trainer import predict_probabilities, train_member

    trainval = split.keys("trainval")
    rows = arrays.index(trainval)
    position = {int(row): i for i, row in enumerate(rows)}
    oof = np.zeros((len(recipe.members), len(rows), len(CLASS_KEYS)))
    final_epochs: dict[str, int] = {}
    for index, spec in enumerate(recipe.members):
        member_config = config.for_member(spec.name)
        curves = []
        for fold_number, held in enumerate(split.folds, 1):
            held_rows = arrays.index(held)
            train_rows = np.setdiff1d(rows, held_rows)
            run = train_member(
                spec,
                recipe,
                member_config,
                arrays,
                train_rows,
                held_rows,
                work / spec.name / f"fold-{fold_number}",
                seed_offset=100 * fold_number + index,
                early_stopping=False,
                **common,
            )
            probabilities = predict_probabilities(
                run.module, arrays.inputs[held_rows], tta, device=common["device"]
            )
            for row, p in zip(held_rows, probabilities, strict=True):
                oof[index, position[int(row)]] = p
            curves.append([entry["val_loss"] for entry in run.history])
        length = min(len(curve) for curve in curves)
        mean_curve = np.nanmean([curve[:length] for curve in curves], axis=0)
        final_epochs[spec.name] = int(np.nanargmin(mean_curve)) + 1
        logger.info(
            "member %s: %d-fold cross-validation picks %d epochs",
            spec.name,
            len(split.folds),
            final_epochs[spec.name],
        )
    if not len(rows):
        raise DataError("cross-validation needs training studies")
    return oof, arrays.labels[rows], final_epochs
