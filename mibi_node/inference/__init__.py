"""Ensemble members, fusion, model bundles and the inference engine.

The public entry points, importable from their modules:

* :func:`mibi_node.inference.members.create_member` - a timm backbone + attention head;
* :func:`mibi_node.inference.ensemble.fuse` - weighted soft or majority voting;
* :func:`mibi_node.inference.bundle.load_bundle`, ``write_bundle``, ``init_random_bundle``;
* :class:`mibi_node.inference.engine.InferenceEngine` - studies in, :class:`StudyResult` out;
* :mod:`mibi_node.inference.command` - the ``predict`` and ``init-bundle`` CLI commands.

This package imports torch lazily: importing it (or :mod:`.result`) costs nothing.
"""

from mibi_node.inference.result import Focus, StudyResult

__all__ = ["Focus", "StudyResult"]
