"""The knee analysis' DICOM Segmentation: one binary segment per cartilage plate found.

The SEG goes into the source study as a new series. Its frames are the source MR slices that
hold at least one labelled voxel (empty frames are omitted), each frame referencing its
slice, so a viewer overlays it on the series it came from. A plate that was not found gets no
segment; the SR says so.

Segment numbers: a BINARY SEG numbers its segments from 1 without gaps (PS3.3 C.8.20.2), so
the segments are the plates found, numbered in
:data:`~mibi_node.analyses.knee.labels.STRUCTURES` order. When all four are found, the
Segment Number is the plate's label value; otherwise it is not, and a reader goes by the
segment's Segmented Property Type (or label, or tracking ID), as the SR's groups do.

Codes: the Segmented Property Category is SCT 91723000 "Anatomical Structure" (DICOM CID
7150) and the Anatomic Region SCT 49076000 "Knee joint", both from pydicom's PS3.16
dictionary; the algorithm family is DCM 123110 "Artificial Intelligence" (CID 7162). PS3.16
has no concept for the individual knee cartilage plates (only SCT 309312004 "Cartilage"),
so each plate's Segmented Property Type is a local code MNK001-MNK004 of the node's declared
scheme ``99MIBINODE``, until verified SNOMED CT concepts replace them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from highdicom.seg import (
    SegmentAlgorithmTypeValues,
    Segmentation,
    SegmentationTypeValues,
    SegmentDescription,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import mibi_node
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURE_NAMES, STRUCTURES
from mibi_node.analyses.knee.result import KneeResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    DEMONSTRATION_DISCLAIMER,
    algorithm_equipment,
    character_set,
    check_document_arguments,
    check_volume_sources,
    coding_schemes,
    detach_person_names,
    intended_use_text,
)

__all__ = [
    "CONTENT_LABEL",
    "KNEE_CLINICAL_USE",
    "SEG_SERIES_DESCRIPTION",
    "STRUCTURE_CODES",
    "build_knee_seg",
    "check_knee_result",
    "check_knee_sources",
    "knee_intended_use_text",
    "read_knee_seg",
    "segment_numbers",
    "tracking_id",
]

logger = logging.getLogger(__name__)

_LOCAL = mibi_codes.CODING_SCHEME

#: Each plate's Segmented Property Type and the SR's Finding Site (local: PS3.16 has none).
STRUCTURE_CODES: dict[str, Code] = {
    "femoral_cartilage": Code("MNK001", _LOCAL, "Femoral cartilage"),
    "medial_tibial_cartilage": Code("MNK002", _LOCAL, "Medial tibial cartilage"),
    "lateral_tibial_cartilage": Code("MNK003", _LOCAL, "Lateral tibial cartilage"),
    "patellar_cartilage": Code("MNK004", _LOCAL, "Patellar cartilage"),
}

#: SCT 91723000 "Anatomical Structure" (``codes.SCT.AnatomicalStructure``, CID 7150).
SEGMENTED_PROPERTY_CATEGORY: Code = codes.SCT.AnatomicalStructure
#: SCT 49076000 "Knee joint" (``codes.SCT.KneeJoint``): every segment's Anatomic Region.
ANATOMIC_REGION: Code = codes.SCT.KneeJoint
#: DCM 123110 "Artificial Intelligence" (``codes.DCM.ArtificialIntelligence``, CID 7162).
ALGORITHM_FAMILY: Code = codes.DCM.ArtificialIntelligence

#: Content Label of the SEG (CS: capitals, digits, underscore; 16 characters at most).
CONTENT_LABEL = "KNEE_CARTILAGE"

#: Series Description of the SEG's series; a demonstration bundle's adds the disclaimer.
SEG_SERIES_DESCRIPTION = "AI knee cartilage SEG"

#: The intended-use sentence of a clinical knee bundle.
KNEE_CLINICAL_USE = (
    "Computer-assisted segmentation of the femoral, medial and lateral tibial and patellar "
    "cartilage on a 3-D sagittal knee MR series, with each plate's volume and thickness. "
    "The result supports, and does not replace, the reading physician."
)

# What fits a 64-character LO (Series and Content Description): the full disclaimer does not.
_DEMONSTRATION_SHORT = "demonstration, not for diagnostic use"

# Display colours (RGB), one per plate, in STRUCTURES order.
_COLOURS = {
    "femoral_cartilage": (230, 159, 0),
    "medial_tibial_cartilage": (86, 180, 233),
    "lateral_tibial_cartilage": (0, 158, 115),
    "patellar_cartilage": (204, 121, 167),
}


def knee_intended_use_text(intended_use: str) -> str:
    """Return the sentence the knee SR and SEG state for a bundle's intended use.

    Parameters
    ----------
    intended_use
        ``"demonstration"`` (the node's demonstration disclaimer, exactly) or
        ``"clinical"``.
    """
    return intended_use_text(intended_use, clinical=KNEE_CLINICAL_USE)


def tracking_id(structure: str) -> str:
    """The Tracking ID of a plate's segment and SR group (``"mibi-node knee <structure>"``)."""
    return f"{mibi_codes.DEVICE_NAME} knee {structure}"


def check_knee_result(result: KneeResult) -> None:
    """Raise unless ``result`` is a KneeResult a SEG and SR can encode.

    Its labels must hold only known label values, and its measurements must be one per
    structure, in order, with the voxel counts of the labels (the SR's volumes then describe
    exactly the SEG's segments).
    """
    if not isinstance(result, KneeResult):
        raise TypeError('Argument "result" should be a KneeResult.')
    if not result.bundle_name or not result.bundle_version:
        raise ValueError('Argument "result" should name its bundle (name and version).')
    knee_intended_use_text(result.intended_use)
    labels = result.labels
    if not isinstance(labels, np.ndarray) or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError('Argument "result" should have an integer label volume.')
    if labels.shape != result.volume.shape:
        raise ValueError(
            f'Argument "result" has labels of shape {labels.shape}, '
            f"not the volume's {result.volume.shape}."
        )
    if len(result.volume.slices) != result.volume.shape[0]:
        raise ValueError(
            f'Argument "result" has a volume of {result.volume.shape[0]} slices '
            f"but {len(result.volume.slices)} slice references."
        )
    if result.study_instance_uid != result.volume.study_instance_uid:
        raise ValueError('Argument "result" names a study other than its volume\'s.')
    if labels.size and (labels.min() < 0 or labels.max() > len(STRUCTURES)):
        raise ValueError(
            f'Argument "result" has label values outside 0-{len(STRUCTURES)}: '
            f"{sorted(set(np.unique(labels).tolist()) - set(range(len(STRUCTURES) + 1)))}."
        )
    if tuple(m.structure for m in result.measurements) != STRUCTURES:
        raise ValueError(
            'Argument "result" should have one measurement per structure, in STRUCTURES order.'
        )
    counts = np.bincount(labels.ravel().astype(np.intp), minlength=len(STRUCTURES) + 1)
    for m in result.measurements:
        if m.voxels != int(counts[LABEL_OF[m.structure]]):
            raise ValueError(
                f'Argument "result" measures {m.voxels} voxels of {m.structure}, '
                f"but its labels hold {int(counts[LABEL_OF[m.structure]])}."
            )
        for name, value in (
            ("volume", m.volume_mm3),
            ("mean thickness", m.mean_thickness_mm),
            ("minimum thickness", m.min_thickness_mm),
        ):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f'Argument "result" has a {name} of {m.structure} of {value}.')


def check_knee_sources(result: KneeResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """Check ``sources`` against the result's volume; return its slices' headers in order.

    See :func:`~mibi_node.report._common.check_volume_sources`.
    """
    return check_volume_sources(result.volume, result.study_instance_uid, sources)


def segment_numbers(result: KneeResult) -> dict[str, int]:
    """Structure -> its Segment Number in the SEG: the plates found, numbered from 1."""
    found = [m.structure for m in result.measurements if m.voxels > 0]
    return {structure: number for number, structure in enumerate(found, start=1)}


def build_knee_seg(
    result: KneeResult,
    sources: Sequence[Dataset],
    *,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    institution_name: str | None = None,
    device_uid: str | None = None,
) -> Segmentation:
    """Build the DICOM Segmentation that returns a knee ``result``'s plates to PACS.

    Parameters
    ----------
    result
        The analysis' answer: a label volume on the grid of its source series.
    sources
        Headers (pixels not needed) of every slice of ``result.volume``, in any order;
        other instances are ignored.
    series_number, instance_number
        Positive integers for the SEG's series and instance.
    series_instance_uid
        UID of the series to write into (keep it across versions); a new one by default.
    institution_name
        Institution Name of the creating site, if known.
    device_uid
        The node's Device Observer UID, written as the Device Serial Number (the SR's
        observer is the same device); the device name when not given.

    Returns
    -------
    highdicom.seg.Segmentation
        A BINARY SEG with one segment per plate found (see the module text for the
        numbering), ready for ``save_as`` or a C-STORE.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value, an inconsistent result, sources that lack a
        slice of the volume (the message names the argument), or a result without any plate
        (a SEG needs a segment).
    """
    check_knee_result(result)
    headers = check_knee_sources(result, sources)
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        device_uid=device_uid,
        institution_name=institution_name,
    )
    numbers = segment_numbers(result)
    if not numbers:
        raise ValueError('Argument "result" has no cartilage plate: a SEG needs a segment.')
    lookup = np.zeros(len(STRUCTURES) + 1, dtype=np.uint8)
    for structure, number in numbers.items():
        lookup[LABEL_OF[structure]] = number
    pixels = lookup[result.labels]
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.bundle_name, family=ALGORITHM_FAMILY, version=result.bundle_version
    )
    descriptions = [
        SegmentDescription(
            segment_number=number,
            segment_label=STRUCTURE_NAMES[structure],
            segmented_property_category=SEGMENTED_PROPERTY_CATEGORY,
            segmented_property_type=STRUCTURE_CODES[structure],
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=tracking_id(structure),
            anatomic_regions=[ANATOMIC_REGION],
            display_color=hd.color.CIELabColor.from_rgb(*_COLOURS[structure]),
        )
        for structure, number in numbers.items()
    ]
    intended = knee_intended_use_text(result.intended_use)
    demonstration = intended == DEMONSTRATION_DISCLAIMER
    series_description = SEG_SERIES_DESCRIPTION
    content_description = "AI knee cartilage segmentation"
    if demonstration:
        series_description += f" ({_DEMONSTRATION_SHORT})"
        content_description = f"Knee cartilage, {_DEMONSTRATION_SHORT}"
    texts = [
        result.bundle_name,
        result.bundle_version,
        institution_name or "",
        series_description,
        content_description,
        intended,
        *(STRUCTURE_NAMES[s] for s in numbers),
    ]
    seg = Segmentation(
        source_images=headers,
        pixel_array=pixels,
        segmentation_type=SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=mibi_codes.DEVICE_NAME,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        software_versions=mibi_node.__version__,
        device_serial_number=device_uid or mibi_codes.DEVICE_NAME,
        content_label=CONTENT_LABEL,
        content_description=content_description,
        omit_empty_frames=True,
        series_description=series_description,
        institution_name=institution_name,
        coding_schemes=coding_schemes(),
        contributing_equipment=[algorithm_equipment(result.bundle_name, result.bundle_version)],
        specific_character_set=character_set(headers[0].get("SpecificCharacterSet"), texts),
    )
    # The full intended-use sentence (the disclaimer, exactly), where a long text fits.
    seg.ImageComments = intended
    detach_person_names(seg)
    logger.debug(
        "knee SEG %s for study %s: segments %s",
        seg.SOPInstanceUID,
        result.study_instance_uid,
        numbers,
    )
    return seg


def read_knee_seg(seg: Dataset, slice_uids: Sequence[str]) -> np.ndarray:
    """The label volume a knee SEG holds, on the grid of the source slices ``slice_uids``.

    Segments are told apart by their Segmented Property Type code (a SEG numbers only the
    plates it holds, from 1), so the values are :data:`LABEL_OF`'s whatever was found; the
    demo, the end-to-end test and a site's check of what reached its PACS read it the same
    way. Frames the SEG leaves out (no voxels) read as background.

    Raises
    ------
    ValueError
        ``seg`` holds a segment of an unknown type or a frame on no slice of ``slice_uids``.
    """
    segmentation = hd.seg.Segmentation.from_dataset(seg, copy=False)
    by_code = {(c.value, c.scheme_designator): s for s, c in STRUCTURE_CODES.items()}
    numbers: dict[int, str] = {}
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        key = (str(code.CodeValue), str(code.CodingSchemeDesignator))
        if key not in by_code:
            raise ValueError(
                f"segment {item.SegmentNumber} of SEG {seg.SOPInstanceUID} is no knee plate "
                f"({code.CodeValue}, {code.CodingSchemeDesignator})"
            )
        numbers[int(item.SegmentNumber)] = by_code[key]
    pixels = segmentation.get_pixels_by_source_instance(
        list(slice_uids), segment_numbers=sorted(numbers), assert_missing_frames_are_empty=True
    )
    labels = np.zeros(pixels.shape[:3], np.uint8)
    for index, number in enumerate(sorted(numbers)):
        labels[pixels[..., index] > 0] = LABEL_OF[numbers[number]]
    return labels
