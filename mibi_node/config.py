"""One immutable, typed configuration, read from TOML and validated once at load.

Every key of ``config/mibi-node.toml`` is a field here; an invalid value fails at start-up
with the TOML key that is wrong, never later in the middle of a C-STORE.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from mibi_node.errors import ConfigError

__all__ = [
    "AssemblyConfig",
    "Config",
    "DatabaseConfig",
    "LoggingConfig",
    "NodeConfig",
    "PeerConfig",
    "ReceptionConfig",
    "StorageConfig",
    "TLSConfig",
    "load_config",
    "DEFAULT_CONFIG_PATH",
]

#: Where ``mibi-node serve`` looks when no ``--config`` is given.
DEFAULT_CONFIG_PATH = Path("config/mibi-node.toml")

_AE_TITLE_MAX = 16


def _check_ae_title(value: str) -> str:
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(stripped) > _AE_TITLE_MAX:
        raise ValueError(f"an AE title has at most {_AE_TITLE_MAX} characters")
    if "\\" in stripped or any(ord(c) < 0x20 or ord(c) > 0x7E for c in stripped):
        raise ValueError("an AE title holds printable ASCII characters other than backslash")
    return stripped


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NodeConfig(_Section):
    """Who the node is on the network and where it keeps its data."""

    ae_title: str = "MIBI_NODE"
    host: str = "0.0.0.0"
    port: int = Field(default=11112, ge=1, le=65535)
    data_dir: Path = Path("var")

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class PeerConfig(_Section):
    """A calling AE title allowed to associate, optionally only from some addresses."""

    ae_title: str
    hosts: tuple[str, ...] = ()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return _check_ae_title(value)


class TLSConfig(_Section):
    """DICOM TLS for the Storage SCP (PS3.15 B.1, the BCP 195 profiles)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False


class ReceptionConfig(_Section):
    """Associations, presentation contexts and the peers allowed to send."""

    allowed_peers: tuple[PeerConfig, ...] = ()
    require_called_ae_title: bool = True
    accept_all_storage: bool = False
    max_associations: int = Field(default=16, ge=1, le=1000)
    acceptors: int = Field(default=2, ge=1, le=64)
    max_pdu_size: int = Field(default=262144, ge=0)
    acse_timeout: float = Field(default=30.0, gt=0)
    dimse_timeout: float = Field(default=60.0, gt=0)
    network_timeout: float = Field(default=60.0, gt=0)
    tls: TLSConfig = TLSConfig()


class StorageConfig(_Section):
    """The file store and its safety margin."""

    min_free_mb: int = Field(default=500, ge=0)


class DatabaseConfig(_Section):
    """The database; empty ``url`` means SQLite at ``<data_dir>/mibi-node.sqlite3``."""

    url: SecretStr = SecretStr("")


class AssemblyConfig(_Section):
    """When a study counts as complete."""

    quiet_seconds: float = Field(default=30.0, gt=0)
    sweep_seconds: float = Field(default=1.0, gt=0)


class LoggingConfig(_Section):
    """Log level for the console and the journal."""

    level: str = "INFO"

    @field_validator("level")
    @classmethod
    def _level(cls, value: str) -> str:
        upper = value.upper()
        if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("level is one of DEBUG, INFO, WARNING, ERROR")
        return upper


class Config(_Section):
    """The whole resolved configuration of a node."""

    node: NodeConfig = NodeConfig()
    reception: ReceptionConfig = ReceptionConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    assembly: AssemblyConfig = AssemblyConfig()
    logging: LoggingConfig = LoggingConfig()

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to the SQLite file under the data folder."""
        url = self.database.url.get_secret_value()
        if url:
            return url
        return f"sqlite:///{(self.node.data_dir / 'mibi-node.sqlite3').resolve()}"

    @property
    def store_dir(self) -> Path:
        """Folder of the received instance files."""
        return self.node.data_dir / "store"

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data with secrets replaced by ``********``."""
        data = self.model_dump(mode="json")
        if self.database.url.get_secret_value():
            data["database"]["url"] = "********"
        return data


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = []
    for error in exc.errors():
        key = ".".join(str(part) for part in error["loc"]) or "(top level)"
        message = error["msg"]
        if error["type"] == "extra_forbidden":
            message = "unknown key"
        lines.append(f"{source}: {key}: {message}")
    return "\n".join(lines)


def load_config(
    path: Path | str | None = None, overrides: dict[str, dict[str, Any]] | None = None
) -> Config:
    """Read, merge and validate the configuration.

    Parameters
    ----------
    path
        TOML file; ``None`` uses the built-in defaults only.
    overrides
        Section -> key -> value, applied over the file (the CLI flags).

    Raises
    ------
    ConfigError
        The file cannot be read or parsed, or a key is unknown or invalid; the message names
        the file and the key.
    """
    raw: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        try:
            with open(path, "rb") as handle:
                raw = tomllib.load(handle)
        except FileNotFoundError:
            raise ConfigError(f"{source}: no such configuration file") from None
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    for section, values in (overrides or {}).items():
        merged = dict(raw.get(section, {}))
        merged.update({key: value for key, value in values.items() if value is not None})
        raw[section] = merged
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(exc, source)) from None
