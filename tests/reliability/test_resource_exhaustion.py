"""Resource exhaustion: a full disk, idle and stalled peers, and an oversized declared PDU
length. The node refuses cleanly, stores nothing partial, frees what the peer held, and
never allocates what a peer merely announces."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import time
from pathlib import Path

import pytest
from harness import Study, children, rss_mib, send_with_storescu, wait_for
from pdus import NM_STORAGE, RawPeer, associate_rq, c_store_rq, p_data
from pynetdicom import AE

from node import NodeProcess

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(300)]

TIMEOUT = 2  # reception.acse_timeout, network_timeout and dimse_timeout of these nodes
TIMEOUTS = {"acse_timeout": TIMEOUT, "network_timeout": TIMEOUT, "dimse_timeout": TIMEOUT}
MAX_PDU = 65536


def _nothing_stored(node: NodeProcess) -> None:
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    store = node.data_dir / "store"
    assert not [p for p in store.rglob("*") if p.is_file()], "a file was left in the store"


def test_full_disk_refuses_associations_and_stores_nothing(
    node_factory, dcmtk, phantoms: list[Study]
) -> None:
    node = node_factory({"storage": {"min_free_mb": 1 << 40}})  # no disk is that large
    code, acknowledged = send_with_storescu(node.port, phantoms[0].files)
    assert code != 0 and acknowledged == []
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(NM_STORAGE)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MIBI_NODE")
    assert assoc.is_rejected
    primitive = assoc.acceptor.primitive
    # Rejected-transient, by the service provider (presentation), temporary congestion.
    assert (primitive.result, primitive.result_source, primitive.diagnostic) == (2, 3, 1)
    _nothing_stored(node)
    assert "storage.min_free_mb" in node.log()


def test_disk_filling_during_an_association_gets_out_of_resources(
    node_factory, dcmtk, phantoms: list[Study], tmp_path: Path
) -> None:
    """The threshold is crossed between two C-STOREs of one association: the second is
    answered 0xA700 (out of resources) and leaves nothing behind."""
    free = shutil.disk_usage(tmp_path).free / (1 << 20)
    if free < 3 * 1024:
        pytest.skip(f"needs 3 GiB free on {tmp_path} to move the threshold, has {free:.0f} MiB")
    margin = 512  # MiB above the threshold when the association starts
    node = node_factory({"storage": {"min_free_mb": int(free) - margin}})
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context(NM_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MIBI_NODE")
    assert assoc.is_established
    filler = tmp_path / "filler"
    try:
        import pydicom

        first, second = (pydicom.dcmread(p) for p in phantoms[1].files)
        assert int(assoc.send_c_store(first).Status) == 0x0000
        with open(filler, "wb") as handle:  # the disk fills up: 1 GiB, allocated at once
            os.posix_fallocate(handle.fileno(), 0, 2 * margin << 20)
        assert int(assoc.send_c_store(second).Status) == 0xA700
        assoc.release()
    finally:
        filler.unlink(missing_ok=True)
        if assoc.is_established:
            assoc.abort()
    rows = node.query("SELECT sop_instance_uid FROM instance")
    assert rows == [(str(first.SOPInstanceUID),)]
    store = node.data_dir / "store"
    assert len([p for p in store.rglob("*") if p.is_file()]) == 1
    assert "below storage.min_free_mb" in node.log()


def _closed_within(peer: RawPeer, stalled_at: float, seconds: float) -> float:
    """Seconds from the stall until the node closed the connection (at most ``seconds``)."""
    peer.sock.settimeout(max(0.1, stalled_at + seconds - time.monotonic()))
    assert peer.closed_by_node(), f"still open {seconds} s after the stall"
    return time.monotonic() - stalled_at


def test_idle_and_stalled_peers_are_cut_off_by_the_timeouts(
    node_factory, dcmtk, phantoms: list[Study]
) -> None:
    limit = 4
    node = node_factory({"reception": {"max_associations": limit, **TIMEOUTS}})
    # Every kind of stall at once, each holding a connection (the established ones a slot).
    stalled: dict[str, tuple[RawPeer, float]] = {}
    silent = RawPeer(node.port)  # TCP connection, no A-ASSOCIATE-RQ
    stalled["silent connection"] = (silent, time.monotonic())
    half_pdu = RawPeer(node.port)  # part of an A-ASSOCIATE-RQ, then nothing
    half_pdu.send(associate_rq()[:40])
    stalled["half an A-ASSOCIATE-RQ"] = (half_pdu, time.monotonic())
    idle = RawPeer(node.port)  # an association that sends nothing
    idle.send(associate_rq())
    assert idle.read_pdu()[0] == 0x02  # type: ignore[index]
    stalled["idle association"] = (idle, time.monotonic())
    mid_store = RawPeer(node.port)  # a C-STORE whose data set stops half-way
    mid_store.send(associate_rq())
    assert mid_store.read_pdu()[0] == 0x02  # type: ignore[index]
    mid_store.send(p_data([(1, 0x03, c_store_rq("1.2.3.4.5.6.7.8.9"))]))
    mid_store.send(p_data([(1, 0x00, b"\x08\x00\x60\x00CS\x02\x00NM" * 64)]))
    stalled["stalled C-STORE"] = (mid_store, time.monotonic())
    mid_pdu = RawPeer(node.port)  # an association whose P-DATA PDU stops half-way
    mid_pdu.send(associate_rq())
    assert mid_pdu.read_pdu()[0] == 0x02  # type: ignore[index]
    mid_pdu.send(p_data([(1, 0x03, c_store_rq("1.2.3.4.5.6.7.8.10"))])[:30])
    stalled["half a P-DATA PDU"] = (mid_pdu, time.monotonic())
    # A good camera is still served meanwhile (one slot is left of the four).
    code, acknowledged = send_with_storescu(node.port, phantoms[2].files)
    assert code == 0 and len(acknowledged) == 2
    closed = {
        name: _closed_within(peer, at, 2 * TIMEOUT + 2) for name, (peer, at) in stalled.items()
    }
    for peer, _ in stalled.values():
        peer.close()
    # Their slots are free again: four associations at once are accepted.
    ae = AE(ae_title="CAMERA")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = [ae.associate("127.0.0.1", node.port, ae_title="MIBI_NODE") for _ in range(limit)]
    assert all(a.is_established for a in held)
    for assoc in held:
        assoc.release()
    # Nothing partial: only the good study's two instances, nothing left in .incoming.
    assert node.query("SELECT count(*) FROM instance") == [(2,)]
    wait_for(
        lambda: not list((node.data_dir / "store" / ".incoming").iterdir()),
        4 * TIMEOUT + 10,
        "the stalled C-STORE's partial file removed",
        node,
    )
    print(
        "\nFIGURES timeouts: closed after "
        + ", ".join(f"{name} {seconds:.1f} s" for name, seconds in closed.items())
        + f" (timeouts {TIMEOUT} s)"
    )


def _stream(sock: socket.socket, total: int) -> int:
    """Send up to ``total`` bytes of zeros; returns how many the node took before closing."""
    chunk = bytes(1 << 20)
    sent = 0
    sock.settimeout(10)
    try:
        while sent < total:
            sent += sock.send(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass
    return sent


@pytest.mark.parametrize("where", ["A-ASSOCIATE-RQ", "P-DATA-TF"])
def test_oversized_declared_length_is_refused_without_allocating_it(
    node_factory, dcmtk, phantoms: list[Study], where: str
) -> None:
    node = node_factory({"reception": {"max_pdu_size": MAX_PDU, "acceptors": 1, **TIMEOUTS}})
    [acceptor] = [node.process.pid] if node.process else []  # one acceptor: the node itself
    before = rss_mib(acceptor)
    peer = RawPeer(node.port)
    if where == "P-DATA-TF":
        peer.send(associate_rq(max_pdu=MAX_PDU))
        assert peer.read_pdu()[0] == 0x02  # type: ignore[index]
        kind = 0x04
    else:
        kind = 0x01
    peer.send(struct.pack(">BBL", kind, 0, 0xFFFFFFF0))  # about 4 GiB announced
    total = 256 << 20
    sent = _stream(peer.sock, total)
    peer.close()
    grown = rss_mib(acceptor) - before
    # Refused at the header: the node closes at once, holding at most a socket buffer.
    assert sent < 32 << 20, f"the node took {sent >> 20} MiB of a 4 GiB PDU"
    assert grown < 32, f"the node grew by {grown:.0f} MiB"
    code, acknowledged = send_with_storescu(node.port, phantoms[3].files)
    assert code == 0 and len(acknowledged) == 2
    assert children(node)[0] == []  # acceptors = 1: reception runs in the node process
    print(
        f"\nFIGURES oversized {where}: 4 GiB announced, {sent >> 20} MiB taken before the "
        f"node closed, RSS {grown:+.0f} MiB"
    )
