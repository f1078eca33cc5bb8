"""The thyroid model, bundle, runner and training, on tiny members and a few phantom studies."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mibi_node.analyses.thyroid.bundle import (
    load_thyroid_bundle,
    thyroid_memory_needs,
    write_thyroid_bundle,
)
from mibi_node.analyses.thyroid.model import CrossFeatureResNet
from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.result import FINDINGS
from mibi_node.analyses.thyroid.runner import ThyroidRunner, crop_field, decide_findings
from mibi_node.errors import BundleError, ConfigError
from mibi_node.inference.members import create_member, is_member

torch.set_num_threads(1)

RECIPE = """
name = "thyroid-tiny"
version = "0.0.1"
[input]
size = 32
field_mm = 100
[denoise]
smax = 3
[[members]]
name = "cross"
arch = "crossfeature_resnet_s"
heads = 2
embed_dim = 16
[[members]]
name = "plain"
arch = "resnet10t"
heads = 2
embed_dim = 16
[training]
single_epochs = 1
cross_epochs = 1
batch_size = 4
validation_fraction = 0.25
"""


def _manifest() -> dict:
    return {
        "name": "thyroid-random",
        "version": "0.0.1",
        "intended_use": "demonstration",
        "input": {"size": 32},
        "denoise": {"enabled": True, "smax": 3},
        "members": [{"name": "cross"}, {"name": "plain"}],
        "fusion_weights": [0.5, 0.5],
        "thresholds": dict.fromkeys(FINDINGS, 0.5),
        "provenance": {
            "created": "2026-01-01T00:00:00+00:00",
            "package_version": "test",
            "training_command": "test",
        },
    }


def _members() -> dict:
    torch.manual_seed(0)
    return {
        "cross": create_member(
            "crossfeature_resnet_s", num_classes=6, in_chans=1, heads=2, embed_dim=16, input_size=32
        ),
        "plain": create_member(
            "resnet10t", num_classes=6, in_chans=1, heads=2, embed_dim=16, input_size=32
        ),
    }


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thyroid-studies")
    generate_thyroid_studies(out, 12, 5, mixed_fraction=0.34, matrix=64)
    return out


@pytest.fixture(scope="module")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thyroid-bundle")
    write_thyroid_bundle(out, _manifest(), _members(), overwrite=True)
    return out


def test_cross_feature_resnet_shapes_and_registry() -> None:
    assert is_member("crossfeature_resnet") and is_member("crossfeature_resnet_s")
    net = CrossFeatureResNet(in_chans=1, num_classes=6, widths=(8, 16, 32), depths=(1, 2, 1))
    x = torch.randn(3, 1, 64, 64)
    assert net(x).shape == (3, 6)
    assert net.forward_features(x).shape == (3, 32, 8, 8)
    assert net.feature_info[-1]["reduction"] == 8
    member = create_member(
        "crossfeature_resnet", num_classes=6, in_chans=1, heads=2, embed_dim=16, input_size=64
    )
    assert member(x).shape == (3, 6)


def test_cross_feature_path_changes_the_output() -> None:
    torch.manual_seed(1)
    net = CrossFeatureResNet(in_chans=1, num_classes=6, widths=(8, 16), depths=(1, 1)).eval()
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        own = net.forward_features(x)
        other = net.forward_features(x, cross=torch.zeros_like(x))
        for block in net.blocks:
            torch.nn.init.zeros_(block.cross[1].weight)
            torch.nn.init.zeros_(block.cross[1].bias)
        without = net.forward_features(x)
    assert not torch.allclose(own, other)
    assert not torch.allclose(own, without)


def test_bundle_round_trip_and_hash_mismatch(random_bundle: Path, tmp_path: Path) -> None:
    bundle = load_thyroid_bundle(random_bundle)
    assert bundle.member_names == ("cross", "plain")
    assert [f.key for f in bundle.manifest.findings] == list(FINDINGS)
    assert bundle.manifest.analysis == "thyroid"
    cpu_mb, gpu_mb = thyroid_memory_needs(random_bundle)
    assert cpu_mb > 0 and gpu_mb >= 0
    member = bundle.build_member("cross")
    original = _members()["cross"].state_dict()
    assert all(torch.equal(v, original[k]) for k, v in member.state_dict().items())

    altered = tmp_path / "altered"
    write_thyroid_bundle(altered, _manifest(), _members())
    weights = altered / "plain.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(BundleError, match="plain.safetensors: sha256"):
        load_thyroid_bundle(altered)

    bad = _manifest() | {"fusion_weights": [0.7, 0.7]}
    with pytest.raises(BundleError, match="fusion_weights"):
        write_thyroid_bundle(tmp_path / "bad", bad, _members())
    data = json.loads((random_bundle / "bundle.json").read_text())
    (tmp_path / "extra").mkdir()
    (tmp_path / "extra" / "bundle.json").write_text(json.dumps(data | {"colour": "red"}))
    with pytest.raises(BundleError, match="colour"):
        load_thyroid_bundle(tmp_path / "extra")


def test_crop_field_keeps_the_gland() -> None:
    image = np.zeros((128, 128), dtype=np.float32)
    image[70:80, 30:50] = 100.0
    crop = crop_field(image, (2.0, 2.0), 60.0)
    assert crop.shape == (30, 30) and crop.sum() == image.sum()
    assert crop_field(image, None, 60.0) is image
    assert crop_field(image, (2.0, 2.0), 300.0) is image


def test_decide_findings_reports_normal_only_without_abnormal() -> None:
    thresholds = dict.fromkeys(FINDINGS, 0.5)
    probs = dict.fromkeys(FINDINGS, 0.1)
    assert decide_findings(probs, thresholds) == ("normal",)
    probs |= {"normal": 0.9, "cold_nodule": 0.6, "toxic_adenoma": 0.8}
    assert decide_findings(probs, thresholds) == ("toxic_adenoma", "cold_nodule")


def test_runner_predicts_on_phantom_studies(random_bundle: Path, studies: Path) -> None:
    runner = ThyroidRunner(random_bundle)
    assert (runner.bundle_name, runner.bundle_version, runner.device) == (
        "thyroid-random",
        "0.0.1",
        "cpu",
    )
    inputs = [read_thyroid_study([studies / f"study-{i:04d}"]) for i in (1, 2, 3)]
    results = runner.predict(inputs)
    assert len(results) == 3
    for study, result in zip(inputs, results, strict=True):
        assert result.study_instance_uid == study.study_instance_uid
        assert list(result.probabilities) == list(FINDINGS)
        assert all(0.0 <= p <= 1.0 for p in result.probabilities.values())
        assert result.findings and set(result.findings) <= set(FINDINGS)
        assert ("normal" not in result.findings) or result.findings == ("normal",)
        assert sum(result.lobe_uptake.values()) == pytest.approx(1.0)
        assert set(result.member_probabilities) == {"cross", "plain"}
        rows, cols = study.images["thyroid"].pixels.shape
        assert all(0 <= n.row < rows and 0 <= n.col < cols for n in result.nodules)
        assert result.timings["total"] > 0
        json.dumps(result.to_dict())


def test_one_epoch_training_gives_a_loadable_bundle(studies: Path, tmp_path: Path) -> None:
    from training.thyroid import evaluate_thyroid, format_thyroid_table, train_thyroid

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    out = train_thyroid(recipe, studies, tmp_path / "bundle")
    bundle = load_thyroid_bundle(out)
    assert sum(bundle.fusion_weights) == pytest.approx(1.0)
    assert set(bundle.thresholds) == set(FINDINGS)
    assert bundle.manifest.input.field_mm == 100
    assert (out / "history.csv").is_file()
    # measured in a fresh interpreter on the validation studies (tests/test_memory.py)
    assert bundle.manifest.memory.measured_on and bundle.manifest.memory.cpu_mb > 0
    metrics = evaluate_thyroid(out, studies)
    assert metrics["studies"] == 12
    assert set(metrics["members"]) == {"cross", "plain"}
    assert 0.0 <= metrics["exact_match"] <= 1.0
    assert "cold_nodule" in format_thyroid_table(metrics)

    recipe.write_text(RECIPE.replace('arch = "resnet10t"', 'arch = "no_such_net"'))
    with pytest.raises(ConfigError, match="members.1.arch"):
        train_thyroid(recipe, studies, tmp_path / "other")
    assert np.isfinite(metrics["macro"]["f1"])
