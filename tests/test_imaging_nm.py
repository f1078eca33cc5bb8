"""The NM/SC reader: every phantom layout round-trips, real files decode, bad studies explain."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from factory import nm_dataset
from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.nm import read_datasets, read_study
from mibi_node.phantom import generate_studies, make_study


@pytest.mark.parametrize("layout", ["separate-series", "single-series", "multiframe"])
@pytest.mark.parametrize("thyroid", [False, True])
def test_every_phantom_layout_round_trips(layout: str, thyroid: bool) -> None:
    study = make_study("adenoma", seed=5, index=1, layout=layout, with_thyroid_scan=thyroid)
    required = ("early", "delayed", "thyroid") if thyroid else ("early", "delayed")
    result = read_datasets(list(study.datasets), required=required)
    assert set(result.images) == set(required)
    assert result.study_instance_uid == study.study_instance_uid
    for phase in required:
        image = result.images[phase]
        assert image.pixels.dtype == np.float32
        np.testing.assert_array_equal(image.pixels, study.images[phase])
        assert (image.sop_instance_uid, image.frame_number) == study.sources[phase]
        assert image.pixel_spacing == pytest.approx(
            (study.parameters.pixel_spacing_mm,) * 2, abs=1e-4
        )  # DS holds 16 characters
    assert result.warnings == ()


def test_read_study_from_folder_written_by_the_generator(tmp_path: Path) -> None:
    [study] = generate_studies(tmp_path, 1, seed=11, layout="multiframe")
    result = read_study([tmp_path / "study-0001"])
    np.testing.assert_array_equal(result.images["delayed"].pixels, study.images["delayed"])


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "JPGExtended.dcm"])
def test_pydicom_compressed_nm_files_decode(name: str) -> None:
    path = get_testdata_file(name)
    assert path is not None
    result = read_study([path], required=("early",))
    pixels = result.images["early"].pixels
    assert pixels.ndim == 2 and pixels.max() > 0


def test_a_corrupt_jpeg_gives_a_readable_error() -> None:
    # pydicom ships JPEG-lossy.dcm with a misplaced JPEG marker (JPGExtended.dcm is the fix).
    path = get_testdata_file("JPEG-lossy.dcm")
    assert path is not None
    with pytest.raises(UnusableStudyError, match="cannot be decoded"):
        read_study([path], required=("early",))


def _phase_dataset(study_uid: str, description: str, seed: int, **changes: object) -> Dataset:
    ds = nm_dataset(study_uid, seed=seed, frames=1)
    ds.SeriesDescription = description
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    return ds


@pytest.mark.parametrize(
    ("early", "delayed"),
    [
        ("EARLY 10MIN ANT", "DELAYED 2H ANT"),
        ("Frühaufnahme 15 min", "Spätaufnahme 2h"),
        ("MIBI 20 min", "MIBI 120 min"),
        ("precoce", "tardive"),
    ],
)
def test_phase_from_descriptions(early: str, delayed: str) -> None:
    uid = generate_uid()
    result = read_datasets([_phase_dataset(uid, delayed, 2), _phase_dataset(uid, early, 1)])
    assert result.images["early"].sop_instance_uid != result.images["delayed"].sop_instance_uid
    assert result.images["delayed"].pixels.sum() == pytest.approx(
        np.frombuffer(_phase_dataset(uid, delayed, 2).PixelData, np.uint16).sum()
    )


def test_phase_from_time_after_injection() -> None:
    uid = generate_uid()
    item = Dataset()
    item.RadiopharmaceuticalStartDateTime = "20260101080000"
    first = _phase_dataset(uid, "ANT", 1, AcquisitionDate="20260101", AcquisitionTime="081500")
    second = _phase_dataset(uid, "ANT", 2, AcquisitionDate="20260101", AcquisitionTime="100000")
    for ds in (first, second):
        ds.RadiopharmaceuticalInformationSequence = [copy.deepcopy(item)]
    result = read_datasets([second, first])
    assert result.images["early"].sop_instance_uid == first.SOPInstanceUID
    assert result.images["delayed"].sop_instance_uid == second.SOPInstanceUID


def test_phase_from_series_order_with_a_warning() -> None:
    uid = generate_uid()
    first = _phase_dataset(uid, "ANT", 1, SeriesNumber=1)
    second = _phase_dataset(uid, "ANT", 2, SeriesNumber=2)
    result = read_datasets([second, first])
    assert result.images["early"].sop_instance_uid == first.SOPInstanceUID
    assert any("series order" in warning for warning in result.warnings)


def _screen_capture(study_uid: str, description: str, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.SeriesDescription = description
    ds.Rows, ds.Columns = 64, 64
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(1, 255, size=(64, 64, 3), dtype=np.uint8).tobytes()
    return ds


def test_screen_captures_become_grayscale_with_a_warning() -> None:
    uid = generate_uid()
    result = read_datasets([_screen_capture(uid, "EARLY", 1), _screen_capture(uid, "DELAYED", 2)])
    assert result.images["early"].pixels.shape == (64, 64)
    assert result.images["early"].frame_number is None
    assert any("screen capture" in warning for warning in result.warnings)


def test_mismatched_sizes_are_resampled_keeping_counts() -> None:
    uid = generate_uid()
    early = _phase_dataset(uid, "EARLY", 1, PixelSpacing=[4.0, 4.0])
    delayed = nm_dataset(uid, seed=2, frames=1, rows=32, columns=32)
    delayed.SeriesDescription = "DELAYED"
    delayed.PixelSpacing = [8.0, 8.0]
    result = read_datasets([early, delayed])
    assert result.images["delayed"].pixels.shape == (64, 64)
    original = np.frombuffer(delayed.PixelData, np.uint16).sum()
    assert result.images["delayed"].pixels.sum() == pytest.approx(original, rel=0.05)
    assert any("resampled" in warning for warning in result.warnings)


def test_unusable_studies_explain_themselves(tmp_path: Path) -> None:
    uid = generate_uid()
    with pytest.raises(UnusableStudyError, match="needs the delayed image"):
        read_datasets([_phase_dataset(uid, "EARLY 10MIN", 1)])
    ct = nm_dataset(uid, seed=3, sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    with pytest.raises(UnusableStudyError, match="no NM or Secondary Capture image"):
        read_datasets([ct])
    with pytest.raises(UnusableStudyError, match="2 different studies"):
        read_datasets(
            [_phase_dataset(uid, "EARLY", 1), _phase_dataset(generate_uid(), "DELAYED", 2)]
        )
    zero = _phase_dataset(uid, "DELAYED", 2)
    zero.PixelData = bytes(len(zero.PixelData))
    with pytest.raises(UnusableStudyError, match="delayed image is empty"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), zero])
    small = nm_dataset(uid, seed=4, frames=1, rows=32, columns=32)
    small.SeriesDescription = "DELAYED"
    with pytest.raises(UnusableStudyError, match="different matrix sizes"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), small])
    iodine = _phase_dataset(uid, "DELAYED", 2)
    window, limits = Dataset(), Dataset()
    limits.EnergyWindowLowerLimit, limits.EnergyWindowUpperLimit = "143", "175"
    window.EnergyWindowRangeSequence = [limits]
    iodine.EnergyWindowInformationSequence = [window]
    with pytest.raises(UnusableStudyError, match="needs the delayed image"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), iodine])
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(UnusableStudyError, match="none of the files is a readable DICOM"):
        read_study([tmp_path / "junk.dcm"])
    with pytest.raises(UnusableStudyError, match="no such file"):
        read_study([tmp_path / "missing"])
