"""A small client of systemd's service notification protocol (``sd_notify(3)``).

Under ``Type=notify`` systemd calls the service started only when it says ``READY=1`` (for
the node: once the DICOM port listens), shows its ``STATUS=`` line in ``systemctl status``,
restarts it when its ``WATCHDOG=1`` pings stop for ``WatchdogSec``, and learns from
``STOPPING=1`` that it is shutting down. Each message is one datagram of ``KEY=VALUE`` lines
on the ``AF_UNIX`` socket that systemd names in ``NOTIFY_SOCKET``.

Only the standard library is used (no libsystemd binding to install), and nothing here ever
raises: a notification that cannot be sent is logged, and the node goes on. Without
``NOTIFY_SOCKET`` (started by hand, by the tests, or by ``mibi-node serve`` as a child) every
call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

__all__ = ["Notifier"]

logger = logging.getLogger(__name__)


class Notifier:
    """Sends service notifications to systemd, or nothing when not started by it.

    Parameters
    ----------
    address
        The notification socket: a path, or ``@name`` for an abstract socket. ``None``
        turns every message into a no-op.
    watchdog_usec
        The unit's ``WatchdogSec`` in microseconds (``WATCHDOG_USEC``); ``None`` or 0 when
        the unit has no watchdog.
    """

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        if address is not None and not isinstance(address, str):
            raise TypeError('Argument "address" should be a str or None.')
        if address is not None and not address.startswith(("/", "@")):
            # systemd >= 254 can also hand out vsock: addresses (virtual machines); a node
            # never runs with one, so say so once instead of failing.
            logger.warning("NOTIFY_SOCKET %r is not a unix socket; not notifying systemd", address)
            address = None
        if watchdog_usec is not None and watchdog_usec < 0:
            raise ValueError('Argument "watchdog_usec" should be zero or positive.')
        self._address = address
        self._watchdog_usec = watchdog_usec or None
        self._failed = False

    @classmethod
    def from_environment(
        cls, environ: Mapping[str, str] | None = None, pid: int | None = None
    ) -> Notifier:
        """The notifier systemd set up for this process (``NOTIFY_SOCKET``, ``WATCHDOG_USEC``).

        ``WATCHDOG_PID``, when set, names the one process the watchdog is meant for;
        any other process (a child that inherited the environment) gets no watchdog.
        """
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET") or None
        watchdog: int | None = None
        owner = env.get("WATCHDOG_PID", "")
        if env.get("WATCHDOG_USEC") and (not owner or owner == str(pid or os.getpid())):
            try:
                watchdog = int(env["WATCHDOG_USEC"])
            except ValueError:
                logger.warning(
                    "WATCHDOG_USEC=%r is not a number; no watchdog", env["WATCHDOG_USEC"]
                )
            else:
                watchdog = watchdog if watchdog > 0 else None
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere."""
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec``); ``None`` without one."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2_000_000

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; ``False`` when nothing was sent."""
        if self._address is None or not assignments:
            return False
        # One message is newline-separated assignments: a value must not hold a newline.
        lines = [" ".join(a.splitlines()) for a in assignments]
        address = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto("\n".join(lines).encode("utf-8", "replace"), address)
        except OSError as exc:
            # The first failure is worth a warning (systemd may restart us for a missed
            # READY or watchdog); repeating it every ping would flood the journal.
            log = logger.debug if self._failed else logger.warning
            log("cannot notify systemd at %s: %s", self._address, exc)
            self._failed = True
            return False
        return True

    def ready(self, status: str = "") -> bool:
        """``READY=1``: start-up is finished (systemd now starts what is ordered after us)."""
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        """``STATUS=``: one line for ``systemctl status``."""
        return self.notify(f"STATUS={text}")

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: still alive (only sent when the unit has ``WatchdogSec``)."""
        if self.watchdog_interval is None:
            return False
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        """``STOPPING=1``: the service is shutting down."""
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))
