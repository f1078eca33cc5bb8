"""Offline modules: sub-model training, fusion fitting and the test module.

Hospitals run these on their own labelled studies, the demo on phantoms. Entry points, each
importable from its module:

* :func:`training.pipeline.train_bundle` - ``mibi-node train``: data -> members -> fusion ->
  bundle -> test report;
* :func:`training.evaluate.evaluate_bundle` - ``mibi-node evaluate``: the test module;
* :func:`training.fusion.fit_fusion` - fusion weights, comparison and temperature;
* :mod:`training.metrics` - scikit-learn figures with bootstrap intervals;
* :mod:`training.command` - the typer commands registered by ``mibi_node.cli``.

This package imports :mod:`mibi_node`; :mod:`mibi_node` never imports it. Importing it costs
nothing: torch loads with the modules that need it.
"""

import logging

__all__: list[str] = []

logging.getLogger(__name__).addHandler(logging.NullHandler())
