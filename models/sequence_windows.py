"""Windows of consecutive observations per entity, built one batch at a time.

A sequence model scores a row from its *window*: the row itself and the same
entity's rows on the ``window - 1`` days before it (a causal window, so a row
never waits for later data). Slot ``window - 1`` is the row, slot ``j`` the
day ``day - (window - 1 - j)``. A day without a row (a gap, the first days of
a series, a series shorter than the window) is an empty slot, masked, never a
reason to drop the row: every row gets a window.

:class:`WindowState` carries, per entity, only the rows of the last
``window - 1`` days seen, so memory is bounded by window x entities whatever
the number of rows, and feeding it batch after batch gives exactly the windows
one pass over all the rows would give (the streaming scorer and its work units
rely on that).

Kept free of torch: numpy and pyarrow only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

#: Marks an empty slot in a window's index array.
EMPTY = -1


class ContextColumnError(ValueError):
    """The data lacks, or has an unusable, entity or time column (one line)."""


@dataclass(frozen=True)
class RowContext:
    """Who each row belongs to and when: the entity key and an integer day."""

    entity: np.ndarray  # (n,) object: hashable entity keys
    day: np.ndarray  # (n,) int64: days since 1970-01-01 (or the integer step)

    def __len__(self) -> int:
        return len(self.day)

    def take(self, idx: np.ndarray) -> RowContext:
        return RowContext(self.entity[idx], self.day[idx])


def _column(data: Any, name: str) -> pa.ChunkedArray | pa.Array:
    if isinstance(data, pd.DataFrame):
        if name not in data.columns:
            raise ContextColumnError(
                f"the data lacks column {name!r}, which the sequence model orders"
                " rows by"
            )
        return pa.array(data[name], from_pandas=True)
    if name not in data.column_names:
        raise ContextColumnError(
            f"the data lacks column {name!r}, which the sequence model orders rows by"
        )
    return data.column(name)


def day_numbers(values: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    """Integer days of a date, timestamp or integer column (int64).

    Dates and timestamps count days since 1970-01-01 (a timestamp is floored to
    its day); an integer column is taken as the step number itself. Strings in
    ISO form are parsed as dates. A null or unparsable value is an error naming
    the column: a row without a time has no place in its series.
    """
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    t = values.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        try:
            values = pc.cast(values, pa.date32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise ContextColumnError(
                f"column {name!r}: expected dates (YYYY-MM-DD) to order the series"
            ) from None
        t = values.type
    if values.null_count:
        raise ContextColumnError(
            f"column {name!r} has {values.null_count} missing value(s); the sequence"
            " model needs a time for every row"
        )
    if pa.types.is_timestamp(t):
        values = pc.cast(pc.floor_temporal(values, unit="day"), pa.timestamp("s"))
        secs = values.cast(pa.int64()).to_numpy()
        return np.floor_divide(secs, 86400).astype(np.int64)
    if pa.types.is_date32(t):
        return values.cast(pa.int32()).to_numpy().astype(np.int64)
    if pa.types.is_date64(t):
        return np.floor_divide(values.cast(pa.int64()).to_numpy(), 86_400_000)
    if pa.types.is_integer(t):
        return values.to_numpy().astype(np.int64)
    raise ContextColumnError(
        f"column {name!r} has type {t}; the sequence model needs a date, timestamp"
        " or integer time column"
    )


def row_context(data: Any, entity: str, time: str) -> RowContext:
    """The entity keys and days of a table or frame's rows."""
    ent = _column(data, entity)
    if isinstance(ent, pa.ChunkedArray):
        ent = ent.combine_chunks()
    keys = np.asarray(ent.to_pylist(), dtype=object)
    return RowContext(keys, day_numbers(_column(data, time), time))


class WindowState:
    """Per entity, the rows of its last ``window`` days seen (a bounded ring).

    :meth:`windows` takes a batch in stream order and returns, for every row,
    the indices of its window's rows in a *pool* (the carried rows followed by
    the batch's rows); the state then keeps copies of the rows later windows
    may still need, and nothing else.
    """

    def __init__(self, window: int, n_features: int) -> None:
        if window < 1:
            raise ValueError(f"window must be at least 1, got {window}")
        self.window = int(window)
        self.n_features = int(n_features)
        # entity -> {day: carried row}, and the newest day seen per entity.
        self._rows: dict[Any, dict[int, np.ndarray]] = {}
        self._newest: dict[Any, int] = {}

    @property
    def rows_held(self) -> int:
        """Rows carried between batches (at most (window - 1) x entities)."""
        return sum(len(d) for d in self._rows.values())

    def windows(
        self, x: np.ndarray, context: RowContext
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(pool, index)`` for a batch in stream order, updating the state.

        ``pool`` is ``(m, n_features)`` float32; ``index`` is ``(n, window)``
        int64 into ``pool``, :data:`EMPTY` for an empty slot; slot
        ``window - 1`` is the row itself. A later row of the same entity and
        day replaces the earlier one for the windows after it.
        """
        w = self.window
        n = len(context)
        carried: list[np.ndarray] = []
        # (entity, day) -> pool position, for the carried rows and the batch's.
        where: dict[Any, dict[int, int]] = {}
        for ent, days in self._rows.items():
            slots = where.setdefault(ent, {})
            for d, row in days.items():
                slots[d] = len(carried)
                carried.append(row)
        offset = len(carried)
        index = np.full((n, w), EMPTY, dtype=np.int64)
        index[:, w - 1] = offset + np.arange(n)
        ents, days_of = context.entity, context.day
        for i in range(n):
            ent, day = ents[i], int(days_of[i])
            slots = where.get(ent)
            if slots is None:
                slots = where[ent] = {}
            else:
                row_index = index[i]
                for k in range(1, w):
                    pos = slots.get(day - k)
                    if pos is not None:
                        row_index[w - 1 - k] = pos
            newest = self._newest.get(ent)
            if newest is None or day > newest:
                self._newest[ent] = newest = day
            if day > newest - w:
                slots[day] = offset + i
            if len(slots) > w:
                for d in [d for d in slots if d <= newest - w]:
                    del slots[d]
        pool = (
            np.concatenate([np.asarray(carried, dtype=np.float32), x])
            if carried
            else np.asarray(x, dtype=np.float32)
        )
        self._carry(pool, where)
        return pool, index

    def _carry(self, pool: np.ndarray, where: dict[Any, dict[int, int]]) -> None:
        """Keep copies of each entity's rows a later window can still reach."""
        w = self.window
        rows: dict[Any, dict[int, np.ndarray]] = {}
        for ent, slots in where.items():
            newest = self._newest[ent]
            kept = {d: pool[p].copy() for d, p in slots.items() if d > newest - w}
            if kept:
                rows[ent] = kept
        self._rows = rows


def gather(pool: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Windows ``(n, window, F)`` float32 (empty slots zero) and their mask."""
    mask = index != EMPTY
    out = pool[np.where(mask, index, 0)]
    out[~mask] = 0.0
    return out, mask


def context_days(context: RowContext, window: int) -> np.ndarray:
    """The day each window slot stands for, ``(n, window)`` int64."""
    offsets = np.arange(-(window - 1), 1, dtype=np.int64)
    return context.day[:, None] + offsets[None, :]


def single_rows(n: int, window: int) -> np.ndarray:
    """An index for rows scored without context: every earlier slot empty."""
    index = np.full((n, window), EMPTY, dtype=np.int64)
    index[:, window - 1] = np.arange(n)
    return index


__all__: Sequence[str] = (
    "EMPTY",
    "ContextColumnError",
    "RowContext",
    "WindowState",
    "context_days",
    "day_numbers",
    "gather",
    "row_context",
    "single_rows",
)
