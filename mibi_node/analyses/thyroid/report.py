"""The thyroid analysis' SR: TID 1500 with every finding's probability, the lobe split and
the focal areas as image regions.

Structure (highdicom ``Comprehensive3DSR``, same study, new series):

- Measurement Report (TID 1500), device observer (TID 1004), procedures reported = nuclear
  medicine procedure (SCT 371572003) and the thyroid scan (LN 30695-1), image library
  referencing the anterior image.
- One Measurements group (TID 1501) per finding: Finding = the finding's code, Finding Site =
  Thyroid structure (SCT 69748006), Probability (DCM 122157, UCUM "1"); the reported ones
  also carry Finding = "reported" as a qualitative evaluation.
- One group per lobe: Finding Site thyroid with its laterality, "Lobe uptake share" in %.
- One planar ROI group (TID 1410) per focal area: a CIRCLE on the source frame, Finding =
  hot or cold area, laterality of its lobe.
- Qualitative evaluations: the intended use (the demonstration-only sentence for phantom
  bundles) and the reader's remarks.

The header's Contributing Equipment names the bundle as IHE AI Results asks
(:func:`~mibi_node.report._common.algorithm_equipment`).

Codes: SCT 69748006 Thyroid structure, SCT 17621005 Normal and SCT 353295004 Graves' disease;
the other findings, the lobe share and the hot/cold areas are local codes of the node's
declared scheme ``99MIBINODE`` (MNT...), until verified SNOMED CT concepts replace them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    CodedConcept,
    Comprehensive3DSR,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

import mibi_node
from mibi_node.analyses.thyroid.result import FINDINGS, ThyroidResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    algorithm_equipment,
    character_set,
    check_positive,
    check_predecessor,
    check_sources,
    check_uid,
    coding_schemes,
    detach_person_names,
    device_observer,
    intended_use_text,
    qualitative_evaluations,
    report_comments,
)

__all__ = [
    "FINDING_CODES",
    "PROCEDURES_REPORTED",
    "ThyroidReport",
    "build_thyroid_sr",
    "read_thyroid_probabilities",
    "read_thyroid_report",
]

_LOCAL = mibi_codes.CODING_SCHEME
THYROID = CodedConcept("69748006", "SCT", "Thyroid structure")
FINDING_CODES: dict[str, CodedConcept] = {
    "normal": CodedConcept("17621005", "SCT", "Normal"),
    "graves": CodedConcept("353295004", "SCT", "Graves' disease"),
    "toxic_multinodular_goitre": CodedConcept("MNT001", _LOCAL, "Toxic multinodular goitre"),
    "toxic_adenoma": CodedConcept("MNT002", _LOCAL, "Toxic adenoma of thyroid"),
    "cold_nodule": CodedConcept("MNT003", _LOCAL, "Cold thyroid nodule"),
    "thyroiditis": CodedConcept("MNT004", _LOCAL, "Thyroiditis"),
}
_LOBE_SHARE = CodedConcept("MNT010", _LOCAL, "Lobe uptake share")
_AREA = {
    "hot": CodedConcept("MNT011", _LOCAL, "Hot thyroid area"),
    "cold": CodedConcept("MNT012", _LOCAL, "Cold thyroid area"),
}
_REPORTED = CodedConcept("MNT013", _LOCAL, "Reported by the algorithm")
_PERCENT = CodedConcept("%", "UCUM", "percent")
_YES = CodedConcept("373066001", "SCT", "Yes")
_SERIES_DESCRIPTION = "MIBI-NODE AI THYROID"

#: The imaging procedure the SR reports on (TID 1500 Procedure reported, 1-n): SCT 371572003
#: "Nuclear medicine procedure" (as the parathyroid SR) and LN 30695-1, the LOINC imaging
#: code of the thyroid scan, with the meaning PS3.16 (CID 7000) gives it.
PROCEDURES_REPORTED: tuple[Code, ...] = (
    mibi_codes.PROCEDURE_REPORTED,
    codes.LN.NuclearMedicineThyroidScanReport,
)


#: The intended-use sentence of a clinical thyroid bundle.
THYROID_CLINICAL_USE = (
    "Computer-assisted assessment of thyroid scintigraphy (normal, Graves' disease, toxic "
    "multinodular goitre, toxic adenoma, cold nodule, thyroiditis; multi-label) with the lobe "
    "uptake split. The result supports, and does not replace, the reading physician."
)


def _check(result: ThyroidResult) -> None:
    if not isinstance(result, ThyroidResult):
        raise TypeError('Argument "result" should be a ThyroidResult.')
    unknown = [key for key in result.probabilities if key not in FINDING_CODES]
    if unknown or not result.probabilities:
        raise ValueError(f'Argument "result" has probabilities for unknown findings: {unknown}.')
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in result.probabilities.values()):
        raise ValueError('Argument "result" has a probability outside [0, 1].')
    if not result.findings or any(f not in result.probabilities for f in result.findings):
        raise ValueError('Argument "result" reports findings it has no probability for.')
    if not result.bundle_name or not result.bundle_version:
        raise ValueError('Argument "result" should name its bundle (name and version).')
    for side in result.lobe_uptake:
        if side not in mibi_codes.LATERALITY:
            raise ValueError(f'Argument "result" has a lobe share for side "{side}".')
    intended_use_text(result.intended_use)


def build_thyroid_sr(
    result: ThyroidResult,
    sources: Sequence[Dataset],
    *,
    device_uid: str,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the SR that returns a thyroid ``result`` to PACS.

    Raises
    ------
    TypeError, ValueError
        An argument of the wrong type or an inconsistent result (the message names it).
    """
    _check(result)
    headers = check_sources(sources, result)  # type: ignore[arg-type]
    if result.source_image.sop_instance_uid not in {str(h.SOPInstanceUID) for h in headers}:
        raise ValueError('Argument "sources" lacks the image the result was read from.')
    check_positive(series_number, "series_number")
    check_positive(instance_number, "instance_number")
    check_uid(device_uid, "device_uid")
    if series_instance_uid is not None:
        check_uid(series_instance_uid, "series_instance_uid")
    if predecessor is not None:
        check_predecessor(predecessor, result)  # type: ignore[arg-type]
    comments = report_comments(predecessor, result.warnings)
    intended = intended_use_text(result.intended_use, clinical=THYROID_CLINICAL_USE)
    observer = device_observer(device_uid, result.bundle_name, result.bundle_version)
    groups: list[Any] = [
        _finding_group(result, key) for key in FINDINGS if key in result.probabilities
    ]
    groups += [_lobe_group(result, side, share) for side, share in result.lobe_uptake.items()]
    groups += [_area_group(result, index) for index in range(len(result.nodules))]
    content = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=list(PROCEDURES_REPORTED),
        imaging_measurements=groups,
        referenced_images=list(headers),
    )
    content[0].ContentSequence.append(qualitative_evaluations(intended, comments))
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
        series_description=_SERIES_DESCRIPTION,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        software_versions=mibi_node.__version__,
        coding_schemes=coding_schemes(),
        contributing_equipment=[algorithm_equipment(result.bundle_name, result.bundle_version)],
        specific_character_set=character_set(headers[0].get("SpecificCharacterSet"), texts),
    )
    detach_person_names(sr)
    return sr


def _algorithm(result: ThyroidResult) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=result.bundle_name, version=result.bundle_version)


def _source(result: ThyroidResult) -> SourceImageForMeasurementGroup:
    image = result.source_image
    return SourceImageForMeasurementGroup(
        referenced_sop_class_uid=image.sop_class_uid,
        referenced_sop_instance_uid=image.sop_instance_uid,
        referenced_frame_numbers=None if image.frame_number is None else [image.frame_number],
    )


def _finding_group(result: ThyroidResult, key: str) -> MeasurementsAndQualitativeEvaluations:
    evaluations = None
    if key in result.findings:
        evaluations = [QualitativeEvaluation(name=_REPORTED, value=_YES)]
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} thyroid {key} probability"
        ),
        finding_type=FINDING_CODES[key],
        finding_sites=[FindingSite(anatomic_location=THYROID)],
        algorithm_id=_algorithm(result),
        measurements=[
            Measurement(
                name=mibi_codes.PROBABILITY,
                value=float(result.probabilities[key]),
                unit=mibi_codes.NO_UNITS,
            )
        ],
        qualitative_evaluations=evaluations,
        source_images=[_source(result)],
    )


def _lobe_group(
    result: ThyroidResult, side: str, share: float
) -> MeasurementsAndQualitativeEvaluations:
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} thyroid {side} lobe"
        ),
        finding_sites=[
            FindingSite(anatomic_location=THYROID, laterality=mibi_codes.LATERALITY[side])
        ],
        algorithm_id=_algorithm(result),
        measurements=[Measurement(name=_LOBE_SHARE, value=100.0 * float(share), unit=_PERCENT)],
        source_images=[_source(result)],
    )


def _area_group(
    result: ThyroidResult, index: int
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    nodule = result.nodules[index]
    image = result.source_image
    # SCOORD puts (0, 0) at the top left corner of the first pixel: its centre is (0.5, 0.5).
    centre = (nodule.col + 0.5, nodule.row + 0.5)
    region = ImageRegion(
        graphic_type=GraphicTypeValues.CIRCLE,
        graphic_data=np.array([centre, (centre[0] + max(nodule.radius, 0.5), centre[1])]),
        source_image=SourceImageForRegion(
            referenced_sop_class_uid=image.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=None if image.frame_number is None else [image.frame_number],
        ),
    )
    laterality = mibi_codes.LATERALITY.get(nodule.lobe)
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} thyroid area {index + 1}"
        ),
        referenced_region=region,
        finding_type=_AREA[nodule.kind],
        finding_sites=[FindingSite(anatomic_location=THYROID, laterality=laterality)],
        algorithm_id=_algorithm(result),
    )


@dataclass(frozen=True)
class ThyroidReport:
    """What an SR of :func:`build_thyroid_sr` says, read back (:func:`read_thyroid_report`)."""

    #: Finding key -> probability, every finding.
    probabilities: dict[str, float]
    #: The findings the algorithm reported, most probable first.
    reported: tuple[str, ...]
    #: "right"/"left" -> share of the gland's uptake, 0-1.
    lobe_uptake: dict[str, float]


def _code_of(item: Dataset, attribute: str) -> tuple[str, str] | None:
    sequence = item.get(attribute)
    if not sequence:
        return None
    return str(sequence[0].CodeValue), str(sequence[0].CodingSchemeDesignator)


def read_thyroid_report(sr: Dataset) -> ThyroidReport:
    """Probabilities, reported findings and lobe split, read back from a thyroid SR.

    It walks the measurement groups of the SR's content tree (TID 1501), the way a
    receiving system would, without the objects that wrote it.
    """
    by_code = {(c.value, c.scheme_designator): key for key, c in FINDING_CODES.items()}
    sides = {(c.value, c.scheme_designator): side for side, c in mibi_codes.LATERALITY.items()}
    probabilities: dict[str, float] = {}
    reported: list[str] = []
    lobes: dict[str, float] = {}
    for group in sr.ContentSequence:
        if group.get("ValueType") != "CONTAINER":
            continue
        for container in group.get("ContentSequence", []):
            finding = probability = share = side = None
            flagged = False
            for item in container.get("ContentSequence", []):
                name = _code_of(item, "ConceptNameCodeSequence")
                value = _code_of(item, "ConceptCodeSequence")
                if name == ("121071", "DCM") and value is not None:  # Finding
                    finding = by_code.get(value)
                elif name == ("122157", "DCM") and item.get("MeasuredValueSequence"):
                    probability = float(item.MeasuredValueSequence[0].NumericValue)
                elif name == (_LOBE_SHARE.value, _LOBE_SHARE.scheme_designator):
                    share = float(item.MeasuredValueSequence[0].NumericValue) / 100.0
                elif name == (_REPORTED.value, _REPORTED.scheme_designator):
                    flagged = value == (_YES.value, _YES.scheme_designator)
                elif name == ("363698007", "SCT"):  # Finding Site, with its laterality
                    for modifier in item.get("ContentSequence", []):
                        code = _code_of(modifier, "ConceptCodeSequence")
                        if code is not None:
                            side = sides.get(code) or side
            if finding is not None and probability is not None:
                probabilities[finding] = probability
                if flagged:
                    reported.append(finding)
            if share is not None and side is not None:
                lobes[side] = share
    reported.sort(key=lambda key: -probabilities[key])
    return ThyroidReport(probabilities, tuple(reported), lobes)


def read_thyroid_probabilities(sr: Dataset) -> dict[str, float]:
    """Finding key -> probability, read back from an SR of :func:`build_thyroid_sr`."""
    return read_thyroid_report(sr).probabilities
