"""The MIBI super-resolution step: SRGAN against bicubic, and accuracy with and without it.

Image quality: held-out MIBI phantoms (a seed the generator's training never used) are
rendered at 128 and 256 px. The denoised 128 px acquisition (early and delayed) is upsampled
x2 by nearest neighbour, bilinear and bicubic interpolation (``scipy.ndimage.zoom``, order 0,
1, 3; "bicubic" is its cubic spline), by torch's bicubic convolution and by the SRGAN generator (:class:`mibi_node.imaging.superres.SuperResolution`); all
keep the total counts. Each is scored against the noise-free 256 px image of the same phantom
with PSNR and SSIM (:func:`~mibi_node.imaging.superres.psnr`,
:func:`~mibi_node.imaging.superres.ssim`, data range the truth's), and against bicubic.

Accuracy (``--accuracy``): ``config/ensemble-superres.toml`` is trained twice with the same
seed on the same phantom studies, with the step and without it, and both bundles are
evaluated on one fresh phantom folder.

    python -m training.gan mibi --out var/gan/mibi-sr/superres.pt
    python benchmarks/bench_superres.py [--generator var/gan/mibi-sr/superres.pt] [--accuracy]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common  # benchmarks/ is on sys.path when run as a script
from mibi_node.imaging.superres import load_superres, psnr, ssim

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "var" / "gan" / "bench-superres"


def interpolate(order: int) -> Callable[[np.ndarray], np.ndarray]:
    """x2 spline interpolation of a count image that keeps the total counts."""
    from scipy.ndimage import zoom

    def run(image: np.ndarray) -> np.ndarray:
        out = np.clip(zoom(image.astype(np.float64), 2, order=order, mode="nearest"), 0, None)
        return (out * (image.sum() / max(out.sum(), 1e-9))).astype(np.float32)

    return run


def torch_bicubic(image: np.ndarray) -> np.ndarray:
    """x2 bicubic convolution (Keys, a = -0.75; the generator's base) keeping the counts."""
    tensor = torch.from_numpy(image.astype(np.float32))[None, None]
    out = torch.nn.functional.interpolate(tensor, scale_factor=2, mode="bicubic")
    array = out[0, 0].clamp_min(0).numpy()
    return (array * (image.sum() / max(float(array.sum()), 1e-9))).astype(np.float32)


def image_quality(generator: Path, studies: int, seed: int) -> dict[str, Any]:
    """PSNR and SSIM of every method on the held-out pairs, per phase and overall."""
    from training.gan import render_mibi_pairs

    started = time.perf_counter()
    pairs = render_mibi_pairs(studies, seed, smax=7)
    render_seconds = time.perf_counter() - started
    sr = load_superres(generator)
    methods: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "nearest": interpolate(0),
        "bilinear": interpolate(1),
        "bicubic": interpolate(3),
        "bicubic (torch)": torch_bicubic,
        "srgan": sr.upsample,
    }
    phases = ["early", "delayed"] * studies
    scores: dict[str, dict[str, list[float]]] = {m: {"psnr": [], "ssim": []} for m in methods}
    seconds: dict[str, float] = {}
    for name, method in methods.items():
        started = time.perf_counter()
        outputs = [method(low) for low, _ in pairs]
        seconds[name] = (time.perf_counter() - started) / len(pairs)
        for out, (_, truth) in zip(outputs, pairs, strict=True):
            span = float(truth.max() - truth.min())
            scores[name]["psnr"].append(psnr(truth, out, span))
            scores[name]["ssim"].append(ssim(truth, out, span))
    table: dict[str, Any] = {}
    for name in methods:
        row: dict[str, Any] = {"seconds_per_image": round(seconds[name], 4)}
        for phase in ("all", "early", "delayed"):
            keep = [i for i, p in enumerate(phases) if phase in ("all", p)]
            for metric in ("psnr", "ssim"):
                row[f"{metric}_{phase}"] = float(np.mean([scores[name][metric][i] for i in keep]))
        # paired against bicubic on the same images
        row["psnr_gain_db"] = float(
            np.mean(np.subtract(scores[name]["psnr"], scores["bicubic"]["psnr"]))
        )
        row["ssim_ratio"] = float(
            np.mean(np.divide(scores[name]["ssim"], scores["bicubic"]["ssim"]))
        )
        row["better_psnr_share"] = float(
            np.mean(np.greater(scores[name]["psnr"], scores["bicubic"]["psnr"]))
        )
        table[name] = row
    return {"pairs": len(pairs), "render_seconds": round(render_seconds, 1), "methods": table}


def format_quality(result: dict[str, Any]) -> str:
    """A markdown table of :func:`image_quality`."""
    head = (
        "| method | PSNR dB (all) | SSIM (all) | PSNR early | PSNR delayed | PSNR vs bicubic | "
        "SSIM / bicubic | images better than bicubic | ms per image |"
    )
    lines = [head, "|" + "---|" * 9]
    for name, r in result["methods"].items():
        lines.append(
            f"| {name} | {r['psnr_all']:.2f} | {r['ssim_all']:.4f} | {r['psnr_early']:.2f} | "
            f"{r['psnr_delayed']:.2f} | {r['psnr_gain_db']:+.2f} dB | {r['ssim_ratio']:.4f} | "
            f"{r['better_psnr_share']:.0%} | {1000 * r['seconds_per_image']:.1f} |"
        )
    return "\n".join(lines)


def accuracy(generator: Path, train_studies: int, test_studies: int) -> dict[str, Any]:
    """Train the small recipe with and without the step (same seed) and test both."""
    from mibi_node.inference.recipe import SuperresSection, load_recipe
    from mibi_node.phantom.generator import generate_studies
    from training.evaluate import evaluate_bundle
    from training.pipeline import train_bundle

    train_dir = WORK / f"train-{train_studies}-seed41"
    test_dir = WORK / f"test-{test_studies}-seed42"
    if not (train_dir / "labels.csv").is_file():
        generate_studies(train_dir, train_studies, seed=41)
    if not (test_dir / "labels.csv").is_file():
        generate_studies(test_dir, test_studies, seed=42)
    recipe = load_recipe(ROOT / "config" / "ensemble-superres.toml")
    variants = {
        "with superres": recipe.model_copy(
            update={"superres": SuperresSection(enabled=True, generator=str(generator))}
        ),
        "without": recipe.model_copy(update={"superres": SuperresSection()}),
    }
    out: dict[str, Any] = {}
    for name, variant in variants.items():
        bundle = WORK / ("bundle-sr" if variant.superres.enabled else "bundle-plain")
        started = time.perf_counter()
        train_bundle(
            variant, train_dir, bundle, overwrite=True, evaluate=False, cache_dir=WORK / "cache"
        )
        train_seconds = time.perf_counter() - started
        started = time.perf_counter()
        report = evaluate_bundle(
            bundle, test_dir, "all", n_resamples=0, out_dir=bundle / "reports-fresh"
        )
        ensemble = report.rows["ensemble"]
        out[name] = {
            "accuracy": float(ensemble["accuracy"].value),
            "macro_f1": float(ensemble["macro_f1"].value),
            "macro_auc": float(ensemble["macro_auc"].value),
            "studies": report.n_studies,
            "train_seconds": round(train_seconds, 1),
            "evaluate_seconds": round(time.perf_counter() - started, 1),
        }
    return {"train_studies": train_studies, "test_studies": test_studies, "variants": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", type=Path, default=ROOT / "var/gan/mibi-sr/superres.pt")
    parser.add_argument("--studies", type=int, default=20, help="held-out phantoms (2 pairs each)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the held-out phantoms")
    parser.add_argument("--accuracy", action="store_true", help="also train with and without")
    parser.add_argument("--train-studies", type=int, default=600)
    parser.add_argument("--test-studies", type=int, default=300)
    args = parser.parse_args()
    torch.set_num_threads(1)
    quality = image_quality(args.generator, args.studies, args.seed)
    print(f"{quality['pairs']} held-out pairs (seed {args.seed}), 128 -> 256 px, denoised input")
    print(format_quality(quality))
    result: dict[str, Any] = {"generator": str(args.generator), "quality": quality}
    if args.accuracy:
        result["accuracy"] = accuracy(args.generator, args.train_studies, args.test_studies)
        print()
        print("| MIBI recipe | accuracy | macro F1 | macro AUC | train s | evaluate s |")
        print("|---|---|---|---|---|---|")
        for name, r in result["accuracy"]["variants"].items():
            print(
                f"| {name} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} | {r['macro_auc']:.3f} | "
                f"{r['train_seconds']:.0f} | {r['evaluate_seconds']:.0f} |"
            )
    print(f"wrote {common.write_result('superres', result)}")


if __name__ == "__main__":
    main()
