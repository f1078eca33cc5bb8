"""Ensemble members: a timm backbone with a multi-head attention pooling head.

The patent models each of its nine CNNs "by adopting a multi-head attention mechanism". Here a
member is the backbone's last feature map (``timm.create_model(arch, num_classes=0,
global_pool="")``, then ``forward_features``) pooled by :class:`timm.layers.AttentionPool2d`,
whose class token's output is projected to the class logits. The head's width is set by
``embed_dim`` (512 by default; the backbone's width would add about 90M parameters to the nine
heads). The pooling attention of the class token over the feature map is what localisation
reads (:meth:`Member.forward_with_attention`).

Architectures are registered in timm's spirit (:func:`register_member`, :func:`list_members`,
:func:`create_member`); the patent's nine are registered, plus a few small ones for demos.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import timm
import torch
from timm.layers import AttentionPool2d, resample_abs_pos_embed
from torch import nn

__all__ = [
    "PATENT_ARCHS",
    "Member",
    "MemberConfig",
    "create_member",
    "is_member",
    "list_members",
    "register_member",
]

logger = logging.getLogger(__name__)

#: The nine sub-models of the patent (claim 3), in the order of its fusion formula.
PATENT_ARCHS: tuple[str, ...] = (
    "vgg19",
    "resnet18",
    "resnet50",
    "resnet152",
    "densenet169",
    "densenet264d",
    "efficientnet_b0",
    "efficientnet_b4",
    "efficientnet_b7",
)


@dataclass(frozen=True)
class _ArchEntry:
    arch: str
    family: str
    adapt: Callable[[nn.Module], nn.Module]


_REGISTRY: dict[str, _ArchEntry] = {}


def _keep(backbone: nn.Module) -> nn.Module:
    return backbone


def _drop_vgg_mlp(backbone: nn.Module) -> nn.Module:
    # timm's VGG keeps fc6/fc7 as a ConvMlp ("pre_logits", ~120M parameters) even with
    # num_classes=0; a member uses only the convolutional features, so drop it.
    backbone.pre_logits = nn.Identity()
    return backbone


def _zero_init_residual_ends(backbone: nn.Module) -> nn.Module:
    # timm zero-initialises the last BatchNorm of every ResNet residual branch, so a fresh
    # ResNet starts as its shortcut path and learns fast from scratch; its EfficientNets do
    # not. Doing the same for their residual blocks lifts a from-scratch EfficientNet-B0 on
    # the phantoms from 0.59 to 0.67 accuracy at equal steps (docs/training.md). It only sets
    # initial values: a trained member's weights load as before.
    for block in backbone.modules():
        if not getattr(block, "has_skip", False):
            continue
        last = getattr(block, "bn3", None)
        if last is None:
            last = getattr(block, "bn2", None)
        if isinstance(last, nn.BatchNorm2d):
            nn.init.zeros_(last.weight)
    return backbone


def register_member(
    arch: str, family: str, adapt: Callable[[nn.Module], nn.Module] | None = None
) -> None:
    """Make a timm architecture available to :func:`create_member`.

    Parameters
    ----------
    arch
        A timm model name (``timm.list_models()``).
    family
        The patent's model family it belongs to (``"vgg"``, ``"resnet"``, ...), for reports.
    adapt
        Called on the freshly built backbone, e.g. to drop modules the member does not use.
    """
    if not timm.is_model(arch):
        raise ValueError(f'Argument "arch": timm has no model named {arch!r}.')
    _REGISTRY[arch] = _ArchEntry(arch=arch, family=family, adapt=adapt or _keep)


# The patent's nine, then small architectures for demonstration bundles and quick tests.
# ``resnet10t`` and ``resnet18d`` are the ResNets of the CPU demo: their deep 3x3 stem and
# average-pooled shortcuts ("ResNet-D", He et al. 2019) keep a focus of a few pixels alive,
# where ResNet-18's 7x7 stride-2 stem and stride-2 1x1 shortcuts subsample it away; from
# scratch on a few hundred phantom studies that is 0.70 against 0.43 accuracy
# (docs/training.md).
for _arch in (
    *PATENT_ARCHS,
    "resnet10t",
    "resnet18d",
    "densenet121",
    "efficientnet_lite0",
    "vgg11",
):
    _family = next(f for f in ("vgg", "resnet", "densenet", "efficientnet") if _arch.startswith(f))
    _adapt = {"vgg": _drop_vgg_mlp, "efficientnet": _zero_init_residual_ends}.get(_family)
    register_member(_arch, _family, _adapt)


def list_members(patent_only: bool = False) -> list[str]:
    """Names of the registered architectures (only the patent's nine if asked)."""
    if patent_only:
        return list(PATENT_ARCHS)
    return sorted(_REGISTRY)


def is_member(arch: str) -> bool:
    """Whether ``arch`` is a registered member architecture."""
    return arch in _REGISTRY


@dataclass(frozen=True)
class MemberConfig:
    """Everything needed to rebuild a member before loading its weights (kept in bundles).

    Attributes
    ----------
    arch
        Registered timm architecture.
    num_classes, in_chans
        Output classes and input channels.
    heads
        Attention heads of the pooling head.
    embed_dim
        Width of the attention head's query/key/value projections.
    input_size
        Side of the square input the positional embedding is laid out for; other sizes work
        (the embedding is resampled) but this is the size the member was trained at.
    """

    arch: str
    num_classes: int = 5
    in_chans: int = 2
    heads: int = 8
    embed_dim: int = 512
    input_size: int = 224

    def as_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return asdict(self)


class Member(nn.Module):
    """One ensemble member: backbone feature map -> attention pooling -> class logits.

    Build it with :func:`create_member`.
    """

    def __init__(self, config: MemberConfig, backbone: nn.Module, head: AttentionPool2d) -> None:
        super().__init__()
        self.config = config
        self.backbone = backbone
        self.head = head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's last feature map, (B, C, h, w)."""
        features: torch.Tensor = self.backbone.forward_features(x)  # type: ignore[operator]
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits, (B, num_classes)."""
        logits: torch.Tensor = self.head(self.forward_features(x))
        return logits

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits and the class token's attention over the feature map.

        Returns
        -------
        tuple of torch.Tensor
            Logits (B, num_classes), equal to :meth:`forward`'s, and the attention weights
            (B, h, w) averaged over heads; each map sums to at most 1 (the rest is the weight
            the class token gives itself).
        """
        features = self.forward_features(x)
        head = self.head
        batch, _, rows, cols = features.shape
        tokens = features.flatten(2).transpose(1, 2)
        tokens = torch.cat([tokens.mean(1, keepdim=True), tokens], dim=1)
        pos_embed = resample_abs_pos_embed(
            head.pos_embed.unsqueeze(0), (rows, cols), old_size=head.feat_size, num_prefix_tokens=1
        )
        tokens = tokens + pos_embed
        assert head.qkv is not None  # create_member never builds separate q, k, v
        qkv = head.qkv(tokens).reshape(batch, -1, 3, head.num_heads, head.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        query = q[:, :, :1] * head.scale
        attention = (query @ k.transpose(-2, -1)).float().softmax(dim=-1)
        pooled = (attention.to(v.dtype) @ v).transpose(1, 2).reshape(batch, -1)
        logits: torch.Tensor = head.proj(pooled)
        maps = attention[:, :, 0, 1:].mean(dim=1).reshape(batch, rows, cols)
        return logits, maps


def create_member(
    arch: str,
    num_classes: int = 5,
    in_chans: int = 2,
    heads: int = 8,
    *,
    embed_dim: int = 512,
    input_size: int = 224,
    drop_rate: float = 0.0,
) -> Member:
    """Build a randomly initialised member (no pretrained download; weights come from bundles).

    Parameters
    ----------
    arch
        A registered architecture (:func:`list_members`), e.g. ``"resnet50"``.
    num_classes
        Number of output classes.
    in_chans
        Number of input channels (phases), e.g. 2 for early + delayed.
    heads
        Attention heads of the pooling head; must divide ``embed_dim``.
    embed_dim
        Width of the attention head.
    input_size
        Side of the square input; lays out the head's positional embedding.
    drop_rate
        Dropout inside the backbone's classifier path and the head (training only).

    Returns
    -------
    Member
        The member in training mode, as ``nn.Module`` conventions have it.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``arch`` is not registered, or a size is not positive, or ``heads`` does not divide
        ``embed_dim``.
    """
    if not isinstance(arch, str):
        raise TypeError(f'Argument "arch" should be a string, not {type(arch).__name__}.')
    if arch not in _REGISTRY:
        raise ValueError(
            f'Argument "arch": {arch!r} is not a registered member; known: {list_members()}.'
        )
    for name, value in (
        ("num_classes", num_classes),
        ("in_chans", in_chans),
        ("heads", heads),
        ("embed_dim", embed_dim),
        ("input_size", input_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f'Argument "{name}" should be an integer, not {type(value).__name__}.')
        if value < 1:
            raise ValueError(f'Argument "{name}" should be a positive integer, got {value}.')
    if num_classes < 2:
        raise ValueError(f'Argument "num_classes" should be at least 2, got {num_classes}.')
    if embed_dim % heads:
        raise ValueError(f'Argument "heads" ({heads}) should divide "embed_dim" ({embed_dim}).')
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f'Argument "drop_rate" should be in [0, 1), got {drop_rate}.')

    entry = _REGISTRY[arch]
    backbone = timm.create_model(
        arch,
        pretrained=False,
        num_classes=0,
        global_pool="",
        in_chans=in_chans,
        drop_rate=drop_rate,
    )
    backbone = entry.adapt(backbone)
    reduction = int(backbone.feature_info[-1]["reduction"])  # type: ignore[index]
    feat_size = max(1, input_size // reduction)
    head = AttentionPool2d(
        int(backbone.num_features),  # type: ignore[arg-type]
        feat_size=feat_size,
        out_features=num_classes,
        embed_dim=embed_dim,
        num_heads=heads,
        drop_rate=drop_rate,
    )
    config = MemberConfig(
        arch=arch,
        num_classes=num_classes,
        in_chans=in_chans,
        heads=heads,
        embed_dim=embed_dim,
        input_size=input_size,
    )
    logger.debug(
        "built member %s (%d parameters)", arch, sum(p.numel() for p in backbone.parameters())
    )
    return Member(config, backbone, head)
