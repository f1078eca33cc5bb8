"""The knee training data: cases on disk, their split, their training grids and patches.

A data folder holds ``case-NNNN/dicom/*.dcm`` (the sagittal series) and
``case-NNNN/labels.npz`` (``labels``: uint8 truth in the series' volume index order), as
:func:`~mibi_node.analyses.knee.phantom.write_knee_dataset` writes them. Each case is read
with the analysis' own reader, preprocessed as the runner does and kept only as what
training needs (:class:`PreparedCase`): stage 1's coarse image and the plates' fractions of
each coarse voxel, and the working image and labels around the cartilage, from which
stage 2's patches are cut (:func:`training_patch`). Augmentation (:func:`augment_intensity`,
:func:`mirror`) works on batches.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mibi_node.analyses.knee.labels import LABEL_OF
from mibi_node.analyses.knee.model import NUM_CLASSES, cartilage_box, fit_box
from mibi_node.analyses.knee.preprocess import (
    Box,
    KneePreprocessing,
    WorkingGrid,
    coarse_image,
    crop,
    labels_to_grid,
    one_hot,
    preprocess_volume,
)
from mibi_node.analyses.knee.result import KneeInput
from mibi_node.errors import ConfigError, MibiNodeError

__all__ = [
    "KneeTrainingCase",
    "PreparedCase",
    "augment_intensity",
    "case_folders",
    "data_fingerprint",
    "iter_knee_cases",
    "load_knee_cases",
    "mirror",
    "prepare_case",
    "split_cases",
    "training_patch",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

_MEDIAL, _LATERAL = LABEL_OF["medial_tibial_cartilage"], LABEL_OF["lateral_tibial_cartilage"]
#: Label permutation of the sagittal mirror: medial and lateral tibial plates swap.
_MIRROR = torch.tensor([0, 1, 2, 3, 4])
_MIRROR[_MEDIAL], _MIRROR[_LATERAL] = _LATERAL, _MEDIAL


@dataclass(frozen=True)
class KneeTrainingCase:
    """One case of a training folder: the reader's input and its truth.

    Attributes
    ----------
    case_id
        The case folder's name.
    input
        What :func:`~mibi_node.analyses.knee.reader.read_knee_study` made of its DICOM files.
    labels
        ``uint8`` truth of the volume's shape.
    """

    case_id: str
    input: KneeInput
    labels: np.ndarray


def iter_knee_cases(
    data: Path | str,
    *,
    names: Sequence[str] | None = None,
    warn: Progress | None = None,
) -> Iterator[KneeTrainingCase]:
    """Read the cases of a knee data folder one at a time (see :func:`load_knee_cases`).

    Raises
    ------
    ConfigError
        The folder is missing, holds no ``case-*`` folder, or none of them is readable.
    """
    from mibi_node.analyses.knee.reader import read_knee_study

    say = warn or (lambda message: logger.warning("%s", message))
    data = Path(data)
    if not data.is_dir():
        raise ConfigError(f"knee data {data}: no such folder")
    folders = [data / name for name in names] if names is not None else case_folders(data)
    if not folders:
        raise ConfigError(f"knee data {data}: no case-* folder in it")
    found = 0
    for folder in folders:
        truth = folder / "labels.npz"
        files = sorted((folder / "dicom").glob("*.dcm")) if (folder / "dicom").is_dir() else []
        if not files or not truth.is_file():
            say(f"{folder}: left out (it needs dicom/*.dcm and labels.npz)")
            continue
        try:
            study = read_knee_study(files)
            with np.load(truth) as npz:
                labels = np.asarray(npz["labels"], dtype=np.uint8)
        except (MibiNodeError, OSError, KeyError, ValueError) as exc:
            say(f"{folder}: left out ({exc})")
            continue
        if labels.shape != study.volume.shape:
            say(
                f"{truth}: labels of shape {labels.shape} but the series is "
                f"{study.volume.shape}; left out"
            )
            continue
        found += 1
        yield KneeTrainingCase(folder.name, study, labels)
    if not found:
        raise ConfigError(f"knee data {data}: no readable case (case-*/dicom + labels.npz)")


def case_folders(data: Path) -> list[Path]:
    """The ``case-*`` folders of a data folder, in name order."""
    return sorted(p for p in data.iterdir() if p.is_dir() and p.name.startswith("case-"))


def load_knee_cases(
    data: Path | str,
    *,
    names: Sequence[str] | None = None,
    warn: Progress | None = None,
) -> list[KneeTrainingCase]:
    """Read the cases of a knee data folder (``case-*/dicom`` + ``case-*/labels.npz``).

    Parameters
    ----------
    data
        The folder.
    names
        Read only these cases (default: every ``case-*`` folder, in name order).
    warn
        Called with one line per case left out (unreadable, or labels of another shape).

    Raises
    ------
    ConfigError
        The folder is missing or holds no readable case.
    """
    return list(iter_knee_cases(data, names=names, warn=warn))


def data_fingerprint(data: Path) -> str:
    """A short hash of a data folder's truth files (the bundle's provenance)."""
    digest = hashlib.sha256()
    for path in sorted(data.glob("case-*/labels.npz")):
        digest.update(path.parent.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def split_cases(
    names: Sequence[str], validation: float, test: float, seed: int
) -> tuple[list[str], list[str], list[str]]:
    """(train, validation, test) case names by preset ratios; at least one to train.

    With too few cases the test set shrinks first, then the validation set.
    """
    rng = np.random.default_rng([seed, 17])
    order = [names[i] for i in rng.permutation(len(names))]
    n = len(order)
    n_val = int(round(n * validation))
    n_test = int(round(n * test))
    if n - n_val - n_test < 1:
        n_test = 0
        n_val = min(n_val, n - 1)
    val, test_names = order[:n_val], order[n_val : n_val + n_test]
    train = order[n_val + n_test :]
    return sorted(train), sorted(val), sorted(test_names)


@dataclass
class PreparedCase:
    """One case on the training grids.

    Attributes
    ----------
    case_id
        The case folder's name.
    coarse
        ``(1, d, h, w)`` stage 1's input (the working image average-pooled).
    fractions
        ``(5, d, h, w)`` each class's fraction of every coarse voxel (stage 1's target).
    region, region_labels
        The working image (float16) and labels around the cartilage: the truth's box
        widened by the crop margin and as far as a jittered crop can reach.
    box
        The truth's box with the crop margin, relative to the region.
    foreground
        Per plate present, its ``(n, 3)`` voxels in the region (patch centres).
    fill
        The normalised zero (the crop's padding value).
    grid
        The case's working grid.
    source_labels
        The truth on the source grid (kept for validation cases only).
    """

    case_id: str
    coarse: torch.Tensor
    fractions: torch.Tensor
    region: np.ndarray
    region_labels: np.ndarray
    box: Box
    foreground: list[np.ndarray]
    fill: float
    grid: WorkingGrid
    source_labels: np.ndarray | None


def prepare_case(
    case: KneeTrainingCase,
    config: KneePreprocessing,
    *,
    margin_mm: float,
    jitter_mm: float,
    multiple: int,
    fine_multiple: int,
    keep_source: bool = False,
) -> PreparedCase:
    """Preprocess a case as the runner does and keep what training needs.

    Parameters
    ----------
    case
        The case read from disk.
    config
        The recipe's preprocessing.
    margin_mm, jitter_mm
        Stage 2's crop margin and how far training moves each face of the crop.
    multiple, fine_multiple
        The working grid's padding multiple (both stages) and stage 2's size multiple.
    keep_source
        Keep the source-grid truth (validation cases).
    """
    volume = case.input.volume
    working, grid = preprocess_volume(volume.image, volume.spacing, config, multiple=multiple)
    labels = labels_to_grid(case.labels, grid, NUM_CLASSES)
    factor = config.coarse_factor
    coarse = coarse_image(working, factor)[None]
    fractions = coarse_image(torch.from_numpy(one_hot(labels, NUM_CLASSES))[None], factor)[0]
    spacing = config.spacing_mm
    box = cartilage_box(
        labels > 0, margin=margin_mm / spacing, multiple=fine_multiple, shape=grid.shape
    )
    if box is None:
        box = ((0, grid.shape[0]), (0, grid.shape[1]), (0, grid.shape[2]))
    # what a jittered crop can reach (a patch reaching further reads the crop's padding)
    pad = int(math.ceil(jitter_mm / spacing)) + fine_multiple
    region_box: Box = tuple((lo - pad, hi + pad) for lo, hi in box)  # type: ignore[assignment]
    fill = config.background
    region_labels = crop(labels, region_box)
    relative: Box = tuple(
        (lo - r[0], hi - r[0]) for (lo, hi), r in zip(box, region_box, strict=True)
    )  # type: ignore[assignment]
    foreground = [
        voxels
        for value in range(1, NUM_CLASSES)
        if (voxels := np.argwhere(region_labels == value).astype(np.int32)).size
    ]
    return PreparedCase(
        case_id=case.case_id,
        coarse=coarse,
        fractions=fractions,
        region=crop(working, region_box, fill=fill).astype(np.float16),
        region_labels=region_labels,
        box=relative,
        foreground=foreground,
        fill=fill,
        grid=grid,
        source_labels=case.labels if keep_source else None,
    )


def augment_intensity(
    x: torch.Tensor,
    generator: torch.Generator,
    *,
    gain: tuple[float, float],
    gamma: tuple[float, float],
    noise: float,
) -> torch.Tensor:
    """Per sample: a gamma (log-uniform), a gain and Gaussian noise of sd up to ``noise``."""
    shape = (x.shape[0],) + (1,) * (x.ndim - 1)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=generator)

    power = torch.exp(uniform(math.log(gamma[0]), math.log(gamma[1])))
    out = x.clamp(min=0) ** power * uniform(*gain)
    if noise > 0:
        out = out + uniform(0.0, noise) * torch.randn(x.shape, generator=generator)
    return out


def mirror(
    x: torch.Tensor, y: torch.Tensor, p: float, generator: torch.Generator, *, soft: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The sagittal mirror (slice axis) of some samples, medial and lateral plates swapped.

    ``x`` is ``(B, 1, k, j, i)``; ``y`` holds labels ``(B, 1, ...)`` or, with ``soft``, the
    classes' fractions ``(B, 5, ...)``.
    """
    flip = torch.rand(x.shape[0], generator=generator) < p
    if not flip.any():
        return x, y
    x, y = x.clone(), y.clone()
    x[flip] = x[flip].flip(2)
    if soft:
        y[flip] = y[flip].flip(2)[:, _MIRROR]
    else:
        y[flip] = _MIRROR[y[flip].flip(2).long()].to(y.dtype)
    return x, y


def training_patch(
    case: PreparedCase,
    rng: np.random.Generator,
    *,
    size: Sequence[int],
    jitter: float,
    foreground_share: float,
    multiple: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One stage-2 training patch (image, labels) inside a jittered crop of the truth's box.

    Parameters
    ----------
    case
        The prepared case.
    rng
        Draws the crop, the plate and the position.
    size
        Patch size in working voxels.
    jitter
        How far each face of the crop moves, in working voxels.
    foreground_share
        Share of patches centred on a voxel of a plate drawn at random (the four plates
        equally often); the others lie anywhere in the crop.
    multiple
        Stage 2's size multiple (the crop is a multiple of it, as at inference).

    Where the patch is larger than the crop, the rest reads as the crop's padding
    (normalised zero, background), as stage 2 sees a crop at inference.
    """
    bounds = [
        (lo + rng.uniform(-jitter, jitter), hi + rng.uniform(-jitter, jitter))
        for lo, hi in case.box
    ]
    box = fit_box(bounds, multiple, case.region.shape)
    if case.foreground and rng.uniform() < foreground_share:
        plate = case.foreground[rng.integers(len(case.foreground))]
        centre = plate[rng.integers(len(plate))]
        start = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
    else:
        start = [
            int(rng.integers(lo, max(lo, hi - s) + 1))
            for (lo, hi), s in zip(box, size, strict=True)
        ]
    # inside the crop where it is larger than the patch, centred on it where it is smaller
    start = [
        min(max(st, lo), hi - s) if hi - lo >= s else lo - (s - (hi - lo)) // 2
        for st, (lo, hi), s in zip(start, box, size, strict=True)
    ]
    patch_box: Box = tuple((st, st + s) for st, s in zip(start, size, strict=True))  # type: ignore[assignment]
    image = crop(case.region, patch_box, fill=case.fill).astype(np.float32)
    labels = crop(case.region_labels, patch_box)
    inside = tuple(
        slice(max(lo - st, 0), min(hi - st, s))
        for (lo, hi), st, s in zip(box, start, size, strict=True)
    )
    outside = np.ones(labels.shape, dtype=bool)
    outside[inside] = False
    image[outside] = case.fill
    labels[outside] = 0
    return image, labels
