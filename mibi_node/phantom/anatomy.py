"""Per-study phantom parameters and the projected activity of each structure of the neck.

Coordinates are millimetres in the anterior image plane, ``x`` to the image right (the
patient's left, as an anterior view shows it) and ``y`` downwards (inferior), with the
origin at the image centre. Every structure is an ellipsoid (or a union of them) whose
*projected* thickness times its tracer concentration gives its contribution to a planar
image, so edges fall off the way they do on a gamma camera. Structures are grouped
(:data:`GROUPS`) because each group washes out at its own rate between the early and the
delayed image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

__all__ = [
    "CLASSES",
    "GROUPS",
    "Lesion",
    "PhantomConfig",
    "StudyParameters",
    "activity_groups",
    "sample_parameters",
]

logger = logging.getLogger(__name__)

#: The five diagnostic classes, in the order every bundle and label file uses.
CLASSES: tuple[str, ...] = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")

#: Structure groups that share one washout rate.
GROUPS: tuple[str, ...] = ("tissue", "salivary", "heart", "thyroid", "lesion", "rim")

Range = tuple[float, float]


@dataclass(frozen=True)
class PhantomConfig:
    """The ranges every per-study parameter is drawn from (uniformly unless noted).

    The defaults follow issue 3. The attributes marked *difficulty* are the ones to move
    when the classification task must become easier or harder (see ``docs/phantom.md``).

    Attributes
    ----------
    pixel_spacing_mm
        Pixel size for a 128 matrix; a 256 matrix halves it (same field of view).
    psf_fwhm_mm
        Gaussian point-spread function of collimator and camera (*difficulty*).
    early_counts
        Total counts in the early image (*difficulty*: fewer counts, more noise).
    early_minutes, delayed_minutes
        Acquisition start after injection.
    frame_seconds
        Acquisition duration of each planar image (same for early and delayed).
    thyroid_retention, thyroiditis_retention, lesion_retention
        Decay-corrected fraction of the early activity left at the delayed image
        (*difficulty*: the closer the two ranges, the harder).
    tissue_retention, salivary_retention, heart_retention, rim_retention
        The same for soft tissue, salivary glands, myocardium and a cyst's rim.
    adenoma_diameter_mm, adenoma_uptake
        Size (drawn log-uniformly), and concentration relative to the thyroid, of an
        adenoma (*difficulty*).
    hyperplasia_diameter_mm, hyperplasia_uptake, hyperplasia_foci
        The same for each hyperplastic gland; ``hyperplasia_foci`` is an integer range.
    carcinoma_diameter_mm, carcinoma_uptake
        The same for a carcinoma.
    cyst_diameter_mm, cyst_rim_uptake
        Diameter of a cyst (a cold defect), and its rim's concentration relative to the
        thyroid (*difficulty*).
    cyst_position
        Distance of a cyst's centre below its lobe's centre, in half-lengths of the lobe
        (*difficulty*: near 1 the cyst only shortens the lobe's tip, which an asymmetric normal
        lobe mimics; inside the lobe it is a hole with thyroid around it).
    cyst_below_probability
        Share of cysts under the lower pole instead, outside the thyroid (*difficulty*: they
        displace only soft tissue and are nearly invisible).
    tissue_uptake
        Soft-tissue concentration relative to the thyroid (*difficulty*: contrast).
    impulse_fraction
        Fraction of pixels replaced by dead (0) or hot pixels.
    thyroiditis_probability, asymmetry_probability
        Share of normal studies with a retaining thyroid, or with asymmetric lobes.
    """

    pixel_spacing_mm: Range = (2.4, 3.0)
    psf_fwhm_mm: Range = (7.0, 10.0)
    early_counts: Range = (5.0e5, 1.0e6)
    early_minutes: Range = (10.0, 20.0)
    delayed_minutes: Range = (90.0, 150.0)
    frame_seconds: Range = (300.0, 600.0)
    thyroid_retention: Range = (0.35, 0.5)
    thyroiditis_retention: Range = (0.75, 0.9)
    lesion_retention: Range = (0.5, 0.8)
    tissue_retention: Range = (0.55, 0.75)
    salivary_retention: Range = (0.3, 0.6)
    heart_retention: Range = (0.75, 0.95)
    rim_retention: Range = (0.15, 0.3)
    adenoma_diameter_mm: Range = (12.0, 22.0)
    adenoma_uptake: Range = (1.5, 2.3)
    hyperplasia_diameter_mm: Range = (10.0, 15.0)
    hyperplasia_uptake: Range = (1.4, 2.0)
    hyperplasia_foci: tuple[int, int] = (2, 4)
    carcinoma_diameter_mm: Range = (28.0, 40.0)
    carcinoma_uptake: Range = (2.6, 3.5)
    cyst_diameter_mm: Range = (16.0, 30.0)
    cyst_rim_uptake: Range = (0.2, 0.5)
    cyst_position: Range = (0.2, 0.6)
    cyst_below_probability: float = 0.05
    tissue_uptake: Range = (0.035, 0.065)
    impulse_fraction: Range = (0.0005, 0.002)
    thyroiditis_probability: float = 0.25
    asymmetry_probability: float = 0.2


@dataclass(frozen=True)
class Lesion:
    """One focus (or defect) with its position in millimetres.

    Attributes
    ----------
    kind
        ``"adenoma"``, ``"hyperplasia"``, ``"carcinoma"`` or ``"cyst"``.
    side
        ``"right"`` or ``"left"`` (the patient's side) or ``"midline"``.
    pole
        ``"upper"``, ``"lower"``, ``"below"`` (under the lower pole) or ``"ectopic"``.
    x_mm, y_mm
        Centre in the image plane.
    diameter_mm
        Diameter of the focus.
    uptake
        Concentration relative to the thyroid (negative-free; a cyst's is its rim's).
    retention
        Decay-corrected fraction of early activity left at the delayed image.
    """

    kind: str
    side: str
    pole: str
    x_mm: float
    y_mm: float
    diameter_mm: float
    uptake: float
    retention: float


@dataclass(frozen=True)
class StudyParameters:
    """Everything drawn for one study; the generator and ``labels.csv`` read it.

    Attributes
    ----------
    label
        One of :data:`CLASSES`.
    matrix
        Rows and columns of every image.
    pixel_spacing_mm, psf_fwhm_mm, early_counts
        Camera and acquisition.
    early_minutes, delayed_minutes, frame_seconds
        Acquisition start after injection and duration.
    retention
        Group name (:data:`GROUPS`) -> decay-corrected delayed/early activity ratio.
    thyroid_centre_mm
        Midpoint between the lobes.
    lobes
        ``(x, y, half_width, half_length, tilt_deg, depth, uptake)`` of right and left lobe.
    lesions
        The foci; empty for a normal study.
    confounder
        ``""``, ``"thyroiditis"`` or ``"asymmetric lobes"``.
    collimator
        ``"PARA"`` or ``"PINH"``.
    extras
        Remaining anatomy parameters (salivary glands, heart, body), for reproducibility.
    """

    label: str
    matrix: int
    pixel_spacing_mm: float
    psf_fwhm_mm: float
    early_counts: float
    early_minutes: float
    delayed_minutes: float
    frame_seconds: float
    retention: dict[str, float]
    thyroid_centre_mm: tuple[float, float]
    lobes: tuple[tuple[float, ...], tuple[float, ...]]
    lesions: tuple[Lesion, ...]
    confounder: str
    collimator: str
    extras: dict[str, float] = field(default_factory=dict)

    @property
    def field_of_view_mm(self) -> float:
        """Side of the square field of view."""
        return self.matrix * self.pixel_spacing_mm


def _u(rng: np.random.Generator, bounds: Range) -> float:
    return float(rng.uniform(bounds[0], bounds[1]))


def sample_parameters(
    rng: np.random.Generator, label: str, matrix: int, config: PhantomConfig
) -> StudyParameters:
    """Draw the anatomy, physiology and camera of one study of class ``label``.

    Parameters
    ----------
    rng
        The study's own generator (the caller derives it from the seed and study index).
    label
        One of :data:`CLASSES`.
    matrix
        128 or 256.
    config
        The parameter ranges.

    Returns
    -------
    StudyParameters
    """
    if label not in CLASSES:
        raise ValueError(f'Argument "label" should be one of {", ".join(CLASSES)}, got {label!r}.')
    spacing = _u(rng, config.pixel_spacing_mm) * 128.0 / matrix
    early = _u(rng, config.early_minutes)
    delayed = _u(rng, config.delayed_minutes)
    confounder = ""
    thyroid_retention = _u(rng, config.thyroid_retention)
    retention = {
        "tissue": _u(rng, config.tissue_retention),
        "salivary": _u(rng, config.salivary_retention),
        "heart": _u(rng, config.heart_retention),
        "thyroid": thyroid_retention,
        "lesion": _u(rng, config.lesion_retention),
        "rim": _u(rng, config.rim_retention),
    }
    # Thyroid just above the centre, so salivary glands reach the top edge and the heart the
    # bottom edge of the smaller fields of view.
    cx = float(rng.normal(0.0, 6.0))
    cy = -_u(rng, (10.0, 40.0))
    lobes = []
    for sign in (-1.0, 1.0):  # patient's right lobe first (image left)
        half_length = _u(rng, (22.5, 27.5))
        half_width = _u(rng, (7.5, 12.5))
        tilt = sign * _u(rng, (-5.0, 15.0))  # mostly a V, upper poles lateral
        lobes.append(
            [
                cx + sign * (half_width + _u(rng, (6.0, 12.0))),
                cy + float(rng.normal(0.0, 2.0)),
                half_width,
                half_length,
                tilt,
                _u(rng, (15.0, 20.0)),
                1.0,
            ]
        )
    if label == "normal":
        draw = rng.uniform()
        if draw < config.thyroiditis_probability:
            confounder = "thyroiditis"
            retention["thyroid"] = _u(rng, config.thyroiditis_retention)
        elif draw < config.thyroiditis_probability + config.asymmetry_probability:
            confounder = "asymmetric lobes"
            lobe = lobes[int(rng.integers(2))]
            scale = _u(rng, (0.75, 0.9)) if rng.uniform() < 0.5 else _u(rng, (1.1, 1.25))
            lobe[2] *= scale
            lobe[3] *= math.sqrt(scale)
            lobe[6] = _u(rng, (0.75, 1.3))
    lesions = _sample_lesions(rng, label, lobes, (cx, cy), retention["lesion"], config)
    extras = {
        "tissue_uptake": _u(rng, config.tissue_uptake),
        "neck_half_width": _u(rng, (50.0, 65.0)),
        "shoulder_half_width": _u(rng, (150.0, 190.0)),
        "salivary_uptake": _u(rng, (0.5, 1.0)),
        "submandibular_dy": _u(rng, (55.0, 70.0)),
        "submandibular_dx": _u(rng, (28.0, 38.0)),
        "parotid_dy": _u(rng, (95.0, 115.0)),
        "parotid_dx": _u(rng, (45.0, 60.0)),
        "heart_uptake": _u(rng, (0.15, 0.35)),
        "heart_dx": _u(rng, (15.0, 45.0)),
        "heart_dy": _u(rng, (150.0, 210.0)),
        "heart_radius": _u(rng, (42.0, 55.0)),
        "isthmus_uptake": _u(rng, (0.3, 0.9)),
        "impulse_fraction": _u(rng, config.impulse_fraction),
    }
    return StudyParameters(
        label=label,
        matrix=matrix,
        pixel_spacing_mm=spacing,
        psf_fwhm_mm=_u(rng, config.psf_fwhm_mm),
        early_counts=_u(rng, config.early_counts),
        early_minutes=early,
        delayed_minutes=delayed,
        frame_seconds=float(round(_u(rng, config.frame_seconds) / 60.0) * 60.0),
        retention=retention,
        thyroid_centre_mm=(cx, cy),
        lobes=(tuple(lobes[0]), tuple(lobes[1])),
        lesions=tuple(lesions),
        confounder=confounder,
        collimator="PINH" if rng.uniform() < 0.2 else "PARA",
        extras=extras,
    )


#: How far from a lobe's centre foci sit along its long axis, in half-lengths (upward for
#: the upper pole, downward otherwise).
_POLE_RANGES: dict[str, Range] = {
    "upper": (0.55, 0.95),
    "lower": (0.55, 1.05),
    "below": (1.0, 1.4),
}


def _pole_position(
    rng: np.random.Generator,
    lobe: list[float],
    pole: str,
    spread: float = 1.0,
    along_range: Range | None = None,
) -> tuple[float, float]:
    """A point near the upper or lower pole (or under it) of a lobe.

    ``along_range`` replaces the pole's range of distances from the lobe's centre along its
    long axis (half-lengths, see :data:`_POLE_RANGES`).
    """
    x, y, half_width, half_length, tilt = lobe[:5]
    # One draw per pole whichever is asked, so every study keeps its random stream.
    fraction = dict(zip(_POLE_RANGES, rng.uniform(size=len(_POLE_RANGES)), strict=True))[pole]
    low, high = along_range or _POLE_RANGES[pole]
    along = (-1.0 if pole == "upper" else 1.0) * (low + (high - low) * fraction) * half_length
    across = float(rng.normal(0.0, 0.35 * spread)) * half_width
    angle = math.radians(tilt)
    return (
        x + across * math.cos(angle) - along * math.sin(angle),
        y + across * math.sin(angle) + along * math.cos(angle),
    )


def _sample_lesions(
    rng: np.random.Generator,
    label: str,
    lobes: list[list[float]],
    centre: tuple[float, float],
    retention: float,
    config: PhantomConfig,
) -> list[Lesion]:
    sides = ("right", "left")
    if label == "normal":
        return []
    if label == "adenoma":
        draw = rng.uniform()
        pole = "lower" if draw < 0.7 else "upper" if draw < 0.9 else "ectopic"
        # Log-uniform: most adenomas are 10-20 mm, few reach the carcinomas' sizes.
        low, high = np.log(config.adenoma_diameter_mm)
        diameter = float(np.exp(rng.uniform(low, high)))
        uptake = _u(rng, config.adenoma_uptake)
        if pole == "ectopic":
            x, y = centre[0] + float(rng.normal(0.0, 8.0)), centre[1] + _u(rng, (60.0, 110.0))
            side = "right" if x < centre[0] else "left"
        else:
            index = int(rng.integers(2))
            x, y = _pole_position(rng, lobes[index], pole)
            side = sides[index]
        return [Lesion("adenoma", side, pole, x, y, diameter, uptake, retention)]
    if label == "hyperplasia":
        low, high = config.hyperplasia_foci
        count = int(rng.integers(low, high + 1))
        slots = [(index, pole) for index in (0, 1) for pole in ("lower", "upper")]
        if rng.uniform() < 0.15:  # unilateral
            keep = int(rng.integers(2))
            slots = [slot for slot in slots if slot[0] == keep] + [(keep, "below")]
        order = rng.permutation(len(slots))[:count]
        # Hyperplasia enlarges all glands alike: foci share a size and uptake, +-15-20 %.
        size = _u(rng, config.hyperplasia_diameter_mm)
        uptake = _u(rng, config.hyperplasia_uptake)
        foci = []
        for slot in sorted(int(i) for i in order):
            index, pole = slots[slot]
            x, y = _pole_position(rng, lobes[index], pole)
            foci.append(
                Lesion(
                    "hyperplasia",
                    sides[index],
                    pole,
                    x,
                    y,
                    size * _u(rng, (0.8, 1.2)),
                    uptake * _u(rng, (0.85, 1.15)),
                    float(np.clip(retention + rng.normal(0.0, 0.04), *config.lesion_retention)),
                )
            )
        # The most conspicuous focus first: it is the one labels.csv describes.
        foci.sort(key=lambda focus: -focus.uptake * focus.diameter_mm)
        return foci
    index = int(rng.integers(2))
    if label == "carcinoma":
        pole = "lower" if rng.uniform() < 0.75 else "upper"
        x, y = _pole_position(rng, lobes[index], pole)
        diameter = _u(rng, config.carcinoma_diameter_mm)
        return [
            Lesion(
                "carcinoma",
                sides[index],
                pole,
                x,
                y,
                diameter,
                _u(rng, config.carcinoma_uptake),
                retention,
            )
        ]
    pole = "lower" if rng.uniform() < 1.0 - config.cyst_below_probability else "below"
    x, y = _pole_position(
        rng,
        lobes[index],
        pole,
        spread=0.5,
        along_range=config.cyst_position if pole == "lower" else None,
    )
    return [
        Lesion(
            "cyst",
            sides[index],
            pole,
            x,
            y,
            _u(rng, config.cyst_diameter_mm),
            _u(rng, config.cyst_rim_uptake),
            0.0,
        )
    ]


def _ellipsoid(
    xx: np.ndarray,
    yy: np.ndarray,
    centre: tuple[float, float],
    half_axes: tuple[float, float],
    depth: float,
    tilt_deg: float = 0.0,
) -> np.ndarray:
    """Projected thickness (mm) of an ellipsoid; ``depth`` is its thickness at the centre."""
    angle = math.radians(tilt_deg)
    dx, dy = xx - centre[0], yy - centre[1]
    u = dx * math.cos(angle) + dy * math.sin(angle)
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    q = 1.0 - (u / half_axes[0]) ** 2 - (v / half_axes[1]) ** 2
    return depth * np.sqrt(np.clip(q, 0.0, None))


def _smoothstep(t: np.ndarray) -> np.ndarray:
    t = np.clip(t, 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def activity_groups(
    params: StudyParameters, rng: np.random.Generator, oversample: int = 2
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Render the early-phase activity of each group, and the thyroid-scan activity.

    Parameters
    ----------
    params
        The study.
    rng
        Drawn from for the carcinoma's texture.
    oversample
        Sub-pixels per pixel side; the physics step blurs and bins them down.

    Returns
    -------
    groups : dict of numpy.ndarray
        Group name -> activity (concentration x projected thickness) on the fine grid.
    pertechnetate : numpy.ndarray
        Activity of a 99mTc-pertechnetate thyroid scan on the same grid.
    """
    n = params.matrix * oversample
    step = params.pixel_spacing_mm / oversample
    axis = (np.arange(n, dtype=np.float32) + 0.5) * step - n * step / 2.0
    yy, xx = np.meshgrid(axis, axis, indexing="ij")
    cx, cy = params.thyroid_centre_mm
    e = params.extras

    # Soft tissue: head, neck widening into shoulders and chest.
    t = _smoothstep((yy[:, :1] - (cy + 25.0)) / 80.0)
    half_width = e["neck_half_width"] + (e["shoulder_half_width"] - e["neck_half_width"]) * t
    depth = 110.0 + 90.0 * t
    body = depth * np.sqrt(np.clip(1.0 - ((xx - cx) / half_width) ** 2, 0.0, None))
    body *= yy > cy - 95.0
    head = _ellipsoid(xx, yy, (cx, cy - 170.0), (75.0, 95.0), 170.0)
    tissue = e["tissue_uptake"] * (np.maximum(body, 0.6 * head))

    salivary = np.zeros_like(xx)
    for sign in (-1.0, 1.0):
        salivary += _ellipsoid(
            xx, yy, (cx + sign * e["submandibular_dx"], cy - e["submandibular_dy"]), (11, 9), 18
        )
        salivary += _ellipsoid(
            xx, yy, (cx + sign * e["parotid_dx"], cy - e["parotid_dy"]), (13, 20), 22
        )
    salivary *= e["salivary_uptake"]

    heart_centre = (cx + e["heart_dx"], cy + e["heart_dy"])
    radius = e["heart_radius"]
    heart = _ellipsoid(xx, yy, heart_centre, (radius, radius * 0.85), 2 * radius, 25.0)
    heart -= _ellipsoid(xx, yy, heart_centre, (radius * 0.6, radius * 0.5), 2 * radius * 0.55, 25.0)
    liver = _ellipsoid(xx, yy, (cx - 70.0, heart_centre[1] + 90.0), (110.0, 70.0), 140.0)
    heart = e["heart_uptake"] * np.clip(heart, 0.0, None) + 0.35 * e["heart_uptake"] * liver

    thyroid = np.zeros_like(xx)
    for x, y, hw, hl, tilt, lobe_depth, uptake in params.lobes:
        thyroid += uptake * _ellipsoid(xx, yy, (x, y), (hw, hl), lobe_depth, tilt)
    (rx, ry, *_), (lx, ly, *_) = params.lobes
    isthmus = _ellipsoid(xx, yy, (cx, (ry + ly) / 2 + 10.0), ((lx - rx) / 2.0, 5.0), 6.0)
    thyroid = np.maximum(thyroid, e["isthmus_uptake"] * isthmus)

    lesion = np.zeros_like(xx)
    rim = np.zeros_like(xx)
    cold = np.zeros_like(xx)
    for focus in params.lesions:
        radius = focus.diameter_mm / 2.0
        centre = (focus.x_mm, focus.y_mm)
        if focus.kind == "cyst":
            shape = _ellipsoid(xx, yy, centre, (radius, radius), 2 * radius)
            # Fraction of the lobe's thickness the cyst displaces (a lobe is ~15 mm deep).
            cold = np.maximum(cold, np.clip(shape / min(2 * radius, 15.0), 0.0, 1.0))
            shell = _ellipsoid(xx, yy, centre, (radius + 2.5, radius + 2.5), 2 * radius + 5)
            rim += focus.uptake * np.clip(shell - shape, 0.0, None) * 0.5
        elif focus.kind == "carcinoma":
            blob = np.zeros_like(xx)
            for _ in range(int(rng.integers(3, 6))):
                offset = rng.normal(0.0, 0.4 * radius, size=2)
                r = radius * _u(rng, (0.45, 0.75))
                part = _ellipsoid(
                    xx,
                    yy,
                    (centre[0] + offset[0], centre[1] + offset[1]),
                    (r * _u(rng, (0.8, 1.2)), r),
                    2 * r,
                    _u(rng, (0.0, 180.0)),
                )
                blob = np.maximum(blob, part)
            texture = ndimage.gaussian_filter(
                rng.standard_normal(xx.shape).astype(np.float32), 3.0 / step
            )
            texture *= 0.6 / max(float(texture.std()), 1e-6)
            lesion += focus.uptake * blob * np.clip(1.0 + texture, 0.2, None)
        else:
            lesion += focus.uptake * _ellipsoid(xx, yy, centre, (radius, radius), 2 * radius)
    if params.lesions and params.lesions[0].kind == "cyst":
        # The cyst displaces thyroid tissue and, below the lobe, soft tissue.
        thyroid *= 1.0 - cold
        tissue *= 1.0 - 0.25 * cold

    groups = {
        "tissue": tissue,
        "salivary": salivary,
        "heart": heart,
        "thyroid": thyroid,
        "lesion": lesion,
        "rim": rim,
    }
    pertechnetate = 1.0 * thyroid + 1.3 * salivary + 0.5 * tissue + 0.1 * heart
    return {k: v.astype(np.float32) for k, v in groups.items()}, pertechnetate.astype(np.float32)
