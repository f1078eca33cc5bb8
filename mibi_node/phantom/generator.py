"""Whole phantom studies: images, DICOM datasets, ground truth and the ``labels.csv`` file."""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset

from mibi_node.phantom.anatomy import (
    CLASSES,
    GROUPS,
    PhantomConfig,
    StudyParameters,
    activity_groups,
    sample_parameters,
)
from mibi_node.phantom.dicom import Acquisition, Frame, StudyHeader, nm_dataset, phantom_uid
from mibi_node.phantom.physics import acquire, blur_and_bin, decay_factor

__all__ = [
    "LABEL_COLUMNS",
    "LAYOUTS",
    "PhantomStudy",
    "assign_labels",
    "generate_studies",
    "make_study",
    "write_labels",
]

logger = logging.getLogger(__name__)

#: How the phases are spread over series and instances.
LAYOUTS: tuple[str, ...] = ("separate-series", "single-series", "multiframe")

#: Columns of ``labels.csv``, in order.
LABEL_COLUMNS: tuple[str, ...] = (
    "study_instance_uid",
    "label",
    "path",
    "lesion_side",
    "lesion_pole",
    "lesion_row",
    "lesion_col",
    "lesion_diameter_mm",
    "n_foci",
    "foci",
    "confounder",
    "matrix",
    "pixel_spacing_mm",
    "psf_fwhm_mm",
    "early_counts",
    "early_minutes",
    "delayed_minutes",
    "frame_seconds",
    "thyroid_retention",
    "lesion_retention",
    "lesion_uptake",
    "collimator",
    "layout",
    "seed",
    "index",
)

_OVERSAMPLE = 2
#: Relative sensitivity of the posterior head to each group (deep structures attenuate less).
_POSTERIOR_WEIGHTS = {
    "tissue": 1.0,
    "salivary": 0.45,
    "heart": 0.7,
    "thyroid": 0.3,
    "lesion": 0.35,
    "rim": 0.3,
}


@dataclass(frozen=True)
class PhantomStudy:
    """One generated study, in memory, with its ground truth.

    Attributes
    ----------
    study_instance_uid
        The study's UID (fixed by seed and index).
    label
        The class, one of :data:`~mibi_node.phantom.anatomy.CLASSES`.
    index
        Position of the study in its batch; with the seed it fixes everything.
    layout
        One of :data:`LAYOUTS`.
    parameters
        Every drawn parameter, including the lesions in millimetres.
    datasets
        The NM instances, in series/instance order.
    images
        Phase name (``early``, ``delayed``, ``thyroid``) -> the anterior uint16 counts.
    sources
        Phase name -> (SOP Instance UID, 1-based frame number) of the anterior image.
    components
        Group name -> noise-free expected early counts (float32), for checks and plots.
    file_stems
        File name (without ``.dcm``) of each dataset when written to disk.
    paths
        Files written by :func:`generate_studies`; empty for an in-memory study.
    """

    study_instance_uid: str
    label: str
    index: int
    layout: str
    parameters: StudyParameters
    datasets: tuple[Dataset, ...]
    images: dict[str, np.ndarray]
    sources: dict[str, tuple[str, int]]
    components: dict[str, np.ndarray]
    file_stems: tuple[str, ...] = field(default_factory=tuple)
    paths: tuple[Path, ...] = field(default_factory=tuple)

    def pixel(self, x_mm: float, y_mm: float) -> tuple[float, float]:
        """(row, column) of a point given in the phantom's millimetre coordinates."""
        spacing = self.parameters.pixel_spacing_mm
        half = self.parameters.matrix / 2.0
        return y_mm / spacing + half - 0.5, x_mm / spacing + half - 0.5

    def label_row(self, seed: int, folder: str = "") -> dict[str, str]:
        """The study's row of ``labels.csv``."""
        p = self.parameters
        row = dict.fromkeys(LABEL_COLUMNS, "")
        foci = []
        for lesion in p.lesions:
            r, c = self.pixel(lesion.x_mm, lesion.y_mm)
            foci.append(f"{lesion.side}/{lesion.pole}/{r:.1f}/{c:.1f}/{lesion.diameter_mm:.1f}")
        row.update(
            study_instance_uid=self.study_instance_uid,
            label=self.label,
            path=folder,
            n_foci=str(len(p.lesions) if self.label != "cyst" else 0),
            foci=";".join(foci),
            confounder=p.confounder,
            matrix=str(p.matrix),
            pixel_spacing_mm=f"{p.pixel_spacing_mm:.4f}",
            psf_fwhm_mm=f"{p.psf_fwhm_mm:.2f}",
            early_counts=str(int(self.images["early"].sum(dtype=np.int64))),
            early_minutes=f"{p.early_minutes:.1f}",
            delayed_minutes=f"{p.delayed_minutes:.1f}",
            frame_seconds=f"{p.frame_seconds:.0f}",
            thyroid_retention=f"{p.retention['thyroid']:.3f}",
            collimator=p.collimator,
            layout=self.layout,
            seed=str(seed),
            index=str(self.index),
        )
        if p.lesions:
            first = p.lesions[0]
            r, c = self.pixel(first.x_mm, first.y_mm)
            row.update(
                lesion_side=first.side,
                lesion_pole=first.pole,
                lesion_row=f"{r:.1f}",
                lesion_col=f"{c:.1f}",
                lesion_diameter_mm=f"{first.diameter_mm:.1f}",
                lesion_retention=f"{first.retention:.3f}",
                lesion_uptake=f"{first.uptake:.3f}",
            )
        return row


def _check_choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        allowed = ", ".join(str(c) for c in choices)
        raise ValueError(f'Argument "{name}" should be one of {allowed}, got {value!r}.')


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f'Argument "{name}" should be an integer, not {type(value).__name__}.')
    if value < minimum:
        raise ValueError(f'Argument "{name}" should be an integer >= {minimum}, got {value}.')
    return int(value)


def _header(seed: int, index: int) -> StudyHeader:
    rng = np.random.default_rng([seed, index, 1])
    age = int(rng.integers(30, 82))
    day = datetime(2024, 1, 8, 8, 0) + timedelta(
        days=int(rng.integers(0, 700)), minutes=5 * int(rng.integers(0, 72))
    )
    birth = day - timedelta(days=int(age * 365.25 + rng.integers(0, 360)))
    number = f"{index + 1:04d}"
    return StudyHeader(
        seed=seed,
        index=index,
        study_instance_uid=phantom_uid(seed, index, "study"),
        patient_name=f"SYNTHETIC^PHANTOM {number}",
        patient_id=f"SYNTH-{seed}-{number}",
        patient_sex="F" if rng.uniform() < 0.75 else "M",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_age=f"{age:03d}Y",
        accession_number=f"PH{seed % 1_000_000:06d}{number}",
        injection=day,
        dose_mbq=float(round(rng.uniform(550.0, 740.0))),
    )


def _delayed_text(minutes: float) -> str:
    hours = round(minutes / 30.0) / 2.0
    return f"{hours:g}H"


def _acquisitions(
    params: StudyParameters,
    layout: str,
    images: dict[str, np.ndarray],
    posterior: dict[str, np.ndarray],
) -> list[tuple[str, Acquisition]]:
    """The instances of one study for the layout, each with a short file stem."""
    common: dict[str, Any] = {
        "frame_seconds": params.frame_seconds,
        "pixel_spacing_mm": params.pixel_spacing_mm,
        "collimator": params.collimator,
    }
    early_text = f"EARLY {round(params.early_minutes)}MIN"
    delayed_text = f"DELAYED {_delayed_text(params.delayed_minutes)}"
    early = Frame(images["early"], params.early_minutes)
    delayed = Frame(images["delayed"], params.delayed_minutes)
    out: list[tuple[str, Acquisition]] = []
    if layout == "separate-series":
        out.append(
            ("01-early", Acquisition(1, 1, "early", f"{early_text} ANT", (early,), **common))
        )
        out.append(
            (
                "02-delayed",
                Acquisition(2, 1, "delayed", f"{delayed_text} ANT", (delayed,), **common),
            )
        )
    elif layout == "single-series":
        description = "PARATHYROID MIBI ANT"
        out.append(
            (
                "01-early",
                Acquisition(
                    1, 1, "mibi", description, (early,), image_comments=early_text, **common
                ),
            )
        )
        out.append(
            (
                "01-delayed",
                Acquisition(
                    1, 2, "mibi", description, (delayed,), image_comments=delayed_text, **common
                ),
            )
        )
    else:
        frames = (
            early,
            delayed,
            Frame(posterior["early"], params.early_minutes, 2, "posterior"),
            Frame(posterior["delayed"], params.delayed_minutes, 2, "posterior"),
        )
        out.append(
            (
                "01-dual-phase",
                Acquisition(
                    1, 1, "dual", "PARATHYROID MIBI DUAL PHASE", frames, dynamic=True, **common
                ),
            )
        )
    if "thyroid" in images:
        frame = Frame(images["thyroid"], 20.0)
        scan = Acquisition(
            3, 1, "thyroid", "THYROID TCO4 ANT", (frame,), pertechnetate=True, **common
        )
        out.append(("03-thyroid", scan))
    return out


def make_study(
    label: str,
    *,
    seed: int = 0,
    index: int = 0,
    matrix: int = 128,
    layout: str = "separate-series",
    with_thyroid_scan: bool = False,
    config: PhantomConfig | None = None,
) -> PhantomStudy:
    """Generate one study in memory: datasets, anterior images and ground truth.

    The images and parameters depend only on ``seed``, ``index``, ``label``, ``matrix`` and
    ``config``; the layout changes how they are packed, never the counts.

    Parameters
    ----------
    label
        One of :data:`~mibi_node.phantom.anatomy.CLASSES`.
    seed, index
        Fix every random draw and every UID.
    matrix
        128 or 256 pixels per side.
    layout
        One of :data:`LAYOUTS`.
    with_thyroid_scan
        Add a 99mTc-pertechnetate thyroid image in its own series.
    config
        Parameter ranges; the defaults of :class:`PhantomConfig` when ``None``.

    Returns
    -------
    PhantomStudy
    """
    _check_choice("label", label, CLASSES)
    _check_choice("matrix", matrix, (128, 256))
    _check_choice("layout", layout, LAYOUTS)
    seed = _check_int("seed", seed, 0)
    index = _check_int("index", index, 0)
    config = config or PhantomConfig()

    rng = np.random.default_rng([seed, index])
    params = sample_parameters(rng, label, matrix, config)
    groups, pertechnetate = activity_groups(params, rng, _OVERSAMPLE)
    blurred = {
        name: blur_and_bin(groups[name], params.psf_fwhm_mm, params.pixel_spacing_mm, _OVERSAMPLE)
        for name in GROUPS
    }
    scale = params.early_counts / max(sum(float(b.sum()) for b in blurred.values()), 1e-9)
    components = {name: (b * scale).astype(np.float32) for name, b in blurred.items()}
    later = decay_factor(params.delayed_minutes - params.early_minutes)
    expected: dict[str, np.ndarray] = {
        "early": np.sum([components[name].astype(np.float64) for name in GROUPS], axis=0),
        "delayed": np.sum(
            [
                params.retention[name] * later * components[name].astype(np.float64)
                for name in GROUPS
            ],
            axis=0,
        ),
    }
    impulse = params.extras["impulse_fraction"]
    images = {phase: acquire(expected[phase], rng, impulse) for phase in ("early", "delayed")}
    if with_thyroid_scan:
        scan = blur_and_bin(pertechnetate, params.psf_fwhm_mm, params.pixel_spacing_mm, _OVERSAMPLE)
        counts = float(np.random.default_rng([seed, index, 3]).uniform(3e5, 6e5))
        images["thyroid"] = acquire(scan * (counts / max(float(scan.sum()), 1e-9)), rng, impulse)
    posterior: dict[str, np.ndarray] = {}
    if layout == "multiframe":
        back = np.random.default_rng([seed, index, 2])
        for phase in ("early", "delayed"):
            factor = 1.0 if phase == "early" else later
            weights = {
                name: _POSTERIOR_WEIGHTS[name]
                * factor
                * (params.retention[name] if phase == "delayed" else 1.0)
                for name in GROUPS
            }
            view = np.sum(
                [weights[name] * components[name].astype(np.float64) for name in GROUPS], axis=0
            )
            posterior[phase] = acquire(view[:, ::-1], back, impulse)

    header = _header(seed, index)
    datasets = []
    stems = []
    sources: dict[str, tuple[str, int]] = {}
    for stem, acquisition in _acquisitions(params, layout, images, posterior):
        ds = nm_dataset(header, acquisition)
        datasets.append(ds)
        stems.append(stem)
        for number, frame in enumerate(acquisition.frames, start=1):
            if frame.view != "anterior":
                continue
            for phase, image in images.items():
                if frame.pixels is image:
                    sources[phase] = (str(ds.SOPInstanceUID), number)
    return PhantomStudy(
        study_instance_uid=header.study_instance_uid,
        label=label,
        index=index,
        layout=layout,
        parameters=params,
        datasets=tuple(datasets),
        images=images,
        sources=sources,
        components=components,
        file_stems=tuple(stems),
    )


def assign_labels(
    studies: int, classes: Sequence[str], mix: Sequence[float] | None, seed: int
) -> list[str]:
    """Labels for a batch: exact quotas from ``mix`` (largest remainder), seeded shuffle.

    Parameters
    ----------
    studies
        Number of studies.
    classes
        Class names, each from :data:`~mibi_node.phantom.anatomy.CLASSES`, no repeats.
    mix
        Share of each class (same length as ``classes``, non-negative, any positive sum);
        equal shares when ``None``.
    seed
        Fixes the order.

    Returns
    -------
    list of str
    """
    studies = _check_int("studies", studies, 1)
    classes = list(classes)
    if not classes:
        raise ValueError('Argument "classes" should name at least one class.')
    for name in classes:
        _check_choice("classes", name, CLASSES)
    if len(set(classes)) != len(classes):
        raise ValueError(f'Argument "classes" should not repeat a class, got {classes}.')
    shares = np.ones(len(classes)) if mix is None else np.asarray(list(mix), dtype=float)
    if shares.shape != (len(classes),):
        raise ValueError(
            f'Argument "mix" should have one share per class ({len(classes)}), got {len(shares)}.'
        )
    if not np.all(np.isfinite(shares)) or np.any(shares < 0) or shares.sum() <= 0:
        raise ValueError('Argument "mix" should hold non-negative shares with a positive sum.')
    exact = shares / shares.sum() * studies
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: studies - int(quota.sum())]:
        quota[i] += 1
    labels = [name for name, n in zip(classes, quota, strict=True) for _ in range(int(n))]
    order = np.random.default_rng([seed, 7]).permutation(len(labels))
    return [labels[i] for i in order]


def write_labels(path: Path, rows: Sequence[dict[str, str]]) -> None:
    """Write ``labels.csv`` (header :data:`LABEL_COLUMNS`, ``\\n`` line ends)."""
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def generate_studies(
    out_dir: str | Path,
    studies: int,
    *,
    seed: int = 0,
    classes: Sequence[str] = CLASSES,
    mix: Sequence[float] | None = None,
    matrix: int = 128,
    layout: str = "separate-series",
    with_thyroid_scan: bool = False,
    preview: bool = False,
    config: PhantomConfig | None = None,
) -> list[PhantomStudy]:
    """Write ``studies`` phantom studies as DICOM files plus ``labels.csv``.

    Each study goes to ``out_dir/study-NNNN/`` (one file per instance). The same arguments
    write the same bytes.

    Parameters
    ----------
    out_dir
        Output folder, created if missing.
    studies
        How many studies.
    seed
        Fixes labels, images, UIDs, names and dates.
    classes, mix
        Which classes, and their shares (see :func:`assign_labels`).
    matrix, layout, with_thyroid_scan, config
        As for :func:`make_study`.
    preview
        Also write ``preview.png``, a labelled montage of early, delayed and retention maps.

    Returns
    -------
    list of PhantomStudy
        With ``paths`` filled in.
    """
    seed = _check_int("seed", seed, 0)
    labels = assign_labels(studies, classes, mix, seed)
    _check_choice("matrix", matrix, (128, 256))
    _check_choice("layout", layout, LAYOUTS)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    rows = []
    width = max(4, int(math.log10(studies)) + 1)
    for index, label in enumerate(labels):
        study = make_study(
            label,
            seed=seed,
            index=index,
            matrix=matrix,
            layout=layout,
            with_thyroid_scan=with_thyroid_scan,
            config=config,
        )
        folder = out / f"study-{index + 1:0{width}d}"
        folder.mkdir(exist_ok=True)
        paths = []
        for stem, ds in zip(study.file_stems, study.datasets, strict=True):
            path = folder / f"{stem}.dcm"
            dcmwrite(path, ds, enforce_file_format=True)
            paths.append(path)
        study = replace(study, paths=tuple(paths))
        written.append(study)
        rows.append(study.label_row(seed, folder.name))
    write_labels(out / "labels.csv", rows)
    logger.info("wrote %d phantom studies to %s", len(written), out)
    if preview:
        from mibi_node.phantom.preview import write_montage

        write_montage(written, out / "preview.png")
    return written
