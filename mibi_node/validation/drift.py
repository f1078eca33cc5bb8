"""Input drift (issue 19): does each camera still send what the model was trained on?

Every bundle keeps a summary of its training inputs (:data:`SUMMARY_FILE`, written by the
training or by ``mibi-node bundle summarise``); the worker stores the same summary of each
job's images in ``job.inputs``. :func:`drift_report` compares, per analysis and camera
(Station Name / Manufacturer Model Name / Device Serial Number), the latest studies with the
training summary:

* each scalar feature (frames, pixel size, counts per frame, intensity quantiles, acquisition
  parameters) by the Population Stability Index over the training deciles and the
  two-sample Kolmogorov-Smirnov test (:func:`scipy.stats.ks_2samp`): *drift* when the PSI
  reaches ``drift_psi_threshold`` and the test's p value is below ``drift_ks_alpha`` divided
  by the number of features compared (Bonferroni), *watch* when the PSI reaches
  ``drift_psi_watch`` and p is below ``drift_ks_alpha``;
* the pooled intensity histogram by its PSI alone (the same two thresholds);
* the modality, the matrix, the pixel size and the text settings (collimator, energy window,
  convolution kernel, scanning sequence) by the share of studies whose value training never
  saw: *drift* above ``drift_unseen_share``, *watch* from one study on.

A camera with fewer than ``drift_min_studies`` studies gets no verdict (``too few studies``).
docs/validation.md gives the formulas.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from numpy.typing import ArrayLike
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_rescale, iter_pixels
from sqlalchemy import select

from mibi_node.errors import MibiNodeError
from mibi_node.storage.database import Database
from mibi_node.storage.instances import is_image_instance
from mibi_node.storage.models import Job, Study
from mibi_node.validation.headers import StudyHeader

if TYPE_CHECKING:
    from mibi_node.config import Config, ValidationConfig

__all__ = [
    "FORMAT",
    "HISTOGRAM_EDGES",
    "SUMMARY_FILE",
    "AnalysisDrift",
    "DriftError",
    "FeatureDrift",
    "StationDrift",
    "compare",
    "drift_report",
    "population_stability_index",
    "read_training_summary",
    "record_training_inputs",
    "studies_in_folder",
    "summarise_inputs",
    "training_summary",
    "write_training_summary",
]

logger = logging.getLogger(__name__)

#: The training summary's file name in a bundle folder (no weight file: no hash to check).
SUMMARY_FILE = "inputs.json"
#: Version of the summaries' layout; a summary of another version is not compared.
FORMAT = 1
#: Most frames whose pixels one study's summary reads (instances sampled evenly).
MAX_FRAMES = 32
#: Most pixel values kept per frame for the quantiles and the histogram (a regular stride).
_VALUES_PER_FRAME = 65_536
#: The fixed histogram scheme: a signed logarithmic scale, four bins per decade from 1 to
#: 1e5 on either side of 0 and one bin [0, 1); values beyond +-1e5 fall in the end bins.
_DECADES = np.arange(0, 5 * 4 + 1) / 4
HISTOGRAM_EDGES: tuple[float, ...] = tuple(
    float(x) for x in np.concatenate([-(10.0 ** _DECADES[::-1]), [0.0], 10.0**_DECADES])
)
#: Proportions below this count as this in the PSI (an empty bin would make it infinite).
PSI_FLOOR = 1e-4
#: Relative margin around the training's pixel sizes within which a pixel size counts as seen.
SPACING_MARGIN = 0.05
_QUANTILES = {"intensity_p01": 0.01, "intensity_p50": 0.5, "intensity_p99": 0.99}
_VERDICTS = ("ok", "watch", "drift")


class DriftError(MibiNodeError):
    """A summary that cannot be made, read or written; the message names the file."""


# -- one study's summary ---------------------------------------------------------------------


def summarise_inputs(
    sources: Iterable[Dataset | Path | str], *, max_frames: int = MAX_FRAMES
) -> dict[str, Any]:
    """Summarise one study's images: what input drift is measured on.

    Parameters
    ----------
    sources
        The study's instances (datasets or DICOM files; a folder stands for the files under
        it). Instances that are not images (SR, SEG, presentation states) are left out.
    max_frames
        Most frames whose pixels are read: at most this many instances, sampled evenly, and
        as many frames of each as the budget leaves. The frame count is scaled up from the
        sampled instances, so a 300-slice CT costs about as much as a planar study.

    Returns
    -------
    dict
        ``modality``, ``matrix`` (rows x columns), ``pixel_spacing_mm``, ``instances``,
        ``features`` (numbers compared by PSI and KS), ``settings`` (text acquisition
        parameters) and ``histogram`` (fractions of the pixel values in the bins of
        :data:`HISTOGRAM_EDGES`).

    Raises
    ------
    DriftError
        No image among the sources, or none could be read.
    """
    if max_frames < 1:
        raise ValueError(f'Argument "max_frames" should be positive, got {max_frames}.')
    items = _expand(sources)
    picked = _spread(len(items), max_frames)
    headers: list[tuple[Dataset | Path, Dataset]] = []
    for index in picked:
        header = _header(items[index])
        if header is not None and _is_image(header):
            headers.append((items[index], header))
    if not headers:
        raise DriftError(f"none of the {len(items)} instances is a readable image")
    budget = max(1, max_frames // len(headers))
    values: list[np.ndarray] = []
    frame_counts: list[float] = []
    sampled_frames = 0
    matrices: Counter[str] = Counter()
    for source, header in headers:
        frames = _frames(header)
        matrices[f"{int(header.Rows)}x{int(header.Columns)}"] += frames
        indices = _spread(frames, budget)
        for pixels in iter_pixels(_pixel_source(source), indices=indices):
            frame = np.asarray(apply_rescale(pixels, header), dtype=np.float64)
            frame_counts.append(float(frame.sum()))
            flat = frame.ravel()
            values.append(flat[:: max(1, flat.size // _VALUES_PER_FRAME)])
            sampled_frames += 1
    if not values:
        raise DriftError("no frame of the study's images could be decoded")
    matrix = matrices.most_common(1)[0][0]
    # The acquisition is read from the first instance of the main matrix (not a localiser).
    first = next(h for _, h in headers if f"{int(h.Rows)}x{int(h.Columns)}" == matrix)
    modality = str(first.get("Modality", "") or "").upper()
    pooled = np.concatenate(values)
    scale = len(items) / len(picked)
    features: dict[str, float] = {
        "frames": round(sum(_frames(h) for _, h in headers) * scale, 1),
        "intensity_mean": float(pooled.mean()),
        **{name: float(np.quantile(pooled, q)) for name, q in _QUANTILES.items()},
    }
    if modality == "NM":
        features["counts_per_frame"] = float(np.mean(frame_counts))
    spacing = _spacing(first)
    if spacing is not None:
        features["pixel_spacing_mm"] = float(np.mean(spacing))
    features |= {k: v for k, v in _numbers(first).items() if v is not None}
    clipped = np.clip(pooled, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(clipped, bins=np.asarray(HISTOGRAM_EDGES))
    return {
        "format": FORMAT,
        "modality": modality,
        "matrix": matrix,
        "pixel_spacing_mm": spacing,
        "instances": len(items),
        "sampled_instances": len(headers),
        "sampled_frames": sampled_frames,
        "features": features,
        "settings": {k: v for k, v in _texts(first).items() if v},
        "histogram": [round(float(c) / max(int(counts.sum()), 1), 6) for c in counts],
    }


def _expand(sources: Iterable[Dataset | Path | str]) -> list[Dataset | Path]:
    items: list[Dataset | Path] = []
    for source in sources:
        if isinstance(source, Dataset):
            items.append(source)
            continue
        path = Path(source)
        if path.is_dir():
            items += [p for p in sorted(path.rglob("*")) if p.is_file() and p.name != "DICOMDIR"]
        else:
            items.append(path)
    return items


def _spread(count: int, most: int) -> list[int]:
    """Up to ``most`` indices spread evenly over ``range(count)``, first and last included."""
    if count <= most:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, most)})


def _header(source: Dataset | Path) -> Dataset | None:
    if isinstance(source, Dataset):
        return source
    try:
        return pydicom.dcmread(source, stop_before_pixels=True)
    except (OSError, InvalidDicomError, ValueError, EOFError) as exc:
        logger.debug("not summarised: %s: %s", source.name, exc)
        return None


def _pixel_source(source: Dataset | Path) -> Dataset | str:
    return source if isinstance(source, Dataset) else str(source)


def _is_image(header: Dataset) -> bool:
    modality = str(header.get("Modality", "") or "")
    sop_class = str(header.get("SOPClassUID", "") or "")
    return is_image_instance(modality, sop_class) and "Rows" in header and "Columns" in header


def _frames(header: Dataset) -> int:
    try:
        return max(1, int(header.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _find(header: Dataset, keyword: str) -> Any:
    """An attribute at the top level, else in the first item of a shared (then per-frame)
    functional group, as enhanced multi-frame objects keep it."""
    if keyword in header and header[keyword].value not in (None, ""):
        return header[keyword].value
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        for group in header.get(groups, [])[:1]:
            for element in group:
                if element.VR == "SQ":
                    for item in element.value[:1]:
                        if keyword in item and item[keyword].value not in (None, ""):
                            return item[keyword].value
    return None


def _number(value: Any) -> float | None:
    if isinstance(value, list | tuple | MultiValue):
        value = value[0] if len(value) else None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _spacing(header: Dataset) -> list[float] | None:
    value = _find(header, "PixelSpacing")
    if value is None or len(value) != 2:
        return None
    numbers = [_number(v) for v in value]
    return [round(n, 4) for n in numbers if n is not None] if None not in numbers else None


def _item(header: Dataset, *path: str) -> Dataset | None:
    item: Dataset | None = header
    for keyword in path:
        sequence = item.get(keyword) if item is not None else None
        item = sequence[0] if sequence else None
    return item


def _numbers(header: Dataset) -> dict[str, float | None]:
    """The numeric acquisition parameters a header has (NM, CT, MR, PET)."""
    duration = _number(header.get("ActualFrameDuration"))
    for sequence in ("PhaseInformationSequence", "RotationInformationSequence"):
        if duration is None:
            duration = _number(getattr(_item(header, sequence), "ActualFrameDuration", None))
    window = _item(header, "EnergyWindowInformationSequence", "EnergyWindowRangeSequence")
    return {
        "frame_duration_s": None if duration is None else duration / 1000.0,
        "energy_window_lower_kev": _number(getattr(window, "EnergyWindowLowerLimit", None)),
        "energy_window_upper_kev": _number(getattr(window, "EnergyWindowUpperLimit", None)),
        "slice_thickness_mm": _number(_find(header, "SliceThickness")),
        "kvp": _number(_find(header, "KVP")),
        "tube_current_ma": _number(_find(header, "XRayTubeCurrent")),
        "exposure_mas": _number(_find(header, "Exposure")),
        "magnetic_field_strength_t": _number(_find(header, "MagneticFieldStrength")),
        "repetition_time_ms": _number(_find(header, "RepetitionTime")),
        "echo_time_ms": _number(_find(header, "EchoTime") or _find(header, "EffectiveEchoTime")),
        "flip_angle_deg": _number(_find(header, "FlipAngle")),
    }


def _text(value: Any) -> str:
    if isinstance(value, list | tuple | MultiValue):
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value).strip()


def _texts(header: Dataset) -> dict[str, str]:
    """The text acquisition parameters compared value by value."""
    detector = _item(header, "DetectorInformationSequence")
    collimator = getattr(detector, "CollimatorGridName", None) or getattr(
        detector, "CollimatorType", None
    )
    window = _item(header, "EnergyWindowInformationSequence")
    return {
        "collimator": _text(collimator),
        "energy_window_name": _text(getattr(window, "EnergyWindowName", None)),
        "convolution_kernel": _text(_find(header, "ConvolutionKernel")),
        "scanning_sequence": _text(_find(header, "ScanningSequence")),
    }


# -- the training summary in the bundle ------------------------------------------------------


def training_summary(summaries: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool the summaries of a bundle's training studies into its reference.

    It keeps each scalar feature's per-study values (the KS test needs them) and deciles,
    the modalities, matrices, text settings and how often each was seen, the range of the
    pixel sizes, and the mean of the studies' histograms (each study weighs the same).
    """
    if not summaries:
        raise DriftError("no study to summarise")
    values: dict[str, list[float]] = defaultdict(list)
    settings: dict[str, Counter[str]] = defaultdict(Counter)
    spacings = []
    for summary in summaries:
        for name, value in summary["features"].items():
            values[name].append(float(value))
        for name, text in summary.get("settings", {}).items():
            settings[name][text] += 1
        if summary.get("pixel_spacing_mm"):
            spacings += list(summary["pixel_spacing_mm"])
    histogram = np.mean([s["histogram"] for s in summaries], axis=0)
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "studies": len(summaries),
        "modalities": dict(Counter(s["modality"] for s in summaries)),
        "matrices": dict(Counter(s["matrix"] for s in summaries)),
        "pixel_spacing_mm": {"min": min(spacings), "max": max(spacings)} if spacings else None,
        "settings": {name: dict(counter) for name, counter in sorted(settings.items())},
        "features": {
            name: {
                "values": numbers,
                "deciles": [float(q) for q in np.quantile(numbers, np.arange(1, 10) / 10)],
            }
            for name, numbers in sorted(values.items())
        },
        "histogram_edges": list(HISTOGRAM_EDGES),
        "histogram": [round(float(p), 6) for p in histogram],
    }


def studies_in_folder(folder: Path | str) -> list[list[Path]]:
    """The DICOM files under ``folder`` grouped by Study Instance UID (other files skipped).

    Raises
    ------
    DriftError
        The folder does not exist or holds no DICOM image.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DriftError(f"{root}: no such folder")
    studies: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.name == "DICOMDIR":
            continue
        header = _header(path)
        if header is not None and _is_image(header) and "StudyInstanceUID" in header:
            studies[str(header.StudyInstanceUID)].append(path)
    if not studies:
        raise DriftError(f"{root}: holds no DICOM image")
    return list(studies.values())


def write_training_summary(
    bundle: Path | str,
    studies: Iterable[Sequence[Path | str] | Path | str],
    *,
    max_frames: int = MAX_FRAMES,
) -> dict[str, Any]:
    """Summarise training studies into ``bundle/inputs.json`` (atomically); returns it.

    ``studies``: each study's files (or its folder). A study that cannot be summarised is
    left out and counted in the summary's ``skipped``.

    Raises
    ------
    DriftError
        The bundle folder has no manifest, no study could be summarised, or the file
        cannot be written.
    """
    folder = Path(bundle)
    if not (folder / "bundle.json").is_file():
        raise DriftError(f"{folder}: not a model bundle (it has no bundle.json)")
    summaries = []
    skipped = 0
    for study in studies:
        files = [study] if isinstance(study, str | Path) else list(study)
        try:
            summaries.append(summarise_inputs(files, max_frames=max_frames))
        except (DriftError, OSError, ValueError, AttributeError, TypeError, RuntimeError) as exc:
            skipped += 1
            logger.debug("a training study was not summarised: %s", exc)
    if not summaries:
        raise DriftError(f"{folder}: none of the {skipped} training studies could be summarised")
    reference = training_summary(summaries) | {"skipped": skipped}
    path = folder / SUMMARY_FILE
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(json.dumps(reference) + "\n", encoding="utf-8")
        os.replace(temporary, path)
    except OSError as exc:
        raise DriftError(f"{path}: cannot write it ({exc.strerror or exc})") from None
    return reference


def record_training_inputs(
    bundle: Path | str, studies: Iterable[Sequence[Path | str] | Path | str]
) -> dict[str, Any] | None:
    """What the trainings call once the bundle is written: :func:`write_training_summary`,
    with a warning instead of an error (the bundle is usable without its summary; drift is
    then not measured until ``mibi-node bundle summarise`` writes one)."""
    try:
        reference = write_training_summary(bundle, studies)
    except DriftError as exc:
        logger.warning("no training input summary for drift: %s", exc)
        return None
    logger.info("%s: training inputs of %d studies summarised", bundle, reference["studies"])
    return reference


def read_training_summary(bundle: Path | str) -> dict[str, Any] | None:
    """The bundle's training summary; ``None`` when it has none.

    Raises
    ------
    DriftError
        The file is not readable JSON, or of another format.
    """
    path = Path(bundle) / SUMMARY_FILE
    try:
        stat = path.stat()
    except OSError:
        return None
    return _read_summary(str(path), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=16)
def _read_summary(path: str, _mtime_ns: int, _size: int) -> dict[str, Any]:
    """Read once per version of the file (each metrics scrape asks again)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DriftError(f"{path}: cannot read it ({exc})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DriftError(f"{path}: not a training input summary of format {FORMAT}")
    if data.get("histogram_edges") != list(HISTOGRAM_EDGES):
        raise DriftError(f"{path}: its histogram has other bins than this version's")
    return data


# -- the comparison --------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureDrift:
    """One feature of one camera against training.

    ``test``: ``psi+ks`` (``statistic`` the PSI, with the KS statistic and p value),
    ``psi`` (the histogram) or ``unseen`` (``statistic`` the share of studies with a value
    training never saw, listed in ``unseen``). ``threshold`` is the statistic's drift
    threshold.
    """

    feature: str
    test: str
    statistic: float
    threshold: float
    verdict: str
    ks_statistic: float | None = None
    p_value: float | None = None
    training_median: float | None = None
    recent_median: float | None = None
    unseen: tuple[str, ...] = ()


@dataclass
class StationDrift:
    """One camera's latest studies of one analysis against the bundle's training inputs."""

    analysis: str
    station: str
    studies: int
    #: ok, watch, drift (the worst of the features) or "too few studies".
    verdict: str
    features: list[FeatureDrift] = field(default_factory=list)

    @property
    def alarm(self) -> bool:
        """Whether a feature drifts."""
        return self.verdict == "drift"

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return asdict(self) | {"alarm": self.alarm}


@dataclass
class AnalysisDrift:
    """The cameras of one analysis; ``problem`` says why none could be compared."""

    analysis: str
    bundle: str
    reference_studies: int
    stations: list[StationDrift] = field(default_factory=list)
    problem: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "analysis": self.analysis,
            "bundle": self.bundle,
            "reference_studies": self.reference_studies,
            "problem": self.problem,
            "stations": [station.as_dict() for station in self.stations],
        }


def population_stability_index(expected: ArrayLike, actual: ArrayLike) -> float:
    """PSI = sum_i (a_i - e_i) ln(a_i / e_i) over the bins' proportions (each floored at
    :data:`PSI_FLOOR`; ``expected`` is training's, ``actual`` the recent studies')."""
    e = np.maximum(np.asarray(expected, dtype=np.float64), PSI_FLOOR)
    a = np.maximum(np.asarray(actual, dtype=np.float64), PSI_FLOOR)
    return float(np.sum((a - e) * np.log(a / e)))


def _decile_proportions(cuts: Sequence[float], values: Sequence[float]) -> np.ndarray:
    """Proportions of ``values`` in the bins the cut points make: below the first, each cut
    point itself, between two, above the last (2k + 1 bins), so that a feature that takes
    few values (the frame count) is compared value by value."""
    edges = np.asarray(cuts, dtype=np.float64)
    x = np.asarray(values, dtype=np.float64)
    index = 2 * np.searchsorted(edges, x, side="left") + np.isin(x, edges)
    return np.bincount(index, minlength=2 * len(edges) + 1) / len(x)


def _worst(verdicts: Iterable[str]) -> str:
    return max(verdicts, key=_VERDICTS.index, default="ok")


def compare(
    reference: dict[str, Any], summaries: Sequence[dict[str, Any]], settings: ValidationConfig
) -> list[FeatureDrift]:
    """The features of ``summaries`` (one camera's studies) against a training summary."""
    from scipy.stats import ks_2samp

    n = len(summaries)
    features: list[FeatureDrift] = []
    scalars = []
    for name, train in reference["features"].items():
        recent = [float(s["features"][name]) for s in summaries if name in s["features"]]
        if len(recent) >= settings.drift_min_studies:
            scalars.append((name, train, recent))
    for name, train, recent in scalars:
        psi = population_stability_index(
            _decile_proportions(train["deciles"], train["values"]),
            _decile_proportions(train["deciles"], recent),
        )
        test = ks_2samp(train["values"], recent)
        p = float(test.pvalue)
        if psi >= settings.drift_psi_threshold and p < settings.drift_ks_alpha / len(scalars):
            verdict = "drift"
        elif psi >= settings.drift_psi_watch and p < settings.drift_ks_alpha:
            verdict = "watch"
        else:
            verdict = "ok"
        features.append(
            FeatureDrift(name, "psi+ks", psi, settings.drift_psi_threshold, verdict,
                         float(test.statistic), p, float(np.median(train["values"])),
                         float(np.median(recent)))
        )  # fmt: skip
    psi = population_stability_index(
        reference["histogram"], np.mean([s["histogram"] for s in summaries], axis=0)
    )
    verdict = "ok"
    if psi >= settings.drift_psi_threshold:
        verdict = "drift"
    elif psi >= settings.drift_psi_watch:
        verdict = "watch"
    features.append(
        FeatureDrift("intensity_histogram", "psi", psi, settings.drift_psi_threshold, verdict)
    )
    settings_seen = reference["settings"]
    seen: dict[str, set[str]] = {
        "modality": set(reference["modalities"]),
        "matrix": set(reference["matrices"]),
        **{name: set(counts) for name, counts in settings_seen.items()},
    }
    values: dict[str, list[str]] = {
        "modality": [s["modality"] for s in summaries],
        "matrix": [s["matrix"] for s in summaries],
        **{
            name: [s.get("settings", {}).get(name, "") for s in summaries] for name in settings_seen
        },
    }
    if reference.get("pixel_spacing_mm"):
        seen["pixel_size"] = set()  # a pixel size outside training's range is unseen
        values["pixel_size"] = [_outside(reference["pixel_spacing_mm"], s) for s in summaries]
    for name in seen:
        unseen = [v for v in values[name] if v and v not in seen[name]]
        share = len(unseen) / n
        verdict = "drift" if share > settings.drift_unseen_share else "watch" if unseen else "ok"
        features.append(
            FeatureDrift(name, "unseen", share, settings.drift_unseen_share, verdict,
                         unseen=tuple(sorted(set(unseen))))
        )  # fmt: skip
    return features


def _outside(seen: dict[str, float], summary: dict[str, Any]) -> str:
    """The study's pixel size as text when it lies outside training's range (widened by
    :data:`SPACING_MARGIN`), else ""."""
    low, high = seen["min"] * (1 - SPACING_MARGIN), seen["max"] * (1 + SPACING_MARGIN)
    spacing = summary.get("pixel_spacing_mm") or []
    if all(low <= value <= high for value in spacing):
        return ""
    return "x".join(f"{value:g}" for value in spacing)


def drift_report(
    database: Database,
    config: Config,
    analysis: str | None = None,
    *,
    window: int | None = None,
) -> list[AnalysisDrift]:
    """Input drift of each camera of each enabled analysis (or only ``analysis``).

    A camera's studies are the latest ``window`` (default ``validation.drift_window``)
    studies of the analysis whose job recorded its inputs (the latest such job per study;
    shadow jobs are left out). Never raises for a bundle without a usable summary: its
    ``problem`` says why.
    """
    settings = config.validation
    if window is not None:
        if window < 1:
            raise ValueError(f'Argument "window" should be positive, got {window}.')
        settings = settings.model_copy(
            update={"drift_window": window,
                    "drift_min_studies": min(settings.drift_min_studies, window)}
        )  # fmt: skip
    names = (analysis,) if analysis is not None else config.enabled_analyses
    return [_analysis_drift(database, config, name, settings) for name in names]


def _analysis_drift(
    database: Database, config: Config, name: str, settings: ValidationConfig
) -> AnalysisDrift:
    bundle = config.bundle_for(name)
    report = AnalysisDrift(name, str(bundle), 0)
    try:
        reference = read_training_summary(bundle)
    except DriftError as exc:
        report.problem = str(exc)
        return report
    if reference is None:
        report.problem = (
            f"the bundle {bundle} has no {SUMMARY_FILE} (mibi-node bundle summarise BUNDLE "
            "TRAINING_DICOM_FOLDER writes one)"
        )
        return report
    report.reference_studies = int(reference["studies"])
    for station, summaries in _recent_inputs(database, name, settings.drift_window).items():
        if len(summaries) < settings.drift_min_studies:
            report.stations.append(StationDrift(name, station, len(summaries), "too few studies"))
            continue
        features = compare(reference, summaries, settings)
        verdict = _worst(f.verdict for f in features)
        report.stations.append(StationDrift(name, station, len(summaries), verdict, features))
    return report


def _recent_inputs(
    database: Database, analysis: str, window: int
) -> dict[str, list[dict[str, Any]]]:
    """Camera -> the input summaries of its latest ``window`` studies (newest first)."""
    with database.session() as session:
        rows = session.execute(
            select(Job.id, Job.study_id, Study.station_name, Study.manufacturer_model_name,
                   Study.device_serial_number)
            .join(Study, Study.id == Job.study_id)
            .where(Job.analysis == analysis, Job.shadow.is_(False), Job.inputs.is_not(None))
            .order_by(Job.id.desc())
        ).all()  # fmt: skip
        chosen: dict[str, list[int]] = defaultdict(list)
        studies: set[int] = set()
        for job_id, study_id, *camera in rows:
            if study_id in studies:
                continue
            studies.add(study_id)
            station = StudyHeader("", *camera).station
            if len(chosen[station]) < window:
                chosen[station].append(job_id)
        wanted = [job_id for ids in chosen.values() for job_id in ids]
        inputs: dict[int, Any] = dict(
            session.execute(select(Job.id, Job.inputs).where(Job.id.in_(wanted))).all()
        )
    out = {}
    for station, ids in sorted(chosen.items()):
        summaries = [inputs[i] for i in ids if _usable(inputs.get(i))]
        if summaries:
            out[station] = summaries
    return out


def _usable(summary: Any) -> bool:
    return isinstance(summary, dict) and summary.get("format") == FORMAT
