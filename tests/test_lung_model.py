"""The lung Mask R-CNN detector: registry, input, targets, training steps, slice detection."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from mibi_node.analyses.lung.linking import SliceDetection, link_detections
from mibi_node.analyses.lung.model import (
    HU_MEAN,
    HU_STD,
    create_lung_detector,
    detect_slices,
    list_lung_detectors,
    normalise_hu,
    parameter_count,
    slab,
    targets_from_slice,
)
from mibi_node.analyses.lung.phantom import LungCase, make_lung_case

SMALL = "maskrcnn_resnet18_fpn_s"
SLIM = "maskrcnn_resnet18_fpn_xs"
SIZE: dict[str, Any] = {"min_size": 96, "max_size": 96}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def case() -> LungCase:
    # 24 slices: 16 of 2.5 mm would cover 40 mm, below the phantom's 60 mm minimum.
    return make_lung_case(
        3, shape=(24, 96, 96), spacing=(2.5, 2.0, 2.0), lesions=["ground_glass_opacity"]
    )


def _lesion_slices(case: LungCase) -> list[int]:
    return [k for k in range(case.shape[0]) if (case.instances[k] > 0).sum() >= 20]


# -- normalise_hu and slab -------------------------------------------------------------------


def test_normalise_hu_clips_to_the_window_then_normalises() -> None:
    image = np.array([[-3000.0, -1000.0, HU_MEAN, 400.0, 3000.0]], np.float32)
    out = normalise_hu(image)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[-1.0, -1.0, 0.0, 1.0, 1.0]], atol=1e-6)
    assert HU_STD > 0
    custom = normalise_hu(image, window=(-100, 100), mean=0.0, std=100.0)
    np.testing.assert_allclose(custom, [[-1.0, -1.0, -1.0, 1.0, 1.0]], atol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "name"), [({"window": (400, -1000)}, "window"), ({"std": 0.0}, "std")]
)
def test_normalise_hu_refuses_bad_constants(kwargs: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=f'"{name}"'):
        normalise_hu(np.zeros((2, 2)), **kwargs)


def test_slab_repeats_the_edge_slices() -> None:
    image = np.arange(4, dtype=np.int16)[:, None, None] * np.ones((1, 2, 3), np.int16)
    first = slab(image, 0)
    assert first.dtype == np.float32 and first.shape == (3, 2, 3)
    assert first[:, 0, 0].tolist() == [0, 0, 1]
    assert slab(image, 3, channels=5)[:, 0, 0].tolist() == [1, 2, 3, 3, 3]
    assert slab(image, 2, channels=1)[:, 0, 0].tolist() == [2]
    assert slab(np.zeros((1, 2, 2)), 0, channels=5).shape == (5, 2, 2)


@pytest.mark.parametrize(
    ("args", "error", "name"),
    [
        ((4,), ValueError, "k"),
        ((-1,), ValueError, "k"),
        ((0, 2), ValueError, "channels"),
        ((0, 0), ValueError, "channels"),
        ((1.0,), TypeError, "k"),
    ],
)
def test_slab_refuses_bad_arguments(args: tuple[Any, ...], error: type, name: str) -> None:
    with pytest.raises(error, match=f'"{name}"'):
        slab(np.zeros((4, 2, 2)), *args)


# -- registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", list_lung_detectors())
def test_registry_builds_every_arch_without_downloading(arch: str) -> None:
    model = create_lung_detector(arch, weights=None)
    assert model.roi_heads.box_predictor.cls_score.out_features == 3
    assert model.transform.min_size == (128,) and model.transform.max_size == 128
    assert model.transform.image_mean == [0.0, 0.0, 0.0]
    assert model.transform.image_std == [1.0, 1.0, 1.0]
    assert parameter_count(model) > 1_000_000
    assert "maskrcnn_resnet50_fpn" in list_lung_detectors() and SMALL in list_lung_detectors()


def test_small_arch_has_its_own_defaults_and_accepts_overrides() -> None:
    small = create_lung_detector(SMALL)
    assert small.roi_heads.detections_per_img == 20
    assert small.rpn._post_nms_top_n["testing"] == 100
    one = create_lung_detector(SMALL, in_channels=1, box_detections_per_img=5, trainable_layers=3)
    assert one.backbone.body.conv1.in_channels == 1
    assert one.transform.image_mean == [0.0]
    assert one.roi_heads.detections_per_img == 5
    assert not any(p.requires_grad for p in one.backbone.body.layer1.parameters())
    assert all(p.requires_grad for p in one.backbone.body.layer2.parameters())
    restored = create_lung_detector(SMALL, in_channels=1, weights=one.state_dict())
    torch.testing.assert_close(restored.backbone.body.conv1.weight, one.backbone.body.conv1.weight)


def test_slim_arch_sizes_its_heads_to_the_lesions() -> None:
    slim = create_lung_detector(SLIM)
    assert slim.backbone.out_channels == 64
    assert slim.rpn.head.conv[0][0].in_channels == 64
    assert slim.roi_heads.box_head.fc7.out_features == 256
    assert len(slim.roi_heads.mask_head) == 2
    assert slim.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 3
    assert 11_000_000 < parameter_count(slim) < 13_000_000
    assert parameter_count(slim) < parameter_count(create_lung_detector(SMALL)) / 2
    wider = create_lung_detector(SLIM, fpn_channels=96, mask_head_layers=1, box_head_size=128)
    assert wider.backbone.out_channels == 96 and len(wider.roi_heads.mask_head) == 1
    assert wider.roi_heads.box_predictor.cls_score.in_features == 128
    restored = create_lung_detector(SLIM, weights=slim.state_dict())
    torch.testing.assert_close(
        restored.roi_heads.mask_head[0][0].weight, slim.roi_heads.mask_head[0][0].weight
    )


def test_small_arch_keeps_torchvision_s_module_names() -> None:
    # bundles trained before the head widths were options load unchanged
    names = set(create_lung_detector(SMALL).state_dict())
    assert {"backbone.fpn.inner_blocks.0.0.weight", "roi_heads.box_head.fc6.weight"} <= names
    assert "roi_heads.mask_head.3.0.weight" in names
    assert "rpn.head.conv.0.0.weight" in names


@pytest.mark.parametrize("arch", [SMALL, SLIM])
def test_train_and_eval_forward_of_each_resnet18_arch(arch: str, case: LungCase) -> None:
    torch.manual_seed(0)
    model = create_lung_detector(arch, **SIZE)
    model.train()
    images, targets = _batch(case, _lesion_slices(case)[:2])
    losses = model(images, targets)
    assert len(losses) == 5 and all(torch.isfinite(value) for value in losses.values())
    model.eval()
    with torch.inference_mode():
        (output,) = model(images[:1])
    assert output["masks"].shape[1:] == (1, 96, 96)
    assert len(output["boxes"]) <= model.roi_heads.detections_per_img


@pytest.mark.parametrize(
    ("arch", "options", "error", "name"),
    [
        ("maskrcnn_resnet7_fpn", {}, ValueError, "arch"),
        (SLIM, {"fpn_channels": 0}, ValueError, "fpn_channels"),
        (SLIM, {"mask_head_layers": 2.5}, TypeError, "mask_head_layers"),
        (SLIM, {"box_head_size": True}, TypeError, "box_head_size"),
        ("maskrcnn_resnet50_fpn", {"fpn_channels": 64}, ValueError, "fpn_channels"),
        (SMALL, {"dropout": 0.1}, ValueError, "dropout"),
        (SMALL, {"num_classes": 1}, ValueError, "num_classes"),
        (SMALL, {"in_channels": 2.0}, TypeError, "in_channels"),
        (SMALL, {"trainable_layers": 6}, ValueError, "trainable_layers"),
        (SMALL, {"anchor_sizes": (8, 16)}, ValueError, "anchor_sizes"),
        (SMALL, {"weights": "COCO_V1"}, TypeError, "weights"),
    ],
)
def test_registry_refuses_unknown_arch_and_bad_options(
    arch: str, options: dict[str, Any], error: type, name: str
) -> None:
    with pytest.raises(error, match=name):
        create_lung_detector(arch, **options)


# -- targets and training --------------------------------------------------------------------


def test_targets_from_slice_follow_the_truth(case: LungCase) -> None:
    k = _lesion_slices(case)[0]
    target = targets_from_slice(case.labels[k], case.instances[k])
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (1, 4)
    assert target["labels"].tolist() == [1]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (1, 96, 96)
    rows, cols = np.nonzero(case.instances[k])
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    assert (x0, y0, x1, y1) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
    assert int(target["masks"].sum()) == len(rows)

    empty = targets_from_slice(case.labels[0], case.instances[0])
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 96, 96)
    tiny = np.zeros((8, 8), np.uint16)
    tiny[2, 2:5] = 7
    assert len(targets_from_slice((tiny > 0).astype(np.uint8) * 2, tiny)["labels"]) == 0
    assert targets_from_slice((tiny > 0).astype(np.uint8) * 2, tiny, min_pixels=3)[
        "labels"
    ].tolist() == [2]
    with pytest.raises(ValueError, match="instances_slice"):
        targets_from_slice(np.zeros((4, 4)), np.zeros((4, 5)))


def _batch(case: LungCase, ks: list[int]) -> tuple[list[torch.Tensor], list[dict[str, Any]]]:
    normalised = normalise_hu(case.image)
    images = [torch.from_numpy(slab(normalised, k)) for k in ks]
    targets = [targets_from_slice(case.labels[k], case.instances[k]) for k in ks]
    return images, targets


def test_train_forward_returns_finite_mask_rcnn_losses(case: LungCase) -> None:
    torch.manual_seed(0)
    model = create_lung_detector(SMALL, **SIZE)
    model.train()
    images, targets = _batch(case, _lesion_slices(case)[:1])
    losses = model(images, targets)
    assert set(losses) == {
        "loss_classifier",
        "loss_box_reg",
        "loss_mask",
        "loss_objectness",
        "loss_rpn_box_reg",
    }
    assert all(torch.isfinite(value) for value in losses.values())


def test_a_few_optimiser_steps_reduce_the_loss(case: LungCase) -> None:
    torch.manual_seed(0)
    model = create_lung_detector(SMALL, **SIZE)
    model.train()
    slices = _lesion_slices(case)
    images, targets = _batch(case, slices[:: max(1, len(slices) // 3)][:3])
    optimiser = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    totals = []
    for _ in range(12):
        loss = sum(model(images, targets).values())
        assert isinstance(loss, torch.Tensor)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        totals.append(float(loss.detach()))
    assert np.isfinite(totals).all(), totals
    assert np.mean(totals[-3:]) < 0.8 * np.mean(totals[:3])


# -- detect_slices ---------------------------------------------------------------------------


class _Stub(nn.Module):
    """Two fixed detections per slice, one of them poking out of the image, one too weak."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        assert not self.training
        outputs = []
        for image in images:
            self.seen.append(tuple(image.shape))
            _, h, w = image.shape
            masks = torch.zeros(3, 1, h, w)
            masks[0, 0, 10:20, 12:18] = 0.9
            masks[1, 0, h - 4 :, w - 3 :] = 0.7
            masks[2, 0, 30:40, 30:40] = 0.9
            outputs.append(
                {
                    "boxes": torch.tensor(
                        [
                            [11.6, 9.2, 18.1, 19.5],
                            [w - 3.5, h - 4.2, w + 5.0, h + 2.0],
                            [30.0, 30.0, 40.0, 40.0],
                        ]
                    ),
                    "labels": torch.tensor([1, 2, 1]),
                    "scores": torch.tensor([0.9, 0.6, 0.01]),
                    "masks": masks,
                }
            )
        return outputs


def test_detect_slices_converts_outputs_to_slice_detections() -> None:
    stub = _Stub()
    stub.train()
    volume = np.full((5, 48, 40), -800.0, np.float32)
    found = detect_slices(stub, volume, channels=3, batch=2)
    assert stub.training  # restored
    assert stub.seen == [(3, 48, 40)] * 5
    assert [d.k for d in found] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    first, edge = found[0], found[1]
    assert first.box == (9, 11, 20, 19) and first.label == 1 and first.score == pytest.approx(0.9)
    assert first.mask.shape == (11, 8) and first.mask.sum() == 60
    assert edge.box == (43, 36, 48, 40) and edge.label == 2
    assert edge.mask.shape == (5, 4) and edge.mask.sum() == 12
    lesions = link_detections(found, volume.shape)
    assert sorted(len(lesion.slice_scores) for lesion in lesions) == [5, 5]
    assert sorted(lesion.offset for lesion in lesions) == [(0, 9, 11), (0, 43, 36)]


def test_detect_slices_runs_a_real_detector_and_links(case: LungCase) -> None:
    torch.manual_seed(0)
    model = create_lung_detector(SMALL, **SIZE, box_detections_per_img=5)
    volume = case.image[6:12]
    found = detect_slices(model, volume, channels=3, batch=4, score_threshold=0.0)
    assert model.training
    assert found  # an untrained head still scores its proposals (seeded: 30 here)
    for detection in found:
        assert isinstance(detection, SliceDetection)
        assert 0 <= detection.k < volume.shape[0]
        y0, x0, y1, x1 = detection.box
        assert 0 <= y0 < y1 <= 96 and 0 <= x0 < x1 <= 96
        assert detection.mask.shape == (y1 - y0, x1 - x0) and detection.mask.any()
    assert isinstance(link_detections(found, volume.shape), list)
    with pytest.raises(ValueError, match="batch"):
        detect_slices(model, volume, batch=0)
    with pytest.raises(ValueError, match="image_hu"):
        detect_slices(model, volume[0])
