"""The spine analysis' two networks: a keypoint heatmap network and an ROI classifier.

Seed 002 locates the eleven levels first and classifies each afterwards on a crop around
it. Here, as the better methods of the Spinal Disease 2020 challenge did:

**Keypoints** (:class:`SpineKeypointNet`): a timm encoder (``features_only``) with a light
feature-pyramid decoder to stride 4 (or 2) gives one Gaussian heatmap per level, in
:data:`~mibi_node.analyses.spine.levels.LEVELS` order, and a 2-channel sub-pixel offset
map shared by all levels (CenterNet's coarse heatmap + fine regression). Decoding takes
each channel's argmax, adds the offset read at that cell and maps the cell back to input
pixels (:func:`decode_keypoints`); the peak's sigmoid is the point's score.

**Classes** (:func:`create_roi_classifier`): each point's crop is a square turned along the
spine, centred on the point, whose side is ``scale`` times the distance between the level's
upper and lower neighbours (twice the distance to the one neighbour at either end)
(:func:`crop_boxes`, :func:`extract_rois`); it is resampled to a fixed size and classified
by an ensemble member (:func:`mibi_node.inference.members.create_member`) with
``2 + 5`` logits: the vertebra head's two and the disc head's five, each normalised by its
own softmax (:func:`class_probabilities`).

Both are registered the project's way: the narrow ResNet used by the demo is a timm model
(``spine_resnet10t_s``) and a registered member; keypoint encoders have their own small
registry (:func:`register_keypoint_encoder`, :func:`create_keypoint_model`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F  # noqa: N812
from timm.models import register_model
from torch import nn

from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS
from mibi_node.inference.members import Member, create_member, is_member, register_member

__all__ = [
    "CLASS_LOGITS",
    "KeypointConfig",
    "SpineKeypointNet",
    "class_probabilities",
    "create_keypoint_model",
    "create_roi_classifier",
    "crop_boxes",
    "decode_keypoints",
    "extract_rois",
    "keypoint_loss",
    "keypoint_targets",
    "kind_cross_entropy",
    "kind_predictions",
    "kind_targets",
    "list_keypoint_encoders",
    "register_keypoint_encoder",
]

logger = logging.getLogger(__name__)

#: Kind -> the slice of the classifier's logits that holds that kind's classes.
CLASS_LOGITS: dict[str, slice] = {
    "vertebra": slice(0, len(CLASSES["vertebra"])),
    "disc": slice(len(CLASSES["vertebra"]), len(CLASSES["vertebra"]) + len(CLASSES["disc"])),
}
_NUM_LOGITS = len(CLASSES["vertebra"]) + len(CLASSES["disc"])


@register_model  # type: ignore[misc]
def spine_resnet10t_s(pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """ResNet-10-T at half width (32-64-128-256, 16 px stem): about 1.2 M parameters.

    The deep 3x3 stem and average-pooled shortcuts keep small structures (a disc's
    posterior edge) alive; half width keeps one training step of a 192 px input near
    30 ms on one CPU core.
    """
    if pretrained:
        raise ValueError("spine_resnet10t_s has no pretrained weights.")
    kwargs.setdefault("channels", (32, 64, 128, 256))
    kwargs.setdefault("stem_width", 16)
    model: nn.Module = timm.create_model("resnet10t", pretrained=False, **kwargs)
    return model


if not is_member("spine_resnet10t_s"):
    register_member("spine_resnet10t_s", "resnet")


# -- keypoint network ------------------------------------------------------------------------

_ENCODERS: dict[str, dict[str, Any]] = {}


def register_keypoint_encoder(arch: str, **kwargs: Any) -> None:
    """Make a timm architecture available as a keypoint encoder.

    Parameters
    ----------
    arch
        A timm model name that supports ``features_only``.
    **kwargs
        Passed to :func:`timm.create_model` every time the encoder is built.
    """
    if not timm.is_model(arch):
        raise ValueError(f'Argument "arch": timm has no model named {arch!r}.')
    _ENCODERS[arch] = dict(kwargs)


def list_keypoint_encoders() -> list[str]:
    """Names of the registered keypoint encoders."""
    return sorted(_ENCODERS)


for _arch in ("spine_resnet10t_s", "resnet10t", "resnet18d", "efficientnet_b0"):
    register_keypoint_encoder(_arch)


@dataclass(frozen=True)
class KeypointConfig:
    """Everything needed to rebuild a keypoint network before loading its weights.

    Attributes
    ----------
    arch
        A registered keypoint encoder (:func:`list_keypoint_encoders`).
    in_chans
        Input channels (the middle slice and its neighbours).
    decoder_channels
        Width of the feature-pyramid decoder.
    stride
        Input pixels per heatmap cell: 4, or 2 (one more upsampling step).
    """

    arch: str = "spine_resnet10t_s"
    in_chans: int = 3
    decoder_channels: int = 64
    stride: int = 4

    def as_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return asdict(self)


def _conv_bn_relu(in_chs: int, out_chs: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class SpineKeypointNet(nn.Module):
    """Heatmaps of the eleven levels plus a shared sub-pixel offset map.

    Build it with :func:`create_keypoint_model`.

    Parameters
    ----------
    config
        Architecture, input channels, decoder width and output stride.
    """

    def __init__(self, config: KeypointConfig) -> None:
        super().__init__()
        if config.stride not in (2, 4):
            raise ValueError(f'Argument "stride" should be 2 or 4, got {config.stride}.')
        self.config = config
        self.encoder = timm.create_model(
            config.arch,
            pretrained=False,
            features_only=True,
            in_chans=config.in_chans,
            **_ENCODERS.get(config.arch, {}),
        )
        info: Any = self.encoder.feature_info
        channels: list[int] = list(info.channels())
        reductions: list[int] = list(info.reduction())
        width = config.decoder_channels
        #: Encoder outputs used by the pyramid: stride 4 and coarser (and stride 2 at stride 2).
        self.used = [i for i, r in enumerate(reductions) if r >= config.stride]
        if not self.used or reductions[self.used[0]] != config.stride:
            raise ValueError(
                f"encoder {config.arch} has no stride-{config.stride} features ({reductions})"
            )
        self.lateral = nn.ModuleList(
            [nn.Conv2d(channels[i], width, 1, bias=False) for i in self.used]
        )
        self.smooth = _conv_bn_relu(width, width)
        self.head = _conv_bn_relu(width, width)
        self.heatmap = nn.Conv2d(width, len(LEVELS), 1)
        self.offset = nn.Conv2d(width, 2, 1)
        with torch.no_grad():
            self.heatmap.bias.fill_(-2.19)  # type: ignore[union-attr]  # sigmoid 0.1 (CenterNet)
            self.offset.weight.zero_()
            self.offset.bias.zero_()  # type: ignore[union-attr]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Heatmap logits (B, 11, H/s, W/s) and offsets (B, 2, H/s, W/s), s the stride."""
        features = self.encoder(x)
        pyramid = [features[i] for i in self.used]
        top = self.lateral[-1](pyramid[-1])
        for level in range(len(pyramid) - 2, -1, -1):
            lateral = self.lateral[level](pyramid[level])
            top = lateral + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
        shared = self.head(self.smooth(top))
        return self.heatmap(shared), self.offset(shared)


def create_keypoint_model(
    arch: str = "spine_resnet10t_s",
    *,
    in_chans: int = 3,
    decoder_channels: int = 64,
    stride: int = 4,
) -> SpineKeypointNet:
    """Build a randomly initialised keypoint network (weights come from bundles).

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``arch`` is not a registered keypoint encoder, or a size is out of range.
    """
    if not isinstance(arch, str):
        raise TypeError(f'Argument "arch" should be a string, not {type(arch).__name__}.')
    if arch not in _ENCODERS:
        raise ValueError(
            f'Argument "arch": {arch!r} is not a registered keypoint encoder; '
            f"known: {list_keypoint_encoders()}."
        )
    for name, value in (("in_chans", in_chans), ("decoder_channels", decoder_channels)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'Argument "{name}" should be an integer, not {type(value).__name__}.')
        if value < 1:
            raise ValueError(f'Argument "{name}" should be a positive integer, got {value}.')
    return SpineKeypointNet(KeypointConfig(arch, in_chans, decoder_channels, stride))


def _to_cells(points: torch.Tensor, stride: int) -> torch.Tensor:
    """Input-pixel positions (pixel centres at integers) -> heatmap cell coordinates."""
    return (points + 0.5) / stride - 0.5


def _to_pixels(cells: torch.Tensor, stride: int) -> torch.Tensor:
    return (cells + 0.5) * stride - 0.5


def keypoint_targets(
    points: torch.Tensor,
    valid: torch.Tensor,
    shape: tuple[int, int],
    stride: int,
    sigma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training targets of a batch of annotated points.

    Parameters
    ----------
    points
        (B, 11, 2) row, column in input pixels.
    valid
        (B, 11) bool: the level is annotated and inside the input.
    shape
        (rows, columns) of the heatmap.
    stride
        Input pixels per heatmap cell.
    sigma
        Gaussian sigma in heatmap cells.

    Returns
    -------
    tuple of torch.Tensor
        Heatmaps (B, 11, rows, cols) peaking at exactly 1 on each level's cell, the cells
        (B, 11, 2) long, and the offsets (B, 11, 2) from those cells to the points.
    """
    rows, cols = shape
    cells = _to_cells(points, stride)
    centre = torch.round(cells)
    centre[..., 0].clamp_(0, rows - 1)
    centre[..., 1].clamp_(0, cols - 1)
    offsets = cells - centre
    grid_r = torch.arange(rows, dtype=points.dtype, device=points.device)[None, None, :, None]
    grid_c = torch.arange(cols, dtype=points.dtype, device=points.device)[None, None, None, :]
    d2 = (grid_r - centre[..., 0, None, None]) ** 2 + (grid_c - centre[..., 1, None, None]) ** 2
    heatmaps = torch.exp(-d2 / (2.0 * sigma**2)) * valid[..., None, None].to(points.dtype)
    return heatmaps, centre.long(), offsets


def keypoint_loss(
    heatmap_logits: torch.Tensor,
    offsets: torch.Tensor,
    targets: torch.Tensor,
    cells: torch.Tensor,
    target_offsets: torch.Tensor,
    valid: torch.Tensor,
    *,
    offset_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CenterNet's penalty-reduced focal loss on the heatmaps and L1 on the offsets.

    Both are averaged over the annotated points. Returns ``(heatmap loss, offset loss)``;
    the offset loss is already multiplied by ``offset_weight``.
    """
    prob = torch.sigmoid(heatmap_logits.float()).clamp(1e-4, 1 - 1e-4)
    positive = targets >= 1.0 - 1e-6
    pos_loss = -torch.log(prob) * (1 - prob) ** 2
    neg_loss = -torch.log(1 - prob) * prob**2 * (1 - targets) ** 4
    count = valid.sum().clamp(min=1).float()
    heat = (pos_loss * positive).sum() / count + (neg_loss * ~positive).sum() / count
    batch = torch.arange(offsets.shape[0], device=offsets.device)[:, None].expand_as(cells[..., 0])
    picked = offsets[batch, :, cells[..., 0], cells[..., 1]]  # (B, 11, 2)
    l1 = (picked - target_offsets).abs().sum(-1) * valid
    return heat, offset_weight * l1.sum() / count


def decode_keypoints(
    heatmap_logits: torch.Tensor, offsets: torch.Tensor, stride: int
) -> torch.Tensor:
    """Each level's point: the heatmap argmax plus the offset read there.

    Parameters
    ----------
    heatmap_logits
        (B, 11, rows, cols).
    offsets
        (B, 2, rows, cols) in heatmap cells.
    stride
        Input pixels per heatmap cell.

    Returns
    -------
    torch.Tensor
        (B, 11, 3): row and column in input pixels (pixel centres at integers), and the
        peak's sigmoid as the score.
    """
    batch, levels, rows, cols = heatmap_logits.shape
    flat = heatmap_logits.reshape(batch, levels, -1)
    peak, index = flat.max(dim=-1)
    row, col = index // cols, index % cols
    b = torch.arange(batch, device=heatmap_logits.device)[:, None].expand(batch, levels)
    fine = offsets[b, :, row, col].clamp(-1.0, 1.0)  # (B, 11, 2)
    cells = torch.stack([row, col], dim=-1).to(fine.dtype) + fine
    pixels = _to_pixels(cells, stride)
    return torch.cat([pixels, torch.sigmoid(peak)[..., None].to(pixels.dtype)], dim=-1)


# -- region of interest classifier -----------------------------------------------------------


def crop_boxes(points: np.ndarray, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Side and angle of each level's crop, from its neighbouring points.

    Parameters
    ----------
    points
        (11, 2) row, column of the levels in :data:`LEVELS` order, in pixels.
    scale
        Side = ``scale`` x the distance between the level's upper and lower neighbours
        (at either end: twice the distance to its one neighbour).

    Returns
    -------
    tuple of numpy.ndarray
        Sides (11,) in pixels (at least 8) and angles (11,) in radians of the local spine
        axis (upper to lower neighbour) against the image's row axis.
    """
    pts = np.asarray(points, dtype=np.float64)
    if pts.shape != (len(LEVELS), 2):
        raise ValueError(f'Argument "points" should be ({len(LEVELS)}, 2), got {pts.shape}.')
    upper = np.concatenate([pts[:1], pts[:-2], pts[-2:-1]])
    lower = np.concatenate([pts[1:2], pts[2:], pts[-1:]])
    span = np.linalg.norm(lower - upper, axis=1)
    ends = np.zeros(len(pts), dtype=bool)
    ends[[0, -1]] = True
    span[ends] *= 2.0
    axis = lower - upper
    angles = np.arctan2(axis[:, 1], axis[:, 0])
    return np.maximum(scale * span, 8.0), angles


def extract_rois(
    image: torch.Tensor,
    centres: torch.Tensor,
    sides: torch.Tensor,
    angles: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """Square crops turned along the spine, resampled to ``size`` px (bilinear).

    Parameters
    ----------
    image
        (C, H, W) normalised image.
    centres
        (K, 2) row, column of the crop centres, in pixels.
    sides
        (K,) sides in pixels.
    angles
        (K,) rotation of each crop: its rows run along the spine axis.
    size
        Side of the output crops.

    Returns
    -------
    torch.Tensor
        (K, C, size, size); outside the image reads 0.
    """
    _, rows, cols = image.shape
    count = centres.shape[0]
    if count == 0:
        return image.new_zeros((0, image.shape[0], size, size))
    cos, sin = torch.cos(angles), torch.sin(angles)
    half = sides / 2.0
    # affine_grid maps output (x, y) in [-1, 1] to input (x, y) in [-1, 1], x = columns
    theta = image.new_zeros((count, 2, 3))
    sx, sy = 2.0 / cols, 2.0 / rows
    # output row direction (y) follows the spine axis (cos, sin) in (row, col)
    theta[:, 0, 0] = half * cos * sx
    theta[:, 0, 1] = half * sin * sx
    theta[:, 1, 0] = -half * sin * sy
    theta[:, 1, 1] = half * cos * sy
    theta[:, 0, 2] = (centres[:, 1] + 0.5) * sx - 1.0
    theta[:, 1, 2] = (centres[:, 0] + 0.5) * sy - 1.0
    grid = F.affine_grid(theta, [count, image.shape[0], size, size], align_corners=False)
    batch = image[None].expand(count, -1, -1, -1)
    return F.grid_sample(batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def create_roi_classifier(
    arch: str = "spine_resnet10t_s",
    *,
    in_chans: int = 3,
    size: int = 48,
    heads: int = 4,
    embed_dim: int = 64,
    drop_rate: float = 0.0,
) -> Member:
    """An ensemble member with the vertebra and disc heads' logits side by side.

    See :data:`CLASS_LOGITS` for which logits belong to which kind.
    """
    return create_member(
        arch,
        num_classes=_NUM_LOGITS,
        in_chans=in_chans,
        heads=heads,
        embed_dim=embed_dim,
        input_size=size,
        drop_rate=drop_rate,
    )


def class_probabilities(logits: torch.Tensor, levels: list[str]) -> list[dict[str, float]]:
    """Softmax of each crop's logits over its own kind's classes.

    Parameters
    ----------
    logits
        (K, 7) classifier output.
    levels
        The level of each crop.
    """
    out = []
    for row, level in zip(logits.float(), levels, strict=True):
        kind = LEVEL_KIND[level]
        probs = torch.softmax(row[CLASS_LOGITS[kind]], dim=0).tolist()
        out.append({name: float(p) for name, p in zip(CLASSES[kind], probs, strict=True)})
    return out


def kind_targets(levels: list[str], labels: list[str]) -> torch.Tensor:
    """Index of each label among the classifier's seven logits (for cross-entropy)."""
    out = []
    for level, label in zip(levels, labels, strict=True):
        kind = LEVEL_KIND[level]
        out.append(CLASS_LOGITS[kind].start + CLASSES[kind].index(label))
    return torch.tensor(out, dtype=torch.long)


def _own_head(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logits with the other kind's head set to -inf (the kind is read from the target)."""
    vertebra = targets < CLASS_LOGITS["vertebra"].stop
    mask = torch.zeros_like(logits, dtype=torch.bool)
    mask[vertebra, CLASS_LOGITS["vertebra"]] = True
    mask[~vertebra, CLASS_LOGITS["disc"]] = True
    return logits.float().masked_fill(~mask, -math.inf)


def kind_cross_entropy(
    logits: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Cross-entropy of each crop over its own kind's logits (the other head is masked)."""
    return F.cross_entropy(_own_head(logits, targets), targets, weight=weight)


def kind_predictions(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Index of the most probable class of each crop's own kind (as :func:`kind_targets`)."""
    return _own_head(logits, targets).argmax(dim=1)
