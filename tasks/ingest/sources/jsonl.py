"""JSON lines input (``.jsonl``, ``.ndjson``, gzip'd too): one object per line.

* The columns are the objects' fields, in order of first appearance among the
  lines of the first MiB (the header of this format). A later line with
  another field is rejected; a field a line lacks is a missing value.
* Values become cell text as CSV cells are, then go through the same typing:
  strings as they are, numbers in JSON notation, ``true``/``false``, ``null``
  missing; a nested array or object is kept as its JSON text.
* A line that is not valid JSON, or not an object, is rejected with its raw
  text in ``_raw_line``; ``_row_number`` is the line number (blank lines count).
* The file must be UTF-8 text whose first non-blank line is a JSON object:
  anything else is a one-line error.
"""

from __future__ import annotations

import codecs
import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pyarrow as pa

from tasks.errors import InputError
from tasks.ingest.problems import clip, first_line, show
from tasks.ingest.sources import Chunk, Hints, RawReject, clean_names

_HEAD_BYTES = 1 << 20  # lines whose fields name the columns
_READ_BYTES = 1 << 16
_EXPECTED = "expected JSON lines: one JSON object per line, UTF-8"


class JsonLinesSource:
    """A JSON-lines file (plain or gzip'd), read block by block."""

    no_rows = "no rows"
    decimal_comma = False

    def __init__(
        self, path: Path, fh: BinaryIO, block_size: int, hints: Hints | None = None
    ) -> None:
        self.path = path
        self.warnings: list[str] = []
        self._fh = fh
        raw: BinaryIO = fh
        if fh.read(2) == b"\x1f\x8b":
            raw = gzip.GzipFile(fileobj=fh, mode="rb")  # type: ignore[assignment]
        fh.seek(0)
        self._raw = raw
        self._block_size = max(int(block_size), 64)
        head = self._read(_HEAD_BYTES, 0)
        if not head:
            raise InputError(f"{path} is empty")
        if b"\x00" in head[:_READ_BYTES]:
            raise InputError(
                f"{path} does not look like text: it contains binary data; {_EXPECTED}"
            )
        self._head = head.removeprefix(codecs.BOM_UTF8)
        whole = len(head) < _HEAD_BYTES
        lines = self._head.split(b"\n")
        if not whole:
            lines = lines[:-1]  # cut mid-line
        fields: dict[str, None] = {}
        seen_object = False
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            value = _loads(self._decode(number, line))
            if not seen_object and not isinstance(value, dict):
                raise InputError(
                    f"{path}: line {number} is not a JSON object"
                    f" ({_what(value, line)}); {_EXPECTED}"
                )
            seen_object = True
            if isinstance(value, dict):
                fields.update(dict.fromkeys(value))
        if not seen_object and not whole:
            raise InputError(
                f"{path}: no line ends within the first {_HEAD_BYTES} bytes;"
                f" {_EXPECTED}"
            )
        if not seen_object:
            raise InputError(f"{path} is empty (only blank lines)")
        self._fields = list(fields)
        self.names = clean_names(self._fields, path, self.warnings)
        self._index = {name: i for i, name in enumerate(self._fields)}

    def close(self) -> None:
        self._raw.close()
        self._fh.close()

    def _decode(self, number: int, line: bytes) -> str:
        try:
            return line.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            raise InputError(
                f"{self.path}: line {number} is not valid UTF-8 (byte"
                f" {exc.start + 1}); {_EXPECTED}"
            ) from None

    def _read(self, n: int, line: int) -> bytes:
        try:
            return self._raw.read(n)
        except (OSError, EOFError, zlib.error) as exc:
            where = f" after line {line}" if line else ""
            raise InputError(
                f"{self.path}: corrupt or truncated gzip data{where}"
                f" ({first_line(exc)})"
            ) from None

    def _lines(self) -> Iterator[tuple[int, bytes]]:
        """(line number, line) of every line, read in pieces."""
        pending, number = self._head, 0
        self._head = b""
        while True:
            more = self._read(_READ_BYTES, number)
            pending += more
            lines = pending.split(b"\n")
            pending = lines.pop() if more else b""
            for line in lines:  # at the end: the last line, newline or not
                number += 1
                yield number, line
            if not more:
                return

    def chunks(self) -> Iterator[Chunk]:
        width = len(self.names)
        columns: list[list[str | None]] = [[] for _ in range(width)]
        numbers: list[int] = []
        rejects: list[RawReject] = []
        size = 0
        for number, line in self._lines():
            if not line.strip():
                continue
            size += len(line) + 1
            text = self._decode(number, line)
            cells, reject = self._cells(number, text)
            if reject is not None:
                rejects.append(reject)
            else:
                numbers.append(number)
                for j, cell in enumerate(cells):
                    columns[j].append(cell)
            if size >= self._block_size:
                yield self._chunk(columns, numbers, rejects)
                columns = [[] for _ in range(width)]
                numbers, rejects, size = [], [], 0
        if numbers or rejects:
            yield self._chunk(columns, numbers, rejects)

    def _chunk(
        self,
        columns: list[list[str | None]],
        numbers: list[int],
        rejects: list[RawReject],
    ) -> Chunk:
        batch = pa.RecordBatch.from_arrays(
            [pa.array(c, pa.string()) for c in columns], names=self.names
        )
        return Chunk(batch, np.array(numbers, np.int64), rejects)

    def _cells(
        self, number: int, text: str
    ) -> tuple[list[str | None], RawReject | None]:
        """One line's cells, or why it is rejected."""
        width = len(self.names)
        try:
            value = json.loads(text)
        except ValueError as exc:
            msg = getattr(exc, "msg", "not JSON")
            col = getattr(exc, "colno", None)
            at = f" at column {col}" if col is not None else ""
            reason = f"not valid JSON ({msg}{at})"
            return [], RawReject(number, text, [None] * width, "not valid JSON", reason)
        if not isinstance(value, dict):
            reason = f"not a JSON object ({_what(value, text)})"
            return [], RawReject(
                number, text, [None] * width, "not a JSON object", reason
            )
        cells: list[str | None] = [None] * width
        extra = []
        for key, item in value.items():
            j = self._index.get(key)
            if j is None:
                extra.append(key)
            else:
                cells[j] = _cell(item)
        if extra:
            reason = (
                f"field {show(extra[0])} is not a column (the columns are the"
                " fields of the first lines)"
            )
            return [], RawReject(number, text, cells, "unknown field", reason)
        return cells, None


def _loads(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return _NOT_JSON


_NOT_JSON = object()


def _what(value: Any, line: bytes | str) -> str:
    if value is _NOT_JSON:
        text = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        return f"not valid JSON: {clip(text.strip(), 40)!r}"
    if isinstance(value, bool):
        return "a JSON boolean"
    if isinstance(value, (int, float)):
        return "a JSON number"
    return {list: "a JSON array", str: "a JSON string"}.get(type(value), "JSON null")


def _cell(value: Any) -> str | None:
    """A JSON value as cell text: what a CSV cell with it would say."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
