"""The knee recipe (``config/knee-demo.toml``): what :mod:`training.knee` trains, validated.

Every key is checked once, at load, by pydantic; an error names the file and the TOML key
(``knee recipe config/knee-demo.toml: key 'stage2.patch': ...``). Architecture names and
width overrides are checked against the stage registry
(:func:`~mibi_node.analyses.knee.model.create_knee_stage`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mibi_node.analyses.knee.model import create_knee_stage, stage_kind
from mibi_node.analyses.knee.preprocess import KneePreprocessing
from mibi_node.errors import ConfigError
from mibi_node.inference.recipe import (
    NormalisationSection,
    read_recipe,
)

__all__ = ["KneeRecipe", "StageSection", "load_knee_recipe"]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Preprocessing(_Section):
    spacing_mm: float = Field(default=0.8, gt=0.05, le=5.0)
    coarse_factor: int = Field(default=3, ge=1, le=8)
    denoise: Literal["gaussian", "median", "none"] = "gaussian"
    denoise_mm: float = Field(default=0.35, ge=0, le=5.0)


class StageSection(_Section):
    """What both stages' training shares: the epoch limit, the target, the optimiser."""

    epochs: int = Field(default=20, ge=0)  # the limit
    target_dice: float = Field(default=1.0, gt=0, le=1.0)  # stop when validation reaches it
    validate_every: int = Field(default=1, ge=1)
    batch_size: int = Field(default=4, ge=1)
    lr: float = Field(default=3e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)


class _Stage1(StageSection):
    arch: str = "stage1_resunet_s"
    channels: tuple[int, ...] | None = None
    strides: tuple[int, ...] | None = None
    res_units: int | None = Field(default=None, ge=1)


class _Stage2(StageSection):
    arch: str = "stage2_medicalnet10_aspp_s"
    widths: tuple[int, ...] | None = None
    blocks: tuple[int, ...] | None = None
    aspp_channels: int | None = Field(default=None, ge=1)
    dilations: tuple[int, ...] | None = None
    decoder_channels: int | None = Field(default=None, ge=1)
    stem_channels: int | None = Field(default=None, ge=1)
    conv1_size: int | None = Field(default=None, ge=1)
    patch: tuple[int, int, int] = (48, 48, 48)  # working voxels
    patches_per_case: int = Field(default=2, ge=1)  # per epoch
    foreground_share: float = Field(default=0.5, ge=0, le=1)
    jitter_mm: float = Field(default=4.0, ge=0)
    side_weight: float = Field(default=0.1, ge=0)


class _Region(_Section):
    foreground_threshold: float = Field(default=0.5, gt=0, lt=1)
    min_volume_mm3: float = Field(default=50.0, ge=0)
    min_fraction: float = Field(default=0.05, ge=0, le=1)
    margin_mm: float = Field(default=4.0, ge=0)


class _Augment(_Section):
    mirror: float = Field(default=0.5, ge=0, le=1)  # probability of the sagittal mirror
    gain: tuple[float, float] = (0.9, 1.1)
    gamma: tuple[float, float] = (0.8, 1.25)
    noise: float = Field(default=0.03, ge=0)  # largest sd, in normalised units


class _Split(_Section):
    train: float = Field(default=0.7, gt=0, le=1)
    validation: float = Field(default=0.15, ge=0, lt=1)
    test: float = Field(default=0.15, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> _Split:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test should be 1, got {total:g}")
        return self


class _Training(_Section):
    seed: int = 0
    threads: int = Field(default=1, ge=1)
    warmup_steps: int = Field(default=10, ge=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CPUs with AMX


class KneeRecipe(_Section):
    """The parsed knee recipe (``config/knee-demo.toml``)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"] = "demonstration"
    description: str = ""
    preprocessing: _Preprocessing = _Preprocessing()
    normalisation: NormalisationSection = NormalisationSection()
    stage1: _Stage1 = _Stage1()
    stage2: _Stage2 = _Stage2()
    region: _Region = _Region()
    augment: _Augment = _Augment()
    split: _Split = _Split()
    training: _Training = _Training()

    def preprocessing_config(self) -> KneePreprocessing:
        """The runner's preprocessing this recipe trains with."""
        p = self.preprocessing
        return KneePreprocessing(
            spacing_mm=p.spacing_mm,
            coarse_factor=p.coarse_factor,
            denoise=p.denoise,
            denoise_mm=p.denoise_mm,
            normalisation=self.normalisation.to_normalisation(),
        )

    def stage_options(self, stage: Literal["stage1", "stage2"]) -> dict[str, Any]:
        """The architecture options the recipe overrides (widths, blocks, ...)."""
        section = self.stage1 if stage == "stage1" else self.stage2
        names = (
            ("channels", "strides", "res_units")
            if stage == "stage1"
            else ("widths", "blocks", "aspp_channels", "dilations", "decoder_channels",
                  "stem_channels", "conv1_size")
        )  # fmt: skip
        return {n: getattr(section, n) for n in names if getattr(section, n) is not None}


def load_knee_recipe(path: Path | str) -> KneeRecipe:
    """Read and validate a knee recipe.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names file and key.
    """
    path = Path(path)
    recipe = read_recipe(path, KneeRecipe, "knee recipe")
    for key, kind in (("stage1", "coarse"), ("stage2", "fine")):
        arch = getattr(recipe, key).arch
        try:
            found = stage_kind(arch)
        except ValueError as exc:
            raise ConfigError(f"knee recipe {path}: key '{key}.arch': {exc}") from None
        if found != kind:
            raise ConfigError(
                f"knee recipe {path}: key '{key}.arch': {arch!r} is a {found} stage, "
                f"{key} needs a {kind} one"
            )
        try:
            create_knee_stage(arch, **recipe.stage_options(key))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"knee recipe {path}: key '{key}': {exc}") from None
    return recipe
