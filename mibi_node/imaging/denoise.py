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
SciPy ``mode="mirror"``). Both implementations compute the 3 x 3 order statistics for the
whole image at once (a median-of-9 sorting network over shifted views) and then the larger
windows only for the pixels still undecided, gathered into one array per window size; there
is no per-pixel Python loop, and they give bit-identical output. The comparisons are
written as ``a < b`` rather than ``a - b < 0`` so that unsigned integers cannot wrap around.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

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

    pad = smax // 2
    padded = np.pad(image, pad, mode="reflect")
    rows, cols = image.shape
    # window size 3 for every pixel, from the nine shifted views of the padded image
    neighbours = [
        padded[pad + dr : pad + dr + rows, pad + dc : pad + dc + cols]
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
    ]
    zmin = np.minimum.reduce(neighbours)
    zmax = np.maximum.reduce(neighbours)
    zmed = _median9(neighbours)
    stage_b = (zmin < zmed) & (zmed < zmax)
    keep = (zmin < image) & (image < zmax)
    out = np.where(keep, image, zmed)
    # larger windows only where stage A has not yet passed (few pixels in a real image)
    pending_r, pending_c = np.nonzero(~stage_b)
    pending_med = zmed[pending_r, pending_c]
    for size in range(5, smax + 1, 2):
        if pending_r.size == 0:
            break
        h = size // 2
        offsets = np.arange(-h, h + 1)
        windows = padded[
            (pending_r + pad)[:, None, None] + offsets[None, :, None],
            (pending_c + pad)[:, None, None] + offsets[None, None, :],
        ].reshape(pending_r.size, size * size)
        wmin, wmax = windows.min(axis=1), windows.max(axis=1)
        wmed = np.partition(windows, size * size // 2, axis=1)[:, size * size // 2]
        passed = (wmin < wmed) & (wmed < wmax)
        zxy = image[pending_r, pending_c]
        value = np.where((wmin < zxy) & (zxy < wmax), zxy, wmed)
        out[pending_r[passed], pending_c[passed]] = value[passed]
        pending_r, pending_c, pending_med = pending_r[~passed], pending_c[~passed], wmed[~passed]
    # past smax: the median of the largest window
    out[pending_r, pending_c] = pending_med
    return out


_MEDIAN9_NETWORK = (
    (1, 2), (4, 5), (7, 8), (0, 1), (3, 4), (6, 7), (1, 2), (4, 5), (7, 8),
    (0, 3), (5, 8), (4, 7), (3, 6), (1, 4), (2, 5), (4, 7), (4, 2), (6, 4), (4, 2),
)  # fmt: skip


def _median9(values: list[Any]) -> Any:
    """Median of nine equally shaped arrays or tensors, by a 19-exchange sorting network.

    Works for NumPy arrays and torch tensors alike (``minimum``/``maximum`` by duck typing).
    """
    p = list(values)
    lo: Any
    hi: Any
    if isinstance(p[0], np.ndarray):
        lo, hi = np.minimum, np.maximum
    else:
        import torch

        lo, hi = torch.minimum, torch.maximum
    for a, b in _MEDIAN9_NETWORK:
        p[a], p[b] = lo(p[a], p[b]), hi(p[a], p[b])
    return p[4]


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
    neighbours = [
        padded[:, pad + dr : pad + dr + rows, pad + dc : pad + dc + cols]
        for dr in (-1, 0, 1)
        for dc in (-1, 0, 1)
    ]
    zmin = torch.stack(neighbours).amin(dim=0)
    zmax = torch.stack(neighbours).amax(dim=0)
    zmed = _median9(neighbours)
    stage_b = (zmin < zmed) & (zmed < zmax)
    out = torch.where((zmin < x) & (x < zmax), x, zmed)
    pending = torch.nonzero(~stage_b, as_tuple=True)
    pending_med = zmed[pending]
    for size in range(5, smax + 1, 2):
        if pending[0].numel() == 0:
            break
        h = size // 2
        offsets = torch.arange(-h, h + 1, device=x.device)
        b, r, c = pending
        windows = padded[
            b[:, None, None],
            (r + pad)[:, None, None] + offsets[None, :, None],
            (c + pad)[:, None, None] + offsets[None, None, :],
        ].reshape(b.numel(), size * size)
        wmin, wmax = windows.amin(dim=1), windows.amax(dim=1)
        wmed = windows.kthvalue(size * size // 2 + 1, dim=1).values
        passed = (wmin < wmed) & (wmed < wmax)
        zxy = x[pending]
        value = torch.where((wmin < zxy) & (zxy < wmax), zxy, wmed)
        out[b[passed], r[passed], c[passed]] = value[passed]
        pending = (b[~passed], r[~passed], c[~passed])
        pending_med = wmed[~passed]
    out[pending] = pending_med
    return out.to(dtype).reshape(shape)
