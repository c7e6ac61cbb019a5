"""Parquet input: record batches, every column cast to text.

Typed Parquet columns go through the same text path as CSV cells, so ids and
checks agree whatever the format. ``_row_number`` of a rejected row is its
1-based row index.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.errors import InputError, LatentflowError
from tasks.ingest.problems import first_line
from tasks.ingest.sources import Chunk, Hints, clean_names


class ParquetSource:
    """A Parquet file, read as record batches with every column cast to text."""

    no_rows = "no rows"
    decimal_comma = False

    def __init__(
        self, path: Path, fh: BinaryIO, block_size: int, hints: Hints | None = None
    ) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._fh = fh
        try:
            self._file = pq.ParquetFile(fh)
            schema = self._file.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            fh.close()
            raise InputError(
                f"{path} is not a readable Parquet file ({first_line(exc)})"
            ) from None
        nested = [
            f.name
            for f in schema
            if pa.types.is_nested(f.type) and not pa.types.is_dictionary(f.type)
        ]
        if nested:
            raise InputError(
                f"{path}: columns {', '.join(nested)} are nested (list/struct/map);"
                " expected flat columns"
            )
        self.names = clean_names(list(schema.names), path, self.warnings)
        self._batch_rows = max(1, min(1 << 17, int(block_size) // 64))

    def close(self) -> None:
        self._fh.close()

    def chunks(self) -> Iterator[Chunk]:
        first = 1
        try:
            for batch in self._file.iter_batches(
                batch_size=self._batch_rows, use_threads=False
            ):
                cols = [_as_text(batch.column(i)) for i in range(batch.num_columns)]
                raw = pa.RecordBatch.from_arrays(cols, names=self.names)
                yield Chunk(raw, np.arange(first, first + raw.num_rows, dtype=np.int64))
                first += raw.num_rows
        except LatentflowError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(
                f"{self.path}: cannot read Parquet data after row {first - 1}"
                f" ({first_line(exc)})"
            ) from None


def _as_text(col: pa.Array) -> pa.Array:
    # Typed Parquet columns go through the same text path as CSV cells, so ids
    # and checks agree; floats print shortest-roundtrip, NaN as "nan" (missing).
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_timestamp(col.type) and col.type.tz is not None:
        # Zoned instants as UTC text ("...Z"): typed as timestamps, in UTC.
        col = pc.cast(col, pa.timestamp("us", tz="UTC"), safe=False)
    return col if col.type == pa.string() else pc.cast(col, pa.string())
