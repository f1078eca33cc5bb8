"""A bundle's memory figure: measured in a fresh interpreter, written into its manifest,
trusted by the worker's budget; estimated from the weights when it was never measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bundles import random_bundle
from mibi_node.analyses import get_analysis
from mibi_node.analyses.base import WEIGHTS_FACTOR
from mibi_node.analyses.bundles import (
    estimated_memory,
    manifest_memory,
    record_memory,
    weights_megabytes,
)
from mibi_node.analyses.memory import (
    MeasuredMemory,
    measure_memory,
    record_measured_memory,
    resident_megabytes,
)
from mibi_node.errors import BundleError
from mibi_node.inference.bundle import load_bundle
from mibi_node.phantom.generator import make_study


def _studies(folder: Path, count: int) -> list[list[Path]]:
    studies = []
    for index in range(count):
        study = make_study("adenoma", seed=7, index=index)
        files = []
        for number, ds in enumerate(study.datasets):
            path = folder / f"study-{index}" / f"{number}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            files.append(path)
        studies.append(files)
    return studies


def test_resident_memory_is_read_and_the_peak_is_not_below_it() -> None:
    now, peak = resident_megabytes()
    assert 10 < now <= peak


def test_an_unmeasured_bundle_is_estimated_from_its_weights(tmp_path: Path) -> None:
    bundle = random_bundle(tmp_path / "tiny")
    analysis = get_analysis("parathyroid")
    weights = weights_megabytes(bundle)
    needs = analysis.memory_needs(bundle, "cpu")
    assert needs.source == "estimated from the weight files"
    assert needs.cpu_mb == pytest.approx(
        WEIGHTS_FACTOR * weights + analysis.working_memory_mb, abs=0.1
    )
    assert needs.cpu_mb == estimated_memory(weights, analysis.working_memory_mb)["cpu_mb"]
    gpu = analysis.memory_needs(bundle, "cuda")
    assert gpu.gpu_mb == pytest.approx(weights + analysis.working_memory_mb, abs=0.1)


def test_a_recorded_figure_is_what_the_worker_trusts_and_the_bundle_still_loads(
    tmp_path: Path,
) -> None:
    bundle = random_bundle(tmp_path / "tiny")
    record_memory(bundle, {"cpu_mb": 321.0, "gpu_mb": 12.0, "measured_on": "a test"})
    needs = get_analysis("parathyroid").memory_needs(bundle, "cpu")
    assert (needs.cpu_mb, needs.gpu_mb, needs.source) == (321.0, 12.0, "measured, bundle manifest")
    assert load_bundle(bundle).manifest.memory is not None
    record_memory(bundle, {"cpu_mb": 300.0})
    assert manifest_memory(bundle).source == "bundle manifest, estimated"  # type: ignore[union-attr]
    with pytest.raises(BundleError, match="not valid"):
        record_memory(bundle, {"cpu_mb": -1.0})
    manifest = json.loads((bundle / "bundle.json").read_text())
    assert manifest["memory"] == {"cpu_mb": 300.0}


@pytest.mark.slow
def test_a_bundle_is_measured_in_a_fresh_interpreter_and_its_manifest_says_how(
    tmp_path: Path,
) -> None:
    bundle = random_bundle(tmp_path / "tiny")
    studies = _studies(tmp_path / "studies", 3)
    measured = measure_memory("parathyroid", bundle, studies, batch=2)
    # torch alone is some hundreds of MiB; the tiny bundle adds little, its batch a little more
    assert measured.baseline_mb > 200
    assert 0 < measured.loaded_mb <= measured.peak_mb < 1500
    assert (measured.batch, measured.batches, measured.device) == (2, 1, "cpu")  # 3rd left out
    entry = measured.manifest_entry(gpu_mb=5.0)
    assert entry["cpu_mb"] >= measured.peak_mb and entry["gpu_mb"] == 5.0
    assert "2 studies on cpu" in entry["measured_on"] and "torch" in entry["measured_on"]

    recorded = record_measured_memory("parathyroid", bundle, studies[:2], batch=2)
    assert isinstance(recorded, MeasuredMemory)
    needs = get_analysis("parathyroid").memory_needs(bundle, "cpu")
    assert needs.source == "measured, bundle manifest" and needs.cpu_mb >= recorded.peak_mb
    load_bundle(bundle)  # the manifest with its memory still validates


def test_a_failed_measurement_keeps_the_estimate(tmp_path: Path) -> None:
    bundle = random_bundle(tmp_path / "tiny")
    missing = [[tmp_path / "no-such-file.dcm"]]
    assert record_measured_memory("parathyroid", bundle, missing) is None
    assert manifest_memory(bundle) is None
    with pytest.raises(ValueError, match='"studies"'):
        measure_memory("parathyroid", bundle, [])
