import multiprocessing as mp
import os
from datetime import date

import pytest

from tasks.errors import AlreadyRunningError, ConfigError
from tasks.storage import (
    DatasetLock,
    StagedPartition,
    atomic_write_bytes,
    clean_stale_staging,
    dataset_from_path,
    partition_dir,
    resolve_under,
    validate_dataset_name,
)

D = date(2024, 1, 2)


def test_dataset_name_derivation_and_validation():
    assert dataset_from_path("/x/weatherAUS.csv") == "weatheraus"
    assert dataset_from_path("drops/My File.csv.gz") == "my-file"
    for bad in ("../../etc", "a/b", "", "UPPER", ".hidden"):
        with pytest.raises(ConfigError):
            validate_dataset_name(bad)


def test_paths_cannot_escape(tmp_path):
    with pytest.raises(ConfigError, match="escapes"):
        resolve_under(tmp_path, "..", "x")
    assert partition_dir(tmp_path, "latent", "ds", D).name == "run_date=2024-01-02"


def test_atomic_write_leaves_no_temp_on_failure(tmp_path):
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"one")

    class Boom(Exception):
        pass

    from tasks.storage import atomic_path

    with pytest.raises(Boom), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise Boom
    assert target.read_bytes() == b"one"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_partition_swap_replaces_whole_and_failure_keeps_old(tmp_path):
    with StagedPartition(tmp_path, "latent", "ds", D) as p:
        p.file("a.parquet").write_text("old-a")
        p.file("b.parquet").write_text("old-b")
        final = p.commit()
    with StagedPartition(tmp_path, "latent", "ds", D) as p:
        p.file("c.parquet").write_text("new")
        p.commit()
    assert sorted(os.listdir(final)) == ["c.parquet"]
    with pytest.raises(RuntimeError), StagedPartition(tmp_path, "latent", "ds", D) as p:
        p.file("d.parquet").write_text("never")
        raise RuntimeError("crash before commit")
    assert sorted(os.listdir(final)) == ["c.parquet"]
    assert not list((tmp_path / ".staging").iterdir())


def test_other_dates_untouched(tmp_path):
    for d in (D, date(2024, 1, 3)):
        with StagedPartition(tmp_path, "latent", "ds", d) as p:
            p.file("x.parquet").write_text(str(d))
            p.commit()
    with StagedPartition(tmp_path, "latent", "ds", D) as p:
        p.file("x.parquet").write_text("again")
        p.commit()
    other = partition_dir(tmp_path, "latent", "ds", date(2024, 1, 3))
    assert (other / "x.parquet").read_text() == "2024-01-03"


def test_clean_stale_staging_only_touches_its_dataset(tmp_path):
    (tmp_path / ".staging" / "latent.ds.2024-01-02.abc").mkdir(parents=True)
    (tmp_path / ".staging" / "latent.other.2024-01-02.abc").mkdir(parents=True)
    assert clean_stale_staging(tmp_path, "ds") == 1
    assert os.listdir(tmp_path / ".staging") == ["latent.other.2024-01-02.abc"]


def _hold_lock(path, ready, release):
    with DatasetLock(path, "ds"):
        ready.set()
        release.wait(10)


def test_lock_excludes_second_run_and_stale_lock_is_taken_over(tmp_path):
    ctx = mp.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_lock, args=(tmp_path, ready, release))
    proc.start()
    assert ready.wait(10)
    with pytest.raises(AlreadyRunningError, match=r"already running.*pid="):
        DatasetLock(tmp_path, "ds").__enter__()
    with DatasetLock(tmp_path, "other"):
        pass  # another dataset runs in parallel
    proc.kill()  # SIGKILL: the lock file stays, the flock does not
    proc.join()
    assert (tmp_path / ".locks" / "ds.lock").exists()
    with DatasetLock(tmp_path, "ds"):
        pass
