"""What the engine returns for one study: plain, frozen dataclasses, no tensors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from mibi_node.imaging.study import PhaseImage

__all__ = ["Focus", "StudyResult"]


@dataclass(frozen=True)
class Focus:
    """Where the model localises the suspected lesion.

    Attributes
    ----------
    row, col
        Position in the pixel coordinates of the ``phase`` image (row 0 / column 0 is the centre
        of the first pixel), as floats.
    side
        The patient's side. MIBI neck images are anterior views, so the image's left half is
        the patient's **right**: a focus left of the midline is ``"right"``.
    pole
        ``"upper"`` or ``"lower"`` half of the thyroid bed, or ``"ectopic"`` when the focus lies
        clearly outside it (e.g. mediastinal).
    phase
        The image the coordinates refer to (the delayed image when the bundle has one).
    """

    row: float
    col: float
    side: Literal["left", "right"]
    pole: Literal["upper", "lower", "ectopic"]
    phase: str = "delayed"


@dataclass(frozen=True)
class StudyResult:
    """The ensemble's answer for one study.

    Attributes
    ----------
    study_instance_uid
        The study.
    probabilities
        Class key -> fused probability, in the bundle's class order; sums to 1.
    predicted
        Key of the predicted class.
    member_probabilities
        Member name -> class key -> probability (averaged over the TTA views).
    agreement
        Fraction of members whose own most probable class is ``predicted``.
    normalised_entropy
        Entropy of ``probabilities`` / log(number of classes): 0 certain, 1 uniform.
    focus
        Suspected focus, ``None`` when the prediction is ``normal`` or localisation is off.
    source_images
        Phase name -> the image the input was built from (the SR references them).
    timings
        Stage -> seconds: ``denoise`` and ``preprocess`` for this study, and this study's
        share of the batch for ``tta``, ``members``, ``fusion`` and ``localisation``.
    warnings
        Human-readable remarks from the reader and the engine.
    bundle_name, bundle_version, intended_use
        The bundle that produced the result (the SR's algorithm identification).
    """

    study_instance_uid: str
    probabilities: dict[str, float]
    predicted: str
    member_probabilities: dict[str, dict[str, float]]
    agreement: float
    normalised_entropy: float
    focus: Focus | None
    source_images: dict[str, PhaseImage]
    timings: dict[str, float]
    warnings: tuple[str, ...] = field(default_factory=tuple)
    bundle_name: str = ""
    bundle_version: str = ""
    intended_use: str = "demonstration"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: the figures, the focus and the source instances (no pixels)."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "predicted": self.predicted,
            "probabilities": dict(self.probabilities),
            "agreement": self.agreement,
            "normalised_entropy": self.normalised_entropy,
            "focus": None if self.focus is None else asdict(self.focus),
            "member_probabilities": {k: dict(v) for k, v in self.member_probabilities.items()},
            "source_images": {
                name: {
                    "sop_instance_uid": image.sop_instance_uid,
                    "sop_class_uid": image.sop_class_uid,
                    "series_instance_uid": image.series_instance_uid,
                    "frame_number": image.frame_number,
                }
                for name, image in self.source_images.items()
            },
            "timings": dict(self.timings),
            "warnings": list(self.warnings),
            "bundle": {
                "name": self.bundle_name,
                "version": self.bundle_version,
                "intended_use": self.intended_use,
            },
        }
