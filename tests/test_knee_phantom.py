"""The knee MR phantom, its DICOM study and the knee reader that chooses its 3-D series."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mibi_node.analyses.knee.anatomy import Tissue, random_anatomy, tissue_map
from mibi_node.analyses.knee.labels import LABEL_OF, STRUCTURES
from mibi_node.analyses.knee.phantom import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    KneeCase,
    make_knee_case,
    write_knee_dataset,
    write_knee_study,
)
from mibi_node.analyses.knee.reader import PART, knee_laterality, read_knee_study
from mibi_node.analyses.knee.runner import medial_toward_higher_slices
from mibi_node.errors import MissingPhaseError, UnusableStudyError
from mibi_node.imaging.volume_reader import read_volume

SMALL = (16, 64, 64)
SMALL_SPACING = (3.0, 1.4, 1.4)


@pytest.fixture(scope="module")
def case() -> KneeCase:
    return make_knee_case(8)


@pytest.fixture(scope="module")
def small() -> KneeCase:
    return make_knee_case(4, shape=SMALL, spacing=SMALL_SPACING)


@pytest.fixture(scope="module")
def study(small: KneeCase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_knee_study(small, tmp_path_factory.mktemp("knee"))


def test_cases_are_deterministic_per_seed() -> None:
    one = make_knee_case(3, shape=SMALL, spacing=SMALL_SPACING)
    again = make_knee_case(3, shape=SMALL, spacing=SMALL_SPACING)
    other = make_knee_case(4, shape=SMALL, spacing=SMALL_SPACING)
    assert np.array_equal(one.image, again.image) and np.array_equal(one.labels, again.labels)
    assert one.thickness == again.thickness and one.defects == again.defects
    assert not np.array_equal(one.image, other.image)


def test_arrays_labels_and_grid(case: KneeCase) -> None:
    assert case.shape == DEFAULT_SHAPE and case.spacing == DEFAULT_SPACING
    assert case.image.dtype == np.float32 and case.labels.dtype == np.uint8
    assert case.labels.shape == case.image.shape
    assert np.array_equal(case.image, np.round(case.image))  # the stored 12-bit values
    assert case.image.min() >= 0 and case.image.max() <= 4095
    assert set(np.unique(case.labels)) == {0, *LABEL_OF.values()}
    counts = np.bincount(case.labels.ravel(), minlength=5)
    assert all(counts[LABEL_OF[name]] > 500 for name in STRUCTURES)
    assert case.side in ("L", "R")
    # cartilage is brighter than the bulk of the knee and darker than fluid on average
    cartilage = float(case.image[case.labels > 0].mean())
    assert 0.6 * case.image.max() > cartilage > 2 * float(np.median(case.image))


def _run_above_contact(labels: np.ndarray, row_mm: float) -> np.ndarray:
    """Femoral thickness (mm) along the rows above each femoral voxel lying on tibial cartilage."""
    femoral = labels == LABEL_OF["femoral_cartilage"]
    tibial = np.isin(labels, [LABEL_OF[name] for name in STRUCTURES[1:3]])
    out = []
    for k, j, i in zip(*np.nonzero(femoral[:, :-1] & tibial[:, 1:]), strict=True):
        n = 0
        while j - n >= 0 and femoral[k, j - n, i]:
            n += 1
        out.append(n * row_mm)
    return np.array(out)


def test_plate_thickness_measured_on_the_labels_matches_the_truth(case: KneeCase) -> None:
    _, row_mm, col_mm = case.spacing
    measured = {}
    for name in STRUCTURES[1:]:
        plate = case.labels == LABEL_OF[name]
        axis = 2 if name == "patellar_cartilage" else 1  # the plate's normal: AP or SI
        counts = plate.sum(axis=axis)
        measured[name] = float(np.median(counts[counts > 0])) * (col_mm if axis == 2 else row_mm)
    measured["femoral_cartilage"] = float(np.median(_run_above_contact(case.labels, row_mm)))
    for name, value in measured.items():
        assert 1.5 <= value <= 3.3, (name, value)
        assert abs(value - case.thickness[name]) <= 0.85, (name, value, case.thickness[name])
    assert all(1.5 <= value <= 3.0 for value in case.thickness.values())


def test_femoral_and_tibial_cartilage_touch_in_both_compartments(case: KneeCase) -> None:
    femoral = case.labels == LABEL_OF["femoral_cartilage"]
    for name in STRUCTURES[1:3]:
        tibial = case.labels == LABEL_OF[name]
        touching = (femoral[:, :-1] & tibial[:, 1:]).sum()
        assert touching > 20, name


@pytest.mark.parametrize("side", ["L", "R"])
def test_slices_run_toward_the_patients_right(side: str) -> None:
    knee = make_knee_case(2, shape=SMALL, spacing=SMALL_SPACING, side=side)
    k = np.arange(SMALL[0])[:, None, None]
    medial = float((k * (knee.labels == 2)).sum() / (knee.labels == 2).sum())
    lateral = float((k * (knee.labels == 3)).sum() / (knee.labels == 3).sum())
    # a right knee's lateral side is toward the patient's right (higher slice index)
    assert (lateral > medial) == (side == "R")


def test_a_full_thickness_defect_leaves_no_cartilage() -> None:
    for seed in range(200):
        anatomy = random_anatomy(np.random.default_rng(seed), defect_rate=2.0)
        full = [d for d in anatomy.defects if d.kind == "full_thickness"]
        if full:
            break
    defect = full[0]
    grid = np.linspace(-0.9, 0.9, 9, dtype=np.float32) * np.float32(defect.radius)
    x, y, z = np.meshgrid(*(grid + np.float32(c) for c in defect.centre), indexing="ij")
    inside = (x - defect.centre[0]) ** 2 + (y - defect.centre[1]) ** 2 + (
        z - defect.centre[2]
    ) ** 2 < (0.95 * defect.radius) ** 2
    label = Tissue.FEMORAL + STRUCTURES.index(defect.structure)
    with_defect, _ = tissue_map(anatomy, x, y, z)
    without, _ = tissue_map(dataclasses.replace(anatomy, defects=()), x, y, z)
    assert (without[inside] == label).sum() > 5
    assert (with_defect[inside] == label).sum() == 0


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match='"seed"'):
        make_knee_case(-1)
    with pytest.raises(ValueError, match='"shape"'):
        make_knee_case(0, shape=(2, 64, 64))
    with pytest.raises(ValueError, match='"side"'):
        make_knee_case(0, shape=SMALL, spacing=SMALL_SPACING, side="X")


@pytest.mark.peers
def test_written_slices_pass_dciodvfy(study: list[Path], require_tool) -> None:
    dciodvfy = require_tool("dciodvfy")
    for path in (study[0], study[-1]):  # a sagittal slice and a coronal one
        run = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, timeout=60)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
        assert errors == [], f"{path.name}: {errors}"


def test_study_tags(small: KneeCase, study: list[Path]) -> None:
    sagittal = [p for p in study if p.name.startswith("01-")]
    assert len(sagittal) == SMALL[0] and len(study) == SMALL[0] + 5
    ds = pydicom.dcmread(sagittal[0])
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.4" and ds.Modality == "MR"
    assert ds.MRAcquisitionType == "3D" and ds.BodyPartExamined == "KNEE"
    assert ds.ImageLaterality == small.side
    assert ds.StudyDescription == f"MR KNEE {'LEFT' if small.side == 'L' else 'RIGHT'}"
    assert [float(v) for v in ds.ImageOrientationPatient] == [0, 1, 0, 0, 0, -1]
    assert float(ds.SpacingBetweenSlices) == SMALL_SPACING[0]
    assert [float(v) for v in ds.PixelSpacing] == list(SMALL_SPACING[1:])
    assert all(ds.PatientID not in p.name and "KNEE" not in p.name for p in study)


def test_round_trip_gives_back_the_image_and_the_label_grid(
    small: KneeCase, study: list[Path]
) -> None:
    shuffled = list(reversed(study))
    knee = read_knee_study(shuffled)
    volume = knee.volume
    assert np.array_equal(volume.image, small.image)
    assert volume.shape == small.labels.shape
    assert volume.spacing == pytest.approx(small.spacing)
    assert knee.reason.startswith(f"sagittal, 3-D, {SMALL[0]} slices")
    assert any("'COR PD TSE' is coronal" in w for w in knee.warnings)
    assert [s.instance_number for s in volume.slices] == list(range(1, SMALL[0] + 1))


@pytest.mark.parametrize("side", ["L", "R"])
def test_the_read_side_and_normal_find_the_phantoms_medial_plate(side: str, tmp_path: Path) -> None:
    knee = make_knee_case(2, shape=SMALL, spacing=SMALL_SPACING, side=side)
    study = read_knee_study(write_knee_study(knee, tmp_path, extra_series=False))
    assert study.laterality == side
    k = np.arange(SMALL[0])[:, None, None]
    medial, lateral = (knee.labels == LABEL_OF[name] for name in STRUCTURES[1:3])
    toward_higher = (k * medial).sum() / medial.sum() > (k * lateral).sum() / lateral.sum()
    assert medial_toward_higher_slices(study) == (toward_higher, "")


def _headers(**values: str) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("headers", "side"),
    [
        ({"Laterality": "R"}, "R"),
        ({"ImageLaterality": "L", "StudyDescription": "MR KNEE LEFT"}, "L"),
        ({"ImageLaterality": "B"}, None),  # both: no side
        ({"ImageLaterality": "U", "BodyPartExamined": "KNEE"}, None),
        ({"SeriesDescription": "sag_dess_right"}, "R"),
        ({"StudyDescription": "MRT Knie links"}, "L"),
        ({"StudyDescription": "IRM GENOU DROIT"}, "R"),
        ({"StudyDescription": "IRM genou gauche"}, "L"),
        ({"StudyDescription": "RM ginocchio sinistro"}, "L"),
        ({"StudyDescription": "RM rodilla derecha"}, "R"),
        ({"StudyDescription": "右膝 MRI"}, "R"),
        ({"StudyDescription": "左膝关节"}, "L"),
        ({"StudyDescription": "KNEE LEFTOVER SERIES", "SeriesDescription": "BRIGHTNESS"}, None),
        ({}, None),
    ],
)
def test_the_knee_side_comes_from_the_headers(headers: dict[str, str], side: str | None) -> None:
    assert knee_laterality(_headers(**headers)) == (side, "")


def test_headers_that_disagree_leave_the_side_unknown(study: list[Path], tmp_path: Path) -> None:
    found, warning = knee_laterality(_headers(Laterality="L", StudyDescription="KNEE RIGHT"))
    assert found is None
    assert warning == (
        "the headers disagree on the knee's side "
        "(Laterality left, StudyDescription 'KNEE RIGHT' right)"
    )
    assert knee_laterality(_headers(SeriesDescription="LEFT vs RIGHT"))[0] is None
    paths = []
    for path in (p for p in study if p.name.startswith("01-")):
        ds = pydicom.dcmread(path)
        ds.Laterality = "R" if ds.ImageLaterality == "L" else "L"
        paths.append(tmp_path / path.name)
        ds.save_as(paths[-1])
    knee = read_knee_study(paths)
    assert knee.laterality is None
    assert any(w.startswith("the headers disagree on the knee's side") for w in knee.warnings)


def test_only_the_distractor_raises_missing_phase(study: list[Path]) -> None:
    with pytest.raises(MissingPhaseError) as caught:  # the 3-D series may still come
        read_knee_study([p for p in study if p.name.startswith("02-")])
    assert caught.value.missing == (PART,)
    assert str(caught.value).startswith(f"no {PART}: series 2 'COR PD TSE' is coronal")


def test_a_sagittal_series_with_a_gap_is_unusable(study: list[Path]) -> None:
    holed = [p for p in study if p.name != "01-sag-3d-007.dcm"]
    with pytest.raises(UnusableStudyError, match=r"no usable .*'SAG 3D DESS': gap") as caught:
        read_knee_study(holed)
    assert not isinstance(caught.value, MissingPhaseError)


def test_a_3d_series_is_preferred_to_a_longer_2d_one(small: KneeCase, tmp_path: Path) -> None:
    paths = write_knee_study(small, tmp_path / "a", extra_series=False)
    longer = write_knee_study(
        make_knee_case(5, shape=(20, 64, 64), spacing=SMALL_SPACING), tmp_path / "b",
        extra_series=False, series_description="SAG PD 2D",
    )  # fmt: skip
    for path in longer:
        ds = pydicom.dcmread(path)
        ds.MRAcquisitionType = "2D"
        ds.StudyInstanceUID = pydicom.dcmread(paths[0]).StudyInstanceUID
        ds.SeriesNumber = 3
        ds.SeriesInstanceUID = ds.SeriesInstanceUID + ".3"
        ds.save_as(path)
    knee = read_knee_study([*longer, *paths])
    assert knee.volume.shape[0] == SMALL[0]
    assert any("'SAG PD 2D' also fits, not used" in w for w in knee.warnings)


def test_dataset_layout(tmp_path: Path) -> None:
    index = write_knee_dataset(tmp_path, 2, 7, shape=SMALL, spacing=SMALL_SPACING)
    rows = list(csv.DictReader(index.open()))
    assert [row["case"] for row in rows] == ["case-0001", "case-0002"]
    assert set(rows[0]) >= {"side", "seed", "defects", *(f"{n}_mm" for n in STRUCTURES)}
    for row in rows:
        folder = tmp_path / row["case"]
        truth = np.load(folder / "labels.npz")
        volume = read_volume(sorted((folder / "dicom").glob("*.dcm")))
        assert truth["labels"].shape == volume.shape and truth["labels"].dtype == np.uint8
        assert tuple(truth["spacing"]) == pytest.approx(volume.spacing)
        again = make_knee_case(int(row["seed"]), shape=SMALL, spacing=SMALL_SPACING)
        assert np.array_equal(volume.image, again.image)
        assert np.array_equal(truth["labels"], again.labels)
