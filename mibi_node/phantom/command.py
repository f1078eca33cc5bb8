"""``mibi-node synth``: write synthetic dual-phase MIBI studies (registered by ``cli.py``).

Only the standard library, typer and rich are imported at module level, so that
``mibi-node --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

__all__ = ["synth"]

_out = Console()


def _split(text: str | None, name: str) -> list[str] | None:
    if text is None:
        return None
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise typer.BadParameter(f"{name} is empty")
    return items


def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the studies to.")],
    studies: Annotated[int, typer.Option("--studies", "-n", help="How many studies.")] = 10,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes.")] = 0,
    classes: Annotated[
        str | None,
        typer.Option(help="Comma-separated classes: normal,adenoma,hyperplasia,carcinoma,cyst."),
    ] = None,
    mix: Annotated[
        str | None, typer.Option(help="Comma-separated shares, one per class, e.g. 0.3,0.4,...")
    ] = None,
    matrix: Annotated[int, typer.Option(help="Matrix size: 128 or 256.")] = 128,
    layout: Annotated[
        str, typer.Option(help="separate-series, single-series or multiframe.")
    ] = "separate-series",
    with_thyroid_scan: Annotated[
        bool, typer.Option("--with-thyroid-scan", help="Add a 99mTc-pertechnetate thyroid image.")
    ] = False,
    preview: Annotated[
        bool, typer.Option("--preview", help="Also write preview.png, a labelled montage.")
    ] = False,
) -> None:
    """Write synthetic parathyroid MIBI studies (phantoms, not patients) plus labels.csv."""
    from mibi_node.phantom.anatomy import CLASSES
    from mibi_node.phantom.generator import generate_studies

    class_list = _split(classes, "--classes") or list(CLASSES)
    shares = None
    mix_items = _split(mix, "--mix")
    if mix_items is not None:
        try:
            shares = [float(item) for item in mix_items]
        except ValueError:
            raise typer.BadParameter(f"--mix {mix!r} should hold numbers") from None
    try:
        written = generate_studies(
            out,
            studies,
            seed=seed,
            classes=class_list,
            mix=shares,
            matrix=matrix,
            layout=layout,
            with_thyroid_scan=with_thyroid_scan,
            preview=preview,
        )
    except (TypeError, ValueError) as exc:
        raise typer.BadParameter(str(exc)) from None
    except OSError as exc:
        raise typer.BadParameter(f"cannot write to {out}: {exc.strerror or exc}") from None
    counts: dict[str, int] = {}
    for study in written:
        counts[study.label] = counts.get(study.label, 0) + 1
    summary = ", ".join(f"{counts[name]} {name}" for name in class_list if name in counts)
    _out.print(f"wrote {len(written)} phantom studies to {out} ({summary}); labels in labels.csv")
    if preview:
        _out.print(f"preview: {out / 'preview.png'}")
