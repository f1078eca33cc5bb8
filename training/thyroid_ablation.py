"""Does seed 001's GAN data generation help? Thyroid training with and without GAN images.

For each training-set size (50, 100 and 400 phantom studies by default, each its own seeded
folder) the thyroid recipe is trained with the same seed in up to three arms:

* ``plain``: the studies alone;
* ``gan``: as many DCGAN + SRGAN images added to the training split
  (:func:`training.gan.generate_examples`: DCGAN at 32 px, SRGAN x2 to 64 px, both trained on
  that size's training split only; the validation split that fits thresholds and fusion
  weights is left out of the GANs too);
* ``copies``: the control, as many extra examples drawn (with replacement) from the real
  training images themselves. With a fixed epoch count, extra examples also mean more
  optimiser steps; this arm has the same number of steps as ``gan``, so ``gan`` against
  ``copies`` is what the generated images add beyond the longer training.

Every bundle is evaluated on one fresh folder of studies, drawn with a seed no training
folder uses. The table (markdown and JSON) gives exact match, macro F1, the worst
per-finding metric and the per-finding F1. A second call with other ``--arms`` adds its rows
to ``results.json`` (the folders and GAN images are reused).

Usage::

    python -m training.thyroid_ablation --out var/gan/ablation \\
        [--recipe config/thyroid-gan-ablation.toml] [--sizes 50 100 400] [--eval-studies 300]
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mibi_node.analyses.thyroid.result import FINDINGS

__all__ = ["format_ablation_table", "run_ablation"]

logger = logging.getLogger(__name__)

DEFAULT_RECIPE = Path("config/thyroid-gan-ablation.toml")
ARMS = ("plain", "gan", "copies")
TRAIN_SEED = 101
EVAL_SEED = 303


def _validation_rows(recipe: Any, data: Path, seed: int) -> np.ndarray:
    """The studies :func:`training.thyroid.train_thyroid` will hold out for validation."""
    from training.thyroid import _split  # the same split, so the GANs never see those studies

    with (data / "labels.csv").open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    config = recipe.training
    _, val = _split(rows, config.validation_fraction, config.seed + seed)
    return val


def run_ablation(
    out: Path,
    *,
    recipe: Path = DEFAULT_RECIPE,
    sizes: Sequence[int] = (50, 100, 400),
    eval_studies: int = 300,
    seed: int = 0,
    dcgan_steps: int = 1000,
    srgan_steps: int = 400,
    extra_per_study: float = 1.0,
    arms: Sequence[str] = ("plain", "gan"),
) -> list[dict[str, Any]]:
    """Train and evaluate every (size, with/without GAN) cell; write ``results.json``.

    Parameters
    ----------
    out
        Work folder: data folders, bundles, ``results.json`` and ``ablation.md``.
    recipe
        The thyroid recipe trained in every cell.
    sizes
        Training-set sizes (studies).
    eval_studies
        Studies in the fresh evaluation folder.
    seed
        The training seed of every cell (:func:`training.thyroid.train_thyroid`'s ``seed``).
    dcgan_steps, srgan_steps
        GAN training steps.
    extra_per_study
        Generated images (and copies) per training study.
    arms
        Which of ``plain``, ``gan`` and ``copies`` to run.

    Returns
    -------
    list of dict
        One row per cell (see :func:`format_ablation_table`).
    """
    from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
    from training.gan import generate_examples
    from training.thyroid import (
        evaluate_thyroid,
        load_thyroid_arrays,
        load_thyroid_recipe,
        train_thyroid,
    )

    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        raise ValueError(f'Argument "arms" should name some of {list(ARMS)}, got {list(arms)}.')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parsed = load_thyroid_recipe(recipe)
    evaluation = out / f"eval-{eval_studies}-seed{EVAL_SEED}"
    if not (evaluation / "labels.csv").is_file():
        generate_thyroid_studies(evaluation, eval_studies, EVAL_SEED)
    results = out / "results.json"
    earlier = json.loads(results.read_text(encoding="utf-8")) if results.is_file() else []
    redone = {(size, arm) for size in sizes for arm in arms}
    rows: list[dict[str, Any]] = [r for r in earlier if (r["studies"], _arm(r)) not in redone]
    for size in sizes:
        data = out / f"train-{size}-seed{TRAIN_SEED}"
        if not (data / "labels.csv").is_file():
            generate_thyroid_studies(data, size, TRAIN_SEED)
        inputs, targets = load_thyroid_arrays(parsed, data)
        held = _validation_rows(parsed, data, seed)
        keep = np.setdiff1d(np.arange(len(inputs)), held)
        count = int(round(extra_per_study * size))
        extras: dict[str, tuple[np.ndarray, np.ndarray] | None] = {"plain": None}
        gan_seconds = 0.0
        if "gan" in arms:
            made = generate_examples(
                inputs[keep],
                targets[keep],
                count,
                seed=seed + size,
                dcgan_steps=dcgan_steps,
                srgan_steps=srgan_steps,
            )
            np.savez_compressed(out / f"gan-{size}.npz", inputs=made.inputs, targets=made.targets)
            extras["gan"] = (made.inputs, made.targets)
            gan_seconds = made.seconds
        if "copies" in arms:
            pick = np.random.default_rng([seed, size, 2002]).choice(keep, count, replace=True)
            extras["copies"] = (inputs[pick], targets[pick])
        for arm in arms:
            bundle = out / f"bundle-{size}-{arm}"
            started = time.perf_counter()
            train_thyroid(recipe, data, bundle, seed=seed, extra=extras[arm])
            train_seconds = time.perf_counter() - started
            metrics = evaluate_thyroid(bundle, evaluation)
            manifest = json.loads((bundle / "bundle.json").read_text(encoding="utf-8"))
            extra = next(iter(manifest["evaluation"].values()))["extra_examples"]
            row = {
                "studies": size,
                "arm": arm,
                "extra_examples": extra,
                "gan_training_studies": len(keep),
                "exact_match": metrics["exact_match"],
                "macro_f1": metrics["macro"]["f1"],
                "worst": metrics["worst"],
                "f1": {k: metrics["per_finding"][k]["f1"] for k in FINDINGS},
                "train_seconds": round(train_seconds, 1),
                "gan_seconds": round(gan_seconds, 1) if arm == "gan" else 0.0,
                "eval_studies": metrics["studies"],
            }
            rows.append(row)
            logger.info("ablation %s", row)
            rows.sort(key=lambda r: (r["studies"], ARMS.index(_arm(r))))
            results.write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")
    return rows


def _arm(row: dict[str, Any]) -> str:
    """The row's arm (rows of the first version of this script say ``gan: true/false``)."""
    return str(row.get("arm", "gan" if row.get("gan") else "plain"))


_SHORT = {
    "normal": "normal",
    "graves": "Graves",
    "toxic_multinodular_goitre": "TMNG",
    "toxic_adenoma": "tox. adenoma",
    "cold_nodule": "cold nodule",
    "thyroiditis": "thyroiditis",
}


def format_ablation_table(rows: Sequence[dict[str, Any]]) -> str:
    """A markdown table: one line per (size, with/without GAN) cell."""
    head = ["train studies", "extra examples", "exact match", "macro F1", "worst metric"]
    head += [f"F1 {_SHORT[k]}" for k in FINDINGS] + ["train s", "GAN s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            str(r["studies"]),
            {
                "plain": "none",
                "gan": f"{r['extra_examples']} GAN",
                "copies": f"{r['extra_examples']} copies",
            }[_arm(r)],
            f"{r['exact_match']:.3f}",
            f"{r['macro_f1']:.3f}",
            f"{r['worst']:.3f}",
            *(f"{r['f1'][k]:.3f}" for k in FINDINGS),
            f"{r['train_seconds']:.0f}",
            f"{r['gan_seconds']:.0f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.thyroid_ablation --out DIR``."""
    parser = argparse.ArgumentParser(prog="python -m training.thyroid_ablation")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 100, 400])
    parser.add_argument("--eval-studies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dcgan-steps", type=int, default=1000)
    parser.add_argument("--srgan-steps", type=int, default=400)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=["plain", "gan"])
    args = parser.parse_args(argv)
    if min(args.sizes) < 8 or args.eval_studies < 1:
        parser.error("--sizes must be >= 8 and --eval-studies >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = run_ablation(
        args.out,
        recipe=args.recipe,
        sizes=args.sizes,
        eval_studies=args.eval_studies,
        seed=args.seed,
        dcgan_steps=args.dcgan_steps,
        srgan_steps=args.srgan_steps,
        arms=args.arms,
    )
    table = format_ablation_table(rows)
    seconds = time.perf_counter() - started
    text = (
        f"{table}\n\nrecipe {args.recipe}, evaluation: {args.eval_studies} fresh studies "
        f"(seed {EVAL_SEED}); {seconds:.0f} s in all\n"
    )
    (args.out / "ablation.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
