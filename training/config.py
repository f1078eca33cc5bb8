"""The ``[training]`` table of an ensemble recipe, validated once at load.

The recipe (:mod:`mibi_node.inference.recipe`) passes its ``[training]`` table through as a
plain dict; this module owns its meaning. Every key has a default, so an empty table trains
with sensible settings; an unknown or invalid key fails with a
:class:`~mibi_node.errors.ConfigError` that names it (``training.augment.rotate_degrees``).

Example (``config/ensemble-demo.toml``)::

    [training]
    epochs = 12
    batch_size = 32
    fusion = "fitted"

    [training.augment]
    rotate_degrees = 12.0

    [training.overrides.densenet121]
    epochs = 8
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mibi_node.errors import ConfigError
from mibi_node.inference.recipe import Recipe

__all__ = [
    "AugmentConfig",
    "MemberOverride",
    "TrainingConfig",
    "training_config",
]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class AugmentConfig(_Section):
    """Training-time augmentation (see :mod:`training.augment`); 0 switches a transform off.

    Attributes
    ----------
    hflip
        Probability of a left-right mirror (the neck is near-symmetric; the labels are not
        lateralised).
    vflip
        Probability of an upside-down mirror; 0 by default because the mediastinum is always
        below the neck.
    rotate_degrees
        Uniform rotation in [-r, r].
    scale
        Zoom range (> 1 enlarges the anatomy).
    shift
        Largest translation as a fraction of the image side (random crops).
    elastic_alpha
        Largest elastic displacement as a fraction of the image side.
    elastic_grid
        Control points per side of the smooth random displacement field.
    elastic_probability
        Share of images that get an elastic deformation.
    intensity
        Range of a per-image, per-phase gain on the counts.
    counts
        Range of the count fraction kept when an acquisition with fewer counts is simulated
        by Poisson resampling; ``[1, 1]`` switches it off.
    counts_probability
        Share of images that get Poisson resampling.
    """

    hflip: float = Field(default=0.5, ge=0, le=1)
    vflip: float = Field(default=0.0, ge=0, le=1)
    rotate_degrees: float = Field(default=10.0, ge=0, le=180)
    scale: tuple[float, float] = (0.9, 1.1)
    shift: float = Field(default=0.06, ge=0, le=0.5)
    elastic_alpha: float = Field(default=0.015, ge=0, le=0.2)
    elastic_grid: int = Field(default=4, ge=2, le=32)
    elastic_probability: float = Field(default=0.5, ge=0, le=1)
    intensity: tuple[float, float] = (0.9, 1.1)
    counts: tuple[float, float] = (0.5, 1.0)
    counts_probability: float = Field(default=0.5, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> AugmentConfig:
        for key in ("scale", "intensity", "counts"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"{key} should be [low, high] with 0 < low <= high")
        if self.counts[1] > 1:
            raise ValueError("counts should keep a fraction <= 1 of the counts")
        return self


class MemberOverride(_Section):
    """Per-member changes to the shared optimisation settings (``[training.overrides.NAME]``)."""

    epochs: int | None = Field(default=None, ge=1)
    batch_size: int | None = Field(default=None, ge=1)
    lr: float | None = Field(default=None, gt=0)
    weight_decay: float | None = Field(default=None, ge=0)
    patience: int | None = Field(default=None, ge=1)
    precision: Literal["auto", "fp32", "bf16"] | None = None


class TrainingConfig(_Section):
    """Everything the ``[training]`` table may say.

    Attributes
    ----------
    seed
        Fixes the split, the initialisation, the batches and the augmentation.
    test_fraction
        Share of the studies held out as the test split (stratified, written to the bundle).
    val_fraction
        Share of the remaining studies used for early stopping and for fitting the fusion.
    folds
        0: one train/validation split. k >= 2: k-fold cross-validation on the non-test
        studies; the fusion is fitted on the out-of-fold predictions and every member is then
        retrained on all non-test studies for the median best epoch count.
    epochs, batch_size, lr, weight_decay
        AdamW settings shared by the members (see ``overrides``).
    warmup_epochs
        Linear learning-rate warm-up before the cosine decay (may be fractional).
    min_lr_ratio
        Floor of the cosine schedule relative to ``lr``.
    patience
        Epochs without a lower validation loss before a member stops early.
    balance
        ``"loss"``: class-weighted cross-entropy; ``"sampling"``: class-balanced batches;
        ``"none"``.
    label_smoothing
        Cross-entropy label smoothing.
    drop_rate
        Dropout in the members' heads while training.
    grad_clip
        Gradient-norm clipping, 0 for none.
    fusion
        How the bundle fuses: ``"fitted"`` soft-voting weights on the simplex, ``"equal"``
        weights, or majority ``"vote"``.
    fusion_shrinkage
        Strength of the pull of the fitted weights toward equal weights.
    fit_temperature
        Fit one temperature on the fused validation probabilities.
    bootstrap
        Bootstrap resamples for the 95% intervals of the test module.
    keep_checkpoints
        Keep the per-epoch checkpoints after a successful run (they only serve ``--resume``).
    threads
        CPU threads for torch (at most; a shared machine stays usable).
    precision
        Arithmetic of the training steps: ``"auto"`` uses bf16 autocast on CUDA and on CPUs
        with native bf16 (AVX512-BF16 or AMX; about 1.5-2x faster for the ResNets and
        DenseNets of the demo), float32 elsewhere; ``"fp32"`` or ``"bf16"`` force one.
        Weights, optimiser state and all predictions stay float32.
    augment
        See :class:`AugmentConfig`.
    overrides
        Member name -> :class:`MemberOverride`.
    """

    seed: int = Field(default=0, ge=0)
    test_fraction: float = Field(default=0.2, gt=0, lt=1)
    val_fraction: float = Field(default=0.15, gt=0, lt=1)
    folds: int = Field(default=0, ge=0, le=20)
    epochs: int = Field(default=20, ge=1)
    batch_size: int = Field(default=32, ge=1)
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=0.05, ge=0)
    warmup_epochs: float = Field(default=1.0, ge=0)
    min_lr_ratio: float = Field(default=0.01, ge=0, le=1)
    patience: int = Field(default=5, ge=1)
    balance: Literal["loss", "sampling", "none"] = "loss"
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    drop_rate: float = Field(default=0.0, ge=0, lt=1)
    grad_clip: float = Field(default=5.0, ge=0)
    fusion: Literal["fitted", "equal", "vote"] = "fitted"
    fusion_shrinkage: float = Field(default=0.05, ge=0)
    fit_temperature: bool = True
    bootstrap: int = Field(default=1000, ge=0)
    keep_checkpoints: bool = False
    threads: int = Field(default=2, ge=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    augment: AugmentConfig = AugmentConfig()
    overrides: dict[str, MemberOverride] = {}

    @model_validator(mode="after")
    def _folds(self) -> TrainingConfig:
        if self.folds == 1:
            raise ValueError("folds should be 0 (no cross-validation) or at least 2")
        return self

    def for_member(self, name: str) -> TrainingConfig:
        """The settings with member ``name``'s overrides applied."""
        override = self.overrides.get(name)
        if override is None:
            return self
        changes = {k: v for k, v in override.model_dump().items() if v is not None}
        return self.model_copy(update=changes)


def training_config(recipe: Recipe, **changes: Any) -> TrainingConfig:
    """Validate a recipe's ``[training]`` table, with optional changes on top.

    Parameters
    ----------
    recipe
        A loaded recipe.
    **changes
        Top-level keys that replace the table's (e.g. ``epochs=1`` in a quick run).

    Raises
    ------
    ConfigError
        A key is unknown or invalid; the message names it as ``training.<key>``.
    """
    data = {**recipe.training, **changes}
    try:
        config = TrainingConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(["training", *(str(part) for part in first["loc"])])
        message = str(first["msg"]).removeprefix("Value error, ")
        raise ConfigError(f"recipe {recipe.name}: key {key!r}: {message}") from None
    unknown = sorted(set(config.overrides) - {member.name for member in recipe.members})
    if unknown:
        raise ConfigError(
            f"recipe {recipe.name}: training.overrides names no member of the recipe: {unknown}"
        )
    return config
