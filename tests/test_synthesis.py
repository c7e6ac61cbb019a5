"""``latentflow synthesize`` through the real pipeline: Prefect, MLflow on
SQLite, Parquet. One generation (and one repeat) on a small ingested dataset
serves most assertions; bad requests run the real console script."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import zipfile
from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.presets import WEATHERAUS_RULES

ROWS = 300
ARGS = ["--gan-steps", "20", "--vae-epochs", "3"]


def _ingest(data_dir: Path, n_rows: int = 1500) -> Path:
    from tasks.ingest import ingest
    from tasks.synthetic import write_weatheraus_like_csv

    src = write_weatheraus_like_csv(
        data_dir / "input" / "weatheraus.csv", n_rows, seed=0
    )
    result = ingest(
        src,
        data_dir,
        "weatheraus",
        date(2026, 11, 1),
        keys=["Date", "Location"],
        label="RainTomorrow",
        rules=list(WEATHERAUS_RULES),
    )
    return Path(result.ingested_dir)


def _synthesize(data_dir: Path, output: Path, *extra: str) -> tuple[dict, str]:
    from flows.cli import main

    out, err = io.StringIO(), io.StringIO()
    argv = [
        "synthesize",
        "--data-dir",
        str(data_dir),
        "--dataset",
        "weatheraus",
        "--rows",
        str(ROWS),
        "--output",
        str(output),
        *ARGS,
        *extra,
    ]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()[-2000:]
    return json.loads(out.getvalue().strip().splitlines()[-1]), err.getvalue()


@pytest.fixture(scope="module")
def run(tmp_path_factory, prefect_harness):
    data_dir = tmp_path_factory.mktemp("synth")
    ingested = _ingest(data_dir)
    first = data_dir / "out" / "gan.parquet"
    first.parent.mkdir()
    summary, stderr = _synthesize(data_dir, first)
    again = data_dir / "out" / "gan-again.parquet"
    summary2, _ = _synthesize(data_dir, again)
    return {
        "data_dir": data_dir,
        "ingested": ingested,
        "summary": summary,
        "stderr": stderr,
        "output": first,
        "again": again,
        "summary2": summary2,
    }


def _real(run: dict) -> pa.Table:
    return pq.read_table(run["ingested"])


@pytest.mark.slow
def test_rows_have_the_raw_schema_ranges_labels_and_missing_values(run):
    out = pq.read_table(run["output"])
    real = _real(run)
    assert run["summary"]["rows"] == out.num_rows == ROWS
    features = [
        f.name for f in real.schema if f.name not in ("_row_id", "Date", "Location")
    ]
    assert sorted(out.column_names) == sorted(features)
    for name in out.column_names:
        r, s = real.column(name), out.column(name)
        assert s.type == r.type, name  # float64 numbers, string labels
        if pa.types.is_floating(r.type):
            vals = s.drop_null().to_numpy()
            seen = r.drop_null().to_numpy()
            assert vals.min() >= seen.min() and vals.max() <= seen.max(), name
        else:
            assert set(s.drop_null().to_pylist()) <= set(r.drop_null().to_pylist())
    # Columns missing for whole stations in the source stay largely missing.
    for name in ("Evaporation", "Sunshine", "Cloud9am"):
        real_rate = real.column(name).null_count / real.num_rows
        rate = out.column(name).null_count / out.num_rows
        assert real_rate > 0.2 and rate > 0.05, (name, real_rate, rate)
    # Recorded precision: temperatures in tenths, humidity in whole percent.
    hum = out.column("Humidity3pm").drop_null().to_numpy()
    assert np.array_equal(hum, np.round(hum))


@pytest.mark.slow
def test_rows_pass_the_rules_and_copy_no_ingested_row(run):
    from models.preprocessing import TabularPreprocessor
    from models.rawspace import RawSpace
    from tasks.synth_rules import rule_filter

    out = pq.read_table(run["output"])
    keep = rule_filter(
        list(WEATHERAUS_RULES),
        {
            f.name: "numeric" if pa.types.is_floating(f.type) else "categorical"
            for f in out.schema
        },
    )
    assert keep(out).all()
    both = out.filter(
        pa.array(
            ~(out.column("MinTemp").is_null().to_numpy(zero_copy_only=False))
            & ~(out.column("MaxTemp").is_null().to_numpy(zero_copy_only=False))
        )
    )
    assert np.all(
        both.column("MinTemp").to_numpy() <= both.column("MaxTemp").to_numpy()
    )
    numeric = [
        c for c in out.column_names if pa.types.is_floating(out.schema.field(c).type)
    ]
    categorical = [c for c in out.column_names if c not in numeric]
    real = _real(run).select(out.column_names)
    space = RawSpace.fit(real, TabularPreprocessor(numeric, categorical).fit(real))
    real_hashes = space.row_hashes(real)
    assert not np.isin(space.row_hashes(out), real_hashes).any()
    assert len(np.unique(space.row_hashes(out))) == out.num_rows


@pytest.mark.slow
def test_report_is_printed_logged_and_names_a_winner(run):
    from mlflow import MlflowClient

    stderr = run["stderr"]
    assert "| figure | gan | vae | independent |" in stderr
    assert "detection ROC-AUC" in stderr and "label probe ROC-AUC" in stderr
    assert run["summary"]["winner"] in ("gan", "vae")
    uri = f"sqlite:///{run['data_dir'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = run["summary"]["mlflow_run_id"]
    names = [a.path for a in client.list_artifacts(run_id)]
    assert {"synthesis_report.md", "synthesis_report.json"} <= set(names)
    report = json.loads(
        Path(client.download_artifacts(run_id, "synthesis_report.json")).read_text()
    )
    assert set(report["generators"]) == {"gan", "vae", "independent"}
    assert 0.0 <= report["generators"]["gan"]["detection_auc"] <= 1.0


@pytest.mark.slow
def test_same_seed_reuses_the_generator_and_gives_the_same_rows(run):
    assert run["summary"]["reused"] is False
    assert run["summary2"]["reused"] is True
    assert run["summary2"]["model_version"] == run["summary"]["model_version"]
    assert pq.read_table(run["again"]).equals(pq.read_table(run["output"]))


@pytest.mark.slow
def test_generator_is_registered_loads_without_pickle_and_serves(run):
    import torch
    from mlflow import MlflowClient

    from models.serving import load_model
    from models.synthesis import TableGenerator
    from tasks.generator_registry import TAG_KIND
    from tasks.registry import fetch_model, recorded_files

    uri = f"sqlite:///{run['data_dir'] / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = "weatheraus-generator"
    for kind in ("gan", "vae"):
        mv = client.get_model_version_by_alias(name, kind)
        assert mv.tags[TAG_KIND] == kind
    mv = client.get_model_version_by_alias(name, "gan")
    import mlflow

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    bundle = fetch_model(
        name,
        int(mv.version),
        run["data_dir"] / ".cache" / "models",
        recorded_files(name, int(mv.version), dict(mv.tags)),
    )
    # Plain tensors and JSON: a pickle-free loader reads the weights.
    state = torch.load(bundle / "weights.pt", weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    with open(bundle / "row_hashes.npy", "rb") as fh:
        assert np.load(fh, allow_pickle=False).dtype == np.int64
    assert not zipfile.is_zipfile(bundle / "generator.json")
    gen = TableGenerator.load(bundle)
    assert gen.kind == "gan" and gen.rules
    # A changed byte is refused.
    tampered = run["data_dir"] / "tampered"
    import shutil

    shutil.copytree(bundle, tampered)
    meta = tampered / "generator.json"
    meta.write_text(meta.read_text().replace('"gan"', '"vae"', 1))
    with pytest.raises(ValueError, match=r"generator\.json"):
        TableGenerator.load(tampered)
    # Served through the verified pyfunc: rows in the raw schema, seeded.
    model = load_model(name, alias="gan", tracking_uri=uri)
    import pandas as pd

    a = model.predict(pd.DataFrame({"rows": [7], "seed": [3]}))
    b = model.predict(pd.DataFrame({"rows": [7], "seed": [3]}))
    assert len(a) == 7 and list(a.columns) == pq.read_table(run["output"]).column_names
    pd.testing.assert_frame_equal(a, b)


@pytest.mark.slow
def test_inverse_preprocessor_gives_back_the_raw_rows(run):
    from models.preprocessing import TabularPreprocessor
    from models.rawspace import RawSpace

    real = _real(run).slice(0, 400)
    numeric = ["MinTemp", "Rainfall", "Sunshine", "Humidity3pm"]
    categorical = ["WindGustDir", "RainToday"]
    table = real.select(numeric + categorical)
    pre = TabularPreprocessor(numeric, categorical).fit(table)
    space = RawSpace.fit(table, pre)
    back = space.inverse(pre.transform(table))
    assert back.equals(table)


def _cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("latentflow")
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [str(exe), "synthesize", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"--dataset": "nosuch"}, "dataset 'nosuch' has no ingested rows"),
        ({"--rows": "0"}, "--rows must be an integer from 1"),
        ({"--rows": "-5"}, "--rows must be an integer from 1"),
        ({"--output": "{file}/x.parquet"}, "does not exist"),
        ({"--output": "{dir}/x.csv"}, "must name a .parquet file"),
        ({"--dataset": "../etc"}, "dataset name '../etc' is invalid"),
    ],
)
def test_bad_requests_are_one_line_exit_2_and_write_nothing(
    tmp_path_factory, change, expected
):
    data_dir = tmp_path_factory.mktemp("bad")
    _ingest(data_dir, 50)
    blocker = data_dir / "a-file"
    blocker.write_text("x")
    args = {
        "--data-dir": str(data_dir),
        "--dataset": "weatheraus",
        "--rows": "10",
        "--output": str(data_dir / "out.parquet"),
    }
    for k, v in change.items():
        args[k] = v.format(file=blocker, dir=data_dir)
    before = sorted(p.name for p in data_dir.iterdir())
    proc = _cli(*[x for kv in args.items() for x in kv])
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("latentflow: error:"), proc.stderr
    assert expected in lines[0]
    assert proc.stdout == ""
    assert sorted(p.name for p in data_dir.iterdir()) == before


def test_deployment_form_is_the_parameter_model(tmp_path):
    from deployments.definitions import SYNTHESIZE, build_synthesis_deployment

    dep = build_synthesis_deployment(data_dir=tmp_path)
    assert dep.name == SYNTHESIZE and dep.enforce_parameter_schema
    props = dep._parameter_openapi_schema.properties
    form = dep._parameter_openapi_schema.definitions["SynthesizeParams"]["properties"]
    assert "params" in props
    assert form["generator"]["enum"] == ["gan", "vae"]
    assert form["rows"]["exclusiveMinimum"] == 0
    assert dep.parameters["params"]["output"].startswith(str(tmp_path))


def test_rules_no_row_can_pass_are_a_one_line_user_error():
    from models.synthesis import GenerationError, GeneratorSettings, TableGenerator
    from models.synthesis import generate as draw
    from tasks.errors import LatentflowError
    from tasks.synth_rules import rule_filter

    table = pa.table(
        {
            "MinTemp": pa.array([1.0, 2.5, 3.0, 4.0] * 5),
            "RainToday": pa.array(["No", "Yes", "No", None] * 5),
        }
    )
    gen = TableGenerator.fit(
        "independent", table, ["MinTemp"], ["RainToday"], GeneratorSettings()
    )
    keep = rule_filter(
        ["MinTemp > 1000"], {"MinTemp": "numeric", "RainToday": "categorical"}
    )
    with pytest.raises(GenerationError, match="only 0 of 5 generated rows") as info:
        draw(gen, 5, 0, keep)
    assert isinstance(info.value, LatentflowError)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("kind", ["gan", "vae"])
def test_barely_trained_generators_keep_the_missing_and_level_rates(kind):
    """Calibration, not training length, sets each discrete column's rates: a
    generator trained for a few steps still draws nulls and levels as often as
    the training rows have them."""
    from models.synthesis import GeneratorSettings, TableGenerator

    rng = np.random.default_rng(0)
    n = 3000
    a = rng.normal(20, 5, n)
    gone = rng.random(n) < 0.4  # a sensor missing on 40 % of the days
    levels = rng.choice(["N", "S", "E", "W"], n, p=[0.55, 0.3, 0.1, 0.05])
    table = pa.table(
        {
            "a": pa.array(a, mask=gone),
            "b": pa.array(0.8 * a + rng.normal(0, 2, n)),
            "dir": pa.array(levels.tolist()),
        }
    )
    settings = GeneratorSettings(gan_steps=5, vae_epochs=1, seed=0)
    gen = TableGenerator.fit(kind, table, ["a", "b"], ["dir"], settings)
    out = gen.draw(6000, seed=1)
    assert abs(np.mean(out.column("a").is_null()) - 0.4) < 0.03
    drawn = out.column("dir").to_numpy(zero_copy_only=False)
    for level, rate in {"N": 0.55, "S": 0.3, "E": 0.1, "W": 0.05}.items():
        assert abs(np.mean(drawn == level) - rate) < 0.03, level
    # The numbers the generator leaves observed have the training spread.
    kept = out.column("a").drop_null().to_numpy()
    assert abs(np.median(kept) - np.median(a[~gone])) < 1.0
