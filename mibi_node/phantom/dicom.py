"""NM Image Storage datasets for the phantom's planar acquisitions.

Every attribute value is derived from the seed, so the same seed writes the same bytes. The
datasets follow the NM Image IOD (PS3.3 A.5): a STATIC image carries Energy Window and
Detector vectors; the ``multiframe`` layout stores both phases as a DYNAMIC image with two
phases and two detector heads (anterior and posterior), the standard way to keep frames
acquired at different times in one instance.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import UID, ExplicitVRLittleEndian, NuclearMedicineImageStorage

__all__ = [
    "Acquisition",
    "Frame",
    "StudyHeader",
    "attach_file_meta",
    "nm_dataset",
    "phantom_uid",
    "synthetic_patient",
]

logger = logging.getLogger(__name__)

_UID_ROOT = "mibi-node-phantom"
_IMPLEMENTATION_UID = "2.25.264416271127548946006306301587359011541"

#: (code value, scheme, meaning) of the coded concepts the datasets carry.
_SESTAMIBI = ("424299003", "SCT", "Technetium Tc^99m^ sestamibi")
_PERTECHNETATE = ("19495007", "SCT", "Sodium pertechnetate Tc^99m^")
_TC99M = ("72454006", "SCT", "^99m^Technetium")
_ANTERIOR = ("399321004", "SCT", "Anterior projection")
_POSTERIOR = ("399001007", "SCT", "Posterior projection")
_RECUMBENT = ("102538003", "SCT", "recumbent")
_SUPINE = ("40199007", "SCT", "supine")
_HEADFIRST = ("102540008", "SCT", "headfirst")
_INTRAVENOUS = ("47625008", "SCT", "Intravenous route")


def phantom_uid(seed: int, *parts: object) -> str:
    """A UID under the 2.25 root, fixed by the seed and the parts that name the object.

    A name-based (version 5) UUID of the parts, written as 2.25.<integer> (PS3.5 B.2).
    (pydicom's ``generate_uid`` ignores ``entropy_srcs`` when ``prefix`` is ``None``.)
    """
    name = "/".join([_UID_ROOT, str(seed), *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _code(concept: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = concept
    return item


@dataclass(frozen=True)
class StudyHeader:
    """Patient and study attributes shared by every instance of one phantom study."""

    seed: int
    index: int
    study_instance_uid: str
    patient_name: str
    patient_id: str
    patient_sex: str
    patient_birth_date: str
    patient_age: str
    accession_number: str
    injection: datetime
    dose_mbq: float
    description: str = "PARATHYROID MIBI"


@dataclass(frozen=True)
class Frame:
    """One planar frame: its counts, the head that saw it and when it started."""

    pixels: np.ndarray
    minutes: float
    detector: int = 1
    view: str = "anterior"


@dataclass(frozen=True)
class Acquisition:
    """What goes into one instance.

    Attributes
    ----------
    series_number, instance_number
        Position of the instance in the study.
    series_key
        Names the series (instances with the same key share a Series Instance UID).
    series_description, image_comments
        Free text; the reader's phase detection reads them.
    frames
        One frame for a STATIC image; frames ordered detector-major, phase-minor for DYNAMIC.
    dynamic
        Store as a DYNAMIC image with a Phase vector (``frames`` hold two phases).
    pertechnetate
        A 99mTc-pertechnetate thyroid scan instead of sestamibi.
    frame_seconds
        Acquisition duration of each frame.
    """

    series_number: int
    instance_number: int
    series_key: str
    series_description: str
    frames: tuple[Frame, ...]
    frame_seconds: float
    pixel_spacing_mm: float
    collimator: str
    image_comments: str = ""
    dynamic: bool = False
    pertechnetate: bool = False
    extra: dict[str, str] = field(default_factory=dict)


def _da(moment: datetime) -> str:
    return moment.strftime("%Y%m%d")


def _tm(moment: datetime) -> str:
    return moment.strftime("%H%M%S")


def _ds(value: float) -> str:
    return f"{value:.4f}".rstrip("0").rstrip(".")


def _detector_item(view: str, acquisition: Acquisition, matrix: int) -> Dataset:
    item = Dataset()
    pinhole = acquisition.collimator == "PINH"
    item.CollimatorGridName = "PINHOLE 4MM" if pinhole else "LEHR"
    item.CollimatorType = acquisition.collimator
    item.FieldOfViewShape = "RECTANGLE"
    fov = matrix * acquisition.pixel_spacing_mm
    item.FieldOfViewDimensions = [int(round(fov)), int(round(fov))]
    item.FocalDistance = [250] if pinhole else [0]
    item.XFocusCenter = [0]
    item.YFocusCenter = [0]
    item.ZoomFactor = [_ds(533.0 / fov), _ds(533.0 / fov)]
    item.ImagePositionPatient = None
    item.ImageOrientationPatient = None
    concept = _ANTERIOR if view == "anterior" else _POSTERIOR
    item.ViewCodeSequence = Sequence([_code(concept)])
    item.ViewCodeSequence[0].ViewModifierCodeSequence = Sequence()
    return item


def _radiopharmaceutical(header: StudyHeader, pertechnetate: bool, start: datetime) -> Dataset:
    item = Dataset()
    item.RadionuclideCodeSequence = Sequence([_code(_TC99M)])
    item.RadiopharmaceuticalRoute = "Intravenous"
    item.AdministrationRouteCodeSequence = Sequence([_code(_INTRAVENOUS)])
    item.RadiopharmaceuticalStartTime = _tm(start)
    item.RadionuclideTotalDose = _ds(185.0 if pertechnetate else header.dose_mbq)
    concept = _PERTECHNETATE if pertechnetate else _SESTAMIBI
    item.Radiopharmaceutical = "Tc99m pertechnetate" if pertechnetate else "Tc99m sestamibi"
    item.RadiopharmaceuticalCodeSequence = Sequence([_code(concept)])
    return item


def nm_dataset(header: StudyHeader, acquisition: Acquisition) -> Dataset:
    """Build one NM Image Storage instance, with file meta, ready to write.

    Parameters
    ----------
    header
        The study's patient and study attributes.
    acquisition
        The series, frames and acquisition parameters of this instance.

    Returns
    -------
    pydicom.dataset.Dataset
        16-bit MONOCHROME2, Explicit VR Little Endian.
    """
    frames = acquisition.frames
    matrix = int(frames[0].pixels.shape[0])
    seed, index = header.seed, header.index
    injection = header.injection
    if acquisition.pertechnetate:
        injection = injection - timedelta(minutes=80)
    start = injection + timedelta(minutes=frames[0].minutes)
    series_uid = phantom_uid(seed, index, "series", acquisition.series_key)
    sop_uid = phantom_uid(
        seed, index, "instance", acquisition.series_key, acquisition.instance_number
    )

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    kind = "DYNAMIC" if acquisition.dynamic else "STATIC"
    ds.ImageType = ["ORIGINAL", "PRIMARY", kind, "EMISSION"]
    ds.InstanceCreationDate = _da(start)
    ds.InstanceCreationTime = _tm(start)
    ds.SOPClassUID = NuclearMedicineImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = _da(header.injection)
    ds.SeriesDate = _da(start)
    ds.AcquisitionDate = _da(start)
    ds.ContentDate = _da(start)
    ds.StudyTime = _tm(header.injection)
    ds.SeriesTime = _tm(start)
    ds.AcquisitionTime = _tm(start)
    ds.ContentTime = _tm(start)
    ds.AccessionNumber = header.accession_number
    ds.Modality = "NM"
    ds.BodyPartExamined = "NECK"
    ds.Manufacturer = "mibi-node"
    ds.InstitutionName = "SYNTHETIC PHANTOM"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = header.description
    ds.SeriesDescription = acquisition.series_description
    ds.ManufacturerModelName = "MIBI phantom"
    ds.PatientName = header.patient_name
    ds.PatientID = header.patient_id
    ds.PatientBirthDate = header.patient_birth_date
    ds.PatientSex = header.patient_sex
    ds.PatientAge = header.patient_age
    ds.PatientIdentityRemoved = "NO"
    ds.PatientComments = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
    ds.DeviceSerialNumber = "PHANTOM-0001"
    ds.SoftwareVersions = "mibi-node phantom 1"
    ds.ActualFrameDuration = int(acquisition.frame_seconds * 1000)
    ds.StudyInstanceUID = header.study_instance_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = f"{index + 1:04d}"
    ds.SeriesNumber = acquisition.series_number
    ds.InstanceNumber = acquisition.instance_number
    ds.PatientOrientation = ["L", "F"]
    if acquisition.image_comments:
        ds.ImageComments = acquisition.image_comments
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = len(frames)
    ds.Rows = matrix
    ds.Columns = matrix
    ds.PixelSpacing = [_ds(acquisition.pixel_spacing_mm)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.SmallestImagePixelValue = int(min(int(f.pixels.min()) for f in frames))
    ds.LargestImagePixelValue = int(max(int(f.pixels.max()) for f in frames))

    detectors = sorted({f.detector for f in frames})
    ds.EnergyWindowVector = [1] * len(frames)
    ds.NumberOfEnergyWindows = 1
    ds.DetectorVector = [f.detector for f in frames]
    ds.NumberOfDetectors = len(detectors)
    if acquisition.dynamic:
        phases = sorted({f.minutes for f in frames})
        ds.FrameIncrementPointer = [0x00540010, 0x00540020, 0x00540030, 0x00540100]
        ds.PhaseVector = [phases.index(f.minutes) + 1 for f in frames]
        ds.NumberOfPhases = len(phases)
        ds.TimeSliceVector = [1] * len(frames)
        items = []
        for minutes in phases:
            item = Dataset()
            item.PhaseDelay = int(round((minutes - phases[0]) * 60_000))
            item.ActualFrameDuration = int(acquisition.frame_seconds * 1000)
            item.PauseBetweenFrames = 0
            item.NumberOfFramesInPhase = 1
            items.append(item)
        ds.PhaseInformationSequence = Sequence(items)
        del ds.ActualFrameDuration
    else:
        ds.FrameIncrementPointer = [0x00540010, 0x00540020]

    window = Dataset()
    limits = Dataset()
    limits.EnergyWindowLowerLimit = "126"
    limits.EnergyWindowUpperLimit = "154"
    window.EnergyWindowRangeSequence = Sequence([limits])
    window.EnergyWindowName = "TC99M"
    ds.EnergyWindowInformationSequence = Sequence([window])
    ds.RadiopharmaceuticalInformationSequence = Sequence(
        [_radiopharmaceutical(header, acquisition.pertechnetate, injection)]
    )
    views = {f.detector: f.view for f in frames}
    ds.DetectorInformationSequence = Sequence(
        [_detector_item(views[d], acquisition, matrix) for d in detectors]
    )
    orientation = _code(_RECUMBENT)
    orientation.PatientOrientationModifierCodeSequence = Sequence([_code(_SUPINE)])
    ds.PatientOrientationCodeSequence = Sequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = Sequence([_code(_HEADFIRST)])
    ds.AcquisitionContextSequence = Sequence()
    ds.CountsAccumulated = int(sum(int(f.pixels.sum(dtype=np.int64)) for f in frames))
    ds.AcquisitionTerminationCondition = "TIME"
    ds.CorrectedImage = ["UNIF"]
    for keyword, value in acquisition.extra.items():
        setattr(ds, keyword, value)

    data = np.stack([np.ascontiguousarray(f.pixels, dtype="<u2") for f in frames])
    ds.PixelData = data.tobytes()

    attach_file_meta(ds)
    return ds


def attach_file_meta(ds: Dataset) -> None:
    """Give a phantom instance its file meta (Explicit VR Little Endian, the phantom's
    implementation UID), so it can be written as a DICOM file."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = UID(_IMPLEMENTATION_UID)
    meta.ImplementationVersionName = "MIBINODE_PH1"
    ds.file_meta = meta


def synthetic_patient(
    ds: Dataset, *, name: str, patient_id: str, sex: str, age: int, moment: datetime
) -> None:
    """The Patient module of a phantom study, marked as no real patient (``age`` in years
    at ``moment``, the study's date)."""
    ds.PatientName = name
    ds.PatientID = patient_id
    ds.PatientBirthDate = _da(moment - timedelta(days=int(age * 365.25 + 100)))
    ds.PatientSex = sex
    ds.PatientAge = f"{age:03d}Y"
    ds.PatientIdentityRemoved = "NO"
    ds.PatientComments = "SYNTHETIC PHANTOM - NOT A REAL PATIENT"
