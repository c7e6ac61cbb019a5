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
import time
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
    # A loaded CI machine can take longer than Prefect's 20 s default.
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
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


def other_input(root: Path, rows: int, seed: int) -> Path:
    """A weatherAUS-like file with other rows than the first run's, and one
    row that is rejected: every area of a run date changes when it is run."""
    from tasks.synthetic import write_weatheraus_like_csv

    csv = write_weatheraus_like_csv(root / f"v{seed}" / "weatherAUS.csv", rows, seed)
    lines = csv.read_text().splitlines()
    header, last = lines[0].split(","), lines[-1].split(",")
    last[header.index("MinTemp")] = "warm"  # not a number: rejected
    last[header.index("Date")] = "2031-01-01"  # a key of its own
    csv.write_text("\n".join([*lines, ",".join(last)]) + "\n")
    return csv


def partition(data: Path, area: str, run_date: str = DATE) -> Path:
    return data / area / "weatheraus" / f"run_date={run_date}"


def run_date_view(data: Path, run_date: str = DATE) -> dict[str, object]:
    """What a reader of one run date sees: ingested and latent row ids, the
    rejected rows' source files, and latent's run date and model version."""
    ing = pd.read_parquet(partition(data, "ingested", run_date))
    rej = pd.read_parquet(partition(data, "rejected", run_date))
    lat_dir = partition(data, "latent", run_date)
    lat = pd.read_parquet(lat_dir)
    meta = pq.read_schema(next(lat_dir.glob("*.parquet"))).metadata
    return {
        "ingested": frozenset(ing["_row_id"]),
        "rejected": sorted(set(rej["_source_file"])),
        "rejected_rows": len(rej),
        "latent": frozenset(lat["_row_id"]),
        "latent_run_date": meta[b"latentflow.run_date"].decode(),
    }


def assert_consistent(view: dict[str, object]) -> None:
    """The three areas come from one run: latent scored exactly the ingested rows."""
    assert view["latent"] == view["ingested"]
    assert view["latent_run_date"] == DATE


@pytest.fixture(scope="module")
def new_input(first_run):
    _csv, data, _ = first_run
    return other_input(data.parent, 5000, seed=11)


# Every stage of a run, up to the commit's journal: killed there, the date
# keeps the earlier run's outputs, byte for byte.
@pytest.mark.parametrize(
    "stage",
    [
        "staged-ingested",
        "train",
        "register",
        "score",
        "staged-latent",
        "commit-begin",
    ],
)
def test_sigkill_leaves_previous_outputs_intact(first_run, new_input, stage):
    _csv, data, summary = first_run
    before = snapshot(data)
    old_view = run_date_view(data)
    champ = champion_version(data)
    # --retrain so the run passes through training and the registry on its way.
    p = start(
        new_input, data, "--run-date", DATE, "--retrain", LATENTFLOW_CRASH_AT=stage
    )
    rc, out, err = finish(p)
    assert rc == -signal.SIGKILL, f"the run did not reach {stage}: {err[-3000:]}"
    assert out == ""
    assert snapshot(data) == before
    assert run_date_view(data) == old_view
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


# Another process holding the dataset's lock, as a long run does: the test
# decides when it is released, so the overlap never depends on timing.
_HOLDER = """
import sys
from tasks.storage import DatasetLock
with DatasetLock(sys.argv[1], sys.argv[2]):
    print("held", flush=True)
    sys.stdin.read()
"""


@contextlib.contextmanager
def lock_held(data: Path, dataset: str = "weatheraus"):
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(data), dataset],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        yield holder
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)


def waits_at(proc: subprocess.Popen[str], lock: Path, timeout: float = 300) -> bool:
    """Whether the run ``proc`` has opened ``lock`` (it polls it from then on)
    before ``timeout``; False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            fds = Path(f"/proc/{proc.pid}/fd").iterdir()
            if any(os.path.realpath(fd) == str(lock) for fd in fds):
                return True
        time.sleep(0.1)
    return False


def test_run_of_a_locked_dataset_fails_cleanly(first_run):
    csv, data, _ = first_run
    before = snapshot(data)
    with lock_held(data) as holder:
        rc, out, err = finish(start(csv, data, "--run-date", "2024-06-02"))
    assert rc == 2, err[-3000:]
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("latentflow: error: dataset 'weatheraus' is already")
    assert f"pid={holder.pid}" in last and "Traceback" not in err
    assert snapshot(data) == before
    assert_clean_outputs(data)


def test_run_waits_out_a_held_lock_when_asked(first_run):
    csv, data, _ = first_run
    config = data.parent / "wait.toml"
    config.write_text("[execution]\nlock_wait_seconds = 600\n")
    lock = (data / ".locks" / "weatheraus.lock").resolve()
    with lock_held(data):
        run = start(csv, data, "--run-date", "2024-06-03", "--config", str(config))
        assert waits_at(run.proc, lock), "the run never reached the lock"
        assert run.proc.poll() is None
    rc, out, err = finish(run)
    assert rc == 0, err[-3000:]
    assert json.loads(out)["run_date"] == "2024-06-03"
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


# Killed once the commit's journal is written: the next run (of any date)
# finishes the commit first, so the date holds the new run's outputs in all
# three areas. Each case runs its own input, so old and new always differ.
# (Every commit crash point, against every area, is covered on real directories
# in tests/test_storage.py; here two of them go through real runs.)
@pytest.mark.parametrize(
    ("stage", "seed"), [("commit-journal", 21), ("commit-swap-rejected", 22)]
)
def test_sigkill_mid_commit_is_rolled_forward(first_run, stage, seed):
    _csv, data, _ = first_run
    old_view = run_date_view(data)
    assert_consistent(old_view)
    # Keys come from the row count, not the seed: each case has its own count.
    new_csv = other_input(data.parent, 1000 + 100 * seed, seed=seed)
    rc, out, err = finish(
        start(new_csv, data, "--run-date", DATE, LATENTFLOW_CRASH_AT=stage)
    )
    assert out == ""
    assert rc == -signal.SIGKILL, f"the run did not reach {stage}: {err[-3000:]}"
    journal = data / ".staging" / f"commit.weatheraus.{DATE}.json"
    assert journal.is_file()  # marks the date as being committed
    # The next run, for another date, recovers this one under the lock.
    other_date = f"2024-07-{seed - 10:02d}"
    rc, _out, err = finish(start(new_csv, data, "--run-date", other_date))
    assert rc == 0, err[-2000:]
    assert not journal.exists()
    view = run_date_view(data)
    assert_consistent(view)
    assert view["ingested"] != old_view["ingested"]
    # Same input, same ingest: the recovered date equals the fresh run's.
    fresh = run_date_view(data, other_date)
    assert view["ingested"] == fresh["ingested"]
    assert view["rejected"] == fresh["rejected"] == [str(new_csv)]
    assert view["rejected_rows"] == fresh["rejected_rows"] == 1
    assert_clean_outputs(data)
    assert not [p for p in (data / ".staging").iterdir() if "weatheraus" in p.name]


class _NoWrites(_Failing):
    """A registry that looks empty but fails every write: it "goes down"
    after the run has ingested, trained and tries to register."""

    def do_GET(self) -> None:
        self.send_response(404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error_code": "RESOURCE_DOES_NOT_EXIST", "message": "no"}')


def test_runs_failing_after_ingest_publish_nothing(first_run, new_input, tmp_path):
    _csv, data, _ = first_run
    before = snapshot(data)
    fresh_date = "2024-09-01"
    # n_clusters larger than the rows: training fails after ingest.
    tiny = other_input(tmp_path, 60, seed=31)
    cfg = tmp_path / "clusters.yaml"
    cfg.write_text("n_clusters: 200\n")
    failures = [
        finish(
            start(
                tiny, data, "--run-date", fresh_date, "--retrain", "--config", str(cfg)
            )
        )
    ]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NoWrites)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        failures.append(
            finish(
                start(
                    new_input,
                    data,
                    "--run-date",
                    fresh_date,
                    MLFLOW_TRACKING_URI=url,
                    MLFLOW_HTTP_REQUEST_MAX_RETRIES="1",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="0",
                )
            )
        )
    finally:
        server.shutdown()
    for rc, out, err in failures:
        assert rc != 0 and out == "", err[-2000:]
    assert "MLflow registry failed" in failures[-1][2]
    # Every visible file, of every date: earlier outputs unchanged, none added.
    assert snapshot(data) == before
    for area in ("ingested", "rejected", "latent"):
        assert not partition(data, area, fresh_date).exists()
    assert not [p for p in (data / ".staging").iterdir() if "weatheraus" in p.name]
