"""Log set-up for the command line: one line per event, no patient data at INFO."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging"]


def configure_logging(level: str = "INFO") -> None:
    """Send mibi-node's logs to stderr (the journal under systemd) at ``level``."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG, including patient attributes: keep it quiet.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else "INFO")
    logging.getLogger("apscheduler").setLevel(logging.WARNING)
    scheduler = logging.getLogger("apscheduler.scheduler")
    scheduler.filters[:] = [] if level == "DEBUG" else [_not_overrunning_sweeps]
    # highdicom names the source datasets' UIDs at INFO when it copies patient attributes.
    logging.getLogger("highdicom").setLevel(logging.WARNING if level != "DEBUG" else "DEBUG")


def _not_overrunning_sweeps(record: logging.LogRecord) -> bool:
    """Drop apscheduler's "skipped: maximum number of running instances reached" warnings.

    A sweep that takes longer than its interval (at start-up, while the worker imports
    torch on a small machine; a large retention sweep) skips its next run: that is how the
    sweeps are meant to work (one at a time, coalesced), not a fault. A sweep that hangs is
    caught by the systemd watchdog, not by these lines. Shown at DEBUG.
    """
    return "maximum number of running instances reached" not in record.getMessage()
