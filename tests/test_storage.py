import multiprocessing as mp
import os
from datetime import date

import pytest

from tasks.errors import AlreadyRunningError, ConfigError, UnsafePathError
from tasks.partitions import keep_only, scratch_dir
from tasks.storage import (
    DatasetLock,
    StagedPartition,
    atomic_write_bytes,
    atomic_write_json,
    check_run_paths,
    clean_stale_staging,
    commit_partitions,
    dataset_from_path,
    journal_path,
    partition_dir,
    remove_tree,
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


# ------------------------------------------------- a run date's joint commit

AREAS3 = ("ingested", "rejected", "latent")


def _date_state(root):
    """Each area's partition contents for D: {area: text of its one file}."""
    out = {}
    for area in AREAS3:
        files = sorted((root / area / "ds" / f"run_date={D}").glob("*"))
        out[area] = [f.read_text() for f in files]
    return out


def _stage_all(root, what):
    staged = []
    for area in AREAS3:
        p = StagedPartition(root, area, "ds", D).__enter__()
        p.file("part-00000.parquet").write_text(f"{what}-{area}")
        staged.append(p)
    return staged


def _commit_and_crash(root, stage):
    os.environ["LATENTFLOW_CRASH_AT"] = stage
    staged = _stage_all(root, "new")
    for p in staged:
        p.seal()
    commit_partitions(root, [(p.path, p.final) for p in staged])
    os._exit(0)


OLD = {a: [f"old-{a}"] for a in AREAS3}
NEW = {a: [f"new-{a}"] for a in AREAS3}


@pytest.mark.parametrize(
    ("stage", "after"),
    [
        ("staged-ingested", OLD),
        ("staged-latent", OLD),
        ("commit-begin", OLD),
        ("commit-journal", NEW),
        ("commit-swap-ingested", NEW),
        ("commit-swap-rejected", NEW),
        ("commit-swap-latent", NEW),
        ("commit-swapped", NEW),
    ],
)
def test_killed_commit_leaves_all_old_or_all_new(tmp_path, stage, after):
    for p in _stage_all(tmp_path, "old"):
        p.commit()
    proc = mp.get_context("fork").Process(
        target=_commit_and_crash, args=(tmp_path, stage)
    )
    proc.start()
    proc.join(30)
    assert proc.exitcode == -9, f"never reached {stage}"
    journal = journal_path(tmp_path, "ds", D)
    if stage == "commit-swap-ingested":
        # Cut short mid-commit: a mix is visible, and marked by the journal.
        assert _date_state(tmp_path)["ingested"] == NEW["ingested"]
        assert _date_state(tmp_path)["latent"] == OLD["latent"]
        assert journal.exists()
    with DatasetLock(tmp_path, "ds"):
        clean_stale_staging(tmp_path, "ds")
    assert _date_state(tmp_path) == after
    assert not journal.exists()
    assert os.listdir(tmp_path / ".staging") == []


def test_commit_without_rename_exchange(tmp_path, monkeypatch):
    """Where the kernel lacks RENAME_EXCHANGE, two renames do the swap."""
    from tasks import storage

    for p in _stage_all(tmp_path, "old"):
        p.commit()
    monkeypatch.setattr(storage, "exchange_dirs", lambda a, b: False)
    staged = _stage_all(tmp_path, "new")
    for p in staged:
        p.seal()
    commit_partitions(tmp_path, [(p.path, p.final) for p in staged])
    assert _date_state(tmp_path) == NEW
    assert os.listdir(tmp_path / ".staging") == []


def test_recovery_finishes_a_half_done_fallback_swap(tmp_path):
    """Killed between the fallback's two renames: no partition at the final
    place, the new one still staged; the next run puts it there."""
    from tasks.storage import _old_path

    for p in _stage_all(tmp_path, "old"):
        p.commit()
    staged = _stage_all(tmp_path, "new")
    for p in staged:
        p.seal()
    moves = [(p.path, p.final) for p in staged]
    entries = []
    for s, f in moves:
        st = os.lstat(s)
        entries.append(
            {
                "area": f.parent.parent.name,
                "staged": s.name,
                "final": str(f.relative_to(tmp_path)),
                "ino": st.st_ino,
                "dev": st.st_dev,
            }
        )
    atomic_write_json(journal_path(tmp_path, "ds", D), {"entries": entries})
    os.rename(moves[0][1], _old_path(moves[0][0]))  # the first rename only
    clean_stale_staging(tmp_path, "ds")
    assert _date_state(tmp_path) == NEW
    assert os.listdir(tmp_path / ".staging") == []


def test_staged_leftovers_without_journal_are_discarded(tmp_path):
    for p in _stage_all(tmp_path, "old"):
        p.commit()
    for p in _stage_all(tmp_path, "new"):
        p.seal()
    clean_stale_staging(tmp_path, "ds")
    assert _date_state(tmp_path) == OLD
    assert os.listdir(tmp_path / ".staging") == []


# ------------------------------------------------------ links in the data dir


def _tree(path):
    return {
        str(p.relative_to(path)): p.read_bytes() if p.is_file() else None
        for p in sorted(path.rglob("*"))
    }


@pytest.fixture
def outside(tmp_path):
    out = tmp_path / "outside"
    (out / "sub").mkdir(parents=True)
    (out / "sentinel.txt").write_text("keep me")
    (out / "sub" / "part-00000.parquet").write_text("not ours")
    return out


LINKS = {
    "area": "latent",
    "dataset": "latent/ds",
    "partition": f"latent/ds/run_date={D}",
    "staging": ".staging",
    "cache": ".cache",
    "locks": ".locks",
    "lock-file": ".locks/ds.lock",
}


@pytest.mark.parametrize("kind", sorted(LINKS))
def test_links_inside_the_data_dir_are_refused(tmp_path, outside, kind):
    data = tmp_path / "data"
    link = data / LINKS[kind]
    link.parent.mkdir(parents=True)
    target = outside / "sentinel.txt" if kind == "lock-file" else outside
    link.symlink_to(target)
    before = _tree(outside)
    with pytest.raises(UnsafePathError, match="symbolic link") as err:
        check_run_paths(data, "ds", D)
    assert str(link) in str(err.value) and "\n" not in str(err.value)
    # Each entry point refuses on its own, too.
    attempts = {
        "lock": lambda: DatasetLock(data, "ds").__enter__(),
        "stage": lambda: StagedPartition(data, "latent", "ds", D).__enter__(),
        "clean": lambda: clean_stale_staging(data, "ds"),
        "scratch": lambda: scratch_dir(data, "ingest-parts", "ds", D),
        "remove": lambda: remove_tree(data, data / ".cache" / "models"),
    }
    refused = set()
    for name, attempt in attempts.items():
        try:
            attempt()
        except UnsafePathError:
            refused.add(name)
    expect = {
        "area": {"stage"},
        "dataset": {"stage"},
        "partition": {"stage"},
        "staging": {"stage", "clean", "scratch"},
        "cache": {"remove"},
        "locks": {"lock"},
        "lock-file": {"lock"},
    }[kind]
    assert expect <= refused
    assert _tree(outside) == before


def test_links_inside_staged_dirs_are_removed_not_followed(tmp_path, outside):
    data = tmp_path / "data"
    leftover = data / ".staging" / f"latent.ds.{D}.abc"
    (leftover / "nested").mkdir(parents=True)
    (leftover / "nested" / "to-outside").symlink_to(outside)
    (leftover / "file-link").symlink_to(outside / "sentinel.txt")
    before = _tree(outside)
    assert clean_stale_staging(data, "ds") == 1
    assert not leftover.exists()
    assert _tree(outside) == before

    staged = StagedPartition(data, "latent", "ds", D).__enter__()
    staged.file("part-00000.parquet").write_text("mine")
    staged.file("part-00001.parquet").symlink_to(outside / "sub" / "part-00000.parquet")
    keep_only(staged, ["part-00000.parquet", "part-00001.parquet"])
    assert sorted(os.listdir(staged.path)) == ["part-00000.parquet"]
    assert _tree(outside) == before
