"""The writer: typed accepted rows and raw rejected rows, as Parquet.

Both files live in staged partitions (:class:`~tasks.storage.StagedPartition`)
the run loop opens; nothing here knows about temporary names or commits.
Rejected rows keep every input column as raw text, plus ``_row_number``,
``_source_file``, ``_reject_reason`` (all problems of the row, "; "-joined) and
``_raw_line`` (the raw line of a row that could not be split into cells, else
null).
"""

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.cells import TIMESTAMP_TYPE
from models.schema import TableSchema
from tasks.ingest.layout import RAW_LINE, REJECT_REASON, ROW_ID, ROW_NUMBER, SOURCE_FILE

#: The Arrow type of each column kind (``models.schema.COLUMN_KINDS``).
ARROW_TYPES: dict[str, pa.DataType] = {
    "numeric": pa.float64(),
    "date": pa.date32(),
    "timestamp": TIMESTAMP_TYPE,
    "categorical": pa.string(),
    "text": pa.string(),
}


class WriteBehind:
    """Parquet writes on one background thread, in submission order.

    pyarrow encodes and compresses with the GIL released, so block k is
    written while block k+1 is validated: writing is a third of the work and
    the floor (``read_csv`` + ``write_table``) keeps both cores busy too. At
    most ``depth`` batches wait, so memory stays a few blocks; the first
    write error is raised in the caller's thread (next :meth:`submit`, or
    :meth:`close`).
    """

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[tuple[pq.ParquetWriter, pa.RecordBatch] | None] = (
            queue.Queue(maxsize=depth)
        )
        self._error: BaseException | None = None
        self._discard = False
        self._thread = threading.Thread(
            target=self._run, name="latentflow-ingest-writer", daemon=True
        )
        self._thread.start()

    def submit(self, writer: pq.ParquetWriter, batch: pa.RecordBatch) -> None:
        """Queue ``batch`` for ``writer`` (blocks while the queue is full)."""
        self._raise_error()
        self._queue.put((writer, batch))

    def close(self, discard: bool = False) -> None:
        """Finish (or, with ``discard``, drop) queued writes; join the thread."""
        self._discard = discard
        self._queue.put(None)
        self._thread.join()
        if not discard:
            self._raise_error()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None and not self._discard:
                try:
                    item[0].write_batch(item[1])
                except BaseException as exc:  # re-raised in the caller's thread
                    self._error = exc

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error


class PartitionWriters:
    """The ingested and rejected Parquet writers of one ingestion."""

    def __init__(
        self,
        ingested: Path,
        rejected: Path,
        schema: TableSchema,
        names: Sequence[str],
        source: str,
        files: Sequence[Path],
    ) -> None:
        fields = [pa.field(ROW_ID, pa.int64(), nullable=False)]
        for c in schema.columns:
            fields.append(pa.field(c.name, ARROW_TYPES[c.kind]))
        meta = {
            "latentflow.schema": json.dumps(schema.to_dict()),
            "latentflow.source": source,
            "latentflow.source_files": json.dumps([str(p) for p in files]),
        }
        self.out_schema = pa.schema(fields, metadata=meta)
        self.rej_schema = pa.schema(
            [
                pa.field(ROW_NUMBER, pa.int64()),
                pa.field(SOURCE_FILE, pa.string()),
                pa.field(REJECT_REASON, pa.string()),
                *[pa.field(n, pa.string()) for n in names],
                pa.field(RAW_LINE, pa.string()),
            ],
            metadata={"latentflow.source": source},
        )
        # Random 64-bit ids never dictionary-encode well: trying costs ~15% of
        # the write time.
        self._writer = pq.ParquetWriter(
            ingested, self.out_schema, use_dictionary=schema.names or False
        )
        self._rej_writer = pq.ParquetWriter(rejected, self.rej_schema)
        self._behind = WriteBehind()

    def accepted(self, ids: np.ndarray, columns: Sequence[pa.Array]) -> None:
        """Queue accepted rows: their ids and typed columns, in schema order."""
        batch = pa.RecordBatch.from_arrays(
            [pa.array(ids.view(np.int64)), *columns], schema=self.out_schema
        )
        self._behind.submit(self._writer, batch)

    def rejected(
        self,
        numbers: np.ndarray,
        source_file: str,
        reasons: list[str],
        columns: Sequence[pa.Array],
        raw_line: pa.Array,
    ) -> None:
        """Queue rejected rows: row numbers, reasons, raw cells and raw lines."""
        n = len(reasons)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(numbers, pa.int64()),
                pa.array([source_file] * n, pa.string()),
                pa.array(reasons, pa.string()),
                *columns,
                raw_line,
            ],
            schema=self.rej_schema,
        )
        self._behind.submit(self._rej_writer, batch)

    def close(self, failed: bool = False) -> None:
        """Write what is queued (or drop it, when ``failed``) and close both files."""
        try:
            self._behind.close(discard=failed)
        finally:
            self._writer.close()
            self._rej_writer.close()
