"""The MIBI result as a Comprehensive 3D SR: TID 1500 Measurement Report in the original study.

Content tree (every CONTAINER has Continuity of Content SEPARATE, so that renderers such as
DCMTK's ``dsr2html`` show each item with its concept name)::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context (device "mibi-node"), Procedure Reported
      Image Library (TID 1600): every source instance
      Imaging Measurements
        Measurement Group (TID 1410), predicted non-normal class with a focus only, first:
          Finding, Finding Site Parathyroid + Laterality + Superior/Inferior,
          Algorithm Identification, Image Region (SCOORD on the delayed frame), Probability
        Measurement Group (TID 1501) x one per class
          Tracking Identifier/UID, Finding = class code, Finding Site = Parathyroid,
          Algorithm Identification, Source images,
          Probability (DCM 122157, UCUM "1")
          [predicted class: Ensemble member agreement, Normalised entropy]
      Qualitative Evaluations (TID 1500 row 12)
        Intended use (TEXT), Comment (TEXT) x supersession note and engine warnings

:func:`read_probabilities` reads the class probabilities back from such a document.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike
from typing import Any, BinaryIO

import highdicom as hd
import numpy as np
from highdicom.sr import (
    AlgorithmIdentification,
    Comprehensive3DSR,
    FindingSite,
    GraphicTypeValues,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

import mibi_node
from mibi_node.inference.result import Focus, StudyResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    DEMONSTRATION_DISCLAIMER,
    algorithm_equipment,
    character_set,
    check_positive,
    check_predecessor,
    check_result,
    check_sources,
    check_uid,
    coding_schemes,
    comprehensive_3d_sr,
    detach_person_names,
    device_observer,
    intended_use_text,
    qualitative_evaluations,
    report_comments,
    separate_containers,
)

__all__ = [
    "DEFAULT_SERIES_NUMBER",
    "DEMONSTRATION_DISCLAIMER",
    "build_sr",
    "intended_use_text",
    "read_probabilities",
]

logger = logging.getLogger(__name__)

#: Series Number of the result series unless the caller chooses one.
DEFAULT_SERIES_NUMBER = 9901


def build_sr(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    device_uid: str,
    series_number: int = DEFAULT_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = mibi_codes.DEVICE_NAME,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the Structured Report that returns ``result`` to PACS.

    The SR joins the original study in a new series ("MIBI-NODE AI RESULT"), copies the
    patient and study attributes from ``sources`` and lists every source instance in its
    image library and evidence. Its Contributing Equipment names the bundle as IHE AI
    Results asks (:func:`~mibi_node.report._common.algorithm_equipment`).

    Parameters
    ----------
    result
        The engine's answer for one study.
    sources
        Headers of the study's source instances (read with ``stop_before_pixels=True``);
        they must include every image in ``result.source_images``.
    device_uid
        Device Observer UID: a UID that stays the same for this node installation.
    series_number, instance_number
        Positive integers for the new series and instance.
    manufacturer
        Manufacturer of the device and of the algorithm (Equipment module, observer context
        and the algorithm's Contributing Equipment item).
    series_instance_uid, sop_instance_uid
        UIDs to use (e.g. to keep them stable across retries); new ones by default.
    predecessor
        Header of an earlier SR this one supersedes: it is listed in the Predecessor
        Documents Sequence and the report says so in a comment.
    institution_name
        Institution Name of the creating site, if known.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
        The document, ready for ``save_as`` or a C-STORE.

    Raises
    ------
    TypeError
        When an argument has the wrong type.
    ValueError
        When the result is inconsistent (probabilities, classes, focus) or the sources do
        not belong to the result's study or lack one of its images.
    """
    check_result(result)
    headers = check_sources(sources, result)
    check_positive(series_number, "series_number")
    check_positive(instance_number, "instance_number")
    check_uid(device_uid, "device_uid")
    if not isinstance(manufacturer, str) or not manufacturer:
        raise ValueError('Argument "manufacturer" should be a non-empty string.')
    if series_instance_uid is not None:
        check_uid(series_instance_uid, "series_instance_uid")
    if sop_instance_uid is not None:
        check_uid(sop_instance_uid, "sop_instance_uid")
    if predecessor is not None:
        check_predecessor(predecessor, result)

    comments = report_comments(predecessor, result.warnings)
    texts = [intended_use_text(result.intended_use), *comments]

    content = _measurement_report(result, headers, device_uid, manufacturer, texts[0], comments)
    charset = character_set(
        headers[0].get("SpecificCharacterSet"),
        [manufacturer, result.bundle_name, result.bundle_version, institution_name or "", *texts],
    )
    sr = comprehensive_3d_sr(
        content,
        headers,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        institution_name=institution_name,
        previous_versions=None if predecessor is None else [predecessor],
        series_description=mibi_codes.SERIES_DESCRIPTION,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        software_versions=mibi_node.__version__,
        coding_schemes=coding_schemes(),
        contributing_equipment=[
            algorithm_equipment(result.bundle_name, result.bundle_version, manufacturer)
        ],
        specific_character_set=charset,
    )
    detach_person_names(sr)
    logger.debug(
        "SR %s for study %s: %s (%.3f)",
        sr.SOPInstanceUID,
        result.study_instance_uid,
        result.predicted,
        result.probabilities[result.predicted],
    )
    return sr


def read_probabilities(
    sr: Dataset | str | PathLike[str] | bytes | BinaryIO,
) -> dict[str, float]:
    """Read the class probabilities back from an SR written by :func:`build_sr`.

    Parameters
    ----------
    sr
        The SR as a dataset (a highdicom SR or a plain ``pydicom`` dataset) or as a file
        (path, bytes or binary file object), read with :func:`highdicom.sr.srread`.

    Returns
    -------
    dict[str, float]
        Class key -> probability, in document order; only the TID 1501 groups count (the
        TID 1410 focus group repeats the predicted class's probability).

    Raises
    ------
    ValueError
        When the document is no TID 1500 report or a class appears twice.
    """
    if isinstance(sr, Dataset):
        content = getattr(sr, "content", None)
        if not isinstance(content, MeasurementReport):
            # A plain dataset, or a document built here (highdicom keeps its content as a
            # generic tree): parse the content tree as TID 1500.
            content = Comprehensive3DSR.from_dataset(sr).content
    else:
        content = hd.sr.srread(sr).content
    if not isinstance(content, MeasurementReport):
        raise ValueError('Argument "sr" is not a TID 1500 Measurement Report.')
    probabilities: dict[str, float] = {}
    for group in content.get_image_measurement_groups():
        finding = group.finding_type
        key = None if finding is None else mibi_codes.class_key(finding)
        if key is None:
            continue
        measurements = group.get_measurements(name=mibi_codes.PROBABILITY)
        if not measurements:
            continue
        if key in probabilities:
            raise ValueError(f'Argument "sr" has two probabilities for class "{key}".')
        probabilities[key] = float(measurements[0].value)
    return probabilities


def _measurement_report(
    result: StudyResult,
    headers: Sequence[Dataset],
    device_uid: str,
    manufacturer: str,
    intended_use: str,
    comments: Sequence[str],
) -> MeasurementReport:
    observer = device_observer(device_uid, result.bundle_name, result.bundle_version, manufacturer)
    # The items every group repeats are built once and shared by the groups: the document
    # writes each occurrence in full, and highdicom's checks of each item cost more than
    # anything else in the tree.
    algorithm = _algorithm(result)
    site = FindingSite(anatomic_location=mibi_codes.FINDING_SITE)
    source_images = [
        SourceImageForMeasurementGroup(
            referenced_sop_class_uid=image.sop_class_uid,
            referenced_sop_instance_uid=image.sop_instance_uid,
            referenced_frame_numbers=None if image.frame_number is None else [image.frame_number],
        )
        for image in result.source_images.values()
    ]
    groups: list[
        MeasurementsAndQualitativeEvaluations | PlanarROIMeasurementsAndQualitativeEvaluations
    ] = [_class_group(result, key, algorithm, site, source_images) for key in result.probabilities]
    if result.predicted != "normal" and result.focus is not None:
        # First: OHIF's SR viewport opens on the first group and draws only groups with
        # image coordinates (docs/viewers.md).
        groups.insert(0, _focus_group(result, result.focus, algorithm))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=mibi_codes.PROCEDURE_REPORTED,
        imaging_measurements=groups,
        referenced_images=list(headers),
    )
    report[0].ContentSequence.append(qualitative_evaluations(intended_use, comments))
    separate_containers(report)
    return report


def _class_group(
    result: StudyResult,
    key: str,
    algorithm: AlgorithmIdentification,
    site: FindingSite,
    source_images: list[SourceImageForMeasurementGroup],
) -> MeasurementsAndQualitativeEvaluations:
    measurements = [_fraction(mibi_codes.PROBABILITY, result.probabilities[key])]
    if key == result.predicted:
        measurements.append(_fraction(mibi_codes.AGREEMENT, result.agreement))
        measurements.append(_fraction(mibi_codes.NORMALISED_ENTROPY, result.normalised_entropy))
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} {key} probability"
        ),
        finding_type=mibi_codes.CLASS_CODES[key],
        finding_sites=[site],
        algorithm_id=algorithm,
        measurements=measurements,
        source_images=source_images,
    )


def _focus_group(
    result: StudyResult, focus: Focus, algorithm: AlgorithmIdentification
) -> PlanarROIMeasurementsAndQualitativeEvaluations:
    image = result.source_images[focus.phase]
    source_image = SourceImageForRegion(
        referenced_sop_class_uid=image.sop_class_uid,
        referenced_sop_instance_uid=image.sop_instance_uid,
        referenced_frame_numbers=None if image.frame_number is None else [image.frame_number],
    )
    # SCOORD pixel coordinates put (0, 0) at the top left corner of the top left pixel, so
    # the centre of pixel (row, col) is (col + 0.5, row + 0.5) as (column, row).
    region = ImageRegion(
        graphic_type=GraphicTypeValues.POINT,
        graphic_data=np.array([[focus.col + 0.5, focus.row + 0.5]]),
        source_image=source_image,
    )
    key = result.predicted
    return PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} {key} focus"
        ),
        referenced_region=region,
        finding_type=mibi_codes.CLASS_CODES[key],
        finding_sites=[
            FindingSite(
                anatomic_location=mibi_codes.FINDING_SITE,
                laterality=mibi_codes.LATERALITY[focus.side],
                topographical_modifier=mibi_codes.POLE.get(focus.pole),
            )
        ],
        algorithm_id=algorithm,
        measurements=[_fraction(mibi_codes.PROBABILITY, result.probabilities[key])],
    )


def _algorithm(result: StudyResult) -> AlgorithmIdentification:
    return AlgorithmIdentification(name=result.bundle_name, version=result.bundle_version)


def _fraction(name: Any, value: float) -> Measurement:
    return Measurement(name=name, value=float(value), unit=mibi_codes.NO_UNITS)
