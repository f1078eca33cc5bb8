"""What an analysis is: the one interface the core (jobs, worker, web, metrics) talks to.

An analysis is a unit that declares, in one place, everything the node needs to run it:

- its ``name`` (the job's ``analysis`` column, the metrics' ``analysis`` label, the TOML
  section ``[analyses.<name>]``), ``version`` and ``title``;
- which studies it takes (:attr:`Analysis.default_selection`, a :class:`SelectionRule` the
  site may override in TOML) and when a study's input is complete
  (:attr:`Analysis.completeness`);
- its input builder (:meth:`Analysis.read`: stored DICOM files -> model input, geometry and
  source references), raising :class:`~mibi_node.errors.MissingPhaseError` for a part that
  may still arrive and :class:`~mibi_node.errors.UnusableStudyError` for a study it cannot use;
- its bundle and runner (:meth:`Analysis.memory_needs` before loading, :meth:`Analysis.load`
  to put the bundle on a device; the :class:`Runner` turns a batch of inputs into results);
- its result encoders (:meth:`Analysis.encode`: SR, DICOM SEG, key image, in that order of
  the :class:`OutputKind` it declares), the source instances a result refers to and the panel
  the status page shows (:meth:`Analysis.panel`);
- its training recipe, evaluation and phantom (:attr:`Analysis.recipe`, the ``training``
  hooks).

The interface is designed against the five systems of the seed documents: classification of
planar NM images (parathyroid MIBI, thyroid), keypoints on an MR series (spine), 3-D
segmentation of an MR volume returned as DICOM SEG (knee cartilage) and detection with masks
on a CT series (lung). The core passes an analysis' input and result objects between its
own methods without looking inside them, except through :class:`AnalysisResult`'s few
members, so an MR volume, a CT series or a set of keypoints fit the same slots as a pair of
planar images.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

from pydicom.dataset import Dataset

from mibi_node.analyses.selection import SelectionRule

__all__ = [
    "Analysis",
    "AnalysisResult",
    "Completeness",
    "EncodeContext",
    "Finding",
    "WEIGHTS_FACTOR",
    "MemoryNeeds",
    "OutputKind",
    "Panel",
    "Runner",
    "TaskKind",
]


class TaskKind(enum.StrEnum):
    """What an analysis' model does (the status page and docs group analyses by it)."""

    CLASSIFICATION = "classification"
    KEYPOINTS = "keypoints"
    SEGMENTATION = "segmentation"
    DETECTION = "detection"


class OutputKind(enum.StrEnum):
    """The DICOM objects an analysis sends back to PACS."""

    SR = "sr"
    SEG = "seg"
    KEY_IMAGE = "key_image"


@dataclass(frozen=True)
class Completeness:
    """When a stable study's input is complete enough to analyse.

    The node-wide quiet period (``assembly.quiet_seconds``) makes a study STABLE; the parts
    an analysis needs (phases of a planar study, the series of an MR or CT study) are
    checked by its reader, which raises :class:`~mibi_node.errors.MissingPhaseError` naming
    the missing ones. The job then waits up to ``max_wait_seconds`` from the study's first
    instance for them, and after that runs with what is there when ``partial_allowed``,
    else fails naming what never arrived.

    Attributes
    ----------
    parts
        The names of the parts the reader looks for, for the docs and the status page.
    max_wait_seconds
        ``None``: the node's ``assembly.max_phase_wait``.
    partial_allowed
        Whether a study still incomplete after the wait is analysed with what it has.
    """

    parts: tuple[str, ...] = ()
    max_wait_seconds: float | None = None
    partial_allowed: bool = False


#: Resident memory per MiB of weight files that a loaded bundle and its batch take on the
#: CPU, beside the analysis' working memory. Measured (peak RSS above the worker's baseline,
#: batches of 4): the parathyroid demo bundle 156 MiB for 80 MiB of weights; the nine-member
#: recipe about 2 GiB for 1.1 GiB (2973 MiB peak RSS in all, docs/analysis.md).
WEIGHTS_FACTOR = 2.0


@dataclass(frozen=True)
class MemoryNeeds:
    """What one loaded bundle costs above the worker's baseline, as its manifest or the
    weight files say.

    Attributes
    ----------
    cpu_mb
        Resident memory the runner adds to a worker (weights, buffers, peak of one batch).
    gpu_mb
        Device memory on a GPU (0 on the CPU).
    source
        Where the figures come from ("measured, bundle manifest", "bundle manifest,
        estimated", "estimated from the weight files").
    """

    cpu_mb: float
    gpu_mb: float = 0.0
    source: str = "estimated from the weight files"

    def __add__(self, other: MemoryNeeds) -> MemoryNeeds:
        return MemoryNeeds(self.cpu_mb + other.cpu_mb, self.gpu_mb + other.gpu_mb, "sum")


@dataclass(frozen=True)
class EncodeContext:
    """What the node decides about the documents an analysis makes for one job.

    Attributes
    ----------
    device_uid
        The node's Device Observer UID (TID 1004).
    series_number
        Series Number of this analysis' result series (key images take the next number).
    instance_number
        The job's version: a later version's SR supersedes the earlier one.
    series_instance_uid
        The result series of earlier versions of this analysis, or a new one.
    predecessor
        The earlier version's SR (Predecessor Documents), if any.
    institution_name
        ``report.institution_name`` or ``None``.
    key_image
        Whether the site wants a key image beside the SR (``[analyses.<name>] key_image``,
        else the analysis' :attr:`Analysis.key_image_default`, else ``report.key_image``).
    """

    device_uid: str
    series_number: int
    instance_number: int
    series_instance_uid: str
    predecessor: Dataset | None = None
    institution_name: str | None = None
    key_image: bool = False


@dataclass(frozen=True)
class Panel:
    """What the status page shows of one result: the analysis decides, the page draws.

    Attributes
    ----------
    headline
        One line: the finding and its probability ("adenoma 0.93", "Graves' disease 0.97").
    bars
        (label, value in [0, 1]) drawn as probability bars, in the analysis' order.
    measurements
        (label, text) pairs: lobe uptake, keypoint counts, volumes, lesion counts.
    note
        A sentence under the panel (e.g. "multi-label: each bar is its own probability").
    """

    headline: str
    bars: tuple[tuple[str, float], ...] = ()
    measurements: tuple[tuple[str, str], ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Finding:
    """One AI finding of a result that a radiologist can accept, reject or correct.

    Derived from the stored result (``result.to_dict()``) by :meth:`Analysis.findings`, so a
    verdict recorded today can be checked against a result stored months ago.

    Attributes
    ----------
    key
        Names the finding within its result and never changes for it: ``diagnosis``, a
        class key, a spine level, a cartilage plate, ``lesion-2``. Verdicts refer to it.
    label
        What a radiologist reads ("L4-L5 (disc)", "Graves' disease").
    value
        What the model said ("adenoma", "present", "protrusion", "segmented").
    choices
        The values a correction may take; empty: any short text.
    probability
        The model's probability of ``value``, where it gives one.
    kind
        The finding's type, over which verdicts are counted (``diagnosis``, a class key,
        ``disc``, ``vertebra``, a structure); defaults to ``key``.
    """

    key: str
    label: str
    value: str
    choices: tuple[str, ...] = ()
    probability: float | None = None
    kind: str = ""

    @property
    def type(self) -> str:
        """:attr:`kind`, else :attr:`key`."""
        return self.kind or self.key


@runtime_checkable
class AnalysisResult(Protocol):
    """The few things the core reads from an analysis' result; the rest is the analysis'."""

    study_instance_uid: str
    timings: dict[str, float]
    bundle_name: str
    bundle_version: str

    @property
    def predicted(self) -> str:
        """A short key of the main finding (the audit trail's and the log's ``predicted``)."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, no pixels: stored on the job and read back by :meth:`Analysis.panel`."""
        ...


@runtime_checkable
class Runner(Protocol):
    """A bundle loaded on a device: a batch of inputs in, one result per input out."""

    bundle_name: str
    bundle_version: str
    device: str
    memory: MemoryNeeds

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        """Analyse a batch; raises :class:`~mibi_node.errors.UnusableStudyError` for an
        input the model cannot use (the worker then analyses the batch one by one)."""
        ...


class Analysis(ABC):
    """One analysis the node hosts. Subclass it, fill the class attributes, register it.

    Instances are stateless descriptions (the loaded weights live in the :class:`Runner`),
    so the node, the status page and a worker each hold their own without cost.
    """

    #: Short key: lower case letters, digits and ``_``; never changes once deployed.
    name: ClassVar[str]
    #: Version of the analysis' code (reader, encoders); the bundle has a version of its own.
    version: ClassVar[str]
    #: What a radiologist calls it ("Parathyroid MIBI scintigraphy").
    title: ClassVar[str]
    #: What a matching study is called in its state reason ("MIBI study", "thyroid scan").
    label: ClassVar[str] = ""
    task: ClassVar[TaskKind]
    outputs: ClassVar[tuple[OutputKind, ...]] = (OutputKind.SR,)
    #: Which studies it takes, unless the site's ``[analyses.<name>.selection]`` says else.
    default_selection: ClassVar[SelectionRule]
    completeness: ClassVar[Completeness] = Completeness()
    #: Added to ``report.series_number`` for this analysis' result series, so two analyses
    #: of one study land in two series.
    series_offset: ClassVar[int] = 0
    #: Storage SOP Class UIDs its studies arrive as beyond the node's own set (NM, Secondary
    #: Capture, SR): reception accepts them while the analysis is enabled.
    storage_sop_classes: ClassVar[tuple[str, ...]] = ()
    #: Whether the analysis sends a key image unless ``[analyses.<name>] key_image`` says;
    #: ``None``: as ``report.key_image`` says.
    key_image_default: ClassVar[bool | None] = None
    #: MiB a loaded bundle and one batch need beyond ``WEIGHTS_FACTOR`` x the weights, for
    #: a bundle whose manifest declares no ``memory`` (a measured figure replaces it).
    working_memory_mb: ClassVar[float] = 300.0
    #: Training recipe of the demonstration bundle (``mibi-node train --analysis NAME``).
    recipe: ClassVar[Path | None] = None
    #: Where ``make demo`` builds the demonstration bundle.
    default_bundle: ClassVar[Path | None] = None
    #: The values a final diagnosis of its studies may take (``mibi-node truth import``
    #: refuses others); empty: any short text.
    diagnoses: ClassVar[tuple[str, ...]] = ()

    # -- input ---------------------------------------------------------------------------

    @abstractmethod
    def read(self, paths: Sequence[Path], runner: Runner) -> Any:
        """Build the model input of one study from its stored image files.

        ``runner`` says what the loaded bundle needs (channels, phases, size). Raise
        ``MissingPhaseError`` for a part that may still come, ``UnusableStudyError`` (a
        sentence naming the file and the problem) for a study it cannot use.
        """

    # -- bundle and runner ---------------------------------------------------------------

    def memory_needs(self, bundle: Path, device: str) -> MemoryNeeds:
        """What loading ``bundle`` on ``device`` will cost above the worker's baseline,
        without loading it: the manifest's ``memory`` (measured when the bundle was
        trained), else ``WEIGHTS_FACTOR`` x the weight files plus :attr:`working_memory_mb`
        (on a GPU: the weights plus the working memory, on the device)."""
        from mibi_node.analyses.bundles import estimated_memory, manifest_memory, weights_megabytes

        declared = manifest_memory(bundle)
        if declared is not None:
            return declared
        estimate = estimated_memory(weights_megabytes(bundle), self.working_memory_mb)
        if device.startswith("cuda"):
            return MemoryNeeds(cpu_mb=self.working_memory_mb, gpu_mb=estimate["gpu_mb"])
        return MemoryNeeds(cpu_mb=estimate["cpu_mb"])

    @abstractmethod
    def load(self, bundle: Path, device: str) -> Runner:
        """Load and check ``bundle`` (raise ``BundleError`` naming the file) onto ``device``."""

    # -- results -------------------------------------------------------------------------

    @abstractmethod
    def source_uids(self, result: Any) -> set[str]:
        """SOP Instance UIDs of the stored instances the result refers to."""

    @abstractmethod
    def encode(
        self, result: Any, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        """The documents for PACS, the SR first; ``sources`` are the referenced headers."""

    @abstractmethod
    def panel(self, result: dict[str, Any]) -> Panel:
        """What the status page shows of a stored result (``result.to_dict()``)."""

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """The AI findings of a stored result (``result.to_dict()``) a radiologist judges.

        The default is one finding, the result's ``predicted``, that a correction may
        replace by any short text; an analysis with several findings per study (levels,
        plates, lesions, multi-label classes) overrides it.
        """
        return (
            Finding(
                key="predicted",
                label=self.title,
                value=str(result.get("predicted") or ""),
                choices=self.diagnoses,
            ),
        )

    def describe(self) -> dict[str, Any]:
        """Plain data about the analysis for ``mibi-node analyses`` and the REST API."""
        return {
            "name": self.name,
            "version": self.version,
            "title": self.title,
            "task": self.task.value,
            "outputs": [kind.value for kind in self.outputs],
            "parts": list(self.completeness.parts),
            "partial_allowed": self.completeness.partial_allowed,
        }
