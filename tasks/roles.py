"""The column roles a run asks ingest for: one typed object, built once.

The flow builds it from the config's data section and hands it to whichever
ingest path runs (one process, or one task per file); each passes it on as
the keyword arguments :func:`tasks.ingest.ingest` and
:func:`tasks.ingest.parts.ingest_file` take.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class IngestRoles:
    """Requested roles; ``None`` means "infer" (keys, features) or "none"."""

    keys: list[str] | None = None
    features: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    label: str | None = None
    rules: list[str] = field(default_factory=list)

    @property
    def keyless(self) -> bool:
        """Explicitly no keys: row ids then count identical rows across files,
        which only one process can do."""
        return self.keys == []

    def as_kwargs(self) -> dict[str, Any]:
        """The roles as ingest's keyword arguments (fresh lists: ingest may keep
        them)."""
        return {
            "keys": None if self.keys is None else list(self.keys),
            "features": None if self.features is None else list(self.features),
            "exclude": list(self.exclude),
            "label": self.label,
            "rules": list(self.rules),
        }
