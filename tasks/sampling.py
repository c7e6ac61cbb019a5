"""Seeded, streamed samples of an ingested partition.

The partition is read one file and one row group at a time
(``ParquetFile.iter_batches`` with ``pre_buffer=False``): ``Dataset.to_batches``
decodes ahead of the consumer without bound, and ``ParquetFile``'s default
``pre_buffer=True`` (pyarrow >= 21) loads every selected column chunk of the
whole file before the first batch; either way memory grew with the partition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.errors import InputError

#: Rows per batch when streaming a partition: big enough that per-batch Python
#: overhead is noise, small enough that a batch of wide rows is a few MiB.
BATCH_ROWS = 65_536


def partition_files(ingested_dir: Path) -> list[Path]:
    """The partition's Parquet files, in name order (the rows' canonical order)."""
    return sorted(Path(ingested_dir).glob("*.parquet"))


def iter_partition(
    ingested_dir: Path, columns: Sequence[str], batch_rows: int = BATCH_ROWS
) -> Iterator[pa.RecordBatch]:
    """Record batches of ``columns``, file by file, one row group at a time.

    Memory is one row group of the selected columns, whatever the partition's
    size; the rows come in the same order every time.
    """
    for path in partition_files(ingested_dir):
        with pq.ParquetFile(path, pre_buffer=False) as pf:
            yield from pf.iter_batches(batch_size=batch_rows, columns=list(columns))


def count_rows(ingested_dir: Path) -> int:
    """Rows in the partition, from the files' footers (no data is read)."""
    total = 0
    for path in partition_files(ingested_dir):
        with pq.ParquetFile(path) as pf:
            total += pf.metadata.num_rows
    return total


def read_training_rows(
    ingested_dir: Path,
    columns: list[str],
    max_rows: int,
    seed: int,
    *,
    on_batch: Callable[[pa.RecordBatch], None] | None = None,
    batch_rows: int = BATCH_ROWS,
) -> tuple[pa.Table, int]:
    """A seeded uniform sample of at most about ``max_rows`` rows, read streaming.

    Every row is kept independently with probability ``max_rows / total``
    (all of them when the partition has no more than ``max_rows``), drawing one
    uniform number per row in file order from ``default_rng([seed, 1])``, so
    the sample depends on the seed and the rows, never on the batch size.

    Parameters
    ----------
    ingested_dir : Path
        An ingested partition (a directory of Parquet files).
    columns : list of str
        Columns to read.
    max_rows : int
        Expected sample size; the sample has about this many rows (binomial).
    seed : int
        Same seed, same rows: same sample.
    on_batch : callable, optional
        Called with every batch of the partition, sampled or not, in order: the
        same pass can accumulate statistics over all rows.
    batch_rows : int, default=BATCH_ROWS
        Rows per streamed batch.

    Returns
    -------
    sample : pyarrow.Table
        The sampled rows, shape (about min(max_rows, total), len(columns)).
    total : int
        Rows in the partition.
    """
    total = count_rows(ingested_dir)
    if total == 0:
        raise InputError(f"{ingested_dir}: no rows to train on")
    frac = min(1.0, max_rows / total)
    rng = np.random.default_rng([seed, 1]) if frac < 1.0 else None
    parts: list[pa.RecordBatch] = []
    schema: pa.Schema | None = None
    for batch in iter_partition(ingested_dir, columns, batch_rows):
        schema = batch.schema
        if on_batch is not None:
            on_batch(batch)
        if rng is None:
            parts.append(batch)
            continue
        keep = rng.random(batch.num_rows) < frac
        if keep.any():
            # filter copies the kept rows, so the batch's buffers are released.
            parts.append(batch.filter(pa.array(keep)))
    if schema is None:  # footers said rows, but no batch came: a changed file
        raise InputError(f"{ingested_dir}: no rows to train on")
    return pa.Table.from_batches(parts, schema=schema), total
