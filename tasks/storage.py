"""Paths, atomic writes, partition swaps and locks: the only module that knows them.

Layout under a data dir::

    <data_dir>/<area>/<dataset>/run_date=<YYYY-MM-DD>/part-00000.parquet
    <data_dir>/.staging/...      partitions being written (never read by users)
    <data_dir>/.locks/<dataset>.lock

A partition is written whole into ``.staging`` and then swapped into place with
one atomic ``renameat2(RENAME_EXCHANGE)`` where the kernel offers it, so a
reader sees either the old partition or the new one, never a mix.
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
import time
import uuid
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

from tasks.errors import AlreadyRunningError, ConfigError
from tasks.faults import checkpoint

AREAS = ("ingested", "rejected", "latent")
_DATASET_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def dataset_from_path(path: str | os.PathLike[str]) -> str:
    """Derive a dataset name from a file name: lower-cased stem, safe characters."""
    name = Path(path).name.lower()
    for suffix in (".gz", ".csv", ".parquet", ".pq", ".tsv", ".txt"):
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
    return resolve_under(data_dir, area, dataset, f"run_date={run_date.isoformat()}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path; rename it onto ``path`` only on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        yield tmp
        if tmp.is_file():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


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
    return data_dir.resolve() / ".staging"


class StagedPartition:
    """A partition written in ``.staging`` and committed into place as a whole.

    Use as a context manager: files go into :attr:`path`; on a clean exit
    :meth:`commit` must have been called, or the staged files are discarded.
    An exception discards them too, leaving any earlier partition untouched.
    """

    def __init__(self, data_dir: Path, area: str, dataset: str, run_date: date):
        self.final = partition_dir(data_dir, area, dataset, run_date)
        token = uuid.uuid4().hex[:12]
        self.path = staging_root(data_dir) / f"{area}.{dataset}.{run_date}.{token}"
        self._committed = False

    def __enter__(self) -> StagedPartition:
        self.path.mkdir(parents=True, exist_ok=False)
        return self

    def file(self, name: str) -> Path:
        return self.path / name

    def commit(self) -> Path:
        """Swap the staged directory into the final location, atomically."""
        for f in self.path.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(self.path)
        checkpoint(f"commit-{self.final.parent.parent.name}")
        self.final.parent.mkdir(parents=True, exist_ok=True)
        if self.final.exists():
            if not exchange_dirs(self.path, self.final):
                # Fallback: a reader may briefly see no partition, never a mix.
                old = self.path.with_name(self.path.name + ".old")
                os.rename(self.final, old)
                os.rename(self.path, self.final)
                self.path = old
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            os.rename(self.path, self.final)
        _fsync_dir(self.final.parent)
        self._committed = True
        return self.final

    def __exit__(self, *exc: object) -> None:
        if self.path.exists() and (not self._committed or self.path != self.final):
            shutil.rmtree(self.path, ignore_errors=True)


def clean_stale_staging(data_dir: Path, dataset: str) -> int:
    """Remove staging leftovers of ``dataset`` from killed runs; call under the lock."""
    root = staging_root(data_dir)
    if not root.is_dir():
        return 0
    removed = 0
    for p in root.iterdir():
        parts = p.name.split(".")
        if len(parts) >= 2 and parts[1] == dataset:
            shutil.rmtree(p, ignore_errors=True)
            removed += 1
    return removed


class DatasetLock:
    """An exclusive per-dataset lock in the data dir.

    Built on ``flock``: the kernel drops it when the holding process dies, so a
    lock left by a killed run is stale by construction and is simply taken over.
    """

    def __init__(self, data_dir: Path, dataset: str, wait_seconds: float = 0.0):
        self.path = resolve_under(data_dir, ".locks", f"{dataset}.lock")
        self.dataset = dataset
        self.wait_seconds = wait_seconds
        self._fd: int | None = None

    def __enter__(self) -> DatasetLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
