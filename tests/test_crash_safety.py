"""Killed runs, overlapping runs and a registry that is down: data stays intact.

Runs are real ``latentflow run`` processes; a crash is a real SIGKILL at a named
stage (``tasks/faults.py``), not a mocked exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).with_name("latentflow")
FAST = ["--latent-dim", "3", "--epochs", "3"]
DATE = "2024-06-01"


def env_for(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "LATENTFLOW_"))
    }
    env["PREFECT_HOME"] = str(home / "prefect-home")
    env.update(extra)
    return env


class Run:
    """A ``latentflow run`` in its own process group, output captured in files.

    A SIGKILLed run orphans its children (Prefect's ephemeral API server): they
    are cleaned up by killing the group, as a supervisor would.
    """

    def __init__(self, csv: Path, data: Path, *args: str, **env: str) -> None:
        self.log = data.parent / f"run-{os.getpid()}-{id(self)}"
        self.out = open(f"{self.log}.out", "w+")  # noqa: SIM115
        self.err = open(f"{self.log}.err", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                str(BIN),
                "run",
                "--input",
                str(csv),
                "--data-dir",
                str(data),
                *FAST,
                *args,
            ],
            env=env_for(data.parent, **env),
            stdout=self.out,
            stderr=self.err,
            text=True,
            start_new_session=True,
        )

    def finish(self) -> tuple[int, str, str]:
        try:
            rc = self.proc.wait(timeout=600)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        self.out.seek(0)
        self.err.seek(0)
        return rc, self.out.read(), self.err.read()


def start(csv: Path, data: Path, *args: str, **env: str) -> Run:
    return Run(csv, data, *args, **env)


def finish(run: Run) -> tuple[int, str, str]:
    return run.finish()


def snapshot(data: Path) -> dict[str, str]:
    """Hash of every visible output file: what a downstream reader can see."""
    files = {}
    for area in ("ingested", "rejected", "latent"):
        for f in sorted((data / area).rglob("*")):
            if f.is_file():
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                files[str(f.relative_to(data))] = digest
    return files


def assert_clean_outputs(data: Path) -> None:
    for area in ("ingested", "rejected", "latent"):
        for f in (data / area).rglob("*"):
            assert not f.name.startswith("."), f"temporary file visible: {f}"
            if f.is_file():
                assert f.suffix == ".parquet", f
                pq.read_metadata(f)  # complete and readable


def champion_version(data: Path) -> int:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{data / 'mlflow.db'}")
    mv = client.get_model_version_by_alias("weatheraus-autoencoder", "champion")
    return int(mv.version)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """A completed run whose outputs every crash below must leave untouched."""
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("crash")
    csv = write_weatheraus_like_csv(root / "weatherAUS.csv", 6000, seed=3)
    data = root / "lf"
    rc, out, err = finish(start(csv, data, "--run-date", DATE))
    assert rc == 0, err[-2000:]
    return csv, data, json.loads(out)


@pytest.mark.parametrize(
    "stage",
    ["commit-ingested", "train", "register", "score", "commit-latent"],
)
def test_sigkill_leaves_previous_outputs_intact(first_run, stage):
    csv, data, summary = first_run
    before = snapshot(data)
    champ = champion_version(data)
    # --retrain so the run passes through training and the registry on its way.
    p = start(csv, data, "--run-date", DATE, "--retrain", LATENTFLOW_CRASH_AT=stage)
    rc, out, err = finish(p)
    assert rc == -signal.SIGKILL, f"the run did not reach {stage}: {err[-3000:]}"
    assert out == ""
    assert snapshot(data) == before
    assert_clean_outputs(data)
    # The alias only moves after a complete, loadable version exists.
    assert champion_version(data) >= champ
    assert pd.read_parquet(summary["output"])["_row_id"].is_unique


def test_rerun_after_crashes_completes(first_run):
    csv, data, _ = first_run
    rc, out, err = finish(start(csv, data, "--run-date", DATE))
    assert rc == 0, err[-2000:]
    summary = json.loads(out)
    latent = pd.read_parquet(summary["output"])
    assert len(latent) == summary["rows_scored"] and latent["_row_id"].is_unique
    assert (
        str(summary["model_version"])
        == pq.read_schema(next(Path(summary["output"]).glob("*.parquet")))
        .metadata[b"latentflow.model_version"]
        .decode()
    )
    assert_clean_outputs(data)
    assert not any((data / ".staging").iterdir())


def test_concurrent_runs_same_dataset_one_waits_out(first_run, tmp_path):
    csv, data, _ = first_run
    a = start(csv, data, "--run-date", "2024-06-02")
    b = start(csv, data, "--run-date", "2024-06-02")
    results = [finish(a), finish(b)]
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], results
    loser = next(r for r in results if r[0] == 2)
    assert "already running" in loser[2] and "Traceback" not in loser[2]
    assert_clean_outputs(data)


class _Failing(http.server.BaseHTTPRequestHandler):
    def _fail(self) -> None:
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "INTERNAL_ERROR", "message": "boom"}')

    do_GET = do_POST = do_PATCH = do_DELETE = _fail

    def log_message(self, *args: object) -> None:
        pass


def test_registry_down_fails_cleanly(first_run):
    csv, data, summary = first_run
    before = snapshot(data)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        p = start(
            csv,
            data,
            "--run-date",
            DATE,
            MLFLOW_TRACKING_URI=url,
            MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
            MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
        )
        rc, out, err = finish(p)
    finally:
        server.shutdown()
    assert rc == 2 and out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("latentflow: error: MLflow registry failed"), err[-1500:]
    assert "Traceback" not in err
    assert snapshot(data) == before
    assert champion_version(data) >= summary["model_version"]
