"""Slice detections linked into 3-D lesions, on hand-made detections with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from mibi_node.analyses.lung.labels import LABEL_OF
from mibi_node.analyses.lung.linking import (
    Lesion3D,
    SliceDetection,
    lesion_iou,
    link_detections,
)

GGO, BRONCHI = LABEL_OF["ground_glass_opacity"], LABEL_OF["bronchiectasis"]
SHAPE = (12, 64, 64)


def square(
    k: int, y: int, x: int, side: int = 8, score: float = 0.9, label: int = GGO
) -> SliceDetection:
    mask = np.zeros(SHAPE[1:], dtype=bool)
    mask[y : y + side, x : x + side] = True
    return SliceDetection.from_mask(k, label, score, mask)


def disc(k: int, cy: int, cx: int, r: float, score: float = 0.9) -> SliceDetection:
    yy, xx = np.mgrid[: SHAPE[1], : SHAPE[2]]
    return SliceDetection.from_mask(k, GGO, score, (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r)


def test_five_consecutive_slices_link_into_one_lesion() -> None:
    dets = [square(k, 10, 10 + (k - 3), score=0.5 + 0.1 * (k - 3)) for k in range(3, 8)]
    [lesion] = link_detections(dets, SHAPE)
    assert lesion.label == GGO
    assert lesion.slices == (3, 4, 5, 6, 7)
    assert lesion.bbox == (3, 10, 10, 8, 18, 22)
    assert lesion.voxels == 5 * 64
    # mean of the 3 best slice scores 0.9, 0.8, 0.7
    assert lesion.score == pytest.approx(0.8)
    assert lesion.slice_scores == pytest.approx((0.5, 0.6, 0.7, 0.8, 0.9))
    assert lesion.centroid == pytest.approx((5.0, 13.5, 15.5))


def test_score_rule_top_k_one_is_the_maximum() -> None:
    dets = [
        square(k, 10, 10, score=s) for k, s in zip(range(4), (0.2, 0.95, 0.3, 0.4), strict=True)
    ]
    [lesion] = link_detections(dets, SHAPE, top_k=1)
    assert lesion.score == pytest.approx(0.95)
    [lesion] = link_detections(dets, SHAPE, top_k=10)
    assert lesion.score == pytest.approx(np.mean([0.2, 0.95, 0.3, 0.4]))


def test_two_separate_lesions_on_the_same_slices_stay_two() -> None:
    dets = [square(k, 5, 5, score=0.9) for k in range(2, 6)]
    dets += [square(k, 40, 40, score=0.7) for k in range(2, 6)]
    lesions = link_detections(dets, SHAPE)
    assert len(lesions) == 2
    assert [les.bbox for les in lesions] == [(2, 5, 5, 6, 13, 13), (2, 40, 40, 6, 48, 48)]
    assert [les.score for les in lesions] == pytest.approx([0.9, 0.7])


def test_one_slice_gap_is_bridged_with_max_gap_one_and_not_with_zero() -> None:
    dets = [square(k, 10, 10) for k in (2, 3, 5, 6)]
    [lesion] = link_detections(dets, SHAPE, max_gap=1)
    assert lesion.slices == (2, 3, 5, 6)
    assert lesion.bbox[0::3] == (2, 7)
    assert not lesion.mask[4 - 2].any()  # the skipped slice stays empty
    split = link_detections(dets, SHAPE, max_gap=0, lesion_nms_iou=1.0)
    assert sorted(les.slices for les in split) == [(2, 3), (5, 6)]
    # a two-slice gap needs max_gap=2
    far = [square(k, 10, 10) for k in (2, 5)]
    assert len(link_detections(far, SHAPE, max_gap=1)) == 2
    assert len(link_detections(far, SHAPE, max_gap=2)) == 1


def test_min_iou_decides_whether_shifted_masks_link() -> None:
    # 8x8 squares shifted by 4 columns: IoU 32 / 96 = 1/3
    dets = [square(0, 10, 10), square(1, 10, 14)]
    assert len(link_detections(dets, SHAPE, min_iou=0.3)) == 1
    assert len(link_detections(dets, SHAPE, min_iou=0.34, lesion_nms_iou=1.0)) == 2


def test_classes_do_not_link_and_lesion_nms_keeps_the_higher_score() -> None:
    dets = [square(k, 20, 20, score=0.6, label=GGO) for k in range(3)]
    dets += [square(k, 20, 20, score=0.8, label=BRONCHI) for k in range(3)]
    [lesion] = link_detections(dets, SHAPE)
    assert lesion.label == BRONCHI
    assert lesion.score == pytest.approx(0.8)
    both = link_detections(dets, SHAPE, lesion_nms_iou=1.0)
    assert [les.label for les in both] == [BRONCHI, GGO]


def test_lesion_nms_keeps_lesions_that_overlap_little() -> None:
    # 3-D IoU of 8x8x3 boxes shifted by 6 columns: 2*8*3 / (2*192 - 48) = 1/7
    dets = [square(k, 20, 20, score=0.6, label=GGO) for k in range(3)]
    dets += [square(k, 20, 26, score=0.8, label=BRONCHI) for k in range(3)]
    lesions = link_detections(dets, SHAPE)
    assert len(lesions) == 2
    assert lesion_iou(*lesions) == pytest.approx(1 / 7)


def test_duplicate_detections_on_a_slice_are_removed_by_2d_nms() -> None:
    dets = [square(k, 10, 10, score=0.9) for k in range(4)]
    dup = square(2, 11, 10, score=0.5)  # box IoU 56 / 72 > 0.5
    [lesion] = link_detections([*dets, dup], SHAPE)
    assert lesion.slice_scores == pytest.approx((0.9,) * 4)
    assert lesion.voxels == 4 * 64  # the duplicate's extra row is gone
    # without NMS the duplicate opens a lesion of its own, which lesion NMS then suppresses
    kept = link_detections([*dets, dup], SHAPE, nms_iou=1.0, lesion_nms_iou=1.0)
    assert len(kept) == 2


def test_empty_input_gives_no_lesion() -> None:
    assert link_detections([], SHAPE) == []


def test_min_slices_drops_short_lesions() -> None:
    dets = [square(k, 10, 10) for k in range(3)] + [square(8, 40, 40)]
    assert [les.slices for les in link_detections(dets, SHAPE, min_slices=2)] == [(0, 1, 2)]
    assert len(link_detections(dets, SHAPE, min_slices=1)) == 2


def test_mask_is_the_union_of_the_linked_slice_masks() -> None:
    dets = [disc(k, 30, 30 + k, r=3 + k) for k in range(5)]
    [lesion] = link_detections(dets, SHAPE)
    expected = np.zeros(SHAPE, dtype=bool)
    for d in dets:
        y0, x0, y1, x1 = d.box
        expected[d.k, y0:y1, x0:x1] |= d.mask
    assert np.array_equal(lesion.dense(SHAPE), expected)
    assert lesion.voxels == int(expected.sum())
    assert lesion.centroid == pytest.approx(tuple(np.argwhere(expected).mean(axis=0)))
    # the stored mask is cropped to the lesion's box, not the whole volume
    assert lesion.mask.shape == (5, 15, 15)  # rows 23-37, columns 27-41


def test_lesion3d_from_mask_round_trips_and_contains_its_centroid() -> None:
    volume = np.zeros(SHAPE, dtype=bool)
    volume[2:5, 10:14, 20:30] = True
    lesion = Lesion3D.from_mask(GGO, 1.0, volume)
    assert lesion.offset == (2, 10, 20) and lesion.mask.shape == (3, 4, 10)
    assert np.array_equal(lesion.dense(SHAPE), volume)
    assert lesion.contains(lesion.centroid)
    assert not lesion.contains((0.0, 0.0, 0.0))
    assert lesion_iou(lesion, lesion) == 1.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_iou": 1.5}, "min_iou"),
        ({"max_gap": -1}, "max_gap"),
        ({"min_slices": 0}, "min_slices"),
        ({"nms_iou": -0.1}, "nms_iou"),
        ({"lesion_nms_iou": 2}, "lesion_nms_iou"),
        ({"top_k": 0}, "top_k"),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        link_detections([square(0, 1, 1)], SHAPE, **kwargs)  # type: ignore[arg-type]


def test_bad_detections_are_refused() -> None:
    with pytest.raises(ValueError, match='"mask"'):
        SliceDetection(0, GGO, 0.5, (0, 0, 4, 4), np.ones((3, 4), dtype=bool))
    with pytest.raises(ValueError, match='"label"'):
        SliceDetection(0, 0, 0.5, (0, 0, 4, 4), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match='"score"'):
        SliceDetection(0, GGO, 1.5, (0, 0, 4, 4), np.ones((4, 4), dtype=bool))
    with pytest.raises(ValueError, match='"box"'):
        SliceDetection(0, GGO, 0.5, (4, 0, 4, 4), np.ones((0, 4), dtype=bool))
    with pytest.raises(ValueError, match="outside the volume"):
        link_detections([square(20, 1, 1)], SHAPE)
    with pytest.raises(TypeError, match='"detections"'):
        link_detections(square(0, 1, 1), SHAPE)  # type: ignore[arg-type]
