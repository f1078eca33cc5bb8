"""Alembic's entry point: migrate the connection mibi-node hands over.

:mod:`mibi_node.storage.schema` opens the transaction (under the node's write lock on
SQLite, an advisory lock on PostgreSQL) and passes its connection as
``config.attributes["connection"]``, so the DDL and the new revision commit together. For
writing new revisions with the ``alembic`` command (``alembic.ini`` at the repository root),
``-x url=...`` names the database instead.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from mibi_node.storage.models import Base


def _run(connection: object) -> None:
    context.configure(
        connection=connection,  # type: ignore[arg-type]
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters a table by copying it
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    raise SystemExit("mibi-node migrations run online only: mibi-node db upgrade")
_connection = context.config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
else:
    _url = context.get_x_argument(as_dictionary=True).get("url")
    if not _url:
        raise SystemExit("name the database: alembic -x url=sqlite:///var/mibi-node.sqlite3 ...")
    _engine = create_engine(_url)
    with _engine.begin() as _opened:
        _run(_opened)
    _engine.dispose()
