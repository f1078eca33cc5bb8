"""The shared 3-D volume reader: sorting, geometry, rescaling and every refusal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread, dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from mibi_node.errors import UnusableStudyError
from mibi_node.imaging.volume_reader import group_series, read_volume

ROWS, COLS = 6, 5
ROW_SPACING, COL_SPACING = 0.7, 0.9  # PixelSpacing = [between rows, between columns]

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def _oblique() -> tuple[float, ...]:
    a, b = np.radians(20.0), np.radians(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    r = rz @ rx
    return (*r @ [1.0, 0.0, 0.0], *r @ [0.0, 1.0, 0.0])


OBLIQUE = _oblique()


def _ds(value: float) -> str:
    return f"{value:.6f}"[:16]


def _pixels(slot: int) -> np.ndarray:
    """Pixel values that encode the slice's place along the normal and each pixel's (j, i)."""
    j, i = np.mgrid[0:ROWS, 0:COLS]
    return (1000 * slot + 10 * j + i).astype(np.uint16)


def _slice(
    path: Path, *, position: tuple[float, ...], orientation: tuple[float, ...] = AXIAL,
    number: int | None = 1, pixels: np.ndarray | None = None, series: str = "1.2.3",
    frame: str = "1.2.3.4", spacing: tuple[float, float] = (ROW_SPACING, COL_SPACING),
    slope: float | None = None, intercept: float | None = None, drop: str | None = None,
    frames: int | None = None,
) -> Path:  # fmt: skip
    pixels = _pixels(0) if pixels is None else pixels
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = "1.2.3.9"
    ds.SeriesInstanceUID = series
    ds.FrameOfReferenceUID = frame
    ds.Modality = "CT"
    ds.SeriesDescription = "TEST SERIES"
    if number is not None:
        ds.InstanceNumber = number
    ds.ImagePositionPatient = [_ds(v) for v in position]
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.PixelSpacing = [_ds(v) for v in spacing]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = pixels.shape[-2], pixels.shape[-1]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if slope is not None:
        ds.RescaleSlope = _ds(slope)
    if intercept is not None:
        ds.RescaleIntercept = _ds(intercept)
    if frames is not None:
        ds.NumberOfFrames = frames
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    if drop is not None:
        delattr(ds, drop)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    dcmwrite(path, ds, enforce_file_format=True)
    return path


def _normal(orientation: tuple[float, ...]) -> np.ndarray:
    return np.cross(orientation[:3], orientation[3:])


def _series(
    folder: Path, count: int = 5, *, orientation: tuple[float, ...] = AXIAL, step: float = 2.5,
    origin: tuple[float, float, float] = (-20.0, 15.0, 40.0), steps: list[float] | None = None,
    seed: int = 0, **kwargs: object,
) -> list[Path]:  # fmt: skip
    """``count`` slices along the normal, written in shuffled order with lying numbers."""
    rng = np.random.default_rng(seed)
    normal = _normal(orientation)
    offsets = np.concatenate([[0.0], np.cumsum(steps)]) if steps else np.arange(count) * step
    numbers = rng.permutation(len(offsets)) + 1
    paths: list[Path] = []
    for slot in rng.permutation(len(offsets)):
        position = tuple(np.asarray(origin) + offsets[slot] * normal)
        path = folder / f"file-{len(paths):02d}.dcm"
        paths.append(_slice(path, position=position, orientation=orientation,
                            number=int(numbers[slot]), pixels=_pixels(int(slot)),
                            **kwargs))  # type: ignore[arg-type]  # fmt: skip
    return paths


@pytest.mark.parametrize(
    "orientation",
    [AXIAL, CORONAL, SAGITTAL, OBLIQUE],
    ids=["axial", "coronal", "sagittal", "oblique"],
)
def test_shuffled_files_and_lying_numbers_give_one_volume_with_the_right_affine(
    tmp_path: Path, orientation: tuple[float, ...]
) -> None:
    paths = _series(tmp_path, 5, orientation=orientation)
    volume = read_volume(paths)
    assert volume.shape == (5, ROWS, COLS)
    assert volume.spacing == pytest.approx((2.5, ROW_SPACING, COL_SPACING), abs=1e-5)
    assert np.array_equal(volume.image, np.stack([_pixels(k) for k in range(5)]))
    assert np.allclose(volume.normal, _normal(orientation), atol=1e-5)
    affine = volume.affine()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    for k, item in enumerate(volume.slices):
        ipp = np.asarray(item.position)
        assert np.allclose(affine @ [k, 0, 0, 1], [*ipp, 1], atol=1e-4)
        for j, i in ((0, 4), (5, 0), (3, 2)):
            expected = ipp + i * COL_SPACING * row + j * ROW_SPACING * col
            assert np.allclose((affine @ [k, j, i, 1])[:3], expected, atol=1e-4)
    positions = [np.asarray(s.position) @ volume.normal for s in volume.slices]
    assert np.all(np.diff(positions) > 0)
    assert volume.warnings == ()
    assert read_volume(list(reversed(paths))).image.tobytes() == volume.image.tobytes()


def test_positions_descending_in_the_files_are_sorted_along_the_normal(tmp_path: Path) -> None:
    normal = _normal(AXIAL)
    paths = [
        _slice(
            tmp_path / f"{n}.dcm",
            position=tuple(normal * (100.0 - 3.0 * n)),
            number=n + 1,
            pixels=_pixels(n),
        )  # fmt: skip
        for n in range(4)
    ]
    volume = read_volume(paths)
    assert [s.instance_number for s in volume.slices] == [4, 3, 2, 1]
    assert volume.origin == pytest.approx((0.0, 0.0, 91.0))
    assert np.array_equal(volume.image[0], _pixels(3))


def test_rescale_slope_and_intercept_are_applied(tmp_path: Path) -> None:
    volume = read_volume(_series(tmp_path, 3, slope=0.5, intercept=-1024.0))
    assert volume.image.dtype == np.float32
    assert np.array_equal(volume.image, np.stack([_pixels(k) for k in range(3)]) * 0.5 - 1024)


def test_a_gap_is_refused_naming_the_files_and_the_missing_position(tmp_path: Path) -> None:
    paths = _series(tmp_path, steps=[2.0, 2.0, 4.0, 2.0], origin=(0.0, 0.0, 10.0))
    with pytest.raises(UnusableStudyError, match=r"gap .*file-\d\d\.dcm \(14\.00 mm\) and "
                       r"file-\d\d\.dcm \(18\.00 mm\).*16\.00 mm"):  # fmt: skip
        read_volume(paths)


def test_spacing_varying_by_5_percent_is_a_warning(tmp_path: Path) -> None:
    volume = read_volume(_series(tmp_path, steps=[2.0, 2.1, 2.0, 2.0]))
    assert volume.spacing[0] == pytest.approx(8.1 / 4)
    assert len(volume.warnings) == 1 and "varies by 5 %" in volume.warnings[0]
    assert "file-" in volume.warnings[0]


def test_spacing_varying_by_20_percent_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UnusableStudyError, match=r"varies by 20 % .*between file-\d\d\.dcm"):
        read_volume(_series(tmp_path, steps=[2.0, 2.4, 2.0, 2.0]))


def test_an_exact_duplicate_is_dropped_with_a_warning_keeping_the_first(tmp_path: Path) -> None:
    paths = _series(tmp_path, 4)
    first = read_volume(paths)
    copy = _slice(tmp_path / "copy.dcm", position=first.slices[2].position,
                  number=99, pixels=_pixels(2))  # fmt: skip
    volume = read_volume([*paths, copy])
    assert volume.shape == first.shape
    assert volume.slices[2].instance_number == first.slices[2].instance_number
    assert len(volume.warnings) == 1 and "copy.dcm repeats" in volume.warnings[0]


def test_two_different_images_at_one_position_are_refused(tmp_path: Path) -> None:
    paths = _series(tmp_path, 4)
    first = read_volume(paths)
    other = _slice(tmp_path / "other.dcm", position=first.slices[1].position,
                   number=99, pixels=_pixels(7))  # fmt: skip
    with pytest.raises(UnusableStudyError, match=r"other\.dcm are different images at the same"):
        read_volume([*paths, other])


def test_mixed_orientations_are_refused(tmp_path: Path) -> None:
    paths = _series(tmp_path, 3)
    odd = _slice(tmp_path / "odd.dcm", position=(0.0, 0.0, 50.0), orientation=CORONAL)
    with pytest.raises(UnusableStudyError, match=r"odd\.dcm differ in Image Orientation"):
        read_volume([*paths, odd])


def test_mixed_sizes_and_spacings_are_refused(tmp_path: Path) -> None:
    paths = _series(tmp_path, 3)
    big = _slice(tmp_path / "big.dcm", position=(0.0, 0.0, 50.0),
                 pixels=np.zeros((ROWS + 1, COLS), np.uint16))  # fmt: skip
    with pytest.raises(UnusableStudyError, match=r"big\.dcm differ in size"):
        read_volume([*paths, big])
    finer = _slice(tmp_path / "finer.dcm", position=(0.0, 0.0, 50.0), spacing=(0.6, 0.9))
    with pytest.raises(UnusableStudyError, match=r"finer\.dcm differ in Pixel Spacing"):
        read_volume([*paths, finer])


def test_other_series_and_frames_of_reference_are_refused(tmp_path: Path) -> None:
    paths = _series(tmp_path, 3)
    stray = _slice(tmp_path / "stray.dcm", position=(0.0, 0.0, 50.0), series="9.9")
    with pytest.raises(UnusableStudyError, match=r"stray\.dcm belong to different series"):
        read_volume([*paths, stray])
    moved = _slice(tmp_path / "moved.dcm", position=(0.0, 0.0, 50.0), frame="9.9")
    with pytest.raises(UnusableStudyError, match=r"moved\.dcm have different Frames"):
        read_volume([*paths, moved])


@pytest.mark.parametrize(
    ("keyword", "words"),
    [
        ("ImagePositionPatient", "Image Position"),
        ("ImageOrientationPatient", "Image Orientation"),
        ("PixelSpacing", "Pixel Spacing"),
    ],  # fmt: skip
)
def test_a_missing_geometry_attribute_is_named_with_the_file(
    tmp_path: Path, keyword: str, words: str
) -> None:
    paths = _series(tmp_path, 3)
    bad = _slice(tmp_path / "bad.dcm", position=(0.0, 0.0, 50.0), drop=keyword)
    with pytest.raises(UnusableStudyError, match=rf"bad\.dcm has no {words}"):
        read_volume([*paths, bad])


def test_multi_frame_instances_are_refused(tmp_path: Path) -> None:
    stack = np.stack([_pixels(0), _pixels(1)])
    path = _slice(tmp_path / "enhanced.dcm", position=(0.0, 0.0, 0.0), pixels=stack, frames=2)
    with pytest.raises(UnusableStudyError, match=r"enhanced\.dcm is a multi-frame .*not read yet"):
        read_volume([path])


def test_too_few_slices_and_sideways_positions_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnusableStudyError, match=r"only 2 slice position\(s\)"):
        read_volume(_series(tmp_path, 2))
    tilted = [
        _slice(
            tmp_path / f"tilt-{n}.dcm",
            position=(0.0, 0.4 * n, 2.0 * n),
            number=n,
            pixels=_pixels(n),
        )  # fmt: skip
        for n in range(4)
    ]
    with pytest.raises(UnusableStudyError, match=r"tilt-1\.dcm lies 0\.40 mm off the line"):
        read_volume(tilted)


def test_damaged_files_and_arguments(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(UnusableStudyError, match=r"junk\.dcm is damaged or not DICOM"):
        read_volume([junk])
    with pytest.raises(UnusableStudyError, match="no files"):
        read_volume([])
    with pytest.raises(TypeError, match='"paths"'):
        read_volume(junk)  # type: ignore[arg-type]


def test_group_series_reads_headers_and_splits_series(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = _series(tmp_path / "a", 3, series="1.1")
    second = _series(tmp_path / "b", 2, series="2.2")
    groups = group_series([*first, *second])
    assert list(groups) == ["1.1", "2.2"]
    assert groups["1.1"] == first and groups["2.2"] == second


def test_undecodable_pixel_data_is_named(tmp_path: Path) -> None:
    paths = _series(tmp_path, 3)
    ds = dcmread(paths[0])
    ds.PixelData = encapsulate([b"\x00\x01 not a codestream"])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(paths[0], enforce_file_format=True)
    with pytest.raises(UnusableStudyError, match=r"file-00\.dcm: the pixel data cannot be read"):
        read_volume(paths)
