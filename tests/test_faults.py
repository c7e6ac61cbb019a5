"""Environmental faults and impossible settings, as a user meets them.

Each fault runs the real console script against a copy of one good data dir
and must end with exit status 2, exactly one ``latentflow: error:`` line on
stderr, no traceback, and the earlier run date's outputs byte-identical.
Disk-full and read-only faults need mounts (root); they skip without them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

BIN = Path(sys.executable).with_name("latentflow")
GOOD_DATE = "2024-05-01"
FAULT_DATE = "2024-05-02"
MODEL_ARGS = ["--latent-dim", "3", "--epochs", "2"]

pytestmark = pytest.mark.slow


def _env(home: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_"))
    }
    env["PREFECT_HOME"] = str(home)
    # A loaded CI machine can take longer than Prefect's default to start it.
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    env.update(extra or {})
    return env


def _cli(
    args: list[str], cwd: Path, home: Path, extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *args],
        cwd=cwd,
        env=_env(home, extra),
        capture_output=True,
        text=True,
        timeout=600,
    )


def _snapshot(data_dir: Path) -> dict[str, str]:
    """SHA-256 of every file of the good run date's partitions and the models."""
    out = {}
    for top in ("ingested", "rejected", "latent", "mlartifacts", ".cache"):
        root = data_dir / top
        if not root.is_dir():
            continue
        for p in sorted(root.rglob("*")):
            if p.is_file() and FAULT_DATE not in str(p):
                out[str(p.relative_to(data_dir))] = hashlib.sha256(
                    p.read_bytes()
                ).hexdigest()
    return out


@dataclass
class Good:
    root: Path
    csv: Path
    data_dir: Path
    home: Path
    snapshot: dict[str, str]


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Good:
    """One successful run, shared by every fault of the module."""
    from tasks.synthetic import write_weatheraus_like_csv

    root = tmp_path_factory.mktemp("faults")
    csv = write_weatheraus_like_csv(root / "weatherAUS.csv", 300, seed=1)
    data_dir = root / "good"
    r = _cli(
        [
            "run",
            "--input",
            str(csv),
            "--data-dir",
            str(data_dir),
            "--run-date",
            GOOD_DATE,
            *MODEL_ARGS,
        ],
        cwd=root,
        home=root / "prefect-home",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return Good(root, csv, data_dir, root / "prefect-home", _snapshot(data_dir))


@dataclass
class Case:
    """A fault: the run's extra arguments and environment, and what to say."""

    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    data_dir: Path | None = None  # where earlier outputs live (None: the copy)
    expect: tuple[str, ...] = ()


def _copy(good: Good, dest: Path) -> Path:
    shutil.copytree(good.data_dir, dest, symlinks=True)
    return dest


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount here ({r.stderr.strip()[:100]}); needs root")


@pytest.fixture
def mounts() -> Iterator[list[Path]]:
    made: list[Path] = []
    yield made
    for m in reversed(made):
        subprocess.run(["umount", "-l", str(m)], capture_output=True)


def _n_clusters(good: Good, work: Path, mounts: list[Path]) -> Case:
    cfg = work / "cfg.yaml"
    cfg.write_text("n_clusters: 256\n")  # 300 rows: 240 train, 60 held out
    return Case(
        ["--config", str(cfg), "--retrain"],
        expect=("n_clusters 256", "240 training rows"),
    )


def _cuda(good: Good, work: Path, mounts: list[Path]) -> Case:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    return Case(["--device", "cuda", "--retrain"], expect=("cuda", "CUDA"))


def _disk_full(good: Good, work: Path, mounts: list[Path]) -> Case:
    mnt = work / "small-disk"
    mnt.mkdir()
    _mount("-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt))
    mounts.append(mnt)
    data = _copy(good, mnt / "lf")
    # Leave ~100 KiB: the run starts, then cannot write its model or outputs.
    free = shutil.disk_usage(mnt).free
    (mnt / "filler").write_bytes(b"\0" * max(0, free - 100 * 1024))
    return Case(["--retrain"], data_dir=data, expect=("no space left", "ENOSPC"))


def _read_only(good: Good, work: Path, mounts: list[Path]) -> Case:
    data = _copy(good, work / "ro")
    _mount("--bind", str(data), str(data))
    mounts.append(data)
    _mount("-o", "remount,ro,bind", str(data))
    return Case(["--retrain"], data_dir=data, expect=("read-only file system",))


def _data_dir_is_file(good: Good, work: Path, mounts: list[Path]) -> Case:
    f = work / "not-a-dir"
    f.write_text("x")
    return Case(data_dir=f, expect=("is a regular file", str(f)))


def _corrupt_mlflow(good: Good, work: Path, mounts: list[Path]) -> Case:
    data = _copy(good, work / "lf")
    (data / "mlflow.db").write_bytes(os.urandom(8192))
    return Case(data_dir=data, expect=("mlflow.db", "corrupt"))


def _locked_mlflow(good: Good, work: Path, mounts: list[Path]) -> Case:
    data = _copy(good, work / "lf")
    return Case(data_dir=data, expect=("mlflow.db", "locked", "retry later"))


def _corrupt_prefect(good: Good, work: Path, mounts: list[Path]) -> Case:
    home = work / "prefect-home"
    home.mkdir()
    (home / "prefect.db").write_bytes(os.urandom(8192))
    return Case(
        env={"PREFECT_HOME": str(home)}, expect=(str(home / "prefect.db"), "corrupt")
    )


def _prefect_url_to_garbage(good: Good, work: Path, mounts: list[Path]) -> Case:
    junk = work / "junk.db"
    junk.write_bytes(os.urandom(8192))
    return Case(
        env={"PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{junk}"},
        expect=(str(junk), "corrupt"),
    )


FAULTS: dict[str, Callable[[Good, Path, list[Path]], Case]] = {
    "n_clusters_over_rows": _n_clusters,
    "cuda_without_gpu": _cuda,
    "disk_full": _disk_full,
    "read_only_data_dir": _read_only,
    "data_dir_is_a_file": _data_dir_is_file,
    "corrupt_mlflow_db": _corrupt_mlflow,
    "locked_mlflow_db": _locked_mlflow,
    "corrupt_prefect_db": _corrupt_prefect,
    "prefect_db_url_to_garbage": _prefect_url_to_garbage,
}


@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault_is_one_line_and_keeps_earlier_outputs(good, fault, mounts):
    work = good.root / f"{fault}-{uuid.uuid4().hex[:6]}"
    work.mkdir()
    case = FAULTS[fault](good, work, mounts)
    data_dir = case.data_dir or _copy(good, work / "lf")
    env = {k: v for k, v in case.env.items() if k != "PREFECT_HOME"}
    home = Path(case.env.get("PREFECT_HOME", good.home))
    args = [
        "run",
        "--input",
        str(good.csv),
        "--dataset",
        "weatheraus",
        "--data-dir",
        str(data_dir),
        "--run-date",
        FAULT_DATE,
        *MODEL_ARGS,
        *case.args,
    ]
    locker = None
    if fault == "locked_mlflow_db":
        # Another process holds the store: an exclusive transaction, kept open.
        locker = sqlite3.connect(data_dir / "mlflow.db", isolation_level=None)
        locker.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        r = _cli(args, cwd=work, home=home, extra=env)
        took = time.monotonic() - t0
    finally:
        if locker is not None:
            locker.close()
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("latentflow: error:")]
    assert r.returncode == 2, r.stderr[-3000:]
    assert len(errors) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert r.stdout == ""
    for word in case.expect:
        assert word in errors[0], errors[0]
    assert took < 300
    if data_dir.is_dir():
        assert _snapshot(data_dir) == good.snapshot
