"""The spine analysis on CPU: one lumbar MR study, from its stored files to eleven classed
points, against the goal (issue 16: <= 2 s per study) and against the thyroid analysis as a
baseline measured in the same run.

* Spine: ``read_spine_study`` (pick the T2 sagittal series of a full phantom study: T1 and
  T2 sagittal, T2 axial, 25 files) + ``SpineRunner.predict`` (keypoint net, decode, crops,
  ROI classifier), batch 1, device cpu, torch threads as the worker would have them.
* Baseline: the thyroid analysis' ``read_thyroid_study`` + ``ThyroidRunner.predict`` of
  one thyroid phantom scan (the analysis the node already ran at this speed).

The bundles are the demo recipes with random weights (the compute of trained weights), or
the trained demo bundle in var/bundles/spine-demo when it is there. Rounds are interleaved
(spine i, thyroid i, ...) after a warm-up; medians and min-max are reported, with the
ratio spine / thyroid and the spine's split into reading, keypoints and classification.

Usage: python benchmarks/bench_spine.py [--studies 20] [--quick]
"""

from __future__ import annotations

import argparse
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

RECIPE = ROOT / "config" / "spine-demo.toml"
TRAINED = ROOT / "var" / "bundles" / "spine-demo"
GOAL_SECONDS = 2.0


def _spine_bundle(out: Path) -> Path:
    """The trained demo bundle, else the demo recipe's networks with random weights."""
    if (TRAINED / "bundle.json").is_file():
        return TRAINED
    import torch

    from mibi_node.analyses.spine.bundle import write_spine_bundle
    from mibi_node.analyses.spine.model import create_keypoint_model, create_roi_classifier
    from training.spine import load_spine_recipe

    recipe = load_spine_recipe(RECIPE)
    torch.manual_seed(0)
    keypoints = create_keypoint_model(
        recipe.keypoints.arch,
        in_chans=recipe.input.channels,
        decoder_channels=recipe.keypoints.decoder_channels,
        stride=recipe.keypoints.stride,
    )
    classifier = create_roi_classifier(
        recipe.classifier.arch,
        in_chans=recipe.input.channels,
        size=recipe.crop.size,
        heads=recipe.classifier.heads,
        embed_dim=recipe.classifier.embed_dim,
    )
    manifest = {
        "name": f"{recipe.name}-random",
        "version": recipe.version,
        "intended_use": "demonstration",
        "input": recipe.input.model_dump(),
        "normalisation": recipe.normalisation.model_dump(),
        "keypoints": {"sigma": recipe.keypoints.sigma},
        "crop": recipe.crop.model_dump(),
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "bench",
            "training_command": "benchmarks/bench_spine.py (random weights)",
        },
    }
    write_spine_bundle(out, manifest, keypoints, classifier, overwrite=True)
    return out


def _thyroid_bundle(out: Path) -> Path:
    from bench_e2e import _thyroid_bundle as thyroid_bundle

    return thyroid_bundle(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="8 studies")
    args = parser.parse_args()
    count = 8 if args.quick else args.studies

    import torch

    from mibi_node.analyses.spine.phantom import make_spine_study
    from mibi_node.analyses.spine.reader import read_spine_study
    from mibi_node.analyses.spine.runner import SpineRunner
    from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
    from mibi_node.analyses.thyroid.reader import read_thyroid_study
    from mibi_node.analyses.thyroid.runner import ThyroidRunner

    with tempfile.TemporaryDirectory(prefix="bench-spine-") as tmp:
        work = Path(tmp)
        spine_runner = SpineRunner(_spine_bundle(work / "spine"), device="cpu")
        thyroid_runner = ThyroidRunner(_thyroid_bundle(work / "thyroid"), device="cpu")
        total = count + args.warmup
        spine_studies = []
        for index in range(total):
            study = make_spine_study(work / "spine-studies" / f"{index:03d}", 5, index=index)
            spine_studies.append([p for paths in study.paths.values() for p in paths])
        rows = generate_thyroid_studies(work / "thyroid-studies", total, 5)
        thyroid_studies = [sorted((work / "thyroid-studies" / r["folder"]).glob("*.dcm"))
                           for r in rows]  # fmt: skip

        spine: dict[str, list[float]] = {"read": [], "predict": [], "total": []}
        parts: dict[str, list[float]] = {}
        thyroid: list[float] = []
        for index in range(total):
            started = time.perf_counter()
            study_input = read_spine_study(spine_studies[index])
            read = time.perf_counter() - started
            (result,) = spine_runner.predict([study_input])
            spent = time.perf_counter() - started
            assert len(result.points) == 11, "the spine runner lost a level"
            started = time.perf_counter()
            thyroid_runner.predict([read_thyroid_study(thyroid_studies[index])])
            thyroid_seconds = time.perf_counter() - started
            if index < args.warmup:
                continue
            spine["read"].append(read)
            spine["predict"].append(spent - read)
            spine["total"].append(spent)
            thyroid.append(thyroid_seconds)
            for name, value in result.timings.items():
                parts.setdefault(name, []).append(value)

    median = statistics.median(spine["total"])
    baseline = statistics.median(thyroid)
    bundle = spine_runner.bundle_name
    print(
        f"spine analysis, {count} full lumbar MR phantom studies (25 files each) after "
        f"{args.warmup} warm-up, batch 1, cpu, torch threads {torch.get_num_threads()}, "
        f"bundle {bundle}:"
    )
    for name, values in {**spine, **{f"runner {k}": v for k, v in parts.items()}}.items():
        s = summary(values)
        print(f"  {name:<22} median {s['median']:.3f} s  (min {s['min']:.3f}, max {s['max']:.3f})")
    print(f"  thyroid baseline        median {baseline:.3f} s (read + predict of one scan)")
    print(
        f"  spine / thyroid: {median / baseline:.2f}x; goal <= {GOAL_SECONDS:.1f} s per study: "
        f"{'met' if median <= GOAL_SECONDS else 'NOT met'} ({median:.3f} s)"
    )
    result_data: dict[str, Any] = {
        "machine": machine(torch_info=True),
        "studies": count,
        "bundle": bundle,
        "spine": {k: summary(v) for k, v in spine.items()},
        "spine_runner_timings": {k: summary(v) for k, v in parts.items()},
        "thyroid_baseline": summary(thyroid),
        "ratio_spine_to_thyroid": median / baseline,
        "goal_seconds": GOAL_SECONDS,
        "goal_met": median <= GOAL_SECONDS,
    }
    print(f"wrote {write_result('spine', result_data)}")


if __name__ == "__main__":
    main()
