"""The typed schema of an ingested table: one object every layer passes around.

Ingest infers it, decide compares it with the champion's, train picks the
feature columns from it, the saved bundle records it (as :meth:`to_dict`), and
the pyfunc types raw cells with it. It lives in ``models/`` because the model
needs it and ``models/`` imports nothing from ``tasks/``.

The column kinds and roles are defined here once; "which columns are
features" is :attr:`TableSchema.features` (and its per-kind variants), nowhere
else.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from models.errors import SchemaError

#: Kinds of column ingest types a cell as.
COLUMN_KINDS = ("numeric", "categorical", "date", "timestamp", "text")
#: What a column is for: ids, model input, the label, or kept but unused.
ROLES = ("key", "feature", "label", "excluded")
#: Feature kinds the preprocessor turns into model inputs.
FEATURE_KINDS = ("numeric", "categorical")
#: Roles whose columns a model needs in its input (the schema contract).
REQUIRED_ROLES = ("key", "feature")


@dataclass(frozen=True)
class ColumnSpec:
    """One column: its name, kind and role in the model."""

    name: str
    kind: str  # one of COLUMN_KINDS
    role: str  # one of ROLES

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"column name {self.name!r} is not a non-empty string")
        if self.kind not in COLUMN_KINDS:
            raise SchemaError(
                f"column {self.name!r}: kind {self.kind!r} is not one of {COLUMN_KINDS}"
            )
        if self.role not in ROLES:
            raise SchemaError(
                f"column {self.name!r}: role {self.role!r} is not one of {ROLES}"
            )

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return {"name": self.name, "kind": self.kind, "role": self.role}

    @classmethod
    def from_dict(cls, d: Any) -> ColumnSpec:
        """Inverse of :meth:`to_dict`; a malformed entry raises SchemaError."""
        if not isinstance(d, dict) or not {"name", "kind", "role"} <= d.keys():
            raise SchemaError(f"schema column {d!r} needs 'name', 'kind' and 'role'")
        return cls(name=d["name"], kind=d["kind"], role=d["role"])


@dataclass(frozen=True)
class TableSchema:
    """The typed columns of an ingested table, in file order."""

    columns: tuple[ColumnSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        seen = Counter(c.name for c in self.columns)
        dups = sorted(n for n, k in seen.items() if k > 1)
        if dups:
            raise SchemaError(f"schema has duplicated columns: {', '.join(dups)}")
        labels = [c.name for c in self.columns if c.role == "label"]
        if len(labels) > 1:
            raise SchemaError(f"schema has more than one label: {', '.join(labels)}")

    def with_role(self, *roles: str) -> list[str]:
        """Names of the columns with any of ``roles``, in file order."""
        return [c.name for c in self.columns if c.role in roles]

    def features_of_kind(self, kinds: Iterable[str]) -> list[str]:
        """Feature columns of the given kinds, in file order."""
        wanted = set(kinds)
        return [
            c.name for c in self.columns if c.role == "feature" and c.kind in wanted
        ]

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def keys(self) -> list[str]:
        return self.with_role("key")

    @property
    def features(self) -> list[str]:
        return self.with_role("feature")

    @property
    def numeric_features(self) -> list[str]:
        return self.features_of_kind(["numeric"])

    @property
    def categorical_features(self) -> list[str]:
        return self.features_of_kind(["categorical"])

    @property
    def label(self) -> str | None:
        labels = self.with_role("label")
        return labels[0] if labels else None

    def required(self) -> dict[str, str]:
        """Name -> kind of the columns a model fitted on this schema needs."""
        return {c.name: c.kind for c in self.columns if c.role in REQUIRED_ROLES}

    def column(self, name: str) -> ColumnSpec:
        """The spec of ``name`` (KeyError if absent)."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"columns": [{"name", "kind", "role"}, ...]}``."""
        return {"columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, d: Any) -> TableSchema:
        """Inverse of :meth:`to_dict`; a malformed dict raises SchemaError."""
        if not isinstance(d, dict) or not isinstance(d.get("columns"), list):
            raise SchemaError("a schema must be a dict with a 'columns' list")
        return cls(tuple(ColumnSpec.from_dict(c) for c in d["columns"]))

    @classmethod
    def coerce(cls, schema: TableSchema | Mapping[str, Any]) -> TableSchema:
        """``schema`` itself, or parsed from its JSON form (a saved bundle's)."""
        if isinstance(schema, TableSchema):
            return schema
        return cls.from_dict(dict(schema))


@dataclass(frozen=True)
class Roles:
    """The roles a user asked for; what they leave open is inferred.

    ``keys=None`` infers keys, ``[]`` means none; ``features=None`` means every
    column that is not a key, the label, excluded, free text or a date.
    """

    keys: tuple[str, ...] | None = None
    features: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    label: str | None = None

    @classmethod
    def of(
        cls,
        keys: Iterable[str] | str | None = None,
        features: Iterable[str] | str | None = None,
        exclude: Iterable[str] | str | None = (),
        label: str | None = None,
    ) -> Roles:
        """From user arguments: a lone string is one name, not its characters."""
        return cls(
            keys=_names(keys),
            features=_names(features),
            exclude=_names(exclude) or (),
            label=label,
        )


def _names(value: Iterable[str] | str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(value)
