"""The thyroid phantom, its reader and the classical measurements, on small real files."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmwrite

from mibi_node.analyses.thyroid.measure import measure_thyroid
from mibi_node.analyses.thyroid.phantom import (
    MIXTURES,
    assign_findings,
    generate_thyroid_studies,
    make_thyroid_study,
)
from mibi_node.analyses.thyroid.reader import read_thyroid_study
from mibi_node.analyses.thyroid.result import FINDINGS
from mibi_node.errors import UnusableStudyError


def _write(study, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, ds in enumerate(study.datasets):
        path = folder / f"{i:02d}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _regions() -> tuple[np.ndarray, np.ndarray]:
    """Thyroid and salivary masks from the normal study: a seed fixes the anatomy."""
    normal = make_thyroid_study(3, ["normal"], pinhole=False, with_markers=False, extra_view=False)
    image = normal.image
    smooth = image.astype(float)
    rows = np.arange(image.shape[0])[:, None]
    peak_row = int(np.argmax(smooth.sum(axis=1)))
    thyroid = (smooth > 0.4 * smooth.max()) & (np.abs(rows - peak_row) < 20)
    salivary = (smooth > 0.25 * smooth.max()) & (rows < peak_row - 20)
    return thyroid, salivary


def _ratio(findings: list[str]) -> tuple[float, float]:
    thyroid, salivary = _regions()
    study = make_thyroid_study(3, findings, pinhole=False, with_markers=False, extra_view=False)
    return float(study.image[thyroid].mean()), float(study.image[salivary].mean())


@pytest.mark.peers
def test_phantom_passes_dciodvfy(tmp_path: Path, require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    study = make_thyroid_study(5, ["graves", "cold_nodule"], with_markers=True, extra_view=True)
    frame_study = next(
        s
        for s in (make_thyroid_study(i, ["normal"], with_markers=True) for i in range(20))
        if int(s.datasets[0].NumberOfFrames) > 1
    )
    paths = _write(study, tmp_path / "a") + _write(frame_study, tmp_path / "b")
    assert len(paths) >= 3
    for path in paths:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        errors = [
            line
            for line in (result.stdout + result.stderr).splitlines()
            if line.startswith("Error")
        ]
        assert errors == [], f"{path.name}: {errors}"


def test_findings_have_their_characteristic_features() -> None:
    normal_t, normal_s = _ratio(["normal"])
    graves_t, graves_s = _ratio(["graves"])
    thyroiditis_t, thyroiditis_s = _ratio(["thyroiditis"])
    assert graves_t > 2.0 * normal_t
    assert graves_t / graves_s > 2.0 * normal_t / normal_s  # salivary glands relatively faint
    assert thyroiditis_t / thyroiditis_s < 0.5 < normal_t / normal_s
    normal = make_thyroid_study(3, ["normal"], pinhole=False, with_markers=False, extra_view=False)
    graves = make_thyroid_study(3, ["graves"], pinhole=False, with_markers=False, extra_view=False)
    assert graves.image.sum() > 1.5 * normal.image.sum()
    adenoma = make_thyroid_study(3, ["toxic_adenoma"], pinhole=False, with_markers=False)
    assert [n.kind for n in adenoma.nodules] == ["hot"]
    goitre = make_thyroid_study(3, ["toxic_multinodular_goitre"], with_markers=False)
    kinds = [n.kind for n in goitre.nodules]
    assert kinds.count("hot") >= 2 and kinds.count("cold") >= 1
    assert normal.nodules == () and normal.findings == ("normal",)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_measure_finds_the_cold_nodule(seed: int) -> None:
    study = make_thyroid_study(seed, ["cold_nodule"], index=seed, pinhole=False)
    (truth,) = study.nodules
    _, found = measure_thyroid(study.image)
    cold = [n for n in found if n.kind == "cold"]
    assert cold, found
    nearest = min(cold, key=lambda n: np.hypot(n.row - truth.row, n.col - truth.col))
    assert np.hypot(nearest.row - truth.row, nearest.col - truth.col) < max(4.0, truth.radius)
    assert nearest.lobe == truth.lobe


def test_measure_finds_the_toxic_adenoma() -> None:
    for seed in range(3):
        study = make_thyroid_study(seed, ["toxic_adenoma"], index=seed, with_markers=True)
        (truth,) = study.nodules
        _, found = measure_thyroid(study.image)
        hot = [n for n in found if n.kind == "hot"]
        assert any(np.hypot(n.row - truth.row, n.col - truth.col) < 4 for n in hot), found


@pytest.mark.parametrize(
    "findings", [["normal"], ["graves"], ["cold_nodule"], ["graves", "cold_nodule"]]
)
def test_measure_lobe_split_matches_truth(findings: list[str]) -> None:
    for seed in range(4):
        study = make_thyroid_study(seed, findings, index=seed, with_markers=seed % 2 == 0)
        uptake, _ = measure_thyroid(study.image)
        assert uptake["right"] + uptake["left"] == pytest.approx(1.0)
        assert abs(uptake["right"] - study.lobe_uptake["right"]) < 0.05, (seed, study.pinhole)


def test_reader_picks_the_anterior_image(tmp_path: Path) -> None:
    seen = set()
    for seed in range(12):
        study = make_thyroid_study(
            seed, ["cold_nodule"], index=seed, with_markers=True, extra_view=True
        )
        frames = int(study.datasets[0].NumberOfFrames)
        seen.add((len(study.datasets), frames))
        paths = _write(study, tmp_path / f"s{seed}")
        paths.reverse()  # the extra view and the marker series come first
        read = read_thyroid_study(paths)
        image = read.images["thyroid"]
        assert image.sop_instance_uid == study.datasets[0].SOPInstanceUID
        assert image.frame_number == 1  # NM images are multi-frame by IOD
        assert np.array_equal(image.pixels, study.image)
        assert image.pixel_spacing == pytest.approx((study.pixel_spacing_mm,) * 2)
        assert read.study_instance_uid == study.datasets[0].StudyInstanceUID
    assert (2, 2) in seen and any(n == 3 for n, _ in seen)  # frame and series markers both ran


def test_reader_errors_are_clear(tmp_path: Path) -> None:
    study = make_thyroid_study(4, ["normal"], with_markers=True, extra_view=True)
    paths = _write(study, tmp_path / "s")
    broken = tmp_path / "broken.dcm"
    data = paths[0].read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnusableStudyError, match=r"broken\.dcm: damaged"):
        read_thyroid_study([broken])
    text = tmp_path / "notes.txt"
    text.write_text("not dicom")
    with pytest.raises(UnusableStudyError, match=r"notes\.txt"):
        read_thyroid_study([text])
    for seed in range(30):
        other = make_thyroid_study(seed, ["normal"], index=seed, with_markers=True, extra_view=True)
        if len(other.datasets) == 3 and "WIDE" not in other.datasets[2].SeriesDescription:
            break
    files = _write(other, tmp_path / "o")
    with pytest.raises(UnusableStudyError, match=r"No anterior thyroid image.*marker.*oblique"):
        read_thyroid_study(files[1:])
    with pytest.raises(UnusableStudyError, match="does not exist"):
        read_thyroid_study([tmp_path / "missing.dcm"])
    with pytest.raises(TypeError, match='"paths"'):
        read_thyroid_study(str(paths[0]))  # type: ignore[arg-type]


def test_generate_writes_files_and_labels(tmp_path: Path) -> None:
    rows = generate_thyroid_studies(tmp_path, 4, seed=2, matrix=64)
    with (tmp_path / "labels.csv").open(newline="") as handle:
        written = list(csv.DictReader(handle))
    assert written == rows and len(rows) == 4
    assert list(written[0]) == [
        "folder",
        "findings",
        "study_instance_uid",
        "right_uptake",
        "pinhole",
    ]
    for row in rows:
        files = sorted((tmp_path / row["folder"]).glob("*.dcm"))
        assert files and all("2.25" not in f.name for f in files)
        assert read_thyroid_study(files).study_instance_uid == row["study_instance_uid"]
        assert 0.0 <= float(row["right_uptake"]) <= 1.0 and row["pinhole"] in ("0", "1")
        assert all(f in FINDINGS for f in row["findings"].split(";"))


def test_assign_findings_balances_singles_and_mixtures() -> None:
    labels = assign_findings(20, seed=1, mixed_fraction=0.3)
    singles = [x for x in labels if len(x) == 1]
    assert len(labels) == 20 and len(singles) == 14
    assert {x[0] for x in singles} == set(FINDINGS)
    assert {x for x in labels if len(x) > 1} == set(MIXTURES)
    assert labels == assign_findings(20, seed=1, mixed_fraction=0.3)


def test_deterministic_for_a_seed() -> None:
    a = make_thyroid_study(9, ["toxic_multinodular_goitre"], index=2)
    b = make_thyroid_study(9, ["toxic_multinodular_goitre"], index=2)
    assert np.array_equal(a.image, b.image) and a.nodules == b.nodules
    assert [ds.SOPInstanceUID for ds in a.datasets] == [ds.SOPInstanceUID for ds in b.datasets]
    assert a.datasets[0].PixelData == b.datasets[0].PixelData
    c = make_thyroid_study(10, ["toxic_multinodular_goitre"], index=2)
    assert not np.array_equal(a.image, c.image)


def test_arguments_are_validated() -> None:
    with pytest.raises(ValueError, match='"findings"'):
        make_thyroid_study(1, ["normal", "graves"])
    with pytest.raises(ValueError, match='"findings"'):
        make_thyroid_study(1, ["goitre"])
    with pytest.raises(ValueError, match='"matrix"'):
        make_thyroid_study(1, ["normal"], matrix=8)
