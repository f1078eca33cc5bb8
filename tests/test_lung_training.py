"""The lung bundle, runner, training and evaluation, on tiny phantoms and a small detector."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mibi_node.analyses.lung.bundle import (
    LungBundle,
    load_lung_bundle,
    lung_memory_needs,
    record_lung_evaluation,
    write_lung_bundle,
)
from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.model import create_lung_detector
from mibi_node.analyses.lung.phantom import make_lung_case
from mibi_node.analyses.lung.result import LungInput, LungResult
from mibi_node.analyses.lung.runner import LungRunner, WorkingGrid, lesion_to_source
from mibi_node.errors import BundleError, UnusableStudyError
from mibi_node.imaging.volume import Volume

ARCH = "maskrcnn_resnet18_fpn_s"
#: Tiny phantom cases: 24 axial slices of 96 x 96 px, 3 x 2 x 2 mm (the working grid).
TINY_SHAPE = (24, 96, 96)
TINY_SPACING = (3.0, 2.0, 2.0)
#: Few proposals and detections: the randomly initialised heads find something everywhere.
OPTIONS: dict[str, Any] = {"rpn_post_nms_top_n_test": 20, "box_detections_per_img": 3}

RECIPE = """
name = "lung-tiny"
version = "0.0.1"
[preprocessing]
slice_spacing_mm = 3.0
pixel_spacing_mm = 2.0
[detector]
arch = "maskrcnn_resnet18_fpn_s"
batch = 12
[detector.options]
rpn_post_nms_top_n_test = 20
box_detections_per_img = 3
[split]
train = 0.34
validation = 0.33
test = 0.33
[training]
steps = 2
batch_size = 2
roi_batch = 16
precision = "fp32"
"""


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _manifest(**detector: Any) -> dict[str, Any]:
    return {
        "name": "lung-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "preprocessing": {"slice_spacing_mm": 3.0, "pixel_spacing_mm": 2.0},
        "detector": {"arch": ARCH, "options": OPTIONS, "batch": 12, **detector},
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "test",
        },
    }


def _volume(image: np.ndarray, spacing: tuple[float, float, float], modality: str = "CT") -> Volume:
    return Volume(
        study_instance_uid="1.2.826.0.1.3680043.8.498.11",
        series_instance_uid="1.2.826.0.1.3680043.8.498.12",
        frame_of_reference_uid="1.2.826.0.1.3680043.8.498.13",
        image=image.astype(np.float32),
        spacing=spacing,
        origin=(0.0, 0.0, 0.0),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, 1.0, 0.0),
        slices=(),
        modality=modality,
    )


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("lung-bundle")
    write_lung_bundle(out, _manifest(), create_lung_detector(ARCH, **OPTIONS).eval())
    return out


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mibi_node.analyses.lung.phantom import write_lung_dataset

    out = tmp_path_factory.mktemp("lung-cases")
    write_lung_dataset(out, 3, 12, shape=TINY_SHAPE, spacing=TINY_SPACING, lesions=2)
    return out


def test_bundle_round_trip_and_altered_weights(random_bundle: Path, tmp_path: Path) -> None:
    bundle = load_lung_bundle(random_bundle)
    assert isinstance(bundle, LungBundle) and bundle.name == "lung-random"
    assert bundle.spacing == (3.0, 2.0, 2.0) and bundle.intended_use == "demonstration"
    manifest = json.loads((random_bundle / "bundle.json").read_text())
    assert manifest["analysis"] == "lung" and len(manifest["detector"]["sha256"]) == 64
    assert manifest["linking"]["max_gap"] == 1  # link_detections' defaults
    detector = bundle.build_detector()
    again = LungBundle.load(random_bundle).build_detector()
    for (name, a), b in zip(
        detector.state_dict().items(), again.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    cpu_mb, _ = lung_memory_needs(random_bundle)
    assert cpu_mb > 100

    record_lung_evaluation(random_bundle, {"cpm": 0.5}, split="validation")
    assert load_lung_bundle(random_bundle).manifest.evaluation["0.0.1"]["validation"]["cpm"] == 0.5

    with pytest.raises(BundleError, match="already exists"):
        write_lung_bundle(random_bundle, _manifest(), detector)
    with pytest.raises(BundleError, match="detector"):
        write_lung_bundle(tmp_path / "even", _manifest(channels=4), detector)
    assert not (tmp_path / "even" / "bundle.json").exists()

    altered = tmp_path / "altered"
    altered.mkdir()
    for path in random_bundle.iterdir():
        (altered / path.name).write_bytes(path.read_bytes())
    weights = altered / "detector.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        load_lung_bundle(altered)
    load_lung_bundle(altered, verify=False)  # the hash alone is not checked
    weights.unlink()
    with pytest.raises(BundleError, match="missing"):
        load_lung_bundle(altered)


def test_a_lesion_maps_back_to_the_source_grid() -> None:
    mask = np.zeros((4, 6, 6), dtype=bool)
    mask[1:3, 2:5, 1:4] = True
    lesion = Lesion3D(1, 0.9, (2, 10, 20), mask, (0.9, 0.8))
    same = WorkingGrid.create((16, 48, 48), (2.5, 1.5, 1.5), (2.5, 1.5, 1.5))
    assert same.identity and lesion_to_source(lesion, same) is lesion
    # a 1.25 x 0.75 x 0.75 mm source: twice as many voxels along every axis
    fine = WorkingGrid.create((32, 96, 96), (1.25, 0.75, 0.75), (2.5, 1.5, 1.5))
    assert fine.shape == (16, 48, 48)
    mapped = lesion_to_source(lesion, fine)
    assert mapped.label == 1 and mapped.score == 0.9 and mapped.slice_scores == (0.9, 0.8)
    # linear > 0.5: every voxel but the 8 outer corners (0.75 ** 3 of a voxel inside)
    assert mapped.voxels == 8 * lesion.voxels - 8
    assert mapped.bbox == (6, 24, 42, 10, 30, 48)
    # a single voxel on a coarser source still keeps one voxel
    dot = Lesion3D(2, 0.5, (5, 5, 5), np.ones((1, 1, 1), dtype=bool))
    coarse = WorkingGrid.create((8, 16, 16), (5.0, 3.0, 3.0), (2.5, 1.5, 1.5))
    assert lesion_to_source(dot, coarse).voxels >= 1


def _check_result(result: LungResult, volume: Volume) -> None:
    assert isinstance(result, LungResult)
    assert result.lesions_map.shape == volume.shape and result.lesions_map.dtype == np.uint16
    numbers = sorted(set(np.unique(result.lesions_map).tolist()) - {0})
    assert numbers == [lesion.number for lesion in result.lesions]
    for lesion in result.lesions:
        assert lesion.voxels == np.count_nonzero(result.lesions_map == lesion.number)
    assert {"read", "resample", "detect", "link", "measure", "total"} <= set(result.timings)
    assert result.bundle_name == "lung-random" and result.intended_use == "demonstration"
    json.dumps(result.to_dict())


def test_runner_on_a_phantom_and_on_another_grid(random_bundle: Path) -> None:
    runner = LungRunner(random_bundle)
    assert runner.memory is None
    case = make_lung_case(21, shape=TINY_SHAPE, spacing=TINY_SPACING, lesions=1)
    volume = _volume(case.image, TINY_SPACING)
    (result,) = runner.predict([LungInput(volume, warnings=("tolerated",))])
    _check_result(result, volume)
    assert result.timings["resample"] < 1.0 and result.warnings == ("tolerated",)
    # the same chest on 1.5 mm slices of 1.6 mm pixels: lesions come back on that grid
    fine_shape = (48, 120, 120)
    index = [np.minimum((np.arange(n) * 0.5 if a == 0 else np.arange(n) * 0.8).astype(int), s - 1)
             for a, (n, s) in enumerate(zip(fine_shape, TINY_SHAPE, strict=True))]  # fmt: skip
    fine = _volume(case.image[np.ix_(*index)], (1.5, 1.6, 1.6))
    (other,) = runner.predict([LungInput(fine)])
    _check_result(other, fine)
    assert other.volume is fine


def test_the_runner_refuses_unusable_studies(random_bundle: Path) -> None:
    runner = LungRunner(random_bundle)
    image = make_lung_case(22, shape=TINY_SHAPE, spacing=TINY_SPACING, lesions=0).image
    for volume, words in (
        (_volume(image, TINY_SPACING, modality="MR"), "reads CT"),
        (_volume(image[:4], TINY_SPACING), "too small"),
        (_volume(image[:, :48, :48], (3.0, 1.0, 1.0)), "too little of the chest"),
        (_volume(np.where(image > 0, np.nan, image), TINY_SPACING), "NaN"),
        (_volume(image + 1024.0, TINY_SPACING), "not in HU"),
    ):
        with pytest.raises(UnusableStudyError, match=words):
            runner.predict([LungInput(volume)])
    volume = _volume(image, TINY_SPACING)
    before = volume.image.copy()
    runner.predict([LungInput(volume)])
    assert np.array_equal(volume.image, before)
    assert replace(LungInput(volume), reason="x").volume is volume


def test_tiny_training_end_to_end(
    cases: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mibi_node.analyses.lung.reader import read_lung_study
    from training.lung import main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "bundle"
    assert main(["train", str(recipe), str(cases), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 2/2" in printed and "linking fit on the validation cases" in printed
    bundle = load_lung_bundle(out)
    split = bundle.manifest.split
    assert sorted(split["train"] + split["validation"] + split["test"]) == [
        f"case-{n:04d}" for n in range(1, 4)
    ]
    assert bundle.manifest.training["steps"] == 2 and bundle.manifest.training["seconds"] > 0
    assert "validation" in bundle.manifest.evaluation["0.0.1"]
    assert (out / "history.csv").read_text().startswith("step,")

    study = read_lung_study(sorted((cases / "case-0001" / "dicom").glob("*.dcm")))
    (result,) = LungRunner(out).predict([study])
    assert result.lesions_map.shape == study.volume.shape == TINY_SHAPE

    figures = tmp_path / "figures.json"
    assert main(["evaluate", str(out), str(cases), "--bootstrap", "0", "--json", str(figures),
                 "--record"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "Lung lesions: 3 scans" in printed and "all (class-aware)" in printed
    assert "s per scan" in printed and "goal all (class-aware): cpm" in printed
    report = json.loads(figures.read_text())
    assert report["cases"] == 3 and report["n_truth"] == 6
    assert "test" in load_lung_bundle(out).manifest.evaluation["0.0.1"]

    # bad input: exit status 2 and one sentence naming the key or the folder
    recipe.write_text(RECIPE.replace("[training]", "[training]\nstepz = 3"))
    assert main(["train", str(recipe), str(cases), "--out", str(tmp_path / "x")]) == 2
    assert "training.stepz" in capsys.readouterr().err
    recipe.write_text(RECIPE.replace('arch = "maskrcnn_resnet18_fpn_s"', 'arch = "yolo"'))
    assert main(["train", str(recipe), str(cases), "--out", str(tmp_path / "y")]) == 2
    assert "detector" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe.write_text(RECIPE)
    assert main(["train", str(recipe), str(empty), "--out", str(tmp_path / "z")]) == 2
    assert "no case-* folder" in capsys.readouterr().err


def test_training_crops_hold_a_lesion_and_keep_its_target() -> None:
    from training.lung_data import LungTrainingCase, prepare_case, training_sample

    phantom = make_lung_case(
        5, shape=TINY_SHAPE, spacing=TINY_SPACING, lesions=["ground_glass_opacity"]
    )
    volume = _volume(phantom.image, TINY_SPACING)
    training_case = LungTrainingCase("case-0001", LungInput(volume), phantom.labels,
                                     phantom.instances)  # fmt: skip
    prepared = prepare_case(training_case, TINY_SPACING)
    assert len(prepared.positive)
    k = int(prepared.positive[len(prepared.positive) // 2])
    rng = np.random.default_rng(0)
    for _ in range(5):
        x, target = training_sample(prepared, k, 3, rng, flip=0.5, crop=48)
        assert x.shape == (3, 48, 48)
        assert target["masks"].shape[1:] == (48, 48) and len(target["labels"]) >= 1
        assert int(target["masks"].sum()) == int((prepared.instances[k] > 0).sum())
    empty = int(np.setdiff1d(np.arange(TINY_SHAPE[0]), prepared.positive)[0])
    x, target = training_sample(prepared, empty, 3, rng, crop=32)
    assert x.shape == (3, 32, 32) and len(target["labels"]) == 0
    with pytest.raises(ValueError, match="crop"):
        training_sample(prepared, k, 3, rng, crop=97)


def test_the_recipe_refuses_a_crop_below_the_pyramid_s_stride(tmp_path: Path) -> None:
    from mibi_node.errors import ConfigError
    from training.lung_recipe import load_lung_recipe

    recipe = tmp_path / "crop.toml"
    recipe.write_text(RECIPE.replace("[training]", "[training]\ncrop = 16"))
    with pytest.raises(ConfigError, match="crop"):
        load_lung_recipe(recipe)
    recipe.write_text(RECIPE.replace("[training]", "[training]\ncrop = 48"))
    assert load_lung_recipe(recipe).training.crop == 48


def test_lesion_sampling_draws_every_lesion_alike() -> None:
    from training.lung_data import PreparedCase, draw_slices, lesion_slices

    instances = np.zeros((12, 16, 16), np.uint16)
    instances[0:10, 2:8, 2:8] = 1  # ten slices deep
    instances[11, 10:13, 10:13] = 2  # one slice
    labels = (instances > 0).astype(np.uint8)
    positive = np.array([k for k in range(12) if instances[k].any()])
    prepared = PreparedCase("case-0001", np.zeros(instances.shape, np.float32), labels,
                            instances, positive)  # fmt: skip
    found = lesion_slices([prepared])
    assert [(n, ks.tolist()) for n, ks in found] == [(0, list(range(10))), (0, [11])]
    rng = np.random.default_rng(0)
    by_lesion = draw_slices([prepared], 400, 1.0, rng, lesions=found)
    by_slice = draw_slices([prepared], 400, 1.0, rng)
    assert 150 < sum(k == 11 for _, k in by_lesion) < 250
    assert sum(k == 11 for _, k in by_slice) < 80


def _scan(name: str, truth: list[Lesion3D], predictions: list[Lesion3D]) -> Any:
    from training.lung_metric import ScanLesions

    return ScanLesions(name, tuple(truth), tuple(predictions))


def _cube(label: int, score: float, at: int) -> Lesion3D:
    mask = np.zeros((4, 16, 16), bool)
    mask[1:3, at : at + 3, at : at + 3] = True
    return Lesion3D.from_mask(label, score, mask)


def test_the_operating_point_keeps_false_positives_per_scan_within_the_wanted() -> None:
    from training.lung_evaluate import Outcomes

    truth_a, truth_b = _cube(1, 1.0, 2), _cube(2, 1.0, 10)
    scans = [
        # a hit at 0.9, false positives at 0.8 and 0.3, the wrong class at 0.6 (false)
        _scan("a", [truth_a], [_cube(1, 0.9, 2), _cube(1, 0.8, 10), _cube(1, 0.3, 6)]),
        _scan("b", [truth_b], [_cube(1, 0.6, 10), _cube(2, 0.5, 10), _cube(2, 0.2, 2)]),
    ]
    # false positives by score: 0.8, 0.6, 0.3, 0.2; true positives 0.9 and 0.5
    outcomes = Outcomes.of(scans)
    assert outcomes.at(0.0) == (1.0, 2.0)
    assert outcomes.at(0.55) == (0.5, 1.0)
    assert outcomes.threshold_for(1.0) == pytest.approx(0.5)  # 2 false in 2 scans: 0.8, 0.6
    assert outcomes.threshold_for(0.5) == pytest.approx(0.8)  # one false: 0.8 itself
    assert outcomes.threshold_for(0.25) == pytest.approx(0.9)  # none: above 0.8
    assert outcomes.threshold_for(10.0) == pytest.approx(0.2)  # every candidate
    assert Outcomes.of([_scan("c", [], [])]).threshold_for(1.0) == 1.0


def test_the_runner_reports_only_lesions_at_or_above_the_bundle_threshold(
    tmp_path: Path,
) -> None:
    from mibi_node.analyses.bundles import write_manifest

    bundle_dir = tmp_path / "bundle"
    write_lung_bundle(bundle_dir, _manifest(), create_lung_detector(ARCH, **OPTIONS))
    case = make_lung_case(3, shape=TINY_SHAPE, spacing=TINY_SPACING)
    study = LungInput(volume=_volume(case.image, case.spacing))
    runner = LungRunner(bundle_dir)
    (every,) = runner.predict([study], every_lesion=True)
    assert every.lesions, "random heads find candidates everywhere"
    scores = sorted(lesion.probability for lesion in every.lesions)
    threshold = scores[len(scores) // 2]
    manifest = load_lung_bundle(bundle_dir).manifest
    raised = manifest.model_copy(
        update={"report": manifest.report.model_copy(update={"min_probability": threshold})}
    )
    write_manifest(bundle_dir, raised)
    (reported,) = LungRunner(bundle_dir).predict([study])
    assert reported.lesions and all(f.probability >= threshold for f in reported.lesions)
    assert len(reported.lesions) == sum(s >= threshold for s in scores)
    assert any("below the bundle's reporting threshold" in w for w in reported.warnings)
    (again,) = LungRunner(bundle_dir).predict([study], every_lesion=True)
    assert len(again.lesions) == len(every.lesions)
