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
    ``{"cpu_mb": ..., "gpu_mb": ...}``: what the bundle needs loaded (MONAI's
    ``required_memory``-style hint); without it the node estimates from the weight files.
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
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from mibi_node.analyses.base import MemoryNeeds
from mibi_node.errors import BundleError

__all__ = [
    "MANIFEST_NAMES",
    "bundle_analysis",
    "file_sha256",
    "manifest_memory",
    "read_manifest",
    "weights_megabytes",
]

_Manifest = TypeVar("_Manifest", bound=BaseModel)

#: The manifest file names the node looks for, in order.
MANIFEST_NAMES = ("bundle.json",)


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
        return MemoryNeeds(
            cpu_mb=float(memory.get("cpu_mb", 0.0)),
            gpu_mb=float(memory.get("gpu_mb", 0.0)),
            source="bundle manifest",
        )
    except (TypeError, ValueError):
        return None


def weights_megabytes(bundle: Path) -> float:
    """Size of the bundle's weight files in MiB (what loading them costs at most in fp32)."""
    return sum(path.stat().st_size for path in Path(bundle).glob("*.safetensors")) / 2**20


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
