"""`make demo`: start a node, send synthetic MIBI studies with DCMTK storescu, show them.

Everything it starts it stops again; the node's data stays in ./var/demo for a look with
`mibi-node status --data-dir var/demo`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "var" / "demo"
STUDIES = ROOT / "var" / "demo-studies"
BIN = Path(sys.executable).parent
NODE = [str(BIN / "mibi-node")]


def _free_port(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return int(sock.getsockname()[1])


def _wait_for(port: int, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit("the node stopped during start-up; see var/demo/node.log")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit(f"the node did not listen on port {port} within {timeout:.0f} s")


def _ensure_storescu() -> None:
    if shutil.which("storescu"):
        return
    print("DCMTK storescu is missing; installing the DICOM peers (scripts/install-peers.sh)")
    if subprocess.run(["bash", str(ROOT / "scripts" / "install-peers.sh")], check=False).returncode:
        sys.exit("could not install DCMTK: run scripts/install-peers.sh as root, then make demo")


def main() -> None:
    _ensure_storescu()
    shutil.rmtree(DATA, ignore_errors=True)
    shutil.rmtree(STUDIES, ignore_errors=True)
    DATA.mkdir(parents=True)
    print("1. generating 10 synthetic dual-phase MIBI studies (phantoms, not patients)")
    subprocess.run(
        [*NODE, "synth", "--out", str(STUDIES), "--studies", "10", "--seed", "7"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    files = sorted(p for p in STUDIES.rglob("*.dcm"))
    port = _free_port(11112)
    print(f"2. starting the node: AE MIBI_NODE on 127.0.0.1:{port}, data in {DATA}")
    log = open(DATA / "node.log", "wb")  # noqa: SIM115 - handed to the subprocess
    node = subprocess.Popen(
        [
            *NODE,
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--data-dir",
            str(DATA),
            "--quiet-seconds",
            "2",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    try:
        _wait_for(port, node)
        print(f"3. sending {len(files)} NM instances with DCMTK storescu, as a gamma camera would")
        started = time.perf_counter()
        subprocess.run(
            [
                "storescu",
                "-aet",
                "GAMMA_CAM1",
                "-aec",
                "MIBI_NODE",
                "127.0.0.1",
                str(port),
                *map(str, files),
            ],
            check=True,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        print(f"   every instance acknowledged in {time.perf_counter() - started:.2f} s")
        print("4. waiting for the studies to become stable (2 s quiet period)")
        time.sleep(3.5)
        subprocess.run([*NODE, "status", "--data-dir", str(DATA)], check=True)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
        log.close()
    print(f"node stopped; look again with: .venv/bin/mibi-node status --data-dir {DATA}")


if __name__ == "__main__":
    main()
