"""CSV input: plain or gzip'd, any common encoding, read block by block.

* Delimiter: sniffed from the header line. A comma wins if there is one, else
  the most frequent of ``;``, tab and ``|`` (with a warning). Semicolon files
  may use a decimal comma (``12,5``) in numeric columns, as European exports do.
* Encoding: UTF-8 (BOM or not), UTF-16/UTF-32 with a BOM; anything that is not
  valid UTF-8 is read as Latin-1, with a warning. NUL bytes or many control
  characters mean binary data: an error.
* ``_row_number`` of a rejected row is its record number with the header as 1,
  i.e. its line number unless the file has blank lines or quoted line breaks.
* Threads: pyarrow's reader splits the next blocks into cells on its own
  threads while the ingestion works on the last one. A file with a
  wrong-field-count row is read again serially from the start
  (:class:`~tasks.ingest.sources.Retry`): only pyarrow's serial reader numbers
  such rows.
"""

from __future__ import annotations

import atexit
import codecs
import csv
import gzip
import io
import re
import sys
import threading
import weakref
import zlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.errors import InputError, LatentflowError
from tasks.ingest.problems import field_count_reason, first_line
from tasks.ingest.sources import (
    Chunk,
    Hints,
    RawReject,
    Retry,
    clean_names,
    empty_batch,
)

_HEAD_BYTES = 1 << 20  # the header must fit in the first MiB
_SNIFF_BYTES = 1 << 16  # encoding/binary/delimiter checks look at this much
_READ_AHEAD = 1  # CSV blocks pyarrow may read beyond the one handed out


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
        # Whether anything but line breaks came after the header: without it
        # pyarrow refuses the file as empty, which is "no rows" to us.
        self.saw_data = False
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
            if not self.saw_data and out.strip(b"\r\n"):
                self.saw_data = True
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


class CsvSource:
    """A CSV file (plain or gzip'd, any supported encoding), read block by block."""

    no_rows = "a header but no rows"

    def __init__(self, path: Path, fh: BinaryIO, block_size: int, hints: Hints) -> None:
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
                f"{path}: corrupt or truncated gzip data ({first_line(exc)})"
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
        header_line = next((ln for ln in text.splitlines() if ln.strip()), "")
        self.delimiter = _sniff_delimiter(header_line)
        self.decimal_comma = self.delimiter == ";"
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
                f"{path}: cannot read the header row ({first_line(exc)})"
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
        self.names = clean_names(header, path, self.warnings)
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

    def chunks(self) -> Iterator[Chunk]:
        """Blocks of raw string cells; rows with a wrong field count come aside.

        Read first with pyarrow's threads (blocks are split into cells ahead,
        on the other cores, while the caller validates the last one) and no
        handler for rows with a wrong field count: any parse error, such a
        row included, restarts the ingestion reading this file serially
        (:class:`Retry`), which rejects those rows or words the error exactly
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
                yield Chunk(
                    batch,
                    numbers + 1,
                    [self._reject(n + 1, t, c) for n, t, c in ragged],
                )
        except (LatentflowError, Retry):
            raise
        except (pa.ArrowException, OSError, EOFError, zlib.error, ValueError) as exc:
            if self.stream.error is None and not self.stream.saw_data:
                return  # nothing after the header (the caller reports no rows)
            if (
                threaded
                and self.stream.error is None
                and isinstance(exc, pa.ArrowInvalid)
            ):
                raise Retry(self.path, replace(self.hints, serial=True)) from None
            raise self._error(exc, next_no) from None
        finally:
            # Wakes a read-ahead waiting in read() before the reader is dropped.
            self.stream.close()
        if pending:
            self._check_ragged(pending)
            yield Chunk(
                empty_batch(names),
                np.zeros(0, np.int64),
                [self._reject(n + 1 if n > 0 else n, t, c) for n, t, c in pending],
            )
        self._check_tail(last, next_no)

    def _reject(self, number: int, text: str, found: int) -> RawReject:
        """A row with a wrong field count, split as far as it goes."""
        width = len(self.names)
        try:
            fields = next(csv.reader([text], delimiter=self.delimiter), [])
        except csv.Error:
            fields = []
        cells: list[str | None] = [*fields[:width], *[None] * (width - len(fields))]
        reason = field_count_reason(width, found)
        return RawReject(number, text, cells, reason, reason)

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
                raise Retry(
                    self.path, replace(self.hints, latin1_at=self.stream.bad_offset)
                )
            return InputError(f"{self.path}: not valid {self.encoding} text {after}")
        if isinstance(err, (EOFError, zlib.error, gzip.BadGzipFile)):
            return InputError(
                f"{self.path}: corrupt or truncated gzip data {after}"
                f" ({first_line(err)})"
            )
        if isinstance(err, OSError) and not isinstance(err, pa.ArrowException):
            return InputError(f"cannot read {self.path}: {err.strerror or err}")
        msg = first_line(err)
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
