"""Seeded, streamed samples of an ingested partition."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from tasks.errors import InputError


def read_training_rows(
    ingested_dir: Path, columns: list[str], max_rows: int, seed: int
) -> tuple[pa.Table, int]:
    """A seeded uniform sample of at most about ``max_rows`` rows, read streaming.

    Returns the sample and the total number of rows in the partition.
    """
    dataset = pads.dataset(str(ingested_dir), format="parquet")
    total = dataset.count_rows()
    if total == 0:
        raise InputError(f"{ingested_dir}: no rows to train on")
    if total <= max_rows:
        return dataset.to_table(columns=columns), total
    frac = max_rows / total
    rng = np.random.default_rng([seed, 1])
    parts = []
    for batch in dataset.to_batches(columns=columns, batch_size=262_144):
        keep = rng.random(batch.num_rows) < frac
        if keep.any():
            parts.append(batch.filter(pa.array(keep)))
    return pa.Table.from_batches(parts, schema=parts[0].schema), total
