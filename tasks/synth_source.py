"""What ``latentflow synthesize`` starts from: the request, checked, and the
dataset's ingested rows.

Light on imports (pyarrow, numpy): the CLI checks a request here before
Prefect, MLflow or torch is loaded, so a mistake is one line in well under a
second.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from models.schema import TableSchema
from tasks.errors import ConfigError, InputError
from tasks.sampling import partition_files, read_training_rows
from tasks.storage import resolve_under, validate_dataset_name

#: Most ingested rows read (a seeded sample beyond it): memory stays bounded.
MAX_SOURCE_ROWS = 200_000
#: Share of the rows held out from training, for the quality report.
HOLDOUT_FRACTION = 0.2
MAX_HOLDOUT_ROWS = 20_000
MAX_ROWS = 10_000_000


def check_request(data_dir: Path, dataset: str, rows: int, output: Path) -> Path:
    """Refuse a request that cannot succeed; returns the dataset's newest
    ingested partition. Every refusal is a one-line LatentflowError."""
    validate_dataset_name(dataset)
    if isinstance(rows, bool) or not isinstance(rows, int) or not 0 < rows <= MAX_ROWS:
        raise ConfigError(
            f"--rows must be an integer from 1 to {MAX_ROWS}, got {rows!r}"
        )
    check_output(output)
    return latest_partition(data_dir, dataset)


def check_output(output: Path) -> None:
    """The output must be a .parquet file in an existing, writable directory."""
    if output.suffix.lower() != ".parquet":
        raise ConfigError(f"--output {output} must name a .parquet file")
    if output.is_dir():
        raise ConfigError(f"--output {output} is a directory; expected a file name")
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"--output {output}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {output}: directory {parent} is not writable")


def latest_partition(data_dir: Path, dataset: str) -> Path:
    """The newest ``run_date=`` partition of ``ingested/<dataset>`` with rows."""
    root = resolve_under(Path(data_dir), "ingested", dataset)
    parts = (
        sorted(p for p in root.glob("run_date=*") if p.is_dir())
        if root.is_dir()
        else []
    )
    parts = [p for p in parts if partition_files(p)]
    if not parts:
        raise InputError(
            f"dataset {dataset!r} has no ingested rows under {root}; run"
            " 'latentflow run' on it first"
        )
    return parts[-1]


def partition_schema(partition: Path) -> TableSchema:
    """The typed schema ingest recorded in the partition's Parquet metadata."""
    first = partition_files(partition)[0]
    meta = pq.read_schema(first).metadata or {}
    raw = meta.get(b"latentflow.schema")
    if raw is None:
        raise InputError(f"{first} has no latentflow schema; was it written by ingest?")
    return TableSchema.from_dict(json.loads(raw))


@dataclass(frozen=True)
class SourceRows:
    """The rows generators train on, those held out to judge them, and what
    identifies them."""

    partition: Path
    numeric: list[str]
    categorical: list[str]  # the label last, when there is one
    label: str | None
    train: pa.Table
    holdout: pa.Table
    total_rows: int

    @property
    def columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def fingerprint(self, row_hashes: np.ndarray, settings: dict[str, Any]) -> str:
        """Same rows, same split, same settings: same fingerprint."""
        h = hashlib.sha256()
        h.update(np.sort(np.asarray(row_hashes, np.uint64)).tobytes())
        h.update(str(self.train.num_rows).encode())
        h.update(json.dumps(settings, sort_keys=True).encode())
        return h.hexdigest()[:32]


def load_rows(partition: Path, seed: int) -> SourceRows:
    """The partition's feature and label columns, split into train and held-out
    rows (seeded), numbers as float64 and categories as strings."""
    schema = partition_schema(partition)
    numeric = schema.numeric_features
    categorical = schema.categorical_features
    label = schema.label
    if label is not None and schema.column(label).kind == "categorical":
        categorical = [*categorical, label]
    else:
        label = None  # a numeric label is generated as a feature would not be
    if not numeric and not categorical:
        raise InputError(f"{partition}: no numeric or categorical feature to generate")
    columns = [*numeric, *categorical]
    table, total = read_training_rows(partition, columns, MAX_SOURCE_ROWS, seed)
    table = table.combine_chunks()
    n = table.num_rows
    if n < 10:
        raise InputError(f"{partition}: {n} rows; a generator needs at least 10")
    rng = np.random.default_rng([seed, 17])
    n_hold = min(MAX_HOLDOUT_ROWS, max(1, int(n * HOLDOUT_FRACTION)))
    hold = np.zeros(n, bool)
    hold[rng.choice(n, n_hold, replace=False)] = True
    return SourceRows(
        partition=partition,
        numeric=numeric,
        categorical=categorical,
        label=label,
        train=table.filter(pa.array(~hold)),
        holdout=table.filter(pa.array(hold)),
        total_rows=total,
    )
