"""PostgreSQL behind Prefect and MLflow, against a real server on 127.0.0.1.

The server comes from ``.ci/run`` (``LATENTFLOW_TEST_POSTGRES_URL``) or is
started by the ``postgres_server`` fixture; every test gets fresh databases.
Runs are real ``latentflow run`` processes with ``MLFLOW_TRACKING_URI`` and
``PREFECT_API_DATABASE_CONNECTION_URL`` on PostgreSQL, with Prefect's
temporary server on that database; ``make serve`` is the real supervisor.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_crash_safety import lock_held, waits_at
from tests.warm_process import warm_process

BIN = Path(sys.executable).with_name("latentflow")
DATE = "2024-05-01"


def pg_env(home: Path, mlflow_db: str | None, prefect_db: str | None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "LATENTFLOW_"))
    }
    env["PREFECT_HOME"] = str(home)
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if mlflow_db:
        env["MLFLOW_TRACKING_URI"] = mlflow_db
    if prefect_db:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = prefect_db.replace(
            "postgresql://", "postgresql+asyncpg://", 1
        )
    return env


def start_run(
    csv: Path, data: Path, dataset: str, env: dict[str, str], *extra: str
) -> subprocess.Popen[str]:
    argv = [str(BIN), "run", "--input", str(csv), "--data-dir", str(data)]
    argv += ["--dataset", dataset, "--run-date", DATE, "--latent-dim", "2"]
    argv += ["--epochs", "2", *extra]
    return subprocess.Popen(
        argv,
        cwd=data.parent,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def summary_of(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def flow_runs(prefect_db: str) -> list[tuple[str, str]]:
    """(name, state) of every flow run Prefect recorded in the database."""
    import sqlalchemy as sa

    engine = sa.create_engine(prefect_db, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, state_type FROM flow_run"))
            return [(r[0], str(r[1])) for r in rows]
    finally:
        engine.dispose()


def model_version_locations(mlflow_db: str) -> dict[str, str]:
    """Where the registry says each model version's files are."""
    import sqlalchemy as sa

    engine = sa.create_engine(mlflow_db, poolclass=sa.pool.NullPool)
    try:
        with engine.connect() as conn:
            rows = conn.execute(
                sa.text("SELECT name, version, storage_location FROM model_versions")
            )
            return {f"{r[0]} v{r[1]}": r[2] for r in rows}
    finally:
        engine.dispose()


def load_champion(mlflow_db: str, name: str):
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_db, registry_uri=mlflow_db)
    version = client.get_model_version_by_alias(name, "champion").version
    return mlflow.pyfunc.load_model(
        client.get_model_version_download_uri(name, version)
    )


def assert_under(data: Path, locations: dict[str, str]) -> None:
    from urllib.parse import unquote, urlparse

    assert locations
    for owner, uri in locations.items():
        path = Path(unquote(urlparse(uri).path))
        assert path.resolve().is_relative_to(data.resolve()), (owner, uri)


@pytest.fixture
def csvs(tmp_path: Path) -> dict[str, Path]:
    from tasks.synthetic import write_weatheraus_like_csv

    return {
        name: write_weatheraus_like_csv(tmp_path / "in" / f"{name}.csv", 300, seed=i)
        for i, name in enumerate(("alpha", "beta"))
    }


# -- fast: no server needed -----------------------------------------------------


def test_serve_database_urls_one_schema_each_in_a_shared_database():
    from deployments.serve import databases

    one = databases("postgresql://lf@db:5432/ops", None, None)
    assert one.prefect == "postgresql+asyncpg://lf@db:5432/ops"
    assert one.mlflow == ("postgresql://lf@db:5432/ops?options=-csearch_path%3Dmlflow")
    assert one.prefect_search_path == "prefect, public"
    two = databases(
        None, "postgresql://lf@db/prefect", "postgresql+psycopg2://lf@db/mlflow"
    )
    assert two.prefect == "postgresql+asyncpg://lf@db/prefect"
    assert two.mlflow == "postgresql+psycopg2://lf@db/mlflow"
    assert two.prefect_search_path is None
    with pytest.raises(ValueError, match="postgresql://"):
        databases("sqlite:///x.db", None, None)
    with pytest.raises(ValueError, match="one database"):
        databases(None, "postgresql://lf@db/x", "postgresql://lf@db:5432/x")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed once the block ends: nobody listens


def test_serve_refuses_an_unreachable_database_before_starting(tmp_path):
    url = f"postgresql://lf:secret@127.0.0.1:{_closed_port()}/latentflow"
    argv = [sys.executable, "-m", "deployments.serve", "--data-dir", str(tmp_path)]
    argv += ["--port", str(_closed_port()), "--database-url", url]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("serve: PostgreSQL database"), lines
    assert "lf:***@127.0.0.1" in lines[0] and "secret" not in proc.stderr
    assert not (tmp_path / ".serve-logs").exists()


def test_unreachable_postgres_is_one_line_in_seconds(tmp_path, csvs):
    """Before: MLflow's engine retried for minutes, then a traceback-free but
    5-minute failure; now the pre-flight check names the server at once."""
    url = f"postgresql://lf:secret@127.0.0.1:{_closed_port()}/mlflow"
    data = tmp_path / "data"
    t0 = time.monotonic()
    rc, out, err = finish(
        start_run(csvs["alpha"], data, "alpha", pg_env(tmp_path / "ph", url, None))
    )
    assert rc == 2 and out == ""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines[-1].startswith("latentflow: error: MLflow store postgresql://lf:***@")
    assert "secret" not in err and "Traceback" not in err
    assert time.monotonic() - t0 < 120
    assert not data.exists()


def test_prefect_database_needs_asyncpg(tmp_path, csvs):
    env = pg_env(tmp_path / "ph", None, None)
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = "postgresql://lf@127.0.0.1:1/p"
    rc, out, err = finish(start_run(csvs["alpha"], tmp_path / "data", "alpha", env))
    assert rc == 2 and out == ""
    assert err.strip().splitlines()[-1].startswith("latentflow: error:")
    assert "postgresql+asyncpg://" in err and "Traceback" not in err


# -- against the server ---------------------------------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_two_datasets_at_once_on_fresh_postgres_then_reuse(tmp_path, csvs, pg_database):
    """The pipeline end to end with both Prefect and MLflow on PostgreSQL.

    Two datasets start together on fresh databases and create the schemas
    together: before the advisory lock, Prefect's migrations and block
    registration raced (DuplicateColumnError, tracebacks from its temporary
    server). Then a second run of one finds its champion in the registry.
    """
    prefect_db, mlflow_db = pg_database(), pg_database()
    home = tmp_path / "prefect-home"
    env = pg_env(home, mlflow_db, prefect_db)
    data = tmp_path / "data"
    procs = {n: start_run(csv, data, n, env) for n, csv in csvs.items()}
    results = {n: finish(p) for n, p in procs.items()}
    firsts = {}
    for name, (rc, out, err) in results.items():
        assert rc == 0, (name, err[-3000:])
        assert "Traceback" not in err and "Error" not in err, (name, err[-3000:])
        firsts[name] = summary = summary_of(out)
        assert summary["dataset"] == name and summary["decision"] == "promote"
        assert (
            load_champion(mlflow_db, summary["model_name"]).metadata.run_id
            == (summary["mlflow_run_id"])
        )

    # The champion is found in the PostgreSQL registry and reused.
    rc, out, err = finish(start_run(csvs["alpha"], data, "alpha", env))
    assert rc == 0, err[-3000:]
    again = summary_of(out)
    assert not again["trained"]
    assert again["model_version"] == firsts["alpha"]["model_version"]

    # Both stores are the databases: no SQLite file anywhere.
    assert not (data / "mlflow.db").exists()
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))
    runs = flow_runs(prefect_db)
    assert sum(state.endswith("COMPLETED") for _, state in runs) >= 3, runs
    # Artifacts still go under the data dir.
    assert_under(data, model_version_locations(mlflow_db))
    assert (data / "mlartifacts" / "alpha").is_dir()


@pytest.mark.slow
@pytest.mark.postgres
def test_a_warm_process_on_postgres_serves_two_datasets_at_once(
    tmp_path, csvs, pg_database
):
    """``latentflow warm`` migrates the PostgreSQL database and starts Prefect's
    server on it once; the runs it serves record there, as runs of their own do.
    """
    prefect_db, mlflow_db = pg_database(), pg_database()
    home = tmp_path / "prefect-home"
    env = pg_env(home, mlflow_db, prefect_db)
    data = tmp_path / "data"
    with warm_process(env, tmp_path) as warm:
        procs = {n: start_run(csv, data, n, env) for n, csv in csvs.items()}
        results = {n: finish(p) for n, p in procs.items()}
        assert warm.served() == 2, warm.text()
    for name, (rc, out, err) in results.items():
        assert rc == 0, (name, err[-3000:])
        assert "Traceback" not in err, (name, err[-3000:])
        assert summary_of(out)["decision"] == "promote"
    runs = flow_runs(prefect_db)
    assert sum(state.endswith("COMPLETED") for _, state in runs) >= 2, runs
    assert not list(home.rglob("*.db")), list(home.rglob("*.db"))


@pytest.mark.slow
@pytest.mark.postgres
def test_same_dataset_twice_at_once_one_refused(tmp_path, csvs, pg_database):
    import pandas as pd
    import pyarrow.parquet as pq

    prefect_db, mlflow_db = pg_database(), pg_database()
    env = pg_env(tmp_path / "prefect-home", mlflow_db, prefect_db)
    data = tmp_path / "data"
    # Schemas made first, as after any earlier run: fresh databases would
    # serialise the two runs' starts (one migrates, the other waits for it).
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import os, sys;"
            "from flows.runtime_checks import migrate_prefect_postgres as m;"
            "from tasks.registry import configure;"
            "m(os.environ['PREFECT_API_DATABASE_CONNECTION_URL']);"
            "configure(sys.argv[1])",
            str(data),
        ],
        env=env,
        check=True,
        timeout=300,
    )
    # The overlap is made, not hoped for: while another process holds the
    # dataset's lock, one run waits for it (lock_wait_seconds) and one is
    # refused; then the lock is released and the waiting run completes.
    config = tmp_path / "wait.toml"
    config.write_text("[execution]\nlock_wait_seconds = 600\n")
    lock = (data / ".locks" / "alpha.lock").resolve()
    with lock_held(data, "alpha"):
        waiter = start_run(
            csvs["alpha"], data, "alpha", env, "--retrain", "--config", str(config)
        )
        refused = start_run(csvs["alpha"], data, "alpha", env, "--retrain")
        assert waits_at(waiter, lock), "the waiting run never reached the lock"
        rc, loser_out, loser_err = finish(refused)
        assert waiter.poll() is None
    assert rc == 2, loser_err[-3000:]
    rc, out, err = finish(waiter)
    assert rc == 0, err[-3000:]
    assert loser_out == ""
    assert loser_err.strip().splitlines()[-1].startswith("latentflow: error: dataset")
    assert "already running" in loser_err and "Traceback" not in loser_err
    # The winner's outputs are whole; the registry holds exactly its version.
    summary = summary_of(out)
    latent = pd.read_parquet(summary["output"])
    assert len(latent) == summary["rows_scored"] == 300
    assert latent["_row_id"].is_unique
    for f in (data / "latent").rglob("*"):
        assert not f.name.startswith("."), f
        if f.is_file():
            pq.read_metadata(f)
    assert list(model_version_locations(mlflow_db)) == ["alpha-autoencoder v1"]


@pytest.mark.slow
@pytest.mark.postgres
def test_make_serve_on_one_postgres_database(tmp_path, pg_database):
    """``--database-url``: the Prefect server and MLflow share one database, a
    schema each; a served run tracks there with artifacts in the data dir."""
    from prefect.deployments import run_deployment

    from deployments.definitions import ON_DEMAND
    from tests.test_deployments import FLOW, RUN_TIMEOUT, ServeStack

    url = pg_database()
    stack = ServeStack(tmp_path, args=("--database-url", url)).start()
    try:
        params = {
            "config": {
                "input": str(stack.csv),
                "data_dir": str(stack.data_dir / "out"),
                "latent_dim": 2,
                "epochs": 2,
            }
        }
        with stack.settings():
            started = run_deployment(
                f"{FLOW}/{ON_DEMAND}", parameters=params, timeout=0
            )
        with stack.client() as client:
            deadline = time.monotonic() + RUN_TIMEOUT
            while time.monotonic() < deadline:
                run = client.read_flow_run(started.id)
                if run.state.is_final():
                    break
                time.sleep(1.0)
        assert run.state.is_completed(), f"{run.state}\n{stack.logs()}"
    finally:
        code, left = stack.stop()
    assert code == 0 and not left
    mlflow_db = f"{url}?options=-csearch_path%3Dmlflow"
    assert_under(stack.data_dir, model_version_locations(mlflow_db))
    assert load_champion(mlflow_db, "weatheraus-autoencoder") is not None
    runs = dict(flow_runs(f"{url}?options=-csearch_path%3Dprefect"))
    assert runs[run.name].endswith("COMPLETED"), runs
    assert not list(stack.data_dir.rglob("*.db")), list(stack.data_dir.rglob("*.db"))
