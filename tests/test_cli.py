"""The console script as a user runs it: one JSON line, or one error line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("latentflow")


def cli(
    *args: str, cwd: Path, env_extra: dict | None = None
) -> subprocess.CompletedProcess:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_"))
    }
    env["PREFECT_HOME"] = str(cwd / "prefect-home")
    env.update(env_extra or {})
    return subprocess.run(
        [str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
def test_run_prints_one_json_line(small_csv, tmp_path):
    r = cli(
        "run",
        "--input",
        str(small_csv),
        "--data-dir",
        str(tmp_path / "lf"),
        "--run-date",
        "2024-05-01",
        "--latent-dim",
        "3",
        "--epochs",
        "3",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1, r.stdout
    summary = json.loads(lines[0])
    assert summary["dataset"] == "weatheraus" and summary["run_date"] == "2024-05-01"
    assert summary["rows_scored"] + summary["rows_rejected"] == 3000
    assert Path(summary["output"]).is_dir()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["run", "--input", "nope.csv"], "nope.csv"),
        (["run", "--input", "x.csv", "--latent-dim", "0"], "latent_dim"),
        (["run", "--input", "x.csv", "--dataset", "../../etc"], "dataset"),
        (["run", "--input", "x.csv", "--run-date", "yesterday"], "YYYY-MM-DD"),
    ],
)
def test_user_errors_are_one_line_no_traceback(tmp_path, args, expect):
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stdout == ""
    assert expect in r.stderr
    err_lines = [
        ln
        for ln in r.stderr.strip().splitlines()
        if ln.startswith(("latentflow", "usage"))
    ]
    assert err_lines, r.stderr
