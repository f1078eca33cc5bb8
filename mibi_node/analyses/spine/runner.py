"""Running a spine bundle on studies: keypoints on the whole slice, then a class per point.

Per study: the slice stack is normalised per channel (percentile), padded to a centred
square and resized to the bundle's input size (:func:`prepare_spine_input`, which training
uses too); the keypoint network gives one point per level (heatmap argmax + sub-pixel
offset), mapped back to the middle slice's pixels. Each point's crop, turned along the
spine and sized from its neighbouring points by the bundle's crop rule, is cut from the
normalised slice stack at its own resolution and classified; the probabilities are a
softmax over the level kind's classes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mibi_node.analyses.base import MemoryNeeds
from mibi_node.analyses.spine.bundle import SpineBundle, load_spine_bundle
from mibi_node.analyses.spine.levels import LEVELS
from mibi_node.analyses.spine.model import (
    class_probabilities,
    crop_boxes,
    decode_keypoints,
    extract_rois,
)
from mibi_node.analyses.spine.result import SpineInput, SpinePoint, SpineResult
from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.preprocess import Geometry, Normalisation, normalise, resize_square

__all__ = [
    "SpineRunner",
    "check_spine_input",
    "prepare_spine_input",
    "select_channels",
    "study_rois",
]

logger = logging.getLogger(__name__)

#: Smallest slice side the keypoint network can use, in pixels.
_MIN_SIDE = 32
_BATCH = 16


def select_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """The ``channels`` slices centred on the middle one (the middle repeated if too few)."""
    count = image.shape[0]
    if count == channels:
        return image
    middle = count // 2
    wanted = np.arange(channels) - channels // 2 + middle
    wanted = np.where((wanted < 0) | (wanted >= count), middle, wanted)
    return image[wanted]


def check_spine_input(study: SpineInput) -> None:
    """Refuse an input the model cannot use, in words a technologist can act on.

    Raises
    ------
    UnusableStudyError
        The image is not a (channels, rows, columns) stack, is too small, blank or not
        finite, or the pixel spacing is not two positive numbers.
    """
    uid = study.study_instance_uid
    image = study.image
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[0] < 1:
        shape = getattr(image, "shape", None)
        raise UnusableStudyError(
            f"study {uid}: the T2 sagittal input should be a (slices, rows, columns) stack, "
            f"got shape {shape}"
        )
    if min(image.shape[1:]) < _MIN_SIDE:
        raise UnusableStudyError(
            f"study {uid}: the T2 sagittal slice is {image.shape[1]} x {image.shape[2]} px, "
            f"too small for the spine model (at least {_MIN_SIDE} px a side)"
        )
    middle = image[image.shape[0] // 2]
    if not np.isfinite(middle).all():
        raise UnusableStudyError(f"study {uid}: the middle T2 sagittal slice has NaN pixels")
    if float(middle.max()) <= float(middle.min()):
        raise UnusableStudyError(f"study {uid}: the middle T2 sagittal slice is blank")
    spacing = study.pixel_spacing
    if len(spacing) != 2 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise UnusableStudyError(
            f"study {uid}: the middle slice's pixel spacing {spacing!r} is not usable"
        )


def prepare_spine_input(
    image: np.ndarray, size: int, channels: int, normalisation: Normalisation
) -> tuple[np.ndarray, Geometry, np.ndarray]:
    """The keypoint input of one slice stack, as the runner makes it (training uses it too).

    Returns
    -------
    tuple
        The (channels, size, size) float32 keypoint input, its :class:`Geometry` (model
        pixels -> slice pixels), and the normalised (channels, rows, columns) stack the
        crops are cut from.
    """
    stack = select_channels(np.nan_to_num(np.asarray(image, dtype=np.float32)), channels)
    scaled = np.stack(normalise(list(stack), normalisation))
    mean = np.broadcast_to(np.asarray(normalisation.mean, dtype=np.float32), (channels,))
    std = np.broadcast_to(np.asarray(normalisation.std, dtype=np.float32), (channels,))
    resized = [resize_square(channel, size) for channel in scaled]
    model_input = np.stack([array for array, _ in resized])
    model_input = (model_input - mean[:, None, None]) / std[:, None, None]
    source = (scaled - mean[:, None, None]) / std[:, None, None]
    return model_input.astype(np.float32), resized[0][1], source.astype(np.float32)


def study_rois(
    source: np.ndarray | torch.Tensor, points: np.ndarray, scale: float, size: int
) -> torch.Tensor:
    """The eleven crops of one study, (11, channels, size, size), by the crop rule."""
    sides, angles = crop_boxes(points, scale)
    image = torch.as_tensor(source, dtype=torch.float32)
    return extract_rois(
        image,
        torch.as_tensor(np.asarray(points, dtype=np.float32)),
        torch.as_tensor(sides, dtype=torch.float32),
        torch.as_tensor(angles, dtype=torch.float32),
        size,
    )


class SpineRunner:
    """A loaded spine bundle, ready to predict.

    Parameters
    ----------
    bundle_dir
        The bundle folder (or a loaded :class:`SpineBundle`).
    device
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.

    Raises
    ------
    BundleError
        The bundle cannot be loaded.
    """

    def __init__(self, bundle_dir: Path | str | SpineBundle, device: str = "cpu") -> None:
        if not isinstance(device, str):
            raise TypeError(f'Argument "device" should be a string, not {type(device).__name__}.')
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = (
            bundle_dir if isinstance(bundle_dir, SpineBundle) else load_spine_bundle(bundle_dir)
        )
        self.device = device
        self.bundle_name = self.bundle.name
        self.bundle_version = self.bundle.version
        self.keypoint_model = self.bundle.build_keypoint_model(device)
        self.classifier = self.bundle.build_classifier(device)
        #: What the loaded bundle needs (set by the analysis when it loads the runner).
        self.memory: MemoryNeeds | None = None

    def locate(self, arrays: np.ndarray) -> np.ndarray:
        """(N, 11, 3) row, column (model-input pixels) and score of prepared inputs."""
        stride = self.keypoint_model.config.stride
        out = []
        with torch.inference_mode():
            for start in range(0, len(arrays), _BATCH):
                chunk = torch.as_tensor(arrays[start : start + _BATCH], device=self.device)
                heatmaps, offsets = self.keypoint_model(chunk)
                out.append(decode_keypoints(heatmaps.float(), offsets.float(), stride).cpu())
        return torch.cat(out).double().numpy()

    def classify(self, rois: torch.Tensor) -> list[dict[str, float]]:
        """Probabilities of each crop, for crops in :data:`LEVELS` order per study."""
        levels = [LEVELS[i % len(LEVELS)] for i in range(len(rois))]
        logits = []
        with torch.inference_mode():
            for start in range(0, len(rois), 128):
                chunk = rois[start : start + 128].to(self.device)
                logits.append(self.classifier(chunk).float().cpu())
        if not logits:
            return []
        return class_probabilities(torch.cat(logits), levels)

    def predict(self, inputs: Sequence[SpineInput]) -> list[SpineResult]:
        """The eleven points of each study, with their classes and probabilities.

        Raises
        ------
        UnusableStudyError
            A study's input cannot be used (see :func:`check_spine_input`).
        """
        studies = list(inputs)
        if not studies:
            return []
        for study in studies:
            check_spine_input(study)
        bundle = self.bundle
        crop = bundle.manifest.crop
        arrays, geometries, sources, prepare = [], [], [], []
        for study in studies:
            started = time.perf_counter()
            array, geometry, source = prepare_spine_input(
                study.image, bundle.input_size, bundle.channels, bundle.normalisation
            )
            arrays.append(array)
            geometries.append(geometry)
            sources.append(source)
            prepare.append(time.perf_counter() - started)
        started = time.perf_counter()
        located = self.locate(np.stack(arrays))
        keypoint_seconds = (time.perf_counter() - started) / len(studies)
        started = time.perf_counter()
        points_source: list[np.ndarray] = []
        rois = []
        for i, geometry in enumerate(geometries):
            points: np.ndarray = np.array([geometry.to_source(r, c) for r, c, _ in located[i]])
            rows, cols = geometry.source_shape  # a point on the padding moves to the edge
            points[:, 0] = np.clip(points[:, 0], 0.0, rows - 1.0)
            points[:, 1] = np.clip(points[:, 1], 0.0, cols - 1.0)
            points_source.append(points)
            rois.append(study_rois(sources[i], points, crop.scale, crop.size))
        probabilities = self.classify(torch.cat(rois))
        classify_seconds = (time.perf_counter() - started) / len(studies)
        results = []
        for i, study in enumerate(studies):
            found = []
            for j, level in enumerate(LEVELS):
                probs = probabilities[i * len(LEVELS) + j]
                found.append(
                    SpinePoint(
                        level=level,
                        row=float(points_source[i][j, 0]),
                        col=float(points_source[i][j, 1]),
                        label=max(probs, key=lambda k: probs[k]),
                        probabilities=probs,
                        score=float(np.clip(located[i, j, 2], 0.0, 1.0)),
                    )
                )
            timings = {
                "preprocess": prepare[i],
                "keypoints": keypoint_seconds,
                "classify": classify_seconds,
            }
            timings["total"] = sum(timings.values())
            results.append(
                SpineResult(
                    study_instance_uid=study.study_instance_uid,
                    points=tuple(found),
                    pixel_spacing=study.pixel_spacing,
                    middle=study.middle,
                    neighbours=study.neighbours,
                    timings=timings,
                    warnings=tuple(study.warnings),
                    bundle_name=self.bundle_name,
                    bundle_version=self.bundle_version,
                    intended_use=self.bundle.intended_use,
                )
            )
        return results
