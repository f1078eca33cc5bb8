"""The STOW-RS listener: uvicorn in a thread of the node's parent process, beside the
acceptors of the DICOM port.

The socket is bound here, before uvicorn starts, so a port in use fails
:meth:`StowServer.start` at once with the reason (after waiting a few seconds for a port
that a previous node's processes are still giving up), and ``port = 0`` gets a free port
(:attr:`StowServer.port`). With ``reception.dicomweb.tls`` it serves HTTPS under the same
rules as the DICOM port's TLS (:func:`~mibi_node.reception.scp.server_ssl_context`).
uvicorn's access log stays off; the application logs each request once.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn

from mibi_node.config import Config
from mibi_node.errors import MibiNodeError
from mibi_node.reception.scp import server_ssl_context
from mibi_node.reception.stow import STOW_PATH, create_stow_app
from mibi_node.storage.instances import InstanceStore

__all__ = ["StowServer"]

logger = logging.getLogger(__name__)

_START_TIMEOUT = 15.0
_STOP_TIMEOUT = 10.0
_BIND_RETRY_SECONDS = 15.0
_EADDRINUSE = 98


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port``; waits a little for a port a previous node
    is still giving up (its acceptors hold a copy until they have stopped)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    deadline = time.monotonic() + _BIND_RETRY_SECONDS
    while True:
        sock = socket.socket(family, kind, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(64)
            sock.set_inheritable(False)
            return sock
        except OSError as exc:
            sock.close()
            if exc.errno != _EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class StowServer:
    """The STOW-RS listener of one node: uvicorn in a thread of the node's parent process.

    Parameters
    ----------
    config
        The node's configuration; ``reception.dicomweb`` says where and how to listen.
    store
        Where the instances go (the parent's database and the node's file store).
    """

    def __init__(self, config: Config, store: InstanceStore) -> None:
        self.config = config
        self.app = create_stow_app(config, store)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        self.port: int = config.reception.dicomweb.port

    @property
    def url(self) -> str:
        """The service root, e.g. ``http://127.0.0.1:8081/dicomweb``."""
        settings = self.config.reception.dicomweb
        scheme = "https" if settings.tls.enabled else "http"
        host = f"[{settings.host}]" if ":" in settings.host else settings.host
        return f"{scheme}://{host}:{self.port}{STOW_PATH.removesuffix('/studies')}"

    def start(self) -> None:
        """Listen and serve; returns once requests are accepted.

        Raises
        ------
        MibiNodeError
            The address cannot be bound, or the server did not start.
        ConfigError
            The TLS certificates or key cannot be loaded.
        """
        settings = self.config.reception.dicomweb
        ssl_context = server_ssl_context(settings.tls)
        try:
            self._socket = _bind(settings.host, settings.port)
        except OSError as exc:
            raise MibiNodeError(
                f"STOW-RS cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
            ) from None
        self.port = int(self._socket.getsockname()[1])
        uvicorn_config = uvicorn.Config(
            self.app,
            log_config=None,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(_STOP_TIMEOUT),
            server_header=False,
        )
        uvicorn_config.load()
        uvicorn_config.ssl = ssl_context  # the reception's TLS rules, not uvicorn's defaults
        server = uvicorn.Server(uvicorn_config)
        self._server = server
        self._thread = threading.Thread(
            target=server.run, kwargs={"sockets": [self._socket]}, name="mibi-stow", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise MibiNodeError(f"STOW-RS did not start on {self.url}")
            time.sleep(0.02)
        logger.info(
            "STOW-RS on %s/studies%s",
            self.url,
            " (token required)" if settings.token.get_secret_value() else "",
        )

    def stop(self) -> None:
        """Stop accepting; requests in progress finish (a few seconds at most)."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT + 5)
            if self._thread.is_alive():
                logger.warning("STOW-RS did not stop within %.0f s", _STOP_TIMEOUT + 5)
        if self._socket is not None:
            self._socket.close()
        self._server = self._thread = self._socket = None
