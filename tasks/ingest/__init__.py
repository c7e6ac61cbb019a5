"""Ingest a data file (or several) into one typed, validated run-date partition.

:func:`ingest` streams the source block by block (peak memory does not grow with
the file), types every cell itself, rejects bad rows with a reason instead of
failing the run, and writes two partitions through
:class:`~tasks.storage.StagedPartition`::

    <data_dir>/ingested/<dataset>/run_date=<date>/part-00000.parquet   accepted rows
    <data_dir>/rejected/<dataset>/run_date=<date>/part-00000.parquet   rejected rows

Both are committed together only at the very end, so any failure leaves no
partial output and earlier partitions untouched. With ``publish=False`` (the
nightly flow) they stay staged: the flow publishes them with the run date's
``latent/`` partition in one commit (:func:`tasks.partitions.commit_run_date`).
Anything wrong with the input raises an :class:`~tasks.errors.InputError` (or
``SchemaError``/``ConfigError``) with a one-line message naming the file, the
column or row, and what was expected.

One module per concern:

========================  ==================================================
``formats``               the input formats: suffixes, magic bytes, reader
``sources/``              one reader per format behind the ``Source`` protocol
``inference``             kinds, keys and roles from a sample (pure)
``rowids``                ``_row_id`` hashing and duplicate keys
``problems``              reject reasons, message wording, the reject share
``writer``                the ingested and rejected Parquet files
``result``                ``IngestResult`` and its column facts
``run``                   :func:`ingest`: the streaming loop over blocks
``parts``                 the partitioned path: one task per file, one commit
========================  ==================================================

The names below are imported on first use, so naming the formats (the CLI's
input check) loads neither pyarrow nor Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.schema import COLUMN_KINDS as KINDS
    from models.schema import ROLES, ColumnSpec, Roles, TableSchema
    from tasks.ingest.result import ColumnFact, IngestResult
    from tasks.ingest.run import ingest, ingest_task
    from tasks.presets import WEATHERAUS_RULES

__all__ = [
    "KINDS",
    "ROLES",
    "WEATHERAUS_RULES",
    "ColumnFact",
    "ColumnSpec",
    "IngestResult",
    "Roles",
    "TableSchema",
    "ingest",
    "ingest_task",
]

_WHERE = {
    "KINDS": ("models.schema", "COLUMN_KINDS"),
    "ROLES": ("models.schema", "ROLES"),
    "ColumnSpec": ("models.schema", "ColumnSpec"),
    "Roles": ("models.schema", "Roles"),
    "TableSchema": ("models.schema", "TableSchema"),
    "ColumnFact": ("tasks.ingest.result", "ColumnFact"),
    "IngestResult": ("tasks.ingest.result", "IngestResult"),
    "ingest": ("tasks.ingest.run", "ingest"),
    "ingest_task": ("tasks.ingest.run", "ingest_task"),
    "WEATHERAUS_RULES": ("tasks.presets", "WEATHERAUS_RULES"),
}


def __getattr__(name: str) -> Any:
    try:
        module, attr = _WHERE[name]
    except KeyError:
        raise AttributeError(
            f"module 'tasks.ingest' has no attribute {name!r}"
        ) from None
    return getattr(importlib.import_module(module), attr)
