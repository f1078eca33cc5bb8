"""The running node: reception, the assembly sweep and (later) dispatch and workers.

This module and ``cli`` are the only ones that know every stage. A node starts from the
database: partial files of a crash are removed, and every committed state is resumed.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from apscheduler.schedulers.background import BackgroundScheduler

from mibi_node.assembly.stability import mark_stable_studies
from mibi_node.config import Config
from mibi_node.reception.scp import StorageSCP
from mibi_node.storage.database import open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceStore

__all__ = ["Node"]

logger = logging.getLogger(__name__)


class Node:
    """One mibi-node process.

    Parameters
    ----------
    config
        The resolved configuration.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        config.node.data_dir.mkdir(parents=True, exist_ok=True)
        self.database = open_database(config.database_url)
        self.files = FileStore(config.store_dir)
        self.store = InstanceStore(self.database, self.files)
        self.scp = StorageSCP(config, self.store)
        self.scheduler = BackgroundScheduler(timezone="UTC")
        self._stop = threading.Event()

    def start(self) -> None:
        """Recover from any crash, then start listening and sweeping."""
        removed = self.files.clean_incoming()
        if removed:
            logger.info("removed %d partial file(s) left by an earlier stop", removed)
        self.scheduler.add_job(
            self._sweep,
            "interval",
            seconds=self.config.assembly.sweep_seconds,
            id="assembly-sweep",
            max_instances=1,
            coalesce=True,
        )
        self.scheduler.start()
        self.scp.start()

    def _sweep(self) -> None:
        try:
            mark_stable_studies(self.database, self.config.assembly.quiet_seconds)
        except Exception:
            logger.exception("assembly sweep failed; it runs again on schedule")

    def stop(self) -> None:
        """Stop accepting associations, let in-flight ones finish, stop the scheduler."""
        self.scp.stop()
        self.scheduler.shutdown(wait=True)
        self.database.dispose()
        logger.info("stopped")

    def request_stop(self, signum: int | None = None, _frame: FrameType | None = None) -> None:
        """Signal handler: ask :meth:`serve_forever` to return."""
        if signum is not None:
            logger.info("received %s, stopping", signal.Signals(signum).name)
        self._stop.set()

    def serve_forever(self) -> None:
        """Start, run until SIGTERM/SIGINT, then stop cleanly."""
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()
