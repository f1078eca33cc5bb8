"""The PDU length a peer declares is checked before any of it is read (PS3.8 9.3).

pynetdicom reads a PDU's 6-byte header and then reads the whole declared length into
memory. A peer that announces a 4 GiB PDU and keeps sending would have all of it kept; so
the length is checked against the limit of its PDU type as soon as the header is in: a
P-DATA-TF may not be longer than the Maximum Length the node announced
(``reception.max_pdu_size``), any other PDU not longer than :data:`MAX_OTHER_PDU`. A PDU
over its limit gets an A-ABORT (invalid PDU parameter value) and the connection ends.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_OTHER_PDU", "MAX_P_DATA_WITHOUT_LIMIT", "guard_pdu_lengths"]

logger = logging.getLogger(__name__)

_HEADER = 6
_P_DATA_TF = 0x04
#: Longest PDU other than P-DATA-TF accepted: an A-ASSOCIATE-RQ with the 128 presentation
#: contexts pynetdicom allows and a large user identity token stays far below it.
MAX_OTHER_PDU = 1 << 20
#: Longest P-DATA-TF when ``reception.max_pdu_size`` is 0 ("no limit" announced).
MAX_P_DATA_WITHOUT_LIMIT = 64 << 20
#: A-ABORT, source service provider (2), reason invalid PDU parameter value (6).
_A_ABORT = struct.pack(">BBLBBBB", 0x07, 0, 4, 0, 0, 0x02, 0x06)


def guard_pdu_lengths(assoc: Any, max_pdu_size: int) -> None:
    """Check every PDU header of ``assoc`` against its limit before the body is read.

    Call it when the connection opens (``EVT_CONN_OPEN``), before the first PDU is read.
    """
    transport = getattr(getattr(assoc, "dul", None), "socket", None)
    if transport is None or not callable(getattr(transport, "recv", None)):
        return
    p_data_limit = max_pdu_size or MAX_P_DATA_WITHOUT_LIMIT
    read: Callable[[int], bytearray] = transport.recv
    last_type: list[int | None] = [None]

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes == _HEADER:  # pynetdicom reads a header, then exactly its body
            data = read(nr_bytes)
            last_type[0] = data[0] if len(data) == _HEADER else None
            return data
        limit = p_data_limit if last_type[0] == _P_DATA_TF else MAX_OTHER_PDU
        if nr_bytes <= limit:
            return read(nr_bytes)
        logger.warning(
            "refused a PDU of type 0x%02X declaring %d bytes (the limit is %d); aborted",
            last_type[0] or 0,
            nr_bytes,
            limit,
        )
        _refuse(transport.socket)
        return bytearray()  # pynetdicom: "PDU shorter than expected", the association ends

    transport.recv = recv


def _refuse(connection: socket.socket | None) -> None:
    """A-ABORT, then stop reading: the peer's further bytes are never taken in."""
    if connection is None:
        return
    with contextlib.suppress(OSError):
        connection.sendall(_A_ABORT)
    with contextlib.suppress(OSError):
        # Only the read side: pynetdicom closes the connection right after (its own
        # shutdown of both sides would fail on a socket already shut down, and skip close).
        connection.shutdown(socket.SHUT_RD)
