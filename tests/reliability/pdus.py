"""DICOM upper layer PDUs and data elements written by hand, for peers that misbehave.

The reliability tests need bytes no well-behaved library sends: PDUs with lying lengths,
data sets with unknown VRs. These helpers write them from PS3.8 (PDUs) and PS3.5 (data
elements); ``RawPeer`` is a TCP connection that speaks them.
"""

from __future__ import annotations

import socket
import struct

from pydicom.uid import ExplicitVRLittleEndian

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
#: VRs whose explicit VR header has a 4-byte length (PS3.5 7.1.2).
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT"}


def element(tag: int, vr: bytes, value: bytes, explicit: bool, declared: int | None) -> bytes:
    length = len(value) if declared is None else declared
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<L", length & 0xFFFFFFFF) + value
    if vr in LONG_VRS:
        return head + vr + b"\0\0" + struct.pack("<L", length & 0xFFFFFFFF) + value
    return head + vr + struct.pack("<H", length & 0xFFFF) + value


def _ae_title(text: str) -> bytes:
    return text.encode().ljust(16)


def _sub_item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def associate_rq(called: str = "MIBI_NODE", calling: str = "RAW", max_pdu: int = 16384) -> bytes:
    """A well-formed A-ASSOCIATE-RQ proposing NM storage in explicit VR little endian."""
    context = (
        struct.pack(">BBBB", 1, 0, 0, 0)
        + _sub_item(0x30, NM_STORAGE.encode())
        + _sub_item(0x40, ExplicitVRLittleEndian.encode())
    )
    user = _sub_item(0x51, struct.pack(">L", max_pdu)) + _sub_item(0x52, b"1.2.3.4")
    body = (
        struct.pack(">HH", 1, 0)
        + _ae_title(called)
        + _ae_title(calling)
        + bytes(32)
        + _sub_item(0x10, b"1.2.840.10008.3.1.1.1")
        + _sub_item(0x20, context)
        + _sub_item(0x50, user)
    )
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    """A P-DATA-TF with (context id, message control header, fragment) PDVs."""
    body = b"".join(
        struct.pack(">LBB", len(data) + 2, context, control) + data
        for context, control, data in pdvs
    )
    return struct.pack(">BBL", 0x04, 0, len(body)) + body


def c_store_rq(uid: str) -> bytes:
    """The command set of a C-STORE-RQ (implicit VR little endian, as PS3.7 wants)."""
    elements = [
        (0x00000002, NM_STORAGE.encode() + b"\0"),
        (0x00000100, struct.pack("<H", 0x0001)),
        (0x00000110, struct.pack("<H", 7)),
        (0x00000700, struct.pack("<H", 0)),
        (0x00000800, struct.pack("<H", 0x0001)),
        (0x00001000, uid.encode() + (b"\0" if len(uid) % 2 else b"")),
    ]
    encoded = b"".join(element(tag, b"", value, False, None) for tag, value in elements)
    group_length = element(0x00000000, b"", struct.pack("<L", len(encoded)), False, None)
    return group_length + encoded


class RawPeer:
    """A TCP connection that speaks DICOM upper layer bytes by hand."""

    def __init__(self, port: int, timeout: float = 15.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_pdu(self) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or ``None`` when the node closed the connection."""
        head = self._exactly(6)
        if head is None:
            return None
        kind, _, length = struct.unpack(">BBL", head)
        body = self._exactly(length)
        return None if body is None else (kind, body)

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except (ConnectionResetError, TimeoutError):
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def closed_by_node(self) -> bool:
        """Read until the node closes (PDUs it sends on the way, e.g. A-ABORT, are skipped)."""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False
            if not chunk:
                return True

    def close(self) -> None:
        self.sock.close()


def established(port: int) -> RawPeer:
    peer = RawPeer(port)
    peer.send(associate_rq())
    answer = peer.read_pdu()
    assert answer is not None and answer[0] == 0x02, answer  # A-ASSOCIATE-AC
    return peer
