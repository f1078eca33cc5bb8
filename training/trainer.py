"""Sub-model training: one ensemble member from preprocessed arrays to trained weights.

Per member: augmentation (:mod:`training.augment`), AdamW with a linear warm-up and a cosine
decay per step, a class-balanced loss (or class-balanced sampling), channels-last tensors
and bf16 autocast (on CUDA, and on CPUs with native bf16: ``precision`` in
:class:`~training.config.TrainingConfig`), early stopping on the validation loss, and a
checkpoint after every epoch, so an interrupted run resumes from the last finished epoch
with the same batches and augmentations it would have had. Each member leaves ``history.csv`` and
``learning-curve.png`` in its work folder.

Work folder of a member (``<out>/training/members/<name>/``)::

    last.pt          model, optimiser, schedule and early-stopping state after the last epoch
    best.pt          weights of the epoch with the lowest validation loss
    result.json      written when the member is finished (a resumed run skips it)
    history.csv      one row per epoch
    learning-curve.png
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from mibi_node.errors import MibiNodeError
from mibi_node.imaging.tta import TTAView, apply_views, average_views, parse_views
from mibi_node.inference.members import Member, create_member
from mibi_node.inference.recipe import MemberSection, Recipe
from training.augment import Augmenter
from training.config import TrainingConfig
from training.data import CLASS_KEYS, TrainingArrays
from training.plots import plot_learning_curve

__all__ = [
    "HISTORY_COLUMNS",
    "MemberRun",
    "TrainingInterruptedError",
    "cpu_has_bf16",
    "predict_probabilities",
    "train_member",
    "training_bf16",
    "warmup_cosine",
]

logger = logging.getLogger(__name__)

HISTORY_COLUMNS: tuple[str, ...] = (
    "epoch",
    "lr",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_macro_auc",
    "seconds",
)

#: Called after every optimiser step with (member name, epoch, step, steps per epoch, loss).
StepCallback = Callable[[str, int, int, int, float], None]
#: Called after every epoch with (member name, history row).
EpochCallback = Callable[[str, dict[str, float]], None]


class TrainingInterruptedError(MibiNodeError):
    """Training stopped on request after a checkpoint (tests and signal handlers use it)."""


@dataclass
class MemberRun:
    """A trained member.

    Attributes
    ----------
    name
        Member name from the recipe.
    module
        The member with the weights of its best epoch, in eval mode on the CPU.
    history
        One row per epoch (see :data:`HISTORY_COLUMNS`).
    best_epoch
        Epoch (1-based) whose weights were kept.
    resumed_from
        Last finished epoch found in the checkpoint, 0 for a fresh start.
    seconds
        Training time of this run (a resumed member counts only the resumed part).
    """

    name: str
    module: Member
    history: list[dict[str, float]]
    best_epoch: int
    resumed_from: int
    seconds: float


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _class_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=len(CLASS_KEYS)).astype(np.float64)
    present = counts > 0
    weights = np.zeros_like(counts)
    weights[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(weights, dtype=torch.float32)


def warmup_cosine(steps: int, warmup: int, floor: float = 0.0) -> Callable[[int], float]:
    """The learning-rate factor of a step (for ``LambdaLR``): a linear warm-up over
    ``warmup`` steps, then a half cosine from 1 down to ``floor`` at ``steps``."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min((step - warmup) / max(steps - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _schedule(config: TrainingConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = max(config.epochs * steps_per_epoch, 1)
    warmup = min(round(config.warmup_epochs * steps_per_epoch), total - 1)
    return warmup_cosine(total, warmup, config.min_lr_ratio)


def _autocast(device: torch.device, enabled: bool | None = None) -> Any:
    return torch.autocast(
        device_type=device.type,
        dtype=torch.bfloat16,
        enabled=device.type == "cuda" if enabled is None else enabled,
    )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX), so autocast pays off.

    Without it, bf16 convolutions are emulated and slower than float32.
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    try:
        found = capabilities()
    except (RuntimeError, OSError):
        return False
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def training_bf16(precision: str, device: torch.device) -> bool:
    """Whether training steps run under bf16 autocast for ``precision`` on ``device``."""
    if precision == "auto":
        return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16())
    return precision == "bf16"


def predict_probabilities(
    module: Member,
    inputs: np.ndarray | torch.Tensor,
    views: Sequence[TTAView] | None = None,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 32,
) -> np.ndarray:
    """Class probabilities of a member for preprocessed inputs, averaged over TTA views.

    Parameters
    ----------
    module
        The member (put in eval mode here).
    inputs
        (N, C, S, S) preprocessed model input.
    views
        Test-time views, as the engine applies them; ``None`` for the identity only.
    device
        Where to run.
    batch_size
        Studies per forward pass.

    Returns
    -------
    numpy.ndarray
        (N, K) float64 probabilities.
    """
    device = torch.device(device)
    tensor = torch.as_tensor(inputs, dtype=torch.float32)
    views = tuple(views) if views else parse_views(["identity"])
    module.eval()
    out = []
    with torch.inference_mode(), _autocast(device):
        for chunk in tensor.split(batch_size):
            batch = apply_views(chunk.to(device), views)
            if device.type == "cuda":
                batch = batch.contiguous(memory_format=torch.channels_last)
            probs = module(batch).float().softmax(dim=-1)
            out.append(average_views(probs, len(views)).cpu())
    if not out:
        return np.zeros((0, len(CLASS_KEYS)))
    return torch.cat(out).double().numpy()


def _validate(
    module: Member, inputs: torch.Tensor, labels: np.ndarray, device: torch.device, batch: int
) -> dict[str, float]:
    from sklearn.metrics import f1_score, roc_auc_score

    probabilities = predict_probabilities(module, inputs, device=device, batch_size=batch)
    clipped = np.clip(probabilities, 1e-12, 1.0)
    loss = float(-np.log(clipped[np.arange(len(labels)), labels]).mean())
    predicted = probabilities.argmax(axis=1)
    present = np.unique(labels)
    try:
        auc = float(
            roc_auc_score(
                labels,
                probabilities[:, present] / probabilities[:, present].sum(1, keepdims=True),
                multi_class="ovr",
                labels=present,
            )
            if len(present) > 2
            else np.nan
        )
    except ValueError:
        auc = float("nan")
    return {
        "val_loss": loss,
        "val_accuracy": float((predicted == labels).mean()),
        "val_macro_f1": float(f1_score(labels, predicted, average="macro", zero_division=0)),
        "val_macro_auc": auc,
    }


def _write_history(history: Sequence[dict[str, float]], path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=HISTORY_COLUMNS, lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow(
                {k: (f"{row[k]:.6g}" if k != "epoch" else int(row[k])) for k in HISTORY_COLUMNS}
            )


def _build(spec: MemberSection, recipe: Recipe, config: TrainingConfig) -> Member:
    return create_member(
        spec.arch,
        num_classes=len(CLASS_KEYS),
        in_chans=len(recipe.input.channels),
        heads=spec.heads,
        embed_dim=spec.embed_dim,
        input_size=recipe.input.size,
        drop_rate=config.drop_rate,
    )


def train_member(
    spec: MemberSection,
    recipe: Recipe,
    config: TrainingConfig,
    arrays: TrainingArrays,
    train_index: np.ndarray,
    val_index: np.ndarray | None,
    work_dir: Path,
    *,
    device: torch.device | str = "cpu",
    resume: bool = False,
    seed_offset: int = 0,
    max_steps: int | None = None,
    on_step: StepCallback | None = None,
    on_epoch: EpochCallback | None = None,
    stop_after_epoch: int | None = None,
    early_stopping: bool = True,
) -> MemberRun:
    """Train one member, checkpointing after every epoch.

    Parameters
    ----------
    spec
        The member as the recipe declares it.
    recipe
        The recipe (input channels and size, normalisation).
    config
        Training settings with this member's overrides applied.
    arrays
        Preprocessed input of the data folder.
    train_index, val_index
        Rows of ``arrays`` to train on and to stop early on; without validation rows the
        member trains for ``config.epochs`` and keeps the last epoch.
    work_dir
        The member's work folder (checkpoints, history, learning curve).
    device
        Where to train.
    resume
        Continue from ``work_dir/last.pt`` (or reuse a finished member) instead of starting
        over; without it an existing checkpoint is overwritten.
    seed_offset
        Added to ``config.seed`` for this member's initialisation, batches and augmentation.
    max_steps
        Stop every epoch after this many steps (smoke tests of big members).
    on_step, on_epoch
        Progress callbacks.
    stop_after_epoch
        Raise :class:`TrainingInterruptedError` after checkpointing this epoch (for tests).
    early_stopping
        Keep the epoch with the lowest validation loss and stop after ``patience`` epochs
        without improvement; without it the validation rows are only monitored and the last
        epoch is kept (cross-validation folds, whose held-out rows must stay unseen).

    Returns
    -------
    MemberRun
    """
    device = torch.device(device)
    if len(train_index) == 0:
        raise ValueError(f'Argument "train_index" is empty for member {spec.name}.')
    work_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = work_dir / "last.pt", work_dir / "best.pt"
    result_path = work_dir / "result.json"
    seed = config.seed * 1000 + seed_offset

    torch.manual_seed(seed)
    module = _build(spec, recipe, config)
    if resume and result_path.is_file() and best_path.is_file():
        result = json.loads(result_path.read_text(encoding="utf-8"))
        module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True))
        logger.info(
            "member %s: already trained (best epoch %d), reused", spec.name, result["best_epoch"]
        )
        return MemberRun(
            spec.name, module.eval(), result["history"], result["best_epoch"], result["epochs"], 0.0
        )

    module.to(device)
    # Channels-last suits oneDNN on the CPU as much as cuDNN (1.2-1.7x on a 2-core CPU).
    module.to(memory_format=torch.channels_last)
    bf16 = training_bf16(config.precision, device)
    optimiser = torch.optim.AdamW(
        module.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    batch_size = min(config.batch_size, len(train_index))
    steps_per_epoch = max(len(train_index) // batch_size, 1)
    if max_steps is not None:
        steps_per_epoch = min(steps_per_epoch, max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, _schedule(config, steps_per_epoch))

    history: list[dict[str, float]] = []
    best_loss, best_epoch, stale, start_epoch = math.inf, 0, 0, 1
    if resume and last_path.is_file():
        state = torch.load(last_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        history = state["history"]
        best_loss, best_epoch, stale = state["best_loss"], state["best_epoch"], state["stale"]
        start_epoch = state["epoch"] + 1
        logger.info("member %s: resuming after epoch %d", spec.name, state["epoch"])
    resumed_from = start_epoch - 1

    labels = torch.as_tensor(arrays.labels)
    inputs = torch.as_tensor(arrays.inputs)
    count_scale = torch.as_tensor(arrays.count_scale)
    train_labels = arrays.labels[train_index]
    loss_weights = _class_weights(train_labels).to(device) if config.balance == "loss" else None
    sample_weights = (
        _class_weights(train_labels)[torch.as_tensor(train_labels)]
        if config.balance == "sampling"
        else None
    )
    augment = Augmenter(config.augment, recipe.normalisation.to_normalisation(), inputs.shape[1])
    val_inputs = (
        inputs[torch.as_tensor(val_index)] if val_index is not None and len(val_index) else None
    )
    val_labels = (
        arrays.labels[val_index] if val_inputs is not None and val_index is not None else None
    )
    train_rows = torch.as_tensor(train_index)

    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs + 1):
        if stale >= config.patience:
            break
        epoch_started = time.perf_counter()
        generator = torch.Generator().manual_seed(seed * 1000 + epoch)
        torch.manual_seed(seed * 1000 + epoch)  # dropout
        if sample_weights is not None:
            order = torch.multinomial(
                sample_weights, len(train_rows), replacement=True, generator=generator
            )
        else:
            order = torch.randperm(len(train_rows), generator=generator)
        module.train()
        losses = []
        for step in range(steps_per_epoch):
            rows = train_rows[order[step * batch_size : (step + 1) * batch_size]]
            batch = augment(inputs[rows], count_scale[rows], generator).to(device)
            batch = batch.contiguous(memory_format=torch.channels_last)
            target = labels[rows].to(device)
            with _autocast(device, bf16):
                logits = module(batch)
            loss = F.cross_entropy(
                logits.float(), target, weight=loss_weights, label_smoothing=config.label_smoothing
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(module.parameters(), config.grad_clip)
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            if on_step is not None:
                on_step(spec.name, epoch, step + 1, steps_per_epoch, losses[-1])

        row: dict[str, float] = {
            "epoch": epoch,
            "lr": float(scheduler.get_last_lr()[0]),
            "train_loss": float(np.mean(losses)),
            "val_loss": float("nan"),
            "val_accuracy": float("nan"),
            "val_macro_f1": float("nan"),
            "val_macro_auc": float("nan"),
        }
        if val_inputs is not None and val_labels is not None:
            row.update(_validate(module, val_inputs, val_labels, device, max(batch_size, 32)))
        if early_stopping and val_inputs is not None:
            improved = row["val_loss"] < best_loss - 1e-4
        else:
            improved = True
        if improved:
            best_loss, best_epoch, stale = (
                row["val_loss"] if early_stopping and val_inputs is not None else math.inf,
                epoch,
                0,
            )
            _atomic_save({k: v.detach().cpu() for k, v in module.state_dict().items()}, best_path)
        else:
            stale += 1
        row["seconds"] = time.perf_counter() - epoch_started
        history.append(row)
        _atomic_save(
            {
                "epoch": epoch,
                "model": module.state_dict(),
                "optimiser": optimiser.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "best_loss": best_loss,
                "best_epoch": best_epoch,
                "stale": stale,
                "member": spec.model_dump(),
            },
            last_path,
        )
        _write_history(history, work_dir / "history.csv")
        if on_epoch is not None:
            on_epoch(spec.name, row)
        logger.info(
            "member %s epoch %d: loss %.4f, val loss %.4f, val accuracy %.3f%s",
            spec.name,
            epoch,
            row["train_loss"],
            row["val_loss"],
            row["val_accuracy"],
            "" if improved else f" (no improvement for {stale})",
        )
        if stop_after_epoch is not None and epoch >= stop_after_epoch:
            raise TrainingInterruptedError(
                f"member {spec.name}: stopped after epoch {epoch} as asked"
            )

    seconds = time.perf_counter() - started
    module.load_state_dict(torch.load(best_path, map_location=device, weights_only=True))
    module.to("cpu").to(memory_format=torch.contiguous_format).eval()
    plot_learning_curve(history, work_dir / "learning-curve.png", f"member {spec.name}")
    result_path.write_text(
        json.dumps(
            {"best_epoch": best_epoch, "epochs": len(history), "history": history}, indent=1
        ),
        encoding="utf-8",
    )
    logger.info(
        "member %s: trained %d epochs in %.1f s, best epoch %d",
        spec.name,
        len(history),
        seconds,
        best_epoch,
    )
    return MemberRun(spec.name, module, history, best_epoch, resumed_from, seconds)
