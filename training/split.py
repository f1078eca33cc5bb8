"""Stratified splits of labelled studies: test, validation and cross-validation folds.

The split is drawn per class with a seed and saved as ``training/split.json`` in the bundle,
with the fingerprint of the data it was drawn from, so the test module evaluates exactly the
held-out studies and a later run can reuse the split (``mibi-node train --split``).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from training.data import CLASS_KEYS, DataError

__all__ = ["Split", "stratified_folds", "stratified_split"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Split:
    """Which samples train, validate and test (by key); saved so that it can be reused.

    Attributes
    ----------
    train, val, test
        Sample keys.
    seed
        The seed it was drawn with.
    data_fingerprint
        Fingerprint of the data folder it was drawn from.
    folds
        k-fold cross-validation: k tuples of keys partitioning ``train + val``; empty without.
    """

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]
    seed: int
    data_fingerprint: str
    folds: tuple[tuple[str, ...], ...] = ()

    def keys(self, name: str) -> tuple[str, ...]:
        """Keys of the split named ``train``, ``val``, ``test`` or ``trainval``."""
        if name == "trainval":
            return self.train + self.val
        if name in ("train", "val", "test"):
            keys: tuple[str, ...] = getattr(self, name)
            return keys
        raise ValueError(f'Argument "name" should be train, val, test or trainval, got {name!r}.')

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "seed": self.seed,
            "data_fingerprint": self.data_fingerprint,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "folds": [list(fold) for fold in self.folds],
        }

    def save(self, path: Path | str) -> None:
        """Write the split as JSON."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path | str) -> Split:
        """Read a split written by :meth:`save`.

        Raises
        ------
        DataError
            The file is missing or not a split.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            return cls(
                train=tuple(data["train"]),
                val=tuple(data["val"]),
                test=tuple(data["test"]),
                seed=int(data["seed"]),
                data_fingerprint=str(data["data_fingerprint"]),
                folds=tuple(tuple(fold) for fold in data.get("folds", [])),
            )
        except FileNotFoundError:
            raise DataError(f"split file {path}: no such file") from None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"split file {path}: not a split ({exc})") from None


def stratified_split(
    keys: Sequence[str],
    labels: Sequence[int] | np.ndarray,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.15,
    seed: int = 0,
    data_fingerprint: str = "",
) -> Split:
    """Split per class: ``test_fraction`` to test, then ``val_fraction`` of the rest to val.

    Every class with at least 2 samples has one in test and one in train; with 3 or more left
    after the test split, one in validation as well.
    """
    labels = np.asarray(labels)
    if len(keys) != len(labels):
        raise ValueError('Arguments "keys" and "labels" should have the same length.')
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0 < value < 1:
            raise ValueError(f'Argument "{name}" should be in (0, 1), got {value}.')
    rng = np.random.default_rng([seed, 5])
    train: list[str] = []
    val: list[str] = []
    test: list[str] = []
    for label in np.unique(labels):
        members = [keys[int(i)] for i in np.flatnonzero(labels == label)]
        members = [members[i] for i in rng.permutation(len(members))]
        n = len(members)
        n_test = min(max(round(n * test_fraction), 1 if n >= 2 else 0), n - 1)
        rest = n - n_test
        n_val = min(max(round(rest * val_fraction), 1 if rest >= 3 else 0), max(rest - 1, 0))
        test.extend(members[:n_test])
        val.extend(members[n_test : n_test + n_val])
        train.extend(members[n_test + n_val :])
    return Split(
        train=tuple(sorted(train)),
        val=tuple(sorted(val)),
        test=tuple(sorted(test)),
        seed=seed,
        data_fingerprint=data_fingerprint,
    )


def stratified_folds(
    keys: Sequence[str], labels: Sequence[int] | np.ndarray, k: int, seed: int = 0
) -> tuple[tuple[str, ...], ...]:
    """Partition the samples into ``k`` stratified folds (scikit-learn's StratifiedKFold).

    Raises
    ------
    DataError
        A class has fewer samples than folds.
    """
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f'Argument "k" should be an integer >= 2, got {k!r}.')
    counts = Counter(labels.tolist())
    scarce = {CLASS_KEYS[c]: n for c, n in counts.items() if n < k}
    if scarce:
        raise DataError(
            f"{k}-fold cross-validation needs {k} studies per class; {scarce} have fewer"
        )
    splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    return tuple(
        tuple(sorted(keys[int(i)] for i in held))
        for _, held in splitter.split(np.zeros(len(labels)), labels)
    )
