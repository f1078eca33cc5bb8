"""The spine model, bundle, runner and training, on tiny networks and a few phantom studies."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mibi_node.analyses.spine.bundle import (
    SpineBundle,
    load_spine_bundle,
    record_spine_evaluation,
    spine_memory_needs,
    write_spine_bundle,
)
from mibi_node.analyses.spine.levels import CLASSES, LEVELS
from mibi_node.analyses.spine.model import (
    CLASS_LOGITS,
    class_probabilities,
    create_keypoint_model,
    create_roi_classifier,
    crop_boxes,
    decode_keypoints,
    extract_rois,
    keypoint_loss,
    keypoint_targets,
    kind_cross_entropy,
    kind_targets,
    list_keypoint_encoders,
)
from mibi_node.analyses.spine.runner import SpineRunner, select_channels
from mibi_node.errors import BundleError, ConfigError, UnusableStudyError
from mibi_node.inference.members import is_member

torch.set_num_threads(1)

RECIPE = """
name = "spine-tiny"
version = "0.0.1"
[input]
size = 64
[keypoints]
decoder_channels = 16
epochs = 1
batch_size = 4
[classifier]
heads = 2
embed_dim = 16
epochs = 1
batch_size = 16
[crop]
size = 32
"""


def _manifest() -> dict:
    return {
        "name": "spine-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "input": {"size": 64, "channels": 3},
        "crop": {"scale": 2.0, "size": 32},
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "test",
        },
    }


def _networks() -> tuple:
    torch.manual_seed(0)
    return (
        create_keypoint_model(decoder_channels=16),
        create_roi_classifier(size=32, heads=2, embed_dim=16),
    )


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mibi_node.analyses.spine.phantom import write_spine_dataset

    out = tmp_path_factory.mktemp("spine-studies")
    write_spine_dataset(out, 5, 11, series=("t2_sagittal",), sagittal_slices=3)
    return out


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("spine-bundle")
    write_spine_bundle(out, _manifest(), *_networks(), overwrite=True)
    return out


def test_networks_shapes_and_registries() -> None:
    assert is_member("spine_resnet10t_s")
    assert "spine_resnet10t_s" in list_keypoint_encoders()
    x = torch.randn(2, 3, 64, 64)
    for stride in (4, 2):
        model = create_keypoint_model(decoder_channels=8, stride=stride)
        heatmaps, offsets = model(x)
        assert heatmaps.shape == (2, len(LEVELS), 64 // stride, 64 // stride)
        assert offsets.shape == (2, 2, 64 // stride, 64 // stride)
    with pytest.raises(ValueError, match="no_such_net"):
        create_keypoint_model("no_such_net")
    classifier = create_roi_classifier(size=32, heads=2, embed_dim=16)
    assert classifier(torch.randn(5, 3, 32, 32)).shape == (5, 7)


def test_decode_recovers_a_subpixel_peak_and_the_loss_falls_there() -> None:
    truth = torch.tensor([[[4.0 + 5.3 * i, 20.0 + 1.7 * i] for i in range(len(LEVELS))]])
    valid = torch.ones(1, len(LEVELS), dtype=torch.bool)
    heatmaps, cells, offsets = keypoint_targets(truth, valid, (16, 16), 4, 1.5)
    assert float(heatmaps.amax(dim=(-2, -1)).min()) == pytest.approx(1.0)
    offset_map = torch.zeros(1, 2, 16, 16)
    for level in range(len(LEVELS)):
        offset_map[0, :, cells[0, level, 0], cells[0, level, 1]] = offsets[0, level]
    logits = torch.logit(heatmaps.clamp(1e-4, 1 - 1e-4))
    decoded = decode_keypoints(logits, offset_map, 4)
    assert torch.allclose(decoded[0, :, :2], truth[0], atol=1e-4)
    assert (decoded[0, :, 2] > 0.99).all()
    good = keypoint_loss(logits * 3, offset_map, heatmaps, cells, offsets, valid)
    bad = keypoint_loss(torch.zeros_like(logits), offset_map * 0, heatmaps, cells, offsets, valid)
    assert float(good[0]) < float(bad[0]) and float(good[1]) < 1e-6 < float(bad[1])


def test_crop_sizes_follow_the_neighbours() -> None:
    points = np.array([[10.0 * i, 5.0] for i in range(len(LEVELS))])
    sides, angles = crop_boxes(points, 1.5)
    assert sides == pytest.approx(np.full(len(LEVELS), 30.0))  # ends: twice one neighbour
    assert angles == pytest.approx(np.zeros(len(LEVELS)))
    tilted = np.array([[10.0 * i, 10.0 * i] for i in range(len(LEVELS))])
    sides, angles = crop_boxes(tilted, 1.0)
    assert sides[3] == pytest.approx(20 * math.sqrt(2)) and angles[3] == pytest.approx(math.pi / 4)

    image = torch.zeros(1, 100, 100)
    image[0, 40:60, 45:55] = 1.0  # 20 rows x 10 columns
    rois = extract_rois(
        image, torch.tensor([[49.5, 49.5]] * 2), torch.tensor([40.0, 40.0]),
        torch.tensor([0.0, math.pi / 2]), 40,
    )  # fmt: skip
    upright, turned = rois[:, 0] > 0.5
    assert upright.any(1).sum() == 20 and upright.any(0).sum() == 10
    assert turned.any(1).sum() == 10 and turned.any(0).sum() == 20


def test_probabilities_per_kind_and_masked_loss() -> None:
    logits = torch.randn(len(LEVELS), 7)
    for level, probs in zip(LEVELS, class_probabilities(logits, list(LEVELS)), strict=True):
        kind = "disc" if "-" in level else "vertebra"
        assert list(probs) == list(CLASSES[kind]) and sum(probs.values()) == pytest.approx(1.0)
    targets = kind_targets(["L1", "L1-L2"], ["degenerated", "schmorl_node"])
    assert targets.tolist() == [1, CLASS_LOGITS["disc"].start + 4]
    assert math.isfinite(float(kind_cross_entropy(torch.randn(2, 7), targets)))
    assert select_channels(np.arange(5)[:, None, None], 3)[:, 0, 0].tolist() == [1, 2, 3]
    assert select_channels(np.arange(1)[:, None, None], 3)[:, 0, 0].tolist() == [0, 0, 0]


def test_bundle_round_trip_and_hash_mismatch(random_bundle: Path, tmp_path: Path) -> None:
    bundle = SpineBundle.load(random_bundle)
    assert (bundle.name, bundle.input_size) == ("spine-random", 64)
    assert bundle.manifest.analysis == "spine"
    assert spine_memory_needs(random_bundle)[0] > 0
    keypoints, classifier = _networks()
    loaded = bundle.build_keypoint_model()
    assert all(torch.equal(v, keypoints.state_dict()[k]) for k, v in loaded.state_dict().items())
    assert bundle.build_classifier().config.input_size == 32

    altered = tmp_path / "altered"
    write_spine_bundle(altered, _manifest(), keypoints, classifier)
    weights = altered / "classifier.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="classifier.safetensors: sha256"):
        load_spine_bundle(altered)
    with pytest.raises(BundleError, match="crop.size"):
        write_spine_bundle(tmp_path / "bad", _manifest() | {"crop": {"size": 48}}, *_networks())
    data = json.loads((random_bundle / "bundle.json").read_text())
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "bundle.json").write_text(json.dumps(data | {"colour": "red"}))
    with pytest.raises(BundleError, match="colour"):
        load_spine_bundle(tmp_path / "extra")
    recorded = record_spine_evaluation(altered, {"map": 0.5}, split="test")
    assert recorded.manifest.evaluation["0.0.1"]["test"] == {"map": 0.5}


def test_runner_gives_eleven_points_with_probabilities(random_bundle: Path, studies: Path) -> None:
    from mibi_node.analyses.spine.reader import read_spine_study

    runner = SpineRunner(random_bundle)
    assert (runner.bundle_name, runner.bundle_version, runner.device) == (
        "spine-random", "0.0.1", "cpu",
    )  # fmt: skip
    inputs = [read_spine_study(sorted((studies / f"study-{i:04d}").iterdir())) for i in (1, 2)]
    results = runner.predict(inputs)
    for study, result in zip(inputs, results, strict=True):
        assert result.study_instance_uid == study.study_instance_uid
        assert [p.level for p in result.points] == list(LEVELS)
        rows, cols = study.image.shape[1:]
        for point in result.points:
            assert sum(point.probabilities.values()) == pytest.approx(1.0)
            assert 0 <= point.row <= rows - 1 and 0 <= point.col <= cols - 1
            assert 0.0 <= point.score <= 1.0
        assert result.timings["total"] >= result.timings["keypoints"] > 0
        json.dumps(result.to_dict())
    blank = replace(inputs[0], image=np.zeros_like(inputs[0].image))
    with pytest.raises(UnusableStudyError, match="blank"):
        runner.predict([blank])


def test_tiny_training_end_to_end(
    studies: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from training.spine import evaluate_spine, load_spine_recipe, main

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    out = tmp_path / "bundle"
    assert main(["train", str(recipe), str(studies), "--out", str(out)]) == 0
    bundle = load_spine_bundle(out)
    assert bundle.manifest.crop.size == 32 and (out / "history.csv").is_file()
    assert "keypoints epoch 1/1" in capsys.readouterr().out
    evaluation, report = evaluate_spine(out, studies, bootstrap=0)
    assert evaluation.n_studies == 5 and report["n_studies"] == 5
    assert 0.0 <= report["summary"]["within_6mm"] <= 1.0
    figures = tmp_path / "figures.json"
    assert main(["evaluate", str(out), str(studies), "--bootstrap", "0", "--json",
                 str(figures), "--record"]) == 0  # fmt: skip
    assert "mAP" in capsys.readouterr().out and json.loads(figures.read_text())["n_studies"] == 5
    assert "test" in load_spine_bundle(out).manifest.evaluation["0.0.1"]

    # bad data: clear messages, exit status 2, no traceback
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["train", str(recipe), str(empty), "--out", str(tmp_path / "x")]) == 2
    assert "has no annotations.json" in capsys.readouterr().err
    recipe.write_text(RECIPE.replace("[keypoints]", '[keypoints]\narch = "no_such_net"'))
    with pytest.raises(ConfigError, match="keypoints.arch"):
        load_spine_recipe(recipe)
    broken = tmp_path / "broken"
    broken.mkdir()
    annotations = json.loads((studies / "annotations.json").read_text())
    annotations[0]["data"][0]["instanceUid"] = "1.2.3.4"
    (broken / "annotations.json").write_text(json.dumps(annotations[:2]))
    for name in ("study-0001", "study-0002"):
        shutil.copytree(studies / name, broken / name)
    from training.spine_data import load_spine_studies

    warnings: list[str] = []
    loaded = load_spine_studies(broken, warn=warnings.append)
    assert len(loaded) == 1 and "instance 1.2.3.4" in warnings[0]
