"""Hostile peers: unknown calling AE titles, a wrong called AE title, plain DICOM on a TLS
port, untrusted client certificates, and UIDs and descriptions full of path, shell and SQL
metacharacters. Each is rejected or stored safely; nothing lands outside the storage folder;
the logs at INFO hold no patient name or ID."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from harness import Sink, Study, node_config, send_with_storescu, wait_for
from pdus import NM_STORAGE, RawPeer, associate_rq
from pydicom.uid import generate_uid
from pynetdicom import AE

from node import storescu
from test_reception_tls import _tls, pki  # noqa: F401 - the PKI fixture (CA, rogue CA, certs)

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(300)]


def _rejection(port: int, calling: str, called: str = "MIBI_NODE") -> tuple[int, int, int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(NM_STORAGE)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    assert assoc.is_rejected, f"{calling} -> {called} was not rejected"
    primitive = assoc.acceptor.primitive
    return primitive.result, primitive.result_source, primitive.diagnostic


def test_unknown_calling_and_wrong_called_ae_titles_are_rejected(
    node_factory, dcmtk, phantoms: list[Study]
) -> None:
    node = node_factory(
        {
            "reception": {
                "allowed_peers": [
                    {"ae_title": "GAMMA_CAM1"},
                    {"ae_title": "FAR_CAMERA", "hosts": ["192.0.2.7"]},
                ]
            }
        }
    )
    files = list(phantoms[0].files)
    for calling, called in [
        ("INTRUDER", "MIBI_NODE"),
        ("gamma_cam1", "MIBI_NODE"),  # AE titles are case-sensitive
        ("FAR_CAMERA", "MIBI_NODE"),  # allowed, but not from this address
        ("GAMMA_CAM1", "SOMEONE_ELSE"),
    ]:
        assert storescu(node.port, files, calling=calling, called=called).returncode != 0
    # Permanent rejections by the service user: calling AE not recognised (3), called AE
    # not recognised (7).
    assert _rejection(node.port, "INTRUDER") == (1, 1, 3)
    assert _rejection(node.port, "FAR_CAMERA") == (1, 1, 3)
    assert _rejection(node.port, "GAMMA_CAM1", called="PACS") == (1, 1, 7)
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    wait_for(  # each refusal is in the audit trail (written just after the A-ASSOCIATE-RJ)
        lambda: (
            node.query(
                "SELECT count(*) FROM audit_event WHERE kind = 'association' AND outcome = 'rejected'"
            )
            == [(7,)]
        ),
        10,
        "7 rejections in the audit trail",
        node,
    )
    # The allowed camera gets in.
    code, acknowledged = send_with_storescu(node.port, files, calling="GAMMA_CAM1")
    assert code == 0 and len(acknowledged) == 2


def test_tls_port_refuses_plain_and_untrusted_peers(
    node_factory,
    dcmtk,
    pki: Path,  # noqa: F811 - the fixture imported above
    phantoms: list[Study],
) -> None:
    config = _tls(pki, require_client=True)
    config["reception"] = {"acse_timeout": 2, "network_timeout": 2}
    node = node_factory(config)
    files = list(phantoms[1].files)
    tls = ["+cf", str(pki / "ca.crt"), "-to", "10", "-ta", "10"]
    # Plain DICOM on the TLS port: refused; the raw request gets no A-ASSOCIATE-AC.
    assert storescu(node.port, files).returncode != 0
    plain = RawPeer(node.port, timeout=10)
    plain.send(associate_rq())
    assert plain.read_pdu() is None  # the node closed without answering in DICOM
    plain.close()
    # No client certificate, or one from another CA: refused in the handshake.
    assert storescu(node.port, files, extra=["+tla", *tls]).returncode != 0
    rogue = ["+tls", str(pki / "intruder.key"), str(pki / "intruder.crt"), "-pw"]
    assert storescu(node.port, files, extra=[*rogue, *tls]).returncode != 0
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    # A peer that starts a handshake and stops half-way is cut off by the timeout, and
    # does not hold up the trusted camera meanwhile.
    stalled = socket.create_connection(("127.0.0.1", node.port), timeout=10)
    stalled.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    trusted = ["+tls", str(pki / "camera.key"), str(pki / "camera.crt"), "-pw"]
    started = time.monotonic()
    result = storescu(node.port, files, extra=[*trusted, *tls])
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 10
    stalled.settimeout(10)
    assert stalled.recv(1024) == b""  # closed by the node's network timeout
    stalled.close()
    assert node.query("SELECT count(*) FROM instance") == [(2,)]


#: Values a hostile or broken sender might put in text and UID attributes.
PATIENT_NAME = "O'Brien^Robert'); DROP TABLE study;--"
PATIENT_ID = "../../etc/passwd;$(id)"
HOSTILE_DESCRIPTION = "PARATHYROID MIBI $(touch {marker}) `touch {marker}` | tee {marker}; --"
HOSTILE_SERIES = "%s%n%x {0} ${HOME} '; DELETE FROM instance; --"


def _hostile_copy(study: Study, folder: Path, marker: Path) -> list[tuple[Path, str]]:
    """The study's images with hostile UIDs, names and descriptions; (file, SOP UID)."""
    study_uid = "1.2.826.0.1.3680043.2.1143.1'; DROP TABLE study; --"[:64]
    out = []
    for index, path in enumerate(study.files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = f"../../../../{marker.name}-series{index}"
        ds.SOPInstanceUID = f"../../../../tmp/{marker.name}-{index}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyDescription = HOSTILE_DESCRIPTION.format(marker=marker)[:64]
        ds.SeriesDescription = f"{ds.SeriesDescription} {HOSTILE_SERIES}"[:64]
        target = folder / f"hostile-{index}.dcm"
        ds.save_as(target)
        out.append((target, str(ds.SOPInstanceUID)))
    return out


def test_metacharacters_are_stored_safely_and_logs_hold_no_patient_data(
    node_factory, dcmtk, bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    marker = Path("/tmp") / f"mibi-pwned-{os.getpid()}-{generate_uid()[-8:]}"
    sink = Sink(tmp_path / "pacs").start()
    data_dir = tmp_path / "var"
    node = node_factory(node_config(bundle, sink.port), data_dir=data_dir)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    hostile = _hostile_copy(phantoms[4], inputs, marker)
    # A Study Instance UID longer than 64 characters is refused.
    too_long = pydicom.dcmread(phantoms[5].files[0])
    too_long.StudyInstanceUID = "1." + "9" * 70
    too_long.save_as(inputs / "too-long.dcm")
    ae = AE(ae_title="GAMMA_CAM1")
    ae.add_requested_context(NM_STORAGE, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MIBI_NODE")
    assert assoc.is_established
    statuses = [int(assoc.send_c_store(pydicom.dcmread(path)).Status) for path, _ in hostile]
    refused = int(assoc.send_c_store(pydicom.dcmread(inputs / "too-long.dcm")).Status)
    assoc.release()
    assert statuses == [0x0000, 0x0000] and refused == 0xC210
    # Stored safely: the rows hold the values exactly, the files are inside the store.
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instance"))
    assert set(rows) == {uid for _, uid in hostile}
    store = (data_dir / "store").resolve()
    for uid, relative in rows.items():
        path = (store / relative).resolve()
        assert store in path.parents and uid not in str(path)
        assert pydicom.dcmread(path).SOPInstanceUID == uid
    [(description,)] = node.query("SELECT study_description FROM study")
    assert description == HOSTILE_DESCRIPTION.format(marker=marker)[:64].strip()
    # Routed on the hostile description, analysed, and its SR delivered to the PACS.
    try:
        wait_for(
            lambda: node.query("SELECT state FROM study") in ([("DONE",)], [("FAILED",)]),
            120,
            "the hostile study analysed (or refused with a reason)",
            node,
        )
        [(state, reason)] = node.query("SELECT state, state_reason FROM study")
        if state == "DONE":
            wait_for(lambda: sink.srs_by_study(), 30, "the SR at the PACS", node)
    finally:
        sink.stop()
    status = subprocess.run(
        [sys.executable, "-m", "mibi_node.cli", "status", "--data-dir", str(data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0, status.stderr
    # Nothing escaped: no marker file, no file outside the data folder's own places.
    assert not list(Path("/tmp").glob(f"{marker.name}*"))
    names = [marker.name, "DROP TABLE", "passwd", "series0", "series1"]
    for path in data_dir.rglob("*"):  # no stored name was made from a sent value
        assert not any(name in str(path) for name in names), path
    outside = [
        p
        for p in tmp_path.rglob("*")
        if p.is_file()
        and not p.is_relative_to(data_dir)
        and not p.is_relative_to(inputs)
        and not p.is_relative_to(tmp_path / "pacs")
        and not p.name.startswith("node-")
    ]
    assert outside == []
    assert node.query("PRAGMA integrity_check") == [("ok",)]
    assert {
        name for (name,) in node.query("SELECT name FROM sqlite_master WHERE type='table'")
    } >= {
        "study",
        "instance",
        "job",
        "delivery",
    }
    # The log at INFO names no patient: neither the hostile name and ID nor the phantom's.
    log = node.log()
    original = pydicom.dcmread(phantoms[4].files[0], stop_before_pixels=True)
    for secret in (PATIENT_NAME, PATIENT_ID, "O'Brien", str(original.PatientName)):
        assert secret not in log, f"{secret!r} is in the log"
    assert str(original.PatientID) not in log
    print(
        f"\nFIGURES hostile: 2 instances with path/shell/SQL metacharacters stored inside the "
        f"store, 1 over-long UID refused 0xC210, study {state} ({reason[:60]}), no marker "
        f"file, no patient name or ID in {len(log.splitlines())} log lines"
    )
