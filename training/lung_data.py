"""The lung training data: cases on disk, their truth lesions, working grids and slabs.

A data folder holds ``case-NNNN/dicom/*.dcm`` (the CT series) and ``case-NNNN/labels.npz``
(``labels`` uint8 and ``instances`` uint16 in the series' volume index order), as
:func:`~mibi_node.analyses.lung.phantom.write_lung_dataset` writes them. Each case is read
with the analysis' own reader and put on the bundle's working grid as the runner does
(:class:`~mibi_node.analyses.lung.runner.WorkingGrid`; the truth by nearest neighbour), and
kept as what training needs (:class:`PreparedCase`): the normalised working image, the
truth maps and the slices that hold a training target. A training sample is one slice's
slab with torchvision's target (:func:`training_sample`); slices holding a lesion are drawn
``positive_share`` of the time (:func:`draw_slices`). Augmentation: a left-right mirror, the
slab's slices in reverse order (a lesion's upper and lower ends look alike), a HU offset
and noise.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mibi_node.analyses.lung.linking import Lesion3D
from mibi_node.analyses.lung.model import (
    HU_STD,
    MIN_TARGET_PIXELS,
    normalise_hu,
    slab,
    targets_from_slice,
)
from mibi_node.analyses.lung.result import LungInput
from mibi_node.analyses.lung.runner import WorkingGrid
from mibi_node.errors import ConfigError, MibiNodeError
from training.knee_data import case_folders, data_fingerprint, split_cases

__all__ = [
    "LungTrainingCase",
    "PreparedCase",
    "case_folders",
    "data_fingerprint",
    "draw_slices",
    "iter_lung_cases",
    "lesion_slices",
    "load_lung_cases",
    "prepare_case",
    "split_cases",
    "training_sample",
    "truth_lesions",
]

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]


@dataclass(frozen=True)
class LungTrainingCase:
    """One case of a training folder: the reader's input and its truth.

    Attributes
    ----------
    case_id
        The case folder's name.
    input
        What :func:`~mibi_node.analyses.lung.reader.read_lung_study` made of its files.
    labels, instances
        The truth class map (uint8) and lesion id map (uint16) of the volume's shape.
    """

    case_id: str
    input: LungInput
    labels: np.ndarray
    instances: np.ndarray


def truth_lesions(case: LungTrainingCase) -> tuple[Lesion3D, ...]:
    """The case's truth lesions on the source grid, by id (score 1)."""
    out = []
    for lesion_id in np.unique(case.instances):
        if lesion_id == 0:
            continue
        mask = case.instances == lesion_id
        label = int(np.bincount(case.labels[mask]).argmax())
        out.append(Lesion3D.from_mask(label, 1.0, mask))
    return tuple(out)


def iter_lung_cases(
    data: Path | str,
    *,
    names: Sequence[str] | None = None,
    warn: Progress | None = None,
) -> Iterator[LungTrainingCase]:
    """Read the cases of a lung data folder one at a time (see :func:`load_lung_cases`).

    Raises
    ------
    ConfigError
        The folder is missing, holds no ``case-*`` folder, or none of them is readable.
    """
    from mibi_node.analyses.lung.reader import read_lung_study

    say = warn or (lambda message: logger.warning("%s", message))
    data = Path(data)
    if not data.is_dir():
        raise ConfigError(f"lung data {data}: no such folder")
    folders = [data / name for name in names] if names is not None else case_folders(data)
    if not folders:
        raise ConfigError(f"lung data {data}: no case-* folder in it")
    found = 0
    for folder in folders:
        truth = folder / "labels.npz"
        files = sorted((folder / "dicom").glob("*.dcm")) if (folder / "dicom").is_dir() else []
        if not files or not truth.is_file():
            say(f"{folder}: left out (it needs dicom/*.dcm and labels.npz)")
            continue
        try:
            study = read_lung_study(files)
            with np.load(truth) as npz:
                labels = np.asarray(npz["labels"], dtype=np.uint8)
                instances = np.asarray(npz["instances"], dtype=np.uint16)
        except (MibiNodeError, OSError, KeyError, ValueError) as exc:
            say(f"{folder}: left out ({exc})")
            continue
        if labels.shape != study.volume.shape or instances.shape != labels.shape:
            say(
                f"{truth}: truth of shape {labels.shape} but the series is "
                f"{study.volume.shape}; left out"
            )
            continue
        found += 1
        yield LungTrainingCase(folder.name, study, labels, instances)
    if not found:
        raise ConfigError(f"lung data {data}: no readable case (case-*/dicom + labels.npz)")


def load_lung_cases(
    data: Path | str,
    *,
    names: Sequence[str] | None = None,
    warn: Progress | None = None,
) -> list[LungTrainingCase]:
    """Read the cases of a lung data folder (``case-*/dicom`` + ``case-*/labels.npz``).

    Parameters
    ----------
    data
        The folder.
    names
        Read only these cases (default: every ``case-*`` folder, in name order).
    warn
        Called with one line per case left out (unreadable, or truth of another shape).

    Raises
    ------
    ConfigError
        The folder is missing or holds no readable case.
    """
    return list(iter_lung_cases(data, names=names, warn=warn))


@dataclass(frozen=True)
class PreparedCase:
    """One case on the working grid.

    Attributes
    ----------
    case_id
        The case folder's name.
    image
        ``(slices, rows, columns)`` float32, the working image after
        :func:`~mibi_node.analyses.lung.model.normalise_hu`.
    labels, instances
        The truth on the working grid (nearest neighbour).
    positive
        Slices holding at least one training target.
    """

    case_id: str
    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    positive: np.ndarray


def _nearest(array: np.ndarray, grid: WorkingGrid) -> np.ndarray:
    """A source-grid map on the working grid: the source voxel nearest each working centre."""
    if grid.identity:
        return array
    index = [
        np.clip(
            np.floor((np.arange(n) + 0.5) * grid.spacing[a] / grid.source_spacing[a]).astype(int),
            0,
            grid.source_shape[a] - 1,
        )
        for a, n in enumerate(grid.shape)
    ]
    return array[np.ix_(*index)]


def prepare_case(case: LungTrainingCase, spacing: Sequence[float]) -> PreparedCase:
    """A case on the working grid of ``spacing`` (slice, row, column) mm, as the runner's."""
    volume = case.input.volume
    grid = WorkingGrid.create(volume.shape, volume.spacing, spacing)
    image = normalise_hu(grid.to_working(volume.image))
    labels, instances = _nearest(case.labels, grid), _nearest(case.instances, grid)
    positive = [
        k
        for k in range(grid.shape[0])
        if len(targets_from_slice(labels[k], instances[k])["labels"])
    ]
    return PreparedCase(case.case_id, image, labels, instances, np.array(positive, dtype=np.int64))


def lesion_slices(cases: Sequence[PreparedCase]) -> list[tuple[int, np.ndarray]]:
    """Every training lesion as ``(case index, slices where it is a training target)``."""
    out = []
    for n, case in enumerate(cases):
        for lesion in np.unique(case.instances):
            if lesion == 0:
                continue
            pixels = (case.instances == lesion).sum(axis=(1, 2))
            ks = np.nonzero(pixels >= MIN_TARGET_PIXELS)[0]
            if ks.size:
                out.append((n, ks))
    return out


def draw_slices(
    cases: Sequence[PreparedCase],
    count: int,
    positive_share: float,
    rng: np.random.Generator,
    *,
    lesions: Sequence[tuple[int, np.ndarray]] | None = None,
) -> list[tuple[int, int]]:
    """``count`` ``(case index, slice)`` pairs: a slice with a lesion ``positive_share`` of
    the time (from a case that has one), else any slice of any case.

    With ``lesions`` (:func:`lesion_slices`) a positive draw takes a lesion first, then one
    of its slices: every lesion is drawn as often, so small ground-glass opacities, a few
    slices deep, are not outnumbered by bronchiectases running through a dozen.
    """
    with_lesions = [n for n, case in enumerate(cases) if len(case.positive)]
    out = []
    for _ in range(count):
        if lesions and rng.uniform() < positive_share:
            n, ks = lesions[int(rng.integers(len(lesions)))]
            k = int(ks[int(rng.integers(ks.size))])
        elif with_lesions and rng.uniform() < positive_share:
            n = with_lesions[int(rng.integers(len(with_lesions)))]
            k = int(cases[n].positive[int(rng.integers(len(cases[n].positive)))])
        else:
            n = int(rng.integers(len(cases)))
            k = int(rng.integers(cases[n].image.shape[0]))
        out.append((n, k))
    return out


def _crop_origin(instances: np.ndarray, crop: int, rng: np.random.Generator) -> tuple[int, int]:
    """Top-left corner of a ``crop``-pixel square on a slice: round one of its lesions (at a
    random place inside the square where the lesion fits), or anywhere."""
    rows, cols = instances.shape
    if crop > min(rows, cols):
        raise ValueError(f'Argument "crop" should be at most the slice side, got {crop}.')
    ids = np.unique(instances)
    ids = ids[ids > 0]
    if not ids.size:
        return int(rng.integers(rows - crop + 1)), int(rng.integers(cols - crop + 1))
    r, c = np.nonzero(instances == ids[int(rng.integers(ids.size))])
    origin = []
    for lo, hi, side in ((r.min(), r.max() + 1, rows), (c.min(), c.max() + 1, cols)):
        first, last = max(0, hi - crop), min(lo, side - crop)  # the lesion inside the crop
        if first > last:  # larger than the crop: centred on it
            first = last = min(max(0, (lo + hi - crop) // 2), side - crop)
        origin.append(int(rng.integers(first, last + 1)))
    return origin[0], origin[1]


def training_sample(
    case: PreparedCase,
    k: int,
    channels: int,
    rng: np.random.Generator,
    *,
    flip: float = 0.0,
    reverse: float = 0.0,
    noise_hu: float = 0.0,
    shift_hu: float = 0.0,
    crop: int = 0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Slice ``k``'s slab and torchvision's target for it, augmented, whole or cropped.

    Parameters
    ----------
    case
        The prepared case.
    k
        The slice.
    channels
        The slab's slices.
    rng
        Draws the augmentation.
    flip, reverse
        Probabilities of the left-right mirror and of the slab's slices in reverse order.
    noise_hu, shift_hu
        Largest noise sd and HU offset (uniformly drawn up to them); the window's clipping
        is not redone, so the offset moves air and dense tissue too.
    crop
        Side of a square crop in pixels (0: the whole slice). The network is convolutional,
        so it trains on crops and detects on whole slices: a crop holds one of the slice's
        lesions (drawn at random, placed at random inside it when it fits), or lies
        anywhere on a slice without one.
    """
    x = slab(case.image, k, channels)
    labels, instances = case.labels[k], case.instances[k]
    if rng.uniform() < flip:
        x, labels, instances = x[:, :, ::-1], labels[:, ::-1], instances[:, ::-1]
    if crop:
        top, left = _crop_origin(instances, crop, rng)
        window = (slice(top, top + crop), slice(left, left + crop))
        x, labels, instances = x[(slice(None), *window)], labels[window], instances[window]
    if rng.uniform() < reverse:
        x = x[::-1]
    x = np.ascontiguousarray(x, dtype=np.float32)
    if shift_hu > 0:
        x += np.float32(rng.uniform(-shift_hu, shift_hu) / HU_STD)
    if noise_hu > 0:
        sd = rng.uniform(0.0, noise_hu) / HU_STD
        x += rng.normal(0.0, sd, x.shape).astype(np.float32)
    target = targets_from_slice(np.ascontiguousarray(labels), np.ascontiguousarray(instances))
    return torch.from_numpy(x), target
