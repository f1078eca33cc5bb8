"""Where results go: the PACS destinations, from the TOML file or the command line.

A destination is written ``[[dispatch.destinations]]`` in the configuration and
``--destination AE@HOST:PORT`` on the command line; both become a :class:`Destination`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from mibi_node.errors import ConfigError

__all__ = [
    "Commitment",
    "Destination",
    "DestinationTLS",
    "check_ae_title",
    "parse_destination",
]

#: How the node confirms that a destination keeps what it stored (``docs/dispatch.md``):
#: ``"storage-commitment"`` (N-ACTION, then the N-EVENT-REPORT), ``"find"`` (C-FIND of
#: every SOP Instance UID), ``"auto"`` (Storage Commitment; C-FIND where the PACS refuses
#: that SOP class; "unconfirmed" where it refuses both) or ``"none"`` (the C-STORE
#: response is the last word, as before issue 20).
Commitment = Literal["auto", "storage-commitment", "find", "none"]

_AE_TITLE_MAX = 16
_CLI_FORM = "expected AE@HOST:PORT, e.g. PACS@10.0.0.5:104 or PACS@[::1]:104"


def check_ae_title(value: str) -> str:
    """Return ``value`` without surrounding spaces if it is a valid AE title (PS3.5 6.2).

    Raises
    ------
    ValueError
        When it is empty, longer than 16 characters, or holds a backslash or a character
        outside printable ASCII.
    """
    stripped = value.strip()
    if not stripped:
        raise ValueError("an AE title must not be empty")
    if len(stripped) > _AE_TITLE_MAX:
        raise ValueError(f"an AE title has at most {_AE_TITLE_MAX} characters")
    if "\\" in stripped or any(ord(c) < 0x20 or ord(c) > 0x7E for c in stripped):
        raise ValueError("an AE title holds printable ASCII characters other than backslash")
    return stripped


class DestinationTLS(BaseModel):
    """DICOM TLS towards one PACS (PS3.15 B.1): whom to trust, and who we are.

    The PACS's certificate is always verified, against ``ca_certificates`` or, without it,
    the system's trusted authorities. ``check_hostname`` also demands that the certificate
    names ``host``; PACS certificates often name only the machine's AE title or an internal
    name, hence off by default. ``certificate`` and ``private_key`` are for PACS that
    require a client certificate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    ca_certificates: Path | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    check_hostname: bool = False

    @model_validator(mode="after")
    def _key_needs_certificate(self) -> DestinationTLS:
        if self.private_key is not None and self.certificate is None:
            raise ValueError("private_key is given without certificate")
        return self


class Destination(BaseModel):
    """A PACS that the node sends its results to with C-STORE."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ae_title: str
    host: str
    port: int = Field(ge=1, le=65535)
    name: str = ""
    tls: DestinationTLS = DestinationTLS()
    #: Off by default: a PACS that supports Storage Commitment but was never told the
    #: node's address would never report, and every result would raise an alert.
    commitment: Commitment = "none"

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        host = value.strip()
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        if not host:
            raise ValueError("host must not be empty")
        if any(c.isspace() for c in host) or "[" in host or "]" in host:
            raise ValueError("host is a host name, an IPv4 address or an IPv6 address")
        return host

    @property
    def address(self) -> str:
        """``host:port``, with an IPv6 address in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """What logs and the status page call this destination: its name or ``AE@HOST:PORT``."""
        return self.name or f"{self.ae_title}@{self.address}"


def parse_destination(text: str) -> Destination:
    """Read the command-line form ``AE@HOST:PORT`` (an IPv6 host in brackets).

    Raises
    ------
    ConfigError
        When ``text`` is not of that form, or its AE title or port is invalid; the message
        quotes ``text`` and says what is wrong.
    """
    ae_title, at, address = text.strip().rpartition("@")
    if not at or not ae_title or not address:
        raise ConfigError(f"destination {text!r}: {_CLI_FORM}")
    if address.startswith("["):
        host, bracket_colon, port_text = address[1:].partition("]:")
        if not bracket_colon:
            raise ConfigError(f"destination {text!r}: {_CLI_FORM}")
    else:
        host, colon, port_text = address.rpartition(":")
        if not colon or not host:
            raise ConfigError(f"destination {text!r}: {_CLI_FORM}")
        if ":" in host:
            raise ConfigError(
                f"destination {text!r}: write an IPv6 address in brackets, AE@[{host}]:PORT"
            )
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise ConfigError(f"destination {text!r}: port must be 1-65535, not {port_text!r}")
    try:
        return Destination(ae_title=ae_title, host=host, port=int(port_text))
    except ValidationError as exc:
        problems = "; ".join(_problem(error) for error in exc.errors())
        raise ConfigError(f"destination {text!r}: {problems}") from None


def _problem(error: Any) -> str:
    field = ".".join(str(part) for part in error["loc"])
    message = str(error["ctx"]["error"]) if error["type"] == "value_error" else error["msg"]
    if field == "ae_title":
        return f"bad AE title {error['input']!r}: {message}"
    return f"bad {field} {error['input']!r}: {message}"
