"""The ``mibi-node predict`` and ``mibi-node init-bundle`` commands (registered by ``cli.py``).

Only the standard library, typer and rich are imported here at module level, so that
``mibi-node --help`` stays fast; torch and the engine load inside the commands. Bad input ends
in one readable sentence on stderr and a non-zero exit status, never a traceback:

* 0: every study was classified;
* 1: at least one study could not be read (its reason is printed, the others are classified);
* 2: bad arguments, or the bundle cannot be loaded;
* 3: an unexpected error inside the engine (a bug: please report it).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

if TYPE_CHECKING:
    from mibi_node.inference.result import StudyResult

__all__ = ["init_bundle", "predict"]

logger = logging.getLogger(__name__)

_out = Console()
_err = Console(stderr=True)

#: Studies classified per engine call.
_BATCH = 8


def _fail(message: str, code: int) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def _files(paths: Iterable[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and not any(part.startswith(".") for part in p.parts)
                )
            )
        elif path.is_file():
            files.append(path)
        else:
            raise _fail(f"{path}: no such file or folder", 2)
    return files


def _group_by_study(files: list[Path]) -> tuple[dict[str, list[Path]], list[str]]:
    """Study Instance UID -> its files, and one remark per file that is not DICOM."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = {}
    skipped: list[str] = []
    for path in files:
        try:
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
            uid = str(header.StudyInstanceUID)
        except (InvalidDicomError, OSError):
            skipped.append(f"{path}: skipped (not DICOM)")
            continue
        except AttributeError:
            skipped.append(f"{path}: skipped (no Study Instance UID)")
            continue
        except Exception as exc:  # a damaged file: pydicom raises many kinds; one line each
            skipped.append(f"{path}: skipped (damaged: {type(exc).__name__})")
            continue
        groups.setdefault(uid, []).append(path)
    return groups, skipped


def _focus_text(result: StudyResult) -> str:
    focus = result.focus
    if focus is None:
        return "-"
    return f"{focus.side} {focus.pole} at row {focus.row:.1f}, col {focus.col:.1f} ({focus.phase})"


def _print_result(result: StudyResult) -> None:
    table = Table(title=f"study {result.study_instance_uid}", title_justify="left")
    table.add_column("class")
    table.add_column("probability", justify="right")
    for key, probability in result.probabilities.items():
        style = "bold" if key == result.predicted else ""
        table.add_row(key, f"{probability:.3f}", style=style)
    _out.print(table)
    _out.print(
        f"prediction: [bold]{result.predicted}[/]  agreement: {result.agreement:.2f}  "
        f"normalised entropy: {result.normalised_entropy:.2f}  focus: {_focus_text(result)}",
        highlight=False,
        soft_wrap=True,
    )
    for warning in result.warnings:
        _out.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False, soft_wrap=True)


def predict(
    paths: Annotated[
        list[Path],
        typer.Argument(help="Study folders or DICOM files; files are grouped by study."),
    ],
    bundle: Annotated[Path, typer.Option("--bundle", "-b", help="Model bundle folder.")],
    device: Annotated[
        str, typer.Option("--device", help='"auto" (first GPU, else CPU), "cpu" or "cuda[:N]".')
    ] = "auto",
    json_: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
) -> None:
    """Classify MIBI studies with a model bundle and print the probabilities per study."""
    from mibi_node.errors import MibiNodeError, UnusableStudyError

    try:
        from mibi_node.imaging.nm import read_study
    except ImportError:
        raise _fail("the NM reader (mibi_node.imaging.nm) is not installed", 2) from None
    from mibi_node.inference.engine import InferenceEngine

    try:
        engine = InferenceEngine(bundle, device=device)
    except (MibiNodeError, ValueError, TypeError) as exc:
        raise _fail(str(exc), 2) from None

    groups, problems = _group_by_study(_files(paths))
    if not groups:
        for problem in problems:
            _err.print(escape(problem), highlight=False, soft_wrap=True)
        raise _fail("no DICOM study among the given paths", 2)

    errors: list[dict[str, str]] = []
    studies = []
    for uid, files in groups.items():
        try:
            studies.append(read_study(files, required=engine.bundle.channels))
        except UnusableStudyError as exc:
            errors.append({"study_instance_uid": uid, "error": str(exc)})
        except MibiNodeError as exc:  # any other deliberate error of the reader
            errors.append({"study_instance_uid": uid, "error": str(exc)})

    results: list[StudyResult] = []
    for start in range(0, len(studies), _BATCH):
        chunk = studies[start : start + _BATCH]
        try:
            results.extend(engine.predict(chunk))
        except UnusableStudyError as exc:
            errors.append({"study_instance_uid": chunk[0].study_instance_uid, "error": str(exc)})
        except Exception as exc:  # a bug; keep the promise of no traceback, log it in full
            logger.exception("engine failed")
            raise _fail(f"internal error while classifying: {exc!r}", 3) from None

    if json_:
        document: dict[str, Any] = {
            "bundle": {
                "name": engine.bundle.name,
                "version": engine.bundle.version,
                "intended_use": engine.bundle.intended_use,
                "device": str(engine.device),
                "precision": engine.precision,
            },
            "studies": [result.to_dict() for result in results],
            "errors": errors,
            "skipped": problems,
        }
        typer.echo(json.dumps(document, indent=2))
    else:
        for result in results:
            _print_result(result)
        for problem in problems:
            _err.print(f"[yellow]{escape(problem)}[/]", highlight=False, soft_wrap=True)
        for error in errors:
            _err.print(
                f"[bold red]study {error['study_instance_uid']}:[/] {escape(error['error'])}",
                highlight=False,
                soft_wrap=True,
            )
    if errors:
        raise typer.Exit(1)


def init_bundle(
    recipe: Annotated[
        Path, typer.Argument(help="Ensemble recipe, e.g. config/ensemble-demo.toml.")
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the bundle to.")],
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random weights.")] = 0,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a bundle already in --out.")
    ] = False,
) -> None:
    """Write a bundle of randomly initialised members (intended use: demonstration)."""
    from mibi_node.errors import MibiNodeError
    from mibi_node.inference.bundle import init_random_bundle

    try:
        bundle = init_random_bundle(recipe, out, seed=seed, overwrite=overwrite)
    except (MibiNodeError, ValueError, TypeError, OSError) as exc:
        raise _fail(str(exc), 2) from None
    members = ", ".join(f"{e.name} ({e.arch})" for e in bundle.manifest.members)
    _out.print(
        f"wrote demonstration bundle [bold]{bundle.name} {bundle.version}[/] to {out}: "
        f"{len(bundle.manifest.members)} members: {members}",
        highlight=False,
        soft_wrap=True,
    )
