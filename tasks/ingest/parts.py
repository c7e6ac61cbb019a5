"""Partitioned ingest: one task per input file, one commit for the partition.

:func:`tasks.ingest.run.ingest` reads several files as one dataset, in one process.
Here each file is ingested on its own (:func:`ingest_file`, any worker, into a
scratch directory under ``.staging``) and :func:`commit_ingest` then does what
the single-process path does across files, before anything is published:

* the headers must match the first file's (same message as the single path);
* a key (``_row_id``, a hash of the key cells) may occur in one file only: the
  single path keeps a key's first accepted row and rejects later ones *with
  their raw text*, which only the reader of that file still has, so when keys
  repeat across files the partitioned result is dropped and the caller runs
  the single-process ingest instead (exact, and rare: repeated keys across a
  night's files are an upstream bug);
* datasets without key columns are ingested in one process too: their ids
  count identical rows across all files;
* the reject share is checked over all files (per-file runs accept any share);
* the per-file Parquet files are moved, in file order, into one staged
  ingested and one staged rejected partition, both committed together at the
  end (or, with ``publish=False``, left sealed for the run date's commit).

Kinds and roles come from the first non-empty file (its first 10,000 rows).
Every file is first ingested with its own inference, in parallel; a file whose
inferred schema differs from the first file's, or that failed on its own, is
ingested again with the first file's schema (``expected_schema``), exactly as
the single path would have typed it. The single path may also sample rows of
the second file when the first has fewer than 10,000 rows; pin ``keys`` and
``features`` in the config when the files are small and their kinds ambiguous.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import task

from models.schema import Roles, TableSchema
from tasks.errors import EmptyInputError, InputError, LatentflowError
from tasks.ingest.layout import REJECTED_LEAD, ROW_ID
from tasks.ingest.problems import check_reject_share, header_mismatch
from tasks.ingest.result import ColumnFact, IngestResult
from tasks.ingest.run import ingest
from tasks.partitions import discard_staged, open_staged, unit_file_name
from tasks.policy import IO, PLAIN
from tasks.sources import resolve_sources
from tasks.storage import commit_partitions


@dataclass
class FileIngest:
    """One file's ingest, waiting in its scratch directory for the commit."""

    index: int
    path: str
    out_dir: str
    result: IngestResult | None = None  # None: no data rows, or failed
    header: list[str] = field(default_factory=list)
    error: LatentflowError | None = None  # a speculative run's failure

    @property
    def empty(self) -> bool:
        return self.result is None and self.error is None


def list_sources(source: str) -> list[str]:
    """The data files ``source`` names, in the order ingest reads them."""
    return [str(p) for p in resolve_sources(source)]


def ingest_file(
    index: int,
    path: str,
    scratch: Path,
    dataset: str,
    run_date: date,
    *,
    keys: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    label: str | None = None,
    roles: Roles | None = None,
    rules: Sequence[str] = (),
    expected_schema: TableSchema | None = None,
    speculative: bool = False,
) -> FileIngest:
    """Ingest one file into ``scratch/file-<index>[-typed]`` (not published).

    Parameters
    ----------
    index, path
        The file's position in the source and its path.
    scratch
        The run's scratch directory (shared storage for Dask workers).
    keys, features, exclude, label, roles, rules
        As for :func:`tasks.ingest.run.ingest`; ignored with ``expected_schema``
        except ``rules``.
    expected_schema
        Type the file with this schema (the first file's) instead of inferring.
    speculative
        Return a user error in :attr:`FileIngest.error` instead of raising it:
        the file will be ingested again with the first file's schema.

    Returns
    -------
    FileIngest
        ``result`` is None for a file with a header but no rows (a warning in
        the single path, not an error, when the source has several files).
    """
    asked = roles if roles is not None else Roles.of(keys, features, exclude, label)
    suffix = "-typed" if expected_schema is not None else ""
    out = Path(scratch) / f"file-{index:05d}{suffix}"
    part = FileIngest(index, path, str(out))
    try:
        part.result = ingest(
            path,
            out,
            dataset,
            run_date,
            # The expected schema fixes every role.
            roles=Roles() if expected_schema else asked,
            rules=rules,
            expected_schema=expected_schema,
            # The reject share is a property of the whole source: checked once
            # over all files by commit_ingest.
            max_reject_fraction=1.0,
        )
    except EmptyInputError:
        return part
    except LatentflowError as exc:
        if not speculative:
            raise
        part.error = exc
        return part
    rejected = _one_file(Path(part.result.rejected_dir))
    part.header = pq.read_schema(rejected).names[len(REJECTED_LEAD) : -1]
    return part


def reference_part(parts: Sequence[FileIngest]) -> FileIngest | None:
    """The first non-empty file, whose schema the single path would use.

    Raises
    ------
    LatentflowError
        That file's own error: the single path fails on it too.
    """
    for p in parts:
        if p.empty:
            continue
        if p.error is not None:
            raise p.error
        return p
    return None


def needs_typing(parts: Sequence[FileIngest], ref: FileIngest) -> list[FileIngest]:
    """Files to ingest again with the reference schema: failed or typed otherwise.

    Raises
    ------
    InputError
        A file's header differs from the reference file's (the single path's
        message), checked first: typing such a file again cannot help.
    """
    assert ref.result is not None
    _check_headers(parts, ref)
    return [
        p
        for p in parts
        if p is not ref
        and not p.empty
        and (p.error is not None or p.result.schema != ref.result.schema)  # type: ignore[union-attr]
    ]


def _check_headers(parts: Sequence[FileIngest], ref: FileIngest) -> None:
    for p in parts:
        if p.result is not None and p.header != ref.header:
            raise InputError(
                header_mismatch(Path(p.path), p.header, Path(ref.path), ref.header)
            )


def commit_ingest(
    parts: Sequence[FileIngest],
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    source: str,
    max_reject_fraction: float,
    publish: bool = True,
) -> IngestResult | None:
    """Check the files together and publish them as one partition pair.

    With ``publish=False`` the pair is left sealed in ``.staging`` and the
    result names the staged directories (see :func:`tasks.ingest.ingest`).

    Returns
    -------
    IngestResult or None
        None when the files cannot be combined exactly (no key columns, or a
        key in more than one file): run :func:`tasks.ingest.ingest` instead.

    Raises
    ------
    InputError
        No file has data rows, headers differ, or too many rows are rejected;
        nothing is written.
    """
    parts = sorted(parts, key=lambda p: p.index)
    for p in parts:
        if p.error is not None:
            raise p.error
    done = [p for p in parts if p.result is not None]
    if not done:
        raise InputError(f"{source}: none of its {len(parts)} files has data rows")
    ref = done[0]
    assert ref.result is not None
    _check_headers(done, ref)
    schema = ref.result.schema
    if not schema.keys:
        return None
    ingested = [_one_file(Path(p.result.ingested_dir)) for p in done]  # type: ignore[union-attr]
    if _ids_repeat(ingested):
        return None
    rows_in = sum(p.result.rows_in for p in done)  # type: ignore[union-attr]
    rejected = sum(p.result.rows_rejected for p in done)  # type: ignore[union-attr]
    reasons: Counter[str] = Counter()
    for p in done:
        reasons.update(p.result.reject_reasons)  # type: ignore[union-attr]
    check_reject_share(source, rejected, rows_in, reasons, max_reject_fraction)
    # Each file's column facts hold for that file only: recomputed over all.
    warnings = []
    for p in done:
        assert p.result is not None
        own = {f.warning() for f in p.result.column_facts}
        warnings += [w for w in p.result.warnings if w not in own]
    warnings += [f"{p.path} has a header but no rows" for p in parts if p.empty]
    facts = _column_facts(ingested, schema)
    warnings += [f.warning() for f in facts]
    ing = open_staged(data_dir, "ingested", dataset, run_date)
    rej = open_staged(data_dir, "rejected", dataset, run_date)
    try:
        for p, ing_file in zip(done, ingested, strict=True):
            assert p.result is not None
            name = unit_file_name(p.index)
            os.replace(ing_file, ing.file(name))
            os.replace(_one_file(Path(p.result.rejected_dir)), rej.file(name))
        ing.seal()
        rej.seal()
        if publish:
            commit_partitions(
                Path(data_dir), [(ing.path, ing.final), (rej.path, rej.final)]
            )
    finally:
        discard_staged(ing)
        discard_staged(rej)
    return IngestResult(
        ingested_dir=str(ing.final if publish else ing.path),
        rejected_dir=str(rej.final if publish else rej.path),
        published=publish,
        rows_in=rows_in,
        rows_accepted=sum(p.result.rows_accepted for p in done),  # type: ignore[union-attr]
        rows_rejected=rejected,
        reject_reasons=dict(reasons.most_common()),
        warnings=warnings,
        schema=schema,
        source_files=[p.path for p in parts],
        column_facts=facts,
    )


def _one_file(partition: Path) -> Path:
    files = sorted(partition.glob("*.parquet"))
    if len(files) != 1:
        raise RuntimeError(
            f"{partition}: expected one Parquet file, found {len(files)}"
        )
    return files[0]


def _ids_repeat(files: Sequence[Path]) -> bool:
    """Whether any ``_row_id`` occurs in more than one file (8 bytes a row)."""
    ids = np.concatenate(
        [pq.read_table(f, columns=[ROW_ID]).column(0).to_numpy() for f in files]
        or [np.zeros(0, np.int64)]
    )
    ids.sort()
    return bool(len(ids) > 1 and (ids[1:] == ids[:-1]).any())


def _column_facts(files: Sequence[Path], schema: TableSchema) -> list[ColumnFact]:
    """ "entirely missing" / "constant" warnings over all files, from statistics.

    A column is reported constant only when every row group's statistics show
    one and the same value (a row group without min/max is not judged).
    """
    out = []
    metas = [pq.read_metadata(f) for f in files]
    for c in schema.columns:
        if c.role == "key":
            continue
        count, values, judged = 0, set(), True
        for meta in metas:
            j = meta.schema.names.index(c.name)
            for rg in range(meta.num_row_groups):
                col = meta.row_group(rg).column(j)
                stats = col.statistics
                rows = meta.row_group(rg).num_rows
                if stats is None or not stats.has_null_count:
                    judged = False
                    continue
                n = rows - stats.null_count
                count += n
                if n and stats.has_min_max:
                    values.update((stats.min, stats.max))
                elif n:
                    judged = False
        if count == 0 and judged:
            out.append(ColumnFact(c.name, "missing"))
        elif judged and len(values) == 1:
            out.append(ColumnFact(c.name, "constant", next(iter(values))))
    return out


ingest_file_task = task(
    ingest_file, name="ingest-file", task_run_name="ingest-file-{index}", **IO
)
commit_ingest_task = task(commit_ingest, name="commit-ingest", **PLAIN)
