"""Temporal anomalies on weatherAUS: ``make bench-temporal``.

Run ``python -m benchmarks.temporal`` from the repository root. It skips (exit
status 0, one line) when ``../shared/data/weatherAUS.csv`` is absent.

Protocol (one run, every detector on the same rows):

1. ``--locations`` stations drawn with the seed, each station's
   ``--train-years`` of days before ``--test-year`` for training and the test
   year for testing, ingested with the weatherAUS preset (the pipeline's
   typing and checks);
2. anomalies planted in the test year only, in disjoint 20-day slots of each
   station, each of them normal row by row:

   - ``stuck``: a station's every reading repeated for the next 5 days
     (those 5 rows are the anomalies);
   - ``drift``: one continuous sensor drifting linearly over 14 days to
     ``--drift`` of its training standard deviation (all 14 rows);
   - ``swap``: two days of a station, 5 to 7 months apart (summer and
     winter), swapped (both rows);
   - ``single``: single-row anomalies for comparison: 3 continuous cells of a
     row replaced by the values of another random test row;

3. the preprocessor fitted on the training rows; every detector fitted on the
   training rows without labels: ``kind: sequence`` (``SequenceFamily``,
   window ``--window``, its row part with ``AutoencoderReducer()``'s
   settings), the row-wise default ``AutoencoderReducer()``, and
   scikit-learn's ``IsolationForest()``; all seeded;
4. ROC-AUC per anomaly type over the test rows: the type's planted rows
   against the test rows that are neither planted nor in a planted row's
   window (the ``window - 1`` days after one: their history is not normal,
   and no detector is charged for them either way).

The sequence model scores the test year with each station's history (its
training rows fed into the window state first). Results go to
``benchmarks/results/temporal.json``.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as pads

from benchmarks.common import (
    RESULTS_DIR,
    WEATHER_CSV,
    environment,
    format_table,
    roc_auc,
    set_threads,
    write_json,
)

TYPES = ("stuck", "drift", "swap")
SLOT_DAYS = 20
STUCK_DAYS = 5
DRIFT_DAYS = 14
SINGLE_CELLS = 3
#: Continuous sensors: drifted, and the cells of the single-row anomalies.
SENSORS = (
    "MinTemp",
    "MaxTemp",
    "Temp9am",
    "Temp3pm",
    "Humidity9am",
    "Humidity3pm",
    "Pressure9am",
    "Pressure3pm",
    "WindGustSpeed",
)
DETECTORS = ("sequence", "AutoencoderReducer()", "IsolationForest")


def _echo(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def load_subset(
    csv: Path, n_locations: int, test_year: int, train_years: int, seed: int
) -> pd.DataFrame:
    """The drawn stations' rows of the chosen years, ingested and typed, in the
    file's order (station by station, by date)."""
    from flows.config import PRESETS
    from tasks.ingest import ingest

    raw = pd.read_csv(csv, dtype=str, keep_default_na=False)
    year = raw["Date"].str[:4].astype(int)
    raw = raw[(year >= test_year - train_years) & (year <= test_year)]
    counts = raw.groupby("Location").size()
    full = sorted(counts[counts >= 300 * (train_years + 1)].index)
    rng = np.random.default_rng([seed, 11])
    chosen = set(rng.choice(full, size=min(n_locations, len(full)), replace=False))
    raw = raw[raw["Location"].isin(chosen)]
    spec = PRESETS["weatheraus"]
    with tempfile.TemporaryDirectory(prefix="lf-temporal-") as tmp:
        src = Path(tmp) / "weatherAUS.csv"
        raw.to_csv(src, index=False)
        result = ingest(
            src,
            Path(tmp) / "data",
            "weatheraus",
            date(2000, 1, 1),
            keys=spec["keys"],
            label=spec["label"],
            rules=spec["rules"],
        )
        table = pads.dataset(result.ingested_dir, format="parquet").to_table()
        schema = result.schema
    frame = table.to_pandas()
    frame.attrs["numeric"] = schema.numeric_features
    frame.attrs["categorical"] = schema.categorical_features
    return frame.sort_values(["Location", "Date"], kind="stable").reset_index(drop=True)


def plant(
    test: pd.DataFrame, train: pd.DataFrame, drift_sd: float, seed: int
) -> tuple[pd.DataFrame, np.ndarray]:
    """The test rows with anomalies planted, and each row's type ("" if none)."""
    rng = np.random.default_rng([seed, 13])
    out = test.copy()
    kind = np.full(len(out), "", dtype=object)
    sensors = [s for s in SENSORS if s in out.columns]
    scale = {s: float(np.nanstd(train[s].astype(float))) for s in sensors}
    features = [*out.attrs["numeric"], *out.attrs["categorical"]]
    cycle = ["stuck", "drift", "single", "swap"]
    turn = 0
    for _, rows in out.groupby("Location", sort=True).groups.items():
        idx = np.asarray(rows)
        slots = [idx[s : s + SLOT_DAYS] for s in range(0, len(idx), SLOT_DAYS)]
        # Every other slot: the free ones keep planted windows apart.
        used: set[int] = set()
        for k in range(1, len(slots) - 1, 2):
            if k in used or len(slots[k]) < SLOT_DAYS:
                continue
            what = cycle[turn % len(cycle)]
            turn += 1
            slot = slots[k]
            if what == "stuck":
                first = slot[2]
                rep = slot[3 : 3 + STUCK_DAYS]
                _copy(out, rep, np.full(len(rep), first), features)
                kind[rep] = "stuck"
            elif what == "drift":
                col = sensors[int(rng.integers(len(sensors)))]
                rows_d = slot[2 : 2 + DRIFT_DAYS]
                ramp = np.linspace(drift_sd / DRIFT_DAYS, drift_sd, len(rows_d))
                vals = out.loc[rows_d, col].astype(float).to_numpy()
                out.loc[rows_d, col] = vals + ramp * scale[col]
                kind[rows_d] = "drift"
            elif what == "single":
                r = slot[int(rng.integers(2, SLOT_DAYS - 2))]
                donor = int(rng.integers(len(out)))
                cols = rng.choice(sensors, size=SINGLE_CELLS, replace=False)
                _copy(out, np.array([r]), np.array([donor]), list(cols))
                kind[r] = "single"
            else:  # swap with a day 5-7 months later, in a free slot
                ahead = [
                    j
                    for j in range(k + 8, min(len(slots), k + 11))
                    if j % 2 == 1 and j not in used and len(slots[j]) == SLOT_DAYS
                ]
                if not ahead:
                    continue
                j = ahead[int(rng.integers(len(ahead)))]
                used.add(j)
                a, b = slot[SLOT_DAYS // 2], slots[j][SLOT_DAYS // 2]
                _copy(out, np.array([a, b]), np.array([b, a]), features)
                kind[[a, b]] = "swap"
    return out, kind


def _copy(out: pd.DataFrame, dst: np.ndarray, src: np.ndarray, cols: list[str]) -> None:
    """Row ``src[i]``'s cells into row ``dst[i]``, column by column (keeps dtypes)."""
    for c in cols:
        values = out[c].to_numpy(copy=True)
        values[dst] = out[c].to_numpy()[src]
        out[c] = values


def affected(test: pd.DataFrame, kind: np.ndarray, window: int) -> np.ndarray:
    """Unplanted rows within ``window - 1`` days after a planted row."""
    days = (pd.to_datetime(test["Date"]) - pd.Timestamp("1970-01-01")).dt.days
    hit = np.zeros(len(test), bool)
    for loc, rows in test.groupby("Location").groups.items():
        del loc
        idx = np.asarray(rows)
        d = days.to_numpy()[idx]
        planted = d[kind[idx] != ""]
        for p in planted:
            hit[idx[(d > p) & (d < p + window)]] = True
    return hit & (kind == "")


def run(args: argparse.Namespace, echo: Any = _echo) -> dict[str, Any]:
    from sklearn.ensemble import IsolationForest

    from models.estimator import AutoencoderReducer
    from models.families import get_family
    from models.preprocessing import TabularPreprocessor
    from models.sequence_windows import row_context

    threads = set_threads(args.threads)
    t0 = time.perf_counter()
    frame = load_subset(
        args.csv, args.locations, args.test_year, args.train_years, args.seed
    )
    numeric, categorical = frame.attrs["numeric"], frame.attrs["categorical"]
    is_test = frame["Date"].map(lambda d: d.year == args.test_year).to_numpy()
    train, test = frame[~is_test], frame[is_test].reset_index(drop=True)
    test.attrs = frame.attrs
    planted, kind = plant(test, train, args.drift, args.seed)
    cols = ["Date", "Location", *numeric, *categorical]
    train_t = pa.Table.from_pandas(train[cols], preserve_index=False)
    test_t = pa.Table.from_pandas(planted[cols], preserve_index=False)
    pre = TabularPreprocessor(numeric, categorical).fit(train_t)
    x_train, x_test = pre.transform(train_t), pre.transform(test_t)
    counts = {t: int((kind == t).sum()) for t in (*TYPES, "single")}
    echo(
        f"{args.locations} stations, {len(train)} training rows, {len(test)} test"
        f" rows, planted {counts} ({time.perf_counter() - t0:.0f} s)"
    )

    # AutoencoderReducer()'s own defaults, for both the baseline and the
    # sequence model's row part: the single-row comparison is like for like.
    defaults = {
        k: v.default
        for k, v in inspect.signature(AutoencoderReducer.__init__).parameters.items()
        if k in ("latent_dim", "hidden", "epochs", "batch_size", "lr", "patience")
    }
    scores: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    seq = get_family("sequence").build(
        {
            **defaults,
            "window": args.window,
            "random_state": args.seed,
            "device": "cpu",
        }
    )
    seq.bind_context(["Date", "Location"], {"Date": "date"})
    t1 = time.perf_counter()
    seq.fit(x_train, row_context(train_t, "Location", "Date"))
    seconds["sequence"] = time.perf_counter() - t1
    state = seq.new_state()
    seq.advance(x_train, row_context(train_t, "Location", "Date"), state)
    scores["sequence"] = seq.score_stream(
        x_test, row_context(test_t, "Location", "Date"), state
    )[1]
    echo(f"sequence: {seconds['sequence']:.0f} s")

    ae = AutoencoderReducer(device="cpu", random_state=args.seed)
    t1 = time.perf_counter()
    ae.fit(x_train)
    seconds["AutoencoderReducer()"] = time.perf_counter() - t1
    scores["AutoencoderReducer()"] = ae.decision_function(x_test)
    echo(f"AutoencoderReducer(): {seconds['AutoencoderReducer()']:.0f} s")

    forest = IsolationForest(random_state=args.seed)
    t1 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forest.fit(x_train)
    seconds["IsolationForest"] = time.perf_counter() - t1
    scores["IsolationForest"] = -forest.score_samples(x_test)

    negatives = (kind == "") & ~affected(planted, kind, args.window)
    table: dict[str, dict[str, float]] = {}
    for what in (*TYPES, "temporal", "single"):
        pos = np.isin(kind, TYPES) if what == "temporal" else kind == what
        keep = pos | negatives
        table[what] = {
            d: roc_auc(pos[keep].astype(int), np.asarray(s)[keep])
            for d, s in scores.items()
        }
    return {
        "protocol": {
            "locations": args.locations,
            "test_year": args.test_year,
            "train_years": args.train_years,
            "window": args.window,
            "drift_sd": args.drift,
            "seed": args.seed,
            "n_train": len(train),
            "n_test": len(test),
            "planted": counts,
            "negatives": int(negatives.sum()),
            "threads": threads,
        },
        "roc_auc": table,
        "fit_seconds": seconds,
        "environment": environment(),
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [what, *[result["roc_auc"][what][d] for d in DETECTORS]]
        for what in result["roc_auc"]
    ]
    rows.append(["fit seconds", *[result["fit_seconds"][d] for d in DETECTORS]])
    return format_table(["ROC-AUC", *DETECTORS], rows)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.temporal", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--csv", type=Path, default=WEATHER_CSV, help="weatherAUS.csv")
    ap.add_argument("--locations", type=int, default=12, help="stations drawn")
    ap.add_argument("--test-year", type=int, default=2016)
    ap.add_argument("--train-years", type=int, default=2, help="years before it")
    ap.add_argument("--window", type=int, default=7, help="days per window")
    ap.add_argument("--drift", type=float, default=1.5, help="final drift, in SDs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "temporal.json", help="JSON"
    )
    args = ap.parse_args(argv)
    if not args.csv.is_file():
        print(f"skipped: {args.csv} not found (the benchmark needs the real data)")
        return 0
    result = run(args)
    print(report(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
