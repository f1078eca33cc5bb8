"""End to end, two analyses in one worker: a study becoming stable -> its SR acknowledged by
the PACS, against each analysis' own runner.

Goals: issue 6, the median over 20 studies is at most the engine's own study latency plus 1 s
on CPU; issue 15, the node around the engine (queue, worker's SR, record, C-STORE) costs
<= 0.3 s per study, for each analysis, with both analyses' bundles in one worker.

* Baselines (in this process): the parathyroid analysis' ``read_study`` +
  ``InferenceEngine.predict`` and the thyroid analysis' ``read_thyroid_study`` +
  ``ThyroidRunner.predict`` of one study, same bundles, device cpu, after a warm-up.
* Node: ``mibi-node serve`` with the parathyroid and thyroid analyses, one CPU worker that
  hosts both bundles, a 1 s quiet period and DCMTK storescp as the PACS. Each study is sent
  with DCMTK storescu and its SR is acknowledged before the next one leaves (so no queue
  forms), after warm-up studies. Latency = ``delivery.delivered_at - job.created_at`` from
  the node's database (the job is created when the sweep finds the study stable and routes
  it). Also reported: last instance acknowledged -> SR file in the PACS (adds the quiet
  period and the sweep interval), where the node's time goes, and the worker's resident
  memory (now and peak, from /proc) beside what its budget check counted: its own baseline
  (from its log) plus what the analyses said their bundles need.

Everything is interleaved (MIBI runner i, node MIBI i, thyroid runner i, node thyroid i, ...)
so that background load hits all alike. The bundles are the demo recipes with random
weights (the same compute as trained weights); the studies are phantoms. Every SR is checked
to arrive, in its study, with the probabilities the runner computed for it. TCP_NODELAY=1 is
set on the DCMTK processes.

Usage: python benchmarks/bench_e2e.py [--studies 20] [--warmup 2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from common import free_port, stop, summary, wait_for_port, write_result  # noqa: E402

DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
RECIPE = ROOT / "config" / "ensemble-demo.toml"
THYROID_RECIPE = ROOT / "config" / "thyroid-demo.toml"
GOAL_SECONDS = 1.0
OVERHEAD_GOAL_SECONDS = 0.3
#: The worker's log line that gives its own baseline (inference/worker.py).
WORKER_MEMORY = re.compile(r"memory: the worker (\d+) MiB")
QUIET_SECONDS = 1.0
STUDY_TIMEOUT = 180.0


def _studies(folder: Path, count: int) -> list[tuple[str, list[Path]]]:
    """``count`` phantom studies as (Study Instance UID, files)."""
    command = [sys.executable, "-m", "mibi_node.cli", "synth", "--out", str(folder)]
    subprocess.run(
        [*command, "--studies", str(count), "--seed", "5"], check=True, capture_output=True
    )
    with (folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    return [
        (row["study_instance_uid"], sorted((folder / row["path"]).glob("*.dcm"))) for row in rows
    ]


def _thyroid_studies(folder: Path, count: int) -> list[tuple[str, list[Path]]]:
    """``count`` thyroid phantom scans as (Study Instance UID, files)."""
    from mibi_node.analyses.thyroid.phantom import generate_thyroid_studies

    rows = generate_thyroid_studies(folder, count, 5)
    return [
        (row["study_instance_uid"], sorted((folder / row["folder"]).glob("*.dcm"))) for row in rows
    ]


def _thyroid_bundle(out: Path) -> Path:
    """The thyroid demo recipe's members with random weights, as a bundle."""
    import torch

    import mibi_node.analyses.thyroid.model  # noqa: F401  (registers the cross-feature ResNet)
    from mibi_node.analyses.thyroid.bundle import write_thyroid_bundle
    from mibi_node.analyses.thyroid.result import FINDINGS
    from mibi_node.inference.members import create_member
    from training.thyroid import load_thyroid_recipe

    recipe = load_thyroid_recipe(THYROID_RECIPE)
    torch.manual_seed(0)
    modules = {
        m.name: create_member(m.arch, num_classes=len(FINDINGS), in_chans=1, heads=m.heads,
                              embed_dim=m.embed_dim, input_size=recipe.input.size).eval()
        for m in recipe.members
    }  # fmt: skip
    manifest = {
        "name": recipe.name,
        "version": recipe.version,
        "intended_use": "demonstration",
        "input": {"image": "thyroid", **recipe.input.model_dump()},
        "normalisation": recipe.normalisation.model_dump(),
        "denoise": recipe.denoise.model_dump(),
        "members": [{"name": m.name} for m in recipe.members],
        "fusion_weights": [1.0 / len(modules)] * len(modules),
        "thresholds": dict.fromkeys(FINDINGS, 0.5),
        "provenance": {
            "created": datetime.now(UTC).isoformat(),
            "package_version": "benchmark",
            "training_command": "random weights (benchmarks/bench_e2e.py)",
        },
    }
    write_thyroid_bundle(out, manifest, modules)
    return out


def _proc_memory(pid: int) -> dict[str, float]:
    """Resident memory of a process now and at its peak (MiB), from /proc."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) / 1024
    return {"rss_mib": values.get("VmRSS", 0.0), "peak_rss_mib": values.get("VmHWM", 0.0)}


def _time(text: object) -> datetime:
    """A timestamp column as SQLite holds it (UTC, naive)."""
    return datetime.fromisoformat(str(text)).replace(tzinfo=UTC)


class Node:
    """``mibi-node serve`` with one CPU worker, and storescp as its PACS."""

    def __init__(
        self,
        work: Path,
        config: str,
        arguments: list[str],
        calling: str = "GAMMA_CAM1",
        quiet_seconds: float = QUIET_SECONDS,
    ) -> None:
        """Start storescp and the node with ``config`` (TOML) and extra ``serve`` arguments."""
        self.work = work
        self.calling = calling
        self.pacs_dir = work / "pacs"
        self.data_dir = work / "node"
        self.log = work / "node.log"
        self.port = free_port()
        self.pacs_port = free_port()
        self.pacs_dir.mkdir(parents=True)
        self.pacs = subprocess.Popen(
            ["storescp", "-aet", "PACS", "+xa", "-od", str(self.pacs_dir), str(self.pacs_port)],
            env=DCMTK_ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        path = work / "node.toml"
        path.write_text(
            '[node]\nhost = "127.0.0.1"\n[storage]\nmin_free_mb = 0\n[logging]\nlevel = "INFO"\n'
            + config
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mibi_node.cli",
                    "serve",
                    "--config",
                    str(path),
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--quiet-seconds",
                    str(quiet_seconds),
                    "--destination",
                    f"PACS@127.0.0.1:{self.pacs_port}",
                    "--workers",
                    "1",
                    "--device",
                    "cpu",
                    *arguments,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
            )
        wait_for_port(self.pacs_port)
        wait_for_port(self.port, timeout=60)
        self._wait_for_worker()

    def query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        database = self.data_dir / "mibi-node.sqlite3"
        try:
            with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
                return list(connection.execute(sql, args).fetchall())
        except sqlite3.Error:  # not created yet
            return []

    def fail(self, message: str) -> RuntimeError:
        tail = self.log.read_text(errors="replace")[-4000:] if self.log.is_file() else ""
        return RuntimeError(f"{message}\n--- node log ---\n{tail}")

    def _wait_for_worker(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise self.fail("the node stopped during start-up")
            if any(state == "ready" for (state,) in self.query("SELECT state FROM worker")):
                return
            time.sleep(0.2)
        raise self.fail(f"the worker was not ready after {timeout:.0f} s")

    def send(self, files: list[Path]) -> float:
        """Send one study; returns time.time() when its last instance was acknowledged."""
        done = subprocess.run(
            [
                "storescu",
                "-aet",
                self.calling,
                "-aec",
                "MIBI_NODE",
                "127.0.0.1",
                str(self.port),
                *map(str, files),
            ],
            env=DCMTK_ENV,
            capture_output=True,
            check=False,
        )
        if done.returncode:
            raise self.fail(f"storescu failed: {done.stderr.decode()}")
        return time.time()

    def wait_for_sr(self, uid: str) -> dict[str, Any]:
        """Wait until the study's SR is delivered and in the PACS; its timestamps."""
        import pydicom

        deadline = time.monotonic() + STUDY_TIMEOUT
        row = None
        while time.monotonic() < deadline:
            rows = self.query(
                "SELECT j.state, j.error, d.state, j.created_at, j.started_at, j.finished_at, "
                "d.delivered_at, j.timings, j.sr_sop_instance_uid FROM job j "
                "JOIN study s ON s.id = j.study_id LEFT JOIN delivery d ON d.job_id = j.id "
                "WHERE s.study_instance_uid = ?",
                uid,
            )
            failed = [r for r in rows if r[0] == "FAILED"]
            if failed:
                raise self.fail(f"the job of study {uid} FAILED: {failed[0][1]}")
            row = next((r for r in rows if r[2] == "DONE"), None)
            if row is not None:
                break
            if self.process.poll() is not None:
                raise self.fail("the node stopped")
            time.sleep(0.05)
        if row is None:
            raise self.fail(f"no SR of study {uid} delivered within {STUDY_TIMEOUT:.0f} s")
        sr_uid = row[8]
        sr_files = [p for p in self.pacs_dir.iterdir() if p.name.endswith(sr_uid)]
        if len(sr_files) != 1:
            raise self.fail(f"the SR {sr_uid} of study {uid} is not in the PACS folder")
        dataset = pydicom.dcmread(sr_files[0])
        if dataset.StudyInstanceUID != uid:
            raise self.fail(f"the SR {sr_uid} is in study {dataset.StudyInstanceUID}, not {uid}")
        return {
            "job_created": _time(row[3]).timestamp(),
            "job_started": _time(row[4]).timestamp(),
            "job_finished": _time(row[5]).timestamp(),
            "delivered": _time(row[6]).timestamp(),
            "timings": json.loads(row[7]),
            "sr_file_time": sr_files[0].stat().st_mtime,
            "sr": dataset,
        }

    def close(self) -> None:
        stop(self.process)
        stop(self.pacs)


def _row(got: dict[str, Any], sent: float) -> dict[str, float]:
    row = {
        "e2e_s": got["delivered"] - got["job_created"],
        "sent_to_sr_s": got["sr_file_time"] - sent,
        "sent_to_stable_s": got["job_created"] - sent,
        "queue_s": got["job_started"] - got["job_created"],
        "worker_s": got["job_finished"] - got["job_started"],
        "dispatch_s": got["delivered"] - got["job_finished"],
        **{f"worker_{k}_s": v for k, v in got["timings"].items()},
    }
    # What the node adds around its own engine work on this very study: robust to load
    # swings that hit the baseline and the node at different moments.
    row["overhead_s"] = row["e2e_s"] - sum(
        got["timings"][k] for k in ("read", "denoise", "inference")
    )
    return row


def _report(name: str, baseline: list[float], rows: list[dict[str, float]]) -> dict[str, Any]:
    """Print one analysis' table; its figures for the results file."""
    base_median = statistics.median(baseline)
    e2e = [r["e2e_s"] for r in rows]
    e2e_median = statistics.median(e2e)
    difference = e2e_median - base_median
    paired = statistics.median(n - e for n, e in zip(e2e, baseline, strict=True))
    parts = {key: summary([r[key] for r in rows]) for key in rows[0]}
    overhead = parts["overhead_s"]["median"]
    verdict = "PASS" if difference <= GOAL_SECONDS else "MISS"
    overhead_verdict = "PASS" if overhead <= OVERHEAD_GOAL_SECONDS else "MISS"
    print(f"\n{name}: {len(rows)} studies")
    print("| what | median s | min-max s |")
    print("|---|---|---|")
    table = [
        ("runner: read + predict in this process (baseline)", summary(baseline)),
        ("node: stable -> SR acknowledged by PACS", parts["e2e_s"]),
        ("  routed -> claimed by the worker", parts["queue_s"]),
        ("  worker: read, analyse, build SR, record", parts["worker_s"]),
        ("    read / denoise / inference / SR (worker's timings)", None),
        ("  worker done -> PACS acknowledged", parts["dispatch_s"]),
        ("  node minus the worker's own read + denoise + inference", parts["overhead_s"]),
        ("last instance sent -> stable (quiet period + sweep)", parts["sent_to_stable_s"]),
        ("last instance sent -> SR file in PACS", parts["sent_to_sr_s"]),
    ]
    for label, values in table:
        if values is None:
            stages = " / ".join(
                f"{parts[f'worker_{k}_s']['median']:.3f}"
                for k in ("read", "denoise", "inference", "sr")
            )
            print(f"| {label} | {stages} | |")
            continue
        print(f"| {label} | {values['median']:.3f} | {values['min']:.3f}-{values['max']:.3f} |")
    print(
        f"node - runner: {difference:+.3f} s (goal <= {GOAL_SECONDS:.1f} s): {verdict}; "
        f"node / runner: {e2e_median / base_median:.2f}; paired median {paired:+.3f} s"
    )
    print(
        "node around its runner (stable -> acknowledged, less the worker's own read + denoise "
        f"+ inference of the same study), median: {overhead:.3f} s (goal <= "
        f"{OVERHEAD_GOAL_SECONDS:.1f} s): {overhead_verdict}"
    )
    return {
        "baseline_s": summary(baseline),
        "node": parts,
        "difference_s": difference,
        "paired_difference_s": paired,
        "ratio": e2e_median / base_median,
        "verdict": verdict,
        "overhead_s": overhead,
        "overhead_verdict": overhead_verdict,
        "raw": {"baseline_s": baseline, "node": rows},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="measured studies per analysis")
    parser.add_argument("--warmup", type=int, default=2, help="studies sent before measuring")
    parser.add_argument("--quick", action="store_true", help="8 measured studies per analysis")
    args = parser.parse_args()
    if args.quick:
        args.studies = min(args.studies, 8)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/install-peers.sh")

    from mibi_node.analyses.registry import get_analysis
    from mibi_node.analyses.thyroid.reader import read_thyroid_study
    from mibi_node.analyses.thyroid.report import read_thyroid_probabilities
    from mibi_node.analyses.thyroid.runner import ThyroidRunner
    from mibi_node.imaging.nm import read_study
    from mibi_node.inference.bundle import init_random_bundle
    from mibi_node.inference.engine import InferenceEngine
    from mibi_node.report import read_probabilities

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    node: Node | None = None
    baselines: dict[str, list[float]] = {"parathyroid": [], "thyroid": []}
    rows: dict[str, list[dict[str, float]]] = {"parathyroid": [], "thyroid": []}
    max_diff = 0.0
    memory: dict[str, float] = {}
    try:
        bundle = init_random_bundle(RECIPE, work / "bundle", seed=0)
        thyroid_bundle = _thyroid_bundle(work / "thyroid-bundle")
        count = args.warmup + args.studies
        mibi_studies = _studies(work / "studies", count)
        thyroid_studies = _thyroid_studies(work / "thyroid-studies", count)
        engine = InferenceEngine(bundle.directory, device="cpu")
        runner = ThyroidRunner(thyroid_bundle, device="cpu")

        def mibi(files: list[Path]) -> dict[str, float]:
            (result,) = engine.predict([read_study(files, required=engine.bundle.channels)])
            return dict(result.probabilities)

        def thyroid(files: list[Path]) -> dict[str, float]:
            (result,) = runner.predict([read_thyroid_study(files)])
            return dict(result.probabilities)

        analyses = (
            ("parathyroid", mibi_studies, mibi, read_probabilities),
            ("thyroid", thyroid_studies, thyroid, read_thyroid_probabilities),
        )
        for _, studies, run, _ in analyses:  # the runners' warm-up
            for _, files in studies[: max(1, args.warmup)]:
                run(files)
        node = Node(
            work,
            f"[analyses.thyroid]\nenabled = true\nbundle = {json.dumps(str(thyroid_bundle))}\n",
            ["--bundle", str(bundle.directory)],
        )
        (pid,) = node.query("SELECT pid FROM worker")[0]
        memory["loaded_rss_mib"] = _proc_memory(int(pid))["rss_mib"]
        for index in range(count):
            measured = index >= args.warmup
            for name, studies, run, read_back in analyses:
                uid, files = studies[index]
                if measured:
                    started = time.perf_counter()
                    probabilities = run(files)
                    baselines[name].append(time.perf_counter() - started)
                sent = node.send(files)
                got = node.wait_for_sr(uid)
                if not measured:
                    continue
                from_sr = read_back(got["sr"])
                max_diff = max(max_diff, *(abs(from_sr[k] - p) for k, p in probabilities.items()))
                rows[name].append(_row(got, sent))
                print(
                    f"{name} study {index - args.warmup + 1}/{args.studies}: runner "
                    f"{baselines[name][-1]:.2f} s, node {rows[name][-1]['e2e_s']:.2f} s",
                    file=sys.stderr,
                )
        memory.update(_proc_memory(int(pid)))
        # What the worker's budget check believed: its own baseline (from its log) and each
        # bundle's figure, read while the bundles are still there.
        needs_of = {
            name: get_analysis(name).memory_needs(path, "cpu")
            for name, path in (("parathyroid", bundle.directory), ("thyroid", thyroid_bundle))
        }
        found = WORKER_MEMORY.findall(node.log.read_text(errors="replace"))
        worker_baseline = float(found[-1]) if found else float("nan")
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(work, ignore_errors=True)

    needs = {name: n.cpu_mb for name, n in needs_of.items()}
    stated = worker_baseline + sum(needs.values())
    print(
        f"\nend to end, {args.studies} studies per analysis one at a time after {args.warmup} "
        f"warm-up each, one CPU worker hosting both bundles (random weights): parathyroid "
        f"{bundle.name} ({len(bundle.member_names)} members, {bundle.input_size} px, "
        f"{len(bundle.views)} views, {engine.precision}), thyroid {runner.bundle_name} "
        f"({len(runner.members)} members)"
    )
    reports = {name: _report(name, baselines[name], rows[name]) for name in rows}
    print(
        f"\nworker memory: {memory['loaded_rss_mib']:.0f} MiB resident with both bundles "
        f"loaded, {memory['rss_mib']:.0f} MiB after the run, peak {memory['peak_rss_mib']:.0f} "
        f"MiB; the analyses' stated needs: parathyroid {needs['parathyroid']:.0f} MiB + "
        f"thyroid {needs['thyroid']:.0f} MiB = {sum(needs.values()):.0f} MiB (peak / stated "
        f"{memory['peak_rss_mib'] / sum(needs.values()):.2f})"
    )
    print(
        f"worker's budget check: its own baseline {worker_baseline:.0f} MiB + parathyroid "
        f"{needs['parathyroid']:.0f} MiB ({needs_of['parathyroid'].source}) + thyroid "
        f"{needs['thyroid']:.0f} MiB ({needs_of['thyroid'].source}) = {stated:.0f} MiB; "
        f"measured peak {memory['peak_rss_mib']:.0f} MiB (peak / stated "
        f"{memory['peak_rss_mib'] / stated:.2f})"
    )
    print(f"SR probabilities vs the runners', max |difference|: {max_diff:.2e}")
    path = write_result(
        "e2e",
        {
            "studies": args.studies,
            "warmup": args.warmup,
            "quiet_seconds": QUIET_SECONDS,
            "bundle": {
                "recipe": str(RECIPE.relative_to(ROOT)),
                "thyroid_recipe": str(THYROID_RECIPE.relative_to(ROOT)),
                "weights": "random",
                "members": list(bundle.member_names),
                "input_size": bundle.input_size,
                "views": [v.spec for v in bundle.views],
                "precision": engine.precision,
            },
            "goal_s": GOAL_SECONDS,
            "overhead_goal_s": OVERHEAD_GOAL_SECONDS,
            "analyses": reports,
            "worker_memory_mib": memory,
            "stated_needs_mib": needs,
            "worker_baseline_mib": worker_baseline,
            "stated_with_baseline_mib": stated,
            "sr_vs_runner_max_abs_diff": max_diff,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
