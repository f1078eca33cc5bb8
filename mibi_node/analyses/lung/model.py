"""The lung lesion detector: torchvision's Mask R-CNN on axial slabs.

The seed's network (a convolutional backbone, a feature pyramid, a region proposal network
and a joint classification / box / mask head, NMS after) is torchvision's Mask R-CNN. It sees
one axial slice at a time, with its neighbours as channels (:func:`slab`), after a fixed
window and normalisation (:func:`normalise_hu`, the seed's step S1). :func:`detect_slices`
turns its outputs into :class:`~mibi_node.analyses.lung.linking.SliceDetection` objects that
:func:`~mibi_node.analyses.lung.linking.link_detections` links into 3-D lesions.

Architectures are registered by name with their options (:func:`create_lung_detector`):

``maskrcnn_resnet50_fpn``
    The seed's ResNet-50 + FPN, built by torchvision's ``maskrcnn_resnet50_fpn``.
``maskrcnn_resnet18_fpn_s``
    A ResNet-18 + FPN for demonstrations and tests on a CPU, with fewer proposals and
    detections.
``maskrcnn_resnet18_fpn_xs``
    The same ResNet-18 body with every part above it sized to lesions of a few pixels: a
    64-channel FPN, RPN and mask head (two convolutions) and a box head of 256, about 12 M
    parameters instead of 31 M and several times less arithmetic per slice (the 256-channel
    pyramid, mask head and 12.8 M-weight box head dominate the other on small slices).

All are built randomly initialised, never downloaded: weights come from bundles. All use
anchors fit to lesions of 5-30 mm at about 1.5 mm pixels (3-20 px): sizes 4-64 px on the five
pyramid levels (P2-P6), torchvision's COCO defaults (32-512 px for an 800 px image) would
not match a lesion of a 128 px slice at all. torchvision's transform resizes each slice so
that its short side is ``min_size`` (capped by ``max_size``); both default to the slice size
here, so a slice is not upscaled, and its ``image_mean`` / ``image_std`` are 0 / 1 because
:func:`normalise_hu` has already normalised.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models import resnet18
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from .linking import SliceDetection

__all__ = [
    "HU_MEAN",
    "HU_STD",
    "HU_WINDOW",
    "create_lung_detector",
    "detect_slices",
    "list_lung_detectors",
    "normalise_hu",
    "parameter_count",
    "register_lung_detector",
    "slab",
    "targets_from_slice",
]

logger = logging.getLogger(__name__)

#: The HU window the image is clipped to: air (-1000) to dense soft tissue / bone edge (400).
#: Ground-glass (-750 to -300) and the bronchial walls of bronchiectasis lie well inside it;
#: bone and metal above 400 HU carry nothing for these lesions.
HU_WINDOW: tuple[float, float] = (-1000.0, 400.0)
#: The fixed mean (the seed's step S1): the window's middle, so the window maps to [-1, 1].
HU_MEAN: float = -300.0
#: The fixed standard deviation (S1): the window's half-width. Fixed values, not each scan's
#: own statistics, keep one HU one input value in every scan, whatever the field of view.
HU_STD: float = 700.0

#: Pixels a lesion must cover on a slice to be a training target: smaller cuts through a
#: lesion's tip are below the 4 px stride of the finest pyramid level.
MIN_TARGET_PIXELS = 4


def normalise_hu(
    image: np.ndarray,
    *,
    window: tuple[float, float] = HU_WINDOW,
    mean: float = HU_MEAN,
    std: float = HU_STD,
) -> np.ndarray:
    """The network's input from HU: clipped to ``window``, then ``(hu - mean) / std``.

    Returns
    -------
    numpy.ndarray
        float32, the image's shape.

    Raises
    ------
    ValueError
        ``window`` is not increasing or ``std`` is not positive.
    """
    low, high = float(window[0]), float(window[1])
    if not low < high:
        raise ValueError(f'Argument "window" should be (low, high) with low < high, got {window}.')
    if not float(std) > 0.0:
        raise ValueError(f'Argument "std" should be positive, got {std!r}.')
    hu = np.clip(np.asarray(image, dtype=np.float32), low, high)
    return ((hu - np.float32(mean)) / np.float32(std)).astype(np.float32, copy=False)


def slab(image: np.ndarray, k: int, channels: int = 3) -> np.ndarray:
    """Slice ``k`` with its neighbours as channels: ``k - channels // 2`` to ``k + channels // 2``.

    Slices beyond the volume repeat its first or last slice. ``channels`` is odd so that
    slice ``k`` is the middle channel.

    Returns
    -------
    numpy.ndarray
        float32 ``(channels, rows, columns)``.
    """
    volume = np.asarray(image)
    if volume.ndim != 3:
        raise ValueError(f'Argument "image" should be (slice, row, column), got {volume.shape}.')
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError('Argument "channels" should be an integer.')
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f'Argument "channels" should be a positive odd integer, got {channels}.')
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise TypeError('Argument "k" should be an integer.')
    if not 0 <= k < volume.shape[0]:
        raise ValueError(f'Argument "k" should be in 0-{volume.shape[0] - 1}, got {k}.')
    half = channels // 2
    index = np.clip(np.arange(k - half, k + half + 1), 0, volume.shape[0] - 1)
    return volume[index].astype(np.float32, copy=False)


# -- registry --------------------------------------------------------------------------------

_OPTIONS = {
    "num_classes": 3,
    "in_channels": 3,
    "min_size": 128,
    "max_size": 128,
    "trainable_layers": 5,
    "anchor_sizes": (4, 8, 16, 32, 64),
    "aspect_ratios": (0.5, 1.0, 2.0),
    "rpn_pre_nms_top_n_train": 2000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 1000,
    "rpn_post_nms_top_n_test": 1000,
    "box_detections_per_img": 100,
    "fpn_channels": 256,
    "box_head_size": 1024,
    "mask_head_channels": 256,
    "mask_head_layers": 4,
}
#: Options that size the parts above the body; torchvision's own values for ``resnet50``.
_HEAD_OPTIONS = ("fpn_channels", "box_head_size", "mask_head_channels", "mask_head_layers")
_BACKBONES = ("resnet50", "resnet18")
_DETECTORS: dict[str, tuple[str, dict[str, Any]]] = {}


def register_lung_detector(name: str, backbone: str, **defaults: Any) -> None:
    """Make an architecture available to recipes under ``name``.

    Parameters
    ----------
    name
        The registered name.
    backbone
        ``"resnet50"`` (torchvision's ``maskrcnn_resnet50_fpn``) or ``"resnet18"`` (a
        ResNet-18 FPN backbone into torchvision's ``MaskRCNN``).
    **defaults
        Options of this architecture (see :func:`create_lung_detector`).
    """
    if backbone not in _BACKBONES:
        raise ValueError(f'Argument "backbone" should be one of {_BACKBONES}, got {backbone!r}.')
    unknown = sorted(set(defaults) - set(_OPTIONS))
    if unknown:
        raise ValueError(f"Lung detectors have no option(s) {', '.join(unknown)}.")
    _DETECTORS[name] = (backbone, dict(defaults))


def list_lung_detectors() -> list[str]:
    """Registered architectures."""
    return sorted(_DETECTORS)


register_lung_detector("maskrcnn_resnet50_fpn", "resnet50")
register_lung_detector(
    "maskrcnn_resnet18_fpn_s",
    "resnet18",
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=100,
    box_detections_per_img=20,
)
register_lung_detector(
    "maskrcnn_resnet18_fpn_xs",
    "resnet18",
    rpn_pre_nms_top_n_train=600,
    rpn_post_nms_top_n_train=300,
    rpn_pre_nms_top_n_test=300,
    rpn_post_nms_top_n_test=100,
    box_detections_per_img=20,
    fpn_channels=64,
    box_head_size=256,
    mask_head_channels=64,
    mask_head_layers=2,
)


def _check_option(name: str, value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence) or not value:
            raise TypeError(f'Argument "{name}" should be a non-empty sequence of numbers.')
        kind = type(like[0])
        values = tuple(value)
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise TypeError(f'Argument "{name}" should hold numbers, got {value!r}.')
        if not all(v > 0 for v in values):
            raise ValueError(f'Argument "{name}" should hold positive numbers, got {value!r}.')
        if kind is int and not all(isinstance(v, int) for v in values):
            raise TypeError(f'Argument "{name}" should hold integers, got {value!r}.')
        return tuple(kind(v) for v in values)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'Argument "{name}" should be an integer, not {type(value).__name__}.')
    low = 0 if name == "trainable_layers" else 2 if name == "num_classes" else 1
    if value < low or (name == "trainable_layers" and value > 5):
        raise ValueError(f'Argument "{name}" should be an integer >= {low}, got {value}.')
    return value


def create_lung_detector(
    arch: str = "maskrcnn_resnet50_fpn",
    *,
    weights: Mapping[str, torch.Tensor] | None = None,
    **options: Any,
) -> MaskRCNN:
    """Build a Mask R-CNN lesion detector, randomly initialised unless ``weights`` are given.

    Parameters
    ----------
    arch
        A registered name (:func:`list_lung_detectors`).
    weights
        A state dict (from a bundle) to load; nothing is ever downloaded.
    **options
        Overrides of the registered options: ``num_classes`` (3: background and the two
        lesion classes), ``in_channels`` (3: the slab's slices), ``min_size`` / ``max_size``
        (128: the slice size, so torchvision's transform does not resize), ``trainable_layers``
        (0-5 backbone stages left trainable, counted from the top; 5: all, as trained from
        scratch), ``anchor_sizes`` (one per pyramid level, five), ``aspect_ratios``,
        ``rpn_pre_nms_top_n_train`` / ``_test``, ``rpn_post_nms_top_n_train`` / ``_test``,
        ``box_detections_per_img``, and for ResNet-18 bodies the widths above the body:
        ``fpn_channels`` (256), ``box_head_size`` (the two-layer box head's width, 1024),
        ``mask_head_channels`` and ``mask_head_layers`` (the mask head's convolutions, 4 of
        256); torchvision's defaults build torchvision's own modules.

    Raises
    ------
    TypeError
        An option has the wrong type.
    ValueError
        ``arch`` is not registered, or an option is unknown or out of range.
    """
    if not isinstance(arch, str):
        raise TypeError(f'Argument "arch" should be a string, not {type(arch).__name__}.')
    if arch not in _DETECTORS:
        raise ValueError(
            f'Argument "arch": {arch!r} is not a registered lung detector; known: '
            f"{list_lung_detectors()}."
        )
    if weights is not None and not isinstance(weights, Mapping):
        raise TypeError(
            'Argument "weights" should be a state dict or None (nothing is downloaded).'
        )
    backbone_name, defaults = _DETECTORS[arch]
    config = {**_OPTIONS, **defaults}
    for name, value in options.items():
        if name not in _OPTIONS:
            raise ValueError(f'Argument "{name}" is not an option of lung detector {arch!r}.')
        config[name] = _check_option(name, value, _OPTIONS[name])
    if len(config["anchor_sizes"]) != 5:
        raise ValueError('Argument "anchor_sizes" should hold one size per pyramid level (5).')
    if backbone_name == "resnet50":
        changed = [name for name in _HEAD_OPTIONS if config[name] != _OPTIONS[name]]
        if changed:
            raise ValueError(
                f'Argument "{changed[0]}": lung detector {arch!r} keeps torchvision\'s '
                "ResNet-50 widths; head widths are options of ResNet-18 detectors."
            )
    in_channels = config["in_channels"]
    kwargs: dict[str, Any] = {
        "num_classes": config["num_classes"],
        "min_size": config["min_size"],
        "max_size": config["max_size"],
        "image_mean": [0.0] * in_channels,
        "image_std": [1.0] * in_channels,
        "rpn_anchor_generator": AnchorGenerator(
            sizes=tuple((size,) for size in config["anchor_sizes"]),
            aspect_ratios=(config["aspect_ratios"],) * 5,
        ),
        "box_detections_per_img": config["box_detections_per_img"],
    }
    for key in ("pre", "post"):
        for phase in ("train", "test"):
            name = f"rpn_{key}_nms_top_n_{phase}"
            kwargs[name] = config[name]
    model: MaskRCNN
    if backbone_name == "resnet50":
        model = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, **kwargs)
    else:
        backbone = _resnet18_fpn(config["fpn_channels"])
        kwargs["num_classes"] = None  # the predictors below carry the classes
        model = MaskRCNN(backbone, **kwargs, **_heads(config["fpn_channels"], config))
    body = model.backbone.body
    if in_channels != 3:
        conv1 = body.conv1
        body.conv1 = nn.Conv2d(in_channels, conv1.out_channels, 7, stride=2, padding=3, bias=False)
    _freeze(body, config["trainable_layers"])
    if weights is not None:
        model.load_state_dict(dict(weights))
    return model


def _resnet18_fpn(channels: int) -> BackboneWithFPN:
    """torchvision's ResNet-18 body under its FPN of ``channels`` (``resnet_fpn_backbone``'s
    layout: C2-C5 into P2-P5, P6 by max pooling; 256 is what that function builds)."""
    body = resnet18(weights=None, norm_layer=nn.BatchNorm2d)
    return BackboneWithFPN(
        body,
        return_layers={f"layer{n}": str(n - 1) for n in range(1, 5)},
        in_channels_list=[64, 128, 256, 512],
        out_channels=channels,
        extra_blocks=LastLevelMaxPool(),
    )


def _heads(channels: int, config: Mapping[str, Any]) -> dict[str, nn.Module]:
    """torchvision's RPN, box and mask heads at the configured widths (its own defaults give
    the modules ``MaskRCNN`` would build itself, so the weights' names do not change)."""
    levels = ["0", "1", "2", "3"]
    size, mask_channels = config["box_head_size"], config["mask_head_channels"]
    return {
        "rpn_head": RPNHead(channels, len(config["aspect_ratios"])),
        "box_roi_pool": MultiScaleRoIAlign(levels, output_size=7, sampling_ratio=2),
        "box_head": TwoMLPHead(channels * 7 * 7, size),
        "box_predictor": FastRCNNPredictor(size, config["num_classes"]),
        "mask_roi_pool": MultiScaleRoIAlign(levels, output_size=14, sampling_ratio=2),
        "mask_head": MaskRCNNHeads(channels, [mask_channels] * config["mask_head_layers"], 1),
        "mask_predictor": MaskRCNNPredictor(mask_channels, mask_channels, config["num_classes"]),
    }


def _freeze(body: nn.Module, trainable_layers: int) -> None:
    # torchvision ignores trainable layers without pretrained weights; here weights may come
    # from a bundle, so stages below the top ``trainable_layers`` are frozen either way.
    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not any(name.startswith(layer) for layer in trainable):
            parameter.requires_grad_(False)


def parameter_count(module: nn.Module) -> int:
    """Number of parameters (trainable or not)."""
    return sum(p.numel() for p in module.parameters())


# -- targets and inference -------------------------------------------------------------------


def targets_from_slice(
    labels_slice: np.ndarray, instances_slice: np.ndarray, *, min_pixels: int = MIN_TARGET_PIXELS
) -> dict[str, torch.Tensor]:
    """torchvision's training target for one slice, from the truth label and instance maps.

    One instance per lesion id on the slice (its pixels, even in several pieces); a lesion
    covering fewer than ``min_pixels`` pixels here is left out (:data:`MIN_TARGET_PIXELS`).
    Its label is the most frequent label value under its pixels.

    Returns
    -------
    dict
        ``boxes`` float32 ``(N, 4)`` as ``x0, y0, x1, y1`` (pixel edges: ``x1`` is one past the
        last column), ``labels`` int64 ``(N,)``, ``masks`` uint8 ``(N, rows, columns)``.
    """
    labels = np.asarray(labels_slice)
    instances = np.asarray(instances_slice)
    if labels.ndim != 2 or labels.shape != instances.shape:
        raise ValueError(
            'Arguments "labels_slice" and "instances_slice" should be 2-D of one shape, got '
            f"{labels.shape} and {instances.shape}."
        )
    boxes, classes, masks = [], [], []
    for lesion in np.unique(instances):
        if lesion == 0:
            continue
        mask = instances == lesion
        values = labels[mask]
        values = values[values > 0]
        if mask.sum() < min_pixels or values.size == 0:
            continue
        rows, cols = np.nonzero(mask)
        boxes.append([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1])
        classes.append(int(np.bincount(values).argmax()))
        masks.append(mask)
    shape = labels.shape
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(classes, dtype=torch.int64),
        "masks": torch.from_numpy(np.array(masks, dtype=np.uint8).reshape(-1, *shape)),
    }


def detect_slices(
    model: nn.Module,
    image_hu: np.ndarray,
    *,
    channels: int = 3,
    batch: int = 8,
    score_threshold: float = 0.05,
) -> list[SliceDetection]:
    """Run the detector over every slice of a volume.

    Each slice's slab (:func:`slab` of :func:`normalise_hu`) goes through the model in eval
    mode, ``batch`` slices at a time; the model's training mode is restored after. Boxes are
    rounded outward to whole pixels and clipped to the slice, masks are thresholded at 0.5 and
    cropped to the box; a detection under ``score_threshold``, or whose mask is empty in its
    box, is dropped.

    Returns
    -------
    list of SliceDetection
        By slice, then as the model ranked them.
    """
    volume = np.asarray(image_hu)
    if volume.ndim != 3:
        raise ValueError(f'Argument "image_hu" should be (slice, row, column), got {volume.shape}.')
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f'Argument "batch" should be a positive integer, got {batch!r}.')
    if not 0.0 <= float(score_threshold) <= 1.0:
        raise ValueError(f'Argument "score_threshold" should be in [0, 1], got {score_threshold}.')
    normalised = normalise_hu(volume)
    rows, cols = volume.shape[1:]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    detections: list[SliceDetection] = []
    try:
        for start in range(0, volume.shape[0], batch):
            ks = range(start, min(start + batch, volume.shape[0]))
            inputs = [torch.from_numpy(slab(normalised, k, channels)).to(device) for k in ks]
            with torch.inference_mode():
                outputs = model(inputs)
            for k, output in zip(ks, outputs, strict=True):
                detections.extend(_detections(k, output, rows, cols, score_threshold))
    finally:
        model.train(was_training)
    logger.debug("%d detections on %d slices", len(detections), volume.shape[0])
    return detections


def _detections(
    k: int, output: Mapping[str, torch.Tensor], rows: int, cols: int, score_threshold: float
) -> list[SliceDetection]:
    boxes = output["boxes"].detach().cpu().numpy()
    labels = output["labels"].detach().cpu().numpy()
    scores = output["scores"].detach().cpu().numpy()
    masks = output["masks"].detach().cpu().numpy()[:, 0] >= 0.5
    found = []
    for (x0, y0, x1, y1), label, score, mask in zip(boxes, labels, scores, masks, strict=True):
        if score < score_threshold or label < 1:
            continue
        top, left = max(0, math.floor(y0)), max(0, math.floor(x0))
        bottom, right = min(rows, math.ceil(y1)), min(cols, math.ceil(x1))
        if bottom <= top or right <= left:
            continue
        crop = mask[top:bottom, left:right]
        if not crop.any():
            continue
        found.append(
            SliceDetection(
                k=int(k),
                label=int(label),
                score=float(min(max(score, 0.0), 1.0)),
                box=(top, left, bottom, right),
                mask=np.ascontiguousarray(crop),
            )
        )
    return found
