"""The STOW-RS sender: the node's results to a DICOMweb origin server (PS3.18 10.5).

One POST of every file to ``<url>/studies`` with dicomweb-client's
:meth:`~dicomweb_client.DICOMwebClient.store_instances` (its own retries off: the delivery
rows retry). The server's Store Instances Response names each instance it stored
(Referenced SOP Sequence) and each it refused with a Failure Reason (Failed SOP Sequence);
a file counts as delivered only when the response names it as stored. That answer is the
confirmation: storage commitment has no DICOMweb counterpart and is not asked.

Like :func:`~mibi_node.dispatch.scu.send_files`, nothing the network, the server or a file
does raises: every file gets a :class:`~mibi_node.dispatch.scu.SendResult` whose message
says in one sentence what happened.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import requests
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataset import Dataset

from mibi_node.dispatch.destinations import DicomwebDestination
from mibi_node.dispatch.scu import SendResult

__all__ = ["store_instances"]

logger = logging.getLogger(__name__)
# dicomweb-client's retry decorator logs every failed request with its traceback at WARNING,
# even with retries off; the delivery's own line says the same in one sentence.
logging.getLogger("retrying").setLevel(logging.ERROR)

#: Failure and Warning Reasons of PS3.18 Table I.2-1 and I.2-2 (ranges by their high byte).
_REASONS = {
    0x0110: "processing failure",
    0x0122: "SOP class not supported",
    0xC122: "transfer syntax not supported",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}
_REASON_RANGES = (
    (0xFF00, 0xA700, "out of resources"),
    (0xFF00, 0xA900, "data set does not match SOP class"),
    (0xF000, 0xC000, "cannot understand"),
)
_HTTP_HINTS = {
    401: "the token or user name and password were refused",
    403: "the server refuses this node",
    404: "no STOW-RS service at that address (is url the DICOMweb root?)",
    405: "no STOW-RS service at that address (is url the DICOMweb root?)",
    409: "the server stored none of the instances",
    413: "the server takes no request this large",
    415: "the server does not take multipart/related application/dicom",
}


def store_instances(
    paths: Sequence[Path], destination: DicomwebDestination, *, timeout: float = 30.0
) -> list[SendResult]:
    """Store ``paths`` on ``destination`` with one STOW-RS request.

    Parameters
    ----------
    paths
        DICOM files (with File Meta Information).
    destination
        The origin server, with its credentials (from the configuration, not the database).
    timeout
        Seconds to wait for the connection and for the response.

    Returns
    -------
    list[SendResult]
        One per path, in order: ``status`` is 0x0000 for an instance the response lists as
        stored (its Warning Reason if it has one), its Failure Reason for one it lists as
        refused, ``None`` when no per-instance answer came.

    Raises
    ------
    ValueError
        When ``timeout`` is not positive; never for what the network, the server or the
        files do.
    """
    if not timeout > 0:
        raise ValueError('Argument "timeout" should be a positive number of seconds.')
    started = time.monotonic()
    results: dict[int, SendResult] = {}
    datasets: dict[int, Dataset] = {}
    for index, path in enumerate(paths):
        try:
            datasets[index] = dcmread(path)
        except FileNotFoundError:
            results[index] = SendResult(False, None, f"{path} does not exist", 0.0)
        except Exception as exc:  # pydicom raises many kinds of errors on a corrupt file
            results[index] = SendResult(False, None, f"{path} cannot be read: {exc}", 0.0)
    if datasets:
        results.update(_post(datasets, destination, timeout))
    ordered = [results[index] for index in range(len(paths))]
    stored = sum(result.success for result in ordered)
    summary = (
        f"STOW-RS to {destination.label}: {stored} of {len(ordered)} files stored "
        f"in {time.monotonic() - started:.2f} s"
    )
    if stored < len(ordered):
        summary += f": {next(r.message for r in ordered if not r.success)}"
    logger.log(logging.INFO if stored == len(ordered) else logging.WARNING, summary)
    return ordered


def _session(destination: DicomwebDestination) -> requests.Session:
    session = requests.Session()
    token = destination.token.get_secret_value()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    elif destination.username:
        session.auth = (destination.username, destination.password.get_secret_value())
    if destination.ca_certificates is not None:
        session.verify = str(destination.ca_certificates)
        # requests lets REQUESTS_CA_BUNDLE / CURL_CA_BUNDLE override a session's CA file:
        # the configured one must win (this also leaves the environment's proxies unused).
        session.trust_env = False
    if destination.certificate is not None:
        key = destination.private_key
        session.cert = (
            str(destination.certificate)
            if key is None
            else (str(destination.certificate), str(key))
        )
    return session


def _post(
    datasets: dict[int, Dataset], destination: DicomwebDestination, timeout: float
) -> dict[int, SendResult]:
    """POST the data sets; a result for each, from the response or from why none came."""
    started = time.monotonic()
    url = f"{destination.url}/studies"

    def every(message: str, status: int | None = None) -> dict[int, SendResult]:
        seconds = time.monotonic() - started
        return {index: SendResult(False, status, message, seconds) for index in datasets}

    session = _session(destination)
    codes: list[int] = []  # the HTTP status, which dicomweb-client does not return
    session.hooks["response"].append(
        lambda answer, *args, **kwargs: codes.append(answer.status_code)
    )
    try:
        client = DICOMwebClient(destination.url, session=session, timeout=timeout)
        client.set_http_retry_params(retry=False)
        response = client.store_instances(list(datasets.values()))
        http = codes[-1] if codes else 200
    except requests.HTTPError as exc:
        answer = exc.response
        code = answer.status_code if answer is not None else 0
        body = _response_dataset(answer)
        if code == 409 and body is not None and "FailedSOPSequence" in body:
            return _per_instance(datasets, body, code, time.monotonic() - started)
        said = f" {answer.reason}" if answer is not None and answer.reason else ""
        hint = _HTTP_HINTS.get(code, "server error" if code >= 500 else "request refused")
        return every(f"HTTP {code}{said} from {url}: {hint}")
    except requests.Timeout:
        return every(f"no answer from {url} within {timeout:g} s")
    except requests.ConnectionError as exc:  # SSLError among them
        return every(_connection_problem(url, exc, destination.certificate is None))
    except Exception as exc:  # a data set that cannot be encoded, a malformed response
        logger.debug("STOW-RS to %s failed", destination.label, exc_info=True)
        return every(f"STOW-RS to {url} failed: {exc}")
    finally:
        session.close()
    return _per_instance(datasets, response, http, time.monotonic() - started)


def _response_dataset(answer: Any) -> Dataset | None:
    """The Store Instances Response of an error answer, when it carries one."""
    if answer is None or "json" not in answer.headers.get("Content-Type", ""):
        return None
    try:
        return Dataset.from_json(answer.json())
    except Exception:  # noqa: BLE001 - not DICOM JSON after all
        return None


def _per_instance(
    datasets: dict[int, Dataset], response: Dataset, http: int, seconds: float
) -> dict[int, SendResult]:
    """Each data set's fate as the Store Instances Response tells it."""
    stored = {
        str(item.get("ReferencedSOPInstanceUID", "")): item
        for item in response.get("ReferencedSOPSequence", [])
    }
    failed = {
        str(item.get("ReferencedSOPInstanceUID", "")): item
        for item in response.get("FailedSOPSequence", [])
    }
    results = {}
    for index, dataset in datasets.items():
        uid = str(dataset.get("SOPInstanceUID", ""))
        if uid in stored:
            warning = stored[uid].get("WarningReason")
            if warning is None:
                result = SendResult(True, 0x0000, f"stored (HTTP {http})", seconds)
            else:
                meaning = _reason(int(warning))
                message = f"stored with warning 0x{int(warning):04X} ({meaning}) (HTTP {http})"
                result = SendResult(True, int(warning), message, seconds)
        elif uid in failed and failed[uid].get("FailureReason") is not None:
            reason = int(failed[uid].FailureReason)
            message = f"not stored: Failure Reason 0x{reason:04X} ({_reason(reason)}) (HTTP {http})"
            result = SendResult(False, reason, message, seconds)
        else:
            message = f"HTTP {http}, but the response does not list the instance as stored"
            result = SendResult(False, None, message, seconds)
        results[index] = result
    return results


def _reason(value: int) -> str:
    if value in _REASONS:
        return _REASONS[value]
    for mask, prefix, meaning in _REASON_RANGES:
        if value & mask == prefix:
            return meaning
    return "unknown reason"


def _address(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if parts.hostname and ":" in parts.hostname else parts.hostname
    return f"{host}:{port}"


def _root(exc: BaseException) -> BaseException:
    """The innermost cause of a requests/urllib3 error (they wrap it two or three deep)."""
    seen: set[int] = set()
    current: BaseException = exc
    while id(current) not in seen:
        seen.add(id(current))
        inner = getattr(current, "reason", None)
        if not isinstance(inner, BaseException):
            inner = current.__cause__ or current.__context__
        if inner is None and current.args and isinstance(current.args[0], BaseException):
            inner = current.args[0]
        if not isinstance(inner, BaseException):
            return current
        current = inner
    return current


def _connection_problem(url: str, exc: requests.ConnectionError, no_certificate: bool) -> str:
    """One sentence for a connection that failed: refused, unknown host, and so on."""
    address = _address(url)
    root = _root(exc)
    # Under TLS 1.3 a server that wants a client certificate says so only by hanging up,
    # during the handshake or just after it.
    hint = " (does it demand a client certificate?)" if no_certificate else ""
    if isinstance(root, http.client.RemoteDisconnected | ssl.SSLEOFError):
        hint = hint if url.startswith("https:") else ""
        return f"{address} closed the connection without a response{hint}"
    if isinstance(root, ssl.SSLCertVerificationError):
        why = root.verify_message
        return f"TLS handshake with {address} failed: server certificate not trusted ({why})"
    if isinstance(root, ConnectionRefusedError):
        return f"connection refused by {address}"
    if isinstance(root, socket.gaierror):
        return f"cannot resolve host name {urlsplit(url).hostname!r}: {root.strerror}"
    if isinstance(root, ssl.SSLError):
        return f"TLS handshake with {address} failed: {root.reason or root}"
    if isinstance(root, TimeoutError):
        return f"no answer from {address}"
    text = str(root)
    if "Connection refused" in text:  # urllib3 may keep only the text of the errno
        return f"connection refused by {address}"
    return f"cannot connect to {address}: {text}"
