"""The pipeline through the real Prefect engine and real MLflow, on small data."""

from __future__ import annotations

from datetime import date

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from flows.cli import run_pipeline
from tasks.score import read_metadata

D1, D2 = date(2024, 3, 1), date(2024, 3, 2)
FAST = {"epochs": 4, "hidden": (16,), "latent_dim": 3, "batch_size": 128}


def run(small_csv, data_dir, run_date=D1, **kw):
    overrides = {
        "input": str(small_csv),
        "data_dir": str(data_dir),
        "run_date": run_date,
        **FAST,
        **kw,
    }
    return run_pipeline(None, overrides)


def read_latent(summary) -> pd.DataFrame:
    return (
        pd.read_parquet(summary["output"]).sort_values("_row_id").reset_index(drop=True)
    )


def test_train_then_reuse_then_retrain(prefect_harness, small_csv, tmp_path):
    import mlflow

    data = tmp_path / "lf"
    s1 = run(small_csv, data)
    assert (
        s1["trained"]
        and s1["reason"].startswith("no_champion")
        and s1["model_version"] == 1
    )
    assert s1["rows_in"] == 3000 and s1["rows_scored"] == 3000 - s1["rows_rejected"]
    out = read_latent(s1)
    assert len(out) == s1["rows_scored"] and out["_row_id"].is_unique
    lat = [f"latent_{i}" for i in range(3)]
    assert list(out.columns[:3]) == ["_row_id", "Date", "Location"]
    assert all(out[c].dtype == np.float32 for c in [*lat, "recon_error"])
    assert out[lat].notna().all().all() and out["is_anomaly"].dtype == bool
    assert 0.003 < out["is_anomaly"].mean() < 0.03
    meta = read_metadata(data / "latent" / "weatheraus" / f"run_date={D1}")
    assert meta["latentflow.model_version"] == "1"
    assert meta["latentflow.mlflow_run_id"] == s1["mlflow_run_id"]
    assert len(meta["latentflow.config_hash"]) == 16

    client = mlflow.MlflowClient()
    mv = client.get_model_version_by_alias("weatheraus-autoencoder", "champion")
    assert int(mv.version) == 1 and "PCA" in (mv.description or "")
    assert "Code: latentflow commit " in mv.description
    run1 = client.get_run(s1["mlflow_run_id"])
    assert {"val_mse", "pca_val_mse", "probe_auc"} <= set(run1.data.metrics)
    assert len(client.get_metric_history(s1["mlflow_run_id"], "train_loss")) >= 1
    plots = {a.path for a in client.list_artifacts(s1["mlflow_run_id"], "plots")}
    assert {"plots/loss.png", "plots/error_hist.png", "plots/recon.png"} <= plots

    s2 = run(small_csv, data)
    assert not s2["trained"] and s2["model_version"] == 1
    pd.testing.assert_frame_equal(read_latent(s2), out)

    # A forced retrain makes a challenger; an identical one must not replace the
    # champion (the gate wants a 2% lower holdout MSE).
    s3 = run(small_csv, data, run_date=D2, retrain=True)
    assert s3["trained"] and s3["reason"].startswith("forced")
    assert s3["decision"] == "keep_champion" and s3["model_version"] == 1
    v2 = client.get_model_version("weatheraus-autoencoder", "2")
    assert v2.tags["decision"] == "keep_champion"
    assert float(v2.tags["challenger_holdout_mse"]) > 0
    assert float(v2.tags["champion_holdout_mse"]) > 0
    mv = client.get_model_version_by_alias("weatheraus-autoencoder", "champion")
    assert int(mv.version) == 1
    # A clearly better challenger is promoted.
    s4 = run(small_csv, data, run_date=D2, retrain=True, latent_dim=8, epochs=12)
    assert s4["decision"] == "promote" and s4["model_version"] == 3
    mv = client.get_model_version_by_alias("weatheraus-autoencoder", "champion")
    assert int(mv.version) == 3 and mv.tags["decision"] == "promote"
    # The earlier date's partition is untouched by a later date's run.
    pd.testing.assert_frame_equal(read_latent(s1), out)


def test_data_lacking_a_champion_column_fails_naming_it(
    prefect_harness, small_csv, tmp_path
):
    from tasks.errors import SchemaError

    data = tmp_path / "lf"
    run(small_csv, data)
    short = tmp_path / "short" / "weatherAUS.csv"
    short.parent.mkdir()
    pd.read_csv(small_csv).drop(columns=["Sunshine", "Pressure3pm"]).to_csv(
        short, index=False
    )
    with pytest.raises(SchemaError, match="needs: Sunshine, Pressure3pm"):
        run(short, data, run_date=D2)
    assert not (data / "latent" / "weatheraus" / f"run_date={D2}").exists()
    # Accepting the new schema is an explicit choice.
    s = run(short, data, run_date=D2, retrain=True)
    assert s["trained"] and s["decision"] == "promote"


def test_pyfunc_predicts_raw_rows(prefect_harness, small_csv, tmp_path):
    import mlflow

    run(small_csv, tmp_path / "lf")
    model = mlflow.pyfunc.load_model("models:/weatheraus-autoencoder@champion")
    raw = pd.read_csv(small_csv, nrows=50)
    raw.loc[0, "Location"] = "Atlantis"  # never seen: maps to unknown
    raw.loc[1, "MinTemp"] = np.nan
    pred = model.predict(raw)
    assert len(pred) == 50
    assert {"latent_0", "recon_error", "is_anomaly", "error"} <= set(pred.columns)
    assert pred.drop(columns="error").notna().all().all()
    assert pred["error"].isna().all()  # NaN is missing, as in batch; no junk here


def test_same_seed_same_model_outputs(prefect_harness, small_csv, tmp_path):
    a = read_latent(run(small_csv, tmp_path / "a"))
    b = read_latent(run(small_csv, tmp_path / "b"))
    pd.testing.assert_frame_equal(a, b)


def test_duckdb_reads_hive_partitions(prefect_harness, small_csv, tmp_path):
    duckdb = pytest.importorskip("duckdb")
    data = tmp_path / "lf"
    run(small_csv, data)
    run(small_csv, data, run_date=D2)
    glob = f"{data}/latent/weatheraus/*/*.parquet"
    rows = duckdb.sql(
        "select run_date, count(*) n"
        f" from read_parquet('{glob}', hive_partitioning=true)"
        " group by 1 order by 1"
    ).fetchall()
    assert [str(r[0]) for r in rows] == [str(D1), str(D2)]
    assert rows[0][1] == rows[1][1] > 0
    schema = pq.read_schema(next((data / "latent" / "weatheraus").glob("*/*.parquet")))
    assert schema.field("Date").type == "date32[day]"
