"""Model bundles: written and read back they predict identically; damage is named clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from mibi_node.errors import BundleError, ConfigError
from mibi_node.inference.bundle import (
    MIBI_CLASSES,
    Bundle,
    init_random_bundle,
    load_bundle,
    write_bundle,
)
from mibi_node.inference.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "config" / "ensemble-demo.toml"
FULL = ROOT / "config" / "ensemble-full.toml"

TINY_RECIPE = """
name = "tiny"
version = "1.2.3"
[input]
size = 32
[tta]
views = ["identity", "hflip"]
[[members]]
arch = "resnet10t"
heads = 2
embed_dim = 32
[[members]]
name = "lite"
arch = "efficientnet_lite0"
heads = 2
embed_dim = 32
[fusion]
method = "majority"
weights = [0.25, 0.75]
temperature = 1.5
[training]
epochs = 3
"""


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Bundle:
    folder = tmp_path_factory.mktemp("bundles")
    recipe = folder / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    return init_random_bundle(recipe, folder / "tiny", seed=3)


def copy(bundle: Bundle, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(bundle.directory, target)
    return target


def edit_manifest(folder: Path, change: object) -> None:
    path = folder / "bundle.json"
    data = json.loads(path.read_text())
    change(data)  # type: ignore[operator]
    path.write_text(json.dumps(data))


def test_recipes_in_config_parse() -> None:
    full = load_recipe(FULL)
    assert [m.arch for m in full.members] == [
        "vgg19",
        "resnet18",
        "resnet50",
        "resnet152",
        "densenet169",
        "densenet264d",
        "efficientnet_b0",
        "efficientnet_b4",
        "efficientnet_b7",
    ]
    assert full.input.size == 224 and len(full.tta.views) == 8
    assert abs(sum(full.fusion_weights()) - 1) < 1e-12
    demo = load_recipe(DEMO)
    assert demo.input.size <= 128 and len(demo.members) <= 4
    assert "training" in demo.model_fields_set or demo.training == {}


def test_manifest_content(tiny: Bundle) -> None:
    manifest = json.loads((tiny.directory / "bundle.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["intended_use"] == "demonstration"
    assert [c["code"] for c in manifest["classes"]] == [
        "17621005",
        "1187375007",
        "76197007",
        "1187425009",
        "367643001",
    ]
    assert manifest["classes"][1]["display"] == "Parathyroid adenoma"
    assert manifest["input"] == {"channels": ["early", "delayed"], "size": 32}
    assert manifest["fusion"] == {"method": "majority", "weights": [0.25, 0.75], "temperature": 1.5}
    assert [m["name"] for m in manifest["members"]] == ["resnet10t", "lite"]
    assert all(len(m["sha256"]) == 64 for m in manifest["members"])
    assert "init-bundle" in manifest["provenance"]["training_command"]
    assert manifest["provenance"]["seed"] == 3
    assert tiny.class_keys == tuple(c.key for c in MIBI_CLASSES)


def test_round_trip_predicts_identically(tiny: Bundle, tmp_path: Path) -> None:
    loaded = load_bundle(tiny.directory)
    members = {name: loaded.build_member(name) for name in loaded.member_names}
    x = torch.randn(3, 2, 32, 32)
    with torch.inference_mode():
        before = {name: m(x) for name, m in members.items()}
    manifest = loaded.manifest.model_dump(mode="json")
    manifest.pop("format_version")
    manifest["members"] = [{"name": n} for n in loaded.member_names]
    written = write_bundle(tmp_path / "again", manifest, members)
    reread = load_bundle(written.directory)
    assert reread.manifest == loaded.manifest  # same weights -> same hashes
    with torch.inference_mode():
        for name in reread.member_names:
            assert torch.equal(reread.build_member(name)(x), before[name])


def test_same_seed_same_weights(tiny: Bundle, tmp_path: Path) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    again = init_random_bundle(recipe, tmp_path / "again", seed=3)
    other = init_random_bundle(recipe, tmp_path / "other", seed=4)
    hashes = [m.sha256 for m in tiny.manifest.members]
    assert [m.sha256 for m in again.manifest.members] == hashes
    assert [m.sha256 for m in other.manifest.members] != hashes


def test_refuses_to_overwrite(tiny: Bundle) -> None:
    with pytest.raises(BundleError, match="already exists"):
        init_random_bundle(DEMO, tiny.directory)


def test_altered_weights_are_named(tiny: Bundle, tmp_path: Path) -> None:
    folder = copy(tiny, tmp_path)
    weights = folder / "lite.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"lite\.safetensors: sha256 is .* altered"):
        load_bundle(folder)


def test_missing_weights_are_named(tiny: Bundle, tmp_path: Path) -> None:
    folder = copy(tiny, tmp_path)
    (folder / "resnet10t.safetensors").unlink()
    with pytest.raises(BundleError, match=r"resnet10t\.safetensors: weight file .* missing"):
        load_bundle(folder)


def test_wrong_shapes_are_named(tiny: Bundle, tmp_path: Path) -> None:
    folder = copy(tiny, tmp_path)
    edit_manifest(folder, lambda d: d["members"][0].update(embed_dim=64))
    with pytest.raises(BundleError, match=r"resnet10t\.safetensors: tensor '.*' has shape"):
        load_bundle(folder)


def test_wrong_architecture_is_named(tiny: Bundle, tmp_path: Path) -> None:
    folder = copy(tiny, tmp_path)
    edit_manifest(folder, lambda d: d["members"][0].update(arch="resnet18"))
    with pytest.raises(BundleError, match=r"resnet10t\.safetensors: .*resnet18 member"):
        load_bundle(folder)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d["fusion"].update(weights=[0.5, 0.6]), "fusion.*sum to 1"),
        (lambda d: d["classes"].pop(), "classes are"),
        (lambda d: d["classes"][4].update(code="123"), "'cyst' is coded SCT 123"),
        (lambda d: d.pop("provenance"), "'provenance'"),
        (lambda d: d.update(format_version=99), "format_version 99"),
        (lambda d: d["tta"].update(views=["spin"]), "TTA view"),
        (lambda d: d["input"].update(channels=["early", "late"]), "'input.channels'"),
        (lambda d: d["members"][1].update(sha256="xyz"), "'members.1.sha256'"),
    ],
)
def test_bad_manifest_is_named(tiny: Bundle, tmp_path: Path, change: object, match: str) -> None:
    folder = copy(tiny, tmp_path)
    edit_manifest(folder, change)
    with pytest.raises(BundleError, match=rf"bundle\.json: .*{match}"):
        load_bundle(folder)


def test_missing_or_broken_folder(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no such folder"):
        load_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="has no bundle.json"):
        load_bundle(tmp_path)
    (tmp_path / "bundle.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tmp_path)


def test_bad_recipes_name_the_key(tmp_path: Path) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(TINY_RECIPE.replace('arch = "resnet10t"', 'arch = "resnet9000"'))
    with pytest.raises(ConfigError, match=r"r\.toml: key 'members.0'.*resnet9000"):
        load_recipe(recipe)
    recipe.write_text(TINY_RECIPE.replace("size = 32", "size = 32\ncolour = 1"))
    with pytest.raises(ConfigError, match="'input.colour'"):
        load_recipe(recipe)
    recipe.write_text("name = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_recipe(recipe)
    with pytest.raises(BundleError, match="no such file"):
        init_random_bundle(tmp_path / "none.toml", tmp_path / "b")
