"""The lung analysis' DICOM Segmentation: one binary segment per lesion found.

The SEG goes into the source study as a new series. Its frames are the source CT slices that
hold a voxel of a lesion (empty frames are omitted), each frame referencing its slice, so a
viewer overlays it on the series it came from. A lesion's Segment Number is its
:attr:`~mibi_node.analyses.lung.result.LesionFinding.number` (both count 1..n), and the SR's
group of that lesion references that segment.

Codes: the Segmented Property Category is SCT 49755003 "Morphologically Abnormal Structure"
(DICOM CID 7150, pydicom's PS3.16 dictionary) and every segment's Anatomic Region SCT
39607008 "Lung". PS3.16 has neither class, so the Segmented Property Types are SNOMED CT
concepts of the International Edition: SCT 1217294009 "Ground glass opacity" (FSN "Ground
glass lung opacity (finding)") and SCT 12295008 "Bronchiectasis" (FSN "Bronchiectasis
(disorder)"). The algorithm family is DCM 123110 "Artificial Intelligence" (CID 7162).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from types import MappingProxyType

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
from mibi_node.analyses.lung.result import LesionFinding, LungResult
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
    "ANATOMIC_REGION",
    "CLASS_CODES",
    "CLASS_COLOURS",
    "CONTENT_LABEL",
    "LOBE_CODES",
    "LUNG_CLINICAL_USE",
    "SEG_SERIES_DESCRIPTION",
    "build_lung_seg",
    "check_lung_result",
    "check_lung_sources",
    "lung_intended_use_text",
    "read_lung_seg",
    "tracking_id",
]

logger = logging.getLogger(__name__)

#: Each class' Segmented Property Type and the SR's finding, by class key (SNOMED CT).
CLASS_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "ground_glass_opacity": Code("1217294009", "SCT", "Ground glass opacity"),
        "bronchiectasis": Code("12295008", "SCT", "Bronchiectasis"),
    }
)

#: SCT 49755003 "Morphologically Abnormal Structure" (CID 7150).
SEGMENTED_PROPERTY_CATEGORY: Code = codes.SCT.MorphologicallyAbnormalStructure
#: SCT 39607008 "Lung" (``codes.SCT.Lung``): every segment's Anatomic Region.
ANATOMIC_REGION: Code = codes.SCT.Lung
#: DCM 123110 "Artificial Intelligence" (``codes.DCM.ArtificialIntelligence``, CID 7162).
ALGORITHM_FAMILY: Code = codes.DCM.ArtificialIntelligence

#: The lobes :attr:`LesionFinding.lobe` may name, as the SR's Finding Site (with the side).
LOBE_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "upper": codes.SCT.UpperLobeOfLung,  # SCT 45653009
        "middle": codes.SCT.MiddleLobeOfRightLung,  # SCT 72481006
        "lower": codes.SCT.LowerLobeOfLung,  # SCT 90572001
    }
)

#: Display colour (RGB) of each class' segments and key image outlines.
CLASS_COLOURS: MappingProxyType[str, tuple[int, int, int]] = MappingProxyType(
    {"ground_glass_opacity": (230, 159, 0), "bronchiectasis": (86, 180, 233)}
)

#: Content Label of the SEG (CS: capitals, digits, underscore; 16 characters at most).
CONTENT_LABEL = "LUNG_LESIONS"

#: Series Description of the SEG's series; a demonstration bundle's adds the disclaimer.
SEG_SERIES_DESCRIPTION = "AI lung lesions SEG"

#: The intended-use sentence of a clinical lung bundle.
LUNG_CLINICAL_USE = (
    "Computer-assisted detection and segmentation of ground-glass opacities and "
    "bronchiectasis on a chest CT series, with each lesion's volume, attenuation and "
    "diameter. The result supports, and does not replace, the reading physician."
)

# What fits a 64-character LO (Series and Content Description): the full disclaimer does not.
_DEMONSTRATION_SHORT = "demonstration, not for diagnostic use"


def lung_intended_use_text(intended_use: str) -> str:
    """Return the sentence the lung SR, SEG and key image state for a bundle's intended use.

    Parameters
    ----------
    intended_use
        ``"demonstration"`` (the node's demonstration disclaimer, exactly) or
        ``"clinical"``.
    """
    return intended_use_text(intended_use, clinical=LUNG_CLINICAL_USE)


def tracking_id(lesion: LesionFinding) -> str:
    """The Tracking ID of a lesion's segment and SR group (``"mibi-node lung lesion 3"``)."""
    return f"{mibi_codes.DEVICE_NAME} lung lesion {lesion.number}"


def check_lung_result(result: LungResult) -> None:
    """Raise unless ``result`` is a LungResult a SEG and SR can encode.

    Its lesion map must hold only the lesions' numbers, each lesion exactly the voxels it
    claims (the SR's volumes then describe exactly the SEG's segments), with finite
    measurements on slices of the volume.
    """
    if not isinstance(result, LungResult):
        raise TypeError('Argument "result" should be a LungResult.')
    if not result.bundle_name or not result.bundle_version:
        raise ValueError('Argument "result" should name its bundle (name and version).')
    lung_intended_use_text(result.intended_use)
    lesions_map = result.lesions_map
    if not isinstance(lesions_map, np.ndarray) or not np.issubdtype(lesions_map.dtype, np.integer):
        raise TypeError('Argument "result" should have an integer lesion map.')
    volume = result.volume
    if lesions_map.shape != volume.shape:
        raise ValueError(
            f'Argument "result" has a lesion map of shape {lesions_map.shape}, '
            f"not the volume's {volume.shape}."
        )
    if len(volume.slices) != volume.shape[0]:
        raise ValueError(
            f'Argument "result" has a volume of {volume.shape[0]} slices '
            f"but {len(volume.slices)} slice references."
        )
    if result.study_instance_uid != volume.study_instance_uid:
        raise ValueError('Argument "result" names a study other than its volume\'s.')
    n = len(result.lesions)
    if lesions_map.size and (lesions_map.min() < 0 or lesions_map.max() > n):
        raise ValueError(
            f'Argument "result" has lesion map values outside 0-{n}: '
            f"{sorted(set(np.unique(lesions_map).tolist()) - set(range(n + 1)))}."
        )
    counts = np.bincount(lesions_map.ravel().astype(np.intp), minlength=n + 1)
    for lesion in result.lesions:
        if lesion.voxels != int(counts[lesion.number]) or lesion.voxels == 0:
            raise ValueError(
                f'Argument "result" measures {lesion.voxels} voxels of lesion {lesion.number}, '
                f"but its lesion map holds {int(counts[lesion.number])}."
            )
        for name, value in (
            ("volume", lesion.volume_mm3),
            ("diameter", lesion.diameter_mm),
            ("mean HU", lesion.mean_hu),
        ):
            if not math.isfinite(value) or (name != "mean HU" and value < 0):
                raise ValueError(
                    f'Argument "result" has a {name} of lesion {lesion.number} of {value}.'
                )
        if not 0 <= lesion.key_slice < volume.shape[0]:
            raise ValueError(
                f'Argument "result" has lesion {lesion.number} on slice {lesion.key_slice}, '
                f"outside the volume's {volume.shape[0]}."
            )
        if lesion.lobe is not None and lesion.lobe not in LOBE_CODES:
            raise ValueError(
                f'Argument "result" has lesion {lesion.number} in lobe {lesion.lobe!r}, not one '
                f"of {sorted(LOBE_CODES)}."
            )


def check_lung_sources(result: LungResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """Check ``sources`` against the result's volume; return its slices' headers in order.

    See :func:`~mibi_node.report._common.check_volume_sources`.
    """
    return check_volume_sources(result.volume, result.study_instance_uid, sources)


def build_lung_seg(
    result: LungResult,
    sources: Sequence[Dataset],
    *,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    institution_name: str | None = None,
    device_uid: str | None = None,
) -> Segmentation:
    """Build the DICOM Segmentation that returns a lung ``result``'s lesions to PACS.

    Parameters
    ----------
    result
        The analysis' answer: a lesion map on the grid of its source series.
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
        A BINARY SEG with segment ``n`` for lesion ``n``, ready for ``save_as`` or a C-STORE.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value, an inconsistent result, sources that lack a
        slice of the volume (the message names the argument), or a result without any
        lesion (a SEG needs a segment).
    """
    check_lung_result(result)
    headers = check_lung_sources(result, sources)
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        device_uid=device_uid,
        institution_name=institution_name,
    )
    if not result.lesions:
        raise ValueError('Argument "result" has no lesion: a SEG needs a segment.')
    algorithm = hd.AlgorithmIdentificationSequence(
        name=result.bundle_name, family=ALGORITHM_FAMILY, version=result.bundle_version
    )
    descriptions = [
        SegmentDescription(
            segment_number=lesion.number,
            segment_label=f"Lesion {lesion.number}: {lesion.title}",
            segmented_property_category=SEGMENTED_PROPERTY_CATEGORY,
            segmented_property_type=CLASS_CODES[lesion.name],
            algorithm_type=SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=generate_uid(),
            tracking_id=tracking_id(lesion),
            anatomic_regions=[ANATOMIC_REGION],
            display_color=hd.color.CIELabColor.from_rgb(*CLASS_COLOURS[lesion.name]),
        )
        for lesion in result.lesions
    ]
    intended = lung_intended_use_text(result.intended_use)
    series_description = SEG_SERIES_DESCRIPTION
    content_description = "AI lung lesion segmentation"
    if intended == DEMONSTRATION_DISCLAIMER:
        series_description += f" ({_DEMONSTRATION_SHORT})"
        content_description = f"Lung lesions, {_DEMONSTRATION_SHORT}"
    texts = [
        result.bundle_name,
        result.bundle_version,
        institution_name or "",
        series_description,
        content_description,
        intended,
    ]
    pixels = result.lesions_map
    if len(result.lesions) <= np.iinfo(np.uint8).max:
        pixels = pixels.astype(np.uint8)
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
        coding_schemes=coding_schemes(local=False),
        contributing_equipment=[algorithm_equipment(result.bundle_name, result.bundle_version)],
        specific_character_set=character_set(headers[0].get("SpecificCharacterSet"), texts),
    )
    # The full intended-use sentence (the disclaimer, exactly), where a long text fits.
    seg.ImageComments = intended
    detach_person_names(seg)
    logger.debug(
        "lung SEG %s for study %s: %d segments",
        seg.SOPInstanceUID,
        result.study_instance_uid,
        len(result.lesions),
    )
    return seg


def read_lung_seg(seg: Dataset, slice_uids: Sequence[str]) -> np.ndarray:
    """The lesion map a lung SEG holds, on the grid of the source slices ``slice_uids``.

    Each voxel holds the Segment Number of its segment, which is the lesion's number; frames
    the SEG leaves out (no voxels) read as background. The demo's Dice, the end-to-end test
    and a site's check of what reached its PACS read it the same way.

    Raises
    ------
    ValueError
        ``seg`` holds a segment of a type that is no lung lesion class, segments that
        overlap, or a frame on no slice of ``slice_uids``.
    """
    segmentation = hd.seg.Segmentation.from_dataset(seg, copy=False)
    known = {(c.value, c.scheme_designator) for c in CLASS_CODES.values()}
    numbers = []
    for item in seg.SegmentSequence:
        code = item.SegmentedPropertyTypeCodeSequence[0]
        if (str(code.CodeValue), str(code.CodingSchemeDesignator)) not in known:
            raise ValueError(
                f"segment {item.SegmentNumber} of SEG {seg.SOPInstanceUID} is no lung lesion "
                f"({code.CodeValue}, {code.CodingSchemeDesignator})"
            )
        numbers.append(int(item.SegmentNumber))
    numbers.sort()
    pixels = segmentation.get_pixels_by_source_instance(
        list(slice_uids), segment_numbers=numbers, assert_missing_frames_are_empty=True
    )
    present = pixels > 0
    if np.any(present.sum(axis=-1) > 1):
        raise ValueError(f"SEG {seg.SOPInstanceUID} has segments that overlap")
    lesions_map = np.zeros(pixels.shape[:3], np.uint16)
    for index, number in enumerate(numbers):
        lesions_map[present[..., index]] = number
    return lesions_map
