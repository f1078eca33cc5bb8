"""Synthetic planar thyroid scintigraphy studies (99mTc-pertechnetate) written as NM DICOM.

One study is an anterior view of the neck: two lobes joined by an isthmus, sometimes a
pyramidal lobe, the parotid and submandibular glands above, soft-tissue background, and
the findings of seed 001 (normal, Graves' disease, toxic multinodular goitre, toxic
adenoma, cold nodule, thyroiditis), alone or in plausible mixtures. Geometry is parallel-
hole (whole neck) or pinhole (magnified, slight barrel distortion and vignetting).
Sometimes the study also holds a marker image (point sources, as a second frame or a
separate series) or markers burnt into the image, and an extra view (anterior oblique or a
wide field of neck and chest). Counts come from :func:`mibi_node.phantom.physics.acquire`,
the datasets from :func:`mibi_node.phantom.dicom.nm_dataset`; a seed fixes every byte.
"""

from __future__ import annotations

import csv
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pydicom
from pydicom import dcmwrite

from mibi_node.analyses.thyroid.result import FINDINGS, Nodule
from mibi_node.phantom.anatomy import _ellipsoid
from mibi_node.phantom.dicom import Acquisition, Frame, StudyHeader, nm_dataset, phantom_uid
from mibi_node.phantom.physics import acquire, blur_and_bin

__all__ = [
    "LABEL_COLUMNS",
    "MIXTURES",
    "ThyroidPhantom",
    "assign_findings",
    "generate_thyroid_studies",
    "make_thyroid_study",
]

logger = logging.getLogger(__name__)

#: Columns of ``labels.csv``, in order.
LABEL_COLUMNS: tuple[str, ...] = (
    "folder",
    "findings",
    "study_instance_uid",
    "right_uptake",
    "pinhole",
)

#: The mixed findings a batch draws (seed 001's "cross features").
MIXTURES: tuple[tuple[str, ...], ...] = (
    ("toxic_adenoma", "cold_nodule"),
    ("toxic_multinodular_goitre", "cold_nodule"),
    ("graves", "cold_nodule"),
)

_STUDY_DESCRIPTIONS = ("THYROID SCAN", "SCHILDDRUESEN SZINTIGRAPHIE", "NM THYROID")
_SERIES_DESCRIPTIONS = ("THYROID SCAN", "SCHILDDRUESE", "Thyroid TcO4 ANT", "THYROID ANT")
_OVERSAMPLE = 2
#: Counts per unit of activity x thickness x mm^2 for a 300 s parallel-hole frame.
_COUNTS_PER_UNIT = 2.0


@dataclass(frozen=True)
class ThyroidPhantom:
    """One generated thyroid study with its ground truth.

    Attributes
    ----------
    findings
        Subset of :data:`~mibi_node.analyses.thyroid.result.FINDINGS` in that order;
        ``("normal",)`` alone or abnormal findings only.
    datasets
        The study's NM Image Storage instances (thyroid image first).
    image
        The anterior thyroid image as acquired (float32 counts, rows x columns).
    pixel_spacing_mm
        Pixel size of ``image`` (at the thyroid's plane for a pinhole).
    lobe_uptake
        ``{"right": r, "left": l}``, the patient's sides, summing to 1.
    nodules
        True centres of the hot and cold areas, in ``image`` pixels.
    pinhole
        Pinhole (magnified) rather than parallel-hole geometry.
    """

    findings: tuple[str, ...]
    datasets: list[pydicom.Dataset]
    image: np.ndarray
    pixel_spacing_mm: float
    lobe_uptake: dict[str, float]
    nodules: tuple[Nodule, ...]
    pinhole: bool


@dataclass(frozen=True)
class _Sphere:
    x: float
    y: float
    radius: float
    factor: float  # hot: concentration relative to normal tissue; cold: residual fraction
    kind: str
    lobe: str


@dataclass
class _Scene:
    """Everything drawn for one study, in millimetres (x to the image's right, y down)."""

    cx: float
    cy: float
    lobes: dict[str, tuple[float, float, float, float, float, float]]  # x, y, a, b, depth, tilt
    isthmus: tuple[float, float, float, float, float]
    pyramidal: tuple[float, float, float, float, float] | None
    glands: list[tuple[float, float, float, float, float]]
    neck_half_width: float
    thyroid: float
    lobe_factor: dict[str, float]
    salivary: float
    background: float
    spheres: list[_Sphere] = field(default_factory=list)
    patchy: bool = False
    markers: list[tuple[float, float, float]] = field(default_factory=list)


def _check_findings(findings: Sequence[str]) -> tuple[str, ...]:
    if isinstance(findings, str) or not isinstance(findings, Sequence):
        raise TypeError('Argument "findings" should be a sequence of finding keys.')
    unknown = [f for f in findings if f not in FINDINGS]
    if unknown or not findings or len(set(findings)) != len(findings):
        raise ValueError(
            f'Argument "findings" should hold distinct keys from {", ".join(FINDINGS)}, '
            f"got {list(findings)}."
        )
    if "normal" in findings and len(findings) > 1:
        raise ValueError('Argument "findings" should not combine "normal" with other findings.')
    return tuple(f for f in FINDINGS if f in findings)


def _header(seed: int, index: int, rng: np.random.Generator) -> StudyHeader:
    age = int(rng.integers(18, 85))
    day = datetime(2024, 2, 5, 8, 0) + timedelta(
        days=int(rng.integers(0, 700)), minutes=5 * int(rng.integers(0, 96))
    )
    birth = day - timedelta(days=int(age * 365.25 + rng.integers(0, 360)))
    number = f"{index + 1:04d}"
    return StudyHeader(
        seed=seed,
        index=index,
        study_instance_uid=phantom_uid(seed, index, "thyroid-scan", "study"),
        patient_name=f"SYNTHETIC^THYROID {number}",
        patient_id=f"SYNTH-T{seed}-{number}",
        patient_sex="F" if rng.uniform() < 0.75 else "M",
        patient_birth_date=birth.strftime("%Y%m%d"),
        patient_age=f"{age:03d}Y",
        accession_number=f"TH{seed % 1_000_000:06d}{number}",
        injection=day,
        dose_mbq=float(round(rng.uniform(70.0, 185.0))),
        description=str(rng.choice(_STUDY_DESCRIPTIONS)),
    )


def _place(
    rng: np.random.Generator, scene: _Scene, lobe: str, spread: float
) -> tuple[float, float]:
    """A point inside ``lobe``, ``spread`` of the way towards its edge at most."""
    x, y, a, b, _depth, tilt = scene.lobes[lobe]
    u = rng.uniform(-0.3, 0.3) * a * spread
    v = rng.uniform(-0.55, 0.55) * b * spread
    angle = math.radians(tilt)
    return x + u * math.cos(angle) - v * math.sin(angle), y + u * math.sin(angle) + v * math.cos(
        angle
    )


def _scene(
    findings: tuple[str, ...], anatomy: np.random.Generator, rng: np.random.Generator
) -> _Scene:
    """Draw the anatomy (fixed by seed and index) and shape it by the findings."""
    cx, cy = anatomy.uniform(-6.0, 6.0), anatomy.uniform(-4.0, 10.0)
    sep = anatomy.uniform(17.0, 21.0)
    a, b = anatomy.uniform(8.5, 11.0), anatomy.uniform(19.0, 24.0)
    depth = anatomy.uniform(15.0, 19.0)
    tilt = anatomy.uniform(8.0, 18.0)
    asym = anatomy.uniform(0.9, 1.1)
    size = {"right": asym, "left": 1.0 / asym}
    growth = 1.0
    if "graves" in findings:
        growth = rng.uniform(1.3, 1.55)
    elif "toxic_multinodular_goitre" in findings:
        growth = rng.uniform(1.25, 1.6)
        size = {side: s * rng.uniform(0.85, 1.2) for side, s in size.items()}
    lobes = {}
    for side, sign in (("right", -1.0), ("left", 1.0)):
        g = growth * size[side]
        lobes[side] = (
            cx + sign * sep * math.sqrt(growth),
            cy + anatomy.uniform(-3.0, 3.0),
            a * g,
            b * g,
            depth * g**0.5,
            -sign * tilt,
        )
    isthmus = (
        cx,
        cy + 0.35 * b * growth,
        sep * math.sqrt(growth),
        anatomy.uniform(4.0, 6.0),
        anatomy.uniform(5.0, 8.0) * growth**0.5,
    )
    pyramidal = None
    if anatomy.uniform() < (0.45 if "graves" in findings else 0.15):
        pyramidal = (cx + anatomy.uniform(-5, 5), cy - 0.6 * b * growth, 2.5, 0.55 * b, 4.0)
    glands = []
    px, py = anatomy.uniform(50.0, 58.0), anatomy.uniform(82.0, 95.0)
    sx, sy = anatomy.uniform(32.0, 38.0), anatomy.uniform(52.0, 60.0)
    for sign in (-1.0, 1.0):
        glands.append(
            (cx + sign * px, cy - py, anatomy.uniform(12, 15), anatomy.uniform(17, 22), 22.0)
        )
        glands.append(
            (cx + sign * sx, cy - sy, anatomy.uniform(10, 12), anatomy.uniform(7, 9), 15.0)
        )
    scene = _Scene(
        cx=cx, cy=cy, lobes=lobes, isthmus=isthmus, pyramidal=pyramidal, glands=glands,
        neck_half_width=anatomy.uniform(52.0, 64.0), thyroid=rng.uniform(0.85, 1.15),
        lobe_factor={"right": 1.0, "left": 1.0}, salivary=rng.uniform(0.27, 0.35),
        background=rng.uniform(0.015, 0.021),
    )  # fmt: skip
    if "graves" in findings:
        scene.thyroid = rng.uniform(3.0, 4.0)
        scene.salivary = rng.uniform(0.15, 0.22)
        scene.background = rng.uniform(0.008, 0.012)
    if "toxic_multinodular_goitre" in findings:
        scene.thyroid = rng.uniform(1.1, 1.5)
        scene.salivary, scene.patchy = rng.uniform(0.2, 0.28), True
        scene.background = rng.uniform(0.011, 0.016)
        for kind, count in (("hot", int(rng.integers(2, 4))), ("cold", int(rng.integers(1, 3)))):
            for _ in range(count):
                lobe = str(rng.choice(["right", "left"]))
                x, y = _place(rng, scene, lobe, 1.0)
                factor = rng.uniform(2.5, 3.5) if kind == "hot" else rng.uniform(0.1, 0.3)
                scene.spheres.append(_Sphere(x, y, rng.uniform(4.5, 7.5), factor, kind, lobe))
    if "toxic_adenoma" in findings:
        lobe = str(rng.choice(["right", "left"]))
        x, y = _place(rng, scene, lobe, 0.6)
        a_lobe = scene.lobes[lobe][2]
        radius = min(rng.uniform(8.0, 12.0), 0.95 * a_lobe)
        scene.spheres.append(_Sphere(x, y, radius, rng.uniform(4.0, 6.0), "hot", lobe))
        suppressed = rng.uniform(0.35, 0.5) if "cold_nodule" in findings else rng.uniform(0.12, 0.3)
        scene.thyroid *= suppressed
        scene.spheres[-1] = _Sphere(
            x, y, radius, scene.spheres[-1].factor / suppressed, "hot", lobe
        )
    if "cold_nodule" in findings:
        used = {s.lobe for s in scene.spheres if s.kind == "hot"}
        sides = [s for s in ("right", "left") if s not in used] or ["right", "left"]
        lobe = str(rng.choice(sides))
        x, y = _place(rng, scene, lobe, 0.5)
        a_lobe = scene.lobes[lobe][2]
        radius = min(rng.uniform(7.0, 10.0) * (1.3 if scene.patchy else 1.0), 0.9 * a_lobe)
        scene.spheres.append(_Sphere(x, y, radius, rng.uniform(0.0, 0.12), "cold", lobe))
    if "thyroiditis" in findings:
        scene.thyroid = rng.uniform(0.04, 0.12)
        scene.salivary = rng.uniform(0.35, 0.45)
        scene.background = rng.uniform(0.022, 0.03)
    return scene


def _thyroid_map(
    scene: _Scene, xx: np.ndarray, yy: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Thyroid activity x thickness (per mm^2) on the object coordinates ``xx``, ``yy``."""
    total = np.zeros_like(xx)
    shares = {}
    for side, (x, y, a, b, depth, tilt) in scene.lobes.items():
        # tilt rotates the width axis; _ellipsoid's first half-axis is along it
        thick = _ellipsoid(xx, yy, (x, y), (a, b), depth, tilt)
        shares[side] = thick
        total = np.maximum(total, thick)
    x, y, a, b, depth = scene.isthmus
    total = np.maximum(total, _ellipsoid(xx, yy, (x, y), (a, b), depth))
    if scene.pyramidal is not None:
        x, y, a, b, depth = scene.pyramidal
        total = np.maximum(total, _ellipsoid(xx, yy, (x, y), (a, b), depth, 4.0))
    activity = total * scene.thyroid
    if scene.patchy:
        from scipy import ndimage

        noise = ndimage.gaussian_filter(rng.normal(size=xx.shape), 6.0)
        noise /= max(float(noise.std()), 1e-9)
        activity *= np.exp(0.25 * noise)
    for s in scene.spheres:
        chord = np.minimum(
            _ellipsoid(xx, yy, (s.x, s.y), (s.radius, s.radius), 2 * s.radius), total
        )
        if s.kind == "hot":
            activity += (s.factor - 1.0) * scene.thyroid * chord
        else:
            lobe_level = np.where(total > 0, activity / np.maximum(total, 1e-9), 0.0)
            activity -= (1.0 - s.factor) * lobe_level * chord
    return np.clip(activity, 0.0, None)


def _salivary_map(scene: _Scene, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    out = np.zeros_like(xx)
    for x, y, a, b, depth in scene.glands:
        out += _ellipsoid(xx, yy, (x, y), (a, b), depth)
    return out * scene.salivary


def _background_map(scene: _Scene, xx: np.ndarray, yy: np.ndarray, chest: bool) -> np.ndarray:
    width: float | np.ndarray = scene.neck_half_width
    if chest:  # shoulders and upper chest below the neck
        width = width + np.clip(yy - scene.cy - 55.0, 0.0, None) * 1.6
    neck = 110.0 * np.sqrt(np.clip(1.0 - ((xx - scene.cx) / width) ** 2, 0.0, None))
    vessels: np.ndarray = sum(  # type: ignore[assignment]
        _ellipsoid(xx, yy, (scene.cx + s * 27.0, scene.cy), (4.0, 160.0), 8.0) for s in (-1.0, 1.0)
    )
    return (neck + 4.0 * vessels) * scene.background


@dataclass(frozen=True)
class _Geometry:
    matrix: int
    spacing: float
    pinhole: bool
    distortion: float = 0.0
    fwhm: float = 8.0
    x_scale: float = 1.0

    def grid(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Object coordinates (mm) of the fine grid's sub-pixels, and the sensitivity."""
        n = self.matrix * _OVERSAMPLE
        fine = self.spacing / _OVERSAMPLE
        axis = (np.arange(n) + 0.5) * fine - self.matrix * self.spacing / 2.0
        uu, vv = np.meshgrid(axis, axis)
        half = self.matrix * self.spacing / 2.0
        r2 = (uu**2 + vv**2) / half**2
        shrink = 1.0 - self.distortion * r2
        sensitivity = (1.0 + r2 * 0.35) ** -1.5 if self.pinhole else np.ones_like(uu)
        return uu * shrink / self.x_scale, vv * shrink, sensitivity

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """(row, column) of an object point: inverts the distortion by fixed-point steps."""
        half = self.matrix * self.spacing / 2.0
        u, v = x * self.x_scale, y
        for _ in range(20):
            shrink = 1.0 - self.distortion * (u**2 + v**2) / half**2
            u, v = x * self.x_scale / shrink, y / shrink
        return v / self.spacing + self.matrix / 2 - 0.5, u / self.spacing + self.matrix / 2 - 0.5


def _render(
    scene: _Scene, geometry: _Geometry, rng: np.random.Generator, *, chest: bool = False
) -> dict[str, np.ndarray]:
    """Expected counts of each component on the camera grid."""
    xx, yy, sensitivity = geometry.grid()
    area = (geometry.spacing / _OVERSAMPLE) ** 2
    scale = _COUNTS_PER_UNIT * area * sensitivity * (0.75 if geometry.pinhole else 1.0)
    maps = {
        "thyroid": _thyroid_map(scene, xx, yy, rng),
        "salivary": _salivary_map(scene, xx, yy),
        "background": _background_map(scene, xx, yy, chest),
    }
    markers = np.zeros_like(xx)
    for x, y, counts in scene.markers:
        row, col = geometry.to_pixel(x, y)
        i, j = int(round(row * _OVERSAMPLE + 0.5)), int(round(col * _OVERSAMPLE + 0.5))
        if 0 <= i < xx.shape[0] and 0 <= j < xx.shape[1]:
            markers[i, j] += counts / _COUNTS_PER_UNIT / area
    maps["markers"] = markers
    out = {}
    for name, activity in maps.items():
        out[name] = blur_and_bin(activity * scale, geometry.fwhm, geometry.spacing, _OVERSAMPLE)
    xx_t = xx  # the lobe split: object x left of the midline is the patient's right
    right = (xx_t < scene.cx).astype(np.float64)
    thyroid = maps["thyroid"] * scale
    out["_right"] = np.array([float((thyroid * right).sum()), float(thyroid.sum())])
    return out


def _marker_points(
    scene: _Scene, rng: np.random.Generator, burnt: bool
) -> list[tuple[float, float, float]]:
    notch = (
        scene.cx + rng.uniform(-3, 3),
        scene.cy + rng.uniform(48.0, 60.0),
        rng.uniform(4e3, 9e3),
    )
    if burnt:
        return [notch]
    points = [notch, (scene.cx + rng.uniform(-3, 3), scene.cy - rng.uniform(40.0, 55.0), 5e3)]
    for sign in (-1.0, 1.0):
        if rng.uniform() < 0.6:
            points.append(
                (scene.cx + sign * rng.uniform(45, 60), scene.cy + rng.uniform(40, 60), 4e3)
            )
    return points


def make_thyroid_study(
    seed: int,
    findings: Sequence[str],
    *,
    index: int = 0,
    pinhole: bool | None = None,
    matrix: int = 128,
    with_markers: bool | None = None,
    extra_view: bool | None = None,
) -> ThyroidPhantom:
    """Generate one thyroid study in memory.

    Parameters
    ----------
    seed, index
        Fix the anatomy, the options left ``None``, the noise and every UID and date; the
        anatomy does not depend on ``findings``.
    findings
        Finding keys from :data:`~mibi_node.analyses.thyroid.result.FINDINGS`.
    pinhole
        Pinhole geometry; drawn (one study in three) when ``None``.
    matrix
        Image rows and columns (64 to 512).
    with_markers
        Add point-source markers (burnt into the image, or a separate marker frame or
        series); drawn when ``None``.
    extra_view
        Add an anterior oblique or a wide-field view; drawn when ``None``.
    """
    findings = _check_findings(findings)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f'Argument "seed" should be a non-negative integer, got {seed!r}.')
    if isinstance(matrix, bool) or not isinstance(matrix, int) or not 64 <= matrix <= 512:
        raise ValueError(f'Argument "matrix" should be an integer from 64 to 512, got {matrix!r}.')
    options = np.random.default_rng([seed, index, 40])
    header = _header(seed, index, np.random.default_rng([seed, index, 41]))
    scene = _scene(
        findings, np.random.default_rng([seed, index, 42]), np.random.default_rng([seed, index, 43])
    )
    noise = np.random.default_rng([seed, index, 44])
    drawn_pinhole = options.uniform() < 1 / 3
    pinhole = drawn_pinhole if pinhole is None else bool(pinhole)
    marker_mode = str(options.choice(["none", "burnt", "frame", "series"], p=[0.4, 0.2, 0.2, 0.2]))
    if with_markers is not None:
        marker_mode = (
            marker_mode
            if marker_mode != "none" and with_markers
            else (str(options.choice(["burnt", "frame", "series"])) if with_markers else "none")
        )
    extra = str(options.choice(["none", "oblique", "wide"], p=[0.6, 0.2, 0.2]))
    if extra_view is not None:
        extra = (
            (extra if extra != "none" else str(options.choice(["oblique", "wide"])))
            if extra_view
            else "none"
        )
    fov = options.uniform(115.0, 150.0) if pinhole else options.uniform(230.0, 290.0)
    spacing = round(fov / matrix, 4)
    geometry = _Geometry(
        matrix, spacing, pinhole, options.uniform(0.04, 0.09) if pinhole else 0.0,
        options.uniform(3.5, 5.0) if pinhole else options.uniform(7.0, 9.5),
    )  # fmt: skip
    description = str(options.choice(_SERIES_DESCRIPTIONS))
    seconds = float(options.choice([180.0, 300.0, 600.0])) * (1.0 if pinhole else 0.5)
    time_scale = seconds / 300.0
    if marker_mode == "burnt":
        scene.markers = _marker_points(scene, options, burnt=True)
    parts = _render(scene, geometry, noise)
    expected = (parts["thyroid"] + parts["salivary"] + parts["background"]) * time_scale
    expected += parts["markers"]
    image = acquire(expected, noise)
    collimator = "PINH" if pinhole else "PARA"
    common = {"frame_seconds": seconds, "pertechnetate": True}
    frames = [Frame(image, 20.0)]
    marker_image = None
    if marker_mode in ("frame", "series"):
        scene.markers = _marker_points(scene, options, burnt=False)
        dots = _render(scene, geometry, noise)["markers"]
        marker_image = acquire(dots + 0.02 * parts["background"], noise)
    if marker_mode == "frame" and marker_image is not None:
        frames.append(Frame(marker_image, 25.0))
    acquisitions = [
        Acquisition(
            1, 1, "thyroid-scan-anterior", description, tuple(frames), pixel_spacing_mm=spacing,
            collimator=collimator, dynamic=len(frames) > 1, **common,  # type: ignore[arg-type]
        )
    ]  # fmt: skip
    if marker_mode == "series" and marker_image is not None:
        acquisitions.append(
            Acquisition(
                2, 1, "thyroid-scan-marker", "MARKER", (Frame(marker_image, 26.0),),
                pixel_spacing_mm=spacing, collimator=collimator,
                image_comments="POINT SOURCE MARKERS",
                **common,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    if extra != "none":
        scene.markers = []
        if extra == "oblique":
            view_geometry = _Geometry(
                matrix, spacing, pinhole, geometry.distortion, geometry.fwhm, 0.8
            )
            text = "THYROID LAO 30" if options.uniform() < 0.5 else "SCHILDDRUESE RAO"
        else:
            wide = round(options.uniform(380.0, 450.0) / matrix, 4)
            view_geometry = _Geometry(matrix, wide, False, fwhm=geometry.fwhm * 1.2)
            text = "NECK CHEST WIDE FIELD ANT"
        view = _render(scene, view_geometry, noise, chest=extra == "wide")
        view_image = acquire(
            (view["thyroid"] + view["salivary"] + view["background"]) * time_scale, noise
        )
        acquisitions.append(
            Acquisition(
                3, 1, f"thyroid-scan-{extra}", text, (Frame(view_image, 30.0),),
                pixel_spacing_mm=view_geometry.spacing,
                collimator="PINH" if view_geometry.pinhole else "PARA",
                **common,  # type: ignore[arg-type]
            )
        )  # fmt: skip
    datasets = []
    for acquisition in acquisitions:
        ds = nm_dataset(header, acquisition)
        ds.ManufacturerModelName = "Thyroid phantom"
        if acquisition.series_key.endswith("oblique"):
            for item in ds.DetectorInformationSequence:
                del item.ViewCodeSequence  # an oblique: no anterior code (Type 3)
        datasets.append(ds)
    right, total = parts["_right"]
    share = float(right / total) if total > 0 else 0.5
    nodules = []
    for s in scene.spheres:
        row, col = geometry.to_pixel(s.x, s.y)
        nodules.append(Nodule(float(row), float(col), s.radius / spacing, s.kind, s.lobe))  # type: ignore[arg-type]
    return ThyroidPhantom(
        findings=findings,
        datasets=datasets,
        image=image.astype(np.float32),
        pixel_spacing_mm=spacing,
        lobe_uptake={"right": share, "left": 1.0 - share},
        nodules=tuple(nodules),
        pinhole=pinhole,
    )


def assign_findings(count: int, seed: int, *, mixed_fraction: float = 0.3) -> list[tuple[str, ...]]:
    """Findings for a batch: balanced single findings plus :data:`MIXTURES`, shuffled.

    Parameters
    ----------
    count
        Number of studies.
    seed
        Fixes the order.
    mixed_fraction
        Share of studies with a mixture (0 to 1).
    """
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f'Argument "count" should be a positive integer, got {count!r}.')
    if not 0.0 <= float(mixed_fraction) <= 1.0:
        raise ValueError(
            f'Argument "mixed_fraction" should be between 0 and 1, got {mixed_fraction!r}.'
        )
    mixed = int(round(count * float(mixed_fraction)))
    labels: list[tuple[str, ...]] = [(FINDINGS[i % len(FINDINGS)],) for i in range(count - mixed)]
    labels += [MIXTURES[i % len(MIXTURES)] for i in range(mixed)]
    order = np.random.default_rng([seed, 45]).permutation(len(labels))
    return [labels[i] for i in order]


def generate_thyroid_studies(
    out: Path, count: int, seed: int, *, mixed_fraction: float = 0.3, matrix: int = 128
) -> list[dict[str, str]]:
    """Write ``count`` studies to ``out/study-NNNN/*.dcm`` and ``out/labels.csv``.

    Returns
    -------
    list of dict
        The rows of ``labels.csv`` (:data:`LABEL_COLUMNS`); ``findings`` are joined by
        ``;``, ``right_uptake`` has four decimals, ``pinhole`` is ``1`` or ``0``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    stems = {
        "anterior": "01-thyroid",
        "marker": "02-marker",
        "oblique": "03-oblique",
        "wide": "03-wide",
    }
    for index, findings in enumerate(assign_findings(count, seed, mixed_fraction=mixed_fraction)):
        study = make_thyroid_study(seed, findings, index=index, matrix=matrix)
        folder = out / f"study-{index + 1:04d}"
        folder.mkdir(exist_ok=True)
        names = {
            phantom_uid(seed, index, "series", f"thyroid-scan-{k}"): v for k, v in stems.items()
        }
        for ds in study.datasets:
            name = names.get(str(ds.SeriesInstanceUID), f"{int(ds.SeriesNumber):02d}-image")
            dcmwrite(folder / f"{name}.dcm", ds, enforce_file_format=True)
        rows.append(
            {
                "folder": folder.name,
                "findings": ";".join(study.findings),
                "study_instance_uid": str(study.datasets[0].StudyInstanceUID),
                "right_uptake": f"{study.lobe_uptake['right']:.4f}",
                "pinhole": "1" if study.pinhole else "0",
            }
        )
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=LABEL_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d thyroid phantom studies to %s", len(rows), out)
    return rows
