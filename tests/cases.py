"""Analysis results as the worker makes them, over real NM instances, for the SR tests.

The SR and key-image tests (test_report, test_conformance) build reports from these: a
result over an early and a delayed image plus one instance of the study it did not use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from factory import nm_dataset
from mibi_node.imaging.study import PhaseImage
from mibi_node.inference.result import Focus, StudyResult

__all__ = ["CLASSES", "SC_STORAGE", "make_case", "phase_image"]

CLASSES = ("normal", "adenoma", "hyperplasia", "carcinoma", "cyst")
#: Secondary Capture Image Storage (screen captures of older consoles).
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def phase_image(name: str, ds: Dataset, frame: int | None, seed: int = 0) -> PhaseImage:
    """One phase image read from ``ds`` (Poisson counts in place of its pixels)."""
    rng = np.random.default_rng(seed)
    return PhaseImage(
        name=name,
        pixels=rng.poisson(20.0, (int(ds.Rows), int(ds.Columns))).astype(np.float32),
        pixel_spacing=(2.2, 2.2),
        sop_instance_uid=ds.SOPInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        series_instance_uid=ds.SeriesInstanceUID,
        frame_number=frame,
    )


def make_case(
    predicted: str = "adenoma",
    *,
    focus: Focus | None = Focus(row=40.0, col=20.0, side="right", pole="lower"),
    intended_use: str = "demonstration",
    frames: int = 2,
    warnings: tuple[str, ...] = ("early image resampled to 64 x 64",),
    secondary_capture: bool = False,
    frame_of_reference: bool = False,
    seed: int = 0,
    **header: Any,
) -> tuple[StudyResult, list[Dataset]]:
    """A result over an early and a delayed image, plus one instance it did not use.

    Probabilities are drawn for ``seed`` and rounded through float32, as a model gives
    them; ``header`` sets data elements on every source instance; ``secondary_capture``
    makes the delayed image a Secondary Capture, ``frame_of_reference`` gives the early one
    a Frame of Reference UID.
    """
    study = generate_uid()
    sources = [nm_dataset(study, seed=seed + i, frames=frames) for i in range(3)]
    if secondary_capture:
        sources[1].SOPClassUID = SC_STORAGE
        sources[1].Modality = "OT"
    if frame_of_reference:
        sources[0].FrameOfReferenceUID = generate_uid()
    for ds in sources:
        for keyword, value in header.items():
            setattr(ds, keyword, value)
    p = np.random.default_rng(seed).dirichlet(np.ones(len(CLASSES)))
    p = p.astype(np.float32).astype(np.float64)
    probabilities = dict(zip(CLASSES, (float(v) for v in p / p.sum()), strict=True))
    frame = 2 if frames > 1 else None
    result = StudyResult(
        study_instance_uid=study,
        probabilities=probabilities,
        predicted=predicted,
        member_probabilities={},
        agreement=7 / 9,
        normalised_entropy=0.4123456789,
        focus=focus,
        source_images={
            "early": phase_image("early", sources[0], frame, 1),
            "delayed": phase_image("delayed", sources[1], frame, 2),
        },
        timings={},
        warnings=warnings,
        bundle_name="mibi-demo",
        bundle_version="0.3.1",
        intended_use=intended_use,
    )
    return result, sources
