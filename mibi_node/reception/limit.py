"""``reception.max_associations`` for the node as a whole, whichever acceptor takes a peer.

The kernel hands each new connection to whichever acceptor process calls ``accept()``
first, so connections are not spread evenly: a per-process share of the limit would refuse
peers while the node as a whole is below it. Instead every acceptor counts its open
associations in one slot of a shared-memory array (made before the acceptors are forked),
and the limit applies to the sum. Changes are serialised by an ``flock``, which the kernel
releases when its holder dies, so a killed acceptor can never leave the others waiting;
the parent clears the slot of an acceptor it replaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import multiprocessing
import threading
from collections.abc import Iterator
from pathlib import Path

__all__ = ["AssociationLimit"]


class AssociationLimit:
    """The node-wide association count and its limit.

    Parameters
    ----------
    maximum
        Associations open at once on the whole node.
    acceptors
        Number of acceptor processes (one counter each).
    lock_path
        File whose ``flock`` serialises changes across the processes.
    """

    def __init__(self, maximum: int, acceptors: int, lock_path: Path) -> None:
        if maximum < 1:
            raise ValueError('Argument "maximum" should be a positive integer.')
        if acceptors < 1:
            raise ValueError('Argument "acceptors" should be a positive integer.')
        self.maximum = maximum
        self.lock_path = Path(lock_path)
        self._counts = multiprocessing.RawArray(ctypes.c_int, acceptors)
        self._thread_lock = threading.Lock()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._thread_lock, open(self.lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            yield  # closing the file releases the lock

    def acquire(self, acceptor: int) -> bool:
        """Count one more association for ``acceptor``; ``False`` when the node is full."""
        with self._locked():
            if sum(self._counts) >= self.maximum:
                return False
            self._counts[acceptor] += 1
            return True

    def release(self, acceptor: int) -> None:
        """An association of ``acceptor`` ended."""
        with self._locked():
            if self._counts[acceptor] > 0:
                self._counts[acceptor] -= 1

    def reset(self, acceptor: int) -> None:
        """Forget the associations of an acceptor that died (they died with it)."""
        with self._locked():
            self._counts[acceptor] = 0

    def in_use(self) -> int:
        """Associations open right now on the whole node."""
        return sum(self._counts)
