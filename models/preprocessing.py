"""Tabular preprocessing that keeps every row: impute, flag, scale, one-hot.

Fitted state is plain numbers and strings, saved as JSON: loading a model never
unpickles anything.

Fitting streams: :class:`PreprocessorStats` accumulates everything in one pass
over batches of any size (memory per column, not per row) and
:meth:`TabularPreprocessor.fit_stats` finishes the exact medians with a few
more passes over the numeric columns. ``fit(table)`` is the one-batch case.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from models.atomic import atomic_write_bytes

MISSING = "__missing__"
UNKNOWN = "__unknown__"
_FORMAT = 1

TableLike = pd.DataFrame | pa.Table | pa.RecordBatch


def _column(data: TableLike, name: str) -> pa.ChunkedArray | pa.Array:
    if isinstance(data, pd.DataFrame):
        return pa.array(data[name], from_pandas=True)
    return data.column(name)


def _as_float(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric values as float64 with NaN for missing; junk strings become NaN.

    Scoring raw rows (the pyfunc) may hand us strings such as "NA": those are
    treated as missing, as the ingest step would have done.
    """
    if (
        pa.types.is_floating(arr.type)
        or pa.types.is_integer(arr.type)
        or pa.types.is_boolean(arr.type)
    ):
        out = arr.cast(pa.float64()).to_numpy(zero_copy_only=False)
    elif pa.types.is_null(arr.type):
        out = np.full(len(arr), np.nan)
    else:
        as_str = arr.cast(pa.string()).to_numpy(zero_copy_only=False)
        out = pd.to_numeric(pd.Series(as_str, dtype=object), errors="coerce").to_numpy(
            dtype=np.float64, na_value=np.nan
        )
    # Arrow buffers are read-only; the copy is also what we impute into.
    out = np.array(out, dtype=np.float64, copy=True)
    out[~np.isfinite(out)] = np.nan
    return out


def _numeric_view(arr: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Numeric values as a NumPy array of the column's own type where it has
    one (NaN for missing; possibly read-only and not float64), else
    :func:`_as_float`'s float64 copy.

    For :meth:`TabularPreprocessor.transform`, which computes into its own
    buffers: float and integer columns then skip the float64 cast and the copy
    (their values convert to float64 exactly inside the arithmetic).
    """
    if pa.types.is_floating(arr.type) or pa.types.is_integer(arr.type):
        return np.asarray(arr.to_numpy(zero_copy_only=False))
    return _as_float(arr)


def _as_str(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.utf8_trim_whitespace(arr)


def _category_codes(arr: pa.ChunkedArray | pa.Array, cats: list[str]) -> np.ndarray:
    """Each value's position in ``cats``, int64 of shape (n,): ``len(cats)``
    for a category training never saw; a missing value is :data:`MISSING`.

    A dictionary-encoded column (scoring reads the categoricals so) is looked
    up once per distinct value, then spread by its indices: no per-row string
    work.
    """
    if isinstance(arr, pa.ChunkedArray) and pa.types.is_dictionary(arr.type):
        # Each chunk has a dictionary of its own.
        parts = [_category_codes(chunk, cats) for chunk in arr.chunks]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if isinstance(arr, pa.DictionaryArray):
        # Codes of the distinct values, then one more for a missing value.
        missing = cats.index(MISSING) if MISSING in cats else len(cats)
        codes = np.append(_category_codes(arr.dictionary, cats), missing)
        indices = arr.indices
        if indices.null_count:
            indices = indices.cast(pa.int64()).fill_null(len(codes) - 1)
        return codes[indices.to_numpy()]
    values = _as_str(arr).fill_null(MISSING)
    idx = pc.index_in(values, value_set=pa.array(cats, type=pa.string()))
    return idx.fill_null(len(cats)).to_numpy(zero_copy_only=False).astype(np.int64)


def _check_present(data: TableLike, columns: Sequence[str]) -> None:
    """Raise a one-line ValueError naming every required column that is absent."""
    present = set(data.columns if isinstance(data, pd.DataFrame) else data.schema.names)
    missing = [c for c in columns if c not in present]
    if missing:
        raise ValueError(
            f"input lacks {len(missing)} column(s) the model needs: "
            + ", ".join(missing)
        )


# -- streaming statistics -------------------------------------------------------
#
# A fit streams batches once through :class:`PreprocessorStats` (moments, missing
# counts, category counts and the first radix-select histogram), then makes a few
# more passes over the numeric columns only to pin the exact medians.

_DIGIT_BITS = 16  # bits of the sort key a histogram pass resolves
_BINS = 1 << _DIGIT_BITS  # histogram bins per pass (65,536)
_DIGIT_MASK = np.uint64(_BINS - 1)
_SIGN = np.uint64(1 << 63)
_KEY_MAX = np.uint64((1 << 64) - 1)

BatchLike = TableLike
#: ``reopen(columns)`` streams the same rows again, in any batch split; the
#: batches must hold at least ``columns`` (more columns are fine).
Reopen = Callable[[Sequence[str]], Iterable[BatchLike]]


def _order_keys(x: np.ndarray) -> np.ndarray:
    """Map finite float64 values to uint64 keys whose unsigned order is numeric.

    Positive floats get their sign bit set (they sort above all negatives);
    negative ones are bit-flipped (a larger magnitude is a smaller key).
    """
    # -0.0 + 0.0 == +0.0: both zeros get one key, so "one distinct value" is a
    # numeric statement, as np.median sees it.
    bits = (x + 0.0).view(np.uint64)
    return np.where((bits & _SIGN) != 0, ~bits, bits | _SIGN)


def _key_value(key: int) -> float:
    """The float64 value of one :func:`_order_keys` key."""
    k = np.uint64(key)
    bits = k & ~_SIGN if k & _SIGN else ~k
    return float(np.asarray(bits, dtype=np.uint64).view(np.float64))


def _digit_shift(level: int) -> np.uint64:
    """Right shift that brings the ``level``-th 16-bit digit (0 = top) down."""
    return np.uint64(64 - _DIGIT_BITS * (level + 1))


class _BinStats:
    """Count, smallest and largest key of each occupied histogram bin.

    Sparse (sorted bin ids) because real columns fill few of the 65,536 bins of
    the top digit (sign, exponent, 4 mantissa bits): each batch is counted in
    dense temporaries, which are then compressed to the occupied bins.

    Attributes
    ----------
    level : int
        Which 16-bit digit of the key is counted (0 = the top one).
    prefix : int
        The digits above ``level`` that every counted key shares.
    bins : ndarray of int64, shape (n_occupied,)
        Occupied bin numbers, ascending.
    counts : ndarray of int64, shape (n_occupied,)
        Keys per bin.
    mins, maxs : ndarray of uint64, shape (n_occupied,)
        Smallest and largest key per bin.
    """

    def __init__(self, level: int = 0, prefix: int = 0) -> None:
        self.level = level
        self.prefix = prefix  # the key's digits above ``level`` (an int, exact)
        self.bins = np.zeros(0, np.int64)
        self.counts = np.zeros(0, np.int64)
        self.mins = np.zeros(0, np.uint64)
        self.maxs = np.zeros(0, np.uint64)

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    def add(self, keys: np.ndarray) -> None:
        """Count the keys under this histogram's prefix (others are ignored)."""
        if self.level:
            above = keys >> _digit_shift(self.level - 1)
            keys = keys[above == np.uint64(self.prefix)]
        if not len(keys):
            return
        digit = ((keys >> _digit_shift(self.level)) & _DIGIT_MASK).astype(np.intp)
        counts = np.bincount(digit, minlength=_BINS)
        occupied = np.flatnonzero(counts)
        mins = np.full(_BINS, _KEY_MAX, np.uint64)
        maxs = np.zeros(_BINS, np.uint64)
        np.minimum.at(mins, digit, keys)
        np.maximum.at(maxs, digit, keys)
        other = _BinStats(self.level, self.prefix)
        other.bins = occupied.astype(np.int64)
        other.counts = counts[occupied].astype(np.int64)
        other.mins, other.maxs = mins[occupied], maxs[occupied]
        self.merge(other)

    def merge(self, other: _BinStats) -> None:
        """Add ``other``'s counts (same level and prefix) into this one."""
        if not len(other.bins):
            return
        if not len(self.bins):
            self.bins, self.counts = other.bins.copy(), other.counts.copy()
            self.mins, self.maxs = other.mins.copy(), other.maxs.copy()
            return
        bins = np.union1d(self.bins, other.bins)
        mine = np.searchsorted(bins, self.bins)
        theirs = np.searchsorted(bins, other.bins)
        counts = np.zeros(len(bins), np.int64)
        mins = np.full(len(bins), _KEY_MAX, np.uint64)
        maxs = np.zeros(len(bins), np.uint64)
        for idx, src in ((mine, self), (theirs, other)):
            counts[idx] += src.counts
            mins[idx] = np.minimum(mins[idx], src.mins)
            maxs[idx] = np.maximum(maxs[idx], src.maxs)
        self.bins, self.counts, self.mins, self.maxs = bins, counts, mins, maxs


class _RankSearch:
    """Radix select of the key with 0-based ``rank`` among a column's keys.

    Each histogram pass narrows the search to the bin holding the rank; it
    ends when that bin holds one distinct key, or the rank is the bin's
    smallest or largest key, or (at worst) after the fourth 16-bit digit.
    """

    def __init__(self, rank: int, count: int) -> None:
        self.rank = rank  # rank among the keys under the current prefix
        self.count = count  # how many keys are under it
        self.level = 0
        self.prefix = 0
        self.key: int | None = None

    def step(self, hist: _BinStats) -> None:
        """Narrow the search with the histogram of the current level and prefix."""
        if hist.total != self.count:
            # reopen() must stream the rows of the first pass; anything else
            # would give a wrong median without a word.
            raise ValueError(
                f"the rows changed between passes: {hist.total} values under a"
                f" median bin, expected {self.count}"
            )
        cum = np.cumsum(hist.counts)
        i = int(np.searchsorted(cum, self.rank, side="right"))
        rank = self.rank - (int(cum[i - 1]) if i else 0)
        lo, hi = int(hist.mins[i]), int(hist.maxs[i])
        if lo == hi or rank == 0:
            self.key = lo
        elif rank == int(hist.counts[i]) - 1:
            self.key = hi
        else:  # a 4th-level bin is a single key (lo == hi): never gets here
            self.rank, self.count = rank, int(hist.counts[i])
            self.prefix = (self.prefix << _DIGIT_BITS) | int(hist.bins[i])
            self.level += 1


class PreprocessorStats:
    """Mergeable per-column accumulators for a streaming preprocessor fit.

    One pass of :meth:`update` over any split of the data into batches gives
    exactly what an in-memory fit needs, except the medians: those need the
    first histogram gathered here plus a few passes over the numeric columns
    (see :meth:`TabularPreprocessor.fit_stats`). Memory is per column, not per
    row: moments and counts, a sparse 65,536-bin histogram of the top 16 bits
    of each value, and one counter per distinct category value.

    Parameters
    ----------
    numeric : sequence of str
        Numeric columns, shape (n_numeric,).
    categorical : sequence of str
        Categorical columns, shape (n_categorical,).

    Attributes
    ----------
    n_rows : int
        Rows seen.
    n_obs : ndarray of int64, shape (n_numeric,)
        Non-missing values per numeric column.
    shift : ndarray of float64, shape (n_numeric,)
        The first non-missing value of each column (NaN before one is seen).
    mean_shifted, m2_obs : ndarray of float64, shape (n_numeric,)
        Mean of ``value - shift`` and sum of squared deviations of the
        non-missing values, merged batch by batch with Chan et al.'s formulas.
        Shifting by a value of the data keeps them accurate when the spread is
        tiny next to the magnitude (1e9 +- 0.1): an unshifted mean carries an
        error of ulp(1e9) that the imputation step would square.
    top_bins : list of _BinStats, length n_numeric
        Histogram of the top 16 bits of the non-missing values' sort keys: the
        first step of the exact median's radix select.
    category_counts : dict[str, dict[str, int]]
        Rows per (stripped) value, missing as ``__missing__``.
    """

    def __init__(self, numeric: Sequence[str] = (), categorical: Sequence[str] = ()):
        self.numeric = tuple(numeric)
        self.categorical = tuple(categorical)
        k = len(self.numeric)
        self.n_rows = 0
        self.n_obs = np.zeros(k, np.int64)
        self.shift = np.full(k, np.nan)
        self.mean_shifted = np.zeros(k, np.float64)
        self.m2_obs = np.zeros(k, np.float64)
        self.top_bins = [_BinStats() for _ in self.numeric]
        self.category_counts: dict[str, dict[str, int]] = {
            c: {} for c in self.categorical
        }

    def update(self, batch: BatchLike) -> None:
        """Accumulate one batch (a DataFrame, Table or RecordBatch, any length)."""
        _check_present(batch, [*self.numeric, *self.categorical])
        n = len(batch)
        self.n_rows += n
        if not n:
            return
        for i, name in enumerate(self.numeric):
            x = _as_float(_column(batch, name))
            obs = x[~np.isnan(x)]
            if len(obs):
                if self.n_obs[i] == 0:
                    self.shift[i] = obs[0]
                y = obs - self.shift[i]
                mean = float(y.mean())
                m2 = float(np.square(y - mean).sum())  # two-pass within the batch
                self._merge_moments(i, len(obs), mean, m2)
                self.top_bins[i].add(_order_keys(obs))
        for name in self.categorical:
            col = _as_str(_column(batch, name)).fill_null(MISSING)
            vc = pc.value_counts(col)
            counts = self.category_counts[name]
            values = vc.field("values").to_pylist()
            for value, k in zip(values, vc.field("counts").to_pylist(), strict=True):
                counts[value] = counts.get(value, 0) + k

    def _merge_moments(self, i: int, n_b: int, mean_b: float, m2_b: float) -> None:
        # Chan, Golub & LeVeque (1979): exact for the merged set, no cancellation.
        n_a = int(self.n_obs[i])
        n = n_a + n_b
        delta = mean_b - float(self.mean_shifted[i])
        self.mean_shifted[i] += delta * (n_b / n)
        self.m2_obs[i] += m2_b + delta * delta * (n_a * n_b / n)
        self.n_obs[i] = n

    def merge(self, other: PreprocessorStats) -> PreprocessorStats:
        """Add another accumulator's rows (same columns) into this one; returns self."""
        if (other.numeric, other.categorical) != (self.numeric, self.categorical):
            raise ValueError("cannot merge statistics of different columns")
        self.n_rows += other.n_rows
        for i in range(len(self.numeric)):
            if other.n_obs[i]:
                if self.n_obs[i] == 0:
                    self.shift[i] = other.shift[i]
                # Their mean in our shifted frame.
                mean = float(other.mean_shifted[i]) + (other.shift[i] - self.shift[i])
                self._merge_moments(
                    i, int(other.n_obs[i]), mean, float(other.m2_obs[i])
                )
            self.top_bins[i].merge(other.top_bins[i])
        for name, theirs in other.category_counts.items():
            counts = self.category_counts[name]
            for value, k in theirs.items():
                counts[value] = counts.get(value, 0) + k
        return self

    def medians(self, reopen: Reopen) -> np.ndarray:
        """Exact medians of the non-missing values, shape (n_numeric,).

        Equal to ``np.median`` (the mean of the two middle values for an even
        count; 0.0 for an all-missing column). ``reopen`` streams the same rows
        again; it is called once per extra pass (at most 3, usually 0 or 1),
        with only the columns still unresolved.
        """
        searches: list[list[_RankSearch]] = []
        for n in self.n_obs.tolist():
            ranks = [] if n == 0 else sorted({(n - 1) // 2, n // 2})
            searches.append([_RankSearch(r, n) for r in ranks])
        hists: list[dict[tuple[int, int], _BinStats]] = [
            {(0, 0): h} for h in self.top_bins
        ]
        while True:
            for col, found in zip(searches, hists, strict=True):
                for s in col:
                    if s.key is None:
                        s.step(found[(s.level, s.prefix)])
            pending = [
                {
                    (s.level, s.prefix): _BinStats(s.level, s.prefix)
                    for s in col
                    if s.key is None
                }
                for col in searches
            ]
            todo = [i for i, p in enumerate(pending) if p]
            if not todo:
                break
            names = [self.numeric[i] for i in todo]
            for batch in reopen(names):
                for i, name in zip(todo, names, strict=True):
                    x = _as_float(_column(batch, name))
                    keys = _order_keys(x[~np.isnan(x)])
                    for h in pending[i].values():
                        h.add(keys)
            hists = pending
        out = np.zeros(len(self.numeric), np.float64)
        for i, col in enumerate(searches):
            keys = [s.key for s in col if s.key is not None]
            if keys:
                # Same arithmetic as np.median: the mean of the middle values.
                out[i] = np.mean(np.array([_key_value(k) for k in keys]))
        return out


#: Bound of a scaled numeric value, in standard deviations. Training rows stay
#: within sqrt(rows) of the mean, so this only ever bounds unseen extremes.
MAX_SCALED = 1e6


class TabularPreprocessor:
    """Impute, flag, scale and one-hot encode a table into a float32 matrix.

    Numeric columns get median imputation, a missing-indicator column where the
    training data had missing values, then standard scaling. Categorical columns
    are one-hot encoded over their ``max_categories`` most frequent values; a
    missing value is its own category, and any value never seen in training maps
    to ``__unknown__`` instead of failing.

    Parameters
    ----------
    numeric : sequence of str
        Numeric input columns.
    categorical : sequence of str
        Categorical input columns.
    max_categories : int, default=64
        Most one-hot columns per categorical input; rarer values become unknown.

    Attributes
    ----------
    medians_, means_, scales_ : ndarray of shape (n_numeric,)
        Imputation and scaling statistics.
    has_missing_ : ndarray of bool, shape (n_numeric,)
        Which numeric columns get a missing-indicator.
    categories_ : dict[str, list[str]]
        Known categories per categorical column (without ``__unknown__``).
    feature_names_out_ : list[str]
        Names of the output columns, shape (n_features_out,).
    feature_sources_ : list[str]
        For each output column, the input column it comes from.
    """

    def __init__(
        self,
        numeric: Sequence[str] = (),
        categorical: Sequence[str] = (),
        max_categories: int = 64,
    ) -> None:
        self.numeric = tuple(numeric)
        self.categorical = tuple(categorical)
        self.max_categories = max_categories

    # -- fitting --------------------------------------------------------------
    def fit(self, data: TableLike) -> TabularPreprocessor:
        """Learn statistics from ``data`` (a DataFrame, Table or RecordBatch).

        The one-batch case of :meth:`fit_batches`: the same code and results.
        """
        return self.fit_batches([data])

    def fit_batches(
        self, batches: Sequence[BatchLike] | Callable[[], Iterable[BatchLike]]
    ) -> TabularPreprocessor:
        """Learn statistics from a stream of batches, in memory per column.

        Parameters
        ----------
        batches : sequence of batches, or a callable returning an iterable of them
            DataFrames, Tables or RecordBatches holding the input columns, any
            number of rows each (empty ones too). The exact medians need up to
            three more passes over the numeric columns, so a one-shot iterator
            is not enough: pass a list, or a callable that streams the same
            rows again each time it is called.

        Returns
        -------
        self
            Fitted exactly as :meth:`fit` on all the rows in one table (to the
            last few ulps for means and scales; exactly for medians, categories
            and missing flags), whatever the batch split.
        """
        self._check_params()
        if isinstance(batches, (pd.DataFrame, pa.Table, pa.RecordBatch)):
            raise TypeError("fit_batches takes a list of batches; use fit(table)")
        stream: Callable[[], Iterable[BatchLike]]
        if callable(batches):
            stream = batches
        else:  # a list replays for the median passes
            stream = functools.partial(iter, list(batches))
        stats = PreprocessorStats(self.numeric, self.categorical)
        for batch in stream():
            stats.update(batch)
        return self.fit_stats(stats, lambda _columns: stream())

    def fit_stats(
        self, stats: PreprocessorStats, reopen: Reopen
    ) -> TabularPreprocessor:
        """Finish a fit from accumulated statistics.

        Parameters
        ----------
        stats : PreprocessorStats
            One full pass over the rows, for this preprocessor's columns.
        reopen : callable
            ``reopen(columns)`` streams the same rows again (any batch split);
            called only while some median is unresolved (at most three times),
            with the numeric columns still needed.

        Returns
        -------
        self
        """
        self._check_params()
        if (stats.numeric, stats.categorical) != (self.numeric, self.categorical):
            raise ValueError("the statistics were gathered for other columns")
        n = stats.n_rows
        if n == 0:
            raise ValueError("cannot fit the preprocessor on 0 rows")
        medians = stats.medians(reopen)
        n_obs = stats.n_obs.astype(np.float64)
        n_miss = n - n_obs
        # Imputing n_miss copies of the median is merging a zero-spread group
        # of that size (Chan's formula again): no second pass over the rows.
        shift = np.nan_to_num(stats.shift)  # all-missing: mean 0, median 0
        delta = (medians - shift) - stats.mean_shifted
        means = shift + (stats.mean_shifted + delta * (n_miss / n))
        m2 = stats.m2_obs + delta * delta * (n_obs * n_miss / n)
        stds = np.sqrt(np.maximum(m2, 0.0) / n)
        self.medians_ = medians
        self.means_ = means
        # A constant column carries no information; scale 1 keeps it at 0.
        self.scales_ = np.where((stds > 1e-12) & np.isfinite(stds), stds, 1.0)
        self.has_missing_ = stats.n_obs < n
        self.categories_: dict[str, list[str]] = {}
        for name in self.categorical:
            # Most frequent first, ties broken by value so fits are reproducible.
            ranked = sorted(
                stats.category_counts[name].items(), key=lambda kv: (-kv[1], kv[0])
            )
            self.categories_[name] = [v for v, _ in ranked[: self.max_categories]]
        self._build_names()
        return self

    def _check_params(self) -> None:
        if not self.numeric and not self.categorical:
            raise ValueError("the preprocessor needs at least one feature column")
        if self.max_categories < 1:
            raise ValueError(f"max_categories must be >= 1, got {self.max_categories}")

    def _build_names(self) -> None:
        names: list[str] = []
        sources: list[str] = []
        for name in self.numeric:
            names.append(name)
            sources.append(name)
        for name, miss in zip(self.numeric, self.has_missing_, strict=True):
            if miss:
                names.append(f"{name}__missing")
                sources.append(name)
        for name in self.categorical:
            for cat in [*self.categories_[name], UNKNOWN]:
                names.append(f"{name}={cat}")
                sources.append(name)
        self.feature_names_out_ = names
        self.feature_sources_ = sources

    def one_hot_groups(self) -> list[list[int]]:
        """Output column indices of each categorical's one-hot block, in order."""
        return [
            [j for j, source in enumerate(self.feature_sources_) if source == name]
            for name in self.categorical
        ]

    # -- transforming ---------------------------------------------------------
    @property
    def input_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def n_features_out(self) -> int:
        return len(self.feature_names_out_)

    def check_columns(self, data: TableLike) -> None:
        """Raise a one-line ValueError naming every required column that is absent."""
        _check_present(data, self.input_columns)

    def transform(self, data: TableLike) -> np.ndarray:
        """Encode ``data`` into a float32 matrix of shape (n_rows, n_features_out)."""
        self.check_columns(data)
        n = len(data)
        out = np.zeros((n, self.n_features_out), dtype=np.float32)
        # The numeric columns and their missing flags are computed as rows of
        # a contiguous block and copied into ``out`` in one transposing pass:
        # writing them one strided column at a time cost a third more.
        k = len(self.numeric) + int(np.count_nonzero(self.has_missing_))
        block = np.empty((k, n), dtype=np.float32)
        scaled = np.empty(n, dtype=np.float64)
        miss = np.empty(n, dtype=bool)
        flags = len(self.numeric)
        for i, name in enumerate(self.numeric):
            x = _numeric_view(_column(data, name))
            # Missing means NaN or an infinity, as _as_float has it.
            np.isfinite(x, out=miss)
            np.logical_not(miss, out=miss)
            # In float64: (x - mean) / scale, clipped so that a value far
            # outside what training saw stays a finite float32 (an extreme
            # anomaly, never inf and then NaN). A missing value becomes its
            # imputed median's scaled value: the same float64 steps applied to
            # the median, so the result is what imputing first would give.
            with np.errstate(over="ignore", invalid="ignore"):
                np.subtract(x, self.means_[i], out=scaled)
                np.divide(scaled, self.scales_[i], out=scaled)
                np.clip(scaled, -MAX_SCALED, MAX_SCALED, out=block[i])
            np.copyto(block[i], self._imputed_scaled(i), where=miss)
            if self.has_missing_[i]:
                block[flags] = miss
                flags += 1
        j = flags
        out[:, :k] = block.T
        # One flat index per row and category: a 2-D fancy index would build
        # the row index again for every column.
        flat = out.reshape(-1)
        row_starts = np.arange(0, n * self.n_features_out, self.n_features_out)
        for name in self.categorical:
            cats = self.categories_[name]
            hot = _category_codes(_column(data, name), cats)
            hot += row_starts + j
            flat[hot] = 1.0
            j += len(cats) + 1
        return out

    def _imputed_scaled(self, i: int) -> np.float32:
        """Numeric column ``i``'s median as :meth:`transform` scales it."""
        value = np.array([self.medians_[i]], dtype=np.float64)
        with np.errstate(over="ignore"):
            np.subtract(value, self.means_[i], out=value)
            np.divide(value, self.scales_[i], out=value)
        return np.float32(np.clip(value, -MAX_SCALED, MAX_SCALED)[0])

    def fit_transform(self, data: TableLike) -> np.ndarray:
        return self.fit(data).transform(data)

    def source_errors(self, feature_errors: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Sum per-output-column errors into per-input-column errors.

        Returns the input column names and an array of shape (n_rows, n_inputs).
        """
        inputs = self.input_columns
        index = {c: k for k, c in enumerate(inputs)}
        groups = np.array([index[s] for s in self.feature_sources_])
        out = np.zeros((feature_errors.shape[0], len(inputs)), dtype=np.float64)
        np.add.at(out.T, groups, feature_errors.T)
        return inputs, out

    # -- persistence ----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": _FORMAT,
            "numeric": list(self.numeric),
            "categorical": list(self.categorical),
            "max_categories": self.max_categories,
            "medians": self.medians_.tolist(),
            "means": self.means_.tolist(),
            "scales": self.scales_.tolist(),
            "has_missing": self.has_missing_.tolist(),
            "categories": self.categories_,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TabularPreprocessor:
        if d.get("format") != _FORMAT:
            raise ValueError(f"unsupported preprocessor format {d.get('format')!r}")
        self = cls(d["numeric"], d["categorical"], d["max_categories"])
        self.medians_ = np.asarray(d["medians"], dtype=np.float64)
        self.means_ = np.asarray(d["means"], dtype=np.float64)
        self.scales_ = np.asarray(d["scales"], dtype=np.float64)
        self.has_missing_ = np.asarray(d["has_missing"], dtype=bool)
        self.categories_ = {k: list(v) for k, v in d["categories"].items()}
        k = len(self.numeric)
        if not (len(self.medians_) == len(self.means_) == len(self.scales_) == k):
            raise ValueError("preprocessor statistics do not match its numeric columns")
        if set(self.categories_) != set(self.categorical):
            raise ValueError("preprocessor categories do not match its columns")
        self._build_names()
        return self

    def save(self, path: Path) -> None:
        atomic_write_bytes(path, json.dumps(self.to_dict(), indent=1).encode())

    @classmethod
    def load(cls, path: Path) -> TabularPreprocessor:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path} is not a valid preprocessor file: {exc}"
            ) from None
