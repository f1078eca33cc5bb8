"""Atomic, durable placement of received files under paths built from hashes of their UIDs.

A UID can hold anything a sender puts in it, so no UID ever becomes part of a path: the
path is ``<2 hex>/<study hash>/<instance hash>.dcm``. A file is first complete and fsynced
under ``.incoming/`` on the same filesystem, then renamed into place and its folder fsynced,
so a crash leaves either the whole old file, the whole new one, or nothing.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

__all__ = ["FileStore", "sha256_file"]

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore:
    """The folder that holds every received instance.

    Parameters
    ----------
    root
        Folder of the store; created when missing, with ``.incoming/`` for partial files.
    incoming
        Store-relative folder of this process's partial files: receivers that share one
        store each have their own (``.incoming/<host>-<port>``), so that one starting up
        removes only what it left behind itself.
    """

    def __init__(self, root: Path, incoming: str = ".incoming") -> None:
        self.root = Path(root).resolve()
        self.incoming = self.root / incoming
        self.incoming.mkdir(parents=True, exist_ok=True)

    def relative_path(self, study_instance_uid: str, sop_instance_uid: str) -> str:
        """The store-relative path of an instance, built from hashes of its UIDs."""
        study = _uid_hash(study_instance_uid)
        return f"{study[:2]}/{study[:32]}/{_uid_hash(sop_instance_uid)[:40]}.dcm"

    def absolute(self, relative: str) -> Path:
        """Absolute path of a store-relative path; refuses anything outside the store."""
        path = (self.root / relative).resolve()
        if self.root not in path.parents:
            raise ValueError(f"path {relative!r} is outside the store")
        return path

    def place(self, source: Path, relative: str) -> Path:
        """Make ``source`` durable and atomically move it to ``relative``.

        ``source`` must be on the store's filesystem (the ``.incoming`` folder): it is
        fsynced, renamed over any previous file at ``relative``, and the folder is fsynced.
        """
        target = self.absolute(relative)
        with open(source, "rb+") as handle:
            os.fsync(handle.fileno())
        folder = target.parent
        if not folder.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            _fsync_dir(folder.parent)
            _fsync_dir(folder.parent.parent)
        os.replace(source, target)
        _fsync_dir(folder)
        return target

    def remove(self, relative: str) -> None:
        """Delete a stored file if it is there."""
        self.absolute(relative).unlink(missing_ok=True)

    def clean_incoming(self) -> int:
        """Delete partial files left by a crash (never acknowledged); return how many."""
        removed = 0
        for entry in self.incoming.iterdir():
            try:
                if entry.is_dir():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
                removed += 1
            except OSError as exc:  # pragma: no cover - best effort
                logger.warning("could not remove partial file %s: %s", entry.name, exc)
        return removed

    def free_mb(self) -> float:
        """Free space on the store's filesystem, in MiB."""
        return shutil.disk_usage(self.root).free / (1 << 20)
