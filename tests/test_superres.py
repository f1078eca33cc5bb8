"""The optional super-resolution step: the generator, its file, the bundle entry, the engine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from bundles import TINY_RECIPE, random_bundle
from mibi_node.errors import BundleError, ConfigError
from mibi_node.imaging.superres import (
    SRGenerator,
    SuperResolution,
    load_superres,
    psnr,
    save_superres,
    ssim,
)
from mibi_node.inference.bundle import load_bundle, write_bundle
from mibi_node.inference.engine import InferenceEngine
from mibi_node.inference.recipe import load_recipe
from test_engine import make_study


@pytest.fixture(scope="module")
def generator_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    generator = SRGenerator(channels=8, blocks=1)
    with torch.no_grad():  # a generator that is not plain bicubic
        generator.tail.weight.normal_(0, 0.05)
    return save_superres(tmp_path_factory.mktemp("sr") / "superres.pt", generator, note="test")


def _with_superres(source: Path, out: Path, generator: Path | None) -> Path:
    """The members of ``source`` rewritten as a bundle with (or without) the step."""
    bundle = load_bundle(source)
    manifest = bundle.manifest.model_dump(mode="json", exclude={"members", "superres"})
    manifest["members"] = [{"name": name} for name in bundle.member_names]
    members = {name: bundle.build_member(name) for name in bundle.member_names}
    write_bundle(out, manifest, members, superres=generator)
    return out


def test_upsample_shape_dtype_and_counts(generator_file: Path) -> None:
    sr = load_superres(generator_file)
    image = make_study().images["early"].pixels[:, :100]  # not square
    out = sr.upsample(image)
    assert out.shape == (256, 200) and out.dtype == np.float32
    assert out.min() >= 0
    assert out.sum() == pytest.approx(float(image.sum()), rel=1e-4)


def test_untrained_generator_is_bicubic() -> None:
    image = torch.rand(1, 1, 16, 16)
    out = SRGenerator(channels=8, blocks=1)(image)
    bicubic = torch.nn.functional.interpolate(image, scale_factor=2, mode="bicubic")
    assert torch.allclose(out, bicubic, atol=1e-6)


def test_upsample_refuses_bad_input(generator_file: Path) -> None:
    sr = load_superres(generator_file)
    with pytest.raises(ValueError, match='"image"'):
        sr.upsample(np.zeros((2, 3, 4)))
    with pytest.raises(TypeError, match='"generator"'):
        SuperResolution(torch.nn.Identity())  # type: ignore[arg-type]


def test_corrupt_generator_file(tmp_path: Path) -> None:
    path = tmp_path / "superres.pt"
    path.write_bytes(b"not a torch file")
    with pytest.raises(BundleError, match="not a readable"):
        load_superres(path)
    with pytest.raises(BundleError, match="missing"):
        load_superres(tmp_path / "none.pt")


def test_bundle_with_superres_round_trips_and_engine_uses_it(
    tmp_path: Path, generator_file: Path
) -> None:
    plain = random_bundle(tmp_path / "plain")
    enhanced = _with_superres(plain, tmp_path / "sr", generator_file)
    bundle = load_bundle(enhanced)
    assert bundle.superres_path == enhanced / "superres.pt"
    assert bundle.manifest.superres is not None and bundle.manifest.superres.enabled
    engine = InferenceEngine(bundle, "cpu", precision="fp32")
    assert engine.superres is not None
    study = make_study()
    with_sr = engine.predict_one(study)
    without = InferenceEngine(plain, "cpu", precision="fp32").predict_one(study)
    assert "superres" in with_sr.timings and "superres" not in without.timings
    assert with_sr.probabilities != without.probabilities
    assert sum(with_sr.probabilities.values()) == pytest.approx(1.0)
    if with_sr.focus is not None:  # the focus is placed on the source (128 px) image
        assert 0 <= with_sr.focus.row < 128 and 0 <= with_sr.focus.col < 128


def test_altered_generator_is_refused(tmp_path: Path, generator_file: Path) -> None:
    enhanced = _with_superres(random_bundle(tmp_path / "plain"), tmp_path / "sr", generator_file)
    torch.manual_seed(9)
    save_superres(enhanced / "superres.pt", SRGenerator(channels=8, blocks=1))
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(enhanced)


def test_bundle_without_superres_is_unchanged(tmp_path: Path) -> None:
    plain = random_bundle(tmp_path / "plain")
    data = json.loads((plain / "bundle.json").read_text())
    assert "superres" not in data
    assert not (plain / "superres.pt").exists()
    bundle = load_bundle(plain)
    assert bundle.superres_path is None
    assert InferenceEngine(bundle, "cpu", precision="fp32").superres is None
    rewritten = _with_superres(plain, tmp_path / "again", None)
    again = json.loads((rewritten / "bundle.json").read_text())
    data["provenance"].pop("created")
    again["provenance"].pop("created")
    assert again == data


def test_recipe_section(tmp_path: Path) -> None:
    assert not load_recipe(_recipe(tmp_path, "")).superres.enabled
    on = load_recipe(_recipe(tmp_path, '[superres]\nenabled = true\ngenerator = "g.pt"\n'))
    assert on.superres.enabled and on.superres.generator == "g.pt"
    with pytest.raises(ConfigError, match="superres"):
        load_recipe(_recipe(tmp_path, "[superres]\nenabled = true\n"))


def _recipe(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "recipe.toml"
    head, members = TINY_RECIPE.split("[[members]]", 1)
    path.write_text(head + extra + "[[members]]" + members)
    return path


def test_quality_metrics() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random((32, 32)) * 10
    assert psnr(truth, truth) == math.inf
    assert ssim(truth, truth) == pytest.approx(1.0)
    noisy = truth + rng.normal(0, 1, truth.shape)
    assert 10 < psnr(truth, noisy) < 30
    assert 0 < ssim(truth, noisy) < 1
    with pytest.raises(ValueError, match='"reference"'):
        psnr(truth, truth[:8])


def test_briefly_trained_generator_has_finite_psnr() -> None:
    from training.gan import train_srgan

    rng = np.random.default_rng(1)
    high = rng.random((6, 1, 16, 16)).astype(np.float32)
    low = torch.nn.functional.avg_pool2d(torch.from_numpy(high), 2).numpy()
    generator, history = train_srgan(
        low, high, steps=6, batch_size=4, seed=0, channels=8, blocks=1, log_every=3
    )
    assert len(history.content) == 2 and all(math.isfinite(v) for v in history.content)
    out = SuperResolution(generator).upsample(low[0, 0] * 100)
    assert math.isfinite(psnr(high[0, 0] * 25, out))
