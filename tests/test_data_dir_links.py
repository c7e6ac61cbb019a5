"""A symbolic link inside the data dir never leads a run's writes or deletes out.

Each case links one place a run writes to a directory outside the data dir
(holding a sentinel, and a folder named like a killed run's staging leftover,
which the run's cleanup would delete), runs the real ``latentflow`` command,
and checks that it fails in one line with exit status 2 and that the outside
directory is byte-identical.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).with_name("latentflow")
DATE = "2024-06-01"

# Link (relative to the data dir) -> what it points at, relative to outside/.
LINKS = {
    "area": ("latent", "."),
    "dataset": ("ingested/weatheraus", "."),
    "partition": (f"rejected/weatheraus/run_date={DATE}", "."),
    "staging": (".staging", "."),
    "cache": (".cache", "."),
    "locks": (".locks", "."),
    "lock-file": (".locks/weatheraus.lock", "sentinel.txt"),
    "artifacts": ("mlartifacts", "."),
}


def tree(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def small_input(tmp_path_factory) -> Path:
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("links-input")
    return write_weatheraus_like_csv(root / "weatherAUS.csv", 300, seed=2)


@pytest.mark.parametrize("kind", sorted(LINKS))
def test_link_out_of_the_data_dir_fails_the_run_in_one_line(
    small_input, tmp_path, kind
):
    outside = tmp_path / "outside"
    leftover = outside / f"latent.weatheraus.{DATE}.0123456789ab"
    leftover.mkdir(parents=True)
    (leftover / "part-00000.parquet").write_bytes(b"someone else's file")
    (outside / "sentinel.txt").write_text("must survive\n")
    before = tree(outside)

    data = tmp_path / "data"
    link, target = LINKS[kind]
    (data / link).parent.mkdir(parents=True, exist_ok=True)
    (data / link).symlink_to((outside / target).resolve())

    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_TRACKING", "LATENTFLOW_"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    proc = subprocess.run(
        [
            str(BIN),
            "run",
            "--input",
            str(small_input),
            "--data-dir",
            str(data),
            "--run-date",
            DATE,
            "--epochs",
            "2",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("latentflow: error: "), proc.stderr[-2000:]
    assert str(data / link) in last and "symbolic link" in last
    assert tree(outside) == before
    # Nothing was published either.
    for area in ("ingested", "rejected", "latent"):
        part = data / area / "weatheraus" / f"run_date={DATE}"
        assert kind in ("partition",) or not part.exists()
