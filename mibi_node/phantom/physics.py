"""From activity to counts: decay, washout, collimator blur, Poisson noise and bad pixels."""

from __future__ import annotations

import logging

import numpy as np
from scipy import ndimage

__all__ = [
    "TC99M_HALF_LIFE_MINUTES",
    "acquire",
    "add_impulse_noise",
    "blur_and_bin",
    "decay_factor",
]

logger = logging.getLogger(__name__)

#: Physical half-life of 99mTc (6.01 h).
TC99M_HALF_LIFE_MINUTES = 6.01 * 60.0

_FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def decay_factor(minutes: float) -> float:
    """Fraction of 99mTc activity left after ``minutes``."""
    return float(0.5 ** (minutes / TC99M_HALF_LIFE_MINUTES))


def blur_and_bin(
    activity: np.ndarray, fwhm_mm: float, pixel_spacing_mm: float, oversample: int
) -> np.ndarray:
    """Blur a fine-grid activity map by the Gaussian PSF and sum it into camera pixels.

    Parameters
    ----------
    activity
        Square map on a grid ``oversample`` times finer than the camera's.
    fwhm_mm
        Full width at half maximum of the point-spread function.
    pixel_spacing_mm
        Camera pixel size.
    oversample
        Sub-pixels per camera pixel side.

    Returns
    -------
    numpy.ndarray
        The expected image (float64) on the camera grid, same total as ``activity``.
    """
    sigma = fwhm_mm * _FWHM_TO_SIGMA / (pixel_spacing_mm / oversample)
    blurred = ndimage.gaussian_filter(activity.astype(np.float64), sigma, mode="constant")
    n = activity.shape[0] // oversample
    return blurred.reshape(n, oversample, n, oversample).sum(axis=(1, 3))


def add_impulse_noise(image: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """Replace ``fraction`` of the pixels by dead (0) or hot pixels, in place.

    Hot pixels read between 1.5 and 4 times the image maximum (clipped to 16 bits), which is
    what an unstable photomultiplier or a bad energy-correction entry does to a planar image.
    """
    count = int(round(fraction * image.size))
    if count == 0:
        return image
    flat = image.reshape(-1)
    where = rng.choice(flat.size, size=count, replace=False)
    hot = rng.uniform(size=count) < 0.5
    peak = max(float(flat.max()), 1.0)
    values = np.where(hot, rng.uniform(1.5, 4.0, size=count) * peak, 0.0)
    flat[where] = np.clip(np.rint(values), 0, 65535).astype(flat.dtype)
    return image


def acquire(
    expected: np.ndarray, rng: np.random.Generator, impulse_fraction: float = 0.0
) -> np.ndarray:
    """Draw one acquisition: Poisson counts on the expected image, then bad pixels.

    Parameters
    ----------
    expected
        Expected counts per pixel (non-negative).
    rng
        The study's generator.
    impulse_fraction
        Fraction of pixels to spoil with :func:`add_impulse_noise`.

    Returns
    -------
    numpy.ndarray
        uint16 counts.
    """
    counts = rng.poisson(np.clip(expected, 0.0, None))
    image = np.clip(counts, 0, 65535).astype(np.uint16)
    return add_impulse_noise(image, impulse_fraction, rng)
