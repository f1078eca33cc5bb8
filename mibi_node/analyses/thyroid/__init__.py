"""Thyroid scintigraphy (seed 001): the node's second analysis unit.

Planar anterior 99mTc-pertechnetate images (parallel-hole or pinhole, with marker images or
extra views) -> multi-label findings (normal, Graves' disease, toxic multinodular goitre,
toxic adenoma, cold nodule, thyroiditis) with the lobe uptake split and the focal areas,
returned as a TID 1500 SR. Its parts: :mod:`.phantom` (synthetic studies), :mod:`.reader`
(the input builder), :mod:`.measure` (lobe split, hot and cold areas), :mod:`.model` (the
cross-feature ResNet), :mod:`.bundle` and :mod:`.runner`, :mod:`.sr`; training and
evaluation in ``training/thyroid.py``.

How the selection rule tells a thyroid scan from a parathyroid subtraction study: the
subtraction protocol sends a pertechnetate thyroid image *with* sestamibi images (or under
a parathyroid description). The thyroid rule rules out any study holding a sestamibi code
or a parathyroid description anywhere, so such a study goes to the parathyroid analysis
only; a study of pertechnetate images alone is a thyroid scan.
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
    OutputKind,
    Panel,
    TaskKind,
)
from mibi_node.analyses.selection import SelectionRule

if TYPE_CHECKING:
    from mibi_node.analyses.thyroid.result import ThyroidResult
    from mibi_node.imaging.study import StudyInput

__all__ = ["THYROID_SELECTION", "ThyroidAnalysis"]

#: SCT 19495007 Sodium pertechnetate Tc-99m.
PERTECHNETATE_CODES = ("19495007",)

THYROID_SELECTION = SelectionRule(
    modalities=("NM",),
    radiopharmaceutical_codes=PERTECHNETATE_CODES,
    description_pattern=r"thyr|schilddr|struma|\btco4\b|pertechnet",
    # A parathyroid study (its subtraction protocol has a pertechnetate thyroid image too).
    exclude_radiopharmaceutical_codes=("424299003", "C-B1115"),
    exclude_description_pattern=r"parathyr|mibi|sestamibi|\bpth\b|nebenschild",
)


_NAMES = {
    "normal": "normal",
    "graves": "Graves' disease",
    "toxic_multinodular_goitre": "toxic multinodular goitre",
    "toxic_adenoma": "toxic adenoma",
    "cold_nodule": "cold nodule",
    "thyroiditis": "thyroiditis",
}


class ThyroidAnalysis(Analysis):
    """Thyroid scintigraphy: six findings (multi-label), lobe split, nodules, SR."""

    name: ClassVar[str] = "thyroid"
    version: ClassVar[str] = "1.0"
    title: ClassVar[str] = "Thyroid scintigraphy"
    label: ClassVar[str] = "thyroid scan"
    task: ClassVar[TaskKind] = TaskKind.CLASSIFICATION
    diagnoses: ClassVar[tuple[str, ...]] = tuple(_NAMES)
    outputs: ClassVar[tuple[OutputKind, ...]] = (OutputKind.SR,)
    default_selection: ClassVar[SelectionRule] = THYROID_SELECTION
    completeness: ClassVar[Completeness] = Completeness(parts=("anterior",))
    series_offset: ClassVar[int] = 10
    recipe: ClassVar[Path | None] = Path("config/thyroid-demo.toml")
    default_bundle: ClassVar[Path | None] = Path("var/bundles/thyroid-demo")
    # Measured on the demo bundle (24 MiB of weights): 60 MiB loaded, 110-170 MiB at the
    # peak of a batch of 4. (A magnified pinhole scan whose gland fills the image took
    # 1.3 GiB at 128 px and more than 8 GiB at 256 px in the measurements' disk morphology
    # until measure.py computed it by distance transform and disk chords: < 10 MiB now.)
    working_memory_mb: ClassVar[float] = 200.0

    def read(self, paths: Sequence[Path], runner: Any) -> StudyInput:
        from mibi_node.analyses.thyroid.reader import read_thyroid_study

        return read_thyroid_study(paths)

    def load(self, bundle: Path, device: str) -> Any:
        from mibi_node.analyses.thyroid.runner import ThyroidRunner

        runner = ThyroidRunner(bundle, device=device)
        runner.memory = self.memory_needs(bundle, device)
        return runner

    def source_uids(self, result: ThyroidResult) -> set[str]:
        return {result.source_image.sop_instance_uid}

    def encode(
        self, result: ThyroidResult, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        from mibi_node.analyses.thyroid.report import build_thyroid_sr

        return [
            build_thyroid_sr(
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

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """One finding per class (multi-label): ``present`` where the result reports it,
        else ``absent``, with the class's own probability."""
        reported = {str(f) for f in result.get("findings") or []}
        probabilities = {
            str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()
        }
        return tuple(
            Finding(
                key=name,
                label=_NAMES.get(name, name),
                value="present" if name in reported else "absent",
                choices=("present", "absent"),
                probability=probabilities[name] if name in reported else 1.0 - probabilities[name],
            )
            for name in probabilities
        )

    def panel(self, result: dict[str, Any]) -> Panel:
        probabilities = {
            str(k): float(v) for k, v in dict(result.get("probabilities") or {}).items()
        }
        findings = [str(f) for f in result.get("findings") or []]
        headline = ", ".join(
            f"{_NAMES.get(f, f)} {probabilities.get(f, 0.0):.2f}" for f in findings
        ) or str(result.get("predicted") or "?")
        measurements: list[tuple[str, str]] = []
        split = dict(result.get("lobe_uptake") or {})
        if split:
            measurements.append(
                (
                    "lobe uptake",
                    f"right {float(split.get('right', 0)):.0%} / "
                    f"left {float(split.get('left', 0)):.0%}",
                )
            )
        nodules = list(result.get("nodules") or [])
        if nodules:
            kinds = [f"{n.get('kind', '?')} ({n.get('lobe', '?')} lobe)" for n in nodules]
            measurements.append(("focal areas", ", ".join(kinds)))
        return Panel(
            headline=headline,
            bars=tuple((_NAMES.get(k, k), v) for k, v in probabilities.items()),
            measurements=tuple(measurements),
            note="multi-label: each bar is that finding's own probability",
        )
