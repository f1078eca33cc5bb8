"""Classical measurements on an anterior thyroid image: lobe uptake split and focal areas.

No model: point-source markers are removed (small, very bright spots), the thyroid is the
bright structure nearest the image centre, the midline is the valley between the lobes,
hot areas stand well above the gland's usual level and cold areas are deep dents that a
morphological closing fills. The numbers are meant to go with the model's findings, not to
replace a physician's regions of interest.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from scipy import ndimage

from mibi_node.analyses.thyroid.result import Nodule

__all__ = ["measure_thyroid"]

logger = logging.getLogger(__name__)

#: Thyroid outline, as a share of the way from background to the gland's bright level.
_OUTLINE = 0.2
#: A hot area peaks at least this many times the gland's upper-quartile level.
_HOT = 1.9
#: A cold area lacks at least this share of what its surroundings would predict.
_COLD = 0.35
#: A gland outline this round (axis ratio) and this much above background is one hot focus.
_ROUND = 1.6
_FOCUS = 6.0


def _disk_radius(radius: float) -> int:
    """The whole-pixel radius of the disk ``x**2 + y**2 <= r**2`` the morphology uses."""
    return max(1, int(round(radius)))


def _disk(radius: float) -> np.ndarray:
    r = _disk_radius(radius)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r * r


def _dilate_disk(mask: np.ndarray, radius: float) -> np.ndarray:
    """Binary dilation by the disk of :func:`_disk`, nothing outside the image.

    The same pixels as ``ndimage.binary_dilation(mask, _disk(radius))``, whose tables grow
    as the fourth power of the radius (gigabytes when the gland fills a pinhole image):
    a pixel is in the dilation when its nearest mask pixel lies within the disk. The
    distance transform is exact, ``sqrt`` of a whole number of squared pixels, so
    ``<= r`` decides exactly as ``dy**2 + dx**2 <= r**2`` does.
    """
    if not mask.any():
        return np.zeros(mask.shape, dtype=bool)
    distance = ndimage.distance_transform_edt(~mask)
    return np.asarray(distance <= _disk_radius(radius))


def _grey_disk(image: np.ndarray, radius: float, *, dilate: bool) -> np.ndarray:
    """Grey dilation (maximum) or erosion (minimum) over the flat disk of :func:`_disk`.

    The same values as ``ndimage.grey_dilation`` / ``grey_erosion`` with that footprint
    and their mirrored border, without their tables that grow as the fourth power of the
    radius. The disk is the union of its rows, so the extreme over it is the extreme, over
    the row offsets ``dy``, of a 1-D filter along that row's chord (half-width
    ``isqrt(r**2 - dy**2)``) shifted by ``dy``: about ``r`` 1-D filters. Rows beyond the
    image are left out: a mirrored pixel is never nearer than the pixel it mirrors, so
    the disk that reaches the copy reaches the original too, and the border adds nothing.
    """
    r = _disk_radius(radius)
    image = np.asarray(image, dtype=np.float64)
    rows = image.shape[0]
    filter1d = ndimage.maximum_filter1d if dilate else ndimage.minimum_filter1d
    combine = np.maximum if dilate else np.minimum
    offsets: dict[int, list[int]] = {}
    for dy in range(1, min(r, rows - 1) + 1):
        offsets.setdefault(math.isqrt(r * r - dy * dy), []).append(dy)
    out = filter1d(image, 2 * r + 1, axis=1, mode="reflect")
    for half, shifts in offsets.items():
        chord = filter1d(image, 2 * half + 1, axis=1, mode="reflect")
        for dy in shifts:
            combine(out[:-dy], chord[dy:], out=out[:-dy])  # the chord dy rows below
            combine(out[dy:], chord[:-dy], out=out[dy:])  # and dy rows above
    return np.asarray(out)


def _close_disk(image: np.ndarray, radius: float) -> np.ndarray:
    """Grey closing by the flat disk: ``ndimage.grey_closing(image, footprint=_disk(radius))``."""
    return _grey_disk(_grey_disk(image, radius, dilate=True), radius, dilate=False)


def _remove_markers(image: np.ndarray) -> np.ndarray:
    """Replace small spots far brighter than their surroundings by the local median."""
    median = ndimage.median_filter(image, size=9, mode="nearest")
    excess = image - median
    level = float(np.percentile(median, 99.5))
    spots = excess > max(level, 1.0) * 0.8
    labels, count = ndimage.label(ndimage.binary_dilation(spots, iterations=2))
    out = image.copy()
    if count:
        sizes = ndimage.sum(np.ones_like(image), labels, range(1, count + 1))
        small = np.isin(labels, 1 + np.flatnonzero(sizes <= 0.004 * image.size + 30))
        out[small] = median[small]
    return out


def _thyroid_mask(smooth: np.ndarray) -> tuple[np.ndarray, float]:
    """The thyroid's outline and the background level around it."""
    rows, cols = smooth.shape
    yy, xx = np.mgrid[0:rows, 0:cols]
    centre = np.exp(
        -(((yy - rows / 2) / (0.3 * rows)) ** 2 + ((xx - cols / 2) / (0.3 * cols)) ** 2)
    )
    peak = float(smooth.max())
    labels, count = ndimage.label(smooth > 0.3 * peak)
    if count == 0:
        return np.zeros_like(smooth, dtype=bool), 0.0
    index = range(1, count + 1)
    scores = np.asarray(ndimage.sum(smooth * centre, labels, index))
    seed = labels == 1 + int(np.argmax(scores))
    scale = max(3.0, float(np.sqrt(seed.sum())))
    ring = _dilate_disk(seed, 0.6 * scale) & ~_dilate_disk(seed, 0.3 * scale)
    ring &= labels == 0
    background = float(np.median(smooth[ring])) if ring.any() else 0.0
    level = float(np.percentile(smooth[seed], 75))
    outline = smooth > background + _OUTLINE * (level - background)
    labels, _ = ndimage.label(outline)
    keep = np.unique(labels[seed & outline])
    mask = np.isin(labels, keep[keep > 0])
    mask = ndimage.binary_fill_holes(ndimage.binary_closing(mask, _disk(2)))
    return mask, background


def _body_midline(clean: np.ndarray) -> float:
    """The patient's midline from the (symmetric) neck and salivary glands."""
    capped = np.minimum(clean, float(np.percentile(clean, 80)))
    profile = capped.sum(axis=0)
    columns = np.arange(clean.shape[1])
    return float((columns * profile).sum() / max(float(profile.sum()), 1e-9))


def _midline(net: np.ndarray, mask: np.ndarray, body: float) -> float:
    """Column between the lobes: the gland profile's deepest valley near the body midline."""
    if _is_round(mask):  # one lobe or one focus: only the body tells where the middle is
        return body
    profile = ndimage.gaussian_filter1d((net * mask).sum(axis=0), 1.5)
    columns = np.flatnonzero(mask.any(axis=0))
    width = int(columns[-1] - columns[0] + 1)
    lo = max(int(columns[0]) + width // 5, int(round(body - 0.15 * width)))
    hi = min(int(columns[-1]) - width // 5, int(round(body + 0.15 * width)))
    if hi - lo < 2:
        return body
    inner = np.arange(lo, hi + 1)
    return float(inner[int(np.argmin(profile[inner]))])


def _lobe(col: float, midline: float, half_isthmus: float) -> str:
    if abs(col - midline) <= half_isthmus:
        return "isthmus"
    return "right" if col < midline else "left"


def measure_thyroid(image: np.ndarray) -> tuple[dict[str, float], tuple[Nodule, ...]]:
    """Split the thyroid's counts between the lobes and find focal hot and cold areas.

    Parameters
    ----------
    image
        An anterior thyroid image (rows, columns), counts; the patient's right is on the
        image's left.

    Returns
    -------
    lobe_uptake
        ``{"right": r, "left": l}``, background-subtracted, summing to 1 (0.5 each when no
        gland can be outlined).
    nodules
        Hot and cold areas inside the outlined gland.
    """
    pixels = np.asarray(image, dtype=np.float64)
    if pixels.ndim != 2 or min(pixels.shape) < 16:
        raise ValueError(
            f'Argument "image" should be a 2-D image of 16 x 16 or more, got {pixels.shape}.'
        )
    pixels = np.nan_to_num(np.clip(pixels, 0.0, None))
    clean = _remove_markers(pixels)
    smooth = ndimage.gaussian_filter(clean, 1.0)
    mask, background = _thyroid_mask(smooth)
    if mask.sum() < 4:
        return {"right": 0.5, "left": 0.5}, ()
    net = np.clip(clean - background, 0.0, None) * mask
    midline = _midline(net, mask, _body_midline(clean))
    cols = np.arange(pixels.shape[1])[np.newaxis, :]
    right = float(net[:, cols[0] < midline].sum()) + 0.5 * float(
        net[:, np.abs(cols[0] - midline) < 0.5].sum()
    )
    total = float(net.sum())
    share = right / total if total > 0 else 0.5
    uptake = {"right": share, "left": 1.0 - share}
    scale = float(np.sqrt(mask.sum()))
    nodules = _hot(smooth, mask, midline, scale, background) + _cold(smooth, mask, midline, scale)
    return uptake, tuple(nodules)


def _components(found: np.ndarray, minimum: float) -> list[tuple[float, float, float]]:
    labels, count = ndimage.label(found)
    out = []
    for i in range(1, count + 1):
        region = labels == i
        area = float(region.sum())
        if area < minimum:
            continue
        row, col = ndimage.center_of_mass(region)
        out.append((float(row), float(col), float(np.sqrt(area / np.pi))))
    return out


def _is_round(mask: np.ndarray) -> bool:
    """Whether the outline is one round blob rather than two elongated lobes."""
    rows, cols = np.nonzero(mask)
    if rows.size < 5:
        return False
    eig = np.linalg.eigvalsh(np.cov(np.stack([rows, cols]).astype(np.float64)))
    return bool(np.sqrt(eig[-1] / max(eig[0], 1e-9)) < _ROUND)


def _hot(
    smooth: np.ndarray, mask: np.ndarray, midline: float, scale: float, background: float
) -> list[Nodule]:
    level = float(np.percentile(smooth[mask], 75))
    hot = mask & (smooth > _HOT * level)
    if not hot.any() and _is_round(mask) and level > _FOCUS * max(background, 1e-9):
        hot = mask & (smooth > 0.5 * float(smooth[mask].max()))  # the rest is suppressed
    return [
        Nodule(row, col, radius, "hot", _lobe(col, midline, 0.04 * scale))  # type: ignore[arg-type]
        for row, col, radius in _components(hot, max(3.0, 0.005 * scale**2))
    ]


def _cold(smooth: np.ndarray, mask: np.ndarray, midline: float, scale: float) -> list[Nodule]:
    closed = _close_disk(smooth, 0.4 * scale)
    level = float(np.percentile(smooth[mask], 75))
    inside = ndimage.binary_erosion(mask, _disk(1))
    deficit = (closed - smooth) / np.maximum(closed, 1e-9)
    columns = np.flatnonzero(mask.any(axis=0))
    between = np.abs(np.arange(mask.shape[1]) - midline) < 0.12 * (columns[-1] - columns[0] + 1)
    inside &= ~between[np.newaxis, :]  # the notch above the isthmus is no nodule
    cold = inside & (deficit > _COLD) & (closed > 0.5 * level)
    return [
        Nodule(row, col, radius, "cold", _lobe(col, midline, 0.04 * scale))  # type: ignore[arg-type]
        for row, col, radius in _components(cold, max(3.0, 0.01 * scale**2))
    ]
