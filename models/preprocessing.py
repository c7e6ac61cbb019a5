"""Tabular preprocessing that keeps every row: impute, flag, scale, one-hot.

Fitted state is plain numbers and strings, saved as JSON: loading a model never
unpickles anything.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

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


def _as_str(arr: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    if pa.types.is_null(arr.type):
        return pa.nulls(len(arr), pa.string())
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    return pc.utf8_trim_whitespace(arr)


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
        """Learn statistics from ``data`` (a DataFrame, Table or RecordBatch)."""
        if not self.numeric and not self.categorical:
            raise ValueError("the preprocessor needs at least one feature column")
        if self.max_categories < 1:
            raise ValueError(f"max_categories must be >= 1, got {self.max_categories}")
        self.check_columns(data)
        n = len(data)
        if n == 0:
            raise ValueError("cannot fit the preprocessor on 0 rows")
        medians, means, scales, has_missing = [], [], [], []
        for name in self.numeric:
            x = _as_float(_column(data, name))
            miss = np.isnan(x)
            med = float(np.median(x[~miss])) if (~miss).any() else 0.0
            filled = np.where(miss, med, x)
            mean = float(filled.mean())
            std = float(filled.std())
            medians.append(med)
            means.append(mean)
            # A constant column carries no information; scale 1 keeps it at 0.
            scales.append(std if std > 1e-12 and np.isfinite(std) else 1.0)
            has_missing.append(bool(miss.any()))
        self.medians_ = np.asarray(medians, dtype=np.float64)
        self.means_ = np.asarray(means, dtype=np.float64)
        self.scales_ = np.asarray(scales, dtype=np.float64)
        self.has_missing_ = np.asarray(has_missing, dtype=bool)
        self.categories_: dict[str, list[str]] = {}
        for name in self.categorical:
            col = _as_str(_column(data, name))
            counts = pc.value_counts(col.fill_null(MISSING)).to_pylist()
            # Most frequent first, ties broken by value so fits are reproducible.
            counts.sort(key=lambda d: (-d["counts"], d["values"]))
            self.categories_[name] = [d["values"] for d in counts][
                : self.max_categories
            ]
        self._build_names()
        return self

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

    # -- transforming ---------------------------------------------------------
    @property
    def input_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    @property
    def n_features_out(self) -> int:
        return len(self.feature_names_out_)

    def check_columns(self, data: TableLike) -> None:
        """Raise a one-line ValueError naming every required column that is absent."""
        present = set(
            data.columns if isinstance(data, pd.DataFrame) else data.schema.names
        )
        missing = [c for c in self.input_columns if c not in present]
        if missing:
            raise ValueError(
                f"input lacks {len(missing)} column(s) the model needs: "
                + ", ".join(missing)
            )

    def transform(self, data: TableLike) -> np.ndarray:
        """Encode ``data`` into a float32 matrix of shape (n_rows, n_features_out)."""
        self.check_columns(data)
        n = len(data)
        out = np.zeros((n, self.n_features_out), dtype=np.float32)
        j = 0
        indicators = []
        for i, name in enumerate(self.numeric):
            x = _as_float(_column(data, name))
            miss = np.isnan(x)
            x[miss] = self.medians_[i]
            out[:, j] = (x - self.means_[i]) / self.scales_[i]
            j += 1
            if self.has_missing_[i]:
                indicators.append(miss)
        for miss in indicators:
            out[:, j] = miss
            j += 1
        rows = np.arange(n)
        for name in self.categorical:
            cats = self.categories_[name]
            col = _as_str(_column(data, name)).fill_null(MISSING)
            idx = pc.index_in(col, value_set=pa.array(cats, type=pa.string()))
            codes = idx.fill_null(len(cats)).to_numpy(zero_copy_only=False)
            out[rows, j + codes.astype(np.int64)] = 1.0
            j += len(cats) + 1
        return out

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
        path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: Path) -> TabularPreprocessor:
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path} is not a valid preprocessor file: {exc}"
            ) from None
