"""The lung analysis' model bundle: ``bundle.json`` plus the detector's safetensors file.

The manifest keeps the keys every analysis shares (:mod:`mibi_node.analyses.bundles`:
``analysis``, ``intended_use``, ``memory``, ``evaluation``, ``changelog``) and the lung's
own: the working grid the detector was trained on (``[preprocessing]``: slice and in-plane
spacing in mm), the detector (``[detector]``: the registered Mask R-CNN architecture with
its options, the slab's channels, the score threshold of its slice detections, the slices
per forward pass, its weight file with the sha256), the linking of slice detections into
3-D lesions (``[linking]``: the arguments of
:func:`~mibi_node.analyses.lung.linking.link_detections`, fit on the validation cases), the
training figures, the split of the training data and the provenance. The weights are
written and hashed by the shared helpers; the manifest is written last, atomically.
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
from mibi_node.inference.bundle import Provenance
from mibi_node.inference.recipe import describe_validation_error

if TYPE_CHECKING:
    import torch
    from torchvision.models.detection import MaskRCNN

__all__ = [
    "LUNG_FORMAT_VERSION",
    "LUNG_WORKING_MEMORY_MB",
    "DetectorSection",
    "LinkingSection",
    "LungBundle",
    "LungManifest",
    "PreprocessingSection",
    "load_lung_bundle",
    "lung_memory_needs",
    "record_lung_evaluation",
    "write_lung_bundle",
]

logger = logging.getLogger(__name__)

LUNG_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
WEIGHTS_NAME = "detector.safetensors"
#: MiB one study needs beyond the weights, for the estimate before training measures it: a
#: 300 x 512 x 512 CT in float32 (300 MiB), its working grid and the detector's activations
#: on a batch of slices.
LUNG_WORKING_MEMORY_MB = 900.0
_WEIGHTS = r"^[A-Za-z0-9_.\-]+\.safetensors$"
_SHA = r"^[0-9a-f]{64}$"
#: Options that the runner sets per study (the working slice size), never the manifest.
_RUNTIME_OPTIONS = ("min_size", "max_size")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PreprocessingSection(_Section):
    """The working grid: the volume is resampled (linear) to these spacings, in mm."""

    slice_spacing_mm: float = Field(default=2.5, gt=0.1, le=10.0)
    pixel_spacing_mm: float = Field(default=1.5, gt=0.1, le=5.0)


class DetectorSection(_Section):
    """The Mask R-CNN detector: how to rebuild it, how to run it, its weight file."""

    arch: str = Field(min_length=1)
    #: Options of :func:`~mibi_node.analyses.lung.model.create_lung_detector` (anchor sizes,
    #: proposals, detections per slice, ...); ``min_size`` / ``max_size`` are set per study.
    options: dict[str, Any] = Field(default_factory=dict)
    channels: int = Field(default=3, ge=1, le=15)  # slices of the slab, odd
    score_threshold: float = Field(default=0.05, ge=0, le=1)
    batch: int = Field(default=8, ge=1, le=256)  # slices per forward pass
    weights: str = Field(default=WEIGHTS_NAME, pattern=_WEIGHTS)
    sha256: str = Field(pattern=_SHA)

    @model_validator(mode="after")
    def _check(self) -> DetectorSection:
        if self.channels % 2 == 0:
            raise ValueError(
                f"channels should be odd (the slice in the middle), got {self.channels}"
            )
        in_channels = self.options.get("in_channels", self.channels)
        if in_channels != self.channels:
            raise ValueError(
                f"options.in_channels {in_channels} and channels {self.channels} should agree"
            )
        fixed = sorted(set(self.options) & set(_RUNTIME_OPTIONS))
        if fixed:
            raise ValueError(f"options {', '.join(fixed)} are set per study, not in the manifest")
        return self

    def model_options(self) -> dict[str, Any]:
        """The options to build the detector with (``in_channels`` from ``channels``)."""
        return {**self.options, "in_channels": self.channels}


class LinkingSection(_Section):
    """The arguments of :func:`~mibi_node.analyses.lung.linking.link_detections`."""

    min_iou: float = Field(default=0.3, ge=0, le=1)
    max_gap: int = Field(default=1, ge=0)
    min_slices: int = Field(default=1, ge=1)
    nms_iou: float = Field(default=0.5, ge=0, le=1)
    lesion_nms_iou: float = Field(default=0.3, ge=0, le=1)
    top_k: int = Field(default=3, ge=1)


class ReportSection(_Section):
    """Which linked lesions the node reports (the FROC evaluation sees them all).

    ``min_probability`` is the operating point: lesions scoring below it are left out of the
    SEG and the SR. Training chooses it on the validation cases as the lowest score at which
    the false positives per scan stay within ``fp_per_scan``.
    """

    min_probability: float = Field(default=0.0, ge=0, le=1)
    fp_per_scan: float | None = Field(default=None, gt=0)
    #: The validation cases' sensitivity (class-aware) at that operating point.
    sensitivity: float | None = Field(default=None, ge=0, le=1)


class LungManifest(_Section):
    """The parsed lung ``bundle.json``."""

    format_version: int
    analysis: Literal["lung"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"]
    description: str = ""
    preprocessing: PreprocessingSection = PreprocessingSection()
    detector: DetectorSection
    linking: LinkingSection = LinkingSection()
    report: ReportSection = ReportSection()
    split: dict[str, list[str]] = Field(default_factory=dict)
    training: dict[str, Any] = Field(default_factory=dict)
    memory: MemoryHint
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changelog: dict[str, str] = Field(default_factory=dict)
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> LungManifest:
        if self.format_version != LUNG_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported "
                f"(this mibi-node reads {LUNG_FORMAT_VERSION})"
            )
        return self


@dataclass(frozen=True)
class LungBundle(BundleIdentity):
    """A checked lung bundle folder (the weights are read by :meth:`build_detector`).

    Attributes
    ----------
    directory
        The bundle folder.
    manifest
        Its parsed ``bundle.json``.
    """

    directory: Path
    manifest: LungManifest

    @classmethod
    def load(cls, directory: Path | str, *, verify: bool = True) -> LungBundle:
        """Read and check a bundle folder (see :func:`load_lung_bundle`)."""
        return load_lung_bundle(directory, verify=verify)

    @property
    def spacing(self) -> tuple[float, float, float]:
        """The working grid's ``(slice, row, column)`` spacing in mm."""
        p = self.manifest.preprocessing
        return (p.slice_spacing_mm, p.pixel_spacing_mm, p.pixel_spacing_mm)

    def build_detector(self, device: torch.device | str = "cpu") -> MaskRCNN:
        """The detector with its weights, on ``device``, in eval mode.

        Raises
        ------
        BundleError
            The manifest's architecture or options are not valid, or the weight file does
            not fit the network they describe.
        """
        from mibi_node.analyses.lung.model import create_lung_detector

        entry = self.manifest.detector
        try:
            model = create_lung_detector(entry.arch, **entry.model_options())
        except (TypeError, ValueError) as exc:
            raise BundleError(f"{self.directory / MANIFEST_NAME}: key 'detector': {exc}") from None
        load_weights(model, self.directory / entry.weights, entry.arch, device)
        return model.to(device).eval()


def _read_manifest(directory: Path) -> LungManifest:
    return read_manifest(directory, LungManifest, "lung bundle")


def load_lung_bundle(directory: Path | str, *, verify: bool = True) -> LungBundle:
    """Read a lung bundle folder and check it.

    Parameters
    ----------
    directory
        The folder holding ``bundle.json``.
    verify
        Check the weight file's sha256.

    Raises
    ------
    BundleError
        The folder or manifest is missing or invalid, or the weight file is missing or
        altered; the message names the file.
    """
    directory = Path(directory)
    manifest = _read_manifest(directory)
    entry = manifest.detector
    check_weight_files(directory, [("the detector", entry.weights, entry.sha256)], verify=verify)
    logger.info(
        "loaded lung bundle %s %s (%s)", manifest.name, manifest.version, manifest.intended_use
    )
    return LungBundle(directory=directory, manifest=manifest)


def lung_memory_needs(directory: Path | str) -> tuple[float, float]:
    """``(cpu_mb, gpu_mb)`` the manifest declares, read without loading any weights."""
    manifest = _read_manifest(Path(directory))
    return float(manifest.memory.cpu_mb), float(manifest.memory.gpu_mb)


def write_lung_bundle(
    directory: Path | str,
    manifest: Mapping[str, Any],
    detector: MaskRCNN,
    *,
    overwrite: bool = False,
) -> LungBundle:
    """Write the detector's weights and ``bundle.json`` (last, atomically) into a folder.

    Parameters
    ----------
    directory
        Target folder; created if needed.
    manifest
        ``bundle.json`` content. Its ``detector`` section names ``arch``, ``options``,
        ``channels``, ``score_threshold`` and ``batch``; ``weights`` and ``sha256`` are
        filled in. ``format_version``, ``analysis`` and ``memory`` are filled in when missing.
    detector
        The trained network.
    overwrite
        Replace an existing bundle in ``directory``.

    Raises
    ------
    BundleError
        The folder holds a bundle already, or the manifest is invalid.
    """
    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise BundleError(f"lung bundle {directory}: already exists (pass overwrite)")
    data = dict(manifest)
    data.setdefault("format_version", LUNG_FORMAT_VERSION)
    data.setdefault("analysis", "lung")
    data.setdefault(
        "memory", estimated_memory(modules_megabytes([detector]), LUNG_WORKING_MEMORY_MB)
    )
    section = dict(data.get("detector") or {})
    section["weights"] = WEIGHTS_NAME
    section.setdefault("sha256", "0" * 64)  # replaced once the weights are written
    data["detector"] = section
    try:
        LungManifest.model_validate(data)  # refuse a bad manifest before writing anything
    except ValidationError as exc:
        raise BundleError(f"lung bundle manifest: {describe_validation_error(exc)}") from None
    directory.mkdir(parents=True, exist_ok=True)
    section["sha256"] = save_weights(detector, directory / WEIGHTS_NAME)
    checked = LungManifest.model_validate(data)
    write_manifest(directory, checked)
    logger.info("wrote lung bundle %s %s to %s", checked.name, checked.version, directory)
    return LungBundle(directory=directory, manifest=checked)


def record_lung_evaluation(
    directory: Path | str,
    metrics: Mapping[str, Any],
    *,
    split: str = "test",
    version: str | None = None,
) -> LungBundle:
    """Store figures under ``evaluation[version][split]`` of a bundle's manifest.

    Figures of the other splits of that version are kept; the weights are left alone (their
    hash still holds) and the manifest is rewritten atomically. ``version`` defaults to the
    bundle's own version.

    Raises
    ------
    BundleError
        The bundle cannot be read, or the figures are not JSON.
    """
    bundle = load_lung_bundle(directory, verify=False)
    record_evaluation(
        bundle.directory, LungManifest, "lung bundle", metrics, split=split, version=version
    )
    return load_lung_bundle(directory, verify=False)
