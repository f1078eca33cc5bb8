"""Ensemble recipes (``config/ensemble-*.toml``): what a bundle is made of, before training.

A recipe names the input (phases, size, normalisation), the denoise, optional
super-resolution and TTA settings, the members with their head settings, and the fusion
rule; the ``[training]`` table belongs to the training code and is passed through untouched.
The same pydantic sections describe the matching parts of a bundle's ``bundle.json``
(:mod:`mibi_node.inference.bundle`), so a recipe and the bundle made from it cannot drift
apart.
"""

from __future__ import annotations

import logging
import tomllib
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mibi_node.errors import ConfigError
from mibi_node.imaging.preprocess import Normalisation
from mibi_node.imaging.study import PHASES
from mibi_node.imaging.tta import DEFAULT_VIEWS, parse_views

__all__ = [
    "DenoiseSection",
    "FusionSection",
    "InputSection",
    "MemberSection",
    "NormalisationSection",
    "Recipe",
    "SuperresSection",
    "TTASection",
    "describe_validation_error",
    "load_recipe",
    "read_recipe",
]

logger = logging.getLogger(__name__)


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class InputSection(_Section):
    """The phases stacked as channels, and the side of the square model input."""

    channels: tuple[str, ...] = ("early", "delayed")
    size: int = Field(default=224, ge=16, le=1024)

    @field_validator("channels")
    @classmethod
    def _known_phases(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = [name for name in value if name not in PHASES]
        if not value or unknown or len(set(value)) != len(value):
            raise ValueError(f"should be distinct phases out of {list(PHASES)}, got {list(value)}")
        return value


class NormalisationSection(_Section):
    """See :class:`mibi_node.imaging.preprocess.Normalisation`."""

    method: Literal["percentile", "max", "none"] = "percentile"
    percentile: float = Field(default=99.5, gt=0, le=100)
    scope: Literal["channel", "study"] = "channel"
    clip: float | None = Field(default=1.5, gt=0)
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    @model_validator(mode="after")
    def _consistent(self) -> NormalisationSection:
        self.to_normalisation()
        return self

    def to_normalisation(self) -> Normalisation:
        """The imaging-side dataclass."""
        return Normalisation(**self.model_dump())


class DenoiseSection(_Section):
    """Adaptive median filter settings; ``enabled = false`` skips it."""

    enabled: bool = True
    smax: int = Field(default=7, ge=3, le=31)

    @field_validator("smax")
    @classmethod
    def _odd(cls, value: int) -> int:
        if value % 2 == 0:
            raise ValueError(f"should be odd, got {value}")
        return value


class SuperresSection(_Section):
    """The optional super-resolution data enhancement (claims 4 and 6); off by default.

    When enabled, the SRGAN generator in ``generator`` (a ``superres.pt`` file written by
    :func:`mibi_node.imaging.superres.save_superres`, e.g. by ``python -m training.gan
    mibi``) doubles every phase image's matrix after denoising and before the model input
    is made, in training and in use alike; the bundle carries a copy of it.
    """

    enabled: bool = False
    generator: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _needs_generator(self) -> SuperresSection:
        if self.enabled and self.generator is None:
            raise ValueError("enabled = true needs generator = PATH of a superres.pt file")
        return self


class TTASection(_Section):
    """Test-time views (see :mod:`mibi_node.imaging.tta`)."""

    views: tuple[str, ...] = DEFAULT_VIEWS

    @field_validator("views")
    @classmethod
    def _parse(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        parse_views(list(value))
        return value


class MemberSection(_Section):
    """One member as a recipe declares it."""

    name: str = ""
    arch: str
    heads: int = Field(default=8, ge=1)
    embed_dim: int = Field(default=512, ge=8)

    @model_validator(mode="after")
    def _check(self) -> MemberSection:
        from mibi_node.inference.members import is_member, list_members

        if not is_member(self.arch):
            raise ValueError(f"arch {self.arch!r} is not a registered member ({list_members()})")
        if self.embed_dim % self.heads:
            raise ValueError(f"heads ({self.heads}) should divide embed_dim ({self.embed_dim})")
        if not self.name:
            object.__setattr__(self, "name", self.arch)
        return self


class FusionSection(_Section):
    """Fusion method, the patent's k_i (uniform when omitted) and the temperature."""

    method: Literal["soft", "majority"] = "soft"
    weights: tuple[float, ...] | None = None
    temperature: float = Field(default=1.0, gt=0)

    @model_validator(mode="after")
    def _simplex(self) -> FusionSection:
        if self.weights is not None:
            from mibi_node.inference.ensemble import Fusion

            Fusion(self.method, self.weights, self.temperature)
        return self


class Recipe(_Section):
    """A parsed ``config/ensemble-*.toml``."""

    name: str = Field(min_length=1)
    version: str = "0.0.0"
    intended_use: Literal["demonstration", "clinical"] = "demonstration"
    description: str = ""
    input: InputSection = InputSection()
    normalisation: NormalisationSection = NormalisationSection()
    denoise: DenoiseSection = DenoiseSection()
    superres: SuperresSection = SuperresSection()
    tta: TTASection = TTASection()
    members: tuple[MemberSection, ...] = Field(min_length=1)
    fusion: FusionSection = FusionSection()
    training: dict[str, Any] = {}

    @model_validator(mode="after")
    def _check(self) -> Recipe:
        names = [member.name for member in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names should be distinct, got {names}")
        weights = self.fusion.weights
        if weights is not None and len(weights) != len(self.members):
            raise ValueError(
                f"fusion.weights has {len(weights)} entries for {len(self.members)} members"
            )
        if len(self.normalisation.mean) not in (1, len(self.input.channels)):
            raise ValueError("normalisation.mean/std should have 1 entry or one per channel")
        return self

    def fusion_weights(self) -> tuple[float, ...]:
        """The k_i, uniform when the recipe gives none."""
        if self.fusion.weights is not None:
            return self.fusion.weights
        return (1.0 / len(self.members),) * len(self.members)


def describe_validation_error(error: ValidationError) -> str:
    """One sentence naming the first offending key (``members.0.arch: ...``)."""
    first = error.errors()[0]
    key = ".".join(str(part) for part in first["loc"]) or "(top level)"
    message = str(first["msg"]).removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    return f"key {key!r}: {message}{more}"


def load_recipe(path: Path | str) -> Recipe:
    """Read and validate an ensemble recipe.

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names the file and key.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"recipe {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"recipe {path}: cannot read it ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"recipe {path}: not valid TOML ({exc})") from None
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"recipe {path}: {describe_validation_error(exc)}") from None


_Recipe = TypeVar("_Recipe", bound=BaseModel)


def read_recipe(path: Path | str, model: type[_Recipe], what: str) -> _Recipe:
    """Read a TOML recipe and validate it as ``model`` (the analyses' own recipes).

    Raises
    ------
    ConfigError
        The file is missing, not TOML, or a key is invalid; the message names ``what``
        ("spine recipe"), the file and the key.
    """
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{what} {path}: {describe_validation_error(exc)}") from None
