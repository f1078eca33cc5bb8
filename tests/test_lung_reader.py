"""The chest CT reader: the series choice and the volume in HU, on written phantom series.

Each test writes a small phantom chest (24 x 80 x 80 voxels) as a real CT Image Storage
series, changes its files as a scanner or a PACS might (another kernel, a localiser, a
coronal reformat, a missing slice, a different rescale) and reads the study back.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from mibi_node.analyses.lung.phantom import make_lung_case, write_lung_study
from mibi_node.analyses.lung.reader import PART, read_lung_study
from mibi_node.errors import MissingPhaseError, UnusableStudyError

SHAPE = (24, 80, 80)


@pytest.fixture(scope="module")
def case():
    return make_lung_case(5, shape=SHAPE, lesions=["ground_glass_opacity"])


def _write(case, folder: Path, description: str = "CHEST LUNG 2.5") -> list[Path]:
    return write_lung_study(case, folder, series_description=description)


def _copy_series(paths: list[Path], folder: Path, **changes: object) -> list[Path]:
    """The series again as another series of the same study, with ``changes`` applied."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    out = []
    for path in paths:
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        target = folder / path.name
        ds.save_as(target, enforce_file_format=True)
        out.append(target)
    return out


def test_shuffled_files_give_the_phantom_in_hu_with_the_lung_series_chosen(
    case, tmp_path: Path
) -> None:
    paths = _write(case, tmp_path / "lung")
    random.Random(3).shuffle(paths)
    study = read_lung_study(paths)
    assert study.volume.shape == SHAPE
    np.testing.assert_array_equal(study.volume.image, case.image)
    assert study.volume.modality == "CT"
    np.testing.assert_allclose(study.volume.spacing, case.spacing)
    assert "24 slices" in study.reason and "lung kernel" in study.reason
    assert study.warnings == ()


def test_a_different_rescale_gives_the_same_hu(case, tmp_path: Path) -> None:
    paths = _write(case, tmp_path / "lung")
    for path in paths:
        ds = dcmread(path)
        stored = np.frombuffer(ds.PixelData, "<u2").astype(np.int32)
        hu = stored - 1024  # the phantom's rescale: slope 1, intercept -1024
        # Slope 0.5, intercept -1024: stored = (HU + 1024) * 2.
        ds.RescaleSlope, ds.RescaleIntercept = "0.5", "-1024"
        ds.PixelData = ((hu + 1024) * 2).astype("<u2").tobytes()
        ds.BitsStored, ds.HighBit = 16, 15
        ds.save_as(path, enforce_file_format=True)
    study = read_lung_study(paths)
    np.testing.assert_array_equal(study.volume.image, case.image)


def test_the_lung_kernel_is_chosen_over_soft_tissue_localiser_and_coronal(
    case, tmp_path: Path
) -> None:
    lung = _write(case, tmp_path / "lung")
    soft = _copy_series(
        lung,
        tmp_path / "soft",
        SeriesDescription="CHEST SOFT TISSUE",
        ConvolutionKernel="B30f",
        SeriesNumber=3,
    )
    scout = _copy_series(
        lung[:4], tmp_path / "scout", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"], SeriesNumber=1
    )
    coronal = _copy_series(
        lung,
        tmp_path / "coronal",
        ImageOrientationPatient=["1", "0", "0", "0", "0", "-1"],
        SeriesDescription="COR MPR",
        SeriesNumber=4,
    )
    study = read_lung_study(soft + scout + coronal + lung)
    chosen = dcmread(lung[0], stop_before_pixels=True).SeriesInstanceUID
    assert study.volume.series_instance_uid == chosen
    text = " | ".join(study.warnings)
    assert "'CHEST SOFT TISSUE' also fits, not used" in text
    assert "is a localiser; not used" in text
    assert "'COR MPR' is coronal, not axial; not used" in text


def test_without_a_lung_kernel_the_most_slices_win_with_a_warning(case, tmp_path: Path) -> None:
    thick = _write(case, tmp_path / "thick", "CHEST 5 MM")
    thin = _copy_series(thick, tmp_path / "thin", SeriesDescription="CHEST", SeriesNumber=5)
    for path in (*thick, *thin):
        ds = dcmread(path)
        ds.ConvolutionKernel = "STANDARD"
        ds.save_as(path, enforce_file_format=True)
    # Drop every other slice of the "thick" series: 12 slices of 5 mm.
    study = read_lung_study(thick[::2] + thin)
    assert study.volume.shape[0] == SHAPE[0]
    assert any("names no lung kernel" in w for w in study.warnings)


def test_a_missing_slice_is_refused_naming_the_series(case, tmp_path: Path) -> None:
    paths = _write(case, tmp_path / "lung")
    del paths[10]
    with pytest.raises(UnusableStudyError, match=r"no usable axial chest CT series: series 2"):
        read_lung_study(paths)


def test_an_exact_duplicate_slice_is_dropped_with_a_warning(case, tmp_path: Path) -> None:
    paths = _write(case, tmp_path / "lung")
    twin = tmp_path / "twin.dcm"
    ds = dcmread(paths[7])
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(twin, enforce_file_format=True)
    study = read_lung_study([*paths, twin])
    assert study.volume.shape == SHAPE
    assert any("twin.dcm repeats" in w and "dropped" in w for w in study.warnings)


def test_a_study_without_axial_ct_waits_for_it(case, tmp_path: Path) -> None:
    paths = _write(case, tmp_path / "lung")
    mr = _copy_series(paths, tmp_path / "mr", Modality="MR", SeriesDescription="MR CHEST")
    enhanced = _copy_series(
        paths[:1], tmp_path / "enh", SOPClassUID="1.2.840.10008.5.1.4.1.1.2.1", SeriesNumber=9
    )
    with pytest.raises(MissingPhaseError) as raised:
        read_lung_study(mr + enhanced)
    assert raised.value.missing == (PART,)
    message = str(raised.value)
    assert "'MR CHEST' is MR, not CT" in message
    assert "multi-frame (Enhanced CT)" in message


def test_bad_arguments_and_empty_studies(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="sequence of paths"):
        read_lung_study(tmp_path)  # type: ignore[arg-type]
    with pytest.raises(UnusableStudyError, match="no files"):
        read_lung_study([])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(UnusableStudyError):
        read_lung_study([junk])
