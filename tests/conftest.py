from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
WEATHER_CSV = REPO.parent / "shared" / "data" / "weatherAUS.csv"


@pytest.fixture(scope="session")
def weather_csv() -> Path:
    if not WEATHER_CSV.is_file():
        pytest.skip(f"real data not found at {WEATHER_CSV}")
    return WEATHER_CSV


@pytest.fixture(scope="session")
def prefect_harness():
    """A real, temporary Prefect server and database for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A real PostgreSQL server's superuser URL (``postgresql://…/postgres``).

    ``.ci/run`` starts one and exports ``LATENTFLOW_TEST_POSTGRES_URL``; without
    it, one is started here from Debian's binaries, and the tests skip when
    those are not installed either.
    """
    from tests import pg_cluster

    url = os.environ.get(pg_cluster.URL_ENV)
    if url:
        yield url
        return
    if pg_cluster.bin_dir() is None:
        pytest.skip(
            f"no PostgreSQL: set {pg_cluster.URL_ENV} or apt-get install postgresql"
        )
    root, url = pg_cluster.start()
    try:
        yield url
    finally:
        pg_cluster.stop(root)


@pytest.fixture
def pg_database(postgres_server: str) -> Iterator[Callable[[], str]]:
    """Makes fresh, empty databases on the test server; drops them afterwards."""
    import uuid

    import sqlalchemy as sa

    engine = sa.create_engine(
        postgres_server, isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool
    )
    made: list[str] = []

    def make() -> str:
        name = f"lf_{uuid.uuid4().hex[:12]}"
        with engine.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        made.append(name)
        return postgres_server.rsplit("/", 1)[0] + f"/{name}"

    try:
        yield make
    finally:
        with engine.connect() as conn:
            for name in made:
                conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        engine.dispose()


@pytest.fixture(autouse=True, scope="module")
def _no_tracking_uri_from_earlier_modules() -> Iterator[None]:
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, and an in-process
    # run leaves it (and latentflow's marker of its own URI) set after its test
    # ends. Module-scoped fixtures run before the function-scoped clean-up
    # below, so each module starts without them: a module's runs must never
    # reach an earlier module's store.
    names = ("MLFLOW_TRACKING_URI", "LATENTFLOW_EMBEDDED_TRACKING_URI")
    saved = {n: os.environ.pop(n) for n in names if n in os.environ}
    yield
    for n in names:
        os.environ.pop(n, None)
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    # Tests use MLflow on SQLite in their own tmp dir, never a user's server.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    monkeypatch.setenv("GIT_PYTHON_REFRESH", "quiet")
    yield


@pytest.fixture
def small_csv(tmp_path) -> Path:
    from tasks.synthetic import write_weatheraus_like_csv

    return write_weatheraus_like_csv(tmp_path / "weatherAUS.csv", 3000, seed=1)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
