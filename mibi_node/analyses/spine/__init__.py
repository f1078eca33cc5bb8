"""Lumbar spine MRI (seed 002): vertebra and disc keypoints and their classes.

The Spinal Disease 2020 task as an analysis unit: an MR study with T1 and T2 sagittal and
T2 axial series -> the representative point of each of the eleven levels (discs T12-L1 to
L5-S1, vertebrae L1 to L5) on the middle T2 sagittal slice, each with its class (vertebra
normal or degenerated; disc normal, bulge, protrusion, extrusion or Schmorl's node),
returned as a TID 1500 SR with the points as SCOORD POINTs and a key image with the points
drawn. Its parts: :mod:`.levels` (levels, classes, the challenge's codes), :mod:`.phantom`
(synthetic lumbar MR studies), :mod:`.annotations` (the challenge's annotation format),
:mod:`.reader` (the input builder), :mod:`.model` (heatmap keypoints + ROI classifier),
:mod:`.bundle` and :mod:`.runner`, :mod:`.report` and :mod:`.keyimage`; training and
evaluation (the challenge's metric) in ``training/spine.py`` and
``training/spine_metric.py``.
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
from mibi_node.analyses.spine.levels import CLASSES, LEVEL_KIND, LEVELS

if TYPE_CHECKING:
    from mibi_node.analyses.spine.result import SpineInput, SpineResult

__all__ = ["SPINE_SELECTION", "SpineAnalysis"]

#: Lumbar spine MR studies by their description (English, German, French, Chinese); other
#: regions of the spine and other MR studies are ruled out first.
SPINE_SELECTION = SelectionRule(
    modalities=("MR",),
    description_pattern=r"lumb|l[-_ ]?spine|\blws\b|lenden|lombaire|rachis lomb|腰椎",
    exclude_description_pattern=r"cervic|c[-_ ]?spine|\bhws\b|halswirbel|brain|head|knee",
)


_NAMES = {
    "normal": "normal",
    "degenerated": "degenerated",
    "bulge": "bulge",
    "protrusion": "protrusion",
    "extrusion": "extrusion",
    "schmorl_node": "Schmorl's node",
}


class SpineAnalysis(Analysis):
    """Lumbar spine MRI: eleven keypoints with their classes, SR and key image."""

    name: ClassVar[str] = "spine"
    version: ClassVar[str] = "1.0"
    title: ClassVar[str] = "Lumbar spine MRI: vertebrae and discs"
    label: ClassVar[str] = "lumbar spine MR study"
    task: ClassVar[TaskKind] = TaskKind.KEYPOINTS
    outputs: ClassVar[tuple[OutputKind, ...]] = (OutputKind.SR, OutputKind.KEY_IMAGE)
    default_selection: ClassVar[SelectionRule] = SPINE_SELECTION
    completeness: ClassVar[Completeness] = Completeness(parts=("T2 sagittal",))
    series_offset: ClassVar[int] = 20
    # MR Image Storage (one slice per instance); the reader does not read Enhanced MR
    # (multi-frame) yet, so the node does not accept it for this analysis.
    storage_sop_classes: ClassVar[tuple[str, ...]] = ("1.2.840.10008.5.1.4.1.1.4",)
    key_image_default: ClassVar[bool | None] = True
    recipe: ClassVar[Path | None] = Path("config/spine-demo.toml")
    default_bundle: ClassVar[Path | None] = Path("var/bundles/spine-demo")
    # Measured on the demo recipe (10 MiB of weights): 31 MiB loaded, 109 MiB at the peak of
    # 3 batches of 4 lumbar studies (25 files each), above the worker's baseline.
    working_memory_mb: ClassVar[float] = 100.0

    def read(self, paths: Sequence[Path], runner: Any) -> SpineInput:
        from mibi_node.analyses.spine.reader import read_spine_study

        return read_spine_study(paths)

    def load(self, bundle: Path, device: str) -> Any:
        from mibi_node.analyses.spine.runner import SpineRunner

        runner = SpineRunner(bundle, device=device)
        runner.memory = self.memory_needs(bundle, device)
        return runner

    def source_uids(self, result: SpineResult) -> set[str]:
        return {result.middle.sop_instance_uid} | {
            ref.sop_instance_uid for ref in result.neighbours
        }

    def encode(
        self, result: SpineResult, sources: Sequence[Dataset], context: EncodeContext
    ) -> list[Dataset]:
        from mibi_node.analyses.spine.keyimage import build_spine_key_image
        from mibi_node.analyses.spine.report import build_spine_sr

        documents: list[Dataset] = [
            build_spine_sr(
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
                build_spine_key_image(
                    result,
                    sources,
                    series_number=context.series_number + 1,
                    instance_number=context.instance_number,
                    institution_name=context.institution_name,
                )
            )
        return documents

    def findings(self, result: dict[str, Any]) -> tuple[Finding, ...]:
        """One finding per level found: its class among its kind's (vertebra, disc)."""
        found: list[Finding] = []
        for point in result.get("points") or []:
            level, label = str(point.get("level")), str(point.get("label"))
            kind = str(point.get("kind") or LEVEL_KIND.get(level, ""))
            probability = dict(point.get("probabilities") or {}).get(label)
            found.append(
                Finding(
                    key=level,
                    label=f"{level} ({kind})",
                    value=label,
                    choices=CLASSES.get(kind, ()),
                    probability=None if probability is None else float(probability),
                    kind=kind,
                )
            )
        return tuple(found)

    def panel(self, result: dict[str, Any]) -> Panel:
        points = [dict(p) for p in result.get("points") or []]
        abnormal = [p for p in points if p.get("label") != "normal"]
        if abnormal:
            headline = ", ".join(
                f"{p.get('level')} {_NAMES.get(str(p.get('label')), p.get('label'))} "
                f"{float(dict(p.get('probabilities') or {}).get(str(p.get('label')), 0.0)):.2f}"
                for p in abnormal
            )
        elif points:
            headline = "no degeneration found"
        else:
            headline = str(result.get("predicted") or "?")
        found = {str(p.get("level")) for p in points}
        missing = [level for level in LEVELS if level not in found]
        spacing = list(result.get("pixel_spacing") or [])
        measurements = [("levels found", f"{len(found)} of {len(LEVELS)}")]
        if missing:
            measurements.append(("not found", ", ".join(missing)))
        if spacing:
            measurements.append(
                ("pixel spacing", " x ".join(f"{float(s):.2f}" for s in spacing) + " mm")
            )
        return Panel(
            headline=headline,
            # Each level's probability of being abnormal (1 - its "normal" probability).
            bars=tuple(
                (
                    str(p.get("level")),
                    1.0 - float(dict(p.get("probabilities") or {}).get("normal", 0.0)),
                )
                for p in points
            ),
            measurements=tuple(measurements),
            note="each bar: that level's probability of not being normal",
        )
