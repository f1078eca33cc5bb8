"""A labelled PNG montage of phantom studies, for people to look at."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from mibi_node.phantom.generator import PhantomStudy
from mibi_node.phantom.physics import decay_factor

__all__ = ["retention_map", "write_montage"]

logger = logging.getLogger(__name__)


def retention_map(study: PhantomStudy) -> np.ndarray:
    """Decay-corrected delayed/early ratio, smoothed, and blank outside the bright organs.

    Thyroid tissue reads about 0.35-0.5 and parathyroid lesions 0.5-0.8, so a focus that
    retains MIBI stands out from the lobe around it.
    """
    p = study.parameters
    sigma = 6.0 / p.pixel_spacing_mm
    early = ndimage.gaussian_filter(ndimage.median_filter(study.images["early"], 3) * 1.0, sigma)
    delayed = ndimage.gaussian_filter(
        ndimage.median_filter(study.images["delayed"], 3) * 1.0, sigma
    )
    ratio = delayed / np.maximum(early, 1e-6) / decay_factor(p.delayed_minutes - p.early_minutes)
    neck = _neck_box(study)
    mask = np.zeros(early.shape, dtype=bool)
    mask[neck] = early[neck] > 0.35 * np.percentile(early[neck], 99.0)
    return np.where(mask, ratio, np.nan)


def _neck_box(study: PhantomStudy) -> tuple[slice, slice]:
    """Rows and columns within about 60 mm of the thyroid, clipped to the image."""
    p = study.parameters
    cx, cy = p.thyroid_centre_mm
    top, left = study.pixel(cx - 60.0, cy - 60.0)
    bottom, right = study.pixel(cx + 60.0, cy + 70.0)
    n = p.matrix

    def clip(v: float) -> int:
        return int(min(max(round(v), 0), n))

    return slice(clip(top), clip(bottom)), slice(clip(left), clip(right))


def write_montage(studies: Sequence[PhantomStudy], path: str | Path, max_studies: int = 24) -> Path:
    """Write early, delayed and retention map of each study side by side, labelled.

    Parameters
    ----------
    studies
        The studies; only the first ``max_studies`` are drawn.
    path
        The PNG file to write.
    max_studies
        Cap that keeps the image readable.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Circle

    if not studies:
        raise ValueError('Argument "studies" should hold at least one study.')
    shown = list(studies)[:max_studies]
    if len(studies) > max_studies:
        logger.info("preview shows the first %d of %d studies", max_studies, len(studies))
    per_row = 2
    rows = (len(shown) + per_row - 1) // per_row
    fig, axes = plt.subplots(
        rows, 3 * per_row, figsize=(3 * per_row * 1.9, rows * 2.4), squeeze=False
    )
    for ax in axes.ravel():
        ax.set_axis_off()
    for number, study in enumerate(shown):
        row, col = divmod(number, per_row)
        panels = axes[row, 3 * col : 3 * col + 3]
        p = study.parameters
        for ax, phase in zip(panels[:2], ("early", "delayed"), strict=True):
            image = study.images[phase]
            # Window on the neck, as a reader would; the heart may saturate.
            vmax = float(np.percentile(image[_neck_box(study)], 99.5))
            ax.imshow(image, cmap="gray_r", vmin=0, vmax=vmax)
            minutes = p.early_minutes if phase == "early" else p.delayed_minutes
            ax.set_title(f"{phase} {minutes:.0f} min", fontsize=7)
        panels[2].imshow(retention_map(study), cmap="magma", vmin=0.2, vmax=0.9)
        panels[2].set_title("retention (decay-corr.)", fontsize=7)
        for lesion in p.lesions:
            r, c = study.pixel(lesion.x_mm, lesion.y_mm)
            radius = 0.9 * lesion.diameter_mm / p.pixel_spacing_mm + 2
            panels[2].add_patch(Circle((c, r), radius, fill=False, color="cyan", lw=0.6))
        extra = f" ({p.confounder})" if p.confounder else ""
        panels[0].text(
            0,
            -0.16,
            f"#{study.index + 1} {study.label}{extra}",
            transform=panels[0].transAxes,
            fontsize=8,
            fontweight="bold",
            color="darkred",
        )
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
