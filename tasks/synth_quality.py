"""How good synthetic rows are: the figures of the synthesis quality report.

Pure functions over raw tables (pyarrow), so the flow, the benchmark and the
tests compute the same numbers:

``column_distance``
    Per column, in [0, 1], lower is better. Numeric: the Kolmogorov-Smirnov
    statistic of the distributions *with missing values as an atom below every
    number*, so a wrong missing rate counts as much as a wrong shape.
    Categorical: total variation distance, missing as a level of its own.
``correlation_difference``
    Mean absolute difference between the real and synthetic Pearson
    correlation matrices of the numeric columns (pairwise complete rows).
``detection_auc``
    ROC-AUC of a gradient-boosted classifier telling synthetic rows from
    held-out real ones, on rows it was not trained on. 0.5: indistinguishable.
``probe_auc``
    The label probe: a classifier of the label trained on synthetic rows and
    scored on held-out real ones (beside the same classifier trained on real
    rows). Higher is better; the real-trained one is the ceiling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from models.preprocessing import MISSING, TabularPreprocessor, _as_float

#: Rows per side for the classifiers: enough for a stable AUC, seconds to fit.
EVAL_ROWS = 4000


def column_distance(
    real: pa.ChunkedArray, synth: pa.ChunkedArray, numeric: bool
) -> float:
    """Distance of one column's distributions (see the module doc)."""
    if numeric:
        a, b = _as_float(real), _as_float(synth)
        # Missing values sort first: -inf is below every number.
        a = np.where(np.isnan(a), -np.inf, a)
        b = np.where(np.isnan(b), -np.inf, b)
        grid = np.unique(np.concatenate([a, b]))
        fa = np.searchsorted(np.sort(a), grid, side="right") / max(len(a), 1)
        fb = np.searchsorted(np.sort(b), grid, side="right") / max(len(b), 1)
        return float(np.max(np.abs(fa - fb))) if len(grid) else 0.0
    pa_, pb = _freq(real), _freq(synth)
    keys = set(pa_) | set(pb)
    return 0.5 * float(sum(abs(pa_.get(k, 0.0) - pb.get(k, 0.0)) for k in keys))


def _freq(col: pa.ChunkedArray) -> dict[str, float]:
    values = col.cast(pa.string()).to_pylist()
    out: dict[str, float] = {}
    for v in values:
        key = MISSING if v is None else str(v)
        out[key] = out.get(key, 0.0) + 1.0
    n = max(len(values), 1)
    return {k: c / n for k, c in out.items()}


def correlation_difference(
    real: pa.Table, synth: pa.Table, numeric: Sequence[str]
) -> float:
    """Mean |corr_real - corr_synth| over the pairs of numeric columns."""
    import pandas as pd

    if len(numeric) < 2:
        return 0.0

    def corr(t: pa.Table) -> np.ndarray:
        frame = pd.DataFrame({c: _as_float(t.column(c)) for c in numeric})
        return frame.corr(min_periods=10).to_numpy()

    cr, cs = corr(real), corr(synth)
    upper = np.triu_indices(len(numeric), k=1)
    diff = np.abs(np.nan_to_num(cr[upper]) - np.nan_to_num(cs[upper]))
    return float(diff.mean())


def _classifier(seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(
        max_iter=40,
        max_leaf_nodes=8,
        max_bins=63,
        early_stopping=False,
        random_state=seed,
    )


def _rows(t: pa.Table, n: int, rng: np.random.Generator) -> pa.Table:
    if t.num_rows <= n:
        return t
    return t.take(pa.array(np.sort(rng.choice(t.num_rows, n, replace=False))))


def detection_auc(
    real: pa.Table, synth: pa.Table, encoder: TabularPreprocessor, seed: int
) -> float:
    """AUC of telling synthetic from real rows, on a held-out half of each."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng([seed, 5])
    n = min(real.num_rows, synth.num_rows, EVAL_ROWS)
    xr = encoder.transform(_rows(real, n, rng))
    xs = encoder.transform(_rows(synth, n, rng))
    x = np.vstack([xr, xs]).astype(np.float64)
    y = np.r_[np.zeros(len(xr)), np.ones(len(xs))]
    test = rng.random(len(y)) < 0.5
    clf = _classifier(seed).fit(x[~test], y[~test])
    return float(roc_auc_score(y[test], clf.predict_proba(x[test])[:, 1]))


def probe_auc(
    train: pa.Table,
    test: pa.Table,
    features: TabularPreprocessor,
    label: str,
    positive: str,
    seed: int,
) -> float:
    """AUC on ``test`` of a label classifier trained on ``train``."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng([seed, 9])

    def xy(t: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        y = np.asarray(t.column(label).cast(pa.string()).to_pylist(), dtype=object)
        known = np.asarray([v is not None for v in y])
        t = t.filter(pa.array(known))
        return features.transform(t), (y[known] == positive).astype(int)

    xtr, ytr = xy(_rows(train, EVAL_ROWS, rng))
    xte, yte = xy(test)
    if len(np.unique(ytr)) < 2 or len(np.unique(yte)) < 2:
        return 0.5  # one class only: the probe cannot rank anything
    clf = _classifier(seed).fit(xtr, ytr)
    return float(roc_auc_score(yte, clf.predict_proba(xte)[:, 1]))


@dataclass
class Figures:
    """One generator's figures."""

    columns: dict[str, float]
    correlation: float
    detection: float
    probe: float | None

    @property
    def distance(self) -> float:
        return float(np.mean(list(self.columns.values()))) if self.columns else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "column_distance_mean": self.distance,
            "column_distance": self.columns,
            "correlation_difference": self.correlation,
            "detection_auc": self.detection,
            "probe_auc": self.probe,
        }


@dataclass
class QualityReport:
    """The figures of each generator, the real-data probe ceiling, the verdict."""

    figures: dict[str, Figures]
    probe_real: float | None
    label: str | None
    rows: int
    notes: list[str] = field(default_factory=list)

    def beats(self, kind: str, other: str = "independent") -> dict[str, bool]:
        """Which figures ``kind`` is better on than ``other``."""
        a, b = self.figures[kind], self.figures[other]
        out = {
            "column_distance": a.distance < b.distance,
            "correlation_difference": a.correlation < b.correlation,
            "detection_auc": abs(a.detection - 0.5) < abs(b.detection - 0.5),
        }
        if a.probe is not None and b.probe is not None:
            out["probe_auc"] = a.probe > b.probe
        return out

    def winner(self) -> str | None:
        """The learnt generator better on more figures (detection breaks ties)."""
        if not {"gan", "vae"} <= set(self.figures):
            return None
        wins = self.beats("gan", "vae")
        score = sum(wins.values()) - (len(wins) - sum(wins.values()))
        if score == 0:
            return "gan" if wins["detection_auc"] else "vae"
        return "gan" if score > 0 else "vae"

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "label": self.label,
            "probe_auc_real": self.probe_real,
            "generators": {k: f.to_dict() for k, f in self.figures.items()},
            "beats_baseline": {
                k: self.beats(k) for k in self.figures if k != "independent"
            },
            "winner": self.winner(),
        }

    def table(self) -> str:
        """The report as a Markdown table, one column per generator."""
        kinds = list(self.figures)
        head = "| figure | " + " | ".join(kinds) + " |"
        rule = "|---|" + "---:|" * len(kinds)
        lines = [head, rule]

        def row(name: str, vals: list[float | None]) -> None:
            cells = ["n/a" if v is None else f"{v:.3f}" for v in vals]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")

        f = self.figures
        row("column distance, mean (lower is better)", [f[k].distance for k in kinds])
        row(
            "column distance, worst",
            [max(f[k].columns.values(), default=0.0) for k in kinds],
        )
        row("correlation difference (lower)", [f[k].correlation for k in kinds])
        row("detection ROC-AUC (0.5 is best)", [f[k].detection for k in kinds])
        if self.label is not None:
            row(
                f"label probe ROC-AUC, {self.label} (higher; real rows:"
                f" {self.probe_real:.3f})",
                [f[k].probe for k in kinds],
            )
        return "\n".join(lines)

    def text(self) -> str:
        """The table plus the verdict, as printed and logged."""
        out = [
            f"Synthetic-data quality ({self.rows} rows per generator)",
            "",
            self.table(),
        ]
        for kind in self.figures:
            if kind == "independent":
                continue
            lost = [k for k, ok in self.beats(kind).items() if not ok]
            verdict = (
                "beats the independent-columns baseline on every figure"
                if not lost
                else f"does NOT beat the baseline on: {', '.join(lost)}"
            )
            out.append(f"{kind}: {verdict}")
        win = self.winner()
        if win is not None:
            out.append(f"winner: {win}")
        out += self.notes
        return "\n".join(out)


def evaluate(*args: Any, **kwargs: Any) -> QualityReport:
    """:func:`evaluate_rows` with scikit-learn and BLAS on one thread.

    The classifiers are small; on a shared 2-core machine their OpenMP threads
    spent minutes waiting for each other (a 300-row report took 5 min with
    two threads under load, seconds with one).
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        return evaluate_rows(*args, **kwargs)


def evaluate_rows(
    real_train: pa.Table,
    real_holdout: pa.Table,
    synthetic: Mapping[str, pa.Table],
    numeric: Sequence[str],
    categorical: Sequence[str],
    label: str | None,
    seed: int = 0,
) -> QualityReport:
    """The figures of every generator's rows against the held-out real rows.

    ``categorical`` includes the label when there is one.
    """
    encoder = TabularPreprocessor(numeric, categorical, max_categories=256)
    encoder.fit(real_train)
    features = [c for c in categorical if c != label]
    probe_enc = TabularPreprocessor(numeric, features, max_categories=256)
    probe_enc.fit(real_train)
    positive = None
    if label is not None:
        levels = [v for v in real_train.column(label).to_pylist() if v is not None]
        values, counts = np.unique(np.asarray(levels, dtype=object), return_counts=True)
        # The rarer level is the event (RainTomorrow == Yes).
        positive = str(values[np.argmin(counts)]) if len(values) else None
    probe_real = None
    if label is not None and positive is not None:
        probe_real = probe_auc(
            real_train, real_holdout, probe_enc, label, positive, seed
        )
    figures = {}
    for kind, synth in synthetic.items():
        cols = {
            c: column_distance(real_holdout.column(c), synth.column(c), True)
            for c in numeric
        }
        cols.update(
            {
                c: column_distance(real_holdout.column(c), synth.column(c), False)
                for c in categorical
            }
        )
        probe = None
        if label is not None and positive is not None:
            probe = probe_auc(synth, real_holdout, probe_enc, label, positive, seed)
        figures[kind] = Figures(
            columns=cols,
            correlation=correlation_difference(real_holdout, synth, numeric),
            detection=detection_auc(real_holdout, synth, encoder, seed),
            probe=probe,
        )
    rows = min(t.num_rows for t in synthetic.values()) if synthetic else 0
    return QualityReport(figures, probe_real, label, rows)
