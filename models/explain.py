"""Why a row was flagged: its score split over the *source* columns.

A model family splits its score over the preprocessed columns
(:meth:`models.family.ModelFamily.feature_contributions`). An analyst thinks in
the input's columns, so the parts are folded back: a categorical column's
one-hot group and a numeric column's missing indicator add up into the column
they were made from. A cell that was missing was imputed by the preprocessor,
so whatever the model made of it says nothing about the row: such a column is
never blamed.

``observed`` and ``expected`` are in the input's own units: the raw value, and
the model's reconstruction mapped back through the preprocessor (unscaled for
a number; the category with the largest reconstructed one-hot value for a
category). Both are strings, so one Parquet struct holds numbers and
categories alike (``TRY_CAST(observed AS DOUBLE)`` in DuckDB for a number).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from models.family import contributions_and_reconstruction
from models.preprocessing import UNKNOWN, TableLike, _as_float, _as_str, _column

if TYPE_CHECKING:
    from models.bundle import LatentModel

#: Entries per explanation: the columns that made most of the score.
TOP_COLUMNS = 3

#: The Parquet type of the ``explanation`` column.
EXPLANATION_TYPE = pa.list_(
    pa.struct(
        [
            pa.field("column", pa.string()),
            pa.field("observed", pa.string()),
            pa.field("expected", pa.string()),
            pa.field("contribution", pa.float32()),
        ]
    )
)

Explanation = list[dict[str, Any]]


def _text(value: float) -> str:
    """A number as an analyst reads it: six significant digits."""
    return format(float(value), ".6g")


def fold_contributions(
    model: LatentModel, contributions: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """Per-source-column parts of the score, ``(names, (n, n_inputs))``.

    The preprocessed columns' parts are summed per source column and divided
    by the width of the preprocessed row, so a row's parts add up to its score
    (the contributions' row mean is the score).
    """
    names, folded = model.preprocessor.source_errors(
        np.asarray(contributions, dtype=np.float64)
    )
    return names, folded / max(contributions.shape[1], 1)


@dataclass(frozen=True)
class _Entries:
    """Explanations as columns: row ``r`` owns ``counts[r]`` consecutive
    entries, largest part first, after those of the rows before it."""

    counts: np.ndarray  # (n,) entries per row
    column: list[str]
    observed: list[str | None]
    expected: list[str]
    contribution: np.ndarray  # float32

    def arrow(self) -> pa.StructArray:
        return pa.StructArray.from_arrays(
            [
                pa.array(self.column, pa.string()),
                pa.array(self.observed, pa.string()),
                pa.array(self.expected, pa.string()),
                pa.array(self.contribution, pa.float32()),
            ],
            fields=list(EXPLANATION_TYPE.value_type),
        )


def _entries(
    model: LatentModel, data: TableLike, top: int, features: np.ndarray | None = None
) -> _Entries:
    """The ``top`` columns behind each row's score, as columns.

    ``features``: ``data`` already preprocessed, when the caller has it.
    Ranking is vectorised and only the cells shown are turned into text
    (about ``top`` per row): no per-row Python loop, so explaining holds the
    GIL for little while other batches are scored on other threads.
    """
    n = len(data)
    pre = model.preprocessor
    x = pre.transform(data) if features is None else features
    contributions, reconstruction = contributions_and_reconstruction(model.estimator, x)
    parts = np.asarray(contributions, dtype=np.float64)
    recon = np.asarray(reconstruction, dtype=np.float64)
    names, folded = fold_contributions(model, parts)
    imputed = np.zeros((n, len(names)), dtype=bool)
    raw_numbers: dict[int, np.ndarray] = {}
    expected_numbers: dict[int, np.ndarray] = {}
    for i, name in enumerate(pre.numeric):
        j = names.index(name)
        raw = _as_float(_column(data, name))
        imputed[:, j] = np.isnan(raw)
        raw_numbers[j] = raw
        expected_numbers[j] = recon[:, i] * pre.scales_[i] + pre.means_[i]
    labels: dict[int, list[str | None]] = {}
    expected_labels: dict[int, tuple[list[str], np.ndarray]] = {}
    feature_index = {f: k for k, f in enumerate(pre.feature_names_out_)}
    for name in pre.categorical:
        j = names.index(name)
        cats = [*pre.categories_[name], UNKNOWN]
        cols = [feature_index[f"{name}={c}"] for c in cats]
        values = _as_str(_column(data, name)).to_pylist()
        imputed[:, j] = [v is None for v in values]
        labels[j] = values
        expected_labels[j] = (cats, recon[:, cols].argmax(axis=1))

    # Never blamed: an imputed cell, or a column that adds nothing.
    ranked = np.where(imputed | (folded <= 0), -np.inf, folded)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :top]
    shown = np.isfinite(np.take_along_axis(ranked, order, axis=1))
    rows, slots = np.nonzero(shown)  # row-major: each row's entries in rank order
    picked = order[rows, slots]
    observed: list[str | None] = [None] * len(rows)
    expected: list[str] = [""] * len(rows)
    for j in np.unique(picked).tolist():
        at = np.flatnonzero(picked == j)
        where = rows[at]
        if j in raw_numbers:
            raw, guess = raw_numbers[j][where], expected_numbers[j][where]
            for k, v, e in zip(at.tolist(), raw.tolist(), guess.tolist(), strict=True):
                observed[k] = None if v != v else _text(v)  # NaN: missing
                expected[k] = _text(e)
        else:
            values, (cats, best) = labels[j], expected_labels[j]
            for k, r in zip(at.tolist(), where.tolist(), strict=True):
                label = values[r]
                observed[k] = None if label is None else str(label)
                expected[k] = cats[int(best[r])]
    return _Entries(
        counts=shown.sum(axis=1),
        column=[names[j] for j in picked.tolist()],
        observed=observed,
        expected=expected,
        contribution=folded[rows, picked].astype(np.float32),
    )


def explain(
    model: LatentModel, data: TableLike, top: int = TOP_COLUMNS
) -> list[Explanation]:
    """The ``top`` columns behind each row's score, largest part first.

    Parameters
    ----------
    model
        The scoring model.
    data
        The rows to explain (raw, with the model's input columns).

    Returns
    -------
    list of explanations, one per row: up to ``top`` entries
    ``{column, observed, expected, contribution}``; fewer when fewer columns
    contribute (imputed columns never do).
    """
    if len(data) == 0:
        return []
    entries = _entries(model, data, top)
    flat = entries.arrow().to_pylist()
    ends = np.cumsum(entries.counts).tolist()
    return [flat[a:b] for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def explanation_array(
    model: LatentModel,
    data: TableLike,
    flagged: np.ndarray,
    top: int = TOP_COLUMNS,
    features: np.ndarray | None = None,
) -> pa.Array:
    """The ``explanation`` column: an explanation on each flagged row, null
    elsewhere. Only the flagged rows are explained (about ``contamination`` of
    them), so the cost stays a small share of scoring. ``features``: all of
    ``data`` preprocessed, when the caller has it (scoring does), so the
    flagged rows are not preprocessed again."""
    flagged = np.asarray(flagged, dtype=bool)
    idx = np.flatnonzero(flagged)
    counts = np.zeros(len(flagged), dtype=np.int64)
    if len(idx):
        rows = None if features is None else features[idx]
        entries = _entries(model, _take(data, idx), top, rows)
        counts[idx] = entries.counts
        values = entries.arrow()
    else:
        values = pa.array([], type=EXPLANATION_TYPE.value_type)
    offsets = np.zeros(len(flagged) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(
        pa.array(offsets), values, type=EXPLANATION_TYPE, mask=pa.array(~flagged)
    )


def _take(data: TableLike, idx: np.ndarray) -> TableLike:
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return data.take(pa.array(idx))
    return data.iloc[idx]
