"""The status page, REST API, health checks and ``/metrics`` of a node (``docs/web.md``).

:class:`~mibi_node.web.server.WebServer` serves :func:`~mibi_node.web.app.create_app` with
uvicorn from the node's parent process. The pages read the database; the two buttons act
through ``jobs`` (requeue) and ``dispatch`` (resend). Nothing here imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mibi_node.web.app import create_app
    from mibi_node.web.server import WebServer

__all__ = ["WebServer", "create_app"]


def __getattr__(name: str) -> Any:
    # FastAPI and uvicorn are imported when the page is served, not by ``mibi-node status``,
    # which reads the same summaries (:mod:`mibi_node.web.summaries`).
    if name == "create_app":
        from mibi_node.web.app import create_app

        return create_app
    if name == "WebServer":
        from mibi_node.web.server import WebServer

        return WebServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
