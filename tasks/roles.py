"""What a run asks ingest for: the column roles plus the domain rules.

One typed object, built once from the config's data section
(:meth:`flows.config.PipelineConfig.ingest_roles`) and handed to whichever
ingest path runs (one process, or one task per file). The roles themselves are
:class:`models.schema.Roles`, the object ingest takes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.schema import Roles


@dataclass(frozen=True)
class IngestRoles:
    """Requested roles (``None`` keys or features mean "infer") and rules."""

    roles: Roles = field(default_factory=Roles)
    rules: tuple[str, ...] = ()

    @property
    def keyless(self) -> bool:
        """Explicitly no keys: row ids then count identical rows across files,
        which only one process can do."""
        return self.roles.keys == ()

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments :func:`tasks.ingest.ingest` and
        :func:`tasks.ingest.parts.ingest_file` take."""
        return {"roles": self.roles, "rules": list(self.rules)}
