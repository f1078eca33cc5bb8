"""Crash anywhere: SIGKILL the node, an acceptor, the worker and the sender at random moments
while a camera sends 60 studies; afterwards nothing acknowledged is lost and every study has
exactly one SR per version at the PACS.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from pathlib import Path

import pydicom
import pytest
from harness import (
    Sink,
    Study,
    children,
    kill,
    node_config,
    restart,
    send_with_storescu,
    wait_for,
    wait_for_port_closed,
)

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
