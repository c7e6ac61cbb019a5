"""The one exception family meant for users.

A :class:`LatentflowError` carries a one-line message naming the file, column or
row and what was expected. The CLI prints it without a traceback; any other
exception is a bug and may show one.
"""

from __future__ import annotations


class LatentflowError(Exception):
    """A user-facing failure with a one-line message."""

    def __init__(self, message: str) -> None:
        # Messages are shown as one line; fold anything multi-line a caller passed.
        super().__init__(" ".join(str(message).split()))


class InputError(LatentflowError):
    """The input file or its contents are not what was expected."""


class ConfigError(LatentflowError):
    """The run configuration is invalid."""


class SchemaError(LatentflowError):
    """Data and model schemas do not match."""


class RegistryError(LatentflowError):
    """The model registry could not be reached or refused a request."""


class AlreadyRunningError(LatentflowError):
    """Another run holds the lock for this dataset and run date."""


class UnsafePathError(ConfigError):
    """A path the run would write, rename or delete leaves the data dir.

    Raised for a symbolic link inside the data dir on such a path: a run never
    follows one out of the data dir, nor deletes through one.
    """
