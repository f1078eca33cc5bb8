"""The project's exception hierarchy: every error mibi-node raises on purpose is one of these."""

__all__ = [
    "ConfigError",
    "MibiNodeError",
    "StorageError",
    "UnusableStudyError",
    "MissingPhaseError",
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


class MissingPhaseError(UnusableStudyError):
    """A study lacks a phase the model needs (often the delayed images, sent hours later).

    Attributes
    ----------
    missing
        The phases that could not be found, e.g. ``("delayed",)``.
    found
        The phases that were found.
    """

    def __init__(self, message: str, missing: tuple[str, ...], found: tuple[str, ...]) -> None:
        super().__init__(message)
        self.missing = missing
        self.found = found


class BundleError(MibiNodeError):
    """A model bundle is missing, corrupt or inconsistent."""
