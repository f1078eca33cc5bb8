"""The SQLAlchemy engine: one per process, tuned for a crash-safe SQLite file.

SQLite runs in WAL mode with ``synchronous=FULL`` so a committed transaction survives a
power cut, and every transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers
queue on the busy timeout instead of failing with "database is locked" half-way.

PostgreSQL (``postgresql+psycopg://``, for several receivers and worker hosts sharing one
queue, docs/scale-out.md) runs at its default READ COMMITTED; there the code that changes a
row it has read locks it (``SELECT ... FOR UPDATE``, ``SKIP LOCKED`` for claims and sweeps),
which SQLite's compiler leaves out: its ``BEGIN IMMEDIATE`` already holds the whole file.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from mibi_node.errors import ConfigError

__all__ = ["Database", "database_problem", "open_database"]

logger = logging.getLogger(__name__)

_BUSY_TIMEOUT_MS = 30_000


class Database:
    """An engine and its session factory.

    Parameters
    ----------
    url
        SQLAlchemy URL, e.g. ``sqlite:///var/mibi-node.sqlite3`` or
        ``postgresql+psycopg://mibi@db.example.org/mibi`` (``postgresql://`` means the same).

    Raises
    ------
    ConfigError
        The URL names a database other than SQLite or PostgreSQL.
    """

    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        backend = parsed.get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ConfigError(
                f"database.url: mibi-node runs on SQLite or PostgreSQL "
                f"(postgresql+psycopg://...), not {backend}"
            )
        if backend == "postgresql" and parsed.drivername != "postgresql+psycopg":
            if parsed.drivername != "postgresql":
                raise ConfigError(
                    f"database.url: use the psycopg driver (postgresql+psycopg://...), "
                    f"not {parsed.drivername}"
                )
            parsed = parsed.set(drivername="postgresql+psycopg")
            url = parsed.render_as_string(hide_password=False)
        self.url = url
        self.is_sqlite = backend == "sqlite"
        self.is_postgresql = backend == "postgresql"
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            if parsed.database:
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {
                "timeout": _BUSY_TIMEOUT_MS / 1000,
                "check_same_thread": False,
            }
        else:
            # A server restart must not break the first query of every pooled connection.
            kwargs["pool_pre_ping"] = True
        self.engine: Engine = create_engine(url, **kwargs)
        self._thread_lock = threading.Lock()
        self._lock_path: Path | None = None
        if self.is_sqlite:
            _tune_sqlite(self.engine)
            if parsed.database:
                self._lock_path = Path(parsed.database + ".write-lock")
        self.sessions: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)

    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Hold the database's writer lock for one short write transaction.

        SQLite admits one writer at a time, and a writer that finds the file locked sleeps
        in SQLite's busy handler for 1, 2, 5, 10 ... ms before it looks again. Queueing on a
        thread lock and an ``flock`` (shared by every process of the node) instead wakes the
        next writer the moment the previous one commits. Other databases need no such lock.
        """
        if self._lock_path is None:
            yield
            return
        with self._thread_lock, open(self._lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def create_schema(self) -> None:
        """Create an empty database at the newest schema revision, or check its revision.

        Raises
        ------
        SchemaError
            The schema is at another revision (see :mod:`mibi_node.storage.schema`).
        """
        from mibi_node.storage.schema import prepare_schema

        prepare_schema(self)

    def session(self) -> Session:
        """A new session; use it as a context manager."""
        return self.sessions()

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def database_problem(exc: DBAPIError) -> str:
    """One line that says what went wrong with the database, without SQL or parameters.

    For the log when the database cannot be reached or fails (PostgreSQL stopped, the
    network cut, a disk error): the driver's first line, e.g. ``connection failed: ...
    Connection refused``. A traceback of such an error says nothing more, and it repeats.
    """
    lines = str(exc.orig or exc).strip().splitlines()
    return lines[0] if lines else type(exc.orig or exc).__name__


class Outage:
    """When to log a failure that repeats: once when it starts, then a reminder at most every
    ``remind_seconds`` while it lasts, and once when it is over.

    A sweep or a worker retrying every second or two through a PostgreSQL restart would
    otherwise log each retry. Deciding by the message is not enough: during one restart the
    driver says "server closed the connection unexpectedly" and "Connection refused" in
    turn, depending on how far each connection got.
    """

    def __init__(self, remind_seconds: float = 60.0) -> None:
        self.remind_seconds = remind_seconds
        #: ``time.monotonic()`` when the failure started; None while things work.
        self.since: float | None = None
        self._logged = 0.0

    def failed(self) -> bool:
        """Note one more failure; True if it should be logged (the first, or a reminder)."""
        now = time.monotonic()
        if self.since is None:
            self.since = self._logged = now
            return True
        if now - self._logged >= self.remind_seconds:
            self._logged = now
            return True
        return False

    def lasting(self) -> str:
        """`` for 65 s`` in a reminder, nothing in the first line."""
        seconds = 0.0 if self.since is None else time.monotonic() - self.since
        return f" for {seconds:.0f} s" if seconds >= 1 else ""

    def recovered(self) -> bool:
        """Note a success; True if it ends a failure (log that it works again)."""
        ended = self.since is not None
        self.since = None
        return ended


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event issue BEGIN itself (pysqlite's own is deferred).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def open_database(url: str) -> Database:
    """Open the database at ``url``, creating its schema when it is empty.

    Raises
    ------
    SchemaError
        The schema is older or newer than this version's: the message says what to run.
    """
    database = Database(url)
    database.create_schema()
    return database
