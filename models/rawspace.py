"""The preprocessor inverted: model-space rows back to raw, typed rows.

:class:`models.preprocessing.TabularPreprocessor` maps raw columns to a float32
matrix (scaled numbers, missing indicators, one-hot blocks). A generator draws
rows in that space; :class:`RawSpace` turns them back into the raw input's
columns and types: numbers in their units, rounded to the precision the data
was recorded at and kept inside the range it was seen in; a set missing
indicator back to a null; each one-hot block back to its label (its
``__missing__`` level to a null).

It also hashes raw rows (:meth:`RawSpace.row_hashes`), so generated rows can be
compared with training rows without keeping the rows themselves.

Its state is plain numbers and strings (JSON): nothing is unpickled on load.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.preprocessing import MISSING, UNKNOWN, TabularPreprocessor, _as_float

#: Finest decimal precision looked for when deciding how a column was recorded.
MAX_DECIMALS = 4


def recorded_decimals(values: np.ndarray) -> int | None:
    """The fewest decimals (0..MAX_DECIMALS) every value is written with, or None.

    weatherAUS records temperatures to 0.1 and humidity in whole percent; a
    generated 17.3826 degrees is a value no station ever reported.
    """
    x = values[np.isfinite(values)]
    if not len(x):
        return None
    for d in range(MAX_DECIMALS + 1):
        scaled = x * 10.0**d
        if np.max(np.abs(scaled - np.round(scaled))) < 1e-6 * max(1.0, 10.0**d):
            return d
    return None


@dataclass(frozen=True)
class NumericRange:
    """What a numeric column's values looked like in training."""

    name: str
    lo: float
    hi: float
    decimals: int | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "lo": self.lo,
            "hi": self.hi,
            "decimals": self.decimals,
        }


class RawSpace:
    """Inverse of a fitted :class:`TabularPreprocessor`, with the raw ranges.

    Parameters
    ----------
    preprocessor : TabularPreprocessor
        Fitted on the raw columns the generator writes.
    ranges : sequence of NumericRange
        One per numeric column of the preprocessor, in its order.
    """

    def __init__(
        self, preprocessor: TabularPreprocessor, ranges: Sequence[NumericRange]
    ) -> None:
        if [r.name for r in ranges] != list(preprocessor.numeric):
            raise ValueError("the numeric ranges do not match the preprocessor")
        self.pre = preprocessor
        self.ranges = list(ranges)

    @classmethod
    def fit(cls, table: pa.Table, pre: TabularPreprocessor) -> RawSpace:
        """Ranges and precision of ``pre``'s numeric columns, from ``table``."""
        ranges = []
        for name in pre.numeric:
            x = _as_float(table.column(name))
            seen = x[np.isfinite(x)]
            lo = float(seen.min()) if len(seen) else 0.0
            hi = float(seen.max()) if len(seen) else 0.0
            ranges.append(NumericRange(name, lo, hi, recorded_decimals(seen)))
        return cls(pre, ranges)

    # -- layout of the model space -------------------------------------------
    def indicator_index(self) -> dict[str, int]:
        """Matrix column of each numeric column's missing indicator."""
        out: dict[str, int] = {}
        j = len(self.pre.numeric)
        for name, miss in zip(self.pre.numeric, self.pre.has_missing_, strict=True):
            if miss:
                out[name] = j
                j += 1
        return out

    def category_blocks(self) -> dict[str, tuple[int, list[str]]]:
        """First matrix column and levels (``__unknown__`` last) of each block."""
        out: dict[str, tuple[int, list[str]]] = {}
        j = len(self.pre.numeric) + int(np.sum(self.pre.has_missing_))
        for name in self.pre.categorical:
            levels = [*self.pre.categories_[name], UNKNOWN]
            out[name] = (j, levels)
            j += len(levels)
        return out

    # -- the inverse -----------------------------------------------------------
    def numeric_values(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """Scaled columns of ``x`` back in raw units, clipped and rounded
        (missing not applied)."""
        out = {}
        for i, r in enumerate(self.ranges):
            raw = x[:, i].astype(np.float64) * self.pre.scales_[i] + self.pre.means_[i]
            out[r.name] = self.finish(r, raw)
        return out

    @staticmethod
    def finish(r: NumericRange, raw: np.ndarray) -> np.ndarray:
        """Clip to the seen range and round to the recorded precision."""
        raw = np.clip(raw, r.lo, r.hi)
        if r.decimals is not None:
            raw = np.round(raw, r.decimals)
        return raw

    def to_table(
        self,
        numeric: dict[str, np.ndarray],
        missing: dict[str, np.ndarray],
        labels: dict[str, np.ndarray],
    ) -> pa.Table:
        """The raw table, in the preprocessor's input column order: numbers as
        float64 (null where ``missing``), categories as strings (``__missing__``
        as null)."""
        cols: dict[str, pa.Array] = {}
        for name in self.pre.numeric:
            values = numeric[name]
            mask = missing.get(name)
            cols[name] = pa.array(values, pa.float64(), mask=mask)
        for name in self.pre.categorical:
            lab = np.asarray(labels[name], dtype=object)
            lab = np.where(lab == MISSING, None, lab)
            cols[name] = pa.array(lab.tolist(), pa.string())
        return pa.table(cols)

    def inverse(
        self, x: np.ndarray, rng: np.random.Generator | None = None
    ) -> pa.Table:
        """Model-space rows ``(n, n_features_out)`` to a raw table.

        An indicator above 0.5 is a null. A block's label is its largest
        entry; ``__unknown__`` (values too rare to get a column) is replaced by
        the block's most frequent known level, since no raw label stands for it.
        """
        del rng  # deterministic; generators that sample do so before this
        numeric = self.numeric_values(x)
        missing = {n: x[:, j] > 0.5 for n, j in self.indicator_index().items()}
        labels = {}
        for name, (j, levels) in self.category_blocks().items():
            block = x[:, j : j + len(levels)]
            labels[name] = self.levels_of(block, levels)
        return self.to_table(numeric, missing, labels)

    @staticmethod
    def levels_of(block: np.ndarray, levels: list[str]) -> np.ndarray:
        """Each row's label: the block's largest known level."""
        known = block[:, : len(levels) - 1] if len(levels) > 1 else block
        idx = np.argmax(known, axis=1)
        return np.asarray(levels, dtype=object)[idx]

    # -- comparing rows ----------------------------------------------------------
    def canonical(self, table: pa.Table) -> pd.DataFrame:
        """The columns as compared for copies: numbers rounded as generated
        rows are, strings stripped, nulls as nulls."""
        frame: dict[str, Any] = {}
        for r in self.ranges:
            x = _as_float(table.column(r.name))
            frame[r.name] = np.round(x, r.decimals) if r.decimals is not None else x
        for name in self.pre.categorical:
            col = table.column(name).cast(pa.string()).to_pylist()
            frame[name] = pd.Series(
                [None if v is None else str(v).strip() for v in col], dtype=object
            )
        return pd.DataFrame(frame)

    def row_hashes(self, table: pa.Table) -> np.ndarray:
        """One uint64 per row of the raw columns (``pandas`` fixed-key hash, the
        same on every machine and run)."""
        from pandas.util import hash_pandas_object

        frame = self.canonical(table)
        return hash_pandas_object(frame, index=False).to_numpy(np.uint64)

    # -- persistence -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "preprocessor": self.pre.to_dict(),
            "ranges": [r.to_dict() for r in self.ranges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RawSpace:
        pre = TabularPreprocessor.from_dict(d["preprocessor"])
        ranges = [
            NumericRange(
                str(r["name"]),
                float(r["lo"]),
                float(r["hi"]),
                None if r["decimals"] is None else int(r["decimals"]),
            )
            for r in d["ranges"]
        ]
        return cls(pre, ranges)
