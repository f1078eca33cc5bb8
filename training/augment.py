"""Training-time augmentation of preprocessed model input, batched in torch.

The cached input is what the engine feeds the members (denoised, normalised, resized,
standardised). Augmentation undoes the standardisation, then per image:

1. **count scaling with Poisson resampling**: an acquisition with a fraction ``f`` of the
   counts is simulated by drawing ``Poisson(f * counts) / f`` per pixel, where the counts are
   estimated from the study's own count scale (:class:`training.data.Preprocessing`), so a
   low-count study gets proportionally more noise than a high-count one;
2. **intensity scaling**: a gain per phase (changes the early-to-delayed ratio a little);
3. **geometry**: left-right (and optionally up-down) flips, rotation, zoom and shift (a random
   crop), plus a smooth **elastic deformation**, all folded into one ``grid_sample`` call;

then standardises again. Everything is drawn from the caller's ``torch.Generator``, so an
epoch's augmentation is reproducible (which is what makes ``--resume`` exact).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F  # noqa: N812

from mibi_node.imaging.preprocess import Normalisation
from training.config import AugmentConfig

__all__ = ["Augmenter"]

logger = logging.getLogger(__name__)


class Augmenter:
    """Random transforms for a batch of model input.

    Parameters
    ----------
    config
        The ``[training.augment]`` settings.
    normalisation
        The recipe's normalisation (its clip and per-channel mean/std).
    channels
        Number of input channels.
    """

    def __init__(self, config: AugmentConfig, normalisation: Normalisation, channels: int) -> None:
        if not isinstance(config, AugmentConfig):
            raise TypeError(
                f'Argument "config" should be an AugmentConfig, not {type(config).__name__}.'
            )
        self.config = config
        self.clip = normalisation.clip
        mean = torch.tensor(normalisation.mean, dtype=torch.float32)
        std = torch.tensor(normalisation.std, dtype=torch.float32)
        self.mean = mean.expand(channels).reshape(1, channels, 1, 1).clone()
        self.std = std.expand(channels).reshape(1, channels, 1, 1).clone()

    def __call__(
        self, inputs: torch.Tensor, count_scale: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        """Augment a (B, C, S, S) batch on the CPU; ``count_scale`` is (B, C).

        Returns
        -------
        torch.Tensor
            A new (B, C, S, S) float32 batch.
        """
        if inputs.ndim != 4:
            raise ValueError(
                f'Argument "inputs" should be (B, C, S, S), got {tuple(inputs.shape)}.'
            )
        c = self.config
        batch, channels = inputs.shape[:2]
        raw = inputs.float() * self.std + self.mean

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(*shape, generator=generator)

        if c.counts_probability > 0 and c.counts[0] < 1:
            keep = uniform(*c.counts, batch, 1, 1, 1)
            chosen = torch.rand(batch, 1, 1, 1, generator=generator) < c.counts_probability
            scale = count_scale.float().reshape(batch, channels, 1, 1).clamp_min(1e-3) * keep
            resampled = torch.poisson(raw.clamp_min(0) * scale, generator=generator) / scale
            if self.clip is not None:
                resampled = resampled.clamp_max(self.clip)
            raw = torch.where(chosen, resampled, raw)
        if c.intensity != (1.0, 1.0):
            raw = raw * uniform(*c.intensity, batch, channels, 1, 1)

        grid = self._grid(batch, inputs.shape[-2], inputs.shape[-1], generator)
        warped = F.grid_sample(
            raw, grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )
        return ((warped - self.mean) / self.std).contiguous()

    def _grid(self, batch: int, rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
        c = self.config

        def uniform(low: float, high: float) -> torch.Tensor:
            return low + (high - low) * torch.rand(batch, generator=generator)

        flip_x = torch.where(torch.rand(batch, generator=generator) < c.hflip, -1.0, 1.0)
        flip_y = torch.where(torch.rand(batch, generator=generator) < c.vflip, -1.0, 1.0)
        angle = uniform(-c.rotate_degrees, c.rotate_degrees) * (math.pi / 180)
        # log-uniform zoom; the grid samples the input, so a zoom-in shrinks the sampled area
        zoom = torch.exp(uniform(math.log(c.scale[0]), math.log(c.scale[1])))
        shift = torch.stack([uniform(-c.shift, c.shift), uniform(-c.shift, c.shift)], dim=1) * 2
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * flip_x, -sin * flip_y, shift[:, 0]], dim=1),
                torch.stack([sin * flip_x, cos * flip_y, shift[:, 1]], dim=1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, [batch, 1, rows, cols], align_corners=False)
        if c.elastic_alpha > 0 and c.elastic_probability > 0:
            coarse = torch.randn(batch, 2, c.elastic_grid, c.elastic_grid, generator=generator)
            chosen = (
                torch.rand(batch, 1, 1, 1, generator=generator) < c.elastic_probability
            ).float()
            field = F.interpolate(
                coarse * (2 * c.elastic_alpha) * chosen,
                size=(rows, cols),
                mode="bicubic",
                align_corners=False,
            )
            grid = grid + field.permute(0, 2, 3, 1)
        return grid
