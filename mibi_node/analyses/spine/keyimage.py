"""The spine key image: the middle T2 sagittal slice with every level's point and class.

For viewers that do not render Structured Reports, the node can send a Secondary Capture in
the same study: the middle slice, windowed to 8 bits and enlarged if small, a circle at each
level's point with its level and class written beside it (abnormal levels in red, normal ones
in green), and a text panel below listing the abnormal levels and, for a demonstration
bundle, the disclaimer. The annotations are burned in (Burned In Annotation YES); the SR
(:func:`~mibi_node.analyses.spine.report.build_spine_sr`) stays the authoritative result.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from highdicom.sc import SCImage
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mibi_node.analyses.spine.levels import LEVELS
from mibi_node.analyses.spine.report import (
    check_spine_result,
    check_spine_sources,
    spine_intended_use_text,
)
from mibi_node.analyses.spine.result import SpineResult
from mibi_node.report import codes as mibi_codes
from mibi_node.report._common import algorithm_equipment, check_document_arguments
from mibi_node.report.keyimage import (
    panel_font,
    patient_orientation,
    secondary_capture,
    wrap_text,
)

__all__ = [
    "ABNORMAL_COLOUR",
    "KEY_IMAGE_SERIES_DESCRIPTION",
    "NORMAL_COLOUR",
    "build_spine_key_image",
    "spine_key_image_caption",
]

logger = logging.getLogger(__name__)

#: Series Description of the spine key image series.
KEY_IMAGE_SERIES_DESCRIPTION = "MIBI-NODE AI SPINE KEY IMAGE"

#: Colour of the points (and labels) of abnormal levels.
ABNORMAL_COLOUR = (255, 48, 48)
#: Colour of the points (and labels) of normal levels.
NORMAL_COLOUR = (64, 220, 96)
_TEXT_COLOUR = (255, 255, 255)
_WARNING_COLOUR = (255, 200, 0)


def build_spine_key_image(
    result: SpineResult,
    sources: Sequence[Dataset],
    *,
    series_number: int,
    instance_number: int = 1,
    series_instance_uid: str | None = None,
    institution_name: str | None = None,
    size: int = 512,
) -> SCImage:
    """Draw ``result`` on its middle slice as a Secondary Capture in the original study.

    Parameters
    ----------
    result
        The analysis' answer.
    sources
        Datasets of the study holding at least the result's slices, as for
        :func:`~mibi_node.analyses.spine.report.build_spine_sr`; the middle slice must carry
        its pixel data, or be a header read from its file (``stop_before_pixels=True``):
        the pixels are then read from that file.
    series_number, instance_number
        Positive integers for the new series and instance.
    series_instance_uid
        UID of the key image series; a new one by default.
    institution_name
        Institution Name of the creating site, if known.
    size
        The image is enlarged until its longer side has at least this many pixels (the text
        panel adds rows); larger images keep their size.

    Returns
    -------
    highdicom.sc.SCImage
        An 8-bit RGB Secondary Capture Image with burned-in annotation.

    Raises
    ------
    TypeError, ValueError
        As :func:`~mibi_node.analyses.spine.report.build_spine_sr`, for a middle slice
        without pixel data, and for a ``size`` below 64.
    """
    check_spine_result(result)
    headers = check_spine_sources(result, sources)
    check_document_arguments(
        series_number,
        instance_number,
        series_instance_uid=series_instance_uid,
        institution_name=institution_name,
    )
    if not isinstance(size, int) or isinstance(size, bool) or size < 64:
        raise ValueError('Argument "size" should be an integer of at least 64.')
    middle = _with_pixels(
        next(ds for ds in sources if ds.SOPInstanceUID == result.middle.sop_instance_uid)
    )

    lines = spine_key_image_caption(result, middle.get("InstanceNumber"))
    pixels = _render(_grey(middle), result, lines, size)
    sc = secondary_capture(
        pixels,
        headers[0],
        study_instance_uid=result.study_instance_uid,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        instance_number=instance_number,
        series_description=KEY_IMAGE_SERIES_DESCRIPTION,
        patient_orientation=patient_orientation(middle.get("ImageOrientationPatient")),
        image_laterality="U",  # the spine is unpaired
        derivation_description=(
            f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}: middle T2 "
            "sagittal slice with the vertebra and disc points and their classes"
        ),
        source_images=[(result.middle.sop_class_uid, result.middle.sop_instance_uid, None)],
        algorithm=algorithm_equipment(result.bundle_name, result.bundle_version),
        texts=lines,
        institution_name=institution_name,
    )
    logger.debug("spine key image %s for study %s", sc.SOPInstanceUID, result.study_instance_uid)
    return sc


def _with_pixels(middle: Dataset) -> Dataset:
    """The middle slice with its pixel data, read again from its file if it is a header.

    The worker reads its sources with ``stop_before_pixels=True``; pydicom remembers the
    path such a header came from.
    """
    if "PixelData" in middle:
        return middle
    path = getattr(middle, "filename", None)
    if isinstance(path, str) and Path(path).is_file():
        full = pydicom.dcmread(path)
        if full.SOPInstanceUID == middle.SOPInstanceUID and "PixelData" in full:
            return full
    raise ValueError(
        'Argument "sources" holds the middle slice without its pixel data, '
        "and not as a header read from its file."
    )


def spine_key_image_caption(result: SpineResult, instance_number: object = None) -> list[str]:
    """The text panel's lines: bundle, abnormal levels, levels not found, disclaimer.

    Parameters
    ----------
    result
        The analysis' answer.
    instance_number
        Instance Number of the middle slice, named in the first line when known.
    """
    where = "" if instance_number in (None, "") else f", image {instance_number}"
    lines = [
        f"{mibi_codes.DEVICE_NAME} {result.bundle_name} {result.bundle_version}"
        f"  lumbar spine, T2 sagittal middle slice{where}"
    ]
    abnormal = result.abnormal
    if abnormal:
        lines.append(
            "Abnormal: "
            + ", ".join(
                f"{p.level} {p.label.replace('_', ' ')} {p.probabilities[p.label]:.0%}"
                for p in abnormal
            )
        )
    elif result.points:
        lines.append(f"No abnormal level among the {len(result.points)} found.")
    found = {p.level for p in result.points}
    missing = [level for level in LEVELS if level not in found]
    if missing:
        lines.append("Not found: " + ", ".join(missing))
    lines.append("Red: abnormal level, green: normal level.")
    if result.intended_use == "demonstration":
        lines.append(spine_intended_use_text(result.intended_use))
    return lines


def _grey(ds: Dataset) -> np.ndarray:
    """The slice windowed to 0-255: its own window if it has one, else 0.5-99.5 percentiles."""
    data = np.asarray(ds.pixel_array, dtype=np.float64)
    if data.ndim != 2 or data.size == 0:
        raise ValueError('Argument "sources" holds a middle slice that is not a 2-D image.')
    data = data * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        centre = float(centre[0] if isinstance(centre, Sequence) else centre)
        width = float(width[0] if isinstance(width, Sequence) else width)
        low, high = centre - width / 2.0, centre + width / 2.0
    else:
        low, high = (float(v) for v in np.percentile(data, (0.5, 99.5)))
    if not (np.isfinite(low) and np.isfinite(high)) or high <= low:
        low, high = float(np.min(data)), float(np.min(data)) + 1.0
    return np.clip((data - low) / (high - low) * 255.0, 0, 255).astype(np.uint8)


def _render(grey: np.ndarray, result: SpineResult, lines: list[str], size: int) -> np.ndarray:
    rows, columns = grey.shape
    scale = max(1.0, size / max(rows, columns))
    width, height = max(1, round(columns * scale)), max(1, round(rows * scale))
    picture = Image.fromarray(grey, mode="L").resize((width, height), Image.Resampling.BILINEAR)

    font = panel_font(max(10, min(width, 1024) // 40))
    line_height = int(font.getbbox("Ag")[3]) + 4
    wrapped = [part for line in lines for part in wrap_text(line, font, width - 12)]
    panel = line_height * len(wrapped) + 8
    canvas = Image.new("RGB", (width, height + panel), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)

    radius = max(3.0, min(width, height) / 64)
    stroke = max(1, round(radius / 3))
    for point in result.points:
        # Pixel centre (row, col) of the slice lies at ((col + 0.5), (row + 0.5)) x scale in
        # the enlarged image's continuous coordinates; its pixel index is 0.5 less.
        x = (point.col + 0.5) * scale - 0.5
        y = (point.row + 0.5) * scale - 0.5
        colour = NORMAL_COLOUR if point.label == "normal" else ABNORMAL_COLOUR
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=stroke)
        label = f"{point.level} {point.label.replace('_', ' ')}"
        text_width = font.getlength(label)
        left = (
            x + radius + 4 if x + radius + 4 + text_width <= width else x - radius - 4 - text_width
        )
        draw.text(
            (left, y - line_height / 2),
            label,
            fill=colour,
            font=font,
            stroke_width=max(1, stroke),  # a dark outline keeps it legible on bright tissue
            stroke_fill=(0, 0, 0),
        )

    top = height + 4
    disclaimer = spine_intended_use_text(result.intended_use)
    demo = result.intended_use == "demonstration"
    for part in wrapped:
        colour = _WARNING_COLOUR if demo and part in disclaimer else _TEXT_COLOUR
        draw.text((6, top), part, fill=colour, font=font)
        top += line_height
    return np.asarray(canvas, dtype=np.uint8).copy()
