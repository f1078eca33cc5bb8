"""Cartilage plate volume and thickness against analytic plates of known thickness.

A mask can only be as thick as a whole number of voxels along a grid axis: a plate aligned
with the grid is expected to read exactly its voxel count (within 0.1 mm); an oblique or
curved plate, whose voxelisation averages out, its analytic thickness within about half a
voxel (0.2 mm for the mean, 0.5 mm for the robust minimum).
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from mibi_node.analyses.knee import measure
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.measure import (
    MAX_DEPTH_MM,
    MAX_PLATE_MM3,
    measure_structures,
    plate_thickness,
)

SPACING = (1.2, 0.7, 0.7)


def _positions(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    """Voxel centres in mm, ``shape + (3,)``, centred on the volume's middle."""
    axes = [(np.arange(n) - (n - 1) / 2) * s for n, s in zip(shape, spacing, strict=True)]
    return np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)


def _disc_plate(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    normal: tuple[float, float, float],
    thickness: float,
    radius: float = 14.0,
    offset: float = 0.1,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A flat disc ``thickness`` mm thick; returns the mask, the height and the in-plane radius."""
    x = _positions(shape, spacing)
    n = np.asarray(normal, dtype=float)
    n /= np.linalg.norm(n)
    height = x @ n + offset
    lateral = np.linalg.norm(x - height[..., None] * n, axis=-1)
    return (np.abs(height) <= thickness / 2) & (lateral < radius), height, lateral


@pytest.mark.parametrize("thickness", [2.0, 3.0])
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_grid_aligned_slab_reads_its_voxel_count(thickness: float, axis: int) -> None:
    normal = (float(axis == 0), float(axis == 1), float(axis == 2))
    mask, _, _ = _disc_plate((40, 64, 64), SPACING, normal, thickness)
    centre = tuple(s // 2 for s in mask.shape)
    column = [slice(c, c + 1) for c in centre]
    column[axis] = slice(None)
    voxel_thickness = np.count_nonzero(mask[tuple(column)]) * SPACING[axis]
    mean_mm, min_mm = plate_thickness(mask, SPACING)
    assert mean_mm == pytest.approx(voxel_thickness, abs=0.1)
    assert min_mm == pytest.approx(voxel_thickness, abs=0.15)


@pytest.mark.parametrize("thickness", [2.0, 3.0])
@pytest.mark.parametrize(
    "normal", [(1.0, 1.0, 0.0), (0.3, 1.0, 0.5), (1.0, 1.0, 1.0), (0.2, 0.1, 1.0)]
)
def test_oblique_slab_reads_its_thickness(
    thickness: float, normal: tuple[float, float, float]
) -> None:
    mask, _, _ = _disc_plate((40, 64, 64), SPACING, normal, thickness)
    mean_mm, min_mm = plate_thickness(mask, SPACING)
    assert mean_mm is not None and min_mm is not None
    assert mean_mm == pytest.approx(thickness, abs=0.2)
    assert min_mm == pytest.approx(thickness, abs=0.5)
    assert min_mm <= mean_mm


def test_curved_shell_reads_its_thickness() -> None:
    """A cap of a spherical shell (mid radius 21 mm, 2.5 mm thick), like a femoral condyle."""
    x = _positions((40, 80, 80), (1.0, 0.5, 0.5))
    centre = np.array([0.0, 0.0, -14.0])
    r = np.linalg.norm(x - centre, axis=-1)
    mask = (np.abs(r - 21.0) <= 1.25) & (x[..., 2] > -2.0)
    mean_mm, min_mm = plate_thickness(mask, (1.0, 0.5, 0.5))
    assert mean_mm == pytest.approx(2.5, abs=0.2)
    assert min_mm == pytest.approx(2.5, abs=0.5)


@pytest.mark.parametrize("normal", [(0.0, 1.0, 0.0), (0.3, 1.0, 0.5)])
def test_focal_thinning_sets_the_minimum(normal: tuple[float, float, float]) -> None:
    """A 3 mm plate with a flat-bottomed dimple 1.5 mm deep, 12 mm across, on one side."""
    mask, height, lateral = _disc_plate((40, 80, 80), SPACING, normal, 3.0, radius=18.0)
    reference, _ = plate_thickness(mask, SPACING)
    assert reference is not None
    dimple = (lateral < 6.0) & (height > 0.0)
    mask &= ~dimple
    mean_mm, min_mm = plate_thickness(mask, SPACING)
    assert mean_mm is not None and min_mm is not None
    # The thinned floor is 1.5 mm thick (as voxelised: the grid-aligned plate is 4 voxels
    # of 0.7 mm, its floor 2).
    floor = 1.5 if normal != (0.0, 1.0, 0.0) else 2 * 0.7
    assert min_mm == pytest.approx(floor, abs=0.5)
    assert min_mm < mean_mm < reference


def test_full_thickness_hole_is_a_rim_not_a_thin_spot() -> None:
    mask, _, lateral = _disc_plate((40, 80, 80), SPACING, (0.3, 1.0, 0.5), 2.5, radius=18.0)
    before = plate_thickness(mask, SPACING)
    hole = lateral < 3.0
    mask &= ~hole
    mean_mm, min_mm = plate_thickness(mask, SPACING)
    assert mean_mm is not None and min_mm is not None and before[0] is not None
    assert mean_mm == pytest.approx(2.5, abs=0.2)
    assert mean_mm == pytest.approx(before[0], abs=0.1)
    assert min_mm == pytest.approx(2.5, abs=0.5)


def test_one_voxel_plate_reads_one_voxel() -> None:
    mask = np.zeros((20, 60, 60), dtype=bool)
    mask[10, 5:55, 5:55] = True
    mean_mm, min_mm = plate_thickness(mask, SPACING)
    assert mean_mm == pytest.approx(1.2, abs=0.1)
    assert min_mm == pytest.approx(1.2, abs=0.1)


def _four_plates(shape: tuple[int, int, int], spacing: tuple[float, float, float]) -> np.ndarray:
    x = _positions(shape, spacing)
    labels = np.zeros(shape, dtype=np.uint8)
    r = np.linalg.norm(x - np.array([0.0, -4.0, 0.0]), axis=-1)
    labels[(np.abs(r - 21.0) <= 1.25) & (x[..., 1] < -4.0)] = LABEL_OF["femoral_cartilage"]
    tibia = (np.abs(x[..., 1] - 20.0) <= 1.0) & (np.abs(x[..., 2]) < 15.0)
    labels[tibia & (x[..., 0] > 3.0) & (x[..., 0] < 20.0)] = LABEL_OF["medial_tibial_cartilage"]
    labels[tibia & (x[..., 0] < -3.0) & (x[..., 0] > -20.0)] = LABEL_OF["lateral_tibial_cartilage"]
    labels[
        (np.abs(x[..., 2] - 26.0) <= 1.5) & (np.abs(x[..., 1]) < 8.0) & (np.abs(x[..., 0]) < 10.0)
    ] = LABEL_OF["patellar_cartilage"]
    return labels


def test_measure_structures_gives_one_per_structure_in_order() -> None:
    spacing = (1.2, 0.5, 0.5)
    labels = _four_plates((48, 128, 128), spacing)
    labels[labels == LABEL_OF["lateral_tibial_cartilage"]] = 0
    started = time.perf_counter()
    measurements = measure_structures(labels, spacing)
    elapsed = time.perf_counter() - started
    assert [m.structure for m in measurements] == list(STRUCTURES)
    voxel_mm3 = 1.2 * 0.5 * 0.5
    for m in measurements:
        voxels = int(np.count_nonzero(labels == LABEL_OF[m.structure]))
        assert m.voxels == voxels
        assert m.volume_mm3 == pytest.approx(voxels * voxel_mm3)
    femoral, medial, lateral, patellar = measurements
    assert lateral.voxels == 0 and lateral.volume_mm3 == 0.0
    assert lateral.mean_thickness_mm is None and lateral.min_thickness_mm is None
    assert femoral.mean_thickness_mm == pytest.approx(2.5, abs=0.2)
    assert medial.mean_thickness_mm == pytest.approx(2.0, abs=0.1)  # 4 voxels of 0.5 mm
    assert patellar.mean_thickness_mm == pytest.approx(3.0, abs=0.1)  # 6 voxels of 0.5 mm
    # The issue asks for well under a second on a 48 x 128 x 128 volume; the bound here
    # leaves room for a busy test machine.
    assert elapsed < 2.0, f"measure_structures took {elapsed:.2f} s"


def test_a_fragment_has_a_volume_but_no_thickness() -> None:
    labels = np.zeros((10, 20, 20), dtype=np.uint8)
    labels[4:7, 8:11, 8:11] = LABEL_OF["patellar_cartilage"]
    patellar = measure_structures(labels, SPACING)[-1]
    assert patellar.voxels == 27
    assert patellar.volume_mm3 == pytest.approx(27 * 1.2 * 0.7 * 0.7)
    assert patellar.mean_thickness_mm is None and patellar.min_thickness_mm is None


@pytest.mark.parametrize("normal", [(1.0, 0.0, 0.0), (1.0, 2.0, 3.0)])
def test_a_sample_of_a_large_sheet_reads_as_the_whole_sheet(
    normal: tuple[float, float, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    mask, _, _ = _disc_plate((40, 64, 64), SPACING, normal, 2.5)
    whole = plate_thickness(mask, SPACING)
    monkeypatch.setattr(measure, "MAX_SHEET_POINTS", 300)  # a few hundred of >1000
    monkeypatch.setattr(measure, "_MIN_SHEET_POINTS", 300)
    sampled = plate_thickness(mask, SPACING)
    assert sampled == pytest.approx(whole, abs=0.05)
    assert plate_thickness(mask, SPACING) == sampled  # the sample is the same every time


def test_junk_masks_are_measured_or_refused_without_raising() -> None:
    """What a barely trained model may call a plate: speckle, a block, the whole volume."""
    spacing = (1.5, 0.8, 0.8)
    shape = (48, 128, 128)
    voxel_mm3 = 1.5 * 0.8 * 0.8
    rng = np.random.default_rng(0)
    speckle = np.where(rng.random(shape) < 0.04, LABEL_OF["femoral_cartilage"], 0)
    whole = np.full(shape, LABEL_OF["femoral_cartilage"])
    block = np.zeros(shape, dtype=np.uint8)
    block[10:30, 30:70, 30:70] = LABEL_OF["patellar_cartilage"]  # 31 cm3, 16 mm deep
    assert block.astype(bool).sum() * voxel_mm3 < MAX_PLATE_MM3
    for labels in (speckle.astype(np.uint8), whole.astype(np.uint8), block, speckle + block):
        for m in measure_structures(labels, spacing):
            values = (m.mean_thickness_mm, m.min_thickness_mm)
            assert all(v is None or (np.isfinite(v) and v >= 0) for v in values)
            assert m.remark == "" or (values == (None, None) and m.voxels > 0)
    femoral = measure_structures(whole.astype(np.uint8), spacing)[0]
    assert femoral.mean_thickness_mm is None and femoral.volume_mm3 > MAX_PLATE_MM3
    assert "755 cm3, too large for a cartilage plate" in femoral.remark
    patellar = measure_structures(block, spacing)[-1]
    assert patellar.mean_thickness_mm is None and "too thick" in patellar.remark
    assert f"at most {2 * MAX_DEPTH_MM:.0f} mm" in patellar.remark
    assert plate_thickness(block > 0, spacing) == (None, None)


def test_empty_labels_measure_nothing() -> None:
    measurements = measure_structures(np.zeros((4, 5, 6), dtype=np.uint8), SPACING)
    assert all(m.voxels == 0 and m.mean_thickness_mm is None for m in measurements)


@pytest.mark.parametrize(
    ("labels", "spacing", "error", "argument"),
    [
        (np.zeros((4, 5, 6), dtype=np.float32), SPACING, TypeError, "labels"),
        ([[[0]]], SPACING, TypeError, "labels"),
        (np.zeros((5, 6), dtype=np.uint8), SPACING, ValueError, "labels"),
        (np.zeros((4, 5, 6), dtype=np.uint8), (1.0, 1.0), ValueError, "spacing"),
        (np.zeros((4, 5, 6), dtype=np.uint8), (1.0, 0.0, 1.0), ValueError, "spacing"),
        (np.zeros((4, 5, 6), dtype=np.uint8), "abc", TypeError, "spacing"),
    ],
)
def test_bad_input_names_the_argument(labels, spacing, error, argument) -> None:
    with pytest.raises(error, match=f'"{argument}"'):
        measure_structures(labels, spacing)
