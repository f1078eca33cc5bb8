"""The focus picture: a study's delayed image with the result's focus drawn on it, as PNG.

The image is read from the stored instances with the same reader the worker uses
(:func:`mibi_node.imaging.nm.read_study`), so the focus coordinates of the recorded result
(pixel row and column of that image) land where the model put them. Counts are shown grey
(white = most uptake, clipped at the 99.5th percentile), enlarged, with a red circle at the
focus and an "R" on the patient's right (the image's left: an anterior view).
"""

from __future__ import annotations

import functools
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from mibi_node.imaging.nm import read_study

__all__ = ["FOCUS_COLOUR", "render_focus"]

#: Colour of the focus circle (the tests look for it in the browser's screenshot).
FOCUS_COLOUR = (255, 48, 48)
_LABEL_COLOUR = (255, 220, 0)
_CAPTION_ROWS = 28


def render_focus(
    sources: Sequence[tuple[Path, str]], result: dict[str, Any] | None, size: int = 384
) -> bytes:
    """Draw the focus of ``result`` on the study's delayed image.

    Parameters
    ----------
    sources
        ``(path, sha256)`` of the study's stored image instances; the hash keys a small cache.
    result
        The latest recorded result (``StudyResult.to_dict``), or ``None`` before one: then
        the delayed image is drawn without a focus.
    size
        Length in pixels of the image's longer side (a caption strip is added below).

    Returns
    -------
    bytes
        A PNG file.

    Raises
    ------
    UnusableStudyError
        The stored files hold no delayed image (or are gone); the message says why.
    """
    key = json.dumps(result, sort_keys=True, default=str) if result is not None else ""
    return _render(tuple((str(path), sha) for path, sha in sources), key, size)


@functools.lru_cache(maxsize=32)
def _render(sources: tuple[tuple[str, str], ...], result_key: str, size: int) -> bytes:
    result: dict[str, Any] = json.loads(result_key) if result_key else {}
    focus = result.get("focus") if isinstance(result.get("focus"), dict) else None
    phase = str(focus.get("phase", "delayed")) if focus else "delayed"
    study = read_study([path for path, _ in sources], required=(phase,))
    image = study.images[phase]
    recorded = dict(result.get("source_images") or {}).get(phase) or {}
    same_image = recorded.get("sop_instance_uid") in (None, image.sop_instance_uid)

    pixels = np.asarray(image.pixels, dtype=np.float64)
    top = float(np.percentile(pixels, 99.5)) or float(pixels.max()) or 1.0
    grey = (np.clip(pixels / top, 0.0, 1.0) * 255.0).astype(np.uint8)
    rows, cols = grey.shape
    scale = size / max(rows, cols)
    width, height = max(1, round(cols * scale)), max(1, round(rows * scale))
    picture = Image.fromarray(grey).resize((width, height), Image.Resampling.BILINEAR)
    canvas = Image.new("RGB", (width, height + _CAPTION_ROWS), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=16)
    draw.text((6, 4), "R", fill=_LABEL_COLOUR, font=font)

    if not result:
        caption = f"{phase} image; not analysed yet"
    elif focus is None:
        caption = f"{phase} image; no focus ({result.get('predicted', '?')})"
    elif not same_image:
        caption = f"{phase} image changed since the analysis; focus not drawn"
    else:
        x = (float(focus["col"]) + 0.5) * width / cols
        y = (float(focus["row"]) + 0.5) * height / rows
        radius = max(8.0, size / 16)
        box = (x - radius, y - radius, x + radius, y + radius)
        draw.ellipse(box, outline=FOCUS_COLOUR, width=3)
        caption = f"{phase} image; focus: patient's {focus.get('side')} {focus.get('pole')}"
    draw.text((6, height + 6), caption, fill=(255, 255, 255), font=font)
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue()
