"""A registered model is verified whole before anything of it runs, and the
served model scores raw rows exactly as the batch pipeline does.

One model is trained per module by the real console script; tests that tamper
with its files restore them afterwards.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import date, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from models.schema import TableSchema

BIN = Path(sys.executable).with_name("latentflow")
REPO = Path(__file__).resolve().parents[1]
NAME = "weatheraus-autoencoder"
D1, D2 = date(2024, 3, 1), date(2024, 3, 2)

pytestmark = pytest.mark.slow


def _env(cwd: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_"))
    }
    env["PREFECT_HOME"] = str(cwd / "prefect-home")
    # A loaded CI box can take longer than Prefect's default to start its
    # temporary server.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    return env


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *map(str, args)],
        cwd=cwd,
        env=_env(cwd),
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> SimpleNamespace:
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("served")
    src = write_weatheraus_like_csv(root / "weatherAUS.csv", 1500, seed=1)
    data = root / "lf"
    r = cli(
        "run",
        "--input",
        src,
        "--data-dir",
        data,
        "--run-date",
        D1,
        "--latent-dim",
        "3",
        "--epochs",
        "3",
        cwd=root,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    uri = f"sqlite:///{data / 'mlflow.db'}"
    return SimpleNamespace(root=root, data=data, csv=src, uri=uri)


@contextlib.contextmanager
def registry_at(data: Path) -> Iterator[None]:
    """MLflow pointed at ``data``'s store; the environment left as it was
    (``mlflow.set_tracking_uri`` also exports ``MLFLOW_TRACKING_URI``)."""
    from tasks.registry import EMBEDDED_URI_ENV, configure

    names = ("MLFLOW_TRACKING_URI", EMBEDDED_URI_ENV)
    saved = {k: os.environ.pop(k, None) for k in names}
    try:
        configure(data)
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


@pytest.fixture
def registry(trained):
    with registry_at(trained.data):
        yield trained


def stored_model(uri: str, version: int = 1) -> Path:
    """The logged model's files in the artifact store (a local directory here)."""
    from mlflow import MlflowClient

    where = MlflowClient(uri, registry_uri=uri).get_model_version_download_uri(
        NAME, str(version)
    )
    path = Path(where.removeprefix("file://"))
    assert (path / "MLmodel").is_file(), where
    return path


@contextlib.contextmanager
def restored(*paths: Path) -> Iterator[None]:
    """Put the files back as they were, whatever the test did to them."""
    saved = {p: p.read_bytes() for p in paths}
    try:
        yield
    finally:
        for p, data in saved.items():
            p.write_bytes(data)


def _one_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.startswith("latentflow")]
    assert len(lines) == 1 and "Traceback" not in text, text[-3000:]
    return lines[0]


# ------------------------------------------------------------------ tampering


def test_intact_champion_loads_verified_and_scores(trained, tmp_path):
    import models

    model = models.load_model(NAME, tracking_uri=trained.uri, dst=tmp_path)
    raw = pd.read_csv(trained.csv, nrows=20)
    out = model.predict(raw)
    assert len(out) == 20 and out["error"].isna().all()
    assert out[["latent_0", "recon_error", "is_anomaly"]].notna().all().all()


@pytest.mark.parametrize("target", ["pyfunc_model.py", "code/models/bundle.py"])
def test_appended_code_never_runs(registry, tmp_path, target):
    import mlflow

    import models
    from models.integrity import IntegrityError

    marker = tmp_path / "pwned"
    victim = stored_model(registry.uri) / target
    with restored(victim):
        with victim.open("a") as fh:
            fh.write(f"\nopen({str(marker)!r}, 'w').close()\n")
        with pytest.raises(IntegrityError) as exc:
            models.load_model(NAME, tracking_uri=registry.uri, dst=tmp_path / "dl")
        msg = str(exc.value)
        assert "\n" not in msg and target in msg and "SHA-256" in msg
        assert not marker.exists()
        # The same load the README used to document runs it (for the stored
        # model file; the copied package only runs where `models` is not
        # installed, e.g. `mlflow models serve`).
        if target == "pyfunc_model.py":
            mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
            assert marker.exists()
            marker.unlink()


def test_serve_model_refuses_tampered_code(trained, tmp_path):
    marker = tmp_path / "pwned"
    victim = stored_model(trained.uri) / "pyfunc_model.py"
    with restored(victim):
        with victim.open("a") as fh:
            fh.write(f"\nopen({str(marker)!r}, 'w').close()\n")
        r = cli(
            "serve-model",
            "--data-dir",
            trained.data,
            "--dataset",
            "weatheraus",
            "--port",
            _free_port(),
            cwd=tmp_path,
        )
    assert r.returncode == 2
    assert "pyfunc_model.py" in _one_line(r.stderr)
    assert not marker.exists()


def _raise_threshold(bundle: Path) -> None:
    """Change the saved threshold and re-sign the bundle's own manifest, as an
    attacker with write access to the store would: only the registry's record
    can tell."""
    from models.integrity import write_manifest

    meta_path = bundle / "estimator" / "estimator.json"
    meta = json.loads(meta_path.read_text())
    meta["fitted"]["threshold_"] = 1e9
    meta_path.write_text(json.dumps(meta))
    write_manifest(bundle)


def test_tampered_model_json_stops_the_run_and_keeps_the_champion(trained):
    from mlflow import MlflowClient

    bundle = stored_model(trained.uri) / "artifacts" / "model_dir"
    files = [bundle / "estimator" / "estimator.json", bundle / "manifest.json"]
    cache = trained.data / ".cache" / "models" / NAME
    shutil.rmtree(cache, ignore_errors=True)  # a fresh machine: the store is read
    try:
        with restored(*files):
            _raise_threshold(bundle)
            r = cli(
                "run",
                "--input",
                trained.csv,
                "--data-dir",
                trained.data,
                "--run-date",
                D2,
                "--latent-dim",
                "3",
                "--epochs",
                "3",
                cwd=trained.root,
            )
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    assert r.returncode == 2, r.stderr[-3000:]
    line = _one_line(r.stderr)
    assert "estimator.json" in line and "SHA-256" in line, line
    assert not (trained.data / "latent" / "weatheraus" / f"run_date={D2}").exists()
    client = MlflowClient(trained.uri, registry_uri=trained.uri)
    assert int(client.get_model_version_by_alias(NAME, "champion").version) == 1
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [int(v.version) for v in versions] == [1]


def test_tampered_cache_copy_is_refused(registry, tmp_path):
    from tasks.errors import TamperError
    from tasks.registry import find_champion

    cache = tmp_path / "cache"
    champion = find_champion(NAME, cache)
    assert champion is not None and champion.version == 1
    _raise_threshold(Path(champion.model_dir))
    with pytest.raises(TamperError) as exc:
        find_champion(NAME, cache)
    assert "estimator.json" in str(exc.value) and "\n" not in str(exc.value)


# ------------------------------------------------- serving == batch, row by row

NUMERIC_CELLS = [
    "",
    "NA",
    "nan",
    "N/A",
    "-",
    "?",
    "null",
    "abc",
    "1,2",
    "inf",
    "-Infinity",
    "1e308",
    "-1e308",
    "1e999",
    "1e-300",
    " 7 ",
    "0",
    "12.5",
    "-3e2",
    "2020-01-01",
]
CATEGORY_CELLS = ["", "NA", "N/A", "-", "null", "Yes", "No", " Yes ", "N", "SSE"]
CATEGORY_CELLS += ["Atlantis", "yes", "123", "abc"]


@pytest.fixture(scope="module")
def champion(trained, tmp_path_factory):
    import models
    from tasks.registry import find_champion

    with registry_at(trained.data):
        info = find_champion(NAME, tmp_path_factory.mktemp("cache"))
    dl = tmp_path_factory.mktemp("dl")
    served = models.load_model(NAME, tracking_uri=trained.uri, dst=dl)
    return SimpleNamespace(info=info, served=served)


def _cells(schema: TableSchema) -> st.SearchStrategy[dict[str, str]]:
    fields = {}
    for col in schema.columns:
        if col.role == "key":
            continue
        if col.kind == "numeric":
            pool = st.sampled_from(NUMERIC_CELLS) | st.floats(-60, 60).map(repr)
        else:
            pool = st.sampled_from(CATEGORY_CELLS)
        fields[col.name] = pool
    return st.fixed_dictionaries(fields)


def _batch(champion, rows: list[dict[str, str]], work: Path):
    """The batch path on the same raw rows: ingest, then score."""
    from tasks.ingest import ingest
    from tasks.score import Provenance, score_partition

    names = champion.info.input_schema.names
    src = work / "raw.csv"
    with src.open("w", newline="") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)
        w.writerow(names)
        w.writerows([[r[n] for n in names] for r in rows])
    data = work / "lf"
    ing = ingest(
        src,
        data,
        "weatheraus",
        D1,
        expected_schema=champion.info.input_schema,
        max_reject_fraction=1.0,
    )
    latent = pd.DataFrame(columns=["Date"])
    if ing.rows_accepted:
        out = score_partition(
            Path(ing.ingested_dir),
            Path(champion.info.model_dir),
            data,
            "weatheraus",
            D1,
            Provenance(NAME, 1, "", "test"),
        )
        latent = pd.read_parquet(out.output_dir)
        latent["Date"] = latent["Date"].astype(str)
    rejected = pd.DataFrame(columns=["Date", "_reject_reason"])
    if ing.rows_rejected:
        rejected = pd.read_parquet(ing.rejected_dir)
    return latent.set_index("Date"), rejected.set_index("Date")["_reject_reason"]


def _check_same(champion, rows: list[dict[str, str]]) -> None:
    start = date(2020, 1, 1)
    for i, r in enumerate(rows):
        r["Date"] = (start + timedelta(days=i)).isoformat()
        r["Location"] = "Sydney"
    with tempfile.TemporaryDirectory() as tmp:
        latent, rejected = _batch(champion, rows, Path(tmp))
    raw = pd.DataFrame(rows, dtype=object)
    served = champion.served.predict(raw)
    lat = [c for c in served.columns if c.startswith("latent_")]
    threshold = champion.served.unwrap_python_model().model.threshold
    assert len(latent) + len(rejected) == len(rows)
    for i, r in enumerate(rows):
        got = served.iloc[i]
        if r["Date"] in rejected.index:
            assert got["error"] == rejected[r["Date"]], r
            assert got[[*lat, "recon_error", "is_anomaly"]].isna().all(), r
            continue
        want = latent.loc[r["Date"]]
        assert got["error"] is None, r
        for c in [*lat, "recon_error"]:
            w = float(want[c])
            g = np.nan if pd.isna(got[c]) else float(got[c])
            np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=str(r))
        if not np.isclose(float(want["recon_error"]), threshold, rtol=1e-4):
            assert bool(got["is_anomaly"]) == bool(want["is_anomaly"]), r


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
    database=None,
)
@given(data=st.data())
@example(data=None)
def test_served_rows_match_the_batch_path(champion, data):
    schema = champion.info.input_schema
    if data is None:  # every token of the pools at least once
        numeric = [c.name for c in schema.columns if c.kind == "numeric"]
        other = [
            c.name for c in schema.columns if c.kind != "numeric" and c.role != "key"
        ]
        rows = []
        for k in range(max(len(NUMERIC_CELLS), len(CATEGORY_CELLS))):
            row = {n: "5" for n in numeric} | {n: "No" for n in other}
            row[numeric[k % len(numeric)]] = NUMERIC_CELLS[k % len(NUMERIC_CELLS)]
            row[other[k % len(other)]] = CATEGORY_CELLS[k % len(CATEGORY_CELLS)]
            rows.append(row)
    else:
        rows = data.draw(st.lists(_cells(schema), min_size=1, max_size=8))
    _check_same(champion, rows)


def test_pandas_typed_frame_scores_like_raw_text(champion, trained):
    """``pd.read_csv`` with its own typing ("NA" -> NaN, numbers -> float) gives
    what the raw text gives."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "rows.csv"
        raw = pd.read_csv(trained.csv, nrows=30, dtype=str, keep_default_na=False)
        raw.loc[0, "MinTemp"] = "abc"
        raw.loc[1, "WindGustDir"] = "NA"
        raw.loc[2, "Rainfall"] = " 1e308 "
        raw.to_csv(src, index=False)
        typed = pd.read_csv(src)
    a = champion.served.predict(raw)
    b = champion.served.predict(typed)
    pd.testing.assert_frame_equal(a.drop(columns="error"), b.drop(columns="error"))
    # Same rows refused for the same column; a typed cell is quoted as printed
    # ('1e+308' for the text '1e308').
    assert a["error"].str.split(":").str[0].equals(b["error"].str.split(":").str[0])
    assert a.loc[0, "error"] == b.loc[0, "error"] == "MinTemp: 'abc' is not a number"
    assert a.loc[1, "error"] is None
    assert "outside the float32 range" in a.loc[2, "error"]


# -------------------------------------------------------------- serve-model


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(
        url, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_serve_model_scores_raw_rows_over_http(trained, tmp_path):
    port = _free_port()
    proc = subprocess.Popen(
        [
            str(BIN),
            "serve-model",
            "--data-dir",
            str(trained.data),
            "--dataset",
            "weatheraus",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            try:
                with urllib.request.urlopen(base + "/ping", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "serve-model did not come up"
            time.sleep(0.5)
        raw = pd.read_csv(trained.csv, nrows=4, dtype=str, keep_default_na=False)
        raw.loc[1, "WindGustDir"] = "NA"  # missing, as in batch
        raw.loc[2, "Humidity3pm"] = "abc"  # batch rejects this row
        body = {"dataframe_split": raw.to_dict(orient="split", index=False)}
        status, out = _post(base + "/invocations", json.dumps(body).encode())
        assert status == 200, out
        preds = out["predictions"]
        assert len(preds) == 4
        assert {"latent_0", "recon_error", "is_anomaly", "error"} <= set(preds[0])
        assert [p["error"] for p in preds] == [
            None,
            None,
            "Humidity3pm: 'abc' is not a number",
            None,
        ]
        assert preds[2]["latent_0"] is None and preds[2]["is_anomaly"] is None
        assert all(isinstance(preds[i]["recon_error"], float) for i in (0, 1, 3))

        short = {"dataframe_split": raw.drop(columns="Humidity3pm").to_dict("split")}
        status, out = _post(base + "/invocations", json.dumps(short).encode())
        assert status == 400 and "Humidity3pm" in out["message"]
        status, out = _post(base + "/invocations", b'{"dataframe_split": [')
        assert status == 400 and "JSON" in out["message"]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert "Traceback" not in err, err[-3000:]
    assert f"http://127.0.0.1:{port}/invocations" in err
