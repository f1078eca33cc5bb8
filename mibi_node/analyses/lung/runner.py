"""Running a lung bundle on chest CT studies: slabs, slice detections, 3-D lesions, measures.

Per study (seed 004): the HU volume is checked (:func:`check_lung_input`) and resampled by
linear interpolation to the bundle's working grid (:class:`WorkingGrid`: e.g. 2.5 mm slices
of 1.5 mm pixels, what the detector was trained on; a 1 mm series of 512 x 512 pixels of
0.7 mm becomes 2.5 mm slices of about 240 x 240). torchvision's transform is told the working
slice size (``min_size`` / ``max_size``) so that it never rescales a slice. The detector
runs on every working slice with its neighbours as channels
(:func:`~mibi_node.analyses.lung.model.detect_slices`), the slice detections are linked into
3-D lesions with the bundle's linking parameters
(:func:`~mibi_node.analyses.lung.linking.link_detections`), each lesion's mask is mapped
back to the source grid (:func:`lesion_to_source`) and the lesions are painted and measured
there (:func:`~mibi_node.analyses.lung.measure.measure_lesions`).
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
import torch.nn.functional as F  # noqa: N812
from scipy import ndimage

from mibi_node.analyses.base import MemoryNeeds
from mibi_node.analyses.lung.bundle import LinkingSection, LungBundle, load_lung_bundle
from mibi_node.analyses.lung.linking import Lesion3D, SliceDetection, link_detections
from mibi_node.analyses.lung.measure import measure_lesions
from mibi_node.analyses.lung.model import detect_slices
from mibi_node.analyses.lung.result import LungInput, LungResult
from mibi_node.errors import UnusableStudyError

__all__ = [
    "LungRunner",
    "StudyDetections",
    "WorkingGrid",
    "check_lung_input",
    "lesion_to_source",
]

logger = logging.getLogger(__name__)

#: Smallest usable series: slices, and rows and columns.
_MIN_SLICES = 8
_MIN_SIDE = 32
#: Smallest usable extent: along the slices, and in plane, mm (a chest is 250 mm or more
#: across; the phantom draws at least 60 x 120 x 120 mm).
_MIN_SLICE_EXTENT_MM = 20.0
_MIN_PLANE_EXTENT_MM = 80.0
#: A chest CT in HU holds air and lung: its darkest voxels lie below this.
_AIR_HU = -500.0


def check_lung_input(study: LungInput) -> None:
    """Refuse an input the detector cannot use, in words a technologist can act on.

    Raises
    ------
    UnusableStudyError
        The series is not CT, not a 3-D volume, too small or too short, its spacing is not
        three positive numbers, it holds NaN or infinite voxels, or it holds no air or lung
        (not a chest CT in HU).
    """
    volume = study.volume
    uid = study.study_instance_uid
    if volume.modality.upper() != "CT":
        raise UnusableStudyError(
            f"study {uid}: the lung analysis reads CT, but the series' modality is "
            f"{volume.modality or 'not given'}"
        )
    image = volume.image
    if not isinstance(image, np.ndarray) or image.ndim != 3:
        raise UnusableStudyError(
            f"study {uid}: the CT series should be a (slices, rows, columns) volume, "
            f"got shape {getattr(image, 'shape', None)}"
        )
    slices, rows, cols = image.shape
    if slices < _MIN_SLICES or min(rows, cols) < _MIN_SIDE:
        raise UnusableStudyError(
            f"study {uid}: the CT series is {slices} slices of {rows} x {cols} px, too small "
            f"for the lesion detector (at least {_MIN_SLICES} slices of {_MIN_SIDE} px a side)"
        )
    spacing = tuple(volume.spacing)
    if len(spacing) != 3 or not all(math.isfinite(float(s)) and float(s) > 0 for s in spacing):
        raise UnusableStudyError(f"study {uid}: the voxel spacing {spacing!r} is not usable")
    extent = [n * float(s) for n, s in zip(image.shape, spacing, strict=True)]
    if extent[0] < _MIN_SLICE_EXTENT_MM or min(extent[1:]) < _MIN_PLANE_EXTENT_MM:
        raise UnusableStudyError(
            f"study {uid}: the CT series covers {' x '.join(f'{e:.0f}' for e in extent)} mm, "
            f"too little of the chest (at least {_MIN_SLICE_EXTENT_MM:.0f} mm along the "
            f"slices and {_MIN_PLANE_EXTENT_MM:.0f} mm in plane)"
        )
    if not np.isfinite(image).all():
        raise UnusableStudyError(f"study {uid}: the CT series has NaN or infinite voxels")
    if not float(image.min()) < _AIR_HU:
        raise UnusableStudyError(
            f"study {uid}: no voxel of the CT series is below {_AIR_HU:.0f} HU: it shows no "
            f"lung or air, or it is not in HU"
        )


@dataclass(frozen=True)
class WorkingGrid:
    """The working grid of one source volume: the same extent, the bundle's spacing.

    Both grids share the corner of voxel 0 and have their voxel centres at ``(index + 0.5)
    x spacing``. Each axis holds ``round(extent / target)`` working voxels, so its working
    spacing is the target's to within half a voxel over the extent and the two grids end
    together.

    Attributes
    ----------
    source_shape, source_spacing
        ``(slice, row, column)`` shape and spacing (mm) of the source volume.
    shape, spacing
        The working grid's.
    """

    source_shape: tuple[int, int, int]
    source_spacing: tuple[float, float, float]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @classmethod
    def create(
        cls, source_shape: Sequence[int], source_spacing: Sequence[float], target: Sequence[float]
    ) -> WorkingGrid:
        """The grid of about ``target`` mm covering a source volume."""
        shape = tuple(int(n) for n in source_shape)
        spacing = tuple(float(s) for s in source_spacing)
        if len(shape) != 3 or len(spacing) != 3 or len(target) != 3:
            raise ValueError("source_shape, source_spacing and target should have 3 entries")
        working = tuple(
            max(1, round(n * s / float(t))) for n, s, t in zip(shape, spacing, target, strict=True)
        )
        actual = tuple(n * s / w for n, s, w in zip(shape, spacing, working, strict=True))
        return cls(shape, spacing, working, actual)  # type: ignore[arg-type]

    @property
    def identity(self) -> bool:
        """Whether the working grid is the source grid."""
        return self.shape == self.source_shape

    def to_working(self, image: np.ndarray) -> np.ndarray:
        """A source volume on the working grid (linear interpolation), float32."""
        array = np.asarray(image, dtype=np.float32)
        if self.identity:
            return array
        x = torch.from_numpy(np.ascontiguousarray(array))[None, None]
        return F.interpolate(x, size=self.shape, mode="trilinear", align_corners=False)[
            0, 0
        ].numpy()

    def source_in_working(self, axis: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The source voxel centres ``start..stop`` along ``axis``, in working-voxel units."""
        stop = self.source_shape[axis] if stop is None else stop
        k = np.arange(start, stop, dtype=np.float64)
        return (k + 0.5) * self.source_spacing[axis] / self.spacing[axis] - 0.5

    def source_span(self, axis: int, lo: int, hi: int) -> tuple[int, int]:
        """The source voxels whose centres fall within working voxels ``lo..hi`` (half
        open), widened by one voxel each side, clipped to the volume."""
        ratio = self.spacing[axis] / self.source_spacing[axis]
        first = math.floor(lo * ratio - 0.5) - 1
        last = math.ceil(hi * ratio - 0.5) + 1
        return max(first, 0), min(last, self.source_shape[axis])


def lesion_to_source(lesion: Lesion3D, grid: WorkingGrid) -> Lesion3D:
    """A working-grid lesion on the source grid.

    Its mask is interpolated linearly at the source voxel centres within its box (and a
    voxel around) and kept where above 0.5; a lesion too thin for that keeps the source
    voxel nearest each of its working voxels, so a lesion is never lost.
    """
    if grid.identity:
        return lesion
    k0, j0, i0, k1, j1, i1 = lesion.bbox
    spans = [
        grid.source_span(a, lo, hi) for a, (lo, hi) in enumerate(((k0, k1), (j0, j1), (i0, i1)))
    ]
    offset = (k0, j0, i0)
    # in the mask's own voxel units, with the one-voxel zero border added below
    coords = [grid.source_in_working(a, lo, hi) - offset[a] + 1 for a, (lo, hi) in enumerate(spans)]
    padded = np.pad(lesion.mask.astype(np.float32), 1)
    points = np.meshgrid(*coords, indexing="ij")
    values = ndimage.map_coordinates(padded, points, order=1, mode="nearest")
    mask = values > 0.5
    if not mask.any():
        mask = np.zeros(values.shape, dtype=bool)
        for voxel in np.argwhere(lesion.mask):
            nearest = [
                int(np.argmin(np.abs(c - 1 - v))) for c, v in zip(coords, voxel, strict=True)
            ]
            mask[nearest[0], nearest[1], nearest[2]] = True
    full = Lesion3D.from_mask(lesion.label, lesion.score, mask)
    return Lesion3D(
        full.label,
        full.score,
        tuple(o + lo for o, (lo, _) in zip(full.offset, spans, strict=True)),  # type: ignore[arg-type]
        full.mask,
        lesion.slice_scores,
    )


@dataclass(frozen=True)
class StudyDetections:
    """The detector's slice detections of one study on its working grid.

    Attributes
    ----------
    grid
        The study's working grid.
    detections
        Every slice's detections (working-grid indices).
    timings
        Seconds of ``read`` (the check), ``resample`` and ``detect``.
    """

    grid: WorkingGrid
    detections: tuple[SliceDetection, ...]
    timings: dict[str, float]


class LungRunner:
    """A loaded lung bundle, ready to predict.

    Parameters
    ----------
    bundle_dir
        The bundle folder (or a loaded :class:`LungBundle`).
    device
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.

    Raises
    ------
    BundleError
        The bundle cannot be loaded.
    """

    def __init__(self, bundle_dir: Path | str | LungBundle, device: str = "cpu") -> None:
        if not isinstance(device, str):
            raise TypeError(f'Argument "device" should be a string, not {type(device).__name__}.')
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.bundle = (
            bundle_dir if isinstance(bundle_dir, LungBundle) else load_lung_bundle(bundle_dir)
        )
        self.device = device
        self.bundle_name = self.bundle.name
        self.bundle_version = self.bundle.version
        self.detector = self.bundle.build_detector(device)
        #: What the loaded bundle needs (set by the analysis when it loads the runner).
        self.memory: MemoryNeeds | None = None

    def detect(self, study: LungInput) -> StudyDetections:
        """Check one study, resample it to the working grid and detect on every slice.

        Raises
        ------
        UnusableStudyError
            The study cannot be used (see :func:`check_lung_input`).
        """
        timings: dict[str, float] = {}
        started = time.perf_counter()
        check_lung_input(study)
        volume = study.volume
        timings["read"] = time.perf_counter() - started
        started = time.perf_counter()
        grid = WorkingGrid.create(volume.shape, volume.spacing, self.bundle.spacing)
        working = grid.to_working(volume.image)
        timings["resample"] = time.perf_counter() - started
        started = time.perf_counter()
        entry = self.bundle.manifest.detector
        rows, cols = grid.shape[1:]
        # the working slice as it is: torchvision's transform must not rescale it
        self.detector.transform.min_size = (min(rows, cols),)
        self.detector.transform.max_size = max(rows, cols)
        detections = detect_slices(
            self.detector,
            working,
            channels=entry.channels,
            batch=entry.batch,
            score_threshold=entry.score_threshold,
        )
        timings["detect"] = time.perf_counter() - started
        return StudyDetections(grid, tuple(detections), timings)

    def link(self, found: StudyDetections, linking: LinkingSection | None = None) -> list[Lesion3D]:
        """The 3-D lesions of a study's detections on its source grid, by decreasing score.

        ``linking`` defaults to the bundle's (training tries others on the same detections).
        """
        link = linking or self.bundle.manifest.linking
        lesions = link_detections(list(found.detections), found.grid.shape, **link.model_dump())
        return [lesion_to_source(lesion, found.grid) for lesion in lesions]

    def _run(self, study: LungInput, every_lesion: bool) -> LungResult:
        found = self.detect(study)
        timings = dict(found.timings)
        started = time.perf_counter()
        lesions = self.link(found)
        timings["link"] = time.perf_counter() - started
        warnings = [*study.warnings, *study.volume.warnings]
        threshold = self.bundle.manifest.report.min_probability
        if not every_lesion and threshold > 0:
            kept = [lesion for lesion in lesions if lesion.score >= threshold]
            if len(kept) < len(lesions):
                warnings.append(
                    f"{len(lesions) - len(kept)} candidate lesion(s) scored below the "
                    f"bundle's reporting threshold {threshold:.2f} and are not reported"
                )
            lesions = kept
        started = time.perf_counter()
        lesions_map, findings = measure_lesions(study.volume, lesions)
        timings["measure"] = time.perf_counter() - started
        timings["total"] = sum(timings.values())
        logger.debug(
            "study %s: %d detections, %d lesions in %.1f s",
            study.study_instance_uid,
            len(found.detections),
            len(findings),
            timings["total"],
        )
        return LungResult(
            study_instance_uid=study.study_instance_uid,
            volume=study.volume,
            lesions_map=lesions_map,
            lesions=findings,
            timings=timings,
            warnings=tuple(dict.fromkeys(warnings)),
            bundle_name=self.bundle_name,
            bundle_version=self.bundle_version,
            intended_use=self.bundle.intended_use,
        )

    def predict(
        self, inputs: Sequence[LungInput], *, every_lesion: bool = False
    ) -> list[LungResult]:
        """The ground-glass opacities and bronchiectases of each study, on its own grid.

        Lesions scoring below the bundle's reporting threshold (``report.min_probability``)
        are left out, with a warning that counts them, unless ``every_lesion`` (the FROC
        evaluation needs every candidate).

        Raises
        ------
        UnusableStudyError
            A study cannot be used (see :func:`check_lung_input`); the studies are all
            checked before any is run.
        """
        studies = list(inputs)
        for study in studies:
            check_lung_input(study)
        return [self._run(study, every_lesion) for study in studies]
