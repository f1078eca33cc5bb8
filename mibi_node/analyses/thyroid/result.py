"""What the thyroid analysis returns for one study: frozen dataclasses, no tensors.

The findings are multi-label (seed 001's "cross features": one scan can show a toxic
adenoma and a cold nodule at once): every finding has its own probability in [0, 1], and
they do not sum to 1. ``findings`` are those at or above their threshold; ``normal`` only
when no abnormal finding is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mibi_node.imaging.study import PhaseImage

__all__ = ["FINDINGS", "Nodule", "ThyroidResult"]

#: Finding keys, in output order (the model's output channels, the SR's order).
FINDINGS: tuple[str, ...] = (
    "normal",
    "graves",
    "toxic_multinodular_goitre",
    "toxic_adenoma",
    "cold_nodule",
    "thyroiditis",
)


@dataclass(frozen=True)
class Nodule:
    """A focal area the analysis found, in the pixels of the source image.

    Attributes
    ----------
    row, col
        Centre in the source image's pixel coordinates (row 0 / column 0 is the centre of
        the first pixel).
    radius
        Radius in pixels (the SR draws a circle of it).
    kind
        ``"hot"`` (more uptake than the surrounding lobe) or ``"cold"`` (less).
    lobe
        The patient's lobe: anterior views show the patient's right on the image's left.
    """

    row: float
    col: float
    radius: float
    kind: Literal["hot", "cold"]
    lobe: Literal["right", "left", "isthmus"]


@dataclass(frozen=True)
class ThyroidResult:
    """The analysis' answer for one thyroid scan.

    Attributes
    ----------
    study_instance_uid
        The study.
    probabilities
        Finding key -> probability of that finding, in :data:`FINDINGS` order.
    findings
        The findings reported (probability >= threshold), most probable first; never empty.
    thresholds
        Finding key -> the bundle's decision threshold.
    lobe_uptake
        ``{"right": r, "left": l}``: each lobe's share of the thyroid counts (sums to 1),
        the patient's sides.
    nodules
        Focal areas, hot or cold (empty when none).
    source_image
        The anterior image the input was built from (the SR references it).
    member_probabilities
        Member name -> finding key -> probability.
    timings, warnings, bundle_name, bundle_version, intended_use
        As in the parathyroid result.
    """

    study_instance_uid: str
    probabilities: dict[str, float]
    findings: tuple[str, ...]
    thresholds: dict[str, float]
    lobe_uptake: dict[str, float]
    nodules: tuple[Nodule, ...]
    source_image: PhaseImage
    member_probabilities: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    bundle_name: str = ""
    bundle_version: str = ""
    intended_use: str = "demonstration"

    @property
    def source_images(self) -> dict[str, PhaseImage]:
        """Image name -> source image, the shape the shared SR checks read."""
        return {self.source_image.name: self.source_image}

    @property
    def focus(self) -> None:
        """No single focus (the shared source checks ask): the nodules are the regions."""
        return None

    @property
    def predicted(self) -> str:
        """The most probable reported finding."""
        return self.findings[0]

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no pixels), the shape the job row stores."""
        image = self.source_image
        return {
            "study_instance_uid": self.study_instance_uid,
            "predicted": self.predicted,
            "findings": list(self.findings),
            "probabilities": dict(self.probabilities),
            "thresholds": dict(self.thresholds),
            "lobe_uptake": dict(self.lobe_uptake),
            "nodules": [
                {
                    "row": n.row,
                    "col": n.col,
                    "radius": n.radius,
                    "kind": n.kind,
                    "lobe": n.lobe,
                }
                for n in self.nodules
            ],
            "member_probabilities": {k: dict(v) for k, v in self.member_probabilities.items()},
            "source_images": {
                image.name: {
                    "sop_instance_uid": image.sop_instance_uid,
                    "sop_class_uid": image.sop_class_uid,
                    "series_instance_uid": image.series_instance_uid,
                    "frame_number": image.frame_number,
                }
            },
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "bundle": {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "intended_use": self.intended_use,
            },
        }
