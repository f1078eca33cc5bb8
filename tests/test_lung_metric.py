"""The lung per-lesion figures on hand-made scans whose answers are worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mibi_node.analyses.lung.labels import LABEL_OF
from mibi_node.analyses.lung.linking import Lesion3D
from training.lung_metric import (
    FP_RATES,
    LungEvaluation,
    Outcome,
    ScanLesions,
    evaluate,
    goal_check,
    match_scan,
)

GGO, BRONCHI = LABEL_OF["ground_glass_opacity"], LABEL_OF["bronchiectasis"]
AGNOSTIC, AWARE = "all (class-agnostic)", "all (class-aware)"


def cube(
    k: int, j: int, i: int, *, side: int = 4, score: float = 1.0, label: int = GGO
) -> Lesion3D:
    return Lesion3D(label, score, (k, j, i), np.ones((side, side, side), dtype=bool))


def scan(name: str, truth: list[Lesion3D], predictions: list[Lesion3D]) -> ScanLesions:
    return ScanLesions(name, tuple(truth), tuple(predictions))


def run(scans: list[ScanLesions], **kwargs: object) -> LungEvaluation:
    return evaluate(scans, bootstrap=0, **kwargs)  # type: ignore[arg-type]


def sens(evaluation: LungEvaluation, row: str = AGNOSTIC) -> list[float]:
    return [s.value for s in evaluation.row(row).sensitivity]


# --- hand cases ------------------------------------------------------------------------------


def test_perfect_predictions_score_one_everywhere() -> None:
    scans = [
        scan(
            f"s{n}",
            [cube(2, 2, 2), cube(10, 10, 10, label=BRONCHI)],
            [cube(2, 2, 2, score=0.9), cube(10, 10, 10, score=0.8, label=BRONCHI)],
        )
        for n in range(2)
    ]
    result = run(scans)
    for row in result.rows:
        assert sens(result, row.name) == [1.0] * 7
        assert row.cpm.value == 1.0 and row.ap.value == 1.0 and row.dice.value == 1.0
        assert row.n_fp == 0 and row.n_ignored == 0
    assert result.row(AGNOSTIC).n_lesions == 4 and result.row("bronchiectasis").n_detected == 2
    assert all(goal[3] for goal in goal_check(result))


def test_one_high_scoring_fp_per_scan() -> None:
    # ranking: FP 0.9, FP 0.9 (tied), TP 0.8, TP 0.8 over 2 scans and 2 lesions
    # curve (0, 0) -> (1 FP/scan, 0) -> (1, 1): collapsed to (0, 0), (1, 1)
    scans = [
        scan(f"s{n}", [cube(2, 2, 2)], [cube(2, 2, 2, score=0.8), cube(12, 12, 12, score=0.9)])
        for n in range(2)
    ]
    result = run(scans)
    assert sens(result) == pytest.approx([0.125, 0.25, 0.5, 1, 1, 1, 1])
    assert result.row(AGNOSTIC).cpm.value == pytest.approx(4.875 / 7)
    # VOC: precision 0/2 then 2/4 at recall 1
    assert result.row(AGNOSTIC).ap.value == pytest.approx(0.5)
    assert result.row(AGNOSTIC).n_fp == 2
    assert result.row(AGNOSTIC).dice.value == 1.0


def test_a_missed_lesion_halves_the_sensitivity_and_dice_counts_only_detected_ones() -> None:
    # the prediction is shifted one slice: overlap 48 voxels, Dice 96 / 128, IoU 48 / 80
    shifted = cube(3, 2, 2, score=0.9)
    result = run([scan("s", [cube(2, 2, 2), cube(12, 12, 12)], [shifted])])
    row = result.row(AGNOSTIC)
    assert sens(result) == [0.5] * 7
    assert row.cpm.value == 0.5
    assert row.ap.value == pytest.approx(0.5)
    assert row.dice.value == pytest.approx(0.75)
    assert (row.n_lesions, row.n_detected, row.n_fp) == (2, 1, 0)


def test_two_hits_on_one_lesion_count_once_and_the_other_is_ignored() -> None:
    truth = Lesion3D(GGO, 1.0, (2, 2, 2), np.ones((6, 6, 6), dtype=bool))
    small = cube(4, 4, 4, side=2, score=0.95)  # centroid inside; IoU 8 / 216
    whole = Lesion3D(GGO, 0.6, (2, 2, 2), np.ones((6, 6, 6), dtype=bool))
    match = match_scan(scan("s", [truth], [whole, small]))
    assert match.outcomes == (Outcome.IGNORED, Outcome.TP)  # the higher score is the TP
    assert match.detected_by == (1,)
    result = run([scan("s", [truth], [whole, small])])
    row = result.row(AGNOSTIC)
    assert (row.n_detected, row.n_fp, row.n_ignored) == (1, 0, 1)
    assert row.cpm.value == 1.0
    assert row.dice.value == pytest.approx(16 / 224)  # of the TP pair: 2 * 8 / (216 + 8)
    # VOC counts the small one as an FP ranked first: precision 1/2 at recall 1
    assert row.ap.value == pytest.approx(0.5)


def test_sensitivity_at_exactly_one_fp_per_scan() -> None:
    # 2 scans, 4 lesions; ranking TP .95, FP .9, TP .85, FP .8, TP .7, FP .6
    # points (FP/scan, sens): (0, .25) (.5, .25) (.5, .5) (1, .5) (1, .75) (1.5, .75)
    a = scan(
        "a",
        [cube(0, 0, 0), cube(10, 10, 10)],
        [cube(0, 0, 0, score=0.95), cube(10, 10, 10, score=0.7), cube(20, 20, 20, score=0.9)],
    )
    b = scan(
        "b",
        [cube(0, 0, 0), cube(10, 10, 10)],
        [cube(0, 0, 0, score=0.85), cube(20, 20, 20, score=0.8), cube(30, 30, 30, score=0.6)],
    )
    result = run([a, b])
    assert sens(result)[FP_RATES.index(1.0)] == pytest.approx(0.75)
    assert sens(result) == pytest.approx([0.3125, 0.375, 0.5, 0.75, 0.75, 0.75, 0.75])
    assert result.row(AGNOSTIC).cpm.value == pytest.approx(4.1875 / 7)


def test_scans_without_lesions_contribute_fps_only() -> None:
    found = scan("a", [cube(2, 2, 2)], [cube(2, 2, 2, score=0.5)])
    assert run([found]).row(AGNOSTIC).cpm.value == 1.0
    # an empty scan without predictions only doubles the denominator of the FP rate
    assert run([found, scan("b", [], [])]).row(AGNOSTIC).cpm.value == 1.0
    # an FP at 0.9 on a lesion-free scan: (0, 0) -> (0.5, 0) -> (0.5, 1)
    result = run([found, scan("b", [], [cube(5, 5, 5, score=0.9)])])
    assert sens(result) == pytest.approx([0.25, 0.5, 1, 1, 1, 1, 1])
    assert result.row(AGNOSTIC).cpm.value == pytest.approx(5.75 / 7)
    assert result.row(AGNOSTIC).n_lesions == 1 and result.row(AGNOSTIC).n_fp == 1
    # a row without any truth lesion has no FROC, but counts its FPs
    only_fp = run([scan("b", [], [cube(5, 5, 5, score=0.9)])])
    assert math.isnan(only_fp.row(AGNOSTIC).cpm.value) and only_fp.row(AGNOSTIC).n_fp == 1


def test_wrong_class_hits_class_agnostic_but_not_class_aware() -> None:
    result = run([scan("s", [cube(2, 2, 2, label=GGO)], [cube(2, 2, 2, score=0.9, label=BRONCHI)])])
    assert result.row(AGNOSTIC).cpm.value == 1.0
    assert result.row(AWARE).cpm.value == 0.0 and result.row(AWARE).n_fp == 1
    assert result.row("ground_glass_opacity").cpm.value == 0.0
    assert result.row("ground_glass_opacity").ap.value == 0.0
    assert math.isnan(result.row("bronchiectasis").cpm.value)
    assert result.row("bronchiectasis").n_fp == 1
    assert result.row(AWARE).ap.value == 0.0  # mAP over the one class with lesions


def test_iou_rule_hits_where_the_centroid_falls_outside() -> None:
    shell = np.ones((6, 6, 6), dtype=bool)
    shell[1:5, 1:5, 1:5] = False  # hollow: the centroid lies in the hole
    truth = Lesion3D(GGO, 1.0, (2, 2, 2), shell)
    pred = Lesion3D(GGO, 0.9, (2, 2, 2), shell.copy())
    scans = [scan("s", [truth], [pred])]
    assert run(scans, hit="centroid").row(AGNOSTIC).cpm.value == 0.0
    assert run(scans, hit="iou").row(AGNOSTIC).cpm.value == 1.0
    # IoU of a 4-cube shifted 3 voxels: 16 / 112 = 0.143
    moved = [scan("s", [cube(2, 2, 2)], [cube(5, 2, 2, score=0.9)])]
    assert run(moved, hit="iou", min_iou=0.1).row(AGNOSTIC).n_detected == 1
    assert run(moved, hit="iou", min_iou=0.2).row(AGNOSTIC).n_detected == 0


def test_bootstrap_interval_contains_the_value_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    scans = []
    for n in range(12):
        truth = [cube(2, 2, 2), cube(12, 12, 12, label=BRONCHI)]
        preds = [cube(2 + int(rng.integers(0, 3)), 2, 2, score=float(rng.uniform(0.3, 1)))]
        if rng.uniform() < 0.6:
            preds.append(cube(12, 12, 12, score=float(rng.uniform(0.3, 1)), label=BRONCHI))
        preds += [cube(30, 30, 30, score=float(rng.uniform(0, 1))) for _ in range(n % 3)]
        scans.append(scan(f"s{n}", truth, preds))
    a = evaluate(scans, bootstrap=200, seed=7)
    for row in a.rows:
        for figure in (row.cpm, row.ap, row.dice):
            assert figure.low <= figure.value <= figure.high
    assert a.row(AGNOSTIC).cpm.low < a.row(AGNOSTIC).cpm.high
    assert evaluate(scans, bootstrap=200, seed=7) == a
    assert evaluate(scans, bootstrap=200, seed=8) != a
    assert math.isnan(run(scans).row(AGNOSTIC).cpm.low)


def test_table_dict_and_goal_report_the_figures() -> None:
    scans = [scan("s", [cube(2, 2, 2)], [cube(3, 2, 2, score=0.9)])]
    result = evaluate(scans, bootstrap=20)
    text = result.format_table()
    assert "all (class-aware)" in text and "bronchiectasis" in text and "CPM" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["rows"][0]["cpm"]["value"] == 1.0 and data["fp_rates"][0] == 0.125
    assert "matches" not in data
    goals = goal_check(result)
    assert [(g[2], g[3]) for g in goals] == [(0.93, True), (0.80, False)]  # Dice 0.75
    assert "cpm" in goals[0][0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"hit": "box"}, '"hit"'),
        ({"min_iou": 0}, '"min_iou"'),
        ({"ap_iou": 1.5}, '"ap_iou"'),
        ({"bootstrap": -1}, '"bootstrap"'),
    ],
)
def test_bad_arguments_name_themselves(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        evaluate([scan("s", [], [])], **kwargs)  # type: ignore[arg-type]


def test_bad_scans_are_refused() -> None:
    with pytest.raises(ValueError, match='"scans"'):
        evaluate([])
    with pytest.raises(ValueError, match="scan_id"):
        evaluate([scan("s", [], []), scan("s", [], [])])
    with pytest.raises(TypeError, match='"truth"'):
        ScanLesions("s", ("x",), ())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="LungEvaluation"):
        goal_check("x")  # type: ignore[arg-type]


def test_voc_ap_counts_a_duplicate_as_an_fp_where_the_froc_ignores_it() -> None:
    # ranking for the AP: TP .9, duplicate FP .8, TP .7 -> 0.5 * 1 + 0.5 * 2/3
    truth = [cube(2, 2, 2), cube(12, 12, 12)]
    preds = [cube(2, 2, 2, score=0.9), cube(2, 2, 2, score=0.8), cube(12, 12, 12, score=0.7)]
    row = run([scan("s", truth, preds)]).row("ground_glass_opacity")
    assert row.ap.value == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert row.cpm.value == 1.0 and (row.n_fp, row.n_ignored) == (0, 1)
