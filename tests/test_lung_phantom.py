"""The chest CT phantom: its truth, its HU and its DICOM series read back as a volume."""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mibi_node.analyses.lung.anatomy import Tissue
from mibi_node.analyses.lung.labels import LABEL_OF
from mibi_node.analyses.lung.phantom import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    LungCase,
    make_lung_case,
    write_lung_dataset,
    write_lung_study,
)
from mibi_node.imaging.volume_reader import read_volume

SMALL = (24, 96, 96)
SMALL_SPACING = (3.0, 2.0, 2.0)
BOTH = ("ground_glass_opacity", "bronchiectasis", "ground_glass_opacity")


@pytest.fixture(scope="module")
def case() -> LungCase:
    return make_lung_case(4, lesions=BOTH)


@pytest.fixture(scope="module")
def small() -> LungCase:
    return make_lung_case(5, shape=SMALL, spacing=SMALL_SPACING, lesions=2)


@pytest.fixture(scope="module")
def study(small: LungCase, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_lung_study(small, tmp_path_factory.mktemp("chest"))


def test_cases_are_deterministic_per_seed() -> None:
    one = make_lung_case(3, shape=SMALL, spacing=SMALL_SPACING)
    again = make_lung_case(3, shape=SMALL, spacing=SMALL_SPACING)
    other = make_lung_case(4, shape=SMALL, spacing=SMALL_SPACING)
    assert np.array_equal(one.image, again.image)
    assert np.array_equal(one.instances, again.instances) and one.lesions == again.lesions
    assert not np.array_equal(one.image, other.image)


def test_arrays_and_grid(case: LungCase) -> None:
    assert case.shape == DEFAULT_SHAPE and case.spacing == DEFAULT_SPACING
    assert case.image.dtype == np.float32 and case.labels.dtype == np.uint8
    assert case.instances.dtype == np.uint16
    assert case.labels.shape == case.instances.shape == case.image.shape
    assert np.array_equal(case.image, np.round(case.image))
    assert case.image.min() >= -1024 and case.image.max() <= 3071


def test_lesions_are_the_ones_asked_for_with_masks(case: LungCase) -> None:
    assert [lesion.name for lesion in case.lesions] == list(BOTH)
    assert [lesion.id for lesion in case.lesions] == [1, 2, 3]
    assert set(np.unique(case.instances)) == {0, 1, 2, 3}
    for lesion in case.lesions:
        mask = case.instances == lesion.id
        assert lesion.voxels == int(mask.sum()) > 0
        assert set(np.unique(case.labels[mask])) == {LABEL_OF[lesion.name]}
        assert lesion.side in ("R", "L")
        centre = np.array(np.nonzero(mask)).mean(axis=1) * np.array(case.spacing)
        assert np.allclose(centre, lesion.centre, atol=0.01)
        assert 4.0 <= lesion.diameter <= 32.0
        assert (lesion.ratio is not None) == (lesion.name == "bronchiectasis")
    assert np.array_equal(case.labels > 0, case.instances > 0)


@pytest.mark.parametrize("seed", range(8))
def test_drawn_lesion_counts(seed: int) -> None:
    drawn = make_lung_case(seed, shape=SMALL, spacing=SMALL_SPACING)
    assert 0 <= len(drawn.lesions) <= 4
    assert sorted(np.unique(drawn.instances)) == list(range(len(drawn.lesions) + 1))
    none = make_lung_case(seed, shape=SMALL, spacing=SMALL_SPACING, lesions=0)
    assert none.lesions == () and not none.labels.any()


def test_hu_of_tissues_and_lesions(case: LungCase) -> None:
    hu = case.image
    lung = (case.tissue == Tissue.LUNG) & (case.labels == 0)
    assert -880 <= float(np.median(hu[lung])) <= -800
    assert 20 <= float(hu[lung].std()) <= 80  # noise and the gravity gradient
    assert float(np.median(hu[case.tissue == Tissue.AIR])) < -980
    assert 0 <= float(np.median(hu[case.tissue == Tissue.SOFT])) <= 80
    assert -150 <= float(np.median(hu[case.tissue == Tissue.FAT])) <= -50
    assert float(np.median(hu[case.tissue == Tissue.BONE])) >= 400
    for lesion in case.lesions:
        mask = case.instances == lesion.id
        if lesion.name == "ground_glass_opacity":
            values = hu[mask & (case.tissue == Tissue.LUNG)]
            assert -750 <= float(values.mean()) <= -300, lesion
        else:
            wall = float(np.median(hu[mask & (case.tissue == Tissue.WALL)]))
            lumen = float(np.median(hu[mask & (case.tissue == Tissue.AIRWAY)]))
            assert wall > -350 and lumen < -800 and wall - lumen > 500, (lesion, wall, lumen)
            assert lesion.ratio is not None and lesion.ratio > 1.2


def test_bronchiectasis_is_wider_than_its_artery(case: LungCase) -> None:
    airways = case.anatomy.airways
    (n,) = [n for n, t in enumerate(airways) if t.lesion]
    tube, artery = airways[n], case.anatomy.vessels[n - 1]  # one artery per bronchus
    assert tube.radius[0] == tube.radius[1]  # no tapering
    assert tube.radius[0] / artery.radius[0] == pytest.approx(case.anatomy.ratios[tube.lesion])
    apart = np.linalg.norm(np.subtract(artery.start, tube.start))
    assert apart > tube.radius[0] + tube.wall + artery.radius[0]  # alongside, not inside
    assert tube.wall >= 1.8


def test_round_trip_through_dicom_and_the_volume_reader(small: LungCase, study: list[Path]) -> None:
    volume = read_volume(study)
    assert volume.modality == "CT" and volume.warnings == ()
    assert volume.shape == small.shape
    assert np.allclose(volume.spacing, small.spacing)
    assert np.array_equal(volume.image, small.image)
    numbers = [s.instance_number or 0 for s in volume.slices]
    assert numbers == sorted(numbers, reverse=True)  # instance 1 is the top slice
    ds = pydicom.dcmread(study[0])
    assert ds.SOPClassUID == pydicom.uid.CTImageStorage and ds.BodyPartExamined == "CHEST"
    assert ds.RescaleIntercept == -1024 and ds.RescaleSlope == 1
    assert ds.StudyDescription == "CT CHEST" and ds.Modality == "CT"
    assert "SYNTHETIC" in str(ds.PatientName) and study[0].name == "ct-0001.dcm"


def test_a_slice_passes_dciodvfy(study: list[Path], require_tool) -> None:
    tool = require_tool("dciodvfy")
    run = subprocess.run([tool, str(study[len(study) // 2])], capture_output=True, text=True)
    errors = [line for line in (run.stdout + run.stderr).splitlines() if "Error" in line]
    assert errors == []


def test_dataset_layout(tmp_path: Path) -> None:
    index = write_lung_dataset(tmp_path, 2, 7, shape=SMALL, spacing=SMALL_SPACING)
    rows = list(csv.DictReader(index.open()))
    assert [row["case"] for row in rows] == ["case-0001", "case-0002"]
    for row in rows:
        folder = tmp_path / row["case"]
        truth = np.load(folder / "labels.npz")
        volume = read_volume(sorted((folder / "dicom").glob("*.dcm")))
        case = make_lung_case(int(row["seed"]), shape=SMALL, spacing=SMALL_SPACING)
        assert np.array_equal(volume.image, case.image)
        assert np.array_equal(truth["labels"], case.labels)
        assert np.array_equal(truth["instances"], case.instances)
        assert np.allclose(truth["spacing"], SMALL_SPACING)
        counts = [int(row[name]) for name in LABEL_OF]
        assert counts == [sum(les.name == name for les in case.lesions) for name in LABEL_OF]


def test_a_thin_slice_series_of_300_slices(tmp_path: Path) -> None:
    thin = make_lung_case(1, shape=(300, 96, 96), spacing=(0.625, 2.0, 2.0), lesions=1)
    paths = write_lung_study(thin, tmp_path)
    assert len(paths) == 300
    volume = read_volume(paths)
    assert volume.shape == (300, 96, 96) and np.allclose(volume.spacing[0], 0.625)
    assert np.array_equal(volume.image, thin.image)


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match='"seed"'):
        make_lung_case(-1)
    with pytest.raises(TypeError, match='"shape"'):
        make_lung_case(0, shape=(64, 128))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match='"lesions"'):
        make_lung_case(0, lesions=["nodule"])
    with pytest.raises(ValueError, match='"shape" and "spacing"'):
        make_lung_case(0, shape=(8, 32, 32))
