"""The job queue: claims + completions per second on SQLite and PostgreSQL, 1/4/8 processes.

The goal (issue 9): the queue is never the bottleneck, i.e. at least 200 claims/s on either
backend (more than any GPU analyses). Each run fills a fresh database with ``--jobs`` queued
studies, then ``P`` worker processes (started and waiting beforehand, so interpreter start-up
is not timed) loop ``claim_jobs`` (``--batch`` jobs per claim: ``jobs.batch_size``, 4, as
``mibi-node worker`` claims; ``--batch 1`` is the worst case, one claim per job) and
``complete_job`` (the result, one delivery row, one audit event) until the queue is empty,
exactly as ``mibi-node worker`` does minus the analysis. jobs/s = jobs / wall time from the
start signal to the last process done; claims/s = claim transactions / the same time. Every
run checks that each job was claimed exactly once (DONE, one attempt, one delivery).

SQLite is the node's default file (WAL, synchronous FULL, BEGIN IMMEDIATE + the write lock);
PostgreSQL is a throw-away server from Debian's packages (tests/postgres.py) with its
durable defaults (fsync on, synchronous_commit on), on the same disk. Backends and process
counts are interleaved round by round; medians with min-max. The ratio column is jobs/s
against the 200/s goal.

Usage: python benchmarks/bench_queue.py [--jobs 10000] [--rounds 5] [--processes 1,4,8]
       [--batch 4] [--quick]   (quick: 2,000 jobs, 2 rounds)
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests"))

from common import summary, write_result  # noqa: E402

GOAL_PER_SECOND = 200.0
DESTINATION = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}


def _fill(url: str, jobs: int) -> None:
    """A fresh schema with ``jobs`` QUEUED studies, each with its job."""
    from sqlalchemy import insert

    from mibi_node.storage.database import open_database
    from mibi_node.storage.models import Job, Study, StudyState, utcnow

    database = open_database(url)
    now = utcnow()
    studies = [
        {
            "study_instance_uid": f"1.2.826.0.1.3680043.10.1.{index}",
            "state": StudyState.QUEUED.value,
            "instance_count": 2,
            "modalities": "NM",
            "calling_ae_title": "CAMERA",
            "first_received_at": now,
            "last_received_at": now,
            "state_changed_at": now,
        }
        for index in range(jobs)
    ]
    with database.write_lock(), database.engine.begin() as connection:
        connection.execute(insert(Study.__table__), studies)
        ids = [row[0] for row in connection.exec_driver_sql("SELECT id FROM study ORDER BY id")]
        rows = [
            {
                "study_id": study_id,
                "version": 1,
                "state": "QUEUED",
                "attempts": 0,
                "partial": False,
                "created_at": now,
            }
            for study_id in ids
        ]
        connection.execute(insert(Job.__table__), rows)
    # Statistics, as PostgreSQL's autovacuum gathers them within a minute of a change this
    # size: right after a bulk insert the planner takes the queue for empty and sorts it
    # for every claim instead of reading the claim index (ix_job_claim).
    with database.write_lock(), database.engine.begin() as connection:
        connection.exec_driver_sql("ANALYZE")
    database.dispose()


def _worker(url: str, name: str, batch: int, ready: Any, go: Event, done: Any) -> None:
    """One worker process: claim ``batch`` jobs, complete them, until the queue is empty."""
    from mibi_node.jobs.queue import CompletedJob, claim_jobs, complete_job
    from mibi_node.storage.database import Database

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    database = Database(url)
    with database.session() as session:  # connect before the clock starts
        session.connection()
    result = CompletedJob(
        result={"predicted": "parathyroid adenoma", "probabilities": {"adenoma": 0.9}},
        timings={"read": 0.1, "denoise": 0.1, "inference": 0.5, "sr": 0.1},
        bundle="bench 1",
        sr_path="ab/cd/sr.dcm",
        sr_sop_instance_uid="1.2.3.4",
        sr_series_instance_uid="1.2.3.5",
        files=("ab/cd/sr.dcm",),
        destinations=(DESTINATION,),
    )
    ready.put(name)
    go.wait()
    count = claims = 0
    while jobs := claim_jobs(database, name, 60.0, batch):
        claims += 1
        for job in jobs:
            complete_job(database, name, job.id, result)
            count += 1
    database.dispose()
    done.put((name, count, claims))


def _run(url: str, processes: int, jobs: int, batch: int) -> tuple[float, float]:
    """Fill, then time ``processes`` workers emptying the queue; returns jobs/s, claims/s."""
    _fill(url, jobs)
    context = multiprocessing.get_context("spawn")
    ready, done, go = context.Queue(), context.Queue(), context.Event()
    children = [
        context.Process(target=_worker, args=(url, f"w{index}", batch, ready, go, done))
        for index in range(processes)
    ]
    counts: list[tuple[str, int, int]] = []
    try:
        for child in children:
            child.start()
        for _ in children:
            ready.get(timeout=120)
        started = time.perf_counter()
        go.set()
        counts = [done.get(timeout=3600) for _ in children]
        seconds = time.perf_counter() - started
    finally:  # on Ctrl-C too: no worker process outlives the run
        for child in children:
            child.join(30 if len(counts) == len(children) else 0)
            if child.is_alive():
                child.terminate()
                child.join(10)
    if sum(count for _, count, _ in counts) != jobs:
        raise SystemExit(f"{url}: {counts} completed, expected {jobs} in all")
    _check(url, jobs)
    return jobs / seconds, sum(claims for _, _, claims in counts) / seconds


def _check(url: str, jobs: int) -> None:
    """Every job DONE after exactly one claim, with its one delivery."""
    from sqlalchemy import func, select

    from mibi_node.storage.database import Database
    from mibi_node.storage.models import Delivery, Job, JobState

    database = Database(url)
    with database.session() as session:
        done = session.scalar(
            select(func.count()).where(Job.state == JobState.DONE, Job.attempts == 1)
        )
        deliveries = session.scalar(select(func.count()).select_from(Delivery))
    database.dispose()
    if done != jobs or deliveries != jobs:
        raise SystemExit(f"{url}: {done} jobs done once and {deliveries} deliveries of {jobs}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--processes", default="1,4,8")
    parser.add_argument("--batch", type=int, default=0, help="jobs per claim (jobs.batch_size)")
    parser.add_argument("--quick", action="store_true", help="2,000 jobs, 2 rounds")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.rounds = 2_000, 2
    counts = [int(n) for n in args.processes.split(",")]
    if args.batch <= 0:
        from mibi_node.config import JobsConfig

        args.batch = JobsConfig().batch_size

    from postgres import INSTALL_HINT, PostgresServer, find_bin

    backends = ["sqlite"]
    server = None
    if find_bin() is not None:
        server = PostgresServer(durable=True).start()
        backends.append("postgresql")
    else:
        print(f"PostgreSQL skipped: {INSTALL_HINT}")
    work = Path(tempfile.mkdtemp(prefix="bench-queue-"))
    rates: dict[tuple[str, int], list[float]] = {(b, n): [] for b in backends for n in counts}
    claim_rates: dict[tuple[str, int], list[float]] = {key: [] for key in rates}
    interrupted = False
    try:
        serial = 0
        for round_index in range(args.rounds):
            for processes in counts:
                for backend in backends:
                    serial += 1
                    if backend == "sqlite":
                        url = f"sqlite:///{work / f'queue-{serial}.sqlite3'}"
                    else:
                        assert server is not None
                        url = server.create_database()
                    rate, claims = _run(url, processes, args.jobs, args.batch)
                    rates[(backend, processes)].append(rate)
                    claim_rates[(backend, processes)].append(claims)
                    print(
                        f"round {round_index + 1}: {backend:10s} {processes} process(es): "
                        f"{rate:7.0f} jobs/s, {claims:7.0f} claims/s",
                        flush=True,
                    )
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    if interrupted:
        print("\ninterrupted: PostgreSQL stopped, work folder removed, no result written")
        raise SystemExit(130)

    print(
        f"\nqueue: {args.jobs} jobs claimed {args.batch} at a time and completed (result + "
        f"delivery + audit row), median of {args.rounds} interleaved rounds, "
        f"{os.cpu_count()} cores"
    )
    print("| backend | processes | jobs/s (median) | min-max | claims/s | jobs/s vs 200/s goal |")
    print("|---|---|---|---|---|---|")
    table: dict[str, Any] = {}
    for (backend, processes), values in rates.items():
        stats = summary(values)
        ratio = stats["median"] / GOAL_PER_SECOND
        claims = statistics.median(claim_rates[(backend, processes)])
        table[f"{backend}-{processes}"] = {
            **stats,
            "claims_per_second": claims,
            "ratio_to_goal": ratio,
            "raw": values,
        }
        print(
            f"| {backend} | {processes} | {stats['median']:.0f} | "
            f"{stats['min']:.0f}-{stats['max']:.0f} | {claims:.0f} | {ratio:.2f}x |"
        )
    if "postgresql" in backends:
        for processes in counts:
            ratio = statistics.median(rates[("postgresql", processes)]) / statistics.median(
                rates[("sqlite", processes)]
            )
            print(f"PostgreSQL / SQLite with {processes} process(es): {ratio:.2f}")
    slowest = min(statistics.median(values) for values in rates.values())
    verdict = "PASS" if slowest >= GOAL_PER_SECOND else "MISS"
    print(f"slowest configuration: {slowest:.0f} jobs/s (goal >= {GOAL_PER_SECOND:.0f}): {verdict}")
    path = write_result(
        "queue",
        {
            "jobs": args.jobs,
            "rounds": args.rounds,
            "claim_batch": args.batch,
            "goal_per_second": GOAL_PER_SECOND,
            "results": table,
            "verdict": verdict,
        },
    )
    print(f"written to {path}")


if __name__ == "__main__":
    main()
