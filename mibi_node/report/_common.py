"""Checks and helpers shared by the SR and the key image: validate at the boundary."""

from __future__ import annotations

import json
import logging
import math
import re
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from highdicom import ContributingEquipment
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import (
    CodedConcept,
    Comprehensive3DSR,
    ContainerContentItem,
    ContentSequence,
    DeviceObserverIdentifyingAttributes,
    ObserverContext,
    RelationshipTypeValues,
    TextContentItem,
)
from highdicom.valuerep import _check_specific_character_set
from pydicom.charset import python_encoding
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID

import mibi_node
from mibi_node.imaging.volume import Volume
from mibi_node.inference.result import StudyResult
from mibi_node.report import codes as mibi_codes

__all__ = [
    "DEMONSTRATION_DISCLAIMER",
    "IHE_CODING_SCHEME",
    "PROCESSING_ALGORITHM",
    "algorithm_device_uid",
    "algorithm_equipment",
    "character_set",
    "check_document_arguments",
    "check_positive",
    "check_predecessor",
    "check_result",
    "check_sources",
    "check_uid",
    "check_volume_sources",
    "coding_schemes",
    "comprehensive_3d_sr",
    "detach_person_names",
    "device_observer",
    "intended_use_text",
    "qualitative_evaluations",
    "report_comments",
    "separate_containers",
]

logger = logging.getLogger(__name__)

#: The words every SR of a demonstration bundle carries, exactly.
DEMONSTRATION_DISCLAIMER = (
    "Demonstration model trained on synthetic phantoms. Not for diagnostic use."
)

_CLINICAL_USE = (
    "Computer-assisted classification of parathyroid 99mTc-sestamibi scintigraphy "
    "(normal, adenoma, hyperplasia, carcinoma, cyst). The result supports, and does not "
    "replace, the reading physician."
)

# Patient and study attributes highdicom reads from the first evidence dataset without a
# default; absent Type 2 attributes are given empty values (in a copy) so that a source
# missing one still yields an SR.
_TYPE2_HEADER = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
)

_PROBABILITY_TOLERANCE = 1e-4

# Source positions may differ from a volume's by rounding (DS has 16 characters).
_POSITION_TOLERANCE_MM = 1e-3

# PS3.5 9.1: dot-separated numbers without leading zeros, at most 64 characters.
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")

#: Designator of IHE's coding scheme for codes a profile needs before DICOM has them.
IHE_CODING_SCHEME = "99IHE"

#: Purpose of Reference of the algorithm's Contributing Equipment item, as IHE AI Results
#: (AIR) Rev 1.1, 6.5.3.1 asks: (Newcode1, 99IHE, "Processing Algorithm"). DICOM CID 7005
#: (pydicom 3.0.2's PS3.16) has no such purpose yet; CID 7005 is extensible.
PROCESSING_ALGORITHM = CodedConcept("Newcode1", IHE_CODING_SCHEME, "Processing Algorithm")

# The namespace of the algorithms' Device UIDs: the UUID of the node's Implementation Class
# UID (a 2.25 UID), so that no other product's name-based UUIDs can collide with them.
_ALGORITHM_NAMESPACE = uuid.UUID(int=int(mibi_node.IMPLEMENTATION_CLASS_UID.split(".")[-1]))


def intended_use_text(intended_use: str, clinical: str = _CLINICAL_USE) -> str:
    """Return the sentence the SR states for a bundle's intended use.

    Parameters
    ----------
    intended_use
        ``"demonstration"`` or ``"clinical"``, as in the bundle manifest.
    clinical
        The analysis' own sentence for a clinical bundle (default: the parathyroid one).
    """
    if intended_use == "demonstration":
        return DEMONSTRATION_DISCLAIMER
    if intended_use == "clinical":
        return clinical
    raise ValueError(
        f'Argument "intended_use" should be "demonstration" or "clinical", not {intended_use!r}.'
    )


def check_result(result: StudyResult) -> None:
    """Raise unless ``result`` is a consistent StudyResult the report can encode."""
    if not isinstance(result, StudyResult):
        raise TypeError('Argument "result" should be a StudyResult.')
    unknown = [key for key in result.probabilities if key not in mibi_codes.CLASS_CODES]
    if unknown:
        raise ValueError(f'Argument "result" has probabilities for unknown classes: {unknown}.')
    if not result.probabilities:
        raise ValueError('Argument "result" has no probabilities.')
    values = list(result.probabilities.values())
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values):
        raise ValueError('Argument "result" has a probability outside [0, 1].')
    if abs(math.fsum(values) - 1.0) > _PROBABILITY_TOLERANCE:
        raise ValueError(
            f'Argument "result" has probabilities that sum to {math.fsum(values):.6f}, not 1.'
        )
    if result.predicted not in result.probabilities:
        raise ValueError(
            f'Argument "result" predicts "{result.predicted}", which has no probability.'
        )
    for name, value in (
        ("agreement", result.agreement),
        ("normalised_entropy", result.normalised_entropy),
    ):
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise ValueError(f'Argument "result" has {name} {value} outside [0, 1].')
    if not result.bundle_name or not result.bundle_version:
        raise ValueError('Argument "result" should name its bundle (name and version).')
    if not result.source_images:
        raise ValueError('Argument "result" has no source images.')
    if result.focus is not None:
        if result.focus.phase not in result.source_images:
            raise ValueError(
                f'Argument "result" has a focus on the {result.focus.phase} image, '
                "which is not among its source images."
            )
        if result.focus.side not in mibi_codes.LATERALITY:
            raise ValueError(f'Argument "result" has a focus on side "{result.focus.side}".')
        if result.focus.pole not in ("upper", "lower", "ectopic"):
            raise ValueError(f'Argument "result" has a focus at pole "{result.focus.pole}".')
    intended_use_text(result.intended_use)


def check_sources(sources: Sequence[Dataset], result: StudyResult) -> list[Dataset]:
    """Check the source headers against ``result``; return them as evidence.

    The first header is copied with empty values for absent Type 2 patient/study
    attributes, which highdicom reads without a default.
    """
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError('Argument "sources" should be a sequence of pydicom Datasets.')
    if not sources:
        raise ValueError('Argument "sources" should hold at least one dataset.')
    for index, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Item {index} of argument "sources" is not a pydicom Dataset.')
        for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
            if not ds.get(keyword):
                raise ValueError(f'Item {index} of argument "sources" has no {keyword}.')
        if not all(keyword in ds for keyword in ("Modality", "Rows", "Columns")):
            raise ValueError(
                f'Item {index} of argument "sources" is not an image '
                "(the image library needs its Modality, Rows and Columns)."
            )
        if ds.StudyInstanceUID != result.study_instance_uid:
            raise ValueError(
                f'Item {index} of argument "sources" belongs to study {ds.StudyInstanceUID}, '
                f"not to the result's study {result.study_instance_uid}."
            )
    by_uid: Mapping[str, Dataset] = {ds.SOPInstanceUID: ds for ds in sources}
    if len(by_uid) != len(sources):
        raise ValueError('Argument "sources" holds an instance twice.')
    for name, image in result.source_images.items():
        header = by_uid.get(image.sop_instance_uid)
        if header is None:
            raise ValueError(
                f'Argument "sources" lacks the {name} image {image.sop_instance_uid} '
                "the result was computed from."
            )
        frames = int(header.get("NumberOfFrames") or 1)
        if image.frame_number is not None and not 1 <= image.frame_number <= frames:
            raise ValueError(
                f'Argument "result" uses frame {image.frame_number} of the {name} image, '
                f"which has {frames} frame(s)."
            )
    focus = result.focus
    if focus is not None:
        header = by_uid[result.source_images[focus.phase].sop_instance_uid]
        rows, columns = int(header.Rows), int(header.Columns)
        if not (-0.5 <= focus.row <= rows - 0.5 and -0.5 <= focus.col <= columns - 0.5):
            raise ValueError(
                f'Argument "result" has a focus at row {focus.row}, column {focus.col}, '
                f"outside the {rows} x {columns} {focus.phase} image."
            )
    return [with_type2_header(sources[0]), *sources[1:]]


def check_volume_sources(
    volume: Volume, study_instance_uid: str, sources: Sequence[Dataset]
) -> list[Dataset]:
    """Check ``sources`` against a result's ``volume``; return its slices' headers in order.

    For the analyses whose result lies on the grid of a source series (a SEG's frames are
    its slices): ``study_instance_uid`` is the result's study.

    ``sources`` may list the slices in any order and hold other instances of the study,
    which are ignored. The first header returned has empty Type 2 patient/study attributes
    where the file lacks them (highdicom reads them without a default).

    Raises
    ------
    TypeError
        ``sources`` is not a sequence of pydicom Datasets.
    ValueError
        A slice of the volume is missing (named by its index and SOP Instance UID), or a
        header does not match its slice (study, SOP class, size, position, frames).
    """
    if isinstance(sources, Dataset) or not isinstance(sources, Sequence):
        raise TypeError('Argument "sources" should be a sequence of pydicom Datasets.')
    by_uid: dict[str, Dataset] = {}
    for index, ds in enumerate(sources):
        if not isinstance(ds, Dataset):
            raise TypeError(f'Item {index} of argument "sources" is not a pydicom Dataset.')
        uid = str(ds.get("SOPInstanceUID", ""))
        if uid in by_uid:
            raise ValueError(f'Argument "sources" holds instance {uid} twice.')
        by_uid[uid] = ds
    _, rows, columns = volume.shape
    headers: list[Dataset] = []
    for k, ref in enumerate(volume.slices):
        found = by_uid.get(ref.sop_instance_uid)
        if found is None:
            raise ValueError(
                f'Argument "sources" lacks slice {k} ({ref.sop_instance_uid}) of the volume '
                "the result was computed from."
            )
        ds = found
        where = f'Argument "sources" has slice {k} ({ref.sop_instance_uid})'
        if str(ds.get("StudyInstanceUID", "")) != study_instance_uid:
            raise ValueError(f"{where} in another study than the result's.")
        if str(ds.get("SOPClassUID", "")) != ref.sop_class_uid:
            raise ValueError(f"{where} with SOP class {ds.get('SOPClassUID')}.")
        if int(ds.get("NumberOfFrames") or 1) != 1:
            raise ValueError(f"{where} with several frames; the volume has one per instance.")
        if (int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) != (rows, columns):
            raise ValueError(
                f"{where} of {ds.get('Rows')} x {ds.get('Columns')} pixels, "
                f"not the volume's {rows} x {columns}."
            )
        for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if keyword not in ds:
                raise ValueError(f"{where} without {keyword}.")
        position = np.asarray([float(v) for v in ds.ImagePositionPatient])
        if np.abs(position - np.asarray(ref.position)).max() > _POSITION_TOLERANCE_MM:
            raise ValueError(
                f"{where} at {position.tolist()}, not at the volume's {list(ref.position)}."
            )
        headers.append(ds)
    return [with_type2_header(headers[0]), *headers[1:]]


def with_type2_header(ds: Dataset) -> Dataset:
    """Return ``ds``, or a pixel-less copy with absent Type 2 header attributes empty."""
    missing = [keyword for keyword in _TYPE2_HEADER if keyword not in ds]
    if not missing:
        return ds
    header = Dataset()
    for element in ds:
        if element.tag.group != 0x7FE0:
            header.add(element)
    for keyword in missing:
        setattr(header, keyword, None)
    logger.debug("source %s lacks %s; the SR leaves them empty", ds.SOPInstanceUID, missing)
    return header


def check_predecessor(predecessor: Dataset, result: StudyResult) -> None:
    """Raise unless ``predecessor`` identifies an instance of the result's study."""
    if not isinstance(predecessor, Dataset):
        raise TypeError('Argument "predecessor" should be a pydicom Dataset.')
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID"):
        if not predecessor.get(keyword):
            raise ValueError(f'Argument "predecessor" has no {keyword}.')
    if predecessor.StudyInstanceUID != result.study_instance_uid:
        raise ValueError(
            f'Argument "predecessor" belongs to study {predecessor.StudyInstanceUID}, '
            f"not to the result's study {result.study_instance_uid}."
        )


def comprehensive_3d_sr(
    content: ContentSequence, evidence: Sequence[Dataset], **kwargs: Any
) -> Comprehensive3DSR:
    """Return the Comprehensive 3D SR of ``content`` and ``evidence``, without highdicom's
    second pass over the content tree.

    The document is the one ``Comprehensive3DSR(evidence=evidence, content=content, ...)``
    makes, element for element. That constructor deep-copies the whole tree, parses the copy
    back into content items (for its ``content`` property) and walks it for references to
    instances missing from ``evidence``: 50 of the 80 ms a parathyroid SR of some 250 items
    took to build, more than the templates that made the tree. Here it gets the root
    container with an empty Content Sequence; the tree is attached after, and ``content`` is
    the tree itself. The walk is not needed: the callers reference only instances of
    ``evidence`` (:func:`check_sources` makes sure of it), and every evidence instance is
    listed in the Current Requested Procedure Evidence Sequence either way.

    Parameters
    ----------
    content
        The document's content: a template (e.g. a TID 1500 ``MeasurementReport``) whose
        one item is the root CONTAINER.
    evidence
        Headers of the instances the content references, as for highdicom.
    **kwargs
        The other arguments of :class:`highdicom.sr.Comprehensive3DSR`.
    """
    if len(content) != 1 or not isinstance(content[0], ContainerContentItem):
        raise ValueError('Argument "content" should hold one item, the root CONTAINER.')
    root = content[0]
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = []
    sr = Comprehensive3DSR(evidence=evidence, content=shell, **kwargs)
    sr["ContentSequence"] = root["ContentSequence"]
    # What highdicom keeps for the ``content`` property (its own parsed copy otherwise).
    sr._content = ContentSequence([root], is_root=True)
    return sr


def check_uid(value: object, name: str) -> None:
    """Raise unless ``value`` is a valid UID (``name`` is the argument's name)."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
        raise ValueError(f'Argument "{name}" should be a valid DICOM UID, not {value!r}.')


def character_set(source: object, texts: Iterable[str]) -> str | list[str] | None:
    """Return the Specific Character Set to write: the source's, unless our text needs more.

    Text the node adds (manufacturer, bundle name, comments) may hold characters the source's
    character set cannot encode; then the instance is written in UTF-8 (``ISO_IR 192``), and
    pydicom re-encodes the copied patient and study attributes.
    """
    text = "".join(texts)
    if source is not None and source != "" and not _writable(source):
        # A value highdicom does not write (e.g. ``\\ISO 2022 IR 87``, Japanese with an empty
        # first value, or a lone code extension): UTF-8 holds every character of the source.
        return "ISO_IR 192"
    if text.isascii():
        return source  # type: ignore[return-value]
    if isinstance(source, str) and source:
        codec = python_encoding.get(source)
        if codec is not None:
            try:
                text.encode(codec)
            except UnicodeEncodeError:
                pass
            else:
                return source
    return "ISO_IR 192"


def _writable(source: object) -> bool:
    """Whether highdicom accepts ``source`` as the Specific Character Set it writes.

    Asks highdicom's own check (private, but the rule it enforces when building is exactly
    the one that matters here), so the two cannot disagree.
    """
    values = [source] if isinstance(source, str) else list(source)  # type: ignore[call-overload]
    try:
        _check_specific_character_set(values[0] if len(values) == 1 else values)
    except (ValueError, TypeError):
        return False
    return True


def check_positive(value: object, name: str) -> None:
    """Raise unless ``value`` is a positive integer (``name`` is the argument's name)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f'Argument "{name}" should be a positive integer.')


def check_document_arguments(
    series_number: object,
    instance_number: object,
    *,
    series_instance_uid: object = None,
    device_uid: object = None,
    institution_name: object = None,
) -> None:
    """The checks every document builder makes of its header arguments.

    Series and Instance Number must be positive integers; a Series Instance UID or a Device
    Observer UID, where given, a valid UID; an Institution Name, where given, a string. A
    builder that needs its ``device_uid`` checks it itself.
    """
    check_positive(series_number, "series_number")
    check_positive(instance_number, "instance_number")
    if series_instance_uid is not None:
        check_uid(series_instance_uid, "series_instance_uid")
    if device_uid is not None:
        check_uid(device_uid, "device_uid")
    if institution_name is not None and not isinstance(institution_name, str):
        raise TypeError('Argument "institution_name" should be a string.')


def detach_person_names(ds: Dataset) -> None:
    """Give ``ds`` its own copies of the top-level person names copied from a source.

    pydicom caches a name's encoded bytes on the ``PersonName`` object the first time it is
    written; a name object shared with the source (or with another instance written in a
    different character set) would then be written with the wrong bytes.
    """
    for element in list(ds):
        if element.VR != "PN" or element.value is None:
            continue
        if isinstance(element.value, MultiValue | list):
            value: object = [str(name) for name in element.value]
        else:
            value = str(element.value)
        ds[element.tag] = DataElement(element.tag, "PN", value)


def qualitative_evaluations(intended_use: str, comments: Sequence[str]) -> ContainerContentItem:
    """The report's Qualitative Evaluations container: the intended-use text, then each
    comment, as TEXT items (every analysis' SR closes with it)."""
    container = ContainerContentItem(
        name=mibi_codes.QUALITATIVE_EVALUATIONS,
        relationship_type=RelationshipTypeValues.CONTAINS,
        is_content_continuous=False,
    )
    container.ContentSequence = ContentSequence(
        [
            TextContentItem(
                name=name, value=value, relationship_type=RelationshipTypeValues.CONTAINS
            )
            for name, value in (
                (mibi_codes.INTENDED_USE, intended_use),
                *((mibi_codes.COMMENT, comment) for comment in comments),
            )
        ]
    )
    return container


def separate_containers(content: Iterable[Dataset]) -> None:
    """Mark every CONTAINER in ``content``'s tree SEPARATE (its items are not one text)."""
    for item in content:
        if item.ValueType == "CONTAINER":
            item.ContinuityOfContent = "SEPARATE"
        separate_containers(item.get("ContentSequence", []))


def device_observer(
    device_uid: str,
    bundle_name: str,
    bundle_version: str,
    manufacturer: str = mibi_codes.DEVICE_NAME,
) -> ObserverContext:
    """The report's observer: the node as a device (TID 1004), the bundle as its model
    name and the bundle version as its serial number."""
    return ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=device_uid,
            name=mibi_codes.DEVICE_NAME,
            manufacturer_name=manufacturer,
            model_name=bundle_name,
            serial_number=bundle_version,
        ),
    )


def algorithm_device_uid(
    name: str, version: str, manufacturer: str = mibi_codes.DEVICE_NAME
) -> UID:
    """The Device UID of one version of an algorithm (a bundle), the same wherever it runs.

    A name-based UUID (RFC 4122 version 5, SHA-1) of the manufacturer, the bundle name and
    the bundle version, written as a ``2.25`` UID (PS3.5 B.2): the same bundle version
    always gets the same UID, any other version (or bundle) another one. (pydicom's
    ``generate_uid(prefix=None, entropy_srcs=...)`` ignores its sources and draws a random
    UUID, so it cannot serve.)

    Parameters
    ----------
    name, version
        The bundle's name and version, as its manifest gives them.
    manufacturer
        Who makes the algorithm: the node's project for every bundle it trains.
    """
    for argument, value in (("name", name), ("version", version), ("manufacturer", manufacturer)):
        if not isinstance(value, str):
            raise TypeError(f'Argument "{argument}" should be a string.')
        if not value:
            raise ValueError(f'Argument "{argument}" should be a non-empty string.')
    identity = json.dumps([manufacturer, name, version], ensure_ascii=False)
    return UID(f"2.25.{uuid.uuid5(_ALGORITHM_NAMESPACE, identity).int}")


def algorithm_equipment(
    name: str, version: str, manufacturer: str = mibi_codes.DEVICE_NAME
) -> ContributingEquipment:
    """The Contributing Equipment item that names the algorithm, as IHE AIR asks.

    Purpose of Reference :data:`PROCESSING_ALGORITHM`, Manufacturer ``manufacturer``,
    Manufacturer's Model Name the bundle name, Software Versions the bundle version and
    Device UID :func:`algorithm_device_uid`. Every SR, SEG and key image the node writes
    carries it; highdicom adds its own item (Processing Equipment) after it.

    Parameters
    ----------
    name, version
        The bundle's name and version.
    manufacturer
        Who makes the algorithm (the node's project).
    """
    uid = algorithm_device_uid(name, version, manufacturer)
    # highdicom's class accepts only the DICOM purposes of CID 7005; its checks of the other
    # values still apply, and the purpose is then replaced by AIR's.
    item = ContributingEquipment(
        manufacturer=manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=name,
        software_versions=version,
        contribution_description="AI algorithm (model bundle) that computed the result",
    )
    item.PurposeOfReferenceCodeSequence = [PROCESSING_ALGORITHM]
    item.DeviceUID = uid
    return item


def coding_schemes(*, local: bool = True) -> list[CodingSchemeIdentificationItem]:
    """The Coding Scheme Identification items of a document: the node's local scheme
    (``99MIBINODE``, unless ``local`` is false: a document without local codes) and IHE's
    (``99IHE``, of the algorithm's Purpose of Reference, in every document)."""
    ihe = CodingSchemeIdentificationItem(
        designator=IHE_CODING_SCHEME,
        name="IHE placeholder codes",
        responsible_organization="IHE International",
    )
    return [mibi_codes.coding_scheme_identification(), ihe] if local else [ihe]


def report_comments(predecessor: Dataset | None, warnings: Iterable[str]) -> list[str]:
    """The report's Comment texts: that it supersedes ``predecessor`` (if any), then the
    result's warnings."""
    comments = (
        []
        if predecessor is None
        else [
            "This report supersedes the earlier mibi-node report "
            f"{predecessor.SOPInstanceUID}, which should no longer be used."
        ]
    )
    return [*comments, *warnings]
