"""Everything a run stores lives in its data dir: nothing in the working directory.

The run is the console script, started from an empty, read-only working
directory; the MLflow store it leaves is then read back and every artifact
location in it (experiments, runs, logged models, model versions) must lie
under the data dir. Tests run as root here, where chmod does not stop writes,
so "the directory is still empty" is asserted as well as the exit status.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

BIN = Path(sys.executable).with_name("latentflow")


def run_cli(
    *args: str, cwd: Path, prefect_home: Path, timeout: float = 600
) -> subprocess.Popen[str]:
    """Start ``latentflow`` as a user would, with a clean Prefect/MLflow env."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "MLFLOW_REGISTRY"))
    }
    env["PREFECT_HOME"] = str(prefect_home)
    return subprocess.Popen(
        [str(BIN), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def tiny_run_args(csv: Path, data: Path, dataset: str) -> list[str]:
    return [
        "run",
        "--input",
        str(csv),
        "--data-dir",
        str(data),
        "--dataset",
        dataset,
        "--run-date",
        "2024-05-01",
        "--latent-dim",
        "2",
        "--epochs",
        "2",
    ]


def _local_path(uri: str) -> Path | None:
    """The filesystem path of a file URI or plain path; None for other schemes."""
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" and uri:
        return Path(uri)
    return None


def artifact_locations(data: Path) -> dict[str, str]:
    """Every artifact location the data dir's MLflow store records, by owner."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    uri = f"sqlite:///{data / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    found: dict[str, str] = {}
    experiments = client.search_experiments(view_type=ViewType.ALL)
    ids = [e.experiment_id for e in experiments]
    for exp in experiments:
        found[f"experiment {exp.name}"] = exp.artifact_location
    for run in client.search_runs(ids, run_view_type=ViewType.ALL):
        found[f"run {run.info.run_id}"] = run.info.artifact_uri
    for model in client.search_logged_models(ids):
        found[f"logged model {model.model_id}"] = model.artifact_location
    # The registry API does not expose where a version's files are kept.
    with sqlite3.connect(data / "mlflow.db") as db:
        rows = db.execute(
            "SELECT name, version, storage_location FROM model_versions"
        ).fetchall()
    for name, version, location in rows:
        found[f"model version {name} v{version}"] = location
    return found


def load_champion(data: Path, name: str) -> object:
    """``name@champion`` from the data dir's store, loaded as an MLflow pyfunc."""
    import mlflow
    from mlflow import MlflowClient

    uri = f"sqlite:///{data / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    version = client.get_model_version_by_alias(name, "champion").version
    # Where the version's files are: loading from there needs no tracking URI.
    return mlflow.pyfunc.load_model(
        client.get_model_version_download_uri(name, version)
    )


def assert_all_under(data: Path, locations: dict[str, str]) -> None:
    root = data.resolve()
    outside = {}
    for owner, uri in locations.items():
        path = _local_path(uri)
        if path is None or not path.resolve().is_relative_to(root):
            outside[owner] = uri
    assert not outside, f"artifact locations outside {root}: {outside}"


@pytest.mark.slow
def test_run_from_read_only_cwd_writes_only_into_the_data_dir(tmp_path):
    from tasks.synthetic import write_weatheraus_like_csv

    csv = write_weatheraus_like_csv(tmp_path / "in" / "weatherAUS.csv", 300, seed=3)
    data = tmp_path / "data"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    cwd.chmod(0o555)
    try:
        proc = run_cli(
            *tiny_run_args(csv, data, "weatheraus"),
            cwd=cwd,
            prefect_home=tmp_path / "prefect-home",
        )
        out, err = proc.communicate(timeout=600)
    finally:
        cwd.chmod(0o755)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["trained"] and summary["decision"] == "promote"
    assert sorted(p.name for p in cwd.iterdir()) == []

    locations = artifact_locations(data)
    assert any(k.startswith("model version") for k in locations), locations
    assert_all_under(data, locations)
    # The champion's files are in the data dir, so it loads from anywhere.
    model = load_champion(data, summary["model_name"])
    assert model.metadata.run_id == summary["mlflow_run_id"]
    assert (data / "mlartifacts" / "weatheraus").is_dir()


# -- the tracking decision, in-process (no run) ------------------------------------


def test_configure_decides_once_not_from_its_own_env(tmp_path, monkeypatch):
    """mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI: a second configure in
    the same process must still see the data dir's own store, not a user's URI."""
    from tasks import registry

    monkeypatch.delenv(registry.EMBEDDED_URI_ENV, raising=False)
    first = registry.configure(tmp_path / "one")
    assert first.embedded and first.artifact_root == (tmp_path / "one/mlartifacts")
    assert os.environ["MLFLOW_TRACKING_URI"] == first.uri  # what MLflow does
    second = registry.configure(tmp_path / "two")
    assert second.embedded
    assert second.uri == f"sqlite:///{tmp_path / 'two' / 'mlflow.db'}"
    exp_id = registry.ensure_experiment("ds", tmp_path / "two")
    from mlflow import MlflowClient

    exp = MlflowClient(second.uri).get_experiment(exp_id)
    assert exp.artifact_location == (tmp_path / "two/mlartifacts/ds").as_uri()
    assert not (tmp_path / "one" / "mlartifacts" / "ds").exists()


@pytest.mark.parametrize(
    ("uri", "in_data_dir"),
    [
        ("sqlite:///{tmp}/elsewhere.db", True),
        ("postgresql+psycopg2://u@127.0.0.1/mlflow", True),
        ("http://127.0.0.1:5000", False),
    ],
)
def test_user_tracking_uri_keeps_artifacts_in_data_dir_unless_a_server(
    tmp_path, monkeypatch, uri, in_data_dir
):
    from tasks import registry

    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri.format(tmp=tmp_path))
    tracking = registry.tracking_for(tmp_path / "data")
    assert not tracking.embedded and tracking.uri == uri.format(tmp=tmp_path)
    expected = (tmp_path / "data" / "mlartifacts") if in_data_dir else None
    assert tracking.artifact_root == expected


def test_user_sqlite_store_gets_artifacts_under_the_data_dir(tmp_path, monkeypatch):
    from mlflow import MlflowClient

    from tasks import registry

    uri = f"sqlite:///{tmp_path / 'user.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    registry.configure(tmp_path / "data")
    exp_id = registry.ensure_experiment("ds", tmp_path / "data")
    client = MlflowClient(uri)
    assert client.get_experiment(exp_id).artifact_location == (
        (tmp_path / "data" / "mlartifacts" / "ds").as_uri()
    )
    # MLflow's Default experiment, created with the schema, points there too.
    assert client.get_experiment("0").artifact_location.startswith(
        (tmp_path / "data" / "mlartifacts").as_uri()
    )


def test_experiment_outside_the_data_dir_is_kept_with_one_warning(tmp_path):
    """An older data dir whose experiment points at <old cwd>/mlruns: its models
    stay loadable where they are, and the run says where they are and what to do."""
    from mlflow import MlflowClient

    from tasks import registry

    data = tmp_path / "data"
    tracking = registry.configure(data)
    old = tmp_path / "old-checkout" / "mlruns" / "1"
    exp_id = MlflowClient(tracking.uri).create_experiment(
        "latentflow-ds", artifact_location=old.as_uri()
    )
    # On the module's logger itself: Prefect's logging setup may replace the
    # root handlers pytest captures with.
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("tasks.registry")
    logger.addHandler(handler)
    try:
        assert registry.configure(data) == tracking
        assert registry.ensure_experiment("ds", data) == exp_id
    finally:
        logger.removeHandler(handler)
    lines = [r.getMessage() for r in records]
    assert len(lines) == 1, lines
    assert str(old) in lines[0] and "docs/operations.md" in lines[0]
    assert MlflowClient(tracking.uri).get_experiment(exp_id).artifact_location == (
        old.as_uri()
    )
