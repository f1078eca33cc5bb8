"""The Spinal Disease 2020 annotation file: read and write.

The challenge ships one JSON list of studies; each names the annotated instance (the middle
T2 sagittal slice) and its points::

    [{"studyUid": "...",
      "data": [{"seriesUid": "...", "instanceUid": "...",
                "annotation": [{"annotator": 70,
                                "data": {"point": [
                                    {"coord": [x, y], "zIndex": 5,
                                     "tag": {"disc": "v2", "identification": "L1-L2"}},
                                    {"coord": [x, y], "zIndex": 5,
                                     "tag": {"vertebra": "v1", "identification": "L1"}}]}}]}]}]

``coord`` is [column, row] in the instance's pixels and ``zIndex`` the slice's index in its
series. A disc tagged with two codes (``"v2,v5"``, a few in the real data) takes the first
(:func:`~mibi_node.analyses.spine.levels.class_from_code`). Every malformed entry is a
:class:`~mibi_node.errors.MibiNodeError` (and ``ValueError``) naming the file and the entry.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mibi_node.analyses.spine.levels import LEVEL_KIND, class_from_code, code_from_class
from mibi_node.errors import MibiNodeError

__all__ = [
    "AnnotatedPoint",
    "AnnotationError",
    "StudyAnnotation",
    "read_annotations",
    "write_annotations",
]

logger = logging.getLogger(__name__)

_ANNOTATOR = 70


class AnnotationError(MibiNodeError, ValueError):
    """An annotation file is unreadable or one of its entries is malformed."""


@dataclass(frozen=True)
class AnnotatedPoint:
    """One level's point and class on the annotated slice.

    Attributes
    ----------
    level
        One of :data:`~mibi_node.analyses.spine.levels.LEVELS`.
    row, col
        In the instance's pixels (the file stores ``[col, row]``).
    label
        Class key of the level's kind (``"protrusion"``), not the challenge code.
    z_index
        The slice's index in its series.
    """

    level: str
    row: float
    col: float
    label: str
    z_index: int


@dataclass(frozen=True)
class StudyAnnotation:
    """The points annotated on one instance of one study."""

    study_uid: str
    series_uid: str
    instance_uid: str
    points: tuple[AnnotatedPoint, ...]


def _get(entry: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    if not isinstance(entry, dict):
        raise AnnotationError(f"{where}: expected an object, found {type(entry).__name__}")
    if key not in entry:
        raise AnnotationError(f'{where}: missing key "{key}"')
    value = entry[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise AnnotationError(f'{where}: "{key}" has the wrong type ({type(value).__name__})')
    return value


def _point(entry: Any, where: str) -> AnnotatedPoint:
    tag = _get(entry, "tag", where, dict)
    level = _get(tag, "identification", where, str)
    if level not in LEVEL_KIND:
        raise AnnotationError(f"{where}: unknown level {level!r}")
    kind = LEVEL_KIND[level]
    code = tag.get(kind)
    if not isinstance(code, str):
        raise AnnotationError(f'{where}: level {level} has no "{kind}" code')
    try:
        label = class_from_code(kind, code)
    except ValueError as error:
        raise AnnotationError(f"{where}: level {level}: {error}") from None
    coord = _get(entry, "coord", where, list)
    if len(coord) != 2 or not all(
        isinstance(c, int | float) and not isinstance(c, bool) for c in coord
    ):
        raise AnnotationError(f'{where}: "coord" should be [column, row], got {coord!r}')
    z_index = _get(entry, "zIndex", where, int)
    return AnnotatedPoint(level, float(coord[1]), float(coord[0]), label, int(z_index))


def read_annotations(path: Path) -> list[StudyAnnotation]:
    """Read a challenge annotation file: one :class:`StudyAnnotation` per annotated instance.

    Raises
    ------
    AnnotationError
        The file cannot be read or parsed, or an entry lacks a key, names an unknown level or
        an unknown code; the message names the file and the entry (``study 3 (uid ...)``).
    """
    path = Path(path)
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise AnnotationError(f"{path}: cannot read the annotation file: {error}") from None
    if not isinstance(document, list):
        raise AnnotationError(f"{path}: expected a JSON list of studies")
    out = []
    for i, study in enumerate(document):
        where = f"{path}: study {i}"
        study_uid = _get(study, "studyUid", where, str)
        where = f"{path}: study {i} ({study_uid})"
        for j, item in enumerate(_get(study, "data", where, list)):
            here = f"{where}, data {j}"
            series_uid = _get(item, "seriesUid", here, str)
            instance_uid = _get(item, "instanceUid", here, str)
            points: list[AnnotatedPoint] = []
            for a, annotation in enumerate(_get(item, "annotation", here, list)):
                block = _get(annotation, "data", f"{here}, annotation {a}", dict)
                entries = _get(block, "point", f"{here}, annotation {a}", list)
                for p, entry in enumerate(entries):
                    points.append(_point(entry, f"{here}, annotation {a}, point {p}"))
            out.append(StudyAnnotation(study_uid, series_uid, instance_uid, tuple(points)))
    logger.debug("read %d annotated instances from %s", len(out), path)
    return out


def _entry(point: AnnotatedPoint) -> dict[str, Any]:
    kind = LEVEL_KIND.get(point.level)
    if kind is None:
        raise ValueError(f"unknown level {point.level!r}")
    return {
        "coord": [point.col, point.row],
        "tag": {kind: code_from_class(kind, point.label), "identification": point.level},
        "zIndex": point.z_index,
    }


def write_annotations(path: Path, annotations: Sequence[StudyAnnotation]) -> None:
    """Write annotations in the challenge's format; instances of one study share its entry.

    :func:`read_annotations` gives the same annotations back (studies in the order of their
    first appearance, instances and points in the given order).
    """
    studies: dict[str, list[dict[str, Any]]] = {}
    for annotation in annotations:
        studies.setdefault(annotation.study_uid, []).append(
            {
                "seriesUid": annotation.series_uid,
                "instanceUid": annotation.instance_uid,
                "annotation": [
                    {
                        "annotator": _ANNOTATOR,
                        "data": {"point": [_entry(p) for p in annotation.points]},
                    }
                ],
            }
        )
    document = [{"studyUid": uid, "data": data} for uid, data in studies.items()]
    Path(path).write_text(json.dumps(document, indent=1), encoding="utf-8")
