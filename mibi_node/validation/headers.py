"""What the stored instance headers say of a study beyond its row: the accession number and
the camera or scanner that made it (Station Name, Manufacturer Model Name, Device Serial
Number).

Reception records them on the study row (revision 0005), from the first image instance that
has them. A study received before that has empty fields: for it they are read from one
stored image file (header only); one whose files the retention sweep removed has none, and
its performance figures go to the ``unknown`` station.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pydicom
from pydicom.errors import InvalidDicomError
from sqlalchemy import select

from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import Instance, Study

__all__ = ["StudyHeader", "study_headers"]

logger = logging.getLogger(__name__)

_TAGS = ("AccessionNumber", "StationName", "ManufacturerModelName", "DeviceSerialNumber")


@dataclass(frozen=True)
class StudyHeader:
    """Header facts of one study ("" where the header has none or no file is left)."""

    accession_number: str = ""
    station_name: str = ""
    manufacturer_model_name: str = ""
    device_serial_number: str = ""

    @property
    def station(self) -> str:
        """The camera as one label: ``station / model / serial`` (``unknown`` if none)."""
        parts = (self.station_name, self.manufacturer_model_name, self.device_serial_number)
        return " / ".join(parts) if any(parts) else "unknown"


def study_headers(
    database: Database, files: FileStore, study_ids: Iterable[int]
) -> dict[int, StudyHeader]:
    """The header facts of each study: its row's, else its first stored image instance's."""
    wanted = sorted(set(study_ids))
    if not wanted:
        return {}
    found: dict[int, StudyHeader] = {}
    with database.session() as session:
        for row in session.execute(
            select(
                Study.id,
                Study.accession_number,
                Study.station_name,
                Study.manufacturer_model_name,
                Study.device_serial_number,
            ).where(Study.id.in_(wanted))
        ):
            header = StudyHeader(*row[1:])
            if header != StudyHeader():
                found[row.id] = header
        unread = [study_id for study_id in wanted if study_id not in found]
        rows = session.execute(
            select(Instance.study_id, Instance.path, Instance.modality, Instance.sop_class_uid)
            .where(Instance.study_id.in_(unread))
            .order_by(Instance.study_id, Instance.id)
        ).all()
    for study_id, path, modality, sop_class_uid in rows:
        if study_id in found or not is_image_instance(modality, sop_class_uid):
            continue
        read = _read(files, path)
        if read is not None:
            found[study_id] = read
    return {study_id: found.get(study_id, StudyHeader()) for study_id in wanted}


def _read(files: FileStore, relative: str) -> StudyHeader | None:
    try:
        dataset = pydicom.dcmread(
            files.absolute(relative), stop_before_pixels=True, specific_tags=list(_TAGS)
        )
    except (OSError, InvalidDicomError, ValueError) as exc:
        logger.debug("no header from %s: %s", relative, exc)
        return None
    values = [str(dataset.get(tag, "") or "").strip() for tag in _TAGS]
    return StudyHeader(*values)
