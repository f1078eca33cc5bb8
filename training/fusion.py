"""Sub-model fusion: fit the weights k_i and the temperature on out-of-sample predictions.

The fitted weights minimise the mean negative log-likelihood of the weighted soft vote
``p = sum_i k_i p_i`` on the simplex (``k_i >= 0``, ``sum k_i = 1``), plus a ridge penalty
``shrinkage * sum_i (k_i - 1/M)^2`` that pulls them toward equal weights: a small validation
set should not hand all weight to one member by chance. They are compared on the same data
with equal weights and with majority voting (whose reported probabilities are the equal-weight
average, so its NLL and ECE are those of equal weights; only its decisions differ), and the
recipe's ``fusion`` key picks the one the bundle keeps. Finally one temperature ``T`` is fitted
on the kept fusion's probabilities by minimising their NLL after ``softmax(log(p) / T)``,
which is how :func:`mibi_node.inference.ensemble.fuse` applies it.

The probabilities given here must be the members' TTA-averaged probabilities on studies they
were not trained on (the validation split or out-of-fold predictions).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mibi_node.inference.ensemble import Fusion, fuse
from training.metrics import expected_calibration_error

__all__ = ["FusionFit", "fit_fusion", "fit_temperature", "fit_weights"]

logger = logging.getLogger(__name__)

FusionChoice = Literal["fitted", "equal", "vote"]


def _check(member_probabilities: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(member_probabilities, dtype=np.float64)
    y = np.asarray(labels)
    if p.ndim != 3:
        raise ValueError(
            'Argument "member_probabilities" should be (members, studies, classes), '
            f"got shape {p.shape}."
        )
    if y.shape != (p.shape[1],) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f'Argument "labels" should be {p.shape[1]} class indices, got {y.shape}.')
    if p.shape[1] == 0:
        raise ValueError('Argument "member_probabilities" holds no studies.')
    if y.min() < 0 or y.max() >= p.shape[2]:
        raise ValueError(f'Argument "labels" should be class indices in [0, {p.shape[2]}).')
    return p, y.astype(np.int64)


def fit_weights(member_probabilities: Any, labels: Any, shrinkage: float = 0.05) -> np.ndarray:
    """Fusion weights on the simplex that minimise NLL plus the pull toward equal weights.

    Parameters
    ----------
    member_probabilities
        (M, N, K) out-of-sample probabilities of M members for N studies.
    labels
        (N,) true class indices.
    shrinkage
        Strength of the ridge penalty toward ``1/M``; 0 gives the maximum-likelihood weights.

    Returns
    -------
    numpy.ndarray
        (M,) non-negative weights summing to 1.
    """
    from scipy.optimize import minimize

    p, y = _check(member_probabilities, labels)
    if not (isinstance(shrinkage, int | float) and math.isfinite(shrinkage) and shrinkage >= 0):
        raise ValueError(
            f'Argument "shrinkage" should be a non-negative number, got {shrinkage!r}.'
        )
    n_members = p.shape[0]
    equal = np.full(n_members, 1.0 / n_members)
    if n_members == 1:
        return equal
    true = np.clip(p[:, np.arange(p.shape[1]), y], 1e-12, None)  # (M, N)

    def objective(k: np.ndarray) -> tuple[float, np.ndarray]:
        q = np.clip(k @ true, 1e-12, None)
        value = -np.log(q).mean() + shrinkage * ((k - equal) ** 2).sum()
        gradient = -(true / q).mean(axis=1) + 2 * shrinkage * (k - equal)
        return float(value), gradient

    result = minimize(
        objective,
        equal,
        jac=True,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n_members,
        constraints=[
            {"type": "eq", "fun": lambda k: k.sum() - 1.0, "jac": lambda k: np.ones_like(k)}
        ],
        options={"ftol": 1e-12, "maxiter": 500},
    )
    if not result.success:
        logger.warning(
            "fusion weight fit did not converge (%s); keeping its best point", result.message
        )
    weights = np.clip(result.x, 0.0, None)
    return np.asarray(weights / weights.sum(), dtype=np.float64)


def fit_temperature(probabilities: Any, labels: Any) -> float:
    """The temperature T in [0.05, 20] that minimises the NLL of ``softmax(log(p) / T)``."""
    from scipy.optimize import minimize_scalar

    p = np.asarray(probabilities, dtype=np.float64)
    p, y = _check(p[None], labels)
    logp = np.log(np.clip(p[0], 1e-12, None))

    def nll(log_t: float) -> float:
        z = logp / math.exp(log_t)
        z -= z.max(axis=1, keepdims=True)
        log_soft = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_soft[np.arange(len(y)), y].mean())

    result = minimize_scalar(nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded")
    return float(math.exp(result.x))


def _score(
    member_probabilities: np.ndarray, labels: np.ndarray, fusion: Fusion
) -> dict[str, float]:
    out = fuse(member_probabilities, fusion)
    probabilities = np.clip(out.probabilities, 1e-12, 1.0)
    return {
        "nll": float(-np.log(probabilities[np.arange(len(labels)), labels]).mean()),
        "accuracy": float((out.predicted == labels).mean()),
        "ece": expected_calibration_error(labels, out.probabilities),
    }


@dataclass(frozen=True)
class FusionFit:
    """The chosen fusion and how the alternatives did on the same out-of-sample studies.

    Attributes
    ----------
    choice
        ``"fitted"``, ``"equal"`` or ``"vote"``, as the recipe asked.
    fusion
        The bundle's :class:`~mibi_node.inference.ensemble.Fusion` (method, weights,
        temperature).
    fitted_weights
        The NLL-fitted weights, whether kept or not.
    scores
        ``"fitted"``/``"equal"``/``"vote"`` -> NLL, accuracy and ECE at temperature 1, and
        ``"chosen"`` -> the same after the temperature.
    n_studies
        Studies the fit saw.
    shrinkage
        The penalty strength used.
    source
        Where the predictions came from (``"validation"`` or ``"out-of-fold"``).
    """

    choice: FusionChoice
    fusion: Fusion
    fitted_weights: tuple[float, ...]
    scores: dict[str, dict[str, float]]
    n_studies: int
    shrinkage: float
    source: str = "validation"
    member_names: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the bundle's provenance and reports."""
        return {
            "choice": self.choice,
            "method": self.fusion.method,
            "weights": [round(w, 6) for w in self.fusion.weights],
            "fitted_weights": [round(w, 6) for w in self.fitted_weights],
            "members": list(self.member_names),
            "temperature": round(self.fusion.temperature, 6),
            "scores": {k: {m: round(v, 6) for m, v in s.items()} for k, s in self.scores.items()},
            "n_studies": self.n_studies,
            "shrinkage": self.shrinkage,
            "source": self.source,
        }

    def summary(self) -> str:
        """One line for the provenance notes."""
        parts = [
            f"{name} nll {s['nll']:.4f} acc {s['accuracy']:.3f} ece {s['ece']:.3f}"
            for name, s in self.scores.items()
        ]
        weights = ", ".join(f"{w:.3f}" for w in self.fitted_weights)
        return (
            f"fusion {self.choice} (T={self.fusion.temperature:.3f}) chosen on {self.n_studies} "
            f"{self.source} studies; fitted k = [{weights}]; " + "; ".join(parts)
        )


def fit_fusion(
    member_probabilities: Any,
    labels: Any,
    *,
    choice: FusionChoice = "fitted",
    shrinkage: float = 0.05,
    temperature: bool = True,
    source: str = "validation",
    member_names: tuple[str, ...] = (),
) -> FusionFit:
    """Fit the weights, compare fitted, equal and vote fusion, keep ``choice``, fit T.

    Parameters
    ----------
    member_probabilities
        (M, N, K) out-of-sample probabilities.
    labels
        (N,) true class indices.
    choice
        The fusion the bundle keeps.
    shrinkage
        See :func:`fit_weights`.
    temperature
        Fit a temperature (else T = 1).
    source
        Where the predictions came from, for the record.
    member_names
        Names of the M members, for the record.

    Returns
    -------
    FusionFit
    """
    if choice not in ("fitted", "equal", "vote"):
        raise ValueError(f'Argument "choice" should be fitted, equal or vote, got {choice!r}.')
    p, y = _check(member_probabilities, labels)
    n_members = p.shape[0]
    fitted = fit_weights(p, y, shrinkage)
    candidates = {
        "fitted": Fusion("soft", tuple(fitted.tolist())),
        "equal": Fusion.uniform(n_members),
        "vote": Fusion.uniform(n_members, method="majority"),
    }
    scores = {name: _score(p, y, fusion) for name, fusion in candidates.items()}
    kept = candidates[choice]
    t = 1.0
    if temperature:
        averaged = np.einsum("m,mnk->nk", np.asarray(kept.weights), p)
        t = fit_temperature(averaged, y)
    chosen = Fusion(kept.method, kept.weights, t)
    scores["chosen"] = _score(p, y, chosen)
    fit = FusionFit(
        choice=choice,
        fusion=chosen,
        fitted_weights=tuple(float(w) for w in fitted),
        scores=scores,
        n_studies=len(y),
        shrinkage=float(shrinkage),
        source=source,
        member_names=member_names,
    )
    logger.info(fit.summary())
    return fit
