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
    # highdicom names the source datasets' UIDs at INFO when it copies patient attributes.
    logging.getLogger("highdicom").setLevel(logging.WARNING if level != "DEBUG" else "DEBUG")
