"""Retention: old run dates and old model versions go, the rest stays.

``keep_days`` removes the run dates older than that many days (counted back
from the run that just succeeded) from every partition root: ``ingested/``,
``rejected/``, ``latent/`` and ``metrics/``. Each partition leaves in one
rename into ``.staging`` (a reader sees all of it or none of it) and is then
deleted; a run killed in between leaves only staging leftovers, which the next
run removes (:func:`tasks.storage.clean_stale_staging`).

``keep_versions`` removes the oldest registered model versions beyond that
many, never the ``champion`` nor the ``previous-champion``.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path

from prefect import task

from tasks.policy import PLAIN
from tasks.storage import check_path, remove_tree, staging_root, validate_dataset_name

#: Every root that holds ``<root>/<dataset>/run_date=<date>/`` partitions.
RETAINED_ROOTS = ("ingested", "rejected", "latent", "metrics")
_PREFIX = "run_date="


@dataclass(frozen=True)
class RetentionResult:
    """What one retention pass removed."""

    partitions: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


def partition_dates(data_dir: Path, root: str, dataset: str) -> dict[date, Path]:
    """The dataset's partitions under ``root`` by run date (others ignored)."""
    base = Path(data_dir) / root / dataset
    found: dict[date, Path] = {}
    if not base.is_dir():
        return found
    for entry in base.iterdir():
        if not entry.name.startswith(_PREFIX) or entry.is_symlink():
            continue
        try:
            found[date.fromisoformat(entry.name.removeprefix(_PREFIX))] = entry
        except ValueError:
            continue  # not ours: left alone
    return found


def expired(data_dir: Path, dataset: str, run_date: date, keep_days: int) -> list[Path]:
    """Partitions older than ``keep_days`` before ``run_date``, oldest first.

    A run date ``d`` is kept while ``run_date - d < keep_days``: with
    ``keep_days=30`` the run of the 30th keeps the 1st to the 30th.
    """
    validate_dataset_name(dataset)
    cutoff = run_date - timedelta(days=keep_days - 1)
    old = [
        (d, path)
        for root in RETAINED_ROOTS
        for d, path in partition_dates(data_dir, root, dataset).items()
        if d < cutoff
    ]
    return [path for _, path in sorted(old)]


def remove_partitions(data_dir: Path, dataset: str, paths: list[Path]) -> list[str]:
    """Take each partition out of sight in one rename, then delete it.

    Returns the removed partitions relative to ``data_dir``.
    """
    base = Path(data_dir).resolve()
    root = staging_root(base)
    root.mkdir(parents=True, exist_ok=True)
    removed = []
    for path in paths:
        path = check_path(base, Path(path))
        # Named like every staging leftover of the dataset, so a kill between
        # the rename and the delete is cleaned up by the next run.
        token = uuid.uuid4().hex[:12]
        gone = check_path(base, root / f"retired.{dataset}.{token}")
        os.rename(path, gone)
        remove_tree(base, gone)
        removed.append(path.relative_to(base).as_posix())
    return removed


def apply_retention(
    data_dir: Path, dataset: str, run_date: date, keep_days: int
) -> list[str]:
    """Remove the dataset's partitions older than ``keep_days``; call under
    the dataset lock, after the run's commit."""
    return remove_partitions(
        data_dir, dataset, expired(data_dir, dataset, run_date, keep_days)
    )


retention_task = task(apply_retention, name="retention", **PLAIN)
