"""The ``mibi-node`` command line.

Every command turns bad input into one readable sentence and a non-zero exit status; a
traceback is a bug.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, __version__
from mibi_node.config import DEFAULT_CONFIG_PATH, Config, load_config
from mibi_node.errors import MibiNodeError

__all__ = ["app", "main"]

app = typer.Typer(
    name="mibi-node",
    help="DICOM node that classifies parathyroid MIBI scintigraphy and returns a DICOM SR.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# Piped output (logs, CI) has no terminal width; give tables room instead of 80 columns.
_out = Console(width=None if sys.stdout.isatty() else 160)
_err = Console(stderr=True)

ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help=f"TOML configuration file (default: {DEFAULT_CONFIG_PATH} when it exists).",
    ),
]
DataDirOption = Annotated[
    Path | None,
    typer.Option("--data-dir", help="Folder of the database and stored files (default ./var)."),
]


def _fail(message: str, code: int = 1) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _load(config: Path | None, **overrides: dict[str, Any]) -> Config:
    path = config
    if path is None and DEFAULT_CONFIG_PATH.is_file():
        path = DEFAULT_CONFIG_PATH
    try:
        return load_config(path, overrides=overrides)
    except MibiNodeError as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Port of the DICOM listener.")] = None,
    ae_title: Annotated[str | None, typer.Option(help="AE title of the node.")] = None,
    data_dir: DataDirOption = None,
    quiet_seconds: Annotated[
        float | None, typer.Option(help="Seconds without an instance before a study is stable.")
    ] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    destination: Annotated[
        list[str] | None,
        typer.Option(
            "--destination",
            help="Send results to AE@HOST:PORT (repeatable; replaces the file's destinations).",
        ),
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Model bundle folder (workers.bundle).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Worker processes to start (workers.count).")
    ] = None,
    device: Annotated[
        str | None, typer.Option("--device", help='Workers\' device: "auto", "cpu", "cuda[:N]".')
    ] = None,
) -> None:
    """Run the node: receive studies, assemble them, analyse them, send the results."""
    from mibi_node.daemon import Node
    from mibi_node.logs import configure_logging

    resolved = _load(
        config,
        node={"port": port, "ae_title": ae_title, "data_dir": data_dir, "host": host},
        assembly={"quiet_seconds": quiet_seconds},
        workers={"bundle": bundle, "count": workers, "device": device},
        dispatch={"destinations": _destinations(destination)},
    )
    configure_logging(resolved.logging.level)
    try:
        Node(resolved).serve_forever()
    except MibiNodeError as exc:
        raise _fail(str(exc)) from None
    except OSError as exc:
        raise _fail(f"cannot start the node: {exc.strerror or exc}") from None


def _destinations(texts: list[str] | None) -> list[dict[str, Any]] | None:
    from mibi_node.dispatch.destinations import parse_destination

    if not texts:
        return None
    try:
        return [parse_destination(text).model_dump(mode="json") for text in texts]
    except MibiNodeError as exc:
        raise _fail(str(exc), 2) from None


@app.command()
def worker(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    device: Annotated[
        str | None, typer.Option("--device", help='"auto", "cpu", "cuda" or "cuda:N".')
    ] = None,
    bundle: Annotated[
        Path | None, typer.Option("--bundle", help="Model bundle folder (workers.bundle).")
    ] = None,
) -> None:
    """Run one analysis worker (one per GPU; `serve` starts workers.count itself)."""
    from mibi_node.inference.worker import worker_main

    resolved = _load(
        config,
        node={"data_dir": data_dir},
        workers={"bundle": bundle, "device": device},
    )
    try:
        worker_main(resolved, resolved.workers.device, index=0)
    except MibiNodeError as exc:  # e.g. an outdated schema: the message names the command
        raise _fail(str(exc)) from None


def _open_existing(resolved: Config, check: bool = True) -> Any:
    from mibi_node.storage.database import Database, open_database

    database_file = resolved.node.data_dir / "mibi-node.sqlite3"
    if not resolved.database.url.get_secret_value() and not database_file.is_file():
        raise _fail(f"no mibi-node database in {resolved.node.data_dir} (has the node run?)")
    try:
        return open_database(resolved.database_url) if check else Database(resolved.database_url)
    except MibiNodeError as exc:
        raise _fail(str(exc)) from None


@app.command()
def requeue(
    study: Annotated[str, typer.Option("--study", help="Study Instance UID to analyse again.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Analyse a study again (a FAILED one, or a new version of a DONE one)."""
    from mibi_node.jobs.queue import requeue_study

    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved)
    try:
        job = requeue_study(database, study.strip(), actor=_operator(), config=resolved)
    except MibiNodeError as exc:
        raise _fail(str(exc)) from None
    finally:
        database.dispose()
    _out.print(f"queued: job #{job}")


@app.command()
def retention(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only count what the sweep would remove.")
    ] = False,
) -> None:
    """Remove instance files of studies delivered more than retention.days ago, now.

    The running node does the same every retention.sweep_seconds.
    """
    from mibi_node.retention import expired_studies, sweep_retention
    from mibi_node.storage.filestore import FileStore

    resolved = _load(config, node={"data_dir": data_dir})
    if resolved.retention.days <= 0:
        raise _fail("retention.days is 0: instance files are kept for ever")
    database = _open_existing(resolved)
    try:
        if dry_run:
            count = len(expired_studies(database, resolved.retention.days, limit=1_000_000))
            _out.print(f"{count} stud{'y' if count == 1 else 'ies'} would have files removed")
            return
        outcome = sweep_retention(database, FileStore(resolved.store_dir), resolved.retention)
    finally:
        database.dispose()
    _out.print(
        f"removed {outcome.files} file(s), {outcome.bytes / (1 << 20):.1f} MiB, "
        f"of {outcome.studies} stud{'y' if outcome.studies == 1 else 'ies'}"
    )


@app.command()
def resend(
    study: Annotated[str, typer.Option("--study", help="Study Instance UID whose SR to resend.")],
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    destination: Annotated[
        list[str] | None,
        typer.Option("--destination", help="Also send to AE@HOST:PORT (repeatable)."),
    ] = None,
) -> None:
    """Send a study's latest result again to its destinations (and any given here)."""
    from mibi_node.dispatch.deliveries import resend_study
    from mibi_node.dispatch.destinations import Destination

    resolved = _load(config, node={"data_dir": data_dir})
    extra = [Destination.model_validate(d) for d in _destinations(destination) or []]
    database = _open_existing(resolved)
    try:
        count = resend_study(database, study.strip(), extra, actor=_operator())
    except MibiNodeError as exc:
        raise _fail(str(exc)) from None
    finally:
        database.dispose()
    _out.print(
        f"{count} deliver{'y' if count == 1 else 'ies'} due now; the running node sends them"
    )


@app.command("shadow")
def shadow_command(
    analysis: Annotated[str | None, typer.Option("--analysis", help="Only this analysis.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    resamples: Annotated[
        int, typer.Option("--resamples", help="Bootstrap resamples for the 95 % intervals.")
    ] = 500,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Compare each candidate (shadow) bundle with the current one (docs/validation.md)."""
    from mibi_node.analyses.registry import available_analyses
    from mibi_node.validation.shadow import shadow_comparisons

    if analysis is not None and analysis not in available_analyses():
        known = ", ".join(available_analyses())
        raise _fail(f"unknown analysis {analysis!r} (known: {known})", 2)
    if resamples < 0:
        raise _fail('"--resamples" should be 0 or more', 2)
    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved)
    try:
        comparisons = shadow_comparisons(database, resolved, analysis, resamples)
    finally:
        database.dispose()
    if as_json:
        sys.stdout.write(json.dumps([c.to_dict() for c in comparisons], indent=2) + "\n")
        return
    if not comparisons:
        _out.print("no analysis has a candidate bundle (analyses.<name>.shadow_bundle)")
    for comparison in comparisons:
        _print_comparison(comparison)


def _print_comparison(c: Any) -> None:
    """A comparison as ``mibi-node shadow`` and ``promote`` show it."""

    def share(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.0%}"

    jobs = ", ".join(f"{n} {state.lower()}" for state, n in sorted(c.shadow_jobs.items()))
    lines = [
        f"[bold]{c.analysis}[/]: current {c.current_folder or '?'}, "
        f"candidate {c.candidate_folder or 'none (not configured, or promoted)'}",
        f"shadow jobs: {jobs or 'none'}",
        f"compared studies: {c.compared} (current "
        + ", ".join(f"{b} x{n}" for b, n in c.current_bundles.items())
        + "; candidate "
        + ", ".join(f"{b} x{n}" for b, n in c.candidate_bundles.items())
        + ")",
        f"same main finding: {c.same_prediction} of {c.compared} ({share(c.agreement)})"
        + ("" if c.kappa is None else f", Cohen's kappa {c.kappa:.3f}"),
        f"findings agreeing: {c.findings_agreeing} of {c.findings_compared} "
        f"({share(c.findings_agreement)})",
        f"assessed studies: {c.assessed} ({c.with_truth} with a final diagnosis)",
    ]
    for line in lines:
        _out.print(line, highlight=False)
    if c.current is None or c.candidate is None:
        return
    table = Table(title=f"{c.analysis}: on the {c.assessed} assessed studies")
    for column in ("figure", "current", "candidate", "candidate - current [95 %]"):
        table.add_column(column)
    for name in ("accuracy", "macro_f1"):
        interval = c.difference_intervals.get(name)
        table.add_row(
            name.replace("_", " "),
            f"{getattr(c.current, name):.3f}",
            f"{getattr(c.candidate, name):.3f}",
            f"{c.difference[name]:+.3f}"
            + (f" [{interval[0]:+.2f}, {interval[1]:+.2f}]" if interval else ""),
        )
    _out.print(table)


@app.command()
def promote(
    analysis: Annotated[str, typer.Argument(help="The analysis whose candidate becomes current.")],
    by: Annotated[
        str, typer.Option("--by", "--reader", help="Who decides (kept in the audit trail).")
    ],
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    revert: Annotated[
        bool, typer.Option("--revert", help="Undo the promotion: the TOML's bundle again.")
    ] = False,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Make an analysis' candidate (shadow) bundle current, after showing the comparison.

    Audited; running workers switch at their next poll, without a restart or a TOML edit.
    """
    from mibi_node.validation.shadow import (
        PromotionError,
        check_candidate,
        promotion_candidate,
        revert_promotion,
        shadow_comparison,
    )
    from mibi_node.validation.shadow import promote as promote_candidate

    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved)
    try:
        if revert:
            done = revert_promotion(database, resolved, analysis, by=by, actor=_operator())
        else:
            _choice, candidate = promotion_candidate(database, resolved, analysis)
            new = check_candidate(analysis, candidate)
            label = f"{new['name']} {new['version']}"
            comparison = shadow_comparison(database, analysis, bundle=label, config=resolved)
            _print_comparison(comparison)
            if not yes and not typer.confirm(
                f"Make {label} ({candidate}) the current bundle of {analysis}?"
            ):
                raise _fail("not promoted", 1)
            done = promote_candidate(
                database,
                resolved,
                analysis,
                by=by,
                actor=_operator(),
                comparison=comparison,
                checked=new,
            )
    except PromotionError as exc:
        raise _fail(str(exc), 2) from None
    finally:
        database.dispose()
    old, new = done.old, done.new
    cancelled = f"; {done.cancelled} queued shadow job(s) cancelled" if done.cancelled else ""
    _out.print(
        f"{done.outcome}: {analysis} now sends the results of {new['name']} {new['version']} "
        f"({new['folder']}), was {old['name']} {old['version']}{cancelled}; running workers "
        "switch at their next poll",
        highlight=False,
    )


@app.command()
def analyses(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """List the analyses this node knows: enabled or not, their bundle and selection rule."""
    from mibi_node.analyses.registry import available_analyses

    resolved = _load(config)
    choices = _bundle_choices(resolved, list(available_analyses()))
    rows = []
    for name, analysis in available_analyses().items():
        described = analysis.describe()
        described["enabled"] = name in resolved.enabled_analyses
        choice = choices.get(name)
        bundle = choice.current if choice is not None else resolved.bundle_for(name)
        described["bundle"] = str(bundle)
        described["bundle_present"] = bundle.is_dir()
        candidate = choice.candidate if choice is not None else resolved.shadow_bundle_for(name)
        described["shadow_bundle"] = None if candidate is None else str(candidate)
        described["selection"] = resolved.selection(name).model_dump(mode="json")
        rows.append(described)
    if as_json:
        sys.stdout.write(json.dumps(rows, indent=2) + "\n")
        return
    table = Table(title="analyses")
    for column in ("name", "title", "task", "outputs", "enabled", "bundle"):
        table.add_column(column)
    for row in rows:
        table.add_row(
            row["name"],
            row["title"],
            row["task"],
            ", ".join(row["outputs"]),
            "yes" if row["enabled"] else "no",
            row["bundle"] + ("" if row["bundle_present"] else " (missing)"),
        )
    _out.print(table)


def _bundle_choices(resolved: Config, names: list[str]) -> dict[str, Any]:
    """Each analysis' current and candidate bundle as the node's database says (a
    promotion), or nothing when there is no database to ask."""
    from sqlalchemy.exc import OperationalError

    from mibi_node.storage.database import open_database
    from mibi_node.validation.shadow import bundle_choices

    database_file = resolved.node.data_dir / "mibi-node.sqlite3"
    if not resolved.database.url.get_secret_value() and not database_file.is_file():
        return {}
    try:
        database = open_database(resolved.database_url)
    except (MibiNodeError, OperationalError):
        return {}
    try:
        return bundle_choices(database, resolved, names)
    except OperationalError:
        return {}
    finally:
        database.dispose()


@app.command()
def status(
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    limit: Annotated[int, typer.Option(help="Most recent studies to show.")] = 200,
) -> None:
    """List studies, workers, jobs and deliveries that are pending or failed.

    The same summaries as the status page (``mibi_node.web.summaries``), read through its
    read-only sessions: running it never takes the database's writer slot from reception.
    """
    from sqlalchemy.exc import OperationalError

    from mibi_node.storage.database import database_problem
    from mibi_node.storage.filestore import FileStore
    from mibi_node.web.reader import Reader
    from mibi_node.web.summaries import (
        analysis_counts,
        delivery_rows,
        job_counts,
        study_rows,
        to_json,
        worker_rows,
    )

    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved)
    reader = Reader(database)
    try:
        files = FileStore(resolved.store_dir, resolved.incoming_name)
        studies = study_rows(reader, files, limit=limit)
        workers = worker_rows(reader, resolved.web.worker_stale_seconds)
        jobs = job_counts(reader)
        per_analysis = analysis_counts(reader)
        deliveries = delivery_rows(reader)
    except OperationalError as exc:
        raise _fail(f"cannot read the database: {database_problem(exc)}") from None
    finally:
        reader.dispose()
        database.dispose()
    if as_json:
        document = {
            "studies": to_json(studies),
            "workers": to_json(workers),
            "jobs": jobs,
            "analyses": per_analysis,
            "deliveries": to_json(deliveries),
        }
        sys.stdout.write(json.dumps(document, indent=2) + "\n")
        return
    table = Table(title=f"mibi-node {__version__}: {len(studies)} studies")
    for column in (
        "#",
        "state",
        "instances",
        "phases",
        "from AE",
        "last",
        "result",
        "SR",
        "reason",
    ):
        table.add_column(column)
    for study in studies:
        table.add_row(
            str(study.id),
            study.state,
            str(study.instance_count),
            " ".join(study.phases) or "-",
            study.calling_ae_title,
            study.last_received_at.strftime("%Y-%m-%d %H:%M:%S"),
            "; ".join(f"{name}: {text}" for name, text in study.results.items())
            or (f"{study.predicted} {study.probability:.2f}" if study.predicted else ""),
            study.sr or "",
            study.state_reason or "",
        )
    _out.print(table)
    if workers:
        table = Table(title="workers")
        for column in ("name", "state", "device", "bundle", "heartbeat", "message"):
            table.add_column(column)
        for w in workers:
            table.add_row(
                w.name,
                f"{w.state} (no heartbeat: gone?)" if w.stale and w.state != "stopped" else w.state,
                w.device,
                w.bundle or "-",
                w.heartbeat_at.strftime("%H:%M:%S"),
                w.message or "",
            )
        _out.print(table)
    else:
        _out.print("no worker has reported yet (workers.count = 0? run `mibi-node worker`)")
    summary = ", ".join(f"{n} {state.lower()}" for state, n in sorted(jobs.items())) or "none"
    _out.print(f"jobs: {summary}")
    for name, counts in sorted(per_analysis.items()):
        text = ", ".join(f"{n} {state.lower()}" for state, n in sorted(counts.items()))
        _out.print(f"  {name}: {text}")
    if deliveries:
        table = Table(title="deliveries pending, failed or not committed")
        for column in (
            "#",
            "state",
            "to",
            "study",
            "version",
            "attempts",
            "next try",
            "last answer",
            "commitment",
        ):
            table.add_column(column)
        for d in deliveries:
            table.add_row(
                str(d.id),
                d.state,
                d.destination,
                f"#{d.study_id}",
                str(d.version),
                str(d.attempts),
                d.next_attempt_at.strftime("%H:%M:%S") if d.state == "PENDING" else "",
                " ".join(filter(None, (d.last_status, d.last_message))),
                ": ".join(filter(None, (d.commitment.lower(), d.commitment_message))),
            )
        _out.print(table)
    else:
        _out.print("deliveries: none pending or failed")


@app.command("check-config")
def check_config(
    file: Annotated[Path, typer.Argument(help="The TOML file to check.")],
) -> None:
    """Validate a configuration file and print it resolved, with secrets masked."""
    try:
        resolved = load_config(file)
    except MibiNodeError as exc:
        raise _fail(str(exc), 2) from None
    sys.stdout.write(json.dumps(resolved.masked(), indent=2) + "\n")


db_app = typer.Typer(
    help="The database schema: its revision, and migrating it (Alembic).", no_args_is_help=True
)
app.add_typer(db_app, name="db")


@db_app.command("current")
def db_current(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Show the database's schema revision and whether it is the one this version needs."""
    from mibi_node.storage.schema import schema_status

    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved, check=False)
    try:
        status = schema_status(database)
    finally:
        database.dispose()
    _out.print(f"{_database_label(resolved)}: {status.describe()}", highlight=False)
    if not status.up_to_date and not status.empty:
        raise typer.Exit(1)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Migrate the database to this version's schema (stop the node and workers first).

    An empty database is created; one made before migrations is adopted (its missing tables
    are created).
    """
    from mibi_node.storage.database import Database
    from mibi_node.storage.schema import upgrade_schema

    resolved = _load(config, node={"data_dir": data_dir})
    try:
        database = Database(resolved.database_url)
        try:
            before, after = upgrade_schema(database)
        finally:
            database.dispose()
    except MibiNodeError as exc:
        raise _fail(str(exc)) from None
    label = _database_label(resolved)
    if before.up_to_date:
        _out.print(f"{label}: already at revision {after.current}", highlight=False)
    else:
        _out.print(
            f"{label}: {before.current or 'no revision'} -> {after.current}", highlight=False
        )


def _database_label(resolved: Config) -> str:
    """The database named without its password."""
    from sqlalchemy.engine import make_url

    return make_url(resolved.database_url).render_as_string(hide_password=True)


@app.command()
def drift(
    analysis: Annotated[str | None, typer.Option("--analysis", help="Only this analysis.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    window: Annotated[
        int | None, typer.Option("--window", help="Latest studies per camera (default "
                                 "validation.drift_window).")
    ] = None,
    config: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:  # fmt: skip
    """Compare each camera's latest studies with its bundle's training inputs (input drift)."""
    from mibi_node.analyses.registry import available_analyses
    from mibi_node.validation.drift import drift_report

    if analysis is not None and analysis not in available_analyses():
        known = ", ".join(available_analyses())
        raise _fail(f"unknown analysis {analysis!r} (known: {known})", 2)
    if window is not None and window < 1:
        raise _fail('"--window" should be 1 or more', 2)
    resolved = _load(config, node={"data_dir": data_dir})
    database = _open_existing(resolved)
    try:
        reports = drift_report(database, resolved, analysis, window=window)
    finally:
        database.dispose()
    if as_json:
        sys.stdout.write(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
        return
    table = Table(title="input drift against the training inputs")
    for column in ("analysis", "station", "studies", "verdict", "features not ok"):
        table.add_column(column)
    for report in reports:
        if report.problem:
            table.add_row(report.analysis, "", "", "no reference", report.problem)
        for station in report.stations:
            flagged = "; ".join(
                f"{f.feature} {f.verdict} ({'PSI' if f.test != 'unseen' else 'unseen'} "
                f"{f.statistic:.2f}" + (f", p {f.p_value:.2g})" if f.p_value is not None else ")")
                for f in station.features
                if f.verdict != "ok"
            )
            table.add_row(
                report.analysis, station.station, str(station.studies), station.verdict, flagged
            )
    _out.print(table)


bundle_app = typer.Typer(help="Model bundles: their training input summary.", no_args_is_help=True)
app.add_typer(bundle_app, name="bundle")


@bundle_app.command("summarise")
def bundle_summarise(
    bundle: Annotated[Path, typer.Argument(help="The model bundle folder.")],
    dicom_dir: Annotated[
        Path, typer.Argument(help="Folder of the training studies' DICOM files (any layout).")
    ],
) -> None:
    """Write the bundle's training input summary (inputs.json) from its training studies."""
    from mibi_node.validation.drift import (
        SUMMARY_FILE,
        DriftError,
        studies_in_folder,
        write_training_summary,
    )

    if not (bundle / "bundle.json").is_file():
        raise _fail(f"{bundle}: not a model bundle (it has no bundle.json)", 2)
    try:
        reference = write_training_summary(bundle, studies_in_folder(dicom_dir))
    except DriftError as exc:
        raise _fail(str(exc), 2) from None
    skipped = f" ({reference['skipped']} could not be read)" if reference["skipped"] else ""
    _out.print(
        f"wrote {bundle / SUMMARY_FILE}: {reference['studies']} studies{skipped}", highlight=False
    )


_PEER = re.compile(r"^(?P<ae>[^@]{1,16})@(?P<host>[^:]+|\[[^\]]+\]):(?P<port>\d{1,5})$")


def parse_peer(text: str) -> tuple[str, str, int]:
    """Split ``AE@HOST:PORT`` into its parts, or raise ``typer.BadParameter``."""
    match = _PEER.match(text.strip())
    if match is None or not 0 < int(match["port"]) < 65536:
        raise typer.BadParameter(f"{text!r} is not AE@HOST:PORT (e.g. PACS@10.0.0.5:104)")
    return match["ae"], match["host"].strip("[]"), int(match["port"])


@app.command()
def echo(
    peer: Annotated[str, typer.Argument(help="The peer as AE@HOST:PORT.")],
    calling_ae_title: Annotated[
        str, typer.Option("--calling-ae", help="Our AE title in the request.")
    ] = "MIBI_NODE",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the peer.")] = 10.0,
) -> None:
    """Send a C-ECHO (DICOM ping) to a peer and report its answer."""
    from pynetdicom import AE

    from mibi_node.reception.contexts import VERIFICATION

    ae_title, host, port = parse_peer(peer)
    ae = AE(ae_title=calling_ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(VERIFICATION)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        raise _fail(f"{peer}: association refused or peer unreachable")
    try:
        result = assoc.send_c_echo()
    finally:
        assoc.release()
    code = int(result.Status) if "Status" in result else None
    if code != 0:
        raise _fail(f"{peer}: C-ECHO answered {code!r}")
    _out.print(f"{peer}: C-ECHO success")


def _register_stage_commands() -> None:
    """Commands whose modules live with their stage (light imports only at module level)."""
    from mibi_node.inference.command import init_bundle, predict

    app.command("predict")(predict)
    app.command("init-bundle")(init_bundle)
    from mibi_node.phantom.command import synth

    app.command("synth")(synth)
    # The offline modules live in the top-level ``training`` package; only the CLI reaches
    # them (the daemon never imports training code). Their command module is light.
    from training.command import evaluate, train

    app.command("train")(train)
    app.command("evaluate")(evaluate)
    from mibi_node.validation.command import performance_command, truth_app, verdict_command

    app.command("verdict")(verdict_command)
    app.command("performance")(performance_command)
    app.add_typer(truth_app, name="truth")


def _operator() -> str:
    """Who runs this command, for the audit trail (``cli:<login>``)."""
    import getpass

    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli"


_register_stage_commands()


def main() -> None:
    """Entry point of the ``mibi-node`` console script."""
    app()


if __name__ == "__main__":
    main()
