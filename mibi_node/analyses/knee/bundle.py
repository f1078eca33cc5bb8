"""The knee analysis' model bundle: ``bundle.json`` plus one safetensors file per stage.

The manifest keeps the keys every analysis shares (:mod:`mibi_node.analyses.bundles`:
``analysis``, ``intended_use``, ``memory``, ``evaluation``, ``changelog``) and the knee's
own: the preprocessing (working grid spacing, stage 1's pooling factor, the denoising
filter) and the normalisation, both stages' architectures with their widths, each weight
file with its sha256, the region rule between the stages (foreground threshold, the
connected-component cleanup, the crop margin), the training figures, the split of the
training data (case names of the training, validation and test sets) and the provenance.
Weights are written and hashed like the spine bundle's; the manifest is written last,
atomically.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from mibi_node.analyses.bundles import (
    BundleIdentity,
    MemoryHint,
    check_weight_files,
    estimated_memory,
    load_weights,
    modules_megabytes,
    read_manifest,
    record_evaluation,
    save_weights,
    write_manifest,
)
from mibi_node.analyses.knee.preprocess import KneePreprocessing
from mibi_node.errors import BundleError
from mibi_node.inference.bundle import Provenance
from mibi_node.inference.recipe import NormalisationSection, describe_validation_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mibi_node.analyses.knee.model import KneeCoarseNet, KneeFineNet

__all__ = [
    "KNEE_FORMAT_VERSION",
    "KneeBundle",
    "KneeManifest",
    "knee_memory_needs",
    "load_knee_bundle",
    "record_knee_evaluation",
    "write_knee_bundle",
]

logger = logging.getLogger(__name__)

KNEE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
_WEIGHTS = r"^[A-Za-z0-9_.\-]+\.safetensors$"
_SHA = r"^[0-9a-f]{64}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessingSection(_Section):
    """Denoising and the grids (:class:`~mibi_node.analyses.knee.preprocess.KneePreprocessing`)."""

    spacing_mm: float = Field(default=0.8, gt=0.05, le=5.0)
    coarse_factor: int = Field(default=3, ge=1, le=8)
    denoise: Literal["gaussian", "median", "none"] = "gaussian"
    denoise_mm: float = Field(default=0.35, ge=0, le=5.0)


class CoarseSection(_Section):
    """Stage 1: the residual U-Net, how to rebuild it and which file holds its weights."""

    arch: str
    channels: tuple[int, ...] = Field(min_length=2)
    strides: tuple[int, ...] = Field(min_length=1)
    res_units: int = Field(ge=1)
    in_channels: int = Field(default=1, ge=1)
    num_classes: int = Field(default=5, ge=2)
    weights: str = Field(pattern=_WEIGHTS)
    sha256: str = Field(pattern=_SHA)


class FineSection(_Section):
    """Stage 2: the 3-D ResNet encoder with its ASPP decoder."""

    arch: str
    widths: tuple[int, ...] = Field(min_length=1, max_length=4)
    blocks: tuple[int, ...] = Field(min_length=1, max_length=4)
    aspp_channels: int = Field(ge=1)
    dilations: tuple[int, ...] = Field(min_length=1)
    decoder_channels: int = Field(ge=1)
    stem_channels: int = Field(ge=1)
    conv1_size: int = Field(default=3, ge=1)
    in_channels: int = Field(default=1, ge=1)
    num_classes: int = Field(default=5, ge=2)
    weights: str = Field(pattern=_WEIGHTS)
    sha256: str = Field(pattern=_SHA)


class RegionSection(_Section):
    """From stage 1's probabilities to stage 2's crop."""

    foreground_threshold: float = Field(default=0.5, gt=0, lt=1)
    min_volume_mm3: float = Field(default=50.0, ge=0)
    min_fraction: float = Field(default=0.05, ge=0, le=1)
    margin_mm: float = Field(default=4.0, ge=0)


class KneeManifest(_Section):
    """The parsed knee ``bundle.json``."""

    format_version: int
    analysis: Literal["knee"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"]
    description: str = ""
    preprocessing: PreprocessingSection = PreprocessingSection()
    normalisation: NormalisationSection = NormalisationSection()
    stage1: CoarseSection
    stage2: FineSection
    region: RegionSection = RegionSection()
    split: dict[str, list[str]] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    memory: MemoryHint
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changelog: dict[str, str] = Field(default_factory=dict)
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> KneeManifest:
        if self.format_version != KNEE_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported "
                f"(this mibi-node reads {KNEE_FORMAT_VERSION})"
            )
        if self.stage1.weights == self.stage2.weights:
            raise ValueError("stage1 and stage2 should have their own weight files")
        if self.stage1.num_classes != self.stage2.num_classes:
            raise ValueError("stage1 and stage2 should have the same num_classes")
        if len(self.stage2.widths) != len(self.stage2.blocks):
            raise ValueError("stage2.widths and stage2.blocks should have the same length")
        if len(self.stage1.strides) != len(self.stage1.channels) - 1:
            raise ValueError("stage1.strides should have one entry fewer than stage1.channels")
        if len(self.normalisation.mean) != 1:
            raise ValueError("normalisation.mean and std should have one value (one channel)")
        return self


def _options(section: BaseModel) -> dict[str, Any]:
    return section.model_dump(exclude={"arch", "weights", "sha256"})


@dataclass(frozen=True)
class KneeBundle(BundleIdentity):
    """A checked knee bundle folder (weights are read by the ``build_*`` methods).

    Attributes
    ----------
    directory
        The bundle folder.
    manifest
        Its parsed ``bundle.json``.
    """

    directory: Path
    manifest: KneeManifest

    @classmethod
    def load(cls, directory: Path | str, *, verify: bool = True) -> KneeBundle:
        """Read and check a bundle folder (see :func:`load_knee_bundle`)."""
        return load_knee_bundle(directory, verify=verify)

    @property
    def preprocessing(self) -> KneePreprocessing:
        """Denoising, grids and normalisation, as training used them."""
        section = self.manifest.preprocessing
        return KneePreprocessing(
            spacing_mm=section.spacing_mm,
            coarse_factor=section.coarse_factor,
            denoise=section.denoise,
            denoise_mm=section.denoise_mm,
            normalisation=self.manifest.normalisation.to_normalisation(),
        )

    def build_stage1(self, device: torch.device | str = "cpu") -> KneeCoarseNet:
        """Stage 1 with its weights, on ``device``, in eval mode.

        Raises
        ------
        BundleError
            The weight file does not fit the network the manifest describes.
        """
        from mibi_node.analyses.knee.model import KneeCoarseNet

        entry = self.manifest.stage1
        model = _create(entry.arch, _options(entry), "stage1")
        if not isinstance(model, KneeCoarseNet):
            raise BundleError(f"{self.directory / MANIFEST_NAME}: stage1.arch is not a stage 1")
        load_weights(model, self.directory / entry.weights, entry.arch, device)
        return model.to(device).eval()

    def build_stage2(self, device: torch.device | str = "cpu") -> KneeFineNet:
        """Stage 2 with its weights, on ``device``, in eval mode.

        Raises
        ------
        BundleError
            The weight file does not fit the network the manifest describes.
        """
        from mibi_node.analyses.knee.model import KneeFineNet

        entry = self.manifest.stage2
        model = _create(entry.arch, _options(entry), "stage2")
        if not isinstance(model, KneeFineNet):
            raise BundleError(f"{self.directory / MANIFEST_NAME}: stage2.arch is not a stage 2")
        load_weights(model, self.directory / entry.weights, entry.arch, device)
        return model.to(device).eval()


def _create(arch: str, options: dict[str, Any], key: str) -> KneeCoarseNet | KneeFineNet:
    from mibi_node.analyses.knee.model import create_knee_stage

    try:
        return create_knee_stage(arch, **options)
    except (TypeError, ValueError) as exc:
        raise BundleError(f"knee bundle manifest: key '{key}': {exc}") from None


def _read_manifest(directory: Path) -> KneeManifest:
    return read_manifest(directory, KneeManifest, "knee bundle")


def load_knee_bundle(directory: Path | str, *, verify: bool = True) -> KneeBundle:
    """Read a knee bundle folder and check it.

    Parameters
    ----------
    directory
        The folder holding ``bundle.json``.
    verify
        Check both weight files' sha256.

    Raises
    ------
    BundleError
        The folder or manifest is missing or invalid, or a weight file is missing or altered;
        the message names the file.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    check_weight_files(
        directory,
        [
            (role, e.weights, e.sha256)
            for role, e in (("stage1", manifest.stage1), ("stage2", manifest.stage2))
        ],
        verify=verify,
    )
    logger.info(
        "loaded knee bundle %s %s (%s)", manifest.name, manifest.version, manifest.intended_use
    )
    return KneeBundle(directory=directory, manifest=manifest)


def knee_memory_needs(directory: Path | str) -> tuple[float, float]:
    """``(cpu_mb, gpu_mb)`` the manifest declares, read without loading any weights."""
    manifest = _read_manifest(Path(directory))
    return float(manifest.memory.cpu_mb), float(manifest.memory.gpu_mb)


def _estimate_memory(modules: list[nn.Module]) -> dict[str, float]:
    """The manifest's ``memory`` until training measures it (:mod:`mibi_node.analyses.memory`)."""
    from mibi_node.analyses.knee import KneeAnalysis

    return estimated_memory(modules_megabytes(modules), KneeAnalysis.working_memory_mb)


def write_knee_bundle(
    directory: Path | str,
    manifest: Mapping[str, Any],
    stage1: KneeCoarseNet,
    stage2: KneeFineNet,
    *,
    overwrite: bool = False,
) -> KneeBundle:
    """Write both stages' weights and ``bundle.json`` (last, atomically) into a folder.

    Parameters
    ----------
    directory
        Target folder; created if needed.
    manifest
        ``bundle.json`` content. The ``stage1`` and ``stage2`` sections are filled from the
        networks' configs (``arch``, widths, ``weights``, ``sha256``); ``format_version``,
        ``analysis`` and ``memory`` are filled in when missing.
    stage1, stage2
        The trained networks.
    overwrite
        Replace an existing bundle in ``directory``.

    Raises
    ------
    BundleError
        The folder holds a bundle already, or the manifest is invalid.
    """
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise BundleError(f"knee bundle {directory}: already exists (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(manifest)
    data.setdefault("format_version", KNEE_FORMAT_VERSION)
    data.setdefault("analysis", "knee")
    data.setdefault("memory", _estimate_memory([stage1, stage2]))
    data["stage1"] = {
        **stage1.config.as_dict(),
        "weights": "stage1.safetensors",
        "sha256": save_weights(stage1, directory / "stage1.safetensors"),
    }
    data["stage2"] = {
        **stage2.config.as_dict(),
        "weights": "stage2.safetensors",
        "sha256": save_weights(stage2, directory / "stage2.safetensors"),
    }
    try:
        checked = KneeManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"knee bundle manifest: {describe_validation_error(exc)}") from None
    write_manifest(directory, checked)
    logger.info("wrote knee bundle %s %s to %s", checked.name, checked.version, directory)
    return KneeBundle(directory=directory, manifest=checked)


def record_knee_evaluation(
    directory: Path | str,
    metrics: Mapping[str, Any],
    *,
    split: str = "test",
    version: str | None = None,
) -> KneeBundle:
    """Store figures under ``evaluation[version][split]`` of a bundle's manifest.

    Figures of the other splits of that version are kept; the weights are left alone (their
    hashes still hold) and the manifest is rewritten atomically. ``version`` defaults to the
    bundle's own version.

    Raises
    ------
    BundleError
        The bundle cannot be read, or the figures are not JSON.
    """
    bundle = load_knee_bundle(directory, verify=False)
    record_evaluation(
        bundle.directory, KneeManifest, "knee bundle", metrics, split=split, version=version
    )
    return load_knee_bundle(directory, verify=False)
