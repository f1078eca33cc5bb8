"""The spine analysis' SR: TID 1500 with one point, class and class probabilities per level.

Structure (highdicom ``Comprehensive3DSR``, same study as the MR slices, new series)::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context (device "mibi-node"), Procedure Reported LN 24968-0
      Image Library (TID 1600): the middle T2 sagittal slice and its neighbours
      Imaging Measurements
        Measurement Group (TID 1410) x one per level found, head to foot
          Tracking Identifier "mibi-node spine <level>", Tracking UID
          Finding = the level's class (normal, bulge, ... , degenerated)
          Finding Site = the level (SCT vertebra or disc, CID 7603/7604)
          Algorithm Identification (bundle name and version)
          Image Region: SCOORD POINT on the middle slice, geometric purpose DCM 111010 Center
          Probability (DCM 122157, UCUM "1") x every class of the level's kind, each
            HAS CONCEPT MOD Finding (DCM 121071) = the class it is the probability of
          Keypoint confidence (99MIBINODE MNS010, UCUM "1"): the heatmap peak
      Qualitative Evaluations (TID 1500 row 12)
        Intended use (TEXT), Comment (TEXT) x supersession note and the result's warnings

Pixel convention: :class:`~mibi_node.analyses.spine.result.SpinePoint` puts row 0 /
column 0 at the *centre* of the first pixel; SCOORD graphic data (PS3.3 C.18.6.1.2) puts
(0, 0) at the top left *corner* of the first pixel, as (column, row). A point is therefore
written as ``(col + 0.5, row + 0.5)`` and read back by subtracting 0.5.

The header's Contributing Equipment names the bundle as IHE AI Results asks
(:func:`~mibi_node.report._common.algorithm_equipment`).

Codes: the levels are SNOMED CT concepts of DICOM CID 7603 (Vertebra) and CID 7604
(Intervertebral Disc); "normal" is SCT 17621005 Normal; the procedure is LOINC 24968-0
"MR Lumbar spine" (LOINC/RSNA Radiology Playbook, DICOM CID 102). The abnormal classes
(disc bulge, protrusion, extrusion, Schmorl's node, degenerated vertebra) and the keypoint
confidence are local codes MNS001-MNS010 of the node's declared scheme ``99MIBINODE`` until
verified SNOMED CT concepts replace them.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodeContentItem,
    CodedConcept,
    Comprehensive3DSR,
    ContentSequence,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    RelationshipTypeValues,
    SourceImageForRegion,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, generate_uid

import mibi_node
from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS
from mibi_node.analyses.spine.result import SliceRef, SpinePoint, SpineResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    algorithm_equipment,
    character_set,
    check_document_arguments,
    check_predecessor,
    check_sources,
    check_uid,
    coding_schemes,
    detach_person_names,
    device_observer,
    intended_use_text,
    qualitative_evaluations,
    report_comments,
    separate_containers,
    with_type2_header,
)

__all__ = [
    "CLASS_CODES",
    "KEYPOINT_CONFIDENCE",
    "LEVEL_CODES",
    "PROCEDURE_REPORTED",
    "SERIES_DESCRIPTION",
    "SPINE_CLINICAL_USE",
    "SpineReport",
    "build_spine_sr",
    "check_spine_result",
    "check_spine_sources",
    "read_spine_report",
    "spine_intended_use_text",
]

logger = logging.getLogger(__name__)

_LOCAL = mibi_codes.CODING_SCHEME

#: LOINC 24968-0 "MR Lumbar spine" (LOINC/RSNA Radiology Playbook, DICOM CID 102).
PROCEDURE_REPORTED = Code("24968-0", "LN", "MR Lumbar spine")

#: Finding Site of each level: SCT concepts of DICOM CID 7603 (vertebrae) and 7604 (discs).
LEVEL_CODES: dict[str, Code] = {
    "T12-L1": codes.SCT.T12L1Disc,  # SCT 76206002 "T12/L1 disc"
    "L1": codes.SCT.L1Vertebra,  # SCT 66794005
    "L1-L2": codes.SCT.L1L2Disc,  # SCT 80064006
    "L2": codes.SCT.L2Vertebra,  # SCT 14293000
    "L2-L3": codes.SCT.L2L3Disc,  # SCT 67459009
    "L3": codes.SCT.L3Vertebra,  # SCT 36470004
    "L3-L4": codes.SCT.L3L4Disc,  # SCT 62551000
    "L4": codes.SCT.L4Vertebra,  # SCT 11994002
    "L4-L5": codes.SCT.L4L5Disc,  # SCT 84020006
    "L5": codes.SCT.L5Vertebra,  # SCT 49668003
    "L5-S1": codes.SCT.L5S1Disc,  # SCT 715056000 "L5/S1 disc"
}

#: Finding of each class, by kind and class key (:data:`~.levels.CLASSES`).
CLASS_CODES: dict[str, dict[str, Code]] = {
    "vertebra": {
        "normal": codes.SCT.Normal,  # SCT 17621005
        "degenerated": Code("MNS005", _LOCAL, "Degenerated vertebra"),
    },
    "disc": {
        "normal": codes.SCT.Normal,
        "bulge": Code("MNS001", _LOCAL, "Intervertebral disc bulge"),
        "protrusion": Code("MNS002", _LOCAL, "Intervertebral disc protrusion"),
        "extrusion": Code("MNS003", _LOCAL, "Intervertebral disc extrusion"),
        "schmorl_node": Code("MNS004", _LOCAL, "Schmorl's node"),
    },
}

#: The keypoint's confidence (the heatmap peak), a fraction.
KEYPOINT_CONFIDENCE = Code("MNS010", _LOCAL, "Keypoint confidence")

#: Series Description of the spine SR's series.
SERIES_DESCRIPTION = "MIBI-NODE AI SPINE"

#: The intended-use sentence of a clinical spine bundle.
SPINE_CLINICAL_USE = (
    "Computer-assisted localisation and classification of the lumbar vertebrae and "
    "intervertebral discs (T12-L1 to L5-S1) on the middle T2 sagittal MR slice. The result "
    "supports, and does not replace, the reading physician."
)

_FINDING = codes.DCM.Finding  # DCM 121071
_PROBABILITY_TOLERANCE = 1e-3
# SCOORD graphic data puts (0, 0) at the top left corner of the first pixel; SpinePoint
# puts it at the first pixel's centre.
_CORNER_TO_CENTRE = 0.5


def spine_intended_use_text(intended_use: str) -> str:
    """Return the sentence the spine SR and key image state for a bundle's intended use.

    Parameters
    ----------
    intended_use
        ``"demonstration"`` (the node's demonstration disclaimer, exactly) or
        ``"clinical"``.
    """
    return intended_use_text(intended_use, clinical=SPINE_CLINICAL_USE)


def check_spine_result(result: SpineResult) -> None:
    """Raise unless ``result`` is a SpineResult an SR or key image can encode."""
    if not isinstance(result, SpineResult):
        raise TypeError('Argument "result" should be a SpineResult.')
    if not result.bundle_name or not result.bundle_version:
        raise ValueError('Argument "result" should name its bundle (name and version).')
    spine_intended_use_text(result.intended_use)
    if not result.points:
        # An SR without a level would read as "nothing abnormal"; the job should fail instead.
        raise ValueError('Argument "result" has no points: there is nothing to report.')
    seen: set[str] = set()
    for point in result.points:
        if not isinstance(point, SpinePoint):
            raise TypeError('Argument "result" has a point that is not a SpinePoint.')
        if point.level in seen:
            raise ValueError(f'Argument "result" has two points for level {point.level}.')
        seen.add(point.level)
        where = f'Argument "result" at {point.level}'
        if not (math.isfinite(point.row) and math.isfinite(point.col)):
            raise ValueError(f"{where} has a point that is not finite.")
        expected = set(CLASSES[point.kind])
        if set(point.probabilities) != expected:
            raise ValueError(
                f"{where} should have a probability for each {point.kind} class "
                f"{sorted(expected)}, not {sorted(point.probabilities)}."
            )
        values = [float(p) for p in point.probabilities.values()]
        if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values):
            raise ValueError(f"{where} has a probability outside [0, 1].")
        if abs(math.fsum(values) - 1.0) > _PROBABILITY_TOLERANCE:
            raise ValueError(f"{where} has probabilities that sum to {math.fsum(values):.6f}.")
        if not (math.isfinite(point.score) and 0.0 <= point.score <= 1.0):
            raise ValueError(f"{where} has a keypoint score outside [0, 1].")


def used_slices(result: SpineResult) -> list[SliceRef]:
    """The middle slice, then each distinct neighbour (an edge repeat is listed once)."""
    slices: list[SliceRef] = []
    for ref in (result.middle, *result.neighbours):
        if ref.sop_instance_uid not in {s.sop_instance_uid for s in slices}:
            slices.append(ref)
    return slices


def check_spine_sources(result: SpineResult, sources: Sequence[Dataset]) -> list[Dataset]:
    """Check ``sources`` against ``result``; return the headers of the slices it used.

    ``sources`` may hold more instances (the whole study); only the middle slice and its
    neighbours are returned, middle first, the first one with empty Type 2 patient/study
    attributes where the file lacks them (highdicom reads them without a default).
    """
    slices = used_slices(result)
    # The shared check: types, UIDs, image attributes, one study, no duplicates.
    proxy = SimpleNamespace(
        study_instance_uid=result.study_instance_uid, source_images={}, focus=None
    )
    check_sources(sources, proxy)  # type: ignore[arg-type]
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    for index, ref in enumerate(slices):
        if ref.sop_instance_uid not in by_uid:
            name = "the middle slice" if index == 0 else "the neighbour slice"
            raise ValueError(
                f'Argument "sources" lacks {name} {ref.sop_instance_uid} '
                "the result was computed from."
            )
    headers = [by_uid[ref.sop_instance_uid] for ref in slices]
    for ref, header in zip(slices, headers, strict=True):
        if str(header.SOPClassUID) != ref.sop_class_uid:
            raise ValueError(
                f'Argument "sources" has instance {ref.sop_instance_uid} with SOP class '
                f"{header.SOPClassUID}, not the result's {ref.sop_class_uid}."
            )
    middle = headers[0]
    if int(middle.get("NumberOfFrames") or 1) != 1:
        raise ValueError(
            'Argument "sources" has a multi-frame middle slice; the result names no frame.'
        )
    rows, columns = int(middle.Rows), int(middle.Columns)
    for point in result.points:
        if not (-0.5 <= point.row <= rows - 0.5 and -0.5 <= point.col <= columns - 0.5):
            raise ValueError(
                f'Argument "result" has the {point.level} point at row {point.row:.2f}, '
                f"column {point.col:.2f}, outside the {rows} x {columns} middle slice."
            )
    return [with_type2_header(headers[0]), *headers[1:]]


def build_spine_sr(
    result: SpineResult,
    sources: Sequence[Dataset],
    *,
    device_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the SR that returns a spine ``result`` to PACS.

    Parameters
    ----------
    result
        The analysis' answer: one point per level found, on the middle slice.
    sources
        Datasets (headers suffice) holding at least the middle slice and every neighbour of
        ``result``; other instances of the study are allowed and ignored.
    device_uid
        Device Observer UID, stable for the node installation.
    series_number, instance_number
        Positive integers for the new series and instance.
    series_instance_uid
        UID of the series to write into (keep it across versions); a new one by default.
    predecessor
        Header of the earlier spine SR of the study that this one supersedes: listed in the
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
        An argument of the wrong type or value, an inconsistent result, or sources that
        lack one of the result's slices (the message names the argument).
    """
    check_spine_result(result)
    headers = check_spine_sources(result, sources)
    check_uid(device_uid, "device_uid")
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if predecessor is not None:
        check_predecessor(predecessor, result)  # type: ignore[arg-type]
        if str(predecessor.SOPClassUID) != Comprehensive3DSRStorage:
            raise ValueError(
                'Argument "predecessor" should be an earlier spine SR (Comprehensive 3D SR), '
                f"not an instance of SOP class {predecessor.SOPClassUID}."
            )
    comments = report_comments(predecessor, result.warnings)
    intended = spine_intended_use_text(result.intended_use)
    observer = device_observer(device_uid, result.bundle_name, result.bundle_version)
    order = {level: index for index, level in enumerate(LEVELS)}
    points = sorted(result.points, key=lambda p: order[p.level])
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE_REPORTED,
        imaging_measurements=[_level_group(result, point) for point in points],
        referenced_images=list(headers),
    )
    content[0].ContentSequence.append(qualitative_evaluations(intended, comments))
    separate_containers(content)
    texts = [result.bundle_name, result.bundle_version, institution_name or "", intended, *comments]
    sr = Comprehensive3DSR(
        evidence=headers,
        content=content,
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
        "spine SR %s for study %s: %s",
        sr.SOPInstanceUID,
        result.study_instance_uid,
        result.predicted,
    )
    return sr


def _level_group(
    result: SpineResult, point: SpinePoint
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    middle = result.middle
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POINT,
        graphic_data=np.array(
            [[point.col + _CORNER_TO_CENTRE, point.row + _CORNER_TO_CENTRE]], dtype=np.float64
        ),
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=middle.sop_class_uid,
            referenced_sop_instance_uid=middle.sop_instance_uid,
        ),
    )
    algorithm = AlgorithmIdentification(name=result.bundle_name, version=result.bundle_version)
    kind_codes = CLASS_CODES[point.kind]
    measurements = [
        _probability(float(point.probabilities[key]), kind_codes[key])
        for key in CLASSES[point.kind]
    ]
    measurements.append(
        Measurement(name=KEYPOINT_CONFIDENCE, value=float(point.score), unit=mibi_codes.NO_UNITS)
    )
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} spine {point.level}"
        ),
        referenced_region=region,
        finding_type=kind_codes[point.label],
        finding_sites=[FindingSite(anatomic_location=LEVEL_CODES[point.level])],
        algorithm_id=algorithm,
        measurements=measurements,
        geometric_purpose=codes.DCM.Center,
    )


def _probability(value: float, finding: Code) -> Measurement:
    """Probability (DCM 122157) of one class, the class named by a Finding modifier."""
    measurement = Measurement(name=mibi_codes.PROBABILITY, value=value, unit=mibi_codes.NO_UNITS)
    item = measurement[0]
    if "ContentSequence" not in item:
        item.ContentSequence = ContentSequence([])
    item.ContentSequence.append(
        CodeContentItem(
            name=_FINDING,
            value=finding,
            relationship_type=RelationshipTypeValues.HAS_CONCEPT_MOD,
        )
    )
    return measurement


def _text(name: Code, value: str) -> TextContentItem:
    return TextContentItem(
        name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
    )


@dataclass(frozen=True)
class SpineReport:
    """What an SR of :func:`build_spine_sr` says, read back (:func:`read_spine_report`).

    Attributes
    ----------
    points
        One per measurement group, head to foot, in the middle slice's pixels (row 0 /
        column 0 at the first pixel's centre, as in the result).
    image_sop_instance_uid
        The instance the points were drawn on (the middle slice).
    bundle_name, bundle_version
        The Algorithm Identification of the groups.
    intended_use
        The Intended use text (the disclaimer for a demonstration bundle).
    comments
        The Comment texts: supersession note, the result's warnings.
    """

    points: tuple[SpinePoint, ...]
    image_sop_instance_uid: str
    bundle_name: str
    bundle_version: str
    intended_use: str
    comments: tuple[str, ...]

    @property
    def labels(self) -> dict[str, str]:
        """Level -> class key."""
        return {point.level: point.label for point in self.points}


def _code_of(item: Dataset, attribute: str) -> tuple[str, str] | None:
    sequence = item.get(attribute)
    if not sequence:
        return None
    return str(sequence[0].CodeValue), str(sequence[0].CodingSchemeDesignator)


def _key(code: Code | CodedConcept) -> tuple[str, str]:
    return code.value, code.scheme_designator


_NAME_FINDING = _key(_FINDING)
_NAME_SITE = ("363698007", "SCT")
_NAME_PROBABILITY = _key(mibi_codes.PROBABILITY)
_NAME_CONFIDENCE = _key(KEYPOINT_CONFIDENCE)
_NAME_ALGORITHM = ("111001", "DCM")  # Algorithm Name
_NAME_VERSION = ("111003", "DCM")  # Algorithm Version
_NAME_INTENDED = _key(mibi_codes.INTENDED_USE)
_NAME_COMMENT = _key(mibi_codes.COMMENT)


def read_spine_report(sr: Dataset) -> SpineReport:
    """Every level's point, class, class probabilities and score, read back from a spine SR.

    It walks the content tree of the file (TID 1500 / 1410) as a receiving system would,
    without the objects that wrote it.

    Parameters
    ----------
    sr
        The SR, e.g. as read with :func:`pydicom.dcmread`.

    Raises
    ------
    TypeError
        When ``sr`` is no pydicom Dataset.
    ValueError
        When a measurement group is incomplete or names an unknown level or class.
    """
    if not isinstance(sr, Dataset):
        raise TypeError('Argument "sr" should be a pydicom Dataset.')
    levels = {_key(code): level for level, code in LEVEL_CODES.items()}
    points: list[SpinePoint] = []
    image_uid = bundle_name = bundle_version = intended = ""
    comments: list[str] = []
    for container in sr.get("ContentSequence", []):
        if container.get("ValueType") != "CONTAINER":
            continue
        for item in container.get("ContentSequence", []):
            item_name = _code_of(item, "ConceptNameCodeSequence")
            if item.get("ValueType") == "TEXT" and item_name == _NAME_INTENDED:
                intended = str(item.TextValue)
            elif item.get("ValueType") == "TEXT" and item_name == _NAME_COMMENT:
                comments.append(str(item.TextValue))
            elif item.get("ValueType") == "CONTAINER" and item.get("ContentSequence"):
                group = _read_group(item, levels)
                if group is None:
                    continue
                point, uid, algorithm = group
                points.append(point)
                image_uid = image_uid or uid
                bundle_name, bundle_version = algorithm
    order = {level: index for index, level in enumerate(LEVELS)}
    points.sort(key=lambda p: order[p.level])
    return SpineReport(
        points=tuple(points),
        image_sop_instance_uid=image_uid,
        bundle_name=bundle_name,
        bundle_version=bundle_version,
        intended_use=intended,
        comments=tuple(comments),
    )


def _read_group(
    group: Dataset, levels: dict[tuple[str, str], str]
) -> tuple[SpinePoint, str, tuple[str, str]] | None:
    finding = level = None
    probabilities: dict[tuple[str, str], float] = {}
    score = None
    xy: tuple[float, float] | None = None
    image_uid = ""
    algorithm = ["", ""]
    for item in group.ContentSequence:
        name = _code_of(item, "ConceptNameCodeSequence")
        value = _code_of(item, "ConceptCodeSequence")
        if name == _NAME_FINDING:
            finding = value
        elif name == _NAME_SITE and value is not None:
            level = levels.get(value)
            if level is None:
                return None  # a group of another analysis
        elif name == _NAME_PROBABILITY and item.get("MeasuredValueSequence"):
            modifiers = [
                _code_of(m, "ConceptCodeSequence")
                for m in item.get("ContentSequence", [])
                if _code_of(m, "ConceptNameCodeSequence") == _NAME_FINDING
            ]
            if modifiers and modifiers[0] is not None:
                probabilities[modifiers[0]] = float(item.MeasuredValueSequence[0].NumericValue)
        elif name == _NAME_CONFIDENCE and item.get("MeasuredValueSequence"):
            score = float(item.MeasuredValueSequence[0].NumericValue)
        elif item.get("ValueType") == "SCOORD" and item.get("GraphicType") == "POINT":
            x, y = (float(v) for v in item.GraphicData[:2])
            xy = (x, y)
            for reference in item.get("ContentSequence", []):
                for image in reference.get("ReferencedSOPSequence", []):
                    image_uid = str(image.ReferencedSOPInstanceUID)
        elif name == _NAME_ALGORITHM:
            algorithm[0] = str(item.TextValue)
        elif name == _NAME_VERSION:
            algorithm[1] = str(item.TextValue)
    if level is None:
        return None
    kind = LEVEL_KIND[level]
    by_code = {_key(code): key for key, code in CLASS_CODES[kind].items()}
    if finding not in by_code or xy is None or score is None:
        raise ValueError(f'Argument "sr" has an incomplete measurement group for {level}.')
    named = {by_code[code]: p for code, p in probabilities.items() if code in by_code}
    if set(named) != set(CLASSES[kind]):
        raise ValueError(f'Argument "sr" lacks class probabilities for {level}.')
    point = SpinePoint(
        level=level,
        row=xy[1] - _CORNER_TO_CENTRE,
        col=xy[0] - _CORNER_TO_CENTRE,
        label=by_code[finding],  # type: ignore[index]
        probabilities={key: named[key] for key in CLASSES[kind]},
        score=score,
    )
    return point, image_uid, (algorithm[0], algorithm[1])
