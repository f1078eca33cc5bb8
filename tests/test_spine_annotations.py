"""The Spinal Disease 2020 annotation format: exact round trip and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mibi_node.analyses.spine.annotations import (
    AnnotatedPoint,
    AnnotationError,
    StudyAnnotation,
    read_annotations,
    write_annotations,
)
from mibi_node.analyses.spine.levels import LEVEL_KIND, LEVELS
from mibi_node.errors import MibiNodeError


def _study(uid: str) -> StudyAnnotation:
    points = tuple(
        AnnotatedPoint(
            level,
            100.25 + i,
            200.5 - i / 3,
            "normal"
            if i % 3
            else ("degenerated" if LEVEL_KIND[level] == "vertebra" else "extrusion"),
            5,
        )
        for i, level in enumerate(LEVELS)
    )
    return StudyAnnotation(uid, uid + ".1", uid + ".1.6", points)


def _document(tag: dict, coord: object = (10, 20)) -> list:
    point = {"coord": list(coord) if isinstance(coord, tuple) else coord, "tag": tag, "zIndex": 4}
    return [
        {
            "studyUid": "1.2",
            "data": [
                {
                    "seriesUid": "1.2.3",
                    "instanceUid": "1.2.3.4",
                    "annotation": [{"annotator": 70, "data": {"point": [point]}}],
                }
            ],
        }
    ]


def test_round_trip_is_exact(tmp_path: Path) -> None:
    studies = [_study("1.2.3"), _study("1.2.4")]
    path = tmp_path / "annotations.json"
    write_annotations(path, studies)
    assert read_annotations(path) == studies
    raw = json.loads(path.read_text())
    point = raw[0]["data"][0]["annotation"][0]["data"]["point"][0]
    assert point["coord"] == [200.5, 100.25]  # [column, row]
    assert point["tag"] == {"disc": "v4", "identification": "T12-L1"}
    assert point["zIndex"] == 5


def test_two_codes_on_a_disc_take_the_first(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(_document({"disc": "v2,v5", "identification": "L4-L5"})))
    (study,) = read_annotations(path)
    assert study.points[0].label == "bulge"
    assert (study.points[0].row, study.points[0].col) == (20.0, 10.0)


@pytest.mark.parametrize(
    ("document", "words"),
    [
        (_document({"disc": "v2", "identification": "L6-S1"}), "unknown level 'L6-S1'"),
        (_document({"disc": "v9", "identification": "L4-L5"}), "unknown disc code"),
        (_document({"vertebra": "v1", "identification": "L4-L5"}), 'no "disc" code'),
        (_document({"disc": "v1"}), 'missing key "identification"'),
        (_document({"vertebra": "v1", "identification": "L4"}, coord=[1]), "[column, row]"),
        ([{"data": []}], 'missing key "studyUid"'),
        ({"studyUid": "x"}, "JSON list"),
    ],
)
def test_malformed_entries_name_the_file_and_entry(
    tmp_path: Path, document: object, words: str
) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(document))
    with pytest.raises(AnnotationError) as caught:
        read_annotations(path)
    assert words in str(caught.value)
    assert "bad.json" in str(caught.value)
    assert isinstance(caught.value, MibiNodeError) and isinstance(caught.value, ValueError)


def test_unreadable_file_is_a_project_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text("[{")
    with pytest.raises(AnnotationError, match="broken.json"):
        read_annotations(path)
    with pytest.raises(AnnotationError, match="missing.json"):
        read_annotations(tmp_path / "missing.json")
