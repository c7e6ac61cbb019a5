"""Paths, atomic writes, partition swaps and locks: the only module that knows them.

Layout under a data dir::

    <data_dir>/<area>/<dataset>/run_date=<YYYY-MM-DD>/part-00000.parquet
    <data_dir>/.staging/...      partitions being written (never read by users)
    <data_dir>/.staging/commit.<dataset>.<date>.json   a commit in progress
    <data_dir>/.locks/<dataset>.lock

A partition is written whole into ``.staging`` and then swapped into place with
one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, so a
reader sees either the old partition or the new one, never a mix.

A run date's partitions (ingested, rejected, latent) are published together by
:func:`commit_partitions`: a journal naming every swap is written first, so a
commit cut short by a crash is finished (rolled forward) by the next run's
:func:`clean_stale_staging`; staged partitions without a journal are discarded.

Every path a run writes, renames or deletes under the data dir goes through
:func:`check_path`: no component below the data dir may be a symbolic link,
so a run never follows a link out of the data dir, nor deletes through one.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import json
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

# The one atomic write (in models/, which the saved model also uses); this
# module owns everything else about temporary names, swaps and locks.
from models.atomic import atomic_path as atomic_path
from models.atomic import atomic_write_bytes as atomic_write_bytes
from models.atomic import fsync_dir as _fsync_dir
from tasks.errors import AlreadyRunningError, ConfigError, UnsafePathError
from tasks.faults import checkpoint

AREAS = ("ingested", "rejected", "latent", "metrics")
_DATASET_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def dataset_from_path(path: str | os.PathLike[str]) -> str:
    """Derive a dataset name from a file name: lower-cased stem, safe characters."""
    name = Path(path).name.lower()
    for suffix in (
        ".gz",
        ".csv",
        ".parquet",
        ".pq",
        ".tsv",
        ".txt",
        ".jsonl",
        ".ndjson",
    ):
        name = name.removesuffix(suffix)
    name = re.sub(r"[^a-z0-9_-]+", "-", name).strip("-_") or "dataset"
    return name[:64]


def validate_dataset_name(name: str) -> str:
    """Refuse names that could escape the data dir or break partition paths."""
    if not _DATASET_RE.match(name or ""):
        raise ConfigError(
            f"dataset name {name!r} is invalid: expected 1-64 characters of a-z, 0-9,"
            " '-' or '_', starting with a letter or digit"
        )
    return name


def resolve_under(base: Path, *parts: str) -> Path:
    """Join ``parts`` under ``base`` and refuse a result outside ``base``."""
    base = base.resolve()
    target = base.joinpath(*parts).resolve()
    if target != base and base not in target.parents:
        raise ConfigError(f"path {target} escapes the data dir {base}")
    return target


def partition_dir(data_dir: Path, area: str, dataset: str, run_date: date) -> Path:
    """The final location of one run date's partition in ``area``."""
    if area not in AREAS:
        raise ValueError(f"unknown area {area!r}")
    validate_dataset_name(dataset)
    base = Path(data_dir).resolve()
    return check_path(base, base / area / dataset / f"run_date={run_date.isoformat()}")


# ------------------------------------------------------------------ symlinks


def check_path(data_dir: Path, path: Path) -> Path:
    """Refuse a path to write, rename or delete that could leave the data dir.

    ``path`` must lie under ``data_dir`` (the data dir itself may be a link:
    its target is the root), and no existing component below the data dir may
    be a symbolic link, wherever it points: following one could write outside
    the data dir, and deleting through one deletes what it points at.
    Components that do not exist yet are created by the run as plain
    directories. Returns ``path`` made absolute (not resolved).

    Raises
    ------
    UnsafePathError
        One line naming the offending path.
    """
    base = Path(data_dir).resolve()
    target = Path(os.path.abspath(path))
    rel = None
    for root in (base, Path(os.path.abspath(data_dir))):
        with contextlib.suppress(ValueError):
            rel = target.relative_to(root)
            break
    if rel is None or ".." in rel.parts:
        raise UnsafePathError(f"path {target} lies outside the data dir {base}")
    current = base
    for part in rel.parts:
        current = current / part
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            break  # the rest is created by the run, as plain directories
        except NotADirectoryError:
            break  # the OS reports it when the run uses the path
        if stat.S_ISLNK(st.st_mode):
            raise UnsafePathError(
                f"{current} is a symbolic link (to {os.readlink(current)}); runs never"
                f" follow or delete through links inside the data dir {base}:"
                " replace the link with the real directory or file"
            )
    return base / rel


def check_tree(data_dir: Path, path: Path) -> Path:
    """:func:`check_path` for ``path`` and everything under it (small trees)."""
    target = check_path(data_dir, path)
    if target.is_dir():
        for root, dirs, files in os.walk(target, followlinks=False):
            for name in dirs + files:
                check_path(data_dir, Path(root) / name)
    return target


def check_run_paths(data_dir: Path, dataset: str, run_date: date) -> None:
    """Check, before a run writes anything, every place under the data dir it
    will write, rename or delete (:func:`check_path`).

    That is the staging area, the lock, the model cache (every file: cached
    bundles are replaced whole), the registry's store and artifact folder, and
    the run date's three partitions. Each write entry point checks its own
    path again; this makes a bad link fail the run before any work.
    """
    base = Path(data_dir).resolve()
    for area in AREAS:
        partition_dir(base, area, dataset, run_date)
    for name in (".staging", ".locks", "mlflow.db", "mlartifacts"):
        check_path(base, base / name)
    check_path(base, base / ".locks" / f"{dataset}.lock")
    check_path(base, base / "mlartifacts" / dataset)
    check_tree(base, base / ".cache")


def remove_tree(data_dir: Path, path: Path) -> None:
    """Delete ``path`` (a directory or file) under ``data_dir``, never through a link.

    Its parents are checked first (:func:`check_path`); a link at ``path`` is
    removed itself, and below it ``shutil.rmtree`` too removes links, never
    what they point at (its fd-based walk, ``rmtree.avoids_symlink_attacks``,
    is what Linux gets).
    """
    target = Path(os.path.abspath(path))
    check_path(data_dir, target.parent)
    try:
        st = os.lstat(target)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(target)
    else:
        target.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    atomic_write_bytes(
        path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
    )


@functools.cache
def _libc_renameat2() -> Any | None:
    libname = ctypes.util.find_library("c")
    if not libname:
        return None
    try:
        fn = ctypes.CDLL(libname, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    fn.restype = ctypes.c_int
    return fn


def exchange_dirs(a: Path, b: Path) -> bool:
    """Atomically swap two existing directories; False where the OS cannot."""
    fn = _libc_renameat2()
    if fn is None:
        return False
    rc = fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def staging_root(data_dir: Path) -> Path:
    """``<data_dir>/.staging``, checked: it must not be a link (:func:`check_path`)."""
    base = Path(data_dir).resolve()
    return check_path(base, base / ".staging")


class StagedPartition:
    """A partition written in ``.staging`` and committed into place as a whole.

    Use as a context manager: files go into :attr:`path`. On a clean exit
    :meth:`commit` (publish now, alone) or :meth:`seal` (publish later, with
    the run date's other partitions, through :func:`commit_partitions`) must
    have been called, or the staged files are discarded. An exception
    discards them too, leaving any earlier partition untouched.
    """

    def __init__(self, data_dir: Path, area: str, dataset: str, run_date: date):
        self.data_dir = Path(data_dir).resolve()
        self.area = area
        self.final = partition_dir(data_dir, area, dataset, run_date)
        token = uuid.uuid4().hex[:12]
        self.path = staging_root(data_dir) / f"{area}.{dataset}.{run_date}.{token}"
        self._committed = False
        self._sealed = False

    def __enter__(self) -> StagedPartition:
        check_path(self.data_dir, self.path)
        self.path.mkdir(parents=True, exist_ok=False)
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def seal(self) -> Path:
        """Make the staged files durable and keep them for a later commit.

        The caller then owns :attr:`path`: it passes it to
        :func:`commit_partitions`, or discards it (:func:`discard_paths`); a
        killed run's sealed partitions are removed by the next run.
        """
        for f in self.path.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(self.path)
        checkpoint(f"staged-{self.area}")
        self._sealed = True
        return self.path

    def commit(self) -> Path:
        """Swap the staged directory into the final location, atomically."""
        self.seal()
        commit_partitions(self.data_dir, [(self.path, self.final)])
        self.path = self.final
        self._committed = True
        return self.final

    def __exit__(self, *exc: object) -> None:
        if self._committed or self._sealed:
            return
        with contextlib.suppress(FileNotFoundError):
            remove_tree(self.data_dir, self.path)


# ------------------------------------------------------------------ commits
#
# A run date's outputs live in three directories (ingested/, rejected/,
# latent/), which no single rename can swap. So a commit is: (1) a journal in
# .staging naming each staged directory, its final place and its inode, written
# atomically; (2) one swap per directory; (3) the old directories deleted and
# the journal removed. A crash before (1) leaves the old outputs (the staged
# ones are discarded by the next run); a crash after it is rolled forward by the
# next run: a swap is done when the final place holds the staged inode.

_JOURNAL_PREFIX = "commit."


def journal_path(data_dir: Path, dataset: str, run_date: date | str) -> Path:
    """``.staging/commit.<dataset>.<date>.json``: exists while a commit is open."""
    return staging_root(data_dir) / f"{_JOURNAL_PREFIX}{dataset}.{run_date}.json"


def _old_path(staged: Path) -> Path:
    return staged.with_name(staged.name + ".old")


def _swap_in(staged: Path, final: Path) -> None:
    """Put ``staged`` at ``final``; the old ``final`` (if any) ends in .staging."""
    if os.path.lexists(final):
        if not exchange_dirs(staged, final):
            # Fallback: a reader may briefly see no partition, never a mix.
            os.rename(final, _old_path(staged))
            os.rename(staged, final)
    else:
        os.rename(staged, final)
    _fsync_dir(final.parent)


def commit_partitions(data_dir: Path, moves: list[tuple[Path, Path]]) -> list[Path]:
    """Publish staged directories together: all of them, or (after a crash and
    the next run's recovery) all of them still, never some.

    Parameters
    ----------
    data_dir
        The data dir all paths lie in.
    moves
        ``(staged, final)`` pairs: sealed directories under ``.staging`` and
        the partition directories they replace (or create). All finals must
        be partitions of one dataset and run date.

    Returns
    -------
    list of Path
        The final directories, in order.
    """
    base = Path(data_dir).resolve()
    root = staging_root(base)
    finals = [check_path(base, f) for _, f in moves]
    staged = [check_path(base, s) for s, _ in moves]
    if not moves:
        return []
    dataset, run_date = finals[0].parent.name, finals[0].name.removeprefix("run_date=")
    entries = []
    for s, f in zip(staged, finals, strict=True):
        if s.parent != root:
            raise ValueError(f"{s} is not a staged directory in {root}")
        f.parent.mkdir(parents=True, exist_ok=True)
        st = os.lstat(s)
        entries.append(
            {
                "area": f.parent.parent.name,
                "staged": s.name,
                "final": f.relative_to(base).as_posix(),
                "ino": st.st_ino,
                "dev": st.st_dev,
            }
        )
    checkpoint("commit-begin")
    journal = journal_path(base, dataset, run_date)
    atomic_write_json(journal, {"version": 1, "entries": entries})
    checkpoint("commit-journal")
    _replay(base, journal, entries)
    return finals


def _replay(base: Path, journal: Path, entries: list[dict[str, Any]]) -> list[str]:
    """Do (or finish) a journal's swaps, then drop the old directories and it.

    Idempotent: an entry whose final directory already holds the staged inode
    was swapped before. Returns the areas whose swap could not be done (their
    staged directory is gone: nothing to roll forward to).
    """
    root = staging_root(base)
    missing = []
    for e in entries:
        staged = check_path(base, root / e["staged"])
        final = check_path(base, base / e["final"])
        done = False
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(final)
            done = (st.st_ino, st.st_dev) == (e["ino"], e["dev"])
        if not done:
            try:
                st = os.lstat(staged)
            except FileNotFoundError:
                missing.append(e["area"])
                continue
            if (st.st_ino, st.st_dev) != (e["ino"], e["dev"]):
                missing.append(e["area"])
                continue
            final.parent.mkdir(parents=True, exist_ok=True)
            _swap_in(staged, final)
        checkpoint(f"commit-swap-{e['area']}")
    _fsync_dir(root)
    checkpoint("commit-swapped")
    for e in entries:
        # After the swaps, these hold the replaced partitions (or nothing).
        for leftover in (root / e["staged"], _old_path(root / e["staged"])):
            with contextlib.suppress(FileNotFoundError):
                remove_tree(base, leftover)
    journal.unlink()
    _fsync_dir(root)
    return missing


def recover_commits(data_dir: Path, dataset: str) -> list[str]:
    """Finish the commits of ``dataset`` that a crash cut short; call under the lock.

    Returns the run dates rolled forward.
    """
    root = staging_root(data_dir)
    if not root.is_dir():
        return []
    done = []
    for journal in sorted(root.glob(f"{_JOURNAL_PREFIX}{dataset}.*.json")):
        check_path(data_dir, journal)
        entries = json.loads(journal.read_text())["entries"]
        _replay(Path(data_dir).resolve(), journal, entries)
        done.append(journal.name.split(".")[2])
    return done


def discard_paths(data_dir: Path, paths: list[Path]) -> None:
    """Remove staged directories that will not be committed (gone is fine)."""
    for path in paths:
        remove_tree(data_dir, path)


def clean_stale_staging(data_dir: Path, dataset: str) -> int:
    """Finish interrupted commits of ``dataset``, then remove its staging
    leftovers from killed runs; call under the lock.

    Returns the number of leftovers removed.
    """
    recover_commits(data_dir, dataset)
    root = staging_root(data_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for p in root.iterdir():
        # ".name.tmp-..." is an atomic write's temporary file.
        parts = p.name.lstrip(".").split(".")
        if len(parts) >= 2 and parts[1] == dataset:
            remove_tree(data_dir, p)
            removed += 1
    return removed


class DatasetLock:
    """An exclusive per-dataset lock in the data dir.

    Built on ``flock``: the kernel drops it when the holding process dies, so a
    lock left by a killed run is stale by construction and is simply taken over.
    """

    def __init__(self, data_dir: Path, dataset: str, wait_seconds: float = 0.0):
        base = Path(data_dir).resolve()
        self.path = check_path(base, base / ".locks" / f"{dataset}.lock")
        self.data_dir = base
        self.dataset = dataset
        self.wait_seconds = wait_seconds
        self._fd: int | None = None

    def __enter__(self) -> DatasetLock:
        check_path(self.data_dir, self.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_NOFOLLOW: a link created since the check is refused, not truncated.
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                raise
            raise UnsafePathError(
                f"{self.path} is a symbolic link; runs never follow links inside"
                f" the data dir {self.data_dir}"
            ) from None
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = self._holder(fd)
                    os.close(fd)
                    raise AlreadyRunningError(
                        f"dataset {self.dataset!r} is already running"
                        f" ({holder}; lock {self.path}); try again when it finishes"
                    ) from None
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid={os.getpid()} since={time.strftime('%FT%T')}\n".encode())
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, 200).decode(errors="replace").strip() or "unknown holder"
        except OSError:
            return "unknown holder"

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def source_umask_bits(sources: list[Path]) -> int:
    """The umask bits that keep outputs no wider than the narrowest source.

    Group and other bits follow the sources' read/write bits (and execute
    where reading is allowed, so directories stay usable); the owner keeps
    read, write and execute, since the run must write and replace its files.
    """
    allowed = 0o666
    for path in sources:
        # A file gone since it was listed fails the run in ingest, by name.
        with contextlib.suppress(FileNotFoundError):
            allowed &= os.stat(path).st_mode
    allowed |= (allowed & 0o444) >> 2  # x beside r: what directories need
    return 0o077 & ~allowed


@contextlib.contextmanager
def narrowed_umask(sources: list[Path]) -> Iterator[int]:
    """Narrow the process umask to the sources' modes for a run, then restore it.

    Every file and directory the run creates (Parquet parts, staged partitions,
    model artifacts, locks) gets these bits removed, whichever library opens it;
    child processes started meanwhile (a local Dask cluster) inherit it.
    """
    bits = source_umask_bits(sources)
    # Never wider for a moment: 0o077 first, then the old mask plus the bits.
    old = os.umask(0o077)
    os.umask(old | bits)
    try:
        yield old | bits
    finally:
        os.umask(old)
