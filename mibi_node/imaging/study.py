"""The model input read from one study: named phase images and where they came from.

This is the contract between the imaging reader (``mibi_node.imaging.nm``), the inference
engine and the SR builder: the engine consumes the pixels, the SR references the sources.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["PHASES", "PhaseImage", "StudyInput"]

#: Names of the images a MIBI study can provide, in the order a bundle usually stacks them.
PHASES: tuple[str, ...] = ("early", "delayed", "thyroid")


@dataclass(frozen=True)
class PhaseImage:
    """One planar image of one phase, with the instance and frame it was read from.

    Attributes
    ----------
    name
        Phase name, one of :data:`PHASES`.
    pixels
        The image as a 2-D float32 array (rows, columns), counts or grey values.
    pixel_spacing
        Row and column spacing in mm, or ``None`` when the file does not say.
    sop_instance_uid, sop_class_uid, series_instance_uid
        Identify the source instance (the SR's image library references it).
    frame_number
        1-based frame of a multi-frame source, ``None`` for a single-frame instance.
    """

    name: str
    pixels: np.ndarray
    pixel_spacing: tuple[float, float] | None
    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    frame_number: int | None = None


@dataclass(frozen=True)
class StudyInput:
    """Everything the engine needs from one study, and what the SR must reference.

    Attributes
    ----------
    study_instance_uid
        The study the images belong to.
    images
        Phase name -> image; holds at least the phases the caller asked for.
    warnings
        Human-readable remarks (e.g. "screen capture", "resampled"), carried into the result.
    """

    study_instance_uid: str
    images: dict[str, PhaseImage]
    warnings: tuple[str, ...] = field(default_factory=tuple)

    def stack(self, channels: tuple[str, ...] | list[str]) -> np.ndarray:
        """Return the named phases stacked as a (channels, rows, columns) float32 array."""
        missing = [name for name in channels if name not in self.images]
        if missing:
            raise KeyError(f"study has no {', '.join(missing)} image")
        return np.stack([self.images[name].pixels.astype(np.float32) for name in channels])
