"""The knee analysis' two segmentation stages (seed 003 [0007]-[0010]).

**Stage 1, coarse** (:class:`KneeCoarseNet`): MONAI's residual U-Net
(:class:`monai.networks.nets.UNet` with ``num_res_units >= 1``, the seed's "ResUnet") on the
working volume average-pooled to a low-resolution grid (2.1 mm in the demo), five classes
(background and the four plates). Its foreground (one minus the background probability,
thresholded) is split into 3-D connected components (26-connected); regions smaller than a
volume, or than a fraction of the largest, are removed (:func:`clean_components`: the
seed's "connect the coarse results and clear the small regions"), and the bounding box of
what is left, widened by a margin, is the cartilage region (:func:`cartilage_box`).

**Stage 2, fine** (:class:`KneeFineNet`): a MedicalNet-style 3-D ResNet encoder (MONAI's
:class:`monai.networks.nets.ResNet` with basic blocks, the 3-D ResNet MedicalNet
pretrained, with no max-pool and its first ``len(widths)`` stages: output stride 8 for three
stages) and an ASPP decoder (:class:`monai.networks.blocks.SimpleASPP`, dilations 1, 2, 4
and 6 cells) on the deepest features, as in the seed's "3D MedicalNet + ASPP: decode and
concatenate". The ASPP output is upsampled to stride 2 and joined with the first stage's
features (DeepLabv3+'s low-level skip), then upsampled to the crop's full resolution and
joined with a full-resolution stem convolution of the input before the 1 x 1 classifier.
That last skip is what lets a plate two to four working voxels thick survive: at stride 2 it
is one or two cells, and a map upsampled from there blurs each edge by a voxel, a third of
such a plate's Dice; the stem's features carry the edges at full resolution.

**Medial or lateral** (:func:`split_tibial`): which tibial plate is medial depends on the
whole knee (a right knee mirrors a left one), which a patch seldom shows. Stage 2 is trained
on the two tibial plates as one tissue (:func:`merge_tibial_logits`); the runner splits its
tibial cartilage at the gap between the plates along the sagittal slice axis; the knee's side
and the slice normal decide which half is medial (a right knee's medial plate lies toward
the patient's left), and only where the headers cannot tell does one vote over the whole
knee, stage 1's evidence included, decide.

Both stages output logits ``(B, 5, ...)``; :func:`class_probabilities` is their softmax.
Architectures are registered by name with their widths (:func:`register_knee_stage`,
:func:`create_knee_stage`), so a recipe names e.g. ``stage1_resunet_s`` and may override
its widths; the config travels in the bundle manifest.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from monai.networks.blocks import SimpleASPP
from monai.networks.nets import UNet
from monai.networks.nets.resnet import ResNet
from scipy import ndimage
from torch import nn

from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.preprocess import Box

__all__ = [
    "NUM_CLASSES",
    "CoarseConfig",
    "FineConfig",
    "KneeCoarseNet",
    "KneeFineNet",
    "KneeStage",
    "cartilage_box",
    "class_probabilities",
    "clean_coarse_probabilities",
    "clean_components",
    "create_knee_stage",
    "fit_box",
    "list_knee_stages",
    "merge_tibial",
    "merge_tibial_logits",
    "parameter_count",
    "register_knee_stage",
    "split_tibial",
    "stage_kind",
]

logger = logging.getLogger(__name__)

#: Background plus the four plates.
NUM_CLASSES = len(STRUCTURES) + 1

StageKind = Literal["coarse", "fine"]


@dataclass(frozen=True)
class CoarseConfig:
    """Everything needed to rebuild a stage-1 network before loading its weights.

    Attributes
    ----------
    arch
        The registered name it was built from.
    channels
        U-Net widths, one per level.
    strides
        Downsampling between levels (one fewer than ``channels``).
    res_units
        Residual units per level (MONAI's ``num_res_units``; at least 1: the ResUNet).
    in_channels, num_classes
        Input channels and output classes.
    """

    arch: str = "stage1_resunet_s"
    channels: tuple[int, ...] = (8, 16, 32, 64)
    strides: tuple[int, ...] = (2, 2, 2)
    res_units: int = 1
    in_channels: int = 1
    num_classes: int = NUM_CLASSES

    def as_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class FineConfig:
    """Everything needed to rebuild a stage-2 network before loading its weights.

    Attributes
    ----------
    arch
        The registered name it was built from.
    widths
        Channels of the ResNet stages used (the first at stride 2, each next one halves).
    blocks
        Basic blocks per stage (ResNet-10: one each).
    aspp_channels
        Channels of each of the four ASPP branches.
    dilations
        The ASPP branches' dilations (kernel 1 for the first, 3 for the others).
    decoder_channels
        Width of the decoder convolutions.
    stem_channels
        Width of the full-resolution stem the last decoder step joins.
    conv1_size
        Kernel of the ResNet's first (stride 2) convolution.
    in_channels, num_classes
        Input channels and output classes.
    """

    arch: str = "stage2_medicalnet10_aspp_s"
    widths: tuple[int, ...] = (8, 16, 32)
    blocks: tuple[int, ...] = (1, 1, 1)
    aspp_channels: int = 8
    dilations: tuple[int, ...] = (1, 2, 4, 6)
    decoder_channels: int = 16
    stem_channels: int = 8
    conv1_size: int = 3
    in_channels: int = 1
    num_classes: int = NUM_CLASSES

    def as_dict(self) -> dict[str, Any]:
        """The configuration as a JSON-ready dict."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class KneeCoarseNet(nn.Module):
    """Stage 1: MONAI's residual U-Net, logits ``(B, classes, ...)`` on the coarse grid.

    Build it with :func:`create_knee_stage`. Input sides must be multiples of
    :attr:`size_multiple`.
    """

    def __init__(self, config: CoarseConfig) -> None:
        super().__init__()
        if len(config.strides) != len(config.channels) - 1:
            raise ValueError(
                f'Argument "strides" should have one entry fewer than "channels" '
                f"({len(config.channels)}), got {len(config.strides)}."
            )
        if config.res_units < 1:
            raise ValueError(
                f'Argument "res_units" should be >= 1 (a residual U-Net), got {config.res_units}.'
            )
        self.config = config
        self.unet = UNet(
            spatial_dims=3,
            in_channels=config.in_channels,
            out_channels=config.num_classes,
            channels=config.channels,
            strides=config.strides,
            num_res_units=config.res_units,
        )

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this."""
        return int(np.prod(self.config.strides))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes, D, H, W)`` of an input ``(B, in_channels, D, H, W)``."""
        out: torch.Tensor = self.unet(x)
        return out


def _conv_bn_relu(in_chs: int, out_chs: int, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_chs, out_chs, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm3d(out_chs),
        nn.ReLU(inplace=True),
    )


class KneeFineNet(nn.Module):
    """Stage 2: a MedicalNet-style 3-D ResNet encoder and an ASPP decoder (see the module).

    Build it with :func:`create_knee_stage`. Input sides must be multiples of
    :attr:`size_multiple`.
    """

    def __init__(self, config: FineConfig) -> None:
        super().__init__()
        depth = len(config.widths)
        if not 1 <= depth <= 4 or len(config.blocks) != depth:
            raise ValueError(
                f'Arguments "widths" and "blocks" should have 1 to 4 entries each, '
                f"got {config.widths} and {config.blocks}."
            )
        if len(config.dilations) < 1:
            raise ValueError('Argument "dilations" should not be empty.')
        self.config = config
        pad = 4 - depth
        encoder = ResNet(
            block="basic",
            layers=[*config.blocks, *([1] * pad)],
            block_inplanes=[*config.widths, *([config.widths[-1]] * pad)],
            spatial_dims=3,
            n_input_channels=config.in_channels,
            conv1_t_size=config.conv1_size,
            conv1_t_stride=2,
            no_max_pool=True,
            feed_forward=False,
        )
        # the stages used, MedicalNet's names (conv1, bn1, layer1, ...) kept for its weights
        for index in range(depth + 1, 5):
            delattr(encoder, f"layer{index}")
        del encoder.avgpool, encoder.maxpool
        self.encoder = encoder
        self.depth = depth
        kernels = (1,) + (3,) * (len(config.dilations) - 1)
        self.aspp = SimpleASPP(
            3,
            config.widths[-1],
            config.aspp_channels,
            kernel_sizes=kernels,
            dilations=config.dilations,
            norm_type="BATCH",
            acti_type="RELU",
        )
        width = config.decoder_channels
        self.low = _conv_bn_relu(config.widths[0], width, kernel=1)
        self.middle = _conv_bn_relu(config.aspp_channels * len(config.dilations) + width, width)
        self.stem = _conv_bn_relu(config.in_channels, config.stem_channels)
        self.top = _conv_bn_relu(width + config.stem_channels, width)
        self.head = nn.Conv3d(width, config.num_classes, 1)

    @property
    def size_multiple(self) -> int:
        """Input sides must be multiples of this (the encoder's output stride)."""
        return int(2**self.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, classes, D, H, W)`` of an input ``(B, in_channels, D, H, W)``."""
        e = self.encoder
        features = e.act(e.bn1(e.conv1(x)))
        low = features = e.layer1(features)
        for index in range(2, self.depth + 1):
            features = getattr(e, f"layer{index}")(features)
        context = self.aspp(features)
        context = F.interpolate(context, size=low.shape[2:], mode="trilinear", align_corners=False)
        middle = self.middle(torch.cat([context, self.low(low)], dim=1))
        middle = F.interpolate(middle, size=x.shape[2:], mode="trilinear", align_corners=False)
        out: torch.Tensor = self.head(self.top(torch.cat([middle, self.stem(x)], dim=1)))
        return out


KneeStage = KneeCoarseNet | KneeFineNet

# -- registry --------------------------------------------------------------------------------

_STAGES: dict[str, tuple[StageKind, dict[str, Any]]] = {}


def register_knee_stage(name: str, kind: StageKind, **defaults: Any) -> None:
    """Make an architecture available to recipes under ``name``.

    Parameters
    ----------
    name
        The registered name.
    kind
        ``"coarse"`` (stage 1, a :class:`CoarseConfig`) or ``"fine"`` (stage 2, a
        :class:`FineConfig`).
    **defaults
        Config fields of this architecture (widths, blocks, ...).
    """
    if kind not in ("coarse", "fine"):
        raise ValueError(f'Argument "kind" should be "coarse" or "fine", got {kind!r}.')
    config_type = CoarseConfig if kind == "coarse" else FineConfig
    known = {f.name for f in fields(config_type)} - {"arch"}
    unknown = sorted(set(defaults) - known)
    if unknown:
        raise ValueError(f"{config_type.__name__} has no field(s) {', '.join(unknown)}.")
    _STAGES[name] = (kind, dict(defaults))


def list_knee_stages(kind: StageKind | None = None) -> list[str]:
    """Registered architectures (of one ``kind``, or all)."""
    return sorted(name for name, (k, _) in _STAGES.items() if kind is None or k == kind)


def stage_kind(name: str) -> StageKind:
    """``"coarse"`` or ``"fine"`` for a registered name."""
    if name not in _STAGES:
        raise ValueError(
            f'Argument "arch": {name!r} is not a registered knee stage; known: '
            f"{list_knee_stages()}."
        )
    return _STAGES[name][0]


register_knee_stage("stage1_resunet_s", "coarse", channels=(8, 16, 32, 64), res_units=1)
register_knee_stage("stage1_resunet_m", "coarse", channels=(16, 32, 64, 128), res_units=2)
register_knee_stage(
    "stage2_medicalnet10_aspp_s",
    "fine",
    widths=(8, 16, 32),
    blocks=(1, 1, 1),
    aspp_channels=8,
    decoder_channels=16,
    stem_channels=8,
)
register_knee_stage(
    "stage2_medicalnet10_aspp_m",
    "fine",
    widths=(16, 32, 64, 128),
    blocks=(1, 1, 1, 1),
    aspp_channels=16,
    decoder_channels=24,
    stem_channels=8,
    conv1_size=7,
)


def _check_option(name: str, value: Any, like: Any) -> Any:
    if isinstance(like, tuple):
        if isinstance(value, str) or not isinstance(value, Sequence):
            raise TypeError(f'Argument "{name}" should be a sequence of integers.')
        values = tuple(value)
        if not values or not all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in values
        ):
            raise ValueError(f'Argument "{name}" should hold positive integers, got {value!r}.')
        return values
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f'Argument "{name}" should be an integer, not {type(value).__name__}.')
    if value < 1:
        raise ValueError(f'Argument "{name}" should be a positive integer, got {value}.')
    return value


def create_knee_stage(arch: str, **options: Any) -> KneeCoarseNet | KneeFineNet:
    """Build a randomly initialised stage network (weights come from bundles).

    Parameters
    ----------
    arch
        A registered name (:func:`list_knee_stages`).
    **options
        Config fields overriding the registered ones (``channels``, ``widths``,
        ``decoder_channels``, ``in_channels``, ``num_classes``, ...).

    Raises
    ------
    TypeError
        An option has the wrong type.
    ValueError
        ``arch`` is not registered, an option is unknown to the stage or out of range.
    """
    if not isinstance(arch, str):
        raise TypeError(f'Argument "arch" should be a string, not {type(arch).__name__}.')
    kind = stage_kind(arch)
    defaults = _STAGES[arch][1]
    config: CoarseConfig | FineConfig = (
        CoarseConfig(arch=arch) if kind == "coarse" else (FineConfig(arch=arch))
    )
    config = replace(config, **defaults)  # type: ignore[arg-type]
    known = {f.name for f in fields(config)} - {"arch"}
    checked = {}
    for name, value in options.items():
        if name not in known:
            raise ValueError(f'Argument "{name}" is not an option of {kind} stage {arch!r}.')
        checked[name] = _check_option(name, value, getattr(config, name))
    config = replace(config, **checked)  # type: ignore[arg-type]
    if isinstance(config, CoarseConfig):
        return KneeCoarseNet(config)
    return KneeFineNet(config)


def parameter_count(module: nn.Module) -> int:
    """Trainable parameters of a network."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the class axis (1) of a batch of logits."""
    return torch.softmax(logits.float(), dim=1)


# -- components and the crop box -------------------------------------------------------------

_CONNECTIVITY = ndimage.generate_binary_structure(3, 3)


def clean_components(
    mask: np.ndarray,
    voxel_mm3: float,
    *,
    min_volume_mm3: float = 50.0,
    min_fraction: float = 0.05,
) -> tuple[np.ndarray, int]:
    """Keep the 3-D connected regions of a foreground mask that are not small.

    Parameters
    ----------
    mask
        Boolean foreground (any cartilage) on some grid.
    voxel_mm3
        That grid's voxel volume.
    min_volume_mm3
        Regions smaller than this are removed.
    min_fraction
        Regions smaller than this fraction of the largest region are removed too.

    Returns
    -------
    tuple
        The cleaned mask and the number of regions removed.
    """
    regions, count = ndimage.label(np.asarray(mask, dtype=bool), structure=_CONNECTIVITY)
    if count == 0:
        return np.zeros(regions.shape, dtype=bool), 0
    sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:] * float(voxel_mm3)
    keep = sizes >= max(float(min_volume_mm3), float(min_fraction) * float(sizes.max()))
    lookup = np.concatenate([[False], keep])
    return lookup[regions], int(count - keep.sum())


def fit_box(bounds: Sequence[tuple[float, float]], multiple: int, shape: Sequence[int]) -> Box:
    """A half-open integer box holding ``bounds``, its sides multiples of ``multiple``.

    The box grows evenly on both sides, then moves inside ``[0, shape)`` where it fits;
    a box longer than the grid starts at 0 and runs past its end (the crop is padded).
    """
    out = []
    for (start, stop), n in zip(bounds, shape, strict=True):
        lo, hi = math.floor(start), math.ceil(stop)
        length = max(hi - lo, 1)
        target = -(-length // multiple) * multiple
        lo -= (target - length) // 2
        hi = lo + target
        if target <= n:
            shift = max(0, -lo) - max(0, hi - n)
            lo, hi = lo + shift, hi + shift
        else:
            lo, hi = 0, target
        out.append((int(lo), int(hi)))
    return (out[0], out[1], out[2])


def cartilage_box(
    mask: np.ndarray,
    *,
    factor: int = 1,
    margin: float = 0.0,
    multiple: int = 1,
    shape: Sequence[int],
) -> Box | None:
    """The working-grid box around a foreground mask, widened by ``margin`` voxels.

    Parameters
    ----------
    mask
        Foreground on the working grid, or on the coarse grid pooled by ``factor``.
    factor
        Working voxels per mask voxel along each axis.
    margin
        Working voxels added on every side.
    multiple
        The box's sides are multiples of this (stage 2's stride).
    shape
        The working grid's shape.

    Returns
    -------
    Box or None
        ``None`` when the mask is empty.
    """
    where = np.flatnonzero(np.asarray(mask).any(axis=(1, 2)))
    if where.size == 0:
        return None
    bounds = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(np.asarray(mask).any(axis=other))
        bounds.append((present[0] * factor - margin, (present[-1] + 1) * factor + margin))
    return fit_box(bounds, multiple, shape)


def clean_coarse_probabilities(
    probabilities: torch.Tensor,
    voxel_mm3: float,
    *,
    threshold: float = 0.5,
    min_volume_mm3: float = 50.0,
    min_fraction: float = 0.05,
) -> tuple[torch.Tensor, np.ndarray, int]:
    """Stage 1's ``(classes, ...)`` probabilities with its small regions made background.

    The foreground is where the background's probability is at most ``1 - threshold``;
    :func:`clean_components` decides which of its regions stay.

    Returns
    -------
    tuple
        The cleaned probabilities (a copy when something was removed), the kept foreground
        mask and the number of regions removed.
    """
    foreground = (1.0 - probabilities[0]).numpy() >= threshold
    kept, removed = clean_components(
        foreground, voxel_mm3, min_volume_mm3=min_volume_mm3, min_fraction=min_fraction
    )
    if removed:
        dropped = torch.from_numpy(foreground & ~kept)
        probabilities = probabilities.clone()
        probabilities[:, dropped] = 0.0
        probabilities[0, dropped] = 1.0
    return probabilities, kept, removed


# -- medial and lateral tibial plates --------------------------------------------------------

_TIBIAL = (LABEL_OF["medial_tibial_cartilage"], LABEL_OF["lateral_tibial_cartilage"])


def merge_tibial(probabilities: torch.Tensor) -> torch.Tensor:
    """``(B, 5, ...)`` -> ``(B, 4, ...)``: background, femoral, both tibial plates, patellar.

    Works on probabilities (sums) and, through :func:`torch.logsumexp`, on logits
    (``merge_tibial_logits``).
    """
    medial, lateral = _TIBIAL
    return torch.cat(
        [
            probabilities[:, :medial],
            probabilities[:, medial : lateral + 1].sum(1, keepdim=True),
            probabilities[:, lateral + 1 :],
        ],
        dim=1,
    )


def merge_tibial_logits(logits: torch.Tensor) -> torch.Tensor:
    """Logits of :func:`merge_tibial`'s four classes (the tibial one by log-sum-exp)."""
    medial, lateral = _TIBIAL
    return torch.cat(
        [
            logits[:, :medial],
            torch.logsumexp(logits[:, medial : lateral + 1], dim=1, keepdim=True),
            logits[:, lateral + 1 :],
        ],
        dim=1,
    )


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of integer coordinates (the gap between the two plates)."""
    low, high = int(values.min()), int(values.max())
    if high <= low:
        return float(low)
    counts = np.bincount(values - low).astype(np.float64)
    positions = np.arange(counts.size, dtype=np.float64)
    weight = np.cumsum(counts)
    mean = np.cumsum(counts * positions)
    total, total_mean = weight[-1], mean[-1]
    inner = weight[:-1] * (total - weight[:-1])
    with np.errstate(invalid="ignore", divide="ignore"):
        between = (total_mean * weight[:-1] - mean[:-1] * total) ** 2 / inner
    between[~np.isfinite(between)] = -1.0
    return float(low + int(np.argmax(between)) + 0.5)


def split_tibial(
    probabilities: torch.Tensor,
    evidence: torch.Tensor | None = None,
    *,
    axis: int = 0,
    far_is_medial: bool | None = None,
) -> torch.Tensor:
    """Decide the medial and lateral tibial plates of a case at once.

    Which tibial plate is medial is a matter of the whole knee (which side the fibula is
    on, the concave medial plateau), which a crop's network, trained on patches, can only
    guess voxel by voxel. The two plates lie side by side along the sagittal slice axis:
    the tibial cartilage (both plates' probabilities summed, the argmax of the four
    tissues) is split at the Otsu threshold of its slice coordinates, and one vote over all
    its voxels decides which half is medial: the network's own medial minus lateral
    probability plus ``evidence`` (stage 1's, which saw the whole volume), signed by the
    half the voxel lies in.

    Parameters
    ----------
    probabilities
        ``(5, k, j, i)`` class probabilities.
    evidence
        ``(k, j, i)`` further medial minus lateral probability, or ``None``.
    axis
        The slice axis of the spatial dimensions.
    far_is_medial
        The medial plate is the half of higher slice index (``True``), of lower (``False``),
        or ``None``: the vote decides.

    Returns
    -------
    torch.Tensor
        The probabilities with the tibial total given to the medial plate on the medial
        side of the split and to the lateral plate on the other.
    """
    medial, lateral = _TIBIAL
    tibial = probabilities[medial] + probabilities[lateral]
    tissues = merge_tibial(probabilities[None])[0]
    mask = (tissues.argmax(0) == medial).numpy()
    if not mask.any():
        return probabilities
    where = np.nonzero(mask)
    threshold = _otsu(where[axis])
    if far_is_medial is None:
        side = torch.from_numpy(np.where(where[axis] > threshold, 1.0, -1.0))
        votes = probabilities[medial] - probabilities[lateral]
        if evidence is not None:
            votes = votes + evidence
        index = tuple(torch.from_numpy(w) for w in where)
        far_is_medial = float((votes[index].double() * side).sum()) >= 0.0
    positions = torch.arange(probabilities.shape[1 + axis], dtype=torch.float64)
    shape = [1, 1, 1]
    shape[axis] = -1
    far = (positions > threshold).view(shape)
    is_medial = far if far_is_medial else ~far
    out = probabilities.clone()
    out[medial] = torch.where(is_medial, tibial, torch.zeros_like(tibial))
    out[lateral] = torch.where(is_medial, torch.zeros_like(tibial), tibial)
    return out
