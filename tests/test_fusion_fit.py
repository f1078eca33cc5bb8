"""Fusion fitting on constructed predictions where the right weights and temperature are known."""

from __future__ import annotations

import numpy as np
import pytest

from mibi_node.inference.ensemble import fuse
from training.fusion import fit_fusion, fit_temperature, fit_weights


def _mixture(weights: list[float], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Member probabilities q_i and labels drawn from sum_i k_i q_i: the MLE of k is k."""
    rng = np.random.default_rng(seed)
    members = rng.dirichlet(np.full(5, 0.3), size=(len(weights), n))
    truth = np.einsum("m,mnk->nk", np.asarray(weights), members)
    labels = (rng.uniform(size=(n, 1)) > truth.cumsum(axis=1)).sum(axis=1)
    return members, labels


def test_maximum_likelihood_weights_recover_the_mixture() -> None:
    members, labels = _mixture([0.6, 0.3, 0.1], 20_000, seed=1)
    weights = fit_weights(members, labels, shrinkage=0.0)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights >= 0).all()
    assert weights == pytest.approx([0.6, 0.3, 0.1], abs=0.03)


def test_a_useless_member_gets_no_weight() -> None:
    members, labels = _mixture([0.5, 0.5, 0.0], 20_000, seed=2)
    weights = fit_weights(members, labels, shrinkage=0.0)
    assert weights[2] < 0.03
    assert weights[:2] == pytest.approx([0.5, 0.5], abs=0.04)


def test_shrinkage_pulls_toward_equal_weights() -> None:
    members, labels = _mixture([0.8, 0.2, 0.0], 2_000, seed=3)
    free = fit_weights(members, labels, shrinkage=0.0)
    mild = fit_weights(members, labels, shrinkage=0.2)
    strong = fit_weights(members, labels, shrinkage=1e4)
    equal = np.full(3, 1 / 3)
    assert np.abs(mild - equal).sum() < np.abs(free - equal).sum()
    assert strong == pytest.approx(equal, abs=1e-3)


def test_temperature_undoes_overconfidence() -> None:
    rng = np.random.default_rng(4)
    logits = rng.normal(0, 1.5, size=(20_000, 5))
    truth = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = (rng.uniform(size=(len(truth), 1)) > truth.cumsum(axis=1)).sum(axis=1)
    overconfident = np.exp(2 * logits) / np.exp(2 * logits).sum(axis=1, keepdims=True)
    assert fit_temperature(overconfident, labels) == pytest.approx(2.0, rel=0.05)
    assert fit_temperature(truth, labels) == pytest.approx(1.0, rel=0.05)


def test_fit_fusion_compares_and_keeps_what_the_recipe_asks() -> None:
    members, labels = _mixture([0.7, 0.3, 0.0], 5_000, seed=5)
    fitted = fit_fusion(
        members, labels, choice="fitted", shrinkage=0.0, member_names=("a", "b", "c")
    )
    assert fitted.fusion.method == "soft"
    assert fitted.fusion.weights == pytest.approx(fitted.fitted_weights)
    assert set(fitted.scores) == {"fitted", "equal", "vote", "chosen"}
    # the NLL-fitted weights cannot do worse than equal weights on the data they were fitted on
    assert fitted.scores["fitted"]["nll"] <= fitted.scores["equal"]["nll"]
    # the temperature is fitted on top: never worse NLL than T = 1
    assert fitted.scores["chosen"]["nll"] <= fitted.scores["fitted"]["nll"] + 1e-9
    # the stored fusion reproduces the chosen score through the serving code
    fused = fuse(members, fitted.fusion)
    nll = -np.log(fused.probabilities[np.arange(len(labels)), labels]).mean()
    assert nll == pytest.approx(fitted.scores["chosen"]["nll"], rel=1e-6)
    document = fitted.to_dict()
    assert document["members"] == ["a", "b", "c"] and len(document["weights"]) == 3
    assert "fitted k" in fitted.summary()

    equal = fit_fusion(members, labels, choice="equal", temperature=False)
    assert equal.fusion.weights == pytest.approx((1 / 3,) * 3)
    assert equal.fusion.temperature == 1.0
    vote = fit_fusion(members, labels, choice="vote")
    assert vote.fusion.method == "majority"
    # voting reports the equal-weight average: same NLL, its own accuracy
    assert vote.scores["vote"]["nll"] == pytest.approx(vote.scores["equal"]["nll"])


def test_bad_arguments_name_themselves() -> None:
    members, labels = _mixture([0.5, 0.5], 50, seed=6)
    with pytest.raises(ValueError, match='"member_probabilities"'):
        fit_weights(members[0], labels)
    with pytest.raises(ValueError, match='"labels"'):
        fit_weights(members, labels[:-1])
    with pytest.raises(ValueError, match='"shrinkage"'):
        fit_weights(members, labels, shrinkage=-1.0)
    with pytest.raises(ValueError, match='"choice"'):
        fit_fusion(members, labels, choice="median")  # type: ignore[arg-type]
