"""Training data: both folder layouts, the cache, class-count checks, splits and the config."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mibi_node.errors import ConfigError
from mibi_node.inference.recipe import Recipe, load_recipe
from training.augment import Augmenter
from training.config import AugmentConfig, training_config
from training.data import (
    DataError,
    Preprocessing,
    check_class_counts,
    discover,
    load_arrays,
    read_sample,
)
from training.split import Split, stratified_folds, stratified_split

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")


def _one_channel_recipe(size: int = 32) -> Recipe:
    return Recipe.model_validate(
        {
            "name": "png",
            "input": {"channels": ["delayed"], "size": size},
            "members": [{"arch": "resnet10t", "heads": 2, "embed_dim": 16}],
        }
    )


def _png_folders(root: Path, per_class: int = 3) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        folder = root / ("Parathyroid adenoma" if name == "adenoma" else name)
        folder.mkdir(parents=True)
        for i in range(per_class):
            counts = rng.poisson(20 + 10 * c, size=(40, 48)).astype(np.uint16)
            Image.fromarray(counts).save(folder / f"img{i}.png")
    return root


def test_class_folders_of_png_images(tmp_path: Path) -> None:
    root = _png_folders(tmp_path / "data")
    source = discover(root)
    assert source.layout == "folders"
    assert len(source.samples) == 15
    assert source.class_counts() == dict.fromkeys(CLASSES, 3)
    assert {s.kind for s in source.samples} == {"image"}
    # the display name "Parathyroid adenoma" maps to the adenoma class
    assert source.samples[0].key.startswith("Parathyroid adenoma/")
    assert source.samples[0].label == 1
    study = read_sample(source.samples[0], ("delayed",))
    assert study.images["delayed"].pixels.shape == (40, 48)
    with pytest.raises(Exception, match="one channel"):
        read_sample(source.samples[0], ("early", "delayed"))


def test_fingerprint_follows_content_not_location(tmp_path: Path) -> None:
    a = discover(_png_folders(tmp_path / "a"))
    b = discover(_png_folders(tmp_path / "b"))
    assert a.fingerprint == b.fingerprint
    image = tmp_path / "b" / "cyst" / "img0.png"
    Image.fromarray(np.zeros((40, 48), np.uint16)).save(image)
    assert discover(tmp_path / "b").fingerprint != a.fingerprint


def test_cache_is_keyed_by_data_and_preprocessing(tmp_path: Path, monkeypatch) -> None:
    source = discover(_png_folders(tmp_path / "data"))
    preprocessing = Preprocessing.from_recipe(_one_channel_recipe(32))
    cache = tmp_path / "cache"
    calls: list[int] = []
    first = load_arrays(source, preprocessing, cache, lambda done, total: calls.append(done))
    assert first.inputs.shape == (15, 1, 32, 32)
    assert first.inputs.dtype == np.float32
    assert first.count_scale.shape == (15, 1) and (first.count_scale > 0).all()
    assert len(calls) == 15
    assert len(list(cache.glob("*.npz"))) == 1

    # a second run reads nothing: the reader is not even called
    def refuse(*args, **kwargs):
        raise AssertionError("read again despite the cache")

    monkeypatch.setattr("training.data.read_sample", refuse)
    second = load_arrays(source, preprocessing, cache)
    np.testing.assert_array_equal(second.inputs, first.inputs)
    assert second.keys == first.keys
    # other preprocessing, other cache entry
    monkeypatch.undo()
    load_arrays(source, Preprocessing.from_recipe(_one_channel_recipe(24)), cache)
    assert len(list(cache.glob("*.npz"))) == 2


def test_preprocessing_matches_the_engine(tmp_path: Path) -> None:
    """The cached input is what the engine computes: denoise, then to_model_input."""
    from mibi_node.imaging.denoise import adaptive_median
    from mibi_node.imaging.preprocess import to_model_input

    source = discover(_png_folders(tmp_path / "data"))
    recipe = _one_channel_recipe(32)
    preprocessing = Preprocessing.from_recipe(recipe)
    study = read_sample(source.samples[4], ("delayed",))
    array, _ = preprocessing.apply(study)
    pixels = adaptive_median(study.images["delayed"].pixels, smax=recipe.denoise.smax)
    expected, _ = to_model_input([pixels], 32, recipe.normalisation.to_normalisation())
    np.testing.assert_array_equal(array, expected)


def test_labels_csv_layout_and_its_errors(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for i in range(4):
        (root / f"s{i}").mkdir(parents=True)
        Image.fromarray(np.full((8, 8), i + 1, np.uint8)).save(root / f"s{i}" / "x.png")
    (root / "labels.csv").write_text(
        "path,label,foci\ns0,normal,\ns1,adenoma,right/lower/3/4/10\ns2,Parathyroid cyst,\ns3,normal,\n"
    )
    source = discover(root)
    assert source.layout == "labels"
    assert [s.label for s in source.samples] == [0, 1, 4, 0]
    assert source.samples[1].truth["foci"] == "right/lower/3/4/10"

    (root / "labels.csv").write_text("path,label\ns0,thyroiditis\n")
    with pytest.raises(DataError, match="line 2: unknown class 'thyroiditis'"):
        discover(root)
    (root / "labels.csv").write_text("path,label\nmissing,normal\n")
    with pytest.raises(DataError, match="does not exist"):
        discover(root)
    (root / "labels.csv").write_text("path,label\ns0,normal\ns0,normal\n")
    with pytest.raises(DataError, match="listed twice"):
        discover(root)
    with pytest.raises(DataError, match="no such folder"):
        discover(tmp_path / "nowhere")


def test_class_counts_refuse_fewer_than_two_and_warn_below_ten(caplog) -> None:
    with pytest.raises(DataError, match=r"fewer than 2 studies of class carcinoma \(1\)"):
        check_class_counts(
            {"normal": 30, "adenoma": 30, "hyperplasia": 5, "carcinoma": 1, "cyst": 9}
        )
    with caplog.at_level(logging.WARNING):
        warnings = check_class_counts(
            {"normal": 30, "adenoma": 30, "hyperplasia": 5, "carcinoma": 12, "cyst": 9}
        )
    assert len(warnings) == 2
    assert "hyperplasia has only 5" in caplog.text


def test_stratified_split_is_seeded_disjoint_and_saved(tmp_path: Path) -> None:
    labels = np.repeat(np.arange(5), [40, 30, 20, 10, 2])
    keys = [f"k{i:03d}" for i in range(len(labels))]
    split = stratified_split(
        keys, labels, test_fraction=0.2, val_fraction=0.15, seed=3, data_fingerprint="f"
    )
    sets = [set(split.train), set(split.val), set(split.test)]
    assert sum(map(len, sets)) == len(keys) and not (
        sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2]
    )
    by_key = dict(zip(keys, labels, strict=True))
    test_counts = np.bincount([by_key[k] for k in split.test], minlength=5)
    assert list(test_counts) == [8, 6, 4, 2, 1]  # 20 % per class, at least one
    assert stratified_split(keys, labels, seed=3).test == split.test
    assert stratified_split(keys, labels, seed=4).test != split.test
    split.save(tmp_path / "split.json")
    assert Split.load(tmp_path / "split.json") == split
    with pytest.raises(DataError, match="no such file"):
        Split.load(tmp_path / "other.json")


def test_folds_partition_and_refuse_scarce_classes() -> None:
    labels = np.repeat(np.arange(5), 6)
    keys = [f"k{i:02d}" for i in range(30)]
    folds = stratified_folds(keys, labels, 3, seed=0)
    assert sorted(k for fold in folds for k in fold) == keys
    assert all(len(fold) == 10 for fold in folds)
    with pytest.raises(DataError, match="needs 7 studies per class"):
        stratified_folds(keys, labels, 7)


def test_training_table_is_validated_naming_the_key() -> None:
    recipe = load_recipe("config/ensemble-demo.toml")
    config = training_config(recipe)
    assert config.fusion in ("fitted", "equal", "vote")
    bad = Recipe.model_validate({**recipe.model_dump(), "training": {"epoch": 3}})
    with pytest.raises(ConfigError, match="'training.epoch'"):
        training_config(bad)
    bad = Recipe.model_validate(
        {**recipe.model_dump(), "training": {"augment": {"scale": [1.2, 0.8]}}}
    )
    with pytest.raises(ConfigError, match="training.augment"):
        training_config(bad)
    bad = Recipe.model_validate(
        {**recipe.model_dump(), "training": {"overrides": {"vgg19": {"epochs": 2}}}}
    )
    with pytest.raises(ConfigError, match="names no member"):
        training_config(bad)
    full = load_recipe("config/ensemble-full.toml")
    assert training_config(full).epochs >= 1


def test_precision_auto_follows_the_device_and_the_cpu(monkeypatch) -> None:
    from training import trainer

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert trainer.training_bf16("auto", cuda) and trainer.training_bf16("bf16", cpu)
    assert not trainer.training_bf16("fp32", cuda)
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: False)  # emulated bf16 is slower
    assert not trainer.training_bf16("auto", cpu)
    monkeypatch.setattr(trainer, "cpu_has_bf16", lambda: True)
    assert trainer.training_bf16("auto", cpu)

    recipe = load_recipe("config/ensemble-demo.toml")
    member = recipe.members[0].name
    table = {**recipe.training, "overrides": {member: {"precision": "fp32"}}}
    config = training_config(Recipe.model_validate({**recipe.model_dump(), "training": table}))
    assert config.precision == "auto" and config.for_member(member).precision == "fp32"
    bad = Recipe.model_validate(
        {**recipe.model_dump(), "training": {"overrides": {member: {"precision": "fp16"}}}}
    )
    with pytest.raises(ConfigError, match=f"'training.overrides.{member}.precision'"):
        training_config(bad)


def test_augmenter_keeps_shape_and_is_reproducible() -> None:
    recipe = _one_channel_recipe(32)
    augment = Augmenter(
        AugmentConfig(counts_probability=1.0), recipe.normalisation.to_normalisation(), 1
    )
    batch = torch.zeros(4, 1, 32, 32)
    batch[:, :, 12:20, 10:18] = 1.0
    scale = torch.full((4, 1), 50.0)
    a = augment(batch, scale, torch.Generator().manual_seed(1))
    b = augment(batch, scale, torch.Generator().manual_seed(1))
    c = augment(batch, scale, torch.Generator().manual_seed(2))
    assert a.shape == batch.shape
    torch.testing.assert_close(a, b)
    assert not torch.equal(a, c)
    # Poisson resampling adds noise but keeps the mean level of the hot square
    assert abs(float(a[:, :, 13:19, 11:17].mean()) - 1.0) < 0.25
    assert float(a.min()) >= 0.0
    identity = Augmenter(
        AugmentConfig(
            hflip=0,
            rotate_degrees=0,
            scale=(1, 1),
            shift=0,
            elastic_alpha=0,
            intensity=(1, 1),
            counts=(1, 1),
        ),
        recipe.normalisation.to_normalisation(),
        1,
    )
    torch.testing.assert_close(identity(batch, scale, torch.Generator()), batch, atol=1e-5, rtol=0)
