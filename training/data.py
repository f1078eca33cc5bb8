"""Labelled studies for training and testing: discovery, reading, caching and splits.

Two layouts of a data folder are understood:

* **labels.csv** (what ``mibi-node synth`` writes and what a PACS export plus a spreadsheet
  gives): DICOM files anywhere below the folder, and a ``labels.csv`` with a ``label`` column
  and either a ``path`` column (the study's folder or file, relative to the data folder) or a
  ``study_instance_uid`` column (files are then grouped by their Study Instance UID).
  Further columns (a phantom's lesion centres) are kept as ground truth for the test module.
* **class folders** (the patent's form): one sub-folder per class, named after the class key
  (``adenoma``) or its display name (``Parathyroid adenoma``), holding images. A file is one
  sample: DICOM, or PNG/TIFF (one grey channel, so the recipe must declare a single input
  channel); a sub-folder of DICOM files is one study.

Everything is read through :mod:`mibi_node.imaging` (the NM reader, the adaptive median
filter and :func:`~mibi_node.imaging.preprocess.to_model_input`) exactly as the inference
engine reads a study, so training and serving see identical input. The preprocessed arrays are
cached on disk under a key made of the data fingerprint (file contents and labels) and the
preprocessing settings, so a second run skips decoding and filtering. The splits live in
:mod:`training.split`.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from mibi_node.errors import MibiNodeError, UnusableStudyError
from mibi_node.imaging.preprocess import Normalisation, to_model_input
from mibi_node.imaging.study import PhaseImage, StudyInput
from mibi_node.inference.bundle import MIBI_CLASSES

__all__ = [
    "CLASS_KEYS",
    "DataError",
    "DataSource",
    "Preprocessing",
    "Sample",
    "TrainingArrays",
    "check_class_counts",
    "default_cache_dir",
    "discover",
    "load_arrays",
    "read_sample",
]

logger = logging.getLogger(__name__)

#: Class keys in output order.
CLASS_KEYS: tuple[str, ...] = tuple(entry.key for entry in MIBI_CLASSES)
#: Version of the cache layout; bump it when the cached content changes meaning.
CACHE_FORMAT = 1
#: Classes with fewer studies than this get a warning.
FEW_STUDIES = 10
_IMAGE_SUFFIXES = (".png", ".tif", ".tiff")


class DataError(MibiNodeError):
    """A data folder cannot be used for training or testing; the message says why."""


@dataclass(frozen=True)
class Sample:
    """One labelled study (or image) of a data folder.

    Attributes
    ----------
    key
        Stable identifier: the Study Instance UID (labels.csv) or the path relative to the
        data folder (class folders).
    label
        Index into :data:`CLASS_KEYS`.
    files
        The files that make up the sample.
    kind
        ``"dicom"`` or ``"image"`` (PNG/TIFF).
    truth
        Extra columns of ``labels.csv`` (a phantom's lesion centres, pixel spacing, ...).
    """

    key: str
    label: int
    files: tuple[Path, ...]
    kind: Literal["dicom", "image"] = "dicom"
    truth: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSource:
    """A discovered data folder.

    Attributes
    ----------
    root
        The folder.
    layout
        ``"labels"`` or ``"folders"``.
    samples
        The labelled samples, sorted by key.
    fingerprint
        sha256 over every sample's key, label and file contents: the same data gives the same
        fingerprint wherever it lies.
    """

    root: Path
    layout: Literal["labels", "folders"]
    samples: tuple[Sample, ...]
    fingerprint: str

    @property
    def labels(self) -> np.ndarray:
        """(N,) class indices."""
        return np.asarray([sample.label for sample in self.samples], dtype=np.int64)

    @property
    def keys(self) -> tuple[str, ...]:
        """Sample keys in order."""
        return tuple(sample.key for sample in self.samples)

    def class_counts(self) -> dict[str, int]:
        """Class key -> number of samples (every class, zeros included)."""
        counts = Counter(sample.label for sample in self.samples)
        return {key: counts.get(i, 0) for i, key in enumerate(CLASS_KEYS)}

    def subset(self, keys: Sequence[str]) -> list[Sample]:
        """The samples with the given keys, in that order."""
        index = {sample.key: sample for sample in self.samples}
        missing = [key for key in keys if key not in index]
        if missing:
            raise DataError(
                f"data folder {self.root} lacks {len(missing)} studies of the split "
                f"(first: {missing[0]}); was the split made from other data?"
            )
        return [index[key] for key in keys]


def _class_index(name: str, where: str) -> int:
    wanted = name.strip().lower()
    for i, entry in enumerate(MIBI_CLASSES):
        if wanted in (entry.key, entry.display.lower()):
            return i
    raise DataError(f"{where}: unknown class {name!r}; the classes are {list(CLASS_KEYS)}")


def _hash_file(path: Path, digest: Any) -> None:
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)


def _fingerprint(root: Path, layout: str, samples: Sequence[Sample]) -> str:
    digest = hashlib.sha256(f"mibi-node data {layout}\n".encode())
    for sample in samples:
        digest.update(f"{sample.key}\t{CLASS_KEYS[sample.label]}\n".encode())
        for path in sample.files:
            digest.update(f"{path.relative_to(root).as_posix()}\n".encode())
            _hash_file(path, digest)
    return digest.hexdigest()


def _visible_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts)
    )


def _from_labels(root: Path) -> list[Sample]:
    labels_path = root / "labels.csv"
    with labels_path.open(newline="", encoding="utf-8-sig") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise DataError(f"{labels_path}: no rows")
    columns = set(rows[0])
    if "label" not in columns or not columns & {"path", "study_instance_uid"}:
        raise DataError(
            f"{labels_path}: needs a 'label' column and a 'path' or 'study_instance_uid' column"
        )
    by_uid: dict[str, list[Path]] | None = None
    samples: list[Sample] = []
    seen: set[str] = set()
    for line, row in enumerate(rows, start=2):
        where = f"{labels_path}, line {line}"
        label = _class_index(row.get("label") or "", where)
        relative = (row.get("path") or "").strip()
        uid = (row.get("study_instance_uid") or "").strip()
        if relative:
            target = root / relative
            if target.is_dir():
                files = [p for p in _visible_files(target) if p.name != "labels.csv"]
            elif target.is_file():
                files = [target]
            else:
                raise DataError(f"{where}: {target} does not exist")
        elif uid:
            if by_uid is None:
                by_uid = _group_by_study(root)
            files = by_uid.get(uid, [])
        else:
            raise DataError(f"{where}: neither a path nor a study_instance_uid")
        if not files:
            raise DataError(f"{where}: no files for study {uid or relative}")
        key = uid or relative
        if key in seen:
            raise DataError(f"{where}: study {key} is listed twice")
        seen.add(key)
        truth = {k: v for k, v in row.items() if k not in ("label", "path") and v is not None}
        kind: Literal["dicom", "image"] = (
            "image" if all(p.suffix.lower() in _IMAGE_SUFFIXES for p in files) else "dicom"
        )
        samples.append(Sample(key=key, label=label, files=tuple(files), kind=kind, truth=truth))
    return samples


def _group_by_study(root: Path) -> dict[str, list[Path]]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[Path]] = {}
    for path in _visible_files(root):
        if path.suffix.lower() in (".csv", ".png", ".json", ".md", ".txt"):
            continue
        try:
            header = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]
            )
            groups.setdefault(str(header.StudyInstanceUID), []).append(path)
        except (InvalidDicomError, AttributeError, OSError, ValueError):
            logger.debug("%s: not a DICOM file with a Study Instance UID, skipped", path)
    return groups


def _from_folders(root: Path) -> list[Sample]:
    samples: list[Sample] = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        label = _class_index(folder.name.replace("_", " "), f"class folder {folder}")
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                files = _visible_files(entry)
                kind: Literal["dicom", "image"] = "dicom"
            else:
                files = [entry]
                kind = "image" if entry.suffix.lower() in _IMAGE_SUFFIXES else "dicom"
            if files:
                key = entry.relative_to(root).as_posix()
                samples.append(Sample(key=key, label=label, files=tuple(files), kind=kind))
    return samples


def discover(root: Path | str) -> DataSource:
    """Find the labelled samples of a data folder (``labels.csv`` or one folder per class).

    Raises
    ------
    DataError
        The folder does not exist, has neither layout, or a label or path is wrong.
    """
    if not isinstance(root, str | Path):
        raise TypeError(f'Argument "root" should be a path, not {type(root).__name__}.')
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data folder {root}: no such folder")
    if (root / "labels.csv").is_file():
        layout: Literal["labels", "folders"] = "labels"
        samples = _from_labels(root)
    else:
        layout = "folders"
        samples = _from_folders(root)
    if not samples:
        raise DataError(
            f"data folder {root}: no labels.csv and no class folders "
            f"(sub-folders named {', '.join(CLASS_KEYS)}) with images"
        )
    samples.sort(key=lambda sample: sample.key)
    source = DataSource(root, layout, tuple(samples), _fingerprint(root, layout, samples))
    logger.info(
        "data folder %s: %d samples (%s layout), %s",
        root,
        len(samples),
        layout,
        ", ".join(f"{k} {n}" for k, n in source.class_counts().items()),
    )
    return source


def check_class_counts(counts: dict[str, int], where: str = "the data") -> list[str]:
    """Refuse classes with fewer than 2 studies; return a warning for each with fewer than 10.

    Raises
    ------
    DataError
        A class has 0 or 1 studies: it cannot be both trained on and tested.
    """
    scarce = {key: n for key, n in counts.items() if n < 2}
    if scarce:
        listing = ", ".join(f"{key} ({n})" for key, n in scarce.items())
        raise DataError(
            f"{where} has fewer than 2 studies of class {listing}; every class needs at least "
            "2 (one to train on, one to test), better 10 or more"
        )
    warnings = [
        f"class {key} has only {n} studies in {where}; its figures will be unreliable"
        for key, n in counts.items()
        if n < FEW_STUDIES
    ]
    for warning in warnings:
        logger.warning(warning)
    return warnings


# -- reading -------------------------------------------------------------------------------


def _read_image(path: Path, channel: str) -> PhaseImage:
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image)
    except OSError as exc:
        raise UnusableStudyError(f"{path}: cannot read the image ({exc})") from None
    if array.ndim == 3:  # RGB(A): luma, ignoring alpha
        rgb = array[..., :3].astype(np.float32)
        array = rgb @ np.asarray([0.299, 0.587, 0.114], dtype=np.float32)
    if array.ndim != 2:
        raise UnusableStudyError(f"{path}: not a 2-D image (shape {array.shape})")
    return PhaseImage(
        name=channel,
        pixels=array.astype(np.float32),
        pixel_spacing=None,
        sop_instance_uid="",
        sop_class_uid="",
        series_instance_uid="",
    )


def read_sample(sample: Sample, channels: Sequence[str]) -> StudyInput:
    """Read one sample into a :class:`~mibi_node.imaging.study.StudyInput`.

    DICOM goes through :func:`mibi_node.imaging.nm.read_study`, exactly as the daemon reads a
    study; a PNG/TIFF image becomes the single channel the recipe declares.

    Raises
    ------
    UnusableStudyError
        The study cannot be read (the reader's message), or an image meets a recipe with more
        than one channel.
    """
    if sample.kind == "image":
        if len(channels) != 1:
            raise UnusableStudyError(
                f"{sample.files[0]}: a PNG/TIFF image has one channel, but the recipe declares "
                f"{list(channels)}; use a recipe with a single input channel"
            )
        image = _read_image(sample.files[0], channels[0])
        return StudyInput(study_instance_uid=sample.key, images={channels[0]: image})
    from mibi_node.imaging.nm import read_study

    return read_study(list(sample.files), required=tuple(channels))


@functools.lru_cache(maxsize=4)
def _superres(path: str) -> Any:
    from mibi_node.imaging.superres import load_superres

    return load_superres(path)


def _file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@dataclass(frozen=True)
class Preprocessing:
    """The part of a recipe that turns a study into model input (cached arrays depend on it)."""

    channels: tuple[str, ...]
    size: int
    normalisation: Normalisation
    denoise_smax: int | None
    superres: str | None = None  # a superres.pt file, applied after the denoise

    @classmethod
    def from_recipe(cls, recipe: Any) -> Preprocessing:
        """From a :class:`~mibi_node.inference.recipe.Recipe` or a bundle manifest."""
        section = getattr(recipe, "superres", None)
        enabled = section is not None and section.enabled
        return cls(
            channels=tuple(recipe.input.channels),
            size=int(recipe.input.size),
            normalisation=recipe.normalisation.to_normalisation(),
            denoise_smax=recipe.denoise.smax if recipe.denoise.enabled else None,
            superres=getattr(section, "generator", None) if enabled else None,
        )

    def key(self) -> dict[str, Any]:
        """A JSON-ready description, part of the cache key."""
        n = self.normalisation
        return {
            "format": CACHE_FORMAT,
            "channels": list(self.channels),
            "size": self.size,
            "normalisation": [n.method, n.percentile, n.scope, n.clip, list(n.mean), list(n.std)],
            "denoise_smax": self.denoise_smax,
        } | ({"superres_sha256": _file_sha256(self.superres)} if self.superres else {})

    def apply(self, study: StudyInput) -> tuple[np.ndarray, np.ndarray]:
        """Model input of one study, as the engine computes it, and its count scale.

        Returns
        -------
        tuple of numpy.ndarray
            The (C, S, S) input and, per channel, the estimated counts per unit of the
            (unstandardised) input in one model pixel, which the Poisson resampling
            augmentation needs.
        """
        from mibi_node.imaging.denoise import adaptive_median

        images = []
        for channel in self.channels:
            pixels = study.images[channel].pixels
            images.append(
                pixels
                if self.denoise_smax is None
                else adaptive_median(pixels, smax=self.denoise_smax)
            )
        if self.superres is not None:
            upsampler = _superres(self.superres)
            images = [upsampler.upsample(image) for image in images]
        array, geometries = to_model_input(images, self.size, self.normalisation)
        return array, self._count_scale(images, geometries[0].source_shape)

    def _count_scale(self, images: Sequence[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        n = self.normalisation
        if n.method == "none":
            references = [1.0] * len(images)
        else:

            def reference(image: np.ndarray) -> float:
                value = float(
                    image.max() if n.method == "max" else np.percentile(image, n.percentile)
                )
                return value if value > 0 else max(float(image.max()), 1.0)

            references = (
                [reference(images[0])] * len(images)
                if n.scope == "study"
                else [reference(np.asarray(image, dtype=np.float32)) for image in images]
            )
        area = (max(shape) / self.size) ** 2
        return np.asarray([r * area for r in references], dtype=np.float32)


@dataclass(frozen=True)
class TrainingArrays:
    """Preprocessed model input of a data folder, in the order of ``keys``.

    Attributes
    ----------
    inputs
        (N, C, S, S) float32.
    labels
        (N,) class indices.
    keys
        Sample keys.
    count_scale
        (N, C) counts per unit of unstandardised input in one model pixel.
    skipped
        Key -> reason for every sample that could not be read (left out of the arrays).
    """

    inputs: np.ndarray
    labels: np.ndarray
    keys: tuple[str, ...]
    count_scale: np.ndarray
    skipped: dict[str, str] = field(default_factory=dict)

    def index(self, keys: Sequence[str]) -> np.ndarray:
        """Row numbers of the given keys (keys that were skipped are left out)."""
        position = {key: i for i, key in enumerate(self.keys)}
        return np.asarray([position[k] for k in keys if k in position], dtype=np.int64)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/mibi-node/training`` (``~/.cache/mibi-node/training``)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mibi-node" / "training"


def _iter_arrays(
    samples: Sequence[Sample], preprocessing: Preprocessing
) -> Iterator[tuple[Sample, tuple[np.ndarray, np.ndarray] | str]]:
    for sample in samples:
        try:
            study = read_sample(sample, preprocessing.channels)
            yield sample, preprocessing.apply(study)
        except MibiNodeError as exc:
            yield sample, str(exc)


def load_arrays(
    source: DataSource,
    preprocessing: Preprocessing,
    cache_dir: Path | str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> TrainingArrays:
    """Read and preprocess every sample, or load them from the cache.

    Parameters
    ----------
    source
        The discovered data folder.
    preprocessing
        Channels, size, normalisation and denoise settings.
    cache_dir
        Where cached arrays live (:func:`default_cache_dir` when ``None``); the file name is
        a hash of the data fingerprint and the preprocessing settings.
    progress
        Called with (done, total) after each sample that had to be read.

    Returns
    -------
    TrainingArrays
        Unreadable samples are left out and listed in ``skipped`` (with a warning each).

    Raises
    ------
    DataError
        No sample could be read.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    key_text = json.dumps({"data": source.fingerprint, **preprocessing.key()}, sort_keys=True)
    key = hashlib.sha256(key_text.encode()).hexdigest()[:32]
    path = cache / f"{key}.npz"
    if path.is_file():
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = TrainingArrays(
                    inputs=data["inputs"],
                    labels=data["labels"],
                    keys=tuple(str(k) for k in data["keys"]),
                    count_scale=data["count_scale"],
                    skipped=json.loads(str(data["skipped"])),
                )
            logger.info("preprocessed arrays from the cache %s", path)
            return arrays
        except (OSError, KeyError, ValueError) as exc:
            logger.warning("cache %s is unreadable (%s); preprocessing again", path, exc)

    inputs, labels, keys, scales = [], [], [], []
    skipped: dict[str, str] = {}
    total = len(source.samples)
    for done, (sample, result) in enumerate(_iter_arrays(source.samples, preprocessing), 1):
        if isinstance(result, str):
            logger.warning("study %s left out: %s", sample.key, result)
            skipped[sample.key] = result
        else:
            inputs.append(result[0])
            scales.append(result[1])
            labels.append(sample.label)
            keys.append(sample.key)
        if progress is not None:
            progress(done, total)
    if not inputs:
        first = next(iter(skipped.values()), "no samples")
        raise DataError(f"data folder {source.root}: no study could be read (first: {first})")
    arrays = TrainingArrays(
        inputs=np.stack(inputs).astype(np.float32),
        labels=np.asarray(labels, dtype=np.int64),
        keys=tuple(keys),
        count_scale=np.stack(scales).astype(np.float32),
        skipped=skipped,
    )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = cache / f".{key}.{os.getpid()}.npz"
        np.savez(
            tmp,
            inputs=arrays.inputs,
            labels=arrays.labels,
            keys=np.asarray(arrays.keys),
            count_scale=arrays.count_scale,
            skipped=np.asarray(json.dumps(skipped)),
        )
        os.replace(tmp, path)
        logger.info("cached the preprocessed arrays in %s", path)
    except OSError as exc:
        logger.warning(
            "cannot write the cache %s (%s); the next run reads the data again", path, exc
        )
    return arrays
