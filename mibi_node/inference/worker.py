"""The analysis worker: one process per GPU (or one on the CPU) that turns jobs into SRs.

A worker hosts the bundles of every enabled analysis (:mod:`mibi_node.analyses`) on its
device, within a memory budget: before loading, each analysis says what its bundle needs
above the worker's own baseline (measured when the bundle was trained), and a bundle that
does not fit in what the baseline and the bundles already loaded leave is refused with that
sentence, not loaded into an OOM later. It then loops: claim a small batch of jobs of the
analyses it has loaded (atomically, with a lease it renews from a background thread), read
each study with its analysis' input builder, run the batch per analysis, build each result's
documents, record the result and its deliveries in one transaction, and send them at once.

It is a separate process so that nothing it does (a decoder that crashes, the kernel's OOM
killer) can touch reception; a job it dies on is retried until ``jobs.max_attempts``, then
FAILED, while the other studies go on.

Without a usable bundle for an analysis the worker keeps running and says why in the
``worker`` table (``mibi-node status`` shows it); that analysis' jobs wait in the queue and
its bundle is looked for again every few seconds, so installing one needs no restart.

An analysis with a candidate bundle (``shadow_bundle``; :mod:`mibi_node.validation.shadow`)
has it loaded beside the current one, within the same memory budget, for its shadow jobs:
their results are recorded and never sent. A candidate that cannot be loaded fails them
with the reason, and leaves the current jobs alone. Which bundle is current is read from
the database at every poll, so a promotion reaches the worker without a restart: the
candidate already loaded becomes the current runner.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, generate_uid
from sqlalchemy.exc import OperationalError

from mibi_node import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
from mibi_node.config import Config
from mibi_node.dispatch.deliveries import deliver
from mibi_node.errors import MibiNodeError, MissingPhaseError, UnusableStudyError
from mibi_node.jobs.queue import (
    ClaimedJob,
    CompletedJob,
    claim_jobs,
    complete_job,
    defer_job,
    device_uid,
    fail_job,
    renew_leases,
)
from mibi_node.storage.database import Outage, database_problem, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.models import WorkerStatus, utcnow
from mibi_node.systemd import Notifier

if TYPE_CHECKING:
    from mibi_node.analyses.base import Analysis, Runner
    from mibi_node.validation.shadow import BundleChoice

__all__ = ["Worker", "worker_main"]

logger = logging.getLogger(__name__)

#: Seconds between looks for a bundle while none can be loaded.
_BUNDLE_RETRY_SECONDS = 5.0
#: Seconds between tries while the database cannot be reached.
_DATABASE_RETRY_SECONDS = 2.0
_PR_SET_PDEATHSIG = 1


class Worker:
    """Claims jobs, analyses them and records the results.

    Parameters
    ----------
    config
        The node's configuration (database, store, jobs, dispatch, report, workers).
    device
        ``"auto"``, ``"cpu"`` or ``"cuda[:N]"``.
    name
        Lease owner and row name; unique per process (host, pid and device by default).
    notifier
        Where to send systemd notifications (READY, STATUS, WATCHDOG, STOPPING) when the
        worker is a unit of its own (``mibi-node-worker@.service``); none by default.
    """

    def __init__(
        self,
        config: Config,
        *,
        device: str | None = None,
        name: str | None = None,
        notifier: Notifier | None = None,
        wake: Any = None,
    ):
        self.config = config
        #: An event (``multiprocessing.Event``) the node sets when a sweep queued jobs; the
        #: loop waits on it between polls. None: poll every ``workers.poll_seconds``.
        self.wake = wake
        self.device = device or config.workers.device
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{self.device}"[:64]
        self.database = open_database(config.database_url)  # a standalone worker may be first
        self.files = FileStore(config.store_dir)
        self.results = FileStore(config.results_dir)
        #: Analysis name -> its loaded bundle.
        self.runners: dict[str, Runner] = {}
        #: Analysis name -> why its bundle is not loaded (shown in the worker row).
        self.problems: dict[str, str] = {}
        #: Analysis name -> its candidate bundle, run for its shadow jobs.
        self.candidates: dict[str, Runner] = {}
        #: Analysis name -> why its candidate is not loaded (its shadow jobs fail with it).
        self.candidate_problems: dict[str, str] = {}
        #: (analysis, shadow) -> the folder its loaded runner came from.
        self._folders: dict[tuple[str, bool], Path] = {}
        #: Analysis name -> the bundles it runs now (read from the database at every poll).
        self._choices: dict[str, BundleChoice] = {}
        self._device_uid: str | None = None
        self._next_bundle_try = 0.0
        self._budget_mb: float | None = None
        self._baseline_mb: float | None = None
        self._stop = threading.Event()
        self._state = ("starting", "")
        self.notifier = notifier or Notifier()
        self._announced: tuple[str, str, str | None] | None = None
        #: Jobs claimed and not yet recorded: the only leases the keeper renews.
        self._held: set[int] = set()
        self._held_lock = threading.Lock()
        #: A database outage the loop is waiting out (logged once, not per poll).
        self._database_outage = Outage()

    # -- status ---------------------------------------------------------------------------

    def _say(self, state: str, message: str = "") -> None:
        """Write this worker's state and heartbeat into the ``worker`` table."""
        self._state = (state, message)
        bundle = self.bundles_text() or None
        with self.database.write_lock(), self.database.session() as session, session.begin():
            row = session.get(WorkerStatus, self.name)
            if row is None:
                row = WorkerStatus(name=self.name, pid=os.getpid(), host=socket.gethostname())
                session.add(row)
            row.device = next((r.device for r in self.runners.values()), self.device)[:32]
            row.bundle = bundle
            row.state = state
            row.message = message or None
            row.heartbeat_at = utcnow()
        if (state, message, bundle) != self._announced:  # `systemctl status` shows it
            self._announced = (state, message, bundle)
            on = f" (bundles {bundle} on {row.device})" if self.runners else ""
            self.notifier.status(f"{state}{': ' + message if message else ''}{on}")

    def _keep_leases(self) -> None:
        every = self.config.jobs.lease_seconds / 3
        if self.notifier.watchdog_interval is not None:
            every = min(every, self.notifier.watchdog_interval)
        while not self._stop.wait(every):
            with self._held_lock:
                held = set(self._held)
            try:
                renew_leases(self.database, self.name, self.config.jobs.lease_seconds, held)
                self._say(*self._state)
            except OperationalError as exc:  # the loop logs the outage once
                logger.debug("worker %s could not renew its leases: %s", self.name, exc)
            except Exception:  # the next round tries again; the lease has slack for it
                logger.exception("worker %s could not renew its leases", self.name)
            self.notifier.watchdog()  # this thread still runs: systemd's watchdog is fed

    # -- the bundle -----------------------------------------------------------------------

    def bundles_text(self) -> str:
        """The loaded bundles as the worker row shows them ("demo 1.0, thyroid-demo 1.0")."""
        text = ", ".join(
            [f"{r.bundle_name} {r.bundle_version}" for r in self.runners.values()]
            + [f"shadow {r.bundle_name} {r.bundle_version}" for r in self.candidates.values()]
        )
        return text[:128]

    def baseline_mb(self) -> float:
        """MiB this worker holds before any bundle, measured once (0 on a GPU).

        On the CPU: its resident memory once torch, timm and the report builders are
        imported, some 950 MiB, which the bundles' figures do not include. On a GPU the
        budget is device memory, which the worker's baseline does not use.
        """
        if self._baseline_mb is None:
            if _resolve(self.device).startswith("cuda"):
                self._baseline_mb = 0.0
            else:
                from mibi_node.analyses.memory import worker_baseline_megabytes

                self._baseline_mb = worker_baseline_megabytes()
        return self._baseline_mb

    def memory_budget_mb(self) -> float:
        """MiB this worker may use in all (GPU memory on a GPU): ``workers.memory_budget_mb``,
        else its baseline plus 85 % of what the device has free when the worker starts
        (fixed then)."""
        if self._budget_mb is None:
            configured = self.config.workers.memory_budget_mb
            baseline = self.baseline_mb()  # first: the imports it measures are not free
            free = _free_megabytes(_resolve(self.device))
            self._budget_mb = configured or baseline + 0.85 * free
        return self._budget_mb

    def load_bundle(self) -> bool:
        """Load every enabled analysis' bundle not loaded yet; ``True`` when one is loaded.

        Each analysis that cannot be loaded (no bundle, a bad one, over the memory budget)
        says why in :attr:`problems`; the others run. Candidate bundles are loaded after the
        current ones (a current bundle comes first in the memory budget); one that cannot
        be loaded says why in :attr:`candidate_problems`.
        """
        from mibi_node.analyses.registry import get_analysis
        from mibi_node.validation.shadow import bundle_choices

        wanted = self.config.enabled_analyses
        self._follow(bundle_choices(self.database, self.config, wanted))
        shadowed = [name for name in wanted if self._choices[name].candidate is not None]
        if all(name in self.runners for name in wanted) and all(
            name in self.candidates for name in shadowed
        ):
            return bool(self.runners)
        if time.monotonic() < self._next_bundle_try:
            return bool(self.runners)
        self._next_bundle_try = time.monotonic() + _BUNDLE_RETRY_SECONDS
        device = _resolve(self.device)
        for name in wanted:
            if name in self.runners:
                continue
            problem = self._load_one(get_analysis(name), device, self._choices[name].current)
            if problem is None:
                self.problems.pop(name, None)
                continue
            if problem != self.problems.get(name):  # once per reason, not every few seconds
                logger.error("worker %s: %s", self.name, problem)
            self.problems[name] = problem
        for name in shadowed:
            candidate = self._choices[name].candidate
            if name in self.candidates or candidate is None:
                continue
            problem = self._load_one(get_analysis(name), device, candidate, shadow=True)
            if problem is None:
                self.candidate_problems.pop(name, None)
                continue
            if problem != self.candidate_problems.get(name):
                logger.error("worker %s: %s; its shadow jobs fail", self.name, problem)
            self.candidate_problems[name] = problem
        message = self._problems_text()
        if not self.runners:
            self._say("waiting for a bundle", message)
            return False
        self._say("ready", message)
        return True

    def _problems_text(self) -> str:
        return "; ".join([*self.problems.values(), *self.candidate_problems.values()])

    def _follow(self, choices: dict[str, BundleChoice]) -> None:
        """Follow a promotion (or its revert): a loaded runner whose folder is no longer its
        analysis' current (or candidate) bundle is dropped; the candidate that became
        current is moved over, not loaded again. The rest is loaded on the next try."""
        changed = False
        for name, choice in choices.items():
            before = self._choices.get(name)
            if before is not None and before != choice:
                logger.warning(
                    "worker %s: %s now runs %s%s", self.name, name, choice.current,
                    f" with the candidate {choice.candidate} in shadow" if choice.candidate else "",
                )  # fmt: skip
                self._next_bundle_try = 0.0
                self.problems.pop(name, None)
                self.candidate_problems.pop(name, None)
            if name in self.runners and self._folders.get((name, False)) != choice.current:
                changed = True
                del self.runners[name]
                if self._folders.get((name, True)) == choice.current:  # promoted
                    self.runners[name] = self.candidates.pop(name)
                    self._folders[(name, False)] = self._folders.pop((name, True))
                else:
                    self._folders.pop((name, False), None)
            if name in self.candidates and self._folders.get((name, True)) != choice.candidate:
                changed = True
                del self.candidates[name]
                self._folders.pop((name, True), None)
        self._choices = choices
        if changed:  # the dropped weights go now, not at the next collection
            import gc

            gc.collect()
            if _resolve(self.device).startswith("cuda"):
                import torch

                torch.cuda.empty_cache()

    def _load_one(
        self, analysis: Analysis, device: str, bundle: Path, shadow: bool = False
    ) -> str | None:
        """Load one analysis' bundle (its candidate with ``shadow``); the reason when it
        cannot be loaded."""
        what = f"{analysis.name} candidate" if shadow else analysis.name
        if not bundle.is_dir():
            return f"{what}: no model bundle at {bundle}: its {'shadow ' * shadow}jobs wait"
        try:
            needs = analysis.memory_needs(bundle, device)
            budget = self.memory_budget_mb()
            baseline = self.baseline_mb()
            loaded = sum(
                (r.memory.gpu_mb if device.startswith("cuda") else r.memory.cpu_mb)
                for r in [*self.runners.values(), *self.candidates.values()]
            )
            wanted = needs.gpu_mb if device.startswith("cuda") else needs.cpu_mb
            if baseline + loaded + wanted > budget:
                return (
                    f"{what}: bundle {bundle} needs {wanted:.0f} MiB "
                    f"({needs.source}) and {budget - baseline - loaded:.0f} MiB of the "
                    f"worker's {budget:.0f} MiB budget on {device} are left (the worker "
                    f"itself {baseline:.0f} MiB, bundles loaded {loaded:.0f} MiB): not "
                    "loaded; raise workers.memory_budget_mb or run this analysis in another "
                    "worker"
                )
            runner = analysis.load(bundle, device)
        except (MibiNodeError, ValueError, OSError, RuntimeError) as exc:
            return f"{what}: cannot load the bundle {bundle}: {exc}"
        (self.candidates if shadow else self.runners)[analysis.name] = runner
        self._folders[(analysis.name, shadow)] = bundle
        # Import the reader and the report builders now, not on the first study's clock.
        import mibi_node.report.sr  # noqa: F401

        logger.info(
            "worker %s: %s bundle %s %s on %s (%.0f MiB, %s); memory: the worker %.0f MiB "
            "+ bundles %.0f MiB of %.0f MiB",
            self.name,
            what,
            runner.bundle_name,
            runner.bundle_version,
            device,
            wanted,
            needs.source,
            baseline,
            loaded + wanted,
            budget,
        )
        return None

    # -- the loop -------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Work until ``should_stop()`` is true (checked between batches)."""
        self._say("starting")
        keeper = threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True)
        keeper.start()
        self.notifier.ready()
        try:
            while not should_stop():
                if self.wake is not None:
                    self.wake.clear()  # before the claim: a later set() is not missed
                try:
                    claimed = self.load_bundle() and self.run_once()
                except OperationalError as exc:
                    self._database_failed(exc)
                    self._stop.wait(_DATABASE_RETRY_SECONDS)
                    continue
                self._database_works()
                if not claimed:
                    if self.wake is not None:
                        self.wake.wait(self.config.workers.poll_seconds)
                    else:
                        time.sleep(self.config.workers.poll_seconds)
        finally:
            self.notifier.stopping()
            self._stop.set()
            keeper.join(timeout=5)
            with contextlib.suppress(OperationalError):
                self._say("stopped")
            self.database.dispose()

    def _database_failed(self, exc: OperationalError) -> None:
        """Wait the database out (PostgreSQL restarting, the network to it cut).

        The worker stays up, with its bundle loaded. A job it was analysing when the error
        came is no longer renewed (see :meth:`run_once`): its lease runs out and the queue
        gives it to a worker again once the database is back. Logged when it starts, then
        at most once a minute.
        """
        if self._database_outage.failed():
            logger.error(
                "worker %s: database error%s, retrying every %.0f s: %s",
                self.name,
                self._database_outage.lasting(),
                _DATABASE_RETRY_SECONDS,
                database_problem(exc),
            )

    def _database_works(self) -> None:
        if self._database_outage.recovered():
            logger.warning("worker %s: the database works again", self.name)

    def run_once(self) -> int:
        """Claim and analyse one batch; returns how many jobs it claimed."""
        if not self.runners:
            raise MibiNodeError("the worker has no bundle loaded (call load_bundle first)")
        self.load_bundle()  # an analysis whose bundle was missing may have one now
        jobs = claim_jobs(
            self.database,
            self.name,
            self.config.jobs.lease_seconds,
            self.config.jobs.batch_size,
            analyses=set(self.runners),
        )
        self._database_works()  # said now, not after the batch's analysis
        if not jobs:
            return 0
        ids = {job.id for job in jobs}
        with self._held_lock:
            self._held |= ids
        try:
            self._say("busy", f"{len(jobs)} job(s)")
            for name, shadow in dict.fromkeys((job.analysis, job.shadow) for job in jobs):
                self._analyse(name, [j for j in jobs if (j.analysis, j.shadow) == (name, shadow)])
            self._say("ready", self._problems_text())
        finally:
            # Recorded, or abandoned by an error: either way no longer renewed.
            with self._held_lock:
                self._held -= ids
        return len(jobs)

    def _analyse(self, name: str, jobs: Sequence[ClaimedJob]) -> None:
        from mibi_node.analyses.registry import get_analysis

        analysis = get_analysis(name)
        runner = self._runner(name, jobs)
        if runner is None:
            return
        read: list[tuple[ClaimedJob, Any, float]] = []
        for job in jobs:
            started = time.perf_counter()
            try:
                if not job.paths:
                    raise UnusableStudyError(
                        "The study holds no images (only reports or other objects)."
                    )
                study = analysis.read([self.files.absolute(p) for p in job.paths], runner)
            except MissingPhaseError as exc:
                self._missing_phase(job, exc)
                continue
            except UnusableStudyError as exc:
                self._fail(job, str(exc), retry=False)
                continue
            except Exception as exc:
                self._fail(job, f"reading the study failed: {exc!r}", retry=True, trace=True)
                continue
            read.append((job, study, time.perf_counter() - started))
        if not read:
            return
        try:
            results = runner.predict([study for _, study, _ in read])
        except Exception:
            if len(read) > 1:  # find the study that breaks the batch: one by one
                for item in read:
                    self._predict_one(runner, *item)
                return
            job = read[0][0]
            self._fail(job, "the model failed on this study", retry=True, trace=True)
            return
        for (job, _study, seconds), result in zip(read, results, strict=True):
            self._finish(job, result, seconds)

    def _runner(self, name: str, jobs: Sequence[ClaimedJob]) -> Runner | None:
        """The runner of a batch of one analysis' jobs: its candidate for shadow jobs.

        Shadow jobs whose candidate is not loaded fail at once with the reason (the current
        jobs are not touched); ``None`` then.
        """
        if not jobs or not jobs[0].shadow:
            return self.runners[name]
        if name in self.candidates:
            return self.candidates[name]
        why = self.candidate_problems.get(name) or (
            f"{name} has no candidate bundle now (no shadow_bundle, or it was promoted)"
        )
        for job in jobs:
            self._fail(job, f"the candidate bundle is not loaded: {why}", retry=False)
        return None

    def _predict_one(self, runner: Runner, job: ClaimedJob, study: Any, seconds: float) -> None:
        try:
            (result,) = runner.predict([study])
        except UnusableStudyError as exc:
            self._fail(job, str(exc), retry=False)
            return
        except Exception:
            self._fail(job, "the model failed on this study", retry=True, trace=True)
            return
        self._finish(job, result, seconds)

    def _missing_phase(self, job: ClaimedJob, exc: MissingPhaseError) -> None:
        wait = self.config.max_wait_for(job.analysis)
        deadline = job.first_received_at + timedelta(seconds=wait)
        missing = " and ".join(exc.missing)
        if not job.partial and utcnow() < deadline and exc.found:
            reason = f"waiting for the {missing} phase (until {deadline:%Y-%m-%d %H:%M} UTC): {exc}"
            defer_job(self.database, self.name, job.id, deadline, reason)
            logger.info("job #%d: study waits for its %s phase", job.id, missing)
            return
        # The bundles of this version need every input channel, so a study that is still
        # incomplete when the wait is over cannot be analysed.
        waited = f" (waited {wait / 3600:g} h)" if exc.found else ""
        self._fail(job, f"{missing} phase never arrived{waited}: {exc}", retry=False)

    def _fail(self, job: ClaimedJob, error: str, *, retry: bool, trace: bool = False) -> None:
        details = traceback.format_exc() if trace else None
        if trace:
            logger.exception("job #%d: %s", job.id, error)
        state = fail_job(
            self.database,
            self.name,
            job.id,
            error,
            traceback=details,
            retry=retry,
            max_attempts=self.config.jobs.max_attempts,
        )
        logger.warning(
            "job #%d (attempt %d): %s -> %s",
            job.id,
            job.attempts,
            error if not trace else "error",
            state,
        )

    # -- results --------------------------------------------------------------------------

    def _finish(self, job: ClaimedJob, result: Any, read_seconds: float) -> None:
        started = time.perf_counter()
        try:
            files, sr = self._write_documents(job, result)
        except Exception:
            self._fail(job, "building the report failed", retry=True, trace=True)
            return
        timings = {
            "read": read_seconds,
            "denoise": result.timings.get("denoise", 0.0),
            # The runner's steps; a runner's own "total" of them is not a step.
            "inference": sum(v for k, v in result.timings.items() if k not in ("denoise", "total")),
            "sr": time.perf_counter() - started,
        }
        done = CompletedJob(
            result=result.to_dict(),
            timings=timings,
            bundle=f"{result.bundle_name} {result.bundle_version}",
            sr_path=files[0],
            sr_sop_instance_uid=str(sr.SOPInstanceUID),
            sr_series_instance_uid=str(sr.SeriesInstanceUID),
            files=tuple(files),
            destinations=()
            if job.shadow  # a candidate's result is kept, never sent
            else tuple(d.model_dump(mode="json") for d in self.config.dispatch.destinations),
            inputs=self._inputs(job),
        )
        deliveries = complete_job(self.database, self.name, job.id, done)
        logger.info(
            "job #%d done: %s (%.2f) in read %.2f s, denoise %.2f s, inference %.2f s, "
            "SR %.2f s (%s)",
            job.id,
            result.predicted,
            dict(getattr(result, "probabilities", {})).get(result.predicted, float("nan")),
            *timings.values(),
            f"{job.analysis}, shadow" if job.shadow else job.analysis,
        )
        if deliveries:
            deliver(
                self.database,
                self.results.root,
                self.config.dispatch,
                calling_ae_title=self.config.calling_ae_title,
                owner=self.name,
                delivery_ids=deliveries,
            )

    def _inputs(self, job: ClaimedJob) -> dict[str, Any] | None:
        """The summary of the job's images that input drift is measured on; ``None`` when it
        cannot be made, which never fails the job (:mod:`mibi_node.validation.drift`)."""
        from mibi_node.validation.drift import summarise_inputs

        try:
            return summarise_inputs([self.files.absolute(p) for p in job.paths])
        except Exception as exc:
            logger.warning("job #%d: no input summary for drift (%s)", job.id, type(exc).__name__)
            logger.debug("job #%d: input summary failed", job.id, exc_info=True)
            return None

    def _write_documents(self, job: ClaimedJob, result: Any) -> tuple[list[str], Dataset]:
        from mibi_node.analyses.base import EncodeContext
        from mibi_node.analyses.registry import get_analysis

        analysis = get_analysis(job.analysis)
        used = analysis.source_uids(result)
        sources = []
        for relative in job.paths:
            header = pydicom.dcmread(self.files.absolute(relative), stop_before_pixels=True)
            if str(header.SOPInstanceUID) in used:
                sources.append(header)
        predecessor = None
        if job.predecessor_sr_path:
            try:
                predecessor = pydicom.dcmread(
                    self.results.absolute(job.predecessor_sr_path), stop_before_pixels=True
                )
            except (OSError, ValueError) as exc:
                logger.warning("job #%d: the earlier SR cannot be read (%s)", job.id, exc)
        if self._device_uid is None:
            self._device_uid = device_uid(self.database, self.config.report.device_uid)
        report = self.config.report
        documents = analysis.encode(
            result,
            sources,
            EncodeContext(
                device_uid=self._device_uid,
                series_number=self.config.series_number_for(job.analysis),
                instance_number=job.version,
                series_instance_uid=job.sr_series_instance_uid or generate_uid(),
                predecessor=predecessor,
                institution_name=report.institution_name or None,
                key_image=self.config.key_image_for(job.analysis),
            ),
        )
        sr = documents[0]
        names = []
        for document in documents:
            relative = self.results.relative_path(
                job.study_instance_uid, str(document.SOPInstanceUID)
            )
            handle, temporary = tempfile.mkstemp(dir=self.results.incoming, suffix=".dcm")
            os.close(handle)
            document.file_meta = FileMetaDataset(getattr(document, "file_meta", Dataset()))
            document.file_meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
            document.file_meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
            document.save_as(temporary, enforce_file_format=True)
            self.results.place(Path(temporary), relative)
            names.append(relative)
        return names, sr


def _resolve(device: str) -> str:
    """``cuda`` (no index) picks a GPU by the worker's index given in MIBI_NODE_WORKER_INDEX."""
    if device != "cuda":
        return device
    import torch

    count = torch.cuda.device_count()
    if count == 0:
        return "cpu"
    return f"cuda:{int(os.environ.get('MIBI_NODE_WORKER_INDEX', '0')) % count}"


def _free_megabytes(device: str) -> float:
    """Memory free on ``device`` now, in MiB (GPU memory for a CUDA device)."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free / 2**20
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024
    except OSError:  # pragma: no cover - not Linux
        pass
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")) / 2**20


def _die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def worker_main(
    config: Config, device: str, index: int, parent: int | None = None, wake: Any = None
) -> None:
    """Body of a worker process (``mibi-node worker`` or one that ``serve`` started).

    ``wake`` is the node's event that its sweeps set when they queue jobs (a worker that
    ``serve`` started); a standalone worker polls.
    """
    from mibi_node.logs import configure_logging

    if parent is not None:
        _die_with_parent()
    configure_logging(config.logging.level)
    os.environ["MIBI_NODE_WORKER_INDEX"] = str(index)
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        if stopping:  # a second signal: stop at once; the lease expires, the job is retried
            os._exit(128 + signum)
        stopping.append(signum)  # a handler only sets a flag (no locks)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    # Only a worker that is a unit's main process talks to systemd: one that `serve`
    # started inherited the node's NOTIFY_SOCKET, and systemd would ignore it (and log).
    notifier = Notifier.from_environment() if parent is None else None
    worker = Worker(config, device=device, notifier=notifier, wake=wake)
    logger.info("worker %s started on %s", worker.name, device)

    def _should_stop() -> bool:
        return bool(stopping) or (parent is not None and os.getppid() != parent)

    worker.run(_should_stop)
    logger.info("worker %s stopped", worker.name)
