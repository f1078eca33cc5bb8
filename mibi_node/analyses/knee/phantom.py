"""Synthetic sagittal 3-D knee MR (DESS-like) with cartilage truth, in memory and as DICOM.

:func:`make_knee_case` draws one knee (:mod:`~mibi_node.analyses.knee.anatomy`) on a
sagittal voxel grid and gives its grey values and the truth label volume of the four
cartilage plates (:mod:`~mibi_node.analyses.knee.labels`); a training set of a hundred
cases is generated in memory in under a minute. The contrast is that of a water-excited
double-echo steady state sequence: bright fluid, intermediate cartilage that is darker
near the bone and shows a faint dark line at its articular surface, dark menisci,
ligaments and cortical bone, grey marrow, fat and muscle; then blur (point spread and
partial volume), coil shading and Rician noise, quantised to 12-bit integers so that the
DICOM files hold the image exactly. :func:`write_knee_study` writes a case as an MR study
(one MR Image Storage instance per sagittal slice, optionally a 2-D coronal distractor
series) and :func:`write_knee_dataset` writes a training set on disk; see
``docs/knee-phantom.md`` for the format.

Run ``python -m mibi_node.analyses.knee.phantom OUT --count N --seed S`` to write a data set.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import MRImageStorage
from scipy import ndimage

from mibi_node.analyses.knee.anatomy import Defect, KneeAnatomy, Tissue, random_anatomy, tissue_map
from mibi_node.analyses.knee.labels import STRUCTURES
from mibi_node.phantom.dicom import (
    _da,
    _ds,
    _tm,
    attach_file_meta,
    phantom_uid,
    synthetic_patient,
)

__all__ = [
    "DEFAULT_SHAPE",
    "DEFAULT_SPACING",
    "KneeCase",
    "knee_coordinates",
    "make_knee_case",
    "write_knee_dataset",
    "write_knee_study",
]

logger = logging.getLogger(__name__)

#: Default grid: sagittal slices (medial to lateral or back), rows (head to foot), columns
#: (anterior to posterior).
DEFAULT_SHAPE: tuple[int, int, int] = (48, 128, 128)
#: Default ``(slice, row, column)`` spacing in mm.
DEFAULT_SPACING: tuple[float, float, float] = (1.5, 0.8, 0.8)

#: Where the field of view is centred in the knee frame (AP, SI), mm.
_FOV_CENTRE = (-3.0, 8.0)

#: Tissue -> DESS grey value (fluid 1).
_CONTRAST = {
    Tissue.AIR: 0.0, Tissue.FAT: 0.17, Tissue.MUSCLE: 0.27, Tissue.MARROW: 0.15,
    Tissue.CORTEX: 0.03, Tissue.FLUID: 1.0, Tissue.MENISCUS: 0.05, Tissue.LIGAMENT: 0.07,
    Tissue.FEMORAL: 0.52, Tissue.MEDIAL_TIBIAL: 0.5, Tissue.LATERAL_TIBIAL: 0.5,
    Tissue.PATELLAR: 0.55,
}  # fmt: skip
#: Tissue -> proton-density grey value (the coronal distractor series).
_PD = {
    Tissue.FAT: 0.9, Tissue.MUSCLE: 0.35, Tissue.MARROW: 0.8, Tissue.CORTEX: 0.04,
    Tissue.FLUID: 0.75, Tissue.MENISCUS: 0.05, Tissue.LIGAMENT: 0.08, Tissue.FEMORAL: 0.5,
    Tissue.MEDIAL_TIBIAL: 0.5, Tissue.LATERAL_TIBIAL: 0.5, Tissue.PATELLAR: 0.5,
}  # fmt: skip
#: Image Orientation (Patient): rows toward the back, columns toward the feet (sagittal);
#: rows toward the patient's left, columns toward the feet (coronal).
_SAGITTAL = [0.0, 1.0, 0.0, 0.0, 0.0, -1.0]
_CORONAL = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]


@dataclass(frozen=True)
class KneeCase:
    """One synthetic knee MR volume and its truth.

    Attributes
    ----------
    image
        ``(slice, row, column)`` float32 grey values (whole numbers 0-4095, the stored
        pixel values), in the index order :func:`~mibi_node.imaging.volume_reader.read_volume`
        gives the written series.
    labels
        ``uint8``, same shape: 0 background, else the plate's value in
        :data:`~mibi_node.analyses.knee.labels.LABEL_OF` (the majority label of each voxel).
    spacing
        ``(slice, row, column)`` mm.
    side
        ``"L"`` or ``"R"``; slice index grows toward the patient's right, so from medial to
        lateral in a right knee and from lateral to medial in a left one.
    thickness
        Plate key -> its nominal thickness (mm) before the smooth +-10 % variation, edge
        taper and defects.
    defects
        The focal lesions drawn.
    seed
        What drew it.
    anatomy
        Every drawn parameter.
    """

    image: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    side: str
    thickness: dict[str, float]
    defects: tuple[Defect, ...]
    seed: int
    anatomy: KneeAnatomy

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        k, j, i = self.image.shape
        return int(k), int(j), int(i)


def _check_grid(shape: Sequence[int], spacing: Sequence[float]) -> None:
    if len(shape) != 3 or any(isinstance(v, bool) or not isinstance(v, int) for v in shape):
        raise TypeError('Argument "shape" should be three integers (slices, rows, columns).')
    if min(shape) < 3 or max(shape) > 1024:
        raise ValueError(f'Argument "shape" should hold sizes 3-1024, not {tuple(shape)}.')
    if len(spacing) != 3 or not all(0.1 <= float(v) <= 5.0 for v in spacing):
        raise ValueError(f'Argument "spacing" should be three values of 0.1-5 mm, not {spacing}.')


def _rotation(degrees: Sequence[float]) -> np.ndarray:
    ax, ay, az = np.radians(degrees)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def knee_coordinates(
    anatomy: KneeAnatomy, shape: Sequence[int], spacing: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knee-frame coordinates (X lateral, Y posterior, Z superior; mm) of each voxel centre.

    The grid's scanner axes, from the centre of the field of view: slice index toward the
    patient's right, column index toward the back, row index toward the feet.
    """
    k, j, i = (
        (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(d)
        for n, d in zip(shape, spacing, strict=True)
    )
    return _to_knee(anatomy, k[:, None, None], i[None, None, :], -j[None, :, None])


def _to_knee(
    anatomy: KneeAnatomy, sx: np.ndarray, sy: np.ndarray, sz: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Knee-frame coordinates of scanner offsets from the centre of the field of view (mm).

    ``sx`` points to the patient's right, ``sy`` to the back, ``sz`` to the head; the
    arrays broadcast together.
    """
    sign = np.float32(1.0 if anatomy.side == "R" else -1.0)
    shift = anatomy.shift_mm
    xw = sign * sx - np.float32(shift[0])
    yw = sy + np.float32(_FOV_CENTRE[0] - shift[1])
    zw = sz + np.float32(_FOV_CENTRE[1] - shift[2])
    r = _rotation(anatomy.rotation_deg).T.astype(np.float32)
    x = r[0, 0] * xw + r[0, 1] * yw + r[0, 2] * zw
    y = r[1, 0] * xw + r[1, 1] * yw + r[1, 2] * zw
    z = r[2, 0] * xw + r[2, 1] * yw + r[2, 2] * zw
    return x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)


def make_knee_case(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    side: str | None = None,
    defect_rate: float = 0.6,
    noise: tuple[float, float] = (0.02, 0.045),
) -> KneeCase:
    """Draw one knee and render it.

    Parameters
    ----------
    seed
        Fixes everything (the same seed gives the same arrays, bit for bit).
    shape, spacing
        The sagittal grid: ``(slices, rows, columns)`` and its mm spacing. The default
        (:data:`DEFAULT_SHAPE`, :data:`DEFAULT_SPACING`) covers 72 x 102 x 102 mm.
    side
        ``"L"``, ``"R"`` or ``None`` (drawn).
    defect_rate
        Mean number of focal cartilage lesions (thinning or full-thickness) per case.
    noise
        Range of the Rician noise's sigma, relative to the fluid signal.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'Argument "seed" should be a non-negative integer, got {seed!r}.')
    _check_grid(shape, spacing)
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    rng = np.random.default_rng([seed, 170])
    anatomy = random_anatomy(rng, side=side, defect_rate=defect_rate)
    x, y, z = knee_coordinates(anatomy, shape, spacing)
    tissue, depth = tissue_map(anatomy, x, y, z)
    labels = np.where(tissue >= Tissue.FEMORAL, tissue - (Tissue.FEMORAL - 1), 0).astype(np.uint8)
    image = _render(tissue, depth, x, y, z, spacing, np.random.default_rng([seed, 171]), noise)
    return KneeCase(
        image=image,
        labels=labels,
        spacing=spacing,
        side=anatomy.side,
        thickness=dict(anatomy.thickness),
        defects=anatomy.defects,
        seed=seed,
        anatomy=anatomy,
    )


def _render(
    tissue: np.ndarray, depth: np.ndarray, x: np.ndarray, y: np.ndarray, z: np.ndarray,
    spacing: tuple[float, float, float], rng: np.random.Generator, noise: tuple[float, float],
) -> np.ndarray:  # fmt: skip
    """Grey values: contrast, cartilage zones, texture, blur, shading, Rician noise, 12 bits."""
    lut = np.zeros(Tissue.COUNT, dtype=np.float32)
    for key, value in _CONTRAST.items():
        lut[key] = value * rng.uniform(0.9, 1.1)
    lut[Tissue.FLUID] = _CONTRAST[Tissue.FLUID]
    image = lut[tissue]
    cartilage = tissue >= Tissue.FEMORAL
    d = depth[cartilage]
    dip = rng.uniform(0.15, 0.35)
    image[cartilage] *= (1.12 - 0.3 * np.clip(d / 2.5, 0, 1)) * (
        1 - dip * np.exp(-((d / 0.4) ** 2))
    )
    marrow = tissue == Tissue.MARROW
    waves = np.zeros(int(marrow.sum()), dtype=np.float32)
    for _ in range(3):
        direction = rng.normal(size=3)
        direction *= rng.uniform(0.6, 1.4) / np.linalg.norm(direction)
        phase = rng.uniform(0, 2 * np.pi)
        waves += np.sin(direction[0] * x[marrow] + direction[1] * y[marrow]
                        + direction[2] * z[marrow] + phase)  # fmt: skip
    image[marrow] *= 1.0 + 0.08 * waves
    sigma = tuple(0.45 * min(spacing) / d for d in spacing)
    image = ndimage.gaussian_filter(image, sigma=(max(sigma[0], 0.3), sigma[1], sigma[2]))
    shape = image.shape
    axes = [np.linspace(-1, 1, n, dtype=np.float32) for n in shape]
    tilt = rng.uniform(-0.15, 0.15, 3)
    curve = rng.uniform(0.05, 0.25, 3)
    for axis, values in enumerate(axes):
        factor = 1.0 + tilt[axis] * values - curve[axis] * values**2
        image *= factor.reshape([-1 if a == axis else 1 for a in range(3)])
    sd = np.float32(rng.uniform(*noise))
    real = image + sd * rng.standard_normal(shape, dtype=np.float32)
    imag = sd * rng.standard_normal(shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    gain = np.float32(rng.uniform(1500.0, 3000.0))
    return np.clip(np.round(magnitude * gain), 0, 4095).astype(np.float32)


@dataclass(frozen=True)
class _Header:
    seed: int
    index: int
    study_instance_uid: str
    frame_of_reference_uid: str
    moment: datetime
    name: str
    patient_id: str
    sex: str
    age: int
    accession: str
    field_strength: float
    centre: tuple[float, float, float]


def _header(case: KneeCase, index: int, rng: np.random.Generator) -> _Header:
    seed = case.seed
    moment = datetime(2024, 5, 6, 7, 30) + timedelta(
        days=int(rng.integers(0, 700)), minutes=5 * int(rng.integers(0, 130))
    )
    number = f"{index + 1:04d}"
    side = -1.0 if case.side == "R" else 1.0  # LPS x: the patient's left is +x
    centre = (side * float(rng.uniform(80.0, 100.0)), float(rng.uniform(-10.0, 10.0)),
              float(rng.uniform(-520.0, -440.0)))  # fmt: skip
    return _Header(
        seed=seed,
        index=index,
        study_instance_uid=phantom_uid(seed, index, "knee-mr", "study"),
        frame_of_reference_uid=phantom_uid(seed, index, "knee-mr", "frame-of-reference"),
        moment=moment,
        name=f"SYNTHETIC^KNEE {number}",
        patient_id=f"SYNTH-K{seed}-{number}",
        sex=str(rng.choice(["F", "M"])),
        age=int(rng.integers(35, 80)),
        accession=f"KN{seed % 1_000_000:06d}{number}",
        field_strength=float(rng.choice([1.5, 3.0])),
        centre=centre,
    )


@dataclass(frozen=True)
class _Series:
    key: str
    number: int
    description: str
    acquisition: str  # MRAcquisitionType
    scanning: str
    variant: tuple[str, ...]
    options: str
    sequence: str
    tr: float
    te: float
    flip: float
    thickness: float
    spacing: float


def _mr_dataset(
    header: _Header, series: _Series, number: int, pixels: np.ndarray,
    pixel_spacing: tuple[float, float], position: Sequence[float], orientation: Sequence[float],
    laterality: str,
) -> Dataset:  # fmt: skip
    """One MR Image Storage instance (PS3.3 A.4), with file meta, ready to write."""
    seed, index = header.seed, header.index
    acquired = header.moment + timedelta(minutes=6 * series.number)
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "OTHER"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = phantom_uid(seed, index, "knee-mr", series.key, number)
    ds.StudyDate, ds.StudyTime = _da(header.moment), _tm(header.moment)
    ds.SeriesDate, ds.SeriesTime = _da(acquired), _tm(acquired)
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.AccessionNumber = header.accession
    ds.Modality = "MR"
    ds.Manufacturer = "mibi-node"
    ds.ManufacturerModelName = "Knee phantom"
    ds.InstitutionName = "SYNTHETIC PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"MR KNEE {'LEFT' if laterality == 'L' else 'RIGHT'}"
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
    ds.BodyPartExamined = "KNEE"
    ds.ScanningSequence = series.scanning
    ds.SequenceVariant = list(series.variant)
    ds.ScanOptions = series.options
    ds.MRAcquisitionType = series.acquisition
    ds.SequenceName = series.sequence
    ds.SliceThickness = _ds(series.thickness)
    ds.RepetitionTime = _ds(series.tr)
    ds.EchoTime = _ds(series.te)
    ds.NumberOfAverages = "1"
    ds.ImagingFrequency = _ds(42.577 * header.field_strength)
    ds.ImagedNucleus = "1H"
    ds.MagneticFieldStrength = _ds(header.field_strength)
    ds.SpacingBetweenSlices = _ds(series.spacing)
    ds.EchoTrainLength = 1 if series.acquisition == "3D" else 8
    ds.DeviceSerialNumber = "PHANTOM-0003"
    ds.SoftwareVersions = "mibi-node knee phantom 1"
    ds.ReceiveCoilName = "KNEE"
    ds.TransmitCoilName = "KNEE"
    ds.FlipAngle = _ds(series.flip)
    ds.PatientPosition = "FFS"
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = phantom_uid(seed, index, "knee-mr", "series", series.key)
    ds.StudyID = f"{index + 1:04d}"
    ds.SeriesNumber = series.number
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    normal = np.cross(orientation[:3], orientation[3:])
    ds.SliceLocation = _ds(float(np.dot(normal, position)))
    ds.ImageLaterality = laterality
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    high = float(pixels[::4, ::4].max()) * 0.7
    ds.WindowCenter = _ds(round(high / 2))
    ds.WindowWidth = _ds(round(max(high, 2.0)))
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    attach_file_meta(ds)
    return ds


def write_knee_study(
    case: KneeCase,
    folder: Path,
    *,
    index: int = 0,
    series_description: str = "SAG 3D DESS",
    extra_series: bool = True,
    patient_name: str | None = None,
    patient_id: str | None = None,
    study_instance_uid: str | None = None,
) -> list[Path]:
    """Write a case as an MR study: the sagittal 3-D series and, optionally, a distractor.

    Parameters
    ----------
    case
        What to write; its seed and ``index`` fix every UID, date and patient attribute.
    folder
        Created if missing. Files are named ``01-sag-3d-001.dcm`` (series number, series,
        slice index in the reader's order) and ``02-cor-pd-001.dcm``.
    index
        The study's number in a data set (patient "SYNTHETIC^KNEE 0001" for index 0).
    series_description
        Of the sagittal series.
    extra_series
        Also write five 2-D coronal proton-density slices (series 2), which the knee reader
        must refuse.
    patient_name, patient_id, study_instance_uid
        Replace the drawn ones (e.g. to send two studies of one patient).

    Returns
    -------
    list of pathlib.Path
        The sagittal series' files in slice order, then the distractor's.
    """
    if not isinstance(case, KneeCase):
        raise TypeError('Argument "case" should be a KneeCase.')
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f'Argument "index" should be a non-negative integer, got {index!r}.')
    if not isinstance(series_description, str) or not series_description.strip():
        raise ValueError('Argument "series_description" should be a non-empty string.')
    rng = np.random.default_rng([case.seed, index, 172])
    header = _header(case, index, rng)
    overrides = {"patient_name": ("name", patient_name), "patient_id": ("patient_id", patient_id),
                 "study_instance_uid": ("study_instance_uid", study_instance_uid)}  # fmt: skip
    for argument, (field, value) in overrides.items():
        if value is None:
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f'Argument "{argument}" should be a non-empty string.')
        header = replace(header, **{field: value})  # type: ignore[arg-type]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sk, sj, si = case.spacing
    n_k, n_j, n_i = case.shape
    te = round(float(rng.uniform(4.5, 6.0)), 2)
    sag = _Series("sag", 1, series_description, "3D", "GR", ("SS", "SP"), "FS", "*dess3d1r_130",
                  round(float(rng.uniform(14.0, 17.0)), 2), te, 25.0, sk, sk)  # fmt: skip
    cx, cy, cz = header.centre
    paths = []
    for k in range(n_k):
        offset = (k - (n_k - 1) / 2) * sk
        position = (cx - offset, cy - (n_i - 1) / 2 * si, cz + (n_j - 1) / 2 * sj)
        pixels = case.image[k].astype(np.uint16)
        ds = _mr_dataset(header, sag, k + 1, pixels, (sj, si), position, _SAGITTAL, case.side)
        path = folder / f"01-sag-3d-{k + 1:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    if extra_series:
        paths.extend(_write_coronal(case, folder, header, rng))
    return paths


def _write_coronal(
    case: KneeCase, folder: Path, header: _Header, rng: np.random.Generator
) -> list[Path]:
    """Five 2-D coronal proton-density slices through the condyles (the distractor)."""
    matrix, sp, step = 128, 0.9, 5.0
    series = _Series("cor", 2, "COR PD TSE", "2D", "SE", ("SK", "SP"), "", "*tse2d1_7",
                     round(float(rng.uniform(2800.0, 3600.0))), 30.0, 150.0, 3.0, step)  # fmt: skip
    grid = (np.arange(matrix, dtype=np.float32) - (matrix - 1) / 2) * np.float32(sp)
    depths = (np.arange(5, dtype=np.float32) - 2.0) * np.float32(step) + np.float32(6.0)
    # scanner offsets: columns toward the patient's left (-sx), rows toward the feet
    x, y, z = _to_knee(case.anatomy, -grid[None, None, :], depths[:, None, None],
                       -grid[None, :, None])  # fmt: skip
    tissue, _ = tissue_map(case.anatomy, x, y, z)
    lut = np.array([_PD.get(t, 0.0) for t in range(Tissue.COUNT)], dtype=np.float32)
    image = ndimage.gaussian_filter(lut[tissue], sigma=(0.0, 0.6, 0.6))
    sd = np.float32(0.03)
    noisy = np.hypot(image + sd * rng.standard_normal(image.shape, dtype=np.float32),
                     sd * rng.standard_normal(image.shape, dtype=np.float32))  # fmt: skip
    pixels = np.clip(np.round(noisy * 2000.0), 0, 4095).astype(np.uint16)
    cx, cy, cz = header.centre
    paths = []
    for n in range(pixels.shape[0]):
        position = (cx + float(grid[0]), cy + float(depths[n]), cz - float(grid[0]))
        ds = _mr_dataset(header, series, n + 1, pixels[n], (sp, sp), position, _CORONAL,
                         case.side)  # fmt: skip
        path = folder / f"02-cor-pd-{n + 1:03d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_knee_dataset(out: Path, count: int, seed: int, **kwargs: object) -> Path:
    """Write ``count`` cases as a training set (the format of ``docs/knee-phantom.md``).

    Case ``n`` (from 1) is ``make_knee_case(seed * 100_000 + n - 1, **kwargs)``, written to
    ``out/case-NNNN/dicom/`` (the sagittal series only), with its truth in
    ``out/case-NNNN/labels.npz`` (``labels``: uint8 in the sagittal series' volume index
    order, ``spacing``: mm) and one row in ``out/index.csv``.

    Returns
    -------
    pathlib.Path
        ``out/index.csv``.
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f'Argument "count" should be a positive integer, got {count!r}.')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'Argument "seed" should be a non-negative integer, got {seed!r}.')
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(1, count + 1):
        case = make_knee_case(seed * 100_000 + n - 1, **kwargs)  # type: ignore[arg-type]
        folder = out / f"case-{n:04d}"
        write_knee_study(case, folder / "dicom", index=n - 1, extra_series=False)
        np.savez_compressed(folder / "labels.npz", labels=case.labels,
                            spacing=np.asarray(case.spacing, dtype=np.float64))  # fmt: skip
        rows.append([f"case-{n:04d}", case.side, case.seed]
                    + [f"{case.thickness[name]:.3f}" for name in STRUCTURES]
                    + [len(case.defects)])  # fmt: skip
    path = out / "index.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "side", "seed", *(f"{name}_mm" for name in STRUCTURES),
                         "defects"])  # fmt: skip
        writer.writerows(rows)
    logger.info("wrote %d knee phantom cases to %s", count, out)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mibi_node.analyses.knee.phantom OUT --count N --seed S``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the cases into")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = write_knee_dataset(args.out, args.count, args.seed)
    print(f"{args.count} cases in {time.perf_counter() - started:.1f} s; index in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
