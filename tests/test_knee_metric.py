"""The knee cartilage scores on hand-made volumes whose answers are known exactly."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from training.knee_metric import (
    KNEE_STRUCTURES,
    CaseScores,
    KneeEvaluation,
    StructureScores,
    case_scores,
    goal_check,
    surface_distances,
)

FEMORAL, MEDIAL, LATERAL, PATELLAR = (LABEL_OF[name] for name in STRUCTURES)
SPACING = (1.5, 2.0, 2.5)


def cube(shape: tuple[int, int, int] = (8, 8, 8), start: int = 2, side: int = 4) -> np.ndarray:
    volume = np.zeros(shape, np.uint8)
    volume[start : start + side, start : start + side, start : start + side] = FEMORAL
    return volume


def spheres(spacing: tuple[float, float, float], radii: tuple[float, float]) -> list[np.ndarray]:
    """Concentric balls of the given radii in mm, sampled at the voxel centres."""
    shape = tuple(int(60 / s) for s in spacing)
    axes = [(np.arange(n) - n / 2 + 0.5) * s for n, s in zip(shape, spacing, strict=True)]
    grid = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(sum(g**2 for g in grid))
    return [(radius <= r).astype(np.uint8) * FEMORAL for r in radii]


def synthetic_scores(case_id: str, dice: float, assd: float = 0.5) -> CaseScores:
    """Scores with one Dice for every structure, without volumes behind them."""
    rows = tuple(
        StructureScores(name, dice, assd, 2 * assd, 1000.0, 900.0, 100.0, 100 / 9)
        for name in KNEE_STRUCTURES
    )
    return CaseScores(case_id, (1.0, 1.0, 1.0), rows)


# --- one case -------------------------------------------------------------------------------


def test_identical_masks_score_dice_one_and_no_distance() -> None:
    truth = cube()
    truth[2:6, 2:4, 7] = MEDIAL
    truth[2:6, 5:7, 7] = LATERAL
    truth[0, 0:3, 0:3] = PATELLAR
    scores = case_scores(truth, truth.copy(), SPACING)
    for name in KNEE_STRUCTURES:
        s = scores[name]
        assert (s.dice, s.assd_mm, s.hd95_mm, s.volume_error_mm3) == (1.0, 0.0, 0.0, 0.0)
        assert s.state == "present"
    assert scores["femoral_cartilage"].volume_truth_mm3 == pytest.approx(64 * 1.5 * 2.0 * 2.5)


# A 4x4x4 cube against itself shifted by one voxel along an axis: of either cube's 56 surface
# voxels, the 16 of the trailing face are one step (that axis' spacing) from the other's
# surface, the 4 inner ones of the leading face are one step along the finest axis (1.5 mm)
# from the other cube's side, and the 36 others lie on the other cube's surface.
@pytest.mark.parametrize(
    ("axis", "hd95", "assd"),
    [
        (0, 1.5, (16 * 1.5 + 4 * 1.5) / 56),
        (1, 2.0, (16 * 2.0 + 4 * 1.5) / 56),
        (2, 2.5, (16 * 2.5 + 4 * 1.5) / 56),
    ],
)
def test_cube_shifted_by_one_voxel(axis: int, hd95: float, assd: float) -> None:
    truth = cube()
    scores = case_scores(np.roll(truth, 1, axis=axis), truth, SPACING)["femoral_cartilage"]
    assert scores.dice == pytest.approx(3 / 4)  # 2 * 48 / (64 + 64)
    assert scores.hd95_mm == pytest.approx(hd95)
    assert scores.assd_mm == pytest.approx(assd)
    assert scores.volume_error_mm3 == 0.0


def test_anisotropic_spacing_is_used_per_axis() -> None:
    truth = cube()
    shifted = [
        case_scores(np.roll(truth, 1, axis=a), truth, SPACING)["femoral_cartilage"]
        for a in range(3)
    ]
    assert [s.hd95_mm for s in shifted] == pytest.approx(list(SPACING))
    iso = case_scores(np.roll(truth, 1, axis=2), truth, (1.0, 1.0, 1.0))["femoral_cartilage"]
    assert (iso.hd95_mm, iso.assd_mm) == pytest.approx((1.0, 20 / 56))


def test_hd95_ignores_a_five_percent_tail_that_the_maximum_would_see() -> None:
    truth = cube((24, 14, 14), 2, 10)  # 488 surface voxels
    prediction = truth.copy()
    prediction[20, 6, 6] = FEMORAL  # 9 voxels beyond the face at slice 11
    s = case_scores(prediction, truth, SPACING)["femoral_cartilage"]
    assert s.hd95_mm == 0.0
    assert s.assd_mm == pytest.approx(9 * 1.5 / (489 + 488))
    d_pred, d_truth = surface_distances(prediction > 0, truth > 0, SPACING)
    assert (d_pred.max(), d_truth.max()) == (9 * 1.5, 0.0)


def test_hd95_takes_each_direction_s_percentile_not_the_pooled_one() -> None:
    truth = cube((24, 14, 14), 2, 10)  # 488 surface voxels
    prediction = truth.copy()
    prediction[20, 4:10, 4:10] = FEMORAL  # 36 voxels 9 slices beyond: 6.9% of 524, 3.4% of 1012
    s = case_scores(prediction, truth, SPACING)["femoral_cartilage"]
    assert s.hd95_mm == 9 * 1.5
    assert s.assd_mm == pytest.approx(36 * 9 * 1.5 / (524 + 488))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (2.0, 0.5, 0.5)])
def test_concentric_spheres_are_the_radius_difference_apart(
    spacing: tuple[float, float, float],
) -> None:
    truth, prediction = spheres(spacing, (10.0, 13.0))
    s = case_scores(prediction, truth, spacing)["femoral_cartilage"]
    assert s.assd_mm == pytest.approx(3.0, abs=0.5)
    assert 2.5 <= s.hd95_mm <= 3.5
    assert s.dice == pytest.approx(2 * 10**3 / (10**3 + 13**3), abs=0.02)
    assert s.volume_truth_mm3 == pytest.approx(4 / 3 * math.pi * 10**3, rel=0.02)
    assert s.volume_error_pct == pytest.approx(100 * (13**3 - 10**3) / 10**3, rel=0.05)


@pytest.mark.slow  # imports torch and MONAI
def test_distances_agree_with_monai() -> None:
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    blobs = [ndimage.gaussian_filter(rng.normal(size=(16, 20, 24)), 2.0) > 0.05 for _ in range(2)]
    spacing = (3.0, 0.7, 0.5)
    s = case_scores(blobs[0].astype(np.uint8), blobs[1].astype(np.uint8), spacing)[
        "femoral_cartilage"
    ]

    def one_hot(mask: np.ndarray):  # type: ignore[no-untyped-def]
        return torch.from_numpy(np.stack([~mask, mask])[None].astype(np.float32))

    pred, truth = one_hot(blobs[0]), one_hot(blobs[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assd = metrics.compute_average_surface_distance(
            pred, truth, symmetric=True, spacing=spacing
        )
        hd95 = metrics.compute_hausdorff_distance(pred, truth, percentile=95, spacing=spacing)
    assert s.assd_mm > 0.5
    assert s.assd_mm == pytest.approx(float(assd), rel=1e-5)
    assert s.hd95_mm == pytest.approx(float(hd95), rel=1e-5)


def test_empty_prediction_is_missed() -> None:
    truth = cube()
    s = case_scores(np.zeros_like(truth), truth, SPACING)["femoral_cartilage"]
    assert (s.dice, s.assd_mm, s.hd95_mm) == (0.0, math.inf, math.inf)
    assert s.volume_error_mm3 == -s.volume_truth_mm3 == -64 * 7.5
    assert (s.volume_error_pct, s.state) == (-100.0, "missed")


def test_empty_truth_is_spurious() -> None:
    prediction = cube()
    s = case_scores(prediction, np.zeros_like(prediction), SPACING)["femoral_cartilage"]
    assert (s.dice, s.assd_mm, s.hd95_mm) == (0.0, math.inf, math.inf)
    assert s.volume_error_mm3 == 64 * 7.5
    assert math.isnan(s.volume_error_pct) and s.state == "spurious"


def test_both_empty_is_absent_and_undefined() -> None:
    s = case_scores(cube(), cube(), SPACING)["patellar_cartilage"]
    assert all(math.isnan(v) for v in (s.dice, s.assd_mm, s.hd95_mm, s.volume_error_pct))
    assert (s.volume_error_mm3, s.state) == (0.0, "absent")


def test_tibial_is_both_plates_as_one_mask() -> None:
    truth = np.zeros((6, 6, 12), np.uint8)
    truth[1:3, 1:3, 1:3] = MEDIAL
    truth[1:3, 1:3, 7:9] = LATERAL
    prediction = truth.copy()
    prediction[1:3, 1:2, 7:9] = 0  # half the lateral plate missed
    s = case_scores(prediction, truth, SPACING)
    assert s["medial_tibial_cartilage"].dice == 1.0
    assert s["lateral_tibial_cartilage"].dice == pytest.approx(2 * 4 / (4 + 8))
    assert s["tibial"].dice == pytest.approx(2 * 12 / (12 + 16))
    assert s["tibial"].volume_truth_mm3 == pytest.approx(16 * 7.5)
    swapped = np.where(truth == MEDIAL, LATERAL, np.where(truth == LATERAL, MEDIAL, 0))
    s = case_scores(swapped.astype(np.uint8), truth, SPACING)
    assert s["medial_tibial_cartilage"].dice == s["lateral_tibial_cartilage"].dice == 0.0
    assert (s["tibial"].dice, s["tibial"].hd95_mm) == (1.0, 0.0)


def test_volume_error_is_signed_prediction_minus_truth() -> None:
    truth = cube()
    bigger, smaller = cube(side=5), cube(side=3)
    over = case_scores(bigger, truth, SPACING)["femoral_cartilage"]
    under = case_scores(smaller, truth, SPACING)["femoral_cartilage"]
    assert over.volume_error_mm3 == pytest.approx((125 - 64) * 7.5)
    assert over.volume_error_pct == pytest.approx(100 * 61 / 64)
    assert under.volume_error_mm3 == pytest.approx((27 - 64) * 7.5)
    assert under.volume_error_pct == pytest.approx(-100 * 37 / 64)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"prediction": np.zeros((4, 4, 5), np.uint8)}, ValueError, "prediction"),
        ({"truth": np.full((4, 4, 4), 5, np.uint8)}, ValueError, "truth"),
        ({"truth": np.zeros((4, 4, 4), np.float32)}, TypeError, "truth"),
        ({"spacing": (1.0, 1.0)}, ValueError, "spacing"),
        ({"spacing": (1.0, 0.0, 1.0)}, ValueError, "spacing"),
    ],
)
def test_bad_arguments_are_named(kwargs: dict, error: type, argument: str) -> None:
    args = {
        "prediction": np.zeros((4, 4, 4), np.uint8),
        "truth": np.zeros((4, 4, 4), np.uint8),
        "spacing": (1.0, 1.0, 1.0),
    }
    with pytest.raises(error, match=f'"{argument}"'):
        case_scores(**(args | kwargs))


def test_a_knee_sized_case_scores_every_structure() -> None:
    z, y, x = np.mgrid[:48, :128, :128]
    radius = np.hypot(y - 50, (x - 64) / 1.2)
    truth = np.zeros((48, 128, 128), np.uint8)
    truth[(radius > 40) & (radius < 43) & (y < 60) & (z > 5) & (z < 43)] = FEMORAL
    truth[(y > 95) & (y < 99) & (x > 20) & (x < 60) & (z > 8) & (z < 40)] = MEDIAL
    truth[(y > 95) & (y < 99) & (x > 68) & (x < 110) & (z > 8) & (z < 40)] = LATERAL
    truth[(x - 64) ** 2 / 400 + (y - 10) ** 2 / 25 < 1] = PATELLAR
    prediction = np.roll(truth, (1, 2, -1), axis=(0, 1, 2))
    # (its speed, ~50 ms a case, is measured by benchmarks/bench_knee.py, not asserted here)
    scores = case_scores(prediction, truth, (3.0, 0.6, 0.6))
    assert all(0 < s.dice < 1 and 0 < s.hd95_mm < 4 for s in scores.structures)


# --- over cases -----------------------------------------------------------------------------


def evaluation(dice: dict[str, list[float]]) -> KneeEvaluation:
    ev = KneeEvaluation()
    for arm, values in dice.items():
        for i, d in enumerate(values):
            ev.add_scores(arm, synthetic_scores(f"case{i}", d))
    return ev


def test_interval_holds_the_mean_and_shrinks_with_more_cases() -> None:
    rng = np.random.default_rng(0)
    widths = []
    for n in (10, 160):
        summary = evaluation({"stage 1": list(rng.uniform(0.7, 1.0, n))}).summary(1000, seed=1)
        dice = summary.figures("stage 1", "femoral_cartilage").dice
        assert dice.low < dice.value < dice.high
        widths.append(dice.high - dice.low)
    assert widths[1] < widths[0] / 2.5  # about 1 / sqrt(16)


def test_same_seed_same_intervals_no_bootstrap_no_intervals() -> None:
    ev = evaluation({"stage 1": [0.8, 0.9, 0.7, 0.95]})
    assert ev.summary(200, seed=4) == ev.summary(200, seed=4)
    dice = ev.summary(0).figures("stage 1", "tibial").dice
    assert dice.value == pytest.approx(0.8375) and math.isnan(dice.low)


@pytest.mark.parametrize("gain", [0.02, -0.03])
def test_paired_difference_has_the_right_sign_and_pairs_cases(gain: float) -> None:
    stage1 = list(np.linspace(0.6, 0.95, 12))
    summary = evaluation({"stage 1": stage1, "both stages": [d + gain for d in stage1]}).summary(
        500
    )
    diff = summary.differences[0]
    assert (diff.arm, diff.baseline, diff.n_pairs) == ("both stages", "stage 1", 12)
    assert diff.dice_difference.value == pytest.approx(gain)
    # every case gains the same: a paired resampling cannot move the mean difference
    assert (diff.dice_difference.low, diff.dice_difference.high) == pytest.approx((gain, gain))
    assert diff.share_higher.value == (1.0 if gain > 0 else 0.0)


def test_share_higher_counts_cases() -> None:
    summary = evaluation(
        {"stage 1": [0.8, 0.8, 0.8, 0.8], "both stages": [0.9, 0.7, 0.9, 0.8]}
    ).summary(0)
    diff = summary.differences[0]
    assert diff.share_higher.value == 0.5 and diff.dice_difference.value == pytest.approx(0.025)


def test_empty_masks_in_the_means() -> None:
    truth = cube()
    ev = KneeEvaluation()
    ev.add("stage 1", truth, truth, SPACING, case_id="hit")
    ev.add("stage 1", np.zeros_like(truth), truth, SPACING, case_id="missed")
    ev.add("stage 1", np.roll(truth, 1, axis=0), truth, SPACING, case_id="shifted")
    s = ev.summary(100).figures("stage 1", "femoral_cartilage")
    assert (s.n_cases, s.n_absent, s.n_missed, s.n_spurious) == (3, 0, 1, 0)
    assert s.dice.value == pytest.approx((1 + 0 + 0.75) / 3)
    assert s.hd95_mm.value == pytest.approx(0.75)  # (0 + 1.5) / 2: the missed case left out
    assert s.abs_volume_error_pct.value == pytest.approx(100 / 3)
    assert s.volume_error_pct.value == pytest.approx(-100 / 3)
    patellar = ev.summary(0).figures("stage 1", "patellar_cartilage")
    assert patellar.n_absent == 3 and math.isnan(patellar.dice.value)


def test_goal_check_table_and_json() -> None:
    ev = KneeEvaluation()
    for i in range(6):
        ev.add_scores("stage 1", synthetic_scores(f"c{i}", 0.85 + 0.01 * (i % 2)))
        ev.add_scores("both stages", synthetic_scores(f"c{i}", 0.92 + 0.01 * (i % 2)))
    summary = ev.summary(200)
    goals = goal_check(summary)
    assert [(g[2], g[3]) for g in goals] == [
        (0.91, False),
        (0.86, False),
        (0.91, True),
        (0.86, True),
    ]
    assert goals[2][0].startswith("both stages: femoral_cartilage Dice 0.925 (")
    assert goals[2][1] == pytest.approx(0.925)
    assert [g[3] for g in goal_check(summary, "stage 1")] == [False, False]
    table = summary.format_table()
    for text in ("stage 1", "both stages - stage 1", "tibial", "ASSD mm", "+0.070", "NOT met"):
        assert text in table
    out = json.loads(json.dumps(ev.to_dict(50), allow_nan=False))
    assert out["summary"]["goals"][2]["met"] is True
    assert len(out["cases"]["both stages"]) == 6
