"""C-STORE ingest: mibi-node against DCMTK storescp and a plain pynetdicom SCP, same run.

Sends the same NM instances (128x128, 16-bit, 2 frames) with DCMTK storescu over 1 and 4
parallel associations to each receiver, rounds interleaved (A B C A B C ...), and prints
instances/s (median, min-max) and the ratios. TCP_NODELAY=1 is set on every DCMTK process
(../shared/BENCHMARKS.md: without it Nagle caps DCMTK at about 14 instances/s). Every
round checks that every instance arrived.

Usage: python benchmarks/bench_ingest.py [--instances 1000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from common import free_port, stop, summary, wait_for_port, write_result  # noqa: E402
from factory import nm_files  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


class Receiver:
    name = ""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.out = work / "out"

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.process = self._spawn()
        wait_for_port(self.port)

    def _spawn(self) -> subprocess.Popen[bytes]:
        raise NotImplementedError

    def count(self) -> int:
        return sum(1 for p in self.out.rglob("*") if p.is_file())

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


class StoreSCP(Receiver):
    name = "DCMTK storescp"
    called = "STORESCP"

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["storescp", "-aet", self.called, "+xa", "-od", str(self.out), "-uf", str(self.port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class PlainPynetdicom(Receiver):
    name = "plain pynetdicom"
    called = "PLAIN"

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [sys.executable, str(HERE / "plain_scp.py"), str(self.port), str(self.out)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


class MibiNode(Receiver):
    name = "mibi-node"
    called = "MIBI_NODE"

    def _spawn(self) -> subprocess.Popen[bytes]:
        config = self.work / "node.toml"
        config.write_text(
            '[node]\nhost = "127.0.0.1"\n[storage]\nmin_free_mb = 0\n'
            '[assembly]\nquiet_seconds = 3600\n[logging]\nlevel = "WARNING"\n'
            f"[web]\nport = {free_port()}\n"
        )
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mibi_node.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                str(self.port),
                "--data-dir",
                str(self.out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """Start, then wait for the node to settle: its port listens before its analysis
        worker has started (a fresh interpreter that imports torch and loads the bundle,
        seconds of CPU on a small machine); timing from the port alone would measure that
        start-up against reception, not reception."""
        super().start()
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self._worker_state() in ("ready", "waiting for a bundle"):
                return
            time.sleep(0.2)
        raise RuntimeError("mibi-node's worker did not start within 180 s")

    def _worker_state(self) -> str | None:
        try:
            with sqlite3.connect(self.out / "mibi-node.sqlite3", timeout=1) as connection:
                row = connection.execute("SELECT state FROM worker").fetchone()
        except sqlite3.Error:  # not created yet
            return None
        return str(row[0]) if row else None

    def count(self) -> int:
        with sqlite3.connect(self.out / "mibi-node.sqlite3") as connection:
            return int(connection.execute("SELECT count(*) FROM instance").fetchone()[0])


def send(receiver: Receiver, files: list[Path], parallel: int) -> float:
    """Send all files over ``parallel`` associations; return instances per second."""
    batches = [files[i::parallel] for i in range(parallel)]
    started = time.perf_counter()
    processes = [
        subprocess.Popen(
            [
                "storescu",
                "-aec",
                receiver.called,
                "127.0.0.1",
                str(receiver.port),
                *map(str, batch),
            ],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        for batch in batches
    ]
    failures = [p.stderr.read().decode() if p.wait() and p.stderr else "" for p in processes]
    elapsed = time.perf_counter() - started
    if any(failures):
        raise RuntimeError(f"storescu failed against {receiver.name}: {failures}")
    arrived = receiver.count()
    if arrived != len(files):
        raise RuntimeError(f"{receiver.name}: {arrived} of {len(files)} instances arrived")
    return len(files) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="200 instances, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.instances, args.rounds = 200, 3
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/install-peers.sh")
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        files = nm_files(work / "in", args.instances, studies=10, rows=128, columns=128, frames=2)
        receivers: list[Receiver] = [
            StoreSCP(work / "storescp"),
            PlainPynetdicom(work / "plain"),
            MibiNode(work / "mibi"),
        ]
        rates: dict[str, dict[int, list[float]]] = {r.name: {1: [], 4: []} for r in receivers}
        for round_ in range(args.rounds):
            for parallel in (1, 4):
                for receiver in receivers:
                    receiver.start()
                    try:
                        rates[receiver.name][parallel].append(send(receiver, files, parallel))
                    finally:
                        receiver.stop()
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = {name: {str(p): summary(v) for p, v in by.items()} for name, by in rates.items()}
    mibi = table["mibi-node"]
    print(
        f"\nC-STORE ingest, {args.instances} NM instances (128x128x2, 16-bit), "
        f"median of {args.rounds} interleaved rounds, TCP_NODELAY=1 on DCMTK"
    )
    print(
        f"{'receiver':<20}{'1 assoc /s':>14}{'4 assoc /s':>14}{'mibi/x (1)':>12}{'mibi/x (4)':>12}"
    )
    for name, by in table.items():
        r1, r4 = by["1"]["median"], by["4"]["median"]
        print(
            f"{name:<20}{r1:>14.0f}{r4:>14.0f}"
            f"{mibi['1']['median'] / r1:>12.2f}{mibi['4']['median'] / r4:>12.2f}"
        )
    path = write_result(
        "ingest", {"instances": args.instances, "rounds": args.rounds, "rates": table}
    )
    print(f"\nwritten to {path}")


if __name__ == "__main__":
    main()
