"""What the reliability tests share: studies, a small bundle, a PACS sink, process probes.

Everything runs on loopback with real peers: ``mibi-node serve`` as a subprocess
(``tests/node.py``), DCMTK ``storescu`` as the gamma camera and DCMTK ``storescp`` as the
PACS that receives the SRs.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom

from node import NodeProcess, dcmtk_env


@dataclass(frozen=True)
class Study:
    """One synthetic dual-phase study: its Study Instance UID and its files (early, delayed)."""

    uid: str
    files: tuple[Path, ...]

    def sop_instance_uids(self) -> dict[Path, str]:
        return {
            path: str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
            for path in self.files
        }


def synth(folder: Path, count: int, seed: int) -> list[Study]:
    """``count`` phantom studies written by ``mibi-node synth`` (deterministic for a seed)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "mibi_node.cli",
            "synth",
            "--out",
            str(folder),
            "--studies",
            str(count),
            "--seed",
            str(seed),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    studies = []
    for path in sorted(folder.glob("study-*")):
        files = tuple(sorted(path.glob("*.dcm")))
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        studies.append(Study(uid, files))
    return studies


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the PACS ---------------------------------------------------------------------------------


class Sink:
    """DCMTK ``storescp`` as the PACS: every object it receives becomes a file of its own
    (``+uf``), so an SR sent twice shows up twice."""

    def __init__(self, folder: Path, port: int | None = None) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, sleep_during: int = 0) -> Sink:
        """Listen; with ``sleep_during`` each C-STORE takes that many seconds (a slow PACS)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        command = ["storescp", "-aet", "PACS", "+uf", "-od", str(self.folder)]
        if sleep_during:
            command += ["--sleep-during", str(sleep_during)]
        self.process = subprocess.Popen(
            [*command, str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, 10)
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def received(self) -> list[pydicom.Dataset]:
        """Headers of every object received so far (files still being written are skipped)."""
        headers = []
        for path in sorted(self.folder.iterdir()):
            if path.is_file():
                try:
                    headers.append(pydicom.dcmread(path, stop_before_pixels=True))
                except Exception:  # noqa: BLE001 - a file storescp is writing right now
                    continue
        return headers

    def srs_by_study(self) -> dict[str, dict[int, list[str]]]:
        """Study Instance UID -> version (Instance Number) -> SOP Instance UIDs received."""
        found: dict[str, dict[int, list[str]]] = {}
        for ds in self.received():
            if ds.get("Modality") != "SR":
                continue
            versions = found.setdefault(str(ds.StudyInstanceUID), {})
            versions.setdefault(int(ds.InstanceNumber), []).append(str(ds.SOPInstanceUID))
        return found


# -- node, ports and processes ----------------------------------------------------------------


def node_config(bundle: Path, pacs_port: int, **sections: dict[str, Any]) -> dict[str, Any]:
    """A node with one CPU worker, quick sweeps, short leases and a short dispatch backoff."""
    config: dict[str, dict[str, Any]] = {
        "reception": {"acceptors": 2},
        "workers": {"count": 1, "device": "cpu", "bundle": str(bundle), "poll_seconds": 0.1},
        "jobs": {"lease_seconds": 2, "max_attempts": 10},
        "dispatch": {
            "destinations": [{"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}],
            "initial_backoff_seconds": 0.5,
            "max_backoff_seconds": 2.0,
            "max_attempts": 1000,
            "timeout": 5,
        },
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    return config


def wait_for_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"nothing listens on port {port} after {timeout} s")


def wait_for_port_closed(port: int, timeout: float) -> None:
    """Wait until nothing accepts on ``port`` (the acceptors of a killed node are reaped)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                time.sleep(0.05)
        except OSError:
            return
    raise AssertionError(f"port {port} still accepts after {timeout} s")


def restart(node: NodeProcess) -> None:
    """SIGKILL the node with its acceptors and workers (a power cut), then start it again."""
    node.kill()
    wait_for_port_closed(node.port, 10)  # else start() could see the dying node's socket
    node.start()


def wait_for(
    condition: Callable[[], Any], timeout: float, what: str, node: NodeProcess | None = None
) -> Any:
    """Poll ``condition`` until it is truthy; fail with the node's log tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    log = f"\n--- node log ---\n{node.log()[-8000:]}" if node is not None else ""
    raise AssertionError(f"timed out after {timeout} s waiting for {what}{log}")


def children(node: NodeProcess) -> tuple[list[int], list[int]]:
    """The node's acceptor processes (forked) and worker processes (spawned)."""
    assert node.process is not None
    return node.acceptor_pids(), node.worker_pids()


def rss_mib(pid: int) -> float:
    """Resident memory of one process in MiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def daemon_rss_mib(node: NodeProcess) -> float:
    """Resident memory of the daemon: the parent process and its acceptors (not the workers)."""
    assert node.process is not None
    acceptors, _ = children(node)
    return rss_mib(node.process.pid) + sum(rss_mib(pid) for pid in acceptors)


def kill(pid: int) -> bool:
    """SIGKILL one process; ``False`` when it was already gone."""
    try:
        os.kill(pid, signal.SIGKILL)
        return True
    except ProcessLookupError:
        return False


# -- the gamma camera -------------------------------------------------------------------------

_SENDING = re.compile(r"Sending file: (.+)$")
_SUCCESS = "Received Store Response (Success)"


def send_with_storescu(
    port: int, files: list[Path] | tuple[Path, ...], calling: str = "GAMMA_CAM1", timeout=60
) -> tuple[int, list[Path]]:
    """Send files in one association with ``storescu -v``; returns its exit status and the
    files whose C-STORE it saw answered Success (what a camera may delete)."""
    command = ["storescu", "-v", "-aet", calling, "-aec", "MIBI_NODE", "-to", "10"]
    command += ["-ta", "10", "-td", "20", "127.0.0.1", str(port), *map(str, files)]
    try:
        run = subprocess.run(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,  # one stream, in order
            text=True,
            timeout=timeout,
            env=dcmtk_env(),
        )
    except subprocess.TimeoutExpired:
        return -1, []
    acknowledged: list[Path] = []
    current: Path | None = None
    for line in run.stdout.splitlines():
        match = _SENDING.search(line)
        if match:
            current = Path(match.group(1).strip())
        elif _SUCCESS in line and current is not None:
            acknowledged.append(current)
            current = None
    return run.returncode, acknowledged


def status_json(node: NodeProcess) -> dict[str, Any]:
    """``mibi-node status --json`` as a dict."""
    import json

    out = subprocess.run(
        [sys.executable, "-m", "mibi_node.cli", "status", "--data-dir", str(node.data_dir)]
        + ["--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(out.stdout)
