"""``kind: sequence``: windows per entity, the family, and the whole pipeline
(real Prefect engine, MLflow on SQLite, Parquet; a real Dask LocalCluster).

One pipeline run (module fixture) serves every pipeline assertion: the data
are weatherAUS-shaped rows in three source files cut by date, so every
station's series crosses files and work units.
"""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from models.sequence_windows import (
    EMPTY,
    ContextColumnError,
    RowContext,
    WindowState,
    gather,
    row_context,
)

D1, D2 = date(2024, 3, 1), date(2024, 3, 2)
WINDOW = 4
FAST = {
    "kind": "sequence",
    "window": WINDOW,
    "epochs": 2,
    "hidden": (16,),
    "latent_dim": 3,
    "batch_size": 128,
}
ROWS, FILES = 1470, 3  # 49 stations x 30 days


# --------------------------------------------------------------- the windows


def _ctx(entities: list[str], days: list[int]) -> RowContext:
    return RowContext(np.asarray(entities, dtype=object), np.asarray(days, np.int64))


def test_windows_mask_gaps_short_series_and_first_days() -> None:
    # Station A has a gap on day 2; B has a single day; rows interleave.
    ctx = _ctx(["A", "B", "A", "A", "A"], [0, 10, 1, 3, 4])
    x = np.arange(5, dtype=np.float32)[:, None]
    pool, index = WindowState(3, 1).windows(x, ctx)
    E = EMPTY
    assert index.tolist() == [
        [E, E, 0],  # A's first day: nothing before it
        [E, E, 1],  # B: a series shorter than the window
        [E, 0, 2],  # A day 1: day 0 before it
        [2, E, 3],  # A day 3: day 1 two slots back, day 2 missing
        [E, 3, 4],  # A day 4: day 2 missing, day 3 just before
    ]
    windows, mask = gather(pool, index)
    assert windows.shape == (5, 3, 1) and mask.sum() == 8
    assert windows[3, :, 0].tolist() == [2.0, 0.0, 3.0]


def test_streamed_windows_equal_one_pass_with_memory_bounded() -> None:
    rng = np.random.default_rng(0)
    n, entities, w = 3000, 7, 5
    ent = rng.integers(0, entities, n).astype(str).astype(object)
    day = np.sort(rng.integers(0, 900, n))  # time order, gaps and duplicates
    x = rng.normal(size=(n, 3)).astype(np.float32)
    whole = gather(*WindowState(w, 3).windows(x, _ctx(list(ent), list(day))))
    state = WindowState(w, 3)
    parts, start = [], 0
    for size in [1, 17, 500, 2, 1200, 280, 1000]:
        stop = min(n, start + size)
        sl = slice(start, stop)
        parts.append(gather(*state.windows(x[sl], _ctx(list(ent[sl]), list(day[sl])))))
        assert state.rows_held <= w * entities
        start = stop
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), whole[0])
    np.testing.assert_array_equal(np.concatenate([p[1] for p in parts]), whole[1])


def test_time_column_must_be_a_date_or_integer_without_nulls() -> None:
    t = pa.table(
        {"s": ["a", "b"], "d": pa.array([date(2024, 1, 2), None], pa.date32())}
    )
    with pytest.raises(ContextColumnError, match="'d' has 1 missing value"):
        row_context(t, "s", "d")
    with pytest.raises(ContextColumnError, match="column 'x'"):
        row_context(t, "s", "x")
    ok = row_context(pa.table({"s": ["a"], "d": ["2024-01-02"]}), "s", "d")
    assert ok.day.tolist() == [(date(2024, 1, 2) - date(1970, 1, 1)).days]


def test_context_columns_come_from_the_keys_or_the_settings() -> None:
    from models.families import get_family

    family = get_family("sequence")
    kinds = {"Date": "date", "Location": "categorical", "Other": "text"}
    assert family.build({"window": 3}).bind_context(["Date", "Location"], kinds) == (
        "Location",
        "Date",
    )
    built = family.build({"window": 3, "entity_column": "Other"})
    assert built.bind_context(["Date", "Location"], kinds) == ("Other", "Date")
    with pytest.raises(ContextColumnError, match="set time_column"):
        family.build({"window": 3}).bind_context(["Location"], kinds)


def test_window_flag_and_fields_reach_the_family() -> None:
    from flows.cli import _overrides, _parser
    from flows.config import PipelineConfig, build_config
    from tasks.errors import ConfigError

    args = _parser().parse_args(
        ["run", "--input", "x.csv", "--kind", "sequence", "--window", "5"]
    )
    cfg = build_config(None, _overrides(args))
    params = cfg.estimator_params()
    assert params["kind"] == "sequence" and params["window"] == 5
    assert params["entity_column"] is None and "noise_std" not in params
    # A default config hashes as before the fields existed; a set one differs.
    plain = PipelineConfig(input="x.csv")
    assert plain.config_hash() == PipelineConfig(input="x.csv", window=7).config_hash()
    assert plain.config_hash() != PipelineConfig(input="x.csv", window=5).config_hash()
    with pytest.raises(ConfigError, match="window") as info:
        build_config(None, {"input": "x.csv", "kind": "sequence", "window": 1})
    assert "\n" not in str(info.value)


def test_benchmark_skips_without_the_data_and_plants_normal_looking_rows(
    capsys, tmp_path
) -> None:
    from benchmarks import temporal
    from tasks.synthetic import weatheraus_like

    assert temporal.main(["--csv", str(tmp_path / "none.csv")]) == 0
    assert capsys.readouterr().out.startswith("skipped: ")
    frame = weatheraus_like(49 * 430, seed=2).to_pandas()
    frame = frame[frame["Location"].isin(["Albany", "Cairns", "Darwin"])]
    frame = frame.sort_values(["Location", "Date"], kind="stable")
    frame = frame.reset_index(drop=True)
    frame.attrs["numeric"] = list(temporal.SENSORS)
    frame.attrs["categorical"] = ["WindGustDir"]
    test, train = frame[frame["Date"] >= date(2008, 1, 1)], frame
    test = test.reset_index(drop=True)
    test.attrs = frame.attrs
    planted, kind = temporal.plant(test, train, 1.5, seed=0)
    assert {"stuck", "drift", "swap", "single"} <= set(kind)
    # A stuck row repeats the reading before its run, cell for cell.
    stuck = np.flatnonzero(kind == "stuck")[:5]
    cells = [*temporal.SENSORS, "WindGustDir"]
    for r in stuck:
        assert planted.loc[r, cells].equals(planted.loc[stuck[0] - 1, cells])
    # Unplanted rows are untouched; the rows after a planted one are set apart.
    clean = kind == ""
    pd.testing.assert_frame_equal(planted[clean], test[clean])
    near = temporal.affected(planted, kind, 7)
    assert near.any() and not (near & ~clean).any()


# -------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three CSVs cut by date: every station's series crosses two file edges."""
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("seq-src")
    whole = write_weatheraus_like_csv(root / "all.csv", ROWS, seed=5)
    header, *rows = whole.read_text().splitlines(keepends=True)
    src = root / "weatherAUS"
    src.mkdir()
    per = ROWS // FILES
    for i in range(FILES):
        (src / f"drop-{i}.csv").write_text(
            header + "".join(rows[i * per : (i + 1) * per])
        )
    return src


@pytest.fixture(scope="module")
def runs(prefect_harness, source: Path, tmp_path_factory) -> dict[str, Any]:
    """Day 1 trained and scored by the sequential runner, day 2 (same rows,
    champion reused) scored by a Dask LocalCluster of two workers."""
    from flows.cli import run_pipeline

    data = tmp_path_factory.mktemp("seq-data")
    base = {"input": str(source), "data_dir": str(data), **FAST}
    first = run_pipeline(None, {**base, "run_date": D1})
    second = run_pipeline(
        None, {**base, "run_date": D2, "runner": "dask", "dask_workers": 2}
    )
    return {"data": data, "first": first, "second": second}


def _read(partition: str | Path) -> pd.DataFrame:
    df = pd.read_parquet(partition)
    return df.sort_values("_row_id").reset_index(drop=True)


def _bundle(data: Path) -> Path:
    return next((data / "mlartifacts").rglob("model_dir"))


@pytest.mark.slow
def test_every_row_gets_a_latent_and_a_score(runs) -> None:
    first = runs["first"]
    assert first["trained"] and first["rows_scored"] == ROWS
    out = _read(first["output"])
    assert len(out) == ROWS and out["_row_id"].is_unique
    latent = out[["latent_0", "latent_1", "latent_2"]].to_numpy()
    assert np.isfinite(latent).all() and np.isfinite(out["recon_error"]).all()
    assert 0 < out["is_anomaly"].sum() < 0.05 * ROWS


@pytest.mark.slow
def test_dask_runner_scores_exactly_as_the_sequential_one(runs) -> None:
    second = runs["second"]
    assert not second["trained"] and second["model_version"] == 1
    a, b = _read(runs["first"]["output"]), _read(second["output"])
    cols = [c for c in a.columns if c.startswith("latent_")] + ["recon_error"]
    pd.testing.assert_frame_equal(a[cols], b[cols], check_exact=True)
    np.testing.assert_array_equal(a["is_anomaly"], b["is_anomaly"])


@pytest.mark.slow
def test_units_scored_in_any_order_equal_the_single_pass(runs, tmp_path) -> None:
    from tasks.score import Provenance, plan_scoring, score_unit

    data = runs["data"]
    ingested = data / "ingested" / "weatheraus" / f"run_date={D1}"
    prov = Provenance("weatheraus-autoencoder", 1, "r", "h")
    plan = plan_scoring(ingested, _bundle(data), "weatheraus", D1, prov, unit_rows=1)
    assert len(plan.units) == FILES
    for unit in reversed(plan.units):  # a unit never relies on an earlier one
        score_unit(unit, plan.layout, _bundle(data), tmp_path, batch_rows=100)
    units = _read(tmp_path)
    whole = _read(runs["first"]["output"])
    np.testing.assert_array_equal(units["recon_error"], whole["recon_error"])


def _stream(data: Path, area: str, run_date: date = D1) -> pd.DataFrame:
    """A partition in stream order: files by name, rows as written."""
    return pd.read_parquet(data / area / "weatheraus" / f"run_date={run_date}")


@pytest.mark.slow
def test_a_rows_history_shapes_its_latent_and_score(runs) -> None:
    from models.bundle import LatentModel

    data = runs["data"]
    model = LatentModel.load(_bundle(data))
    ingested = _stream(data, "ingested")
    scored = _stream(data, "latent").set_index("_row_id")
    series = ingested[ingested["Location"] == "Albany"]
    expected = scored.loc[series["_row_id"], "recon_error"].to_numpy()
    # In its series, a row scores as the batch did; alone, it does not.
    in_series = model.score(pa.Table.from_pandas(series, preserve_index=False))
    np.testing.assert_allclose(in_series.score, expected, rtol=1e-6)
    alone = model.score(pa.Table.from_pandas(series.tail(1), preserve_index=False))
    assert alone.score[0] != pytest.approx(in_series.score[-1])


@pytest.mark.slow
def test_pyfunc_serves_the_sequence_model(runs) -> None:
    import mlflow

    from models.serving import load_model

    data = runs["data"]
    uri = f"sqlite:///{data / 'mlflow.db'}"
    pyfunc = load_model("weatheraus-autoencoder", tracking_uri=uri)
    ingested = _stream(data, "ingested")
    series = ingested[ingested["Location"] == "Albany"]
    raw = series.drop(columns="_row_id").astype(str)
    raw = raw.replace({"nan": "NA", "None": "NA"})
    pred = pyfunc.predict(raw)
    assert pred["error"].isna().all()
    scored = _stream(data, "latent").set_index("_row_id")
    expected = scored.loc[series["_row_id"], "recon_error"].to_numpy()
    np.testing.assert_allclose(pred["recon_error"], expected, rtol=1e-5)
    with pytest.raises(mlflow.exceptions.MlflowException, match="Date"):
        pyfunc.predict(raw.drop(columns="Date"))


@pytest.mark.slow
def test_explanations_name_the_columns_and_the_days(runs) -> None:
    from tasks.report import worst_features

    data = runs["data"]
    ingested = data / "ingested" / "weatheraus" / f"run_date={D1}"
    out = _read(runs["first"]["output"])
    top = out.nlargest(5, "recon_error")["_row_id"].tolist()
    rows = worst_features(ingested, _bundle(data), top, ["Date", "Location"])
    assert sorted(r["_row_id"] for r in rows) == sorted(top)
    for row in rows:
        assert row["feature_1"].split(" (")[0] in pd.read_parquet(ingested).columns
        day = date.fromisoformat(row["day_1"].split(" (")[0])
        own = date.fromisoformat(row["Date"])
        assert 0 <= (own - day).days < WINDOW


@pytest.mark.slow
def test_saved_without_pickle_and_checksummed(runs, tmp_path) -> None:
    import shutil

    from models.families.sequence import SequenceFamily

    est = tmp_path / "estimator"
    shutil.copytree(_bundle(runs["data"]) / "estimator", est)
    meta = json.loads((est / "estimator.json").read_text())
    assert meta["format"] == "latentflow.SequenceFamily"
    assert meta["params"]["window"] == WINDOW
    assert SequenceFamily.load(est).context_columns == ("Location", "Date")
    weights = est / "weights.pt"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    with pytest.raises(ValueError, match="does not match the checksum") as info:
        SequenceFamily.load(est)
    assert "\n" not in str(info.value)
