"""What the spine analysis reads and returns for one study: frozen dataclasses.

The input is the middle slice of the T2 sagittal series with its neighbours as channels
(seed 002), in the middle slice's pixel grid; the result is one point per level with its
class, in the same pixel coordinates (row 0 / column 0 is the centre of the first pixel),
so the SR's SCOORD POINTs sit on the middle slice's instance.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, Kind

__all__ = ["SliceRef", "SpineInput", "SpinePoint", "SpineResult"]


@dataclass(frozen=True)
class SliceRef:
    """One stored MR slice the analysis used (the SR's image library references it).

    Attributes
    ----------
    sop_instance_uid, sop_class_uid, series_instance_uid
        Identify the instance.
    instance_number
        Its Instance Number, or ``None`` when the file has none.
    """

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    instance_number: int | None = None


@dataclass(frozen=True)
class SpineInput:
    """The model input of one lumbar MR study.

    Attributes
    ----------
    study_instance_uid
        The study.
    image
        ``(channels, rows, columns)`` float32: the middle T2 sagittal slice in the middle
        channel, its neighbours either side (a neighbour missing at the edge of the series
        repeats the middle slice), raw grey values.
    pixel_spacing
        (row, column) spacing of the middle slice in mm.
    middle
        The middle slice: the points are drawn on it.
    neighbours
        The other slices in the channels, in channel order without the middle one.
    series_description
        The chosen series' description ("" when it has none), for the status page.
    reason
        How the series was chosen ("orientation sagittal, TE 110 ms, TR 3000 ms").
    warnings
        Remarks carried into the result.
    """

    study_instance_uid: str
    image: np.ndarray
    pixel_spacing: tuple[float, float]
    middle: SliceRef
    neighbours: tuple[SliceRef, ...] = ()
    series_description: str = ""
    reason: str = ""
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class SpinePoint:
    """One level's point and class.

    Attributes
    ----------
    level
        One of :data:`~mibi_node.analyses.spine.levels.LEVELS`.
    row, col
        The point in the middle slice's pixels (sub-pixel).
    label
        The most probable class of the level's kind.
    probabilities
        Class key -> probability over the kind's classes (sums to 1).
    score
        The keypoint's confidence in [0, 1] (the heatmap peak).
    """

    level: str
    row: float
    col: float
    label: str
    probabilities: dict[str, float]
    score: float = 1.0

    @property
    def kind(self) -> Kind:
        """``"disc"`` or ``"vertebra"``."""
        return LEVEL_KIND[self.level]


@dataclass(frozen=True)
class SpineResult:
    """The analysis' answer for one lumbar MR study.

    Attributes
    ----------
    study_instance_uid
        The study.
    points
        One per level found, in :data:`LEVELS` order.
    pixel_spacing
        (row, column) mm of the middle slice (points in mm = pixels x spacing).
    middle, neighbours
        The slices the input was built from (the SR references them; points on ``middle``).
    timings, warnings, bundle_name, bundle_version, intended_use
        As in the other analyses' results.
    """

    study_instance_uid: str
    points: tuple[SpinePoint, ...]
    pixel_spacing: tuple[float, float]
    middle: SliceRef
    neighbours: tuple[SliceRef, ...] = ()
    timings: dict[str, float] = field(default_factory=dict)
    warnings: tuple[str, ...] = ()
    bundle_name: str = ""
    bundle_version: str = ""
    intended_use: str = "demonstration"

    def __post_init__(self) -> None:
        for point in self.points:
            if point.level not in LEVEL_KIND:
                raise ValueError(f"unknown level {point.level!r}")
            if point.label not in CLASSES[point.kind]:
                raise ValueError(f"{point.level}: unknown {point.kind} class {point.label!r}")

    @property
    def abnormal(self) -> tuple[SpinePoint, ...]:
        """The points whose class is not normal, head to foot."""
        return tuple(p for p in self.points if p.label != "normal")

    @property
    def predicted(self) -> str:
        """A short key of the main finding: the abnormal levels, or ``normal``."""
        abnormal = self.abnormal
        if not abnormal:
            return "normal"
        return ", ".join(f"{p.level} {p.label}" for p in abnormal)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (no pixels), the shape the job row stores."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "predicted": self.predicted,
            "points": [
                {
                    "level": p.level,
                    "kind": p.kind,
                    "row": p.row,
                    "col": p.col,
                    "label": p.label,
                    "probabilities": dict(p.probabilities),
                    "score": p.score,
                }
                for p in self.points
            ],
            "pixel_spacing": list(self.pixel_spacing),
            "middle": _slice_dict(self.middle),
            "neighbours": [_slice_dict(n) for n in self.neighbours],
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "bundle": {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "intended_use": self.intended_use,
            },
        }


def _slice_dict(ref: SliceRef) -> dict[str, Any]:
    return {
        "sop_instance_uid": ref.sop_instance_uid,
        "sop_class_uid": ref.sop_class_uid,
        "series_instance_uid": ref.series_instance_uid,
        "instance_number": ref.instance_number,
    }
