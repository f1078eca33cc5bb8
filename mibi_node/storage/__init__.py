"""Durable storage: the SQLAlchemy database and the atomic file store."""

from mibi_node.storage.database import Database, open_database
from mibi_node.storage.filestore import FileStore
from mibi_node.storage.instances import InstanceMeta, InstanceStore, StoreOutcome
from mibi_node.storage.models import Instance, Study, StudyState

__all__ = [
    "Database",
    "FileStore",
    "Instance",
    "InstanceMeta",
    "InstanceStore",
    "StoreOutcome",
    "Study",
    "StudyState",
    "open_database",
]
