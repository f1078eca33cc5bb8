"""The lumbar spine MR phantom: valid MR files, consistent geometry, truth on the anatomy."""

from __future__ import annotations

import dataclasses
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mibi_node.analyses.spine.annotations import read_annotations
from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS
from mibi_node.analyses.spine.phantom import (
    SpineCase,
    make_spine_study,
    random_case,
    write_spine_dataset,
)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory):
    return make_spine_study(tmp_path_factory.mktemp("spine"), 3, sagittal_slices=5)


@pytest.mark.peers
def test_one_instance_of_each_series_passes_dciodvfy(study, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    for key, paths in study.paths.items():
        run = subprocess.run([dciodvfy, str(paths[0])], capture_output=True, text=True, timeout=60)
        errors = [
            line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")
        ]
        assert errors == [], f"{key}: {errors}"


def test_files_are_mr_images_with_consistent_geometry(study) -> None:
    assert {k: len(v) for k, v in study.paths.items()} == {
        "t1_sagittal": 5,
        "t2_sagittal": 5,
        "t2_axial": 3,
    }
    frames = set()
    for key, paths in study.paths.items():
        datasets = [pydicom.dcmread(p) for p in paths]
        for ds in datasets:
            assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4"
            assert (
                ds.Modality == "MR"
                and ds.BodyPartExamined == "LSPINE"
                and ds.PatientPosition == "HFS"
            )
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert 0.5 <= float(ds.PixelSpacing[0]) <= 0.9 or key == "t2_axial"
            assert float(ds.SliceThickness) == 4.0
            frames.add(ds.FrameOfReferenceUID)
        orientation = [float(v) for v in datasets[0].ImageOrientationPatient]
        if key == "t2_axial":
            assert orientation == [1, 0, 0, 0, 1, 0]
            assert float(datasets[0].EchoTime) >= 60 and float(datasets[0].RepetitionTime) >= 1500
            continue
        assert orientation == [0, 1, 0, 0, 0, -1]
        positions = np.array([[float(v) for v in ds.ImagePositionPatient] for ds in datasets])
        steps = np.diff(positions[:, 0])  # along patient x, the rest fixed
        assert np.allclose(positions[:, 1:], positions[0, 1:])
        assert np.allclose(np.abs(steps), float(datasets[0].SpacingBetweenSlices), atol=1e-3)
        te, tr = float(datasets[0].EchoTime), float(datasets[0].RepetitionTime)
        assert (te >= 60 and tr >= 1500) if key == "t2_sagittal" else (te < 30 and tr < 1000)
    assert len(frames) == 1
    middle = pydicom.dcmread(study.paths["t2_sagittal"][study.middle_index])
    assert middle.SOPInstanceUID == study.middle.sop_instance_uid
    assert middle.SeriesInstanceUID == study.middle.series_instance_uid


def _ring(image: np.ndarray, row: float, col: float) -> float:
    r, c = int(round(row)), int(round(col))
    return float(image[r - 1 : r + 2, c - 1 : c + 2].mean())


def test_truth_points_lie_on_the_anatomy(tmp_path: Path) -> None:
    case = dataclasses.replace(
        random_case(np.random.default_rng(0)),
        classes={level: "normal" for level in LEVELS},
    )
    study = make_spine_study(tmp_path, 4, case=case, series=("t2_sagittal",), sagittal_slices=3)
    image = pydicom.dcmread(study.paths["t2_sagittal"][1]).pixel_array.astype(float)
    csf = np.percentile(image, 99.5)
    discs = [_ring(image, r, c) for level, r, c, _ in study.truth if LEVEL_KIND[level] == "disc"]
    bodies = [
        _ring(image, r, c) for level, r, c, _ in study.truth if LEVEL_KIND[level] == "vertebra"
    ]
    assert min(discs) > 1.3 * max(bodies)  # normal nuclei are bright on T2, marrow intermediate
    assert max(bodies) < 0.75 * csf
    rows = [r for _, r, _, _ in study.truth]
    assert rows == sorted(rows)  # head to foot
    spacing = study.pixel_spacing[0]
    gaps = np.diff(rows) * spacing
    assert np.all(gaps > 4) and np.all(gaps < 25)  # mm between a disc and a body centre


def test_lateral_slices_lose_the_canal(tmp_path: Path) -> None:
    study = make_spine_study(tmp_path, 6, series=("t2_sagittal",), sagittal_slices=11)
    images = [pydicom.dcmread(p).pixel_array.astype(float) for p in study.paths["t2_sagittal"]]
    row, col = next((r, c) for level, r, c, _ in study.truth if level == "L3")
    canal = slice(int(col) + 20, int(col) + 60)
    band = slice(int(row) - 10, int(row) + 10)
    bright = [float((img[band, canal] > 0.7 * np.percentile(img, 99.5)).mean()) for img in images]
    assert bright[5] > 2 * max(bright[0], bright[-1])


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = make_spine_study(tmp_path / "a", 9, series=("t2_sagittal",), sagittal_slices=3)
    b = make_spine_study(tmp_path / "b", 9, series=("t2_sagittal",), sagittal_slices=3)
    c = make_spine_study(tmp_path / "c", 10, series=("t2_sagittal",), sagittal_slices=3)
    assert a.truth == b.truth and a.truth != c.truth
    for pa, pb in zip(a.paths["t2_sagittal"], b.paths["t2_sagittal"], strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        assert pa.name == pb.name and "2.25." not in pa.name


def test_classes_appear_at_about_their_prevalence() -> None:
    rng = np.random.default_rng(1)
    counts: Counter[str] = Counter()
    for _ in range(400):
        case = random_case(rng)
        counts.update(f"{LEVEL_KIND[level]}:{name}" for level, name in case.classes.items())
    discs = sum(v for k, v in counts.items() if k.startswith("disc"))
    vertebrae = sum(v for k, v in counts.items() if k.startswith("vertebra"))
    for name in CLASSES["disc"][1:]:
        assert 0.07 < counts[f"disc:{name}"] / discs < 0.2, name
    assert 0.2 < counts["vertebra:degenerated"] / vertebrae < 0.4
    with pytest.raises(ValueError, match="classes"):
        SpineCase(classes={"L1": "normal"})


def test_dataset_writes_the_challenge_annotations(tmp_path: Path) -> None:
    path = write_spine_dataset(tmp_path, 3, 2, series=("t2_sagittal",), sagittal_slices=3)
    annotations = read_annotations(path)
    assert [a.study_uid for a in annotations] == [
        pydicom.dcmread(next((tmp_path / f"study-{i:04d}").glob("*.dcm"))).StudyInstanceUID
        for i in (1, 2, 3)
    ]
    for annotation in annotations:
        assert [p.level for p in annotation.points] == list(LEVELS)
        assert {p.z_index for p in annotation.points} == {1}
