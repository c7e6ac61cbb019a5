"""Work units for partitioned runs, and the staging they write into.

A run-date partition is a directory of Parquet files. Partitioned scoring
splits it into :class:`WorkUnit` s of whole row groups (a row group is the
smallest piece a reader can fetch on its own); each unit is scored by one task
that writes one output file, named by the unit's index, into a staged
partition. A final step checks that every unit's file is there with the right
row count and swaps the partition in whole (:class:`tasks.storage.StagedPartition`).

Units are planned from the files' footers only, in file and row-group order,
so the same partition always gives the same units, whatever runs them.
"""

from __future__ import annotations

import os
import stat
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
from prefect import task

from tasks.policy import PLAIN
from tasks.storage import (
    StagedPartition,
    check_path,
    commit_partitions,
    discard_paths,
    partition_dir,
    remove_tree,
    staging_root,
    validate_dataset_name,
)

#: Rows per scoring unit at most. Row groups are never split, so a unit holds
#: at least this many rows (or the rest of its file). Measured on 2 cores
#: (benchmarks/scaling.py): a unit task costs ~0.1 s of Prefect task engine
#: around its work and scores ~180k rows/s, so 256k-row units keep that under
#: 10%, and 10M rows still make ~40 units to balance over the workers.
DEFAULT_UNIT_ROWS = 262_144
#: A smaller partition is cut into about this many units (still whole row
#: groups), so that one of a few row groups is spread over the workers too.
MIN_UNITS = 8


@dataclass(frozen=True)
class Piece:
    """Row groups ``[start, stop)`` of one Parquet file."""

    file: str
    start: int
    stop: int
    rows: int


@dataclass(frozen=True)
class WorkUnit:
    """What one task reads: pieces of the partition, in order."""

    index: int
    pieces: tuple[Piece, ...]

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.pieces)

    @property
    def output_name(self) -> str:
        """The unit's own output file: deterministic, so a retry replaces it."""
        return unit_file_name(self.index)


def unit_file_name(index: int) -> str:
    """``part-00003.parquet`` for unit 3."""
    return f"part-{index:05d}.parquet"


def partition_files(directory: Path) -> list[Path]:
    """The partition's Parquet files in name order: the rows' canonical order."""
    return sorted(Path(directory).glob("*.parquet"))


def single_unit(files: Iterable[Path]) -> list[WorkUnit]:
    """Everything as one unit (the sequential path): one output file."""
    pieces = []
    for f in files:
        meta = pq.read_metadata(f)
        if meta.num_row_groups:
            pieces.append(Piece(str(f), 0, meta.num_row_groups, meta.num_rows))
    return [WorkUnit(0, tuple(pieces))]


def unit_size(total_rows: int, unit_rows: int = DEFAULT_UNIT_ROWS) -> int:
    """Rows per unit for a partition of ``total_rows``: ``unit_rows`` at most,
    less when that would give fewer than :data:`MIN_UNITS` units."""
    return max(1, min(unit_rows, -(-total_rows // MIN_UNITS)))


def plan_units(files: Iterable[Path], unit_rows: int) -> list[WorkUnit]:
    """Consecutive row groups of each file, about ``unit_rows`` rows per unit.

    Parameters
    ----------
    files
        The partition's files, in order.
    unit_rows
        Close a unit once it holds at least this many rows. A unit never spans
        two files, so a file's last unit may be smaller.

    Returns
    -------
    list of WorkUnit
        Indexed from 0 in file and row-group order; at least one unit (an empty
        partition gives one empty unit, so the output still has a file with
        the schema and metadata).
    """
    if unit_rows < 1:
        raise ValueError(f"unit_rows must be positive, got {unit_rows}")
    units: list[WorkUnit] = []
    for f in files:
        meta = pq.read_metadata(f)
        start, rows = 0, 0
        for rg in range(meta.num_row_groups):
            rows += meta.row_group(rg).num_rows
            if rows >= unit_rows:
                piece = Piece(str(f), start, rg + 1, rows)
                units.append(WorkUnit(len(units), (piece,)))
                start, rows = rg + 1, 0
        if start < meta.num_row_groups:
            piece = Piece(str(f), start, meta.num_row_groups, rows)
            units.append(WorkUnit(len(units), (piece,)))
    return units or [WorkUnit(0, ())]


# ------------------------------------------------------------------- staging
#
# Partitioned steps write from several tasks (several processes, several hosts
# on shared storage) into one staged partition, so its life cannot be a single
# ``with`` block: these functions split StagedPartition's context manager into
# open / commit / discard steps that a flow calls around its fan-out.


def open_staged(
    data_dir: Path, area: str, dataset: str, run_date: date
) -> StagedPartition:
    """A new staged partition (its directory exists); commit or discard it."""
    staged = StagedPartition(Path(data_dir), area, dataset, run_date)
    return staged.__enter__()


def discard_staged(staged: StagedPartition | None) -> None:
    """Remove a staged partition unless it was committed; safe to call twice."""
    if staged is not None:
        staged.__exit__(None, None, None)


def keep_only(staged: StagedPartition, names: Sequence[str]) -> None:
    """Delete everything in the staged directory but ``names``.

    A worker killed while writing leaves its temporary file behind; the task
    is then run again elsewhere and writes the unit's file whole, so what is
    left over must not be swapped in with the partition.
    """
    keep = set(names)
    for entry in staged.path.iterdir():
        mode = os.lstat(entry).st_mode
        if entry.name in keep and stat.S_ISREG(mode):
            continue
        # A link is removed itself, never what it points at.
        remove_tree(staged.data_dir, entry)


def scratch_dir(data_dir: Path, what: str, dataset: str, run_date: date) -> Path:
    """A fresh working directory under ``.staging`` for per-file outputs.

    Named ``<what>.<dataset>.<date>.<token>``, so a killed run's leftovers are
    removed by :func:`tasks.storage.clean_stale_staging` at the next run.
    """
    validate_dataset_name(dataset)
    token = uuid.uuid4().hex[:12]
    path = staging_root(Path(data_dir)) / f"{what}.{dataset}.{run_date}.{token}"
    check_path(Path(data_dir), path)
    path.mkdir(parents=True, exist_ok=False)
    return path


def remove_scratch(path: Path | None) -> None:
    """Remove a scratch directory and all in it (a no-op if it is gone).

    Scratch directories live in ``<data_dir>/.staging``; links inside are
    removed themselves, never followed.
    """
    if path is not None:
        remove_tree(Path(path).parent.parent, Path(path))


# ------------------------------------------------------------------- commit


def commit_run_date(
    data_dir: Path, dataset: str, run_date: date, staged: dict[str, str]
) -> dict[str, str]:
    """Publish a run date's staged partitions together (see
    :func:`tasks.storage.commit_partitions`).

    Parameters
    ----------
    staged
        Area (``ingested``, ``rejected``, ``latent``) -> sealed staged directory.

    Returns
    -------
    dict
        Area -> the published partition directory.
    """
    moves = [
        (Path(path), partition_dir(Path(data_dir), area, dataset, run_date))
        for area, path in staged.items()
    ]
    finals = commit_partitions(Path(data_dir), moves)
    return {area: str(f) for area, f in zip(staged, finals, strict=True)}


class RunOutputs:
    """A run date's sealed staged partitions, from ingest until the commit.

    Use as a context manager around the run: :meth:`add` each sealed
    partition, then call :meth:`to_commit` right before the commit. If the
    run fails before that, every staged partition is discarded, so nothing
    is published; once the commit has begun its journal owns them (a commit
    cut short is finished by the next run, see :mod:`tasks.storage`).
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self.staged: dict[str, str] = {}
        self._committing = False

    def __enter__(self) -> RunOutputs:
        return self

    def add(self, area: str, path: str) -> None:
        self.staged[area] = path

    def to_commit(self) -> dict[str, str]:
        """The staged partitions by area; from now on they are not discarded."""
        self._committing = True
        return dict(self.staged)

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if exc_type is not None and not self._committing:
            discard_paths(self.data_dir, [Path(p) for p in self.staged.values()])


# No retries: a commit cut short is finished by the next run's recovery.
commit_run_date_task = task(commit_run_date, name="commit-run-date", **PLAIN)
