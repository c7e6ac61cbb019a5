"""The pipeline on real Dask clusters, through the real Prefect engine and MLflow.

- a LocalCluster of 2 worker processes (``runner: dask``, ``dask_workers: 2``)
  ingests and scores a 3-file dataset exactly as the sequential runner does;
- ``dask scheduler`` and ``dask worker`` started as separate processes on
  127.0.0.1, the CLI connecting by address, end to end;
- a worker SIGKILLed while it writes its first unit: Dask runs the unit again
  on a live worker and the committed partition has every row exactly once;
- a unit that fails leaves the previous partition byte for byte as it was.

Every process a test starts is in its own session and is killed with its group
when the module ends, whatever happened.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from flows.cli import main, run_pipeline

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DASK = Path(sys.executable).with_name("dask")
D1 = date(2024, 3, 1)
FAST = {"epochs": 3, "hidden": (16,), "latent_dim": 3, "batch_size": 128}
ROWS, FILES = 3000, 3
AREAS = ("ingested", "rejected", "latent")


def run(src: Path, data: Path, **kw: Any) -> dict[str, Any]:
    return run_pipeline(
        None,
        {"input": str(src), "data_dir": str(data), "run_date": D1, **FAST, **kw},
    )


def read(partition: str | Path) -> pd.DataFrame:
    df = pd.read_parquet(partition)
    return df.sort_values("_row_id").reset_index(drop=True)


def snapshot(partition: Path) -> dict[str, str]:
    return {
        f.name: hashlib.sha256(f.read_bytes()).hexdigest()
        for f in sorted(partition.iterdir())
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 CSVs of 1,000 rows each with disjoint keys: one dataset, 3 files."""
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("dask-src")
    whole = write_weatheraus_like_csv(root / "all.csv", ROWS, seed=4)
    header, *rows = whole.read_text().splitlines(keepends=True)
    src = root / "weatherAUS"  # the dataset name (and preset) comes from it
    src.mkdir()
    per = ROWS // FILES
    for i in range(FILES):
        (src / f"drop-{i}.csv").write_text(
            header + "".join(rows[i * per : (i + 1) * per])
        )
    return src


@pytest.fixture(scope="module")
def sequential(prefect_harness, source, tmp_path_factory) -> dict[str, Any]:
    """The reference: trained and scored by the sequential runner."""
    data = tmp_path_factory.mktemp("dask-data") / "lf"
    summary = run(source, data)
    assert summary["trained"] and summary["rows_scored"] == ROWS
    return {
        "data": data,
        "summary": summary,
        "latent": read(summary["output"]),
        "ingested": read(data / "ingested" / "weatheraus" / f"run_date={D1}"),
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1),
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory) -> Iterator[str]:
    """``dask scheduler`` + ``dask worker`` (2 processes, 1 thread each) on
    127.0.0.1, as a user would start them; stopped with their process groups."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask-logs")
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("LATENTFLOW_CRASH_AT", None)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn(name: str, *args: str) -> None:
        with open(logs / f"{name}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [str(DASK), *args],
                    cwd=REPO,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )

    try:
        spawn(
            "scheduler",
            "scheduler",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--no-dashboard",
        )
        _wait_port(port, 60)
        spawn(
            "worker",
            "worker",
            address,
            "--nworkers",
            "2",
            "--nthreads",
            "1",
            "--host",
            "127.0.0.1",
            "--no-dashboard",
        )
        with Client(address, set_as_default=False, timeout=60) as client:
            client.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=10)


def test_local_cluster_matches_sequential_row_for_row(sequential, source):
    data, ref = sequential["data"], sequential["summary"]
    summary = run(source, data, runner="dask", dask_workers=2)
    # The champion was reused: the same model scored both.
    assert not summary["trained"] and summary["model_version"] == ref["model_version"]
    for key in ("rows_in", "rows_rejected", "rows_scored", "anomalies"):
        assert summary[key] == ref[key], key
    # Exactly equal, not approximately: latent values, errors and flags.
    pd.testing.assert_frame_equal(read(summary["output"]), sequential["latent"])
    ingested = data / "ingested" / "weatheraus" / f"run_date={D1}"
    pd.testing.assert_frame_equal(read(ingested), sequential["ingested"])
    # One file per input file and per scoring unit, nothing else.
    names = [f"part-{i:05d}.parquet" for i in range(FILES)]
    assert sorted(p.name for p in ingested.iterdir()) == names
    assert sorted(p.name for p in Path(summary["output"]).iterdir()) == names
    assert not [p for p in (data / ".staging").iterdir() if "weatheraus" in p.name]


def test_cli_with_scheduler_and_worker_processes(
    sequential, source, dask_cluster, capsys, tmp_path
):
    data = sequential["data"]
    config = tmp_path / "fast.yaml"
    config.write_text(json.dumps({**FAST, "hidden": list(FAST["hidden"])}))
    rc = main(
        [
            "run",
            "--config",
            str(config),
            "--input",
            str(source),
            "--data-dir",
            str(data),
            "--run-date",
            str(D1),
            "--runner",
            "dask",
            "--dask-address",
            dask_cluster,
        ]
    )
    out, err = capsys.readouterr()
    assert rc == 0, err[-3000:]
    (line,) = out.strip().splitlines()
    summary = json.loads(line)
    assert summary["rows_scored"] == ROWS and summary["rows_in"] == ROWS
    assert summary["output"] == str(data / "latent" / "weatheraus" / f"run_date={D1}")
    assert not summary["trained"]
    pd.testing.assert_frame_equal(read(summary["output"]), sequential["latent"])


def test_killed_worker_is_replaced_and_no_row_is_lost(sequential, source, dask_cluster):
    from distributed import Client

    data = sequential["data"]
    before = read(data / "latent" / "weatheraus" / f"run_date={D1}")
    with Client(dask_cluster, set_as_default=False) as client:
        pids = set(client.run(os.getpid).values())
        # Every live worker SIGKILLs itself after writing the first batch of
        # its first unit (tasks/faults.py); the processes its nanny starts in
        # their place do not have the variable, so the units run again there.
        client.run(lambda: os.environ.__setitem__("LATENTFLOW_CRASH_AT", "score"))
    summary = run(source, data, runner="dask", dask_address=dask_cluster)
    with Client(dask_cluster, set_as_default=False) as client:
        client.wait_for_workers(2, timeout=120)
        after = set(client.run(os.getpid).values())
        assert not any(client.run(lambda: "LATENTFLOW_CRASH_AT" in os.environ).values())
    assert pids - after, "no worker was killed"
    latent = read(summary["output"])
    assert summary["rows_scored"] == ROWS
    assert latent["_row_id"].is_unique
    assert sorted(latent["_row_id"]) == sorted(before["_row_id"])
    pd.testing.assert_frame_equal(latent, before)
    out = Path(summary["output"])
    assert all(p.name.startswith("part-") for p in out.iterdir())


def test_failed_unit_leaves_the_previous_partition(
    sequential, source, monkeypatch, tmp_path
):
    """A unit that fails (here: on the threads runner) fails the run; the
    date's previous partitions, ingested and rejected too, stay byte for
    byte although the new input ingested fine, and no staged files are left."""
    from prefect import task

    import flows.nightly
    from tasks.score import score_unit

    data = sequential["data"]
    areas = [data / a / "weatheraus" / f"run_date={D1}" for a in AREAS]
    before = [snapshot(p) for p in areas]
    # Other rows than the reference run's: two of its three files.
    fewer = tmp_path / "weatherAUS"
    fewer.mkdir()
    for f in sorted(source.glob("*.csv"))[:2]:
        (fewer / f.name).write_bytes(f.read_bytes())

    def failing(unit: Any, *args: Any, **kwargs: Any) -> Any:
        if unit.index == 1:
            raise OSError("No space left on device")
        return score_unit(unit, *args, **kwargs)

    monkeypatch.setattr(
        flows.nightly, "score_unit_task", task(failing, name="score-unit")
    )
    with pytest.raises(OSError, match="No space left"):
        run(fewer, data, runner="threads")
    assert [snapshot(p) for p in areas] == before
    assert not list((data / ".staging").iterdir())
