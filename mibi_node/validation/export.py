"""The node's assessed studies as a de-identified, labelled data set for ``mibi-node train``.

A hospital closes the loop (issue 19) by training a new bundle on its own studies: those
whose reference is known (:attr:`~mibi_node.validation.performance.Case.reference`: a final
diagnosis, else a reader's accepted or corrected verdict) and whose files are still stored.
Each goes to ``case-NNNN/NN.dcm`` in the layout the analysis' training reads, with a
``labels.csv`` and a ``manifest.json`` that carry no name, ID or UID.

The images are de-identified after DICOM PS3.15 Annex E, the Basic Application Level
Confidentiality Profile with the Retain Longitudinal Temporal Information Modified Dates
and the Clean Descriptors options, applied to what a nuclear-medicine or MR study carries:

* private elements, curves and overlays are removed;
* every person name (PN) is emptied; Patient's Name and Patient ID become the case name;
  birth date, sex, accession number and Study ID are emptied; other patient IDs and names,
  the patient's address, age, size, weight and comments, institution, department,
  physicians, operators, station and device serial number, request and procedure step
  IDs are removed (:data:`REMOVED`);
* every instance UID (Study, Series, SOP Instance, Frame of Reference, references) is
  replaced by ``generate_uid(entropy_srcs=[secret, uid])`` with a secret drawn per export:
  the same UID maps to the same new one within an export (so references still match) and
  cannot be traced back; class, transfer syntax and coding scheme UIDs stay;
* every date is moved back by one whole number of days drawn per export and times are kept,
  so the minutes from injection to acquisition (which tell early from delayed) are
  unchanged;
* the descriptions the readers need (study and series descriptions, protocol name, image
  comments) are kept after the patient's name parts, IDs, accession number and birth date
  are cut out of them, as out of every other text;
* Patient Identity Removed is ``YES``, De-identification Method says what was done, and
  Longitudinal Temporal Information Modified is ``MODIFIED``.

Images with burned-in annotation (``BurnedInAnnotation`` ``YES``) are left out: their pixels
may show the name.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import select

import mibi_node
from mibi_node import audit
from mibi_node.analyses.registry import available_analyses
from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import Instance, VerdictDecision
from mibi_node.validation.performance import Case, cases

__all__ = [
    "EXPORTABLE",
    "METHOD",
    "REMOVED",
    "ExportError",
    "ExportOutcome",
    "ExportSecret",
    "deidentify",
    "export_assessed",
]

logger = logging.getLogger(__name__)

#: The analyses whose reference is a class, and so a training label.
EXPORTABLE = ("parathyroid", "thyroid")

#: What the reference of the other analyses is (why they cannot be exported yet).
_NOT_CLASSES = {
    "spine": "keypoints with a class per level",
    "knee": "cartilage masks",
    "lung": "lesion masks",
}

#: Attributes removed (PS3.15 Table E.1-1 action X, for the attributes such studies carry).
REMOVED = frozenset(
    {
        "AdditionalPatientHistory", "AdmissionID", "AdmittingDiagnosesDescription",
        "Allergies", "BranchOfService", "CountryOfResidence", "CurrentPatientLocation",
        "DeviceSerialNumber", "EthnicGroup", "InstitutionAddress", "InstitutionCodeSequence",
        "InstitutionName", "InstitutionalDepartmentName", "IssuerOfPatientID",
        "IssuerOfPatientIDQualifiersSequence", "LastMenstrualDate", "MedicalAlerts",
        "MedicalRecordLocator", "MilitaryRank", "NameOfPhysiciansReadingStudy", "Occupation",
        "OperatorIdentificationSequence", "OperatorsName", "OtherPatientIDs",
        "OtherPatientIDsSequence", "OtherPatientNames", "PatientAddress", "PatientAge",
        "PatientBirthName", "PatientBirthTime", "PatientComments", "PatientInstitutionResidence",
        "PatientInsurancePlanCodeSequence", "PatientMotherBirthName",
        "PatientReligiousPreference", "PatientSize", "PatientState",
        "PatientTelephoneNumbers", "PatientWeight", "PerformedProcedureStepID",
        "PerformedProcedureStepStartDate", "PerformingPhysicianIdentificationSequence",
        "PerformingPhysicianName", "PhysiciansOfRecord",
        "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
        "PregnancyStatus", "ReferencedPatientSequence", "ReferringPhysicianAddress",
        "ReferringPhysicianIdentificationSequence", "ReferringPhysicianTelephoneNumbers",
        "RegionOfResidence", "RequestAttributesSequence", "RequestedProcedureID",
        "RequestingPhysician", "RequestingService", "ResponsibleOrganization",
        "ResponsiblePerson", "ScheduledProcedureStepID", "SmokingStatus",
        "SourceApplicationEntityTitle", "StationName",
    }
)  # fmt: skip

#: Type 2 attributes kept empty (action Z); Patient's Name and ID get the case name.
_EMPTIED = ("AccessionNumber", "PatientBirthDate", "PatientSex", "StudyID")

#: UIDs that name a definition, not an instance, and so stay (with every DICOM UID).
_KEPT_UIDS = frozenset(
    {
        "CodingSchemeUID", "ContextGroupExtensionCreatorUID", "ContextUID",
        "ImplementationClassUID", "MappingResourceUID", "PrivateInformationCreatorUID",
        "ReferencedSOPClassUID", "ReferencedSOPClassUIDInFile", "ReferencedTransferSyntaxUIDInFile",
        "SOPClassUID", "TransferSyntaxUID",
    }
)  # fmt: skip

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC"})
#: Days a date may be moved back by (drawn once per export).
_SHIFT_DAYS = (365, 3650)

#: De-identification Method (LO, each value at most 64 characters).
METHOD = (
    "mibi-node export after DICOM PS3.15 Annex E Basic Profile",
    "Retain Longitudinal Temporal Info Modified Dates Option",
    "Clean Descriptors Option",
)


class ExportError(MibiNodeError):
    """The export cannot be made (unknown analysis, nothing to export, folder in use)."""


@dataclass(frozen=True)
class ExportOutcome:
    """What an export wrote and left out.

    Attributes
    ----------
    labels
        Label -> cases (thyroid: each finding present in a case counts once).
    skipped
        Reason -> studies left out (not assessed, files removed, label not a class, ...).
    warnings
        Sentences for the operator (a class too small for ``train``).
    """

    analysis: str
    out_dir: Path
    cases: int
    files: int
    labels: dict[str, int]
    references: dict[str, int]
    skipped: dict[str, int]
    warnings: tuple[str, ...] = ()

    def train_command(self, bundle: str = "BUNDLE", recipe: str | None = None) -> list[str]:
        """The ``mibi-node train`` command line that trains a bundle on this export."""
        command = ["mibi-node", "train"]
        if self.analysis != "parathyroid":
            command += ["--analysis", self.analysis]
        if recipe is not None:
            command += ["--recipe", recipe]
        return [*command, "--data", str(self.out_dir), "--out", bundle]


# -- de-identification -----------------------------------------------------------------------


@dataclass
class ExportSecret:
    """One export's secrets: the UID salt and the date shift, drawn at random and never
    written anywhere, so the new UIDs and dates cannot be traced back."""

    salt: str = field(default_factory=lambda: secrets.token_hex(32))
    days: int = field(
        default_factory=lambda: _SHIFT_DAYS[0] + secrets.randbelow(_SHIFT_DAYS[1] - _SHIFT_DAYS[0])
    )

    def uid(self, value: str) -> str:
        """The new UID of ``value``: the same for the same UID and secret."""
        return str(generate_uid(entropy_srcs=[self.salt, value.strip()]))

    def date(self, value: str) -> str:
        """A DA value (or the date part of a DT) moved back; "" where it is no date."""
        try:
            moved = dt.datetime.strptime(value[:8], "%Y%m%d") - dt.timedelta(days=self.days)
        except ValueError:
            return ""
        return moved.strftime("%Y%m%d") + value[8:]


def _identifiers(ds: Dataset) -> list[str]:
    """The patient's name parts, IDs, accession number and birth date, to cut out of text."""
    found: list[str] = []
    for keyword in ("PatientName", "OtherPatientNames", "PatientBirthName",
                    "PatientMotherBirthName"):  # fmt: skip
        for value in _values(ds.get(keyword)):
            found += re.split(r"[\^=,\s]+", str(value))
    for keyword in ("PatientID", "OtherPatientIDs", "AccessionNumber", "PatientBirthDate"):
        found += [str(v) for v in _values(ds.get(keyword))]
    for item in ds.get("OtherPatientIDsSequence", None) or []:
        found.append(str(item.get("PatientID", "")))
    unique = {token.strip() for token in found if len(token.strip()) >= 3}
    return sorted(unique, key=len, reverse=True)


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list | tuple) else [value]


def _cleaner(identifiers: Iterable[str]) -> Callable[[str], str]:
    tokens = [re.escape(token) for token in identifiers]
    if not tokens:
        return lambda text: text
    pattern = re.compile(rf"(?<![A-Za-z0-9])(?:{'|'.join(tokens)})(?![A-Za-z0-9])", re.IGNORECASE)
    return lambda text: re.sub(r"\s{2,}", " ", pattern.sub("", text)).strip()


def _clean_dataset(ds: Dataset, secret: ExportSecret, clean: Callable[[str], str]) -> None:
    """Apply the profile to one dataset and, recursively, its sequence items."""
    doomed = [
        elem.tag
        for elem in ds
        if elem.tag.is_private
        or elem.keyword in REMOVED
        or elem.tag.group & 0xFF00 in (0x5000, 0x6000)  # curves and overlays
    ]
    for tag in doomed:
        del ds[tag]
    for elem in ds:
        _clean_element(elem, secret, clean)
    for keyword in _EMPTIED:
        if keyword in ds:
            ds[keyword].value = ""


def _clean_element(elem: DataElement, secret: ExportSecret, clean: Callable[[str], str]) -> None:
    if elem.VR == "SQ":
        for item in elem.value or []:
            _clean_dataset(item, secret, clean)
        return
    if elem.value is None or elem.value == "":
        return
    values = _values(elem.value)
    if elem.VR == "PN":
        elem.value = ""
    elif elem.VR == "UI":
        if elem.keyword not in _KEPT_UIDS:
            mapped = [v if not UID(str(v)).is_private else secret.uid(str(v)) for v in values]
            elem.value = mapped if len(mapped) > 1 else mapped[0]
    elif elem.VR in ("DA", "DT"):
        moved = [secret.date(str(v)) for v in values]
        elem.value = moved if len(moved) > 1 else moved[0]
    elif elem.VR in _TEXT_VRS:
        cleaned = [clean(str(v)) for v in values]
        elem.value = cleaned if len(cleaned) > 1 else cleaned[0]


def deidentify(ds: Dataset, case: str, secret: ExportSecret | None = None) -> Dataset:
    """De-identify ``ds`` in place (see the module's description) and return it.

    Parameters
    ----------
    case
        The dummy Patient's Name and Patient ID (``case-0001``).
    secret
        The export's UID salt and date shift; a new one when ``None`` (the UIDs then map
        differently from any other call's).
    """
    if not isinstance(ds, Dataset):
        raise TypeError(f'Argument "ds" should be a pydicom Dataset, not {type(ds).__name__}.')
    secret = secret or ExportSecret()
    _clean_dataset(ds, secret, _cleaner(_identifiers(ds)))
    ds.PatientName = case
    ds.PatientID = case
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = list(METHOD)
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    return ds


# -- the export ------------------------------------------------------------------------------


def _classes(analysis: str) -> tuple[str, ...]:
    """The class set of the analysis' training (its label vocabulary)."""
    if analysis == "thyroid":
        from mibi_node.analyses.thyroid.result import FINDINGS

        return FINDINGS
    from mibi_node.inference.bundle import MIBI_CLASSES

    return tuple(entry.key for entry in MIBI_CLASSES)


def _label(case: Case) -> tuple[tuple[str, ...], str] | None:
    """The case's labels and where they come from (``truth``, ``verdict``), or ``None``.

    The reference of :class:`Case`; for thyroid (multi-label, no ``diagnosis`` finding)
    also the findings present once every finding has a standing verdict: accepted keeps the
    model's ``present``/``absent``, corrected gives the reader's, rejected the other one.
    """
    if case.reference is not None:
        return (case.reference,), "truth" if case.truth is not None else "verdict"
    if case.analysis != "thyroid" or not case.findings:
        return None
    present = []
    for key, (_kind, model) in case.findings.items():
        decision, value = case.verdicts.get(key, ("", None))
        if decision == VerdictDecision.ACCEPTED.value:
            said = model
        elif decision == VerdictDecision.CORRECTED.value:
            said = value or ""
        elif decision == VerdictDecision.REJECTED.value:
            said = "absent" if model == "present" else "present"
        else:
            return None
        if said == "present":
            present.append(key)
    if not present or ("normal" in present and len(present) > 1):
        return None
    return tuple(present), "verdict"


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"{out_dir} is a file; give a new or empty folder to export into")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise ExportError(f"{out_dir} is not empty; give a new or empty folder to export into")


def _study_files(
    database: Database, files: FileStore, study_ids: list[int]
) -> dict[int, list[Path]]:
    """Each study's stored image files, in reception order; [] once any of them is gone."""
    paths: dict[int, list[Path]] = {study_id: [] for study_id in study_ids}
    with database.session() as session:
        rows = session.execute(
            select(Instance.study_id, Instance.path, Instance.modality, Instance.sop_class_uid)
            .where(Instance.study_id.in_(study_ids))
            .order_by(Instance.study_id, Instance.id)
        ).all()
    for study_id, relative, modality, sop_class_uid in rows:
        if is_image_instance(modality, sop_class_uid):
            paths[study_id].append(files.absolute(relative))
    return {k: v if v and all(p.is_file() for p in v) else [] for k, v in paths.items()}


def _write_case(sources: list[Path], folder: Path, case: str, secret: ExportSecret) -> str | None:
    """De-identify one study's files into ``folder``; the reason it cannot be, else None."""
    datasets = []
    for path in sources:
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, ValueError) as exc:
            logger.warning("export %s: a stored file cannot be read (%s)", case, type(exc).__name__)
            return "unreadable files"
        if str(ds.get("BurnedInAnnotation", "")).upper() == "YES":
            return "burned-in annotation"
        datasets.append(ds)
    folder.mkdir()
    for number, ds in enumerate(datasets, start=1):
        syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
        deidentify(ds, case, secret)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = syntax or ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.preamble = b"\0" * 128
        ds.save_as(folder / f"{number:02d}.dcm", enforce_file_format=True)
    return None


@dataclass(frozen=True)
class _Written:
    """One exported case (what the manifest says of it, and what only the audit keeps)."""

    case: str
    labels: tuple[str, ...]
    reference: str
    bundle_version: str
    files: int
    study_id: int


def _write_cases(
    work: Path,
    kept: list[tuple[Case, tuple[str, ...], str]],
    sources: dict[int, list[Path]],
    skipped: Counter[str],
) -> list[_Written]:
    """Each kept case de-identified into ``work/case-NNNN``, numbered in the given order."""
    secret = ExportSecret()
    written: list[_Written] = []
    for case, labels, reference in kept:
        name = f"case-{len(written) + 1:04d}"
        problem = _write_case(sources[case.study_id], work / name, name, secret)
        if problem is not None:
            skipped[problem] += 1
            continue
        written.append(
            _Written(
                name, labels, reference, case.bundle_version, len(sources[case.study_id]),
                case.study_id,
            )
        )  # fmt: skip
    return written


def _write_labels(root: Path, analysis: str, written: list[_Written]) -> None:
    """``labels.csv`` as the analysis' training reads it."""
    columns = ("folder", "findings") if analysis == "thyroid" else ("path", "label")
    with (root / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(columns)
        writer.writerows((entry.case, ";".join(entry.labels)) for entry in written)


def _write_manifest(path: Path, outcome: ExportOutcome, written: list[_Written]) -> None:
    """``manifest.json``: per case its labels, reference source and bundle version (no IDs)."""
    document = {
        "analysis": outcome.analysis,
        "exported_at": dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat(),
        "mibi_node_version": mibi_node.__version__,
        "deidentification": list(METHOD),
        "cases": [
            {
                "case": entry.case,
                "labels": list(entry.labels),
                "reference": entry.reference,
                "analysis": outcome.analysis,
                "bundle_version": entry.bundle_version,
            }
            for entry in written
        ],
        "labels": outcome.labels,
        "references": outcome.references,
        "skipped": outcome.skipped,
    }
    path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")


def export_assessed(
    database: Database,
    files: FileStore,
    analysis: str,
    out_dir: Path | str,
    *,
    actor: str = "",
) -> ExportOutcome:
    """Write every assessed study of ``analysis`` as a de-identified labelled data set.

    A study is exported when its latest finished job has a reference (the final diagnosis,
    else the standing ``diagnosis`` verdict; thyroid also a full set of finding verdicts), the
    reference is one of the training's classes and every image file is still stored. The
    folder gets ``case-NNNN/NN.dcm`` (cases numbered in a random order), ``labels.csv``
    (parathyroid ``path,label``; thyroid ``folder,findings``) and ``manifest.json``. It is
    written beside ``out_dir`` first and moved into place at the end, so a failed export
    leaves nothing. One audit row (kind ``export``) records the counts and the studies'
    database ids.

    Parameters
    ----------
    files
        The instance store.
    analysis
        ``parathyroid`` or ``thyroid``.
    out_dir
        A new or empty folder.
    actor
        Who asked (``cli:<login>``), for the audit.

    Raises
    ------
    ExportError
        Unknown or non-classifying analysis, a folder in use, no study to export.
    """
    out_dir = Path(out_dir)
    known = available_analyses()
    if analysis not in known:
        raise ExportError(f"unknown analysis {analysis!r} (known: {', '.join(known)})")
    if analysis not in EXPORTABLE:
        what = _NOT_CLASSES.get(analysis, "not a class")
        raise ExportError(
            f"only classifying analyses ({', '.join(EXPORTABLE)}) can be exported: {analysis}'s "
            f"references are {what}, and corrections of points and regions are not built yet"
        )
    _check_out_dir(out_dir)
    classes = _classes(analysis)
    skipped: Counter[str] = Counter()
    labelled: list[tuple[Case, tuple[str, ...], str]] = []
    for case in cases(database, None, analysis):
        found = _label(case)
        if found is None:
            skipped["not assessed"] += 1
        elif not set(found[0]) <= set(classes):
            skipped["label not a training class"] += 1
        else:
            labelled.append((case, *found))
    if not labelled:
        raise ExportError(
            f"no assessed {analysis} study to export: a study needs a final diagnosis "
            "(mibi-node truth import) or an accepted or corrected verdict on its diagnosis"
        )
    sources = _study_files(database, files, [case.study_id for case, _, _ in labelled])
    kept = [item for item in labelled if sources[item[0].study_id]]
    if len(kept) < len(labelled):
        skipped["files removed"] += len(labelled) - len(kept)
    if not kept:
        raise ExportError(
            f"none of the {len(labelled)} assessed {analysis} studies can be exported: "
            "retention has removed their files"
        )
    secrets.SystemRandom().shuffle(kept)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    try:
        written = _write_cases(work, kept, sources, skipped)
        if not written:
            raise ExportError(
                f"none of the {len(kept)} assessed {analysis} studies can be exported: "
                + ", ".join(f"{reason} ({n})" for reason, n in sorted(skipped.items()))
            )
        counts = Counter(label for entry in written for label in entry.labels)
        outcome = ExportOutcome(
            analysis=analysis,
            out_dir=out_dir,
            cases=len(written),
            files=sum(entry.files for entry in written),
            labels={key: counts.get(key, 0) for key in classes},
            references=dict(Counter(entry.reference for entry in written)),
            skipped=dict(sorted(skipped.items())),
            warnings=tuple(
                f"class {key} has {counts.get(key, 0)} "
                f"stud{'y' if counts.get(key, 0) == 1 else 'ies'}; mibi-node train needs 2 "
                "of every class, 4 for a validation study with the default fractions (better 10)"
                for key in classes
                if analysis == "parathyroid" and counts.get(key, 0) < 4
            ),
        )
        _write_labels(work, analysis, written)
        _write_manifest(work / "manifest.json", outcome, written)
        if out_dir.is_dir():
            out_dir.rmdir()
        os.replace(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    audit.record(
        database,
        "export",
        "exported",
        actor=actor,
        message=f"{outcome.cases} assessed {analysis} studies exported de-identified",
        detail={
            "analysis": analysis,
            "cases": outcome.cases,
            "files": outcome.files,
            "folder": str(out_dir.resolve()),
            "labels": outcome.labels,
            "references": outcome.references,
            "skipped": outcome.skipped,
            "studies": sorted(entry.study_id for entry in written),
        },
    )
    logger.info("exported %d %s cases (%d files)", outcome.cases, analysis, outcome.files)
    return outcome
