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


def test_the_jpeg_with_a_bad_start_of_scan_is_repaired() -> None:
    # pydicom ships JPEG-lossy.dcm with Se=0 in its start-of-scan (JPGExtended.dcm is the
    # same image written correctly); the reader corrects the byte and decodes it.
    lossy, fixed = get_testdata_file("JPEG-lossy.dcm"), get_testdata_file("JPGExtended.dcm")
    assert lossy is not None and fixed is not None
    repaired = read_study([lossy], required=("early",)).images["early"]
    reference = read_study([fixed], required=("early",)).images["early"]
    assert repaired.pixels.shape == (1024, 256)
    np.testing.assert_array_equal(repaired.pixels, reference.pixels)


def test_compressed_screen_captures_carry_the_screen_capture_warning() -> None:
    path = get_testdata_file("JPEG2000.dcm")
    assert path is not None
    result = read_study([path], required=("early",))
    assert any("screen capture" in warning for warning in result.warnings)
    assert result.images["early"].frame_number == 1  # it has Number of Frames


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
    with pytest.raises(UnusableStudyError, match="Only the early image.*delayed image is missing"):
        read_datasets([_phase_dataset(uid, "EARLY 10MIN", 1)])
    with pytest.raises(UnusableStudyError, match="the early image is missing"):
        read_datasets([_phase_dataset(uid, "DELAYED 2H", 1)])
    ct = nm_dataset(uid, seed=3, sop_class_uid="1.2.840.10008.5.1.4.1.1.2")
    ct.Modality = "CT"
    with pytest.raises(UnusableStudyError, match="no NM or Secondary Capture images.*CT"):
        read_datasets([ct])
    with pytest.raises(UnusableStudyError, match="2 different studies"):
        read_datasets(
            [_phase_dataset(uid, "EARLY", 1), _phase_dataset(generate_uid(), "DELAYED", 2)]
        )
    zero = _phase_dataset(uid, "DELAYED", 2)
    zero.PixelData = bytes(len(zero.PixelData))
    with pytest.raises(UnusableStudyError, match="delayed image .* is empty"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), zero])
    saturated = _phase_dataset(uid, "DELAYED", 2)
    pixels = np.frombuffer(saturated.PixelData, np.uint16).copy()
    pixels[: pixels.size // 10] = 65535
    saturated.PixelData = pixels.tobytes()
    with pytest.raises(UnusableStudyError, match="delayed image .* is saturated: 10%"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), saturated])
    small = nm_dataset(uid, seed=4, frames=1, rows=32, columns=32)
    small.SeriesDescription = "DELAYED"
    with pytest.raises(UnusableStudyError, match="do not give the pixel spacing"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), small])
    with pytest.raises(UnusableStudyError, match="99mTc energy window.*143-175 keV"):
        read_datasets([_iodine(_phase_dataset(uid, "EARLY", 1))])
    with pytest.raises(UnusableStudyError, match="delayed image is missing"):
        read_datasets([_phase_dataset(uid, "EARLY", 1), _iodine(_phase_dataset(uid, "LATE", 2))])
    (tmp_path / "junk.dcm").write_bytes(b"not dicom at all")
    with pytest.raises(UnusableStudyError, match="No DICOM files were found"):
        read_study([tmp_path / "junk.dcm"])
    with pytest.raises(UnusableStudyError, match="does not exist"):
        read_study([tmp_path / "missing"])


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match='"required"'):
        read_datasets([], required=("early", "late"))
    with pytest.raises(TypeError, match='"paths"'):
        read_study("study-0001")  # type: ignore[arg-type]


def _iodine(ds: Dataset) -> Dataset:
    window, limits = Dataset(), Dataset()
    limits.EnergyWindowLowerLimit, limits.EnergyWindowUpperLimit = "143", "175"
    window.EnergyWindowRangeSequence = [limits]
    ds.EnergyWindowInformationSequence = [window]
    return ds


def _multiframe() -> tuple[Dataset, dict[str, np.ndarray]]:
    study = make_study("carcinoma", seed=8, index=2, layout="multiframe")
    [ds] = study.datasets
    return copy.deepcopy(ds), study.images


def test_the_tc99m_window_is_picked_among_several() -> None:
    ds, images = _multiframe()
    frames = np.frombuffer(ds.PixelData, np.uint16).reshape(4, 128, 128)
    scatter = (frames // 3).astype(np.uint16)
    ds.PixelData = np.concatenate([scatter, frames]).tobytes()  # window 1 = scatter
    ds.NumberOfFrames = 8
    ds.EnergyWindowVector = [1] * 4 + [2] * 4
    ds.DetectorVector = list(ds.DetectorVector) * 2
    ds.PhaseVector = list(ds.PhaseVector) * 2
    ds.TimeSliceVector = [1] * 8
    ds.NumberOfEnergyWindows = 2
    low, limits = Dataset(), Dataset()
    limits.EnergyWindowLowerLimit, limits.EnergyWindowUpperLimit = "105", "125"
    low.EnergyWindowRangeSequence = [limits]
    ds.EnergyWindowInformationSequence = [low, ds.EnergyWindowInformationSequence[0]]
    result = read_datasets([ds])
    assert result.images["early"].frame_number == 5
    assert result.images["delayed"].frame_number == 6
    np.testing.assert_array_equal(result.images["delayed"].pixels, images["delayed"])


def test_the_anterior_head_is_picked_by_view_code_else_detector_one() -> None:
    ds, images = _multiframe()
    heads = ds.DetectorInformationSequence
    heads[0].ViewCodeSequence, heads[1].ViewCodeSequence = (
        heads[1].ViewCodeSequence,
        heads[0].ViewCodeSequence,
    )  # head 2 is now the anterior one
    result = read_datasets([ds])
    assert (result.images["early"].frame_number, result.images["delayed"].frame_number) == (3, 4)
    for item in heads:
        del item.ViewCodeSequence
    result = read_datasets([ds])
    assert (result.images["early"].frame_number, result.images["delayed"].frame_number) == (1, 2)
    np.testing.assert_array_equal(result.images["early"].pixels, images["early"])


def test_time_slices_of_one_phase_are_summed() -> None:
    uid = generate_uid()
    early = nm_dataset(uid, seed=6, frames=4)
    early.SeriesDescription = "EARLY 10MIN ANT"
    early.FrameIncrementPointer = [0x00540010, 0x00540020, 0x00540030, 0x00540100]
    early.EnergyWindowVector = early.DetectorVector = early.PhaseVector = [1] * 4
    early.TimeSliceVector = [1, 2, 3, 4]
    result = read_datasets([early, _phase_dataset(uid, "DELAYED 2H ANT", 2)])
    frames = np.frombuffer(early.PixelData, np.uint16).reshape(4, 64, 64)
    np.testing.assert_array_equal(result.images["early"].pixels, frames.sum(axis=0))
    assert result.images["early"].frame_number == 1
    assert any("sum of 4 frames" in warning for warning in result.warnings)


def test_a_multiframe_grayscale_screen_capture_splits_by_frame_order() -> None:
    uid = generate_uid()
    ds = _screen_capture(uid, "", 3)
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # multi-frame grayscale byte SC
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    del ds.PlanarConfiguration
    ds.NumberOfFrames = 2
    frames = np.random.default_rng(3).integers(1, 200, size=(2, 64, 64), dtype=np.uint8)
    ds.PixelData = frames.tobytes()
    result = read_datasets([ds])
    assert (result.images["early"].frame_number, result.images["delayed"].frame_number) == (1, 2)
    np.testing.assert_array_equal(result.images["delayed"].pixels, frames[1])
    assert any("screen capture" in warning for warning in result.warnings)
    assert any("series order" in warning for warning in result.warnings)
