"""Explanations, anomaly_score and aligned latent axes, on real Parquet.

One small weatherAUS-shaped model (49 locations: a wide one-hot group, and
columns with missing values) is trained on an ingested-like partition; rows
with anomalies planted in several columns are scored through the batch scorer
into a real latent/ partition and through the pyfunc's path.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from models.bundle import LatentModel
from tasks.score import Provenance, read_metadata, score_partition
from tasks.synthetic import weatheraus_like
from tasks.train import train_model

PLANTED = ("MinTemp", "Humidity3pm", "Pressure9am", "WindGustSpeed", "Sunshine")
PARAMS = {
    "latent_dim": 3,
    "hidden": (32,),
    "epochs": 12,
    "batch_size": 128,
    "random_state": 0,
}
DAY = date(2024, 3, 1)
#: Standard deviations a planted value lies off its column's mean.
OFF = 20.0


def _schema(table: pa.Table) -> dict:
    cols = []
    for f in table.schema:
        # Site is Location again, as a feature: a 49-wide one-hot group.
        if f.name in ("_row_id", "RainTomorrow"):
            continue
        kind = (
            "date"
            if pa.types.is_date(f.type)
            else "categorical"
            if pa.types.is_string(f.type)
            else "numeric"
        )
        role = "key" if f.name in ("Date", "Location") else "feature"
        cols.append({"name": f.name, "kind": kind, "role": role})
    return {"columns": cols}


def _table(n: int, seed: int) -> pa.Table:
    t = weatheraus_like(n, seed=seed).drop(["RainTomorrow"])
    t = t.append_column("Site", t.column("Location"))
    return t.append_column("_row_id", pa.array(np.arange(n, dtype=np.int64)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("explain")
    table = _table(1500, seed=0)
    src = tmp / "ingested"
    src.mkdir()
    pq.write_table(table, src / "part-00000.parquet")
    schema = _schema(table)
    train_model(src, schema, tmp / "b1", dataset="d", estimator_params=PARAMS)
    return tmp, table, schema


def _planted(table: pa.Table, rng: np.random.Generator) -> tuple[pa.Table, dict]:
    """40 rows, each with one column set OFF standard deviations off its mean;
    plus rows with an imputed cell next to a planted one."""
    rows = table.slice(0, 60).to_pylist()
    where: dict[int, str] = {}
    stats = {
        c: (
            float(pc.mean(table.column(c)).as_py()),
            float(pc.stddev(table.column(c)).as_py()),
        )
        for c in PLANTED
    }
    for i, row in enumerate(rows[:40]):
        col = PLANTED[i % len(PLANTED)]
        mean, sd = stats[col]
        row[col] = mean + float(rng.choice([-1.0, 1.0])) * OFF * sd
        where[row["_row_id"]] = col
    # An imputed cell is never blamed, even beside an anomaly.
    for row in rows[40:]:
        row["Pressure3pm"] = None
        row["Humidity3pm"] = stats["Humidity3pm"][0] + OFF * stats["Humidity3pm"][1]
        where[row["_row_id"]] = "Humidity3pm"
    return pa.Table.from_pylist(rows, schema=table.schema), where


def test_flagged_rows_explain_the_planted_column(trained, tmp_path):
    tmp, table, _ = trained
    planted, where = _planted(table, np.random.default_rng(3))
    new = tmp_path / "ingested"
    new.mkdir()
    mixed = pa.concat_tables([planted, table.slice(600, 400)])
    pq.write_table(mixed, new / "part-00000.parquet")
    result = score_partition(
        new, tmp / "b1", tmp_path, "d", DAY, Provenance("m", 1, "r", "h")
    )
    out = pq.read_table(result.output_dir).to_pylist()
    flagged = [r for r in out if r["is_anomaly"]]
    # An explanation on every flagged row, null elsewhere.
    assert flagged and all(r["explanation"] for r in flagged)
    assert all(r["explanation"] is None for r in out if not r["is_anomaly"])
    hits = [r for r in flagged if r["_row_id"] in where]
    assert len(hits) >= 0.8 * len(where)
    right = [r for r in hits if r["explanation"][0]["column"] == where[r["_row_id"]]]
    assert len(right) >= 0.9 * len(hits), [
        (where[r["_row_id"]], r["explanation"][0]["column"]) for r in hits
    ]
    raw = {r["_row_id"]: r for r in mixed.to_pylist()}
    for r in flagged:
        entries = r["explanation"]
        assert 1 <= len(entries) <= 3
        parts = [e["contribution"] for e in entries]
        assert parts == sorted(parts, reverse=True) and parts[-1] > 0
        for e in entries:
            # Folded to source columns: no one-hot or indicator names.
            assert e["column"] in raw[r["_row_id"]], e
            assert "=" not in e["column"] and "__missing" not in e["column"]
            # Never an imputed cell.
            assert raw[r["_row_id"]][e["column"]] is not None, e
    # Raw units: the observed value is the planted one, the expected one near
    # the column's usual values.
    row = next(r for r in hits if r["explanation"][0]["column"] == "Pressure9am")
    first = row["explanation"][0]
    assert float(first["observed"]) == pytest.approx(
        raw[row["_row_id"]]["Pressure9am"], rel=1e-5
    )
    assert 980 < float(first["expected"]) < 1050
    # anomaly_score: a percentile of the training scores.
    scores = np.array([r["anomaly_score"] for r in out])
    assert ((scores >= 0) & (scores <= 1)).all()
    assert min(r["anomaly_score"] for r in hits) > 0.9
    assert np.median(scores[len(planted) :]) == pytest.approx(0.5, abs=0.2)


def test_a_fixed_anomaly_score_cut_flags_by_percentile(trained, tmp_path):
    tmp = trained[0]
    src = tmp / "ingested"
    result = score_partition(
        src,
        tmp / "b1",
        tmp_path,
        "d",
        DAY,
        Provenance("m", 1, "r", "h"),
        anomaly_cut=0.9,
    )
    out = pq.read_table(result.output_dir)
    flags = out.column("is_anomaly").to_numpy(zero_copy_only=False)
    pct = out.column("anomaly_score").to_numpy()
    np.testing.assert_array_equal(flags, pct > 0.9)
    # About a tenth of the training rows lie above their 90th percentile.
    assert 0.05 < flags.mean() < 0.15
    assert read_metadata(Path(result.output_dir))["latentflow.flag_rule"] == (
        "anomaly_score > 0.9"
    )
    assert out.column("explanation").null_count == out.num_rows - flags.sum()


def test_pyfunc_output_carries_anomaly_score_and_explanation(trained):
    tmp, table, _ = trained
    planted, where = _planted(table, np.random.default_rng(4))
    model = LatentModel.load(tmp / "b1")
    frame = planted.drop(["_row_id"]).to_pandas()
    frame["Date"] = frame["Date"].astype(str)
    out = model.predict_raw(frame)
    assert {"anomaly_score", "explanation"} <= set(out.columns)
    flagged = out[out["is_anomaly"].fillna(False).astype(bool)]
    assert len(flagged) and flagged["explanation"].map(bool).all()
    assert out.loc[~out["is_anomaly"].astype(bool), "explanation"].isna().all()
    ids = planted.column("_row_id").to_pylist()
    firsts = [
        flagged.at[i, "explanation"][0]["column"] == where[ids[i]]
        for i in flagged.index
    ]
    assert sum(firsts) >= 0.9 * len(firsts)


def test_a_retrain_with_another_seed_keeps_the_latent_axes(trained, tmp_path):
    tmp, table, schema = trained
    src = tmp / "ingested"
    params = dict(PARAMS, random_state=7)
    train_model(
        src,
        schema,
        tmp_path / "b2",
        dataset="d",
        estimator_params=params,
        align_to=tmp / "b1",
    )
    old, new = LatentModel.load(tmp / "b1"), LatentModel.load(tmp_path / "b2")
    z_old, z_new = old.score(table).latent, new.score(table).latent
    corr = [float(np.corrcoef(z_old[:, i], z_new[:, i])[0, 1]) for i in range(3)]
    assert min(corr) >= 0.9, corr
    assert new.info.latent_space_id == old.info.latent_space_id != ""
    assert 0 <= new.alignment.residual < 0.3
    # Scored files carry the latent space id.
    result = score_partition(
        src, tmp_path / "b2", tmp_path, "d", DAY, Provenance("m", 2, "r", "h")
    )
    meta = read_metadata(Path(result.output_dir))
    assert meta["latentflow.latent_space_id"] == old.info.latent_space_id
    # Another latent size cannot be aligned: a new latent space.
    train_model(
        src,
        schema,
        tmp_path / "b3",
        dataset="d",
        estimator_params=dict(params, latent_dim=2, epochs=2),
        align_to=tmp / "b1",
    )
    other = LatentModel.load(tmp_path / "b3")
    assert other.alignment is None
    assert other.info.latent_space_id not in ("", old.info.latent_space_id)


def test_explanation_column_matches_per_row_explanations(trained):
    """The columnar ``explanation`` (nulls on unflagged rows) holds, on each
    flagged row, exactly the entries ``explain`` gives for that row alone, in
    rank order; an empty flag gives an all-null column of the right type."""
    from models.explain import EXPLANATION_TYPE, explain, explanation_array

    tmp, table, _ = trained
    model = LatentModel.load(tmp / "b1")
    rows, _ = _planted(table, np.random.default_rng(5))
    flagged = np.zeros(rows.num_rows, dtype=bool)
    flagged[[0, 3, 7, 41, 59]] = True
    column = explanation_array(model, rows, flagged)
    assert column.type == EXPLANATION_TYPE and len(column) == rows.num_rows
    assert column.null_count == rows.num_rows - 5
    got = column.to_pylist()
    for i in np.flatnonzero(flagged).tolist():
        (alone,) = explain(model, rows.slice(i, 1))
        assert [e["column"] for e in got[i]] == [e["column"] for e in alone]
        assert [e["observed"] for e in got[i]] == [e["observed"] for e in alone]
        parts = [e["contribution"] for e in got[i]]
        assert parts == sorted(parts, reverse=True) and len(parts) >= 1
    assert all(got[i] is None for i in np.flatnonzero(~flagged).tolist())
    none = explanation_array(model, rows, np.zeros(rows.num_rows, dtype=bool))
    assert none.type == EXPLANATION_TYPE and none.null_count == rows.num_rows
    # Scoring hands over the rows it already preprocessed: the same column.
    features = model.preprocessor.transform(rows)
    assert explanation_array(model, rows, flagged, features=features).equals(column)
