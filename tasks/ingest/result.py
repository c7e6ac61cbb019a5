"""What an ingestion reports: :class:`IngestResult` and its column facts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from models.schema import TableSchema
from tasks.ingest.problems import show


@dataclass(frozen=True)
class ColumnFact:
    """A non-key column that is entirely missing or constant over all rows.

    Structured (not only a warning's text) because the partitioned ingest
    recomputes these over all files and must drop each file's own.
    """

    column: str
    fact: Literal["missing", "constant"]
    value: Any = None  # the constant value

    def warning(self) -> str:
        if self.fact == "missing":
            return f"column {show(self.column)} is entirely missing"
        return f"column {show(self.column)} is constant ({show(self.value)})"


@dataclass
class IngestResult:
    """What :func:`tasks.ingest.ingest` did; small (see :meth:`to_dict`)."""

    ingested_dir: str
    rejected_dir: str
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int]  # reason category -> rows (a row may count twice)
    #: Every warning, in order; the column facts' warnings last.
    warnings: list[str]
    schema: TableSchema
    source_files: list[str]
    #: False: ``ingested_dir`` and ``rejected_dir`` are sealed staged
    #: directories, waiting for the run date's commit.
    published: bool = True
    column_facts: list[ColumnFact] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["schema"] = self.schema.to_dict()
        return out


class ColumnStats:
    """Counts each column's values and whether it varies, block by block."""

    def __init__(self) -> None:
        self._stats: dict[str, list[Any]] = {}  # name -> [count, first, varied]

    def update(self, name: str, arr: pa.Array) -> None:
        st = self._stats.setdefault(name, [0, None, False])
        count = len(arr) - arr.null_count
        st[0] += count
        if not count or st[2]:
            return  # nothing new, or already known to vary: no more work
        if st[1] is None:
            st[1] = pc.first(arr, skip_nulls=True)
        st[2] = not pc.all(pc.equal(arr, st[1])).as_py()

    def facts(self, schema: TableSchema) -> list[ColumnFact]:
        """Non-key columns with no value, or one value, over every row seen."""
        out = []
        for c in schema.columns:
            if c.role == "key":
                continue
            count, first, varied = self._stats.get(c.name, [0, None, False])
            if count == 0:
                out.append(ColumnFact(c.name, "missing"))
            elif not varied:
                out.append(ColumnFact(c.name, "constant", first.as_py()))
        return out
