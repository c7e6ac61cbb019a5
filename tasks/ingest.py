"""Ingest a CSV / Parquet source into one typed, validated run-date partition.

:func:`ingest` streams the source block by block (peak memory does not grow with
the file), types every cell itself (pyarrow reads all cells as raw strings),
rejects bad rows with a reason instead of failing the run, and writes two
partitions through :class:`~tasks.storage.StagedPartition`::

    <data_dir>/ingested/<dataset>/run_date=<date>/part-00000.parquet   accepted rows
    <data_dir>/rejected/<dataset>/run_date=<date>/part-00000.parquet   rejected rows

Both are committed together only at the very end, so any failure leaves no partial
output and earlier partitions untouched. With ``publish=False`` (the nightly
flow) they stay staged: the flow publishes them with the run date's ``latent/``
partition in one commit (:func:`tasks.partitions.commit_run_date`).

Anything wrong with the input raises an
:class:`~tasks.errors.InputError` (or ``SchemaError``/``ConfigError``) with a
one-line message naming the file, the column or row, and what was expected.

Choices worth knowing:

* Threads, on a pipeline of blocks: pyarrow's reader splits block k+2 into
  cells on its own threads, a pool parses block k+1's columns (Arrow and
  numpy release the GIL), the main thread deduplicates keys and words the
  rejects of block k, and one writer thread encodes block k-1 to Parquet.
  Output is the same as a serial run's (each stage keeps block order), and a
  few blocks are in flight at most. A file with a wrong-field-count row is
  read again serially from the start: only pyarrow's serial reader numbers
  such rows.

* Delimiter: sniffed from the header line. A comma wins if there is one, else the
  most frequent of ``;``, tab and ``|`` (with a warning). Semicolon files may use
  a decimal comma (``12,5``) in numeric columns, as European exports do.
* Encoding: UTF-8 (BOM or not), UTF-16/UTF-32 with a BOM; anything that is not
  valid UTF-8 is read as Latin-1, with a warning. NUL bytes or many control
  characters mean binary data: an error.
* ``_row_number`` of a rejected CSV row is its record number with the header as
  1, i.e. its line number unless the file has blank lines or quoted line breaks;
  for Parquet it is the 1-based row index.
* Kinds come from the first 10,000 rows: numeric if 95% of the non-null cells
  are finite numbers, date if 95% are ISO dates, else categorical (at most
  max(20, min(1000, rows / 2)) distinct values) or text (kept, not a feature).
  A column with no value in the sample is numeric. Later junk cells reject
  their rows; the column is never retyped.
* Rejected rows keep every input column as raw text, plus ``_row_number``,
  ``_source_file``, ``_reject_reason`` (all problems of the row, "; "-joined)
  and ``_raw_line`` (the raw line of a row with a wrong field count, else null).
  ``IngestResult.reject_reasons`` counts problem categories ("MinTemp: not a
  number", "rule 'A <= B'", "duplicate key", "expected 23 fields, found 25").
* ``_row_number`` of a rejected CSV row is its record number with the header as
  1, i.e. its line number unless the file has blank lines or quoted line breaks;
  for Parquet it is the 1-based row index.
* ``_row_id`` is a 64-bit hash of the stripped key cells (all cells when there is
  no key), computed with numpy from the bytes, so it is stable across runs,
  row order and library versions. Duplicate keys: the first accepted row wins
  (a rejected row does not claim its key); identical keyless rows get ids
  salted with their occurrence count. Dedup memory is 16 bytes per accepted
  row (hash and where it was first seen), 8 without keys.
"""

from __future__ import annotations

import atexit
import codecs
import csv
import gzip
import io
import json
import os
import queue
import re
import sys
import threading
import weakref
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import date
from itertools import combinations
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import task

from models import columns as cols
from models.cells import SHOW_CHARS as _SHOW_CHARS
from models.cells import TIMESTAMP_TYPE, CellProblem, cell_problems, parse_cells
from models.cells import show as _show
from tasks.errors import ConfigError, InputError, LatentflowError, SchemaError
from tasks.policy import IO
from tasks.presets import WEATHERAUS_RULES
from tasks.sources import resolve_sources as _resolve_sources
from tasks.storage import StagedPartition, commit_partitions, validate_dataset_name
from tasks.validate import (
    CompiledRule,
    Parsed,
    Rule,
    clean_text,
    combine_hashes,
    compile_rules,
    date_share,
    hash_text,
    implied_kind,
    numeric_share,
    occurrence_hash,
    parse_rule,
    timestamp_share,
)

__all__ = [
    "KINDS",
    "ROLES",
    "WEATHERAUS_RULES",
    "ColumnSpec",
    "IngestResult",
    "TableSchema",
    "ingest",
    "ingest_task",
]

KINDS = ("numeric", "categorical", "date", "timestamp", "text")
ROLES = ("key", "feature", "label", "excluded")

ROW_ID = cols.ROW_ID
ROW_NUMBER = "_row_number"
SOURCE_FILE = "_source_file"
REJECT_REASON = "_reject_reason"
RAW_LINE = "_raw_line"  # the raw text of rows that could not be split into fields
_RESERVED = (ROW_ID, ROW_NUMBER, SOURCE_FILE, REJECT_REASON, RAW_LINE)

PART_NAME = "part-00000.parquet"
SAMPLE_ROWS = 10_000  # rows used to infer kinds and keys
_PARSE_SHARE = 0.95  # share of non-null sample cells that must parse as numbers/dates
_CATEGORICAL_LIMIT = 1000
_HEAD_BYTES = 1 << 20  # the header must fit in the first MiB
_SNIFF_BYTES = 1 << 16  # encoding/binary/delimiter checks look at this much
_READ_AHEAD = 1  # CSV blocks pyarrow may read beyond the one handed out
_MAX_KEY_TRIES = 5000
# Workers parsing a block's columns; the floor's CSV reader uses every core too.
_PARSE_THREADS = max(2, min(8, os.cpu_count() or 2))


# --------------------------------------------------------------------- schema API


@dataclass(frozen=True)
class ColumnSpec:
    """One column: its name, kind and role in the model."""

    name: str
    kind: str  # "numeric" | "categorical" | "date" | "timestamp" | "text"
    role: str  # "key" | "feature" | "label" | "excluded"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SchemaError(f"column name {self.name!r} is not a non-empty string")
        if self.kind not in KINDS:
            raise SchemaError(
                f"column {self.name!r}: kind {self.kind!r} is not one of {KINDS}"
            )
        if self.role not in ROLES:
            raise SchemaError(
                f"column {self.name!r}: role {self.role!r} is not one of {ROLES}"
            )

    def to_dict(self) -> dict[str, str]:
        """JSON-able form."""
        return {"name": self.name, "kind": self.kind, "role": self.role}

    @classmethod
    def from_dict(cls, d: Any) -> ColumnSpec:
        """Inverse of :meth:`to_dict`; a malformed entry raises SchemaError."""
        if not isinstance(d, dict) or not {"name", "kind", "role"} <= d.keys():
            raise SchemaError(f"schema column {d!r} needs 'name', 'kind' and 'role'")
        return cls(name=d["name"], kind=d["kind"], role=d["role"])


@dataclass(frozen=True)
class TableSchema:
    """The typed columns of an ingested table, in file order."""

    columns: tuple[ColumnSpec, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "columns", tuple(self.columns))
        seen = Counter(c.name for c in self.columns)
        dups = sorted(n for n, k in seen.items() if k > 1)
        if dups:
            raise SchemaError(f"schema has duplicated columns: {', '.join(dups)}")
        labels = [c.name for c in self.columns if c.role == "label"]
        if len(labels) > 1:
            raise SchemaError(f"schema has more than one label: {', '.join(labels)}")

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.columns]

    @property
    def keys(self) -> list[str]:
        return [c.name for c in self.columns if c.role == "key"]

    @property
    def features(self) -> list[str]:
        return [c.name for c in self.columns if c.role == "feature"]

    @property
    def numeric_features(self) -> list[str]:
        return [
            c.name for c in self.columns if c.role == "feature" and c.kind == "numeric"
        ]

    @property
    def categorical_features(self) -> list[str]:
        return [
            c.name
            for c in self.columns
            if c.role == "feature" and c.kind == "categorical"
        ]

    @property
    def label(self) -> str | None:
        return next((c.name for c in self.columns if c.role == "label"), None)

    def column(self, name: str) -> ColumnSpec:
        """The spec of ``name`` (KeyError if absent)."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        return any(c.name == name for c in self.columns)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form: ``{"columns": [{"name", "kind", "role"}, ...]}``."""
        return {"columns": [c.to_dict() for c in self.columns]}

    @classmethod
    def from_dict(cls, d: Any) -> TableSchema:
        """Inverse of :meth:`to_dict`; a malformed dict raises SchemaError."""
        if not isinstance(d, dict) or not isinstance(d.get("columns"), list):
            raise SchemaError("a schema must be a dict with a 'columns' list")
        return cls(tuple(ColumnSpec.from_dict(c) for c in d["columns"]))


@dataclass
class IngestResult:
    """What :func:`ingest` did; small and JSON-able (see :meth:`to_dict`)."""

    ingested_dir: str
    rejected_dir: str
    rows_in: int
    rows_accepted: int
    rows_rejected: int
    reject_reasons: dict[str, int]  # reason category -> rows (a row may count twice)
    warnings: list[str]
    schema: dict[str, Any]
    source_files: list[str]
    #: False: ``ingested_dir`` and ``rejected_dir`` are sealed staged
    #: directories, waiting for the run date's commit.
    published: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ------------------------------------------------------------------------ sources


@dataclass
class _Hints:
    """How to read one file, learnt from a failed attempt (see :func:`ingest`)."""

    latin1_at: int | None = None  # not UTF-8 after all: first bad byte
    # A row with a wrong field count: read serially, the only way pyarrow
    # numbers such rows (the threaded reader is faster on clean files).
    serial: bool = False


class _Retry(Exception):
    """Internal: restart the ingestion, reading ``path`` as ``hints`` say."""

    def __init__(self, path: Path, hints: _Hints) -> None:
        super().__init__(str(path))
        self.path = path
        self.hints = hints


def _first_line(exc: BaseException) -> str:
    # Library messages may quote the input (a CSV row, a footer): capped.
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = text[0]
    return line if len(line) <= _SHOW_CHARS * 2 else line[: _SHOW_CHARS * 2] + "..."


def _clip(value: object, limit: int = _SHOW_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, for values in reject reasons."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _show_names(names: Sequence[str], budget: int = 160) -> str:
    """Column names for "the header has: ..." messages, ``budget`` characters
    at most: plain ones as they are, others repr-escaped and capped."""

    def one(name: str) -> str:
        return name if name.isprintable() and len(name) <= 40 else _show(name, 40)

    shown: list[str] = []
    used = 0
    for name in names:
        text = one(name)
        if used + len(text) > budget:
            return ", ".join(shown) + f" ... ({len(names)} columns)"
        shown.append(text)
        used += len(text) + 2
    return ", ".join(shown)


def _open_binary(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


@dataclass
class _Chunk:
    """One block of one file: raw string cells, their row numbers, bad rows."""

    raw: pa.RecordBatch
    row_numbers: np.ndarray  # int64, one per raw row
    ragged: list[tuple[int, str, int]] = field(default_factory=list)  # no, text, n


class _Utf8Stream:
    """The file's bytes as pyarrow reads them: UTF-8, after the header.

    Plain UTF-8 passes through (validated on the way; pure ASCII skips even
    that); Latin-1 and UTF-16/32 are transcoded. The first error is kept in
    :attr:`error` because pyarrow may hit it while reading ahead.

    pyarrow's streaming CSV reader reads up to 32 blocks ahead in a background
    thread (the whole file, for most files): :meth:`read` holds it to
    ``_READ_AHEAD`` blocks beyond what the consumer took (:meth:`took`), so
    memory is a few blocks whatever the file size.
    """

    def __init__(self, raw: BinaryIO, prefix: bytes, encoding: str) -> None:
        self.closed = False
        _OPEN_STREAMS.add(self)
        self._cond = threading.Condition()
        self._reads = 0
        self._taken = 0
        self._waiting = 0
        self._raw = raw
        self._pending = prefix
        self._decoder = codecs.getincrementaldecoder(encoding)("strict")
        self._passthrough = encoding == "utf-8"
        self._out = b""
        self._eof = False
        self._at_start = True
        self.raw_bytes = 0
        self.bad_offset = -1
        self.tail = b""
        self.error: BaseException | None = None

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        """End the stream; a read-ahead waiting in :meth:`read` gets EOF at once."""
        self.closed = True
        if sys.is_finalizing():
            return  # too late to wake pyarrow's thread (see _close_open_streams)
        with self._cond:
            self._cond.notify_all()
            # Let it leave our Python code while the interpreter is whole.
            self._cond.wait_for(lambda: not self._waiting, timeout=2.0)

    def took(self) -> None:
        """The consumer took a batch: the reader may read one more block."""
        with self._cond:
            self._taken += 1
            self._cond.notify_all()

    def _convert(self, n: int) -> bytes:
        if self._pending:
            chunk, self._pending = self._pending, b""
        else:
            chunk = self._raw.read(n)
        final = not chunk
        self._eof = final
        self.raw_bytes += len(chunk)
        try:
            if not self._passthrough:
                return self._decoder.decode(chunk, final).encode("utf-8")
            if final or not chunk.isascii() or self._decoder.getstate()[0]:
                self._decoder.decode(chunk, final)  # validation only
        except UnicodeDecodeError as exc:
            self.bad_offset = self.raw_bytes - len(chunk) + exc.start
            raise
        if self._at_start and chunk:
            self._at_start = False
            chunk = chunk.removeprefix(codecs.BOM_UTF8)
        return chunk

    def _fill(self, n: int) -> None:
        try:
            while len(self._out) < n and not self._eof:
                chunk = self._convert(max(n - len(self._out), 1 << 16))
                self._out = self._out + chunk if self._out else chunk
        except Exception as exc:
            self.error = exc
            raise

    def skip(self, n: int) -> None:
        self._fill(n)
        self._out = self._out[n:]

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = 1 << 62
        with self._cond:
            # The timeout only guards against a block that yields no batch.
            self._waiting += 1
            try:
                self._cond.wait_for(
                    lambda: self.closed or self._reads - self._taken <= _READ_AHEAD,
                    timeout=1.0,
                )
            finally:
                self._waiting -= 1
                self._cond.notify_all()
            self._reads += 1
            if self.closed:
                return b""
        self._fill(n)
        if len(self._out) <= n:  # the usual case: no re-slicing copies
            out, self._out = self._out, b""
        else:
            out, self._out = self._out[:n], self._out[n:]
        if out:
            self.tail = (self.tail + out)[-16:]
        return out


# A pyarrow thread still waiting in read() when the interpreter finalises would
# crash it; an abandoned reader is released at exit, while threads still run.
_OPEN_STREAMS: weakref.WeakSet[_Utf8Stream] = weakref.WeakSet()


@atexit.register
def _close_open_streams() -> None:
    for stream in list(_OPEN_STREAMS):
        stream.close()


def _sniff_encoding(head: bytes, whole: bool) -> tuple[str, str | None]:
    """(codec, warning) for the head of a file."""
    if head.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32", None
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16", None
    if head.isascii():
        return "utf-8", None
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(head, whole)
        return "utf-8", None
    except UnicodeDecodeError as exc:
        return "latin-1", f"not valid UTF-8 at byte {exc.start}"


def _sniff_delimiter(line: str) -> str:
    if "," in line:
        return ","
    counts = {d: line.count(d) for d in (";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _read_header(text: str, delimiter: str) -> tuple[list[str], int]:
    """The first non-blank record and how many characters it (and blanks) took."""
    consumed = 0

    def lines() -> Iterator[str]:
        nonlocal consumed
        for line in io.StringIO(text, newline=""):
            consumed += len(line)
            yield line

    reader = csv.reader(lines(), delimiter=delimiter, quotechar='"', strict=False)
    for row in reader:
        if any(cell.strip() for cell in row):
            return row, consumed
    return [], consumed


def _clean_names(names: list[str], path: Path, warnings: list[str]) -> list[str]:
    """Strip header names, name blank ones, refuse duplicates and reserved ones."""
    out = []
    for i, name in enumerate(names):
        name = name.strip().lstrip("\ufeff").strip()
        if not name:
            name = f"unnamed_{i}"
            warnings.append(
                f"{path}: column {i + 1} has no name; called it {_show(name)}"
            )
        out.append(name)
    counts = Counter(out)
    dups = [n for n in counts if counts[n] > 1]
    if dups:
        cols = {n: [str(i + 1) for i, m in enumerate(out) if m == n] for n in dups}
        where = "; ".join(
            f"{_show(n)} (columns {', '.join(cols[n])})" for n in dups[:5]
        )
        raise InputError(f"{path}: duplicated column names in the header: {where}")
    reserved = [n for n in out if n in _RESERVED]
    if reserved:
        raise InputError(
            f"{path}: column name {_show(reserved[0])} is reserved for ingestion"
            " output; rename it"
        )
    return out


class _CsvSource:
    """A CSV file (plain or gzip'd, any supported encoding), read block by block."""

    kind = "csv"

    def __init__(
        self, path: Path, fh: BinaryIO, block_size: int, hints: _Hints
    ) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._fh = fh
        raw: BinaryIO = fh
        if fh.read(2) == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[assignment]
        fh.seek(0)
        self._raw = raw
        try:
            head = raw.read(_HEAD_BYTES)
        except (OSError, EOFError, zlib.error) as exc:
            raise InputError(
                f"{path}: corrupt or truncated gzip data ({_first_line(exc)})"
            ) from None
        whole = len(head) < _HEAD_BYTES
        if not head:
            raise InputError(f"{path} is empty")
        if head.startswith(b"PK\x03\x04"):
            raise InputError(
                f"{path} is a zip archive (an Excel workbook?); expected CSV, CSV.gz"
                " or Parquet"
            )
        encoding, why = _sniff_encoding(head, whole)
        self.hints = hints
        if hints.latin1_at is not None and encoding == "utf-8":
            encoding, why = "latin-1", f"not valid UTF-8 at byte {hints.latin1_at}"
        codec = "utf-8-sig" if encoding == "utf-8" else encoding
        # The first 64 KiB hold the header of any sane file; decode more only
        # if they do not.
        text = head[:_SNIFF_BYTES].decode(codec, errors="replace")
        self._check_text(text, head)
        if why:
            self.warnings.append(f"{path}: {why}; decoded it as Latin-1")
        if not text.strip():
            raise InputError(f"{path} is empty (only blank lines)")
        first_line = next((ln for ln in text.splitlines() if ln.strip()), "")
        self.delimiter = _sniff_delimiter(first_line)
        if self.delimiter != ",":
            self.warnings.append(
                f"{path}: no comma in the header; using {self.delimiter!r} as the"
                " delimiter"
                + (" (decimal commas accepted)" if self.delimiter == ";" else "")
            )
        try:
            header, consumed = _read_header(text, self.delimiter)
            if consumed >= len(text) and len(head) > _SNIFF_BYTES:
                text = head.decode(codec, errors="replace")
                header, consumed = _read_header(text, self.delimiter)
        except csv.Error as exc:
            raise InputError(
                f"{path}: cannot read the header row ({_first_line(exc)})"
            ) from None
        if not header:
            raise InputError(f"{path} is empty (only blank lines)")
        # RFC 4180 allows commas and line breaks inside a quoted name; what
        # cannot be is an odd number of quotes: one was never closed.
        if text[:consumed].count('"') % 2 or (consumed >= len(text) and not whole):
            raise InputError(
                f'{path}: the header row never ends: a quote (") is not closed, or'
                f" the header is longer than {_HEAD_BYTES} bytes"
            )
        self.names = _clean_names(header, path, self.warnings)
        self.encoding = encoding
        self.stream = _Utf8Stream(raw, head, encoding)
        try:
            self.stream.skip(len(text[:consumed].encode("utf-8")))
        except UnicodeDecodeError:
            raise InputError(
                f"{path}: not valid {encoding} text in its first row; expected CSV"
                " text (UTF-8/Latin-1, or UTF-16/32 with a byte-order mark),"
                " .csv.gz or Parquet"
            ) from None
        # A block must hold a whole row; tiny test blocks still stream.
        longest = max((len(ln) for ln in text.splitlines()[:1000]), default=0)
        self.block_size = max(
            int(block_size), 2 * len(text[:consumed]), 4 * longest, 64
        )

    def _check_text(self, text: str, head: bytes) -> None:
        # Undecodable bytes (U+FFFD after decoding) count like control
        # characters: random bytes behind a UTF-16 byte-order mark decode to
        # printable CJK characters and many of those.
        controls = len(_CONTROL_RE.findall(text)) + text.count("\ufffd")
        if "\x00" in text or controls > max(8, len(text) // 100):
            # ASCII text in UTF-16 is every other byte NUL.
            nul_share = head[:_SNIFF_BYTES].count(0) / min(len(head), _SNIFF_BYTES)
            hint = (
                " (UTF-16 without a byte-order mark?)" if 0.4 < nul_share < 0.6 else ""
            )
            raise InputError(
                f"{self.path} does not look like CSV text: it contains binary data"
                f"{hint}; expected UTF-8/Latin-1 text, .csv.gz or Parquet"
            )

    def close(self) -> None:
        self.stream.close()
        self._raw.close()
        self._fh.close()

    def chunks(self) -> Iterator[_Chunk]:
        """Blocks of raw string cells; rows with a wrong field count come aside.

        Read first with pyarrow's threads (blocks are split into cells ahead,
        on the other cores, while the caller validates the last one) and no
        handler for rows with a wrong field count: any parse error, such a
        row included, restarts the ingestion reading this file serially
        (:class:`_Retry`), which rejects those rows or words the error exactly
        as before. Only the serial reader numbers bad rows, and the threaded
        one hands the row handler text cut at block boundaries (not always
        valid UTF-8). Well-formed files, the usual case, are read once.
        """
        pending: list[tuple[int, str, int]] = []
        threaded = not self.hints.serial

        def on_invalid(row: Any) -> str:
            number = row.number if row.number is not None else -1
            pending.append((number, row.text, row.actual_columns))
            return "skip"

        names = self.names
        next_no = 1  # pyarrow numbers data records from 1 (the header is skipped)
        last: pa.RecordBatch | None = None
        try:
            reader = pacsv.open_csv(
                self.stream,
                read_options=pacsv.ReadOptions(
                    use_threads=threaded,
                    block_size=self.block_size,
                    column_names=names,
                ),
                parse_options=pacsv.ParseOptions(
                    delimiter=self.delimiter,
                    quote_char='"',
                    double_quote=True,
                    escape_char=False,
                    newlines_in_values=True,
                    ignore_empty_lines=True,
                    invalid_row_handler=None if threaded else on_invalid,
                ),
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in names},
                    null_values=[],
                    true_values=[],
                    false_values=[],
                    strings_can_be_null=False,
                    quoted_strings_can_be_null=False,
                    check_utf8=False,  # _Utf8Stream already guarantees it
                ),
            )
            for batch in reader:
                self.stream.took()
                numbers, ragged = _number_rows(next_no, batch.num_rows, pending)
                self._check_ragged(ragged)
                next_no += batch.num_rows + len(ragged)
                if batch.num_rows:
                    last = batch
                # Header = row 1, so data record k is row k + 1.
                yield _Chunk(batch, numbers + 1, [(n + 1, t, c) for n, t, c in ragged])
        except (LatentflowError, _Retry):
            raise
        except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError) as exc:
            if self.stream.error is None and "Empty CSV" in str(exc):
                return  # nothing after the header (the caller reports no rows)
            if (
                threaded
                and self.stream.error is None
                and isinstance(exc, pa.ArrowInvalid)
            ):
                raise _Retry(self.path, replace(self.hints, serial=True)) from None
            raise self._error(exc, next_no) from None
        finally:
            # Wakes a read-ahead waiting in read() before the reader is dropped.
            self.stream.close()
        if pending:
            self._check_ragged(pending)
            yield _Chunk(
                _empty_batch(names),
                np.zeros(0, np.int64),
                [(n + 1 if n > 0 else n, t, c) for n, t, c in pending],
            )
        self._check_tail(last, next_no)

    def _check_ragged(self, ragged: list[tuple[int, str, int]]) -> None:
        for number, text, _ in ragged:
            if ("\n" in text or "\r" in text) and text.count('"') % 2:
                where = f"row {number + 1}" if number > 0 else "its last row"
                raise InputError(
                    f'{self.path}: a quote (") opened in {where} is never closed; the'
                    " rest of the file was read as one cell"
                )

    def _check_tail(self, last: pa.RecordBatch | None, next_no: int) -> None:
        # An unclosed quote in the last cell swallows the rest of the file and
        # still yields a well-formed row; only the missing closing quote shows it.
        if last is None:
            return
        cell = last.column(last.num_columns - 1)[-1].as_py() or ""
        if cell[-1:] in ("\n", "\r") and not self.stream.tail.rstrip(b"\r\n").endswith(
            b'"'
        ):
            raise InputError(
                f'{self.path}: a quote (") opened near row {next_no} is never closed;'
                " the rest of the file was read as one cell"
            )

    def _error(self, exc: BaseException, next_no: int) -> LatentflowError:
        err = self.stream.error or exc
        after = f"after row {next_no}"
        if isinstance(err, UnicodeDecodeError):
            if self.encoding == "utf-8":
                raise _Retry(
                    self.path, replace(self.hints, latin1_at=self.stream.bad_offset)
                )
            return InputError(f"{self.path}: not valid {self.encoding} text {after}")
        if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
            return InputError(
                f"{self.path}: corrupt or truncated gzip data {after}"
                f" ({_first_line(err)})"
            )
        if isinstance(err, OSError) and not isinstance(err, pa.ArrowException):
            return InputError(f"cannot read {self.path}: {err.strerror or err}")
        msg = _first_line(err)
        if "straddl" in msg:
            return InputError(
                f"{self.path}: a row {after} is longer than the block size"
                f' ({self.block_size} bytes): most likely a quote (") is never'
                " closed (or raise block_size)"
            )
        return InputError(f"{self.path}: cannot parse the CSV {after}: {msg}")


# C0/C1 control characters other than tab and line breaks: text files have none.
_CONTROL_RE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _number_rows(
    start: int, n: int, pending: list[tuple[int, str, int]]
) -> tuple[np.ndarray, list[tuple[int, str, int]]]:
    """Record numbers of a batch's ``n`` rows, and the skipped rows among them.

    pyarrow reports the record number of every skipped (ragged) row but not of
    the rows it returns; the batch holds the first ``n`` numbers from ``start``
    that were not skipped. Skipped rows may already include later blocks'
    (pyarrow reads ahead), so only those below the batch's end are taken.
    """
    skipped = np.array([p[0] for p in pending if p[0] > 0], dtype=np.int64)
    k = 0
    while True:
        end = start + n + k
        kk = int(np.count_nonzero(skipped < end))
        if kk == k:
            break
        k = kk
    numbers = np.arange(start, start + n + k, dtype=np.int64)
    if k:
        numbers = numbers[~np.isin(numbers, skipped[:k])]
    taken = [p for p in pending if 0 < p[0] < start + n + k]
    pending[:] = [p for p in pending if not 0 < p[0] < start + n + k]
    return numbers, taken


def _empty_batch(names: Sequence[str]) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays(
        [pa.array([], pa.string()) for _ in names], names=list(names)
    )


class _ParquetSource:
    """A Parquet file, read as record batches with every column cast to text."""

    kind = "parquet"
    delimiter = ","

    def __init__(self, path: Path, fh: BinaryIO, block_size: int) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._fh = fh
        try:
            self._file = pq.ParquetFile(fh)
            schema = self._file.schema_arrow
        except (pa.ArrowException, OSError, ValueError) as exc:
            fh.close()
            raise InputError(
                f"{path} is not a readable Parquet file ({_first_line(exc)})"
            ) from None
        nested = [
            f.name
            for f in schema
            if pa.types.is_nested(f.type) and not pa.types.is_dictionary(f.type)
        ]
        if nested:
            raise InputError(
                f"{path}: columns {', '.join(nested)} are nested (list/struct/map);"
                " expected flat columns"
            )
        self.names = _clean_names(list(schema.names), path, self.warnings)
        self._batch_rows = max(1, min(1 << 17, int(block_size) // 64))

    def close(self) -> None:
        self._fh.close()

    def chunks(self) -> Iterator[_Chunk]:
        first = 1
        try:
            for batch in self._file.iter_batches(
                batch_size=self._batch_rows, use_threads=False
            ):
                cols = [_as_text(batch.column(i)) for i in range(batch.num_columns)]
                raw = pa.RecordBatch.from_arrays(cols, names=self.names)
                yield _Chunk(
                    raw, np.arange(first, first + raw.num_rows, dtype=np.int64)
                )
                first += raw.num_rows
        except LatentflowError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise InputError(
                f"{self.path}: cannot read Parquet data after row {first - 1}"
                f" ({_first_line(exc)})"
            ) from None


def _as_text(col: pa.Array) -> pa.Array:
    # Typed Parquet columns go through the same text path as CSV cells, so ids
    # and checks agree; floats print shortest-roundtrip, NaN as "nan" (missing).
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if pa.types.is_timestamp(col.type) and col.type.tz is not None:
        # Zoned instants as UTC text ("...Z"): typed as timestamps, in UTC.
        col = pc.cast(col, pa.timestamp("us", tz="UTC"), safe=False)
    return col if col.type == pa.string() else pc.cast(col, pa.string())


def _open_source(
    path: Path, block_size: int, hints: _Hints
) -> _CsvSource | _ParquetSource:
    fh = _open_binary(path)
    try:
        magic = fh.read(4)
        fh.seek(0)
        if magic == b"PAR1":
            return _ParquetSource(path, fh, block_size)
        return _CsvSource(path, fh, block_size, hints)
    except BaseException:
        fh.close()
        raise


# ------------------------------------------------------------------ dedup and ids


class _SeenSet:
    """Hashes of accepted rows so far, with where each was first seen.

    Sorted numpy runs merged LSM-style (8 bytes per row, +8 with positions),
    never a Python object per row; a lookup is one searchsorted per run.
    """

    def __init__(self, with_positions: bool) -> None:
        self._runs: list[tuple[np.ndarray, np.ndarray | None]] = []
        self._with_positions = with_positions

    def lookup(self, h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        found = np.zeros(len(h), bool)
        where = np.full(len(h), -1, np.int64)
        for keys, pos in self._runs:
            i = np.minimum(np.searchsorted(keys, h), len(keys) - 1)
            hit = (keys[i] == h) & ~found
            found |= hit
            if pos is not None:
                where[hit] = pos[i[hit]]
        return found, where

    def add_sorted(self, keys: np.ndarray, pos: np.ndarray | None) -> None:
        """Add new hashes, already sorted and not yet in the set."""
        if not len(keys):
            return
        self._runs.append((keys, pos if self._with_positions else None))
        while len(self._runs) > 1 and len(self._runs[-2][0]) <= 2 * len(
            self._runs[-1][0]
        ):
            (k1, p1), (k2, p2) = self._runs[-2:]
            # Merge two sorted runs: where each of k2 lands among k1.
            at = np.searchsorted(k1, k2, side="right") + np.arange(len(k2))
            second = np.zeros(len(k1) + len(k2), bool)
            second[at] = True
            merged = np.empty(len(second), np.uint64)
            merged[second], merged[~second] = k2, k1
            mpos = None
            if p1 is not None and p2 is not None:
                mpos = np.empty(len(second), np.int64)
                mpos[second], mpos[~second] = p2, p1
            self._runs[-2:] = [(merged, mpos)]


_FILE_SHIFT = 40  # positions pack (file index, row number) into one int64


class _WriteBehind:
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


# Cell problems come from models.cells (shared with serving); rules and
# duplicate keys use the same shape.
_Problem = CellProblem


# ----------------------------------------------------------------------- ingestion


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
    rules: Sequence[str] = (),
    expected_schema: dict | None = None,
    max_reject_fraction: float = 0.05,
    block_size: int = 8 << 20,
    publish: bool = True,
) -> IngestResult:
    """Validate, type and write one run date's input as ingested/rejected partitions.

    Parameters
    ----------
    source
        A CSV (optionally ``.gz``), a Parquet file, a directory of them, or a glob.
        Several files are read as one dataset, in sorted order, and must share
        the header.
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
    rules
        Domain rules (see :mod:`tasks.validate`); violating rows are rejected.
    expected_schema
        A model's input schema (``TableSchema.to_dict()``): it fixes kinds and
        roles; its keys and features must be present (else SchemaError); other
        input columns are dropped with a warning.
    max_reject_fraction
        More rejected rows than this share fails the run (nothing is written).
    block_size
        Bytes per CSV block; memory use is a few blocks, whatever the file size.
    publish
        Commit both partitions before returning. False leaves them sealed in
        ``.staging`` (the result names the staged directories) for the caller
        to commit with the run date's other outputs, or to discard.

    Returns
    -------
    IngestResult

    Raises
    ------
    InputError, SchemaError, ConfigError
        With a one-line message; no partition is written or changed.
    LatentflowError
        The partitions could not be written (disk full, permissions).
    """
    keys, features, exclude, rules = (
        _names_arg(keys),
        _names_arg(features),
        _names_arg(exclude) or [],
        _names_arg(rules) or [],
    )
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
    parsed_rules = [parse_rule(r) for r in rules]
    expected = TableSchema.from_dict(expected_schema) if expected_schema else None
    files = _resolve_sources(source)
    hints: dict[Path, _Hints] = {}
    while True:
        job = _Ingestion(
            source=str(source),
            files=files,
            data_dir=Path(data_dir),
            dataset=dataset,
            run_date=run_date,
            keys=keys,
            features=features,
            exclude=exclude,
            label=label,
            rules=parsed_rules,
            expected=expected,
            max_reject_fraction=float(max_reject_fraction),
            block_size=int(block_size),
            hints=hints,
            publish=publish,
        )
        try:
            return job.run()
        except _Retry as retry:
            # At most one retry per file: Latin-1 decodes any byte.
            if hints.get(retry.path) == retry.hints:
                raise InputError(f"{retry.path}: cannot be read") from None
            hints[retry.path] = retry.hints
        except OSError as exc:  # writing the partitions (reading maps its own)
            raise LatentflowError(
                f"cannot write the {dataset} partitions under {data_dir}:"
                f" {_first_line(exc)}"
            ) from None


def _names_arg(value: Any) -> list[str] | None:
    # A lone string is one name (or rule), not a sequence of characters.
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return list(value)


class _Ingestion:
    """One attempt at :func:`ingest`; state for the streaming loop."""

    def __init__(
        self,
        *,
        source: str,
        files: list[Path],
        data_dir: Path,
        dataset: str,
        run_date: date,
        keys: list[str] | None,
        features: list[str] | None,
        exclude: list[str],
        label: str | None,
        rules: list[Rule],
        expected: TableSchema | None,
        max_reject_fraction: float,
        block_size: int,
        hints: dict[Path, _Hints],
        publish: bool = True,
    ) -> None:
        self.publish = publish
        self.source = source
        self.files = files
        self.data_dir = data_dir
        self.dataset = dataset
        self.run_date = run_date
        self.keys_arg = keys
        self.features_arg = features
        self.exclude = exclude
        self.label_arg = label
        self.rules_parsed = rules
        self.expected = expected
        self.max_reject_fraction = max_reject_fraction
        self.block_size = block_size
        self.hints = hints
        self.warnings: list[str] = []
        self.rows_in = 0
        self.rows_accepted = 0
        self.rows_rejected = 0
        self.reasons: Counter[str] = Counter()
        self.file_rows: list[int] = [0] * len(files)
        self.delimiters: list[str] = [","] * len(files)
        self.kinds: list[str] = ["csv"] * len(files)
        # Warnings of each file's reader, reported first, in file order.
        self.file_warnings: list[list[str]] = [[] for _ in files]
        self.stats: dict[str, list[Any]] = {}
        self.dup_counts: dict[int, int] = {}

    # -------------------------------------------------------------- orchestration

    def run(self) -> IngestResult:
        first = _open_source(
            self.files[0], self.block_size, self.hints.get(self.files[0], _Hints())
        )
        try:
            self.names = first.names
            self._check_required(first.path)
        except BaseException:
            first.close()
            raise
        stream = self._chunks(first)
        try:
            sample, buffered = self._sample(stream)
            self.schema = self._build_schema(sample, first.path)
            _check_output_names(self.schema, first.path)
            del sample  # its slices pin the first block's buffers
            kinds = {c.name: c.kind for c in self.schema.columns}
            self.rules = compile_rules(self.rules_parsed, kinds)
            self.raw_index = {n: i for i, n in enumerate(self.names)}
            key_cols = self.schema.keys
            # By name, not by position: the same rows with their columns in
            # another order get the same ids.
            self.id_columns = sorted(key_cols or self.schema.names)
            self.seen = _SeenSet(with_positions=bool(key_cols))
            with (
                StagedPartition(
                    self.data_dir, "ingested", self.dataset, self.run_date
                ) as ing,
                StagedPartition(
                    self.data_dir, "rejected", self.dataset, self.run_date
                ) as rej,
            ):
                self._open_writers(ing.file(PART_NAME), rej.file(PART_NAME))
                try:
                    with ThreadPoolExecutor(
                        _PARSE_THREADS, thread_name_prefix="latentflow-parse"
                    ) as self.pool:
                        self._process_all(_chain(buffered, stream))
                except BaseException:
                    self._close_writers(failed=True)  # keeps this error
                    raise
                self._close_writers()
                self._finish()
                ing.seal()
                rej.seal()
                if self.publish:
                    commit_partitions(
                        self.data_dir, [(ing.path, ing.final), (rej.path, rej.final)]
                    )
        finally:
            stream.close()
            first.close()
        return IngestResult(
            ingested_dir=str(ing.final if self.publish else ing.path),
            rejected_dir=str(rej.final if self.publish else rej.path),
            published=self.publish,
            rows_in=self.rows_in,
            rows_accepted=self.rows_accepted,
            rows_rejected=self.rows_rejected,
            reject_reasons=dict(self.reasons.most_common()),
            warnings=[w for ws in self.file_warnings for w in ws] + self.warnings,
            schema=self.schema.to_dict(),
            source_files=[str(p) for p in self.files],
        )

    def _chunks(
        self, first: _CsvSource | _ParquetSource
    ) -> Iterator[tuple[int, _Chunk]]:
        """All files' chunks in order; each later header must match the first."""
        for fi, path in enumerate(self.files):
            src = (
                first
                if fi == 0
                else _open_source(path, self.block_size, self.hints.get(path, _Hints()))
            )
            try:
                if src.names != self.names:
                    raise InputError(
                        _header_mismatch(path, src.names, self.files[0], self.names)
                    )
                self.file_warnings[fi] = src.warnings
                self.delimiters[fi] = src.delimiter
                self.kinds[fi] = src.kind
                for chunk in src.chunks():
                    yield fi, chunk
            finally:
                src.close()

    def _sample(
        self, stream: Iterator[tuple[int, _Chunk]]
    ) -> tuple[dict[str, pa.Array], list[tuple[int, _Chunk]]]:
        """Buffer chunks until SAMPLE_ROWS rows; their first rows, per column."""
        buffered: list[tuple[int, _Chunk]] = []
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
            cols = [b.column(i) for b in batches] or [pa.array([], pa.string())]
            sample[name] = pa.concat_arrays(cols)
        return sample, buffered

    # ------------------------------------------------------------------- schema

    def _check_required(self, path: Path) -> None:
        present = set(self.names)
        if self.expected is not None:
            exp = self.expected
            missing = [c for c in exp.keys + exp.features if c not in present]
            if missing:
                raise SchemaError(
                    f"{path} lacks columns the expected schema requires:"
                    f" {', '.join(missing)}"
                )
            for arg, want, what in (
                (self.keys_arg, exp.keys, "keys"),
                (self.features_arg, exp.features, "features"),
            ):
                if arg is not None and list(arg) != want:
                    raise ConfigError(
                        f"{what} {list(arg)} conflict with the expected schema's"
                        f" {what} {want}"
                    )
            if self.label_arg is not None and self.label_arg != exp.label:
                raise ConfigError(
                    f"label {self.label_arg!r} conflicts with the expected schema's"
                    f" label {exp.label!r}"
                )
            return
        shown = _show_names(self.names)
        for what, names in (
            ("key", self.keys_arg or []),
            ("feature", self.features_arg or []),
            ("label", [self.label_arg] if self.label_arg else []),
        ):
            for name in names:
                if name not in present:
                    raise InputError(
                        f"{path}: {what} column {_show(name)} not found; the header"
                        f" has: {shown}"
                    )
        roles = Counter(
            [
                *(self.keys_arg or []),
                *(self.features_arg or []),
                *self.exclude,
                *([self.label_arg] if self.label_arg else []),
            ]
        )
        clash = [n for n, k in roles.items() if k > 1]
        if clash:
            raise ConfigError(
                f"column {_show(clash[0])} is given more than one role (keys, features,"
                " exclude, label)"
            )
        unknown = [n for n in self.exclude if n not in present]
        if unknown:
            self.warnings.append(
                f"exclude names columns not in the input: {', '.join(unknown)}"
            )

    def _build_schema(self, sample: dict[str, pa.Array], path: Path) -> TableSchema:
        if self.expected is not None:
            exp = self.expected
            extra = [n for n in self.names if n not in exp]
            if extra:
                self.warnings.append(
                    f"{path}: columns not in the expected schema are ignored:"
                    f" {', '.join(extra)}"
                )
            absent = [n for n in exp.names if n not in set(self.names)]
            if absent:
                self.warnings.append(
                    f"{path}: optional schema columns are absent: {', '.join(absent)}"
                )
            return TableSchema(tuple(exp.column(n) for n in self.names if n in exp))
        clean = {n: clean_text(a) for n, a in sample.items()}
        kinds = {n: self._infer_kind(n, clean[n]) for n in self.names}
        keys = self.keys_arg
        if keys is None:
            keys = self._infer_keys(clean, kinds)
        features = self.features_arg
        specs = []
        for name in self.names:
            kind = kinds[name]
            if name in keys:
                role = "key"
            elif name == self.label_arg:
                role = "label"
            elif name in self.exclude:
                role = "excluded"
            elif features is not None:
                role = "feature" if name in features else "excluded"
                if role == "feature" and kind == "text":
                    kind = "categorical"  # asked for as a feature: treat as one
            else:
                role = "excluded" if kind in _NOT_FEATURES else "feature"
            specs.append(ColumnSpec(name, kind, role))
        return TableSchema(tuple(specs))

    def _infer_kind(self, name: str, text: pa.Array) -> str:
        n = len(text) - text.null_count
        if n == 0:
            # Nothing to go by: what the rules compare it with, else numeric;
            # flagged as entirely missing later.
            return implied_kind(self.rules_parsed, name, self.names)
        if numeric_share(text, self.delimiters[0] == ";") >= _PARSE_SHARE:
            return "numeric"
        if date_share(text) >= _PARSE_SHARE:
            return "date"
        if timestamp_share(text) >= _PARSE_SHARE:
            return "timestamp"
        distinct = pc.count_distinct(text).as_py()
        limit = max(20, min(_CATEGORICAL_LIMIT, n // 2))
        return "categorical" if distinct <= limit else "text"

    def _infer_keys(
        self, clean: dict[str, pa.Array], kinds: dict[str, str]
    ) -> list[str]:
        usable = [
            n
            for n in self.names
            if n not in self.exclude
            and n != self.label_arg
            and clean[n].null_count == 0
            and len(clean[n])
        ]
        dates = [n for n in usable if kinds[n] in ("date", "timestamp")]
        rows = len(clean[self.names[0]])
        if not dates:
            self.warnings.append(
                "no key columns (no date column): _row_id hashes whole rows"
            )
            return []
        cats = [n for n in usable if kinds[n] == "categorical"]
        hashes = {n: hash_text(clean[n]) for n in [dates[0], *cats]}
        tries = 0
        for size in range(4):
            for combo in combinations(cats, size):
                tries += 1
                if tries > _MAX_KEY_TRIES:
                    break
                h = combine_hashes([hashes[dates[0]], *[hashes[c] for c in combo]])
                if len(np.unique(h)) == len(h):
                    keys = [dates[0], *combo]
                    self.warnings.append(
                        f"keys inferred from the first {rows} rows:"
                        f" ({', '.join(keys)}); pass keys=[...] to set them"
                    )
                    return keys
        self.warnings.append(
            f"no key columns: no date/categorical combination is unique in the first"
            f" {rows} rows; _row_id hashes whole rows"
        )
        return []

    # ------------------------------------------------------------------ writing

    def _open_writers(self, ingested: Path, rejected: Path) -> None:
        fields = [pa.field(ROW_ID, pa.int64(), nullable=False)]
        for c in self.schema.columns:
            fields.append(pa.field(c.name, _ARROW_TYPES[c.kind]))
        meta = {
            "latentflow.schema": json.dumps(self.schema.to_dict()),
            "latentflow.source": self.source,
            "latentflow.source_files": json.dumps([str(p) for p in self.files]),
        }
        self.out_schema = pa.schema(fields, metadata=meta)
        self.rej_schema = pa.schema(
            [
                pa.field(ROW_NUMBER, pa.int64()),
                pa.field(SOURCE_FILE, pa.string()),
                pa.field(REJECT_REASON, pa.string()),
                *[pa.field(n, pa.string()) for n in self.names],
                pa.field(RAW_LINE, pa.string()),
            ],
            metadata={"latentflow.source": self.source},
        )
        # Random 64-bit ids never dictionary-encode well: trying costs ~15% of
        # the write time.
        self.writer = pq.ParquetWriter(
            ingested, self.out_schema, use_dictionary=self.schema.names or False
        )
        self.rej_writer = pq.ParquetWriter(rejected, self.rej_schema)
        self.write_behind = _WriteBehind()

    def _close_writers(self, failed: bool = False) -> None:
        try:
            self.write_behind.close(discard=failed)
        finally:
            for w in (self.writer, self.rej_writer):
                w.close()

    # --------------------------------------------------------------- processing

    def _process_all(self, chunks: Iterable[tuple[int, _Chunk]]) -> None:
        """Process blocks in order, with the next block's pure work in the pool."""
        ahead: _Block | None = None
        for fi, chunk in chunks:
            started = self._start(fi, chunk)
            if ahead is not None:
                self._process(ahead)
            ahead = started
        if ahead is not None:
            self._process(ahead)

    def _start(self, fi: int, chunk: _Chunk) -> _Block:
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
        decimal_comma = self.delimiters[fi] == ";"
        hashed = set(self.id_columns)
        for spec in self.schema.columns:
            block.columns[spec.name] = self.pool.submit(
                _parse_column,
                spec,
                raw.column(self.raw_index[spec.name]),
                decimal_comma,
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
        raw = chunk.raw
        n = raw.num_rows
        self.rows_in += n + len(chunk.ragged)
        self.file_rows[fi] += n + len(chunk.ragged)
        if chunk.ragged:
            self._reject_ragged(fi, chunk.ragged)
        if n == 0:
            return
        parsed: dict[str, Parsed] = {}
        problems: list[_Problem] = []
        for spec in self.schema.columns:
            parsed[spec.name] = p = block.columns[spec.name].result()[0]
            problems += _cell_problems(spec, p)
        for rule, future in zip(self.rules, block.rules, strict=True):
            broken = future.result()
            if broken is not None:
                problems.append(_rule_problem(rule, broken, parsed))
        bad = np.zeros(n, bool)
        for prob in problems:
            bad |= prob.mask
        assert block.hashes is not None  # set for every non-empty block
        hashes, order = block.hashes.result()
        ids, dup = self._row_ids(fi, chunk.row_numbers, parsed, hashes, order, ~bad)
        if dup is not None:
            problems.append(dup)
            bad |= dup.mask
        accepted = np.flatnonzero(~bad)
        self._write_accepted(accepted, n, ids, parsed)
        if bad.any():
            self._write_rejected(fi, chunk, np.flatnonzero(bad), problems)

    def _row_ids(
        self,
        fi: int,
        numbers: np.ndarray,
        parsed: dict[str, Parsed],
        hashes: np.ndarray,
        by_hash: np.ndarray,
        ok: np.ndarray,
    ) -> tuple[np.ndarray, _Problem | None]:
        """Ids for all rows, and the duplicate-key problem among the ``ok`` ones.

        Works on the candidates sorted by hash (``by_hash`` sorts all rows; a
        subset of a sorted order is sorted): equal hashes are adjacent, and
        the new ones come out already sorted for the seen-set.
        """
        cand = np.flatnonzero(ok)
        keyed = bool(self.schema.keys)
        order = by_hash[ok[by_hash]]
        hs = hashes[order]
        starts = np.flatnonzero(np.r_[True, hs[1:] != hs[:-1]]) if len(hs) else cand
        sizes = np.diff(np.r_[starts, len(hs)])
        found, where = self.seen.lookup(hs)
        if not keyed:
            return self._keyless_ids(hashes, order, hs, starts, sizes, found), None
        earliest = (
            np.repeat(np.minimum.reduceat(order, starts), sizes) if len(hs) else order
        )
        dup = found | (order != earliest)
        new = ~dup
        self.seen.add_sorted(
            hs[new], (np.int64(fi) << _FILE_SHIFT) | numbers[order[new]]
        )
        if not dup.any():
            return hashes, None
        first_pos = np.where(
            found, where, (np.int64(fi) << _FILE_SHIFT) | numbers[earliest]
        )
        dup_rows = order[dup]
        mask = np.zeros(len(hashes), bool)
        mask[dup_rows] = True
        pos_of = dict(zip(dup_rows.tolist(), first_pos[dup].tolist(), strict=True))
        keys = self.schema.keys

        def describe(idx: np.ndarray) -> list[str]:
            cols = [parsed[k].text.take(pa.array(idx)).to_pylist() for k in keys]
            out = []
            for j, i in enumerate(idx.tolist()):
                pos = pos_of[i]
                ffi, row = pos >> _FILE_SHIFT, pos & ((1 << _FILE_SHIFT) - 1)
                where_txt = f"row {row}" + (
                    f" of {self.files[ffi]}" if ffi != fi else ""
                )
                vals = ", ".join(_clip(c[j]) for c in cols)
                out.append(
                    f"duplicate key ({', '.join(keys)}) = ({vals}) first seen at"
                    f" {where_txt}"
                )
            return out

        return hashes, _Problem(mask, "duplicate key", describe)

    def _keyless_ids(
        self,
        hashes: np.ndarray,
        order: np.ndarray,
        hs: np.ndarray,
        starts: np.ndarray,
        sizes: np.ndarray,
        found: np.ndarray,
    ) -> np.ndarray:
        """Whole-row hashes; the k-th identical row (k > 0) gets a k-salted id."""
        rank = np.arange(len(hs)) - np.repeat(starts, sizes)
        prior = np.zeros(len(hs), np.int64)
        if found.any():
            prior[found] = [self.dup_counts.get(int(x), 1) for x in hs[found].tolist()]
        occ = prior + rank
        ids = hashes.copy()
        repeat = occ > 0
        if repeat.any():
            ids[order[repeat]] = occurrence_hash(hs[repeat], occ[repeat])
        self.seen.add_sorted(hs[starts][~found[starts]], None)
        totals = sizes + prior[starts]
        for s, total in zip(
            starts[totals > 1].tolist(), totals[totals > 1].tolist(), strict=True
        ):
            self.dup_counts[int(hs[s])] = total
        return ids

    def _write_accepted(
        self, idx: np.ndarray, n: int, ids: np.ndarray, parsed: dict[str, Parsed]
    ) -> None:
        if not len(idx):
            return
        everything = len(idx) == n
        take = None if everything else pa.array(idx)
        arrays = [
            pa.array(ids.view(np.int64) if everything else ids[idx].view(np.int64))
        ]
        for c in self.schema.columns:
            values = parsed[c.name].values
            arr = values if take is None else values.take(take)
            arrays.append(arr)
            self._update_stats(c.name, arr)
        self.write_behind.submit(
            self.writer, pa.RecordBatch.from_arrays(arrays, schema=self.out_schema)
        )
        self.rows_accepted += len(idx)

    def _update_stats(self, name: str, arr: pa.Array) -> None:
        """Count values and track whether a column is constant (for warnings)."""
        st = self.stats.setdefault(name, [0, None, False])  # count, first, varied
        count = len(arr) - arr.null_count
        st[0] += count
        if not count or st[2]:
            return  # nothing new, or already known to vary: no more work
        if st[1] is None:
            st[1] = pc.first(arr, skip_nulls=True)
        st[2] = not pc.all(pc.equal(arr, st[1])).as_py()

    def _write_rejected(
        self, fi: int, chunk: _Chunk, idx: np.ndarray, problems: list[_Problem]
    ) -> None:
        reasons: dict[int, list[str]] = {}
        for prob in problems:
            rows = np.flatnonzero(prob.mask)
            if not len(rows):
                continue
            self.reasons[prob.category] += len(rows)
            for i, text in zip(rows.tolist(), prob.describe(rows), strict=True):
                reasons.setdefault(i, []).append(text)
        take = pa.array(idx)
        cols = [chunk.raw.column(i).take(take) for i in range(len(self.names))]
        self._emit_rejected(
            chunk.row_numbers[idx],
            fi,
            ["; ".join(reasons[i]) for i in idx.tolist()],
            cols,
            pa.nulls(len(idx), pa.string()),
        )

    def _reject_ragged(self, fi: int, ragged: list[tuple[int, str, int]]) -> None:
        width = len(self.names)
        rows: list[list[str | None]] = []
        reasons = []
        for _, text, found in ragged:
            try:
                fields = next(csv.reader([text], delimiter=self.delimiters[fi]), [])
            except csv.Error:
                fields = []
            rows.append([*fields[:width], *[None] * (width - len(fields))])
            reason = f"expected {width} fields, found {found}"
            reasons.append(reason)
            self.reasons[reason] += 1
        cols = [pa.array([r[j] for r in rows], pa.string()) for j in range(width)]
        self._emit_rejected(
            np.array([r[0] for r in ragged], np.int64),
            fi,
            reasons,
            cols,
            pa.array([r[1] for r in ragged], pa.string()),
        )

    def _emit_rejected(
        self,
        numbers: np.ndarray,
        fi: int,
        reasons: list[str],
        cols: list[pa.Array],
        raw_line: pa.Array,
    ) -> None:
        n = len(reasons)
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(numbers, pa.int64()),
                pa.array([str(self.files[fi])] * n, pa.string()),
                pa.array(reasons, pa.string()),
                *cols,
                raw_line,
            ],
            schema=self.rej_schema,
        )
        self.write_behind.submit(self.rej_writer, batch)
        self.rows_rejected += n

    # ------------------------------------------------------------------- finish

    def _finish(self) -> None:
        if self.rows_in == 0:
            if len(self.files) == 1:
                what = (
                    "no rows" if self.kinds[0] == "parquet" else "a header but no rows"
                )
                raise InputError(f"{self.files[0]} has {what}")
            raise InputError(
                f"{self.source}: none of its {len(self.files)} files has data rows"
            )
        if len(self.files) > 1:
            for path, rows in zip(self.files, self.file_rows, strict=True):
                if rows == 0:
                    self.warnings.append(f"{path} has a header but no rows")
        share = self.rows_rejected / self.rows_in
        if share > self.max_reject_fraction:
            top = "; ".join(f"{r} ({k})" for r, k in self.reasons.most_common(3))
            raise InputError(
                f"{self.source}: {self.rows_rejected} of {self.rows_in} rows rejected"
                f" ({share:.1%}), more than max_reject_fraction"
                f" {self.max_reject_fraction:.1%}; top reasons: {top}; nothing was"
                " written"
            )
        for c in self.schema.columns:
            if c.role == "key":
                continue
            count, first, varied = self.stats.get(c.name, [0, None, False])
            if count == 0:
                self.warnings.append(f"column {_show(c.name)} is entirely missing")
            elif not varied:
                value = first.as_py()
                self.warnings.append(
                    f"column {_show(c.name)} is constant ({_show(value)})"
                )


_ARROW_TYPES = {
    "numeric": pa.float64(),
    "date": pa.date32(),
    "timestamp": TIMESTAMP_TYPE,
    "categorical": pa.string(),
    "text": pa.string(),
}


# Kinds that are never features unless asked for (keys or context columns).
_NOT_FEATURES = ("text", "date", "timestamp")


def _chain(
    first: list[tuple[int, _Chunk]], rest: Iterable[tuple[int, _Chunk]]
) -> Iterator[tuple[int, _Chunk]]:
    """The buffered sample chunks, then the rest; each dropped once handed out."""
    first.reverse()
    while first:
        yield first.pop()
    yield from rest


def _check_output_names(schema: TableSchema, path: Path) -> None:
    """Key columns are copied into latent/, every column into ingested/: none
    may take the name of a column latentflow writes there."""
    for c in schema.columns:
        clash = c.name == cols.PARTITION or (
            c.role == "key" and cols.is_output_column(c.name)
        )
        if clash:
            what = "key column" if c.role == "key" else "column"
            raise InputError(
                f"{path}: {what} {_show(c.name)} has the name of an output column;"
                f" reserved: {cols.describe_output_columns()}; rename it"
            )


def _header_mismatch(path: Path, names: list[str], first: Path, want: list[str]) -> str:
    missing = [n for n in want if n not in names]
    extra = [n for n in names if n not in want]
    if not missing and not extra:
        return f"{path}: same columns as {first} but in a different order"
    parts = []
    if missing:
        parts.append(f"missing {_show_names(missing)}")
    if extra:
        parts.append(f"extra {_show_names(extra)}")
    return f"{path}: header differs from {first}: {'; '.join(parts)}"


_ParsedColumn = tuple[Parsed, np.ndarray | None]


@dataclass
class _Block:
    """One block on its way: the chunk and its pure work, running in the pool."""

    fi: int
    chunk: _Chunk
    columns: dict[str, Future[_ParsedColumn]] = field(default_factory=dict)
    rules: list[Future[np.ndarray | None]] = field(default_factory=list)
    hashes: Future[tuple[np.ndarray, np.ndarray]] | None = None


def _violations(
    rule: CompiledRule, columns: dict[str, Future[_ParsedColumn]]
) -> np.ndarray | None:
    return rule.violations({c: f.result()[0].values for c, f in columns.items()})


def _sorted_hashes(
    columns: list[Future[_ParsedColumn]], stable: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Row hashes of a block and the rows sorted by them.

    Keyed rows only need each group's earliest row (a cheaper unstable sort and
    a reduceat later); keyless copies are ranked in file order (stable sort).
    """
    hashes = combine_hashes([f.result()[1] for f in columns])
    return hashes, np.argsort(hashes, kind="stable" if stable else "quicksort")


def _parse_column(
    spec: ColumnSpec, raw: pa.Array, decimal_comma: bool, hashed: bool
) -> _ParsedColumn:
    """One column of a block, typed, and the hash of its text if it makes ids.

    Pure (no shared state), so blocks' columns parse in the worker threads:
    Arrow and numpy release the GIL for the heavy parts.
    """
    p = parse_cells(spec.kind, raw, decimal_comma)
    return p, hash_text(p.text) if hashed else None


def _cell_problems(spec: ColumnSpec, p: Parsed) -> list[_Problem]:
    return cell_problems(spec.name, spec.kind, spec.role, p)


def _rule_problem(
    rule: CompiledRule, broken: np.ndarray, parsed: dict[str, Parsed]
) -> _Problem:
    def describe(idx: np.ndarray) -> list[str]:
        take = pa.array(idx)
        vals = {c: parsed[c].text.take(take).to_pylist() for c in rule.columns}
        return [
            f"rule {rule.text!r} violated ("
            + ", ".join(f"{c}={_clip(vals[c][j])}" for c in rule.columns)
            + ")"
            for j in range(len(idx))
        ]

    return _Problem(broken, f"rule {rule.text!r}", describe)


ingest_task = task(ingest, name="ingest", **IO)
