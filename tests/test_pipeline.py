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

    _trusted_outputs(data, s1, out)
    night1 = _night_recorded(
        client, s1, "promote", fit_seconds=run1.data.metrics["fit_seconds"]
    )
    _task_inputs_plain(night1.data.tags["prefect.flow_run_url"])

    s2 = run(small_csv, data)
    assert not s2["trained"] and s2["model_version"] == 1
    pd.testing.assert_frame_equal(read_latent(s2), out)
    # A reuse night is an MLflow run of its own, with the drift it measured.
    night2 = _night_recorded(client, s2, "reuse")
    assert night2.info.run_id != s1["mlflow_run_id"]
    assert any(k.startswith("psi_") for k in night2.data.metrics)
    _artifacts_shown(s2)

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
    assert mv.tags["promote_override"] == "false" and not s4["promote_override"]
    # The earlier date's partition is untouched by a later date's run.
    pd.testing.assert_frame_equal(read_latent(s1), out)
    # --promote: the same challenger again, which the gate rejects (not 2%
    # better), is promoted anyway, and says so.
    s5 = run(small_csv, data, run_date=D3, promote=True, latent_dim=8, epochs=12)
    assert s5["decision"] == "promote" and s5["promote_override"] is True
    assert s5["model_version"] == 4 and "operator override" in s5["reason"]
    mv = client.get_model_version_by_alias("weatheraus-autoencoder", "champion")
    assert int(mv.version) == 4 and mv.tags["promote_override"] == "true"
    assert mv.tags["decision"] == "promote"
    assert "yes (--promote)" in _artifact("weatheraus-summary")
    # Every night left a metrics row; the documented query trends them.
    trend = _metrics_trend(data)
    assert list(trend["run_date"].astype(str)) == [str(D1), str(D2), str(D3)]
    assert list(trend["decision"]) == ["reuse", "promote", "promote"]
    assert list(trend["promote_override"]) == [False, False, True]
    assert (trend["rows_scored"] == s1["rows_scored"]).all()
    assert trend["psi_max"].iloc[0] is not None and trend["anomaly_rate"].gt(0).all()


D3 = date(2024, 3, 3)


def _trusted_outputs(data, s1, out: pd.DataFrame) -> None:
    """anomaly_score, explanation and the latent space id, as analysts read them."""
    assert list(out.columns[5:10]) == [
        "latent_2",
        "recon_error",
        "anomaly_score",
        "is_anomaly",
        "explanation",
    ]
    assert out["anomaly_score"].between(0, 1).all()
    flagged = out[out["is_anomaly"]]
    assert flagged["explanation"].map(lambda e: e is not None and len(e) > 0).all()
    assert out.loc[~out["is_anomaly"], "explanation"].isna().all()
    assert flagged["anomaly_score"].min() > 0.95
    meta = read_metadata(data / "latent" / "weatheraus" / f"run_date={D1}")
    assert meta["latentflow.latent_space_id"].startswith("weatheraus-")
    # The metrics partition of the night.
    (row,) = pq.read_table(
        data / "metrics" / "weatheraus" / f"run_date={D1}"
    ).to_pylist()
    assert row["decision"] == "promote" and row["model_version"] == 1
    assert row["rows_in"] == s1["rows_in"] and row["anomalies"] == s1["anomalies"]
    assert row["recon_error_p50"] < row["recon_error_p99"] <= row["recon_error_max"]
    assert dict(row["seconds"])["total"] > dict(row["seconds"])["train"] > 0
    assert row["latent_space_id"] == meta["latentflow.latent_space_id"]


def _night_recorded(client, summary, decision: str, fit_seconds: float = 0.0):
    """The night's MLflow run: named, tagged, its input logged, linked."""
    night = client.get_run(summary["mlflow_night_run_id"])
    assert night.info.run_name == f"weatheraus-{summary['run_date']}"
    tags = night.data.tags
    assert tags["decision"] == decision == summary["decision"]
    assert tags["prefect.flow_run_url"].startswith("http")
    assert "/flow-run/" in tags["prefect.flow_run_url"]
    (given,) = night.inputs.dataset_inputs
    assert given.dataset.name == f"weatheraus-{summary['run_date']}"
    assert "ingested" in given.dataset.source
    assert night.data.metrics["rows_scored"] == summary["rows_scored"]
    # The run's duration covers the training.
    took = (night.info.end_time - night.info.start_time) / 1000
    assert took > fit_seconds
    assert summary["mlflow_run_url"].endswith(f"/runs/{night.info.run_id}")
    exp = client.get_experiment(night.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    reg = client.get_registered_model("weatheraus-autoencoder")
    assert "latent features" in (reg.description or "")
    return night


def _task_inputs_plain(flow_run_url: str) -> None:
    """No task input refers to a subflow's result: Prefect's UI cannot show
    those, and the run's Task Runs tab stayed empty."""
    from uuid import UUID

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import TaskRunSort

    flow_run_id = UUID(flow_run_url.rstrip("/").rsplit("/", 1)[-1])
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
            sort=TaskRunSort.EXPECTED_START_TIME_ASC,
            limit=200,
        )
    assert len(runs) > 5
    kinds = {
        ref.input_type for r in runs for refs in r.task_inputs.values() for ref in refs
    }
    assert "flow_run" not in kinds, kinds


def _artifact(key: str) -> str:
    """The newest artifact of ``key``'s data, as the Prefect API serves it."""
    from prefect.client.orchestration import get_client

    body = {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1}
    with get_client(sync_client=True) as client:
        (latest,) = client._client.post("/artifacts/filter", json=body).json()
    return latest["data"]


def _artifacts_shown(summary) -> None:
    """The summary links MLflow; ids are strings; drift is a table."""
    import json

    text = _artifact("weatheraus-summary")
    assert summary["mlflow_run_url"] in text and summary["model_version_url"] in text
    assert "| decision | reuse:" in text
    top = json.loads(_artifact("weatheraus-top-anomalies"))
    assert top and all(isinstance(r["_row_id"], str) for r in top)
    assert top[0]["column_1"]
    drift = json.loads(_artifact("weatheraus-drift"))
    assert "MinTemp" in {r["feature"] for r in drift}
    assert all(isinstance(r["psi"], float) for r in drift)


def _metrics_trend(data) -> pd.DataFrame:
    """The trend query of docs/output.md, as an analyst runs it."""
    import duckdb

    root = data / "metrics" / "weatheraus"
    return duckdb.sql(
        f"""
        SELECT run_date, decision, promote_override, rows_scored, anomaly_rate,
               recon_error_p99, list_max(map_values(psi)) AS psi_max
        FROM read_parquet('{root}/*/*.parquet', hive_partitioning = true)
        ORDER BY run_date
        """
    ).df()


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
    # Explanations are for flagged rows only; every other output is filled.
    assert pred.drop(columns=["error", "explanation"]).notna().all().all()
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
