"""Synthetic chest CT with ground-glass opacity and bronchiectasis truth, in memory and as DICOM.

:func:`make_lung_case` draws one chest (:mod:`~mibi_node.analyses.lung.anatomy`) on an
axial voxel grid and gives its HU image, the class map of its lesions
(:mod:`~mibi_node.analyses.lung.labels`), their instance map and one truth record per
lesion. The HU are those of a non-contrast chest CT: air -1000, lung about -850 (denser
toward the back, where a supine patient's lung is), fat -100, soft tissue and blood 40,
bone 700 round 250 marrow, airway walls 20 round air, ground glass -680 to -420; then a light
blur (partial volume) and CT-like noise (sigma 20-40 HU, correlated in plane), rounded to
whole HU so that the DICOM files hold the image exactly. :func:`write_lung_study` writes a
case as a CT study (CT Image Storage, one instance per axial slice) and
:func:`write_lung_dataset` writes a training set; see ``docs/lung-phantom.md``.

Run ``python -m mibi_node.analyses.lung.phantom OUT --count N --seed S`` to write a data set.
"""

from __future__ import annotations

import argparse
import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage
from scipy import ndimage

from mibi_node.analyses.lung.anatomy import ChestAnatomy, Tissue, random_anatomy, tissue_map
from mibi_node.analyses.lung.labels import CLASSES, LABEL_OF
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
    "Lesion",
    "LungCase",
    "make_lung_case",
    "write_lung_dataset",
    "write_lung_study",
]

logger = logging.getLogger(__name__)

#: Default grid: axial slices (foot to head), rows (front to back), columns (right to left).
DEFAULT_SHAPE: tuple[int, int, int] = (64, 128, 128)
#: Default ``(slice, row, column)`` spacing in mm: 160 x 192 x 192 mm.
DEFAULT_SPACING: tuple[float, float, float] = (2.5, 1.5, 1.5)
#: Stored value = HU - this (Rescale Intercept -1024, slope 1).
_INTERCEPT = -1024

#: Tissue -> HU before blur and noise.
_HU = {
    Tissue.AIR: -1000.0, Tissue.FAT: -100.0, Tissue.SOFT: 40.0, Tissue.BONE: 700.0,
    Tissue.MARROW: 250.0, Tissue.CSF: 10.0, Tissue.LUNG: -850.0, Tissue.VESSEL: 40.0,
    Tissue.AIRWAY: -1000.0, Tissue.WALL: 20.0,
}  # fmt: skip


@dataclass(frozen=True)
class Lesion:
    """One lesion's truth.

    Attributes
    ----------
    id
        Its value in :attr:`LungCase.instances` (1..n).
    label
        Its class' label value (:data:`~mibi_node.analyses.lung.labels.LABEL_OF`).
    name
        Its class key.
    centre
        Centroid of its mask, ``(slice, row, column)`` mm from the centre of voxel 0.
    diameter
        A ground-glass opacity's equivalent-sphere diameter (of its mask); a
        bronchiectasis' outer diameter (lumen and walls), mm.
    voxels
        Voxels in its mask.
    side
        ``"R"`` or ``"L"``: the patient's side.
    ratio
        A bronchiectasis' broncho-arterial ratio (lumen over artery diameter), else ``None``.
    """

    id: int
    label: int
    name: str
    centre: tuple[float, float, float]
    diameter: float
    voxels: int
    side: str
    ratio: float | None = None


@dataclass(frozen=True)
class LungCase:
    """One synthetic chest CT volume and its truth.

    Attributes
    ----------
    image
        ``(slice, row, column)`` float32 HU, whole numbers -1024 to 3071, in the index
        order :func:`~mibi_node.imaging.volume_reader.read_volume` gives the written series
        (slice index toward the head, rows toward the back, columns toward the patient's left).
    labels
        ``uint8``, same shape: 0 background, 1 ground-glass opacity, 2 bronchiectasis.
    instances
        ``uint16``, same shape: 0 none, else the lesion's id.
    lesions
        One record per lesion, by id.
    tissue
        ``uint8`` :class:`~mibi_node.analyses.lung.anatomy.Tissue` map (what was drawn
        before blur and noise).
    spacing
        ``(slice, row, column)`` mm.
    seed
        What drew it.
    anatomy
        Every drawn parameter.
    """

    image: np.ndarray
    labels: np.ndarray
    instances: np.ndarray
    lesions: tuple[Lesion, ...]
    tissue: np.ndarray
    spacing: tuple[float, float, float]
    seed: int
    anatomy: ChestAnatomy

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
    if len(spacing) != 3 or not all(0.2 <= float(v) <= 10.0 for v in spacing):
        raise ValueError(f'Argument "spacing" should be three values of 0.2-10 mm, not {spacing}.')
    extent = [n * float(d) for n, d in zip(shape, spacing, strict=True)]
    if extent[0] < 60.0 or min(extent[1:]) < 120.0:
        raise ValueError(
            f'Arguments "shape" and "spacing" cover {extent[0]:.0f} x {extent[1]:.0f} x '
            f"{extent[2]:.0f} mm; a chest needs at least 60 x 120 x 120 mm"
        )


def make_lung_case(
    seed: int,
    *,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    spacing: tuple[float, float, float] = DEFAULT_SPACING,
    lesions: int | Sequence[str] | None = None,
    noise: tuple[float, float] = (20.0, 40.0),
) -> LungCase:
    """Draw one chest and render it as CT.

    Parameters
    ----------
    seed
        Fixes everything (the same seed gives the same arrays, bit for bit).
    shape, spacing
        The axial grid: ``(slices, rows, columns)`` and its mm spacing; the chest is scaled
        to the field of view (a body of at most 350 mm across).
    lesions
        ``None`` (drawn: none in about one case in seven, else 1-4 of random classes), a
        number of lesions (0-6) of random classes, or their class keys.
    noise
        Range of the noise's standard deviation, HU.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'Argument "seed" should be a non-negative integer, got {seed!r}.')
    _check_grid(shape, spacing)
    if not 0.0 <= noise[0] <= noise[1] <= 200.0:
        raise ValueError(f'Argument "noise" should be a range within 0-200 HU, not {noise}.')
    spacing = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    axes = [(np.arange(n) - (n - 1) / 2) * d for n, d in zip(shape, spacing, strict=True)]
    extent = (shape[0] * spacing[0], shape[1] * spacing[1], shape[2] * spacing[2])
    anatomy = random_anatomy(np.random.default_rng([seed, 40]), extent, lesions)
    tissue, ggo, instances = tissue_map(anatomy, axes)
    classes = np.array([0, *(LABEL_OF[name] for name in anatomy.lesion_classes)], np.uint8)
    labels = classes[instances]
    image = _render(tissue, ggo, axes[1], spacing, np.random.default_rng([seed, 41]), noise)
    records = _lesions(anatomy, instances, axes[2], spacing)
    return LungCase(image=image, labels=labels, instances=instances, lesions=records,
                    tissue=tissue, spacing=spacing, seed=seed, anatomy=anatomy)  # fmt: skip


def _render(tissue: np.ndarray, ggo: np.ndarray, ys: np.ndarray,
            spacing: tuple[float, float, float], rng: np.random.Generator,
            noise: tuple[float, float]) -> np.ndarray:  # fmt: skip
    """HU: tissue values, gravity gradient and ground glass, blur, correlated noise, rounding."""
    lut = np.array([_HU[t] for t in range(Tissue.COUNT)], dtype=np.float32)
    image = lut[tissue]
    lung = tissue == Tissue.LUNG
    gradient = (np.float32(rng.uniform(15.0, 35.0)) * ys / np.abs(ys).max()).astype(np.float32)
    image += np.where(lung, gradient[None, :, None], np.float32(0.0)) + ggo
    sigma = tuple(0.5 * min(spacing) / d for d in spacing)
    image = ndimage.gaussian_filter(image, sigma=(max(sigma[0], 0.3), sigma[1], sigma[2]))
    white = rng.standard_normal(image.shape, dtype=np.float32)
    grain = ndimage.gaussian_filter(white, sigma=(0.0, 0.7, 0.7))
    grain *= np.float32(rng.uniform(*noise) / max(float(grain[::2, ::4, ::4].std()), 1e-6))
    return np.clip(np.round(image + grain), _INTERCEPT, 3071).astype(np.float32)


def _lesions(anatomy: ChestAnatomy, instances: np.ndarray, xs: np.ndarray,
             spacing: tuple[float, float, float]) -> tuple[Lesion, ...]:  # fmt: skip
    count = len(anatomy.lesion_classes)
    if count == 0:
        return ()
    ids = np.arange(1, count + 1)
    voxels = ndimage.sum_labels(np.ones_like(instances), instances, ids)
    centres = ndimage.center_of_mass(np.ones_like(instances), instances, ids)
    tubes = {t.lesion: t for t in anatomy.airways if t.lesion}
    out = []
    for n, name in enumerate(anatomy.lesion_classes, start=1):
        size = int(voxels[n - 1])
        if size == 0:
            raise ValueError(f"lesion {n} ({name}) covers no voxel on this grid")
        centre = tuple(float(c) * d for c, d in zip(centres[n - 1], spacing, strict=True))
        x = float(np.interp(centres[n - 1][2], np.arange(len(xs)), xs))
        if name == "bronchiectasis":
            tube = tubes[n]
            diameter = 2 * (tube.radius[0] + tube.wall)
            ratio: float | None = anatomy.ratios[n]
        else:
            diameter = float((6 * size * np.prod(spacing) / np.pi) ** (1 / 3))
            ratio = None
        out.append(Lesion(n, LABEL_OF[name], name, centre, round(diameter, 2), size,  # type: ignore[arg-type]
                          "L" if x > 0 else "R", ratio))  # fmt: skip
    return tuple(out)


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
    table: float


def _header(case: LungCase, index: int, rng: np.random.Generator) -> _Header:
    seed = case.seed
    moment = datetime(2024, 3, 4, 8, 0) + timedelta(
        days=int(rng.integers(0, 700)), minutes=5 * int(rng.integers(0, 120))
    )
    number = f"{index + 1:04d}"
    return _Header(
        seed=seed,
        index=index,
        study_instance_uid=phantom_uid(seed, index, "chest-ct", "study"),
        frame_of_reference_uid=phantom_uid(seed, index, "chest-ct", "frame-of-reference"),
        moment=moment,
        name=f"SYNTHETIC^CHEST {number}",
        patient_id=f"SYNTH-C{seed}-{number}",
        sex=str(rng.choice(["F", "M"])),
        age=int(rng.integers(30, 85)),
        accession=f"CT{seed % 1_000_000:06d}{number}",
        table=float(rng.uniform(-260.0, -180.0)),
    )


def _ct_dataset(header: _Header, case: LungCase, k: int, number: int,
                series_description: str, position: Sequence[float]) -> Dataset:  # fmt: skip
    """One CT Image Storage instance (PS3.3 A.3), with file meta, ready to write."""
    seed, index = header.seed, header.index
    acquired = header.moment + timedelta(minutes=3)
    sk, sj, si = case.spacing
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = phantom_uid(seed, index, "chest-ct", "image", number)
    ds.StudyDate, ds.StudyTime = _da(header.moment), _tm(header.moment)
    ds.SeriesDate, ds.SeriesTime = _da(acquired), _tm(acquired)
    ds.AcquisitionDate, ds.AcquisitionTime = _da(acquired), _tm(acquired)
    ds.ContentDate, ds.ContentTime = _da(acquired), _tm(acquired)
    ds.AccessionNumber = header.accession
    ds.Modality = "CT"
    ds.Manufacturer = "mibi-node"
    ds.ManufacturerModelName = "Chest phantom"
    ds.InstitutionName = "SYNTHETIC PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "CT CHEST"
    ds.SeriesDescription = series_description
    ds.ProtocolName = "CHEST"
    synthetic_patient(
        ds,
        name=header.name,
        patient_id=header.patient_id,
        sex=header.sex,
        age=header.age,
        moment=header.moment,
    )
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = _ds(sk)
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.DeviceSerialNumber = "PHANTOM-0004"
    ds.SoftwareVersions = "mibi-node chest phantom 1"
    ds.ReconstructionDiameter = _ds(case.shape[2] * si)
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = _ds(-header.table)
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = 200
    ds.Exposure = 100
    ds.FilterType = "BODY"
    ds.GeneratorPower = 24
    ds.FocalSpots = "1.2"
    ds.ConvolutionKernel = "LUNG"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = phantom_uid(seed, index, "chest-ct", "series")
    ds.StudyID = f"{index + 1:04d}"
    ds.SeriesNumber = 2
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.FrameOfReferenceUID = header.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(position[2]))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = case.shape[1], case.shape[2]
    ds.PixelSpacing = [_ds(sj), _ds(si)]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = str(_INTERCEPT)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    pixels = (case.image[k] - _INTERCEPT).astype("<u2")
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    attach_file_meta(ds)
    return ds


def write_lung_study(
    case: LungCase,
    folder: Path,
    *,
    index: int = 0,
    series_description: str = "CHEST CT",
) -> list[Path]:
    """Write a case as a CT study: one CT Image Storage instance per axial slice.

    Slices are numbered from the head down, as scanners do (Instance Number 1 is the top
    slice, ``case.image[-1]``); Image Position (Patient) z grows toward the head, so
    :func:`~mibi_node.imaging.volume_reader.read_volume` gives back ``case.image``.

    Parameters
    ----------
    case
        What to write; its seed and ``index`` fix every UID, date and patient attribute.
    folder
        Created if missing. Files are named ``ct-0001.dcm`` by Instance Number.
    index
        The study's number in a data set (patient "SYNTHETIC^CHEST 0001" for index 0).
    series_description
        Of the series.

    Returns
    -------
    list of pathlib.Path
        The files by Instance Number (head to foot).
    """
    if not isinstance(case, LungCase):
        raise TypeError('Argument "case" should be a LungCase.')
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f'Argument "index" should be a non-negative integer, got {index!r}.')
    if not isinstance(series_description, str) or not series_description.strip():
        raise ValueError('Argument "series_description" should be a non-empty string.')
    header = _header(case, index, np.random.default_rng([case.seed, index, 42]))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n_k, n_j, n_i = case.shape
    sk, sj, si = case.spacing
    x0, y0 = -(n_i - 1) / 2 * si, -(n_j - 1) / 2 * sj
    paths = []
    for number in range(1, n_k + 1):
        k = n_k - number  # Instance Number 1 is the top slice
        position = (x0, y0, header.table + k * sk)
        ds = _ct_dataset(header, case, k, number, series_description, position)
        path = folder / f"ct-{number:04d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def write_lung_dataset(out: Path, count: int, seed: int, **kwargs: object) -> Path:
    """Write ``count`` cases as a training set (the format of ``docs/lung-phantom.md``).

    Case ``n`` (from 1) is ``make_lung_case(seed * 100_000 + n - 1, **kwargs)``, written to
    ``out/case-NNNN/dicom/``, with its truth in ``out/case-NNNN/labels.npz`` (``labels``,
    ``instances``: in the series' volume index order; ``spacing``: mm) and one row in
    ``out/index.csv``.

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
        case = make_lung_case(seed * 100_000 + n - 1, **kwargs)  # type: ignore[arg-type]
        folder = out / f"case-{n:04d}"
        write_lung_study(case, folder / "dicom", index=n - 1)
        np.savez_compressed(folder / "labels.npz", labels=case.labels, instances=case.instances,
                            spacing=np.asarray(case.spacing, dtype=np.float64))  # fmt: skip
        per_class = [sum(lesion.name == name for lesion in case.lesions) for name in CLASSES]
        rows.append([f"case-{n:04d}", case.seed, *per_class])
    path = out / "index.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["case", "seed", *CLASSES])
        writer.writerows(rows)
    logger.info("wrote %d chest CT phantom cases to %s", count, out)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mibi_node.analyses.lung.phantom OUT --count N --seed S``."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write the cases into")
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    path = write_lung_dataset(args.out, args.count, args.seed)
    print(f"{args.count} cases in {time.perf_counter() - started:.1f} s; index in {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
