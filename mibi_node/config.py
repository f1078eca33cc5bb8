"""One immutable, typed configuration, read from TOML and validated once at load.

Every key of ``config/mibi-node.toml`` is a field here; an invalid value fails at start-up
with the TOML key that is wrong, never later in the middle of a C-STORE.
"""

from __future__ import annotations

import ipaddress
import socket
import tomllib
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from mibi_node.analyses.selection import SelectionRule
from mibi_node.dispatch.destinations import AnyDestination, check_ae_title
from mibi_node.errors import ConfigError

__all__ = [
    "AnalysisSettings",
    "AssemblyConfig",
    "Config",
    "DatabaseConfig",
    "DicomwebReceptionConfig",
    "DispatchConfig",
    "JobsConfig",
    "LoggingConfig",
    "NodeConfig",
    "PeerConfig",
    "ReceptionConfig",
    "ReportConfig",
    "RetentionConfig",
    "RoutingConfig",
    "StorageConfig",
    "TLSConfig",
    "ValidationConfig",
    "WebConfig",
    "WorkersConfig",
    "load_config",
    "DEFAULT_CONFIG_PATH",
]

#: Where ``mibi-node serve`` looks when no ``--config`` is given.
DEFAULT_CONFIG_PATH = Path("config/mibi-node.toml")


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
        return check_ae_title(value)


class PeerConfig(_Section):
    """A calling AE title allowed to associate, optionally only from some addresses."""

    ae_title: str
    hosts: tuple[str, ...] = ()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value)


class TLSConfig(_Section):
    """DICOM TLS for the Storage SCP (PS3.15 B.1, the BCP 195 profiles)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = False

    @model_validator(mode="after")
    def _complete(self) -> TLSConfig:
        if self.enabled and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key are required when TLS is enabled")
        if self.enabled and self.require_client_certificate and self.ca_certificates is None:
            raise ValueError("ca_certificates is required to verify client certificates")
        return self


def _is_loopback(host: str) -> bool:
    return host in {"127.0.0.1", "::1", "localhost"} or host.startswith("127.")


class DicomwebReceptionConfig(_Section):
    """STOW-RS reception (PS3.18 10.5): an HTTP listener of its own, beside the DICOM port.

    The counterpart of the DICOM side's rules: ``allowed_hosts`` for the allow-list,
    ``token`` and/or ``tls`` for who may send; instances are answered only once they are
    as durable as a C-STORE's (``mibi_node.reception.stow``).
    """

    enabled: bool = False
    #: Bind address. Anything but a loopback address requires ``token`` or TLS with
    #: client certificates.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one.
    port: int = Field(default=8081, ge=0, le=65535)
    #: What the study and instance rows record as the calling AE title of what came this way.
    ae_title: str = "DICOMWEB"
    #: Bearer token (``Authorization: Bearer ...``) every request must carry; empty: none.
    token: SecretStr = SecretStr("")
    #: Client addresses or networks (``10.0.0.5``, ``10.0.0.0/24``) allowed; empty: any.
    allowed_hosts: tuple[str, ...] = ()
    #: Largest request body, in MiB; a larger one is refused (413).
    max_request_mb: float = Field(default=2048.0, gt=0)
    #: HTTPS: the same keys as ``reception.tls``.
    tls: TLSConfig = TLSConfig()

    @field_validator("ae_title")
    @classmethod
    def _ae_title(cls, value: str) -> str:
        return check_ae_title(value)

    @field_validator("allowed_hosts")
    @classmethod
    def _hosts(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for host in value:
            try:
                ipaddress.ip_network(host.strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"{host!r} is not an IP address or network (e.g. 10.0.0.0/24)"
                ) from None
        return tuple(host.strip() for host in value)

    @model_validator(mode="after")
    def _guarded(self) -> DicomwebReceptionConfig:
        guarded = self.token.get_secret_value() or (
            self.tls.enabled and self.tls.require_client_certificate
        )
        if self.enabled and not _is_loopback(self.host) and not guarded:
            raise ValueError(
                f"host {self.host!r} is not a loopback address: set token (or TLS with "
                "require_client_certificate, or bind to 127.0.0.1)"
            )
        return self


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
    #: STOW-RS reception (``[reception.dicomweb]``), off by default.
    dicomweb: DicomwebReceptionConfig = DicomwebReceptionConfig()


class StorageConfig(_Section):
    """The file stores and their safety margin."""

    min_free_mb: int = Field(default=500, ge=0)
    #: Folder of the received instance files; empty = ``<node.data_dir>/store``. Workers on
    #: other hosts read the same store-relative paths, so there it is a shared mount.
    root: Path | None = None
    #: Folder of the SR (and key image) files; empty = ``<node.data_dir>/results``.
    results_root: Path | None = None

    @field_validator("root", "results_root", mode="before")
    @classmethod
    def _empty_is_default(cls, value: object) -> object:
        return None if value == "" else value


class DatabaseConfig(_Section):
    """The database; empty ``url`` means SQLite at ``<data_dir>/mibi-node.sqlite3``."""

    url: SecretStr = SecretStr("")


class AssemblyConfig(_Section):
    """When a study counts as complete."""

    quiet_seconds: float = Field(default=30.0, gt=0)
    sweep_seconds: float = Field(default=1.0, gt=0)
    #: Seconds a study with only some of its phases waits for the rest (default 4 h).
    max_phase_wait: float = Field(default=4 * 3600.0, ge=0)


#: Study or series descriptions that mark a parathyroid MIBI study, in any case.
DEFAULT_DESCRIPTION_PATTERN = r"parathyr|mibi|\bpth\b|nebenschild"


class RoutingConfig(SelectionRule):
    """The parathyroid analysis' selection rule, as ``[routing]`` has always given it.

    Kept so that existing configuration files mean what they meant: ``[routing]`` is the
    same as ``[analyses.parathyroid.selection]`` (setting both is refused at load).
    """

    radiopharmaceutical_codes: tuple[str, ...] = ("424299003", "C-B1115")
    description_pattern: str = DEFAULT_DESCRIPTION_PATTERN


class AnalysisSettings(_Section):
    """One analysis' site settings: ``[analyses.<name>]`` (docs/analyses.md)."""

    #: The parathyroid analysis is on unless switched off; the others when their section says.
    enabled: bool = True
    #: Its bundle folder; default ``workers.bundle`` for parathyroid, else the analysis' own.
    bundle: Path | None = None
    #: A candidate bundle folder run beside the current one on the same studies, its results
    #: stored and compared but never sent, until ``mibi-node promote`` makes it current.
    shadow_bundle: Path | None = None
    #: Series Number of its result series; default ``report.series_number`` + its offset.
    series_number: int | None = Field(default=None, ge=1)
    #: Seconds a study missing a part waits for it; default ``assembly.max_phase_wait``.
    max_wait: float | None = Field(default=None, ge=0)
    #: Keys of :class:`~mibi_node.analyses.selection.SelectionRule` over the analysis' own.
    selection: dict[str, Any] = Field(default_factory=dict)
    #: Send a key image beside the SR; default the analysis' own choice (the spine analysis
    #: sends one), else ``report.key_image``.
    key_image: bool | None = None


class JobsConfig(_Section):
    """Analysis jobs: leases and retries."""

    #: Claims of a job before it is FAILED (a worker killed on it counts as one).
    max_attempts: int = Field(default=3, ge=1, le=100)
    #: A claimed job returns to the queue when its worker has not renewed it for this long.
    lease_seconds: float = Field(default=60.0, ge=2)
    #: Most studies one worker analyses in one batch.
    batch_size: int = Field(default=4, ge=1, le=64)


class WorkersConfig(_Section):
    """Worker processes that ``mibi-node serve`` starts (0: run ``mibi-node worker`` apart)."""

    count: int = Field(default=1, ge=0, le=64)
    #: "auto", "cpu", "cuda" or "cuda:N"; with several workers, "cuda" spreads them over GPUs.
    device: str = "auto"
    #: Model bundle folder (``make demo`` builds var/bundles/demo).
    bundle: Path = Path("var/bundles/demo")
    #: Seconds between looks at the queue when it is empty.
    poll_seconds: float = Field(default=0.25, gt=0)
    #: MiB of resident memory a worker may use in all, its own baseline (measured at start)
    #: included (on a GPU: GPU memory for its bundles); 0: the baseline plus 85 % of what
    #: the device has free at start-up. A bundle that does not fit is refused then.
    memory_budget_mb: float = Field(default=0.0, ge=0)


class DispatchConfig(_Section):
    """Where results go and how failed sends are retried."""

    destinations: tuple[AnyDestination, ...] = ()
    #: Calling AE title of the node's C-STORE requests (default: node.ae_title).
    calling_ae_title: str = ""
    max_attempts: int = Field(default=10, ge=1, le=1000)
    initial_backoff_seconds: float = Field(default=30.0, gt=0)
    max_backoff_seconds: float = Field(default=3600.0, gt=0)
    timeout: float = Field(default=30.0, gt=0)
    #: Storage commitment (a destination's ``commitment``): seconds to wait for the PACS's
    #: N-EVENT-REPORT (or before a C-FIND read-back that missed is tried again) ...
    commitment_timeout: float = Field(default=300.0, gt=0)
    #: ... and N-ACTIONs (read-backs) sent before the commitment is FAILED (an alert).
    commitment_attempts: int = Field(default=3, ge=1, le=100)

    @field_validator("calling_ae_title")
    @classmethod
    def _calling(cls, value: str) -> str:
        return check_ae_title(value) if value.strip() else ""


class ReportConfig(_Section):
    """The result documents."""

    #: Also send a Secondary Capture key image: the result every viewer shows, and what
    #: covers the parts of the SR a viewer does not draw (docs/viewers.md).
    key_image: bool = True
    #: Institution Name written into the SR (optional).
    institution_name: str = ""
    #: Series Number of the result series.
    series_number: int = Field(default=9901, ge=1)
    #: Device Observer UID; empty = one generated at first use and kept in the database.
    device_uid: str = ""


class WebConfig(_Section):
    """The status page, REST API, health checks and Prometheus metrics (``mibi_node.web``)."""

    #: Serve them from the node's process; false = no HTTP listener at all.
    enabled: bool = True
    #: Bind address. Anything but a loopback address requires ``token``.
    host: str = "127.0.0.1"
    #: TCP port; 0 picks a free one (tests).
    port: int = Field(default=8080, ge=0, le=65535)
    #: Bearer token (``Authorization: Bearer ...`` or ``?token=``) for every page but
    #: /healthz, /readyz and /metrics; required when ``host`` is not loopback.
    token: SecretStr = SecretStr("")
    #: /readyz fails when a worker heartbeat is older than this (seconds).
    worker_stale_seconds: float = Field(default=60.0, gt=0)

    @property
    def is_loopback(self) -> bool:
        """Whether ``host`` only accepts connections from this machine."""
        return self.host in {"127.0.0.1", "::1", "localhost"} or self.host.startswith("127.")


class RetentionConfig(_Section):
    """How long received instance files are kept once their results were delivered."""

    #: Days after the last successful delivery of a study's result before its instance files
    #: are removed (database rows stay). 0 = keep the files for ever.
    days: float = Field(default=30.0, ge=0)
    #: How often the retention sweep runs (seconds).
    sweep_seconds: float = Field(default=3600.0, gt=0)


class ValidationConfig(_Section):
    """Local validation (docs/validation.md): input drift of each camera against the
    training summary of its analysis' bundle (:mod:`mibi_node.validation.drift`)."""

    #: The latest studies of each camera (per analysis) compared with the training summary.
    drift_window: int = Field(default=30, ge=1, le=10_000)
    #: Fewer studies than this in the window: "too few studies", no verdict.
    drift_min_studies: int = Field(default=10, ge=2)
    #: Population Stability Index from which a feature drifts (if also significant) ...
    drift_psi_threshold: float = Field(default=0.25, gt=0)
    #: ... and from which it is to be watched.
    drift_psi_watch: float = Field(default=0.10, gt=0)
    #: Significance level of the two-sample Kolmogorov-Smirnov test (Bonferroni-corrected
    #: over a camera's features for a drift verdict).
    drift_ks_alpha: float = Field(default=0.05, gt=0, lt=1)
    #: Share of studies whose matrix, pixel size or other setting training never saw, above
    #: which the camera drifts.
    drift_unseen_share: float = Field(default=0.5, ge=0, lt=1)
    #: After each verdict, send the job's assessment SR (every standing verdict on its
    #: findings, referencing the AI SR) to the job's destinations (docs/validation.md).
    send_assessment: bool = False

    @model_validator(mode="after")
    def _ordered(self) -> ValidationConfig:
        if self.drift_psi_watch > self.drift_psi_threshold:
            raise ValueError("drift_psi_watch should not exceed drift_psi_threshold")
        if self.drift_min_studies > self.drift_window:
            raise ValueError("drift_min_studies should not exceed drift_window")
        return self


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
    routing: RoutingConfig = RoutingConfig()
    analyses: dict[str, AnalysisSettings] = Field(default_factory=dict)
    jobs: JobsConfig = JobsConfig()
    workers: WorkersConfig = WorkersConfig()
    dispatch: DispatchConfig = DispatchConfig()
    report: ReportConfig = ReportConfig()
    web: WebConfig = WebConfig()
    retention: RetentionConfig = RetentionConfig()
    validation: ValidationConfig = ValidationConfig()
    logging: LoggingConfig = LoggingConfig()

    @model_validator(mode="after")
    def _web_token(self) -> Config:
        if self.web.enabled and not self.web.is_loopback and not self.web.token.get_secret_value():
            raise ValueError(
                f"web.host {self.web.host!r} is not a loopback address: set web.token "
                "(or bind to 127.0.0.1)"
            )
        return self

    @model_validator(mode="after")
    def _analyses(self) -> Config:
        from mibi_node.analyses.registry import available_analyses

        known = available_analyses()
        for name, settings in self.analyses.items():
            if name not in known:
                raise ValueError(
                    f"analyses.{name}: no such analysis (there are: {', '.join(sorted(known))})"
                )
            if settings.selection and name == "parathyroid" and "routing" in self.model_fields_set:
                raise ValueError(
                    "routing: [routing] and [analyses.parathyroid.selection] both set the "
                    "parathyroid analysis' rule; keep analyses.parathyroid.selection only"
                )
            try:
                self.selection(name)
            except ValidationError as exc:
                first = exc.errors()[0]
                key = ".".join(str(part) for part in first["loc"])
                message = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
                raise ValueError(f"analyses.{name}.selection.{key}: {message}") from None
        return self

    @property
    def enabled_analyses(self) -> tuple[str, ...]:
        """Names of the analyses this node runs: parathyroid unless switched off, then the
        others whose ``[analyses.<name>]`` section is there and enabled."""
        names = []
        if self.analyses.get("parathyroid", AnalysisSettings()).enabled:
            names.append("parathyroid")
        names += [n for n, s in self.analyses.items() if n != "parathyroid" and s.enabled]
        return tuple(names)

    def selection(self, name: str) -> SelectionRule:
        """The selection rule of analysis ``name``: its defaults, then the site's keys."""
        settings = self.analyses.get(name, AnalysisSettings())
        if name == "parathyroid" and not settings.selection:
            return self.routing
        from mibi_node.analyses.registry import get_analysis

        default = get_analysis(name).default_selection
        return SelectionRule.model_validate({**default.model_dump(), **settings.selection})

    def selections(self) -> dict[str, SelectionRule]:
        """Every enabled analysis' selection rule, by name (the routing sweep's input)."""
        return {name: self.selection(name) for name in self.enabled_analyses}

    def analysis_labels(self) -> dict[str, str]:
        """What a study each enabled analysis takes is called ("MIBI study")."""
        from mibi_node.analyses.registry import get_analysis

        return {name: get_analysis(name).label for name in self.enabled_analyses}

    def bundle_for(self, name: str) -> Path:
        """The bundle folder of analysis ``name``."""
        settings = self.analyses.get(name, AnalysisSettings())
        if settings.bundle is not None:
            return settings.bundle
        if name == "parathyroid":
            return self.workers.bundle
        from mibi_node.analyses.registry import get_analysis

        default = get_analysis(name).default_bundle
        return default if default is not None else self.node.data_dir / "bundles" / name

    def shadow_bundle_for(self, name: str) -> Path | None:
        """The candidate (shadow) bundle folder of analysis ``name``, if one is configured.

        Whether it still runs as a shadow (it may have been promoted) is the database's to
        say: :func:`mibi_node.validation.shadow.bundle_choices`.
        """
        return self.analyses.get(name, AnalysisSettings()).shadow_bundle

    def max_wait_for(self, name: str) -> float:
        """Seconds a study of analysis ``name`` waits for a missing part."""
        settings = self.analyses.get(name, AnalysisSettings())
        if settings.max_wait is not None:
            return settings.max_wait
        from mibi_node.analyses.registry import get_analysis

        declared = get_analysis(name).completeness.max_wait_seconds
        return declared if declared is not None else self.assembly.max_phase_wait

    def series_number_for(self, name: str) -> int:
        """Series Number of analysis ``name``'s result series."""
        settings = self.analyses.get(name, AnalysisSettings())
        if settings.series_number is not None:
            return settings.series_number
        from mibi_node.analyses.registry import get_analysis

        return self.report.series_number + get_analysis(name).series_offset

    def analysis_storage_classes(self) -> tuple[str, ...]:
        """Storage SOP Class UIDs the enabled analyses' studies arrive as (reception adds
        them to its own set)."""
        from mibi_node.analyses.registry import get_analysis

        return tuple(
            uid for name in self.enabled_analyses for uid in get_analysis(name).storage_sop_classes
        )

    def key_image_for(self, name: str) -> bool:
        """Whether analysis ``name`` sends a key image beside its SR."""
        settings = self.analyses.get(name, AnalysisSettings())
        if settings.key_image is not None:
            return settings.key_image
        from mibi_node.analyses.registry import get_analysis

        default = get_analysis(name).key_image_default
        return default if default is not None else self.report.key_image

    @property
    def database_url(self) -> str:
        """The SQLAlchemy URL, defaulting to the SQLite file under the data folder."""
        url = self.database.url.get_secret_value()
        if url:
            return url
        return f"sqlite:///{(self.node.data_dir / 'mibi-node.sqlite3').resolve()}"

    @property
    def store_dir(self) -> Path:
        """Folder of the received instance files (``storage.root``)."""
        return self.storage.root or self.node.data_dir / "store"

    @property
    def incoming_name(self) -> str:
        """Folder of partial received files in the store, per receiver when it is shared.

        With ``storage.root`` set, several receivers may share the store: each gets
        ``.incoming/<host>-<port>`` so that one starting up cleans only its own leftovers.
        """
        if self.storage.root is None:
            return ".incoming"
        return f".incoming/{socket.gethostname()}-{self.node.port}"

    @property
    def results_dir(self) -> Path:
        """Folder of the SR (and key image) files the node made (``storage.results_root``)."""
        return self.storage.results_root or self.node.data_dir / "results"

    @property
    def calling_ae_title(self) -> str:
        """The AE title the node calls PACS with."""
        return self.dispatch.calling_ae_title or self.node.ae_title

    def masked(self) -> dict[str, Any]:
        """The configuration as plain data with secrets replaced by ``********``."""
        data = self.model_dump(mode="json")
        if self.database.url.get_secret_value():
            data["database"]["url"] = "********"
        if self.web.token.get_secret_value():
            data["web"]["token"] = "********"
        if self.reception.dicomweb.token.get_secret_value():
            data["reception"]["dicomweb"]["token"] = "********"
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
