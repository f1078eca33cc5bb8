"""The test module's figures against hand-computed cases, and the bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from training.metrics import (
    MetricValue,
    bootstrap_intervals,
    classification_metrics,
    expected_calibration_error,
    metrics_to_dict,
    summarise,
)

# Four studies, three classes: truth 0, 1, 2, 2; the last study is predicted 0 (wrong).
LABELS = np.array([0, 1, 2, 2])
PROBS = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.1, 0.8, 0.1],
        [0.2, 0.3, 0.5],
        [0.6, 0.3, 0.1],
    ]
)


def test_hand_computed_case() -> None:
    m = classification_metrics(LABELS, PROBS)
    assert m["accuracy"] == pytest.approx(0.75)
    # per-class F1: class 0 P=1/2 R=1 -> 2/3; class 1 -> 1; class 2 P=1 R=1/2 -> 2/3
    assert m["macro_f1"] == pytest.approx(7 / 9)
    # p_o = 3/4; p_e = (1*2 + 1*1 + 2*1) / 16 = 5/16
    assert m["kappa"] == pytest.approx((0.75 - 5 / 16) / (1 - 5 / 16))
    assert m["nll"] == pytest.approx(
        -(math.log(0.7) + math.log(0.8) + math.log(0.5) + math.log(0.1)) / 4
    )
    # sum of squared errors per study: 0.14, 0.06, 0.38, 1.26
    assert m["brier"] == pytest.approx(1.84 / 4)
    # every study in its own bin: (0.3 + 0.2 + 0.5 + 0.6) / 4
    assert m["ece"] == pytest.approx(0.4)
    # one-vs-rest AUCs 1, 1 and 0.75 (class 2: the 0.1 of study 4 ties two negatives)
    assert m["macro_auc"] == pytest.approx((1 + 1 + 0.75) / 3)
    assert m["sensitivity"] == pytest.approx([1.0, 1.0, 0.5])
    assert m["specificity"] == pytest.approx([2 / 3, 1.0, 1.0])


def test_macro_auc_equals_scikit_learn_ovr_when_every_class_is_present() -> None:
    rng = np.random.default_rng(3)
    labels = np.arange(200) % 5
    probs = rng.dirichlet(np.ones(5), 200)
    probs[np.arange(200), labels] += rng.uniform(0, 0.5, 200)
    probs /= probs.sum(axis=1, keepdims=True)
    expected = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert classification_metrics(labels, probs)["macro_auc"] == pytest.approx(expected)


def test_given_predictions_override_the_argmax() -> None:
    m = classification_metrics(LABELS, PROBS, predicted=[0, 1, 2, 2])
    assert m["accuracy"] == 1.0
    assert m["kappa"] == pytest.approx(1.0)


def test_absent_class_gives_nan_sensitivity_and_is_left_out_of_auc() -> None:
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]])
    m = classification_metrics([0, 1], probs)
    assert math.isnan(m["sensitivity"][2])
    assert m["specificity"][2] == 1.0
    assert m["macro_auc"] == 1.0


def test_ece_of_a_calibrated_constant_forecast_is_zero() -> None:
    # 10 studies at confidence 0.6, 6 of them right
    probs = np.tile([0.6, 0.4], (10, 1))
    labels = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(labels, probs) == pytest.approx(0.0)


def test_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match='"probabilities"'):
        classification_metrics([0, 1], [0.5, 0.5])
    with pytest.raises(ValueError, match='"labels"'):
        classification_metrics([0, 3], PROBS[:2])
    with pytest.raises(ValueError, match='"n_bins"'):
        expected_calibration_error(LABELS, PROBS, n_bins=0)


def test_bootstrap_interval_brackets_the_estimate_and_narrows_with_more_studies() -> None:
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 5, n)
        probs = rng.dirichlet(np.ones(5), n)
        right = rng.uniform(size=n) < 0.8
        probs[right, labels[right]] += 1.0
        return labels, probs / probs.sum(axis=1, keepdims=True)

    small, large = sample(60), sample(600)
    widths = []
    for labels, probs in (small, large):
        point = classification_metrics(labels, probs)
        bounds = bootstrap_intervals(labels, probs, n_resamples=200, seed=1)
        for name in ("accuracy", "macro_auc", "kappa", "nll"):
            low, high = bounds[name]
            assert low <= point[name] <= high, name
        widths.append(bounds["accuracy"][1] - bounds["accuracy"][0])
        assert len(bounds["sensitivity"]) == 5
    assert widths[1] < widths[0] / 2
    # same seed, same intervals
    assert bootstrap_intervals(*small, n_resamples=50, seed=4) == bootstrap_intervals(
        *small, n_resamples=50, seed=4
    )


def test_summarise_and_json_form() -> None:
    summary = summarise(LABELS, PROBS, n_resamples=30, seed=0)
    assert isinstance(summary["accuracy"], MetricValue)
    assert summary["accuracy"].value == pytest.approx(0.75)
    assert summary["accuracy"].format().startswith("0.750 (")
    plain = summarise(LABELS, PROBS, n_resamples=0)
    assert plain["accuracy"].format() == "0.750"
    document = metrics_to_dict(summary, ["a", "b", "c"])
    assert document["accuracy"]["value"] == 0.75
    assert set(document["sensitivity"]) == {"a", "b", "c"}
