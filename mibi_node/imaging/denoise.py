"""The patent's adaptive median filter, in a vectorised NumPy/SciPy and a batched torch form.

The algorithm (seed 000, "noise reduction pretreatment") looks at every pixel ``zxy`` through
windows of growing size ``3, 5, ..., smax``. With ``zmin``, ``zmed`` and ``zmax`` the minimum,
median and maximum of the current window:

* stage A: if ``zmin < zmed < zmax`` the median is not an impulse, go to stage B; otherwise
  grow the window, and once the window would pass ``smax`` output ``zmed`` (of the largest
  window);
* stage B: if ``zmin < zxy < zmax`` the pixel is not an impulse, output ``zxy``; otherwise
  output ``zmed``.

Borders are mirrored without repeating the edge pixel (NumPy ``np.pad(mode="reflect")``,
SciPy ``mode="mirror"``). Both implementations compute whole-image order statistics per
window size and combine them with masks, so there is no per-pixel Python loop; they give
bit-identical output. The comparisons are written as ``a < b`` rather than ``a - b < 0`` so
that unsigned integer images cannot wrap around.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import numpy as np
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = ["adaptive_median", "adaptive_median_torch"]

logger = logging.getLogger(__name__)


def _check_smax(smax: object) -> int:
    if isinstance(smax, bool) or not isinstance(smax, int | np.integer):
        raise TypeError(
            f'Argument "smax" should be an odd integer >= 3, not {type(smax).__name__}.'
        )
    if smax < 3 or smax % 2 == 0:
        raise ValueError(f'Argument "smax" should be an odd integer >= 3, got {smax}.')
    return int(smax)


def adaptive_median(image: np.ndarray, smax: int = 7) -> np.ndarray:
    """Denoise one 2-D image with the two-stage adaptive median filter.

    Parameters
    ----------
    image
        A 2-D array of integers or floats (rows, columns); must hold no NaN or infinity.
    smax
        The largest window side, an odd integer >= 3.

    Returns
    -------
    numpy.ndarray
        The filtered image, same shape and dtype as ``image``.

    Raises
    ------
    TypeError
        ``image`` is not a NumPy array of a real dtype, or ``smax`` is not an integer.
    ValueError
        ``image`` is not 2-D, is empty or holds non-finite values, or ``smax`` is even or < 3.
    """
    smax = _check_smax(smax)
    if not isinstance(image, np.ndarray):
        raise TypeError(f'Argument "image" should be a numpy.ndarray, not {type(image).__name__}.')
    if image.dtype.kind not in "iuf":
        raise TypeError(f'Argument "image" should hold integers or floats, not {image.dtype}.')
    if image.ndim != 2 or image.size == 0:
        raise ValueError(f'Argument "image" should be a non-empty 2-D array, got {image.shape}.')
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError('Argument "image" holds NaN or infinite values.')

    zxy = image
    out = np.empty_like(image)
    undecided = np.ones(image.shape, dtype=bool)
    zmed = image
    for size in range(3, smax + 1, 2):
        zmin = ndimage.minimum_filter(image, size=size, mode="mirror")
        zmax = ndimage.maximum_filter(image, size=size, mode="mirror")
        zmed = ndimage.median_filter(image, size=size, mode="mirror")
        stage_b = undecided & (zmin < zmed) & (zmed < zmax)
        keep = (zmin < zxy) & (zxy < zmax)
        out[stage_b] = np.where(keep, zxy, zmed)[stage_b]
        undecided &= ~stage_b
        if not undecided.any():
            break
    else:
        out[undecided] = zmed[undecided]
    return out


def _mirror_index(n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Indices that extend an axis of length ``n`` by ``pad`` on each side, mirrored.

    Matches ``np.pad(mode="reflect")`` also when ``pad >= n`` (the reflection repeats).
    """
    import torch

    idx = torch.arange(-pad, n + pad, device=device)
    if n == 1:
        return torch.zeros_like(idx)
    period = 2 * (n - 1)
    idx = torch.remainder(idx, period)
    return torch.where(idx >= n, period - idx, idx)


def adaptive_median_torch(images: torch.Tensor, smax: int = 7) -> torch.Tensor:
    """Denoise a batch of images with the adaptive median filter, on the tensor's device.

    Gives exactly the output of :func:`adaptive_median` for every image of the batch.

    Parameters
    ----------
    images
        A tensor of shape (..., rows, columns), integer or floating point, all finite.
    smax
        The largest window side, an odd integer >= 3.

    Returns
    -------
    torch.Tensor
        The filtered images, same shape, dtype and device as ``images``.

    Raises
    ------
    TypeError
        ``images`` is not a real-valued tensor, or ``smax`` is not an integer.
    ValueError
        ``images`` has fewer than 2 dimensions or is empty, or ``smax`` is even or < 3.
    """
    import torch

    smax = _check_smax(smax)
    if not isinstance(images, torch.Tensor):
        raise TypeError(f'Argument "images" should be a torch.Tensor, not {type(images).__name__}.')
    if images.is_complex() or images.dtype == torch.bool:
        raise TypeError(f'Argument "images" should hold integers or floats, not {images.dtype}.')
    if images.ndim < 2 or images.numel() == 0:
        raise ValueError(
            f'Argument "images" should be a non-empty (..., rows, columns) tensor, '
            f"got {tuple(images.shape)}."
        )
    shape, dtype = images.shape, images.dtype
    rows, cols = shape[-2], shape[-1]
    x = images.reshape(-1, rows, cols)
    if not dtype.is_floating_point:
        # Order statistics of an odd window are input values, so a float round trip is exact
        # as long as the float type holds every integer of the image.
        wide = x.abs().max().item() >= 2**24
        x = x.to(torch.float64 if wide else torch.float32)
    elif dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    pad = smax // 2
    padded = x[:, _mirror_index(rows, pad, x.device)][:, :, _mirror_index(cols, pad, x.device)]

    out = torch.empty_like(x)
    undecided = torch.ones_like(x, dtype=torch.bool)
    zmed = x
    for size in range(3, smax + 1, 2):
        start = pad - size // 2
        window = padded[:, start : start + rows + size - 1, start : start + cols + size - 1]
        patches = window.unfold(1, size, 1).unfold(2, size, 1).reshape(*x.shape, size * size)
        zmin = patches.amin(dim=-1)
        zmax = patches.amax(dim=-1)
        zmed = patches.median(dim=-1).values
        stage_b = undecided & (zmin < zmed) & (zmed < zmax)
        keep = (zmin < x) & (x < zmax)
        out = torch.where(stage_b, torch.where(keep, x, zmed), out)
        undecided &= ~stage_b
        if not bool(undecided.any()):
            break
    else:
        out = torch.where(undecided, zmed, out)
    return out.to(dtype).reshape(shape)
