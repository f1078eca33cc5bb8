"""The inference engine against a naive baseline measured in the same run.

Naive: each member, each TTA view, one image at a time, fp32, no channels-last. Engine: all
views of all studies as one batch per member, channels-last, bf16 autocast where the hardware
has it (precision "auto"). Each variant runs in its own process (so peak RSS is its own),
on the same random-weight bundle and the same synthetic 128 x 128 dual-phase studies:

* study latency: median over >= 10 studies at batch 1, denoise and preprocessing included;
* throughput: studies/s at batch 8 (engine);
* how far bf16 probabilities move from fp32 (max absolute difference over studies/classes);
* the adaptive median filter's share of a study's time; peak RSS per process, and its peak
  once the weights are loaded (bf16 engines hold bf16 weights only, about half of fp32's).

    python benchmarks/bench_inference.py                 # the patent's nine, 224 px, 8 views
    python benchmarks/bench_inference.py --quick         # the demo recipe, in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

import common  # benchmarks/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def machine() -> dict[str, Any]:
    """CPU, cores, memory, torch threads and versions, for the results file."""
    return common.machine(torch_info=True)


def synthetic_studies(n: int, size: int = 128) -> list[Any]:
    """Dual-phase neck images with Poisson noise and a lesion that moves from study to study."""
    from mibi_node.imaging.study import PhaseImage, StudyInput

    studies = []
    for i in range(n):
        rng = np.random.default_rng(i)
        r, c = np.mgrid[0:size, 0:size] * (128 / size)
        thyroid = 200 * np.exp(-((r - 60) ** 2 / 300 + (c - 50) ** 2 / 60))
        thyroid += 200 * np.exp(-((r - 60) ** 2 / 300 + (c - 78) ** 2 / 60))
        lesion = 150 * np.exp(-((r - 70 - 3 * i) ** 2 + (c - 40 - 4 * (i % 8)) ** 2) / 10)
        images = {}
        for name, washout in (("early", 1.0), ("delayed", 0.4)):
            pixels = rng.poisson(washout * thyroid + lesion + 3).astype(np.float32)
            images[name] = PhaseImage(
                name, pixels, (2.0, 2.0), f"1.2.9.{i}.{name}", "1.2.840.10008.5.1.4.1.1.20", "1.2"
            )
        studies.append(StudyInput(f"1.2.9.{i}", images))
    return studies


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker_naive(bundle_dir: Path, n: int) -> dict[str, Any]:
    """Each member, each view at batch 1, fp32, default memory format."""
    from mibi_node.imaging.denoise import adaptive_median
    from mibi_node.imaging.preprocess import to_model_input
    from mibi_node.imaging.tta import apply_views
    from mibi_node.inference.bundle import load_bundle
    from mibi_node.inference.ensemble import fuse

    started = time.perf_counter()
    bundle = load_bundle(bundle_dir)
    members = [bundle.build_member(name) for name in bundle.member_names]
    load = time.perf_counter() - started
    load_rss = _peak_rss_mib()
    studies = synthetic_studies(n + 1)
    latencies, probabilities = [], []
    for index, study in enumerate(studies):
        started = time.perf_counter()
        images = [adaptive_median(study.images[c].pixels) for c in bundle.channels]
        array, _ = to_model_input(images, bundle.input_size, bundle.normalisation)
        x = torch.from_numpy(array)[None]
        per_member = []
        with torch.inference_mode():
            for member in members:
                views = [apply_views(x, [view]) for view in bundle.views]
                probs = [member(v).softmax(dim=-1)[0] for v in views]
                per_member.append(torch.stack(probs).mean(dim=0).numpy()[None])
        fused = fuse(np.stack(per_member), bundle.fusion)
        if index:  # the first study is the warm-up
            latencies.append(time.perf_counter() - started)
            probabilities.append(fused.probabilities[0].tolist())
    return {
        "load_s": load,
        "load_peak_rss_mib": load_rss,
        "latencies_s": latencies,
        "probabilities": probabilities,
    }


def worker_engine(bundle_dir: Path, n: int, precision: str, batch: int) -> dict[str, Any]:
    """The engine at batch 1 (latency) and at ``batch`` studies per call (throughput)."""
    from mibi_node.inference.engine import InferenceEngine

    started = time.perf_counter()
    engine = InferenceEngine(bundle_dir, device="auto", precision=precision)  # type: ignore[arg-type]
    load = time.perf_counter() - started
    load_rss = _peak_rss_mib()
    studies = synthetic_studies(n + 1)
    engine.predict(studies[:1])  # warm-up
    latencies, probabilities, denoise_share = [], [], []
    for study in studies[1:]:
        started = time.perf_counter()
        (result,) = engine.predict([study])
        latencies.append(time.perf_counter() - started)
        probabilities.append(list(result.probabilities.values()))
        denoise_share.append(result.timings["denoise"] / latencies[-1])
    throughput = None
    if batch > 1:
        group = synthetic_studies(batch)
        engine.predict(group)  # warm-up at this batch size
        rounds = max(1, n // batch)
        started = time.perf_counter()
        for _ in range(rounds):
            engine.predict(group)
        throughput = rounds * batch / (time.perf_counter() - started)
    return {
        "load_s": load,
        "load_peak_rss_mib": load_rss,
        "precision": engine.precision,
        "device": str(engine.device),
        "latencies_s": latencies,
        "probabilities": probabilities,
        "denoise_share": statistics.median(denoise_share),
        "studies_per_s_batch": throughput,
    }


def run_worker(variant: str, bundle_dir: Path, n: int, batch: int) -> dict[str, Any]:
    """Run one variant in a fresh process and return its JSON report."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        variant,
        "--bundle",
        str(bundle_dir),
        "--studies",
        str(n),
        "--batch",
        str(batch),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode:
        raise SystemExit(f"worker {variant} failed:\n{done.stderr}")
    report: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="demo recipe instead of the nine")
    parser.add_argument("--recipe", type=Path, help="ensemble recipe (default by --quick)")
    parser.add_argument("--studies", type=int, default=10, help="studies per latency run")
    parser.add_argument("--batch", type=int, default=8, help="studies per throughput call")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--bundle", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        if args.worker == "naive":
            report = worker_naive(args.bundle, args.studies)
        else:
            precision = args.worker.removeprefix("engine-")
            batch = args.batch if precision == "auto" else 1
            n = args.studies if precision == "auto" else min(args.studies, 3)
            report = worker_engine(args.bundle, n, precision, batch)
        report["peak_rss_mib"] = _peak_rss_mib()
        print(json.dumps(report))
        return

    from mibi_node.inference.bundle import init_random_bundle

    recipe = args.recipe or ROOT / "config" / (
        "ensemble-demo.toml" if args.quick else "ensemble-full.toml"
    )
    with tempfile.TemporaryDirectory() as tmp:
        bundle = init_random_bundle(recipe, Path(tmp) / "bundle", seed=0)
        variants = ["naive", "engine-auto", "engine-fp32"]
        reports = {v: run_worker(v, bundle.directory, args.studies, args.batch) for v in variants}
    naive, engine, fp32 = reports["naive"], reports["engine-auto"], reports["engine-fp32"]
    base = statistics.median(naive["latencies_s"])
    n_fp32 = len(fp32["probabilities"])
    bf16_diff = float(
        np.abs(
            np.asarray(engine["probabilities"][:n_fp32]) - np.asarray(fp32["probabilities"])
        ).max()
    )
    naive_engine_diff = float(
        np.abs(
            np.asarray(naive["probabilities"][:n_fp32]) - np.asarray(fp32["probabilities"])
        ).max()
    )
    rows = []
    for name, report in (
        ("naive: member x view at batch 1, fp32", naive),
        (f"engine fp32 ({fp32['device']})", fp32),
        (f"engine {engine['precision']} ({engine['device']})", engine),
    ):
        median = statistics.median(report["latencies_s"])
        rows.append(
            {
                "variant": name,
                "median_s": median,
                "min_s": min(report["latencies_s"]),
                "max_s": max(report["latencies_s"]),
                "studies": len(report["latencies_s"]),
                "speedup_vs_naive": base / median,
                "peak_rss_mib": report["peak_rss_mib"],
                "load_peak_rss_mib": report["load_peak_rss_mib"],
                "load_s": report["load_s"],
            }
        )
    print(
        f"inference: {bundle.name} ({len(bundle.member_names)} members, "
        f"{bundle.input_size} px, {len(bundle.views)} views), random weights"
    )
    print(
        "| variant | s/study (median) | min-max | studies | x naive | peak RSS MiB "
        "| after load MiB | load s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['median_s']:.3f} | {row['min_s']:.3f}-{row['max_s']:.3f} "
            f"| {row['studies']} | {row['speedup_vs_naive']:.2f} | {row['peak_rss_mib']:.0f} "
            f"| {row['load_peak_rss_mib']:.0f} | {row['load_s']:.1f} |"
        )
    print(f"engine at batch {args.batch}: {engine['studies_per_s_batch']:.2f} studies/s")
    print(f"bf16 vs fp32 probabilities, max |difference|: {bf16_diff:.2e}")
    print(f"naive vs engine fp32 probabilities, max |difference|: {naive_engine_diff:.2e}")
    print(f"adaptive median filter share of a study (engine): {engine['denoise_share']:.2%}")

    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = RESULTS / f"inference-{'quick' if args.quick else 'full'}-{stamp}.json"
    document = {
        "benchmark": "inference",
        "machine": machine(),
        "bundle": {
            "recipe": str(recipe.relative_to(ROOT) if recipe.is_relative_to(ROOT) else recipe),
            "members": list(bundle.member_names),
            "input_size": bundle.input_size,
            "views": [v.spec for v in bundle.views],
        },
        "rows": rows,
        "studies_per_s_batch": engine["studies_per_s_batch"],
        "batch": args.batch,
        "bf16_vs_fp32_max_abs_diff": bf16_diff,
        "naive_vs_engine_fp32_max_abs_diff": naive_engine_diff,
        "denoise_share": engine["denoise_share"],
    }
    path.write_text(json.dumps(document, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
