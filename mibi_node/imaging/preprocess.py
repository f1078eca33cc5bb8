"""Turn denoised phase images into the fixed-size, normalised array a bundle's members expect.

Each phase is scaled by its robust maximum (or the study's, see :class:`Normalisation`),
padded with zeros to a square, resized to the bundle's input size and standardised with the
bundle's per-channel mean and standard deviation. Phases of different matrix sizes (a 128
early and a 256 delayed image) are each resized on their own, so they need not match. The
:class:`Geometry` of every phase maps model-input pixel coordinates back to the source image,
which is how a focus found by the model becomes a point on the source frame.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Geometry", "Normalisation", "normalise", "resize_square", "to_model_input"]

logger = logging.getLogger(__name__)

NormalisationMethod = Literal["percentile", "max", "none"]
NormalisationScope = Literal["channel", "study"]


@dataclass(frozen=True)
class Normalisation:
    """How raw counts become model input; stored in the bundle, so training and use agree.

    Attributes
    ----------
    method
        ``"percentile"`` divides by the given percentile of the counts (robust to a few hot
        pixels), ``"max"`` by the maximum, ``"none"`` leaves the counts as they are.
    percentile
        The percentile used by ``"percentile"``, in (0, 100].
    scope
        ``"channel"`` scales every phase by its own reference value; ``"study"`` scales all
        phases by the first phase's, which keeps the early-to-delayed washout visible.
    clip
        Scaled values are clipped to ``[0, clip]``; ``None`` clips only below at 0.
    mean, std
        Per-channel standardisation applied last, ``(x - mean) / std``.
    """

    method: NormalisationMethod = "percentile"
    percentile: float = 99.5
    scope: NormalisationScope = "channel"
    clip: float | None = 1.5
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)

    def __post_init__(self) -> None:
        if self.method not in ("percentile", "max", "none"):
            raise ValueError(
                f'Argument "method" should be "percentile", "max" or "none", got {self.method!r}.'
            )
        if self.scope not in ("channel", "study"):
            raise ValueError(
                f'Argument "scope" should be "channel" or "study", got {self.scope!r}.'
            )
        if not 0 < self.percentile <= 100:
            raise ValueError(f'Argument "percentile" should be in (0, 100], got {self.percentile}.')
        if self.clip is not None and self.clip <= 0:
            raise ValueError(f'Argument "clip" should be positive, got {self.clip}.')
        if not self.mean or len(self.mean) != len(self.std):
            raise ValueError('Arguments "mean" and "std" should have the same, non-zero length.')
        if any(s <= 0 for s in self.std):
            raise ValueError(f'Argument "std" should hold positive values, got {self.std}.')


@dataclass(frozen=True)
class Geometry:
    """Where a model-input pixel lies in the source image (zero padding to a square, resize).

    Attributes
    ----------
    source_shape
        Rows and columns of the source image.
    size
        Side of the square model input.
    pad
        Rows added above and columns added left of the source before resizing.
    """

    source_shape: tuple[int, int]
    size: int
    pad: tuple[int, int]

    @property
    def scale(self) -> float:
        """Model-input pixels per source pixel."""
        return self.size / max(self.source_shape)

    def to_source(self, row: float, col: float) -> tuple[float, float]:
        """Map a model-input pixel position (pixel centres at integers) to source pixels."""
        side = max(self.source_shape)
        factor = side / self.size
        return (
            (row + 0.5) * factor - 0.5 - self.pad[0],
            (col + 0.5) * factor - 0.5 - self.pad[1],
        )


def _reference_value(image: np.ndarray, normalisation: Normalisation) -> float:
    if normalisation.method == "max":
        value = float(image.max())
    else:
        value = float(np.percentile(image, normalisation.percentile))
    if not value > 0:
        value = float(image.max())
    return value if value > 0 else 1.0


def normalise(images: Sequence[np.ndarray], normalisation: Normalisation) -> list[np.ndarray]:
    """Scale and clip the phase images (not yet standardised; see :func:`to_model_input`).

    Parameters
    ----------
    images
        One 2-D array per channel, in the bundle's channel order.
    normalisation
        The bundle's normalisation.

    Returns
    -------
    list of numpy.ndarray
        float32 images, scaled by the reference value and clipped.
    """
    arrays = [np.asarray(image, dtype=np.float32) for image in images]
    if normalisation.method == "none":
        scales = [1.0] * len(arrays)
    elif normalisation.scope == "study":
        scales = [_reference_value(arrays[0], normalisation)] * len(arrays)
    else:
        scales = [_reference_value(array, normalisation) for array in arrays]
    out = []
    for array, scale in zip(arrays, scales, strict=True):
        scaled = array / np.float32(scale)
        out.append(np.clip(scaled, 0.0, normalisation.clip).astype(np.float32, copy=False))
    return out


def resize_square(image: np.ndarray, size: int) -> tuple[np.ndarray, Geometry]:
    """Pad a 2-D image with zeros to a centred square and resize it to ``size`` x ``size``.

    Bilinear interpolation with antialiasing when shrinking, so a 256 px image and a 128 px
    image of the same neck give the same input.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f'Argument "size" should be an integer >= 8, got {size!r}.')
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f'Argument "image" should be a non-empty 2-D array, got {image.shape}.')
    rows, cols = image.shape
    side = max(rows, cols)
    pad = ((side - rows) // 2, (side - cols) // 2)
    square = np.zeros((side, side), dtype=np.float32)
    square[pad[0] : pad[0] + rows, pad[1] : pad[1] + cols] = image
    if side != size:
        tensor = torch.from_numpy(square)[None, None]
        tensor = F.interpolate(
            tensor, size=(size, size), mode="bilinear", align_corners=False, antialias=side > size
        )
        square = tensor[0, 0].numpy()
    return square, Geometry(source_shape=(rows, cols), size=size, pad=pad)


def to_model_input(
    images: Sequence[np.ndarray], size: int, normalisation: Normalisation
) -> tuple[np.ndarray, list[Geometry]]:
    """Normalise, square and standardise the phase images of one study.

    Parameters
    ----------
    images
        One denoised 2-D array per channel, in the bundle's channel order.
    size
        Side of the square model input.
    normalisation
        The bundle's normalisation; its ``mean``/``std`` have one entry per channel, or one
        entry for all channels.

    Returns
    -------
    tuple
        The (channels, size, size) float32 input and each channel's :class:`Geometry`.
    """
    scaled = normalise(images, normalisation)
    resized = [resize_square(image, size) for image in scaled]
    stack = np.stack([array for array, _ in resized])
    channels = stack.shape[0]
    if len(normalisation.mean) not in (1, channels):
        raise ValueError(
            f"normalisation has {len(normalisation.mean)} mean/std values for {channels} channels"
        )
    mean = np.broadcast_to(np.asarray(normalisation.mean, dtype=np.float32), (channels,))
    std = np.broadcast_to(np.asarray(normalisation.std, dtype=np.float32), (channels,))
    stack = (stack - mean[:, None, None]) / std[:, None, None]
    return stack.astype(np.float32, copy=False), [geometry for _, geometry in resized]
