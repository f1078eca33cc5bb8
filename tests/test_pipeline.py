"""From storescu to an SR in PACS, with real peers: the node, DCMTK storescp, dciodvfy.

Every test runs ``mibi-node serve`` with a worker process and a small random-weight bundle
(the result's class does not matter here; that the loop closes does), once on the default
SQLite file and once on a PostgreSQL database (``node_database``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from bundles import SLOW_RECIPE, random_bundle
from factory import CT_STORAGE, nm_dataset, write
from mibi_node.report import read_probabilities
from node import NodeProcess, dcmtk_env, storescu
from orthanc import OrthancServer, orthanc_server  # noqa: F401 - a fixture
from ports import free_port

pytestmark = pytest.mark.peers


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_bundle(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> list[list[Path]]:
    """Six phantom studies, each a list of its files (early, delayed)."""
    folder = tmp_path_factory.mktemp("phantoms")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mibi_node.cli",
            "synth",
            "--out",
            str(folder),
            "--studies",
            "6",
            "--seed",
            "11",
        ],
        check=True,
        capture_output=True,
    )
    return [sorted(p.glob("*.dcm")) for p in sorted(folder.glob("study-*"))]


class StoreSCP:
    """DCMTK storescp as the PACS, on a loopback port, writing into a folder."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["storescp", "-aet", "PACS", "-od", str(self.folder), str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.5)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)

    def files(self) -> list[Path]:
        """The files storescp has written. One written to in the last 0.5 s may still be
        incomplete (storescp writes in place), so this waits until every file is 0.5 s
        old before it lists them: a file the node has seen acknowledged is always listed."""
        while True:
            files = sorted(self.folder.glob("*"))
            youngest = max((p.stat().st_mtime for p in files), default=0.0)
            wait = youngest + 0.5 - time.time()
            if wait <= 0:
                return files
            time.sleep(wait)

    def received(self, modality: str | None = None) -> list[pydicom.Dataset]:
        """The headers of the files storescp has written (of one modality, when given: "SR"
        for the SRs, "OT" for the key images), in file name order."""
        headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in self.files()]
        return [ds for ds in headers if modality is None or ds.Modality == modality]

    def modalities(self) -> list[str]:
        """The Modality of each received file, sorted: ``["OT", "SR"]`` for one parathyroid
        result (its SR and, on by default, its key image)."""
        return sorted(str(ds.Modality) for ds in self.received())


@pytest.fixture
def pacs(require_tool: Callable[[str], str], tmp_path: Path) -> Iterator[StoreSCP]:
    require_tool("storescp")
    require_tool("storescu")
    server = StoreSCP(tmp_path / "pacs").start()
    yield server
    server.stop()


@pytest.fixture
def node_database(database_url: str) -> dict[str, str]:
    """The node's ``[database]``: none (its default SQLite file), then a PostgreSQL URL."""
    return {} if database_url.startswith("sqlite") else {"url": database_url}


def _node(
    node_factory: Callable[..., NodeProcess],
    bundle: Path,
    port: int,
    pacs_ae: str = "PACS",
    **sections: dict,
) -> NodeProcess:
    config = {
        "workers": {"count": 1, "device": "cpu", "bundle": str(bundle), "poll_seconds": 0.1},
        "dispatch": {
            "destinations": [{"ae_title": pacs_ae, "host": "127.0.0.1", "port": port}],
            "initial_backoff_seconds": 0.5,
            "max_backoff_seconds": 1.0,
        },
        "jobs": {"lease_seconds": 2},
    }
    for section, values in sections.items():
        if values:
            config.setdefault(section, {}).update(values)
    return node_factory(config)


def _wait(condition: Callable[[], object], timeout: float, what: str, node: NodeProcess) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}\n--- node log ---\n{node.log()[-6000:]}")


def _status(node: NodeProcess) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mibi_node.cli",
            "status",
            "--config",
            str(node.config_path),
            "--data-dir",
            str(node.data_dir),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)


def _dciodvfy_errors(tool: str, path: Path) -> list[str]:
    run = subprocess.run([tool, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def test_study_to_sr_in_pacs(
    node_factory,
    pacs: StoreSCP,
    tiny_bundle: Path,
    studies,
    require_tool,
    tmp_path: Path,
    node_database: dict[str, str],
) -> None:
    dciodvfy = require_tool("dciodvfy")
    node = _node(
        node_factory,
        tiny_bundle,
        pacs.port,
        database=node_database,
        reception={"accept_all_storage": True},
    )  # the key image beside each SR: on by default
    ct = nm_dataset(seed=40, sop_class_uid=CT_STORAGE)
    ct.Modality, ct.StudyDescription = "CT", "CHEST"
    files = [*studies[0], *studies[1], write(ct, tmp_path / "ct.dcm")]
    assert storescu(node.port, files, calling="GAMMA_CAM1").returncode == 0
    _wait(lambda: len(pacs.files()) >= 4, 90, "two SRs and two key images at the PACS", node)
    time.sleep(1.0)
    received = {p: pydicom.dcmread(p, stop_before_pixels=True) for p in pacs.files()}
    srs = [p for p, ds in received.items() if ds.Modality == "SR"]
    key_images = [p for p, ds in received.items() if ds.Modality != "SR"]
    assert len(srs) == 2 and len(key_images) == 2, [p.name for p in received]
    for path in key_images:
        assert _dciodvfy_errors(dciodvfy, path) == []
    sent = {
        str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
        for p in studies[0] + studies[1]
    }
    for path in srs:
        sr = pydicom.dcmread(path)
        assert sr.Modality == "SR" and sr.SeriesDescription == "MIBI-NODE AI RESULT"
        probabilities = read_probabilities(path)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-6)
        assert len(probabilities) == 5
        referenced = {
            str(item.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for item in series.ReferencedSOPSequence
        }
        study_files = [p for uid, p in sent.items() if uid in referenced]
        assert len(study_files) == 2  # the early and the delayed image of that study
        source = pydicom.dcmread(study_files[0], stop_before_pixels=True)
        assert sr.StudyInstanceUID == source.StudyInstanceUID
        assert sr.PatientID == source.PatientID
        assert _dciodvfy_errors(dciodvfy, path) == []
    status = _status(node)
    states = sorted(s["state"] for s in status["studies"])
    assert states == ["DONE", "DONE", "IGNORED"]
    [ignored] = [s for s in status["studies"] if s["state"] == "IGNORED"]
    assert "modality CT" in ignored["state_reason"]
    assert status["jobs"] == {"DONE": 2}
    assert status["deliveries"] == []
    timings = node.query("SELECT timings FROM job")
    for (row,) in timings:  # SQLite gives the JSON text, PostgreSQL the parsed value
        assert set(row if isinstance(row, dict) else json.loads(row)) == {
            "read",
            "denoise",
            "inference",
            "sr",
        }
    # The log names no patient and no UID at INFO.
    source = pydicom.dcmread(studies[0][0], stop_before_pixels=True)
    log = node.log()
    assert str(source.PatientName) not in log
    assert str(source.StudyInstanceUID) not in log


def test_a_routed_job_wakes_the_idle_worker(
    node_factory, pacs: StoreSCP, tiny_bundle: Path, studies
) -> None:
    """The sweep that queues a job wakes the node's worker: with a 120 s poll the SR still
    comes within the minute (a worker that only polled would idle until the poll ends)."""
    node = _node(node_factory, tiny_bundle, pacs.port, workers={"poll_seconds": 120.0})
    _wait(
        lambda: node.query("SELECT COUNT(*) FROM worker WHERE state = 'ready'")[0][0],
        90,
        "the worker's bundle loaded (then it idles on its 120 s poll)",
        node,
    )
    time.sleep(1.0)  # past its first, empty claim
    assert storescu(node.port, studies[0], calling="GAMMA_CAM1").returncode == 0
    _wait(
        lambda: len(pacs.files()) >= 2,
        60,
        "the SR and its key image at the PACS before the worker's poll ends",
        node,
    )
    assert pacs.modalities() == ["OT", "SR"]


def test_phases_versions_and_a_phase_that_never_comes(
    node_factory, pacs: StoreSCP, tiny_bundle: Path, studies, tmp_path: Path, node_database
) -> None:
    node = _node(
        node_factory,
        tiny_bundle,
        pacs.port,
        assembly={"max_phase_wait": 6},
        database=node_database,
    )
    early, delayed = studies[2]
    lonely_early, _ = studies[3]
    # The phase wait starts with the study: a worker still loading its bundle under load
    # would find it over already.
    _wait(lambda: node.query("SELECT state FROM worker") == [("ready",)], 60, "the worker", node)
    assert storescu(node.port, [early, lonely_early]).returncode == 0
    _wait(
        lambda: node.query("SELECT state FROM study") == [("AWAITING_PHASE",)] * 2,
        60,
        "both studies awaiting their delayed phase",
        node,
    )
    reason = node.query("SELECT state_reason FROM study")[0][0]
    assert "waiting for the delayed phase" in reason
    # The delayed images come: the study is analysed as version 1.
    assert storescu(node.port, [delayed]).returncode == 0
    _wait(lambda: len(pacs.files()) == 2, 60, "the first SR and its key image", node)
    assert pacs.modalities() == ["OT", "SR"]
    [first] = pacs.received("SR")
    # The other study's delayed phase never arrives.
    _wait(
        lambda: ("FAILED",) in node.query("SELECT state FROM study"),
        60,
        "the incomplete study to fail",
        node,
    )
    failed = node.query("SELECT state_reason FROM study WHERE state = 'FAILED'")[0][0]
    assert failed.startswith("delayed phase never arrived")
    # A corrected delayed image after the result: version 2 supersedes version 1.
    changed = pydicom.dcmread(delayed)
    changed.ImageComments = "re-sent after correction"
    assert storescu(node.port, [write(changed, tmp_path / "changed.dcm")]).returncode == 0
    _wait(lambda: len(pacs.files()) == 4, 60, "the second SR and its key image", node)
    assert pacs.modalities() == ["OT", "OT", "SR", "SR"]
    [second] = [ds for ds in pacs.received("SR") if ds.SOPInstanceUID != first.SOPInstanceUID]
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.InstanceNumber == 2
    predecessor = second.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0]
    assert predecessor.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID


def test_pacs_down_then_back(
    node_factory, require_tool, tiny_bundle: Path, studies, tmp_path: Path, node_database
) -> None:
    require_tool("storescp")
    port = free_port()
    node = _node(node_factory, tiny_bundle, port, database=node_database)
    assert storescu(node.port, studies[4]).returncode == 0
    _wait(
        lambda: node.query("SELECT attempts FROM delivery WHERE attempts >= 2"),
        90,
        "two failed delivery attempts",
        node,
    )
    [pending] = _status(node)["deliveries"]
    assert pending["state"] in ("PENDING", "SENDING")
    assert pending["destination"] == f"PACS@127.0.0.1:{port}"
    pacs = StoreSCP(tmp_path / "pacs", port).start()
    try:
        _wait(lambda: len(pacs.files()) >= 2, 60, "the SR after the PACS came back", node)
        time.sleep(3.0)  # more retries would show up here as duplicates
        assert pacs.modalities() == ["OT", "SR"]
        assert node.query("SELECT state FROM delivery") == [("DONE",)]
    finally:
        pacs.stop()


def _kill_worker_when_running(node: NodeProcess, study_uid: str, timeout: float = 90) -> int:
    """SIGKILL the worker the moment it works on ``study_uid``'s job; returns the job id."""
    sql = (
        "SELECT job.id, job.lease_owner FROM job JOIN study ON job.study_id = study.id "
        f"WHERE job.state = 'RUNNING' AND study.study_instance_uid = '{study_uid}'"
    )
    job_id, owner = _wait(lambda: node.query(sql), timeout, "the job to run", node)[0]  # type: ignore[index]
    [(pid,)] = node.query(f"SELECT pid FROM worker WHERE name = '{owner}'")
    os.kill(pid, signal.SIGKILL)
    return int(job_id)


def test_killed_worker_and_poison_study(
    node_factory, pacs: StoreSCP, studies, tmp_path_factory: pytest.TempPathFactory, node_database
) -> None:
    bundle = random_bundle(tmp_path_factory.mktemp("slow"), SLOW_RECIPE)
    node = _node(
        node_factory,
        bundle,
        pacs.port,
        jobs={"max_attempts": 2, "lease_seconds": 2},
        database=node_database,
    )
    uid = str(pydicom.dcmread(studies[0][0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, studies[0]).returncode == 0
    job = _kill_worker_when_running(node, uid)
    # The node restarts the worker, the lease expires, the job runs again: one SR.
    _wait(lambda: len(pacs.files()) >= 2, 120, "the SR after the worker was killed", node)
    time.sleep(1.0)
    assert pacs.modalities() == ["OT", "SR"]  # one SR and its key image
    assert node.query(f"SELECT state, attempts FROM job WHERE id = {job}") == [("DONE", 2)]
    # A study the worker dies on every time fails after its attempts ...
    poison = str(pydicom.dcmread(studies[5][0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, studies[5]).returncode == 0
    for _ in range(2):
        poisoned = _kill_worker_when_running(node, poison)
        _wait(
            lambda job=poisoned: node.query(
                f"SELECT 1 FROM job WHERE id = {job} AND state != 'RUNNING'"
            ),
            60,
            "the lease to expire",
            node,
        )
    [(state, error)] = node.query(f"SELECT state, error FROM job WHERE id = {poisoned}")
    assert state == "FAILED" and "no attempts left" in error
    # ... while the next study still gets its SR, and reception never stopped.
    assert storescu(node.port, studies[1]).returncode == 0
    _wait(lambda: len(pacs.files()) == 4, 120, "the SR of the study after the poison", node)
    assert pacs.modalities() == ["OT", "OT", "SR", "SR"]


def test_sr_lands_in_orthanc_in_the_same_study(
    node_factory,
    orthanc_server: OrthancServer,  # noqa: F811 - the fixture imported above
    tiny_bundle: Path,
    studies,
    require_tool,
) -> None:
    require_tool("storescu")
    node = _node(node_factory, tiny_bundle, orthanc_server.dicom_port, pacs_ae="ORTHANC")
    uid = str(pydicom.dcmread(studies[2][0], stop_before_pixels=True).StudyInstanceUID)
    assert storescu(node.port, studies[2]).returncode == 0
    # The images go to the node only; the PACS gets the SR and the key image, filed under
    # the same study.
    _wait(
        lambda: len(orthanc_server.instances_of_study(uid)) == 2,
        90,
        "the SR and the key image in Orthanc",
        node,
    )
    instances = orthanc_server.instances_of_study(uid)
    assert sorted((i["Modality"], i["SeriesDescription"]) for i in instances) == [
        ("OT", "MIBI-NODE AI KEY IMAGE"),
        ("SR", "MIBI-NODE AI RESULT"),
    ]
    # Orthanc may show the instance a moment before the node has recorded the answer.
    _wait(
        lambda: node.query("SELECT state, last_status FROM delivery") == [("DONE", 0)],
        30,
        "the delivery recorded as done",
        node,
    )


def test_without_a_bundle_reception_goes_on_and_status_says_why(
    node_factory, studies, tmp_path: Path, require_tool, node_database
) -> None:
    require_tool("storescu")
    missing = tmp_path / "no-bundle-here"
    node = _node(node_factory, missing, free_port(), database=node_database)
    assert storescu(node.port, studies[0]).returncode == 0
    _wait(
        lambda: (
            node.query("SELECT state FROM job") == [("QUEUED",)]
            and node.query("SELECT state FROM worker") == [("waiting for a bundle",)]
        ),
        60,
        "a queued job and a worker waiting for its bundle",
        node,
    )
    [worker] = _status(node)["workers"]
    assert str(missing) in worker["message"]
    out = subprocess.run(
        [sys.executable, "-m", "mibi_node.cli", "status", "--config", str(node.config_path)]
        + ["--data-dir", str(node.data_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "waiting for a bundle" in out and "jobs: 1 queued" in out
    # Every instance was stored all the same.
    assert node.query("SELECT count(*) FROM instance") == [(2,)]
