"""What ``latentflow run`` shows: stage lines and training progress on stderr,
``--quiet`` and ``--verbose``, ``--version``; through the real console script.

One small data dir serves three runs (verbose and training, then a terminal
run that retrains, then a quiet reuse), so the module costs three short runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.warm_process import warm_process

BIN = Path(sys.executable).with_name("latentflow")
ARGS = ["--dataset", "weatheraus", "--run-date", "2024-05-01"]
SMALL = ["--latent-dim", "2", "--epochs", "3"]


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_", "PREFECT_LOGGING"))
    }
    env["PREFECT_HOME"] = str(home)
    return env


def _run(args: list[str], cwd: Path, tty: bool = False) -> tuple[int, str, str]:
    """Exit status, stdout and stderr; stderr on a pseudo-terminal if ``tty``."""
    cmd = [str(BIN), *args]
    env = _env(cwd / "prefect-home")
    if not tty:
        r = subprocess.run(
            cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600
        )
        return r.returncode, r.stdout, r.stderr
    master, slave = pty.openpty()
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the other side closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave, timeout=600
        )
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    return proc.returncode, proc.stdout.decode(), b"".join(chunks).decode()


@pytest.fixture(scope="module", params=["own process", "warm process"])
def runs(request, tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """The three runs, each in its own process or each handed to a
    ``latentflow warm`` process (flows/warm.py): what they show must not differ.
    """
    from tasks.synthetic import write_weatheraus_like_csv

    cwd = tmp_path_factory.mktemp("cli-output")
    csv = write_weatheraus_like_csv(cwd / "weatherAUS.csv", 600, seed=3)
    base = ["run", "--input", str(csv), "--data-dir", str(cwd / "lf"), *ARGS]
    with contextlib.ExitStack() as stack:
        warm = None
        if request.param == "warm process":
            env = _env(cwd / "prefect-home")
            warm = stack.enter_context(warm_process(env, cwd))
        out = {"verbose": _run([*base, *SMALL, "--verbose"], cwd)}
        out["terminal"] = _run([*base, *SMALL, "--retrain"], cwd, tty=True)
        out["quiet"] = _run(["--quiet", *base, *SMALL], cwd)
        if warm is not None:
            assert warm.served() == 3, warm.text()
    out["home"] = (0, str(cwd / "prefect-home"), "")
    return out


def _one_json_line(stdout: str) -> dict:
    lines = stdout.splitlines()
    assert len(lines) == 1, stdout
    return json.loads(lines[0])


@pytest.mark.slow
def test_terminal_shows_stages_and_training_epochs(runs):
    code, stdout, stderr = runs["terminal"]
    assert code == 0, stderr[-2000:]
    assert _one_json_line(stdout)["trained"] is True
    for stage in (
        "champion:",
        "ingest: 600 rows",
        "decide: train a challenger (forced)",
        "score:",
    ):
        assert f"latentflow: {stage}" in stderr, stderr
    # The epoch display is rewritten in place: one carriage return per update.
    assert "latentflow: train: epoch 1/3  train_loss " in stderr, stderr
    assert "\r\x1b[Klatentflow: train: epoch 3/3" in stderr, stderr
    assert "latentflow: train: 3 epochs, val_mse " in stderr
    # Without --verbose, neither Prefect's run logs nor MLflow's prints.
    assert "Finished in state" not in stderr
    assert "Created version" not in stderr


@pytest.mark.slow
def test_verbose_adds_prefect_and_mlflow_logs(runs):
    code, stdout, stderr = runs["verbose"]
    assert code == 0, stderr[-2000:]
    assert _one_json_line(stdout)["trained"] is True
    assert "Finished in state Completed()" in stderr  # Prefect's run logs
    assert "Created version '1' of model 'weatheraus-autoencoder'" in stderr
    # Off a terminal the stage lines stay, without terminal control codes.
    assert "latentflow: decide: train a challenger" in stderr and "\r" not in stderr


@pytest.mark.slow
def test_quiet_prints_only_the_json_line(runs):
    code, stdout, stderr = runs["quiet"]
    assert code == 0, stderr
    assert _one_json_line(stdout)["decision"] == "reuse"
    assert stderr == ""


@pytest.mark.slow
def test_the_early_server_records_runs_in_prefect_home(runs):
    db = Path(runs["home"][1]) / "prefect.db"
    with sqlite3.connect(db) as con:
        states = [r[0] for r in con.execute("SELECT state_type FROM flow_run")]
    assert states.count("COMPLETED") >= 3, states


def test_quiet_still_prints_errors(tmp_path):
    code, stdout, stderr = _run(
        ["run", "-q", "--input", str(tmp_path / "missing.csv")], tmp_path
    )
    assert code == 2 and stdout == ""
    assert stderr.startswith("latentflow: error: ") and "missing.csv" in stderr


def test_a_failure_inside_the_flow_is_one_line_without_prefects_logs(tmp_path):
    # Too few rows is found by the training task, deep in the flow: Prefect
    # logs the failed task and flows at ERROR, which the terminal must not
    # repeat (the run page in the UI keeps them).
    rows = "\n".join(f"{i},{i * 0.5}" for i in range(5))
    (tmp_path / "tiny.csv").write_text(f"id,x\n{rows}\n")
    code, stdout, stderr = _run(
        ["run", "--input", str(tmp_path / "tiny.csv"), "--data-dir", "d"], tmp_path
    )
    assert code == 2 and stdout == "", stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "latentflow: error: dataset 'tiny': 5 rows to train on, too few to train"
        " a model (need at least 20)"
    ], stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "d" / "latent").exists()


def test_version_answers():
    r = subprocess.run(
        [str(BIN), "--version"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("latentflow ") and r.stdout.split()[1][0].isdigit()
