"""The schema under Alembic: created at head, adopted from before migrations, refused when old.

Each database test runs on SQLite and on PostgreSQL (``database_url``).
"""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from typer.testing import CliRunner

from mibi_node.cli import app
from mibi_node.errors import ConfigError
from mibi_node.storage import schema
from mibi_node.storage.database import Database, open_database
from mibi_node.storage.models import Base, Study, StudyState
from mibi_node.storage.schema import (
    SchemaError,
    prepare_schema,
    schema_status,
    upgrade_schema,
)
from ports import free_port


def _at_revision(url: str, revision: str) -> Database:
    """A database migrated to ``revision`` only, as an older mibi-node left it."""
    from alembic import command

    database = Database(url)
    with database.engine.begin() as connection:
        command.upgrade(schema._config(connection), revision)
    return database


def _pre_migrations(url: str, without: tuple[str, ...] = ()) -> Database:
    """A database as ``create_all`` made it before migrations, with one study in it.

    Its tables are the baseline's (revision 0001) with no revision recorded.
    """
    database = _at_revision(url, schema.BASELINE)
    with database.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE alembic_version")
        for table in without:
            connection.exec_driver_sql(f"DROP TABLE {table}")
    # Only the baseline's columns: the model has gained some since.
    with database.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO study (study_instance_uid, state, instance_count, modalities, "
                "calling_ae_title, first_received_at, last_received_at, state_changed_at) "
                "VALUES ('1.2.3', :state, 0, '', '', :now, :now, :now)"
            ),
            {"state": StudyState.DONE.value, "now": datetime.now(UTC)},
        )
    return database


def _study_uids(database: Database) -> list[str]:
    with database.session() as session:
        return list(session.scalars(select(Study.study_instance_uid)))


def test_an_empty_database_is_created_at_head_as_the_models_say(database_url: str) -> None:
    database = open_database(database_url)
    status = schema_status(database)
    assert status.up_to_date and status.current == schema.head_revision()
    assert status.tables == frozenset(Base.metadata.tables)
    # A model changed without a migration shows up here.
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    database.dispose()


def test_a_database_from_before_migrations_is_adopted(database_url: str) -> None:
    database = _pre_migrations(database_url)
    assert schema_status(database).before_migrations
    # What `serve` and `worker` do at start: the tables are the baseline's (revision 0001),
    # the later revisions wait for `mibi-node db upgrade`; nothing is written meanwhile.
    head = schema.head_revision()
    with pytest.raises(
        SchemaError, match=rf"at revision 0001 .* needs {head}.*mibi-node db upgrade"
    ):
        prepare_schema(database)
    assert schema_status(database).before_migrations
    before, after = upgrade_schema(database)
    assert (before.current, after.current) == (None, schema.head_revision())
    assert "ix_job_claim" in {i["name"] for i in inspect(database.engine).get_indexes("job")}
    assert _study_uids(database) == ["1.2.3"]
    database.dispose()


def test_missing_tables_are_refused_until_db_upgrade(database_url: str) -> None:
    database = _pre_migrations(database_url, without=("audit_event",))
    with pytest.raises(SchemaError, match=r"lacks audit_event: run `mibi-node db upgrade`"):
        prepare_schema(database)
    before, after = upgrade_schema(database)
    assert before.current is None and after.up_to_date
    assert "audit_event" in inspect(database.engine).get_table_names()
    assert _study_uids(database) == ["1.2.3"]
    database.dispose()


def test_an_older_revision_is_refused_until_db_upgrade(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database = open_database(database_url)  # at this version's head
    head = schema.head_revision()
    newer = tmp_path / "migrations"
    shutil.copytree(schema.MIGRATIONS, newer)
    (newer / "versions" / "9999_note.py").write_text(
        '"""A later revision (test only)."""\n'
        "import sqlalchemy as sa\nfrom alembic import op\n\n"
        f'revision = "9999"\ndown_revision = "{head}"\nbranch_labels = None\n'
        "depends_on = None\n\n\n"
        "def upgrade() -> None:\n"
        '    op.add_column("study", sa.Column("note", sa.Text(), nullable=True))\n'
    )
    monkeypatch.setattr(schema, "MIGRATIONS", newer)
    with pytest.raises(SchemaError, match=rf"at revision {head} .* needs 9999.*db upgrade"):
        open_database(database_url)
    before, after = upgrade_schema(database)
    assert (before.current, after.current) == (head, "9999")
    columns = {column["name"] for column in inspect(database.engine).get_columns("study")}
    assert "note" in columns
    open_database(database_url).dispose()
    database.dispose()


def test_a_revision_from_a_newer_version_is_refused(database_url: str) -> None:
    database = open_database(database_url)
    with database.engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = 'f00d'"))
    with pytest.raises(SchemaError, match="f00d, which this mibi-node does not know"):
        open_database(database_url)
    database.dispose()


def _open(url: str) -> None:
    open_database(url).dispose()


def test_processes_that_start_at_once_create_the_schema_once(database_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open, args=(database_url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(60)
    assert [process.exitcode for process in processes] == [0, 0, 0, 0]
    database = Database(database_url)
    assert schema_status(database).up_to_date
    database.dispose()


def test_serve_and_worker_refuse_an_outdated_schema_and_db_upgrade_fixes_it(
    tmp_path: Path,
) -> None:
    data = tmp_path / "var"
    data.mkdir()
    _pre_migrations(f"sqlite:///{data / 'mibi-node.sqlite3'}", without=("audit_event",)).dispose()
    config = tmp_path / "node.toml"
    config.write_text("[web]\nenabled = false\n[workers]\ncount = 0\n")
    for command in (["serve", "--port", str(free_port())], ["worker", "--device", "cpu"]):
        run = subprocess.run(
            [sys.executable, "-m", "mibi_node.cli", *command, "--config", str(config)]
            + ["--data-dir", str(data)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 1, run.stderr
        assert "run `mibi-node db upgrade`" in run.stderr, run.stderr
        assert "Traceback" not in run.stderr
    runner = CliRunner()
    current = runner.invoke(app, ["db", "current", "--data-dir", str(data)])
    assert current.exit_code == 1 and "made before migrations" in current.output
    upgrade = runner.invoke(app, ["db", "upgrade", "--data-dir", str(data)])
    assert upgrade.exit_code == 0, upgrade.output
    assert f"no revision -> {schema.head_revision()}" in upgrade.output
    current = runner.invoke(app, ["db", "current", "--data-dir", str(data)])
    assert current.exit_code == 0 and "up to date" in current.output
    again = runner.invoke(app, ["db", "upgrade", "--data-dir", str(data)])
    assert "already at revision" in again.output


def test_database_url_is_sqlite_or_postgresql_through_psycopg() -> None:
    assert Database("postgresql://mibi@db.example.org/mibi").url.startswith("postgresql+psycopg://")
    with pytest.raises(ConfigError, match="database.url: mibi-node runs on SQLite or PostgreSQL"):
        Database("mysql://mibi@db.example.org/mibi")
    with pytest.raises(ConfigError, match=r"psycopg driver \(postgresql\+psycopg"):
        Database("postgresql+pg8000://mibi@db.example.org/mibi")


def test_a_database_of_the_single_analysis_node_is_migrated_to_analyses(
    database_url: str,
) -> None:
    """Revision 0002 is the schema the node had before analyses were units: its jobs become
    parathyroid jobs, and a study's versions then count per analysis."""
    database = _at_revision(database_url, "0002")
    with database.engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO study (study_instance_uid, state, instance_count, modalities, "
            "calling_ae_title, first_received_at, last_received_at, state_changed_at) "
            "VALUES ('1.2.3', 'DONE', 2, 'NM', 'CAM', "
            "'2026-12-01 10:00:00', '2026-12-01 10:00:00', '2026-12-01 10:00:00')"
        )
        connection.exec_driver_sql(
            "INSERT INTO job (study_id, version, state, attempts, partial, created_at) "
            "SELECT id, 1, 'DONE', 1, false, '2026-12-01 10:00:01' FROM study"
        )
    with pytest.raises(SchemaError, match=r"at revision 0002 .*db upgrade"):
        prepare_schema(database)
    before, after = upgrade_schema(database)
    assert (before.current, after.current) == ("0002", schema.head_revision())
    from mibi_node.storage.models import Job

    with database.session() as session, session.begin():
        [job] = session.scalars(select(Job)).all()
        assert (job.analysis, job.version) == ("parathyroid", 1)
        session.add(Job(study_id=job.study_id, analysis="thyroid", version=1))  # a second analysis
    with database.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    database.dispose()
