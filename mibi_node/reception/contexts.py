"""Presentation contexts the Storage SCP accepts (PS3.4 B.5, PS3.5 A.4).

Instances are stored as received, so every transfer syntax listed here is accepted without
transcoding; decoding compressed pixel data is the imaging reader's job.
"""

from __future__ import annotations

from collections.abc import Iterable

from pydicom.uid import (
    JPEG2000,
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    DeflatedExplicitVRLittleEndian,
    EnhancedSRStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    NuclearMedicineImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom import AllStoragePresentationContexts

__all__ = ["VERIFICATION", "TRANSFER_SYNTAXES", "MIBI_STORAGE_CLASSES", "storage_sop_classes"]

#: Verification SOP Class (C-ECHO).
VERIFICATION = UID("1.2.840.10008.1.1")

#: Transfer syntaxes accepted for every storage SOP class, preferred first.
TRANSFER_SYNTAXES: tuple[UID, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

#: What a MIBI study can arrive as: NM images, screen captures from older consoles, and SRs.
MIBI_STORAGE_CLASSES: tuple[UID, ...] = (
    NuclearMedicineImageStorage,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    MultiFrameTrueColorSecondaryCaptureImageStorage,
    EnhancedSRStorage,
    ComprehensiveSRStorage,
    Comprehensive3DSRStorage,
)


def storage_sop_classes(accept_all: bool, analyses: Iterable[str] = ()) -> tuple[UID, ...]:
    """The storage SOP classes to support: the MIBI set and those the enabled analyses'
    studies arrive as (``Analysis.storage_sop_classes``, e.g. MR Image Storage for the
    spine), or every one pynetdicom knows."""
    base = MIBI_STORAGE_CLASSES + tuple(
        UID(uid) for uid in dict.fromkeys(analyses) if uid not in MIBI_STORAGE_CLASSES
    )
    if not accept_all:
        return base
    every = [UID(cx.abstract_syntax) for cx in AllStoragePresentationContexts if cx.abstract_syntax]
    return base + tuple(uid for uid in every if uid not in base)
