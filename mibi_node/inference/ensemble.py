"""Fusion of the members' class probabilities (the patent's "sub-model fusion module").

Two methods, both with the patent's coefficients k_i (non-negative, summing to 1):

* ``"soft"``: weighted soft voting, ``p = sum_i k_i * p_i`` (claim 3's formula);
* ``"majority"``: each member votes for its most probable class; the class with the most votes
  wins and a tie is broken by the weighted summed probability. The reported probabilities are
  still the weighted soft average, so in this mode the prediction can differ from the most
  probable class; :attr:`FusionOutput.predicted` is authoritative.

A temperature ``T`` is applied after averaging, ``softmax(log(p) / T)``; ``T = 1`` leaves the
average unchanged. Along with the probabilities the output carries two uncertainty figures:
``agreement``, the fraction of members whose own most probable class is the prediction, and
the normalised entropy of the fused probabilities (0 = certain, 1 = uniform).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["Fusion", "FusionMethod", "FusionOutput", "fuse", "normalised_entropy"]

logger = logging.getLogger(__name__)

FusionMethod = Literal["soft", "majority"]

#: Tolerance on the sum of the weights.
_SIMPLEX_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Fusion:
    """A fusion rule: method, member weights k_i and temperature.

    Raises
    ------
    ValueError
        The method is unknown, a weight is negative or not finite, the weights do not sum to 1
        (within 1e-6) or the temperature is not positive.
    """

    method: FusionMethod
    weights: tuple[float, ...]
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in ("soft", "majority"):
            raise ValueError(
                f'Argument "method" should be "soft" or "majority", got {self.method!r}.'
            )
        weights = tuple(float(w) for w in self.weights)
        object.__setattr__(self, "weights", weights)
        if not weights:
            raise ValueError('Argument "weights" should hold one weight per member.')
        if any(not math.isfinite(w) or w < 0 for w in weights):
            raise ValueError(f'Argument "weights" should be non-negative, got {list(weights)}.')
        if abs(sum(weights) - 1.0) > _SIMPLEX_TOLERANCE:
            raise ValueError(f'Argument "weights" should sum to 1, got {sum(weights):.8g}.')
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f'Argument "temperature" should be positive, got {self.temperature}.')

    @classmethod
    def uniform(
        cls, n_members: int, method: FusionMethod = "soft", temperature: float = 1.0
    ) -> Fusion:
        """Equal weights 1/n for ``n_members`` members."""
        if n_members < 1:
            raise ValueError(f'Argument "n_members" should be positive, got {n_members}.')
        return cls(method, (1.0 / n_members,) * n_members, temperature)


@dataclass(frozen=True)
class FusionOutput:
    """Fused result for a batch of B studies, M members and K classes.

    Attributes
    ----------
    probabilities
        (B, K) fused probabilities; every row sums to 1.
    predicted
        (B,) index of the predicted class.
    member_probabilities
        (M, B, K) each member's probabilities (already averaged over TTA views).
    agreement
        (B,) fraction of members whose most probable class equals the prediction.
    normalised_entropy
        (B,) entropy of ``probabilities`` divided by log K.
    """

    probabilities: np.ndarray
    predicted: np.ndarray
    member_probabilities: np.ndarray
    agreement: np.ndarray
    normalised_entropy: np.ndarray


def normalised_entropy(probabilities: np.ndarray) -> np.ndarray:
    """Entropy of each row divided by log K: 0 for a one-hot row, 1 for a uniform one."""
    p = np.clip(np.asarray(probabilities, dtype=np.float64), 0.0, 1.0)
    k = p.shape[-1]
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=-1)
    return np.asarray(h / math.log(k), dtype=np.float64)


def _temper(p: np.ndarray, temperature: float) -> np.ndarray:
    if temperature == 1.0:
        return p / p.sum(axis=-1, keepdims=True)
    logits = np.log(np.clip(p, 1e-12, None)) / temperature
    logits -= logits.max(axis=-1, keepdims=True)
    e = np.exp(logits)
    return np.asarray(e / e.sum(axis=-1, keepdims=True))


def fuse(member_probabilities: np.ndarray | Sequence[np.ndarray], fusion: Fusion) -> FusionOutput:
    """Fuse the members' probabilities for a batch of studies.

    Parameters
    ----------
    member_probabilities
        (M, B, K) array (or M arrays of (B, K)), each row a probability vector.
    fusion
        The bundle's fusion rule; its weights must have one entry per member.

    Returns
    -------
    FusionOutput
        Fused probabilities, prediction and uncertainty figures.

    Raises
    ------
    ValueError
        The array is not (M, B, K), M does not match the weights, or a row is not a
        probability vector.
    """
    if not isinstance(fusion, Fusion):
        raise TypeError(f'Argument "fusion" should be a Fusion, not {type(fusion).__name__}.')
    p = np.asarray(member_probabilities, dtype=np.float64)
    if p.ndim != 3 or p.shape[2] < 2:
        raise ValueError(
            f'Argument "member_probabilities" should be (members, studies, classes), got {p.shape}.'
        )
    n_members, _, n_classes = p.shape
    if n_members != len(fusion.weights):
        raise ValueError(
            f'Argument "member_probabilities" has {n_members} members but the fusion has '
            f"{len(fusion.weights)} weights."
        )
    if not np.isfinite(p).all() or (p < -1e-6).any() or np.abs(p.sum(axis=2) - 1).max() > 1e-3:
        raise ValueError('Argument "member_probabilities" holds rows that are not probabilities.')

    weights = np.asarray(fusion.weights)
    averaged = np.einsum("m,mbk->bk", weights, p)
    probabilities = _temper(averaged, fusion.temperature)
    member_votes = p.argmax(axis=2)  # (M, B)
    if fusion.method == "soft":
        predicted = probabilities.argmax(axis=1)
    else:
        votes = np.stack([(member_votes == c).sum(axis=0) for c in range(n_classes)], axis=1)
        top = votes == votes.max(axis=1, keepdims=True)
        predicted = np.where(top, averaged, -np.inf).argmax(axis=1)
    agreement = (member_votes == predicted[None, :]).mean(axis=0)
    return FusionOutput(
        probabilities=probabilities,
        predicted=predicted,
        member_probabilities=p,
        agreement=agreement,
        normalised_entropy=normalised_entropy(probabilities),
    )
