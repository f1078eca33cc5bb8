"""Model bundles: a folder with ``bundle.json`` and one ``.safetensors`` file per member.

``bundle.json`` says everything needed to use the weights the way they were trained: format
version, name and version, intended use (``demonstration`` or ``clinical``), the five classes
with their SNOMED CT codes, the input channels and size, normalisation, denoise and TTA
settings, every member (architecture, head settings, weight file and its sha256), the fusion
method with its weights k_i and temperature, and provenance (data fingerprint, training
command, package version). A bundle may carry the optional super-resolution step: a
``superres`` entry and the SRGAN generator ``superres.pt`` with its sha256; a bundle without
the entry is read and written exactly as before. :func:`load_bundle` verifies the class
list, every hash and every tensor shape, and fails with one
:class:`~mibi_node.errors.BundleError` sentence naming the file and what is wrong.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import shlex
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

import mibi_node
from mibi_node.analyses.bundles import MemoryHint
from mibi_node.errors import BundleError, ConfigError
from mibi_node.imaging.preprocess import Normalisation
from mibi_node.imaging.tta import TTAView, parse_views
from mibi_node.inference.ensemble import Fusion
from mibi_node.inference.recipe import (
    DenoiseSection,
    FusionSection,
    InputSection,
    NormalisationSection,
    TTASection,
    describe_validation_error,
    load_recipe,
)

if TYPE_CHECKING:
    import torch

    from mibi_node.inference.members import Member, MemberConfig

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "MIBI_CLASSES",
    "Bundle",
    "BundleManifest",
    "ClassEntry",
    "MemberEntry",
    "Provenance",
    "SuperresEntry",
    "init_random_bundle",
    "load_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
SUPERRES_NAME = "superres.pt"


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ClassEntry(_Section):
    """One output class: its key, SNOMED CT code and display name."""

    key: str
    code: str
    scheme: str = "SCT"
    display: str


#: The patent's five classes (claim 7), in output order.
MIBI_CLASSES: tuple[ClassEntry, ...] = (
    ClassEntry(key="normal", code="17621005", display="Normal parathyroid"),
    ClassEntry(key="adenoma", code="1187375007", display="Parathyroid adenoma"),
    ClassEntry(key="hyperplasia", code="76197007", display="Parathyroid hyperplasia"),
    ClassEntry(key="carcinoma", code="1187425009", display="Parathyroid carcinoma"),
    ClassEntry(key="cyst", code="367643001", display="Parathyroid cyst"),
)


class MemberEntry(_Section):
    """One member in ``bundle.json``: how to rebuild it and which file holds its weights."""

    name: str = Field(min_length=1)
    arch: str
    heads: int = Field(ge=1)
    embed_dim: int = Field(ge=8)
    input_size: int = Field(ge=16)
    weights: str = Field(pattern=r"^[A-Za-z0-9_.\-]+\.safetensors$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class SuperresEntry(_Section):
    """The optional super-resolution step in ``bundle.json``: its generator file and hash."""

    enabled: bool = True
    weights: str = Field(default=SUPERRES_NAME, pattern=r"^[A-Za-z0-9_.\-]+\.pt$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scale: Literal[2] = 2


class Provenance(_Section):
    """Where the weights came from."""

    created: str
    package_version: str
    training_command: str
    data_fingerprint: str | None = None
    seed: int | None = None
    notes: str = ""


class BundleManifest(_Section):
    """The parsed ``bundle.json``."""

    format_version: int
    name: str = Field(min_length=1)
    version: str = Field(min_length=1)
    intended_use: Literal["demonstration", "clinical"]
    description: str = ""
    classes: tuple[ClassEntry, ...]
    input: InputSection
    normalisation: NormalisationSection
    denoise: DenoiseSection
    tta: TTASection
    members: tuple[MemberEntry, ...] = Field(min_length=1)
    fusion: FusionSection
    provenance: Provenance
    superres: SuperresEntry | None = None
    #: Measured when training writes the bundle; absent: estimated from the weight files.
    memory: MemoryHint | None = None

    @model_validator(mode="after")
    def _check(self) -> BundleManifest:
        if self.format_version != BUNDLE_FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported "
                f"(this mibi-node reads {BUNDLE_FORMAT_VERSION})"
            )
        names = [member.name for member in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names should be distinct, got {names}")
        if self.fusion.weights is None or len(self.fusion.weights) != len(self.members):
            raise ValueError("fusion.weights should hold one weight per member")
        return self


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    """A verified model bundle on disk; build its members with :meth:`build_member`.

    Attributes
    ----------
    directory
        The bundle folder.
    manifest
        The parsed and checked ``bundle.json``.
    """

    directory: Path
    manifest: BundleManifest

    @property
    def name(self) -> str:
        """Bundle name, e.g. ``"mibi-demo"``."""
        return self.manifest.name

    @property
    def version(self) -> str:
        """Bundle version (the SR's algorithm version)."""
        return self.manifest.version

    @property
    def intended_use(self) -> str:
        """``"demonstration"`` or ``"clinical"``."""
        return self.manifest.intended_use

    @property
    def classes(self) -> tuple[ClassEntry, ...]:
        """Output classes in order."""
        return self.manifest.classes

    @property
    def class_keys(self) -> tuple[str, ...]:
        """Class keys in output order."""
        return tuple(entry.key for entry in self.manifest.classes)

    @property
    def channels(self) -> tuple[str, ...]:
        """Phases stacked as input channels."""
        return self.manifest.input.channels

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
        """Adaptive median filter ``smax``, ``None`` when the bundle skips denoising."""
        return self.manifest.denoise.smax if self.manifest.denoise.enabled else None

    @property
    def superres_path(self) -> Path | None:
        """The super-resolution generator file, ``None`` when the bundle has no such step."""
        entry = self.manifest.superres
        if entry is None or not entry.enabled:
            return None
        return self.directory / entry.weights

    @property
    def views(self) -> tuple[TTAView, ...]:
        """Test-time views."""
        return parse_views(list(self.manifest.tta.views))

    @property
    def fusion(self) -> Fusion:
        """Fusion rule with one weight per member."""
        section = self.manifest.fusion
        assert section.weights is not None  # checked by BundleManifest
        return Fusion(section.method, section.weights, section.temperature)

    @property
    def member_names(self) -> tuple[str, ...]:
        """Member names in fusion order."""
        return tuple(member.name for member in self.manifest.members)

    def member_config(self, name: str) -> MemberConfig:
        """How to rebuild member ``name``."""
        from mibi_node.inference.members import MemberConfig

        entry = self._entry(name)
        return MemberConfig(
            arch=entry.arch,
            num_classes=len(self.classes),
            in_chans=len(self.channels),
            heads=entry.heads,
            embed_dim=entry.embed_dim,
            input_size=entry.input_size,
        )

    def _entry(self, name: str) -> MemberEntry:
        for entry in self.manifest.members:
            if entry.name == name:
                return entry
        raise KeyError(f"bundle {self.name} has no member {name!r}")

    def build_member(self, name: str, device: torch.device | str = "cpu") -> Member:
        """Build member ``name``, load its weights onto ``device`` and put it in eval mode."""
        import torch
        from safetensors.torch import load_file

        from mibi_node.inference.members import create_member

        config = self.member_config(name)
        with torch.device("meta"):
            member = _create(config, create_member)
        path = self.directory / self._entry(name).weights
        state = load_file(str(path), device=str(device))
        member.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in (*member.parameters(), *member.buffers())):
            # a non-persistent buffer is not in the file: build for real, then load
            member = _create(config, create_member).to(device)
            member.load_state_dict(state, strict=True)
        return member.eval()


def _create(config: MemberConfig, factory: Any) -> Member:
    member: Member = factory(
        config.arch,
        num_classes=config.num_classes,
        in_chans=config.in_chans,
        heads=config.heads,
        embed_dim=config.embed_dim,
        input_size=config.input_size,
    )
    return member


def _check_shapes(bundle: Bundle) -> None:
    """Compare every weight file's tensors with the member it must fill (built on meta)."""
    import torch
    from safetensors import safe_open

    from mibi_node.inference.members import create_member

    for entry in bundle.manifest.members:
        path = bundle.directory / entry.weights
        with torch.device("meta"):
            expected = _create(bundle.member_config(entry.name), create_member).state_dict()
        try:
            with safe_open(str(path), framework="pt") as handle:  # type: ignore[no-untyped-call]
                found = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own errors for corrupt headers
            raise BundleError(f"{path}: not a readable safetensors file ({exc})") from None
        missing = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        if missing or extra:
            what = f"lacks {missing[:3]}" if missing else f"has unexpected {extra[:3]}"
            raise BundleError(
                f"{path}: {what} tensors for a {entry.arch} member "
                f"({len(missing)} missing, {len(extra)} unexpected)"
            )
        for key, tensor in expected.items():
            if tuple(tensor.shape) != found[key]:
                raise BundleError(
                    f"{path}: tensor {key!r} has shape {found[key]} but the {entry.arch} member "
                    f"described in {MANIFEST_NAME} needs {tuple(tensor.shape)}"
                )


def load_bundle(directory: Path | str, *, verify: bool = True) -> Bundle:
    """Read a bundle folder and check it.

    Parameters
    ----------
    directory
        The bundle folder holding ``bundle.json``.
    verify
        Check every weight file's sha256 and tensor shapes (skip only when the caller has just
        written the bundle).

    Returns
    -------
    Bundle
        The checked bundle.

    Raises
    ------
    BundleError
        The folder or manifest is missing, invalid or inconsistent, the class list is not the
        five MIBI classes, or a weight file is missing, altered or of the wrong shapes.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise BundleError(f"model bundle {directory}: no such folder")
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"model bundle {directory}: it has no {MANIFEST_NAME}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"{manifest_path}: cannot read it ({exc})") from None
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path}: not valid JSON ({exc})") from None
    try:
        manifest = BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"{manifest_path}: {describe_validation_error(exc)}") from None

    keys = [entry.key for entry in manifest.classes]
    expected = [entry.key for entry in MIBI_CLASSES]
    if keys != expected:
        raise BundleError(f"{manifest_path}: classes are {keys}, this analysis needs {expected}")
    for entry, known in zip(manifest.classes, MIBI_CLASSES, strict=True):
        if (entry.scheme, entry.code) != (known.scheme, known.code):
            raise BundleError(
                f"{manifest_path}: class {entry.key!r} is coded {entry.scheme} {entry.code}, "
                f"expected {known.scheme} {known.code}"
            )

    bundle = Bundle(directory=directory, manifest=manifest)
    for member in manifest.members:
        path = directory / member.weights
        if not path.is_file():
            raise BundleError(f"{path}: weight file of member {member.name!r} is missing")
        if verify:
            digest = _sha256(path)
            if digest != member.sha256:
                raise BundleError(
                    f"{path}: sha256 is {digest[:12]}... but {MANIFEST_NAME} says "
                    f"{member.sha256[:12]}... (file altered or replaced)"
                )
    superres = manifest.superres
    if superres is not None and superres.enabled:
        path = directory / superres.weights
        if not path.is_file():
            raise BundleError(f"{path}: super-resolution generator file is missing")
        if verify:
            digest = _sha256(path)
            if digest != superres.sha256:
                raise BundleError(
                    f"{path}: sha256 is {digest[:12]}... but {MANIFEST_NAME} says "
                    f"{superres.sha256[:12]}... (file altered or replaced)"
                )
    if verify:
        _check_shapes(bundle)
        if bundle.superres_path is not None:
            from mibi_node.imaging.superres import load_superres

            load_superres(bundle.superres_path)
    logger.info(
        "loaded bundle %s %s (%s, %d members)",
        manifest.name,
        manifest.version,
        manifest.intended_use,
        len(manifest.members),
    )
    return bundle


def write_bundle(
    directory: Path | str,
    manifest: Mapping[str, Any],
    members: Mapping[str, Member],
    *,
    overwrite: bool = False,
    superres: Path | str | None = None,
) -> Bundle:
    """Write member weights and ``bundle.json`` (last, atomically) into a folder.

    Parameters
    ----------
    directory
        Target folder; created if needed.
    manifest
        ``bundle.json`` content without the members' ``weights``/``sha256`` and without
        ``format_version`` and ``classes`` (both filled in); ``members`` entries give ``name``
        and optionally ``heads``/``embed_dim``/``input_size`` (taken from the module otherwise).
    members
        Member name -> module, one per manifest member.
    overwrite
        Replace an existing bundle in ``directory``.
    superres
        A super-resolution generator file (``superres.pt``) to carry: it is copied into the
        bundle and the manifest gets its ``superres`` entry. ``None`` writes no entry.

    Returns
    -------
    Bundle
        The written bundle, read back without re-hashing.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    if (directory / MANIFEST_NAME).exists() and not overwrite:
        raise BundleError(f"model bundle {directory}: already exists (pass overwrite)")
    directory.mkdir(parents=True, exist_ok=True)
    data = dict(manifest)
    data.setdefault("format_version", BUNDLE_FORMAT_VERSION)
    data.setdefault("classes", [entry.model_dump() for entry in MIBI_CLASSES])
    entries = []
    for spec in data.get("members", []):
        name = spec["name"]
        if name not in members:
            raise ValueError(f'Argument "members" has no module for member {name!r}.')
        module = members[name]
        filename = f"{name}.safetensors"
        path = directory / filename
        state = {
            key: value.detach().contiguous().cpu() for key, value in module.state_dict().items()
        }
        # one metadata key only: safetensors writes several in random order, and the same
        # weights must give the same bytes (and sha256)
        save_file(state, str(path), metadata={"format": "pt"})
        path.chmod(0o666 & ~_umask())
        entries.append(
            {
                "name": name,
                "arch": module.config.arch,
                "heads": module.config.heads,
                "embed_dim": module.config.embed_dim,
                "input_size": module.config.input_size,
                "weights": filename,
                "sha256": _sha256(path),
            }
        )
    data["members"] = entries
    data.pop("superres", None)
    if superres is not None:
        source = Path(superres)
        if not source.is_file():
            raise BundleError(f"{source}: super-resolution generator file is missing")
        target = directory / SUPERRES_NAME
        if source.resolve() != target.resolve():
            shutil.copyfile(source, target)
        target.chmod(0o666 & ~_umask())
        data["superres"] = {"enabled": True, "weights": SUPERRES_NAME, "sha256": _sha256(target)}
    else:
        (directory / SUPERRES_NAME).unlink(missing_ok=True)
    try:
        checked = BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise BundleError(f"bundle manifest: {describe_validation_error(exc)}") from None
    tmp = directory / f".{MANIFEST_NAME}.tmp"
    # a bundle without the optional step or a memory figure keeps the manifest of before
    # (no "superres": null, no "memory": null)
    leave_out = {"superres"} if superres is None else set()
    if checked.memory is None:
        leave_out.add("memory")
    content = checked.model_dump(mode="json", exclude=leave_out or None)
    tmp.write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, directory / MANIFEST_NAME)
    logger.info("wrote bundle %s %s to %s", checked.name, checked.version, directory)
    return Bundle(directory=directory, manifest=checked)


def init_random_bundle(
    recipe_path: Path | str,
    out_dir: Path | str,
    seed: int = 0,
    *,
    overwrite: bool = False,
) -> Bundle:
    """Make a bundle of randomly initialised members from a recipe (intended use
    ``demonstration``): the whole pipeline runs, the predictions mean nothing.

    Parameters
    ----------
    recipe_path
        An ensemble recipe, e.g. ``config/ensemble-demo.toml``.
    out_dir
        Folder to write the bundle into.
    seed
        Seed of the random initialisation; the same seed gives identical weights.
    overwrite
        Replace an existing bundle in ``out_dir``.

    Raises
    ------
    BundleError
        The recipe cannot be read or the bundle cannot be written.
    """
    import torch

    from mibi_node.inference.members import create_member

    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f'Argument "seed" should be an integer, not {type(seed).__name__}.')
    try:
        recipe = load_recipe(recipe_path)
    except ConfigError as exc:
        raise BundleError(str(exc)) from None
    generator_state = torch.random.get_rng_state()
    modules: dict[str, Member] = {}
    try:
        for index, spec in enumerate(recipe.members):
            torch.manual_seed(seed * 1000 + index)
            modules[spec.name] = create_member(
                spec.arch,
                num_classes=len(MIBI_CLASSES),
                in_chans=len(recipe.input.channels),
                heads=spec.heads,
                embed_dim=spec.embed_dim,
                input_size=recipe.input.size,
            )
    finally:
        torch.random.set_rng_state(generator_state)
    command = shlex.join(
        ["mibi-node", "init-bundle", str(recipe_path), "--out", str(out_dir), "--seed", str(seed)]
    )
    manifest = {
        "name": recipe.name,
        "version": recipe.version,
        "intended_use": "demonstration",
        "description": recipe.description or "randomly initialised members, for demonstration",
        "input": recipe.input.model_dump(),
        "normalisation": recipe.normalisation.model_dump(),
        "denoise": recipe.denoise.model_dump(),
        "tta": recipe.tta.model_dump(),
        "members": [{"name": spec.name} for spec in recipe.members],
        "fusion": {**recipe.fusion.model_dump(), "weights": list(recipe.fusion_weights())},
        "provenance": {
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "package_version": mibi_node.__version__,
            "training_command": command,
            "data_fingerprint": None,
            "seed": seed,
            "notes": "random initialisation, not trained",
        },
    }
    return write_bundle(out_dir, manifest, modules, overwrite=overwrite)
