"""Lung CT (seed 004): ground-glass opacity and bronchiectasis detection with masks.

Work in progress (issue 18): the phantom, the linking of slice detections into 3-D lesions
and the metric are here; the analysis is not registered yet.
"""
