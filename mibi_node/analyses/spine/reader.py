"""Reading a lumbar spine MR study: find the T2 sagittal series and build the model input.

A study arrives as loose instances in any order: T1 and T2 sagittal series, axial series,
localisers, perhaps an SR. The instances are grouped by series and the T2 sagittal one is
chosen by the tags a scanner gets right most often, in this order of trust: the Image
Orientation (a sagittal slice's normal runs along the patient's x axis), then the Echo and
Repetition Times (T2: TE at least 60 ms and TR at least 1500 ms), then, only when the
timing tags are missing, the Series Description. The slices are sorted along the normal;
the middle one (or the annotated one) and its neighbours become the input's channels.
Every problem is an :class:`~mibi_node.errors.UnusableStudyError` whose sentence names the
file or series; the status page shows it. A study without a T2 sagittal series raises its
subclass :class:`~mibi_node.errors.MissingPhaseError`: the series may still come, so the
job waits for it (``[analyses.spine] max_wait``) before it fails.
"""

from __future__ import annotations

import logging
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from mibi_node.analyses.spine.result import SliceRef, SpineInput
from mibi_node.errors import MissingPhaseError, UnusableStudyError

__all__ = ["read_spine_study"]

logger = logging.getLogger(__name__)

_T2_TE_MS, _T2_TR_MS = 60.0, 1500.0
_T1_TE_MS, _T1_TR_MS = 30.0, 1000.0
_SAGITTAL_TEXT = re.compile(r"(?<![A-Z])SAG", re.IGNORECASE)
_AXIAL_TEXT = re.compile(r"(?<![A-Z])(AX|TRA|AXIAL)", re.IGNORECASE)
_CORONAL_TEXT = re.compile(r"(?<![A-Z])COR", re.IGNORECASE)
_T2_TEXT = re.compile(r"T2(?!\*)", re.IGNORECASE)
_T1_TEXT = re.compile(r"T1", re.IGNORECASE)
_IR_TEXT = re.compile(r"STIR|TIRM|FLAIR", re.IGNORECASE)
_DAMAGED = (
    InvalidDicomError, OSError, ValueError, TypeError, LookupError, AttributeError,
    NotImplementedError, RecursionError, struct.error, EOFError, OverflowError,
)  # fmt: skip


@dataclass(frozen=True)
class _Slice:
    path: Path
    ds: Dataset  # header only


@dataclass
class _Series:
    uid: str
    slices: list[_Slice]

    @property
    def first(self) -> Dataset:
        return self.slices[0].ds

    @property
    def name(self) -> str:
        ds = self.first
        text = str(ds.get("SeriesDescription", "") or "")
        return f"series {ds.get('SeriesNumber', '?')} '{text}'" if text else (
            f"series {ds.get('SeriesNumber', '?')} (no description)"
        )  # fmt: skip


def _number(ds: Dataset, keyword: str) -> float | None:
    try:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        return float(
            value[0] if isinstance(value, Sequence) and not isinstance(value, str) else value
        )
    except _DAMAGED:
        return None


def _normal(ds: Dataset) -> np.ndarray | None:
    try:
        values = [float(v) for v in ds.ImageOrientationPatient]
    except _DAMAGED:
        return None
    if len(values) != 6:
        return None
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    return normal / length if length > 0.5 else None


def _plane(ds: Dataset) -> str | None:
    normal = _normal(ds)
    if normal is None:
        return None
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < 0.8:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _judge(series: _Series) -> tuple[bool, str, int]:
    """Whether a series is T2 sagittal, why (or why not), and how much the evidence is trusted."""
    ds = series.first
    text = str(ds.get("SeriesDescription", "") or "") + " " + str(ds.get("ProtocolName", "") or "")
    plane = _plane(ds)
    if plane is None:
        if _SAGITTAL_TEXT.search(text):
            plane_reason, trust = "description sagittal (no Image Orientation)", 0
        else:
            return (
                False,
                f"{series.name} has no Image Orientation and no 'sag' in its description",
                0,
            )
    elif plane != "sagittal":
        return False, f"{series.name} is {plane}", 0
    else:
        plane_reason, trust = "orientation sagittal", 2
    scanning = str(ds.get("ScanningSequence", "") or "")
    if (
        "IR" in scanning.split("\\")
        or "IR" in list(ds.get("ScanningSequence", []) or [])
        or (_IR_TEXT.search(text))
    ):
        return False, f"{series.name} is an inversion-recovery (STIR/FLAIR) series", 0
    te, tr = _number(ds, "EchoTime"), _number(ds, "RepetitionTime")
    if te is not None and tr is not None:
        timing = f"TE {te:g} ms, TR {tr:g} ms"
        if te >= _T2_TE_MS and tr >= _T2_TR_MS:
            return True, f"{plane_reason}, {timing}", trust + 2
        weighting = "T1-weighted" if te < _T1_TE_MS and tr < _T1_TR_MS else "not T2-weighted"
        return False, f"{series.name} is {weighting} ({timing})", 0
    if _T2_TEXT.search(text) and not _T1_TEXT.search(text):
        return (
            True,
            f"{plane_reason}, description '{text.strip()}' (no echo/repetition times)",
            trust,
        )
    return False, f"{series.name} has no echo/repetition times and no 'T2' in its description", 0


def _headers(paths: Sequence[Path]) -> tuple[list[_Series], list[str]]:
    groups: dict[str, _Series] = {}
    skipped = []
    for path in map(Path, paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except _DAMAGED as error:
            raise UnusableStudyError(f"{path.name} is damaged or not DICOM ({error})") from None
        if "Rows" not in ds or "Columns" not in ds:
            skipped.append(path.name)  # an SR, a presentation state: not an image
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or f"no-series-uid/{path.name}")
        groups.setdefault(uid, _Series(uid, [])).slices.append(_Slice(path, ds))
    return list(groups.values()), skipped


def _position(item: _Slice, normal: np.ndarray | None) -> float | None:
    try:
        position = np.array([float(v) for v in item.ds.ImagePositionPatient])
    except _DAMAGED:
        return None
    if normal is None or position.shape != (3,):
        return None
    return float(position @ normal)


def _sorted(series: _Series, warnings: list[str]) -> list[_Slice]:
    normal = _normal(series.first)
    keyed = [(_position(item, normal), item) for item in series.slices]
    if all(key is not None for key, _ in keyed):
        return [item for _, item in sorted(keyed, key=lambda pair: pair[0])]  # type: ignore[arg-type, return-value]
    warnings.append(f"{series.name}: slices without Image Position, ordered by Instance Number")

    def number(item: _Slice) -> int:
        value = _number(item.ds, "InstanceNumber")
        return int(value) if value is not None else 0

    return sorted(series.slices, key=number)


def _spacing(item: _Slice) -> tuple[float, float] | None:
    try:
        values = [float(v) for v in item.ds.PixelSpacing]
    except _DAMAGED:
        return None
    if len(values) != 2 or min(values) <= 0:
        return None
    return values[0], values[1]


def _geometry(item: _Slice) -> tuple[int, int, tuple[float, float] | None]:
    return int(item.ds.Rows), int(item.ds.Columns), _spacing(item)


def _pixels(item: _Slice) -> np.ndarray:
    try:
        ds = pydicom.dcmread(item.path)
        data = np.asarray(ds.pixel_array, dtype=np.float32)
    except _DAMAGED as error:
        raise UnusableStudyError(
            f"{item.path.name}: the pixel data cannot be read ({error})"
        ) from None
    if "PixelData" not in ds:
        raise UnusableStudyError(f"{item.path.name} has no pixel data")
    if data.ndim != 2:
        raise UnusableStudyError(
            f"{item.path.name}: expected one grey-level slice per instance, got shape {data.shape}"
        )
    slope, intercept = _number(ds, "RescaleSlope"), _number(ds, "RescaleIntercept")
    if slope is not None or intercept is not None:
        data = data * np.float32(slope if slope is not None else 1.0) + np.float32(intercept or 0.0)
    return data


def _ref(item: _Slice) -> SliceRef:
    ds = item.ds
    number = _number(ds, "InstanceNumber")
    return SliceRef(
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        instance_number=int(number) if number is not None else None,
    )


def read_spine_study(
    paths: Sequence[Path], *, channels: int = 3, middle_sop_instance_uid: str | None = None
) -> SpineInput:
    """Build the spine model input from a study's stored files.

    Parameters
    ----------
    paths
        The study's files, in any order, of any series (non-image instances are ignored).
    channels
        Odd number of slices in the input: the middle one and ``channels // 2`` on each
        side (the middle is repeated where the series ends).
    middle_sop_instance_uid
        Use this slice as the middle one (training: the annotated instance) instead of the
        series' middle slice.

    Raises
    ------
    UnusableStudyError
        A file cannot be read, no series is T2 sagittal (each series' refusal is listed),
        the given instance is not in the chosen series, or the middle slice lacks Pixel
        Spacing or pixel data.
    """
    if isinstance(channels, bool) or not isinstance(channels, int):
        raise TypeError('Argument "channels" should be an integer.')
    if channels < 1 or channels % 2 == 0:
        raise ValueError(f'Argument "channels" should be a positive odd integer, not {channels}.')
    if not paths:
        raise UnusableStudyError("the study has no files")
    groups, skipped = _headers(paths)
    if not groups:
        raise UnusableStudyError(f"the study has no images ({len(skipped)} non-image files)")
    warnings: list[str] = []
    judged = [(_judge(series), series) for series in groups]
    chosen = [(trust, reason, series) for (ok, reason, trust), series in judged if ok]
    if middle_sop_instance_uid is not None:
        holding = [
            s for s in groups if any(
                str(i.ds.get("SOPInstanceUID", "")) == middle_sop_instance_uid for i in s.slices
            )
        ]  # fmt: skip
        if not holding:
            raise UnusableStudyError(f"instance {middle_sop_instance_uid} is not in the study")
        chosen = [c for c in chosen if c[2] is holding[0]]
        if not chosen:
            refusal = next(reason for (_, reason, _), s in judged if s is holding[0])
            raise UnusableStudyError(
                f"instance {middle_sop_instance_uid} is not in a T2 sagittal series: {refusal}"
            )
    if not chosen:
        # The T2 sagittal series may still come (a scanner sends series as they finish): the
        # job waits for it like a MIBI study waits for its delayed phase, then fails.
        refusals = "; ".join(reason for (_, reason, _), _ in judged)
        raise MissingPhaseError(
            f"no T2 sagittal series: {refusals}",
            missing=("T2 sagittal",),
            found=tuple(series.name for series in groups),
        )
    chosen.sort(key=lambda c: (-c[0], -len(c[2].slices), _number(c[2].first, "SeriesNumber") or 0))
    trust, reason, series = chosen[0]
    if len(chosen) > 1:
        others = ", ".join(c[2].name for c in chosen[1:])
        warnings.append(f"several T2 sagittal series; used {series.name}, not {others}")
    ordered = _sorted(series, warnings)
    if middle_sop_instance_uid is not None:
        middle_at = next(
            i for i, item in enumerate(ordered)
            if str(item.ds.get("SOPInstanceUID", "")) == middle_sop_instance_uid
        )  # fmt: skip
    else:
        middle_at = len(ordered) // 2
    middle = ordered[middle_at]
    rows, cols, spacing = _geometry(middle)
    if spacing is None:
        raise UnusableStudyError(f"{middle.path.name} ({series.name}) has no usable Pixel Spacing")
    same = [item for item in ordered if _geometry(item) == (rows, cols, spacing)]
    if len(same) < len(ordered):
        warnings.append(
            f"{series.name}: {len(ordered) - len(same)} slice(s) of another size or spacing "
            "left out"
        )
    centre = same.index(middle)
    half = channels // 2
    picked = [
        same[i] if 0 <= i < len(same) else middle for i in range(centre - half, centre + half + 1)
    ]
    if any(item is middle for k, item in enumerate(picked) if k != half):
        warnings.append(f"{series.name}: the middle slice is repeated at the series' edge")
    stack = np.stack([_pixels(item) for item in picked])
    neighbours = tuple(_ref(item) for k, item in enumerate(picked) if k != half)
    logger.debug("spine input from %s: %s", series.name, reason)
    return SpineInput(
        study_instance_uid=str(middle.ds.get("StudyInstanceUID", "")),
        image=stack.astype(np.float32),
        pixel_spacing=spacing,
        middle=_ref(middle),
        neighbours=neighbours,
        series_description=str(middle.ds.get("SeriesDescription", "") or ""),
        reason=reason,
        warnings=tuple(warnings),
    )
