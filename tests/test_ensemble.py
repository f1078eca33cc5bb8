"""Fusion: weighted soft voting, majority voting, temperature and the uncertainty figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mibi_node.inference.ensemble import Fusion, fuse, normalised_entropy


def probs(*rows: list[float]) -> np.ndarray:
    return np.asarray(rows, dtype=np.float64)


def test_soft_voting_is_the_patents_weighted_sum() -> None:
    p = np.stack(
        [
            probs([0.7, 0.1, 0.1, 0.05, 0.05]),
            probs([0.1, 0.6, 0.1, 0.1, 0.1]),
            probs([0.2, 0.5, 0.1, 0.1, 0.1]),
        ]
    )
    fusion = Fusion("soft", (0.5, 0.25, 0.25))
    out = fuse(p, fusion)
    expected = 0.5 * p[0] + 0.25 * p[1] + 0.25 * p[2]
    np.testing.assert_allclose(out.probabilities, expected)
    assert out.predicted.tolist() == [0]
    np.testing.assert_allclose(out.agreement, [1 / 3])
    np.testing.assert_allclose(out.probabilities.sum(axis=1), 1.0)
    assert out.member_probabilities.shape == (3, 1, 5)


def test_majority_voting_and_tie_break() -> None:
    p = np.stack(
        [
            probs([0.9, 0.1, 0, 0, 0], [0.5, 0.3, 0, 0, 0.2]),
            probs([0.4, 0.6, 0, 0, 0], [0.3, 0.4, 0, 0, 0.3]),
            probs([0.45, 0.55, 0, 0, 0], [0.0, 0.35, 0, 0, 0.65]),
        ]
    )
    out = fuse(p, Fusion.uniform(3, method="majority"))
    # study 0: two votes for class 1 beat one for class 0, though class 0 has more mass
    assert out.predicted[0] == 1
    assert out.probabilities[0].argmax() == 0
    np.testing.assert_allclose(out.agreement[0], 2 / 3)
    # study 1: one vote each for 0, 1 and 4 -> tie broken by summed probability (4: 1.15 > 1: 1.05 > 0: 0.8)
    assert out.predicted[1] == 4


def test_temperature_after_averaging() -> None:
    p = np.stack([probs([0.6, 0.1, 0.1, 0.1, 0.1]), probs([0.2, 0.2, 0.2, 0.2, 0.2])])
    averaged = p.mean(axis=0)[0]
    sharp = fuse(p, Fusion.uniform(2, temperature=0.5)).probabilities[0]
    expected = averaged**2 / (averaged**2).sum()
    np.testing.assert_allclose(sharp, expected, rtol=1e-9)
    flat = fuse(p, Fusion.uniform(2, temperature=100.0)).probabilities[0]
    assert flat.max() - flat.min() < 0.01
    assert math.isclose(float(flat.sum()), 1.0)


def test_normalised_entropy() -> None:
    np.testing.assert_allclose(normalised_entropy(probs([1, 0, 0, 0, 0], [0.2] * 5)), [0, 1])


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("soft", (0.5, 0.6)), "sum to 1"),
        (("soft", (1.5, -0.5)), "non-negative"),
        (("soft", ()), "one weight"),
        (("vote", (1.0,)), '"method"'),
        (("soft", (1.0,), 0.0), '"temperature"'),
        (("soft", (float("nan"), 1.0)), "non-negative"),
    ],
)
def test_fusion_checks_the_simplex(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Fusion(*args)  # type: ignore[arg-type]


def test_fuse_validates_its_input() -> None:
    fusion = Fusion.uniform(2)
    with pytest.raises(ValueError, match="members"):
        fuse(np.full((3, 1, 5), 0.2), fusion)
    with pytest.raises(ValueError, match="not probabilities"):
        fuse(np.full((2, 1, 5), 0.5), fusion)
    with pytest.raises(ValueError, match="members, studies, classes"):
        fuse(np.full((2, 5), 0.2), fusion)
    with pytest.raises(TypeError, match='"fusion"'):
        fuse(np.full((2, 1, 5), 0.2), "soft")  # type: ignore[arg-type]
