"""The chest the lung phantom draws: one case's anatomy and its tissue map on a voxel grid.

A :class:`ChestAnatomy` fixes what a case shows, in millimetres of the scanner frame with
its origin at the centre of the field of view: ``x`` toward the patient's left, ``y`` toward
the back, ``z`` toward the head (DICOM's LPS axes, a supine head-first patient). The body is
an elliptic cylinder with a subcutaneous fat layer; inside it a rib cage (ribs that slope
down toward the front), the sternum and a vertebral column with its canal; two lungs whose
cross-sections are ellipses that narrow to a dome at the apex and rest on the domes of the
diaphragm, the heart carving the left lung's medial side. The airways are a tree of
tapering tubes from the trachea through the main bronchi to six generations of branches in
each lung, each with a wall; each bronchus has its pulmonary artery alongside (normal
broncho-arterial ratio, lumen over artery diameter, 0.65-0.9) and a second tree of veins
runs from each hilum.

The lesions are part of the anatomy: a ground-glass opacity is a smooth blob (a sum of two
or three Gaussians, 5-30 mm) whose weight fades over a few millimetres at its edge; a
bronchiectasis is one bronchus that does not taper, whose lumen is wider than its artery
(ratio 1.3-2.2) and whose wall is thick.

:func:`tissue_map` evaluates it all at the voxel centres (vectorised numpy, tubes drawn in
their bounding boxes only) and returns the tissue map, the ground-glass weight and the
instance map of the lesions; :mod:`~mibi_node.analyses.lung.phantom` turns them into HU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mibi_node.analyses.lung.labels import CLASSES, LABEL_OF

__all__ = ["ChestAnatomy", "Opacity", "Tissue", "Tube", "random_anatomy", "tissue_map"]

logger = logging.getLogger(__name__)


class Tissue:
    """Values of the tissue map (``uint8``)."""

    AIR, FAT, SOFT, BONE, MARROW, CSF, LUNG, VESSEL, AIRWAY, WALL = range(10)
    COUNT = 10


@dataclass(frozen=True)
class Tube:
    """A straight tapering tube: an airway (lumen and wall) or a vessel.

    Attributes
    ----------
    start, end
        Axis end points ``(x, y, z)``, mm.
    radius
        Lumen (or vessel) radius at ``start`` and at ``end``, mm.
    wall
        Wall thickness (airways; 0 for vessels), mm.
    generation
        0 for the trachea, 1 for a main bronchus, then one more per branching.
    lesion
        The instance id of the bronchiectasis this tube is, else 0.
    """

    start: tuple[float, float, float]
    end: tuple[float, float, float]
    radius: tuple[float, float]
    wall: float = 0.0
    generation: int = 0
    lesion: int = 0

    @property
    def length(self) -> float:
        """Axis length, mm."""
        return float(np.linalg.norm(np.subtract(self.end, self.start)))


@dataclass(frozen=True)
class Opacity:
    """A ground-glass opacity: Gaussian blobs whose sum, where over 0.5, is the lesion.

    Attributes
    ----------
    lesion
        Its instance id.
    centres
        Blob centres ``(x, y, z)``, mm.
    sigmas
        Blob widths, mm.
    diameter
        Nominal diameter drawn, mm.
    hu
        Its attenuation where the weight is 1.
    """

    lesion: int
    centres: tuple[tuple[float, float, float], ...]
    sigmas: tuple[float, ...]
    diameter: float
    hu: float


@dataclass(frozen=True)
class ChestAnatomy:
    """Every drawn parameter of one chest (mm, scanner frame; see the module text).

    Attributes
    ----------
    body
        Half-axes ``(x, y)`` of the body outline and the y of its centre.
    fat
        Subcutaneous fat thickness.
    lungs
        Per lung (right, then left): centre ``(x, y)`` and half-axes ``(x, y)``.
    lung_z
        ``(base, apex)`` z of the lungs.
    heart
        Centre ``(x, y, z)`` and half-axes ``(x, y, z)``.
    airways, vessels
        The tubes.
    opacities
        The ground-glass opacities.
    lesion_classes
        Class key of each lesion, by instance id - 1.
    ratios
        Instance id -> broncho-arterial ratio of a bronchiectasis.
    """

    body: tuple[float, float, float]
    fat: float
    lungs: tuple[tuple[float, float, float, float], ...]
    lung_z: tuple[float, float]
    heart: tuple[float, float, float, float, float, float]
    airways: tuple[Tube, ...]
    vessels: tuple[Tube, ...]
    opacities: tuple[Opacity, ...]
    lesion_classes: tuple[str, ...]
    ratios: dict[int, float]


def _inside_lung(anatomy_lungs: Sequence[tuple[float, float, float, float]],
                 lung_z: tuple[float, float], heart: Sequence[float],
                 x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:  # fmt: skip
    """``0`` outside the lungs, else ``1`` (right) or ``2`` (left); arrays broadcast."""
    base, apex = lung_z
    zn = (z - base) / (apex - base)
    scale = np.sqrt(np.clip(1.0 - np.clip((zn - 0.45) / 0.55, 0.0, None) ** 2, 0.0, 1.0))
    hx, hy, hz, ax, ay, az = heart
    in_heart = ((x - hx) / ax) ** 2 + ((y - hy) / ay) ** 2 + ((z - hz) / az) ** 2 < 1.0
    out = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)
    for n, (cx, cy, rx, ry) in enumerate(anatomy_lungs):
        rr = ((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2
        dome = 0.28 * np.clip(1.0 - rr, 0.0, 1.0)  # the diaphragm is highest in the middle
        lung = (rr < scale**2) & (zn > dome) & (zn < 1.0) & ~in_heart
        out[lung] = n + 1
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def _turn(direction: np.ndarray, degrees: float, rng: np.random.Generator) -> np.ndarray:
    """``direction`` turned by ``degrees`` about a random axis across it."""
    across = _unit(np.cross(direction, rng.normal(size=3)))
    angle = np.radians(degrees)
    return _unit(np.cos(angle) * direction + np.sin(angle) * across)


def _branch(start: np.ndarray, direction: np.ndarray, length: float, radius: float,
            generation: int, rng: np.random.Generator, out: list[Tube],
            last: int) -> None:  # fmt: skip
    """Grow a bronchus and, recursively, its two daughters."""
    end = start + direction * length
    child = radius * 0.8
    out.append(Tube(tuple(start), tuple(end), (radius, child), max(0.35, 0.22 * radius),
                    generation))  # fmt: skip
    if generation >= last or child < 0.6:
        return
    for sign in (-1.0, 1.0):
        turned = _turn(direction, sign * rng.uniform(14.0, 30.0), rng)
        _branch(end, turned, length * rng.uniform(0.8, 0.92), child, generation + 1, rng,
                out, last)  # fmt: skip


def _artery(tube: Tube, rng: np.random.Generator, ratio: float) -> Tube:
    """The pulmonary artery alongside a bronchus: lumen diameter / artery diameter = ratio."""
    axis = _unit(np.subtract(tube.end, tube.start))
    side = _unit(np.cross(axis, rng.normal(size=3)))
    r0, r1 = tube.radius[0] / ratio, tube.radius[1] / ratio
    offset = side * (max(tube.radius) + tube.wall + max(r0, r1) + 0.6)
    return Tube(tuple(np.add(tube.start, offset)), tuple(np.add(tube.end, offset)), (r0, r1),
                0.0, tube.generation)  # fmt: skip


def random_anatomy(
    rng: np.random.Generator,
    extent: tuple[float, float, float],
    lesions: int | Sequence[str] | None = None,
) -> ChestAnatomy:
    """Draw one chest that fits a field of view of ``extent`` = ``(z, y, x)`` mm.

    Parameters
    ----------
    rng
        The only source of randomness.
    extent
        The grid's size along the slices, rows and columns, mm.
    lesions
        ``None`` (drawn: none in about one case in seven, else 1-4 of random classes), a
        number of lesions of random classes, or their class keys.
    """
    ez, ey, ex = extent
    a = min(0.46 * ex, rng.uniform(150.0, 175.0))
    b = min(0.44 * ey, a * rng.uniform(0.6, 0.7))
    body = (a, b, rng.uniform(-0.02, 0.02) * ey)
    fat = a * rng.uniform(0.05, 0.11)
    cy = body[2] + 0.06 * b
    lungs = tuple(
        (sign * a * rng.uniform(0.44, 0.5), cy, a * rng.uniform(0.33, 0.37),
         b * rng.uniform(0.66, 0.72))
        for sign in (-1.0, 1.0)
    )  # fmt: skip
    lung_z = (-0.46 * ez, 0.44 * ez)
    height = lung_z[1] - lung_z[0]
    heart = (a * 0.12, body[2] - 0.3 * b, lung_z[0] + 0.2 * height,
             a * 0.34, b * 0.42, height * 0.32)  # fmt: skip

    def inside(p: np.ndarray) -> int:
        return int(_inside_lung(lungs, lung_z, heart, *(np.array(v) for v in p)))

    carina = np.array([0.0, cy - 0.1 * b, lung_z[0] + 0.66 * height])
    top = np.array([0.0, cy - 0.18 * b, ez])
    airways = [Tube(tuple(top), tuple(carina), (8.0, 7.5), 1.6, 0)]
    for n, (lx, ly, rx, _ry) in enumerate(lungs):
        hilum = np.array([lx - np.sign(lx) * 0.45 * rx, ly - 0.05 * b, carina[2] - 18.0])
        airways.append(Tube(tuple(carina), tuple(hilum), (6.0, 5.5), 1.3, 1))
        # lobar bronchi toward the upper, middle and lower lung
        for target_z, target_y in ((0.82, -0.1), (0.45, -0.45), (0.2, 0.35)):
            target = np.array([lx + np.sign(lx) * 0.2 * rx, ly + target_y * lungs[n][3],
                               lung_z[0] + target_z * height])  # fmt: skip
            direction = _turn(_unit(target - hilum), rng.uniform(0.0, 10.0), rng)
            length = min(float(np.linalg.norm(target - hilum)) * 0.5, 40.0)
            _branch(hilum, direction, length, 3.2, 2, rng, airways, 7)
    classes = _lesion_classes(rng, lesions)
    tubes = list(airways)
    ratios: dict[int, float] = {}
    taken: list[tuple[np.ndarray, float]] = []
    for number, klass in enumerate(classes, start=1):
        if klass != "bronchiectasis":
            continue
        order = rng.permutation(len(tubes))
        # the fittest bronchi first (3rd-4th generation, >= 11 mm, away from other lesions),
        # then any bronchus of the lung in a small or crowded field of view
        for strict, index in [(True, i) for i in order] + [(False, i) for i in order]:
            tube = tubes[index]
            mid = (np.array(tube.start) + np.array(tube.end)) / 2
            if (
                tube.lesion
                or tube.generation < 2
                or not all(inside(p) for p in (tube.start, tube.end, mid))
            ):
                continue
            if strict and (
                not 3 <= tube.generation <= 4
                or tube.length < 11.0
                or any(np.linalg.norm(mid - c) < r + 20 for c, r in taken)
            ):
                continue
            ratio = float(rng.uniform(1.3, 2.2))
            artery = tube.radius[0] / rng.uniform(1.1, 1.4)
            lumen = artery * ratio
            tubes[index] = Tube(tube.start, tube.end, (lumen, lumen),
                                float(rng.uniform(1.8, 3.0)), tube.generation, number)  # fmt: skip
            ratios[number] = ratio
            taken.append((mid, tube.length / 2))
            break
        else:
            raise ValueError("no bronchus in the lungs for a bronchiectasis in this grid")
    vessels: list[Tube] = []
    for tube in tubes[1:]:
        ratio = ratios[tube.lesion] if tube.lesion else float(rng.uniform(0.65, 0.9))
        vessels.append(_artery(tube, rng, ratio))
    for lx, ly, rx, ry in lungs:
        hilum = np.array([lx - np.sign(lx) * 0.3 * rx, ly + 0.1 * ry, lung_z[0] + 0.4 * height])
        for _ in range(3):
            direction = _unit(np.array([np.sign(lx) * 0.5, 0.0, 0.0]) + rng.normal(size=3) * 0.6)
            _branch(hilum, direction, 30.0, 2.6, 2, rng, vessels, 7)
    opacities = []
    for number, klass in enumerate(classes, start=1):
        if klass != "ground_glass_opacity":
            continue
        for _ in range(1000):
            diameter = float(np.exp(rng.uniform(np.log(6.0), np.log(26.0))))
            point = np.array([rng.uniform(-a, a), rng.uniform(-b, b) + body[2],
                              rng.uniform(*lung_z)])  # fmt: skip
            probes = [point + d * diameter / 2 for d in np.vstack([np.eye(3), -np.eye(3)])]
            if not all(inside(p) for p in [point, *probes]):
                continue
            if any(np.linalg.norm(point - c) < r + diameter / 2 + 6 for c, r in taken):
                continue
            break
        else:
            raise ValueError("no room for a ground-glass opacity in this grid")
        count = int(rng.integers(1, 4))
        sigma = diameter / 2 / 1.18  # a single blob's 0.5 contour has this diameter
        centres = [tuple(point)] + [
            tuple(point + rng.normal(size=3) * diameter * 0.12) for _ in range(count - 1)
        ]
        sigmas = [sigma] + [sigma * float(rng.uniform(0.6, 0.9)) for _ in range(count - 1)]
        opacities.append(Opacity(number, tuple(centres), tuple(sigmas), diameter,  # type: ignore[arg-type]
                                 float(rng.uniform(-680.0, -420.0))))  # fmt: skip
        taken.append((point, diameter / 2))
    return ChestAnatomy(body, fat, lungs, lung_z, heart, tuple(tubes), tuple(vessels),
                        tuple(opacities), classes, ratios)  # fmt: skip


def _lesion_classes(
    rng: np.random.Generator, lesions: int | Sequence[str] | None
) -> tuple[str, ...]:
    if lesions is None:
        count = 0 if rng.random() < 0.15 else int(rng.integers(1, 5))
    elif isinstance(lesions, int) and not isinstance(lesions, bool):
        if not 0 <= lesions <= 6:
            raise ValueError(f'Argument "lesions" should be 0-6 lesions, not {lesions}.')
        count = lesions
    else:
        names = tuple(lesions)  # type: ignore[arg-type]
        unknown = [n for n in names if n not in LABEL_OF]
        if unknown or len(names) > 6:
            raise ValueError(f'Argument "lesions" should list up to 6 of {CLASSES}, not {names}.')
        return names
    return tuple(str(rng.choice(CLASSES)) for _ in range(count))


def _draw_tubes(tubes: Sequence[Tube], axes: Sequence[np.ndarray], field: np.ndarray,
                outer: np.ndarray | None, owner: np.ndarray | None) -> None:  # fmt: skip
    """Lower ``field`` to the signed distance (mm) to each tube's lumen, ``outer`` to its wall.

    ``owner`` takes the tube's lesion id inside the wall's outer surface. Each tube is
    evaluated only in its bounding box.
    """
    zs, ys, xs = axes
    for tube in tubes:
        p0, p1 = np.array(tube.start), np.array(tube.end)
        reach = max(tube.radius) + tube.wall + 1.0
        lo, hi = np.minimum(p0, p1) - reach, np.maximum(p0, p1) + reach
        box = []
        for axis, values in zip((2, 1, 0), (zs, ys, xs), strict=True):
            a, b = np.searchsorted(values, [lo[axis], hi[axis]])
            box.append(slice(int(a), int(b)))
        if any(s.stop <= s.start for s in box):
            continue
        z, y, x = zs[box[0], None, None], ys[None, box[1], None], xs[None, None, box[2]]
        d = p1 - p0
        length2 = float(d @ d) or 1e-6
        t = np.clip(((x - p0[0]) * d[0] + (y - p0[1]) * d[1] + (z - p0[2]) * d[2]) / length2,
                    0.0, 1.0)  # fmt: skip
        dist = np.sqrt((x - p0[0] - t * d[0]) ** 2 + (y - p0[1] - t * d[1]) ** 2
                       + (z - p0[2] - t * d[2]) ** 2)  # fmt: skip
        sdf = dist - (tube.radius[0] + t * (tube.radius[1] - tube.radius[0]))
        view = field[box[0], box[1], box[2]]
        np.minimum(view, sdf, out=view)
        if outer is not None:
            wall = outer[box[0], box[1], box[2]]
            np.minimum(wall, sdf - tube.wall, out=wall)
        if owner is not None and tube.lesion:
            mine = owner[box[0], box[1], box[2]]
            mine[sdf - tube.wall < 0] = tube.lesion


def tissue_map(
    anatomy: ChestAnatomy, axes: Sequence[np.ndarray]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tissue at each voxel centre, the ground-glass weight and the lesion instance map.

    Parameters
    ----------
    anatomy
        What to draw.
    axes
        Voxel-centre coordinates along the slices (z), rows (y) and columns (x), mm,
        each increasing.

    Returns
    -------
    tissue
        ``uint8`` :class:`Tissue` values, ``(z, y, x)`` order.
    ggo
        ``float32`` HU that the ground-glass opacities add to the lung (weight 0-1, smooth at
        the lesion's edge, times the opacity's HU above -850).
    instances
        ``uint16`` lesion instance ids (0 none): a ground-glass opacity where its weight is
        at least 0.5 in the lung; a bronchiectasis inside its wall's outer surface.
    """
    zs, ys, xs = (np.asarray(v, dtype=np.float32) for v in axes)
    z, y, x = zs[:, None, None], ys[None, :, None], xs[None, None, :]
    shape = (len(zs), len(ys), len(xs))
    a, b, by = anatomy.body
    e = (x / a) ** 2 + ((y - by) / b) ** 2
    body = np.broadcast_to(e < 1.0, shape)
    inner = (x / (a - anatomy.fat)) ** 2 + ((y - by) / (b - anatomy.fat)) ** 2
    tissue = np.where(body, Tissue.FAT, Tissue.AIR).astype(np.uint8)
    tissue[np.broadcast_to(inner < 1.0, shape)] = Tissue.SOFT
    # ribs: a band of the cage ellipse, sloping down toward the front, every ~26 mm
    cage = np.sqrt(inner) * (a - anatomy.fat) / (a - anatomy.fat - 4.0)
    ring = (np.abs(cage - 0.88) < 0.035) & ((y - by) > -0.55 * b)
    phase = ((z + 0.35 * (y - by)) / 26.0) % 1.0
    tissue[ring & (phase < 0.33)] = Tissue.BONE
    # sternum, vertebral body (cortex round marrow), spinal canal
    tissue[np.broadcast_to((np.abs(x) < 0.09 * a) & (np.abs(y - by + 0.86 * b) < 0.07 * b),
                           shape)] = Tissue.BONE  # fmt: skip
    spine = (x / (0.14 * a)) ** 2 + ((y - by - 0.62 * b) / (0.15 * a)) ** 2
    disc = (z / 28.0) % 1.0 < 0.18
    tissue[np.broadcast_to(spine < 1.0, shape)] = Tissue.BONE
    tissue[(spine < 0.7) & ~disc] = Tissue.MARROW
    tissue[(spine < 0.7) & disc] = Tissue.SOFT
    canal = (x / (0.06 * a)) ** 2 + ((y - by - 0.62 * b - 0.2 * a) / (0.06 * a)) ** 2 < 1.0
    tissue[np.broadcast_to(canal, shape)] = Tissue.CSF
    lung = _inside_lung(anatomy.lungs, anatomy.lung_z, anatomy.heart, x, y, z)
    tissue[lung > 0] = Tissue.LUNG
    far = np.float32(1e3)
    vessel = np.full(shape, far, dtype=np.float32)
    lumen = np.full(shape, far, dtype=np.float32)
    outer = np.full(shape, far, dtype=np.float32)
    instances = np.zeros(shape, dtype=np.uint16)
    _draw_tubes(anatomy.vessels, (zs, ys, xs), vessel, None, None)
    _draw_tubes(anatomy.airways, (zs, ys, xs), lumen, outer, instances)
    chest = (lung > 0) | (tissue == Tissue.SOFT)
    tissue[(vessel < 0) & (lung > 0)] = Tissue.VESSEL
    tissue[(outer < 0) & chest] = Tissue.WALL
    tissue[(lumen < 0) & (chest | (tissue == Tissue.FAT))] = Tissue.AIRWAY
    instances[(tissue != Tissue.WALL) & (tissue != Tissue.AIRWAY)] = 0
    ggo = np.zeros(shape, dtype=np.float32)
    for opacity in anatomy.opacities:
        reach = 2.5 * max(opacity.sigmas) + opacity.diameter * 0.4
        c = np.array(opacity.centres[0])
        box = [slice(*map(int, np.searchsorted(v, [c[axis] - reach, c[axis] + reach])))
               for axis, v in zip((2, 1, 0), (zs, ys, xs), strict=True)]  # fmt: skip
        zz, yy, xx = zs[box[0], None, None], ys[None, box[1], None], xs[None, None, box[2]]
        field = np.zeros((len(zz), len(yy[0]), len(xx[0, 0])), dtype=np.float32)
        for (px, py, pz), s in zip(opacity.centres, opacity.sigmas, strict=True):
            field += np.exp(-((xx - px) ** 2 + (yy - py) ** 2 + (zz - pz) ** 2) / (2 * s * s))
        weight = np.clip((field - 0.25) / 0.5, 0.0, 1.0)  # 0.5 where the field is 0.5
        region = lung[box[0], box[1], box[2]] > 0
        view = ggo[box[0], box[1], box[2]]
        np.maximum(view, np.where(region, weight * (opacity.hu + 850.0), 0.0), out=view)
        ids = instances[box[0], box[1], box[2]]
        ids[region & (weight >= 0.5) & (ids == 0)] = opacity.lesion
    return tissue, ggo, instances
