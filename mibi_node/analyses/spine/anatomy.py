"""The lumbar spine the phantom draws: one case, its scene and its tissue label maps.

A :class:`SpineCase` fixes what a study shows (the class of each of the eleven levels of
seed 002, the size and lordosis of the spine, the acquisition geometry). :func:`build_scene`
turns it into a scene in millimetres: a smooth lordotic centre line from T10 to the
coccyx, and along it vertebral bodies, discs, the sacrum, the canal and the posterior
elements, with each level's lesion. Every pixel of the sagittal plane is mapped once to
its arc length along the centre line and its distance in front of or behind it, so each
slice is drawn by comparisons on those two maps (vectorised numpy, a few milliseconds per
slice, in :mod:`~mibi_node.analyses.spine.slices`). The maps hold tissue labels;
:mod:`~mibi_node.analyses.spine.phantom` turns them into T1- or T2-weighted grey values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS

__all__ = [
    "DEFAULT_PREVALENCE",
    "Lesion",
    "Scene",
    "Segment",
    "SpineCase",
    "Tissue",
    "band_of",
    "build_scene",
    "lateral",
    "pixel_box",
    "random_case",
    "upsample",
]

logger = logging.getLogger(__name__)


class Tissue:
    """Label values of the tissue maps (``uint8``); marrow and nuclei have one per segment."""

    AIR, FAT, MUSCLE, VISCERA, CORTEX, LIGAMENT, CSF, NERVE, CORD, EPIDURAL_FAT = range(10)
    ANNULUS, HERNIATION, EXTRUDED, MODIC1, MODIC2, MODIC3, FATTY, EDEMA = range(10, 18)
    POSTERIOR, SACRAL_DISC, VESSEL, FACET_FLUID, OSTEOPHYTE = range(18, 23)
    MARROW = 32  # + segment index
    NUCLEUS = 64  # + segment index
    COUNT = 96


#: Default class prevalence per kind (each abnormal disc class about 10-15 % of discs).
DEFAULT_PREVALENCE: dict[str, dict[str, float]] = {
    "vertebra": {"normal": 0.70, "degenerated": 0.30},
    "disc": {
        "normal": 0.48,
        "bulge": 0.15,
        "protrusion": 0.13,
        "extrusion": 0.11,
        "schmorl_node": 0.13,
    },
}

_BODIES = ("T10", "T11", "T12", "L1", "L2", "L3", "L4", "L5")
_BODY_HEIGHT = (21.0, 22.0, 23.0, 25.0, 26.0, 27.0, 27.0, 26.0)
_BODY_DEPTH = (26.0, 27.0, 28.0, 30.0, 32.0, 34.0, 35.0, 35.0)
_BODY_WIDTH = (17.0, 18.0, 19.0, 20.0, 21.0, 22.0, 23.0, 24.0)  # half-widths
_DISC_HEIGHT = (5.0, 5.5, 6.5, 8.0, 9.0, 10.0, 11.0, 10.0)  # the disc below each body
_SACRAL_HEIGHT = (20.0, 16.0, 13.0, 11.0, 9.0)
_SACRAL_DEPTH = (36.0, 28.0, 22.0, 17.0, 13.0, 9.0)
_SACRAL_WIDTH = (48.0, 40.0, 32.0, 24.0, 16.0)
#: Tangent angle (degrees from the head-foot axis, + towards the back going down) at the
#: middle of each body T10 ... L5, S1, S3, S5.
_ANGLE = (-6.0, -9.0, -12.0, -12.0, -8.0, -1.0, 8.0, 18.0)
_SACRAL_ANGLE = (38.0, 32.0, 12.0)
_STEP = 0.5  # mm between samples of the centre line


@dataclass(frozen=True)
class SpineCase:
    """What one phantom study shows.

    Attributes
    ----------
    classes
        Level (:data:`~mibi_node.analyses.spine.levels.LEVELS`) -> class key of its kind.
    pixel_spacing
        Sagittal pixel size in mm (square pixels).
    matrix
        Sagittal rows and columns.
    slice_thickness, slice_gap
        Sagittal slice thickness and the gap between slices (mm).
    lordosis
        Scale of the lumbar curve (1 average, 0.5 flat, 1.4 marked).
    size
        Scale of the vertebrae and discs.
    midline_offset
        Patient-x distance (mm) from the middle sagittal slice to the spine's midline.
    field_strength
        Tesla.
    age, sex
        The synthetic patient.
    """

    classes: dict[str, str]
    pixel_spacing: float = 0.7
    matrix: int = 384
    slice_thickness: float = 4.0
    slice_gap: float = 0.4
    lordosis: float = 1.0
    size: float = 1.0
    midline_offset: float = 0.0
    field_strength: float = 1.5
    age: int = 50
    sex: str = "F"

    def __post_init__(self) -> None:
        missing = [level for level in LEVELS if level not in self.classes]
        if missing:
            raise ValueError(f'Argument "classes" lacks the levels {", ".join(missing)}.')
        for level, name in self.classes.items():
            if level not in LEVEL_KIND:
                raise ValueError(f'Argument "classes" has an unknown level {level!r}.')
            if name not in CLASSES[LEVEL_KIND[level]]:
                raise ValueError(
                    f'Argument "classes" gives {level} the unknown {LEVEL_KIND[level]} '
                    f"class {name!r}."
                )
        if not 0.3 <= self.pixel_spacing <= 1.5:
            raise ValueError(
                f'Argument "pixel_spacing" should be 0.3-1.5 mm, not {self.pixel_spacing}.'
            )
        if not 128 <= self.matrix <= 1024:
            raise ValueError(f'Argument "matrix" should be 128-1024, not {self.matrix}.')


def _draw(rng: np.random.Generator, probabilities: dict[str, float], scale: float) -> str:
    """One class: the abnormal share of ``probabilities`` scaled by ``scale`` (capped)."""
    names = list(probabilities)
    normal = probabilities["normal"]
    abnormal = min(0.95, (1.0 - normal) * scale)
    if rng.uniform() >= abnormal:
        return "normal"
    rest = np.array([probabilities[n] for n in names if n != "normal"], dtype=float)
    return str(rng.choice([n for n in names if n != "normal"], p=rest / rest.sum()))


def random_case(
    rng: np.random.Generator, *, prevalence: dict[str, dict[str, float]] | None = None
) -> SpineCase:
    """Draw a case: classes with realistic clustering, geometry in the brief's ranges.

    Abnormal levels cluster in older patients and in the lower lumbar spine (L4-L5 and
    L5-S1 most often), while each class keeps about its prevalence over many cases.

    Parameters
    ----------
    rng
        The only source of randomness.
    prevalence
        Kind -> class -> probability (:data:`DEFAULT_PREVALENCE` when ``None``).
    """
    prevalence = prevalence or DEFAULT_PREVALENCE
    for kind, table in prevalence.items():
        if kind not in CLASSES or set(table) != set(CLASSES[kind]) or min(table.values()) < 0:
            raise ValueError(f'Argument "prevalence" should give every {kind} class a probability.')
    age = int(rng.integers(20, 86))
    burden = float(np.clip(0.55 + (age - 20) / 66.0 * 0.9 + rng.normal(0.0, 0.15), 0.3, 1.6))
    discs = [level for level in LEVELS if LEVEL_KIND[level] == "disc"]
    disc_weight = dict(zip(discs, (0.6, 0.8, 0.9, 1.05, 1.3, 1.35), strict=True))
    classes = {}
    for level in LEVELS:
        kind = LEVEL_KIND[level]
        weight = disc_weight.get(level, 1.0)
        classes[level] = _draw(rng, dict(prevalence[kind]), burden * weight)
    matrix = int(rng.choice([320, 352, 384, 416, 448]))
    spacing = min(rng.uniform(260.0, 300.0) / matrix, 0.9)
    return SpineCase(
        classes=classes,
        pixel_spacing=round(float(spacing), 4),
        matrix=matrix,
        slice_thickness=4.0,
        slice_gap=round(float(rng.choice([0.0, 0.4, 0.8, 1.2])), 1),
        lordosis=float(rng.uniform(0.5, 1.4)),
        size=float(rng.uniform(0.9, 1.1)),
        midline_offset=float(rng.uniform(-1.5, 1.5)),
        field_strength=float(rng.choice([1.5, 3.0])),
        age=age,
        sex="F" if rng.uniform() < 0.5 else "M",
    )


@dataclass
class Segment:
    name: str
    kind: str  # "body", "disc", "sacral", "sacral_disc"
    s0: float
    s1: float
    depth0: float
    depth1: float
    width: float  # half-width (patient x)
    label: int

    @property
    def mid(self) -> float:
        return 0.5 * (self.s0 + self.s1)

    @property
    def height(self) -> float:
        return self.s1 - self.s0


@dataclass
class Lesion:
    kind: str
    segment: int
    values: dict[str, float]


@dataclass
class Scene:
    """One case laid out in the sagittal plane (millimetres; see the module docstring).

    Attributes
    ----------
    case
        The case drawn.
    arc, normal
        Per pixel of the sagittal grid: arc length along the centre line (mm, head to
        foot) and signed distance from it (mm, + towards the back).
    segments
        Bodies, discs and sacral segments, head to foot.
    lesions
        Every level's lesion with its drawn sizes.
    table_s, table_u, table_v, table_theta
        The centre line: arc length -> column and row position (mm) and tangent angle.
    """

    case: SpineCase
    arc: np.ndarray
    normal: np.ndarray
    segments: list[Segment]
    lesions: list[Lesion]
    table_s: np.ndarray
    table_u: np.ndarray
    table_v: np.ndarray
    table_theta: np.ndarray
    canal_ap: float
    skin: float
    fat: float
    conus: float
    sac_end: float
    spinous: float
    marrow: dict[int, tuple[float, float]] = field(default_factory=dict)
    nucleus: dict[int, tuple[float, float]] = field(default_factory=dict)
    bowel: np.ndarray = field(default_factory=lambda: np.zeros((1, 1), dtype=bool))
    band: _Band | None = None

    def segment(self, name: str) -> int:
        """Index of the segment named ``name`` (a level, or ``"S1"``)."""
        return next(i for i, seg in enumerate(self.segments) if seg.name == name)

    def to_image(self, s: float, n: float) -> tuple[float, float]:
        """(row, column) in sagittal pixels of the point at arc ``s``, distance ``n``."""
        u = float(np.interp(s, self.table_s, self.table_u))
        v = float(np.interp(s, self.table_s, self.table_v))
        theta = float(np.interp(s, self.table_s, self.table_theta))
        u += n * np.cos(theta)
        v -= n * np.sin(theta)
        spacing = self.case.pixel_spacing
        return v / spacing, u / spacing

    def level_point(self, level: str) -> tuple[float, float]:
        """(row, column) of a level's representative point: its body's or disc's centre."""
        return self.to_image(self.segments[self.segment(level)].mid, 0.0)


def _layout(case: SpineCase, rng: np.random.Generator) -> list[Segment]:
    """Bodies and discs from T10 to the coccyx, heights shaped by each level's class."""
    segments: list[Segment] = []
    s = 0.0
    names = [*_BODIES, "S1"]
    for i, body in enumerate(_BODIES):
        kind_class = case.classes.get(body, "normal")
        height = _BODY_HEIGHT[i] * case.size * rng.uniform(0.96, 1.04)
        if kind_class == "degenerated" and rng.uniform() < 0.5:
            height *= rng.uniform(0.76, 0.88)
        depth = _BODY_DEPTH[i] * case.size
        segments.append(
            Segment(body, "body", s, s + height, depth, depth, _BODY_WIDTH[i] * case.size,
                     Tissue.MARROW + len(segments))
        )  # fmt: skip
        s += height
        disc = f"{body}-{names[i + 1]}"
        disc_class = case.classes.get(disc, "normal")
        height = _DISC_HEIGHT[i] * case.size * rng.uniform(0.92, 1.08)
        if disc_class in ("bulge", "protrusion", "extrusion"):
            height *= rng.uniform(0.6, 0.82)
        below = _BODY_DEPTH[i + 1] if i + 1 < len(_BODIES) else _SACRAL_DEPTH[0]
        depth = 0.5 * (_BODY_DEPTH[i] + below) * case.size
        segments.append(
            Segment(disc, "disc", s, s + height, depth, depth, _BODY_WIDTH[i] * case.size + 1.0,
                     Tissue.NUCLEUS + len(segments))
        )  # fmt: skip
        s += height
    for i, height in enumerate(_SACRAL_HEIGHT):
        h = height * case.size
        segments.append(
            Segment(f"S{i + 1}", "sacral", s, s + h, _SACRAL_DEPTH[i] * case.size,
                     _SACRAL_DEPTH[i + 1] * case.size, _SACRAL_WIDTH[i] * case.size,
                     Tissue.MARROW + len(segments))
        )  # fmt: skip
        s += h
        if i < len(_SACRAL_HEIGHT) - 1:
            d = _SACRAL_DEPTH[i + 1] * case.size
            segments.append(
                Segment(f"S{i + 1}-S{i + 2}", "sacral_disc", s, s + 2.0, d, d,
                         _SACRAL_WIDTH[i + 1] * case.size, Tissue.SACRAL_DISC)
            )  # fmt: skip
            s += 2.0
    return segments


def _centre_line(
    case: SpineCase, segments: list[Segment], rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Arc length table with the lordotic curve: (s, u, v, theta), u/v in image mm."""
    end = segments[-1].s1
    s = np.arange(-160.0, end + 160.0, _STEP)
    bodies = [seg for seg in segments if seg.kind == "body"]
    sacral = [seg for seg in segments if seg.kind == "sacral"]
    keys = [bodies[0].mid - 80.0] + [b.mid for b in bodies]
    keys += [sacral[0].mid, sacral[2].mid, sacral[4].mid, sacral[4].mid + 60.0]
    lumbar = [a * case.lordosis for a in _ANGLE]
    sacrum = [a * (0.75 + 0.25 * case.lordosis) for a in _SACRAL_ANGLE]
    angles = np.array([-3.0, *lumbar, *sacrum, 0.0]) + rng.uniform(-4.0, 4.0)
    theta = np.radians(np.interp(s, keys, angles))
    theta = ndimage.gaussian_filter1d(theta, 10.0 / _STEP, mode="nearest")
    u = np.cumsum(np.sin(theta)) * _STEP
    v = np.cumsum(np.cos(theta)) * _STEP
    side = case.matrix * case.pixel_spacing
    anchor = segments[[seg.name for seg in segments].index("L3")].mid
    u0, v0 = np.interp(anchor, s, u), np.interp(anchor, s, v)
    u += side * rng.uniform(0.40, 0.50) - u0
    v += side * 0.5 + rng.uniform(-10.0, 8.0) - v0
    return s, u, v, theta


def _project(
    shape: tuple[int, int], spacing: float, s: np.ndarray, u: np.ndarray, v: np.ndarray,
    theta: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Arc length and signed normal distance of every pixel.

    Newton steps onto the centre line on a grid four times coarser, then bilinear
    interpolation: both maps are nearly linear over a few pixels.
    """
    rows, cols = shape
    step = 4
    vv = (np.arange(0, rows + step, step, dtype=np.float64) * spacing)[:, None]
    uu = (np.arange(0, cols + step, step, dtype=np.float64) * spacing)[None, :]
    vv, uu = np.broadcast_arrays(vv, uu)
    arc = np.interp(vv, v, s)
    sin_t, cos_t = np.sin(theta), np.cos(theta)
    for _ in range(5):
        du = uu - np.interp(arc, s, u)
        dv = vv - np.interp(arc, s, v)
        arc = arc + du * np.interp(arc, s, sin_t) + dv * np.interp(arc, s, cos_t)
    du = uu - np.interp(arc, s, u)
    dv = vv - np.interp(arc, s, v)
    normal = du * np.interp(arc, s, cos_t) - dv * np.interp(arc, s, sin_t)
    return upsample(arc, step, shape), upsample(normal, step, shape)


def upsample(coarse: np.ndarray, step: int, shape: tuple[int, int]) -> np.ndarray:
    """Bilinear interpolation of a grid sampled every ``step`` pixels onto ``shape`` (float32).

    ``coarse[i, j]`` is the value at pixel ``(i * step, j * step)``; it must reach past the
    last row and column.
    """
    out: np.ndarray = coarse.astype(np.float32)
    for axis, size in enumerate(shape):
        position = np.arange(size, dtype=np.float32) / step
        low = position.astype(np.intp)
        weight = position - low
        a, b = np.take(out, low, axis=axis), np.take(out, low + 1, axis=axis)
        weight = weight[:, None] if axis == 0 else weight[None, :]
        out = a + (b - a) * weight
    return out


def _lesions(case: SpineCase, segments: list[Segment], rng: np.random.Generator) -> list[Lesion]:
    """Each abnormal level's lesion with its drawn size and position."""
    out = []
    names = [seg.name for seg in segments]
    for level in LEVELS:
        name = case.classes[level]
        index = names.index(level)
        u = rng.uniform
        if name == "degenerated":
            features = {
                "osteophyte": float(u() < 0.85), "modic": float(u() < 0.6),
                "patchy": float(u() < 0.6), "sclerosis": float(u() < 0.5),
            }  # fmt: skip
            if sum(features.values()) < 2:
                features["modic"] = features["osteophyte"] = 1.0
            out.append(
                Lesion(
                    "degenerated",
                    index,
                    {
                        **features,
                        "length": u(3.0, 7.0),
                        "posterior": float(u() < 0.4),
                        "modic_type": float(rng.choice([1, 2, 3], p=[0.4, 0.45, 0.15])),
                        "band": u(3.0, 8.0),
                        "ends": float(rng.integers(0, 3)),
                        "f1": u(0.35, 0.8),
                        "f2": u(0.35, 0.8),
                        "a1": u(0, np.pi),
                        "a2": u(0, np.pi),
                        "p1": u(0, 2 * np.pi),
                        "p2": u(0, 2 * np.pi),
                    },
                )  # fmt: skip
            )
        elif name == "bulge":
            out.append(Lesion("bulge", index, {"amp": u(2.0, 3.2)}))
        elif name == "protrusion":
            out.append(
                Lesion(
                    "protrusion",
                    index,
                    {
                        "amp": u(3.8, 6.0),
                        "x0": u(-4.0, 4.0),
                        "wl": u(7.0, 11.0),
                        "shift": u(-0.12, 0.12),
                    },
                )  # fmt: skip
            )
        elif name == "extrusion":
            out.append(
                Lesion(
                    "extrusion",
                    index,
                    {
                        "amp": u(6.0, 9.5),
                        "x0": u(-4.0, 4.0),
                        "wl": u(8.0, 12.0),
                        "mig": u(5.0, 11.0),
                        "dir": 1.0 if u() < 0.6 else -1.0,
                    },
                )  # fmt: skip
            )
        elif name == "schmorl_node":
            out.append(
                Lesion(
                    "schmorl_node",
                    index,
                    {
                        "r": u(3.5, 6.0),
                        "n0": u(-0.2, 0.2),
                        "x0": u(-2.0, 2.0),
                        "rl": u(6.0, 9.0),
                        "side": 1.0 if u() < 0.5 else -1.0,
                        "edema": float(u() < 0.5),
                    },
                )  # fmt: skip
            )
        if LEVEL_KIND[level] == "vertebra" and name == "normal" and u() < 0.1:
            out.append(Lesion("hemangioma", index, {"r": u(2.0, 4.0), "t": u(0.3, 0.7)}))
    return out


def build_scene(case: SpineCase, rng: np.random.Generator) -> Scene:
    """Lay the case out: segments, centre line, pixel maps, lesions and tissue contrasts.

    Parameters
    ----------
    case
        What to draw.
    rng
        Fixes the drawn sizes; the same case and generator state give the same scene.
    """
    segments = _layout(case, rng)
    s, u, v, theta = _centre_line(case, segments, rng)
    arc, normal = _project((case.matrix, case.matrix), case.pixel_spacing, s, u, v, theta)
    names = [seg.name for seg in segments]
    scene = Scene(
        case=case, arc=arc, normal=normal, segments=segments,
        lesions=_lesions(case, segments, rng), table_s=s, table_u=u, table_v=v,
        table_theta=theta, canal_ap=rng.uniform(12.5, 17.0), skin=rng.uniform(78.0, 110.0),
        fat=rng.uniform(8.0, 32.0), conus=segments[names.index("L1")].mid + rng.uniform(-8, 8),
        sac_end=segments[names.index("S2")].mid, spinous=rng.uniform(24.0, 34.0),
    )  # fmt: skip
    m = case.matrix
    coarse = ndimage.gaussian_filter(rng.standard_normal((m // 12 + 2, m // 12 + 2)), 0.7)
    scene.bowel = upsample(coarse, 12, (m, m)) > 0.1
    fatty = 0.55 + 0.25 * min(max((case.age - 20) / 60.0, 0.0), 1.0)
    for i, seg in enumerate(segments):
        if seg.kind in ("body", "sacral"):
            scene.marrow[i] = (fatty * rng.uniform(0.93, 1.07), 0.42 * rng.uniform(0.92, 1.08))
        elif seg.kind == "disc":
            label = case.classes.get(seg.name, "normal")
            if label in ("bulge", "protrusion", "extrusion"):
                q = rng.uniform(0.3, 0.6)
            elif label == "schmorl_node":
                q = rng.uniform(0.55, 1.0)
            else:
                q = rng.uniform(0.85, 1.08) if rng.uniform() < 0.9 else rng.uniform(0.68, 0.85)
            if seg.name in ("T10-T11", "T11-T12"):
                q = rng.uniform(0.7, 1.0)
            scene.nucleus[i] = (0.36 * (0.85 + 0.15 * q), 0.9 * q)
    return scene


def pixel_box(
    scene: Scene, s0: float, s1: float, n0: float, n1: float
) -> tuple[slice, slice] | None:
    """The pixel rows and columns that hold the region s0..s1 x n0..n1 (None: off image)."""
    ss = np.linspace(s0, s1, 6)
    rows, cols = [], []
    for n in (n0, n1):
        for value in ss:
            r, c = scene.to_image(float(value), n)
            rows.append(r)
            cols.append(c)
    m = scene.case.matrix
    r0, r1 = max(int(min(rows)) - 3, 0), min(int(max(rows)) + 4, m)
    c0, c1 = max(int(min(cols)) - 3, 0), min(int(max(cols)) + 4, m)
    if r0 >= r1 or c0 >= c1:
        return None
    return slice(r0, r1), slice(c0, c1)


def lateral(dx: float, half_width: float) -> float:
    return float(np.sqrt(max(0.0, 1.0 - (dx / half_width) ** 2))) if half_width > 0 else 0.0


@dataclass
class _Band:
    """The pixels near the column, as flat arrays, with what does not depend on the slice."""

    index: np.ndarray
    S: np.ndarray  # noqa: N815 - arc length
    N: np.ndarray  # noqa: N815 - signed distance
    k: np.ndarray
    t: np.ndarray
    kind: np.ndarray
    depth: np.ndarray
    base: np.ndarray  # the slice-independent labels of the whole image


def band_of(scene: Scene) -> _Band:
    S, N = scene.arc, scene.normal  # noqa: N806 - the two coordinate maps
    base = np.full(S.shape, Tissue.AIR, dtype=np.uint8)
    base[scene.skin > N] = Tissue.MUSCLE
    base[(scene.skin > N) & (scene.skin - scene.fat < N)] = Tissue.FAT
    base[N < -50.0] = Tissue.VISCERA
    base[(N < -50.0) & scene.bowel] = Tissue.FAT
    index = np.flatnonzero((N >= -50.0) & (scene.skin - scene.fat >= N))
    bs, bn = S.ravel()[index], N.ravel()[index]
    segs = scene.segments
    s0 = np.array([g.s0 for g in segs], dtype=np.float32)
    s1 = np.array([g.s1 for g in segs], dtype=np.float32)
    k = np.clip(np.searchsorted(s1, bs), 0, len(segs) - 1)
    t = np.clip((bs - s0[k]) / (s1[k] - s0[k]), 0.0, 1.0).astype(np.float32)
    d0 = np.array([g.depth0 for g in segs], dtype=np.float32)
    d1 = np.array([g.depth1 for g in segs], dtype=np.float32)
    kinds = ("body", "disc", "sacral", "sacral_disc")
    kind = np.array([kinds.index(g.kind) for g in segs], dtype=np.int8)[k]
    return _Band(index, bs, bn, k, t, kind, d0[k] + (d1[k] - d0[k]) * t, base)
