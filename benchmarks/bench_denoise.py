"""Adaptive median filter: vectorised NumPy/SciPy and torch against the per-pixel reference.

Images of 128 x 128 and 256 x 256 with 10 % impulse noise, smax 7. Rounds are interleaved
(reference, numpy, torch, reference, ...) and every variant's output is checked against the
reference. Prints megapixels/s and the speed-up over the reference, and writes JSON to
``benchmarks/results/``. ``--quick`` measures fewer rounds (the reference is the slow part).

    python benchmarks/bench_denoise.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common  # benchmarks/ is on sys.path when run as a script
from mibi_node.imaging.denoise import adaptive_median, adaptive_median_torch

# The per-pixel reference is the one the tests hold the filters to, not a second copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_denoise import reference_adaptive_median as reference  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, torch threads and versions, for the results file."""
    return common.machine(torch_info=True)


def noisy(shape: int, seed: int = 0) -> np.ndarray:
    """A smooth neck-like image with Poisson noise and 10 % salt-and-pepper impulses."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[0:shape, 0:shape] / shape
    image = 300 * np.exp(-((r - 0.45) ** 2 + (c - 0.5) ** 2) / 0.02) + 5
    image = rng.poisson(image).astype(np.float32)
    mask = rng.random(image.shape) < 0.10
    image[mask] = rng.choice([0.0, 1000.0], size=int(mask.sum()))
    return image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--smax", type=int, default=7)
    args = parser.parse_args()
    rounds = 3 if args.quick else 5
    reference_rounds = 1 if args.quick else 3

    variants: dict[str, Callable[[np.ndarray], np.ndarray]] = {
        "reference (per pixel)": lambda im: reference(im, args.smax),
        "numpy vectorised": lambda im: adaptive_median(im, smax=args.smax),
        "torch cpu": lambda im: adaptive_median_torch(torch.from_numpy(im), smax=args.smax).numpy(),
    }

    def _torch_one_thread(im: np.ndarray) -> np.ndarray:
        # on a loaded 2-core VM, torch's thread pool makes small element-wise ops ~100x slower
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return adaptive_median_torch(torch.from_numpy(im), smax=args.smax).numpy()
        finally:
            torch.set_num_threads(threads)

    variants["torch cpu, 1 thread"] = _torch_one_thread
    if torch.cuda.is_available():

        def _cuda(im: np.ndarray) -> np.ndarray:
            out = adaptive_median_torch(torch.from_numpy(im).cuda(), smax=args.smax)
            return out.cpu().numpy()

        variants["torch cuda"] = _cuda

    results: dict[str, dict[str, Any]] = {}
    rows = []
    for size in (128, 256):
        image = noisy(size)
        expected = reference(image, args.smax)
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name, fn in variants.items():  # warm-up and correctness
            assert np.array_equal(fn(image), expected), f"{name} differs from the reference"
        for round_ in range(rounds):
            for name, fn in variants.items():
                if name.startswith("reference") and round_ >= reference_rounds:
                    continue
                start = time.perf_counter()
                fn(image)
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["reference (per pixel)"])
        for name, values in times.items():
            median = statistics.median(values)
            entry = {
                "median_s": median,
                "min_s": min(values),
                "max_s": max(values),
                "rounds": len(values),
                "megapixels_per_s": size * size / median / 1e6,
                "speedup_vs_reference": base / median,
            }
            results[f"{size}x{size} {name}"] = entry
            rows.append((f"{size}x{size}", name, entry))

    print(
        f"adaptive median filter, smax {args.smax}, 10% impulses ({'quick' if args.quick else 'full'})"
    )
    print("| image | variant | median ms | MP/s | x reference |\n|---|---|---|---|---|")
    for size, name, e in rows:
        print(
            f"| {size} | {name} | {e['median_s'] * 1000:.2f} | "
            f"{e['megapixels_per_s']:.3f} | {e['speedup_vs_reference']:.0f} |"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"denoise-{stamp}.json"
    document = {
        "benchmark": "denoise",
        "machine": machine(),
        "smax": args.smax,
        "quick": args.quick,
        "results": results,
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
