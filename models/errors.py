"""The base of the user-facing exception family, importable by ``models/``.

:mod:`tasks.errors` re-exports these and adds the rest of the family; they are
defined here because the typed schema (:mod:`models.schema`), which every layer
imports, raises :class:`SchemaError`, and ``models/`` never imports ``tasks/``.
"""

from __future__ import annotations


class LatentflowError(Exception):
    """A user-facing failure with a one-line message."""

    def __init__(self, message: str) -> None:
        # Messages are shown as one line; fold anything multi-line a caller passed.
        super().__init__(" ".join(str(message).split()))


class SchemaError(LatentflowError):
    """Data and model schemas do not match."""
