"""Where the node finds its analyses: the built-in ones and those installed as packages.

The built-in analyses (parathyroid MIBI, thyroid scintigraphy, lumbar spine MRI, knee
cartilage MRI, lung CT) are registered here; any installed distribution can add one through the
``mibi_node.analyses`` entry point group, so a hospital ships its own analysis as a wheel::

    [project.entry-points."mibi_node.analyses"]
    wrist = "acme_wrist:WristAnalysis"

The entry point names an :class:`~mibi_node.analyses.base.Analysis` subclass (or an
instance); its ``name`` must be unique. Loading is lazy and once per process; an entry point
that fails to import is logged and left out, so one broken plug-in cannot stop the node.
"""

from __future__ import annotations

import logging
import re
from importlib import import_module
from importlib.metadata import entry_points
from threading import Lock

from mibi_node.analyses.base import Analysis
from mibi_node.errors import MibiNodeError

__all__ = ["ENTRY_POINT_GROUP", "available_analyses", "get_analysis", "register_analysis"]

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mibi_node.analyses"
_NAME = re.compile(r"^[a-z][a-z0-9_]{1,31}$")

#: The analyses that come with the node, in the order the status page lists them.
_BUILT_IN = (
    "mibi_node.analyses.parathyroid:ParathyroidAnalysis",
    "mibi_node.analyses.thyroid:ThyroidAnalysis",
    "mibi_node.analyses.spine:SpineAnalysis",
    "mibi_node.analyses.knee:KneeAnalysis",
    "mibi_node.analyses.lung:LungAnalysis",
)

_registry: dict[str, Analysis] = {}
_loaded = False
_lock = Lock()


def register_analysis(analysis: Analysis | type[Analysis]) -> Analysis:
    """Add an analysis (a class or an instance); returns the registered instance.

    Raises
    ------
    TypeError
        ``analysis`` is no :class:`Analysis`.
    ValueError
        Its name is malformed or already taken by another analysis.
    """
    instance = analysis() if isinstance(analysis, type) else analysis
    if not isinstance(instance, Analysis):
        raise TypeError(f'Argument "analysis" should be an Analysis, got {type(instance)!r}.')
    name = getattr(instance, "name", "")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(f"analysis name {name!r} should be 2-32 lower-case letters, digits or '_'")
    known = _registry.get(name)
    if known is not None and type(known) is not type(instance):
        raise ValueError(f"analysis {name!r} is registered already ({type(known).__name__})")
    _registry[name] = instance
    return instance


def _load() -> None:
    global _loaded
    with _lock:
        if _loaded:
            return
        for target in _BUILT_IN:
            module, _, attribute = target.partition(":")
            register_analysis(getattr(import_module(module), attribute))
        for point in entry_points(group=ENTRY_POINT_GROUP):
            try:
                register_analysis(point.load())
            except Exception as exc:  # noqa: BLE001 - a broken plug-in must not stop the node
                logger.error("analysis entry point %r cannot be loaded: %s", point.name, exc)
        _loaded = True


def available_analyses() -> dict[str, Analysis]:
    """Every registered analysis by name, the built-in ones first."""
    _load()
    return dict(_registry)


def get_analysis(name: str) -> Analysis:
    """The analysis called ``name``.

    Raises
    ------
    MibiNodeError
        No analysis has that name (the message lists those there are).
    """
    analyses = available_analyses()
    try:
        return analyses[name]
    except KeyError:
        raise MibiNodeError(
            f"no analysis called {name!r} (there are: {', '.join(sorted(analyses))})"
        ) from None
