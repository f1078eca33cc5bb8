"""The spine analysis' model bundle: ``bundle.json`` plus two safetensors files.

The manifest keeps the keys every analysis shares (:mod:`mibi_node.analyses.bundles`:
``analysis``, ``intended_use``, ``memory``, ``evaluation``, ``changelog``) and the spine's
own: the model input (square side, channels, percentile normalisation), the keypoint
network (encoder, decoder width, stride, heatmap sigma), the ROI classifier (member
architecture, head, crop size) with the crop rule (side = ``scale`` x the distance between
a level's neighbours), each network's weight file with its sha256, and the provenance.
Weights are written and hashed like the thyroid bundle's; the manifest is written last,
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
from mibi_node.errors import BundleError
from mibi_node.imaging.preprocess import Normalisation
from mibi_node.inference.bundle import Provenance
from mibi_node.inference.recipe import NormalisationSection, describe_validation_error

if TYPE_CHECKING:
    import torch
    from torch import nn

    from mibi_node.analyses.spine.model import SpineKeypointNet
    from mibi_node.inference.members import Member

__all__ = [
    "SPINE_FORMAT_VERSION",
    "SpineBundle",
    "SpineManifest",
    "load_spine_bundle",
    "record_spine_evaluation",
    "spine_memory_needs",
    "write_spine_bundle",
]

logger = logging.getLogger(__name__)

SPINE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
_WEIGHTS = r"^[A-Za-z0-9_.\-]+\.safetensors$"
_SHA = r"^[0-9a-f]{64}$"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SpineInputSection(_Section):
    """The keypoint network's input: the slice stack padded to a square of ``size`` px."""

    size: int = Field(default=192, ge=32, le=1024)
    channels: int = Field(default=3, ge=1, le=9)


class KeypointSection(_Section):
    """The heatmap network: how to rebuild it and which file holds its weights."""

    arch: str
    decoder_channels: int = Field(ge=4)
    stride: Literal[2, 4] = 4
    sigma: float = Field(default=2.0, gt=0)
    weights: str = Field(pattern=_WEIGHTS)
    sha256: str = Field(pattern=_SHA)


class ClassifierSection(_Section):
    """The ROI classifier (a member with the vertebra and disc heads' logits)."""

    arch: str
    heads: int = Field(ge=1)
    embed_dim: int = Field(ge=8)
    weights: str = Field(pattern=_WEIGHTS)
    sha256: str = Field(pattern=_SHA)


class CropSection(_Section):
    """The crop rule: side = ``scale`` x the neighbours' distance, resampled to ``size``."""

    scale: float = Field(default=1.5, gt=0, le=8)
    size: int = Field(default=48, ge=16, le=256)


class SpineManifest(_Section):
    """The parsed spine ``bundle.json``."""

    format_version: int
    analysis: Literal["spine"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"]
    description: str = ""
    input: SpineInputSection = SpineInputSection()
    normalisation: NormalisationSection = NormalisationSection()
    keypoints: KeypointSection
    classifier: ClassifierSection
    crop: CropSection = CropSection()
    memory: MemoryHint
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changelog: dict[str, str] = Field(default_factory=dict)
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> SpineManifest:
        if self.format_version != SPINE_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported "
                f"(this mibi-node reads {SPINE_FORMAT_VERSION})"
            )
        if self.keypoints.weights == self.classifier.weights:
            raise ValueError("keypoints and classifier should have their own weight files")
        if self.input.size % self.keypoints.stride:
            raise ValueError(
                f"input size {self.input.size} should be a multiple of the keypoint stride "
                f"{self.keypoints.stride}"
            )
        return self


@dataclass(frozen=True)
class SpineBundle(BundleIdentity):
    """A checked spine bundle folder (weights are read by the ``build_*`` methods).

    Attributes
    ----------
    directory
        The bundle folder.
    manifest
        Its parsed ``bundle.json``.
    """

    directory: Path
    manifest: SpineManifest

    @classmethod
    def load(cls, directory: Path | str, *, verify: bool = True) -> SpineBundle:
        """Read and check a bundle folder (see :func:`load_spine_bundle`)."""
        return load_spine_bundle(directory, verify=verify)

    @property
    def input_size(self) -> int:
        """Side of the square keypoint input."""
        return self.manifest.input.size

    @property
    def channels(self) -> int:
        """Slices stacked as channels (the middle one in the middle)."""
        return self.manifest.input.channels

    @property
    def normalisation(self) -> Normalisation:
        """Input normalisation."""
        return self.manifest.normalisation.to_normalisation()

    def build_keypoint_model(self, device: torch.device | str = "cpu") -> SpineKeypointNet:
        """The keypoint network with its weights, on ``device``, in eval mode.

        Raises
        ------
        BundleError
            The weight file does not fit the network the manifest describes.
        """
        from mibi_node.analyses.spine.model import create_keypoint_model

        entry = self.manifest.keypoints
        model = create_keypoint_model(
            entry.arch,
            in_chans=self.channels,
            decoder_channels=entry.decoder_channels,
            stride=entry.stride,
        )
        load_weights(model, self.directory / entry.weights, entry.arch, device)
        return model.to(device).eval()

    def build_classifier(self, device: torch.device | str = "cpu") -> Member:
        """The ROI classifier with its weights, on ``device``, in eval mode.

        Raises
        ------
        BundleError
            The weight file does not fit the member the manifest describes.
        """
        from mibi_node.analyses.spine.model import create_roi_classifier

        entry = self.manifest.classifier
        member = create_roi_classifier(
            entry.arch,
            in_chans=self.channels,
            size=self.manifest.crop.size,
            heads=entry.heads,
            embed_dim=entry.embed_dim,
        )
        load_weights(member, self.directory / entry.weights, entry.arch, device)
        return member.to(device).eval()


def _read_manifest(directory: Path) -> SpineManifest:
    return read_manifest(directory, SpineManifest, "spine bundle")


def load_spine_bundle(directory: Path | str, *, verify: bool = True) -> SpineBundle:
    """Read a spine bundle folder and check it.

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
            (f"the {role} network", entry.weights, entry.sha256)
            for role, entry in (
                ("keypoints", manifest.keypoints),
                ("classifier", manifest.classifier),
            )
        ],
        verify=verify,
    )
    logger.info(
        "loaded spine bundle %s %s (%s)", manifest.name, manifest.version, manifest.intended_use
    )
    return SpineBundle(directory=directory, manifest=manifest)


def spine_memory_needs(directory: Path | str) -> tuple[float, float]:
    """``(cpu_mb, gpu_mb)`` the manifest declares, read without loading any weights."""
    manifest = _read_manifest(Path(directory))
    return float(manifest.memory.cpu_mb), float(manifest.memory.gpu_mb)


def _estimate_memory(modules: list[nn.Module]) -> dict[str, float]:
    """The manifest's ``memory`` until training measures it (:mod:`mibi_node.analyses.memory`)."""
    from mibi_node.analyses.spine import SpineAnalysis

    return estimated_memory(modules_megabytes(modules), SpineAnalysis.working_memory_mb)


def write_spine_bundle(
    directory: Path | str,
    manifest: Mapping[str, Any],
    keypoint_model: SpineKeypointNet,
    classifier: Member,
    *,
    overwrite: bool = False,
) -> SpineBundle:
    """Write both networks' weights and ``bundle.json`` (last, atomically) into a folder.

    Parameters
    ----------
    directory
        Target folder; created if needed.
    manifest
        ``bundle.json`` content. The ``keypoints`` and ``classifier`` sections may leave out
        what the modules tell (``arch``, widths, ``weights``, ``sha256``); ``format_version``,
        ``analysis`` and ``memory`` are filled in when missing.
    keypoint_model, classifier
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
        raise BundleError(f"spine bundle {directory}: already exists (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(manifest)
    data.setdefault("format_version", SPINE_FORMAT_VERSION)
    data.setdefault("analysis", "spine")
    data.setdefault("memory", _estimate_memory([keypoint_model, classifier]))
    config = keypoint_model.config
    data["keypoints"] = {
        "sigma": 2.0,
        **dict(data.get("keypoints") or {}),
        "arch": config.arch,
        "decoder_channels": config.decoder_channels,
        "stride": config.stride,
        "weights": "keypoints.safetensors",
        "sha256": save_weights(keypoint_model, directory / "keypoints.safetensors"),
    }
    member = classifier.config
    data["classifier"] = {
        "arch": member.arch,
        "heads": member.heads,
        "embed_dim": member.embed_dim,
        "weights": "classifier.safetensors",
        "sha256": save_weights(classifier, directory / "classifier.safetensors"),
    }
    try:
        checked = SpineManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"spine bundle manifest: {describe_validation_error(exc)}") from None
    if checked.crop.size != member.input_size:
        raise BundleError(
            f"spine bundle manifest: key 'crop.size' is {checked.crop.size} but the classifier "
            f"was built for {member.input_size} px crops"
        )
    if checked.input.channels != config.in_chans:
        raise BundleError(
            f"spine bundle manifest: key 'input.channels' is {checked.input.channels} but the "
            f"keypoint network takes {config.in_chans}"
        )
    write_manifest(directory, checked)
    logger.info("wrote spine bundle %s %s to %s", checked.name, checked.version, directory)
    return SpineBundle(directory=directory, manifest=checked)


def record_spine_evaluation(
    directory: Path | str,
    metrics: Mapping[str, Any],
    *,
    split: str = "test",
    version: str | None = None,
) -> SpineBundle:
    """Store figures under ``evaluation[version][split]`` of a bundle's manifest.

    Figures of the other splits of that version are kept; the weights are left alone (their
    hashes still hold) and the manifest is rewritten atomically. ``version`` defaults to the
    bundle's own version.

    Raises
    ------
    BundleError
        The bundle cannot be read, or the figures are not JSON.
    """
    bundle = load_spine_bundle(directory, verify=False)
    record_evaluation(
        bundle.directory, SpineManifest, "spine bundle", metrics, split=split, version=version
    )
    return load_spine_bundle(directory, verify=False)
