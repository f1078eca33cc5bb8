"""A real PostgreSQL server from Debian's packages, in a temporary folder, on loopback.

``initdb`` into a fresh folder, ``pg_ctl start`` on a free 127.0.0.1 port (its Unix socket in
that folder too, so it never meets a system cluster), one database per test, ``pg_ctl stop``
at the end. ``.ci/run`` installs the ``postgresql`` package; without it the PostgreSQL
variants of the tests skip and say so. As root (CI), the server runs as the ``postgres``
user that the package creates: PostgreSQL refuses to run as root.

Also used by ``benchmarks/bench_queue.py``; ``python tests/postgres.py`` starts one by hand
and prints its URL until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

INSTALL_HINT = "PostgreSQL is not installed: apt-get install postgresql (.ci/run does it)"


def find_bin() -> Path | None:
    """The ``bin`` folder of the newest PostgreSQL that Debian's packages installed."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: (
            int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0
        ),
    )
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresServer:
    """One throw-away PostgreSQL cluster.

    Parameters
    ----------
    durable
        ``False`` (tests) turns fsync off; the benchmark keeps PostgreSQL's durable defaults
        so that it compares with SQLite's ``synchronous=FULL``.
    """

    user = "mibi"

    def __init__(self, durable: bool = False) -> None:
        bin_dir = find_bin()
        if bin_dir is None:
            raise FileNotFoundError(INSTALL_HINT)
        self.bin = bin_dir
        self.durable = durable
        self.folder = Path(tempfile.mkdtemp(prefix="mibi-pg-"))
        self.data = self.folder / "data"
        self.port = _free_port()
        self._run_as: dict[str, Any] = {}
        if os.geteuid() == 0:  # PostgreSQL refuses root: run it as the package's user
            account = pwd.getpwnam("postgres")
            os.chown(self.folder, account.pw_uid, account.pw_gid)
            self._run_as = {"user": account.pw_uid, "group": account.pw_gid}
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            cwd=self.folder,
            timeout=120,
            **self._run_as,
        )

    def start(self) -> PostgresServer:
        self._run(
            "initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8",
            "--no-sync", "--locale=C",
        )  # fmt: skip
        self.resume()
        return self

    def resume(self) -> None:
        """Start the server (again, after :meth:`pause`), on the same port and data."""
        options = [
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            f"-k {self.folder}",
            "-c max_connections=200",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(
            "pg_ctl", "-D", str(self.data), "-l", str(self.folder / "server.log"), "-w", "-t", "60",
            "-o", " ".join(options), "start",
        )  # fmt: skip

    def pause(self) -> None:
        """Stop the server as an outage would (clients' connections are cut), keep its data."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user={self.user} dbname=postgres", autocommit=True
        ) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def log(self) -> str:
        path = self.folder / "server.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.data.is_dir():
            with contextlib.suppress(subprocess.CalledProcessError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)


if __name__ == "__main__":
    server = PostgresServer(durable=True).start()
    print(server.create_database(), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
