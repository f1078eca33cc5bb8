"""STOW-RS reception (PS3.18 10.5): instances POSTed over HTTP, kept like C-STOREs.

``POST /dicomweb/studies`` (and ``/dicomweb/studies/{study}``) with a body of
``multipart/related; type="application/dicom"``: each part is one PS3.10 file. The body is
parsed as it arrives (python-multipart), never held in memory: each part goes to a temporary
file in the store's ``.incoming`` folder and, once complete, through the same path as a
C-STORE's data set: :func:`~mibi_node.reception.validation.read_instance_meta` checks it and
:meth:`~mibi_node.storage.instances.InstanceStore.store` fsyncs, renames and commits it. The
response is sent only after the last part is stored, so every instance it lists in the
Referenced SOP Sequence is as durable as one answered Success over DIMSE.

Who may send: ``reception.dicomweb.allowed_hosts`` (403 otherwise), the bearer ``token``
(401) and, with TLS, a client certificate. Like the DIMSE handlers, nothing here raises to
the client: every outcome is an HTTP status and, per instance, a Failure Reason (PS3.18
I.2.2), logged once with its reason and written to the audit trail (kind ``association``,
``service`` STOW-RS) without any UID.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import re
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from sqlalchemy.exc import OperationalError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from mibi_node import audit
from mibi_node.config import Config
from mibi_node.reception.contexts import TRANSFER_SYNTAXES, storage_sop_classes
from mibi_node.reception.validation import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_SOP_MISMATCH,
    RejectedInstanceError,
    read_instance_meta,
)
from mibi_node.storage.database import Database, database_problem
from mibi_node.storage.instances import InstanceStore, StoreOutcome

__all__ = [
    "FAILURE_PROCESSING",
    "FAILURE_SOP_CLASS_NOT_SUPPORTED",
    "FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED",
    "STOW_PATH",
    "create_stow_app",
    "store_response",
]

logger = logging.getLogger(__name__)

#: Where the studies resource is served (``<scheme>://<host>:<port>/dicomweb`` is the root).
STOW_PATH = "/dicomweb/studies"
#: Failure Reasons of PS3.18 Table I.2-2 besides the C-STORE statuses of PS3.4 B.2.3.
FAILURE_PROCESSING = 0x0110
FAILURE_SOP_CLASS_NOT_SUPPORTED = 0x0122
FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED = 0xC122
_OUT_OF_RESOURCES = 0xA700

_DICOM_JSON = "application/dicom+json"
#: A part's Content-Type, if it has one (without: the request's type, application/dicom).
_DICOM_PART = (b"", b"application/dicom")
_ACCEPTABLE = {_DICOM_JSON, "application/json", "application/*", "*/*"}
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_MAX_UID = 64


class _RefusedError(Exception):
    """The request as a whole is refused: ``status`` with one sentence, nothing stored."""

    def __init__(self, status: int, detail: str, reason: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.reason = reason


@dataclass(frozen=True)
class _Instance:
    """What became of one part: stored (``failure`` None) or not, and why."""

    sop_class_uid: str
    sop_instance_uid: str
    failure: int | None = None
    duplicate: bool = False


@dataclass
class _Checks:
    """What reception accepts, fixed at start: the node's SOP classes and transfer syntaxes."""

    sop_classes: frozenset[str]
    transfer_syntaxes: frozenset[str]
    min_free_mb: float
    ae_title: str


class _Receiver:
    """One request's parts: each written to a temporary file as it arrives, stored at its end.

    python-multipart calls back from :meth:`feed`, which runs in a worker thread: writing,
    fsyncing and committing never block the server's event loop.
    """

    def __init__(
        self, store: InstanceStore, checks: _Checks, study: str | None, boundary: bytes
    ) -> None:
        self.store = store
        self.checks = checks
        self.study = study
        #: What became of each part so far, in order.
        self.instances: list[_Instance] = []
        self._file: Any = None
        self._path: Path | None = None
        self._header = bytearray()
        self._value = bytearray()
        self._content_type = b""
        self._write_error = ""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": lambda data, start, end: self._header.extend(data[start:end]),
                "on_header_value": lambda data, start, end: self._value.extend(data[start:end]),
                "on_header_end": self._header_end,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def feed(self, chunk: bytes) -> None:
        """Parse the next bytes of the body (raises FormParserError on a malformed body)."""
        self._parser.write(chunk)

    def finish(self) -> bool:
        """Whether the body ended with its closing boundary (a complete multipart body)."""
        self._parser.finalize()
        return self._file is None and self._parser.state == MultipartState.END

    def discard(self) -> None:
        """Remove the temporary file of a part that will not be finished."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None

    # -- python-multipart callbacks ------------------------------------------------------

    def _begin(self) -> None:
        self.discard()
        self._content_type = b""
        self._write_error = ""
        try:
            handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in _end or discard
                dir=self.store.files.incoming, prefix="stow-", suffix=".dcm", delete=False
            )
        except OSError as exc:
            self._write_error = exc.strerror or str(exc)
            return
        self._file, self._path = handle, Path(handle.name)

    def _header_end(self) -> None:
        if bytes(self._header).strip().lower() == b"content-type":
            self._content_type = parse_options_header(bytes(self._value))[0]
        self._header.clear()
        self._value.clear()

    def _data(self, data: bytes, start: int, end: int) -> None:
        if self._file is None or self._content_type not in _DICOM_PART:
            return  # a part of another type is not kept
        try:
            self._file.write(data[start:end])
        except OSError as exc:  # the disk is full: this part fails, the request goes on
            self._write_error = exc.strerror or str(exc)
            self.discard()

    def _end(self) -> None:
        if self._write_error:
            logger.warning("refused an instance over STOW-RS: %s", self._write_error)
            self.instances.append(_Instance("", "", _OUT_OF_RESOURCES))
            return
        if self._file is None or self._path is None:
            return
        self._file.close()
        self._file = None
        path, self._path = self._path, None
        try:
            self.instances.append(self._store(path))
        finally:
            path.unlink(missing_ok=True)  # still there only when it was not stored

    # -- one instance ----------------------------------------------------------------------

    def _store(self, path: Path) -> _Instance:
        """Check and store one part; never raises (every outcome is a Failure Reason)."""
        sop_class = sop_instance = ""
        try:
            if self._content_type not in _DICOM_PART:
                logger.warning(
                    "refused a STOW-RS part of type %r: only application/dicom is stored",
                    self._content_type.decode("latin-1")[:64],
                )
                return _Instance("", "", STATUS_CANNOT_UNDERSTAND)
            free = self.store.files.free_mb()
            if free < self.checks.min_free_mb:
                logger.warning(
                    "refused an instance: %.0f MiB free, below storage.min_free_mb", free
                )
                return _Instance("", "", _OUT_OF_RESOURCES)
            sop_class, sop_instance, syntax = _identity(path)
            if sop_class and sop_class not in self.checks.sop_classes:
                logger.warning("refused an instance over STOW-RS: SOP class not accepted")
                return _Instance(sop_class, sop_instance, FAILURE_SOP_CLASS_NOT_SUPPORTED)
            if syntax and syntax not in self.checks.transfer_syntaxes:
                logger.warning("refused an instance over STOW-RS: transfer syntax not accepted")
                return _Instance(sop_class, sop_instance, FAILURE_TRANSFER_SYNTAX_NOT_SUPPORTED)
            meta = read_instance_meta(path, sop_class, sop_instance)
            if self.study is not None and meta.study_instance_uid != self.study:
                logger.warning("refused an instance over STOW-RS: not of the study in the URL")
                return _Instance(sop_class, sop_instance, STATUS_SOP_MISMATCH)
            outcome = self.store.store(path, meta, self.checks.ae_title)
            return _Instance(sop_class, sop_instance, duplicate=outcome is StoreOutcome.DUPLICATE)
        except RejectedInstanceError as exc:
            logger.warning("refused an instance over STOW-RS: %s", exc.reason)
            return _Instance(sop_class, sop_instance, exc.status)
        except OperationalError as exc:
            logger.error("database error, instance refused with 0xA700: %s", database_problem(exc))
            return _Instance(sop_class, sop_instance, _OUT_OF_RESOURCES)
        except Exception:
            logger.exception("unexpected error while storing an instance; refused with 0x0110")
            return _Instance(sop_class, sop_instance, FAILURE_PROCESSING)


def _identity(path: Path) -> tuple[str, str, str]:
    """SOP Class, SOP Instance and Transfer Syntax UID of a part ('' where unreadable).

    A part that cannot be read at all is left to read_instance_meta, which says why.
    """
    try:
        header = dcmread(
            path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"]
        )
        syntax = str(header.file_meta.get("TransferSyntaxUID", "") or "")
        return (
            str(header.get("SOPClassUID", "") or "").strip(),
            str(header.get("SOPInstanceUID", "") or "").strip(),
            syntax.strip(),
        )
    except Exception:  # noqa: BLE001 - whatever pydicom raises on garbage
        return "", "", ""


# -- the response --------------------------------------------------------------------------


def _reference(instance: _Instance) -> Dataset:
    item = Dataset()
    if instance.sop_class_uid:
        item.ReferencedSOPClassUID = instance.sop_class_uid
    if instance.sop_instance_uid:
        item.ReferencedSOPInstanceUID = instance.sop_instance_uid
    if instance.failure is None:
        item.add_new(0x00081190, "UR", "")  # Retrieve URL, Type 2: the node serves no WADO-RS
    else:
        item.FailureReason = instance.failure
    return item


def store_response(instances: list[_Instance]) -> tuple[int, dict[str, Any]]:
    """The HTTP status and the Store Instances Response Module (PS3.18 I.1) as DICOM JSON."""
    stored = [i for i in instances if i.failure is None]
    failed = [i for i in instances if i.failure is not None]
    response = Dataset()
    response.add_new(0x00081190, "UR", "")
    if failed:
        response.FailedSOPSequence = [_reference(i) for i in failed]
    if stored:
        response.ReferencedSOPSequence = [_reference(i) for i in stored]
    status = 200 if not failed else 202 if stored else 409
    return status, response.to_json_dict()


# -- the application -----------------------------------------------------------------------


def _address_matches(
    address: str, allowed: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
) -> bool:
    """Whether a client address is in one of the allowed networks (an IPv4 client of a
    dual-stack listener, ``::ffff:a.b.c.d``, matches IPv4 entries too)."""
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    forms: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        forms.append(ip.ipv4_mapped)
    return any(form in network for form in forms for network in allowed)


def create_stow_app(config: Config, store: InstanceStore) -> Starlette:
    """The STOW-RS application of one node (served by
    :class:`~mibi_node.reception.stow_server.StowServer`).

    Parameters
    ----------
    config
        The node's configuration (``reception.dicomweb``, the SOP classes, the disk margin).
    store
        Where the instances go: the process's database and the node's file store.
    """
    settings = config.reception.dicomweb
    token = settings.token.get_secret_value()
    allowed = tuple(ipaddress.ip_network(h, strict=False) for h in settings.allowed_hosts)
    max_bytes = int(settings.max_request_mb * (1 << 20))
    idle = config.reception.network_timeout
    checks = _Checks(
        sop_classes=frozenset(
            storage_sop_classes(
                config.reception.accept_all_storage, config.analysis_storage_classes()
            )
        ),
        transfer_syntaxes=frozenset(TRANSFER_SYNTAXES),
        min_free_mb=config.storage.min_free_mb,
        ae_title=settings.ae_title,
    )

    def check(request: Request, study: str | None) -> bytes:
        """The boundary of an acceptable request; raises _RefusedError with the reason."""
        client = request.client.host if request.client else ""
        if allowed and not _address_matches(client, allowed):
            raise _RefusedError(
                403, "this host may not store here (reception.dicomweb.allowed_hosts)", "host"
            )
        if token:
            scheme, _, presented = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                presented.strip().encode(), token.encode()
            ):
                raise _RefusedError(401, "a valid bearer token is required", "token")
        if study is not None and (len(study) > _MAX_UID or not _UID.match(study)):
            raise _RefusedError(400, "the study in the URL is not a valid UID", "bad_request")
        media, options = parse_options_header(request.headers.get("content-type", ""))
        kind = options.get(b"type", b"application/dicom").strip().lower()
        if media != b"multipart/related" or kind != b"application/dicom":
            raise _RefusedError(
                415,
                'the body must be multipart/related; type="application/dicom"',
                "media_type",
            )
        boundary = options.get(b"boundary", b"")
        if not boundary:
            raise _RefusedError(400, "the Content-Type has no boundary", "bad_request")
        accept = request.headers.get("accept", "")
        if (
            accept
            and not {a.split(";")[0].strip().lower() for a in accept.split(",")} & _ACCEPTABLE
        ):
            raise _RefusedError(406, "the response is application/dicom+json only", "accept")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_bytes:
            raise _RefusedError(413, _too_large(settings.max_request_mb), "too_large")
        return boundary

    async def post(request: Request) -> Response:
        started = time.monotonic()
        study = request.path_params.get("study")
        client = request.client.host if request.client else ""
        actor = f"{settings.ae_title}@{client}"
        try:
            boundary = check(request, study)
        except _RefusedError as refused:
            logger.info("STOW-RS request from %s refused: %s", client, refused.detail)
            await run_in_threadpool(_audit_refusal, store.database, actor, refused)
            headers = {"WWW-Authenticate": 'Bearer realm="mibi-node"'}
            return JSONResponse(
                {"detail": refused.detail},
                status_code=refused.status,
                headers=headers if refused.status == 401 else None,
            )
        receiver = _Receiver(store, checks, study, boundary)
        outcome, problem, cut = "released", "", 0
        try:
            received = 0
            async for chunk in _chunks(request, idle):
                received += len(chunk)
                if received > max_bytes:
                    raise _RefusedError(413, _too_large(settings.max_request_mb), "too_large")
                await run_in_threadpool(receiver.feed, chunk)
            if not await run_in_threadpool(receiver.finish):
                problem = "the multipart body ends before its closing boundary"
        except _RefusedError as refused:
            outcome, problem, cut = "aborted", refused.detail, refused.status
        except FormParserError:
            problem = "the multipart body is malformed"
        except ClientDisconnect:
            outcome, problem, cut = "aborted", "the client closed the connection", 400
        except TimeoutError:
            outcome, problem, cut = "aborted", f"the client sent nothing for {idle:g} s", 408
        except Exception:  # never a traceback to the client; the parts stored stay stored
            logger.exception("unexpected error while receiving a STOW-RS request")
            outcome, problem, cut = "aborted", "internal error (see the node's log)", 500
        finally:
            await run_in_threadpool(receiver.discard)
        instances = receiver.instances
        response: Response
        if cut:
            # What was stored before stays stored; a client that sends again gets duplicates.
            response = JSONResponse({"detail": problem}, status_code=cut)
        elif not instances:
            outcome, problem = "rejected", problem or "the request holds no part"
            response = JSONResponse({"detail": problem}, status_code=400)
        else:
            # Parts after a syntax error are not listed: the client sees them missing.
            status, body = store_response(instances)
            if problem and status == 200:
                status = 202
            response = JSONResponse(body, status_code=status, media_type=_DICOM_JSON)
        await run_in_threadpool(
            _audit_request,
            store.database,
            actor,
            outcome,
            problem,
            instances,
            time.monotonic() - started,
        )
        return response

    async def other(request: Request, exc: Exception) -> Response:
        """Any other path or method: 404 or 405, as JSON like every answer here."""
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        detail = "only POST /dicomweb/studies[/{study}] (STOW-RS) is served here"
        return JSONResponse({"detail": detail}, status_code=status)

    routes = [
        Route(STOW_PATH, post, methods=["POST"]),
        Route(STOW_PATH + "/{study}", post, methods=["POST"]),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: other})


async def _chunks(request: Request, idle: float) -> AsyncIterator[bytes]:
    """The request body as it arrives; TimeoutError when the client sends nothing for
    ``idle`` seconds (a stalled upload must not hold a temporary file for ever)."""
    stream = request.stream().__aiter__()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle)
        except StopAsyncIteration:
            return
        if chunk:
            yield chunk


def _too_large(limit_mb: float) -> str:
    return f"the request is larger than reception.dicomweb.max_request_mb ({limit_mb:g} MiB)"


def _audit_refusal(database: Database, actor: str, refused: _RefusedError) -> None:
    with contextlib.suppress(OperationalError):
        audit.record(
            database,
            "association",
            "rejected",
            actor=actor,
            message=refused.detail,
            detail={"service": "STOW-RS", "reason": refused.reason, "http": refused.status},
        )


def _audit_request(
    database: Database,
    actor: str,
    outcome: str,
    problem: str,
    instances: list[_Instance],
    seconds: float,
) -> None:
    """The request's line and audit row: counts only (no UID), as for an association."""
    refused = Counter(f"0x{i.failure:04X}" for i in instances if i.failure is not None)
    duplicates = sum(i.duplicate for i in instances if i.failure is None)
    stored = sum(i.failure is None for i in instances) - duplicates
    logger.info(
        "STOW-RS request from %s %s after %.1f s: %d stored, %d duplicate, %d refused%s",
        actor,
        outcome,
        seconds,
        stored,
        duplicates,
        sum(refused.values()),
        f" ({problem})" if problem else "",
    )
    detail: dict[str, Any] = {
        "service": "STOW-RS",
        "stored": stored,
        "duplicates": duplicates,
        "refused": sum(refused.values()),
        "refused_by_status": dict(refused),
        "seconds": round(seconds, 3),
    }
    if outcome == "rejected":  # a body that holds no instance at all
        detail.update(reason="bad_request", http=400)
    with contextlib.suppress(OperationalError):
        audit.record(database, "association", outcome, actor=actor, message=problem, detail=detail)
