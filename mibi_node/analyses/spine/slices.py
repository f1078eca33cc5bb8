"""The tissue label maps of one slice of a :class:`~mibi_node.analyses.spine.anatomy.Scene`.

A sagittal slice is drawn on the scene's arc-length and distance maps (see
:mod:`~mibi_node.analyses.spine.anatomy`), narrowing each structure with the slice's
distance from the midline: the canal and the spinous processes only near the midline,
pedicles, foramina and facets laterally, the vertebral bodies as ellipses in cross
section. Each level's lesion is drawn last, in a box of pixels around its level. An axial
slice through a disc is a simpler cross-section of the same scene.
"""

from __future__ import annotations

import logging

import numpy as np

from mibi_node.analyses.spine.anatomy import (
    Lesion,
    Scene,
    Segment,
    Tissue,
    band_of,
    lateral,
    pixel_box,
)

__all__ = ["axial_labels", "sagittal_labels"]

logger = logging.getLogger(__name__)


def sagittal_labels(scene: Scene, dx: float) -> np.ndarray:
    """The tissue labels of the sagittal slice ``dx`` mm to the patient's left of the midline.

    Returns
    -------
    numpy.ndarray
        ``uint8`` (matrix x matrix), values of :class:`Tissue`.
    """
    if scene.band is None:
        scene.band = band_of(scene)
    b = scene.band
    S, N, k, t, kind = b.S, b.N, b.k, b.t, b.kind  # noqa: N806 - the two coordinate maps
    segs = scene.segments
    s0 = np.array([g.s0 for g in segs], dtype=np.float32)[k]
    s1 = np.array([g.s1 for g in segs], dtype=np.float32)[k]
    lat = np.array([lateral(dx, g.width) for g in segs], dtype=np.float32)[k]
    lab = b.base.ravel()[b.index]
    along = (segs[0].s0 <= S) & (segs[-1].s1 >= S)
    disc = kind == 1
    sine = np.sin(np.pi * t)
    half = 0.5 * b.depth * lat + np.where(disc, 0.8 * sine, 0.0).astype(np.float32)
    front = np.where(along, -half, -segs[0].depth0 / 2) + np.where(kind == 0, 1.2 * sine, 0.0)
    lab[np.minimum(front, -8.0) > N] = Tissue.VISCERA
    lab[(np.minimum(front, -8.0) > N) & scene.bowel.ravel()[b.index]] = Tissue.FAT
    column = along & (front < N) & (half > N) & (lat > 0)
    lab[column & (lat <= 0.05)] = Tissue.MUSCLE
    bony = column & ((kind == 0) | (kind == 2))
    lab[bony] = np.asarray([g.label for g in segs], dtype=np.uint8)[k[bony]]
    edge = np.minimum(np.minimum(N - front, half - N), np.minimum(S - s0, s1 - S))
    lab[bony & (edge < 1.2)] = Tissue.CORTEX
    lab[column & disc] = Tissue.ANNULUS
    lab[column & (kind == 3)] = Tissue.SACRAL_DISC
    mid, h = 0.5 * (s0 + s1), s1 - s0
    nuc_lat = np.array([lateral(dx, 0.6 * g.width) for g in segs], dtype=np.float32)[k]
    reach = 0.34 * b.depth * nuc_lat + 1e-3
    nucleus = column & disc & (((S - mid) / (0.32 * h)) ** 2 + ((N - 1.0) / reach) ** 2 < 1.0)
    lab[nucleus] = (Tissue.NUCLEUS + k[nucleus]).astype(np.uint8)
    lab[nucleus & (np.abs(S - mid) < 0.35) & (np.abs(N - 1.0) < 0.6 * reach)] = Tissue.ANNULUS
    # anterior and posterior longitudinal ligaments
    lab[along & (lat > 0.05) & (front >= N) & (front - 1.0 < N)] = Tissue.LIGAMENT
    lab[along & (lat > 0.05) & (half <= N) & (half + 1.0 > N)] = Tissue.LIGAMENT
    _canal(scene, lab, S, N, half, kind, dx)
    _posterior(scene, lab, S, N, half, dx)
    _vessels(scene, lab, S, N, front, dx)
    out = b.base.copy()
    out.ravel()[b.index] = lab
    for lesion in scene.lesions:
        _paint_lesion(scene, out, lesion, dx)
    return out


def _canal(
    scene: Scene, lab: np.ndarray, s_map: np.ndarray, n_map: np.ndarray, half: np.ndarray,
    kind: np.ndarray, dx: float,
) -> None:  # fmt: skip
    """Thecal sac (CSF, dura, cord above the conus, cauda equina), epidural fat, flavum."""
    S, N = s_map, n_map  # noqa: N806 - the arc-length and distance maps
    lc = lateral(dx, 11.0)
    top, bottom = scene.segments[0].s0, scene.segments[-1].s1
    if lc <= 0:
        return
    near = np.flatnonzero(
        (top < S) & (bottom > S) & (half + 1.0 <= N) & (half + 4.0 + scene.canal_ap * lc > N)
    )
    S, N, half, kind = S[near], N[near], half[near], kind[near]  # noqa: N806
    sub = lab[near]
    taper = np.clip((bottom - S) / 60.0, 0.25, 1.0)
    ap = scene.canal_ap * lc * taper
    base = half + 1.0
    canal = base + ap > N
    sac = canal & (scene.sac_end > S)
    sub[canal] = Tissue.EPIDURAL_FAT
    sub[sac] = Tissue.CSF
    sub[sac & ((base + 0.7 > N) | (base + ap - 0.7 < N))] = Tissue.LIGAMENT
    centre = base + 0.55 * ap
    cord_half = 3.8 * lc * np.clip((scene.conus - S) / 15.0 + 1.0, 0.0, 1.0)
    sub[sac & (np.abs(N - centre) < cord_half) & (scene.conus + 15.0 > S)] = Tissue.CORD
    for j, phase in enumerate((0.0, 2.1, 4.2)):
        strand = base + ap * (0.58 + 0.11 * j) + 0.6 * np.sin(2 * np.pi * S / 45.0 + phase)
        sub[canal & (scene.conus < S) & (np.abs(N - strand) < 0.45)] = Tissue.NERVE
    behind = (base + ap <= N) & (base + ap + 3.0 > N)
    sub[behind & (kind == 1)] = Tissue.LIGAMENT
    sub[behind & (kind != 1)] = Tissue.EPIDURAL_FAT
    lab[near] = sub


def _posterior(
    scene: Scene,
    lab: np.ndarray,
    s_map: np.ndarray,
    n_map: np.ndarray,
    half: np.ndarray,
    dx: float,
) -> None:
    """Laminae and spinous processes (midline), pedicles, foramina and facets (laterally)."""
    S, N = s_map, n_map  # noqa: N806 - the arc-length and distance maps
    lc = lateral(dx, 11.0)
    bodies = [g for g in scene.segments if g.kind in ("body", "sacral")][:9]
    mids = np.array([g.mid for g in bodies], dtype=np.float32)
    heights = np.array([g.height for g in bodies], dtype=np.float32)
    back = half + 1.0 + scene.canal_ap * max(lc, 0.0) + 3.0
    if lc <= 0:
        back = half + scene.canal_ap + 4.0
    oblique = S - 0.7 * (N - back)
    j = np.clip(np.searchsorted(0.5 * (mids[1:] + mids[:-1]), oblique), 0, len(bodies) - 1)
    sigma = (oblique - mids[j]) / heights[j]
    tau = (N - back) / scene.spinous
    region = (
        (bodies[0].s0 - 10.0 < S) & (bodies[-1].s1 > S) & (tau > 0) & (scene.skin - scene.fat > N)
    )
    adx = abs(dx)
    if adx < 5.0:
        shape = np.abs(sigma - 0.15) < 0.3 * (1.0 - 0.45 * tau)
        process = region & (tau < 1.0) & shape
        lab[process] = Tissue.POSTERIOR
        rim = process & ((np.abs(sigma - 0.15) > 0.3 * (1 - 0.45 * tau) - 1.0 / heights[j])
                         | (tau > 1.0 - 1.2 / scene.spinous))  # fmt: skip
        lab[rim] = Tissue.CORTEX
    elif adx < 15.0:
        lamina = region & (tau < 0.28) & (np.abs(sigma - 0.1) < 0.33)
        lab[lamina] = Tissue.POSTERIOR
    if 9.0 < adx < 24.0:
        between = (half + 1.0 < N) & (back > N) & (bodies[0].s0 < S) & (scene.sac_end > S)
        pedicle = between & (np.abs(sigma + 0.12) < 0.22)
        lab[between] = Tissue.EPIDURAL_FAT
        lab[pedicle] = Tissue.POSTERIOR
        root = between & (((sigma - 0.22) * heights[j]) ** 2 + (N - half - 5.0) ** 2 < 7.0)
        lab[root] = Tissue.NERVE
        facet = (bodies[0].s0 < S) & (back - 3.0 <= N) & (back + 13.0 > N) & (scene.sac_end > S)
        facet &= np.abs(sigma - 0.5) < 0.33
        lab[facet] = Tissue.POSTERIOR
        lab[facet & (np.abs(sigma - 0.5 - 0.25 * tau) < 0.7 / heights[j])] = Tissue.FACET_FLUID
    sacrum = (scene.segments[scene.segment("S1")].s0 < S) & (back <= N) & (back + 7.0 > N)
    lab[sacrum & (adx < 30.0)] = Tissue.POSTERIOR


def _vessels(
    scene: Scene,
    lab: np.ndarray,
    s_map: np.ndarray,
    n_map: np.ndarray,
    front: np.ndarray,
    dx: float,
) -> None:
    """Aorta (patient left) and inferior vena cava (right) in front of the column: flow voids."""
    S, N = s_map, n_map  # noqa: N806 - the arc-length and distance maps
    bifurcation = scene.segments[scene.segment("L4")].mid
    for centre, radius in ((18.0, 10.5), (-20.0, 11.5)):
        r = radius * lateral(dx - centre, radius)
        if r <= 0:
            continue
        vessel = (bifurcation > S) & (front - 2.0 > N) & (front - 2.0 - 2.0 * r < N)
        lab[vessel] = Tissue.VESSEL


def _paint_lesion(scene: Scene, lab: np.ndarray, lesion: Lesion, dx: float) -> None:
    """Draw one level's lesion on the slice, inside a box around the level."""
    seg = scene.segments[lesion.segment]
    p = lesion.values
    depth = seg.depth0 * lateral(dx, seg.width)
    if lesion.kind in ("bulge", "protrusion", "extrusion"):
        reach = p.get("mig", 0.0) + seg.height
        box = pixel_box(scene, seg.s0 - reach, seg.s1 + reach, depth / 2 - 2.0, depth / 2 + 16.0)
    else:
        box = pixel_box(
            scene, seg.s0 - 4.0, seg.s1 + 4.0, -seg.depth0 / 2 - 9.0, seg.depth0 / 2 + 8.0
        )
    if box is None or depth <= 0:
        return
    S, N, L = scene.arc[box], scene.normal[box], lab[box]  # noqa: N806
    post = depth / 2 + 0.8 * np.sin(np.pi * np.clip((S - seg.s0) / seg.height, 0, 1))
    h = seg.height
    if lesion.kind == "bulge":
        t = (S - seg.s0 + 1.2) / (h + 2.4)
        bulge = p["amp"] * np.sin(np.pi * np.clip(t, 0.0, 1.0))
        L[(t > 0) & (t < 1) & (post - 1.0 <= N) & (post + bulge > N)] = Tissue.ANNULUS
        L[(t > 0) & (t < 1) & (-post + 1.0 > N) & (-post - 0.6 * bulge < N)] = Tissue.ANNULUS
    elif lesion.kind == "protrusion":
        amp = p["amp"] * max(0.0, 1.0 - ((dx - p["x0"]) / p["wl"]) ** 2)
        centre, base = seg.mid + p["shift"] * h, 0.5 * h + 1.0
        dome = amp * np.sqrt(np.clip(1.0 - ((S - centre) / base) ** 2, 0.0, 1.0))
        region = (post - 1.5 <= N) & (post + dome > N)
        L[region] = Tissue.LIGAMENT
        L[region & (post + dome - 0.8 > N)] = Tissue.HERNIATION
    elif lesion.kind == "extrusion":
        amp = p["amp"] * max(0.0, 1.0 - ((dx - p["x0"]) / p["wl"]) ** 2)
        if amp <= 0.5:
            return
        neck = (np.abs(S - seg.mid) < 0.35 * h) & (post - 1.5 <= N) & (post + 0.6 * amp > N)
        centre = seg.mid + p["dir"] * p["mig"]
        hh = 0.5 * h + 0.6 * p["mig"]
        head = ((S - centre) / hh) ** 2 + ((N - post - 0.5 * amp) / (0.5 * amp + 0.8)) ** 2 < 1.0
        L[(neck | head) & (post - 1.5 < N)] = Tissue.EXTRUDED
    elif lesion.kind == "schmorl_node":
        r = p["r"] * lateral(dx - p["x0"], p["rl"])
        if r <= 0.5:
            return
        end = seg.s0 if p["side"] < 0 else seg.s1
        n0 = p["n0"] * seg.depth0
        dist = np.sqrt((S - end) ** 2 + (N - n0) ** 2)
        into = (S - end) * p["side"] > -0.5
        if p["edema"]:
            L[into & (dist < r + 3.5) & (dist >= r + 1.0) & _marrow(L)] = Tissue.EDEMA
        L[into & (dist < r + 1.0)] = Tissue.CORTEX
        L[into & (dist < r)] = Tissue.HERNIATION
    elif lesion.kind == "degenerated":
        _degenerate(L, S, N, seg, p, depth, dx)
    elif lesion.kind == "hemangioma":
        r = p["r"] * lateral(dx, p["r"] + 3.0)
        centre = seg.s0 + p["t"] * h
        blob = ((S - centre) ** 2 + N**2 < r**2) & _marrow(L)
        L[blob] = Tissue.FATTY


def _marrow(labels: np.ndarray) -> np.ndarray:
    return (labels >= Tissue.MARROW) & (labels < Tissue.NUCLEUS)


def _degenerate(
    labels: np.ndarray, s_map: np.ndarray, n_map: np.ndarray, seg: Segment, p: dict[str, float],
    depth: float, dx: float,
) -> None:  # fmt: skip
    """Osteophytes, Modic bands, endplate sclerosis and patchy fatty marrow of one body."""
    S, N, L = s_map, n_map, labels  # noqa: N806 - the maps of the box
    half = depth / 2
    marrow = _marrow(L)
    ends = {0: (seg.s0,), 1: (seg.s1,), 2: (seg.s0, seg.s1)}[int(p["ends"])]
    if p["modic"]:
        label = {1: Tissue.MODIC1, 2: Tissue.MODIC2, 3: Tissue.MODIC3}[int(p["modic_type"])]
        for end in ends:
            L[marrow & (np.abs(S - end) < p["band"] + 1.2)] = label
    if p["sclerosis"]:
        for end in ends:
            wave = 1.0 + 0.8 * np.sin(N * 0.9)
            L[(np.abs(S - end) < 1.2 + wave) & (np.abs(N) < half) & (np.abs(S - end) < 4)] = (
                Tissue.CORTEX
            )
    if p["patchy"]:
        waves = [
            np.sin(p[f"f{i}"] * (S * np.cos(p[f"a{i}"]) + N * np.sin(p[f"a{i}"])) + p[f"p{i}"])
            for i in (1, 2)
        ]
        spots = waves[0] + waves[1] + 0.8 * np.sin(0.45 * S - 0.7 * N + p["p1"]) > 1.7
        L[spots & _marrow(L)] = Tissue.FATTY
    if p["osteophyte"] and half > 3.0:
        length = p["length"]
        for end, sign in ((seg.s0, -1.0), (seg.s1, 1.0)):
            w = (S - end) * sign  # + into the disc space, - into the body
            x = (-half - N) / length  # 0 at the anterior surface, 1 at the spur's tip
            L[(x >= -0.1) & (x < 1.0) & (w > -6.0 + 8.0 * x) & (w < 1.0 + x)] = Tissue.OSTEOPHYTE
            if p["posterior"]:
                y = (N - half) / (0.5 * length)
                L[(y >= -0.1) & (y < 1.0) & (w > -4.0 + 5.5 * y) & (w < 1.0 + y)] = (
                    Tissue.OSTEOPHYTE
                )
    _ = dx


def axial_labels(scene: Scene, level: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The tissue labels of an axial slice through the disc ``level``.

    Parameters
    ----------
    scene
        The case's scene (the disc's size, the canal, the lesions).
    level
        A disc level.
    x, y
        Per pixel: mm to the patient's left of the spine's midline and mm behind the disc's
        centre.
    """
    index = scene.segment(level)
    seg = scene.segments[index]
    half_depth, width = seg.depth0 / 2, seg.width
    lab = np.full(x.shape, Tissue.AIR, dtype=np.uint8)
    outline = (x / (scene.skin + 70.0)) ** 2 + ((y + 60.0) / (scene.skin + 60.0)) ** 2 < 1.0
    lab[outline] = Tissue.FAT
    inner = (x / (scene.skin + 70.0 - scene.fat)) ** 2 + (
        (y + 60.0) / (scene.skin + 60.0 - scene.fat)
    ) ** 2
    lab[outline & (inner < 1.0)] = Tissue.VISCERA
    ap = scene.canal_ap
    back = half_depth + ap + 3.0
    for side in (-1.0, 1.0):
        muscle = ((x - side * 24.0) / 20.0) ** 2 + ((y - back - 22.0) / 26.0) ** 2 < 1.0
        lab[muscle & (inner < 1.0)] = Tissue.MUSCLE
        psoas = ((x - side * (width + 9.0)) / 11.0) ** 2 + ((y + 2.0) / 14.0) ** 2 < 1.0
        lab[psoas] = Tissue.MUSCLE
        facet = ((x - side * 17.0) / 7.0) ** 2 + ((y - back + 1.0) / 8.0) ** 2 < 1.0
        lab[facet] = Tissue.POSTERIOR
        lab[facet & (np.abs(x - side * 17.0 - 0.4 * (y - back)) < 0.6)] = Tissue.FACET_FLUID
    spinous = (np.abs(x) < 3.5) & (y > back + 2.0) & (y < back + scene.spinous)
    lab[spinous] = Tissue.POSTERIOR
    lamina = (np.abs(y - back - 1.5) < 2.2) & (np.abs(x) < 15.0)
    lab[lamina] = Tissue.LIGAMENT
    disc = (x / width) ** 2 + (y / half_depth) ** 2 < 1.0
    notch = (x / (0.4 * width)) ** 2 + ((y - half_depth - 2.0) / 5.0) ** 2 < 1.0
    lab[disc & ~notch] = Tissue.ANNULUS
    nucleus = (x / (0.55 * width)) ** 2 + ((y - 1.0) / (0.6 * half_depth)) ** 2 < 1.0
    lab[nucleus] = Tissue.NUCLEUS + index
    canal = (x / 11.0) ** 2 + ((y - half_depth - 1.0 - ap / 2) / (ap / 2)) ** 2
    lab[canal < 1.0] = Tissue.LIGAMENT
    lab[canal < 0.8] = Tissue.CSF
    for root in (-4.0, -1.5, 1.5, 4.0):
        lab[(x - root * 1.3) ** 2 + (y - half_depth - 0.75 * ap) ** 2 < 1.1] = Tissue.NERVE
    for lesion in scene.lesions:
        if lesion.segment != index:
            continue
        p = lesion.values
        if lesion.kind == "bulge":
            ring = (x / (width + p["amp"])) ** 2 + (y / (half_depth + p["amp"])) ** 2 < 1.0
            lab[ring & ~disc & (y > -half_depth)] = Tissue.ANNULUS
        elif lesion.kind in ("protrusion", "extrusion"):
            amp = p["amp"]
            blob = ((x - p["x0"]) / p["wl"]) ** 2 + ((y - half_depth) / amp) ** 2 < 1.0
            label = Tissue.HERNIATION if lesion.kind == "protrusion" else Tissue.EXTRUDED
            lab[blob & (y > 0)] = label
    for centre in (18.0, -20.0):
        lab[(x - centre) ** 2 + (y + half_depth + 13.0) ** 2 < 100.0] = Tissue.VESSEL
    return lab
