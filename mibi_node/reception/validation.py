"""Reading and checking the header of a received file without decoding its pixels.

Everything here works on the file pynetdicom wrote (File Meta + the data set as sent) and
answers one question: may this be acknowledged? Its errors carry the DICOM status to send.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset, FileDataset
from pydicom.uid import UID

from mibi_node.storage.instances import InstanceMeta

__all__ = [
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_SOP_MISMATCH",
    "RejectedInstanceError",
    "read_instance_meta",
]

#: Error: Cannot understand (PS3.4 B.2.3).
STATUS_CANNOT_UNDERSTAND = 0xC210
#: Error: Data Set does not match SOP Class.
STATUS_SOP_MISMATCH = 0xA900

_MAX_UID = 64


class RejectedInstanceError(Exception):
    """The instance cannot be acknowledged; ``status`` is the DICOM status to answer with."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _uid(dataset: FileDataset, keyword: str) -> str:
    value = dataset.get(keyword)
    text = str(value).strip() if value is not None else ""
    if not text:
        raise RejectedInstanceError(STATUS_CANNOT_UNDERSTAND, f"{keyword} is missing or empty")
    if len(text) > _MAX_UID:
        raise RejectedInstanceError(
            STATUS_CANNOT_UNDERSTAND, f"{keyword} is longer than 64 characters"
        )
    return text


def _check_pixel_data(dataset: FileDataset, transfer_syntax: UID) -> None:
    if "PixelData" not in dataset:
        return
    value = dataset.PixelData
    if transfer_syntax.is_encapsulated:
        if not value.startswith(b"\xfe\xff\x00\xe0"):
            raise RejectedInstanceError(
                STATUS_CANNOT_UNDERSTAND, "encapsulated Pixel Data has no Basic Offset Table item"
            )
        return
    try:
        rows = int(dataset.Rows)
        columns = int(dataset.Columns)
        bits = int(dataset.BitsAllocated)
        samples = int(dataset.get("SamplesPerPixel", 1) or 1)
        frames = int(dataset.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        raise RejectedInstanceError(
            STATUS_CANNOT_UNDERSTAND,
            "Pixel Data without valid Rows, Columns, Bits Allocated or Number of Frames",
        ) from None
    if min(rows, columns, bits, samples, frames) <= 0:
        raise RejectedInstanceError(STATUS_CANNOT_UNDERSTAND, "image dimensions must be positive")
    expected = (rows * columns * samples * frames * bits + 7) // 8
    if len(value) < expected:
        raise RejectedInstanceError(
            STATUS_CANNOT_UNDERSTAND,
            f"Pixel Data holds {len(value)} bytes; {rows}x{columns}, {frames} frame(s) "
            f"need {expected}",
        )


def read_instance_meta(path: Path, sop_class_uid: str, sop_instance_uid: str) -> InstanceMeta:
    """Parse the received file and check it against the C-STORE request.

    Parameters
    ----------
    path
        The file pynetdicom wrote for the request.
    sop_class_uid, sop_instance_uid
        Affected SOP Class / Instance UID of the request (the presentation context's
        abstract syntax is the SOP class).

    Raises
    ------
    RejectedInstanceError
        The data set cannot be parsed (0xC210), lacks its identifying UIDs (0xC210), or is
        not of the SOP class it was sent as (0xA900).
    """
    try:
        dataset = dcmread(path)
        transfer_syntax = UID(dataset.file_meta.TransferSyntaxUID)
        sop_class = _uid(dataset, "SOPClassUID")
        sop_instance = _uid(dataset, "SOPInstanceUID")
        study = _uid(dataset, "StudyInstanceUID")
        series = _uid(dataset, "SeriesInstanceUID")
        _check_pixel_data(dataset, transfer_syntax)
        modality = str(dataset.get("Modality", "") or "").strip()[:16]
        description = dataset.get("StudyDescription")
        description = str(description)[:64] if description else None
        station = {
            "accession_number": _text(dataset, "AccessionNumber", 16),
            "station_name": _text(dataset, "StationName", 64),
            "manufacturer_model_name": _text(dataset, "ManufacturerModelName", 64),
            "device_serial_number": _text(dataset, "DeviceSerialNumber", 64),
        }
    except RejectedInstanceError:
        raise
    except Exception as exc:  # pydicom raises many kinds on garbage (EOFError, ValueError, ...)
        raise RejectedInstanceError(
            STATUS_CANNOT_UNDERSTAND, f"data set cannot be parsed: {type(exc).__name__}"
        ) from exc
    if sop_class != sop_class_uid.strip():
        raise RejectedInstanceError(
            STATUS_SOP_MISMATCH, "SOP Class UID of the data set differs from the request's"
        )
    if sop_instance != sop_instance_uid.strip():
        raise RejectedInstanceError(
            STATUS_SOP_MISMATCH, "SOP Instance UID of the data set differs from the request's"
        )
    return InstanceMeta(
        study_instance_uid=study,
        series_instance_uid=series,
        sop_instance_uid=sop_instance,
        sop_class_uid=sop_class,
        transfer_syntax_uid=str(transfer_syntax),
        modality=modality,
        study_description=description,
        **station,
    )


def _text(dataset: Dataset, keyword: str, length: int) -> str:
    """A short text element's value, stripped and cut to the column's length ("" if none)."""
    return str(dataset.get(keyword, "") or "").strip()[:length]
