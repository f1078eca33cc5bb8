"""Running a thyroid bundle on studies: denoise, preprocess, members, fusion, thresholds.

Per study: the anterior image is filtered with the adaptive median filter (the bundle's
``smax``), cropped to the bundle's field of view around the gland, normalised, squared and resized
(:func:`prepare_thyroid_input`, which training
uses too, so both see the same input); every member gives one sigmoid probability per
finding, the probabilities are fused with the bundle's weights, and each finding is
reported when it reaches its threshold (``normal`` only when no abnormal finding does).
The lobe split and the hot and cold areas come from :func:`measure_thyroid` on the
denoised source image, their coordinates in that image's pixels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from mibi_node.analyses.base import MemoryNeeds
from mibi_node.analyses.thyroid.bundle import ThyroidBundle, load_thyroid_bundle
from mibi_node.analyses.thyroid.measure import measure_thyroid
from mibi_node.analyses.thyroid.result import FINDINGS, Nodule, ThyroidResult
from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.denoise import adaptive_median
from mibi_node.imaging.preprocess import Normalisation, resize_square, to_model_input
from mibi_node.imaging.study import StudyInput

__all__ = [
    "ThyroidRunner",
    "crop_field",
    "decide_findings",
    "prepare_thyroid_input",
    "thyroid_model_input",
]

logger = logging.getLogger(__name__)

#: Largest side the measurements run at; a larger source is resized and mapped back.
_MEASURE_SIDE = 256


def crop_field(
    image: np.ndarray, pixel_spacing: tuple[float, float] | None, field_mm: float | None
) -> np.ndarray:
    """The square of ``field_mm`` around the gland (the whole image when it is not larger).

    A parallel-hole neck image is twice a pinhole one's field of view; cropping both to the
    same field around the thyroid gives a 64 px input the same millimetres per pixel, which
    keeps a small cold nodule a few pixels wide. The centre is the median position of the
    brightest smoothed pixels (a few marker pixels cannot move it).
    """
    if field_mm is None or pixel_spacing is None:
        return image
    from scipy import ndimage

    side = int(round(field_mm / float(min(pixel_spacing))))
    rows, cols = image.shape
    if side >= max(rows, cols) or side < 16:
        return image
    smooth = ndimage.gaussian_filter(image.astype(np.float64), 2.0)
    bright = smooth >= 0.5 * float(np.percentile(smooth, 99.0))
    found_rows, found_cols = np.nonzero(bright)
    if found_rows.size == 0:
        return image
    centre_row, centre_col = float(np.median(found_rows)), float(np.median(found_cols))
    top = int(round(min(max(centre_row - side / 2, 0), max(rows - side, 0))))
    left = int(round(min(max(centre_col - side / 2, 0), max(cols - side, 0))))
    return image[top : top + side, left : left + side]


def thyroid_model_input(
    denoised: np.ndarray,
    size: int,
    normalisation: Normalisation,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    field_mm: float | None = None,
) -> np.ndarray:
    """The (1, size, size) float32 model input of a denoised anterior image."""
    array, _ = to_model_input([crop_field(denoised, pixel_spacing, field_mm)], size, normalisation)
    return array


def prepare_thyroid_input(
    pixels: np.ndarray,
    size: int,
    normalisation: Normalisation,
    smax: int | None,
    *,
    pixel_spacing: tuple[float, float] | None = None,
    field_mm: float | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The model input of one anterior image, as the runner makes it (training uses it too).

    Returns
    -------
    tuple
        The (1, size, size) float32 input and the denoised source image.
    """
    image = np.nan_to_num(np.asarray(pixels, dtype=np.float32))
    denoised = adaptive_median(image, smax) if smax is not None else image
    array = thyroid_model_input(
        denoised, size, normalisation, pixel_spacing=pixel_spacing, field_mm=field_mm
    )
    return array, denoised


def decide_findings(
    probabilities: dict[str, float], thresholds: dict[str, float]
) -> tuple[str, ...]:
    """Findings at or above their threshold, most probable first; ``("normal",)`` if none.

    ``normal`` is reported only when no abnormal finding is, whatever its own probability.
    """
    abnormal = [k for k in FINDINGS[1:] if probabilities[k] >= thresholds[k]]
    if not abnormal:
        return ("normal",)
    return tuple(sorted(abnormal, key=lambda k: -probabilities[k]))


def _measure(denoised: np.ndarray) -> tuple[dict[str, float], tuple[Nodule, ...]]:
    """Lobe split and nodules in source pixels (large sources measured resized)."""
    if max(denoised.shape) <= _MEASURE_SIDE:
        return measure_thyroid(denoised)
    small, geometry = resize_square(denoised, _MEASURE_SIDE)
    uptake, found = measure_thyroid(small)
    nodules = []
    for n in found:
        row, col = geometry.to_source(n.row, n.col)
        nodules.append(Nodule(row, col, n.radius / geometry.scale, n.kind, n.lobe))
    return uptake, tuple(nodules)


class ThyroidRunner:
    """A loaded thyroid bundle, ready to predict.

    Parameters
    ----------
    bundle_dir
        The bundle folder (or a loaded :class:`ThyroidBundle`).
    device
        ``"cpu"`` or ``"cuda[:N]"``.

    Raises
    ------
    BundleError
        The bundle cannot be loaded.
    """

    def __init__(self, bundle_dir: Path | str | ThyroidBundle, device: str = "cpu") -> None:
        if not isinstance(device, str):
            raise TypeError(f'Argument "device" should be a string, not {type(device).__name__}.')
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = (
            bundle_dir if isinstance(bundle_dir, ThyroidBundle) else load_thyroid_bundle(bundle_dir)
        )
        self.device = device
        self.bundle_name = self.bundle.name
        self.bundle_version = self.bundle.version
        self.members = {
            name: self.bundle.build_member(name, device) for name in self.bundle.member_names
        }
        self.weights = np.asarray(self.bundle.fusion_weights, dtype=np.float64)
        self.thresholds = self.bundle.thresholds
        #: What the loaded bundle needs (set by the analysis when it loads the runner).
        self.memory: MemoryNeeds | None = None

    def member_probabilities(self, inputs: np.ndarray) -> np.ndarray:
        """(members, N, findings) sigmoid probabilities for preprocessed inputs."""
        tensor = torch.as_tensor(inputs, dtype=torch.float32, device=self.device)
        out = []
        with torch.inference_mode():
            for member in self.members.values():
                out.append(torch.sigmoid(member(tensor).float()).cpu().double().numpy())
        return np.stack(out)

    def predict(self, inputs: Sequence[StudyInput]) -> list[ThyroidResult]:
        """Findings, probabilities, lobe split and nodules of each study.

        Raises
        ------
        UnusableStudyError
            A study has no ``thyroid`` image.
        """
        studies = list(inputs)
        if not studies:
            return []
        for study in studies:
            if "thyroid" not in study.images:
                raise UnusableStudyError(
                    f"study {study.study_instance_uid} has no anterior thyroid image"
                )
        size, normalisation = self.bundle.input_size, self.bundle.normalisation
        smax = self.bundle.denoise_smax
        arrays, denoised, timings = [], [], []
        for study in studies:
            started = time.perf_counter()
            image = np.nan_to_num(study.images["thyroid"].pixels.astype(np.float32))
            clean = adaptive_median(image, smax) if smax is not None else image
            middle = time.perf_counter()
            array = thyroid_model_input(
                clean,
                size,
                normalisation,
                pixel_spacing=study.images["thyroid"].pixel_spacing,
                field_mm=self.bundle.manifest.input.field_mm,
            )
            arrays.append(array)
            denoised.append(clean)
            timings.append(
                {"denoise": middle - started, "preprocess": time.perf_counter() - middle}
            )
        started = time.perf_counter()
        members = self.member_probabilities(np.stack(arrays))
        member_seconds = (time.perf_counter() - started) / len(studies)
        fused = np.tensordot(self.weights, members, axes=1)
        names = list(self.members)
        results = []
        for i, study in enumerate(studies):
            started = time.perf_counter()
            lobe_uptake, nodules = _measure(denoised[i])
            probabilities = {k: float(fused[i, j]) for j, k in enumerate(FINDINGS)}
            result_timings = {
                **timings[i],
                "members": member_seconds,
                "measure": time.perf_counter() - started,
            }
            result_timings["total"] = sum(result_timings.values())
            results.append(
                ThyroidResult(
                    study_instance_uid=study.study_instance_uid,
                    probabilities=probabilities,
                    findings=decide_findings(probabilities, self.thresholds),
                    thresholds=dict(self.thresholds),
                    lobe_uptake=lobe_uptake,
                    nodules=nodules,
                    source_image=study.images["thyroid"],
                    member_probabilities={
                        name: {k: float(members[m, i, j]) for j, k in enumerate(FINDINGS)}
                        for m, name in enumerate(names)
                    },
                    timings=result_timings,
                    warnings=tuple(study.warnings),
                    bundle_name=self.bundle_name,
                    bundle_version=self.bundle_version,
                    intended_use=self.bundle.intended_use,
                )
            )
        return results
