"""Run ``mibi-node serve`` as a real subprocess on a loopback port, as a hospital would."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(type(value))


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a TOML file from section -> key -> value (``a.b`` names nested tables)."""
    lines: list[str] = []
    for section, values in sections.items():
        arrays = {
            k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        lines.append(f"[{section}]")
        for key, value in values.items():
            if key not in arrays:
                lines.append(f"{key} = {_toml_value(value)}")
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(f"{k} = {_toml_value(v)}" for k, v in item.items())
    path.write_text("\n".join(lines) + "\n")
    return path


class NodeProcess:
    """A ``mibi-node serve`` subprocess with its own data folder and port."""

    def __init__(self, data_dir: Path, port: int, config: dict[str, dict[str, Any]] | None = None):
        self.data_dir = data_dir
        self.port = port
        sections: dict[str, dict[str, Any]] = {
            "node": {"ae_title": "MIBI_NODE", "host": "127.0.0.1"},
            "storage": {"min_free_mb": 0},
            "assembly": {"quiet_seconds": 1, "sweep_seconds": 0.2},
            # Reception tests need no analysis; tests that do ask for workers.
            "workers": {"count": 0},
            # Many nodes run side by side in the tests: each status page on a free port.
            "web": {"port": 0},
        }
        for section, values in (config or {}).items():
            sections.setdefault(section, {}).update(values)
        self.config_path = write_config(data_dir.parent / f"node-{port}.toml", sections)
        #: The node's database: its SQLite file, or ``database.url`` (e.g. PostgreSQL).
        self.database_url = str(sections.get("database", {}).get("url", "")) or (
            f"sqlite:///{data_dir / 'mibi-node.sqlite3'}"
        )
        self.log_path = data_dir.parent / f"node-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> NodeProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the subprocess
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "mibi_node.cli",
                "serve",
                "--config",
                str(self.config_path),
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            start_new_session=True,  # its own process group: kill() takes the acceptors too
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mibi-node exited early:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"mibi-node did not listen within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.process is None or self.process.poll() is not None:
            return None if self.process is None else self.process.returncode
        self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL the node and every acceptor process at once, as a power cut would."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)

    def wait_for_acceptors(self, count: int, timeout: float = 15.0) -> list[int]:
        """The acceptor pids once there are ``count`` of them (the port listens first)."""
        deadline = time.monotonic() + timeout
        while True:
            pids = self.acceptor_pids()
            if len(pids) == count or time.monotonic() > deadline:
                return pids
            time.sleep(0.1)

    def child_pids(self) -> list[int]:
        """Process ids of all the node's children (acceptors, workers, helpers)."""
        assert self.process is not None
        out = subprocess.run(
            ["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True, check=False
        )
        return [int(pid) for pid in out.stdout.split()]

    def acceptor_pids(self) -> list[int]:
        """Process ids of the node's acceptor children."""
        assert self.process is not None
        # Acceptors are forked, so they run the parent's command line; spawned workers and
        # multiprocessing's resource tracker run their own and are not acceptors.
        parent = _cmdline(self.process.pid)
        return [pid for pid in self.child_pids() if _cmdline(pid) == parent]

    def worker_pids(self) -> list[int]:
        """Process ids of the node's spawned worker children (not the resource tracker)."""
        return [pid for pid in self.child_pids() if b"spawn_main" in (_cmdline(pid) or b"")]

    def query(self, sql: str) -> list[tuple[Any, ...]]:
        """Run a read-only SQL query on the node's database."""
        engine = create_engine(self.database_url)
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql))]
        finally:
            engine.dispose()


def _cmdline(pid: int) -> bytes | None:
    """A process' command line, or ``None`` once it has gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None


def dcmtk_env() -> dict[str, str]:
    """Environment for DCMTK tools: Nagle off, as every fair DICOM benchmark sets it."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu(
    port: int,
    files: list[Path],
    *,
    calling: str = "STORESCU",
    called: str = "MIBI_NODE",
    extra: list[str] | None = None,
    timeout: float = 120.0,
) -> subprocess.CompletedProcess[str]:
    """Send files with DCMTK ``storescu``; returns the finished process."""
    command = ["storescu", "-aet", calling, "-aec", called, *(extra or []), "127.0.0.1", str(port)]
    command += [str(f) for f in files]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env=dcmtk_env(), check=False
    )
