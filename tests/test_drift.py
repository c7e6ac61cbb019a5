"""Drift measurement and the champion/challenger gate, on small seeded data."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.decide import ChampionInfo, Decision, decide, gate
from tasks.drift import DriftReport, build_reference, measure_drift, psi
from tasks.train import train_model

SCHEMA = {
    "columns": [
        {"name": "_k", "kind": "numeric", "role": "key"},
        {"name": "a", "kind": "numeric", "role": "feature"},
        {"name": "b", "kind": "numeric", "role": "feature"},
        {"name": "c", "kind": "categorical", "role": "feature"},
    ]
}
PARAMS = {"latent_dim": 2, "hidden": (16,), "epochs": 15, "random_state": 0}


def table(
    n: int, seed: int, shift_a: float = 0.0, scale_noise: float = 0.1
) -> pa.Table:
    rng = np.random.default_rng(seed)
    t = rng.normal(0, 1, n)
    return pa.table(
        {
            "_row_id": np.arange(n, dtype=np.int64),
            "a": t + shift_a + rng.normal(0, scale_noise, n),
            "b": 2 * t + rng.normal(0, scale_noise, n),
            "c": np.where(t > 0, "up", "down"),
        }
    )


def write(tmp_path, name: str, t: pa.Table):
    d = tmp_path / name
    d.mkdir()
    pq.write_table(t, d / "part-00000.parquet")
    return d


def test_psi_zero_for_same_and_large_for_shift():
    p = np.array([0.25, 0.25, 0.25, 0.25])
    assert psi(p, p) == pytest.approx(0.0)
    assert psi(p, np.array([0.7, 0.1, 0.1, 0.1])) > 0.2


def test_reference_bins_include_missing():
    t = pa.table({"a": [1.0, 2.0, None, 4.0], "c": ["x", None, "x", "y"]})
    ref = build_reference(t, ["a"], ["c"], np.array([0.1, 0.2, 0.3, 0.4]))
    assert ref["numeric"]["a"]["shares"][-1] == pytest.approx(0.25)
    assert sum(ref["categorical"]["c"]["shares"]) == pytest.approx(1.0)
    assert ref["errors"]["median"] == pytest.approx(0.25)


@pytest.fixture(scope="module")
def champion(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("champ")
    src = write(tmp, "train", table(3000, 0))
    train_model(src, SCHEMA, tmp / "bundle", dataset="d", estimator_params=PARAMS)
    return tmp / "bundle"


def test_identical_data_no_drift_then_reuse(champion, tmp_path):
    rep = measure_drift(write(tmp_path, "new", table(3000, 1)), champion)
    assert rep.drifted == [] and rep.error_median_ratio < 1.5
    info = ChampionInfo("d", 1, "r", datetime.now(UTC), str(champion), SCHEMA)
    assert (
        decide(info, SCHEMA, datetime.now(UTC), 7, False, drift=rep).action == "reuse"
    )


def test_shifted_feature_retrains_naming_it(champion, tmp_path):
    rep = measure_drift(write(tmp_path, "new", table(3000, 1, shift_a=1.5)), champion)
    assert rep.drifted == ["a"] and rep.psi["a"] > 0.2 and rep.psi["b"] < 0.1
    assert rep.error_median_ratio > 1.5  # a and b no longer agree
    info = ChampionInfo("d", 1, "r", datetime.now(UTC), str(champion), SCHEMA)
    d = decide(info, SCHEMA, datetime.now(UTC), 7, False, drift=rep)
    assert d == Decision("train", "feature_drift: ['a']")


def test_error_drift_alone_retrains():
    rep = DriftReport(psi={"a": 0.01}, drifted=[], error_median_ratio=1.8)
    info = ChampionInfo("d", 1, "r", datetime.now(UTC), "/x", SCHEMA)
    d = decide(info, SCHEMA, datetime.now(UTC), 7, False, drift=rep)
    assert d == Decision("train", "error_drift: x1.80")


def test_worse_challenger_from_tiny_data_is_not_promoted(champion, tmp_path):
    new = write(tmp_path, "new", table(3000, 2))
    tiny = dict(PARAMS, epochs=1)
    res = train_model(
        new,
        SCHEMA,
        tmp_path / "c",
        dataset="d",
        estimator_params=tiny,
        max_train_rows=100,
        champion_dir=champion,
    )
    m = res.metrics
    verdict = gate(m["val_mse"], m["champion_holdout_mse"], 0.02)
    assert m["val_mse"] > m["champion_holdout_mse"] and not verdict.promote
    assert "not 2% below" in verdict.reason


def test_gate_rules():
    assert gate(0.5, None, 0.02).promote
    assert gate(0.97, 1.0, 0.02).promote
    assert not gate(0.99, 1.0, 0.02).promote


def test_champion_mse_in_challenger_space_is_consistent(champion, tmp_path):
    """The champion scored against itself in its own space equals its val MSE."""
    from models.bundle import LatentModel
    from tasks.train import mse_in_space

    model = LatentModel.load(champion)
    t = table(500, 5)
    x = model.preprocessor.transform(t)
    own = -model.estimator.score(x)  # minus the mean reconstruction MSE
    assert mse_in_space(model, t, model.preprocessor, x) == pytest.approx(own, rel=1e-5)
