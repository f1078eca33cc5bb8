"""Shared fixtures: free loopback ports, fresh data folders, real DICOM peers, databases."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ports import free_port


@pytest.fixture
def port() -> int:
    return free_port()


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A fresh data folder (database and store) for one test."""
    path = tmp_path / "var"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def require_tool() -> Callable[[str], str]:
    """Return a function that gives a tool's path or skips the test with the reason.

    ``.ci/run`` installs DCMTK, dicom3tools and Orthanc with ``scripts/install-peers.sh``,
    so in CI nothing is skipped; locally, run that script once.
    """

    def _require(name: str) -> str:
        path = shutil.which(name)
        if path is None:
            pytest.skip(f"{name} is not installed: run scripts/install-peers.sh (needs root)")
        return path

    return _require


@pytest.fixture
def node_factory(tmp_path: Path):
    """Start ``mibi-node serve`` subprocesses; every one is stopped after the test."""
    from node import NodeProcess

    started: list[NodeProcess] = []

    def _start(config: dict | None = None, data_dir: Path | None = None, port: int | None = None):
        folder = data_dir or tmp_path / f"var{len(started)}"
        folder.mkdir(parents=True, exist_ok=True)
        node = NodeProcess(folder, port or free_port(), config).start()
        started.append(node)
        return node

    yield _start
    for node in started:
        node.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A real PostgreSQL server (Debian's packages) on loopback for the whole session.

    Skips with the reason when PostgreSQL is not installed (``.ci/run`` installs it).
    """
    from postgres import INSTALL_HINT, PostgresServer, find_bin

    if find_bin() is None:
        pytest.skip(INSTALL_HINT)
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgresql)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL of a fresh, empty database: an SQLite file, then a PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite3'}"
    server = request.getfixturevalue("postgres_server")
    return str(server.create_database())


# tests/ holds helper modules (factory, node, postgres) imported by name.
sys.path.insert(0, str(Path(__file__).parent))
