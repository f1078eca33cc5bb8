"""Crash anywhere: SIGKILL the node, an acceptor, the worker and the sender at random moments
while a camera sends 60 studies; afterwards nothing acknowledged is lost and every study has
exactly one SR per version at the PACS. And a STOW-RS upload cut by a power cut keeps every
instance its responses listed.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import requests
from harness import (
    Sink,
    Study,
    children,
    free_port,
    kill,
    node_config,
    restart,
    send_with_storescu,
    wait_for,
    wait_for_port,
    wait_for_port_closed,
)
from pydicom.dataset import Dataset

from factory import nm_files
from node import NodeProcess, storescu

pytestmark = [pytest.mark.reliability, pytest.mark.peers, pytest.mark.timeout(480)]

STUDIES = 60
SEED = 20260108
#: What is killed, in this order, each at a random moment: reception (the whole node while
#: storescu sends, or one acceptor), inference (the worker while a job runs), dispatch (the
#: process that is sending an SR to a slow PACS).
PLAN = ("node", "acceptor", "worker", "dispatch", "node", "worker", "node-after-camera")


class Camera(threading.Thread):
    """Sends each study with storescu, again and again until every file is acknowledged."""

    def __init__(self, port: int, studies: list[Study], rng: random.Random) -> None:
        super().__init__(name="camera", daemon=True)
        self.port = port
        self.pauses = [rng.uniform(0.05, 0.4) for _ in studies]  # studies come one by one
        self.studies = studies
        self.acknowledged: set[Path] = set()
        self.associations = 0
        self.failed_associations = 0
        self.sent = 0
        self.error: str | None = None

    def run(self) -> None:
        for study, pause in zip(self.studies, self.pauses, strict=True):
            time.sleep(pause)
            for _ in range(200):
                code, acknowledged = send_with_storescu(self.port, study.files)
                self.associations += 1
                self.acknowledged.update(acknowledged)
                if code == 0 and set(study.files) <= self.acknowledged:
                    break
                self.failed_associations += 1
                time.sleep(0.3)  # the node is restarting: try again, as a camera would
            else:
                self.error = f"study {study.uid} never went through"
                return
            self.sent += 1


def _running_job(node: NodeProcess, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.query("SELECT 1 FROM job WHERE state = 'RUNNING'"):
            return True
        time.sleep(0.02)
    return False


def test_crash_anywhere_loses_nothing_and_duplicates_no_sr(
    node_factory, dcmtk, bundle: Path, phantoms: list[Study], tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    studies = phantoms[:STUDIES]
    sink = Sink(tmp_path / "pacs").start()
    started = time.monotonic()
    node = node_factory(node_config(bundle, sink.port), data_dir=tmp_path / "var")
    camera = Camera(node.port, studies, rng)
    kills: list[tuple[str, float]] = []
    try:
        camera.start()
        for what in PLAN:
            if what == "node-after-camera":
                camera.join(300)
                wait_for(
                    lambda: node.query("SELECT 1 FROM job WHERE state IN ('QUEUED','RUNNING')"),
                    60,
                    "jobs still to analyse",
                    node,
                )
            time.sleep(rng.uniform(0.5, 2.5))
            at = time.monotonic() - started
            if what.startswith("node"):
                restart(node)  # a power cut: parent, acceptors and workers at once
            elif what == "acceptor":
                acceptors, _ = children(node)
                assert kill(rng.choice(acceptors))
            elif what == "worker":
                assert _running_job(node, 90), "no job ran while the camera was sending"
                _, workers = children(node)
                assert workers and kill(workers[0])
            elif what == "dispatch":
                at = _kill_sender(node, sink) - started
            kills.append((what, round(at, 1)))
        camera.join(300)
        assert camera.error is None, camera.error
        assert not camera.is_alive(), "the camera did not finish"

        def converged() -> bool:
            done = node.query("SELECT count(*) FROM study WHERE state = 'DONE'")[0][0]
            open_deliveries = node.query("SELECT count(*) FROM delivery WHERE state != 'DONE'")
            return done == STUDIES and open_deliveries[0][0] == 0

        wait_for(converged, 240, f"{STUDIES} studies DONE with every SR delivered", node)
        elapsed = time.monotonic() - started
    finally:
        sink.stop()

    # 1. Every instance storescu saw acknowledged is stored, recorded and readable.
    expected = {}
    for study in studies:
        for path, uid in study.sop_instance_uids().items():
            if path in camera.acknowledged:
                expected[uid] = path
    assert len(expected) == 2 * STUDIES  # the camera went on until every file was acknowledged
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instance"))
    missing = sorted(set(expected) - set(rows))
    assert not missing, f"{len(missing)} acknowledged instance(s) have no row"
    for uid, original in expected.items():
        stored = pydicom.dcmread(node.data_dir / "store" / rows[uid])
        assert stored.PixelData == pydicom.dcmread(original).PixelData
    counts = node.query(
        "SELECT study.instance_count, count(instance.id) FROM study "
        "JOIN instance ON instance.study_id = study.id GROUP BY study.id"
    )
    assert all(recorded == actual == 2 for recorded, actual in counts), counts
    # 2. Every MIBI study has one SR per version at the PACS, never two of one version.
    srs = sink.srs_by_study()
    assert set(srs) == {study.uid for study in studies}
    distinct_per_version = Counter(
        len(set(uids)) for versions in srs.values() for uids in versions.values()
    )
    assert set(distinct_per_version) == {1}, distinct_per_version
    resent = sum(len(uids) - len(set(uids)) for v in srs.values() for uids in v.values())
    # 3. The database is consistent.
    assert node.query("PRAGMA integrity_check") == [("ok",)]
    assert node.query("PRAGMA foreign_key_check") == []
    assert node.query("SELECT count(*) FROM job WHERE state != 'DONE'") == [(0,)]
    assert not any((node.data_dir / "store" / ".incoming").iterdir())
    # 4. The log names no patient at INFO (the phantoms have names and IDs like a hospital's).
    log = node.log()
    for study in studies[:10]:
        header = pydicom.dcmread(study.files[0], stop_before_pixels=True)
        assert str(header.PatientName) not in log and str(header.PatientID) not in log
    versions = Counter(len(v) for v in srs.values())
    print(
        f"\nFIGURES crash: {STUDIES} studies, {len(expected)} instances acknowledged, "
        f"{camera.associations} associations ({camera.failed_associations} cut by a kill), "
        f"kills {kills}, studies by number of versions {dict(versions)}, "
        f"SRs re-sent with the same UID {resent}, {elapsed:.0f} s"
    )
    assert len(kills) >= 5


def _kill_sender(node: NodeProcess, sink: Sink) -> float:
    """Make the PACS slow, SIGKILL whichever process is sending an SR to it, make it fast."""
    sink.stop()
    sink.start(sleep_during=3)
    try:
        owner = wait_for(
            lambda: node.query("SELECT lease_owner FROM delivery WHERE state = 'SENDING'"),
            90,
            "an SR being sent",
            node,
        )[0][0]
        at = time.monotonic()
        time.sleep(0.5)  # inside the C-STORE: the PACS has the data, the answer is pending
        if owner.startswith("dispatch-"):  # the node's own dispatch sweep
            restart(node)
        else:
            [(pid,)] = node.query(f"SELECT pid FROM worker WHERE name = '{owner}'")
            assert kill(pid)
        return at
    finally:
        sink.stop()
        sink.start()


def test_file_placed_but_not_committed_is_recorded_when_sent_again(
    node_factory, dcmtk, phantoms: list[Study], tmp_path: Path
) -> None:
    """A crash between the rename into the store and the commit leaves a file without a row;
    the camera got no Success and sends the instance again: it must get its row."""
    study = phantoms[0]
    data_dir = tmp_path / "var"
    node = node_factory(data_dir=data_dir)
    assert storescu(node.port, list(study.files)).returncode == 0
    node.kill()
    wait_for_port_closed(node.port, 10)
    # The state a SIGKILL between os.replace() and COMMIT leaves: the file, and no rows.
    from sqlalchemy import create_engine, text

    engine = create_engine(f"sqlite:///{data_dir / 'mibi-node.sqlite3'}")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_event"))
        connection.execute(text("DELETE FROM instance"))
        connection.execute(text("DELETE FROM study"))
    engine.dispose()
    assert len(list((data_dir / "store").rglob("*.dcm"))) == 2
    node.start()
    code, acknowledged = send_with_storescu(node.port, study.files)
    assert code == 0 and set(acknowledged) == set(study.files)
    uids = set(study.sop_instance_uids().values())
    assert {uid for (uid,) in node.query("SELECT sop_instance_uid FROM instance")} == uids
    assert node.query("SELECT instance_count FROM study") == [(2,)]


def test_stow_upload_cut_by_a_power_cut_keeps_every_instance_it_answered_for(
    node_factory, tmp_path: Path
) -> None:
    """A STOW-RS client uploads six requests of ten instances, a part every 50 ms; the node
    is SIGKILLed in the middle. Every instance a 200/202 response listed is on disk and in the
    database after the restart; the client then sends everything again and each instance is
    there once."""
    stow = free_port()
    node = node_factory(
        {"reception.dicomweb": {"enabled": True, "port": stow}}, data_dir=tmp_path / "var"
    )
    wait_for_port(stow, 15)
    files = nm_files(tmp_path / "in", 60, studies=6)
    url = f"http://127.0.0.1:{stow}/dicomweb/studies"
    headers = {"Content-Type": 'multipart/related; type="application/dicom"; boundary=CUT'}

    def body(batch: list[Path], pause: float) -> Iterator[bytes]:
        for path in batch:
            yield b"--CUT\r\nContent-Type: application/dicom\r\n\r\n" + path.read_bytes() + b"\r\n"
            time.sleep(pause)
        yield b"--CUT--\r\n"

    def upload(pause: float, answered: set[str], cut: list[str]) -> None:
        for start in range(0, len(files), 10):
            try:
                response = requests.post(
                    url, data=body(files[start : start + 10], pause), headers=headers, timeout=30
                )
            except requests.RequestException as exc:
                cut.append(type(exc).__name__)
                return
            assert response.status_code == 200, response.text
            listed = Dataset.from_json(response.json()).ReferencedSOPSequence
            answered.update(str(item.ReferencedSOPInstanceUID) for item in listed)

    answered: set[str] = set()
    cut: list[str] = []
    client = threading.Thread(target=upload, args=(0.05, answered, cut), daemon=True)
    client.start()
    wait_for(lambda: node.query("SELECT count(*) FROM instance")[0][0] >= 15, 60, "an upload", node)
    restart(node)  # a power cut in the middle of the second or third request
    client.join(60)
    assert cut and 10 <= len(answered) < len(files), (cut, len(answered))
    wait_for_port(stow, 15)
    assert not any((node.data_dir / "store" / ".incoming").iterdir())
    rows = dict(node.query("SELECT sop_instance_uid, path FROM instance"))
    originals = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in files}
    missing = sorted(answered - set(rows))
    assert not missing, f"{len(missing)} instance(s) answered for have no row"
    for uid in answered:
        stored = pydicom.dcmread(node.data_dir / "store" / rows[uid])
        assert stored.PixelData == pydicom.dcmread(originals[uid]).PixelData
    # The client sends every instance again: each is stored once, the counts add up.
    again: set[str] = set()
    upload(0.0, again, cut)
    assert again == set(originals)
    assert node.query("SELECT count(*) FROM instance") == [(len(files),)]
    assert node.query("SELECT sum(instance_count) FROM study") == [(len(files),)]
    assert node.query("PRAGMA integrity_check") == [("ok",)]
    assert "PHANTOM" not in node.log()  # no patient name or ID in the log
    print(
        f"\nFIGURES stow-crash: {len(answered)} of {len(files)} instances answered before the "
        f"power cut ({cut[0]} on the cut request), all of them kept"
    )
