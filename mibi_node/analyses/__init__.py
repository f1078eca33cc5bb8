"""Analyses as units: what the node runs on a study, each declared in one package.

The core (reception, storage, assembly, jobs, dispatch, web, metrics, audit, retention)
knows analyses only through :class:`Analysis` and the registry; ``parathyroid`` (the MIBI
ensemble) and ``thyroid`` (thyroid scintigraphy) are the built-in ones, and any installed
package can add more through the ``mibi_node.analyses`` entry point group
(docs/analyses.md).
"""

from mibi_node.analyses.base import (
    Analysis,
    AnalysisResult,
    Completeness,
    EncodeContext,
    Finding,
    MemoryNeeds,
    OutputKind,
    Panel,
    Runner,
    TaskKind,
)
from mibi_node.analyses.registry import available_analyses, get_analysis, register_analysis
from mibi_node.analyses.selection import Match, SelectionRule

__all__ = [
    "Analysis",
    "AnalysisResult",
    "Completeness",
    "EncodeContext",
    "Finding",
    "Match",
    "MemoryNeeds",
    "OutputKind",
    "Panel",
    "Runner",
    "SelectionRule",
    "TaskKind",
    "available_analyses",
    "get_analysis",
    "register_analysis",
]
