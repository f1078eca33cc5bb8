"""Lung lesions painted and measured on hand-made volumes whose answers are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.measure import measure_lesions
from mibi_node.imaging.volume import Volume, VolumeSlice

SPACING = (2.0, 0.5, 0.8)
CT = "1.2.840.10008.5.1.4.1.1.2"


def _volume(
    image: np.ndarray,
    spacing: tuple[float, float, float] = SPACING,
    row: tuple[float, float, float] = (1.0, 0.0, 0.0),
    column: tuple[float, float, float] = (0.0, 1.0, 0.0),
) -> Volume:
    origin = np.array([-30.0, -20.0, 100.0])
    normal = np.cross(row, column)
    slices = tuple(
        VolumeSlice(
            f"1.2.3.{k + 1}",
            CT,
            "1.2.4",
            k + 1,
            tuple(float(v) for v in origin + k * spacing[0] * normal),  # type: ignore[arg-type]
        )
        for k in range(image.shape[0])
    )
    return Volume(
        study_instance_uid="1.2.5",
        series_instance_uid="1.2.4",
        frame_of_reference_uid="1.2.6",
        image=image.astype(np.float32),
        spacing=spacing,
        origin=(-30.0, -20.0, 100.0),
        row_cosines=row,
        column_cosines=column,
        slices=slices,
        modality="CT",
    )


def _box(shape, k, j, i, label=1, score=0.9) -> Lesion3D:
    mask = np.zeros(shape, dtype=bool)
    mask[k, j, i] = True
    return Lesion3D.from_mask(label, score, mask)


def _chest(shape=(6, 40, 64), body_centre=40) -> np.ndarray:
    """Air, and a body disc (40 HU) centred on column ``body_centre``, off the image centre."""
    image = np.full(shape, -1000.0)
    jj, ii = np.mgrid[: shape[1], : shape[2]]
    body = (jj - 20) ** 2 + (ii - body_centre) ** 2 <= 15**2
    image[:, body] = 40.0
    return image


def test_volume_mean_hu_extent_and_diameter_of_a_box() -> None:
    shape = (8, 20, 30)
    image = np.zeros(shape)
    image[2:5, 5:9, 10:15] = -600.0
    image[3, 5:9, 10:15] = -300.0  # the middle slice is brighter
    mask = np.zeros(shape, dtype=bool)
    mask[2:5, 6:8, 11:14] = True
    mask[3, 5:9, 10:15] = True  # and the largest cross-section
    lesions_map, (finding,) = measure_lesions(_volume(image), [Lesion3D.from_mask(2, 0.7, mask)])

    voxels = 2 * 2 * 3 + 4 * 5
    assert lesions_map.dtype == np.uint16
    np.testing.assert_array_equal(lesions_map, mask.astype(np.uint16))
    assert finding.number == 1 and finding.label == 2 and finding.probability == 0.7
    assert finding.voxels == voxels
    assert finding.volume_mm3 == pytest.approx(voxels * 2.0 * 0.5 * 0.8)
    assert finding.mean_hu == pytest.approx((12 * -600.0 + 20 * -300.0) / voxels)
    assert finding.slices == (2, 4)
    assert finding.key_slice == 3
    # Farthest pixel centres on slice 3: rows 5 and 8, columns 10 and 14.
    assert finding.diameter_mm == pytest.approx(math.hypot(3 * 0.5, 4 * 0.8))
    centroid = np.argwhere(mask).mean(axis=0)
    np.testing.assert_allclose(finding.centroid, centroid)
    volume = _volume(image)
    np.testing.assert_allclose(finding.position_mm, (volume.affine() @ [*centroid, 1.0])[:3])


@pytest.mark.parametrize(
    ("section", "diameter"),
    [
        (np.ones((1, 1), bool), 0.0),  # one pixel
        (np.ones((1, 7), bool), 6 * 0.8),  # a line: no convex hull
        (np.eye(5, dtype=bool), math.hypot(4 * 0.5, 4 * 0.8)),  # a diagonal line
    ],
)
def test_diameter_of_degenerate_sections(section, diameter) -> None:
    mask = np.zeros((1, 10, 10), dtype=bool)
    mask[0, : section.shape[0], : section.shape[1]] = section
    _, (finding,) = measure_lesions(
        _volume(np.zeros(mask.shape)), [Lesion3D.from_mask(1, 0.5, mask)]
    )
    assert finding.diameter_mm == pytest.approx(diameter)


def test_diameter_of_a_disc() -> None:
    jj, ii = np.mgrid[:41, :41]
    disc = (jj - 20) ** 2 + (ii - 20) ** 2 <= 15**2
    mask = disc[None]
    volume = _volume(np.zeros(mask.shape), spacing=(1.0, 0.7, 0.7))
    _, (finding,) = measure_lesions(volume, [Lesion3D.from_mask(1, 0.5, mask)])
    assert finding.diameter_mm == pytest.approx(30 * 0.7)


def test_side_is_the_patients_side_of_the_body_midline() -> None:
    """The body's centre is column 40 (not the image's 31.5): a lesion at column 36 is on
    the patient's right although it lies right of the image centre."""
    image = _chest()
    right = _box(image.shape, slice(2, 4), slice(18, 22), slice(34, 38), score=0.9)
    left = _box(image.shape, slice(2, 4), slice(18, 22), slice(44, 48), score=0.8)
    _, findings = measure_lesions(_volume(image), [right, left])
    assert [f.side for f in findings] == ["R", "L"]
    # Columns toward the patient's right: the same voxels are on the other sides.
    flipped = _volume(image, row=(-1.0, 0.0, 0.0), column=(0.0, 1.0, 0.0))
    _, findings = measure_lesions(flipped, [right, left])
    assert [f.side for f in findings] == ["L", "R"]
    # A slice with no body: unknown.
    _, findings = measure_lesions(_volume(np.full(image.shape, -1000.0)), [right])
    assert findings[0].side is None


def test_side_is_unknown_on_sagittal_slices() -> None:
    image = _chest()
    lesion = _box(image.shape, slice(2, 4), slice(18, 22), slice(44, 48))
    sagittal = _volume(image, row=(0.0, 1.0, 0.0), column=(0.0, 0.0, -1.0))
    _, (finding,) = measure_lesions(sagittal, [lesion])
    assert finding.side is None


def test_side_on_the_phantom_matches_its_truth() -> None:
    phantom = pytest.importorskip("mibi_node.analyses.lung.phantom")
    case = phantom.make_lung_case(11, shape=(32, 96, 96), lesions=4)
    n_j, n_i = case.shape[1:]
    spacing = case.spacing
    volume = Volume(
        study_instance_uid="1.2.5",
        series_instance_uid="1.2.4",
        frame_of_reference_uid="1.2.6",
        image=case.image,
        spacing=spacing,
        origin=(-(n_i - 1) / 2 * spacing[2], -(n_j - 1) / 2 * spacing[1], 0.0),
        row_cosines=(1.0, 0.0, 0.0),
        column_cosines=(0.0, 1.0, 0.0),
        slices=tuple(
            VolumeSlice(f"1.2.3.{k + 1}", CT, "1.2.4", k + 1, (0.0, 0.0, k * spacing[0]))
            for k in range(case.shape[0])
        ),
    )
    lesions = [
        Lesion3D.from_mask(truth.label, 0.9 - 0.1 * n, case.instances == truth.id)
        for n, truth in enumerate(case.lesions)
    ]
    lesions_map, findings = measure_lesions(volume, lesions)
    assert [f.side for f in findings] == [truth.side for truth in case.lesions]
    assert [f.voxels for f in findings] == [truth.voxels for truth in case.lesions]
    for finding, truth in zip(findings, case.lesions, strict=True):
        np.testing.assert_array_equal(lesions_map == finding.number, case.instances == truth.id)


def test_overlap_goes_to_the_higher_score_whatever_the_order() -> None:
    shape = (4, 10, 10)
    low = _box(shape, slice(1, 3), slice(2, 6), slice(2, 6), label=2, score=0.6)
    high = _box(shape, slice(1, 3), slice(4, 8), slice(4, 8), label=1, score=0.9)
    lesions_map, findings = measure_lesions(_volume(np.zeros(shape)), [low, high])
    assert [(f.number, f.label, f.probability) for f in findings] == [(1, 1, 0.9), (2, 2, 0.6)]
    assert lesions_map[1, 5, 5] == 1  # the overlap
    assert findings[0].voxels == 2 * 4 * 4
    assert findings[1].voxels == 2 * 4 * 4 - 2 * 2 * 2
    assert np.count_nonzero(lesions_map == 2) == findings[1].voxels


def test_a_lesion_left_without_voxels_is_dropped_and_the_rest_renumbered() -> None:
    shape = (4, 12, 12)
    first = _box(shape, slice(0, 4), slice(0, 6), slice(0, 6), score=0.9)
    hidden = _box(shape, slice(1, 3), slice(1, 4), slice(1, 4), label=2, score=0.8)
    last = _box(shape, slice(0, 2), slice(8, 11), slice(8, 11), score=0.4)
    lesions_map, findings = measure_lesions(_volume(np.zeros(shape)), [first, hidden, last])
    assert [(f.number, f.probability) for f in findings] == [(1, 0.9), (2, 0.4)]
    assert set(np.unique(lesions_map).tolist()) == {0, 1, 2}
    assert findings[1].voxels == 2 * 3 * 3


def test_no_lesion_gives_an_empty_map() -> None:
    lesions_map, findings = measure_lesions(_volume(np.zeros((3, 4, 5))), [])
    assert findings == ()
    assert lesions_map.shape == (3, 4, 5) and not lesions_map.any()


def test_bad_arguments_name_themselves() -> None:
    volume = _volume(np.zeros((3, 4, 5)))
    outside = _box((3, 6, 5), slice(0, 1), slice(4, 6), slice(0, 1))
    with pytest.raises(ValueError, match='"lesions" has lesion 0 with box'):
        measure_lesions(volume, [outside])
    with pytest.raises(TypeError, match='"volume"'):
        measure_lesions(np.zeros((3, 4, 5)), [])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match='"lesions"'):
        measure_lesions(volume, [np.zeros((3, 4, 5), bool)])  # type: ignore[list-item]
