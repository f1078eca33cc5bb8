"""Synthetic lumbar spine MR studies (seed 002) written as MR Image Storage, with their truth.

A study holds up to three series, one instance per slice: T1 sagittal (FSE, short TR/TE),
T2 sagittal (TSE, long TR/TE) and T2 axial slices through the lower discs. The anatomy
(:mod:`~mibi_node.analyses.spine.anatomy`) is drawn as tissue labels; here they become grey
values (tissue T1/T2 contrast, marrow texture, partial volume, posterior coil shading,
Rician noise) and DICOM files with consistent geometry (Image Position/Orientation,
Pixel Spacing, Slice Thickness, Spacing Between Slices, one Frame of Reference). The truth
is the representative point of each of the eleven levels on the middle T2 sagittal slice,
in its pixels, with the level's class; :func:`write_spine_dataset` writes it in the
challenge's ``annotations.json`` format. A seed (and the study's index) fixes every byte.

Run ``python -m mibi_node.analyses.spine.phantom OUT --count N --seed S`` to write a data set.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from scipy import ndimage

from mibi_node.analyses.spine.anatomy import (
    DEFAULT_PREVALENCE,
    Scene,
    SpineCase,
    Tissue,
    build_scene,
    random_case,
    upsample,
)
from mibi_node.analyses.spine.annotations import (
    AnnotatedPoint,
    StudyAnnotation,
    write_annotations,
)
from mibi_node.analyses.spine.levels import LEVEL_KIND, LEVELS
from mibi_node.analyses.spine.result import SliceRef
from mibi_node.analyses.spine.slices import axial_labels, sagittal_labels
from mibi_node.phantom.dicom import (
    _da,
    _ds,
    _tm,
    attach_file_meta,
    phantom_uid,
    synthetic_patient,
)

__all__ = [
    "DEFAULT_PREVALENCE",
    "SERIES",
    "SpineCase",
    "SpinePhantomStudy",
    "make_spine_study",
    "random_case",
    "write_spine_dataset",
]

logger = logging.getLogger(__name__)

#: The series a study can hold, in series-number order.
SERIES: tuple[str, ...] = ("t1_sagittal", "t2_sagittal", "t2_axial")

_STEMS = {"t1_sagittal": "t1-sag", "t2_sagittal": "t2-sag", "t2_axial": "t2-ax"}
_DESCRIPTIONS = {
    "t1_sagittal": ("t1_tse_sag", "T1 FSE SAG", "SAG T1", "t1_tse_sag_320", "Sag T1 FSE"),
    "t2_sagittal": ("T2_TSE_SAG", "t2_tse_sag_384", "SAG T2 FSE", "Sag T2", "T2W_TSE_SAG"),
    "t2_axial": ("T2 TSE AX", "t2_tse_tra", "AX T2 FSE", "T2W_TSE_TRA", "Ax T2"),
}
_STUDY_DESCRIPTIONS = ("MRI LUMBAR SPINE", "MR LWS", "LUMBAR SPINE WO CONTRAST", "MRI L-SPINE")
_SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
_AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]

#: Tissue -> (T1-weighted, T2-weighted) grey value, 1 = CSF on T2.
_CONTRAST = {
    Tissue.AIR: (0.0, 0.0), Tissue.FAT: (0.95, 0.78), Tissue.MUSCLE: (0.38, 0.22),
    Tissue.VISCERA: (0.45, 0.33), Tissue.CORTEX: (0.05, 0.05), Tissue.LIGAMENT: (0.07, 0.06),
    Tissue.CSF: (0.16, 1.0), Tissue.NERVE: (0.36, 0.3), Tissue.CORD: (0.42, 0.36),
    Tissue.EPIDURAL_FAT: (0.9, 0.72), Tissue.ANNULUS: (0.32, 0.15),
    Tissue.HERNIATION: (0.33, 0.5), Tissue.EXTRUDED: (0.34, 0.68), Tissue.MODIC1: (0.2, 0.8),
    Tissue.MODIC2: (0.95, 0.7), Tissue.MODIC3: (0.08, 0.08), Tissue.FATTY: (0.97, 0.76),
    Tissue.EDEMA: (0.25, 0.85), Tissue.POSTERIOR: (0.55, 0.37), Tissue.SACRAL_DISC: (0.25, 0.2),
    Tissue.VESSEL: (0.05, 0.03), Tissue.FACET_FLUID: (0.2, 0.85), Tissue.OSTEOPHYTE: (0.3, 0.18),
}  # fmt: skip


@dataclass(frozen=True)
class SpinePhantomStudy:
    """One written phantom study and its truth.

    Attributes
    ----------
    study_instance_uid
        The study.
    paths
        Series key (:data:`SERIES`) -> its files in slice order (sorted along the slice
        normal, the reader's order; axial head to foot).
    series_instance_uids
        Series key -> Series Instance UID (also for series not written).
    middle
        The middle T2 sagittal slice (the truth's points lie on it); its UID is fixed even
        when the T2 sagittal series is not written.
    middle_index
        Its position in the sorted T2 sagittal series (the annotation's ``zIndex``).
    pixel_spacing
        (row, column) mm of the sagittal slices.
    truth
        ``(level, row, column, class)`` for each of the eleven levels, in the middle slice's
        pixels (row 0 / column 0 is the centre of the first pixel), rounded to 1/1000 pixel.
    case
        What was drawn.
    """

    study_instance_uid: str
    paths: dict[str, tuple[Path, ...]]
    series_instance_uids: dict[str, str]
    middle: SliceRef
    middle_index: int
    pixel_spacing: tuple[float, float]
    truth: tuple[tuple[str, float, float, str], ...]
    case: SpineCase

    def annotation(self) -> StudyAnnotation:
        """The truth as one study of the challenge's annotation file."""
        points = tuple(
            AnnotatedPoint(level, row, col, label, self.middle_index)
            for level, row, col, label in self.truth
        )
        return StudyAnnotation(
            self.study_instance_uid,
            self.middle.series_instance_uid,
            self.middle.sop_instance_uid,
            points,
        )


@dataclass(frozen=True)
class _Series:
    key: str
    number: int
    description: str
    tr: float
    te: float
    train: int
    variant: tuple[str, ...]
    sequence: str


@dataclass(frozen=True)
class _Header:
    seed: int
    index: int
    study_instance_uid: str
    frame_of_reference_uid: str
    moment: datetime
    description: str
    name: str
    patient_id: str
    sex: str
    age: int
    accession: str


def _field(rng: np.random.Generator, size: int, cell: int) -> np.ndarray:
    """A smooth random field of unit spread on a ``size`` square grid."""
    small = rng.standard_normal((size // cell + 2, size // cell + 2), dtype=np.float32)
    return upsample(small, cell, (size, size))


def _lut(scene: Scene, weighting: int, rng: np.random.Generator) -> np.ndarray:
    """Grey value per tissue label for T1 (``weighting`` 0) or T2 (1), jittered per study."""
    lut = np.zeros(Tissue.COUNT, dtype=np.float32)
    for tissue, values in _CONTRAST.items():
        lut[tissue] = values[weighting] * rng.uniform(0.95, 1.05)
    for i, values in scene.marrow.items():
        lut[Tissue.MARROW + i] = values[weighting]
    for i, values in scene.nucleus.items():
        lut[Tissue.NUCLEUS + i] = values[weighting]
    return lut


def _signal(
    labels: np.ndarray, lut: np.ndarray, fields: tuple[np.ndarray, ...], spacing: float,
    gain: float, noise: float, rng: np.random.Generator,
) -> np.ndarray:  # fmt: skip
    """Grey values of one slice: contrast, texture, partial volume, coil shading, Rician noise.

    ``fields`` holds the study's smooth texture field and the coil's sensitivity map.
    """
    texture, shading = fields
    image = lut[labels]
    image *= 1.0 + 0.06 * texture
    image = ndimage.gaussian_filter(image, 0.4 / max(spacing, 0.3))
    image *= shading
    sigma = noise * float(lut.max())
    real = image + sigma * rng.standard_normal(image.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(image.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    return np.clip(np.round(magnitude * gain), 0, 4095).astype(np.uint16)


def _shading(rng: np.random.Generator, rows: int, cols: int, spacing: float) -> np.ndarray:
    """Posterior spine-coil sensitivity (image right = patient back), falling off head/foot."""
    depth = (cols - 1 - np.arange(cols, dtype=np.float32)) * spacing
    across = 0.35 + 0.65 * np.exp(-depth / rng.uniform(130.0, 190.0))
    r = (np.arange(rows, dtype=np.float32) - rows / 2) / (rows / 2)
    along = 1.0 - rng.uniform(0.15, 0.35) * r**2
    return (along[:, None] * across[None, :]).astype(np.float32)


def _header(seed: int, index: int, case: SpineCase, rng: np.random.Generator) -> _Header:
    moment = datetime(2024, 3, 4, 7, 30) + timedelta(
        days=int(rng.integers(0, 700)), minutes=5 * int(rng.integers(0, 130))
    )
    number = f"{index + 1:04d}"
    return _Header(
        seed=seed,
        index=index,
        study_instance_uid=phantom_uid(seed, index, "spine-mr", "study"),
        frame_of_reference_uid=phantom_uid(seed, index, "spine-mr", "frame-of-reference"),
        moment=moment,
        description=str(rng.choice(_STUDY_DESCRIPTIONS)),
        name=f"SYNTHETIC^SPINE {number}",
        patient_id=f"SYNTH-S{seed}-{number}",
        sex=case.sex,
        age=case.age,
        accession=f"SP{seed % 1_000_000:06d}{number}",
    )


def _series_specs(rng: np.random.Generator) -> dict[str, _Series]:
    siemens = rng.uniform() < 0.5
    variant = ("SK", "SP", "OSP") if siemens else ("SK",)
    t1 = _Series(
        "t1_sagittal",
        1,
        str(rng.choice(_DESCRIPTIONS["t1_sagittal"])),
        round(rng.uniform(420.0, 650.0)),
        round(rng.uniform(8.0, 14.0), 1),
        int(rng.integers(3, 6)),
        variant,
        "*tse2d1_3" if siemens else "FSE",
    )
    t2 = _Series(
        "t2_sagittal",
        2,
        str(rng.choice(_DESCRIPTIONS["t2_sagittal"])),
        round(rng.uniform(2600.0, 4500.0)),
        round(rng.uniform(90.0, 120.0), 1),
        int(rng.integers(15, 26)),
        variant,
        "*tse2d1_17" if siemens else "FSE",
    )
    ax = _Series(
        "t2_axial",
        3,
        str(rng.choice(_DESCRIPTIONS["t2_axial"])),
        round(rng.uniform(3000.0, 5200.0)),
        round(rng.uniform(90.0, 115.0), 1),
        int(rng.integers(15, 26)),
        variant,
        "*tse2d1_15" if siemens else "FSE",
    )
    return {s.key: s for s in (t1, t2, ax)}


def _mr_dataset(
    header: _Header, series: _Series, number: int, pixels: np.ndarray, spacing: float,
    position: Sequence[float], orientation: Sequence[float], field_strength: float,
    slice_spacing: float | None,
) -> Dataset:  # fmt: skip
    """One MR Image Storage instance (PS3.3 A.4), with file meta, ready to write."""
    seed, index = header.seed, header.index
    acquired = header.moment + timedelta(minutes=4 * series.number, seconds=number)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = phantom_uid(seed, index, "spine-mr", series.key, number)
    ds.StudyDate, ds.StudyTime = _da(header.moment), _tm(header.moment)
    ds.SeriesDate, ds.SeriesTime = _da(acquired), _tm(acquired)
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.AccessionNumber = header.accession
    ds.Modality = "MR"
    ds.Manufacturer = "mibi-node"
    ds.ManufacturerModelName = "Spine phantom"
    ds.InstitutionName = "SYNTHETIC PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.description
    ds.SeriesDescription = series.description
    ds.ProtocolName = series.description
    synthetic_patient(
        ds,
        name=header.name,
        patient_id=header.patient_id,
        sex=header.sex,
        age=header.age,
        moment=header.moment,
    )
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = list(series.variant)
    ds.ScanOptions = ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = series.sequence
    ds.SliceThickness = "4"
    ds.RepetitionTime = _ds(series.tr)
    ds.EchoTime = _ds(series.te)
    ds.NumberOfAverages = "2"
    ds.ImagingFrequency = _ds(42.577 * field_strength)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(field_strength)
    if slice_spacing is not None:
        ds.SpacingBetweenSlices = _ds(slice_spacing)
    ds.EchoTrainLength = series.train
    ds.DeviceSerialNumber = "PHANTOM-0002"
    ds.SoftwareVersions = "mibi-node spine phantom 1"
    ds.ProtocolName = series.description
    ds.ReceiveCoilName = "SPINE"
    ds.TransmitCoilName = "BODY"
    ds.FlipAngle = "150" if series.key != "t1_sagittal" else "90"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = phantom_uid(seed, index, "spine-mr", "series", series.key)
    ds.StudyID = f"{index + 1:04d}"
    ds.SeriesNumber = series.number
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    normal = np.cross(orientation[:3], orientation[3:])
    ds.SliceLocation = _ds(float(np.dot(normal, position)))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [_ds(spacing), _ds(spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    high = float(pixels[::4, ::4].max()) * 0.8
    ds.WindowCenter = _ds(round(high / 2))
    ds.WindowWidth = _ds(round(max(high, 2.0)))
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    attach_file_meta(ds)
    return ds


def _check(series: Sequence[str], sagittal_slices: int, axial_levels: Sequence[str]) -> None:
    if isinstance(series, str) or not series or any(s not in SERIES for s in series):
        raise ValueError(f'Argument "series" should hold keys from {", ".join(SERIES)}.')
    if isinstance(sagittal_slices, bool) or not isinstance(sagittal_slices, int):
        raise TypeError('Argument "sagittal_slices" should be an integer.')
    if not 1 <= sagittal_slices <= 25:
        raise ValueError(f'Argument "sagittal_slices" should be 1-25, not {sagittal_slices}.')
    if any(LEVEL_KIND.get(level) != "disc" for level in axial_levels):
        raise ValueError('Argument "axial_levels" should hold disc levels such as "L4-L5".')


def make_spine_study(
    out_dir: Path,
    seed: int,
    *,
    index: int = 0,
    case: SpineCase | None = None,
    series: tuple[str, ...] = SERIES,
    sagittal_slices: int = 11,
    axial_levels: tuple[str, ...] = ("L3-L4", "L4-L5", "L5-S1"),
    prevalence: dict[str, dict[str, float]] | None = None,
) -> SpinePhantomStudy:
    """Generate one study and write its files to ``out_dir``.

    Parameters
    ----------
    out_dir
        Folder for the files (created), named ``02-t2-sag-006.dcm`` (series number, series,
        slice in the reader's order).
    seed, index
        Fix the case (unless given), every grey value, UID and date.
    case
        What to draw; drawn by :func:`random_case` when ``None``.
    series
        Which of :data:`SERIES` to write (``("t2_sagittal",)`` for fast training data).
    sagittal_slices
        Slices per sagittal series; the middle one (index ``sagittal_slices // 2``) sits on
        the spine's midline, give or take :attr:`SpineCase.midline_offset`.
    axial_levels
        The discs the axial series cuts, one slice each.
    prevalence
        Class prevalence for :func:`random_case` (ignored when ``case`` is given).
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'Argument "seed" should be a non-negative integer, got {seed!r}.')
    _check(series, sagittal_slices, axial_levels)
    if case is None:
        case = random_case(np.random.default_rng([seed, index, 60]), prevalence=prevalence)
    scene = build_scene(case, np.random.default_rng([seed, index, 61]))
    header = _header(seed, index, case, np.random.default_rng([seed, index, 62]))
    options = np.random.default_rng([seed, index, 63])
    specs = _series_specs(options)
    noise_rng = np.random.default_rng([seed, index, 64])
    m, sp = case.matrix, case.pixel_spacing
    gain = options.uniform(900.0, 2600.0)
    noise = options.uniform(0.015, 0.035)
    x_mid, y_centre, z_centre = (
        options.uniform(-5, 5),
        options.uniform(0, 30),
        options.uniform(-20, 20),
    )
    y0, z0 = y_centre - (m - 1) / 2 * sp, z_centre + (m - 1) / 2 * sp
    step = case.slice_thickness + case.slice_gap
    middle_index = sagittal_slices // 2
    fields = (_field(noise_rng, m, 6), _shading(noise_rng, m, m, sp))
    luts = {"t1_sagittal": _lut(scene, 0, options), "t2_sagittal": _lut(scene, 1, options)}
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, list[Path]] = {key: [] for key in series}
    sagittal = [key for key in ("t1_sagittal", "t2_sagittal") if key in series]
    for i in range(sagittal_slices if sagittal else 0):
        x = x_mid - (i - middle_index) * step
        labels = sagittal_labels(scene, x - (x_mid + case.midline_offset))
        for key in sagittal:
            pixels = _signal(labels, luts[key], fields, sp, gain, noise, noise_rng)
            ds = _mr_dataset(header, specs[key], i + 1, pixels, sp, (x, y0, z0), _SAGITTAL,
                             case.field_strength, step)  # fmt: skip
            path = out_dir / f"{specs[key].number:02d}-{_STEMS[key]}-{i + 1:03d}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            paths[key].append(path)
    if "t2_axial" in series:
        paths["t2_axial"] = _write_axial(out_dir, scene, header, specs["t2_axial"], axial_levels,
                                         (x_mid + case.midline_offset, y0, z0), gain, noise,
                                         noise_rng, options)  # fmt: skip
    truth = []
    for level in LEVELS:
        row, col = scene.level_point(level)
        truth.append((level, round(row, 3), round(col, 3), case.classes[level]))
    uids = {key: phantom_uid(seed, index, "spine-mr", "series", key) for key in SERIES}
    middle = SliceRef(
        sop_instance_uid=phantom_uid(seed, index, "spine-mr", "t2_sagittal", middle_index + 1),
        sop_class_uid=MRImageStorage,
        series_instance_uid=uids["t2_sagittal"],
        instance_number=middle_index + 1,
    )
    return SpinePhantomStudy(
        study_instance_uid=header.study_instance_uid,
        paths={key: tuple(value) for key, value in paths.items()},
        series_instance_uids=uids,
        middle=middle,
        middle_index=middle_index,
        pixel_spacing=(sp, sp),
        truth=tuple(truth),
        case=case,
    )


def _write_axial(
    out_dir: Path, scene: Scene, header: _Header, spec: _Series, levels: Sequence[str],
    origin: tuple[float, float, float], gain: float, noise: float, noise_rng: np.random.Generator,
    options: np.random.Generator,
) -> list[Path]:  # fmt: skip
    """One T2 axial slice through each disc of ``levels``, head to foot."""
    x_spine, y0, z0 = origin
    m = int(options.choice([256, 288, 320]))
    sp = round(float(options.uniform(180.0, 220.0)) / m, 4)
    sag = scene.case.pixel_spacing
    lut = _lut(scene, 1, options)
    grid = (np.arange(m, dtype=np.float32) - (m - 1) / 2) * sp
    fields = (_field(noise_rng, m, 6), np.ones((m, m), np.float32))
    paths = []
    ordered = sorted(levels, key=LEVELS.index)
    for number, level in enumerate(ordered, start=1):
        row, col = scene.level_point(level)
        y_disc, z_disc = y0 + col * sag, z0 - row * sag
        shift = options.uniform(15.0, 25.0)  # the field of view centres behind the disc
        x, y = np.meshgrid(grid, grid + shift)
        labels = axial_labels(scene, level, x, y)
        pixels = _signal(labels, lut, fields, sp, gain, noise, noise_rng)
        position = (x_spine + float(grid[0]), y_disc + shift + float(grid[0]), z_disc)
        ds = _mr_dataset(header, spec, number, pixels, sp, position, _AXIAL,
                         scene.case.field_strength, None)  # fmt: skip
        path = out_dir / f"{spec.number:02d}-{_STEMS[spec.key]}-{number:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_spine_dataset(out_dir: Path, count: int, seed: int, **kwargs: object) -> Path:
    """Write ``count`` studies to ``out_dir/study-NNNN/`` and their truth to one file.

    Parameters
    ----------
    out_dir
        Created if missing.
    count, seed
        Study ``i`` is ``make_spine_study(..., seed, index=i)``.
    **kwargs
        Passed to :func:`make_spine_study` (``series``, ``sagittal_slices``, ...).

    Returns
    -------
    pathlib.Path
        ``out_dir/annotations.json`` in the challenge's format
        (:mod:`~mibi_node.analyses.spine.annotations`).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f'Argument "count" should be a positive integer, got {count!r}.')
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    studies = []
    for index in range(count):
        study = make_spine_study(out_dir / f"study-{index + 1:04d}", seed, index=index, **kwargs)  # type: ignore[arg-type]
        studies.append(study.annotation())
    path = out_dir / "annotations.json"
    write_annotations(path, studies)
    logger.info("wrote %d spine phantom studies to %s", count, out_dir)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mibi_node.analyses.spine.phantom OUT --count N --seed S``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the studies into")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--series", default=",".join(SERIES), help="comma-separated keys")
    parser.add_argument("--sagittal-slices", type=int, default=11)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = write_spine_dataset(
        args.out, args.count, args.seed, series=tuple(args.series.split(",")),
        sagittal_slices=args.sagittal_slices,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    print(f"{args.count} studies in {seconds:.1f} s; truth in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
