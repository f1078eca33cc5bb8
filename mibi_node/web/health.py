"""Liveness and readiness: what ``/healthz`` and ``/readyz`` answer.

``/healthz`` says only that the process serves HTTP. ``/readyz`` says whether the node can do
its work now, with one check per condition and a sentence for each that fails:

* ``database``: a short write transaction succeeds (a row of the ``setting`` table is written
  and rolled back) within :data:`DATABASE_TIMEOUT` seconds;
* ``listener``: the DICOM listener accepts associations (the daemon says so);
* ``workers``: when workers are expected (``workers.count > 0``, or any worker row that did
  not stop cleanly), at least one reported within ``web.worker_stale_seconds`` and is ready or
  busy, not starting or waiting for a bundle;
* ``disk``: the store's filesystem has more than ``storage.min_free_mb`` free.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select

from mibi_node.config import Config
from mibi_node.storage.database import Database
from mibi_node.storage.models import Setting, WorkerStatus, utcnow
from mibi_node.web.reader import Reader

__all__ = ["DATABASE_TIMEOUT", "Check", "Readiness"]

logger = logging.getLogger(__name__)

#: Seconds the database write check may take before the node counts as not ready.
DATABASE_TIMEOUT = 5.0
#: Worker states in which a worker can analyse a study.
_WORKING_STATES = ("ready", "busy")


@dataclass(frozen=True)
class Check:
    """One readiness condition: its name, whether it holds, and why (a sentence)."""

    name: str
    ok: bool
    detail: str


class Readiness:
    """The checks behind ``/readyz``.

    Parameters
    ----------
    config
        The node's configuration (workers, web, storage).
    database
        The node's database (the write check uses it).
    is_listening
        Says whether the DICOM listener accepts associations.
    database_timeout
        Seconds the write check may take.
    reader
        Read-only sessions for the worker check (by default its own).
    """

    def __init__(
        self,
        config: Config,
        database: Database,
        is_listening: Callable[[], bool],
        database_timeout: float = DATABASE_TIMEOUT,
        reader: Reader | None = None,
    ) -> None:
        self.config = config
        self.database = database
        self.reader = reader or Reader(database)
        self.is_listening = is_listening
        self.database_timeout = database_timeout
        # One probe at a time: a hung disk must not pile up a thread per request.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mibi-web-readyz")
        self._probe: Future[None] | None = None
        self._lock = threading.Lock()

    def checks(self) -> list[Check]:
        """Run every check (the database one in a thread, with a time limit)."""
        return [self._database(), self._listener(), self._workers(), self._disk()]

    def close(self) -> None:
        """Stop the probe thread (a probe still running finishes in the background)."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # -- the checks -----------------------------------------------------------------------

    def _database(self) -> Check:
        with self._lock:
            if self._probe is None or self._probe.done():
                self._probe = self._executor.submit(self._write_probe)
            probe = self._probe
        try:
            probe.result(timeout=self.database_timeout)
        except FutureTimeout:
            return Check(
                "database",
                False,
                f"no write within {self.database_timeout:g} s (locked by another writer, or "
                "the disk does not answer)",
            )
        except Exception as exc:  # any database error: say which, in one line
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            return Check("database", False, f"cannot write: {type(exc).__name__}: {reason}")
        return Check("database", True, "a write transaction succeeded")

    def _write_probe(self) -> None:
        with self.database.write_lock():
            session = self.database.session()
            try:
                session.begin()
                session.merge(Setting(key="web.readyz", value=utcnow().isoformat()))
                session.flush()
            finally:
                session.rollback()
                session.close()

    def _listener(self) -> Check:
        node = self.config.node
        where = f"{node.ae_title} on port {node.port}"
        try:
            listening = bool(self.is_listening())
        except Exception as exc:
            return Check("listener", False, f"cannot tell whether {where} listens: {exc}")
        if listening:
            return Check("listener", True, f"the DICOM listener accepts associations ({where})")
        return Check(
            "listener", False, f"the DICOM listener does not accept associations ({where})"
        )

    def _workers(self) -> Check:
        stale = self.config.web.worker_stale_seconds
        count = self.config.workers.count
        cutoff = utcnow() - timedelta(seconds=stale)
        with self.reader.session() as session:
            rows = session.scalars(
                select(WorkerStatus).order_by(WorkerStatus.heartbeat_at.desc())
            ).all()
            workers = [(w.name, w.state, w.message, w.heartbeat_at) for w in rows]
        expected = count > 0 or any(state != "stopped" for _, state, _, _ in workers)
        if not expected:
            return Check("workers", True, "no worker expected (workers.count = 0, none running)")
        if not workers:
            return Check("workers", False, f"no worker has reported yet (workers.count = {count})")
        alive = [w for w in workers if w[1] != "stopped" and w[3] >= cutoff]
        working = [w for w in alive if w[1] in _WORKING_STATES]
        if working:
            names = ", ".join(name for name, *_ in working)
            return Check("workers", True, f"{len(working)} worker(s) alive: {names}")
        if alive:
            name, state, message, _ = alive[0]
            return Check("workers", False, f"{name} is {state}{': ' + message if message else ''}")
        name, state, _, heartbeat = workers[0]
        age = (utcnow() - heartbeat).total_seconds()
        return Check(
            "workers",
            False,
            f"no worker heartbeat in the last {stale:g} s (latest: {name}, {state}, "
            f"{age:.0f} s ago)",
        )

    def _disk(self) -> Check:
        folder = self.config.store_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        try:
            free_mb = shutil.disk_usage(folder).free / (1 << 20)
        except OSError as exc:
            return Check("disk", False, f"cannot read the free space of {folder}: {exc.strerror}")
        limit = self.config.storage.min_free_mb
        detail = f"{free_mb:.0f} MiB free under {folder} (storage.min_free_mb = {limit})"
        return Check("disk", free_mb > limit, detail)
