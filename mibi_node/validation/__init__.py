"""Local validation (issue 19): radiologists' verdicts on AI findings, final diagnoses, and
the model's performance on this hospital's own studies and cameras (docs/validation.md).

The names below are imported on first use, so the CLI, which registers the commands of
:mod:`mibi_node.validation.command`, does not load scikit-learn at start.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__all__ = [
    "GroupPerformance",
    "TruthImportError",
    "VerdictError",
    "import_truth",
    "performance",
    "read_truth_csv",
    "record_verdict",
]

_HOME = {
    "GroupPerformance": "performance",
    "performance": "performance",
    "TruthImportError": "truth",
    "import_truth": "truth",
    "read_truth_csv": "truth",
    "VerdictError": "verdicts",
    "record_verdict": "verdicts",
}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(import_module(f"mibi_node.validation.{_HOME[name]}"), name)
    raise AttributeError(f"module 'mibi_node.validation' has no attribute {name!r}")
