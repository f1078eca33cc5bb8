"""The lung analysis' SR (TID 1500, one volumetric group per lesion) and its key image.

Structure (highdicom ``Comprehensive3DSR``, same study as the CT series, new series)::

    Imaging Measurement Report (TID 1500)
      Language, Observer Context (device "mibi-node"), Procedure Reported LN 24627-2
      Image Library (TID 1600): the source slices that hold a lesion voxel
      Imaging Measurements
        Measurement Group (TID 1411) x one per lesion, by number (= decreasing probability)
          Tracking Identifier "mibi-node lung lesion <n>", Tracking UID = the segment's
          Referenced Segment: the SEG's instance and Segment Number n, the source slices
          Finding = the class (SCT 1217294009 Ground glass opacity, SCT 12295008
            Bronchiectasis)
          Finding Site = SCT 39607008 Lung (or the lobe, when known), laterality = its side
          Algorithm Identification (bundle name and version)
          Probability (DCM 122157, UCUM 1): the detector's lesion score
          Volume (SCT 118565006, UCUM mm3)
          Attenuation Coefficient (DCM 112031, UCUM [hnsf'U]), derivation SCT 373098007 Mean
          Long Axis (SCT 103339001, UCUM mm): the longest in-plane diameter on its key slice
        Measurement Group (TID 1501), for the classes with no lesion
          Tracking Identifier "mibi-node lung not found", Tracking UID
          Finding Site = Lung
          Algorithm Identification
          <the class> (CODE) = SCT 272519000 Absent, x every class not found
      Qualitative Evaluations (TID 1500 row 12)
        Intended use (TEXT)
        Comment (TEXT) x "No lesion found." when none, supersession note, the warnings

The probability is the class' probability of the lesion the group describes, so it needs no
finding modifier (the spine's per-class probabilities do). Codes: from pydicom's PS3.16
dictionary except the two classes (see :mod:`~mibi_node.analyses.lung.seg`) and the
procedure, LOINC 24627-2 "CT Chest" (LOINC/RSNA Radiology Playbook, not in PS3.16).

The key image (:func:`build_lung_key_image`) is the key slice of the largest lesion in a lung
window, every lesion on it outlined in its class' colour with its number, and a text panel
listing the findings; the SR stays the authoritative result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from highdicom.sc import SCImage
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
    TrackingIdentifier,
    VolumetricROIMeasurementsAndQualitativeEvaluations,
)
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage, SegmentationStorage, generate_uid
from scipy import ndimage

import mibi_node
from mibi_node.analyses.base import EncodeContext
from mibi_node.analyses.lung.labels import CLASS_NAMES, CLASSES
from mibi_node.analyses.lung.result import LesionFinding, LungResult
from mibi_node.analyses.lung.seg import (
    ANATOMIC_REGION,
    CLASS_CODES,
    CLASS_COLOURS,
    LOBE_CODES,
    build_lung_seg,
    check_lung_result,
    check_lung_sources,
    lung_intended_use_text,
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
from mibi_node.report.keyimage import (
    panel_font,
    patient_orientation,
    secondary_capture,
    wrap_text,
)

__all__ = [
    "KEY_IMAGE_SERIES_DESCRIPTION",
    "LUNG_WINDOW",
    "NO_LESION_FOUND",
    "PROCEDURE_REPORTED",
    "SERIES_DESCRIPTION",
    "build_lung_documents",
    "build_lung_key_image",
    "build_lung_sr",
    "key_image_series_instance_uid",
    "lung_key_image_caption",
    "seg_series_instance_uid",
]

logger = logging.getLogger(__name__)

#: LOINC 24627-2 "CT Chest" (LOINC/RSNA Radiology Playbook).
PROCEDURE_REPORTED = Code("24627-2", "LN", "CT Chest")

#: SCT 118565006 "Volume" (``codes.SCT.Volume``).
VOLUME: Code = codes.SCT.Volume
#: DCM 112031 "Attenuation Coefficient" (``codes.DCM.AttenuationCoefficient``), in HU.
ATTENUATION: Code = codes.DCM.AttenuationCoefficient
#: SCT 373098007 "Mean" (``codes.SCT.Mean``): the attenuation's derivation.
MEAN: Code = codes.SCT.Mean
#: SCT 103339001 "Long axis" (``codes.SCT.LongAxis``): the longest in-plane diameter.
LONG_AXIS: Code = codes.SCT.LongAxis
#: SCT 272519000 "Absent" (``codes.SCT.Absent``): the value of a class with no lesion.
ABSENT: Code = codes.SCT.Absent

#: The Comment of an SR whose result has no lesion.
NO_LESION_FOUND = "No lesion found."

#: Series Description of the lung SR's series.
SERIES_DESCRIPTION = "MIBI-NODE AI LUNG"
#: Series Description of the lung key image series.
KEY_IMAGE_SERIES_DESCRIPTION = "MIBI-NODE AI LUNG KEY IMAGE"

#: ``(centre, width)`` in HU of the key image: the usual lung window.
LUNG_WINDOW = (-600.0, 1500.0)

_LATERALITY = {"R": codes.SCT.Right, "L": codes.SCT.Left}
_SIDE_WORDS = {"R": "right", "L": "left", None: "side unknown"}
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "H": "F", "F": "H"}
# What the panel calls each class' colour (CLASS_COLOURS).
_COLOUR_NAMES = {"ground_glass_opacity": "orange", "bronchiectasis": "blue"}
_TEXT_COLOUR = (255, 255, 255)
_WARNING_COLOUR = (255, 200, 0)

# What the measurements are worth: 0.1 mm3, 0.1 HU, 0.1 mm, 4 digits of probability.
_DECIMALS = 1
_PROBABILITY_DECIMALS = 4
# Lesions listed on the key image's panel; more are counted.
_PANEL_LESIONS = 8


def seg_series_instance_uid(sr_series_instance_uid: str) -> str:
    """The SEG's series UID, derived from the SR's so that it too stays across versions."""
    check_uid(sr_series_instance_uid, "sr_series_instance_uid")
    return generate_uid(entropy_srcs=[sr_series_instance_uid, "mibi-node lung SEG"])


def key_image_series_instance_uid(sr_series_instance_uid: str) -> str:
    """The key image's series UID, derived from the SR's like the SEG's."""
    check_uid(sr_series_instance_uid, "sr_series_instance_uid")
    return generate_uid(entropy_srcs=[sr_series_instance_uid, "mibi-node lung key image"])


def build_lung_documents(
    result: LungResult, sources: Sequence[Dataset], context: EncodeContext
) -> list[Dataset]:
    """The lung result's documents for PACS: ``[SR, SEG, key image]``.

    The SR takes the context's series; the SEG the next Series Number and a series UID
    derived from the SR's; the key image (only when ``context.key_image``) the one after.
    When no lesion was found there is nothing to segment or show: ``[SR]`` alone, saying so.

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
    check_lung_result(result)
    seg = None
    if result.lesions:
        seg = build_lung_seg(
            result,
            sources,
            series_number=context.series_number + 1,
            instance_number=context.instance_number,
            series_instance_uid=seg_series_instance_uid(context.series_instance_uid),
            institution_name=context.institution_name,
            device_uid=context.device_uid,
        )
    sr = build_lung_sr(
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
    if seg is None:
        return [sr]
    documents: list[Dataset] = [sr, seg]
    if context.key_image:
        documents.append(
            build_lung_key_image(
                result,
                sources,
                series_number=context.series_number + 2,
                instance_number=context.instance_number,
                series_instance_uid=key_image_series_instance_uid(context.series_instance_uid),
                institution_name=context.institution_name,
            )
        )
    return documents


def _segments(seg: Dataset, result: LungResult) -> dict[int, str]:
    """Segment Number -> Tracking UID of ``seg``, checked against ``result``'s lesions."""
    if not isinstance(seg, Dataset):
        raise TypeError('Argument "seg" should be a pydicom Dataset (a Segmentation).')
    if str(seg.get("SOPClassUID", "")) != SegmentationStorage:
        raise ValueError(f'Argument "seg" should be a Segmentation, not {seg.get("SOPClassUID")}.')
    if str(seg.get("StudyInstanceUID", "")) != result.study_instance_uid:
        raise ValueError('Argument "seg" belongs to another study than the result.')
    classes = {(c.value, c.scheme_designator): name for name, c in CLASS_CODES.items()}
    found: dict[int, str] = {}
    kinds: dict[int, str | None] = {}
    for item in seg.get("SegmentSequence", []):
        code = item.SegmentedPropertyTypeCodeSequence[0]
        number = int(item.SegmentNumber)
        kinds[number] = classes.get((str(code.CodeValue), str(code.CodingSchemeDesignator)))
        found[number] = str(item.get("TrackingUID") or "")
    expected = {lesion.number: lesion.name for lesion in result.lesions}
    if kinds != expected:
        raise ValueError(
            f'Argument "seg" has segments {dict(sorted(kinds.items()))}, but the result has '
            f"lesions {expected}."
        )
    return found


def build_lung_sr(
    result: LungResult,
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
    """Build the SR that returns a lung ``result``'s lesions to PACS.

    Parameters
    ----------
    result
        The analysis' answer: the lesion map and one finding per lesion.
    seg
        The SEG of :func:`~mibi_node.analyses.lung.seg.build_lung_seg` for ``result``, whose
        segments the groups reference; ``None`` only when no lesion was found.
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
        Header of the earlier lung SR of the study that this one supersedes: listed in the
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
        are not the result's lesions, or sources that lack a slice of the volume (the message
        names the argument).
    """
    check_lung_result(result)
    headers = check_lung_sources(result, sources)
    check_uid(device_uid, "device_uid")
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if seg is None:
        if result.lesions:
            raise ValueError('Argument "seg" is needed: the result found lesions.')
        segments: dict[int, str] = {}
    else:
        segments = _segments(seg, result)
    if predecessor is not None:
        check_predecessor(predecessor, result)  # type: ignore[arg-type]
        if str(predecessor.SOPClassUID) != Comprehensive3DSRStorage:
            raise ValueError(
                'Argument "predecessor" should be an earlier lung SR (Comprehensive 3D SR), '
                f"not an instance of SOP class {predecessor.SOPClassUID}."
            )
    comments = report_comments(predecessor, result.warnings)
    if not result.lesions:
        comments.insert(0, NO_LESION_FOUND)
    intended = lung_intended_use_text(result.intended_use)
    observer = device_observer(device_uid, result.bundle_name, result.bundle_version)
    algorithm = AlgorithmIdentification(name=result.bundle_name, version=result.bundle_version)
    groups: list[
        VolumetricROIMeasurementsAndQualitativeEvaluations | MeasurementsAndQualitativeEvaluations
    ] = []
    if seg is not None:
        groups += [
            _lesion_group(lesion, seg, segments[lesion.number], algorithm)
            for lesion in result.lesions
        ]
    missing = [name for name in CLASSES if not result.count(name)]
    if missing:
        groups.append(_not_found_group(missing, algorithm))
    lesions_map = result.lesions_map
    used = np.flatnonzero(lesions_map.reshape(lesions_map.shape[0], -1).any(axis=1))
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
        "lung SR %s for study %s: %s",
        sr.SOPInstanceUID,
        result.study_instance_uid,
        result.predicted,
    )
    return sr


def _lesion_group(
    lesion: LesionFinding, seg: Dataset, tracking_uid: str, algorithm: AlgorithmIdentification
) -> VolumetricROIMeasurementsAndQualitativeEvaluations:
    site = ANATOMIC_REGION if lesion.lobe is None else LOBE_CODES[lesion.lobe]
    return VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=tracking_uid or generate_uid(), identifier=tracking_id(lesion)
        ),
        referenced_segment=ReferencedSegment.from_segmentation(seg, lesion.number),
        finding_type=CLASS_CODES[lesion.name],
        finding_sites=[
            FindingSite(anatomic_location=site, laterality=_LATERALITY.get(lesion.side or ""))
        ],
        algorithm_id=algorithm,
        measurements=[
            Measurement(
                name=mibi_codes.PROBABILITY,
                value=round(lesion.probability, _PROBABILITY_DECIMALS),
                unit=mibi_codes.NO_UNITS,
            ),
            Measurement(
                name=VOLUME,
                value=round(lesion.volume_mm3, _DECIMALS),
                unit=codes.UCUM.CubicMillimeter,
            ),
            Measurement(
                name=ATTENUATION,
                value=round(lesion.mean_hu, _DECIMALS),
                unit=codes.UCUM.HounsfieldUnit,
                derivation=MEAN,
            ),
            Measurement(
                name=LONG_AXIS,
                value=round(lesion.diameter_mm, _DECIMALS),
                unit=codes.UCUM.Millimeter,
            ),
        ],
    )


def _not_found_group(
    missing: Sequence[str], algorithm: AlgorithmIdentification
) -> MeasurementsAndQualitativeEvaluations:
    """A TID 1501 group saying which classes have no lesion."""
    return MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(
            uid=generate_uid(), identifier=f"{mibi_codes.DEVICE_NAME} lung not found"
        ),
        algorithm_id=algorithm,
        finding_sites=[FindingSite(anatomic_location=ANATOMIC_REGION)],
        qualitative_evaluations=[
            QualitativeEvaluation(name=CLASS_CODES[name], value=ABSENT) for name in missing
        ],
    )


# -- the key image ---------------------------------------------------------------------------


def build_lung_key_image(
    result: LungResult,
    sources: Sequence[Dataset],
    *,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    institution_name: str | None = None,
    size: int = 512,
) -> SCImage:
    """Draw the key slice of the largest lesion as a Secondary Capture in the source study.

    Parameters
    ----------
    result
        The analysis' answer, with at least one lesion; the pixels come from its volume.
    sources
        Headers of every slice of ``result.volume``, in any order.
    series_number, instance_number
        Positive integers for the new series and instance.
    series_instance_uid
        UID of the key image series; a new one by default.
    institution_name
        Institution Name of the creating site, if known.
    size
        The slice is enlarged until its longer side has at least this many pixels (the text
        panel adds rows).

    Returns
    -------
    highdicom.sc.SCImage
        An 8-bit RGB Secondary Capture Image with burned-in annotation.

    Raises
    ------
    TypeError, ValueError
        As :func:`build_lung_sr`, for a result without a lesion, and for a ``size`` below 64.
    """
    check_lung_result(result)
    headers = check_lung_sources(result, sources)
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if not isinstance(size, int) or isinstance(size, bool) or size < 64:
        raise ValueError('Argument "size" should be an integer of at least 64.')
    if not result.lesions:
        raise ValueError('Argument "result" has no lesion: the key image shows the largest.')
    largest = max(result.lesions, key=lambda lesion: (lesion.volume_mm3, -lesion.number))
    k = largest.key_slice
    header = headers[k]
    reference = result.volume.slices[k]
    orientation = patient_orientation(header.get("ImageOrientationPatient"))
    lines = lung_key_image_caption(result, k, header.get("InstanceNumber"))
    pixels = _render(result, k, lines, size, _OPPOSITE.get(orientation[0][:1], ""))
    sc = secondary_capture(
        pixels,
        headers[0],
        study_instance_uid=result.study_instance_uid,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        instance_number=instance_number,
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
        patient_orientation=orientation,
        image_laterality="B",  # a chest slice shows both lungs
        derivation_description=(
            f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}: CT slice "
            f"of the largest lesion in a lung window, lesions outlined and numbered"
        ),
        source_images=[(reference.sop_class_uid, reference.sop_instance_uid, None)],
        algorithm=algorithm_equipment(result.bundle_name, result.bundle_version),
        texts=lines,
        institution_name=institution_name,
    )
    logger.debug("lung key image %s for study %s", sc.SOPInstanceUID, result.study_instance_uid)
    return sc


def lung_key_image_caption(result: LungResult, k: int, instance_number: object = None) -> list[str]:
    """The key image panel's lines: bundle and slice, one line per lesion, disclaimer."""
    where = f"slice {k + 1}" if instance_number in (None, "") else f"image {instance_number}"
    lines = [
        f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}"
        f"  chest CT, {where}, lung window"
    ]
    on_slice = set(np.unique(result.lesions_map[k]).tolist()) - {0}
    for lesion in result.lesions[:_PANEL_LESIONS]:
        lobe = "" if lesion.lobe is None else f" {lesion.lobe} lobe"
        mark = " (outlined)" if lesion.number in on_slice else ""
        lines.append(
            f"{lesion.number}. {lesion.title}{mark}: {_SIDE_WORDS[lesion.side]}{lobe}, "
            f"probability {lesion.probability:.2f}, {lesion.volume_mm3:.0f} mm3, "
            f"{lesion.diameter_mm:.1f} mm, mean {lesion.mean_hu:.0f} HU"
        )
    if len(result.lesions) > _PANEL_LESIONS:
        lines.append(f"... and {len(result.lesions) - _PANEL_LESIONS} more lesions (see the SR)")
    colours = ", ".join(f"{CLASS_NAMES[name].lower()} {_COLOUR_NAMES[name]}" for name in CLASSES)
    lines.append(f"Outlines: {colours}.")
    lines.append(lung_intended_use_text(result.intended_use))
    return lines


def _render(result: LungResult, k: int, lines: list[str], size: int, left: str) -> np.ndarray:
    centre, width = LUNG_WINDOW
    hu = result.volume.image[k].astype(np.float64)
    grey = np.clip((hu - (centre - width / 2)) / width * 255.0, 0, 255).astype(np.uint8)
    rows, columns = grey.shape
    scale = max(1.0, size / max(rows, columns))
    w, h = max(1, round(columns * scale)), max(1, round(rows * scale))
    picture = Image.fromarray(grey, mode="L").resize((w, h), Image.Resampling.BILINEAR)
    numbers = Image.fromarray(result.lesions_map[k].astype(np.int32), mode="I")
    enlarged = np.asarray(numbers.resize((w, h), Image.Resampling.NEAREST))

    font = panel_font(max(10, min(w, 1024) // 40))
    line_height = int(font.getbbox("Ag")[3]) + 4
    wrapped = [part for line in lines for part in wrap_text(line, font, w - 12)]
    canvas = Image.new("RGB", (w, h + line_height * len(wrapped) + 8), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, 0))
    stroke = max(1, round(scale / 2))
    drawn = np.asarray(canvas, dtype=np.uint8).copy()
    by_number = {lesion.number: lesion for lesion in result.lesions}
    labels_at = []
    for number in sorted(set(np.unique(enlarged).tolist()) - {0}):
        region = enlarged == number
        edge = region & ~ndimage.binary_erosion(region, iterations=stroke, border_value=0)
        drawn[:h][edge] = CLASS_COLOURS[by_number[number].name]
        ys, xs = np.nonzero(region)
        labels_at.append((number, int(xs.max()) + 3, int(ys.min()) - line_height // 2))
    canvas = Image.fromarray(drawn, mode="RGB")
    draw = ImageDraw.Draw(canvas)
    for number, x, y in labels_at:
        text = str(number)
        x = min(x, w - int(font.getlength(text)) - 2)
        draw.text(
            (x, max(0, y)),
            text,
            fill=CLASS_COLOURS[by_number[number].name],
            font=font,
            stroke_width=1,  # a dark outline keeps it legible on bright tissue
            stroke_fill=(0, 0, 0),
        )
    if left:
        draw.text((6, 4), left, fill=_TEXT_COLOUR, font=font)
    top = h + 4
    disclaimer = lung_intended_use_text(result.intended_use)
    demo = result.intended_use == "demonstration"
    for part in wrapped:
        draw.text(
            (6, top),
            part,
            fill=_WARNING_COLOUR if demo and part in disclaimer else _TEXT_COLOUR,
            font=font,
        )
        top += line_height
    return np.asarray(canvas, dtype=np.uint8).copy()
