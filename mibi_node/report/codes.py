"""The coded concepts of the MIBI Structured Report, in one place.

Every standard concept is taken from pydicom's code dictionary
(:data:`pydicom.sr.codedict.codes`, generated from DICOM PS3.16) so that the code meanings
are exactly those of the standard; the attribute used is named next to each constant. The
concepts that have no standard code (three of the result SR, those of the assessment SR)
come from the node's own coding scheme (:data:`CODING_SCHEME`, ``99MIBINODE``), which every
SR declares in its Coding Scheme Identification Sequence.

The class codes are SNOMED CT morphologies (adenoma, hyperplasia, ...); combined with the
Finding Site *Parathyroid* of each measurement group they read "parathyroid adenoma" and so
on, the usual TID 1501 pattern.
"""

from __future__ import annotations

import logging
from types import MappingProxyType

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "AGREEMENT",
    "AI_VALUE",
    "ASSESSMENT",
    "ASSESSMENT_DECISIONS",
    "ASSESSMENT_TITLE",
    "CLASS_CODES",
    "CODING_SCHEME",
    "COMMENT",
    "CORRECTED_VALUE",
    "DEVICE_NAME",
    "FINDING_SITE",
    "INFERIOR",
    "INTENDED_USE",
    "LATERALITY",
    "NO_UNITS",
    "NORMALISED_ENTROPY",
    "POLE",
    "PROBABILITY",
    "PROCEDURE_REPORTED",
    "QUALITATIVE_EVALUATIONS",
    "SERIES_DESCRIPTION",
    "SUPERIOR",
    "class_key",
    "coding_scheme_identification",
]

logger = logging.getLogger(__name__)

#: The Observer Context's device name and the prefix of every tracking identifier.
DEVICE_NAME = "mibi-node"

#: Series Description of the series the node's results go into.
SERIES_DESCRIPTION = "MIBI-NODE AI RESULT"

#: Finding type of each class, by the class key of :data:`mibi_node.inference.bundle.MIBI_CLASSES`.
CLASS_CODES: MappingProxyType[str, Code] = MappingProxyType(
    {
        "normal": codes.SCT.Normal,  # SCT 17621005 "Normal"
        "adenoma": codes.SCT.Adenoma,  # SCT 1187375007 "Adenoma"
        "hyperplasia": codes.SCT.Hyperplasia,  # SCT 76197007 "hyperplasia"
        "carcinoma": codes.SCT.Carcinoma,  # SCT 1187425009 "Carcinoma"
        "cyst": codes.SCT.Cyst,  # SCT 367643001 "Cyst"
    }
)

#: Finding Site of every group: SCT 111002 "Parathyroid" (``codes.SCT.Parathyroid``).
FINDING_SITE: Code = codes.SCT.Parathyroid

#: Laterality by the patient's side: SCT 24028007 "Right", SCT 7771000 "Left".
LATERALITY: MappingProxyType[str, Code] = MappingProxyType(
    {"right": codes.SCT.Right, "left": codes.SCT.Left}
)

#: SCT 264217000 "Superior" (``codes.SCT.Superior``): the upper pole of the thyroid bed.
SUPERIOR: Code = codes.SCT.Superior
#: SCT 261089000 "Inferior" (``codes.SCT.Inferior``): the lower pole.
INFERIOR: Code = codes.SCT.Inferior

#: Topographical modifier by :attr:`mibi_node.inference.result.Focus.pole` (ectopic: none).
POLE: MappingProxyType[str, Code] = MappingProxyType({"upper": SUPERIOR, "lower": INFERIOR})

#: DCM 122157 "Probability" (``codes.DCM.Probability``), the measurement of each class.
PROBABILITY: Code = codes.DCM.Probability

#: UCUM "1" "no units" (``codes.UCUM.NoUnits``), the unit of every fraction in the report.
NO_UNITS: Code = codes.UCUM.NoUnits

#: SCT 371572003 "Nuclear medicine procedure" (``codes.SCT.NuclearMedicineProcedure``).
PROCEDURE_REPORTED: Code = codes.SCT.NuclearMedicineProcedure

#: DCM 121106 "Comment" (``codes.DCM.Comment``): supersession notes and engine warnings.
COMMENT: Code = codes.DCM.Comment

#: TID 1500 row 12, the container of report-level TEXT items. highdicom's
#: ``MeasurementReport`` does not build it, so the code is spelled out (UMLS C0034375).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")

#: Designator of the node's private coding scheme (PS3.16 8.2: local schemes begin "99").
CODING_SCHEME = "99MIBINODE"

#: Fraction of ensemble members whose own most probable class is the predicted one.
AGREEMENT = Code("MN0001", CODING_SCHEME, "Ensemble member agreement")
#: Entropy of the fused probabilities divided by log(number of classes).
NORMALISED_ENTROPY = Code("MN0002", CODING_SCHEME, "Normalised entropy")
#: The TEXT item stating what the model may be used for.
INTENDED_USE = Code("MN0003", CODING_SCHEME, "Intended use")

# The radiologist's assessment of the AI findings (mibi_node.report.assessment). DICOM has
# no coded concepts yet for accepting, rejecting or correcting an AI result (IHE AIRA's are
# not in PS3.16 as the node's pydicom knows it), so these are local until it has.

#: Title of the assessment document (the root CONTAINER of its TID 1500 report).
ASSESSMENT_TITLE = Code("MNA001", CODING_SCHEME, "AI result assessment")
#: The CODE item of each assessed finding whose value is one of :data:`ASSESSMENT_DECISIONS`.
ASSESSMENT = Code("MNA002", CODING_SCHEME, "Assessment of AI finding")
#: The decision by :class:`~mibi_node.storage.models.VerdictDecision` value.
ASSESSMENT_DECISIONS: MappingProxyType[str, Code] = MappingProxyType(
    {
        "accepted": Code("MNA003", CODING_SCHEME, "AI finding accepted"),
        "rejected": Code("MNA004", CODING_SCHEME, "AI finding rejected"),
        "corrected": Code("MNA005", CODING_SCHEME, "AI finding corrected"),
    }
)
#: What the model said of the finding, as text ("adenoma", "present", "protrusion").
AI_VALUE = Code("MNA006", CODING_SCHEME, "AI value")
#: The reader's value of a corrected finding: a CODE where the AI result codes that value,
#: else TEXT.
CORRECTED_VALUE = Code("MNA007", CODING_SCHEME, "Corrected value")


def coding_scheme_identification() -> CodingSchemeIdentificationItem:
    """Return a new Coding Scheme Identification item declaring :data:`CODING_SCHEME`."""
    return CodingSchemeIdentificationItem(
        designator=CODING_SCHEME,
        name="mibi-node local codes",
        responsible_organization="mibi-node project",
    )


def class_key(code: Code | CodedConcept) -> str | None:
    """Return the class key a finding type code stands for, ``None`` when it is no class.

    Parameters
    ----------
    code
        A finding type as read back from an SR; compared by scheme designator and value.
    """
    for key, class_code in CLASS_CODES.items():
        if (
            code.value == class_code.value
            and code.scheme_designator == class_code.scheme_designator
        ):
            return key
    return None
