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
    # The input exists: the option, not the missing file, is what is refused.
    (tmp_path / "x.csv").write_text("a,b\n1,2\n")
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


@pytest.mark.parametrize(
    ("make", "arg", "expect"),
    [
        (None, "missing.csv", "missing.csv does not exist"),
        (None, "drops/*.csv", "no data files match"),
        ("dir", "drops", "has no data files"),
        ("config", "--config", "missing.csv does not exist"),
    ],
)
def test_bad_input_is_fast_quiet_and_writes_nothing(tmp_path, make, arg, expect):
    """Checked before any engine starts: one line, exit 2, nothing created."""
    import time

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not data")
    args = ["--input", str(inputs / arg)]
    if make == "dir":
        (inputs / "drops").mkdir()
        (inputs / "drops" / "readme.md").write_text("no data here")
    elif make == "config":
        cfg = inputs / "run.yaml"
        cfg.write_text(f"input: {inputs / 'missing.csv'}\n")
        args = ["--config", str(cfg)]
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    data = tmp_path / "data"
    before = sorted(inputs.rglob("*"))
    t0 = time.monotonic()
    r = subprocess.run(
        [str(BIN), "run", *args, "--data-dir", str(data)],
        cwd=cwd,
        env={**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert r.returncode == 2, r.stderr[-2000:]
    assert r.stdout == ""
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr
    assert r.stderr.startswith("latentflow: error: ") and expect in r.stderr
    assert took < 5.0, f"took {took:.1f}s"
    assert list(cwd.iterdir()) == []
    assert not data.exists() and not (tmp_path / "prefect-home").exists()
    assert sorted(inputs.rglob("*")) == before
