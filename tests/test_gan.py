"""Seed 001's GAN data generation: the conditional DCGAN, the SRGAN and their chain."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies
from mibi_node.analyses.thyroid.result import FINDINGS
from training.gan import (
    ConditionalDiscriminator,
    ConditionalGenerator,
    SRDiscriminator,
    downsample,
    generate_examples,
    sample_images,
    train_dcgan,
    train_srgan,
    upscale,
)

RECIPE = """
name = "thyroid-gan-tiny"
version = "0.0.1"
[input]
size = 64
field_mm = 100
[denoise]
smax = 3
[[members]]
name = "plain"
arch = "resnet10t"
heads = 2
embed_dim = 16
[training]
single_epochs = 1
cross_epochs = 1
batch_size = 8
validation_fraction = 0.25
"""


def _toy(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images whose brightness and blob position follow their finding vector."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((n, len(FINDINGS)), dtype=np.float32)
    labels[np.arange(n), rng.integers(0, len(FINDINGS), n)] = 1
    r, c = np.mgrid[0:32, 0:32]
    images = np.zeros((n, 1, 32, 32), dtype=np.float32)
    for i, y in enumerate(labels):
        k = int(y.argmax())
        images[i, 0] = (0.3 + 0.2 * k) * np.exp(-((r - 16) ** 2 + (c - 5 * k - 3) ** 2) / 20)
    return images, labels


def test_shapes_and_size() -> None:
    generator = ConditionalGenerator()
    discriminator = ConditionalDiscriminator()
    labels = torch.eye(len(FINDINGS))[:4]
    with torch.no_grad():
        images = generator(torch.randn(4, generator.latent), labels)
    assert images.shape == (4, 1, 32, 32)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.5
    assert discriminator(images, labels).shape == (4,)
    assert SRDiscriminator()(torch.rand(3, 1, 64, 64)).shape == (3,)
    params = sum(p.numel() for p in generator.parameters())
    params += sum(p.numel() for p in discriminator.parameters())
    assert 100_000 < params < 1_000_000


def test_conditional_generation_gives_one_image_per_label() -> None:
    images, labels = _toy()
    generator, _ = train_dcgan(images, labels, steps=2, batch_size=8, seed=0)
    wanted = np.repeat(np.eye(len(FINDINGS), dtype=np.float32), 3, axis=0)[:17]
    made = sample_images(generator, wanted, seed=1)
    assert made.shape == (17, 1, 32, 32) and made.dtype == np.float32
    assert np.array_equal(made, sample_images(generator, wanted, seed=1))
    assert sample_images(generator, wanted[:0]).shape == (0, 1, 32, 32)
    with pytest.raises(ValueError, match='"labels"'):
        sample_images(generator, wanted[:, :3])


def test_dcgan_training_is_deterministic_and_refuses_bad_input() -> None:
    images, labels = _toy()
    first, h1 = train_dcgan(images, labels, steps=4, batch_size=8, seed=3, log_every=2)
    second, h2 = train_dcgan(images, labels, steps=4, batch_size=8, seed=3, log_every=2)
    assert h1.generator == h2.generator and h1.discriminator == h2.discriminator
    wanted = labels[:5]
    assert np.array_equal(sample_images(first, wanted), sample_images(second, wanted))
    with pytest.raises(ValueError, match='"images"'):
        train_dcgan(images[:, :, :16, :16], labels, steps=1)
    with pytest.raises(ValueError, match='"labels"'):
        train_dcgan(images, labels[:3], steps=1)


def test_srgan_content_loss_falls_and_is_deterministic() -> None:
    images, _ = _toy(16)
    high = np.clip(images + np.random.default_rng(0).normal(0, 0.02, images.shape), 0, None)
    high = high.astype(np.float32)
    low = downsample(high).numpy()
    args = {"steps": 40, "pretrain_fraction": 1.0, "batch_size": 8, "lr": 3e-3, "seed": 2}
    generator, history = train_srgan(low, high, channels=8, blocks=1, log_every=10, **args)
    assert history.content[-1] < history.content[0]
    _, again = train_srgan(low, high, channels=8, blocks=1, log_every=10, **args)
    assert again.content == history.content
    assert upscale(generator, low).shape == (16, 1, 32, 32)
    with pytest.raises(ValueError, match='"high"'):
        train_srgan(low, high[:, :, :30], steps=1)


def test_adversarial_phase_runs() -> None:
    images, _ = _toy(8)
    low = downsample(images).numpy()
    _, history = train_srgan(low, images, steps=4, batch_size=4, channels=8, blocks=1, log_every=2)
    assert history.discriminator[0] == 0.0 and history.discriminator[-1] > 0.0


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("thyroid") / "data"
    generate_thyroid_studies(out, 12, 5, mixed_fraction=0.34, matrix=64)
    return out


def test_generated_examples_reach_train_thyroid(studies: Path, tmp_path: Path) -> None:
    from training.thyroid import load_thyroid_arrays, train_thyroid

    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE)
    inputs, targets = load_thyroid_arrays(recipe, studies)
    made = generate_examples(inputs, targets, 10, seed=0, dcgan_steps=2, srgan_steps=2)
    assert made.inputs.shape == (10, 1, 64, 64) and made.targets.shape == (10, len(FINDINGS))
    assert float(made.inputs.min()) >= float(inputs.min())
    assert float(made.inputs.max()) <= float(inputs.max())
    # the requested finding vectors are drawn from the training labels
    assert {tuple(t) for t in made.targets} <= {tuple(t) for t in targets}
    out = train_thyroid(recipe, studies, tmp_path / "bundle", extra=(made.inputs, made.targets))
    manifest = json.loads((out / "bundle.json").read_text())
    assert next(iter(manifest["evaluation"].values()))["extra_examples"] == 10
    assert "19 training" in manifest["provenance"]["notes"]  # 9 studies + 10 generated
