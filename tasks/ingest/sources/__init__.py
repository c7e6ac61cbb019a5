"""Input readers behind one protocol, :class:`Source`, picked by format.

A reader turns one file into blocks of raw string cells (:class:`Chunk`):
typing, checks, ids and writing are the same for every format, downstream. The
formats and their readers are listed once, in :mod:`tasks.ingest.formats`;
:func:`open_source` opens a file with the reader its magic bytes or name
select.

A reader's contract:

* ``__init__(path, fh, block_size, hints)`` reads the header (or whatever
  names the columns) and raises a one-line
  :class:`~tasks.errors.InputError` for a file it cannot read; ``fh`` is the
  open binary file, which the reader owns from then on;
* ``names`` are the column names, cleaned by :func:`clean_names`;
* ``chunks()`` yields blocks of at most about ``block_size`` bytes, every
  column a ``pa.string()`` array (null = no value), with 1-based row numbers
  for reject messages, and rows that could not be split into cells as
  :class:`RawReject`;
* a reader may raise :class:`Retry` to have the ingestion start again with
  other :class:`Hints` for this file (at most once per file).
"""

from __future__ import annotations

import importlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np
import pyarrow as pa

from tasks.errors import InputError
from tasks.ingest.formats import Format, format_of
from tasks.ingest.layout import RESERVED
from tasks.ingest.problems import show


@dataclass(frozen=True)
class Hints:
    """How to read one file, learnt from a failed attempt (see :class:`Retry`)."""

    latin1_at: int | None = None  # not UTF-8 after all: first bad byte
    # A row with a wrong field count: read serially, the only way pyarrow
    # numbers such rows (the threaded reader is faster on clean files).
    serial: bool = False


class Retry(Exception):
    """Internal: restart the ingestion, reading ``path`` as ``hints`` say."""

    def __init__(self, path: Path, hints: Hints) -> None:
        super().__init__(str(path))
        self.path = path
        self.hints = hints


@dataclass(frozen=True)
class RawReject:
    """A row that could not be split into cells: rejected as it was read."""

    number: int  # its row number, as ``_row_number`` reports it
    text: str  # the raw line, kept in ``_raw_line``
    fields: list[str | None]  # what could be made of its cells, one per column
    category: str  # counted in ``reject_reasons``
    reason: str  # its ``_reject_reason``


@dataclass
class Chunk:
    """One block of one file: raw string cells, their row numbers, bad rows."""

    raw: pa.RecordBatch
    row_numbers: np.ndarray  # int64, one per raw row
    rejects: list[RawReject] = field(default_factory=list)


class Source(Protocol):
    """What the ingestion needs of a reader (see the module docstring)."""

    path: Path
    names: list[str]
    warnings: list[str]
    #: Numbers may use a decimal comma ("12,5"): semicolon-separated CSV.
    decimal_comma: bool
    #: How :func:`tasks.ingest.run.ingest` says the file had no data rows.
    no_rows: str

    def chunks(self) -> Iterator[Chunk]: ...

    def close(self) -> None: ...


def open_binary(path: Path) -> BinaryIO:
    """``path`` opened for reading; a one-line InputError if it cannot be."""
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"input file {path} does not exist") from None
    except PermissionError:
        raise InputError(f"cannot read {path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None


def reader_class(fmt: Format) -> type[Source]:
    """The reader class of ``fmt`` (its module is imported on first use)."""
    module, _, name = fmt.reader.partition(":")
    cls: type[Source] = getattr(importlib.import_module(module), name)
    return cls


def open_source(path: Path, block_size: int, hints: Hints) -> Source:
    """Open ``path`` with the reader of its format."""
    fh = open_binary(path)
    try:
        head = fh.read(8)
        fh.seek(0)
        return reader_class(format_of(path, head))(path, fh, block_size, hints)  # type: ignore[call-arg]
    except BaseException:
        fh.close()
        raise


def clean_names(names: list[str], path: Path, warnings: list[str]) -> list[str]:
    """Strip header names, name blank ones, refuse duplicates and reserved ones."""
    out = []
    for i, name in enumerate(names):
        name = name.strip().lstrip("\ufeff").strip()
        if not name:
            name = f"unnamed_{i}"
            warnings.append(
                f"{path}: column {i + 1} has no name; called it {show(name)}"
            )
        out.append(name)
    counts = Counter(out)
    dups = [n for n in counts if counts[n] > 1]
    if dups:
        where_of = {n: [str(i + 1) for i, m in enumerate(out) if m == n] for n in dups}
        where = "; ".join(
            f"{show(n)} (columns {', '.join(where_of[n])})" for n in dups[:5]
        )
        raise InputError(f"{path}: duplicated column names in the header: {where}")
    reserved = [n for n in out if n in RESERVED]
    if reserved:
        raise InputError(
            f"{path}: column name {show(reserved[0])} is reserved for ingestion"
            " output; rename it"
        )
    return out


def empty_batch(names: list[str]) -> pa.RecordBatch:
    """A batch of ``names`` with no rows."""
    return pa.RecordBatch.from_arrays(
        [pa.array([], pa.string()) for _ in names], names=list(names)
    )
