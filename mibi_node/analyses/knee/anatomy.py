"""The knee the phantom draws: one case's anatomy and its tissue map on a voxel grid.

A :class:`KneeAnatomy` fixes what a case shows, in millimetres of a knee frame: ``X`` from
medial to lateral, ``Y`` from anterior to posterior, ``Z`` from inferior to superior, with
the centre of the tibial plateau near the origin. The bones are approximate signed distance
fields (negative inside): the distal femur is the smooth union of two condyle ellipsoids, a
grooved trochlea and the shaft; the tibia a sloped plateau (a concave medial and a convex
lateral compartment, the tibial spines between) on a flaring shaft; the patella a grooved
ellipsoid in front of the trochlea; the fibular head behind and lateral. Each cartilage
plate is the shell between its bone surface and that surface moved out by the plate's local
thickness (first-order exact along the surface normal), tapered at its edges, thinned or
broken by the case's :class:`Defect` s. The femoral condyles are placed so that their
cartilage touches the tibial cartilage in the weight-bearing zone; where the two shells
overlap each voxel goes to the plate whose bone is nearer in units of its thickness.

:func:`tissue_map` evaluates it all at the centres of a voxel grid (vectorised numpy):
for a locally planar boundary the tissue at a voxel's centre is the one that fills most
of the voxel, so the truth labels are each voxel's majority label.
:mod:`~mibi_node.analyses.knee.phantom` turns the tissues into DESS-like grey values.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

import numpy as np

__all__ = ["Defect", "KneeAnatomy", "Tissue", "random_anatomy", "tissue_map"]

logger = logging.getLogger(__name__)

_PLATES = (
    "femoral_cartilage",
    "medial_tibial_cartilage",
    "lateral_tibial_cartilage",
    "patellar_cartilage",
)


class Tissue:
    """Values of the tissue map (``uint8``); the four cartilage plates come last, in label order."""

    AIR, FAT, MUSCLE, MARROW, CORTEX, FLUID, MENISCUS, LIGAMENT = range(8)
    FEMORAL, MEDIAL_TIBIAL, LATERAL_TIBIAL, PATELLAR = range(8, 12)
    COUNT = 12


@dataclass(frozen=True)
class Defect:
    """A focal cartilage lesion.

    Attributes
    ----------
    structure
        The plate (a key of :data:`~mibi_node.analyses.knee.labels.STRUCTURES`).
    kind
        ``"thinning"`` (the plate keeps ``1 - depth`` of its thickness at the centre) or
        ``"full_thickness"`` (no cartilage inside ``radius``: fluid fills the hole).
    centre
        Knee-frame position (mm) on the plate.
    radius
        mm.
    depth
        Fraction of the thickness lost at the centre (1 for a full-thickness defect).
    """

    structure: str
    kind: str
    centre: tuple[float, float, float]
    radius: float
    depth: float


@dataclass(frozen=True)
class KneeAnatomy:
    """What one case shows, in knee-frame millimetres (see the module text).

    Attributes
    ----------
    side
        ``"L"`` or ``"R"``.
    scale
        Knee size relative to a typical adult knee (0.9-1.1); thicknesses do not scale.
    thickness
        Plate key -> nominal thickness (mm) before local variation and defects.
    defects
        The focal lesions.
    rotation_deg
        Small rotations (about the knee's X, Y and Z axes) of the knee in the scanner.
    shift_mm
        Offset of the knee from the centre of the field of view (slice, AP, SI), mm.
    effusion
        Width (mm) of the joint fluid layer along the cartilage surfaces.
    overlap
        How far (mm) the femoral and tibial cartilage press into each other at contact.
    phases
        Phases (radians) of the smooth thickness and fluid variations.
    medial_depth, lateral_bulge, slope_deg
        The tibial plateau: depth (mm) of the concave medial compartment, height (mm) of the
        convex lateral one, posterior slope (degrees).
    groove
        Depth (mm) of the trochlear groove (and height of the patella's ridge).
    gap_patella
        Distance (mm) between the patellar and the trochlear cartilage.
    meniscus_height
        Height (mm) of the menisci's outer rim.
    """

    side: str
    scale: float
    thickness: dict[str, float]
    defects: tuple[Defect, ...]
    rotation_deg: tuple[float, float, float]
    shift_mm: tuple[float, float, float]
    effusion: float
    overlap: float
    phases: tuple[float, ...]
    medial_depth: float
    lateral_bulge: float
    slope_deg: float
    groove: float
    gap_patella: float
    meniscus_height: float


def random_anatomy(
    rng: np.random.Generator, *, side: str | None = None, defect_rate: float = 0.6
) -> KneeAnatomy:
    """Draw one case.

    Parameters
    ----------
    rng
        The case's generator.
    side
        ``"L"``, ``"R"`` or ``None`` (drawn).
    defect_rate
        Mean number of focal lesions per case (Poisson, at most 3).
    """
    if side is None:
        side = "L" if rng.uniform() < 0.5 else "R"
    if side not in ("L", "R"):
        raise ValueError(f'Argument "side" should be "L" or "R", not {side!r}.')
    if not 0.0 <= defect_rate <= 3.0:
        raise ValueError(f'Argument "defect_rate" should be 0-3, not {defect_rate!r}.')
    scale = float(rng.uniform(0.9, 1.1))
    thickness = {
        "femoral_cartilage": float(rng.uniform(2.0, 2.7)),
        "medial_tibial_cartilage": float(rng.uniform(1.9, 2.6)),
        "lateral_tibial_cartilage": float(rng.uniform(2.1, 2.9)),
        "patellar_cartilage": float(rng.uniform(2.2, 3.0)),
    }
    count = min(int(rng.poisson(defect_rate)), 3)
    anatomy = KneeAnatomy(
        side=side,
        scale=scale,
        thickness=thickness,
        defects=(),
        rotation_deg=tuple(float(v) for v in rng.uniform(-4.0, 4.0, 3)),  # type: ignore[arg-type]
        shift_mm=tuple(float(v) for v in rng.uniform(-3.0, 3.0, 3)),  # type: ignore[arg-type]
        effusion=float(rng.uniform(0.3, 1.8)),
        overlap=float(rng.uniform(0.5, 1.0)),
        phases=tuple(float(v) for v in rng.uniform(0, 2 * np.pi, 8)),
        medial_depth=float(rng.uniform(0.5, 2.0)),
        lateral_bulge=float(rng.uniform(0.3, 1.5)),
        slope_deg=float(rng.uniform(4.0, 9.0)),
        groove=float(rng.uniform(4.0, 7.0)),
        gap_patella=float(rng.uniform(0.2, 1.5)),
        meniscus_height=float(rng.uniform(5.0, 7.5)),
    )
    geometry = _geometry(anatomy)
    defects = tuple(_random_defect(rng, anatomy, geometry) for _ in range(count))
    return replace(anatomy, defects=defects)


def _random_defect(rng: np.random.Generator, a: KneeAnatomy, g: _Geometry) -> Defect:
    """A lesion on a weight-bearing (or the patellar) surface."""
    structure = str(rng.choice(_PLATES, p=[0.5, 0.2, 0.15, 0.15]))
    full = rng.uniform() < 0.4
    kind = "full_thickness" if full else "thinning"
    radius = float(rng.uniform(2.0, 4.5) if full else rng.uniform(3.5, 7.0))
    depth = 1.0 if full else float(rng.uniform(0.3, 0.6))
    dx, dy = float(rng.uniform(-4, 4)) * g.s, float(rng.uniform(-8, 6)) * g.s
    if structure == "femoral_cartilage":
        (cx, cy, cz), (_rx, ry, rz) = g.cond[int(rng.integers(0, 2))]
        centre = (cx + dx, cy + dy, cz - rz * np.sqrt(max(0.0, 1 - (dy / ry) ** 2)))
    elif structure == "patellar_cartilage":
        (px, py, pz), (_rx, ry, _rz) = g.patella
        centre = (px + dx, py + ry + a.groove * np.exp(-((dx / (9.0 * g.s)) ** 2)), pz + dy)
    else:
        cx = g.compartments[0 if structure.startswith("medial") else 1][0]
        top = float(
            _plateau(a, np.array([cx + dx], np.float32), np.array([dy], np.float32), g.s)[0]
        )
        centre = (cx + dx, dy, top)
    return Defect(structure, kind, (float(centre[0]), float(centre[1]), float(centre[2])),
                  radius, depth)  # fmt: skip


@dataclass(frozen=True)
class _Geometry:
    """The bones' shape parameters of one case, derived from its anatomy."""

    s: float
    cond: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...]
    troch: tuple[tuple[float, float, float], tuple[float, float, float]]
    shaft: tuple[float, float, float, float]  # centre X, Y, radii X, Y
    patella: tuple[tuple[float, float, float], tuple[float, float, float]]
    compartments: tuple[tuple[float, float, float, float], ...]  # centre X, Y, radii X, Y


def _plateau(a: KneeAnatomy, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
    """Height (mm) of the tibial bone surface: slope, medial bowl, lateral dome, spines."""
    z = -np.tan(np.radians(a.slope_deg)) * y
    cm, cl = -17.0 * s, 17.0 * s
    bowl = np.clip(1.0 - ((x - cm) / (13 * s)) ** 2 - (y / (20 * s)) ** 2, 0, None)
    dome = np.clip(1.0 - ((x - cl) / (12 * s)) ** 2 - (y / (17 * s)) ** 2, 0, None)
    spines = 5.0 * s * np.exp(-((x / (4.5 * s)) ** 2) - (y / (9 * s)) ** 2)
    return (z - a.medial_depth * bowl + a.lateral_bulge * dome + spines).astype(np.float32)


def _geometry(a: KneeAnatomy) -> _Geometry:
    s = a.scale
    t = a.thickness
    cond = []
    for cx, radii in ((-18.0 * s, (11.5 * s, 25 * s, 20 * s)),
                      (18.0 * s, (11.0 * s, 23 * s, 18.5 * s))):  # fmt: skip
        cy = 2.0 * s
        tib = "medial_tibial_cartilage" if cx < 0 else "lateral_tibial_cartilage"
        # lower the condyle onto the sloped plateau: the highest point of plateau minus
        # the condyle's profile along its AP line is where the two plates touch
        ys = np.linspace(cy - 0.6 * radii[1], cy + 0.6 * radii[1], 241, dtype=np.float32)
        top = _plateau(a, np.full_like(ys, cx), ys, s)
        rise = radii[2] * (1.0 - np.sqrt(1.0 - ((ys - cy) / radii[1]) ** 2))
        cz = float(np.max(top - rise)) + t[tib] + t["femoral_cartilage"] - a.overlap + radii[2]
        cond.append(((cx, cy, cz), radii))
    zc = 0.5 * (cond[0][0][2] + cond[1][0][2])
    troch = ((0.0, -9.0 * s, zc + 12.0 * s), (27.0 * s, 15.5 * s, 21.0 * s))
    shaft = (0.0, -3.0 * s, 17.0 * s, 15.0 * s)
    pz = zc + 9.0 * s
    # put the patella's cartilage a small gap in front of the trochlear cartilage
    ys = np.linspace(-60.0, 10.0, 1401, dtype=np.float32)
    px = 2.0 * s
    xs, zs = np.full_like(ys, px), np.full_like(ys, pz)
    d = _femur(a, xs, ys, zs, cond, troch, shaft)
    front = float(ys[np.argmax(d < 0)])
    pr = (19.0 * s, 10.0 * s, 17.0 * s)
    py = front - t["femoral_cartilage"] - a.gap_patella - t["patellar_cartilage"] - pr[1]
    patella = ((px, py, pz), pr)
    compartments = ((-17.0 * s, 0.0, 13.5 * s, 21.0 * s), (17.0 * s, 0.0, 12.5 * s, 18.0 * s))
    return _Geometry(s, tuple(cond), troch, shaft, patella, compartments)


def _ellipsoid(
    x: np.ndarray, y: np.ndarray, z: np.ndarray,
    centre: tuple[float, float, float], radii: tuple[float, float, float],
) -> np.ndarray:  # fmt: skip
    """Approximate signed distance (mm) to an ellipsoid: ``(q - 1) / |grad q|``."""
    px, py, pz = (x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2]
    q = np.sqrt(px * px + py * py + pz * pz)
    g = np.sqrt((px / radii[0]) ** 2 + (py / radii[1]) ** 2 + (pz / radii[2]) ** 2) + 1e-6
    return (q - 1.0) * q / g


def _ellipse(
    x: np.ndarray,
    y: np.ndarray,
    centre: tuple[float, float],
    radii: tuple[float | np.ndarray, float | np.ndarray],
) -> np.ndarray:
    """Approximate signed distance (mm) to an elliptic cylinder along Z."""
    px, py = (x - centre[0]) / radii[0], (y - centre[1]) / radii[1]
    q = np.sqrt(px * px + py * py)
    g = np.sqrt((px / radii[0]) ** 2 + (py / radii[1]) ** 2) + 1e-6
    return (q - 1.0) * q / g


def _grooved(
    x: np.ndarray, y: np.ndarray, z: np.ndarray, *, groove: float, scale: float,
    centre: tuple[float, float, float], radii: tuple[float, float, float],
) -> np.ndarray:  # fmt: skip
    """An ellipsoid whose front is pushed back along the midline: the trochlear groove."""
    if groove:
        y = y - (groove * np.exp(-((x / (9.0 * scale)) ** 2))).astype(np.float32)
    return _ellipsoid(x, y, z, centre, radii)


def _fibula_shaft(x: np.ndarray, y: np.ndarray, z: np.ndarray, *, scale: float) -> np.ndarray:
    s = scale
    return np.maximum(_ellipse(x, y, (30.0 * s, 16.0 * s), (6 * s, 6 * s)), z + 24.0 * s)


def _smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Smooth union of two distance fields (a fillet of about ``k`` mm)."""
    h = np.clip(k - np.abs(a - b), 0.0, None) / k
    return np.minimum(a, b) - h * h * (k / 4.0)


def _groove(a: KneeAnatomy, x: np.ndarray, s: float) -> np.ndarray:
    """How far (mm) the trochlear groove and the patella's ridge lie behind their sides."""
    return (a.groove * np.exp(-((x / (9.0 * s)) ** 2))).astype(np.float32)


def _femur(
    a: KneeAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray,
    cond: tuple[tuple[tuple[float, float, float], tuple[float, float, float]], ...] | list,
    troch: tuple[tuple[float, float, float], tuple[float, float, float]],
    shaft: tuple[float, float, float, float], boxes: _Boxes | None = None,
) -> np.ndarray:  # fmt: skip
    s = a.scale

    def part(
        ellipsoid: tuple[tuple[float, float, float], tuple[float, float, float]], groove: float
    ) -> np.ndarray:
        draw = partial(_grooved, groove=groove, scale=s, centre=ellipsoid[0], radii=ellipsoid[1])
        if boxes is None:
            return draw(x, y, z)
        return _boxed(boxes, boxes.around(*ellipsoid, 15.0 + a.groove), x, y, z, draw)

    d = np.minimum(part(cond[0], 0.0), part(cond[1], 0.0))
    d = _smin(d, part(troch, a.groove), 6.0 * s)
    body = np.maximum(_ellipse(x, y, shaft[:2], shaft[2:]), troch[0][2] - z)
    return _smin(d, body, 10.0 * s)


def _segment(
    x: np.ndarray, y: np.ndarray, z: np.ndarray,
    p: tuple[float, float, float], q: tuple[float, float, float],
) -> np.ndarray:  # fmt: skip
    """Distance (mm) to the segment from ``p`` to ``q``."""
    d = [float(b - a) for a, b in zip(p, q, strict=True)]
    norm = d[0] * d[0] + d[1] * d[1] + d[2] * d[2]
    px, py, pz = x - float(p[0]), y - float(p[1]), z - float(p[2])
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / norm, 0.0, 1.0)
    px -= t * d[0]
    py -= t * d[1]
    pz -= t * d[2]
    return np.sqrt(px * px + py * py + pz * pz)


class _Boxes:
    """Index boxes around knee-frame boxes, so that small structures are drawn only there.

    The grid's knee-frame coordinates are linear in the voxel index (a regular grid), so
    the index box of a knee-frame box is the bounding box of its mapped corners.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.shape = x.shape
        self.origin = np.array([x.flat[0], y.flat[0], z.flat[0]], dtype=np.float64)
        columns = []
        for axis, n in enumerate(self.shape):
            step = [0] * len(self.shape)
            step[axis] = 1 if n > 1 else 0
            at = tuple(step)
            columns.append(np.array([x[at], y[at], z[at]], dtype=np.float64) - self.origin)
        self.inverse = np.linalg.pinv(np.stack(columns, axis=1))

    def __call__(self, low: Sequence[float], high: Sequence[float]) -> tuple[slice, ...]:
        corners = np.array(list(itertools.product(*zip(low, high, strict=True))))
        index = (corners - self.origin) @ self.inverse.T
        out = []
        for axis, n in enumerate(self.shape):
            if n == 1:
                out.append(slice(0, 1))
                continue
            first = int(np.clip(np.floor(index[:, axis].min()) - 1, 0, n))
            last = int(np.clip(np.ceil(index[:, axis].max()) + 2, 0, n))
            out.append(slice(first, max(first, last)))
        return tuple(out)

    def around(
        self, centre: Sequence[float], radii: Sequence[float], margin: float
    ) -> tuple[slice, ...]:
        """The box of an ellipsoid (or a segment's end points) grown by ``margin`` mm."""
        return self(
            [c - r - margin for c, r in zip(centre, radii, strict=True)],
            [c + r + margin for c, r in zip(centre, radii, strict=True)],
        )


def _boxed(
    boxes: _Boxes, box: tuple[slice, ...], x: np.ndarray, y: np.ndarray, z: np.ndarray,
    draw: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray], far: float = 1e3,
) -> np.ndarray:  # fmt: skip
    """``draw`` evaluated inside ``box``, ``far`` elsewhere."""
    out = np.full(boxes.shape, far, dtype=np.float32)
    out[box] = draw(x[box], y[box], z[box])
    return out


def _variation(a: KneeAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray, n: int) -> np.ndarray:
    """Smooth +-10 % thickness variation of plate ``n``."""
    ph = a.phases
    return 1.0 + 0.1 * np.sin(x / 9.0 + ph[n]) * np.sin((y + z) / 11.0 + ph[n + 4])


def _defect_factor(
    a: KneeAnatomy, plate: str, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> np.ndarray | float:
    factor: np.ndarray | float = 1.0
    for defect in a.defects:
        if defect.structure != plate:
            continue
        cx, cy, cz = defect.centre
        r2 = ((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / defect.radius**2
        if defect.kind == "full_thickness":
            factor = factor * np.where(r2 < 1.0, 0.0, 1.0)
        else:
            factor = factor * (1.0 - defect.depth * np.exp(-r2 * r2))
    return factor


def tissue_map(
    a: KneeAnatomy, x: np.ndarray, y: np.ndarray, z: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The tissue of each point and the depth of each cartilage point in its plate.

    Parameters
    ----------
    a
        The case.
    x, y, z
        Knee-frame coordinates (mm, float32) of the voxel centres, all of one shape.

    Returns
    -------
    tissue
        ``uint8`` values of :class:`Tissue`.
    depth
        ``float32``: in cartilage, the distance (mm) to the plate's articular surface
        (0 at the surface); elsewhere a large value. The grey values use it for the
        cartilage's zonal contrast and the thin dark line where two plates touch.
    """
    g = _geometry(a)
    s = g.s
    t = a.thickness
    boxes = _Boxes(x, y, z)
    tissue = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    # soft tissue: the leg, subcutaneous fat, muscles
    body = _ellipse(x, y, (0.0, 0.0), (50.0 * s, 56.0 * s))
    tissue[body < 0] = Tissue.FAT
    for centre, radii in (((-20.0, 42.0, -20.0), (15.0, 13.0, 70.0)),
                          ((20.0, 42.0, -25.0), (14.0, 12.0, 65.0)),
                          ((-32.0, -20.0, 75.0), (16.0, 20.0, 60.0)),
                          ((30.0, -18.0, 80.0), (12.0, 18.0, 55.0))):  # fmt: skip
        c = (centre[0] * s, centre[1] * s, centre[2] * s)
        r = (radii[0] * s, radii[1] * s, radii[2] * s)
        draw = partial(_ellipsoid, centre=c, radii=r)
        muscle = _boxed(boxes, boxes.around(c, r, 1.0), x, y, z, draw) < 0
        tissue[muscle & (body < -5.0)] = Tissue.MUSCLE
    # bones' distance fields
    femur = _femur(a, x, y, z, g.cond, g.troch, g.shaft, boxes)
    top = _plateau(a, x, y, s)
    flare = np.clip(-z / (60.0 * s), 0.0, 1.0) ** 1.5
    tib_r = (38.0 * s - 14.0 * s * flare, 26.0 * s - 6.0 * s * flare)
    tibia = np.maximum(z - top, _ellipse(x, y, (0.0, 2.0 * s), tib_r))
    groove = _groove(a, x, s)
    draw = partial(_grooved, groove=a.groove, scale=s, centre=g.patella[0], radii=g.patella[1])
    patella = _boxed(boxes, boxes.around(*g.patella, 15.0 + a.groove), x, y, z, draw)
    head = ((30.0 * s, 16.0 * s, -24.0 * s), (8.0 * s, 8.0 * s, 11.0 * s))
    draw = partial(_ellipsoid, centre=head[0], radii=head[1])
    fibula = _boxed(boxes, boxes.around(*head, 2.0), x, y, z, draw)
    neck = boxes((22.0 * s, 8.0 * s, -1e3), (38.0 * s, 24.0 * s, -24.0 * s + 2.0))
    fibula = np.minimum(fibula, _boxed(boxes, neck, x, y, z, partial(_fibula_shaft, scale=s)))
    # the plates' shells (depth from bone), before the contact is resolved
    # (intact thicknesses: where a defect removes cartilage, joint fluid fills the hole)
    fem_intact = t["femoral_cartilage"] * _variation(a, x, y, z, 0) * _femoral_cover(g, x, y, z)
    fem_t = fem_intact * _defect_factor(a, "femoral_cartilage", x, y, z)
    fem = (femur > 0) & (femur < fem_t)
    tib = []
    for n, (plate, comp) in enumerate(zip(_PLATES[1:3], g.compartments, strict=True)):
        q = np.sqrt(((x - comp[0]) / comp[2]) ** 2 + ((y - comp[1]) / comp[3]) ** 2)
        cover = np.clip((1.0 - q) / 0.12, 0.0, 1.0)
        intact = t[plate] * _variation(a, x, y, z, n + 1) * cover
        tib.append((z - top, intact * _defect_factor(a, plate, x, y, z), intact))
    pat_intact = t["patellar_cartilage"] * _variation(a, x, y, z, 3)
    (px, py, pz), (prx, pry, prz) = g.patella
    pat_cover = np.clip((y - groove - py + 0.2 * pry) / 1.5, 0.0, 1.0)
    pat_cover *= np.clip((0.8 * prz - np.abs(z - pz)) / 1.5, 0.0, 1.0)
    pat_cover *= np.clip((0.85 * prx - np.abs(x - px)) / 1.5, 0.0, 1.0)
    pat_intact = pat_intact * pat_cover
    pat_t = pat_intact * _defect_factor(a, "patellar_cartilage", x, y, z)
    pat = (patella > 0) & (patella < pat_t)
    # joint fluid along the articular surfaces and in the joint space
    ph = a.phases
    e = a.effusion * np.clip(0.5 + np.sin(x / 7.0 + ph[2]) * np.sin(z / 8.0 - y / 9.0 + ph[5]),
                             0.0, 1.0)  # fmt: skip
    near = (femur > 0) & (femur < fem_intact + e) & (fem_intact > 0.2)
    near |= (patella > 0) & (patella < pat_intact + e) & (pat_intact > 0.2)
    for height, _, intact in tib:
        near |= (height > 0) & (height < intact + e) & (intact > 0.2)
    joint = (femur > 0) & (tibia > 0) & (femur < 2.0 + e) & (z - top < 2.0 + e)
    pouch = (femur > 0) & (femur < a.effusion + 1.0) & (y < -4.0 * s) & (z > g.patella[0][2])
    pouch &= z < g.patella[0][2] + 35.0 * s
    tissue[(near | joint | pouch) & (body < -3.0)] = Tissue.FLUID
    # tendons and cruciate ligaments
    pole = (px, py - 2.0 * s, pz - 0.8 * prz)
    bands = (
        (pole, (px, -30.0 * s, -32.0 * s), 3.0 * s),  # patellar tendon
        ((px, py - 2.0 * s, pz + 0.8 * prz), (px, py + 4.0 * s, pz + 70.0 * s), 3.5 * s),
        ((-4.0 * s, 4.0 * s, g.troch[0][2] - 8.0 * s), (0.0, 22.0 * s, -8.0 * s), 4.0 * s),
        ((6.0 * s, 12.0 * s, g.troch[0][2] - 6.0 * s), (-1.0 * s, -8.0 * s, 1.0 * s), 3.2 * s),
    )
    for n, (start, end, radius) in enumerate(bands):
        box = boxes([min(u, v) - radius for u, v in zip(start, end, strict=True)],
                    [max(u, v) + radius for u, v in zip(start, end, strict=True)])  # fmt: skip
        band = _boxed(boxes, box, x, y, z, partial(_segment, p=start, q=end)) < radius
        if n < 2:  # the tendons are flat bands
            band &= np.abs(x - px) < 12.0 * s
        tissue[band] = Tissue.LIGAMENT
    # menisci: wedges on the periphery of each compartment
    for comp, (height, _, thick) in zip(g.compartments, tib, strict=True):
        q = np.sqrt(((x - comp[0]) / (comp[2] + 4.0 * s)) ** 2
                    + ((y - comp[1]) / (comp[3] + 4.0 * s)) ** 2)  # fmt: skip
        ramp = np.clip((q - 0.62) / 0.38, 0.0, None)
        wedge = (q < 1.0) & (height > thick) & (height < thick + a.meniscus_height * ramp)
        tissue[wedge] = Tissue.MENISCUS
    # cartilage: resolve the contact of the femoral and tibial plates
    depth = np.full(x.shape, 99.0, dtype=np.float32)
    rel_fem = np.where(fem, femur / np.maximum(fem_t, 1e-3), 9.0)
    for n, (height, thick, _) in enumerate(tib):
        plate = (height > 0) & (height < thick)
        rel = np.where(plate, height / np.maximum(thick, 1e-3), 9.0)
        mine = plate & (rel <= rel_fem)
        fem &= ~mine
        tissue[mine] = Tissue.MEDIAL_TIBIAL + n
        depth[mine] = (thick - height)[mine]
    tissue[fem] = Tissue.FEMORAL
    depth[fem] = (fem_t - femur)[fem]
    pat &= ~fem
    tissue[pat] = Tissue.PATELLAR
    depth[pat] = (pat_t - patella)[pat]
    # bones last: cortex and marrow
    for d in (femur, tibia, patella, fibula):
        tissue[d <= 0] = Tissue.CORTEX
        tissue[d < -1.0] = Tissue.MARROW
    tissue[body >= 0] = Tissue.AIR
    depth[tissue < Tissue.FEMORAL] = 99.0
    return tissue, depth


def _femoral_cover(g: _Geometry, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Where the femur carries cartilage (1), tapering to 0 at the plate's edges."""
    s = g.s
    cover = np.zeros(x.shape, dtype=np.float32)
    for (cx, _cy, cz), (rx, _ry, rz) in g.cond:
        side = np.clip((0.92 * rx - np.abs(x - cx)) / (3.0 * s), 0.0, 1.0)
        upper = np.clip((cz + 0.55 * rz - z) / 3.0, 0.0, 1.0)
        cover = np.maximum(cover, side * upper)
    (tx, ty, tz), (trx, _try, trz) = g.troch
    front = np.clip((ty + 2.0 * s - y) / 3.0, 0.0, 1.0)
    front *= np.clip((0.8 * trx - np.abs(x - tx)) / (3.0 * s), 0.0, 1.0)
    front *= np.clip((tz + 0.75 * trz - z) / 3.0, 0.0, 1.0)
    cover = np.maximum(cover, front)
    notch = np.clip((np.abs(x) - 6.5 * s) / 2.0, 0.0, 1.0)
    notch = np.maximum(notch, np.clip((ty + 8.0 * s - y) / 3.0, 0.0, 1.0))
    return cover * notch
