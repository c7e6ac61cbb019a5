"""The run's summary line and model card: pure functions over typed results."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import pandas as pd

from models.schema import TableSchema
from tasks.decide import ChampionInfo, ChosenModel, Decision
from tasks.drift import DriftReport
from tasks.ingest import IngestResult
from tasks.run_target import RunTarget
from tasks.score import ScoreResult
from tasks.summary import code_version, model_card, run_summary
from tasks.train import TrainResult

RUN_TIME = datetime(2024, 3, 1, tzinfo=UTC)
RUN = RunTarget("weatheraus", date(2024, 3, 1), Path("/d"), "weatheraus-autoencoder")
SCHEMA = {
    "columns": [
        {"name": "Date", "kind": "date", "role": "key"},
        {"name": "MinTemp", "kind": "numeric", "role": "feature"},
        {"name": "WindDir", "kind": "categorical", "role": "feature"},
        {"name": "RainTomorrow", "kind": "categorical", "role": "label"},
    ]
}
INGESTED = IngestResult(
    "/i", "/r", 10, 9, 1, {"rule": 1}, [], TableSchema.from_dict(SCHEMA), ["/x.csv"]
)
SCORED = ScoreResult("/d/latent/weatheraus/run_date=2024-03-01", 9, 1, 0.5, 2.0)


def test_summary_line_keys_order_and_gate_reason():
    kept = ChosenModel(1, "r1", "/m", "keep_champion", "holdout MSE not 2% below")
    s = run_summary(RUN, INGESTED, Decision("train", "forced"), kept, SCORED)
    assert list(s) == [
        "dataset",
        "run_date",
        "rows_in",
        "rows_rejected",
        "rows_scored",
        "anomalies",
        "trained",
        "decision",
        "reason",
        "model_name",
        "model_version",
        "mlflow_run_id",
        "output",
        "promote_override",
    ]
    assert s["reason"] == "forced; holdout MSE not 2% below"
    assert (s["trained"], s["decision"], s["model_version"]) == (
        True,
        "keep_champion",
        1,
    )
    assert s["run_date"] == "2024-03-01" and s["rows_rejected"] == 1


def test_reuse_summary_carries_the_drift():
    champion = ChampionInfo(
        "weatheraus-autoencoder", 3, "r3", RUN_TIME, "/m", TableSchema.from_dict(SCHEMA)
    )
    drift = DriftReport({"MinTemp": 0.31, "WindDir": 0.01}, ["MinTemp"], 1.23456, 2.0)
    s = run_summary(
        RUN,
        INGESTED,
        Decision("reuse", "champion v3 fits"),
        ChosenModel.reused(champion),
        SCORED,
        drift,
    )
    assert (s["trained"], s["decision"], s["reason"]) == (
        False,
        "reuse",
        "champion v3 fits",
    )
    assert (s["model_version"], s["mlflow_run_id"]) == (3, "r3")
    assert s["drift"] == {
        "drifted": ["MinTemp"],
        "max_psi": 0.31,
        "error_median_ratio": 1.2346,
        "error_p99_ratio": 2.0,
    }


def test_model_card_names_features_settings_and_code():
    trained = TrainResult(
        "/b",
        {"val_mse": 0.5, "pca_val_mse": 0.9, "threshold": 1.25},
        {},
        {},
        100,
        72,
        18,
        pd.DataFrame(),
    )
    card = model_card(
        "weatheraus",
        date(2024, 3, 1),
        SCHEMA,
        trained,
        {"kind": "vae", "latent_dim": 3},
        3,
        0.01,
        "commit abc",
    )
    assert card.splitlines()[0] == (
        "latentflow vae autoencoder for weatheraus, run date 2024-03-01."
    )
    assert "Features (2): MinTemp, WindDir." in card
    assert "Code: latentflow commit abc." in card
    assert "Holdout MSE 0.5000 vs PCA(3) 0.9000; threshold 1.2500" in card


def test_code_version_outside_git_falls_back(tmp_path):
    assert code_version(tmp_path).startswith("version ")
