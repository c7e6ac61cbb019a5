"""Cell parsing shared by batch ingest and the served model: one set of rules.

Batch ingest (``tasks/ingest/``) and the MLflow pyfunc both turn raw cells into
typed values here, so a raw row gets the same missing values, the same numbers
and the same rejections in both paths: null markers (``NA``, ``-``, empty, ...)
are missing; junk (``abc``) and non-finite numbers (``inf``, ``1e999``) are
problems that reject the row in batch and fill the ``error`` column in serving.
Everything works on whole pyarrow arrays.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

NULL_MARKERS: tuple[str, ...] = (
    "",
    "NA",
    "N/A",
    "NaN",
    "nan",
    "null",
    "NULL",
    "None",
    "-",
    "?",
)

# Every upper/lower-case spelling of the markers: ``is_in`` on this set is cheaper
# than lower-casing every cell first.
_NULL_SET = pa.array(
    sorted(
        {
            "".join(chars)
            for marker in NULL_MARKERS
            for chars in itertools.product(*[(c.lower(), c.upper()) for c in marker])
        }
    ),
    pa.string(),
)
_FLOAT_RE = r"^[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?$"
_DATE_RE = r"^\d{4}-\d{2}-\d{2}$"
_NONFINITE_RE = r"(?i)^[+-]?(?:inf|infinity|nan)$"
_NULL_STR = pa.scalar(None, pa.string())
#: Largest magnitude a numeric cell may have: the model's float32 finite range.
FLOAT32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- cells


def _mask(arr: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean array as numpy, nulls counted as False."""
    return np.asarray(pc.fill_null(arr, False).to_numpy(zero_copy_only=False), bool)


def _with_nulls(arr: pa.Array, missing: pa.Array) -> pa.Array:
    """``arr`` with the cells flagged in ``missing`` set to null."""
    if not pc.any(missing).as_py():
        return arr
    return pc.if_else(missing, _NULL_STR, arr)


def clean_text(raw: pa.Array) -> pa.Array:
    """Stripped cell text with the null markers turned into nulls."""
    if _may_need_trim(raw):
        raw = pc.utf8_trim_whitespace(raw)
    return _markers_to_null(raw)


# Bytes a cell may start or end with when it needs trimming: ASCII whitespace,
# and any non-ASCII byte (it may belong to a Unicode space such as U+00A0).
_TRIM_BYTES = np.zeros(256, bool)
_TRIM_BYTES[list(b" \t\n\r\x0b\x0c")] = True
_TRIM_BYTES[0x80:] = True


def _may_need_trim(arr: pa.Array) -> bool:
    """False when no cell starts or ends with whitespace (checked in numpy)."""
    if isinstance(arr, pa.ChunkedArray) or arr.type != pa.string() or not len(arr):
        return True
    bufs = arr.buffers()
    if bufs[2] is None or len(bufs[2]) == 0:
        return False
    offsets = np.frombuffer(
        bufs[1], dtype=np.int32, count=len(arr) + 1, offset=arr.offset * 4
    )
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    top = len(data) - 1
    # Empty cells read a neighbour's byte: at worst a needless trim.
    first = data[np.minimum(offsets[:-1], top)]
    last = data[np.clip(offsets[1:] - 1, 0, top)]
    return bool(_TRIM_BYTES[first].any() or _TRIM_BYTES[last].any())


def _markers_to_null(text: pa.Array) -> pa.Array:
    """``text`` with cells that are exactly a null marker set to null.

    Hashing every cell (``is_in``) is the costliest step of a clean numeric
    column, so numpy first keeps only the cells that could be a marker: at most
    4 bytes, and empty or starting with N, n, ? or a lone '-'.
    """
    n = len(text)
    if isinstance(text, pa.ChunkedArray) or text.type != pa.string() or n == 0:
        return _with_nulls(text, pc.is_in(text, value_set=_NULL_SET))
    bufs = text.buffers()
    offsets = np.frombuffer(
        bufs[1], dtype=np.int32, count=n + 1, offset=text.offset * 4
    )
    lengths = np.diff(offsets)
    if bufs[2] is None or len(bufs[2]) == 0:
        cand = np.ones(n, bool)
    else:
        data = np.frombuffer(bufs[2], dtype=np.uint8)
        first = data[np.minimum(offsets[:-1], len(data) - 1)]
        cand = (lengths <= 4) & (
            (lengths == 0)
            | (first == ord("N"))
            | (first == ord("n"))
            | (first == ord("?"))
            | ((first == ord("-")) & (lengths == 1))
        )
    idx = np.flatnonzero(cand)
    if not len(idx):
        return text
    hit = _mask(pc.is_in(text.take(pa.array(idx)), value_set=_NULL_SET))
    if not hit.any():
        return text
    missing = np.zeros(n, bool)
    missing[idx[hit]] = True
    return _set_nulls(text, missing)


def _set_nulls(arr: pa.Array, missing: np.ndarray) -> pa.Array:
    """``arr`` with ``missing`` cells null, sharing its data (no copy)."""
    valid = ~missing
    if arr.null_count:
        valid &= _mask(arr.is_valid())
    bits = np.ones(arr.offset + len(arr), bool)
    bits[arr.offset :] = valid
    bitmap = pa.py_buffer(np.packbits(bits, bitorder="little").tobytes())
    return pa.Array.from_buffers(
        arr.type,
        len(arr),
        [bitmap, *arr.buffers()[1:]],
        null_count=int(len(arr) - valid.sum()),
        offset=arr.offset,
    )


@dataclass
class Parsed:
    """One column of a block, typed.

    ``values`` holds nulls for missing and invalid cells; ``text`` is the stripped
    cell text (nulls for missing); the masks flag invalid cells (None: none).
    """

    values: pa.Array
    text: pa.Array
    bad: np.ndarray | None = None
    nonfinite: np.ndarray | None = None
    out_of_range: np.ndarray | None = None  # finite, but not a finite float32


def parse_numeric(raw: pa.Array, decimal_comma: bool = False) -> Parsed:
    """Parse float cells; junk and non-finite values are flagged, not raised.

    The fast path casts the raw cells directly (a failing cast costs time per bad
    cell, so it is cheap when a block has few of them); only when it fails are
    the cells stripped and checked one pattern at a time.
    """
    text = _markers_to_null(raw)
    if decimal_comma:
        text = pc.replace_substring(text, ",", ".", max_replacements=1)
    bad = None
    try:
        values = pc.cast(text, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        text = clean_text(raw)
        if decimal_comma:
            text = pc.replace_substring(text, ",", ".", max_replacements=1)
        try:
            values = pc.cast(text, pa.float64())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            ok = pc.match_substring_regex(text, _FLOAT_RE)
            bad = _mask(pc.invert(ok))
            values = _cast_floats(pc.if_else(ok, text, _NULL_STR))
            # "inf"/"nan" spellings are numbers, just not finite ones: report them
            # as the fast path does.
            infinite = _mask(pc.match_substring_regex(text, _NONFINITE_RE))
            if infinite.any():
                bad &= ~infinite
                values = pc.if_else(pa.array(infinite), pa.scalar(np.inf), values)
    finite = pc.is_finite(values)
    nonfinite = None
    if not pc.all(finite).as_py():  # nulls skipped: true unless inf/nan/overflow
        nonfinite = _mask(pc.invert(finite))
        values = pc.if_else(finite, values, pa.scalar(None, pa.float64()))
    # The model computes in float32: a larger magnitude would become inf there
    # (and NaN after scaling), so such a cell rejects its row like junk does.
    out_of_range = None
    lo, hi = pc.min_max(values).values()
    if lo.is_valid and (lo.as_py() < -FLOAT32_MAX or hi.as_py() > FLOAT32_MAX):
        big = pc.greater(pc.abs(values), FLOAT32_MAX)
        out_of_range = _mask(big)
        values = pc.if_else(big, pa.scalar(None, pa.float64()), values)
    return Parsed(
        values=values,
        text=text,
        bad=bad,
        nonfinite=nonfinite,
        out_of_range=out_of_range,
    )


def _cast_floats(text: pa.Array) -> pa.Array:
    try:
        return pc.cast(text, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # Cells our pattern accepts but Arrow's parser does not (none known):
        # fall back to Python, only ever for blocks that already had junk.
        out: list[float | None] = []
        for cell in text.to_pylist():
            try:
                out.append(None if cell is None else float(cell))
            except ValueError:
                out.append(math.inf)  # reported as non-finite
        return pa.array(out, pa.float64())


def parse_date(raw: pa.Array) -> Parsed:
    """Parse ISO ``YYYY-MM-DD`` dates strictly (no 2008-02-30, no 2008-1-5)."""
    text = _markers_to_null(raw)
    try:
        return Parsed(values=pc.cast(text, pa.date32()), text=text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    text = clean_text(raw)
    try:
        return Parsed(values=pc.cast(text, pa.date32()), text=text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    shaped = pc.if_else(pc.match_substring_regex(text, _DATE_RE), text, _NULL_STR)
    stamps = pc.strptime(shaped, format="%Y-%m-%d", unit="s", error_is_null=True)
    # strptime rolls 2008-02-30 over to March; printing it back catches that.
    good = pc.equal(pc.strftime(stamps, format="%Y-%m-%d"), text)
    good_mask = _mask(good)
    values = pc.cast(pc.if_else(good, text, _NULL_STR), pa.date32())
    bad = _mask(pc.is_valid(text)) & ~good_mask
    return Parsed(values=values, text=text, bad=bad if bad.any() else None)


#: Timestamps are stored in UTC, to the microsecond.
TIMESTAMP_TYPE = pa.timestamp("us", tz="UTC")
# ISO 8601 date-time with a zone (Z or an offset): without one it is not an
# instant, so a naive date-time stays text.
_TIMESTAMP_RE = (
    r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-]\d{2}:?\d{2})$"
)


def parse_timestamp(raw: pa.Array) -> Parsed:
    """Parse zoned ISO 8601 date-times into UTC timestamps; others are bad.

    ``text`` is the UTC form (``2024-01-01 09:00:00.000000Z``), so the same
    instant written with another offset hashes (and keys) the same.
    """
    text = clean_text(raw)
    shaped = pc.match_substring_regex(text, _TIMESTAMP_RE)
    good = _mask(shaped)
    valid = _mask(pc.is_valid(text))
    try:
        values = pc.cast(pc.if_else(shaped, text, _NULL_STR), TIMESTAMP_TYPE)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        # A well-shaped but impossible value (2024-02-30): cell by cell.
        out = []
        for cell, ok in zip(text.to_pylist(), good.tolist(), strict=True):
            try:
                out.append(pc.cast(pa.scalar(cell), TIMESTAMP_TYPE) if ok else None)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                out.append(None)
        good = np.array([v is not None for v in out], bool)
        values = pa.array(
            [v.as_py() if v is not None else None for v in out], TIMESTAMP_TYPE
        )
    bad = valid & ~good
    # Parsed cells as their UTC form; bad ones keep their text for the reason.
    utc_text = pc.if_else(pc.is_valid(values), pc.cast(values, pa.string()), text)
    return Parsed(values=values, text=utc_text, bad=bad if bad.any() else None)


def parse_text(raw: pa.Array) -> Parsed:
    """Categorical or free-text cells: stripped, null markers as nulls."""
    text = clean_text(raw)
    return Parsed(values=text, text=text)


def parse_cells(kind: str, raw: pa.Array, decimal_comma: bool = False) -> Parsed:
    """One column's cells typed by its kind (numeric, date, timestamp,
    categorical, text)."""
    if kind == "numeric":
        return parse_numeric(raw, decimal_comma)
    if kind == "date":
        return parse_date(raw)
    if kind == "timestamp":
        return parse_timestamp(raw)
    return parse_text(raw)


SHOW_CHARS = 60  # most characters of a user's value an error message quotes


def show(value: object, limit: int = SHOW_CHARS) -> str:
    """A value from the input as messages quote it: repr-escaped (no control
    characters or line breaks get through) and cut to ``limit`` characters."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[: limit - 3]}... ({len(str(value))} chars)"


#: What a cell of each parsed kind must look like, as reasons say it.
EXPECTED = {
    "numeric": "a number",
    "date": "a date (YYYY-MM-DD)",
    "timestamp": "a timestamp with a zone (YYYY-MM-DD HH:MM:SS+HH:MM or Z)",
}


@dataclass
class CellProblem:
    """Rows a check fails: their mask, a summary and a per-row description."""

    mask: np.ndarray
    category: str
    describe: Callable[[np.ndarray], list[str]]


def cell_problems(name: str, kind: str, role: str, p: Parsed) -> list[CellProblem]:
    """The problems of one parsed column that reject a row (batch) or fill its
    ``error`` (serving): junk, non-finite or out-of-float32-range numbers, bad
    dates and timestamps, missing keys."""
    out = []

    def texts(idx: np.ndarray) -> list[object]:
        return p.text.take(pa.array(idx)).to_pylist()

    if p.bad is not None:
        what = EXPECTED[kind]
        out.append(
            CellProblem(
                p.bad,
                f"{name}: not {what}",
                lambda idx: [f"{name}: {show(t)} is not {what}" for t in texts(idx)],
            )
        )
    if p.nonfinite is not None:
        out.append(
            CellProblem(
                p.nonfinite,
                f"{name}: not a finite number",
                lambda idx: [
                    f"{name}: {show(t)} is not a finite number" for t in texts(idx)
                ],
            )
        )
    if p.out_of_range is not None:
        out.append(
            CellProblem(
                p.out_of_range,
                f"{name}: outside the float32 range",
                lambda idx: [
                    f"{name}: {show(t)} is outside the float32 range"
                    f" (magnitude at most {FLOAT32_MAX:.4g})"
                    for t in texts(idx)
                ],
            )
        )
    if role == "key" and p.text.null_count:
        missing = ~np.asarray(p.text.is_valid().to_numpy(zero_copy_only=False), bool)
        out.append(
            CellProblem(
                missing,
                f"{name}: key is missing",
                lambda idx: [f"{name}: key is missing"] * len(idx),
            )
        )
    return out


def as_text(values: pd.Series) -> pa.Array:
    """A column of a caller's frame as the raw cell text ingest would see.

    Strings stay as they are (ingest strips them and maps null markers);
    numbers, booleans and dates print as a typed Parquet column does in ingest
    (Arrow's cast to string); None, NaN and NA are nulls.
    """
    try:
        arr = pa.array(values, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        # Mixed Python objects (strings and numbers): one cell at a time.
        cells = [_cell_text(v) for v in values.tolist()]
        return pa.array(cells, pa.string())
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    return arr if arr.type == pa.string() else pc.cast(arr, pa.string())


def _cell_text(value: object) -> str | None:
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return None
    try:
        return pc.cast(pa.array([value]), pa.string())[0].as_py()
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return str(value)
