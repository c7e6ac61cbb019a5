"""Which exceptions are environmental faults, decided on types and codes."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy

from tasks.errors import EnvironmentFault, InputError, describe_fault


def _raised(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # the point is to inspect it
        return exc
    raise AssertionError("nothing raised")


def test_corrupt_sqlite_through_sqlalchemy(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    db.write_bytes(os.urandom(4096))
    engine = sqlalchemy.create_engine(f"sqlite:///{db}")

    def query() -> None:
        with engine.connect() as con:
            con.execute(sqlalchemy.text("SELECT * FROM sqlite_master"))

    fault = describe_fault(_raised(query), database=f"MLflow store {db}")
    assert isinstance(fault, EnvironmentFault)
    assert str(fault).startswith(f"MLflow store {db} is not a SQLite database")


def test_locked_sqlite(tmp_path: Path) -> None:
    db = tmp_path / "mlflow.db"
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("CREATE TABLE t (x)")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        other = sqlite3.connect(db, timeout=0.05)
        exc = _raised(lambda: other.execute("SELECT * FROM t").fetchall())
        other.close()
    finally:
        holder.close()
    assert "is locked by another process" in str(describe_fault(exc))
    assert "retry later" in str(describe_fault(exc))


def test_path_through_a_regular_file(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    exc = _raised(lambda: (tmp_path / "file" / "sub").mkdir(parents=True))
    msg = str(describe_fault(exc))
    assert msg.startswith("not a directory (ENOTDIR):") and str(tmp_path) in msg
    exc = _raised(lambda: (tmp_path / "file").mkdir(exist_ok=True))
    assert str(describe_fault(exc)) == (
        f"{tmp_path / 'file'} exists and is not a directory; expected a directory there"
    )


def test_user_errors_pass_through_and_bugs_are_not_faults(tmp_path: Path) -> None:
    err = InputError("bad cell")
    assert describe_fault(RuntimeError("wrapped")) is None
    assert describe_fault(ValueError("x")) is None
    assert describe_fault(_raised((tmp_path / "missing").read_bytes)) is None
    try:
        try:
            raise err
        except InputError as inner:
            raise RuntimeError("engine") from inner
    except RuntimeError as outer:
        assert describe_fault(outer) is err


@pytest.mark.parametrize("code", ["ENOSPC", "EDQUOT", "EFBIG", "EROFS", "EACCES"])
def test_errno_without_a_file_name_names_the_data_dir(code: str) -> None:
    import errno

    exc = OSError(getattr(errno, code), "pyarrow: write failed")
    msg = str(describe_fault(exc, where="/data/lf"))
    assert f"({code}): under /data/lf" in msg


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_an_api_server_that_does_not_answer_is_a_fault_naming_it() -> None:
    import httpx

    port = _closed_port()
    try:
        httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5)
    except httpx.ConnectError as exc:
        try:  # as Prefect's client re-raises it
            raise RuntimeError("Failed to reach API") from exc
        except RuntimeError as outer:
            fault = describe_fault(outer)
    assert isinstance(fault, EnvironmentFault)
    assert f"the Prefect API at http://127.0.0.1:{port} did not answer" in str(fault)
    assert "ConnectError" in str(fault)


def test_a_gpu_out_of_memory_is_a_fault_with_what_to_do() -> None:
    """torch's CUDA out-of-memory error, however deep in the chain (Prefect
    re-raises a task's error), is the machine's state: one line saying what
    to change. Any other RuntimeError stays a bug."""
    import torch

    try:
        try:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate")
        except RuntimeError as inner:
            raise RuntimeError("task failed") from inner
    except RuntimeError as outer:
        fault = describe_fault(outer)
    assert isinstance(fault, EnvironmentFault)
    text = str(fault)
    assert "\n" not in text and "GPU ran out of memory" in text
    assert "--device cpu" in text and "score_batch_rows" in text
    assert describe_fault(RuntimeError("CUDA out of memory")) is None


def test_a_dead_prefect_api_is_one_line_and_status_2(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tasks.synthetic import write_weatheraus_like_csv

    csv = write_weatheraus_like_csv(tmp_path / "w.csv", 200, seed=1)
    port = _closed_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_", "PREFECT_LOGGING", "LATENTFLOW"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    bin_ = Path(sys.executable).with_name("latentflow")
    r = subprocess.run(
        [str(bin_), "run", "--input", str(csv), "--data-dir", str(tmp_path / "d")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 2 and r.stdout == "", r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        f"latentflow: error: the Prefect API at http://127.0.0.1:{port} did not"
        " answer (ConnectError): check that its server is running, or unset"
        " PREFECT_API_URL to run on a temporary one"
    ], r.stderr
    assert not (tmp_path / "d" / "latent").exists()
