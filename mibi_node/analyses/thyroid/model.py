"""The cross-feature ResNet of seed 001, registered as an ensemble member architecture.

Seed 001 improves a ResNet by adding to every residual block's output an input ``x_i`` that
carries the image's "cross-feature" information, so a block keeps what it learned and also
learns the features that overlap between findings (a hot adenoma *and* a cold nodule in one
scan). Here ``x_i`` is the input image itself, brought to the block's resolution three ways:
average pooling (the uptake pattern), max pooling (hot foci) and negated min pooling (cold
defects); a 1x1 convolution and batch norm project it to the block's width::

    y = relu(F(x) + shortcut(x) + P(x_i))

The network is a timm model (``crossfeature_resnet``, ``crossfeature_resnet_s``) with
``forward_features``, ``num_features`` and ``feature_info``, so
:func:`mibi_node.inference.members.create_member` wraps it in the attention pooling head
like the plain timm ResNets beside it; with ``num_classes`` set to the six findings and a
sigmoid per logit it is the thyroid analysis' multi-label member.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from timm.models import register_model
from torch import nn

from mibi_node.inference.members import is_member, register_member

__all__ = ["CROSS_FEATURE_ARCHS", "CrossFeatureBlock", "CrossFeatureResNet"]

logger = logging.getLogger(__name__)

#: The cross-feature architectures this module registers with timm and the member registry.
CROSS_FEATURE_ARCHS: tuple[str, ...] = ("crossfeature_resnet", "crossfeature_resnet_s")


def _cross_input(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``x_i``: the input image at ``size`` as its mean, maximum and (negated) minimum."""
    mean = F.adaptive_avg_pool2d(image, size)
    high = F.adaptive_max_pool2d(image, size)
    low = -F.adaptive_max_pool2d(-image, size)
    return torch.cat([mean, high, -low], dim=1)


class CrossFeatureBlock(nn.Module):
    """A basic residual block whose output also receives the projected cross-feature input.

    Parameters
    ----------
    in_chs, out_chs
        Channels in and out.
    stride
        Stride of the first convolution (and of the shortcut).
    cross_chs
        Channels of the cross-feature input ``x_i``.
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, cross_chs: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chs, out_chs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chs)
        self.conv2 = nn.Conv2d(out_chs, out_chs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        nn.init.zeros_(self.bn2.weight)  # start as the shortcut, as timm's ResNets do
        if stride != 1 or in_chs != out_chs:
            # ResNet-D shortcut: average pooling keeps a focus of a few pixels alive
            self.shortcut: nn.Module = nn.Sequential(
                nn.AvgPool2d(stride, stride, ceil_mode=True) if stride > 1 else nn.Identity(),
                nn.Conv2d(in_chs, out_chs, 1, bias=False),
                nn.BatchNorm2d(out_chs),
            )
        else:
            self.shortcut = nn.Identity()
        self.cross = nn.Sequential(
            nn.Conv2d(cross_chs, out_chs, 1, bias=False), nn.BatchNorm2d(out_chs)
        )

    def forward(self, x: torch.Tensor, cross: torch.Tensor) -> torch.Tensor:
        """Block output for feature map ``x`` and the full-resolution cross input ``cross``."""
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = self.shortcut(x)
        x_i = _cross_input(cross, residual.shape[-2:])
        return F.relu(residual + shortcut + self.cross(x_i))


class CrossFeatureResNet(nn.Module):
    """A small ResNet whose every residual block adds the cross-feature input ``x_i``.

    Parameters
    ----------
    in_chans
        Input channels (1 for the anterior thyroid image).
    num_classes
        Logits of the plain linear classifier; 0 leaves only the features (how members use
        it: their attention head does the classifying).
    widths
        Channels of each stage; every stage after the first halves the resolution.
    depths
        Residual blocks per stage.
    stem_width
        Channels of the stem (two 3x3 convolutions, the second of stride 2).
    drop_rate
        Dropout before the linear classifier.
    global_pool
        ``"avg"`` or ``""`` (no pooling: :meth:`forward_head` returns the feature map).
    """

    def __init__(
        self,
        in_chans: int = 1,
        num_classes: int = 6,
        *,
        widths: Sequence[int] = (32, 64, 128, 256),
        depths: Sequence[int] = (1, 1, 1, 1),
        stem_width: int = 16,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        **_: Any,
    ) -> None:
        super().__init__()
        if len(widths) != len(depths) or not widths:
            raise ValueError(
                'Arguments "widths" and "depths" should have the same, non-zero length.'
            )
        if global_pool not in ("avg", ""):
            raise ValueError(f'Argument "global_pool" should be "avg" or "", got {global_pool!r}.')
        cross_chs = 3 * in_chans
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, stem_width, 3, 1, 1, bias=False),
            nn.BatchNorm2d(stem_width),
            nn.ReLU(inplace=True),
            nn.Conv2d(stem_width, widths[0], 3, 2, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        blocks: list[CrossFeatureBlock] = []
        self.feature_info: list[dict[str, Any]] = []
        channels, reduction = widths[0], 2
        for stage, (width, depth) in enumerate(zip(widths, depths, strict=True)):
            for index in range(depth):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(CrossFeatureBlock(channels, width, stride, cross_chs))
                channels = width
                reduction *= stride
            self.feature_info.append(
                {"num_chs": width, "reduction": reduction, "module": f"blocks.{len(blocks) - 1}"}
            )
        self.blocks = nn.ModuleList(blocks)
        self.num_features = channels
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.drop_rate = drop_rate
        self.fc: nn.Module = nn.Linear(channels, num_classes) if num_classes else nn.Identity()

    def forward_features(self, x: torch.Tensor, cross: torch.Tensor | None = None) -> torch.Tensor:
        """The last feature map (B, num_features, h, w).

        ``cross`` is the image the blocks' ``x_i`` is taken from; the input itself when
        ``None`` (a different tensor only to study the cross-feature path).
        """
        cross = x if cross is None else cross
        features = self.stem(x)
        for block in self.blocks:
            features = block(features, cross)
        return features

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Pool and classify a feature map."""
        if not self.global_pool:
            return features
        pooled = features.mean(dim=(2, 3))
        pooled = F.dropout(pooled, self.drop_rate, self.training)
        logits: torch.Tensor = self.fc(pooled)
        return logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes), or features when built without classifier or pooling."""
        return self.forward_head(self.forward_features(x))


@register_model  # type: ignore[misc]
def crossfeature_resnet(pretrained: bool = False, **kwargs: Any) -> CrossFeatureResNet:
    """Cross-feature ResNet, one block per stage (32-64-128-256), about 1.2 M parameters."""
    if pretrained:
        raise ValueError("crossfeature_resnet has no pretrained weights.")
    return CrossFeatureResNet(**kwargs)


@register_model  # type: ignore[misc]
def crossfeature_resnet_s(pretrained: bool = False, **kwargs: Any) -> CrossFeatureResNet:
    """A narrower cross-feature ResNet (16-32-64-128) for tests and quick demos."""
    if pretrained:
        raise ValueError("crossfeature_resnet_s has no pretrained weights.")
    return CrossFeatureResNet(widths=(16, 32, 64, 128), stem_width=8, **kwargs)


for _arch in CROSS_FEATURE_ARCHS:
    if not is_member(_arch):
        register_member(_arch, "resnet")
