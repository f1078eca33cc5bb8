"""The radiologists' verdicts on a result's AI findings as a Structured Report for PACS.

IHE AI Result Assessment (AIRA) has the reader's acceptance, rejection or correction of each
AI finding go back to the archive as an SR that references the AI result. The node builds it
as a Comprehensive 3D SR, TID 1500 like the AI SR itself, in the same study and a series of
its own (docs/conformance.md says why this construction and which codes are local)::

    AI result assessment (TID 1500, title 99MIBINODE MNA001)
      Language, Observer Context: Person, Person Observer Name = each reader,
        Role in Procedure = Reviewer (NCIt C54634); Procedure Reported as the AI SR says
      Imaging Measurements
        Measurement Group (TID 1501) x one per assessed finding, Observation DateTime the
          verdict's time:
          Tracking Identifier and Tracking UID of the AI SR's group for the finding (the same
            finding, in TID 4108's sense), Finding = the AI SR's code for it,
          Assessment of AI finding (CODE MNA002) = accepted / rejected / corrected
            (MNA003-MNA005), [Corrected value (CODE MNA007) where the AI SR codes it],
          AI value (TEXT MNA006), [Corrected value (TEXT)], [Comment (TEXT DCM 121106)],
          Person Observer Name (PNAME DCM 121008, HAS OBS CONTEXT): who judged it
      Qualitative Evaluations: Comment (TEXT) x what the document assesses, and the earlier
        assessment it supersedes

The AI SR is the document's evidence (Current Requested Procedure Evidence Sequence), from
which the patient and study attributes are copied.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PersonObserverIdentifyingAttributes,
    PnameContentItem,
    QualitativeEvaluation,
    RelationshipTypeValues,
    TextContentItem,
    TrackingIdentifier,
)
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

import mibi_node
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    character_set,
    check_document_arguments,
    check_uid,
    comprehensive_3d_sr,
    detach_person_names,
    report_comments,
    separate_containers,
)

__all__ = [
    "ASSESSMENT_SERIES_OFFSET",
    "SERIES_DESCRIPTION",
    "FindingAssessment",
    "build_assessment_sr",
]

logger = logging.getLogger(__name__)

#: Added to the analysis' result Series Number for its assessment series: the results use
#: the number and the next two (SR, key image or SEG), so parathyroid's 9901 gives 9910.
ASSESSMENT_SERIES_OFFSET = 9

#: Series Description of the assessment series.
SERIES_DESCRIPTION = "MIBI-NODE AI ASSESSMENT"

# A Person Name component group holds at most 64 characters.
_MAX_NAME = 64


@dataclass(frozen=True)
class FindingAssessment:
    """One reader's verdict on one AI finding, as the assessment SR records it.

    Attributes
    ----------
    key
        The finding's key in its result (``diagnosis``, ``L4-L5``, ``lesion-2``).
    value
        What the model said of it (``adenoma``, ``present``).
    decision
        ``accepted``, ``rejected`` or ``corrected``.
    reader
        Who judged it.
    corrected
        The reader's value of a corrected finding.
    comment
        The reader's free text.
    assessed_at
        When the verdict was given (the group's Observation DateTime).
    """

    key: str
    value: str
    decision: str
    reader: str
    corrected: str | None = None
    comment: str | None = None
    assessed_at: datetime | None = None


@dataclass(frozen=True)
class _AIGroup:
    """A measurement group of the AI SR: what identifies a finding there."""

    identifier: str
    uid: str
    finding: CodedConcept | None
    words: tuple[str, ...]


def build_assessment_sr(
    ai_sr: Dataset,
    assessments: Sequence[FindingAssessment],
    *,
    series_number: int = 9901 + ASSESSMENT_SERIES_OFFSET,
    instance_number: int = 1,
    manufacturer: str = mibi_codes.DEVICE_NAME,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    predecessor: Dataset | None = None,
    institution_name: str | None = None,
) -> Comprehensive3DSR:
    """Build the SR that returns the readers' verdicts on the findings of ``ai_sr`` to PACS.

    Each finding is matched to the AI SR's measurement group whose Tracking Identifier names
    it: the words of the finding's key (``L4-L5`` -> ``l4 l5``) in a row among the
    identifier's words (``mibi-node spine L4-L5``); failing that, for a study's one finding
    (``diagnosis``), the words of its value (``mibi-node adenoma probability``). The
    assessment's group then carries that group's Tracking UID and Finding code; a finding
    without a group gets a new Tracking UID and its value as text only.

    Parameters
    ----------
    ai_sr
        The AI result SR the verdicts judge, as the node wrote it (a TID 1500 report).
    assessments
        The verdicts, one per finding, in the order the document lists them. The first one's
        reader is the document's first Person Observer.
    series_number, instance_number
        Positive integers; a later assessment of the same result takes the next instance
        number in the same series.
    manufacturer
        Manufacturer of the device that writes the document (General Equipment).
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.
    predecessor
        The earlier assessment of the same result that this one supersedes (Predecessor
        Documents Sequence, and a comment saying so).
    institution_name
        Institution Name of the creating site, if known.

    Raises
    ------
    TypeError
        An argument has the wrong type.
    ValueError
        ``ai_sr`` is no SR of a study or reports no procedure, an assessment is incomplete
        (no key, value or reader, an unknown decision, a correction without its value) or
        judges a finding twice, or the predecessor belongs to another study.
    """
    _check_ai_sr(ai_sr)
    _check_assessments(assessments)
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if sop_instance_uid is not None:
        check_uid(sop_instance_uid, "sop_instance_uid")
    if not isinstance(manufacturer, str) or not manufacturer:
        raise ValueError('Argument "manufacturer" should be a non-empty string.')
    if predecessor is not None:
        _check_predecessor(predecessor, ai_sr)

    groups = list(_ai_groups(ai_sr.ContentSequence))
    comments = [_subject(ai_sr, assessments), *report_comments(predecessor, ())]
    report = MeasurementReport(
        observation_context=ObservationContext(
            observer_person_context=_person_observer(assessments[0].reader)
        ),
        procedure_reported=_procedures_reported(ai_sr),
        imaging_measurements=[_group(a, groups) for a in assessments],
        title=mibi_codes.ASSESSMENT_TITLE,
    )
    root = report[0].ContentSequence
    # Further readers are further Person Observers of the document (TID 1002 is 1-n);
    # they go right after the first one, before Procedure Reported.
    position = 1 + max(
        index for index, item in enumerate(root) if item.RelationshipType == "HAS OBS CONTEXT"
    )
    for reader in reversed(_readers(assessments)[1:]):
        root[position:position] = _person_observer(reader)
    root.append(_qualitative_evaluations(comments))
    separate_containers(report)

    texts = [
        manufacturer,
        institution_name or "",
        *comments,
        *(
            text
            for a in assessments
            for text in (a.reader, a.value, a.corrected or "", a.comment or "")
        ),
    ]
    sr = comprehensive_3d_sr(
        report,
        [ai_sr],
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
        series_description=SERIES_DESCRIPTION,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        software_versions=mibi_node.__version__,
        coding_schemes=[mibi_codes.coding_scheme_identification()],
        specific_character_set=character_set(ai_sr.get("SpecificCharacterSet"), texts),
    )
    detach_person_names(sr)
    logger.debug(
        "assessment %s of SR %s: %d finding(s)",
        sr.SOPInstanceUID,
        ai_sr.SOPInstanceUID,
        len(assessments),
    )
    return sr


# -- checks ---------------------------------------------------------------------------------


def _check_ai_sr(ai_sr: object) -> None:
    if not isinstance(ai_sr, Dataset):
        raise TypeError('Argument "ai_sr" should be a pydicom Dataset.')
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not ai_sr.get(keyword):
            raise ValueError(f'Argument "ai_sr" has no {keyword}.')
    if ai_sr.get("Modality") != "SR" or "ContentSequence" not in ai_sr:
        raise ValueError('Argument "ai_sr" is not a Structured Report.')


def _check_assessments(assessments: object) -> None:
    if isinstance(assessments, FindingAssessment) or not isinstance(assessments, Sequence):
        raise TypeError('Argument "assessments" should be a sequence of FindingAssessment.')
    if not assessments:
        raise ValueError('Argument "assessments" should hold at least one verdict.')
    seen = set()
    for index, item in enumerate(assessments):
        where = f'Item {index} of argument "assessments"'
        if not isinstance(item, FindingAssessment):
            raise TypeError(f"{where} is not a FindingAssessment.")
        for name in ("key", "value", "reader"):
            if not isinstance(getattr(item, name), str) or not getattr(item, name).strip():
                raise ValueError(f"{where} has no {name}.")
        if item.decision not in mibi_codes.ASSESSMENT_DECISIONS:
            known = ", ".join(mibi_codes.ASSESSMENT_DECISIONS)
            raise ValueError(f"{where} has decision {item.decision!r}, not one of {known}.")
        if (item.decision == "corrected") != bool(item.corrected):
            raise ValueError(f"{where} should give a corrected value exactly when corrected.")
        if item.key in seen:
            raise ValueError(f'Argument "assessments" judges finding {item.key!r} twice.')
        seen.add(item.key)


def _check_predecessor(predecessor: object, ai_sr: Dataset) -> None:
    if not isinstance(predecessor, Dataset):
        raise TypeError('Argument "predecessor" should be a pydicom Dataset.')
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not predecessor.get(keyword):
            raise ValueError(f'Argument "predecessor" has no {keyword}.')
    if predecessor.StudyInstanceUID != ai_sr.StudyInstanceUID:
        raise ValueError(
            f'Argument "predecessor" belongs to study {predecessor.StudyInstanceUID}, '
            f"not to the AI SR's study {ai_sr.StudyInstanceUID}."
        )


# -- the AI SR ------------------------------------------------------------------------------


def _walk(items: Sequence[Dataset]) -> Iterator[Dataset]:
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _is(item: Dataset, code: object) -> bool:
    names = item.get("ConceptNameCodeSequence")
    if not names:
        return False
    name = names[0]
    return bool(
        name.CodeValue == code.value  # type: ignore[attr-defined]
        and name.CodingSchemeDesignator == code.scheme_designator  # type: ignore[attr-defined]
    )


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.lower().replace("-", " ").replace("_", " ").split())


def _ai_groups(content: Sequence[Dataset]) -> Iterator[_AIGroup]:
    """The AI SR's measurement groups with a tracking identifier and UID, in document order."""
    for item in _walk(content):
        if item.get("ValueType") != "CONTAINER" or not _is(item, codes.DCM.MeasurementGroup):
            continue
        identifier = uid = None
        finding = None
        for child in item.get("ContentSequence", []):
            if _is(child, codes.DCM.TrackingIdentifier):
                identifier = str(child.TextValue)
            elif _is(child, codes.DCM.TrackingUniqueIdentifier):
                uid = str(child.UID)
            elif _is(child, codes.DCM.Finding) and child.get("ConceptCodeSequence"):
                finding = CodedConcept.from_dataset(child.ConceptCodeSequence[0])
        if identifier and uid:
            yield _AIGroup(identifier, uid, finding, _words(identifier))


def _match(groups: Sequence[_AIGroup], text: str) -> _AIGroup | None:
    """The group whose identifier has the words of ``text`` in a row: the first such group
    that holds the finding's probability (``... probability``) where there is one (the class
    is what a verdict judges; the SR also has a focus group of the predicted class), else the
    first such group."""
    wanted = _words(text)
    if not wanted:
        return None
    size = len(wanted)
    found = [
        group
        for group in groups
        if any(group.words[i : i + size] == wanted for i in range(len(group.words) - size + 1))
    ]
    return next((g for g in found if "probability" in g.words), found[0] if found else None)


def _procedures_reported(ai_sr: Dataset) -> list[CodedConcept]:
    procedures = [
        CodedConcept.from_dataset(item.ConceptCodeSequence[0])
        for item in ai_sr.ContentSequence
        if _is(item, codes.DCM.ProcedureReported) and item.get("ConceptCodeSequence")
    ]
    if not procedures:
        raise ValueError('Argument "ai_sr" reports no procedure (TID 1500 "Procedure reported").')
    return procedures


# -- content --------------------------------------------------------------------------------


def _person_name(reader: str) -> str:
    """``reader`` as a Person Name: the family name component unless it has carets."""
    name = " ".join(reader.replace("\\", " ").replace("=", " ").split())[:_MAX_NAME]
    return name if "^" in name else f"{name}^"


def _person_observer(reader: str) -> ObserverContext:
    return ObserverContext(
        observer_type=codes.DCM.Person,
        observer_identifying_attributes=PersonObserverIdentifyingAttributes(
            name=_person_name(reader), role_in_procedure=codes.NCIt.Reviewer
        ),
    )


def _readers(assessments: Sequence[FindingAssessment]) -> list[str]:
    return list(dict.fromkeys(_person_name(a.reader) for a in assessments))


def _group(
    assessment: FindingAssessment, groups: Sequence[_AIGroup]
) -> MeasurementsAndQualitativeEvaluations:
    found = _match(groups, assessment.key)
    if found is None and assessment.key in ("diagnosis", "predicted"):
        found = _match(groups, assessment.value)
    corrected_code = None
    if assessment.corrected:
        named = _match(groups, assessment.corrected)
        corrected_code = None if named is None else named.finding
    evaluations = [
        QualitativeEvaluation(
            mibi_codes.ASSESSMENT, mibi_codes.ASSESSMENT_DECISIONS[assessment.decision]
        )
    ]
    if corrected_code is not None:
        evaluations.append(QualitativeEvaluation(mibi_codes.CORRECTED_VALUE, corrected_code))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=found.uid if found else generate_uid(),
            identifier=found.identifier if found else f"{mibi_codes.DEVICE_NAME} {assessment.key}",
        ),
        finding_type=found.finding if found else None,
        qualitative_evaluations=evaluations,
    )
    container = group[0]
    texts = [(mibi_codes.AI_VALUE, assessment.value)]
    if assessment.corrected and corrected_code is None:
        texts.append((mibi_codes.CORRECTED_VALUE, assessment.corrected))
    if assessment.comment:
        texts.append((mibi_codes.COMMENT, assessment.comment))
    container.ContentSequence.extend(
        TextContentItem(name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS)
        for name, value in texts
    )
    container.ContentSequence.append(
        PnameContentItem(
            name=codes.DCM.PersonObserverName,
            value=_person_name(assessment.reader),
            relationship_type=RelationshipTypeValues.HAS_OBS_CONTEXT,
        )
    )
    when = assessment.assessed_at
    if when is not None:
        # With its UTC offset where known (a DT without one is the local time).
        container.ObservationDateTime = when.strftime(
            "%Y%m%d%H%M%S%z" if when.tzinfo is not None else "%Y%m%d%H%M%S"
        )
    return group


def _subject(ai_sr: Dataset, assessments: Sequence[FindingAssessment]) -> str:
    counts = {
        decision: sum(a.decision == decision for a in assessments)
        for decision in mibi_codes.ASSESSMENT_DECISIONS
    }
    tally = ", ".join(f"{n} {decision}" for decision, n in counts.items() if n)
    return (
        f"Radiologist assessment of the AI findings of mibi-node report {ai_sr.SOPInstanceUID} "
        f"({tally})."
    )


def _qualitative_evaluations(comments: Sequence[str]) -> ContainerContentItem:
    container = ContainerContentItem(
        name=mibi_codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=mibi_codes.COMMENT,
                value=comment,
                relationship_type=RelationshipTypeValues.CONTAINS,
            )
            for comment in comments
        ]
    )
    return container
