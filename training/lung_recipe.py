"""The lung recipe (``config/lung-demo.toml``): what :mod:`training.lung` trains, validated.

Every key is checked once, at load, by pydantic; an error names the file and the TOML key
(``lung recipe config/lung-demo.toml: key 'training.steps': ...``). The detector's
architecture and options are checked against the registry
(:func:`~mibi_node.analyses.lung.model.create_lung_detector`). The ``[preprocessing]``,
``[detector]`` and ``[linking]`` tables are the bundle manifest's sections
(:mod:`mibi_node.analyses.lung.bundle`), less the weight file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mibi_node.analyses.lung.bundle import LinkingSection, PreprocessingSection
from mibi_node.errors import ConfigError
from mibi_node.inference.recipe import read_recipe

__all__ = ["LungRecipe", "load_lung_recipe"]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Detector(_Section):
    arch: str = "maskrcnn_resnet18_fpn_s"
    options: dict[str, Any] = Field(default_factory=dict)
    channels: int = Field(default=3, ge=1, le=15)
    score_threshold: float = Field(default=0.05, ge=0, le=1)
    batch: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _check(self) -> _Detector:
        if self.channels % 2 == 0:
            raise ValueError(
                f"channels should be odd (the slice in the middle), got {self.channels}"
            )
        for name in ("in_channels", "min_size", "max_size"):
            if name in self.options:
                raise ValueError(f"options.{name} is not set here (channels / the working grid)")
        return self


class _Linking(LinkingSection):
    #: Fit the linking on the validation cases (a grid around these values), or keep them.
    fit: bool = True


class _Augment(_Section):
    flip: float = Field(default=0.5, ge=0, le=1)  # left-right mirror of the slice
    reverse: float = Field(default=0.5, ge=0, le=1)  # the slab's slices in reverse order
    noise_hu: float = Field(default=15.0, ge=0)  # largest added noise sd, HU
    shift_hu: float = Field(default=30.0, ge=0)  # largest HU offset of the whole slab


class _Split(_Section):
    train: float = Field(default=0.8, gt=0, le=1)
    validation: float = Field(default=0.2, ge=0, lt=1)
    test: float = Field(default=0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _sum(self) -> _Split:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + validation + test should be 1, got {total:g}")
        return self


class _Training(_Section):
    seed: int = 0
    threads: int = Field(default=1, ge=1)
    steps: int = Field(default=400, ge=1)  # optimiser steps
    batch_size: int = Field(default=4, ge=1)  # slices per step
    positive_share: float = Field(default=0.75, ge=0, le=1)  # slices holding a lesion
    crop: int = Field(default=0, ge=0)  # square training crops, px (0: whole slices)
    sampling: Literal["slice", "lesion"] = "slice"  # positives: any lesion slice, or by lesion
    roi_batch: int = Field(default=128, ge=8)  # proposals sampled per slice for the heads
    lr: float = Field(default=1e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    warmup_steps: int = Field(default=30, ge=0)
    grad_clip: float = Field(default=10.0, gt=0)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on CPUs with AMX

    @model_validator(mode="after")
    def _check(self) -> _Training:
        if 0 < self.crop < 32:
            raise ValueError(f"crop should be 0 (whole slices) or at least 32 px, got {self.crop}")
        return self


class _Report(_Section):
    #: The operating point training fits on the validation cases: the reporting threshold
    #: is the lowest lesion score at which false positives per scan stay within this.
    fp_per_scan: float = Field(default=1.0, gt=0, le=100)


class LungRecipe(_Section):
    """The parsed lung recipe (``config/lung-demo.toml``)."""

    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"] = "demonstration"
    description: str = ""
    preprocessing: PreprocessingSection = PreprocessingSection()
    detector: _Detector = _Detector()
    linking: _Linking = _Linking()
    augment: _Augment = _Augment()
    split: _Split = _Split()
    training: _Training = _Training()
    report: _Report = _Report()

    def detector_options(self) -> dict[str, Any]:
        """The options to build the detector with (``in_channels`` from ``channels``)."""
        return {**self.detector.options, "in_channels": self.detector.channels}

    def manifest_detector(self) -> dict[str, Any]:
        """The bundle manifest's ``detector`` section, less the weight file."""
        return self.detector.model_dump()

    def manifest_linking(self) -> LinkingSection:
        """The recipe's linking as the manifest's section."""
        return LinkingSection(**self.linking.model_dump(exclude={"fit"}))


def load_lung_recipe(path: Path | str) -> LungRecipe:
    """Read and validate a lung recipe.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names file and key.
    """
    from mibi_node.analyses.lung.model import create_lung_detector

    path = Path(path)
    recipe = read_recipe(path, LungRecipe, "lung recipe")
    try:
        create_lung_detector(recipe.detector.arch, **recipe.detector_options())
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"lung recipe {path}: key 'detector': {exc}") from None
    return recipe
