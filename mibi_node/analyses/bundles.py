"""What every analysis' bundle shares: the metadata kept from the MONAI Bundle convention.

Each analysis has its own manifest (the parathyroid ensemble's ``bundle.json`` is described
in docs/analysis.md), but the node reads the same few keys from all of them, as a MONAI
bundle's ``configs/metadata.json`` carries them:

``analysis``
    Which analysis the bundle is for (a MIBI bundle made before analyses were units has
    none and means ``parathyroid``).
``intended_use``
    ``demonstration`` or ``clinical``; the SR says which.
``memory``
    ``{"cpu_mb": ..., "gpu_mb": ..., "measured_on": ...}``: what the bundle adds to a worker
    loaded and at the peak of a batch, above the worker's own baseline (MONAI's
    ``required_memory``-style hint). Training measures it in a fresh interpreter
    (:func:`mibi_node.analyses.memory.measure_memory`) and says how in ``measured_on``; a
    figure without ``measured_on`` is an estimate. Without the key the node estimates
    from the weight files (:meth:`~mibi_node.analyses.base.Analysis.memory_needs`).
``evaluation``
    Version -> metrics measured on the evaluation data (MONAI's versioned ``changelog`` and
    performance figures, together).
``changelog``
    Version -> what changed.

What is left out of MONAI's convention, and why: the ``configs/inference.json`` programme
(the runner is the analysis' code, versioned with the node), ``network_data_format`` (each
analysis' manifest names its inputs and outputs in its own terms) and ``models/model.pt``
(weights are safetensors, one file per member, each with its sha256 in the manifest).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    import torch
    from torch import nn

from mibi_node.analyses.base import WEIGHTS_FACTOR, MemoryNeeds
from mibi_node.errors import BundleError

__all__ = [
    "MANIFEST_NAMES",
    "BundleIdentity",
    "MemoryHint",
    "bundle_analysis",
    "estimated_memory",
    "file_sha256",
    "manifest_memory",
    "read_manifest",
    "record_memory",
    "weights_megabytes",
]

_Manifest = TypeVar("_Manifest", bound=BaseModel)


class BundleIdentity:
    """``name``, ``version`` and ``intended_use`` of a loaded bundle, from its manifest.

    A mixin for the analyses' bundle dataclasses, each of which has a parsed ``manifest``.
    """

    manifest: Any

    @property
    def name(self) -> str:
        """Bundle name."""
        return str(self.manifest.name)

    @property
    def version(self) -> str:
        """Bundle version."""
        return str(self.manifest.version)

    @property
    def intended_use(self) -> str:
        """``demonstration`` or ``clinical``."""
        return str(self.manifest.intended_use)


#: The manifest file names the node looks for, in order.
MANIFEST_NAMES = ("bundle.json",)


class MemoryHint(BaseModel):
    """A manifest's ``memory``: what the loaded bundle adds to a worker, in MiB."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    cpu_mb: float = Field(ge=0)
    gpu_mb: float = Field(default=0.0, ge=0)
    #: How and where ``cpu_mb`` was measured; absent for an estimate.
    measured_on: str | None = None


def _manifest(bundle: Path) -> dict[str, object]:
    for name in MANIFEST_NAMES:
        path = Path(bundle) / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                return {}
            return data if isinstance(data, dict) else {}
    return {}


def bundle_analysis(bundle: Path) -> str | None:
    """The analysis a bundle folder is for (``parathyroid`` for older MIBI bundles)."""
    data = _manifest(bundle)
    if not data:
        return None
    return str(data.get("analysis") or "parathyroid")


def manifest_memory(bundle: Path) -> MemoryNeeds | None:
    """The memory the manifest declares, or ``None`` when it declares none."""
    memory = _manifest(bundle).get("memory")
    if not isinstance(memory, dict):
        return None
    try:
        hint = MemoryHint.model_validate(memory)
    except ValidationError:
        return None
    return MemoryNeeds(
        cpu_mb=hint.cpu_mb,
        gpu_mb=hint.gpu_mb,
        source="measured, bundle manifest" if hint.measured_on else "bundle manifest, estimated",
    )


def weights_megabytes(bundle: Path) -> float:
    """Size of the bundle's weight files in MiB (their fp32 size when written in fp32)."""
    return sum(path.stat().st_size for path in Path(bundle).glob("*.safetensors")) / 2**20


def estimated_memory(weights_mb: float, working_mb: float) -> dict[str, float]:
    """A manifest ``memory`` estimated from the weights, for a bundle not measured yet.

    ``WEIGHTS_FACTOR`` x the weights plus the analysis' working memory, on the CPU; the
    weights plus the working memory on a GPU (not measured).
    """
    return {
        "cpu_mb": round(WEIGHTS_FACTOR * weights_mb + working_mb, 1),
        "gpu_mb": round(weights_mb + working_mb, 1),
    }


def record_memory(bundle: Path, memory: dict[str, Any]) -> None:
    """Replace the ``memory`` of ``bundle``'s manifest (atomically; nothing else changes).

    Raises
    ------
    BundleError
        When the manifest cannot be read or ``memory`` is not a valid entry.
    """
    try:
        MemoryHint.model_validate(memory)
    except ValidationError as exc:
        raise BundleError(f"bundle memory entry {memory!r} is not valid: {exc}") from None
    path = Path(bundle) / MANIFEST_NAMES[0]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path}: cannot read it ({exc})") from None
    data["memory"] = dict(memory)
    write_manifest(Path(bundle), data)


def file_sha256(path: Path) -> str:
    """The sha256 of a weight file, read in 1 MiB chunks (the manifests record it)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(directory: Path, model: type[_Manifest], what: str) -> _Manifest:
    """Read and validate ``directory/bundle.json`` as ``model``.

    Raises
    ------
    BundleError
        The folder or the file is missing, unreadable, not JSON or not a valid manifest;
        the message names the file (``what`` names the bundle kind, e.g. "spine bundle").
    """
    from mibi_node.inference.recipe import describe_validation_error

    path = directory / MANIFEST_NAMES[0]
    if not directory.is_dir():
        raise BundleError(f"{what} {directory}: no such folder")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{what} {directory}: it has no {path.name}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path}: not valid JSON ({exc})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{path}: {describe_validation_error(exc)}") from None


def check_weight_files(
    directory: Path, files: Iterable[tuple[str, str, str]], *, verify: bool = True
) -> None:
    """Check that each weight file of a manifest is there and, with ``verify``, unaltered.

    ``files`` holds ``(what, file name, sha256)`` per file; ``what`` names it in the
    message ("stage1", "the keypoints network", "member 'resnet10t'").

    Raises
    ------
    BundleError
        A file is missing, or its sha256 is not the manifest's; the message names the file.
    """
    for what, name, expected in files:
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{path}: weight file of {what} is missing")
        if verify:
            digest = file_sha256(path)
            if digest != expected:
                raise BundleError(
                    f"{path}: sha256 is {digest[:12]}... but {MANIFEST_NAMES[0]} says "
                    f"{expected[:12]}... (file altered or replaced)"
                )


def save_weights(module: nn.Module, path: Path) -> str:
    """Write ``module``'s state as a safetensors file; returns its sha256 for the manifest."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    save_file(state, str(path), metadata={"format": "pt"})
    return file_sha256(path)


def load_weights(module: nn.Module, path: Path, arch: str, device: torch.device | str) -> None:
    """Load a safetensors file into ``module`` (strictly) on ``device``.

    Raises
    ------
    BundleError
        The file is not readable safetensors, or does not fit the ``arch`` network.
    """
    from safetensors.torch import load_file

    try:
        state = load_file(str(path), device=str(device))
    except Exception as exc:  # safetensors raises its own errors for corrupt headers
        raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BundleError(
            f"{path}: does not fit the {arch} network described in {MANIFEST_NAMES[0]} ({first})"
        ) from None


def modules_megabytes(modules: Iterable[nn.Module]) -> float:
    """The size of the modules' state (weights and buffers) in MiB, for a memory estimate."""
    return (
        sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values()) / 2**20
    )


def write_manifest(directory: Path, manifest: BaseModel | Mapping[str, Any]) -> None:
    """Write ``directory/bundle.json`` atomically (a temporary file, then a rename), so a
    worker never reads half a manifest."""
    data = manifest.model_dump(mode="json") if isinstance(manifest, BaseModel) else manifest
    path = directory / MANIFEST_NAMES[0]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def record_evaluation(
    directory: Path,
    model: type[BaseModel],
    what: str,
    metrics: Mapping[str, Any],
    *,
    split: str,
    version: str | None,
) -> None:
    """Store figures under ``evaluation[version][split]`` of a manifest read as ``model``.

    Figures of the other splits of that version are kept; the weights are left alone (their
    hashes still hold) and the manifest is rewritten atomically. ``version`` defaults to the
    bundle's own version; ``what`` names the bundle kind in messages.

    Raises
    ------
    BundleError
        The manifest cannot be read, or the figures are not JSON.
    """
    data = read_manifest(directory, model, what).model_dump(mode="json")
    key = version or str(data["version"])
    evaluation = dict(data.get("evaluation") or {})
    evaluation[key] = {**dict(evaluation.get(key) or {}), split: dict(metrics)}
    data["evaluation"] = evaluation
    try:
        checked = model.model_validate(data)
        json.dumps(checked.model_dump(mode="json"))
    except (TypeError, ValueError) as exc:
        raise BundleError(
            f"{directory / MANIFEST_NAMES[0]}: cannot store the figures ({exc})"
        ) from None
    write_manifest(directory, checked)
