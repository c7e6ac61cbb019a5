"""Training on history: the last ``train_window_days`` of ingested partitions.

A run that trains reads its own staged drop plus the published ingested
partitions of the days before it, up to ``train_window_days`` in all. They are
gathered in one scratch directory (training reads one directory of Parquet
files), in date order, so the same history gives the same sample. Each row
counts once: a row whose ``_row_id`` (its key) was delivered again later is
taken from the latest delivery only, so a feed that sends the whole file every
night trains on it once. A partition whose columns or types differ from the
drop's is left out, with a log line: the model's schema is the drop's.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from models.columns import ROW_ID
from tasks.partitions import remove_scratch, scratch_dir
from tasks.retention import partition_dates
from tasks.sampling import partition_files


@dataclass(frozen=True)
class TrainingWindow:
    """The directory training reads and the run dates in it."""

    directory: Path
    dates: list[date]
    skipped: list[date]

    def describe(self) -> str:
        if len(self.dates) == 1:
            return str(self.dates[0])
        return f"{self.dates[0]}..{self.dates[-1]} ({len(self.dates)} days)"


def _schema(files: list[Path]) -> object | None:
    return pq.read_schema(files[0]).remove_metadata() if files else None


def window_dates(
    data_dir: Path, dataset: str, run_date: date, days: int
) -> dict[date, Path]:
    """Published ingested partitions in ``(run_date - days, run_date)``."""
    first = run_date - timedelta(days=days - 1)
    return {
        d: p
        for d, p in sorted(partition_dates(data_dir, "ingested", dataset).items())
        if first <= d < run_date
    }


def gather_window(
    data_dir: Path, dataset: str, run_date: date, staged_dir: Path, days: int
) -> TrainingWindow | None:
    """A scratch directory with the window's files, or None when the drop is
    all there is (training then reads the staged partition itself).

    The caller removes the directory (:func:`tasks.partitions.remove_scratch`).
    """
    staged = partition_files(staged_dir)
    want = _schema(staged)
    past = window_dates(data_dir, dataset, run_date, days)
    fitting: dict[date, list[Path]] = {}
    skipped: list[date] = []
    for d, path in past.items():
        files = partition_files(path)
        if files and _schema(files) == want:
            fitting[d] = files
        else:
            skipped.append(d)
    if not fitting:
        return None
    target = scratch_dir(data_dir, "window", dataset, run_date)
    for f in staged:
        _link(f, target / f"{run_date.isoformat()}-{f.name}")
    seen = _ids(staged)
    used = [run_date]
    # Newest first: a row delivered again is kept from its latest delivery.
    for d in sorted(fitting, reverse=True):
        table = pq.read_table(fitting[d])
        fresh = table.filter(pc.invert(pc.is_in(table[ROW_ID], value_set=seen)))
        if fresh.num_rows == 0:
            continue
        pq.write_table(fresh, target / f"{d.isoformat()}-part.parquet")
        seen = pa.concat_arrays([seen, fresh[ROW_ID].combine_chunks()])
        used.append(d)
    if len(used) == 1:
        remove_scratch(target)
        return None
    return TrainingWindow(target, sorted(used), skipped)


def _ids(files: list[Path]) -> pa.Array:
    chunks = list(_id_chunks(files))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _id_chunks(files: list[Path]) -> Iterator[pa.Array]:
    for f in files:
        yield pq.read_table(f, columns=[ROW_ID])[ROW_ID].combine_chunks()


def _link(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:  # another file system, or links refused: copy
        shutil.copyfile(src, dest)
