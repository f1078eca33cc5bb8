"""Small, valid DICOM instances for tests that need files but not a realistic phantom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

NM_STORAGE = "1.2.840.10008.5.1.4.1.1.20"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def nm_dataset(
    study_uid: str | None = None,
    *,
    rows: int = 64,
    columns: int = 64,
    frames: int = 2,
    seed: int = 0,
    sop_class_uid: str = NM_STORAGE,
    sop_instance_uid: str | None = None,
    series_uid: str | None = None,
) -> Dataset:
    """An NM image instance with Poisson-noise pixels and the identifying attributes."""
    rng = np.random.default_rng(seed)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_instance_uid or generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.PatientName = "PHANTOM^TEST"
    ds.PatientID = "PHANTOM-0001"
    ds.StudyDescription = "PARATHYROID MIBI"
    ds.SeriesDescription = "EARLY 10MIN ANT"
    ds.Modality = "NM"
    ds.StudyDate = "20260101"
    ds.StudyTime = "090000"
    ds.InstanceNumber = 1
    ds.Rows = rows
    ds.Columns = columns
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    pixels = rng.poisson(20.0, size=(frames, rows, columns)).astype(np.uint16)
    ds.PixelData = pixels.tobytes()
    return ds


def write(ds: Dataset, path: Path) -> Path:
    """Write ``ds`` as a DICOM file (with preamble and File Meta) and return the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def nm_files(folder: Path, count: int, *, studies: int = 1, **kwargs: object) -> list[Path]:
    """``count`` NM files spread over ``studies`` studies, written to ``folder``."""
    study_uids = [generate_uid() for _ in range(studies)]
    return [
        write(nm_dataset(study_uids[i % studies], seed=i, **kwargs), folder / f"nm{i:05d}.dcm")
        for i in range(count)
    ]
