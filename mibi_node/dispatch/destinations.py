"""Where results go: the PACS destinations, from the TOML file or the command line.

A destination is written ``[[dispatch.destinations]]`` in the configuration and
``--destination AE@HOST:PORT`` on the command line; both become a :class:`Destination`
(C-STORE). ``kind = "dicomweb"`` makes a :class:`DicomwebDestination` (STOW-RS) instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from mibi_node.errors import ConfigError

__all__ = [
    "AnyDestination",
    "Commitment",
    "DicomwebDestination",
    "Destination",
    "DestinationTLS",
    "check_ae_title",
    "destination_from_row",
    "parse_destination",
]

#: How the node confirms that a destination keeps what it stored (``docs/dispatch.md``):
#: ``"storage-commitment"`` (N-ACTION, then the N-EVENT-REPORT), ``"find"`` (C-FIND of
#: every SOP Instance UID), ``"auto"`` (Storage Commitment; C-FIND where the PACS refuses
#: that SOP class; "unconfirmed" where it refuses both) or ``"none"`` (the C-STORE
#: response is the last word, as before issue 20).
Commitment = Literal["auto", "storage-commitment", "find", "none"]

_AE_TITLE_MAX = 16
#: Length of a delivery's label (``delivery.label``).
_LABEL_MAX = 128
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

    #: ``"dimse"`` (the default, may be left out) or ``"dicomweb"`` (:class:`DicomwebDestination`).
    kind: Literal["dimse"] = "dimse"
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


class DicomwebDestination(BaseModel):
    """A DICOMweb origin server that the node sends its results to with STOW-RS (PS3.18 10.5).

    ``url`` is the service root: the node POSTs to ``<url>/studies``. The secrets (``token``,
    ``password``) are never written into the database with the delivery: they are taken from
    the configuration when the delivery is sent (:func:`mibi_node.dispatch.deliveries.deliver`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["dicomweb"]
    url: str
    name: str = ""
    #: Sent as ``Authorization: Bearer <token>``.
    token: SecretStr = Field(default=SecretStr(""), exclude=True)
    #: HTTP Basic authentication (with ``password``), for servers without bearer tokens.
    username: str = ""
    password: SecretStr = Field(default=SecretStr(""), exclude=True)
    #: PEM CAs trusted for an ``https`` server's certificate (none: the system's).
    ca_certificates: Path | None = None
    #: PEM client certificate and its key, for a server that demands one.
    certificate: Path | None = None
    private_key: Path | None = None

    @model_validator(mode="before")
    @classmethod
    def _name_defaults_to_url(cls, data: Any) -> Any:
        # The delivery rows are labelled by name (mibi_node.jobs.queue): give every
        # destination of this kind one, its URL when the configuration names none.
        if isinstance(data, dict) and not str(data.get("name") or "").strip():
            return {**data, "name": str(data.get("url") or "").strip().rstrip("/")}
        return data

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        url = value.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                "url is an http:// or https:// address, e.g. https://pacs:8042/dicom-web"
            )
        if parts.username is not None or parts.password is not None:
            raise ValueError("url must not hold credentials: use token, or username and password")
        if parts.query or parts.fragment:
            raise ValueError("url is the service root, without query or fragment")
        return url

    @model_validator(mode="after")
    def _credentials(self) -> DicomwebDestination:
        if self.token.get_secret_value() and self.username:
            raise ValueError("give token or username and password, not both")
        if self.password.get_secret_value() and not self.username:
            raise ValueError("password is given without username")
        if self.private_key is not None and self.certificate is None:
            raise ValueError("private_key is given without certificate")
        if len(self.name) > _LABEL_MAX:
            raise ValueError(f"name (by default the url) has at most {_LABEL_MAX} characters")
        return self

    @property
    def commitment(self) -> Commitment:
        """Always ``"none"``: the STOW-RS response itself names every instance stored."""
        return "none"

    @property
    def label(self) -> str:
        """What logs and the status page call this destination: its name (default its URL)."""
        return self.name or self.url


def _destination_kind(value: Any) -> str:
    kind = value.get("kind", "dimse") if isinstance(value, dict) else getattr(value, "kind", "")
    return str(kind)


#: A destination of either kind, told apart by ``kind`` (``"dimse"`` when it is left out).
AnyDestination = Annotated[
    Annotated[Destination, Tag("dimse")] | Annotated[DicomwebDestination, Tag("dicomweb")],
    Discriminator(
        _destination_kind,
        custom_error_type="destination_kind",
        custom_error_message='kind is "dimse" (the default) or "dicomweb"',
    ),
]

_ANY_DESTINATION: TypeAdapter[Destination | DicomwebDestination] = TypeAdapter(AnyDestination)


def destination_from_row(data: dict[str, Any]) -> Destination | DicomwebDestination:
    """The destination recorded on a delivery row (its ``files`` taken out).

    Raises
    ------
    pydantic.ValidationError
        The recorded destination is not a valid one of either kind.
    """
    return _ANY_DESTINATION.validate_python(data)


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
