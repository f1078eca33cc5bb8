"""Reception against real DICOM peers: DCMTK storescu/echoscu and a pynetdicom SCU."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE, _config

from factory import CT_STORAGE, nm_dataset, nm_files, write
from node import dcmtk_env, storescu

pytestmark = pytest.mark.peers

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"


@pytest.fixture(autouse=True)
def _dcmtk(require_tool):
    require_tool("storescu")
    require_tool("echoscu")


def stored_files(node) -> dict[str, Path]:
    rows = node.query("SELECT sop_instance_uid, path FROM instance")
    return {uid: node.data_dir / "store" / path for uid, path in rows}


def test_echoscu_gets_success(node_factory) -> None:
    node = node_factory()
    result = subprocess.run(
        ["echoscu", "-aec", "MIBI_NODE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        env=dcmtk_env(),
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_storescu_instances_arrive_byte_for_byte(node_factory, tmp_path: Path) -> None:
    files = nm_files(tmp_path / "in", 12, studies=2)
    node = node_factory()
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    stored = stored_files(node)
    assert len(stored) == 12
    for original in files:
        ds = pydicom.dcmread(original)
        path = stored[ds.SOPInstanceUID]
        # No raw UID in any path.
        assert ds.SOPInstanceUID not in str(path) and ds.StudyInstanceUID not in str(path)
        copy = pydicom.dcmread(path)
        assert copy == ds
        # The data set bytes after the File Meta are exactly what was sent.
        assert path.read_bytes().endswith(original.read_bytes()[_meta_end(original) :])
    rows = node.query("SELECT instance_count, state, calling_ae_title FROM study")
    assert sorted(r[0] for r in rows) == [6, 6]
    assert {r[2] for r in rows} == {"STORESCU"}


def _meta_end(path: Path) -> int:
    with open(path, "rb") as handle:
        pydicom.filereader.read_preamble(handle, False)
        pydicom.filereader._read_file_meta_info(handle)
        return handle.tell()


def test_study_becomes_stable_and_status_shows_it(node_factory, tmp_path: Path) -> None:
    node = node_factory()
    assert storescu(node.port, nm_files(tmp_path / "in", 3)).returncode == 0
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if node.query("SELECT state FROM study") == [("QUEUED",)]:
            break
        time.sleep(0.2)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mibi_node.cli",
            "status",
            "--data-dir",
            str(node.data_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    studies = json.loads(out.stdout)["studies"]
    assert len(studies) == 1
    # Stable, then routed: the description says MIBI, so it waits for a worker (none here).
    assert studies[0]["state"] == "QUEUED"
    assert "PARATHYROID MIBI" in studies[0]["state_reason"]
    assert studies[0]["instance_count"] == 3
    assert studies[0]["calling_ae_title"] == "STORESCU"
    # The study log line is there and holds no patient name or ID.
    log = node.log()
    assert "stable: 3 instances" in log
    assert "PHANTOM" not in log


def test_resend_is_idempotent_and_changed_content_replaces(node_factory, tmp_path: Path) -> None:
    files = nm_files(tmp_path / "in", 4)
    node = node_factory()
    assert storescu(node.port, files).returncode == 0
    assert storescu(node.port, files).returncode == 0
    assert node.query("SELECT count(*) FROM instance") == [(4,)]
    assert node.query("SELECT instance_count FROM study") == [(4,)]
    changed = pydicom.dcmread(files[0])
    changed.SeriesDescription = "DELAYED 2H ANT"
    write(changed, tmp_path / "changed.dcm")
    assert storescu(node.port, [tmp_path / "changed.dcm"]).returncode == 0
    assert node.query("SELECT count(*) FROM instance") == [(4,)]
    stored = pydicom.dcmread(stored_files(node)[changed.SOPInstanceUID])
    assert stored.SeriesDescription == "DELAYED 2H ANT"
    assert "replaced the stored one" in node.log()


def test_calling_ae_allow_list_and_host_binding(node_factory, tmp_path: Path) -> None:
    files = nm_files(tmp_path / "in", 2)
    node = node_factory(
        {
            "reception": {
                "allowed_peers": [
                    {"ae_title": "GAMMA1"},
                    {"ae_title": "FARAWAY", "hosts": ["192.0.2.7"]},
                ]
            }
        }
    )
    refused = storescu(node.port, files, calling="INTRUDER")
    assert refused.returncode != 0
    assert "Rejected" in refused.stderr or "reject" in refused.stderr.lower()
    wrong_host = storescu(node.port, files, calling="FARAWAY")
    assert wrong_host.returncode != 0
    wrong_called = storescu(node.port, files, calling="GAMMA1", called="SOMEONE_ELSE")
    assert wrong_called.returncode != 0
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    assert storescu(node.port, files, calling="GAMMA1").returncode == 0
    assert node.query("SELECT count(*) FROM instance") == [(2,)]
    log = node.log()
    assert "calling AE title not allowed" in log
    assert "not allowed from this host" in log
    assert "is not ours" in log


def test_sigkill_after_success_loses_nothing(node_factory, tmp_path: Path) -> None:
    files = nm_files(tmp_path / "in", 60, studies=3)
    data_dir = tmp_path / "var"
    node = node_factory(data_dir=data_dir)
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    node.kill()  # SIGKILL right after storescu saw every Success
    restarted = node_factory(data_dir=data_dir)
    stored = stored_files(restarted)
    assert len(stored) == 60
    for original in files:
        ds = pydicom.dcmread(original)
        assert pydicom.dcmread(stored[ds.SOPInstanceUID]).PixelData == ds.PixelData
    assert restarted.query("PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("acceptors", [1, 2])
def test_eight_parallel_associations_store_each_instance_once(
    node_factory, tmp_path: Path, acceptors: int
) -> None:
    files = nm_files(tmp_path / "in", 400, studies=8, rows=32, columns=32, frames=1)
    node = node_factory({"reception": {"acceptors": acceptors}})
    batches = [files[i::8] for i in range(8)]
    results: list[subprocess.CompletedProcess[str]] = []
    threads = [
        threading.Thread(target=lambda b=batch: results.append(storescu(node.port, b)))
        for batch in batches
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    assert node.query("SELECT count(*), count(DISTINCT sop_instance_uid) FROM instance") == [
        (400, 400)
    ]
    assert node.query("SELECT sum(instance_count) FROM study") == [(400,)]
    assert len(list((node.data_dir / "store").rglob("*.dcm"))) == 400


def test_disk_below_threshold_rejects_association(node_factory, tmp_path: Path) -> None:
    node = node_factory({"storage": {"min_free_mb": 1 << 40}})
    result = storescu(node.port, nm_files(tmp_path / "in", 2))
    assert result.returncode != 0
    assert node.query("SELECT count(*) FROM instance") == [(0,)]
    assert "storage.min_free_mb" in node.log()
    assert not [p for p in (node.data_dir / "store").rglob("*") if p.is_file()]


# -- malformed input sent with a pynetdicom SCU that passes raw file bytes through ----------


def _send_raw(port: int, paths: list[Path], sop_class: str = NM_STORAGE) -> list[int]:
    """Send files' data sets unparsed (as a broken modality would); return the statuses."""
    from pydicom.uid import ExplicitVRLittleEndian

    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        ae = AE(ae_title="BROKEN")
        ae.add_requested_context(sop_class, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", port, ae_title="MIBI_NODE")
        assert assoc.is_established
        statuses = []
        for path in paths:
            status = assoc.send_c_store(path)
            statuses.append(int(status.Status) if "Status" in status else -1)
        assoc.release()
        return statuses
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous


def _with_meta(
    path: Path, body: bytes, sop_class: str = NM_STORAGE, sop_instance: str | None = None
) -> Path:
    """A file with a valid preamble and File Meta followed by arbitrary data set bytes."""
    from io import BytesIO

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance or generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    path.write_bytes(buffer.getvalue() + body)
    return path


def test_bad_input_gets_precise_statuses_and_nothing_half_written(
    node_factory, tmp_path: Path
) -> None:
    node = node_factory()
    good = nm_dataset(seed=1)
    good_path = write(good, tmp_path / "good.dcm")
    raw = good_path.read_bytes()[_meta_end(good_path) :]
    truncated = _with_meta(
        tmp_path / "truncated.dcm", raw[: len(raw) // 2], sop_instance=good.SOPInstanceUID
    )
    garbage = _with_meta(tmp_path / "garbage.dcm", bytes(range(256)) * 40)
    # A CT data set sent on the NM presentation context.
    ct = nm_dataset(seed=2, sop_class_uid=CT_STORAGE)
    ct_path = write(ct, tmp_path / "ct.dcm")
    mismatched = _with_meta(
        tmp_path / "mismatch.dcm",
        ct_path.read_bytes()[_meta_end(ct_path) :],
        sop_instance=ct.SOPInstanceUID,
    )
    # Pixel Data shorter than Rows x Columns x Frames.
    short = nm_dataset(seed=3)
    short.PixelData = short.PixelData[:1000]
    short_path = write(short, tmp_path / "short.dcm")
    short_raw = _with_meta(
        tmp_path / "short_raw.dcm",
        short_path.read_bytes()[_meta_end(short_path) :],
        sop_instance=short.SOPInstanceUID,
    )
    statuses = _send_raw(node.port, [truncated, garbage, mismatched, short_raw, good_path])
    assert statuses[:4] == [0xC210, 0xC210, 0xA900, 0xC210]
    assert statuses[4] == 0x0000
    assert node.query("SELECT sop_instance_uid FROM instance") == [(good.SOPInstanceUID,)]
    store = node.data_dir / "store"
    assert [p for p in store.rglob("*") if p.is_file()] == [stored_files(node)[good.SOPInstanceUID]]
    # The node still serves a well-formed study afterwards.
    assert storescu(node.port, nm_files(tmp_path / "after", 2)).returncode == 0
    assert "Traceback" not in node.log()


def test_uid_with_path_characters_is_stored_inside_the_store(node_factory, tmp_path: Path) -> None:
    node = node_factory()
    hostile = nm_dataset(seed=4, sop_instance_uid="../../../../tmp/evil")
    hostile.StudyInstanceUID = "1.2/../../x"
    path = write(hostile, tmp_path / "hostile.dcm")
    statuses = _send_raw(node.port, [path])
    assert statuses == [0x0000]
    stored = stored_files(node)["../../../../tmp/evil"]
    assert (node.data_dir / "store").resolve() in stored.resolve().parents
    assert pydicom.dcmread(stored).SOPInstanceUID == "../../../../tmp/evil"
    assert not Path("/tmp/evil").exists()


def test_a_killed_acceptor_is_replaced_and_reception_goes_on(node_factory, tmp_path: Path) -> None:
    import os
    import signal

    node = node_factory({"reception": {"acceptors": 2}})
    pids = node.wait_for_acceptors(2)
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        current = node.acceptor_pids()
        if len(current) == 2 and pids[0] not in current:
            break
        time.sleep(0.2)
    assert len(node.acceptor_pids()) == 2 and pids[0] not in node.acceptor_pids()
    files = nm_files(tmp_path / "in", 20)
    for batch in (files[:10], files[10:]):
        assert storescu(node.port, batch).returncode == 0
    assert node.query("SELECT count(*) FROM instance") == [(20,)]
    assert "starting a new one" in node.log()


def test_repeated_sigterm_stops_the_node_and_every_acceptor(node_factory) -> None:
    import os
    import signal

    node = node_factory({"reception": {"acceptors": 2}})
    children = node.wait_for_acceptors(2)
    assert len(children) == 2
    for _ in range(3):  # an impatient operator (or systemd plus a user) signalling repeatedly
        node.process.send_signal(signal.SIGTERM)
        for pid in children:
            os.kill(pid, signal.SIGTERM)
    assert node.process.wait(15) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in children):
        time.sleep(0.1)
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    assert "stopped" in node.log()
