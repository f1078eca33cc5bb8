"""Turn where the model looks into a suspected focus on the source image.

The members' attention heads say which cells of their last feature map the class token drew
on. Those maps are coarse (a 224 px input gives 7 x 7 cells, 64 px only 2 x 2), so the focus
is the hottest point of the delayed image *within* the attended region: the score is the
upsampled, view- and member-averaged attention times the normalised delayed uptake, and its
maximum is the focus. Side and pole come from the thyroid bed, outlined on the anatomy
channel (the thyroid phase if the bundle has it, else the early phase, where the thyroid is
brightest) by thresholding at a fraction of its maximum:

* side: MIBI neck images are anterior views, so image-left of the bed's midline is the
  patient's **right**;
* pole: above the bed's middle row is ``upper``, below it ``lower``; beyond the bed's
  bounding box by more than a margin of its height/width is ``ectopic``.

All of this is computed in the model-input frame and the point is then mapped to the source
pixels with the phase's :class:`~mibi_node.imaging.preprocess.Geometry`. How good the focus is
against the phantoms' known lesion centres is measured by the training code's evaluation.
"""

from __future__ import annotations

import logging
from typing import Literal

import numpy as np

from mibi_node.imaging.preprocess import Geometry
from mibi_node.inference.result import Focus

__all__ = ["find_focus", "thyroid_bed"]

logger = logging.getLogger(__name__)

#: Fraction of the anatomy image's maximum that outlines the thyroid bed.
BED_THRESHOLD = 0.3
#: How far outside the bed's bounding box, relative to its size, a focus counts as ectopic.
ECTOPIC_MARGIN = 0.25


def thyroid_bed(anatomy: np.ndarray) -> tuple[float, float, float, float, float]:
    """Outline the thyroid bed on a 2-D anatomy image.

    Returns
    -------
    tuple of float
        Midline column (uptake-weighted), top row, bottom row, left column, right column.
    """
    image = np.clip(np.asarray(anatomy, dtype=np.float64), 0.0, None)
    peak = image.max()
    if not peak > 0:
        rows, cols = image.shape
        return (cols - 1) / 2, 0.0, rows - 1.0, 0.0, cols - 1.0
    mask = image >= BED_THRESHOLD * peak
    weights = np.where(mask, image, 0.0)
    row_idx, col_idx = np.nonzero(mask)
    midline = float((weights.sum(axis=0) * np.arange(image.shape[1])).sum() / weights.sum())
    return (
        midline,
        float(row_idx.min()),
        float(row_idx.max()),
        float(col_idx.min()),
        float(col_idx.max()),
    )


def find_focus(
    attention: np.ndarray,
    uptake: np.ndarray,
    anatomy: np.ndarray,
    geometry: Geometry,
    phase: str = "delayed",
) -> Focus:
    """Locate the suspected focus of one study.

    Parameters
    ----------
    attention
        (S, S) attention in the model-input frame, non-negative.
    uptake
        (S, S) model-input channel of the phase the focus is reported on (delayed).
    anatomy
        (S, S) model-input channel that outlines the thyroid bed (thyroid or early phase).
    geometry
        Geometry of the ``phase`` image, to map the focus back to its source pixels.
    phase
        Name of the phase the coordinates refer to.

    Returns
    -------
    Focus
        Source-pixel position, patient side and pole.
    """
    if attention.shape != uptake.shape or attention.shape != anatomy.shape:
        raise ValueError(
            f"attention {attention.shape}, uptake {uptake.shape} and anatomy {anatomy.shape} "
            "should have the same shape"
        )
    weight = np.clip(attention.astype(np.float64), 0.0, None)
    hot = np.clip(uptake.astype(np.float64), 0.0, None)
    score = weight * hot
    if not score.max() > 0:
        score = weight if weight.max() > 0 else hot
    row, col = np.unravel_index(int(np.argmax(score)), score.shape)
    # sub-pixel position: score-weighted centroid of the 3 x 3 neighbourhood
    r0, r1 = max(row - 1, 0), min(row + 2, score.shape[0])
    c0, c1 = max(col - 1, 0), min(col + 2, score.shape[1])
    patch = score[r0:r1, c0:c1]
    if patch.sum() > 0:
        rr, cc = np.mgrid[r0:r1, c0:c1]
        model_row = float((patch * rr).sum() / patch.sum())
        model_col = float((patch * cc).sum() / patch.sum())
    else:
        model_row, model_col = float(row), float(col)

    midline, top, bottom, left, right = thyroid_bed(anatomy)
    side: Literal["left", "right"] = "right" if model_col < midline else "left"
    height, width = bottom - top + 1, right - left + 1
    outside = (
        model_row < top - ECTOPIC_MARGIN * height
        or model_row > bottom + ECTOPIC_MARGIN * height
        or model_col < left - ECTOPIC_MARGIN * width
        or model_col > right + ECTOPIC_MARGIN * width
    )
    pole: Literal["upper", "lower", "ectopic"] = (
        "ectopic" if outside else "upper" if model_row <= (top + bottom) / 2 else "lower"
    )

    src_row, src_col = geometry.to_source(model_row, model_col)
    rows, cols = geometry.source_shape
    return Focus(
        row=float(np.clip(src_row, 0, rows - 1)),
        col=float(np.clip(src_col, 0, cols - 1)),
        side=side,
        pole=pole,
        phase=phase,
    )
