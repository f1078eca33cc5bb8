"""The Storage SCU: sends the node's results (the SR, the key image) to a PACS with C-STORE.

One association per call and one C-STORE per file. Nothing the network, the peer or a file
does raises: every file gets a :class:`SendResult` whose message says in one sentence what
happened, for the node's delivery rows and ``mibi-node status``.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from mibi_node.dispatch.destinations import Destination, DestinationTLS, check_ae_title

__all__ = ["SUCCESS_STATUSES", "SendResult", "send_file", "send_files"]

logger = logging.getLogger(__name__)

#: C-STORE statuses after which the PACS holds the instance: success and the warnings
#: (PS3.4 B.2.3; 0x0107 and 0x0116 are the general warnings of PS3.7 C).
SUCCESS_STATUSES = frozenset({0x0000, 0xB000, 0xB006, 0xB007, 0x0107, 0x0116})

_STATUS_MEANINGS = {
    0x0000: "success",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorised",
    0x0210: "duplicate invocation",
    0x0211: "unrecognised operation",
    0x0212: "mistyped argument",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
# Storage service ranges (PS3.4 B.2.3), by the status's high byte or nibble.
_STATUS_RANGES = (
    (0xFF00, 0xA700, "out of resources"),
    (0xFF00, 0xA900, "data set does not match SOP class"),
    (0xF000, 0xC000, "cannot understand"),
)

# A-ASSOCIATE-RJ (source, diagnostic) -> why, PS3.8 7.1.1.9.
_REJECT_REASONS = {
    (1, 1): "no reason given",
    (1, 2): "application context name not supported",
    (1, 3): "calling AE title {calling!r} not recognised",
    (1, 7): "called AE title {called!r} not recognised",
    (2, 1): "no reason given",
    (2, 2): "protocol version not supported",
    (3, 1): "temporary congestion",
    (3, 2): "local limit exceeded",
}

# Presentation context results (PS3.8 9.3.3.2).
_CONTEXT_REFUSALS = {
    1: "refused by the PACS",
    2: "refused, no reason given",
    3: "SOP class not supported",
    4: "none of the proposed transfer syntaxes supported",
}

# pynetdicom accepts at most 128 presentation contexts in one association request.
_MAX_CONTEXTS = 128
# A failure this close to the timeout is reported as the timeout itself.
_TIMEOUT_SHARE = 0.9


@dataclass(frozen=True)
class SendResult:
    """The outcome of sending one file.

    Attributes
    ----------
    success
        The PACS holds the instance: status 0x0000 or a warning in ``SUCCESS_STATUSES``.
    status
        The C-STORE response's DIMSE status; ``None`` when no response came.
    message
        One sentence for people: what the PACS answered, or why nothing was sent.
    seconds
        Time taken by this file's C-STORE, or by the association attempt that failed.
    """

    success: bool
    status: int | None
    message: str
    seconds: float


@dataclass(frozen=True)
class _File:
    index: int
    path: Path
    sop_class_uid: UID
    transfer_syntax_uid: UID


def send_file(
    path: Path, destination: Destination, *, calling_ae_title: str, timeout: float = 30.0
) -> SendResult:
    """Send one file; see :func:`send_files`."""
    return send_files([path], destination, calling_ae_title=calling_ae_title, timeout=timeout)[0]


def send_files(
    paths: Sequence[Path],
    destination: Destination,
    *,
    calling_ae_title: str,
    timeout: float = 30.0,
) -> list[SendResult]:
    """Store ``paths`` on ``destination`` over one association, one C-STORE per file.

    Each file is sent as stored, byte for byte, when the PACS accepts its transfer syntax;
    otherwise it is decoded and sent in the uncompressed syntax the PACS accepted.

    Parameters
    ----------
    paths
        DICOM files (with File Meta Information).
    destination
        The PACS, with its TLS settings.
    calling_ae_title
        The node's own AE title.
    timeout
        Seconds to wait for the TCP connection, the association answer and each C-STORE
        response (the ACSE, DIMSE and network timeouts).

    Returns
    -------
    list[SendResult]
        One per path, in order.

    Raises
    ------
    ValueError
        When ``calling_ae_title`` is not a valid AE title or ``timeout`` is not positive;
        never for what the network, the PACS or the files do.
    """
    try:
        calling_ae_title = check_ae_title(calling_ae_title)
    except ValueError as exc:
        raise ValueError(f'Argument "calling_ae_title" is not a valid AE title: {exc}.') from None
    if not timeout > 0:
        raise ValueError('Argument "timeout" should be a positive number of seconds.')
    started = time.monotonic()
    results: dict[int, SendResult] = {}
    files: list[_File] = []
    for index, path in enumerate(paths):
        file_or_problem = _read_meta(index, Path(path))
        if isinstance(file_or_problem, str):
            logger.debug("Not sending %s: %s", path, file_or_problem)
            results[index] = SendResult(False, None, file_or_problem, 0.0)
        else:
            files.append(file_or_problem)
    association_problem = ""
    if files:
        sent, association_problem = _send_over_association(
            files, destination, calling_ae_title, timeout
        )
        results.update(sent)
    ordered = [results[index] for index in range(len(paths))]
    stored = sum(result.success for result in ordered)
    summary = (
        f"C-STORE to {destination.label}: {stored} of {len(ordered)} files stored "
        f"in {time.monotonic() - started:.2f} s"
    )
    if association_problem:
        summary += f": {association_problem}"
    logger.log(logging.INFO if stored == len(ordered) else logging.WARNING, summary)
    return ordered


# -- files ----------------------------------------------------------------------------------


def _read_meta(index: int, path: Path) -> _File | str:
    """The file's SOP class and transfer syntax, or why it cannot be sent."""
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError:
        return f"{path} is not a DICOM file (no 'DICM' prefix after the 128-byte preamble)"
    except FileNotFoundError:
        return f"{path} does not exist"
    except OSError as exc:
        return f"{path} cannot be read: {exc.strerror or exc}"
    except Exception as exc:  # pydicom raises many kinds of errors on a corrupt header
        return f"{path} has unreadable File Meta Information: {exc}"
    keywords = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    missing = [keyword for keyword in keywords if not meta.get(keyword)]
    if missing:
        return f"{path} has no {' or '.join(missing)} in its File Meta Information"
    return _File(
        index=index,
        path=path,
        sop_class_uid=UID(str(meta.MediaStorageSOPClassUID)),
        transfer_syntax_uid=UID(str(meta.TransferSyntaxUID)),
    )


def _requested_contexts(files: Sequence[_File]) -> list[tuple[UID, list[UID]]]:
    """One context per (SOP class, transfer syntax) of the files, with the uncompressed
    little endian syntaxes as fallbacks (PACS that do not take a compressed syntax)."""
    contexts: dict[tuple[UID, UID], list[UID]] = {}
    for file in files:
        key = (file.sop_class_uid, file.transfer_syntax_uid)
        syntaxes = [file.transfer_syntax_uid, ExplicitVRLittleEndian, ImplicitVRLittleEndian]
        contexts.setdefault(key, list(dict.fromkeys(syntaxes)))
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in contexts.items()]


def _decoded(file: _File) -> Dataset:
    """The file's data set, decompressed if need be, for pynetdicom to re-encode."""
    dataset = dcmread(file.path)
    if dataset.file_meta.TransferSyntaxUID.is_compressed:
        dataset.decompress()
    return dataset


# -- association ----------------------------------------------------------------------------


def _send_over_association(
    files: Sequence[_File], destination: Destination, calling_ae_title: str, timeout: float
) -> tuple[dict[int, SendResult], str]:
    """Send ``files`` over one association; the results, and a problem common to all."""
    started = time.monotonic()

    def fail_all(problem: str) -> tuple[dict[int, SendResult], str]:
        seconds = time.monotonic() - started
        logger.debug("Association with %s failed: %s", destination.label, problem)
        return {file.index: SendResult(False, None, problem, seconds) for file in files}, problem

    tls_context: ssl.SSLContext | None = None
    if destination.tls.enabled:
        try:
            tls_context = _ssl_context(destination.tls)
        except (OSError, ssl.SSLError) as exc:
            return fail_all(f"cannot load the TLS certificates or key: {exc}")

    contexts = _requested_contexts(files)
    too_many = {(sop_class, syntaxes[0]) for sop_class, syntaxes in contexts[_MAX_CONTEXTS:]}
    ae = AE(ae_title=calling_ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for sop_class, syntaxes in contexts[:_MAX_CONTEXTS]:
        ae.add_requested_context(sop_class, syntaxes)
    # Send files as they are stored, streamed from disk: no decoding, no copy in memory.
    _config.STORE_SEND_CHUNKED_DATASET = True

    connected = threading.Event()
    try:
        association = ae.associate(
            destination.host,
            destination.port,
            ae_title=destination.ae_title,
            tls_args=None if tls_context is None else (tls_context, destination.host),
            evt_handlers=[(evt.EVT_CONN_OPEN, lambda event: connected.set())],
        )
    except socket.gaierror as exc:
        return fail_all(f"cannot resolve host name {destination.host!r}: {exc.strerror}")
    except OSError as exc:
        return fail_all(f"cannot connect to {destination.address}: {exc.strerror or exc}")

    if not association.is_established:
        if not _all_contexts_refused(association):
            elapsed = time.monotonic() - started
            return fail_all(
                _association_failure(
                    association, destination, tls_context, connected.is_set(), elapsed, timeout
                )
            )
        refused = {file.index: _refused(association, file) for file in files}
        return refused, "PACS accepted none of the proposed SOP classes and transfer syntaxes"

    results: dict[int, SendResult] = {}
    ended = ""
    try:
        for file in files:
            if (file.sop_class_uid, file.transfer_syntax_uid) in too_many:
                message = f"not sent: more than {_MAX_CONTEXTS} kinds of file in one call"
                results[file.index] = SendResult(False, None, message, 0.0)
            elif ended:
                results[file.index] = SendResult(False, None, f"not sent: {ended}", 0.0)
            else:
                results[file.index] = _store(association, file, timeout)
                if not association.is_established:
                    ended = "the association ended while storing an earlier file"
    finally:
        if association.is_established:
            association.release()
    return results, ""


def _ssl_context(tls: DestinationTLS) -> ssl.SSLContext:
    # With ca_certificates, trust that authority only; otherwise the system's.
    cafile = None if tls.ca_certificates is None else str(tls.ca_certificates)
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=cafile)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = tls.check_hostname
    if tls.certificate is not None:
        context.load_cert_chain(tls.certificate, tls.private_key)
    return context


def _all_contexts_refused(association: Association) -> bool:
    """The PACS accepted the association but none of its contexts (pynetdicom aborts)."""
    answer = association.acceptor.primitive
    return answer is not None and answer.result == 0x00 and not association.accepted_contexts


def _association_failure(
    association: Association,
    destination: Destination,
    tls_context: ssl.SSLContext | None,
    connected: bool,
    elapsed: float,
    timeout: float,
) -> str:
    """Why the association was not established, in one sentence."""
    answer = association.acceptor.primitive
    if association.is_rejected and answer is not None:
        source, diagnostic = answer.result_source or 0, answer.diagnostic or 0
        reason = _REJECT_REASONS.get(
            (source, diagnostic), f"source {source}, diagnostic {diagnostic}"
        ).format(called=destination.ae_title, calling=association.requestor.ae_title)
        transient = " for now" if answer.result == 0x02 else ""
        return f"PACS refused the association{transient}: {reason}"
    if not connected:
        if elapsed >= _TIMEOUT_SHARE * timeout:
            return f"no answer from {destination.address} within {timeout:g} s"
        return _connection_failure(destination, tls_context, timeout)
    if answer is None and elapsed >= _TIMEOUT_SHARE * timeout:
        return f"no answer to the association request within {timeout:g} s"
    if tls_context is not None:
        hint = " (over TLS this often means the PACS did not accept our client certificate)"
    else:
        hint = " (if that port expects DICOM TLS, enable tls for this destination)"
    return f"{destination.address} closed the connection before accepting the association{hint}"


def _connection_failure(
    destination: Destination, tls_context: ssl.SSLContext | None, timeout: float
) -> str:
    """Why the connection failed: pynetdicom only logs the reason, so try once more."""
    address = destination.address
    try:
        with socket.create_connection((destination.host, destination.port), timeout) as raw:
            if tls_context is not None:
                with tls_context.wrap_socket(raw, server_hostname=destination.host):
                    pass
    except ConnectionRefusedError:
        return f"connection refused by {address}"
    except TimeoutError:
        return f"no answer from {address} within {timeout:g} s"
    except ssl.SSLCertVerificationError as exc:
        why = exc.verify_message
        return f"TLS handshake with {address} failed: PACS certificate not trusted ({why})"
    except ssl.SSLError as exc:
        return f"TLS handshake with {address} failed: {exc.reason or exc}"
    except socket.gaierror as exc:
        return f"cannot resolve host name {destination.host!r}: {exc.strerror}"
    except OSError as exc:
        return f"cannot connect to {address}: {exc.strerror or exc}"
    return f"connection to {address} failed (a second attempt succeeded)"


# -- C-STORE --------------------------------------------------------------------------------


def _store(association: Association, file: _File, timeout: float) -> SendResult:
    """One C-STORE; its result."""
    started = time.monotonic()
    accepted = [
        context
        for context in association.accepted_contexts
        if context.abstract_syntax == file.sop_class_uid
    ]
    if not accepted:
        return _refused(association, file)
    as_stored = any(context.transfer_syntax[0] == file.transfer_syntax_uid for context in accepted)
    try:
        response = association.send_c_store(file.path if as_stored else _decoded(file))
    except Exception as exc:  # a file that changed, or cannot be decoded or re-encoded
        logger.debug("C-STORE of %s failed before sending", file.path, exc_info=True)
        return SendResult(
            False, None, f"{file.path} could not be sent: {exc}", time.monotonic() - started
        )
    seconds = time.monotonic() - started
    if "Status" not in response:
        # pynetdicom gives an empty status for a timeout, an abort or an invalid response;
        # in each case the association is, or is about to be, aborted.
        if seconds >= _TIMEOUT_SHARE * timeout:
            message = f"no response within {timeout:g} s"
        else:
            message = "the PACS ended the association without a valid C-STORE response"
        if association.is_established:
            association.abort()
        logger.debug("C-STORE of %s: %s", file.path, message)
        return SendResult(False, None, message, seconds)
    status = int(response.Status)
    message = _status_message(status, str(response.get("ErrorComment", "")).strip())
    logger.debug("C-STORE of %s: %s in %.3f s", file.path, message, seconds)
    return SendResult(status in SUCCESS_STATUSES, status, message, seconds)


def _refused(association: Association, file: _File) -> SendResult:
    """The PACS accepted no presentation context for the file's SOP class."""
    results = [
        context.result
        for context in association.rejected_contexts
        if context.abstract_syntax == file.sop_class_uid and context.result is not None
    ]
    refusal = _CONTEXT_REFUSALS.get(results[0] if results else 1, "refused by the PACS")
    return SendResult(False, None, f"PACS does not take {file.sop_class_uid.name}: {refusal}", 0.0)


def _status_meaning(status: int) -> str:
    if status in _STATUS_MEANINGS:
        return _STATUS_MEANINGS[status]
    for mask, value, meaning in _STATUS_RANGES:
        if status & mask == value:
            return meaning
    return "unknown status"


def _status_message(status: int, comment: str) -> str:
    meaning = _status_meaning(status)
    if status == 0x0000:
        message = "stored (status 0x0000)"
    elif status in SUCCESS_STATUSES:
        message = f"stored with warning 0x{status:04X} ({meaning})"
    else:
        message = f"status 0x{status:04X} ({meaning})"
    return f"{message}: {comment}" if comment else message
