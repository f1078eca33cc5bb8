"""Real viewers for tests: OHIF v3 in front of Orthanc's DICOMweb, and headless Chromium.

    dist = ohif_dist()                                  # or skip: scripts/install-viewer.sh
    with OrthancServer(folder, dicomweb=True) as pacs, ViewerServer(dist, pacs) as viewer:
        with Browser(tmp_path / "chromium") as browser:
            browser.open(viewer.study_url(study_uid))
            browser.wait_for("document.querySelector('canvas') !== null", "a canvas")
            pixels = browser.screenshot(tmp_path / "ohif.png")

:class:`ViewerServer` serves OHIF's built app (``scripts/install-viewer.sh`` unpacks it from
the npm package ``@ohif/app``) with a generated ``app-config.js`` whose data source is
Orthanc's DICOMweb root, and passes ``/dicom-web/`` through to Orthanc: one origin, so the
browser needs no CORS. :class:`Browser` drives Chromium over the DevTools protocol, because
OHIF loads asynchronously (web workers decode the pixels) and Chromium's command-line
``--screenshot`` cannot wait for a condition; the WebSocket under it is the few lines of
RFC 6455 the protocol needs, from the standard library.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

import numpy as np
import pytest
from PIL import Image

from orthanc import OrthancServer

__all__ = [
    "ARTEFACTS",
    "OHIF_VERSION",
    "Browser",
    "ViewerServer",
    "chromium_binary",
    "keep_artefact",
    "ohif_dist",
    "poll",
]

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[1]
#: The OHIF release scripts/install-viewer.sh installs (keep the two in step).
OHIF_VERSION = "3.13.2"
#: Screenshots of the viewer tests are copied here (var/ is ignored by git).
ARTEFACTS = ROOT / "var" / "test-artefacts" / "viewers"


def ohif_dist() -> Path:
    """OHIF's built app (its ``index.html`` folder), or skip the test with the reason."""
    dist = ROOT / "var" / "viewers" / f"ohif-{OHIF_VERSION}"
    if not (dist / "index.html").is_file():
        pytest.skip(f"OHIF {OHIF_VERSION} is not installed: run scripts/install-viewer.sh")
    return dist


def chromium_binary() -> str:
    """The Chromium executable, or skip the test with the reason."""
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("chromium is not installed: run scripts/install-peers.sh (needs root)")


def keep_artefact(path: Path, test_name: str) -> Path:
    """Copy a screenshot into :data:`ARTEFACTS` (``<test>-<file name>``); returns the copy."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    target = ARTEFACTS / f"{test_name}-{path.name}"
    shutil.copyfile(path, target)
    return target


# -- OHIF behind one origin -------------------------------------------------------------

#: ``app-config.js``: OHIF's data source is Orthanc's DICOMweb plugin through this server;
#: the onboarding tour and the investigational-use banner would cover the viewport.
#: ``onBeforeSRAddMeasurement`` gives a measurement group without image coordinates (TID
#: 1501) an empty one: OHIF 3.13 otherwise stops with "Cannot read properties of
#: undefined (reading 'ReferencedSOPSequence')" on such a group, and the whole SR with it.
APP_CONFIG = """window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 2,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: false,
  investigationalUseDialog: { option: 'never' },
  customizationService: {
    'ohif.tours': { $set: [] },
    onBeforeSRAddMeasurement: {
      $set: ({ measurement }) => {
        if (!measurement.coords.length) {
          measurement.coords.push({});
        }
        return measurement;
      },
    },
  },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc DICOMweb',
        name: 'orthanc',
        wadoUriRoot: window.location.origin + '/dicom-web',
        qidoRoot: window.location.origin + '/dicom-web',
        wadoRoot: window.location.origin + '/dicom-web',
        qidoSupportsIncludeField: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video,pdf',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
"""


class ViewerServer:
    """OHIF's built app and Orthanc's DICOMweb on one loopback origin; a context manager.

    Parameters
    ----------
    dist
        OHIF's built app (:func:`ohif_dist`).
    pacs
        A started Orthanc with its DICOMweb plugin (``OrthancServer(..., dicomweb=True)``).
    """

    def __init__(self, dist: Path, pacs: OrthancServer) -> None:
        self.dist = dist
        self.pacs = pacs
        self.requests: list[str] = []
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The server's root, ``http://127.0.0.1:<port>/``."""
        if self._server is None:
            raise RuntimeError("the viewer server is not started")
        return f"http://127.0.0.1:{self._server.server_address[1]}/"

    def study_url(self, study_instance_uid: str, **params: str) -> str:
        """OHIF's viewer for one study; ``params`` (``initialSeriesInstanceUID`` ...) added."""
        query = "".join(f"&{key}={quote(value)}" for key, value in params.items())
        return f"{self.url}viewer?StudyInstanceUIDs={quote(study_instance_uid)}{query}"

    def start(self) -> ViewerServer:
        handler = _handler(self.dist, f"http://127.0.0.1:{self.pacs.http_port}", self.requests)
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> ViewerServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _handler(
    dist: Path, orthanc: str, log: list[str]
) -> type[http.server.SimpleHTTPRequestHandler]:
    class Handler(http.server.SimpleHTTPRequestHandler):
        extensions_map = {
            **http.server.SimpleHTTPRequestHandler.extensions_map,
            ".js": "text/javascript",
            ".wasm": "application/wasm",
            ".json": "application/json",
        }

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(dist), **kwargs)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
            log.append(format % args)

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            if path.startswith("/dicom-web/"):
                self._proxy()
            elif path == "/app-config.js":
                self._reply(200, "text/javascript", APP_CONFIG.encode())
            else:
                # A single-page app: every route of OHIF's is its index.html.
                if not (dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"
                super().do_GET()

        def _proxy(self) -> None:
            headers = {"Accept": self.headers.get("Accept", "*/*")}
            request = urllib.request.Request(f"{orthanc}{self.path}", headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    status, content_type = response.status, response.headers["Content-Type"]
                    body = response.read()
            except urllib.error.HTTPError as error:
                status, content_type = error.code, error.headers.get("Content-Type", "text/plain")
                body = error.read()
            self._reply(status, content_type or "application/octet-stream", body)

        def _reply(self, status: int, content_type: str, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


# -- Chromium over the DevTools protocol --------------------------------------------------


class Browser:
    """Headless Chromium driven over the DevTools protocol; a context manager.

    Parameters
    ----------
    folder
        Its profile and log go here (one per browser).
    size
        Width and height of the page in CSS pixels (device scale 1).
    """

    def __init__(self, folder: Path, size: tuple[int, int] = (1400, 900)) -> None:
        self.folder = folder
        self.size = size
        self.log_path = folder / "chromium.log"
        self.console: list[str] = []
        self._process: subprocess.Popen[bytes] | None = None
        self._socket: _WebSocket | None = None
        self._next_id = 0

    def start(self, timeout: float = 60.0) -> Browser:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                [
                    chromium_binary(),
                    "--headless",
                    "--no-sandbox",  # tests run as root in CI
                    "--enable-unsafe-swiftshader",  # WebGL in software, as OHIF wants it
                    "--hide-scrollbars",
                    "--no-first-run",
                    "--no-default-browser-check",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={self.folder / 'profile'}",
                    f"--window-size={self.size[0]},{self.size[1]}",
                    "about:blank",
                ],
                stdout=subprocess.DEVNULL,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        port = self._devtools_port(timeout)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        if not pages:
            raise RuntimeError(f"Chromium opened no page:\n{self.log_tail()}")
        self._socket = _WebSocket(pages[0]["webSocketDebuggerUrl"], timeout)
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=self.size[0],
            height=self.size[1],
            deviceScaleFactor=1,
            mobile=False,
        )
        return self

    def stop(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(timeout=10)
        shutil.rmtree(self.folder / "profile", ignore_errors=True)

    def __enter__(self) -> Browser:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of Chromium's own log, for failure messages."""
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    # -- pages ----------------------------------------------------------------------------

    def open(self, url: str) -> None:
        """Navigate to ``url`` (returns at once; :meth:`wait_for` what the page must show)."""
        self.console.clear()
        answer = self.call("Page.navigate", url=url)
        if answer.get("errorText"):
            raise RuntimeError(f"Chromium could not open {url}: {answer['errorText']}")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        answer = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise RuntimeError(f"{expression!r} threw: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 60.0) -> Any:
        """Poll ``expression`` until it is truthy; its value, or fail saying ``what``."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                console = "\n".join(self.console[-15:]) or "(nothing)"
                raise AssertionError(
                    f"the page never showed {what} in {timeout:g} s; its console:\n{console}"
                )
            time.sleep(0.25)

    def text(self) -> str:
        """The text the page shows (``document.body.innerText``)."""
        return str(self.evaluate("document.body ? document.body.innerText : ''"))

    def screenshot(self, out: Path) -> np.ndarray:
        """Save the page as a PNG at ``out``; returns its RGB pixels (rows, columns, 3)."""
        answer = self.call("Page.captureScreenshot", format="png")
        data = base64.b64decode(answer["data"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)
        image = Image.open(io.BytesIO(data))
        return np.asarray(image.convert("RGB")).astype(int)

    # -- protocol -------------------------------------------------------------------------

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events on the way are kept)."""
        if self._socket is None:
            raise RuntimeError("the browser is not started")
        self._next_id += 1
        self._socket.send(json.dumps({"id": self._next_id, "method": method, "params": params}))
        while True:
            message = json.loads(self._socket.recv())
            if message.get("id") == self._next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))
            self._note(message)

    def _note(self, event: dict[str, Any]) -> None:
        params = event.get("params", {})
        if event.get("method") == "Runtime.consoleAPICalled":
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            self.console.append(f"{params.get('type')}: {args}"[:500])
        elif event.get("method") == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            self.console.append(f"exception: {text}"[:500])

    def _devtools_port(self, timeout: float) -> int:
        """The port Chromium prints in "DevTools listening on ws://127.0.0.1:PORT/..."."""
        deadline = time.monotonic() + timeout
        assert self._process is not None
        while time.monotonic() < deadline:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if line.startswith("DevTools listening on ws://"):
                    return int(urlsplit(line.split(" on ", 1)[1]).port or 0)
            if self._process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"Chromium's DevTools did not start:\n{self.log_tail()}")


class _WebSocket:
    """A WebSocket client (RFC 6455) with just what the DevTools protocol needs: text
    messages, fragments, ping and close."""

    _GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        self._socket = socket.create_connection((parts.hostname, parts.port or 80), timeout)
        key = base64.b64encode(os.urandom(16)).decode()
        self._socket.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self._socket.recv(4096)
            if not chunk:
                raise ConnectionError("the DevTools socket closed during the handshake")
            head += chunk
        head, rest = head.split(b"\r\n\r\n", 1)
        self._buffer = bytearray(rest)
        status, *lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines if ": " in line)
        accept = base64.b64encode(hashlib.sha1((key + self._GUID).encode()).digest()).decode()
        if " 101 " not in status or headers.get("sec-websocket-accept") != accept.lower():
            raise ConnectionError(f"the DevTools socket refused the upgrade: {status}")

    def send(self, text: str, opcode: int = 0x1) -> None:
        payload = text.encode()
        length = len(payload)
        if length < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | length)
        elif length < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, length)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, length)
        mask = os.urandom(4)
        masked = _xor(payload, mask)
        self._socket.sendall(header + mask + masked)

    def recv(self) -> str:
        """The next text message (fragments joined; pings answered)."""
        parts: list[bytes] = []
        while True:
            first, second = self._read(2)
            opcode, length = first & 0x0F, second & 0x7F
            if length == 126:
                (length,) = struct.unpack("!H", self._read(2))
            elif length == 127:
                (length,) = struct.unpack("!Q", self._read(8))
            mask = self._read(4) if second & 0x80 else b""
            payload = self._read(length)
            if mask:
                payload = _xor(payload, mask)
            if opcode == 0x8:
                raise ConnectionError("the DevTools socket was closed by Chromium")
            if opcode == 0x9:
                self.send(payload.decode("latin-1"), opcode=0xA)
                continue
            if opcode in (0x0, 0x1, 0x2):
                parts.append(payload)
                if first & 0x80:
                    return b"".join(parts).decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.send("", opcode=0x8)
        self._socket.close()

    def _read(self, count: int) -> bytes:
        while len(self._buffer) < count:
            chunk = self._socket.recv(max(65536, count - len(self._buffer)))
            if not chunk:
                raise ConnectionError("the DevTools socket closed")
            self._buffer += chunk
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data


def _xor(data: bytes, mask: bytes) -> bytes:
    """``data`` masked with the 4-byte ``mask`` (RFC 6455 5.3)."""
    repeated = (mask * (len(data) // 4 + 1))[: len(data)]
    return (int.from_bytes(data, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        len(data), "big"
    )


def poll(condition: Callable[[], T | None], what: str, timeout: float = 30.0) -> T:
    """Call ``condition`` until it returns something other than ``None``; that, or fail
    saying ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout:g} s")
        time.sleep(0.2)
