"""The Storage and Verification SCP: who may associate, and what each C-STORE is answered.

It also takes the Storage Commitment reports (N-EVENT-REPORT) that a PACS sends on an
association of its own, in the SCP role (``mibi_node.dispatch.commitment``).

Handlers never raise (pynetdicom would turn an exception into 0xC211, which tells the
sender nothing): every outcome is a precise DICOM status, logged once with its reason.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import OperationalError

from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, audit
from mibi_node.config import Config, TLSConfig
from mibi_node.dispatch.commitment import STORAGE_COMMITMENT_PUSH_MODEL, answer_report
from mibi_node.errors import ConfigError
from mibi_node.reception.contexts import TRANSFER_SYNTAXES, VERIFICATION, storage_sop_classes
from mibi_node.reception.limit import AssociationLimit
from mibi_node.reception.pdu import guard_pdu_lengths
from mibi_node.reception.validation import RejectedInstanceError, read_instance_meta
from mibi_node.storage.database import database_problem
from mibi_node.storage.instances import InstanceStore, StoreOutcome

__all__ = ["STATUS_OUT_OF_RESOURCES", "STATUS_SUCCESS", "StorageSCP", "bind_listener"]

logger = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
#: Refused: Out of Resources (PS3.4 B.2.3).
STATUS_OUT_OF_RESOURCES = 0xA700

# A-ASSOCIATE-RJ (result, source, diagnostic), PS3.8 9.3.4.
_REJECT_CALLING_AE = (0x01, 0x01, 0x03)
_REJECT_CALLED_AE = (0x01, 0x01, 0x07)
_REJECT_CONGESTION = (0x02, 0x03, 0x01)
_REJECT_LIMIT = (0x02, 0x03, 0x02)

# pynetdicom polls its sockets, sleeping this long between passes while a peer is idle.
# Its default (1 ms) adds about a millisecond to every PDU exchange; 0.1 ms is what
# benchmarks/bench_ingest.py measured as the better trade (see docs/performance.md).
_DUL_LOOP_DELAY = 0.0001


def bind_listener(host: str, port: int, backlog: int = 128) -> socket.socket:
    """Bind and listen on ``host:port``; the socket can be shared by forked acceptors.

    Binding once, in the parent, keeps "address already in use" an error (unlike
    SO_REUSEPORT, which would let a second node silently share the port).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(backlog)
    # Several processes may wait on this socket: the ones that lose the race for a
    # connection must get EAGAIN, not block in accept().
    listener.setblocking(False)
    return listener


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The reception's TLS context (``None`` when TLS is off), certificates loaded.

    The node builds it once before it listens, so a missing or unreadable file stops the
    start with its reason instead of failing in every acceptor.

    Raises
    ------
    ConfigError
        A certificate, key or CA file is missing or cannot be loaded.
    """
    if not tls.enabled:
        return None
    if tls.certificate is None or tls.private_key is None:
        raise ConfigError(
            "reception.tls: certificate and private_key are required when TLS is enabled"
        )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(tls.certificate, tls.private_key)
        if tls.ca_certificates is not None:
            context.load_verify_locations(cafile=str(tls.ca_certificates))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"reception.tls: cannot load certificates: {exc}") from None
    if tls.require_client_certificate:
        if tls.ca_certificates is None:
            raise ConfigError(
                "reception.tls.ca_certificates is required to verify client certificates"
            )
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _address_forms(address: str) -> frozenset[str]:
    """A peer's address as written in ``allowed_peers``: an IPv4 peer of a dual-stack
    listener arrives as ``::ffff:a.b.c.d`` and matches both that and ``a.b.c.d``."""
    try:
        mapped = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return frozenset({address})
    if isinstance(mapped, ipaddress.IPv6Address) and mapped.ipv4_mapped is not None:
        return frozenset({address, str(mapped.ipv4_mapped)})
    return frozenset({address})


class _SharedListenerServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, accepting on a listening socket made elsewhere."""

    def __init__(self, *args: Any, listener: socket.socket, **kwargs: Any) -> None:
        self._listener = listener
        super().__init__(*args, **kwargs)

    def server_bind(self) -> None:
        if self.socket is not None:
            self.socket.close()
        self.socket = self._listener
        self.server_address = self._listener.getsockname()

    def server_activate(self) -> None:
        """Already listening (see :func:`bind_listener`)."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        client, address = self._listener.accept()  # BlockingIOError when another won
        # Every read and write on the connection is bounded by the network timeout:
        # pynetdicom reads a PDU with blocking recv() calls, and without a timeout a peer
        # that sends part of a PDU (or of a TLS record) and stops would hold the
        # association's thread for ever, beyond the reach of its ARTIM and idle timers.
        client.settimeout(self.ae.network_timeout)
        if self.ssl_context:
            # The handshake happens in the association's own thread, at its first read
            # (OpenSSL negotiates inside SSL_read), under the ACSE timeout: a peer that
            # connects and says nothing cannot hold this accept loop.
            client = self.ssl_context.wrap_socket(
                client, server_side=True, do_handshake_on_connect=False
            )
        return client, address

    def server_close(self) -> None:
        """Leave the shared listening socket open for the other acceptors."""

    def shutdown(self) -> None:
        """Stop the accept loop (associations in progress go on; see StorageSCP.stop)."""
        socketserver.BaseServer.shutdown(self)


def _discard_partial_instance(assoc: Any) -> None:
    """Delete the temporary file of a C-STORE whose data set never arrived in full.

    pynetdicom writes a data set to a file under ``.incoming/`` as its fragments arrive
    (``STORE_RECV_CHUNKED_DATASET``) and removes it after the handler; when the peer aborts
    or vanishes half-way, nobody does, and a peer that keeps doing so would fill the disk.
    """
    message = getattr(getattr(assoc, "dimse", None), "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    try:
        if handle is not None:
            handle.close()
        if path is not None:
            Path(path).unlink(missing_ok=True)
            logger.debug("removed the partial data set of an unfinished C-STORE")
    except OSError as exc:  # pragma: no cover - the next start cleans .incoming anyway
        logger.warning("could not remove the partial data set of a C-STORE: %s", exc)


@dataclass
class _AssociationTally:
    calling_ae_title: str
    address: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0
    #: Refused instances by DIMSE status (``0xA700`` ...), for the audit trail and metrics.
    refused: dict[str, int] = field(default_factory=dict)


class StorageSCP:
    """The node's listening side.

    Parameters
    ----------
    config
        The node's configuration (AE title, port, allow-list, TLS, timeouts, disk margin).
    store
        Where acknowledged instances go.
    listener
        A listening socket shared with other acceptor processes (default: bind one).
    limit, acceptor
        The node-wide association limit and this acceptor's slot in it (default: a limit
        of this process alone).
    """

    def __init__(
        self,
        config: Config,
        store: InstanceStore,
        listener: socket.socket | None = None,
        limit: AssociationLimit | None = None,
        acceptor: int = 0,
    ) -> None:
        self.config = config
        self.store = store
        self._listener = listener
        self.limit = limit or AssociationLimit(
            config.reception.max_associations, 1, config.node.data_dir / "associations.lock"
        )
        self._acceptor = acceptor
        self._janitor_stop = threading.Event()
        self._server: ThreadedAssociationServer | None = None
        self._thread: threading.Thread | None = None
        self._tallies: dict[int, _AssociationTally] = {}
        self._lock = threading.Lock()
        self._allowed = {
            peer.ae_title: frozenset(peer.hosts) for peer in config.reception.allowed_peers
        }
        self.ae = self._build_ae()

    # -- set-up ---------------------------------------------------------------------------

    def _build_ae(self) -> AE:
        reception = self.config.reception
        ae = AE(ae_title=self.config.node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        # The limit is the node's (self.limit, checked in _on_requested); pynetdicom's own
        # check is only a backstop, with room for associations whose threads are ending.
        ae.maximum_associations = 2 * reception.max_associations
        ae.maximum_pdu_size = reception.max_pdu_size
        ae.acse_timeout = reception.acse_timeout
        ae.dimse_timeout = reception.dimse_timeout
        ae.network_timeout = reception.network_timeout
        # Called/calling AE checks happen in _on_requested so that each refusal is logged.
        ae.require_called_aet = False
        ae.require_calling_aet = []
        ae.add_supported_context(VERIFICATION)
        if any(
            d.commitment in ("auto", "storage-commitment")
            for d in self.config.dispatch.destinations
        ):
            # A PACS sends its commitment reports as the SCP of this SOP class (role
            # selection: it proposes SCP, not SCU); a proposal without one is accepted too.
            ae.add_supported_context(
                STORAGE_COMMITMENT_PUSH_MODEL,
                [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
                scu_role=False,
                scp_role=True,
            )
        for uid in storage_sop_classes(
            reception.accept_all_storage, self.config.analysis_storage_classes()
        ):
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        return ae

    def _ssl_context(self) -> ssl.SSLContext | None:
        return server_ssl_context(self.config.reception.tls)

    def start(self) -> None:
        """Listen on the configured address; returns once the socket accepts connections."""
        _config.STORE_RECV_CHUNKED_DATASET = True
        # pynetdicom writes each received data set to a NamedTemporaryFile; keep those on
        # the store's filesystem so that storing one is a rename, not a copy.
        tempfile.tempdir = str(self.store.files.incoming)
        handlers: list[Any] = [
            (evt.EVT_CONN_OPEN, self._on_conn_open),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_c_echo),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_N_EVENT_REPORT, self._on_n_event_report),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
            (evt.EVT_CONN_CLOSE, self._on_conn_close),
        ]
        address = (self.config.node.host, self.config.node.port)
        if self._listener is None:
            self._listener = bind_listener(*address)
        server = self.ae.make_server(
            address,
            ssl_context=self._ssl_context(),
            evt_handlers=handlers,
            server_class=_SharedListenerServer,
            listener=self._listener,
        )
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.2},
            daemon=True,
            name="storage-scp",
        )
        self._thread.start()
        self._server = server
        self._janitor_stop.clear()
        threading.Thread(target=self._janitor, daemon=True, name="incoming-janitor").start()

    def _orphan_seconds(self) -> float:
        """Age after which a file in ``.incoming/`` cannot belong to a live C-STORE."""
        reception = self.config.reception
        return 2 * max(reception.network_timeout, reception.dimse_timeout) + 5

    def _janitor(self) -> None:
        """Remove partial data sets that no association will finish.

        :func:`_discard_partial_instance` removes them when an association ends; this catches
        the rest (pynetdicom ends an association without any event when its state machine
        fails, e.g. on a PDV for a presentation context never negotiated). A transfer whose
        file has not changed for that long is stalled; only a peer that dribbles a few bytes
        at a time stays below the file's write buffer that long, and its C-STORE is then
        answered 0xC210 (the file is gone) instead of taking disk space for ever.
        """
        age = self._orphan_seconds()
        while not self._janitor_stop.wait(age / 3):
            cutoff = time.time() - age
            try:
                entries = list(self.store.files.incoming.iterdir())
            except OSError:
                continue
            for entry in entries:
                try:
                    if entry.is_file() and entry.stat().st_mtime < cutoff:
                        entry.unlink(missing_ok=True)
                        logger.info("removed a partial data set left by an ended association")
                except OSError:
                    continue  # gone meanwhile, or another acceptor's janitor was first

    def stop(self, timeout: float = 30.0) -> None:
        """Stop accepting associations and let the ones in progress finish (up to ``timeout``)."""
        self._janitor_stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        deadline = time.monotonic() + timeout
        # Established associations finish their C-STOREs; connections still waiting for
        # an A-ASSOCIATE-RQ (a port probe, a stalled peer) are aborted by ae.shutdown().
        while time.monotonic() < deadline and any(
            assoc.is_established for assoc in self.ae.active_associations
        ):
            time.sleep(0.05)
        self.ae.shutdown()
        if self._listener is not None:
            # Close this process's copy of the listening socket: once every acceptor has,
            # the port is free for the next node.
            self._listener.close()
            self._listener = None

    # -- association events ---------------------------------------------------------------

    def _on_conn_open(self, event: Any) -> None:
        dul = getattr(event.assoc, "dul", None)
        if dul is not None and hasattr(dul, "_run_loop_delay"):
            dul._run_loop_delay = _DUL_LOOP_DELAY
        guard_pdu_lengths(event.assoc, self.config.reception.max_pdu_size)

    def _reject(self, event: Any, rsd: tuple[int, int, int], why: str, reason: str) -> None:
        requestor = event.assoc.requestor
        calling = requestor.primitive.calling_ae_title.strip()
        logger.info("association from %s (%s) rejected: %s", calling, requestor.address, why)
        event.assoc.acse.send_reject(*rsd)
        event.assoc.kill()
        audit.record(
            self.store.database,
            "association",
            "rejected",
            actor=f"{calling}@{requestor.address}",
            message=why,
            detail={"reason": reason},
        )

    def _on_requested(self, event: Any) -> None:
        try:
            primitive = event.assoc.requestor.primitive
            calling = primitive.calling_ae_title.strip()
            called = primitive.called_ae_title.strip()
            address = event.assoc.requestor.address
            if self.config.reception.require_called_ae_title and (
                called != self.config.node.ae_title
            ):
                self._reject(
                    event,
                    _REJECT_CALLED_AE,
                    f"called AE title {called!r} is not ours",
                    "called_ae_title",
                )
                return
            if self._allowed:
                hosts = self._allowed.get(calling)
                if hosts is None:
                    self._reject(
                        event,
                        _REJECT_CALLING_AE,
                        "calling AE title not allowed",
                        "calling_ae_title",
                    )
                    return
                if hosts and not hosts & _address_forms(address):
                    self._reject(
                        event,
                        _REJECT_CALLING_AE,
                        "calling AE title not allowed from this host",
                        "calling_host",
                    )
                    return
            free = self.store.files.free_mb()
            if free < self.config.storage.min_free_mb:
                self._reject(
                    event,
                    _REJECT_CONGESTION,
                    f"only {free:.0f} MiB free, storage.min_free_mb is "
                    f"{self.config.storage.min_free_mb}",
                    "disk_full",
                )
                return
            if not self.limit.acquire(self._acceptor):
                self._reject(
                    event,
                    _REJECT_LIMIT,
                    f"{self.limit.maximum} associations already open (reception.max_associations)",
                    "association_limit",
                )
                return
            with self._lock:  # from here on the slot is given back in _on_closed
                self._tallies[id(event.assoc)] = _AssociationTally(calling, address)
        except Exception:  # never let a handler exception reach pynetdicom
            logger.exception("association check failed; rejecting")
            try:
                event.assoc.acse.send_reject(*_REJECT_CONGESTION)
                event.assoc.kill()
            except Exception:  # pragma: no cover - the socket may already be gone
                pass

    def _on_closed(self, event: Any) -> None:
        _discard_partial_instance(event.assoc)
        with self._lock:
            tally = self._tallies.pop(id(event.assoc), None)
        if tally is None:
            return
        self.limit.release(self._acceptor)
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        logger.info(
            "association from %s (%s) %s after %.1f s: %d stored, %d duplicate, %d refused",
            tally.calling_ae_title,
            tally.address,
            how,
            time.monotonic() - tally.started,
            tally.stored,
            tally.duplicates,
            tally.failed,
        )
        audit.record(
            self.store.database,
            "association",
            how,
            actor=f"{tally.calling_ae_title}@{tally.address}",
            detail={
                "stored": tally.stored,
                "duplicates": tally.duplicates,
                "refused": tally.failed,
                "refused_by_status": dict(tally.refused),
                "seconds": round(time.monotonic() - tally.started, 3),
            },
        )

    def _on_conn_close(self, event: Any) -> None:
        # A connection that dropped without release or abort still gets its log line.
        self._on_closed(event)

    # -- DIMSE services -------------------------------------------------------------------

    def _on_c_echo(self, event: Any) -> int:
        return STATUS_SUCCESS

    def _on_n_event_report(self, event: Any) -> tuple[int, None]:
        """A Storage Commitment report: recorded on its delivery; never raises."""
        return answer_report(self.store.database, event), None

    def _tally(self, event: Any) -> _AssociationTally:
        with self._lock:
            tally = self._tallies.get(id(event.assoc))
            if tally is None:  # pragma: no cover - association checks always register one
                tally = _AssociationTally(event.assoc.requestor.ae_title.strip(), "")
                self._tallies[id(event.assoc)] = tally
            return tally

    def _on_c_store(self, event: Any) -> int:
        tally = self._tally(event)
        try:
            status = self._store(event, tally)
        except OperationalError as exc:  # the database is down: nothing recorded, 0xA700
            logger.error("database error, instance refused with 0xA700: %s", database_problem(exc))
            status = STATUS_OUT_OF_RESOURCES
        except Exception:
            logger.exception("unexpected error while storing an instance; answered 0xA700")
            status = STATUS_OUT_OF_RESOURCES
        if status != STATUS_SUCCESS:
            tally.failed += 1
            key = f"0x{status:04X}"
            tally.refused[key] = tally.refused.get(key, 0) + 1
        return status

    def _store(self, event: Any, tally: _AssociationTally) -> int:
        free = self.store.files.free_mb()
        if free < self.config.storage.min_free_mb:
            logger.warning("refused an instance: %.0f MiB free, below storage.min_free_mb", free)
            return STATUS_OUT_OF_RESOURCES
        request = event.request
        path = Path(event.dataset_path)
        try:
            meta = read_instance_meta(
                path,
                sop_class_uid=str(event.context.abstract_syntax),
                sop_instance_uid=str(request.AffectedSOPInstanceUID),
            )
        except RejectedInstanceError as exc:
            logger.warning("refused an instance from %s: %s", tally.calling_ae_title, exc.reason)
            return exc.status
        outcome = self.store.store(path, meta, tally.calling_ae_title)
        if outcome is StoreOutcome.DUPLICATE:
            tally.duplicates += 1
        else:
            tally.stored += 1
        return STATUS_SUCCESS
