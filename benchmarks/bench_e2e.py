"""End to end: a study becoming stable -> its SR acknowledged by the PACS, against the engine.

The goal (issue 6): the median over 20 studies is at most the engine's own study latency plus
1 s on CPU, i.e. the node around the engine (queue, worker, SR, C-STORE) costs <= 1 s.

* Engine (the baseline, in this process): ``read_study`` + ``InferenceEngine.predict`` of one
  study, same bundle, device cpu, after a warm-up.
* Node: ``mibi-node serve`` with one CPU worker and a 1 s quiet period, DCMTK storescp as the
  PACS. Each study is sent with DCMTK storescu and its SR is acknowledged before the next one
  leaves (so no queue forms), after warm-up studies. Latency = ``delivery.delivered_at -
  job.created_at`` from the node's database (the job is created when the sweep finds the
  study stable and routes it). Also reported: last instance acknowledged -> SR file in the
  PACS (adds the quiet period and the sweep interval), and where the node's time goes.

The two are interleaved (engine study i, node study i, ...) so that background load hits
both alike. The bundle is the demo recipe with random weights (the same compute as trained
weights); the studies are phantoms. Every SR is checked to arrive, in its study, with the
probabilities the engine computed for it. TCP_NODELAY=1 is set on the DCMTK processes.

Usage: python benchmarks/bench_e2e.py [--studies 20] [--warmup 2] [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
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
GOAL_SECONDS = 1.0
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


def _time(text: object) -> datetime:
    """A timestamp column as SQLite holds it (UTC, naive)."""
    return datetime.fromisoformat(str(text)).replace(tzinfo=UTC)


class Node:
    """``mibi-node serve`` with one CPU worker, and storescp as its PACS."""

    def __init__(self, work: Path, bundle: Path) -> None:
        self.work = work
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
        config = work / "node.toml"
        config.write_text(
            '[node]\nhost = "127.0.0.1"\n[storage]\nmin_free_mb = 0\n[logging]\nlevel = "INFO"\n'
        )
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mibi_node.cli",
                    "serve",
                    "--config",
                    str(config),
                    "--port",
                    str(self.port),
                    "--data-dir",
                    str(self.data_dir),
                    "--quiet-seconds",
                    str(QUIET_SECONDS),
                    "--bundle",
                    str(bundle),
                    "--destination",
                    f"PACS@127.0.0.1:{self.pacs_port}",
                    "--workers",
                    "1",
                    "--device",
                    "cpu",
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
                "GAMMA_CAM1",
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="measured studies")
    parser.add_argument("--warmup", type=int, default=2, help="studies sent before measuring")
    parser.add_argument("--quick", action="store_true", help="8 measured studies")
    args = parser.parse_args()
    if args.quick:
        args.studies = min(args.studies, 8)
    for tool in ("storescu", "storescp"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} is not installed: run scripts/install-peers.sh")

    from mibi_node.imaging.nm import read_study
    from mibi_node.inference.bundle import init_random_bundle
    from mibi_node.inference.engine import InferenceEngine
    from mibi_node.report import read_probabilities

    work = Path(tempfile.mkdtemp(prefix="bench-e2e-"))
    node: Node | None = None
    engine_s: list[float] = []
    rows: list[dict[str, Any]] = []
    max_diff = 0.0
    try:
        bundle = init_random_bundle(RECIPE, work / "bundle", seed=0)
        studies = _studies(work / "studies", args.warmup + args.studies)
        engine = InferenceEngine(bundle.directory, device="cpu")
        for _, files in studies[: max(1, args.warmup)]:  # the engine's warm-up
            engine.predict([read_study(files, required=engine.bundle.channels)])
        node = Node(work, bundle.directory)
        for index, (uid, files) in enumerate(studies):
            measured = index >= args.warmup
            if measured:
                started = time.perf_counter()
                (result,) = engine.predict([read_study(files, required=engine.bundle.channels)])
                engine_s.append(time.perf_counter() - started)
            sent = node.send(files)
            got = node.wait_for_sr(uid)
            if not measured:
                continue
            from_sr = read_probabilities(got["sr"])
            max_diff = max(
                max_diff, *(abs(from_sr[k] - p) for k, p in result.probabilities.items())
            )
            rows.append(
                {
                    "e2e_s": got["delivered"] - got["job_created"],
                    "sent_to_sr_s": got["sr_file_time"] - sent,
                    "sent_to_stable_s": got["job_created"] - sent,
                    "queue_s": got["job_started"] - got["job_created"],
                    "worker_s": got["job_finished"] - got["job_started"],
                    "dispatch_s": got["delivered"] - got["job_finished"],
                    **{f"worker_{k}_s": v for k, v in got["timings"].items()},
                }
            )
            # What the node adds around its own engine work on this very study: robust to
            # load swings that hit the engine baseline and the node at different moments.
            rows[-1]["overhead_s"] = rows[-1]["e2e_s"] - sum(
                got["timings"][k] for k in ("read", "denoise", "inference")
            )
            print(
                f"study {index - args.warmup + 1}/{args.studies}: engine {engine_s[-1]:.2f} s, "
                f"node {rows[-1]['e2e_s']:.2f} s",
                file=sys.stderr,
            )
    finally:
        if node is not None:
            node.close()
        shutil.rmtree(work, ignore_errors=True)

    engine_median = statistics.median(engine_s)
    e2e = [r["e2e_s"] for r in rows]
    e2e_median = statistics.median(e2e)
    difference = e2e_median - engine_median
    # Paired (node study i - engine study i, run back to back): less sensitive to load swings.
    paired = statistics.median(n - e for n, e in zip(e2e, engine_s, strict=True))
    verdict = "PASS" if difference <= GOAL_SECONDS else "MISS"
    parts = {key: summary([r[key] for r in rows]) for key in rows[0]}
    print(
        f"\nend to end, {args.studies} phantom studies one at a time after {args.warmup} "
        f"warm-up, bundle {bundle.name} (random weights, {len(bundle.member_names)} members, "
        f"{bundle.input_size} px, {len(bundle.views)} views), cpu, {engine.precision}"
    )
    print("| what | median s | min-max s |")
    print("|---|---|---|")
    table = [
        ("engine: read_study + predict (baseline)", summary(engine_s)),
        ("node: stable -> SR acknowledged by PACS", parts["e2e_s"]),
        ("  routed -> claimed by the worker", parts["queue_s"]),
        ("  worker: read, analyse, build SR, record", parts["worker_s"]),
        ("    read / denoise / inference / SR (worker's timings)", None),
        ("  worker done -> PACS acknowledged", parts["dispatch_s"]),
        ("  node minus the worker's own read + denoise + inference", parts["overhead_s"]),
        ("last instance sent -> stable (quiet period + sweep)", parts["sent_to_stable_s"]),
        ("last instance sent -> SR file in PACS", parts["sent_to_sr_s"]),
    ]
    for name, values in table:
        if values is None:
            stages = " / ".join(
                f"{parts[f'worker_{k}_s']['median']:.2f}"
                for k in ("read", "denoise", "inference", "sr")
            )
            print(f"| {name} | {stages} | |")
            continue
        print(f"| {name} | {values['median']:.3f} | {values['min']:.3f}-{values['max']:.3f} |")
    print(
        f"node - engine: {difference:+.3f} s (goal <= {GOAL_SECONDS:.1f} s): {verdict}; "
        f"node / engine: {e2e_median / engine_median:.2f}"
    )
    print(f"paired, median of (node - engine) per study: {paired:+.3f} s")
    print(
        "node around its engine (stable -> acknowledged, less the worker's own read + denoise "
        f"+ inference of the same study), median: {parts['overhead_s']['median']:.3f} s"
    )
    print(f"SR probabilities vs the engine's, max |difference|: {max_diff:.2e}")
    path = write_result(
        "e2e",
        {
            "studies": args.studies,
            "warmup": args.warmup,
            "quiet_seconds": QUIET_SECONDS,
            "bundle": {
                "recipe": str(RECIPE.relative_to(ROOT)),
                "weights": "random",
                "members": list(bundle.member_names),
                "input_size": bundle.input_size,
                "views": [v.spec for v in bundle.views],
                "precision": engine.precision,
            },
            "engine_s": summary(engine_s),
            "node": parts,
            "difference_s": difference,
            "paired_difference_s": paired,
            "ratio": e2e_median / engine_median,
            "goal_s": GOAL_SECONDS,
            "verdict": verdict,
            "sr_vs_engine_max_abs_diff": max_diff,
            "raw": {"engine_s": engine_s, "node": rows},
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
