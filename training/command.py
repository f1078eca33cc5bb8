"""The ``mibi-node train`` and ``mibi-node evaluate`` commands (registered by ``cli.py``).

Only the standard library, typer and rich are imported at module level, so that
``mibi-node --help`` stays fast; torch and the training code load inside the commands. Bad
input ends in one readable sentence on stderr and a non-zero exit status:

* 0: done;
* 2: bad arguments, recipe, data folder or bundle;
* 3: an unexpected error (a bug: please report it);
* 130: interrupted (``train --resume`` continues from the last finished epoch).
"""

from __future__ import annotations

import logging
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from training.evaluate import EvaluationReport

__all__ = ["evaluate", "train"]

logger = logging.getLogger(__name__)

_out = Console()
_err = Console(stderr=True)


def _fail(message: str, code: int) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


class _Display:
    """Rich progress bars: one for reading the data, one per member over its epochs."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.tasks: dict[str, TaskID] = {}
        self.epochs: dict[str, int] = {}
        self.last: dict[str, str] = {}

    def __call__(self, event: str, *args: Any) -> None:
        p = self.progress
        if event in ("read", "classify"):
            done, total = args
            if event not in self.tasks:
                label = (
                    "reading studies" if event == "read" else "classifying (with and without TTA)"
                )
                self.tasks[event] = p.add_task(label, total=total)
            p.update(self.tasks[event], completed=done, total=total)
        elif event == "stage":
            if "read" in self.tasks:
                p.remove_task(self.tasks.pop("read"))
            if args[0] != "data":
                p.console.log(f"{args[0]}")
        elif event == "member":
            name, epochs = args
            self.epochs[name] = epochs
        elif event == "step":
            name, epoch, step, steps, loss = args
            if name not in self.tasks:
                total = steps * self.epochs.get(name, 1)
                self.tasks[name] = p.add_task(name, total=total)
            epochs = self.epochs.get(name, 1)
            p.update(
                self.tasks[name],
                completed=(epoch - 1) * steps + step,
                total=steps * epochs,
                description=(
                    f"{name} epoch {epoch}/{epochs} loss {loss:.3f} {self.last.get(name, '')}"
                ),
            )
        elif event == "epoch":
            name, row = args
            if row["val_loss"] == row["val_loss"]:  # not NaN
                self.last[name] = (
                    f"| val loss {row['val_loss']:.3f} acc {row['val_accuracy']:.2f} "
                    f"F1 {row['val_macro_f1']:.2f}"
                )


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_err,
        transient=False,
    )


def _print_report(report: EvaluationReport) -> None:
    from training.metrics import SCALAR_METRICS

    table = Table(
        title=f"{report.bundle_name} {report.bundle_version}: split {report.split}, "
        f"{report.n_studies} studies (95% bootstrap intervals)",
        title_justify="left",
    )
    table.add_column("model")
    names = {"macro_auc": "macro AUC", "macro_f1": "macro F1", "nll": "NLL", "ece": "ECE"}
    for metric in SCALAR_METRICS:
        table.add_column(names.get(metric, metric), justify="right")
    for name, row in report.rows.items():
        style = "bold" if name.startswith("ensemble") else ""
        table.add_row(name, *(row[m].format() for m in SCALAR_METRICS), style=style)
    _out.print(table)
    if report.localisation:
        loc = report.localisation
        _out.print(
            f"localisation: {loc['hits']}/{loc['localised']} foci within {loc['radius_mm']:g} mm "
            f"of a true lesion (hit rate {loc['hit_rate']:.3f})",
            highlight=False,
        )
    better = [m for m, won in report.beats_best_member.items() if won]
    _out.print(f"ensemble better than its best member on: {', '.join(better) or 'none'}")
    for path in report.files:
        _out.print(f"wrote {path}", highlight=False, soft_wrap=True)


def train(
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="Labelled studies: labels.csv or class folders."),
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle folder to write.")] = None,
    recipe: Annotated[Path, typer.Option("--recipe", "-r", help="Ensemble recipe.")] = Path(
        "config/ensemble-demo.toml"
    ),
    device: Annotated[
        str, typer.Option("--device", help='"auto" (first GPU, else CPU), "cpu" or "cuda[:N]".')
    ] = "auto",
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue an interrupted run in --out.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a bundle or an unfinished run in --out.")
    ] = False,
    cache: Annotated[
        Path | None,
        typer.Option("--cache", help="Folder of cached preprocessed arrays (~/.cache/mibi-node)."),
    ] = None,
    split: Annotated[
        Path | None,
        typer.Option("--split", help="Reuse the split.json of an earlier run on the same data."),
    ] = None,
    epochs: Annotated[
        int | None, typer.Option("--epochs", min=1, help="Replace the recipe's epoch count.")
    ] = None,
    evaluate_test: Annotated[
        bool, typer.Option("--evaluate/--no-evaluate", help="Run the test module at the end.")
    ] = True,
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads",
            min=1,
            help="Replace the recipe's CPU thread count (1 when another training shares the "
            "machine: torch threads beyond the free cores slow both down several times).",
        ),
    ] = None,
    analysis: Annotated[
        str,
        typer.Option(
            "--analysis",
            help="Which analysis' bundle: parathyroid (the ensemble), thyroid or spine "
            "(its recipe defaults to config/<analysis>-demo.toml; the data folder is in its "
            "own format, e.g. annotations.json beside the DICOM files for spine).",
        ),
    ] = "parathyroid",
    from_node: Annotated[
        Path | None,
        typer.Option(
            "--from-node",
            help="Export this node's assessed studies of --analysis, de-identified, into this "
            "new folder as the data; then train into --out if given, else print the command.",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="The node's TOML configuration (--from-node)."),
    ] = None,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", help="The node's database and stored files (--from-node)."),
    ] = None,
) -> None:
    """Train the members of a recipe, fit the fusion, and write and evaluate a model bundle."""
    from mibi_node.errors import MibiNodeError
    from training.pipeline import train_bundle

    if from_node is not None:
        if data is not None:
            raise _fail("give --data or --from-node, not both", 2)
        data = _export_from_node(from_node, analysis, config, data_dir, recipe, out)
        if out is None:
            return
    if data is None or out is None:
        raise _fail(
            "--data and --out are needed (or --from-node FOLDER to export the node's assessed "
            "studies)",
            2,
        )
    if analysis != "parathyroid":
        raise typer.Exit(_train_analysis(analysis, recipe, data, out))

    changes: dict[str, Any] = {} if epochs is None else {"epochs": epochs}
    if threads is not None:
        changes["threads"] = threads
    command = shlex.join(["mibi-node", *sys.argv[1:]]) if sys.argv[1:2] == ["train"] else None
    try:
        with _progress() as progress:
            result = train_bundle(
                recipe,
                data,
                out,
                device=device,
                resume=resume,
                overwrite=overwrite,
                cache_dir=cache,
                split_file=split,
                changes=changes,
                evaluate=evaluate_test,
                command=command,
                progress=_Display(progress),
            )
    except KeyboardInterrupt:
        raise _fail(
            f"interrupted; continue with: mibi-node train ... --out {out} --resume", 130
        ) from None
    except (MibiNodeError, ValueError, TypeError, OSError) as exc:
        raise _fail(str(exc), 2) from None
    except Exception as exc:  # a bug: log it in full, print one line
        logger.exception("training failed")
        raise _fail(f"internal error while training: {exc!r}", 3) from None

    table = Table(title="members", title_justify="left")
    for column in ("member", "epochs", "best epoch", "seconds", "fitted k", "kept k"):
        table.add_column(column, justify="left" if column == "member" else "right")
    fit = result.fusion
    for i, (name, info) in enumerate(result.members.items()):
        table.add_row(
            name,
            str(info["epochs"]),
            str(info["best_epoch"]),
            f"{info['seconds']:.0f}",
            f"{fit.fitted_weights[i]:.3f}",
            f"{fit.fusion.weights[i]:.3f}",
        )
    _out.print(table)
    _out.print(fit.summary(), highlight=False, soft_wrap=True)
    if result.evaluation is not None:
        _print_report(result.evaluation)
    _out.print(
        f"wrote bundle {result.bundle_dir} in {result.seconds.get('total', 0):.0f} s",
        highlight=False,
        soft_wrap=True,
    )


def _export_from_node(
    folder: Path,
    analysis: str,
    config: Path | None,
    data_dir: Path | None,
    recipe: Path,
    out: Path | None,
) -> Path:
    """``train --from-node``: export the node's assessed studies, say what was written and
    how to train on it; the export folder."""
    from mibi_node import cli
    from mibi_node.errors import MibiNodeError
    from mibi_node.storage.filestore import FileStore
    from mibi_node.validation.export import export_assessed

    resolved = cli._load(config, node={"data_dir": data_dir})
    try:
        database = cli._open_existing(resolved)
    except typer.Exit:  # it said why; a missing database is bad input here
        raise typer.Exit(2) from None
    try:
        outcome = export_assessed(
            database, FileStore(resolved.store_dir), analysis, folder, actor=cli._operator()
        )
    except MibiNodeError as exc:
        raise _fail(str(exc), 2) from None
    finally:
        database.dispose()
    labels = ", ".join(f"{key} {n}" for key, n in outcome.labels.items())
    skipped = ", ".join(f"{reason} {n}" for reason, n in outcome.skipped.items()) or "none"
    _out.print(
        f"exported {outcome.cases} {analysis} cases ({outcome.files} files, de-identified) to "
        f"{folder}\nlabels: {labels}\nleft out: {skipped}",
        highlight=False,
        soft_wrap=True,
    )
    for warning in outcome.warnings:
        _err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)
    if out is None:
        default = recipe in (
            Path("config/ensemble-demo.toml"),
            Path(f"config/{analysis}-demo.toml"),
        )
        command = outcome.train_command("BUNDLE", None if default else str(recipe))
        _out.print(
            f"train a bundle on it with:\n  {shlex.join(command)}", highlight=False, soft_wrap=True
        )
    return outcome.out_dir


#: The analyses whose training lives in a module of its own with a ``main(argv)``.
_ANALYSIS_TRAINING = {
    "thyroid": "training.thyroid",
    "spine": "training.spine",
    "knee": "training.knee",
    "lung": "training.lung",
}


def _train_analysis(analysis: str, recipe: Path, data: Path, out: Path) -> int:
    """``mibi-node train --analysis NAME``: that analysis' own ``train`` subcommand."""
    from importlib import import_module

    module = _ANALYSIS_TRAINING.get(analysis)
    if module is None:
        known = ", ".join(["parathyroid", *_ANALYSIS_TRAINING])
        raise _fail(f"--analysis: no analysis called {analysis!r} trains here ({known})", 2)
    if recipe == Path("config/ensemble-demo.toml"):  # the option's default: the analysis' own
        recipe = Path(f"config/{analysis}-demo.toml")
    code = import_module(module).main(["train", str(recipe), str(data), "--out", str(out)])
    return int(code or 0)


def evaluate(
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Model bundle folder.")],
    data: Annotated[
        Path, typer.Option("--data", "-d", help="Labelled studies: labels.csv or class folders.")
    ],
    split: Annotated[
        str,
        typer.Option(
            "--split", help="test, val or train (the bundle's saved split), or all (fresh data)."
        ),
    ] = "test",
    device: Annotated[
        str, typer.Option("--device", help='"auto" (first GPU, else CPU), "cpu" or "cuda[:N]".')
    ] = "auto",
    bootstrap: Annotated[
        int, typer.Option("--bootstrap", min=0, help="Bootstrap resamples for the 95% intervals.")
    ] = 1000,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Report folder (default BUNDLE/reports).")
    ] = None,
) -> None:
    """Evaluate a bundle on labelled studies: the patent's table, plots and reports."""
    from mibi_node.errors import MibiNodeError
    from training.evaluate import evaluate_bundle

    try:
        with _progress() as progress:
            display = _Display(progress)
            report = evaluate_bundle(
                bundle,
                data,
                split,
                device=device,
                n_resamples=bootstrap,
                out_dir=out,
                progress=lambda stage, done, total: display(stage, done, total),
            )
    except (MibiNodeError, ValueError, TypeError, OSError) as exc:
        raise _fail(str(exc), 2) from None
    except Exception as exc:  # a bug: log it in full, print one line
        logger.exception("evaluation failed")
        raise _fail(f"internal error while evaluating: {exc!r}", 3) from None
    _print_report(report)
