"""Read-only database sessions for the status page, out of the writers' way.

The node's own sessions start with ``BEGIN IMMEDIATE`` on SQLite (they are writers: see
:mod:`mibi_node.storage.database`), which takes the database's single writer slot even to
read. The status page only reads, so on SQLite it gets its own engine whose transactions are
plain (deferred) ``BEGIN``: in WAL mode such a reader sees one consistent snapshot, never
waits for a writer and never makes a writer wait, so a page view or a health probe cannot
slow reception down. Its connections are ``PRAGMA query_only``: they cannot write at all.
Other databases use the node's engine as it is.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from mibi_node.storage.database import Database

__all__ = ["Reader"]

_BUSY_TIMEOUT_S = 10.0


class Reader:
    """Sessions that only read the node's database.

    Parameters
    ----------
    database
        The node's database.
    """

    def __init__(self, database: Database) -> None:
        self.database = database
        self._engine = None
        if database.is_sqlite:
            engine = create_engine(
                database.url,
                connect_args={"timeout": _BUSY_TIMEOUT_S, "check_same_thread": False},
            )

            @event.listens_for(engine, "connect")
            def _on_connect(dbapi_connection: Any, _record: Any) -> None:
                dbapi_connection.isolation_level = None  # SQLAlchemy's begin event says BEGIN
                cursor = dbapi_connection.cursor()
                cursor.execute("PRAGMA query_only=ON")
                cursor.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
                cursor.close()

            @event.listens_for(engine, "begin")
            def _on_begin(connection: Any) -> None:
                connection.exec_driver_sql("BEGIN")

            self._engine = engine
            self._sessions: sessionmaker[Session] = sessionmaker(engine)
        else:
            self._sessions = database.sessions

    def session(self) -> Session:
        """A new read-only session; use it as a context manager."""
        return self._sessions()

    def dispose(self) -> None:
        """Close the reader's own connections (the node's engine is left alone)."""
        if self._engine is not None:
            self._engine.dispose()
