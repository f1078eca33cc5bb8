"""The running node: reception, the assembly sweep, dispatch and the analysis workers.

This module and ``cli`` are the only ones that know every stage. A node starts from the
database: partial files of a crash are removed, and every committed state is resumed.

Reception runs in ``reception.acceptors`` processes that share one listening socket (bound
here, before they are forked): pynetdicom holds one process to about one core, so parallel
associations scale only across processes. Each acceptor commits every instance itself
before it answers Success; the parent runs the scheduler and restarts an acceptor that dies.

The scheduler's sweeps mark quiet studies stable, route them (MIBI studies get a job, the
others are IGNORED), return jobs whose worker stopped to the queue, send due deliveries, and
ask the PACS to commit delivered ones where the destination asks for storage commitment.
The ``workers.count`` analysis workers are *spawned* (fresh interpreters, never forked from
this process), so that torch, a crashing decoder or the OOM killer stay out of reception;
the parent restarts a worker that dies.

Under systemd (``Type=notify``, ``systemd/mibi-node.service``) the node says READY once its
port listens, pings the watchdog while the assembly sweep keeps finishing, and says STOPPING
when it stops (``mibi_node.systemd``; no-ops when not started by systemd).
"""

from __future__ import annotations

import ctypes
import logging
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event
from types import FrameType
from typing import TYPE_CHECKING, Any

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy.exc import OperationalError

from mibi_node.assembly.routing import route_stable_studies
from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.config import Config
from mibi_node.dispatch.commitment import commit_deliveries
from mibi_node.dispatch.deliveries import deliver
from mibi_node.errors import MibiNodeError
from mibi_node.jobs.queue import release_expired_jobs
from mibi_node.reception.limit import AssociationLimit
from mibi_node.reception.scp import StorageSCP, bind_listener, server_ssl_context
from mibi_node.retention import sweep_retention
from mibi_node.storage.database import Database, Outage, database_problem, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore
from mibi_node.systemd import Notifier

if TYPE_CHECKING:
    from mibi_node.reception.stow_server import StowServer
    from mibi_node.web import WebServer

__all__ = ["Node"]

logger = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
_BIND_RETRY_SECONDS = 15.0


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this process when its parent dies (best effort)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass


def _acceptor_main(
    config: Config, listener: socket.socket, index: int, parent: int, limit: AssociationLimit
) -> None:
    """Body of one acceptor process: serve C-ECHO/C-STORE on the shared socket until told."""
    _die_with_parent()
    # A signal handler must not take locks (threading.Event.set does: a second signal
    # arriving inside it deadlocks), so it only flips a flag that the loop polls.
    stopping: list[int] = []

    def _on_signal(signum: int, _frame: FrameType | None) -> None:
        stopping.append(signum)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    database = Database(config.database_url)
    store = InstanceStore(database, FileStore(config.store_dir, config.incoming_name))
    scp = StorageSCP(config, store, listener, limit=limit, acceptor=index)
    scp.start()
    while not stopping and os.getppid() == parent:  # ppid changes if the parent died
        time.sleep(0.2)
    scp.stop()
    database.dispose()
    logger.debug("acceptor %d stopped", index)


class Node:
    """One mibi-node: the parent process and its acceptor processes.

    Parameters
    ----------
    config
        The resolved configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self.files = FileStore(config.store_dir, config.incoming_name)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self.database: Database | None = None
        self.listener: socket.socket | None = None
        self.scp: StorageSCP | None = None
        self.limit: AssociationLimit | None = None
        self._acceptors: list[BaseProcess] = []
        self._workers: list[BaseProcess] = []
        # Set by a sweep that queued jobs: the workers this node started wait on it between
        # polls, so a job starts at once instead of up to ``workers.poll_seconds`` later.
        # Made only with the first worker: a spawn-context Event starts multiprocessing's
        # resource tracker, a child process a node without workers has no use for.
        self._wake: Event | None = None
        self.results = FileStore(config.results_dir)
        self._stop_signal: int | None = None
        self._stopping = False
        # systemd (Type=notify): READY=1 once the port listens, WATCHDOG=1 while the
        # assembly sweep keeps running, STOPPING=1 at stop; no-ops without NOTIFY_SOCKET.
        self.notifier = Notifier.from_environment()
        self._sweep_finished_at = time.monotonic()
        self._next_watchdog_ping = 0.0
        self.web: WebServer | None = None
        #: The STOW-RS listener (``reception.dicomweb``), beside the DICOM port.
        self.stow: StowServer | None = None
        #: Each scheduled step's failures, for logging them once (see :meth:`_step`).
        self._outages: dict[str, Outage] = {}

    # -- life cycle -----------------------------------------------------------------------

    def start(self) -> None:
        """Recover from any crash, bind the port, start acceptors and the sweep."""
        self.config.node.data_dir.mkdir(parents=True, exist_ok=True)
        removed = self.files.clean_incoming()
        if removed:
            logger.info("removed %d partial file(s) left by an earlier stop", removed)
        # Create the schema of an empty database once, before any acceptor opens it; an
        # outdated one stops the node here, with the command to run (mibi-node db upgrade).
        open_database(self.config.database_url).dispose()
        # One association limit for the whole node, in memory the acceptors share.
        self.limit = AssociationLimit(
            self.config.reception.max_associations,
            self.config.reception.acceptors,
            self.config.node.data_dir / "associations.lock",
        )
        # Load the TLS certificates once here: a bad file stops the start with its reason.
        server_ssl_context(self.config.reception.tls)
        if self.config.reception.dicomweb.enabled:
            server_ssl_context(self.config.reception.dicomweb.tls)
        self.listener = self._bind()
        count = self.config.reception.acceptors
        if count == 1:
            self.database = Database(self.config.database_url)
            self.scp = StorageSCP(
                self.config,
                InstanceStore(self.database, self.files),
                self.listener,
                limit=self.limit,
            )
            self.scp.start()
        else:
            # Fork before this process starts any thread or opens a connection.
            self._acceptors = [self._spawn(index) for index in range(count)]
            self.database = Database(self.config.database_url)
        if self.config.reception.dicomweb.enabled:
            self._start_stow()
        node = self.config.node
        logger.info(
            "listening as %s on %s:%d with %d acceptor process(es)%s",
            node.ae_title,
            node.host,
            self.port,
            count,
            " (TLS)" if self.config.reception.tls.enabled else "",
        )
        if not self.config.reception.allowed_peers:
            logger.warning("reception.allowed_peers is empty: any calling AE title may send")
        self.scheduler.add_job(
            self._sweep,
            "interval",
            seconds=self.config.assembly.sweep_seconds,
            id="assembly-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(
            self._dispatch,
            "interval",
            seconds=self.config.assembly.sweep_seconds,
            id="dispatch-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.add_job(
            self._commit,
            "interval",
            seconds=self.config.assembly.sweep_seconds,
            id="commitment-sweep",
            max_instances=1,
            coalesce=True,
        )
        if self.config.retention.days > 0:
            self.scheduler.add_job(
                self._retention,
                "interval",
                seconds=self.config.retention.sweep_seconds,
                id="retention-sweep",
                max_instances=1,
                coalesce=True,
                next_run_time=datetime.now(UTC) + timedelta(seconds=30),
            )
        self._workers = [self._spawn_worker(index) for index in range(self.config.workers.count)]
        if self._workers:
            logger.info(
                "started %d worker process(es) on %s with bundle %s",
                len(self._workers),
                self.config.workers.device,
                self.config.workers.bundle,
            )
        else:
            logger.info("workers.count is 0: run `mibi-node worker` to analyse studies")
        if not self.config.dispatch.destinations:
            logger.warning("no dispatch destination: results are kept but sent nowhere")
        self._sweep_finished_at = time.monotonic()
        self.scheduler.start()
        if self.config.web.enabled:
            self._start_web()
        self.notifier.ready(
            f"listening as {node.ae_title} on {node.host}:{self.port}; "
            f"{count} acceptor(s), {len(self._workers)} worker(s)"
        )

    def _start_web(self) -> None:
        """Serve the status page; a port in use is logged, the DICOM node runs on without it."""
        from mibi_node.web import WebServer

        if self.database is None:
            return
        web = WebServer(self.config, self.database, self._is_listening)
        try:
            web.start()
        except MibiNodeError as exc:
            logger.error("%s; the node runs without its status page", exc)
            return
        self.web = web

    def _start_stow(self) -> None:
        """Serve STOW-RS; a port in use stops the node like its DICOM port would."""
        from mibi_node.reception.stow_server import StowServer

        if self.database is None:  # pragma: no cover - made just before
            return
        stow = StowServer(self.config, InstanceStore(self.database, self.files))
        try:
            stow.start()
        except MibiNodeError:
            self.stop()  # the acceptors are running already
            raise
        self.stow = stow

    def _is_listening(self) -> bool:
        """Whether associations are accepted now (``/readyz`` asks from the web thread)."""
        if self._stopping or self.listener is None:
            return False
        return self.scp is not None or any(p.is_alive() for p in self._acceptors)

    @property
    def port(self) -> int:
        """The TCP port the node listens on."""
        if self.listener is None:
            return self.config.node.port
        return int(self.listener.getsockname()[1])

    def _bind(self) -> socket.socket:
        host, port = self.config.node.host, self.config.node.port
        deadline = time.monotonic() + _BIND_RETRY_SECONDS
        while True:
            try:
                return bind_listener(host, port)
            except OSError as exc:
                if exc.errno != 98 or time.monotonic() > deadline:  # EADDRINUSE
                    raise
                logger.info("port %d still in use (a previous node stopping?); retrying", port)
                time.sleep(0.5)

    def _spawn(self, index: int) -> BaseProcess:
        context = multiprocessing.get_context("fork")
        process = context.Process(
            target=_acceptor_main,
            args=(self.config, self.listener, index, os.getpid(), self.limit),
            name=f"mibi-node-acceptor-{index}",
            daemon=False,
        )
        process.start()
        return process

    def _spawn_worker(self, index: int) -> BaseProcess:
        from mibi_node.inference.worker import worker_main

        context = multiprocessing.get_context("spawn")
        if self._wake is None:
            self._wake = context.Event()
        process = context.Process(
            target=worker_main,
            args=(self.config, self.config.workers.device, index, os.getpid(), self._wake),
            name=f"mibi-node-worker-{index}",
            daemon=False,
        )
        process.start()
        return process

    def _watch_children(self) -> None:
        for index, process in enumerate(self._acceptors):
            if not process.is_alive() and not self._stopping:
                logger.warning(
                    "acceptor %d exited with status %s; starting a new one", index, process.exitcode
                )
                if self.limit is not None:  # its associations died with it
                    self.limit.reset(index)
                self._acceptors[index] = self._spawn(index)
        for index, process in enumerate(self._workers):
            if not process.is_alive() and not self._stopping:
                logger.warning(
                    "worker %d exited with status %s; starting a new one", index, process.exitcode
                )
                self._workers[index] = self._spawn_worker(index)

    def _sweep(self) -> None:
        if self.database is None:
            return
        database, config = self.database, self.config
        try:
            # Each step on its own: one that fails (a damaged row, a lost database
            # connection) does not keep the others from running.
            self._step(
                "stability sweep", mark_stable_studies, database, config.assembly.quiet_seconds
            )
            routed = self._step(
                "routing sweep",
                route_stable_studies,
                database,
                self.files,
                config.selections(),
                config.analysis_labels(),
                config,
            )
            released = self._step(
                "lease sweep", release_expired_jobs, database, config.jobs.max_attempts
            )
            if (routed or released) and self._wake is not None:
                self._wake.set()
        finally:
            self._sweep_finished_at = time.monotonic()

    def _dispatch(self) -> None:
        if self.database is None:
            return
        self._step(
            "dispatch sweep",
            deliver,
            self.database,
            self.results.root,
            self.config.dispatch,
            calling_ae_title=self.config.calling_ae_title,
            owner=f"dispatch-{os.getpid()}",
        )

    def _commit(self) -> None:
        if self.database is None:
            return
        self._step(
            "commitment sweep",
            commit_deliveries,
            self.database,
            self.results.root,
            self.config.dispatch,
            calling_ae_title=self.config.calling_ae_title,
        )

    def _retention(self) -> None:
        if self.database is None:
            return
        self._step(
            "retention sweep", sweep_retention, self.database, self.files, self.config.retention
        )

    def _step(self, name: str, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run one scheduled step; a failure is logged and the step runs again on schedule.

        Returns what the step returned, None when it failed.

        A database error (PostgreSQL stopped, the network to it cut, SQLite's disk failing)
        is one line, not a traceback, when it starts and then at most once a minute (see
        :class:`~mibi_node.storage.database.Outage`): a sweep every second would otherwise
        fill the journal with the same outage. When the step works again, that is logged.
        """
        outage = self._outages.setdefault(name, Outage())
        result = None
        try:
            result = function(*args, **kwargs)
        except OperationalError as exc:
            if outage.failed():
                logger.error(
                    "%s: database error%s, retried on schedule: %s",
                    name,
                    outage.lasting(),
                    database_problem(exc),
                )
        except Exception:
            if outage.failed():
                logger.exception("%s failed%s; it runs again on schedule", name, outage.lasting())
        else:
            if outage.recovered():
                logger.warning("%s works again", name)
        return result

    def _ping_watchdog(self) -> None:
        """Send WATCHDOG=1 every half ``WatchdogSec`` while the assembly sweep keeps running.

        A sweep that has not finished for two ``WatchdogSec`` (a deadlock, a hung disk)
        withholds the ping, and systemd restarts the node, which resumes from the database.
        """
        interval = self.notifier.watchdog_interval
        now = time.monotonic()
        if interval is None or now < self._next_watchdog_ping:
            return
        self._next_watchdog_ping = now + interval
        late = now - self._sweep_finished_at
        if late > max(4 * interval, 5 * self.config.assembly.sweep_seconds):
            logger.error("no assembly sweep finished for %.0f s: withholding the watchdog", late)
            return
        self.notifier.watchdog()

    def stop(self) -> None:
        """Stop accepting, let in-flight associations finish, stop the scheduler."""
        self._stopping = True
        self.notifier.stopping(
            "stopping: finishing the associations in progress and the workers' current batch"
        )
        for process in [*self._acceptors, *self._workers]:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        if self.scp is not None:
            self.scp.stop()
        for process in [*self._acceptors, *self._workers]:
            process.join(40)
            if process.is_alive():
                process.kill()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.stow is not None:  # requests in progress finish: each is stored or refused
            self.stow.stop()
            self.stow = None
        if self.web is not None:  # up until here: /readyz says "not accepting" while draining
            self.web.stop()
            self.web = None
        if self.scheduler.running:
            self.scheduler.shutdown(wait=True)
        if self.database is not None:
            self.database.dispose()
        logger.info("stopped")

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: ask :meth:`serve_forever` to return (only sets a flag)."""
        self._stop_signal = signum if signum is not None else 0

    def serve_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT, then stop cleanly."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        try:
            ticks = 0
            while self._stop_signal is None:
                time.sleep(0.2)
                ticks += 1
                if ticks % 5 == 0:
                    self._watch_children()
                self._ping_watchdog()
            if self._stop_signal:
                logger.info("received %s, stopping", signal.Signals(self._stop_signal).name)
        finally:
            self.stop()
