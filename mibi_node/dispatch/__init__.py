"""Dispatch: sending the node's results to PACS with C-STORE.

:class:`Destination` says where (``[[dispatch.destinations]]`` or ``--destination
AE@HOST:PORT``); :func:`send_files` stores files there over one association and answers a
:class:`SendResult` per file without raising. See ``docs/dispatch.md``.
"""

from mibi_node.dispatch.destinations import Destination, DestinationTLS, parse_destination
from mibi_node.dispatch.scu import SUCCESS_STATUSES, SendResult, send_file, send_files

__all__ = [
    "SUCCESS_STATUSES",
    "Destination",
    "DestinationTLS",
    "SendResult",
    "parse_destination",
    "send_file",
    "send_files",
]
