"""The parathyroid MIBI analysis (seed 000, the patent): the node's first analysis unit.

Its parts stay where they were built, as the library the other analyses draw on too: the
NM reader (:mod:`mibi_node.imaging.nm`), the adaptive median filter and TTA
(:mod:`mibi_node.imaging`), the ensemble, bundle and engine (:mod:`mibi_node.inference`),
the SR and key image (:mod:`mibi_node.report`), the phantom (:mod:`mibi_node.phantom`) and
training (``training/``). This module is the one place that declares them as an analysis.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydicom.dataset import Dataset

from mibi_node.analyses.base import (
    Analysis,
    Completeness,
    EncodeContext,
    Finding,
    MemoryNeeds,
    OutputKind,
    Panel,
    TaskKind,
)
from mibi_node.analyses.selection import SelectionRule

if TYPE_CHECKING:
    from mibi_node.imaging.study import StudyInput
    from mibi_node.inference.engine import InferenceEngine
    from mibi_node.inference.result import StudyResult

__all__ = ["MIBI_SELECTION", "ParathyroidAnalysis", "ParathyroidRunner"]

#: Study or series descriptions that mark a parathyroid MIBI study, in any case.
DESCRIPTION_PATTERN = r"parathyr|mibi|\bpth\b|nebenschild"

#: The default rule: what ``[routing]`` meant before there were several analyses.
MIBI_SELECTION = SelectionRule(
    modalities=("NM",),
    # SCT 424299003 Tc-99m sestamibi; C-B1115 its old SNOMED RT code.
    radiopharmaceutical_codes=("424299003", "C-B1115"),
    description_pattern=DESCRIPTION_PATTERN,
)


_CLASS_NAMES = {
    "normal": "normal",
    "adenoma": "adenoma",
    "hyperplasia": "hyperplasia",
    "carcinoma": "carcinoma",
    "cyst": "cyst",
}


class ParathyroidRunner:
    """The MIBI ensemble on a device: :class:`~mibi_node.inference.engine.InferenceEngine`."""

    def __init__(self, engine: InferenceEngine, memory: MemoryNeeds) -> None:
        self.engine = engine
        self.bundle_name = engine.bundle.name
        self.bundle_version = engine.bundle.version
        self.device = str(engine.device)
        self.memory = memory
        #: The phases the bundle stacks as its input channels.
        self.channels: tuple[str, ...] = tuple(engine.bundle.channels)

    def predict(self, inputs: Sequence[Any]) -> list[Any]:
        return list(self.engine.predict(inputs))


class ParathyroidAnalysis(Analysis):
    """Parathyroid 99mTc-sestamibi scintigraphy: five classes, dual phase, SR + key image."""

    name: ClassVar[str] = "parathyroid"
    version: ClassVar[str] = "1.0"
    title: ClassVar[str] = "Parathyroid MIBI scintigraphy"
    label: ClassVar[str] = "MIBI study"
    task: ClassVar[TaskKind] = TaskKind.CLASSIFICATION
    diagnoses: ClassVar[tuple[str, ...]] = tuple(_CLASS_NAMES)
    outputs: ClassVar[tuple[OutputKind, ...]] = (OutputKind.SR, OutputKind.KEY_IMAGE)
    default_selection: ClassVar[SelectionRule] = MIBI_SELECTION
    completeness: ClassVar[Completeness] = Completeness(parts=("early", "delayed"))
    series_offset: ClassVar[int] = 0
    recipe: ClassVar[Path | None] = Path("config/ensemble-demo.toml")
    default_bundle: ClassVar[Path | None] = Path("var/bundles/demo")
    # Measured on the demo bundle (80 MiB of weights): 56 MiB loaded, 156 MiB at the peak of
    # 3 batches of 4 studies, above the worker's baseline; 2 x weights covers the rest.
    working_memory_mb: ClassVar[float] = 100.0

    def read(self, paths: Sequence[Path], runner: Any) -> StudyInput:
        from mibi_node.imaging.nm import read_study

        return read_study(paths, required=getattr(runner, "channels", ("early", "delayed")))

    def load(self, bundle: Path, device: str) -> ParathyroidRunner:
        from mibi_node.inference.engine import InferenceEngine

        needs = self.memory_needs(bundle, device)
        return ParathyroidRunner(InferenceEngine(bundle, device=device), needs)

    def source_uids(self, result: Any) -> set[str]:
        return {image.sop_instance_uid for image in result.source_images.values()}

    def encode(
        self, result: StudyResult, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        from mibi_node.report.keyimage import build_key_image
        from mibi_node.report.sr import build_sr

        documents: list[Dataset] = [
            build_sr(
                result,
                sources,
                device_uid=context.device_uid,
                series_number=context.series_number,
                instance_number=context.instance_number,
                series_instance_uid=context.series_instance_uid,
                predecessor=context.predecessor,
                institution_name=context.institution_name,
            )
        ]
        if context.key_image:
            documents.append(
                build_key_image(
                    result,
                    sources,
                    series_number=context.series_number + 1,
                    instance_number=context.instance_number,
                )
            )
        return documents

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """One finding, the study's class (``diagnosis``): one of the five, with its
        probability."""
        predicted = str(result.get("predicted") or "")
        probabilities = dict(result.get("probabilities") or {})
        probability = probabilities.get(predicted)
        return (
            Finding(
                key="diagnosis",
                label="Parathyroid diagnosis",
                value=predicted,
                choices=self.diagnoses,
                probability=None if probability is None else float(probability),
            ),
        )

    def panel(self, result: dict[str, Any]) -> Panel:
        probabilities = {
            str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()
        }
        predicted = str(result.get("predicted") or "")
        measurements: list[tuple[str, str]] = []
        if result.get("agreement") is not None:
            measurements.append(("member agreement", f"{float(result['agreement']):.0%}"))
        focus = result.get("focus")
        if isinstance(focus, dict):
            measurements.append(("focus", f"{focus.get('side', '?')} {focus.get('pole', '?')}"))
        return Panel(
            headline=f"{_CLASS_NAMES.get(predicted, predicted)} "
            f"{probabilities.get(predicted, 0.0):.2f}",
            bars=tuple((_CLASS_NAMES.get(k, k), v) for k, v in probabilities.items()),
            measurements=tuple(measurements),
            note="one class per study; the probabilities sum to 1",
        )
