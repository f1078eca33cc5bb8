"""The thyroid analysis' model bundle: ``bundle.json`` plus one safetensors file per member.

The manifest keeps the keys every analysis shares (:mod:`mibi_node.analyses.bundles`:
``analysis``, ``intended_use``, ``memory``, ``evaluation``, ``changelog``) and the thyroid's
own: the six findings (with placeholder codes until the SR's code list is settled), the
input size, normalisation and adaptive median filter, the members (architecture, weight
file, sha256), the fusion weights (summing to 1) and one decision threshold per finding.
Weights are written and hashed like the parathyroid bundle's
(:mod:`mibi_node.inference.bundle`); the manifest is written last, atomically.
"""

from __future__ import annotations

import logging
import math
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
    file_sha256,
    modules_megabytes,
    read_manifest,
    write_manifest,
)
from mibi_node.analyses.thyroid.result import FINDINGS
from mibi_node.errors import BundleError
from mibi_node.imaging.preprocess import Normalisation
from mibi_node.inference.bundle import Provenance
from mibi_node.inference.recipe import (
    DenoiseSection,
    NormalisationSection,
    describe_validation_error,
)

if TYPE_CHECKING:
    import torch

    from mibi_node.inference.members import Member, MemberConfig

__all__ = [
    "THYROID_FORMAT_VERSION",
    "FindingEntry",
    "ThyroidBundle",
    "ThyroidManifest",
    "default_findings",
    "load_thyroid_bundle",
    "thyroid_memory_needs",
    "write_thyroid_bundle",
]

logger = logging.getLogger(__name__)

THYROID_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FindingEntry(_Section):
    """One output channel: its key and its code (placeholders until the code list is set)."""

    key: str
    scheme: str = "99MIBI"
    code: str
    meaning: str


class ThyroidInput(_Section):
    """The model input: the anterior image, squared and resized to ``size``."""

    image: Literal["thyroid"] = "thyroid"
    size: int = Field(default=64, ge=16, le=1024)
    #: Side in mm of the square cropped around the gland first; ``None``: the whole image.
    field_mm: float | None = Field(default=None, gt=0)


class ThyroidMember(_Section):
    """One member: how to rebuild it and which file holds its weights."""

    name: str = Field(min_length=1)
    arch: str
    heads: int = Field(ge=1)
    embed_dim: int = Field(ge=8)
    input_size: int = Field(ge=16)
    weights: str = Field(pattern=r"^[A-Za-z0-9_.\-]+\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ThyroidManifest(_Section):
    """The parsed thyroid ``bundle.json``."""

    format_version: int
    analysis: Literal["thyroid"]
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"]
    description: str = ""
    findings: tuple[FindingEntry, ...]
    input: ThyroidInput = ThyroidInput()
    normalisation: NormalisationSection = NormalisationSection()
    denoise: DenoiseSection = DenoiseSection()
    members: tuple[ThyroidMember, ...] = Field(min_length=1)
    fusion_weights: tuple[float, ...]
    thresholds: dict[str, float]
    memory: MemoryHint
    evaluation: dict[str, dict[str, Any]] = Field(default_factory=dict)
    changelog: dict[str, str] = Field(default_factory=dict)
    provenance: Provenance

    @model_validator(mode="after")
    def _check(self) -> ThyroidManifest:
        if self.format_version != THYROID_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported "
                f"(this mibi-node reads {THYROID_FORMAT_VERSION})"
            )
        keys = [entry.key for entry in self.findings]
        if keys != list(FINDINGS):
            raise ValueError(f"findings are {keys}, the thyroid analysis needs {list(FINDINGS)}")
        names = [member.name for member in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names should be distinct, got {names}")
        if len(self.fusion_weights) != len(self.members):
            raise ValueError("fusion_weights should hold one weight per member")
        if any(w < 0 for w in self.fusion_weights) or not math.isclose(
            sum(self.fusion_weights), 1.0, abs_tol=1e-6
        ):
            raise ValueError(
                f"fusion_weights should be non-negative and sum to 1, got {self.fusion_weights}"
            )
        if sorted(self.thresholds) != sorted(FINDINGS):
            raise ValueError(f"thresholds should have one entry per finding {list(FINDINGS)}")
        if any(not 0.0 < t < 1.0 for t in self.thresholds.values()):
            raise ValueError("thresholds should lie strictly between 0 and 1")
        return self


def default_findings() -> list[dict[str, str]]:
    """The six findings with placeholder codes, as a manifest's ``findings`` list."""
    return [
        FindingEntry(key=key, code=f"THY-{key.upper()}", meaning=key.replace("_", " ")).model_dump()
        for key in FINDINGS
    ]


@dataclass(frozen=True)
class ThyroidBundle(BundleIdentity):
    """A checked thyroid bundle folder (weights are read by :meth:`build_member`).

    Attributes
    ----------
    directory
        The bundle folder.
    manifest
        Its parsed ``bundle.json``.
    """

    directory: Path
    manifest: ThyroidManifest

    @property
    def input_size(self) -> int:
        """Side of the square model input."""
        return self.manifest.input.size

    @property
    def normalisation(self) -> Normalisation:
        """Input normalisation."""
        return self.manifest.normalisation.to_normalisation()

    @property
    def denoise_smax(self) -> int | None:
        """Adaptive median filter ``smax``; ``None`` when the bundle skips denoising."""
        return self.manifest.denoise.smax if self.manifest.denoise.enabled else None

    @property
    def member_names(self) -> tuple[str, ...]:
        """Member names in fusion order."""
        return tuple(m.name for m in self.manifest.members)

    @property
    def fusion_weights(self) -> tuple[float, ...]:
        """One weight per member, summing to 1."""
        return self.manifest.fusion_weights

    @property
    def thresholds(self) -> dict[str, float]:
        """Finding key -> decision threshold, in :data:`FINDINGS` order."""
        return {key: float(self.manifest.thresholds[key]) for key in FINDINGS}

    def member_config(self, name: str) -> MemberConfig:
        """How to rebuild member ``name``."""
        from mibi_node.inference.members import MemberConfig

        for entry in self.manifest.members:
            if entry.name == name:
                return MemberConfig(
                    arch=entry.arch,
                    num_classes=len(FINDINGS),
                    in_chans=1,
                    heads=entry.heads,
                    embed_dim=entry.embed_dim,
                    input_size=entry.input_size,
                )
        raise KeyError(f"bundle {self.name} has no member {name!r}")

    def build_member(self, name: str, device: torch.device | str = "cpu") -> Member:
        """Build member ``name``, load its weights onto ``device``, in eval mode.

        Raises
        ------
        BundleError
            The weight file does not fit the member the manifest describes.
        """
        from safetensors.torch import load_file

        import mibi_node.analyses.thyroid.model  # noqa: F401  (registers the architectures)
        from mibi_node.inference.members import create_member

        config = self.member_config(name)
        entry = next(e for e in self.manifest.members if e.name == name)
        path = self.directory / entry.weights
        member = create_member(
            config.arch,
            num_classes=config.num_classes,
            in_chans=config.in_chans,
            heads=config.heads,
            embed_dim=config.embed_dim,
            input_size=config.input_size,
        )
        try:
            state = load_file(str(path), device=str(device))
        except Exception as exc:  # safetensors raises its own errors for corrupt headers
            raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None
        try:
            member.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise BundleError(
                f"{path}: does not fit the {config.arch} member described in {MANIFEST_NAME} "
                f"({first})"
            ) from None
        return member.to(device).eval()


def _read_manifest(directory: Path) -> ThyroidManifest:
    return read_manifest(directory, ThyroidManifest, "thyroid bundle")


def load_thyroid_bundle(directory: Path | str, *, verify: bool = True) -> ThyroidBundle:
    """Read a thyroid bundle folder and check it.

    Parameters
    ----------
    directory
        The folder holding ``bundle.json``.
    verify
        Check every weight file's sha256.

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
        [(f"member {m.name!r}", m.weights, m.sha256) for m in manifest.members],
        verify=verify,
    )
    logger.info(
        "loaded thyroid bundle %s %s (%s, %d members)",
        manifest.name,
        manifest.version,
        manifest.intended_use,
        len(manifest.members),
    )
    return ThyroidBundle(directory=directory, manifest=manifest)


def thyroid_memory_needs(directory: Path | str) -> tuple[float, float]:
    """``(cpu_mb, gpu_mb)`` the manifest declares, read without loading any weights."""
    manifest = _read_manifest(Path(directory))
    return float(manifest.memory.cpu_mb), float(manifest.memory.gpu_mb)


def _estimate_memory(members: Mapping[str, Member]) -> dict[str, float]:
    """The manifest's ``memory`` until training measures it (:mod:`mibi_node.analyses.memory`)."""
    from mibi_node.analyses.thyroid import ThyroidAnalysis

    return estimated_memory(modules_megabytes(members.values()), ThyroidAnalysis.working_memory_mb)


def write_thyroid_bundle(
    directory: Path | str,
    manifest: Mapping[str, Any],
    members: Mapping[str, Member],
    *,
    overwrite: bool = False,
) -> ThyroidBundle:
    """Write member weights and ``bundle.json`` (last, atomically) into a folder.

    Parameters
    ----------
    directory
        Target folder; created if needed.
    manifest
        ``bundle.json`` content without the members' ``arch``/``weights``/``sha256`` (taken
        from the modules) and, optionally, without ``format_version``, ``analysis``,
        ``findings`` and ``memory`` (filled in); ``members`` entries give ``name``.
    members
        Member name -> module, one per manifest member.
    overwrite
        Replace an existing bundle in ``directory``.

    Raises
    ------
    BundleError
        The folder holds a bundle already, or the manifest is invalid.
    ValueError
        A manifest member has no module.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise BundleError(f"thyroid bundle {directory}: already exists (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(manifest)
    data.setdefault("format_version", THYROID_FORMAT_VERSION)
    data.setdefault("analysis", "thyroid")
    data.setdefault("findings", default_findings())
    data.setdefault("memory", _estimate_memory(members))
    entries = []
    for spec in data.get("members", []):
        name = spec["name"]
        if name not in members:
            raise ValueError(f'Argument "members" has no module for member {name!r}.')
        module = members[name]
        filename = f"{name}.safetensors"
        path = directory / filename
        state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
        save_file(state, str(path), metadata={"format": "pt"})
        entries.append(
            {
                "name": name,
                "arch": module.config.arch,
                "heads": module.config.heads,
                "embed_dim": module.config.embed_dim,
                "input_size": module.config.input_size,
                "weights": filename,
                "sha256": file_sha256(path),
            }
        )
    data["members"] = entries
    try:
        checked = ThyroidManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"thyroid bundle manifest: {describe_validation_error(exc)}") from None
    write_manifest(directory, checked)
    logger.info("wrote thyroid bundle %s %s to %s", checked.name, checked.version, directory)
    return ThyroidBundle(directory=directory, manifest=checked)
