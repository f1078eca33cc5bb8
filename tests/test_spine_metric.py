"""The Spinal Disease 2020 evaluation rule on hand-made studies with known answers."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS
from training.spine_metric import (
    SPINE_CLASSES,
    Outcome,
    PredictedPoint,
    StudyPoints,
    TruthPoint,
    _table,
    average_precision,
    evaluate,
    match_study,
)

# Levels 20 px apart down the column at 1 mm per pixel: far beyond two 6 mm radii.
ROW = {level: 40.0 + 20.0 * i for i, level in enumerate(LEVELS)}


def truth(level: str, label: str = "normal", dr: float = 0.0, dc: float = 0.0) -> TruthPoint:
    return TruthPoint(level, ROW[level] + dr, 100.0 + dc, label)


def pred(
    level: str | None,
    label: str = "normal",
    score: float = 0.9,
    *,
    at: str | None = None,
    dr: float = 0.0,
    dc: float = 0.0,
    kind: str | None = None,
) -> PredictedPoint:
    """A prediction at the point of level ``at`` (default: its own level), offset in pixels."""
    where = at or level
    assert where is not None
    return PredictedPoint(level, ROW[where] + dr, 100.0 + dc, label, score, kind)  # type: ignore[arg-type]


def study(
    uid: str,
    truth_points: list[TruthPoint],
    predictions: list[PredictedPoint],
    spacing: tuple[float, float] = (1.0, 1.0),
) -> StudyPoints:
    return StudyPoints(uid, spacing, tuple(truth_points), tuple(predictions))


def figures(result, name):  # type: ignore[no-untyped-def]
    return result.classes[SPINE_CLASSES.index(name)]


def test_perfect_predictions_score_one_on_every_annotated_class() -> None:
    labels = {"L1": "degenerated", "L1-L2": "bulge", "L4-L5": "protrusion"}
    points = [truth(lv, labels.get(lv, "normal")) for lv in LEVELS]
    studies = [
        study(f"1.2.{i}", points, [pred(t.level, t.label, 0.5 + i / 10) for t in points])
        for i in range(3)
    ]
    result = evaluate(studies, bootstrap=0)
    present = (
        "vertebra:normal",
        "vertebra:degenerated",
        "disc:normal",
        "disc:bulge",
        "disc:protrusion",
    )
    assert result.map_classes == present
    assert result.map.value == 1.0
    for c in result.classes:
        if c.name in present:
            assert (c.ap.value, c.f1.value, c.precision, c.recall) == (1.0, 1.0, 1.0, 1.0)
            assert c.fp == c.fn == c.ignored == 0
        else:
            assert math.isnan(c.ap.value) and c.annotated == 0
    assert figures(result, "vertebra:normal").tp == 3 * 4
    assert result.within.value == 1.0
    assert result.levels[-1].level == "all" and result.levels[-1].median_mm == 0.0
    assert result.localisation_by == "level"


@pytest.mark.parametrize(
    ("dr", "dc", "outcome"),
    [
        (0.0, 2.95, Outcome.TP),  # 2.95 px x 2.0 mm = 5.9 mm
        (0.0, 3.05, Outcome.FP_MISS),  # 6.1 mm (1.525 mm if the spacing were swapped)
        (11.8, 0.0, Outcome.TP),  # 11.8 px x 0.5 mm = 5.9 mm
        (12.2, 0.0, Outcome.FP_MISS),  # 6.1 mm (24.4 mm if swapped)
        (6.0, 2.5, Outcome.TP),  # hypot(3 mm, 5 mm) = 5.83 mm
        (8.0, 2.5, Outcome.FP_MISS),  # hypot(4 mm, 5 mm) = 6.40 mm
    ],
)
def test_tolerance_is_measured_in_mm_with_anisotropic_spacing(
    dr: float, dc: float, outcome: Outcome
) -> None:
    s = study("1", [truth("L3")], [pred("L3", dr=dr, dc=dc)], spacing=(0.5, 2.0))
    match = match_study(s)
    assert match.outcomes == (outcome,)
    assert match.distance_mm[0] == pytest.approx(math.hypot(dr * 0.5, dc * 2.0))
    result = evaluate([s], bootstrap=0)
    vn = figures(result, "vertebra:normal")
    assert (vn.tp, vn.fp, vn.fn) == ((1, 0, 0) if outcome is Outcome.TP else (0, 1, 1))


def test_tolerance_is_strict_and_configurable() -> None:
    s = study("1", [truth("L3")], [pred("L3", dc=6.0)])
    assert match_study(s).outcomes == (Outcome.FP_MISS,)  # 6.0 mm is not less than 6 mm
    assert match_study(s, tolerance_mm=6.5).outcomes == (Outcome.TP,)


def test_wrong_class_within_tolerance_is_fp_of_predicted_and_fn_of_true_class() -> None:
    s = study("1", [truth("L4-L5", "bulge")], [pred("L4-L5", "protrusion", dr=2.0)])
    assert match_study(s).outcomes == (Outcome.FP_CLASS,)
    result = evaluate([s], bootstrap=0)
    bulge, protrusion = figures(result, "disc:bulge"), figures(result, "disc:protrusion")
    assert (bulge.tp, bulge.fp, bulge.fn, bulge.recall, bulge.ap.value) == (0, 0, 1, 0.0, 0.0)
    assert math.isnan(bulge.precision) and bulge.f1.value == 0.0
    assert (protrusion.tp, protrusion.fp, protrusion.fp_class, protrusion.fn) == (0, 1, 1, 0)
    assert protrusion.precision == 0.0 and protrusion.f1.value == 0.0
    assert result.map_classes == ("disc:bulge",) and result.map.value == 0.0


def test_kind_is_part_of_the_class() -> None:
    # disc:normal predicted on an annotated vertebra:normal point: same label, wrong class.
    s = study("1", [truth("L3")], [pred(None, "normal", kind="disc", at="L3")])
    assert match_study(s).outcomes == (Outcome.FP_CLASS,)


def test_prediction_far_from_every_point_is_fp() -> None:
    s = study("1", [truth("L3")], [pred("L3"), pred("L4", dc=40.0)])
    match = match_study(s)
    assert match.outcomes == (Outcome.TP, Outcome.FP_MISS)
    assert match.assigned == (0, -1) and match.hit_by == (0,)
    result = evaluate([s], bootstrap=0)
    vn = figures(result, "vertebra:normal")
    assert (vn.tp, vn.fp, vn.fp_miss, vn.fn, vn.precision) == (1, 1, 1, 0, 0.5)
    assert vn.f1.value == pytest.approx(2 / 3)  # 2 TP / (2 TP + FP + FN) = 2 / 3


def test_of_two_hits_the_nearest_is_tp_and_the_other_neither() -> None:
    # The farther prediction has the higher score: "nearest" wins, not "most confident".
    one = study("1", [truth("L3")], [pred("L3", score=0.5, dr=1.0)])
    two = study("1", [truth("L3")], [pred("L3", score=0.5, dr=1.0), pred("L3", score=0.9, dr=3.0)])
    assert match_study(two).outcomes == (Outcome.TP, Outcome.IGNORED)
    assert match_study(two).hit_by == (0,)
    a, b = (figures(evaluate([s], bootstrap=0), "vertebra:normal") for s in (one, two))
    assert (b.tp, b.fp, b.fn, b.ignored) == (1, 0, 0, 1)
    assert (
        (b.precision, b.ap.value, b.f1.value) == (a.precision, a.ap.value, a.f1.value) == (1, 1, 1)
    )


def test_wrong_class_hit_stays_fp_beside_a_right_class_tp() -> None:
    # "The nearest" is chosen among right-class hits: a nearer wrong-class hit stays an FP.
    s = study("1", [truth("L3")], [pred("L3", "degenerated", dr=0.5), pred("L3", "normal", dr=2.0)])
    assert match_study(s).outcomes == (Outcome.FP_CLASS, Outcome.TP)


def test_prediction_between_two_points_belongs_to_the_nearer() -> None:
    # L4 at row 180 and L4-L5 moved to row 190 (10 mm apart); a disc:bulge prediction 4.5 mm from
    # L4 and 5.5 mm from L4-L5 is within 6 mm of both but belongs to L4: a wrong class.
    points = [truth("L4"), truth("L4-L5", "bulge", dr=-10.0)]
    assert ROW["L4"] == 180.0
    s = study("1", points, [pred("L4-L5", "bulge", at="L4", dr=4.5)])
    match = match_study(s)
    assert match.outcomes == (Outcome.FP_CLASS,) and match.assigned == (0,)
    assert match.hit_by == (-1, -1)
    mirrored = study("1", points, [pred("L4-L5", "bulge", at="L4", dr=5.5)])
    assert match_study(mirrored).outcomes == (Outcome.TP,)
    assert match_study(mirrored).hit_by == (-1, 0)


def test_level_identity_plays_no_part_in_matching() -> None:
    # Named L3 but placed on the annotated L4 with L4's class: a TP; L3 stays an FN.
    s = study("1", [truth("L3"), truth("L4")], [pred("L3", at="L4", dc=1.0)])
    match = match_study(s)
    assert match.outcomes == (Outcome.TP,) and match.hit_by == (-1, 0)
    # The localisation error pairs by level: L3's is hypot(40, 1) mm away, L4 has no prediction.
    assert match.localisation_mm[0] == pytest.approx(math.hypot(40.0, 1.0))
    assert match.localisation_mm[1] == math.inf


def test_average_precision_interpolated_by_hand() -> None:
    # TP, FP, TP with 2 positives: precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1.
    # Envelope: 1 at recall 1/2, 2/3 at recall 1 -> AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 2) == pytest.approx(5 / 6)
    # TP, FP, FP, TP, TP with 3 positives: precision 1, 1/2, 1/3, 1/2, 3/5 at recall 1/3,
    # 1/3, 1/3, 2/3, 1. The envelope lifts recall 2/3 to 3/5: AP = (1 + 3/5 + 3/5) / 3
    # = 11/15 (the step-wise, uninterpolated sum would give (1 + 1/2 + 3/5) / 3 = 0.7).
    flags = [True, False, False, True, True]
    assert average_precision([0.9, 0.8, 0.7, 0.6, 0.5], flags, 3) == pytest.approx(11 / 15)
    # A missed positive caps recall: TP, FP, TP with 3 positives -> 1/3 * 1 + 1/3 * 2/3.
    assert average_precision([0.9, 0.8, 0.7], [True, False, True], 3) == pytest.approx(5 / 9)
    # Tied scores enter together, in any order: FP and TP at 0.9 -> precision 1/2 at recall 1.
    assert average_precision([0.9, 0.9], [False, True], 1) == 0.5
    assert average_precision([0.9, 0.9], [True, False], 1) == 0.5
    assert average_precision([], [], 2) == 0.0
    assert math.isnan(average_precision([0.5], [False], 0))


def test_evaluate_ranks_by_score_across_studies() -> None:
    # The same TP, FP, TP list spread over three studies: AP 5/6 for vertebra:normal.
    studies = [
        study("1", [truth("L1")], [pred("L1", score=0.9)]),
        study("2", [], [pred("L2", score=0.8)]),
        study("3", [truth("L3")], [pred("L3", score=0.7)]),
    ]
    result = evaluate(studies, bootstrap=0)
    assert figures(result, "vertebra:normal").ap.value == pytest.approx(5 / 6)
    assert result.map.value == pytest.approx(5 / 6)


def test_classes_without_annotations_are_left_out_of_the_map() -> None:
    points = [truth("L1"), truth("L2", "degenerated")]
    predictions = [pred("L1"), pred("L4-L5", "extrusion", dc=30.0)]  # stray extrusion: an FP
    result = evaluate([study("1", points, predictions)], bootstrap=0)
    # vertebra:normal AP 1 and vertebra:degenerated AP 0 (annotated, never predicted) count;
    # disc:extrusion has no annotated point: no AP, not in the mean.
    assert result.map_classes == ("vertebra:normal", "vertebra:degenerated")
    assert math.isnan(figures(result, "disc:extrusion").ap.value)
    assert figures(result, "disc:extrusion").fp == 1
    assert result.map.value == 0.5


def test_localisation_errors_per_level() -> None:
    offsets = [1.0, 2.0, 3.0, 4.0]
    studies = [study(str(i), [truth("L3")], [pred("L3", dc=d)]) for i, d in enumerate(offsets)]
    studies.append(study("9", [truth("L3"), truth("L4")], [pred("L3", dc=7.0)]))
    result = evaluate(studies, bootstrap=0)
    l3 = result.levels[LEVELS.index("L3")]
    # Distances 1, 2, 3, 4, 7 mm: median 3, mean 3.4, p95 at rank 0.95 * 4 = 3.8 -> 4 + 0.8 * 3.
    assert (l3.annotated, l3.located) == (5, 5)
    assert (l3.median_mm, l3.mean_mm, l3.p95_mm) == pytest.approx((3.0, 3.4, 6.4))
    assert l3.within == 0.8
    l4 = result.levels[LEVELS.index("L4")]
    assert (l4.annotated, l4.located, l4.within) == (1, 0, 0.0) and math.isnan(l4.median_mm)
    assert result.levels[-1].within == pytest.approx(4 / 6) == result.within.value


def test_localisation_without_levels_uses_the_nearest_prediction() -> None:
    predictions = [
        pred(None, kind="vertebra", at="L3", dc=2.0),
        pred(None, kind="disc", at="L4", dc=1.0),
    ]
    s = study("1", [truth("L3"), truth("L4")], predictions)
    assert match_study(s).localisation_mm == pytest.approx((2.0, 1.0))
    assert evaluate([s], bootstrap=0).localisation_by == "nearest"


def test_same_level_prediction_with_the_highest_score_is_measured() -> None:
    s = study("1", [truth("L3")], [pred("L3", score=0.4, dc=1.0), pred("L3", score=0.8, dc=5.0)])
    assert match_study(s).localisation_mm == (5.0,)


def _random_studies(n: int, seed: int = 1) -> list[StudyPoints]:
    rng = np.random.default_rng(seed)
    out = []
    for s in range(n):
        points, predictions = [], []
        for level in LEVELS:
            kind = LEVEL_KIND[level]
            label = str(rng.choice(CLASSES[kind]))
            points.append(truth(level, label))
            for guess in CLASSES[kind]:
                score = float(rng.random()) * (2.0 if guess == label else 1.0) / 2.0
                dr, dc = rng.normal(0.0, 3.0, 2)
                predictions.append(pred(level, guess, score, dr=float(dr), dc=float(dc)))
        out.append(study(f"1.2.{s}", points, predictions, spacing=(0.7, 0.6)))
    return out


def test_bootstrap_is_deterministic_and_brackets_the_estimate() -> None:
    studies = _random_studies(40)
    a = evaluate(studies, bootstrap=200, seed=3)
    b = evaluate(studies, bootstrap=200, seed=3)
    c = evaluate(studies, bootstrap=200, seed=4)
    assert a.to_dict() == b.to_dict()
    assert (a.map.low, a.map.high) != (c.map.low, c.map.high)
    assert a.map.value == c.map.value
    for value in [a.map, a.within, *(cls.f1 for cls in a.classes), *(cls.ap for cls in a.classes)]:
        assert value.low <= value.value <= value.high
        assert value.high - value.low > 0
    none = evaluate(studies, bootstrap=0)
    assert none.map.value == a.map.value and math.isnan(none.map.low)


def test_bootstrap_weights_equal_duplicated_studies() -> None:
    # A resample that draws study 0 twice and study 1 never must score like the data set
    # [study 0, a copy of study 0, study 2]: the vectorised figures are checked against it.
    studies = _random_studies(3, seed=7)
    copy = StudyPoints("copy", studies[0].pixel_spacing, studies[0].truth, studies[0].predictions)
    direct = evaluate([studies[0], copy, studies[2]], bootstrap=0)
    matches = [match_study(s) for s in studies]
    weighted = _table(studies, matches, 6.0).figures(np.array([[2.0, 0.0, 1.0]]))
    assert weighted["map"][0] == pytest.approx(direct.map.value)
    assert weighted["ap"][0] == pytest.approx([c.ap.value for c in direct.classes], nan_ok=True)
    assert weighted["f1"][0] == pytest.approx([c.f1.value for c in direct.classes], nan_ok=True)
    assert weighted["within"][0] == pytest.approx(direct.within.value)


def test_bootstrap_over_300_studies_takes_seconds() -> None:
    studies = _random_studies(300)
    start = time.perf_counter()
    result = evaluate(studies, bootstrap=1000, seed=0)
    assert time.perf_counter() - start < 20.0
    assert result.n_studies == 300 and result.n_annotated == 3300
    assert result.n_predictions == 300 * (6 * 5 + 5 * 2)


def test_report_and_dict() -> None:
    result = evaluate(_random_studies(5), bootstrap=50)
    data = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert [c["name"] for c in data["classes"]] == list(SPINE_CLASSES)
    assert data["map"]["value"] == round(result.map.value, 6)
    assert "matches" not in data and len(data["levels"]) == len(LEVELS) + 1
    table = result.format_table()
    assert "mAP over the 7 classes with annotated points" in table
    assert "disc:schmorl_node" in table and "L5-S1" in table


@pytest.mark.parametrize(
    ("build", "error", "argument"),
    [
        (lambda: TruthPoint("L6", 1.0, 1.0, "normal"), ValueError, '"level"'),
        (lambda: TruthPoint("L3", 1.0, 1.0, "bulge"), ValueError, '"label"'),
        (lambda: TruthPoint("L3", float("nan"), 1.0, "normal"), ValueError, '"row"'),
        (lambda: TruthPoint("L3", 1.0, "2", "normal"), TypeError, '"col"'),  # type: ignore[arg-type]
        (lambda: PredictedPoint("L3-L4", 1.0, 1.0, "degenerated", 0.5), ValueError, '"label"'),
        (lambda: PredictedPoint("L3", 1.0, 1.0, "normal", 1.5), ValueError, '"score"'),
        (lambda: PredictedPoint("L3", 1.0, 1.0, "normal", -0.1), ValueError, '"score"'),
        (lambda: PredictedPoint("L3", 1.0, 1.0, "normal", float("nan")), ValueError, '"score"'),
        (lambda: PredictedPoint(None, 1.0, 1.0, "normal", 0.5), ValueError, '"kind"'),
        (lambda: PredictedPoint("L3", 1.0, 1.0, "normal", 0.5, "disc"), ValueError, '"kind"'),
        (lambda: PredictedPoint(None, 1.0, 1.0, "normal", 0.5, "bone"), ValueError, '"kind"'),  # type: ignore[arg-type]
        (lambda: StudyPoints("1", (0.0, 1.0)), ValueError, '"pixel_spacing"'),
        (lambda: StudyPoints("1", (-0.5, 1.0)), ValueError, '"pixel_spacing"'),
        (lambda: StudyPoints("1", (0.5,)), ValueError, '"pixel_spacing"'),  # type: ignore[arg-type]
        (lambda: StudyPoints("", (0.5, 0.5)), ValueError, '"study_uid"'),
        (lambda: StudyPoints("1", (1, 1), (truth("L3"), truth("L3"))), ValueError, '"truth"'),
        (
            lambda: StudyPoints("1", (1, 1), (), (pred("L3"), pred(None, kind="disc", at="L3"))),
            ValueError,
            '"predictions"',
        ),
        (lambda: StudyPoints("1", (1, 1), (pred("L3"),)), TypeError, '"truth"'),  # type: ignore[arg-type]
        (lambda: evaluate([]), ValueError, '"studies"'),
        (lambda: evaluate([study("1", [], []), study("1", [], [])]), ValueError, '"studies"'),
        (lambda: evaluate([study("1", [], [])], tolerance_mm=0.0), ValueError, '"tolerance_mm"'),
        (lambda: evaluate([study("1", [], [])], bootstrap=-1), ValueError, '"bootstrap"'),
        (lambda: evaluate([study("1", [], [])], seed=1.5), ValueError, '"seed"'),  # type: ignore[arg-type]
        (lambda: evaluate(study("1", [], [])), TypeError, '"studies"'),  # type: ignore[arg-type]
        (lambda: average_precision([0.5], [True], 0), ValueError, '"n_positives"'),
    ],
)
def test_bad_input_names_the_argument(build, error, argument) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(error, match=argument):
        build()
