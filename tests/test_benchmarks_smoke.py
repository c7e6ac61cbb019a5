"""Smoke test of the quality benchmark on a tiny synthetic weatherAUS-shaped CSV.

Every section runs end to end (ingest, preprocessing, all kinds, the anomaly data
sets, PyOD timing) with a few epochs on a few hundred rows, so the code that
``make bench-quality`` runs cannot rot unnoticed. The numbers are not checked
against targets: at this size they mean nothing.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import quality
from benchmarks.common import format_table

TINY = quality.Settings(
    dims=(2, 3),
    max_epochs=2,
    anomaly_rows=600,
    manifold_rows=400,
    anomaly_share=0.1,
    anomaly_kinds=("ae", "vae"),
    timing_epochs=2,
    timing_rows=500,
)


@pytest.fixture
def one_thread():
    """One torch thread: on tiny matrices more threads only add sync overhead,
    which explodes on a machine shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_csv(tmp_path: Path) -> Path:
    from tasks.synthetic import write_weatheraus_like_csv

    return write_weatheraus_like_csv(tmp_path / "weatherAUS.csv", 1200, seed=3)


def test_quality_benchmark_runs_end_to_end(
    tiny_csv: Path, tmp_path: Path, one_thread: None
) -> None:
    pytest.importorskip("pyod")
    lines: list[str] = []
    out = tmp_path / "results" / "quality.json"
    result = quality.run(tiny_csv, out, TINY, echo=lines.append)

    saved = json.loads(out.read_text())
    assert saved["seed"] == result["seed"]
    models = saved["representation"]["models"]
    # The default config at every judged size plus its own, then every kind at
    # every size (the default is not refitted when the sweep's settings equal it).
    kinds = {(m["kind"], m["latent_dim"]) for m in models if m["role"] == "sweep"}
    assert {k for k, _ in kinds} == set(quality.KINDS)
    defaults = sorted(m["latent_dim"] for m in models if m["role"] == "default")
    assert defaults == [2, 3, 8]
    for m in models:
        assert m["epochs_run"] <= 2
        assert m["val_mse"] > 0 and math.isfinite(m["mse_ratio_vs_pca"])
        assert 0.0 <= m["probe_auc"] <= 1.0

    names = [d["dataset"] for d in saved["anomaly"]["datasets"]]
    assert names == [
        "weather-synthetic",
        "weatherAUS-injected",
        "swiss-roll-16d",
        "blobs-subspace-20d",
    ]
    for ds in saved["anomaly"]["datasets"]:
        detectors = {d["detector"] for d in ds["detectors"]}
        assert {"latentflow default", "IsolationForest", "PyOD AutoEncoder"} <= (
            detectors
        )
        assert ds["test_anomalies"] > 0
    speed = saved["speed"]["rows"][0]
    assert speed["latentflow_s_per_epoch"] > 0 and speed["pyod_s_per_epoch"] > 0
    assert {t["met"] for t in saved["targets"]} <= {True, False, None}

    text = "\n".join(lines)
    for heading in ("[1]", "[2]", "[3]", "[4]", "targets"):
        assert heading in text


def test_plant_anomalies_labels_and_corrupts_only_planted_rows() -> None:
    from tasks.synthetic import weatheraus_like

    df = weatheraus_like(500, seed=5).to_pandas()
    numeric = ["MinTemp", "MaxTemp", "Rainfall", "Humidity3pm", "Pressure9am"]
    categorical = ["WindGustDir", "WindDir9am", "RainToday"]
    out, types = quality.plant_anomalies(
        df, numeric, categorical, 0.2, np.random.default_rng(0)
    )
    assert len(out) == len(df) and (types != "").sum() == 100
    clean = types == ""
    pd.testing.assert_frame_equal(out[clean], df[clean])
    bad = out[types == "impossible"]
    assert (bad["MinTemp"] > bad["MaxTemp"]).all()


def test_missing_data_exits_with_a_message(tmp_path: Path, capsys) -> None:
    status = quality.main(["--data", str(tmp_path / "nope.csv")])
    assert status == 2
    assert "weatherAUS data not found" in capsys.readouterr().err


def test_format_table_aligns_and_blanks_nan() -> None:
    text = format_table(["a", "b"], [["x", 1.5], ["yy", float("nan")]])
    lines = text.splitlines()
    assert len({len(line) for line in lines[:3]}) == 1
    assert lines[-1].endswith("-")


def test_anomaly_benchmark_skips_cleanly_without_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import anomaly

    out = tmp_path / "anomaly.json"
    assert anomaly.main(["--data", str(tmp_path / "absent"), "--out", str(out)]) == 0
    assert "skipped: no anomaly data sets" in capsys.readouterr().err
    assert not out.exists()


def test_anomaly_benchmark_runs_on_tiny_sets(tmp_path: Path, one_thread: None) -> None:
    from benchmarks import anomaly

    rng = np.random.default_rng(0)
    for name in ("alpha", "beta"):
        X = rng.normal(size=(240, 5))
        y = np.zeros(240, dtype=np.int8)
        y[:24] = 1
        X[:24] += 4.0
        np.savez(tmp_path / f"{name}.npz", X=X, y=y)
    lines: list[str] = []
    out = tmp_path / "results" / "anomaly.json"
    result = anomaly.run(tmp_path, out, pyod=False, echo=lines.append)
    saved = json.loads(out.read_text())
    assert set(saved["datasets"]) == {"alpha", "beta"}
    assert set(saved["mean_roc_auc"]) == {"IsolationForest", anomaly.OURS}
    # Shifted rows are easy for the forest: the protocol's scoring is wired right.
    # (How well ours does is the benchmark's figure to report, not a test's.)
    assert result["mean_roc_auc"]["IsolationForest"] > 0.9
    assert 0.0 <= result["mean_roc_auc"][anomaly.OURS] <= 1.0
    text = "\n".join(lines)
    assert "mean" in text and anomaly.OURS in text and "targets" in text
