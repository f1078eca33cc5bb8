"""The status page, REST API, health checks and ``/metrics`` of a node (``docs/web.md``).

:class:`~mibi_node.web.server.WebServer` serves :func:`~mibi_node.web.app.create_app` with
uvicorn from the node's parent process. The pages read the database; the two buttons act
through ``jobs`` (requeue) and ``dispatch`` (resend). Nothing here imports torch.
"""

from mibi_node.web.app import create_app
from mibi_node.web.server import WebServer

__all__ = ["WebServer", "create_app"]
