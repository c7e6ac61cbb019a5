"""Helpers shared by the benchmarks: data preparation, baselines and reporting.

Everything here goes through the pipeline's own code paths (``tasks.ingest``,
``models.preprocessing``, ``tasks.train``) so that benchmark numbers describe
what the nightly run would produce, not a re-implementation of it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from flows.config import PRESETS, PipelineConfig
from models.preprocessing import TabularPreprocessor
from models.schema import TableSchema
from tasks.ingest import ingest
from tasks.train import _binary_label

REPO_ROOT = Path(__file__).resolve().parents[1]
WEATHER_CSV = REPO_ROOT.parent / "shared" / "data" / "weatherAUS.csv"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Any fixed date: the partition name is irrelevant to a throw-away data dir.
_RUN_DATE = date(2000, 1, 1)


def pipeline_defaults(label: str | None = None) -> PipelineConfig:
    """The pipeline's configuration with every field at its default, and
    ``label`` as the data's label (as a preset would set it)."""
    # ``input`` is the only required field; it is not used by the benchmarks.
    return PipelineConfig(input="benchmark", label=label)


# Config fields that other defaults are derived from (see
# PipelineConfig.estimator_params).
_DERIVING = ("latent_dim", "kind", "label_weight")


def default_estimator_params(
    label: str | None = None, **overrides: Any
) -> dict[str, Any]:
    """AutoencoderReducer parameters exactly as the pipeline would pass them,
    for data whose label is ``label`` (None: unlabelled data).

    Overrides of the fields other defaults depend on (``latent_dim``, ``kind``,
    ``label_weight``) go through the config, so those defaults (``pca_axes``)
    follow; the rest are estimator values, set as given.
    ``device`` is forced to CPU: the targets are stated for CPU cores and CUDA
    would make the PyOD timing comparison meaningless.
    """
    fields = {k: v for k, v in overrides.items() if k in _DERIVING}
    params = PipelineConfig(input="benchmark", label=label, **fields).estimator_params()
    params["hidden"] = tuple(params["hidden"])
    params["device"] = "cpu"
    params.update(overrides)
    return params


@dataclass
class Split:
    """A preprocessed 80/20 split of an ingested table, as ``train_model`` makes it.

    ``x_*`` are float32 matrices; ``y_*`` the 0/1 label (meaningful only where
    ``m_*`` is True) or None when the table has no usable binary label.
    """

    x_train: np.ndarray
    x_hold: np.ndarray
    train_table: pa.Table
    hold_table: pa.Table
    numeric: list[str]
    categorical: list[str]
    feature_names: list[str]
    one_hot_groups: list[list[int]] = field(default_factory=list)
    y_train: np.ndarray | None = None
    y_hold: np.ndarray | None = None
    m_train: np.ndarray | None = None
    m_hold: np.ndarray | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def label_train(self) -> np.ndarray | None:
        """The training rows' label as ``fit``'s ``y`` (NaN where unknown), or
        None without a usable label."""
        if self.y_train is None or self.m_train is None:
            return None
        return np.where(self.m_train, self.y_train, np.nan)


def ingest_table(
    source: Path, work_dir: Path, preset: str = "weatheraus"
) -> tuple[pa.Table, dict[str, Any], dict[str, Any]]:
    """Ingest ``source`` with a pipeline preset; return (table, schema, facts).

    The table holds the feature columns and the label only, typed by ingest.
    """
    spec = PRESETS[preset]
    t0 = time.perf_counter()
    result = ingest(
        source,
        work_dir,
        preset,
        _RUN_DATE,
        keys=spec["keys"],
        label=spec["label"],
        rules=spec["rules"],
    )
    seconds = time.perf_counter() - t0
    numeric = result.schema.numeric_features
    categorical = result.schema.categorical_features
    wanted = [*numeric, *categorical, spec["label"]]
    table = pads.dataset(result.ingested_dir, format="parquet").to_table(columns=wanted)
    facts = {
        "rows_in": result.rows_in,
        "rows_accepted": result.rows_accepted,
        "rows_rejected": result.rows_rejected,
        "ingest_seconds": seconds,
    }
    return table, result.schema, facts


def split_table(
    table: pa.Table,
    schema: TableSchema,
    label: str | None,
    seed: int,
    holdout_fraction: float,
) -> Split:
    """Split and preprocess like ``tasks.train.train_model`` does.

    Same seeded permutation (``default_rng([seed, 2])``), same holdout size, and
    the preprocessor is fitted on the train rows only.
    """
    numeric = schema.numeric_features
    categorical = schema.categorical_features
    n = table.num_rows
    order = np.random.default_rng([seed, 2]).permutation(n)
    n_hold = max(1, round(n * holdout_fraction))
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    train_t, hold_t = table.take(train_idx), table.take(hold_idx)
    pre = TabularPreprocessor(numeric, categorical).fit(train_t)
    split = Split(
        x_train=pre.transform(train_t),
        x_hold=pre.transform(hold_t),
        train_table=train_t,
        hold_table=hold_t,
        numeric=numeric,
        categorical=categorical,
        feature_names=list(pre.feature_names_out_),
        one_hot_groups=pre.one_hot_groups(),
    )
    if label and label in table.column_names:
        tr = _binary_label(train_t.column(label).to_pandas())
        ho = _binary_label(hold_t.column(label).to_pandas())
        if tr is not None and ho is not None:
            split.m_train, split.y_train = tr
            split.m_hold, split.y_hold = ho
    return split


def load_weatheraus(
    csv: Path, seed: int, holdout_fraction: float
) -> tuple[Split, dict[str, Any], pa.Table, dict[str, Any]]:
    """Ingest weatherAUS with its preset into a temp dir, then split + preprocess.

    Returns the split, facts about the run, the ingested table and its schema.
    """
    label = PRESETS["weatheraus"]["label"]
    with tempfile.TemporaryDirectory(prefix="lf-bench-") as tmp:
        table, schema, facts = ingest_table(csv, Path(tmp))
    t0 = time.perf_counter()
    split = split_table(table, schema, label, seed, holdout_fraction)
    facts["preprocess_seconds"] = time.perf_counter() - t0
    facts["n_train"], facts["n_features"] = split.x_train.shape
    facts["n_holdout"] = split.x_hold.shape[0]
    return split, facts, table, schema


# ------------------------------------------------------------------ baselines


def pca_reconstruction(
    x_train: np.ndarray, x_hold: np.ndarray, k: int, seed: int
) -> tuple[float, np.ndarray, np.ndarray]:
    """PCA(k) fitted on the train rows: (held-out MSE, train codes, held-out codes).

    The MSE is computed exactly like ``tasks.train._pca_baseline``.
    """
    from sklearn.decomposition import PCA

    k = min(k, x_train.shape[1], x_train.shape[0])
    pca = PCA(n_components=k, random_state=seed).fit(x_train)
    z_hold = pca.transform(x_hold)
    recon = pca.inverse_transform(z_hold)
    return float(((recon - x_hold) ** 2).mean()), pca.transform(x_train), z_hold


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC-AUC, NaN when only one class is present (instead of raising)."""
    from sklearn.metrics import roc_auc_score

    if len(np.unique(labels)) < 2:
        return math.nan
    return float(roc_auc_score(labels, scores))


class EpochClock:
    """An ``epoch_callback`` that timestamps the end of every epoch.

    ``seconds()`` gives the duration of each epoch, the first measured from
    :meth:`start`.
    """

    def __init__(self) -> None:
        self.stamps: list[float] = []
        self.t0 = time.perf_counter()

    def start(self) -> None:
        self.stamps.clear()
        self.t0 = time.perf_counter()

    def __call__(self, epoch: int, train_loss: float, val_loss: float) -> None:
        self.stamps.append(time.perf_counter())

    def seconds(self) -> list[float]:
        edges = [self.t0, *self.stamps]
        return [b - a for a, b in itertools.pairwise(edges)]


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """``fn(*args)`` and the wall seconds it took."""
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


# ------------------------------------------------------------------ reporting


def fmt(value: Any, digits: int = 4) -> str:
    """A compact cell: floats to ``digits`` significant decimals, NaN as '-'."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float | np.floating):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}f}"
    return str(value)


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with right-aligned columns (first column left-aligned)."""
    cells = [[str(h) for h in headers], *[[fmt(v) for v in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]

    def line(row: list[str]) -> str:
        parts = [
            row[i].ljust(widths[i]) if i == 0 else row[i].rjust(widths[i])
            for i in range(len(row))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def met(ok: bool | None) -> str:
    """'met' / 'MISSED' / 'n/a' for a target check."""
    if ok is None:
        return "n/a"
    return "met" if ok else "MISSED"


def environment() -> dict[str, Any]:
    """Facts that explain timings: versions, threads, cores and load."""
    import sklearn
    import torch

    try:
        load = list(os.getloadavg())
    except OSError:  # not available on every platform
        load = None
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "sklearn": sklearn.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": load,
        "machine": platform.machine(),
    }


def set_threads(requested: int) -> str:
    """Set torch's intra-op threads (0 keeps torch's default); describe the load.

    With more busy threads than idle cores every small matmul waits at a barrier
    for a descheduled thread, which makes epochs many times slower rather than
    2x. The timings are only meaningful on an otherwise idle machine, so the
    note says how loaded it was; run with ``--threads 1`` to limit the damage
    on a shared one. Returns a short note for the report.
    """
    import torch

    if requested > 0:
        torch.set_num_threads(requested)
    threads = torch.get_num_threads()
    how = "requested" if requested > 0 else "torch default"
    try:
        load = os.getloadavg()[0]
    except OSError:
        return f"{threads} ({how})"
    note = f"{threads} ({how}; 1-min load {load:.2f} on {os.cpu_count()} cores)"
    if load > 0.5 * (os.cpu_count() or 1):
        note += " WARNING: the machine is busy, timings will be inflated"
    return note


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, pd.Timestamp | date):
        return value.isoformat()
    return value


def write_json(path: Path, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON (NaN becomes null), creating parents."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_jsonable(payload), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
