"""The database schema and its revision: create, adopt, check and migrate (Alembic).

Every process that opens the database goes through :func:`prepare_schema`:

* an empty database is created at the newest revision (by running the migrations), so a
  first ``mibi-node serve`` or ``make demo`` needs no extra step;
* a database that ``create_all`` made before the node had migrations is *adopted*: when
  every table is there with the columns of the baseline revision, the revision is recorded
  (no table is touched); otherwise ``mibi-node db upgrade`` creates what is missing;
* a database at an older revision is refused with the command to run, ``mibi-node db
  upgrade``: nothing migrates behind the operator's back (several receivers and workers may
  share it, and a migration wants them stopped);
* a database at a revision this version does not know (a newer mibi-node migrated it) is
  refused too.

Schema changes run in one transaction together with the revision they record, under the
node's write lock on SQLite and a transaction-level advisory lock on PostgreSQL, so
processes that start at once on a fresh database create it exactly once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, create_engine, inspect, text

from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database

__all__ = [
    "BASELINE",
    "SchemaError",
    "SchemaStatus",
    "head_revision",
    "prepare_schema",
    "schema_status",
    "upgrade_schema",
]

logger = logging.getLogger(__name__)
# Alembic says which dialect and plugins it uses at INFO on every start of every process;
# what changed is logged here instead.
logging.getLogger("alembic").setLevel(logging.WARNING)

MIGRATIONS = Path(__file__).parent / "migrations"
#: The first revision: the tables as ``create_all`` made them before migrations.
BASELINE = "0001"
#: Key of the PostgreSQL advisory lock held while the schema is checked or changed.
_LOCK_KEY = 0x6D6962690001  # "mibi" 0001
_UPGRADE = "mibi-node db upgrade"


class SchemaError(MibiNodeError):
    """The database's schema is not the one this version of mibi-node works with."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's schema stands."""

    #: The revision recorded in the database (``None``: none recorded).
    current: str | None
    #: The newest revision this version of mibi-node knows.
    head: str
    #: The node's tables that exist.
    tables: frozenset[str]

    @property
    def empty(self) -> bool:
        """No revision and none of the node's tables: a new database."""
        return self.current is None and not self.tables

    @property
    def before_migrations(self) -> bool:
        """Tables but no revision: made by ``create_all`` before the node had migrations."""
        return self.current is None and bool(self.tables)

    @property
    def up_to_date(self) -> bool:
        """At the newest revision."""
        return self.current == self.head

    def describe(self) -> str:
        """One line for people (``mibi-node db current``)."""
        if self.up_to_date:
            return f"revision {self.current} (head): up to date"
        if self.empty:
            return f"empty: the first start creates it at revision {self.head}"
        if self.before_migrations:
            return f"made before migrations (no revision recorded); head is {self.head}"
        return f"revision {self.current}; this mibi-node needs {self.head}: run `{_UPGRADE}`"


def _config(connection: Connection | None = None) -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision of the migrations shipped with this version."""
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(_config()).get_current_head()
    if head is None:  # pragma: no cover - the package ships its revisions
        raise SchemaError(f"no migrations found in {MIGRATIONS}")
    return head


def _known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(_config()).walk_revisions()}


def _status(connection: Connection) -> SchemaStatus:
    from alembic.runtime.migration import MigrationContext

    from mibi_node.storage.models import Base

    current = MigrationContext.configure(connection).get_current_revision()
    ours = set(Base.metadata.tables)
    present = {name for name in inspect(connection).get_table_names() if name in ours}
    return SchemaStatus(current, head_revision(), frozenset(present))


@contextlib.contextmanager
def _locked(database: Database) -> Iterator[Connection]:
    """One transaction that no other process checks or changes the schema during."""
    with database.write_lock(), database.engine.begin() as connection:
        if database.is_postgresql:
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
        yield connection


def schema_status(database: Database) -> SchemaStatus:
    """Read where the database's schema stands (changes nothing)."""
    with _locked(database) as connection:
        return _status(connection)


def _baseline_columns() -> dict[str, set[str]]:
    """Table -> column names of the baseline revision (built in a scratch database)."""
    from alembic import command

    engine = create_engine("sqlite://")
    try:
        with engine.begin() as connection:
            command.upgrade(_config(connection), BASELINE)
            inspector = inspect(connection)
            return {
                table: {column["name"] for column in inspector.get_columns(table)}
                for table in inspector.get_table_names()
                if table != "alembic_version"
            }
    finally:
        engine.dispose()


def _differences(connection: Connection, status: SchemaStatus) -> tuple[list[str], list[str]]:
    """Baseline tables that are missing, and columns missing from the existing ones."""
    baseline = _baseline_columns()
    inspector = inspect(connection)
    missing_tables = sorted(set(baseline) - status.tables)
    missing_columns = sorted(
        f"{table}.{column}"
        for table in status.tables & set(baseline)
        for column in baseline[table] - {c["name"] for c in inspector.get_columns(table)}
    )
    return missing_tables, missing_columns


def prepare_schema(database: Database) -> SchemaStatus:
    """Make sure the schema is the one this version works with, or say what to run.

    Creates an empty database at the newest revision and adopts one made before
    migrations whose tables match the baseline (see the module's docstring).

    Raises
    ------
    SchemaError
        The schema is older or newer than this version's, or a database from before
        migrations lacks tables or columns; the message names the command to run.
    """
    with _locked(database) as connection:
        status = _status(connection)
        if status.up_to_date:
            return status
        from alembic import command

        if status.empty:
            command.upgrade(_config(connection), "head")
            logger.info("created the database schema at revision %s", status.head)
            return _status(connection)
        if status.before_migrations:
            tables, columns = _differences(connection, status)
            if tables or columns:
                missing = ", ".join([*tables, *columns])
                raise SchemaError(
                    "the database was made before mibi-node had migrations and lacks "
                    f"{missing}: run `{_UPGRADE}`"
                )
            command.stamp(_config(connection), BASELINE)
            logger.info("adopted a database made before migrations as revision %s", BASELINE)
            status = _status(connection)
            if status.up_to_date:
                return status
        if status.current not in _known_revisions():
            raise SchemaError(
                f"the database schema is at revision {status.current}, which this mibi-node "
                f"does not know (a newer version migrated it; this one needs {status.head}): "
                "run the newer mibi-node"
            )
        raise SchemaError(
            f"the database schema is at revision {status.current} and this mibi-node needs "
            f"{status.head}: stop the node and its workers, then run `{_UPGRADE}`"
        )


def upgrade_schema(database: Database) -> tuple[SchemaStatus, SchemaStatus]:
    """Migrate the database to the newest revision (``mibi-node db upgrade``).

    A database from before migrations is adopted first: its missing tables are created
    (columns missing from existing tables cannot be guessed and are refused).

    Returns
    -------
    tuple of SchemaStatus
        Before and after.

    Raises
    ------
    SchemaError
        A database from before migrations lacks columns, or the database is at a revision
        this version does not know.
    """
    from alembic import command

    with _locked(database) as connection:
        before = _status(connection)
        if before.current is not None and before.current not in _known_revisions():
            raise SchemaError(
                f"the database schema is at revision {before.current}, which this mibi-node "
                "does not know (a newer version migrated it)"
            )
        if before.before_migrations:
            _, columns = _differences(connection, before)
            if columns:
                raise SchemaError(
                    "the database was made before mibi-node had migrations and its tables "
                    f"lack columns ({', '.join(columns)}); it cannot be adopted automatically"
                )
        if not before.up_to_date:
            command.upgrade(_config(connection), "head")
        after = _status(connection)
    return before, after
