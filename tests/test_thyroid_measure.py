"""The measurements' disk morphology against scipy's own filters, on random and phantom images.

``measure.py`` dilates and closes by disks that grow with the gland; scipy's footprint
filters need tables that grow as the fourth power of the radius, so the module computes
the same operations another way. The references here call scipy directly with the disk
the module always used (``x**2 + y**2 <= r**2``, ``r`` the rounded radius, at least 1), and
every comparison asks for identical pixels, not close ones.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from mibi_node.analyses.thyroid import measure
from mibi_node.analyses.thyroid.measure import measure_thyroid
from mibi_node.analyses.thyroid.phantom import make_thyroid_study


def _reference_disk(radius: float) -> np.ndarray:
    r = max(1, int(round(radius)))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return xx**2 + yy**2 <= r * r


def _reference_dilation(mask: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(ndimage.binary_dilation(mask, _reference_disk(radius)))


def _reference_closing(image: np.ndarray, radius: float) -> np.ndarray:
    return np.asarray(ndimage.grey_closing(image, footprint=_reference_disk(radius)))


def _reference_grey(image: np.ndarray, radius: float, dilate: bool) -> np.ndarray:
    f = ndimage.grey_dilation if dilate else ndimage.grey_erosion
    return np.asarray(f(image, footprint=_reference_disk(radius)))


# (rows, columns, radius): square and oblong, radii from below one pixel to wider than the
# short side (several mirror images deep), halves that Python rounds to even.
_CASES = [
    (16, 16, 0.3),
    (16, 16, 1.0),
    (16, 16, 2.5),
    (16, 16, 3.5),
    (20, 31, 6.0),
    (17, 40, 9.4),
    (16, 60, 21.0),
    (45, 18, 30.0),
    (64, 64, 12.0),
    (64, 64, 25.6),
    (96, 80, 18.0),
]


@pytest.mark.parametrize(("rows", "cols", "radius"), _CASES)
@pytest.mark.parametrize("density", [0.002, 0.05, 0.5, 0.97])
def test_dilation_matches_scipy_on_random_masks(
    rows: int, cols: int, radius: float, density: float
) -> None:
    rng = np.random.default_rng([rows, cols, int(10 * radius), int(1000 * density)])
    mask = rng.random((rows, cols)) < density
    assert np.array_equal(measure._dilate_disk(mask, radius), _reference_dilation(mask, radius))


@pytest.mark.parametrize("mask", [np.zeros((20, 24), bool), np.ones((20, 24), bool)])
def test_dilation_of_empty_and_full_masks(mask: np.ndarray) -> None:
    for radius in (1.0, 5.0, 30.0):
        assert np.array_equal(measure._dilate_disk(mask, radius), _reference_dilation(mask, radius))


def test_dilation_of_single_pixels_is_the_disk() -> None:
    # one pixel in the middle and one in a corner: the disk itself, and its clipped quarter
    for radius in (1.0, 2.0, 4.4, 7.0, 11.0):
        mask = np.zeros((31, 33), bool)
        mask[15, 16] = True
        mask[0, 32] = True
        assert np.array_equal(measure._dilate_disk(mask, radius), _reference_dilation(mask, radius))


@pytest.mark.parametrize(("rows", "cols", "radius"), _CASES)
@pytest.mark.parametrize("levels", [0, 3, 50])
def test_grey_filters_match_scipy_on_random_images(
    rows: int, cols: int, radius: float, levels: int
) -> None:
    """Continuous values, and few grey levels (many ties), dilation, erosion and closing."""
    rng = np.random.default_rng([rows, cols, int(10 * radius), levels])
    image = rng.random((rows, cols)) * 100.0
    if levels:
        image = np.floor(image * levels / 100.0)
    for dilate in (True, False):
        got = measure._grey_disk(image, radius, dilate=dilate)
        assert np.array_equal(got, _reference_grey(image, radius, dilate))
    assert np.array_equal(measure._close_disk(image, radius), _reference_closing(image, radius))


def test_grey_filters_on_a_single_bright_pixel() -> None:
    # the dilation of one bright pixel is the disk, wherever the mirrored border puts copies
    for radius in (2.0, 5.0, 9.0):
        image = np.zeros((24, 27))
        image[3, 20] = 5.0
        got = measure._grey_disk(image, radius, dilate=True)
        assert np.array_equal(got, _reference_grey(image, radius, True))
        got = measure._grey_disk(-image, radius, dilate=False)
        assert np.array_equal(got, _reference_grey(-image, radius, False))


def _phantom_inputs(study_image: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """What ``measure_thyroid`` filters: the smoothed image, the gland outline, its scale."""
    pixels = np.nan_to_num(np.clip(np.asarray(study_image, dtype=np.float64), 0.0, None))
    smooth = ndimage.gaussian_filter(measure._remove_markers(pixels), 1.0)
    mask, _ = measure._thyroid_mask(smooth)
    return smooth, mask, float(np.sqrt(mask.sum()))


def _magnified(seed: int, findings: tuple[str, ...], side: int) -> np.ndarray:
    """A pinhole study cropped to its gland and resized to ``side``: the outline fills it.

    The case that took gigabytes: the disks grow with the square root of the outline's
    area, up to 0.6 x 0.6 = 0.36 of the side here (23 px at 64 px, 92 px at 256 px).
    """
    study = make_thyroid_study(
        seed, findings, pinhole=True, matrix=128, with_markers=False, extra_view=False
    )
    _, mask, _ = _phantom_inputs(study.image)
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    half = 0.55 * max(np.ptp(rows), np.ptp(cols)) + 1
    centre = ((rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2)
    r0, c0 = (max(0, int(c - half)) for c in centre)
    r1, c1 = (min(128, int(c + half + 1)) for c in centre)
    crop = study.image[r0:r1, c0:c1].astype(np.float64)
    zoomed = ndimage.zoom(crop, (side / crop.shape[0], side / crop.shape[1]), order=1)
    return np.asarray(np.clip(zoomed, 0.0, None))


def _image(seed: int, findings: tuple[str, ...], kind: str, matrix: int) -> np.ndarray:
    if kind == "magnified":
        return _magnified(seed, findings, matrix)
    study = make_thyroid_study(seed, findings, pinhole=kind == "pinhole", matrix=matrix)
    return np.asarray(study.image)


# Whole-neck (parallel-hole) and pinhole studies as the phantom makes them (markers and
# extra views drawn from the seed), and pinhole studies magnified until the gland fills
# the image (a third to a half of its pixels).
_STUDIES = [
    (2, ("cold_nodule",), "pinhole", 64),
    (7, ("graves", "cold_nodule"), "pinhole", 80),
    (11, ("toxic_adenoma",), "pinhole", 64),
    (4, ("toxic_multinodular_goitre",), "parallel", 96),
    (5, ("normal",), "parallel", 64),
    (2, ("cold_nodule",), "magnified", 48),
    (7, ("graves", "cold_nodule"), "magnified", 64),
    (3, ("toxic_adenoma",), "magnified", 64),
    (1, ("normal",), "magnified", 56),
]


@pytest.mark.parametrize(("seed", "findings", "kind", "matrix"), _STUDIES)
def test_morphology_matches_scipy_on_phantom_images(
    seed: int, findings: tuple[str, ...], kind: str, matrix: int
) -> None:
    smooth, mask, scale = _phantom_inputs(_image(seed, findings, kind, matrix))
    assert mask.any()
    seed_mask = smooth > 0.3 * smooth.max()
    for share in (0.3, 0.6):  # the background ring around the gland
        radius = share * scale
        for m in (seed_mask, mask):
            assert np.array_equal(measure._dilate_disk(m, radius), _reference_dilation(m, radius))
    radius = 0.4 * scale  # the closing that finds cold areas
    assert np.array_equal(measure._close_disk(smooth, radius), _reference_closing(smooth, radius))


@pytest.mark.parametrize(("seed", "findings", "kind", "matrix"), _STUDIES)
def test_measurements_unchanged_against_scipy_morphology(
    monkeypatch: pytest.MonkeyPatch, seed: int, findings: tuple[str, ...], kind: str, matrix: int
) -> None:
    """The whole measurement with scipy's filters swapped back in gives the same answer."""
    image = _image(seed, findings, kind, matrix)
    uptake, nodules = measure_thyroid(image)
    monkeypatch.setattr(measure, "_dilate_disk", _reference_dilation)
    monkeypatch.setattr(measure, "_close_disk", _reference_closing)
    assert measure_thyroid(image) == (uptake, nodules)
