"""Running a knee bundle on studies: coarse region, fine crop, labels on the source grid.

Per study (seed 003 [0005]-[0010]): the volume is denoised, resampled to the bundle's
isotropic working grid and normalised (:mod:`~mibi_node.analyses.knee.preprocess`);
stage 1 segments it average-pooled to the coarse grid; its foreground is cleaned of small 3-D
regions and boxed, with a margin, on the working grid; stage 2 segments that crop at full
working resolution; its tibial cartilage is split into the medial and lateral plates for the
whole knee at once (:func:`~mibi_node.analyses.knee.model.split_tibial`): the knee's side
and the slice normal say which half is medial (:func:`medial_toward_higher_slices`), and
where they cannot, a vote of stage 2 with stage 1's medial minus lateral probability as
further evidence decides (the result's warnings say so and why); its probabilities are
interpolated at the source voxels' centres and the argmax is the label volume, of the source
shape, outside the crop background. Each plate is then measured
(:func:`~mibi_node.analyses.knee.measure.measure_structures`).

:meth:`KneeRunner.predict_arms` also gives stage 1's own labels on the source grid (its
cleaned probabilities mapped back the same way), for the evaluation's "stage 1" arm.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mibi_node.analyses.base import MemoryNeeds
from mibi_node.analyses.knee.bundle import KneeBundle, load_knee_bundle
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.measure import measure_structures
from mibi_node.analyses.knee.model import (
    cartilage_box,
    class_probabilities,
    clean_coarse_probabilities,
    split_tibial,
)
from mibi_node.analyses.knee.preprocess import (
    Box,
    KneePreprocessing,
    WorkingGrid,
    coarse_image,
    crop,
    preprocess_volume,
    probabilities_to_source,
    upsample_to_box,
)
from mibi_node.analyses.knee.result import KneeInput, KneeResult, StructureMeasurement
from mibi_node.errors import UnusableStudyError

__all__ = ["KneeRunner", "StageOutput", "check_knee_input", "medial_toward_higher_slices"]

logger = logging.getLogger(__name__)

#: Smallest usable volume: slices, and rows and columns.
_MIN_SLICES = 8
_MIN_SIDE = 32
#: Smallest usable extent along every axis, mm.
_MIN_EXTENT_MM = 20.0

NO_CARTILAGE = "stage 1 found no cartilage: no structure segmented"

#: The slice normal's left-right component below which the series is too far from sagittal
#: for the knee's side to say which tibial plate is medial: 0.7 is about 45 degrees from
#: the left-right axis (the reader's sagittal series are within 37 degrees), which leaves
#: room for the leg's own rotation in the coil.
MIN_NORMAL_X = 0.7

_BY_VOTE = "medial and lateral tibial plates told apart by the model's vote, not by anatomy"
_TIBIAL = torch.tensor([LABEL_OF["medial_tibial_cartilage"], LABEL_OF["lateral_tibial_cartilage"]])


def medial_toward_higher_slices(study: KneeInput) -> tuple[bool | None, str]:
    """Whether the medial tibial plate lies toward higher slice index, from the knee's side.

    In DICOM's patient coordinates (LPS) ``+x`` points to the patient's left; a knee's
    medial compartment faces the other knee, so it lies toward ``+x`` in a right knee and
    ``-x`` in a left one. Slices are sorted along :attr:`Volume.normal
    <mibi_node.imaging.volume.Volume.normal>`, so the medial plate lies toward higher slice
    index when the normal's ``x`` has the medial side's sign.

    Returns
    -------
    tuple
        ``True`` or ``False`` and ``""``; or ``None`` and why it cannot be told (the side
        unknown, the series not sagittal enough: ``|normal x| <`` :data:`MIN_NORMAL_X`).
    """
    if study.laterality not in ("L", "R"):
        return None, "the knee's side is not known from its headers"
    normal = np.asarray(study.volume.normal, dtype=np.float64)
    length = float(np.linalg.norm(normal))
    normal_x = float(normal[0]) / length if length > 1e-6 else 0.0
    if not abs(normal_x) >= MIN_NORMAL_X:
        return None, (
            f"the slice normal's left-right component {abs(normal_x):.2f} is below "
            f"{MIN_NORMAL_X}: the series is not sagittal enough"
        )
    medial_x = 1.0 if study.laterality == "R" else -1.0
    return normal_x * medial_x > 0.0, ""


def check_knee_input(study: KneeInput) -> None:
    """Refuse an input the model cannot use, in words a technologist can act on.

    Raises
    ------
    UnusableStudyError
        The volume is not 3-D, too small, blank or not finite, or its spacing is not three
        positive numbers.
    """
    volume = study.volume
    uid = study.study_instance_uid
    image = volume.image
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise UnusableStudyError(
            f"study {uid}: the knee series should be a (slices, rows, columns) volume, "
            f"got shape {getattr(image, 'shape', None)}"
        )
    slices, rows, cols = image.shape
    if slices < _MIN_SLICES or min(rows, cols) < _MIN_SIDE:
        raise UnusableStudyError(
            f"study {uid}: the knee series is {slices} slices of {rows} x {cols} px, too small "
            f"for the cartilage model (at least {_MIN_SLICES} slices of {_MIN_SIDE} px a side)"
        )
    spacing = tuple(volume.spacing)
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise UnusableStudyError(f"study {uid}: the voxel spacing {spacing!r} is not usable")
    extent = [n * float(s) for n, s in zip(image.shape, spacing, strict=True)]
    if min(extent) < _MIN_EXTENT_MM:
        raise UnusableStudyError(
            f"study {uid}: the knee series covers {' x '.join(f'{e:.0f}' for e in extent)} mm, "
            f"too little for the cartilage model (at least {_MIN_EXTENT_MM:.0f} mm a side)"
        )
    if not np.isfinite(image).all():
        raise UnusableStudyError(f"study {uid}: the knee series has NaN or infinite voxels")
    if float(image.max()) <= float(image.min()):
        raise UnusableStudyError(f"study {uid}: the knee series is blank")


@dataclass(frozen=True)
class StageOutput:
    """What the stages made of one study (the runner's working data, for training too).

    Attributes
    ----------
    grid
        The study's working grid.
    coarse_probabilities
        Stage 1's ``(classes, ...)`` probabilities on the coarse grid, cleaned (voxels of
        removed regions are background).
    box
        Stage 2's crop on the working grid, or ``None`` when stage 1 found no cartilage.
    fine_probabilities
        Stage 2's ``(classes, ...)`` probabilities on the crop, its tibial cartilage split
        into the medial and lateral plates (:meth:`KneeRunner.split_sides`), or ``None``.
    removed
        Small regions removed from stage 1's foreground.
    warnings
        Remarks for the result (the tibial plates told apart by the vote, and why).
    """

    grid: WorkingGrid
    coarse_probabilities: torch.Tensor
    box: Box | None
    fine_probabilities: torch.Tensor | None
    removed: int
    warnings: tuple[str, ...] = ()


class KneeRunner:
    """A loaded knee bundle, ready to predict.

    Parameters
    ----------
    bundle_dir
        The bundle folder (or a loaded :class:`KneeBundle`).
    device
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.

    Raises
    ------
    BundleError
        The bundle cannot be loaded.
    """

    def __init__(self, bundle_dir: Path | str | KneeBundle, device: str = "cpu") -> None:
        if not isinstance(device, str):
            raise TypeError(f'Argument "device" should be a string, not {type(device).__name__}.')
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = (
            bundle_dir if isinstance(bundle_dir, KneeBundle) else load_knee_bundle(bundle_dir)
        )
        self.device = device
        self.bundle_name = self.bundle.name
        self.bundle_version = self.bundle.version
        self.preprocessing: KneePreprocessing = self.bundle.preprocessing
        self.stage1 = self.bundle.build_stage1(device)
        self.stage2 = self.bundle.build_stage2(device)
        factor = self.preprocessing.coarse_factor
        coarse, fine = factor * self.stage1.size_multiple, self.stage2.size_multiple
        #: The working grid's sides are multiples of this (both stages' strides).
        self.multiple = coarse * fine // math.gcd(coarse, fine)
        #: What the loaded bundle needs (set by the analysis when it loads the runner).
        self.memory: MemoryNeeds | None = None

    # -- the stages ------------------------------------------------------------------------

    def _probabilities(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits: torch.Tensor = model(x.to(self.device)[None, None])
            return class_probabilities(logits)[0].cpu()

    def clean_stage1(self, probabilities: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, int]:
        """Stage 1's probabilities with the small foreground regions made background (the
        bundle's region rule, :func:`~mibi_node.analyses.knee.model.clean_coarse_probabilities`)."""
        region = self.bundle.manifest.region
        return clean_coarse_probabilities(
            probabilities,
            self.preprocessing.coarse_spacing_mm**3,
            threshold=region.foreground_threshold,
            min_volume_mm3=region.min_volume_mm3,
            min_fraction=region.min_fraction,
        )

    def stage2_box(self, kept: np.ndarray, grid: WorkingGrid) -> Box | None:
        """Stage 2's crop around stage 1's kept foreground, on the working grid."""
        margin = self.bundle.manifest.region.margin_mm / self.preprocessing.spacing_mm
        return cartilage_box(
            kept,
            factor=self.preprocessing.coarse_factor,
            margin=margin,
            multiple=self.stage2.size_multiple,
            shape=grid.shape,
        )

    def run_stage2(self, working: np.ndarray, box: Box) -> torch.Tensor:
        """Stage 2's probabilities on a crop of the working volume."""
        fill = self.preprocessing.background
        return self._probabilities(self.stage2, torch.from_numpy(crop(working, box, fill=fill)))

    def split_sides(
        self,
        fine: torch.Tensor,
        coarse: torch.Tensor,
        box: Box,
        *,
        far_is_medial: bool | None = None,
    ) -> torch.Tensor:
        """Stage 2's tibial cartilage split into the medial and lateral plates
        (:func:`~mibi_node.analyses.knee.model.split_tibial`): the half of higher slice
        index is medial when ``far_is_medial`` (from :func:`medial_toward_higher_slices`);
        when it is ``None`` a vote decides, with stage 1's medial minus lateral probability
        on the crop as further evidence."""
        if far_is_medial is not None:
            return split_tibial(fine, far_is_medial=far_is_medial)
        medial = LABEL_OF["medial_tibial_cartilage"]
        lateral = LABEL_OF["lateral_tibial_cartilage"]
        difference = (coarse[medial] - coarse[lateral])[None]
        evidence = upsample_to_box(difference, self.preprocessing.coarse_factor, box)[0]
        return split_tibial(fine, evidence)

    def segment(self, study: KneeInput) -> tuple[StageOutput, dict[str, float]]:
        """Both stages on one checked study (not mapped back yet), with their timings."""
        timings: dict[str, float] = {}
        started = time.perf_counter()
        volume = study.volume
        working, grid = preprocess_volume(
            volume.image, volume.spacing, self.preprocessing, multiple=self.multiple
        )
        timings["preprocess"] = time.perf_counter() - started
        started = time.perf_counter()
        factor = self.preprocessing.coarse_factor
        coarse = self._probabilities(self.stage1, coarse_image(working, factor))
        timings["stage1"] = time.perf_counter() - started
        started = time.perf_counter()
        coarse, kept, removed = self.clean_stage1(coarse)
        box = self.stage2_box(kept, grid)
        timings["postprocess"] = time.perf_counter() - started
        fine = None
        started = time.perf_counter()
        if box is not None:
            fine = self.run_stage2(working, box)
        timings["stage2"] = time.perf_counter() - started
        warnings: list[str] = []
        if fine is not None and box is not None:
            started = time.perf_counter()
            far_is_medial, why = medial_toward_higher_slices(study)
            fine = self.split_sides(fine, coarse, box, far_is_medial=far_is_medial)
            if far_is_medial is None and bool(torch.isin(fine.argmax(0), _TIBIAL).any()):
                warnings.append(f"{_BY_VOTE}: {why}")
            timings["postprocess"] += time.perf_counter() - started
        return StageOutput(grid, coarse, box, fine, removed, tuple(warnings)), timings

    # -- results ---------------------------------------------------------------------------

    def _result(
        self,
        study: KneeInput,
        labels: np.ndarray,
        box: Box | None,
        timings: dict[str, float],
        warnings: Sequence[str],
        measure: bool,
    ) -> KneeResult:
        started = time.perf_counter()
        if measure:
            measurements = measure_structures(labels, study.volume.spacing)
        else:
            voxel = study.volume.voxel_volume_mm3
            counts = np.bincount(labels.ravel(), minlength=len(STRUCTURES) + 1)
            measurements = tuple(
                StructureMeasurement(name, int(counts[i + 1]), float(counts[i + 1] * voxel),
                                     None, None)
                for i, name in enumerate(STRUCTURES)
            )  # fmt: skip
        remarks = [f"{m.structure}: {m.remark}" for m in measurements if m.remark]
        warnings = [*warnings, *remarks]
        timings = {**timings, "measure": time.perf_counter() - started}
        timings["total"] = sum(v for k, v in timings.items() if k != "total")
        return KneeResult(
            study_instance_uid=study.study_instance_uid,
            volume=study.volume,
            labels=labels,
            measurements=measurements,
            coarse_box=box,
            timings=timings,
            warnings=tuple(dict.fromkeys([*study.warnings, *warnings])),
            bundle_name=self.bundle_name,
            bundle_version=self.bundle_version,
            intended_use=self.bundle.intended_use,
        )

    def _run(
        self, study: KneeInput, *, stage1: bool, measure_stage1: bool = False
    ) -> tuple[KneeResult | None, KneeResult]:
        output, timings = self.segment(study)
        grid = output.grid
        warnings = list(output.warnings)
        started = time.perf_counter()
        if output.box is None or output.fine_probabilities is None:
            warnings.append(NO_CARTILAGE)
            labels = np.zeros(grid.source_shape, dtype=np.uint8)
            source_box = None
        else:
            labels, source_box = probabilities_to_source(
                output.fine_probabilities, grid, box=output.box
            )
        mapped = time.perf_counter() - started
        both_timings = {**timings, "postprocess": timings["postprocess"] + mapped}
        first = None
        if stage1:
            started = time.perf_counter()
            coarse_labels, _ = probabilities_to_source(
                output.coarse_probabilities, grid, spacing=self.preprocessing.coarse_spacing_mm
            )
            first_timings = {
                **timings,
                "stage2": 0.0,
                "postprocess": timings["postprocess"] + time.perf_counter() - started,
            }
            first = self._result(
                study, coarse_labels, source_box, first_timings, warnings, measure_stage1
            )
        both = self._result(study, labels, source_box, both_timings, warnings, True)
        return first, both

    def predict(self, inputs: Sequence[KneeInput]) -> list[KneeResult]:
        """The four plates of each study, on its own grid, with their measurements.

        A study in which stage 1 finds no cartilage gets a result without structures and a
        warning saying so.

        Raises
        ------
        UnusableStudyError
            A study's volume cannot be used (see :func:`check_knee_input`).
        """
        studies = list(inputs)
        for study in studies:
            check_knee_input(study)
        return [self._run(study, stage1=False)[1] for study in studies]

    def predict_arms(
        self, inputs: Sequence[KneeInput], *, measure_stage1: bool = False
    ) -> list[tuple[KneeResult, KneeResult]]:
        """Stage 1 alone and both stages, per study, from one pass of the networks.

        Parameters
        ----------
        inputs
            The studies.
        measure_stage1
            Measure the thickness of stage 1's plates too (without it its measurements
            hold the volumes only); both stages' plates are always measured.

        Returns
        -------
        list
            ``(stage 1 result, both stages result)`` per study. Stage 1's labels are its
            cleaned probabilities mapped back to the source grid; its ``coarse_box`` is the
            crop it gave stage 2.

        Raises
        ------
        UnusableStudyError
            A study's volume cannot be used (see :func:`check_knee_input`).
        """
        studies = list(inputs)
        for study in studies:
            check_knee_input(study)
        out = []
        for study in studies:
            first, both = self._run(study, stage1=True, measure_stage1=measure_stage1)
            assert first is not None  # noqa: S101 - _run(stage1=True) always makes it
            out.append((first, both))
        return out

    def predict_stage1_only(self, inputs: Sequence[KneeInput]) -> list[KneeResult]:
        """Stage 1's own labels (cleaned, mapped back to the source grid), per study.

        Raises
        ------
        UnusableStudyError
            A study's volume cannot be used (see :func:`check_knee_input`).
        """
        return [first for first, _ in self.predict_arms(inputs, measure_stage1=True)]
