"""The result as DICOM: the Structured Report (TID 1500) and the optional key image.

:func:`build_sr` turns a :class:`~mibi_node.inference.result.StudyResult` and the headers of
the study's source instances into a Comprehensive 3D SR in the original study;
:func:`read_probabilities` reads the class probabilities back; :func:`build_key_image` draws
the delayed image with the focus and the probabilities as a Secondary Capture for viewers
that do not render SR. See ``docs/report.md``.
"""

from mibi_node.report.keyimage import build_key_image
from mibi_node.report.sr import DEMONSTRATION_DISCLAIMER, build_sr, read_probabilities

__all__ = ["DEMONSTRATION_DISCLAIMER", "build_key_image", "build_sr", "read_probabilities"]
