"""The run loop: one ingestion of a source, block by block, into two partitions.

Threads, on a pipeline of blocks: the reader may split block k+2 into cells on
its own threads, a pool parses block k+1's columns (Arrow and numpy release the
GIL), the main thread deduplicates keys and words the rejects of block k, and
one writer thread encodes block k-1 to Parquet. Output is the same as a serial
run's (each stage keeps block order), and a few blocks are in flight at most.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from prefect import task

from models.cells import parse_cells
from models.schema import ColumnSpec, Roles, TableSchema
from tasks.errors import ConfigError, EmptyInputError, InputError, LatentflowError
from tasks.ingest.inference import (
    SAMPLE_ROWS,
    build_schema,
    check_output_names,
    check_required,
)
from tasks.ingest.layout import PART_NAME
from tasks.ingest.problems import (
    Problem,
    check_reject_share,
    column_problems,
    first_line,
    header_mismatch,
    rule_problem,
)
from tasks.ingest.result import ColumnFact, ColumnStats, IngestResult
from tasks.ingest.rowids import RowIds, sorted_hashes
from tasks.ingest.sources import Chunk, Hints, RawReject, Retry, Source, open_source
from tasks.ingest.writer import PartitionWriters
from tasks.policy import IO
from tasks.sources import resolve_sources
from tasks.storage import StagedPartition, commit_partitions, validate_dataset_name
from tasks.validate import (
    CompiledRule,
    Parsed,
    Rule,
    compile_rules,
    hash_text,
    parse_rule,
)

# Workers parsing a block's columns; the floor's CSV reader uses every core too.
_PARSE_THREADS = max(2, min(8, os.cpu_count() or 2))


def ingest(
    source: str | Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    keys: Sequence[str] | None = None,
    features: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    label: str | None = None,
    roles: Roles | None = None,
    rules: Sequence[str] = (),
    expected_schema: TableSchema | dict[str, Any] | None = None,
    max_reject_fraction: float = 0.05,
    block_size: int = 8 << 20,
    publish: bool = True,
) -> IngestResult:
    """Validate, type and write one run date's input as ingested/rejected partitions.

    Parameters
    ----------
    source
        A data file (CSV, optionally ``.gz``; Parquet; JSON lines, optionally
        ``.gz``), a directory of them, or a glob. Several files are read as one
        dataset, in sorted order, and must share the header.
    data_dir, dataset, run_date
        Where the partitions go (see :mod:`tasks.storage`).
    keys
        Key columns; ``None`` infers them (first date column plus the fewest
        categorical columns unique in the sample), ``[]`` means no key.
    features
        Feature columns; ``None`` means every column that is not a key, the
        label, excluded, free text or a (non-key) date.
    exclude
        Columns kept in the output but not used as features.
    label
        The label column, if any.
    roles
        ``keys``, ``features``, ``exclude`` and ``label`` as one object (a
        caller passing them between steps); then those four must be unset.
    rules
        Domain rules (see :mod:`tasks.validate`); violating rows are rejected.
    expected_schema
        A model's input schema (a :class:`TableSchema` or its ``to_dict()``):
        it fixes kinds and roles; its keys and features must be present (else
        SchemaError); other input columns are dropped with a warning.
    max_reject_fraction
        More rejected rows than this share fails the run (nothing is written).
    block_size
        Bytes per block; memory use is a few blocks, whatever the file size.
    publish
        Commit both partitions before returning. False leaves them sealed in
        ``.staging`` (the result names the staged directories) for the caller
        to commit with the run date's other outputs, or to discard.

    Returns
    -------
    IngestResult

    Raises
    ------
    EmptyInputError
        The one input file has no data rows.
    InputError, SchemaError, ConfigError
        With a one-line message; no partition is written or changed.
    LatentflowError
        The partitions could not be written (disk full, permissions).
    """
    asked = Roles.of(keys, features, exclude, label)
    if roles is None:
        roles = asked
    elif asked != Roles():
        raise ConfigError("give roles either as one Roles object or one by one")
    rule_texts = [rules] if isinstance(rules, str) else list(rules)
    validate_dataset_name(dataset)
    if not isinstance(run_date, date):
        raise ConfigError(f"run_date {run_date!r} is not a date")
    if not isinstance(max_reject_fraction, (int, float)) or not (
        0.0 <= max_reject_fraction <= 1.0
    ):
        raise ConfigError(
            f"max_reject_fraction {max_reject_fraction!r} must be between 0 and 1"
        )
    if not isinstance(block_size, int) or block_size < 1:
        raise ConfigError(f"block_size {block_size!r} must be a positive byte count")
    parsed_rules = [parse_rule(r) for r in rule_texts]
    expected = TableSchema.coerce(expected_schema) if expected_schema else None
    files = resolve_sources(source)
    hints: dict[Path, Hints] = {}
    while True:
        job = _Ingestion(
            source=str(source),
            files=files,
            data_dir=Path(data_dir),
            dataset=dataset,
            run_date=run_date,
            roles=roles,
            rules=parsed_rules,
            expected=expected,
            max_reject_fraction=float(max_reject_fraction),
            block_size=int(block_size),
            hints=hints,
            publish=publish,
        )
        try:
            return job.run()
        except Retry as retry:
            # At most one retry per file: Latin-1 decodes any byte.
            if hints.get(retry.path) == retry.hints:
                raise InputError(f"{retry.path}: cannot be read") from None
            hints[retry.path] = retry.hints
        except OSError as exc:  # writing the partitions (reading maps its own)
            raise LatentflowError(
                f"cannot write the {dataset} partitions under {data_dir}:"
                f" {first_line(exc)}"
            ) from None


_ParsedColumn = tuple[Parsed, np.ndarray | None]


@dataclass
class _Block:
    """One block on its way: the chunk and its pure work, running in the pool."""

    fi: int
    chunk: Chunk
    columns: dict[str, Future[_ParsedColumn]] = field(default_factory=dict)
    rules: list[Future[np.ndarray | None]] = field(default_factory=list)
    hashes: Future[tuple[np.ndarray, np.ndarray]] | None = None


@dataclass
class _Counts:
    """Rows seen so far, overall and per file, and reject categories."""

    files: int
    rows_in: int = 0
    rows_accepted: int = 0
    rows_rejected: int = 0
    reasons: Counter[str] = field(default_factory=Counter)
    file_rows: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.file_rows = [0] * self.files


class _Ingestion:
    """One attempt at :func:`ingest`: the streaming loop and its state."""

    def __init__(
        self,
        *,
        source: str,
        files: list[Path],
        data_dir: Path,
        dataset: str,
        run_date: date,
        roles: Roles,
        rules: list[Rule],
        expected: TableSchema | None,
        max_reject_fraction: float,
        block_size: int,
        hints: dict[Path, Hints],
        publish: bool = True,
    ) -> None:
        self.publish = publish
        self.source = source
        self.files = files
        self.data_dir = data_dir
        self.dataset = dataset
        self.run_date = run_date
        self.roles = roles
        self.rules_parsed = rules
        self.expected = expected
        self.max_reject_fraction = max_reject_fraction
        self.block_size = block_size
        self.hints = hints
        self.warnings: list[str] = []
        self.counts = _Counts(len(files))
        # Per file: its reader's warnings (reported first, in file order), and
        # how it words "no data rows" and reads numbers.
        self.file_warnings: list[list[str]] = [[] for _ in files]
        self.no_rows: list[str] = [""] * len(files)
        self.decimal_comma: list[bool] = [False] * len(files)
        self.stats = ColumnStats()

    def _open(self, path: Path) -> Source:
        return open_source(path, self.block_size, self.hints.get(path, Hints()))

    def run(self) -> IngestResult:
        first = self._open(self.files[0])
        try:
            self.names = first.names
            self.warnings += check_required(
                self.names, first.path, self.roles, self.expected
            )
        except BaseException:
            first.close()
            raise
        stream = self._chunks(first)
        try:
            sample, buffered = self._sample(stream)
            self.schema, warnings = build_schema(
                sample,
                self.names,
                first.path,
                self.roles,
                self.expected,
                self.rules_parsed,
                first.decimal_comma,
            )
            self.warnings += warnings
            check_output_names(self.schema, first.path)
            del sample  # its slices pin the first block's buffers
            kinds = {c.name: c.kind for c in self.schema.columns}
            self.rules: list[CompiledRule] = compile_rules(self.rules_parsed, kinds)
            self.raw_index = {n: i for i, n in enumerate(self.names)}
            # By name, not by position: the same rows with their columns in
            # another order get the same ids.
            self.id_columns = sorted(self.schema.keys or self.schema.names)
            self.ids = RowIds(self.schema.keys, self.files)
            with (
                StagedPartition(
                    self.data_dir, "ingested", self.dataset, self.run_date
                ) as ing,
                StagedPartition(
                    self.data_dir, "rejected", self.dataset, self.run_date
                ) as rej,
            ):
                self.out = PartitionWriters(
                    ing.file(PART_NAME),
                    rej.file(PART_NAME),
                    self.schema,
                    self.names,
                    self.source,
                    self.files,
                )
                try:
                    with ThreadPoolExecutor(
                        _PARSE_THREADS, thread_name_prefix="latentflow-parse"
                    ) as self.pool:
                        self._process_all(_chain(buffered, stream))
                except BaseException:
                    self.out.close(failed=True)  # keeps this error
                    raise
                self.out.close()
                facts = self._finish()
                ing.seal()
                rej.seal()
                if self.publish:
                    commit_partitions(
                        self.data_dir, [(ing.path, ing.final), (rej.path, rej.final)]
                    )
        finally:
            stream.close()
            first.close()
        n = self.counts
        return IngestResult(
            ingested_dir=str(ing.final if self.publish else ing.path),
            rejected_dir=str(rej.final if self.publish else rej.path),
            published=self.publish,
            rows_in=n.rows_in,
            rows_accepted=n.rows_accepted,
            rows_rejected=n.rows_rejected,
            reject_reasons=dict(n.reasons.most_common()),
            warnings=[w for ws in self.file_warnings for w in ws]
            + self.warnings
            + [f.warning() for f in facts],
            schema=self.schema,
            source_files=[str(p) for p in self.files],
            column_facts=facts,
        )

    def _chunks(self, first: Source) -> Iterator[tuple[int, Chunk]]:
        """All files' chunks in order; each later header must match the first."""
        for fi, path in enumerate(self.files):
            src = first if fi == 0 else self._open(path)
            try:
                if src.names != self.names:
                    raise InputError(
                        header_mismatch(path, src.names, self.files[0], self.names)
                    )
                self.file_warnings[fi] = src.warnings
                self.no_rows[fi] = src.no_rows
                self.decimal_comma[fi] = src.decimal_comma
                for chunk in src.chunks():
                    yield fi, chunk
            finally:
                src.close()

    def _sample(
        self, stream: Iterator[tuple[int, Chunk]]
    ) -> tuple[dict[str, pa.Array], list[tuple[int, Chunk]]]:
        """Buffer chunks until SAMPLE_ROWS rows; their first rows, per column."""
        buffered: list[tuple[int, Chunk]] = []
        rows = 0
        for item in stream:
            buffered.append(item)
            rows += item[1].raw.num_rows
            if rows >= SAMPLE_ROWS:
                break
        batches, left = [], SAMPLE_ROWS
        for _, c in buffered:
            if c.raw.num_rows and left > 0:
                batches.append(c.raw.slice(0, left))
                left -= batches[-1].num_rows
        sample = {}
        for i, name in enumerate(self.names):
            arrays = [b.column(i) for b in batches] or [pa.array([], pa.string())]
            sample[name] = pa.concat_arrays(arrays)
        return sample, buffered

    # --------------------------------------------------------------- processing

    def _process_all(self, chunks: Iterable[tuple[int, Chunk]]) -> None:
        """Process blocks in order, with the next block's pure work in the pool."""
        ahead: _Block | None = None
        for fi, chunk in chunks:
            started = self._start(fi, chunk)
            if ahead is not None:
                self._process(ahead)
            ahead = started
        if ahead is not None:
            self._process(ahead)

    def _start(self, fi: int, chunk: Chunk) -> _Block:
        """Submit the block's pure work (parsing, rules, row hashes) to the pool.

        The caller submits block k+1 before finishing block k, so the pool
        works while the main thread deduplicates and the writer writes. Tasks
        waiting on other tasks' futures are submitted after them: the pool's
        queue is FIFO, so whatever they wait for has already been picked up
        and cannot be stuck behind them.
        """
        block = _Block(fi, chunk)
        raw = chunk.raw
        if raw.num_rows == 0:
            return block
        hashed = set(self.id_columns)
        for spec in self.schema.columns:
            block.columns[spec.name] = self.pool.submit(
                _parse_column,
                spec,
                raw.column(self.raw_index[spec.name]),
                self.decimal_comma[fi],
                spec.name in hashed,
            )
        block.rules = [
            self.pool.submit(
                _violations, rule, {c: block.columns[c] for c in rule.columns}
            )
            for rule in self.rules
        ]
        block.hashes = self.pool.submit(
            _sorted_hashes,
            [block.columns[c] for c in self.id_columns],
            stable=not self.schema.keys,
        )
        return block

    def _process(self, block: _Block) -> None:
        fi, chunk = block.fi, block.chunk
        n = chunk.raw.num_rows
        seen = n + len(chunk.rejects)
        self.counts.rows_in += seen
        self.counts.file_rows[fi] += seen
        if chunk.rejects:
            self._reject_raw(fi, chunk.rejects)
        if n == 0:
            return
        parsed: dict[str, Parsed] = {}
        problems: list[Problem] = []
        for spec in self.schema.columns:
            parsed[spec.name] = p = block.columns[spec.name].result()[0]
            problems += column_problems(spec, p)
        for rule, future in zip(self.rules, block.rules, strict=True):
            broken = future.result()
            if broken is not None:
                problems.append(rule_problem(rule, broken, parsed))
        bad = np.zeros(n, bool)
        for prob in problems:
            bad |= prob.mask
        if block.hashes is None:  # set for every non-empty block by _start
            raise RuntimeError("a non-empty block has no row hashes")
        hashes, order = block.hashes.result()
        ids, dup = self.ids.assign(fi, chunk.row_numbers, parsed, hashes, order, ~bad)
        if dup is not None:
            problems.append(dup)
            bad |= dup.mask
        accepted = np.flatnonzero(~bad)
        self._write_accepted(accepted, n, ids, parsed)
        if bad.any():
            self._write_rejected(fi, chunk, np.flatnonzero(bad), problems)

    def _write_accepted(
        self, idx: np.ndarray, n: int, ids: np.ndarray, parsed: dict[str, Parsed]
    ) -> None:
        if not len(idx):
            return
        everything = len(idx) == n
        take = None if everything else pa.array(idx)
        arrays = []
        for c in self.schema.columns:
            values = parsed[c.name].values
            arr = values if take is None else values.take(take)
            arrays.append(arr)
            self.stats.update(c.name, arr)
        self.out.accepted(ids if everything else ids[idx], arrays)
        self.counts.rows_accepted += len(idx)

    def _write_rejected(
        self, fi: int, chunk: Chunk, idx: np.ndarray, problems: list[Problem]
    ) -> None:
        reasons: dict[int, list[str]] = {}
        for prob in problems:
            rows = np.flatnonzero(prob.mask)
            if not len(rows):
                continue
            self.counts.reasons[prob.category] += len(rows)
            for i, text in zip(rows.tolist(), prob.describe(rows), strict=True):
                reasons.setdefault(i, []).append(text)
        take = pa.array(idx)
        raw = [chunk.raw.column(i).take(take) for i in range(len(self.names))]
        self.out.rejected(
            chunk.row_numbers[idx],
            str(self.files[fi]),
            ["; ".join(reasons[i]) for i in idx.tolist()],
            raw,
            pa.nulls(len(idx), pa.string()),
        )
        self.counts.rows_rejected += len(idx)

    def _reject_raw(self, fi: int, rejects: list[RawReject]) -> None:
        """Rows the reader could not split into cells, as it read them."""
        for r in rejects:
            self.counts.reasons[r.category] += 1
        width = len(self.names)
        self.out.rejected(
            np.array([r.number for r in rejects], np.int64),
            str(self.files[fi]),
            [r.reason for r in rejects],
            [
                pa.array([r.fields[j] for r in rejects], pa.string())
                for j in range(width)
            ],
            pa.array([r.text for r in rejects], pa.string()),
        )
        self.counts.rows_rejected += len(rejects)

    # ------------------------------------------------------------------- finish

    def _finish(self) -> list[ColumnFact]:
        """The source-wide checks; returns the column facts."""
        n = self.counts
        if n.rows_in == 0:
            if len(self.files) == 1:
                raise EmptyInputError(f"{self.files[0]} has {self.no_rows[0]}")
            raise EmptyInputError(
                f"{self.source}: none of its {len(self.files)} files has data rows"
            )
        if len(self.files) > 1:
            for path, rows in zip(self.files, n.file_rows, strict=True):
                if rows == 0:
                    self.warnings.append(f"{path} has a header but no rows")
        check_reject_share(
            self.source, n.rows_rejected, n.rows_in, n.reasons, self.max_reject_fraction
        )
        return self.stats.facts(self.schema)


def _chain(
    first: list[tuple[int, Chunk]], rest: Iterable[tuple[int, Chunk]]
) -> Iterator[tuple[int, Chunk]]:
    """The buffered sample chunks, then the rest; each dropped once handed out."""
    first.reverse()
    while first:
        yield first.pop()
    yield from rest


def _violations(
    rule: CompiledRule, columns: dict[str, Future[_ParsedColumn]]
) -> np.ndarray | None:
    return rule.violations({c: f.result()[0].values for c, f in columns.items()})


def _sorted_hashes(
    columns: list[Future[_ParsedColumn]], stable: bool
) -> tuple[np.ndarray, np.ndarray]:
    hashes = []
    for f in columns:
        h = f.result()[1]
        if h is None:  # every id column is parsed with hashed=True
            raise RuntimeError("an id column was parsed without its hash")
        hashes.append(h)
    return sorted_hashes(hashes, stable)


def _parse_column(
    spec: ColumnSpec, raw: pa.Array, decimal_comma: bool, hashed: bool
) -> _ParsedColumn:
    """One column of a block, typed, and the hash of its text if it makes ids.

    Pure (no shared state), so blocks' columns parse in the worker threads:
    Arrow and numpy release the GIL for the heavy parts.
    """
    p = parse_cells(spec.kind, raw, decimal_comma)
    return p, hash_text(p.text) if hashed else None


ingest_task = task(ingest, name="ingest", **IO)
