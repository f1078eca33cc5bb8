"""The optional key image: the delayed image with the focus marked and the answer written on it.

Some PACS viewers do not render Structured Reports. For them the node can also send a
Secondary Capture in the same study: the image the focus refers to (the delayed image), grey,
enlarged, with a red circle at the focus, an "R" on the patient's right, and a text panel below
giving the prediction, every class probability, the member agreement and, for a demonstration
bundle, the disclaimer. The annotations are burned in (Burned In Annotation YES); the SR stays
the authoritative, machine-readable result.
"""

from __future__ import annotations

import logging
import textwrap
from collections.abc import Sequence

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mibi_node.inference.result import StudyResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import (
    algorithm_equipment,
    character_set,
    check_positive,
    check_result,
    check_sources,
    check_uid,
    coding_schemes,
    detach_person_names,
    intended_use_text,
)

__all__ = [
    "DEFAULT_KEY_IMAGE_SERIES_NUMBER",
    "KEY_IMAGE_SERIES_DESCRIPTION",
    "build_key_image",
    "panel_font",
    "patient_orientation",
    "secondary_capture",
    "wrap_text",
]

logger = logging.getLogger(__name__)

#: Series Number of the key image series unless the caller chooses one.
DEFAULT_KEY_IMAGE_SERIES_NUMBER = 9902

#: Series Description of the key image series (a series of its own: its modality is OT).
KEY_IMAGE_SERIES_DESCRIPTION = "MIBI-NODE AI KEY IMAGE"

_FOCUS_COLOUR = (255, 48, 48)
_TEXT_COLOUR = (255, 255, 255)
_WARNING_COLOUR = (255, 200, 0)
_PATIENT_AXES = (("L", "R"), ("P", "A"), ("H", "F"))  # +x, -x; +y, -y; +z, -z (LPS)


def build_key_image(
    result: StudyResult,
    sources: Sequence[Dataset],
    *,
    series_number: int = DEFAULT_KEY_IMAGE_SERIES_NUMBER,
    instance_number: int = 1,
    manufacturer: str = mibi_codes.DEVICE_NAME,
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    size: int = 512,
) -> SCImage:
    """Draw ``result`` on its delayed image as a Secondary Capture in the original study.

    Parameters
    ----------
    result
        The engine's answer; its image is the focus's phase, else ``delayed``, else the
        first source image.
    sources
        Headers of the study's source instances, as for :func:`~mibi_node.report.build_sr`.
    series_number, instance_number
        Positive integers for the new series and instance.
    manufacturer
        Manufacturer written in the Equipment module, and of the algorithm (its
        Contributing Equipment item).
    series_instance_uid, sop_instance_uid
        UIDs to use; new ones by default.
    size
        Length in pixels of the longer side of the enlarged image (the text panel adds rows).

    Returns
    -------
    highdicom.sc.SCImage
        An 8-bit RGB Secondary Capture Image with burned-in annotation.

    Raises
    ------
    TypeError, ValueError
        As :func:`~mibi_node.report.build_sr`, and for a ``size`` below 64.
    """
    check_result(result)
    headers = check_sources(sources, result)
    check_positive(series_number, "series_number")
    check_positive(instance_number, "instance_number")
    if not isinstance(size, int) or isinstance(size, bool) or size < 64:
        raise ValueError('Argument "size" should be an integer of at least 64.')
    if not isinstance(manufacturer, str) or not manufacturer:
        raise ValueError('Argument "manufacturer" should be a non-empty string.')
    if series_instance_uid is not None:
        check_uid(series_instance_uid, "series_instance_uid")
    if sop_instance_uid is not None:
        check_uid(sop_instance_uid, "sop_instance_uid")

    if result.focus is not None:
        phase = result.focus.phase
    elif "delayed" in result.source_images:
        phase = "delayed"
    else:
        phase = next(iter(result.source_images))
    image = result.source_images[phase]
    lines = _caption(result, phase)
    pixels = _render(image.pixels, result, lines, size)

    sc = secondary_capture(
        pixels,
        headers[0],
        study_instance_uid=result.study_instance_uid,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
        # Anterior neck view: columns run to the patient's left, rows to the feet.
        patient_orientation=("L", "F"),
        image_laterality="B",  # the anterior neck view shows both sides
        derivation_description=(
            f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}: "
            f"{phase} image with the suspected focus and the class probabilities"
        ),
        source_images=[(image.sop_class_uid, image.sop_instance_uid, image.frame_number)],
        texts=lines,
        manufacturer=manufacturer,
        algorithm=algorithm_equipment(result.bundle_name, result.bundle_version, manufacturer),
    )
    logger.debug("key image %s for study %s", sc.SOPInstanceUID, result.study_instance_uid)
    return sc


def _caption(result: StudyResult, phase: str) -> list[str]:
    predicted = result.predicted
    lines = [
        f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}",
        f"Prediction: {predicted} {result.probabilities[predicted]:.1%}"
        f"  (agreement {result.agreement:.0%})",
        "  ".join(f"{key} {p:.1%}" for key, p in result.probabilities.items()),
    ]
    if result.focus is not None:
        pole = "" if result.focus.pole == "ectopic" else f" {result.focus.pole}"
        where = "ectopic" if result.focus.pole == "ectopic" else "pole"
        lines.append(f"Focus (circle, {phase} image): patient's {result.focus.side}{pole} {where}")
    lines.append(intended_use_text(result.intended_use))
    return lines


def _render(pixels: np.ndarray, result: StudyResult, lines: list[str], size: int) -> np.ndarray:
    data = np.asarray(pixels, dtype=np.float64)
    if data.ndim != 2 or data.size == 0:
        raise ValueError('Argument "result" has a source image that is not a 2-D array.')
    low = float(np.min(data))
    high = float(np.percentile(data, 99.5))
    if not np.isfinite(high) or high <= low:
        high = low + 1.0
    grey = np.clip((data - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)
    rows, columns = grey.shape
    scale = size / max(rows, columns)
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    picture = Image.fromarray(grey, mode="L").resize((width, height), Image.Resampling.BILINEAR)

    font = panel_font(max(10, size // 36))
    line_height = int(font.getbbox("Ag")[3]) + 4
    wrap = max(20, int(width / (line_height * 0.5)))
    wrapped = [part for line in lines for part in textwrap.wrap(line, wrap) or [""]]
    panel = line_height * len(wrapped) + 8
    canvas = Image.new("RGB", (width, height + panel), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)

    if result.focus is not None:
        x = (result.focus.col + 0.5) * scale
        y = (result.focus.row + 0.5) * scale
        radius = max(8.0, size / 28)
        draw.ellipse(
            (x - radius, y - radius, x + radius, y + radius),
            outline=_FOCUS_COLOUR,
            width=max(2, size // 256),
        )
    # Image left is the patient's right on an anterior view.
    draw.text((6, 4), "R", fill=_TEXT_COLOUR, font=font)

    top = height + 4
    disclaimer = intended_use_text(result.intended_use)
    for part in wrapped:
        demo = result.intended_use == "demonstration"
        colour = _WARNING_COLOUR if demo and part in disclaimer else _TEXT_COLOUR
        draw.text((6, top), part, fill=colour, font=font)
        top += line_height
    return np.asarray(canvas, dtype=np.uint8).copy()


def secondary_capture(
    pixels: np.ndarray,
    header: Dataset,
    *,
    study_instance_uid: str,
    series_instance_uid: str,
    series_number: int,
    instance_number: int,
    series_description: str,
    patient_orientation: tuple[str, str],
    image_laterality: str,
    derivation_description: str,
    source_images: Sequence[tuple[str, str, int | None]],
    algorithm: ContributingEquipment,
    texts: Sequence[str] = (),
    manufacturer: str = mibi_codes.DEVICE_NAME,
    institution_name: str | None = None,
    sop_instance_uid: str | None = None,
) -> SCImage:
    """A key image: an 8-bit RGB Secondary Capture with burned-in annotation in the study
    of ``header`` (every analysis' key image is one).

    Parameters
    ----------
    pixels
        ``(rows, columns, 3)`` uint8, the drawn image.
    header
        A source header with the patient and study attributes (Type 2 ones present, as
        :func:`~mibi_node.report._common.with_type2_header` makes sure).
    series_description, patient_orientation, image_laterality, derivation_description
        What the image shows and how it lies.
    source_images
        ``(SOP Class UID, SOP Instance UID, frame number or None)`` of each image drawn.
    algorithm
        The algorithm's Contributing Equipment item
        (:func:`~mibi_node.report._common.algorithm_equipment`), which IHE AI Results asks
        of every result instance; highdicom's own item follows it.
    texts
        The burned-in lines, which the Specific Character Set must encode.
    """
    sc = SCImage(
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        patient_orientation=patient_orientation,
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=instance_number,
        manufacturer=manufacturer,
        patient_id=header.PatientID,
        patient_name=header.PatientName,
        patient_birth_date=header.PatientBirthDate,
        patient_sex=header.PatientSex,
        accession_number=header.AccessionNumber,
        study_id=header.StudyID,
        study_date=header.StudyDate,
        study_time=header.StudyTime,
        referring_physician_name=header.ReferringPhysicianName,
        series_description=series_description,
        manufacturer_model_name=mibi_codes.DEVICE_NAME,
        coding_schemes=coding_schemes(local=False),  # a key image writes no local code
        contributing_equipment=[algorithm],
        specific_character_set=character_set(
            header.get("SpecificCharacterSet"),
            [manufacturer, institution_name or "", *texts, *_equipment_texts(algorithm)],
        ),
    )
    sc.copy_patient_and_study_information(header)
    detach_person_names(sc)
    if institution_name:
        sc.InstitutionName = institution_name
    sc.ConversionType = "WSD"  # workstation: drawn by software, not digitised film
    sc.BurnedInAnnotation = "YES"
    sc.ImageLaterality = image_laterality
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.DerivationDescription = derivation_description
    references = []
    for sop_class_uid, sop_instance_uid_, frame_number in source_images:
        source = Dataset()
        source.ReferencedSOPClassUID = sop_class_uid
        source.ReferencedSOPInstanceUID = sop_instance_uid_
        if frame_number is not None:
            source.ReferencedFrameNumber = frame_number
        references.append(source)
    sc.SourceImageSequence = references
    return sc


def _equipment_texts(item: ContributingEquipment) -> list[str]:
    """The text values of a Contributing Equipment item (the character set must hold them)."""
    versions = item.get("SoftwareVersions") or ""
    if not isinstance(versions, str):
        versions = "".join(str(v) for v in versions)
    return [
        str(item.get("Manufacturer") or ""),
        str(item.get("ManufacturerModelName") or ""),
        versions,
    ]


def wrap_text(
    line: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float
) -> list[str]:
    """Split ``line`` at spaces into parts no wider than ``width`` pixels."""
    parts: list[str] = []
    current = ""
    for word in line.split(" "):
        candidate = word if not current else f"{current} {word}"
        if current and font.getlength(candidate) > width:
            parts.append(current)
            current = word
        else:
            current = candidate
    parts.append(current)
    return parts


def patient_orientation(iop: object) -> tuple[str, str]:
    """Patient Orientation (row direction, column direction) from Image Orientation
    (Patient); sagittal (``("P", "F")``) when it has none."""
    try:
        values = [float(v) for v in iop]  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        values = []
    if len(values) != 6:
        logger.warning("image without Image Orientation (Patient): assuming sagittal")
        return ("P", "F")
    return (_letters(values[:3]), _letters(values[3:]))


def _letters(vector: Sequence[float]) -> str:
    """The patient direction letters of a unit vector, main component first."""
    order = sorted(range(3), key=lambda axis: -abs(vector[axis]))
    letters = [
        _PATIENT_AXES[axis][0 if vector[axis] > 0 else 1]
        for axis in order
        if abs(vector[axis]) > 0.25
    ]
    return "".join(letters[:3]) or "P"


def panel_font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font at ``size`` pixels (its fixed bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (OSError, TypeError, ValueError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()
