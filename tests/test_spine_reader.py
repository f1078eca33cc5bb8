"""The spine reader on phantom layouts and on damaged studies."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from mibi_node.analyses.spine.phantom import make_spine_study
from mibi_node.analyses.spine.reader import read_spine_study
from mibi_node.errors import MissingPhaseError, UnusableStudyError


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory):
    return make_spine_study(tmp_path_factory.mktemp("full"), 21, sagittal_slices=5)


def _all(study) -> list[Path]:
    return [p for paths in study.paths.values() for p in paths]


def _copy(paths: list[Path], folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for path in paths:
        shutil.copy(path, folder / path.name)
        out.append(folder / path.name)
    return out


def _edit(path: Path, **changes: object) -> None:
    ds = pydicom.dcmread(path)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)


def test_all_series_shuffled(full) -> None:
    paths = _all(full)
    random.Random(1).shuffle(paths)
    inp = read_spine_study(paths)
    assert inp.middle == full.middle
    assert (
        inp.image.shape == (3, full.case.matrix, full.case.matrix) and inp.image.dtype == np.float32
    )
    assert inp.pixel_spacing == full.pixel_spacing
    assert inp.reason.startswith("orientation sagittal, TE ")
    assert [n.instance_number for n in inp.neighbours] == [2, 4]
    assert inp.warnings == ()
    raw = pydicom.dcmread(full.paths["t2_sagittal"][2]).pixel_array
    assert np.array_equal(inp.image[1], raw.astype(np.float32))


def test_only_t2_sagittal_and_five_channels(full) -> None:
    inp = read_spine_study(list(full.paths["t2_sagittal"]), channels=5)
    assert inp.image.shape[0] == 5 and inp.middle == full.middle


def test_middle_instance_option_repeats_at_the_edge(full) -> None:
    first = pydicom.dcmread(full.paths["t2_sagittal"][0], stop_before_pixels=True)
    inp = read_spine_study(_all(full), middle_sop_instance_uid=first.SOPInstanceUID)
    assert inp.middle.sop_instance_uid == first.SOPInstanceUID
    assert np.array_equal(inp.image[0], inp.image[1])  # nothing before the first slice
    assert any("repeated" in w for w in inp.warnings)
    t1 = pydicom.dcmread(full.paths["t1_sagittal"][2], stop_before_pixels=True).SOPInstanceUID
    with pytest.raises(UnusableStudyError, match="not in a T2 sagittal series: .*T1-weighted"):
        read_spine_study(_all(full), middle_sop_instance_uid=t1)


def test_misleading_descriptions_lose_to_orientation_and_timing(full, tmp_path: Path) -> None:
    paths = _copy(_all(full), tmp_path)
    for path in paths:
        key = "t2 sag" if path.name.startswith("01") else "T1 AX"  # swapped lies
        _edit(path, SeriesDescription=key, ProtocolName=None)
    inp = read_spine_study(paths)
    assert inp.middle == full.middle and inp.series_description == "T1 AX"


def test_description_decides_when_timing_is_missing(full, tmp_path: Path) -> None:
    paths = _copy(list(full.paths["t2_sagittal"]) + list(full.paths["t1_sagittal"]), tmp_path)
    for path in paths:
        _edit(path, EchoTime=None, RepetitionTime=None)
    inp = read_spine_study(paths)
    assert inp.middle == full.middle
    assert "description" in inp.reason


def test_no_sagittal_t2_lists_every_series(full) -> None:
    with pytest.raises(MissingPhaseError) as caught:  # the series may still come: the job waits
        read_spine_study(list(full.paths["t1_sagittal"]) + list(full.paths["t2_axial"]))
    assert caught.value.missing == ("T2 sagittal",) and len(caught.value.found) == 2
    message = str(caught.value)
    assert message.startswith("no T2 sagittal series: ")
    assert "is axial" in message and "T1-weighted (TE " in message


def test_truncated_file_is_named(full, tmp_path: Path) -> None:
    paths = _copy(list(full.paths["t2_sagittal"]), tmp_path)
    paths[2].write_bytes(paths[2].read_bytes()[:4000])
    with pytest.raises(UnusableStudyError, match=paths[2].name):
        read_spine_study(paths)
    paths[1].write_bytes(b"not dicom at all")
    with pytest.raises(UnusableStudyError, match=f"{paths[1].name} is damaged or not DICOM"):
        read_spine_study(paths)


def test_missing_pixel_spacing_is_named(full, tmp_path: Path) -> None:
    paths = _copy(list(full.paths["t2_sagittal"]), tmp_path)
    _edit(paths[2], PixelSpacing=None)
    with pytest.raises(UnusableStudyError, match=f"{paths[2].name} .*Pixel Spacing"):
        read_spine_study(paths)


def test_a_slice_of_another_size_is_left_out(full, tmp_path: Path) -> None:
    paths = _copy(list(full.paths["t2_sagittal"]), tmp_path)
    ds = pydicom.dcmread(paths[3])
    small = ds.pixel_array[::2, ::2].copy()
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = small.tobytes()
    ds.save_as(paths[3], enforce_file_format=True)
    inp = read_spine_study(paths)
    assert [n.instance_number for n in inp.neighbours] == [2, 5]
    assert any("another size" in w for w in inp.warnings)


def test_non_image_files_are_ignored_and_rescale_applied(full, tmp_path: Path) -> None:
    paths = _copy(list(full.paths["t2_sagittal"]), tmp_path)
    for path in paths:
        _edit(path, RescaleSlope="2", RescaleIntercept="-5")
    report = pydicom.Dataset()
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.33"
    report.SOPInstanceUID = "2.25.1"
    report.SeriesInstanceUID = "2.25.2"
    report.file_meta = pydicom.dataset.FileMetaDataset()
    report.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    pydicom.dcmwrite(tmp_path / "sr.dcm", report, enforce_file_format=True)
    inp = read_spine_study([*paths, tmp_path / "sr.dcm"])
    raw = pydicom.dcmread(paths[2]).pixel_array.astype(np.float32)
    assert np.array_equal(inp.image[1], raw * 2 - 5)
