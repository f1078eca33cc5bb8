"""What a bundle really costs a worker in memory, measured, and the worker's own share.

A worker's resident memory is its baseline (the interpreter with torch, timm and the DICOM
libraries imported: some 950 MiB on CPU before any bundle), plus, per bundle, what loading
it adds, plus the transient peak of the batch it is running. A bundle's ``memory`` figure
is measured when the bundle is written: :func:`measure_memory` loads it in a fresh
interpreter, runs full batches of studies through the analysis' own reader and runner, and
reports the peak resident memory above that interpreter's baseline. Measuring in the
training process would count the training's own heap; the weight files alone miss the
framework's buffers and the batch's working memory, which depends on the studies (the
thyroid measurements take 1.2 GiB on a magnified pinhole scan and 10 MiB on others).

The child is ``python -m mibi_node.analyses.memory``: a JSON request on its stdin, the
figures as JSON on its stdout.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import platform
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_BATCH",
    "MeasuredMemory",
    "measure_memory",
    "record_measured_memory",
    "resident_megabytes",
    "worker_baseline_megabytes",
]

logger = logging.getLogger(__name__)

#: Studies per batch :func:`measure_memory` runs unless told (``jobs.batch_size``'s default).
DEFAULT_BATCH = 4
#: What the figure written into a manifest adds to the measured peak (allocator noise,
#: studies a little larger than the measured ones).
MARGIN = 1.1
#: Studies the training paths measure with at most: 8 batches, for the studies that cost
#: the most (the working memory depends on the study).
MEASURED_STUDIES = 8 * DEFAULT_BATCH


@dataclass(frozen=True)
class MeasuredMemory:
    """Resident memory of a fresh interpreter that loads one bundle and runs batches, in MiB.

    Attributes
    ----------
    baseline_mb
        The interpreter's, after :func:`worker_baseline_megabytes`' imports.
    loaded_mb
        What loading the bundle added (weights, modules, buffers): stays while it is loaded.
    peak_mb
        The peak above the baseline while loading the bundle and running the batches: what
        a worker needs for this bundle on top of its own baseline.
    batch, batches
        Studies per batch, and how many batches ran.
    device
        Where the runner ran.
    versions
        torch, Python and the platform, for the manifest's note.
    """

    baseline_mb: float
    loaded_mb: float
    peak_mb: float
    batch: int
    batches: int
    device: str
    versions: str

    def manifest_entry(self, gpu_mb: float = 0.0) -> dict[str, Any]:
        """The manifest's ``memory``: the peak with :data:`MARGIN`, rounded up to a MiB.

        ``gpu_mb`` is what the caller has for the GPU (the CPU run does not measure it).
        """
        return {
            "cpu_mb": float(int(self.peak_mb * MARGIN) + 1),
            "gpu_mb": float(gpu_mb),
            "measured_on": (
                f"{dt.date.today().isoformat()}: peak RSS {self.peak_mb:.0f} MiB (loaded "
                f"{self.loaded_mb:.0f} MiB) above a fresh interpreter's "
                f"{self.baseline_mb:.0f} MiB, {self.batches} batch(es) of {self.batch} "
                f"studies on {self.device}; {self.versions}"
            ),
        }


def resident_megabytes() -> tuple[float, float]:
    """``(now, peak)`` resident memory of this process in MiB (VmRSS and VmHWM on Linux).

    Elsewhere both are ``ru_maxrss``, the peak.
    """
    try:
        values = {}
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    values[key] = int(rest.split()[0]) / 1024
        return values["VmRSS"], values["VmHWM"]
    except (OSError, KeyError, ValueError):  # pragma: no cover - not Linux
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak_mb = peak / 2**20 if sys.platform == "darwin" else peak / 1024
        return peak_mb, peak_mb


def worker_baseline_megabytes() -> float:
    """Resident memory of this process once what every worker imports is imported.

    That is torch, the member registry (timm, which every analysis' networks come from)
    and the report builders: some 950 MiB on CPU with torch 2, the share of a worker's
    budget no bundle can have. The worker calls it before loading any bundle, and
    :func:`measure_memory` subtracts it, so that a bundle's figure holds only what that
    bundle adds.
    """
    import torch  # noqa: F401

    import mibi_node.inference.members  # noqa: F401
    import mibi_node.report.sr  # noqa: F401

    return resident_megabytes()[0]


def measure_memory(
    analysis: str,
    bundle: Path | str,
    studies: Sequence[Sequence[Path | str]],
    *,
    batch: int = DEFAULT_BATCH,
    device: str = "cpu",
    timeout: float = 900.0,
) -> MeasuredMemory:
    """Measure what ``bundle`` costs a worker, in a fresh interpreter.

    The child imports what a worker imports and notes its resident memory (the baseline),
    loads the bundle with the analysis' ``load``, then reads ``studies`` with its ``read``
    and runs them through the runner ``batch`` at a time, as a worker does.

    Parameters
    ----------
    analysis
        The registered analysis name.
    bundle
        The written bundle folder.
    studies
        The files of each study, e.g. validation studies of the training data. The working
        memory depends on the study, so pass several batches' worth, of every kind the
        bundle will see; a last incomplete batch is left out (unless it is the only one).
    batch
        Studies per batch: the worker's ``jobs.batch_size``.
    device
        Where to run; ``"cpu"`` for the ``cpu_mb`` figure.
    timeout
        Seconds before the child is given up.

    Raises
    ------
    ValueError
        When ``studies`` is empty or ``batch`` is not a positive integer.
    RuntimeError
        When the child fails; the message holds the end of its output.
    """
    if not studies:
        raise ValueError('Argument "studies" should hold at least one study.')
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError('Argument "batch" should be a positive integer.')
    files = [[str(Path(p).resolve()) for p in study] for study in studies]
    batches = [files[i : i + batch] for i in range(0, len(files), batch)]
    if len(batches) > 1 and len(batches[-1]) < batch:
        batches.pop()
    request = {
        "analysis": analysis,
        "bundle": str(Path(bundle).resolve()),
        "batches": batches,
        "device": device,
    }
    done = subprocess.run(
        [sys.executable, "-m", "mibi_node.analyses.memory"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise RuntimeError(
            f"measuring the memory of {bundle} failed (exit {done.returncode}): "
            f"{(done.stderr or done.stdout)[-2000:]}"
        )
    measured = MeasuredMemory(**json.loads(lines[-1]))
    logger.info(
        "%s bundle %s: %.0f MiB loaded, peak %.0f MiB above a %.0f MiB baseline "
        "(%d batches of %d on %s)",
        analysis,
        bundle,
        measured.loaded_mb,
        measured.peak_mb,
        measured.baseline_mb,
        measured.batches,
        measured.batch,
        device,
    )
    return measured


def record_measured_memory(
    analysis: str,
    bundle: Path | str,
    studies: Sequence[Sequence[Path | str]],
    *,
    batch: int = DEFAULT_BATCH,
) -> MeasuredMemory | None:
    """Measure ``bundle`` (:func:`measure_memory`) and write the figure into its manifest.

    What the training paths call once the bundle is written, with up to
    :data:`MEASURED_STUDIES` of their validation studies. The GPU figure stays the estimate
    (nothing is run on a GPU). When the measurement fails the manifest keeps what it had
    and a warning says why: the bundle is usable, its figure is an estimate.
    """
    from mibi_node.analyses.bundles import record_memory
    from mibi_node.analyses.registry import get_analysis

    if not studies:
        logger.warning("%s bundle %s: no studies to measure its memory with", analysis, bundle)
        return None
    try:
        measured = measure_memory(analysis, bundle, studies[:MEASURED_STUDIES], batch=batch)
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        logger.warning(
            "%s bundle %s: memory not measured, kept the estimate: %s", analysis, bundle, exc
        )
        return None
    gpu_mb = get_analysis(analysis).memory_needs(Path(bundle), "cuda").gpu_mb
    record_memory(Path(bundle), measured.manifest_entry(gpu_mb=gpu_mb))
    return measured


def _reset_peak() -> bool:
    """Make VmHWM the current VmRSS (Linux ``clear_refs`` 5); whether that worked."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def _probe(request: dict[str, Any]) -> MeasuredMemory:
    """The child's work: the baseline, the load, the batches."""
    import torch

    from mibi_node.analyses.registry import get_analysis

    analysis = get_analysis(request["analysis"])
    baseline = worker_baseline_megabytes()
    if not _reset_peak():  # the peak so far is the imports', at most the baseline
        baseline = resident_megabytes()[1]
    runner = analysis.load(Path(request["bundle"]), request["device"])
    loaded = resident_megabytes()[0]
    for batch in request["batches"]:
        inputs = [analysis.read([Path(p) for p in study], runner) for study in batch]
        runner.predict(inputs)
        del inputs
    peak = resident_megabytes()[1]
    return MeasuredMemory(
        baseline_mb=round(baseline, 1),
        loaded_mb=round(loaded - baseline, 1),
        peak_mb=round(max(peak, loaded) - baseline, 1),
        batch=max(len(b) for b in request["batches"]),
        batches=len(request["batches"]),
        device=request["device"],
        versions=f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
    )


if __name__ == "__main__":
    print(json.dumps(asdict(_probe(json.loads(sys.stdin.read())))))
