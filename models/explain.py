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

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

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
    n = len(data)
    if n == 0:
        return []
    pre = model.preprocessor
    x = pre.transform(data)
    parts = np.asarray(model.estimator.feature_contributions(x), dtype=np.float64)
    recon = np.asarray(model.estimator.reconstruct(x), dtype=np.float64)
    names, folded = fold_contributions(model, parts)
    imputed = np.zeros((n, len(names)), dtype=bool)
    # Values are kept as arrays and only the cells an explanation shows are
    # turned into text: about ``top`` per row, not every column of every row.
    raw_numbers: dict[str, np.ndarray] = {}
    expected_numbers: dict[str, np.ndarray] = {}
    for i, name in enumerate(pre.numeric):
        raw = _as_float(_column(data, name))
        imputed[:, names.index(name)] = np.isnan(raw)
        raw_numbers[name] = raw
        expected_numbers[name] = recon[:, i] * pre.scales_[i] + pre.means_[i]
    labels: dict[str, list[str | None]] = {}
    expected_labels: dict[str, tuple[list[str], np.ndarray]] = {}
    feature_index = {f: j for j, f in enumerate(pre.feature_names_out_)}
    for name in pre.categorical:
        cats = [*pre.categories_[name], UNKNOWN]
        cols = [feature_index[f"{name}={c}"] for c in cats]
        values = _as_str(_column(data, name)).to_pylist()
        imputed[:, names.index(name)] = [v is None for v in values]
        labels[name] = values
        expected_labels[name] = (cats, recon[:, cols].argmax(axis=1))

    def cell(col: str, r: int) -> tuple[str | None, str]:
        """The ``observed`` and ``expected`` text of one cell."""
        if col in raw_numbers:
            v = raw_numbers[col][r]
            return (None if np.isnan(v) else _text(v)), _text(expected_numbers[col][r])
        label = labels[col][r]
        cats, best = expected_labels[col]
        return (None if label is None else str(label)), cats[int(best[r])]

    # Never blamed: an imputed cell, or a column that adds nothing.
    ranked = np.where(imputed | (folded <= 0), -np.inf, folded)
    order = np.argsort(-ranked, axis=1, kind="stable")[:, :top]
    out: list[Explanation] = []
    for r in range(n):
        entries = []
        for j in order[r]:
            if not np.isfinite(ranked[r, j]):
                break
            col = names[j]
            observed, expected = cell(col, r)
            entries.append(
                {
                    "column": col,
                    "observed": observed,
                    "expected": expected,
                    "contribution": float(folded[r, j]),
                }
            )
        out.append(entries)
    return out


def explanation_array(
    model: LatentModel, data: TableLike, flagged: np.ndarray, top: int = TOP_COLUMNS
) -> pa.Array:
    """The ``explanation`` column: an explanation on each flagged row, null
    elsewhere. Only the flagged rows are explained (about ``contamination`` of
    them), so the cost stays a small share of scoring."""
    flagged = np.asarray(flagged, dtype=bool)
    values: list[Explanation | None] = [None] * len(flagged)
    idx = np.flatnonzero(flagged)
    if len(idx):
        rows = _take(data, idx)
        for i, e in zip(idx.tolist(), explain(model, rows, top), strict=True):
            values[i] = e
    return pa.array(values, type=EXPLANATION_TYPE)


def _take(data: TableLike, idx: np.ndarray) -> TableLike:
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return data.take(pa.array(idx))
    return data.iloc[idx]
