"""GAN data generation (seed 001): a class-conditional DCGAN and an SRGAN.

Seed 001 makes up for scarce thyroid SPECT data by generating images with a DCGAN and
raising their resolution with an SRGAN. Here:

* :class:`ConditionalGenerator` / :class:`ConditionalDiscriminator`: a DCGAN (transposed
  convolutions, batch norm, LeakyReLU discriminator) conditioned on the multi-label finding
  vector, which the generator takes beside its noise and the discriminator as constant
  extra input planes. It works at 32 x 32 px on images in the model's input scale.
* :func:`train_srgan`: the SRGAN generator of :mod:`mibi_node.imaging.superres` (residual
  blocks, pixel shuffle x2) against a small convolutional discriminator. The loss is a pixel
  **L1 content loss plus an adversarial term**; SRGAN's VGG perceptual loss needs ImageNet
  weights, which are not available offline, so it is left out. As in the SRGAN paper, the
  generator is first trained on the content loss alone (an SRResNet), then adversarially.
* :func:`generate_examples`: the seed's chain, DCGAN at 32 px then SRGAN x2 to 64 px, for
  :func:`training.thyroid.train_thyroid`'s ``extra`` argument.
* :func:`render_mibi_pairs` and :func:`train_mibi_superres`: the MIBI analysis' optional
  super-resolution step, an SRGAN trained on MIBI phantoms rendered at 128 and 256 px
  (denoised 128 px acquisition in, noise-free 256 px image as the target).

Every training function takes a seed and is deterministic on the CPU.

Usage::

    python -m training.gan thyroid config/thyroid-demo.toml DATA --out var/gan/run \\
        [--dcgan-steps 1500] [--srgan-steps 600] [--count 400] [--seed 0]
    python -m training.gan mibi --out var/gan/mibi-sr/superres.pt [--studies 60] [--steps 600]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from mibi_node.imaging.superres import SRGenerator

__all__ = [
    "ConditionalDiscriminator",
    "ConditionalGenerator",
    "GANHistory",
    "SRDiscriminator",
    "generate_examples",
    "sample_images",
    "train_dcgan",
    "train_srgan",
    "upscale",
]

logger = logging.getLogger(__name__)


@dataclass
class GANHistory:
    """Losses of a GAN training run, one entry per logged step.

    Attributes
    ----------
    steps
        The step numbers logged.
    generator, discriminator, content
        Mean losses since the previous entry (``content`` only for the SRGAN).
    seconds
        Wall time of the run.
    """

    steps: list[int] = field(default_factory=list)
    generator: list[float] = field(default_factory=list)
    discriminator: list[float] = field(default_factory=list)
    content: list[float] = field(default_factory=list)
    seconds: float = 0.0


# -- DCGAN -----------------------------------------------------------------------------------


class ConditionalGenerator(nn.Module):
    """DCGAN generator: (noise, finding vector) -> a 32 x 32 image in ``value_range``.

    Parameters
    ----------
    labels
        Length of the finding vector.
    latent
        Length of the noise vector.
    width
        Feature maps of the last hidden layer (the first has four times as many).
    value_range
        (low, high) of the images it makes; the tanh output is mapped onto it.
    """

    size = 32
    value_range: torch.Tensor

    def __init__(
        self,
        labels: int = 6,
        latent: int = 64,
        width: int = 32,
        value_range: tuple[float, float] = (0.0, 1.5),
    ) -> None:
        super().__init__()
        for name, value in (("labels", labels), ("latent", latent), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f'Argument "{name}" should be a positive integer, got {value!r}.')
        low, high = value_range
        if not high > low:
            raise ValueError(f'Argument "value_range" should be (low, high), got {value_range}.')
        self.labels, self.latent = labels, latent
        self.register_buffer("value_range", torch.tensor([low, high], dtype=torch.float32))
        self.project = nn.Sequential(
            nn.Linear(latent + labels, width * 4 * 4 * 4, bias=False),
            nn.BatchNorm1d(width * 4 * 4 * 4),
            nn.ReLU(inplace=True),
        )
        self.width = width

        def up(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.ConvTranspose2d(c_in, c_out, 4, 2, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        self.body = nn.Sequential(
            *up(width * 4, width * 2),  # 8 px
            *up(width * 2, width),  # 16 px
            nn.ConvTranspose2d(width, 1, 4, 2, 1),  # 32 px
            nn.Tanh(),
        )

    def forward(self, noise: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = self.project(torch.cat([noise, labels], dim=1))
        x = self.body(x.view(len(x), self.width * 4, 4, 4))
        low, high = self.value_range[0], self.value_range[1]
        return low + (x + 1) * 0.5 * (high - low)


class ConditionalDiscriminator(nn.Module):
    """DCGAN discriminator: a 32 x 32 image plus one constant plane per finding -> logit."""

    def __init__(self, labels: int = 6, width: int = 32) -> None:
        super().__init__()
        self.labels = labels
        self.body = nn.Sequential(
            nn.Conv2d(1 + labels, width, 4, 2, 1),  # 16 px
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=False),  # 8 px
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 2, width * 4, 4, 2, 1, bias=False),  # 4 px
            nn.BatchNorm2d(width * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(width * 4, 1, 4),
        )

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        planes = labels[:, :, None, None].expand(-1, -1, *images.shape[-2:])
        return self.body(torch.cat([images, planes], dim=1)).flatten()


def _init_dcgan(module: nn.Module) -> None:
    """DCGAN's initialisation: N(0, 0.02) weights, N(1, 0.02) batch-norm scales."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _check_pairs(images: np.ndarray, labels: np.ndarray | None, side: int | None) -> None:
    if images.ndim != 4 or images.shape[1] != 1 or len(images) < 2:
        raise ValueError(
            f'Argument "images" should be (N >= 2, 1, H, W), got {tuple(images.shape)}.'
        )
    if side is not None and images.shape[-2:] != (side, side):
        raise ValueError(f'Argument "images" should be {side} x {side} px, got {images.shape}.')
    if labels is not None and (labels.ndim != 2 or len(labels) != len(images)):
        raise ValueError(
            f'Argument "labels" should be (N, findings) with N = {len(images)}, got {labels.shape}.'
        )


def downsample(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Halve the matrix by 2 x 2 averaging (the low-resolution view the GANs work on)."""
    tensor = torch.as_tensor(np.asarray(images, dtype=np.float32))
    return F.avg_pool2d(tensor, 2)


def train_dcgan(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    steps: int = 1500,
    batch_size: int = 32,
    lr: float = 2e-4,
    seed: int = 0,
    latent: int = 64,
    width: int = 32,
    log_every: int = 100,
) -> tuple[ConditionalGenerator, GANHistory]:
    """Train the class-conditional DCGAN on 32 x 32 images and their finding vectors.

    Parameters
    ----------
    images
        (N, 1, 32, 32) training images in the model's input scale (e.g.
        :func:`downsample` of :func:`training.thyroid.load_thyroid_arrays`' inputs).
    labels
        (N, findings) 0/1 finding vectors.
    steps
        Optimiser steps of each network (a fixed count, so small sets get as many as large).
    batch_size, lr
        Adam settings (betas 0.5, 0.999, as in the DCGAN paper).
    seed
        Fixes the initialisation, the batches and the noise.
    latent, width
        Generator noise length and network width.
    log_every
        Steps between history entries.

    Returns
    -------
    tuple
        The generator (in eval mode) and its :class:`GANHistory`.
    """
    _check_pairs(images, labels, ConditionalGenerator.size)
    started = time.perf_counter()
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    low, high = float(x.min()), float(x.max())
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    generator = ConditionalGenerator(y.shape[1], latent, width, (low, max(high, low + 1e-3)))
    discriminator = ConditionalDiscriminator(y.shape[1], width)
    generator.apply(_init_dcgan)
    discriminator.apply(_init_dcgan)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr, betas=(0.5, 0.999))
    history = GANHistory()
    batch = min(batch_size, len(x))
    sums = [0.0, 0.0]
    for step in range(1, steps + 1):
        pick = torch.randint(0, len(x), (batch,), generator=rng)
        real, cond = x[pick], y[pick]
        flip = torch.rand(batch, generator=rng) < 0.5  # the findings are not lateralised
        real = torch.where(flip[:, None, None, None], real.flip(-1), real)
        noise = torch.randn(batch, latent, generator=rng)
        fake = generator(noise, cond)
        # discriminator: real (one-sided label smoothing, 0.9) against fake
        d_real = discriminator(real, cond)
        d_fake = discriminator(fake.detach(), cond)
        loss_d = F.binary_cross_entropy_with_logits(
            d_real, torch.full_like(d_real, 0.9)
        ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        # generator: the non-saturating loss
        d_fake = discriminator(fake, cond)
        loss_g = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        sums[0] += float(loss_g.detach())
        sums[1] += float(loss_d.detach())
        if step % log_every == 0 or step == steps:
            count = step - (history.steps[-1] if history.steps else 0)
            history.steps.append(step)
            history.generator.append(sums[0] / count)
            history.discriminator.append(sums[1] / count)
            sums = [0.0, 0.0]
            logger.debug("dcgan step %d: G %.3f", step, history.generator[-1])
    history.seconds = time.perf_counter() - started
    logger.info("DCGAN: %d steps on %d images in %.1f s", steps, len(x), history.seconds)
    return generator.eval(), history


def sample_images(
    generator: ConditionalGenerator, labels: np.ndarray, *, seed: int = 0, batch: int = 256
) -> np.ndarray:
    """One generated image per requested finding vector.

    Parameters
    ----------
    generator
        A trained :class:`ConditionalGenerator`.
    labels
        (M, findings) 0/1 finding vectors, one per image wanted.
    seed
        Fixes the noise.

    Returns
    -------
    numpy.ndarray
        (M, 1, 32, 32) float32 in the generator's value range.
    """
    y = torch.as_tensor(np.asarray(labels, dtype=np.float32))
    if y.ndim != 2 or y.shape[1] != generator.labels:
        raise ValueError(
            f'Argument "labels" should be (M, {generator.labels}), got {tuple(y.shape)}.'
        )
    rng = torch.Generator().manual_seed(seed)
    generator.eval()
    out = []
    with torch.inference_mode():
        for chunk in y.split(batch):
            noise = torch.randn(len(chunk), generator.latent, generator=rng)
            out.append(generator(noise, chunk))
    if not out:
        return np.zeros((0, 1, generator.size, generator.size), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


# -- SRGAN -----------------------------------------------------------------------------------


class SRDiscriminator(nn.Module):
    """SRGAN discriminator, shortened: strided conv blocks, global pooling, one logit."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()

        def block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.LeakyReLU(0.2, inplace=True),
            ]

        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, 1, 1),
            nn.LeakyReLU(0.2, inplace=True),
            *block(width, width, 2),
            *block(width, width * 2, 1),
            *block(width * 2, width * 2, 2),
            *block(width * 2, width * 4, 2),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(width * 4, 1),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images).flatten()


def _crops(
    low: torch.Tensor,
    high: torch.Tensor,
    pick: torch.Tensor,
    patch: int | None,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = low[pick], high[pick]
    if patch is None or patch >= low.shape[-1]:
        return lo, hi
    top = int(torch.randint(0, low.shape[-2] - patch + 1, (1,), generator=rng))
    left = int(torch.randint(0, low.shape[-1] - patch + 1, (1,), generator=rng))
    return (
        lo[..., top : top + patch, left : left + patch],
        hi[..., 2 * top : 2 * (top + patch), 2 * left : 2 * (left + patch)],
    )


def train_srgan(
    low: np.ndarray,
    high: np.ndarray,
    *,
    steps: int = 600,
    pretrain_fraction: float = 0.5,
    batch_size: int = 16,
    lr: float = 1e-3,
    adversarial_weight: float = 1e-3,
    patch: int | None = None,
    seed: int = 0,
    channels: int = 32,
    blocks: int = 4,
    log_every: int = 50,
) -> tuple[SRGenerator, GANHistory]:
    """Train the x2 SRGAN on pairs of the same images at two resolutions.

    Parameters
    ----------
    low, high
        (N, 1, H, W) and (N, 1, 2H, 2W) float32 pairs, in the same intensity scale.
    steps
        Generator steps in all; the first ``pretrain_fraction`` of them use the content loss
        only (the SRResNet warm start of the SRGAN paper), the rest add the adversarial loss.
    batch_size, lr
        Adam settings (the learning rate is divided by 10 for the adversarial phase).
    adversarial_weight
        Weight of the adversarial loss against the L1 content loss (SRGAN's 1e-3).
    patch
        Train on random aligned crops of this side (low resolution), or whole images.
    seed
        Fixes the initialisation, batches and crops.
    channels, blocks
        Size of the generator (:class:`~mibi_node.imaging.superres.SRGenerator`).
    log_every
        Steps between history entries.

    Returns
    -------
    tuple
        The generator (in eval mode) and its :class:`GANHistory`.
    """
    low_t = torch.as_tensor(np.asarray(low, dtype=np.float32))
    high_t = torch.as_tensor(np.asarray(high, dtype=np.float32))
    _check_pairs(low_t.numpy(), None, None)
    if tuple(high_t.shape) != (len(low_t), 1, 2 * low_t.shape[-2], 2 * low_t.shape[-1]):
        raise ValueError(
            f'Argument "high" should be twice the matrix of "low" {tuple(low_t.shape)}, '
            f"got {tuple(high_t.shape)}."
        )
    if not 0 <= pretrain_fraction <= 1:
        raise ValueError(
            f'Argument "pretrain_fraction" should be in [0, 1], got {pretrain_fraction}.'
        )
    started = time.perf_counter()
    torch.manual_seed(seed)
    rng = torch.Generator().manual_seed(seed)
    generator = SRGenerator(channels=channels, blocks=blocks)
    discriminator = SRDiscriminator()
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=(0.9, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=lr / 10, betas=(0.9, 0.999))
    pretrain = int(round(steps * pretrain_fraction))
    history = GANHistory()
    batch = min(batch_size, len(low_t))
    sums = [0.0, 0.0, 0.0]
    generator.train()
    for step in range(1, steps + 1):
        if step == pretrain + 1:
            for group in opt_g.param_groups:
                group["lr"] = lr / 10
        pick = torch.randint(0, len(low_t), (batch,), generator=rng)
        lo, hi = _crops(low_t, high_t, pick, patch, rng)
        fake = generator(lo)
        content = F.l1_loss(fake, hi)
        loss_g = content
        loss_d = torch.zeros(())
        if step > pretrain:
            d_real = discriminator(hi)
            d_fake = discriminator(fake.detach())
            loss_d = F.binary_cross_entropy_with_logits(
                d_real, torch.ones_like(d_real)
            ) + F.binary_cross_entropy_with_logits(d_fake, torch.zeros_like(d_fake))
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
            d_fake = discriminator(fake)
            adversarial = F.binary_cross_entropy_with_logits(d_fake, torch.ones_like(d_fake))
            loss_g = content + adversarial_weight * adversarial
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        sums[0] += float(loss_g.detach())
        sums[1] += float(loss_d.detach())
        sums[2] += float(content.detach())
        if step % log_every == 0 or step == steps:
            count = step - (history.steps[-1] if history.steps else 0)
            history.steps.append(step)
            history.generator.append(sums[0] / count)
            history.discriminator.append(sums[1] / count)
            history.content.append(sums[2] / count)
            sums = [0.0, 0.0, 0.0]
    history.seconds = time.perf_counter() - started
    logger.info("SRGAN: %d steps on %d pairs in %.1f s", steps, len(low_t), history.seconds)
    return generator.eval(), history


def upscale(generator: SRGenerator, images: np.ndarray, *, batch: int = 128) -> np.ndarray:
    """Apply an SRGAN generator to (N, 1, H, W) images: (N, 1, 2H, 2W) float32."""
    x = torch.as_tensor(np.asarray(images, dtype=np.float32))
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f'Argument "images" should be (N, 1, H, W), got {tuple(x.shape)}.')
    generator.eval()
    with torch.inference_mode():
        out = [generator(chunk) for chunk in x.split(batch)]
    if not out:
        return np.zeros((0, 1, 2 * x.shape[-2], 2 * x.shape[-1]), dtype=np.float32)
    return torch.cat(out).numpy().astype(np.float32, copy=False)


# -- the seed's chain ------------------------------------------------------------------------


@dataclass
class GeneratedExamples:
    """Generated training examples and how they were made.

    Attributes
    ----------
    inputs, targets
        (M, 1, 64, 64) images and (M, findings) finding vectors, for
        :func:`training.thyroid.train_thyroid`'s ``extra``.
    dcgan, srgan
        The two training histories.
    seconds
        Wall time: both trainings and the generation.
    """

    inputs: np.ndarray
    targets: np.ndarray
    dcgan: GANHistory
    srgan: GANHistory
    seconds: float


def generate_examples(
    inputs: np.ndarray,
    targets: np.ndarray,
    count: int,
    *,
    seed: int = 0,
    dcgan_steps: int = 1500,
    srgan_steps: int = 600,
) -> GeneratedExamples:
    """Seed 001's chain on one training split: DCGAN at 32 px, then SRGAN x2 to 64 px.

    Both GANs learn from ``inputs`` only (the training studies): the DCGAN from their 2 x 2
    averaged 32 px views, the SRGAN from the (32 px, 64 px) pairs. The requested finding
    vectors are drawn from ``targets`` (the training split's label mix).

    Parameters
    ----------
    inputs, targets
        (N, 1, 64, 64) model inputs and (N, findings) labels, as
        :func:`training.thyroid.load_thyroid_arrays` gives them.
    count
        Number of examples to generate.
    seed
        Fixes both trainings, the label draw and the noise.
    dcgan_steps, srgan_steps
        Training steps of the two GANs.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f'Argument "count" should be a non-negative integer, got {count!r}.')
    _check_pairs(np.asarray(inputs), np.asarray(targets), 2 * ConditionalGenerator.size)
    started = time.perf_counter()
    high = np.asarray(inputs, dtype=np.float32)
    low = downsample(high).numpy()
    generator, dcgan_history = train_dcgan(low, targets, steps=dcgan_steps, seed=seed)
    sr, srgan_history = train_srgan(low, high, steps=srgan_steps, patch=16, seed=seed + 1)
    rng = np.random.default_rng([seed, 1001])
    wanted = np.asarray(targets, dtype=np.float32)[rng.integers(0, len(targets), count)]
    small = sample_images(generator, wanted, seed=seed + 2)
    big = upscale(sr, small)
    big = np.clip(big, float(high.min()), float(high.max()))
    seconds = time.perf_counter() - started
    return GeneratedExamples(big, wanted, dcgan_history, srgan_history, seconds)


# -- the MIBI super-resolution step ---------------------------------------------------------


def render_mibi_pairs(
    count: int, seed: int, *, smax: int | None = 7, phases: Sequence[str] = ("early", "delayed")
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The same MIBI phantoms at 128 and 256 px: (denoised 128 px counts, 256 px truth).

    The low-resolution image is what the engine has in hand when the super-resolution step
    runs: the Poisson acquisition at 128 px after the adaptive median filter (``smax``;
    ``None`` skips it). The target is the noise-free expected image of the same phantom at
    256 px (the phantom draws its anatomy in millimetres, so both matrices show the same
    neck; their totals agree to 0.1 %). Labels cycle through the five classes.

    Returns
    -------
    list of tuple
        One (128 x 128, 256 x 256) float32 pair per study and phase, in counts.
    """
    from mibi_node.imaging.denoise import adaptive_median
    from mibi_node.phantom.anatomy import CLASSES, GROUPS
    from mibi_node.phantom.generator import make_study
    from mibi_node.phantom.physics import decay_factor

    pairs = []
    for index in range(count):
        label = CLASSES[index % len(CLASSES)]
        low = make_study(label, seed=seed, index=index, matrix=128)
        high = make_study(label, seed=seed, index=index, matrix=256)
        p = high.parameters
        later = decay_factor(p.delayed_minutes - p.early_minutes)
        truth = {
            "early": np.sum([high.components[g].astype(np.float64) for g in GROUPS], axis=0),
            "delayed": np.sum(
                [p.retention[g] * later * high.components[g].astype(np.float64) for g in GROUPS],
                axis=0,
            ),
        }
        for phase in phases:
            image = low.images[phase].astype(np.float32)
            if smax is not None:
                image = adaptive_median(image, smax=smax)
            pairs.append((image.astype(np.float32), truth[phase].astype(np.float32)))
    return pairs


def train_mibi_superres(
    count: int = 60, *, seed: int = 0, steps: int = 600, smax: int | None = 7, patch: int = 32
) -> tuple[SRGenerator, GANHistory]:
    """Train the MIBI super-resolution SRGAN on freshly rendered phantom pairs.

    Each pair is scaled as :class:`~mibi_node.imaging.superres.SuperResolution` scales an
    image: the input divided by its robust maximum, the target by the same value over 4 (a
    256 px pixel holds a quarter of the counts of a 128 px one).

    Parameters
    ----------
    count
        Phantom studies (two pairs each, early and delayed).
    seed
        Phantom seed and training seed.
    steps, patch
        SRGAN steps and the side of the random low-resolution crops.
    smax
        The adaptive median filter of the bundle the generator is for.
    """
    from mibi_node.imaging.superres import count_reference

    pairs = render_mibi_pairs(count, seed, smax=smax)
    low, high = [], []
    for image, truth in pairs:
        reference = count_reference(image)
        low.append(image / reference)
        high.append(truth * (SRGenerator.scale**2 / reference))
    return train_srgan(
        np.stack(low)[:, None],
        np.stack(high)[:, None],
        steps=steps,
        patch=patch,
        seed=seed,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.gan thyroid RECIPE DATA --out DIR``: generate and save examples."""
    parser = argparse.ArgumentParser(prog="python -m training.gan")
    sub = parser.add_subparsers(dest="command", required=True)
    thyroid = sub.add_parser("thyroid", help="DCGAN + SRGAN examples from a thyroid folder")
    thyroid.add_argument("recipe", type=Path)
    thyroid.add_argument("data", type=Path)
    thyroid.add_argument("--out", type=Path, required=True)
    thyroid.add_argument("--count", type=int, default=None, help="default: one per study")
    thyroid.add_argument("--seed", type=int, default=0)
    thyroid.add_argument("--dcgan-steps", type=int, default=1500)
    thyroid.add_argument("--srgan-steps", type=int, default=600)
    mibi = sub.add_parser("mibi", help="train the MIBI super-resolution generator")
    mibi.add_argument("--out", type=Path, required=True, help="the superres.pt file to write")
    mibi.add_argument("--studies", type=int, default=60)
    mibi.add_argument("--seed", type=int, default=0)
    mibi.add_argument("--steps", type=int, default=600)
    mibi.add_argument("--smax", type=int, default=7)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(1)
    if args.command == "mibi":
        from mibi_node.imaging.superres import save_superres

        generator, history = train_mibi_superres(
            args.studies, seed=args.seed, steps=args.steps, smax=args.smax
        )
        save_superres(
            args.out, generator, studies=args.studies, seed=args.seed, steps=args.steps,
            smax=args.smax, content_l1=history.content[-1],
        )  # fmt: skip
        print(f"wrote {args.out} in {history.seconds:.1f} s (L1 {history.content[-1]:.4f})")
        return 0
    from training.thyroid import load_thyroid_arrays

    inputs, targets = load_thyroid_arrays(args.recipe, args.data)
    made = generate_examples(
        inputs,
        targets,
        len(inputs) if args.count is None else args.count,
        seed=args.seed,
        dcgan_steps=args.dcgan_steps,
        srgan_steps=args.srgan_steps,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.out / "examples.npz", inputs=made.inputs, targets=made.targets)
    print(
        f"wrote {len(made.inputs)} examples to {args.out / 'examples.npz'} in "
        f"{made.seconds:.1f} s (DCGAN {made.dcgan.seconds:.1f} s, SRGAN {made.srgan.seconds:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
