"""Synthetic dual-phase parathyroid MIBI studies written as valid NM DICOM.

``generate_studies`` writes a batch to disk with ``labels.csv``; ``make_study`` builds one
study in memory (datasets, anterior images, ground truth) for tests and benchmarks.
"""

from mibi_node.phantom.anatomy import CLASSES, PhantomConfig
from mibi_node.phantom.generator import LAYOUTS, PhantomStudy, generate_studies, make_study

__all__ = ["CLASSES", "LAYOUTS", "PhantomConfig", "PhantomStudy", "generate_studies", "make_study"]
