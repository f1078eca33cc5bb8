"""The project's exception hierarchy: every error mibi-node raises on purpose is one of these."""

__all__ = [
    "ConfigError",
    "MibiNodeError",
    "StorageError",
    "UnusableStudyError",
    "BundleError",
]


class MibiNodeError(Exception):
    """Base class of every error that mibi-node raises deliberately."""


class ConfigError(MibiNodeError):
    """The configuration file is missing, unreadable or has an invalid key."""


class StorageError(MibiNodeError):
    """An instance could not be stored durably."""


class UnusableStudyError(MibiNodeError):
    """A study cannot be turned into model input; the message is meant for a technologist."""


class BundleError(MibiNodeError):
    """A model bundle is missing, corrupt or inconsistent."""
