"""Drift between new data and a champion's training reference.

At training time :func:`build_reference` summarises the training split (numeric
decile edges and bin shares, category shares, the distribution of training
reconstruction errors) and the summary is saved inside the model. Before a
reuse, :func:`measure_drift` compares a sample of the new data with it:

- per-feature population stability index (PSI) over the saved bins, missing
  values being a bin of their own;
- model-fit drift: median and 99th-percentile reconstruction error on the new
  data relative to training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task

from models.bundle import LatentModel
from models.preprocessing import MISSING, _as_float, _as_str
from tasks.policy import PLAIN
from tasks.sampling import read_training_rows

_EPS = 1e-4
_MAX_CATS = 50


def _shares(counts: np.ndarray) -> np.ndarray:
    total = counts.sum()
    return counts / total if total else counts.astype(float)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of two share vectors over the same bins."""
    e = np.clip(np.asarray(expected, dtype=float), _EPS, None)
    a = np.clip(np.asarray(actual, dtype=float), _EPS, None)
    return float(np.sum((a - e) * np.log(a / e)))


def _numeric_counts(x: np.ndarray, edges: list[float]) -> np.ndarray:
    missing = np.isnan(x)
    bins = np.searchsorted(np.asarray(edges), x[~missing], side="right")
    counts = np.bincount(bins, minlength=len(edges) + 1).astype(float)
    return np.append(counts, missing.sum())


def _category_counts(col: pa.Array | pa.ChunkedArray, cats: list[str]) -> np.ndarray:
    values = _as_str(col).fill_null(MISSING)
    idx = pc.index_in(values, value_set=pa.array(cats, type=pa.string()))
    codes = idx.fill_null(len(cats)).to_numpy(zero_copy_only=False)
    return np.bincount(codes, minlength=len(cats) + 1).astype(float)


def build_reference(
    table: pa.Table,
    numeric: list[str],
    categorical: list[str],
    errors: np.ndarray,
) -> dict[str, Any]:
    """A JSON-able summary of the training split, saved with the model."""
    ref: dict[str, Any] = {"numeric": {}, "categorical": {}}
    for name in numeric:
        x = _as_float(table.column(name))
        present = x[~np.isnan(x)]
        edges = (
            np.unique(np.quantile(present, np.linspace(0.1, 0.9, 9))).tolist()
            if present.size
            else []
        )
        ref["numeric"][name] = {
            "edges": edges,
            "shares": _shares(_numeric_counts(x, edges)).tolist(),
        }
    for name in categorical:
        values = _as_str(table.column(name)).fill_null(MISSING)
        counts = pc.value_counts(values).to_pylist()
        counts.sort(key=lambda d: (-d["counts"], d["values"]))
        cats = [d["values"] for d in counts][:_MAX_CATS]
        ref["categorical"][name] = {
            "categories": cats,
            "shares": _shares(_category_counts(table.column(name), cats)).tolist(),
        }
    errors = np.asarray(errors, dtype=np.float64)
    ref["errors"] = {
        "median": float(np.median(errors)),
        "p99": float(np.quantile(errors, 0.99)),
    }
    return ref


@dataclass
class DriftReport:
    """Measured drift of new data against a champion's training reference."""

    psi: dict[str, float] = field(default_factory=dict)
    drifted: list[str] = field(default_factory=list)
    error_median_ratio: float = 1.0
    error_p99_ratio: float = 1.0
    n_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_drift(
    ingested_dir: Path,
    champion_dir: Path,
    *,
    psi_threshold: float = 0.2,
    max_rows: int = 200_000,
    seed: int = 0,
    device: str = "cpu",
) -> DriftReport:
    """Compare a seeded sample of the new partition with the champion's reference.

    The sample is scored on ``device`` (the run's: ``auto`` is CUDA when present).
    """
    model = LatentModel.load(champion_dir, device=device)
    ref = model.info.reference or {}
    columns = model.preprocessor.input_columns
    # A sequence model scores each row in its series: read who and when too.
    columns += [c for c in model.context_columns or () if c not in columns]
    table, _ = read_training_rows(ingested_dir, columns, max_rows, seed)
    report = DriftReport(n_rows=table.num_rows)
    for name, r in ref.get("numeric", {}).items():
        if name in table.column_names:
            counts = _numeric_counts(_as_float(table.column(name)), r["edges"])
            report.psi[name] = psi(r["shares"], _shares(counts))
    for name, r in ref.get("categorical", {}).items():
        if name in table.column_names:
            counts = _category_counts(table.column(name), r["categories"])
            report.psi[name] = psi(r["shares"], _shares(counts))
    report.drifted = sorted(k for k, v in report.psi.items() if v > psi_threshold)
    errs = ref.get("errors")
    if errs and table.num_rows:
        err = model.score(table).score.astype(np.float64)
        report.error_median_ratio = float(np.median(err) / max(errs["median"], 1e-12))
        report.error_p99_ratio = float(np.quantile(err, 0.99) / max(errs["p99"], 1e-12))
    report.psi = {k: round(v, 5) for k, v in sorted(report.psi.items())}
    return report


measure_drift_task = task(measure_drift, name="drift", **PLAIN)
