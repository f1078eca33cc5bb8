"""The HTTP listener of the node: uvicorn in a thread of the node's parent process.

The socket is bound here, before uvicorn starts, so a port in use fails :meth:`WebServer.start`
at once with the reason, and ``web.port = 0`` gets a free port (:attr:`WebServer.port`).
uvicorn's access log stays off (health probes would fill the journal); its own messages
go to the node's logging at WARNING and above.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from mibi_node.config import Config
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.web.app import create_app

__all__ = ["WebServer"]

logger = logging.getLogger(__name__)

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host``:``port`` (IPv4 or IPv6, names resolved)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(False)
    return sock


class WebServer:
    """The status page, REST API, health checks and ``/metrics`` of one node.

    Parameters
    ----------
    config
        The node's configuration; ``web.host`` and ``web.port`` say where to listen.
    database
        The node's database.
    is_listening
        Says whether the DICOM listener accepts associations (for ``/readyz``).
    """

    def __init__(
        self, config: Config, database: Database, is_listening: Callable[[], bool]
    ) -> None:
        self.config = config
        self.app = create_app(config, database, is_listening)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int = config.web.port

    @property
    def url(self) -> str:
        """Where the status page answers, e.g. ``http://127.0.0.1:8080/``."""
        host = self.config.web.host
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}/"

    def start(self) -> None:
        """Listen and serve in a daemon thread; returns once the server accepts requests.

        Raises
        ------
        MibiNodeError
            The address cannot be bound (in use, not an address of this machine) or the
            server did not start.
        """
        web = self.config.web
        try:
            self._socket = _bind(web.host, web.port)
        except OSError as exc:
            raise MibiNodeError(
                f"the status page cannot listen on {web.host}:{web.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._socket.getsockname()[1])
        settings = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=3,
            server_header=False,
        )
        server = uvicorn.Server(settings)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="mibi-web", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise MibiNodeError(f"the status page did not start on {self.url}")
            time.sleep(0.02)
        logger.info(
            "status page on %s%s",
            self.url,
            " (token required)" if web.token.get_secret_value() else "",
        )

    def stop(self) -> None:
        """Stop serving: finish requests in progress (a few seconds at most), close the port."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT)
            if self._thread.is_alive():
                logger.warning("the status page did not stop within %.0f s", _STOP_TIMEOUT)
        if self._socket is not None:
            self._socket.close()
        self.app.state.readiness.close()
        self.app.state.reader.dispose()
        self._server = self._thread = self._socket = None
