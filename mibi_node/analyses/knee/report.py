"""The knee analysis' SR: TID 1500 with each cartilage plate's volume and thickness.

Structure (highdicom ``Comprehensive3DSR``, same study as the MR series, new series)::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context (device "mibi-node"), Procedure Reported LN 24802-1
      Image Library (TID 1600): the source slices that hold a segmented voxel
      Imaging Measurements
        Measurement Group (TID 1411) x one per plate found, in STRUCTURES order
          Tracking Identifier "mibi-node knee <structure>", Tracking UID = the segment's
          Referenced Segment: the SEG's instance and Segment Number, the source slices
          Finding = SCT 309312004 Cartilage
          Finding Site = the plate (local MNK001-MNK004), laterality from the images
          Algorithm Identification (bundle name and version)
          Volume (SCT 118565006, UCUM mm3)
          Cartilage thickness (local MNK010, UCUM mm), derivation SCT 373098007 Mean
          Cartilage thickness (local MNK010, UCUM mm), derivation SCT 255605001 Minimum
            (both left out for a fragment too small to measure: no thickness)
        Measurement Group (TID 1501), when a plate was not found
          Tracking Identifier "mibi-node knee not found", Tracking UID
          Finding Site = SCT 49076000 Knee joint, laterality from the images
          Algorithm Identification
          Structure not found (local MNK011, CODE) = the plate, x every plate not found
      Qualitative Evaluations (TID 1500 row 12)
        Intended use (TEXT)
        Comment (TEXT) x supersession note and the result's warnings

Codes: from pydicom's PS3.16 dictionary: SCT 118565006 "Volume" (CID 7469), SCT 373098007
"Mean" and SCT 255605001 "Minimum" (CID 7464, the derivation), SCT 309312004 "Cartilage"
(CID 7151), SCT 49076000 "Knee joint", SCT 24028007 "Right" and 7771000 "Left", UCUM "mm3"
and "mm". The procedure is
LOINC 24802-1 "MR Knee" (LOINC/RSNA Radiology Playbook; not in PS3.16, like the spine SR's
24968-0). PS3.16 has no plate concepts and its only "Thickness" (LN 59089-3) is the
ultrasound ROI thickness, so the plates, the thickness and "not found" are local codes of the
node's declared scheme ``99MIBINODE``. The thickness rule is that of
:mod:`mibi_node.analyses.knee.measure`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from highdicom.seg import Segmentation
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    FindingSite,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    QualitativeEvaluation,
    ReferencedSegment,
    RelationshipTypeValues,
    TextContentItem,
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage, generate_uid

import mibi_node
from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.knee.result import KneeResult, StructureMeasurement
from mibi_node.analyses.knee.seg import (
    ANATOMIC_REGION,
    STRUCTURE_CODES,
    build_knee_seg,
    check_knee_result,
    check_knee_sources,
    knee_intended_use_text,
    tracking_id,
)
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    algorithm_equipment,
    character_set,
    check_document_arguments,
    check_predecessor,
    check_uid,
    coding_schemes,
    comprehensive_3d_sr,
    detach_person_names,
    device_observer,
    qualitative_evaluations,
    report_comments,
    separate_containers,
)

__all__ = [
    "CARTILAGE_THICKNESS",
    "NOT_FOUND",
    "PROCEDURE_REPORTED",
    "SERIES_DESCRIPTION",
    "build_knee_documents",
    "build_knee_sr",
    "seg_series_instance_uid",
]

logger = logging.getLogger(__name__)

_LOCAL = mibi_codes.CODING_SCHEME

#: LOINC 24802-1 "MR Knee" (LOINC/RSNA Radiology Playbook).
PROCEDURE_REPORTED = Code("24802-1", "LN", "MR Knee")

#: The plate's thickness, mm (local: PS3.16's LN 59089-3 "Thickness" is by ultrasound).
CARTILAGE_THICKNESS = Code("MNK010", _LOCAL, "Cartilage thickness")

#: Name of the CODE item whose value is a plate the model did not find.
NOT_FOUND = Code("MNK011", _LOCAL, "Structure not found")

#: SCT 118565006 "Volume" (``codes.SCT.Volume``).
VOLUME: Code = codes.SCT.Volume
#: SCT 309312004 "Cartilage" (``codes.SCT.Cartilage``): every group's Finding.
FINDING: Code = codes.SCT.Cartilage
#: SCT 373098007 "Mean" and SCT 255605001 "Minimum" (``codes.SCT.Mean``, ``.Minimum``).
MEAN: Code = codes.SCT.Mean
MINIMUM: Code = codes.SCT.Minimum
#: UCUM "mm3" and "mm" (``codes.UCUM.CubicMillimeter``, ``codes.UCUM.Millimeter``).
CUBIC_MILLIMETER: Code = codes.UCUM.CubicMillimeter
MILLIMETER: Code = codes.UCUM.Millimeter

#: Series Description of the knee SR's series.
SERIES_DESCRIPTION = "MIBI-NODE AI KNEE"

_LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left}

# What the measurements are worth: 0.1 mm3 and 0.01 mm (a voxel is some 0.3 mm3, 0.5 mm).
_VOLUME_DECIMALS = 1
_THICKNESS_DECIMALS = 2


def seg_series_instance_uid(sr_series_instance_uid: str) -> str:
    """The SEG's series UID, derived from the SR's so that it too stays across versions."""
    check_uid(sr_series_instance_uid, "sr_series_instance_uid")
    return generate_uid(entropy_srcs=[sr_series_instance_uid, "mibi-node knee SEG"])


def build_knee_documents(
    result: KneeResult, sources: Sequence[Dataset], context: EncodeContext
) -> list[Dataset]:
    """The knee result's documents for PACS: ``[SR, SEG]``, or ``[SR]`` when nothing was found.

    The SR takes the context's series; the SEG (a different modality, so its own series)
    takes the next Series Number and a series UID derived from the SR's
    (:func:`seg_series_instance_uid`), and the same Instance Number (the job's version).

    Parameters
    ----------
    result
        The analysis' answer.
    sources
        Headers of every slice of ``result.volume``, in any order.
    context
        What the node decided for this job (:class:`~mibi_node.analyses.base.EncodeContext`).
    """
    if not isinstance(context, EncodeContext):
        raise TypeError('Argument "context" should be an EncodeContext.')
    check_knee_result(result)
    seg = None
    if result.found:
        seg = build_knee_seg(
            result,
            sources,
            series_number=context.series_number + 1,
            instance_number=context.instance_number,
            series_instance_uid=seg_series_instance_uid(context.series_instance_uid),
            institution_name=context.institution_name,
            device_uid=context.device_uid,
        )
    sr = build_knee_sr(
        result,
        seg,
        sources,
        device_uid=context.device_uid,
        series_number=context.series_number,
        instance_number=context.instance_number,
        series_instance_uid=context.series_instance_uid,
        predecessor=context.predecessor,
        institution_name=context.institution_name,
    )
    return [sr] if seg is None else [sr, seg]


def _segments(seg: Dataset, result: KneeResult) -> dict[str, tuple[int, str]]:
    """Structure -> (Segment Number, Tracking UID) of ``seg``, checked against ``result``."""
    if not isinstance(seg, Dataset):
        raise TypeError('Argument "seg" should be a pydicom Dataset (a Segmentation).')
    if str(seg.get("SOPClassUID", "")) != SegmentationStorage:
        raise ValueError(f'Argument "seg" should be a Segmentation, not {seg.get("SOPClassUID")}.')
    if str(seg.get("StudyInstanceUID", "")) != result.study_instance_uid:
        raise ValueError('Argument "seg" belongs to another study than the result.')
    by_code = {(c.value, c.scheme_designator): s for s, c in STRUCTURE_CODES.items()}
    found: dict[str, tuple[int, str]] = {}
    for item in seg.get("SegmentSequence", []):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        structure = by_code.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
        if structure is None:
            raise ValueError(
                f'Argument "seg" has segment {item.SegmentNumber} of an unknown type '
                f"{code.CodeValue} ({code.CodingSchemeDesignator})."
            )
        found[structure] = (int(item.SegmentNumber), str(item.get("TrackingUID") or ""))
    expected = [m.structure for m in result.found]
    if sorted(found) != sorted(expected):
        raise ValueError(
            f'Argument "seg" has segments for {sorted(found)}, but the result found '
            f"{sorted(expected)}."
        )
    return found


def build_knee_sr(
    result: KneeResult,
    seg: Segmentation | Dataset | None,
    sources: Sequence[Dataset],
    *,
    device_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the SR that returns a knee ``result``'s measurements to PACS.

    Parameters
    ----------
    result
        The analysis' answer: the label volume and one measurement per plate.
    seg
        The SEG of :func:`~mibi_node.analyses.knee.seg.build_knee_seg` for ``result``, whose
        segments the groups reference; ``None`` only when no plate was found.
    sources
        Headers of every slice of ``result.volume``, in any order; other instances are
        ignored.
    device_uid
        Device Observer UID, stable for the node installation.
    series_number, instance_number
        Positive integers for the new series and instance.
    series_instance_uid
        UID of the series to write into (keep it across versions); a new one by default.
    predecessor
        Header of the earlier knee SR of the study that this one supersedes: listed in the
        Predecessor Documents Sequence, and the report says so in a comment.
    institution_name
        Institution Name of the creating site, if known.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The document, ready for ``save_as`` or a C-STORE.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or value, an inconsistent result, a SEG whose segments
        are not the result's plates, or sources that lack a slice of the volume (the message
        names the argument).
    """
    check_knee_result(result)
    headers = check_knee_sources(result, sources)
    check_uid(device_uid, "device_uid")
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if seg is None:
        if result.found:
            raise ValueError('Argument "seg" is needed: the result found cartilage plates.')
        segments: dict[str, tuple[int, str]] = {}
    else:
        segments = _segments(seg, result)
    if predecessor is not None:
        check_predecessor(predecessor, result)  # type: ignore[arg-type]
        if str(predecessor.SOPClassUID) != Comprehensive3DSRStorage:
            raise ValueError(
                'Argument "predecessor" should be an earlier knee SR (Comprehensive 3D SR), '
                f"not an instance of SOP class {predecessor.SOPClassUID}."
            )
    comments = report_comments(predecessor, result.warnings)
    intended = knee_intended_use_text(result.intended_use)
    observer = device_observer(device_uid, result.bundle_name, result.bundle_version)
    laterality = _laterality(headers)
    groups: list[
        VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ] = [
        _plate_group(result, m, seg, segments[m.structure], laterality)
        for m in result.measurements
        if m.structure in segments and seg is not None
    ]
    missing = [m.structure for m in result.measurements if m.structure not in segments]
    if missing:
        groups.append(_not_found_group(result, missing, laterality))
    used = np.flatnonzero(result.labels.reshape(result.labels.shape[0], -1).any(axis=1))
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=[headers[k] for k in used] or None,
    )
    content[0].ContentSequence.append(qualitative_evaluations(intended, comments))
    separate_containers(content)
    texts = [result.bundle_name, result.bundle_version, institution_name or "", intended, *comments]
    sr = comprehensive_3d_sr(
        content,  # type: ignore[arg-type]  # a TID 1500 template: one root container
        [*headers, *([seg] if seg is not None else [])],
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=generate_uid(),
        instance_number=instance_number,
        manufacturer=mibi_codes.DEVICE_NAME,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=None if predecessor is None else [predecessor],
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        software_versions=mibi_node.__version__,
        coding_schemes=coding_schemes(),
        contributing_equipment=[algorithm_equipment(result.bundle_name, result.bundle_version)],
        specific_character_set=character_set(headers[0].get("SpecificCharacterSet"), texts),
    )
    detach_person_names(sr)
    logger.debug(
        "knee SR %s for study %s: %s",
        sr.SOPInstanceUID,
        result.study_instance_uid,
        result.predicted,
    )
    return sr


def _laterality(headers: Sequence[Dataset]) -> Code | None:
    """The knee's side from the images' (Image) Laterality, when they all agree."""
    sides = {str(ds.get("ImageLaterality") or ds.get("Laterality") or "").upper() for ds in headers}
    if len(sides) == 1:
        return _LATERALITY.get(sides.pop())
    return None


def _plate_group(
    result: KneeResult,
    measurement: StructureMeasurement,
    seg: Dataset,
    segment: tuple[int, str],
    laterality: Code | None,
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    number, tracking_uid = segment
    structure = measurement.structure
    values = [
        Measurement(
            name=VOLUME,
            value=round(measurement.volume_mm3, _VOLUME_DECIMALS),
            unit=CUBIC_MILLIMETER,
        )
    ]
    for derivation, value in (
        (MEAN, measurement.mean_thickness_mm),
        (MINIMUM, measurement.min_thickness_mm),
    ):
        if value is not None:
            values.append(
                Measurement(
                    name=CARTILAGE_THICKNESS,
                    value=round(value, _THICKNESS_DECIMALS),
                    unit=MILLIMETER,
                    derivation=derivation,
                )
            )
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid or generate_uid(), identifier=tracking_id(structure)
        ),
        referenced_segment=ReferencedSegment.from_segmentation(seg, number),
        finding_type=FINDING,
        finding_sites=[
            FindingSite(anatomic_location=STRUCTURE_CODES[structure], laterality=laterality)
        ],
        algorithm_id=AlgorithmIdentification(
            name=result.bundle_name, version=result.bundle_version
        ),
        measurements=values,
    )


def _not_found_group(
    result: KneeResult, missing: Sequence[str], laterality: Code | None
) -> MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group naming each plate that was not found (and has no segment)."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} knee not found"
        ),
        algorithm_id=AlgorithmIdentification(
            name=result.bundle_name, version=result.bundle_version
        ),
        finding_sites=None
        if laterality is None
        else [FindingSite(anatomic_location=ANATOMIC_REGION, laterality=laterality)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=NOT_FOUND, value=STRUCTURE_CODES[structure])
            for structure in missing
        ],
    )


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )
