"""The knee analysis on CPU: one knee MR study, from its stored files to four segmented
cartilage plates with their volumes and thicknesses, and its SEG and SR, against the goal
(issue 17: <= 30 s per knee on 2 cores) and against the spine analysis as a baseline
measured in the same run.

* Knee: ``read_knee_study`` (pick the 3-D sagittal series of a phantom study: 48 sagittal
  DESS slices of 128 x 128 and 5 coronal PD slices) + ``KneeRunner.predict`` (denoise,
  isotropic resampling, stage 1, components and crop, stage 2, back to the source grid,
  measurements), then ``build_knee_documents`` (SR + SEG), batch 1, device cpu.
* Baseline: the spine analysis' ``read_spine_study`` + ``SpineRunner.predict`` of one full
  lumbar MR phantom study (25 files), the other MR analysis of the node.

The knee bundle is the trained demo bundle in var/bundles/knee-demo when it is there, else
the demo recipe's networks trained briefly on 12 phantoms (the same compute per knee; stage
1 must find a cartilage region for stage 2 to run, which random weights do not). Rounds are
interleaved (knee i, spine i, ...) after a warm-up; medians and min-max are reported with
the ratio knee / spine, the runner's split into its steps, and the process' peak RSS.

Usage: python benchmarks/bench_knee.py [--studies 10] [--quick]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from common import machine, summary, write_result  # noqa: E402

RECIPE = ROOT / "config" / "knee-demo.toml"
TRAINED = ROOT / "var" / "bundles" / "knee-demo"
GOAL_SECONDS = 30.0


def _knee_bundle(work: Path) -> Path:
    """The trained demo bundle, else the demo recipe trained briefly on 12 phantoms."""
    if (TRAINED / "bundle.json").is_file():
        return TRAINED
    import tomllib

    from mibi_node.analyses.knee.phantom import write_knee_dataset
    from training.knee import main as train

    recipe = tomllib.loads(RECIPE.read_text())
    text = RECIPE.read_text()
    for stage, epochs in (("stage1", 20), ("stage2", 2)):
        old = f"epochs = {recipe[stage]['epochs']}"
        start = text.index(f"[{stage}]")
        at = text.index(old, start)
        text = text[:at] + f"epochs = {epochs}" + text[at + len(old) :]
    (work / "brief.toml").write_text(text)
    write_knee_dataset(work / "data", 12, 99)
    print("no trained knee bundle: training the demo recipe briefly (20 + 2 epochs)", flush=True)
    if train(["train", str(work / "brief.toml"), str(work / "data"), "--out", str(work / "b")]):
        raise SystemExit("the brief knee training failed")
    return work / "b"


def _spine_bundle(work: Path) -> Path:
    from bench_spine import _spine_bundle as spine_bundle

    return spine_bundle(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="4 studies")
    args = parser.parse_args()
    count = 4 if args.quick else args.studies

    import torch

    from mibi_node.analyses.base import EncodeContext
    from mibi_node.analyses.knee.phantom import make_knee_case, write_knee_study
    from mibi_node.analyses.knee.reader import read_knee_study
    from mibi_node.analyses.knee.report import build_knee_documents
    from mibi_node.analyses.knee.runner import KneeRunner
    from mibi_node.analyses.spine.phantom import make_spine_study
    from mibi_node.analyses.spine.reader import read_spine_study
    from mibi_node.analyses.spine.runner import SpineRunner

    with tempfile.TemporaryDirectory(prefix="bench-knee-") as tmp:
        work = Path(tmp)
        knee_runner = KneeRunner(_knee_bundle(work), device="cpu")
        spine_runner = SpineRunner(_spine_bundle(work / "spine"), device="cpu")
        total = count + args.warmup
        knees = [
            write_knee_study(make_knee_case(7000 + i), work / "knees" / f"{i:03d}", index=i)
            for i in range(total)
        ]
        spines = []
        for index in range(total):
            study = make_spine_study(work / "spines" / f"{index:03d}", 5, index=index)
            spines.append([p for paths in study.paths.values() for p in paths])

        import pydicom

        knee: dict[str, list[float]] = {"read": [], "predict": [], "sr + seg": [], "total": []}
        parts: dict[str, list[float]] = {}
        spine: list[float] = []
        context = EncodeContext(
            device_uid="1.2.826.0.1.3680043.8.498.1", series_number=9931, instance_number=1,
            series_instance_uid="1.2.826.0.1.3680043.8.498.2",
        )  # fmt: skip
        for index in range(total):
            started = time.perf_counter()
            study_input = read_knee_study(knees[index])
            read = time.perf_counter() - started
            (result,) = knee_runner.predict([study_input])
            predicted = time.perf_counter() - started
            headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in knees[index]]
            documents = build_knee_documents(result, headers, context)
            spent = time.perf_counter() - started
            assert result.found, "the knee runner found no cartilage"
            assert len(documents) == 2, "no SEG beside the SR"
            started = time.perf_counter()
            spine_runner.predict([read_spine_study(spines[index])])
            spine_seconds = time.perf_counter() - started
            if index < args.warmup:
                continue
            knee["read"].append(read)
            knee["predict"].append(predicted - read)
            knee["sr + seg"].append(spent - predicted)
            knee["total"].append(spent)
            spine.append(spine_seconds)
            for name, value in result.timings.items():
                parts.setdefault(name, []).append(value)

    median = statistics.median(knee["total"])
    baseline = statistics.median(spine)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    bundle = knee_runner.bundle_name
    print(
        f"knee analysis, {count} knee MR phantom studies (48 x 128 x 128 sagittal + 5 coronal) "
        f"after {args.warmup} warm-up, batch 1, cpu, torch threads {torch.get_num_threads()}, "
        f"bundle {bundle}:"
    )
    for name, values in {**knee, **{f"runner {k}": v for k, v in parts.items()}}.items():
        s = summary(values)
        print(f"  {name:<22} median {s['median']:.3f} s  (min {s['min']:.3f}, max {s['max']:.3f})")
    print(f"  spine baseline          median {baseline:.3f} s (read + predict of one study)")
    print(f"  peak RSS of this process (both runners loaded): {peak_mib:.0f} MiB")
    print(
        f"  knee / spine: {median / baseline:.2f}x; goal <= {GOAL_SECONDS:.0f} s per knee: "
        f"{'met' if median <= GOAL_SECONDS else 'NOT met'} ({median:.3f} s)"
    )
    result_data: dict[str, Any] = {
        "machine": machine(torch_info=True),
        "studies": count,
        "bundle": bundle,
        "knee": {k: summary(v) for k, v in knee.items()},
        "knee_runner_timings": {k: summary(v) for k, v in parts.items()},
        "spine_baseline": summary(spine),
        "ratio_knee_to_spine": median / baseline,
        "peak_rss_mib": peak_mib,
        "goal_seconds": GOAL_SECONDS,
        "goal_met": median <= GOAL_SECONDS,
    }
    print(f"wrote {write_result('knee', result_data)}")


if __name__ == "__main__":
    main()
