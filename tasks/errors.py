"""The one exception family meant for users.

A :class:`LatentflowError` carries a one-line message naming the file, column or
row and what was expected. The CLI prints it without a traceback; any other
exception is a bug and may show one.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path

# Defined in models/ (the typed schema raises SchemaError); the family is here.
from models.errors import LatentflowError as LatentflowError
from models.errors import SchemaError as SchemaError


class InputError(LatentflowError):
    """The input file or its contents are not what was expected."""


class EmptyInputError(InputError):
    """An input file holds no data rows (a header, or nothing after blank lines).

    Its own type because the partitioned ingest treats such a file as a
    warning, not an error, when the source has several files.
    """


class MissingDropError(InputError):
    """The run date's drop of a date-templated input is not there.

    Its own type: a backfill records the night as missing (and alerts) instead
    of stopping, and the nightly flow sends the missing-drop alert.
    """

    def __init__(self, message: str, expected: str = "") -> None:
        super().__init__(message)
        self.expected = expected


class ConfigError(LatentflowError):
    """The run configuration is invalid."""


class RegistryError(LatentflowError):
    """The model registry could not be reached or refused a request."""


class AlreadyRunningError(LatentflowError):
    """Another run holds the lock for this dataset and run date."""


class TamperError(RegistryError):
    """A model's files do not match the checksums recorded at registration."""


class EnvironmentFault(LatentflowError):
    """The machine refused the run: disk full, read-only or forbidden path, a
    locked or corrupt database. Not a bug, and not fixed by changing the input."""


# OSError numbers that mean "the environment refused", with what to tell a user.
# Anything else (ENOENT of our own temp file, EBADF...) may be a bug: it keeps
# its traceback.
_ERRNO_TEXT: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free some space and rerun"),
    errno.EDQUOT: ("disk quota exceeded", "free some space or raise the quota"),
    errno.EFBIG: ("file too large for this file system or size limit", "raise it"),
    errno.EROFS: ("read-only file system", "use a writable data dir"),
    errno.EACCES: ("permission denied", "fix the permissions"),
    errno.EPERM: ("operation not permitted", "fix the permissions"),
    errno.ENOTDIR: ("not a directory", "a part of the path is a regular file"),
    errno.EISDIR: ("is a directory", "expected a file there"),
    errno.EIO: ("I/O error", "check the device"),
    errno.ENAMETOOLONG: ("file name too long", "use a shorter data dir"),
    errno.ELOOP: ("too many levels of symbolic links", "fix the links"),
}

# SQLite primary result codes (the low byte of an extended code).
_SQLITE_TEXT: dict[int, str] = {
    3: "cannot be accessed (SQLITE_PERM): fix its permissions",
    5: "is locked by another process (SQLITE_BUSY): retry later",
    6: "is locked (SQLITE_LOCKED): retry later",
    8: "is read-only (SQLITE_READONLY): make it and its directory writable",
    10: "cannot be read or written (SQLITE_IOERR): check the disk",
    11: "is corrupt (SQLITE_CORRUPT): restore it from a backup or move it away",
    13: "cannot grow: the disk is full (SQLITE_FULL): free some space and rerun",
    14: "cannot be opened (SQLITE_CANTOPEN): check the path and its permissions",
    26: "is not a SQLite database (SQLITE_NOTADB): it is corrupt; restore it from"
    " a backup or move it away",
}
SQLITE_BUSY_CODES = frozenset({5, 6})


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and everything it was raised from or during, outermost first.

    Follows ``__cause__``, ``__context__`` and SQLAlchemy's ``orig`` (the DB-API
    error it wraps), each exception once.
    """
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        for nxt in (getattr(e, "orig", None), e.__cause__, e.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def sqlite_code(exc: BaseException) -> int | None:
    """The primary SQLite result code of the first sqlite3 error in the chain."""
    for e in exception_chain(exc):
        if isinstance(e, sqlite3.Error):
            code = getattr(e, "sqlite_errorcode", None)
            if isinstance(code, int):
                return code & 0xFF
    return None


def describe_fault(
    exc: BaseException, *, where: str | None = None, database: str | None = None
) -> LatentflowError | None:
    """The one-line error for an environmental fault in ``exc``'s chain, or None.

    ``where`` names the directory an OSError without a file name happened
    under (pyarrow's write errors carry none); ``database`` names the
    database a SQLite error came from ("MLflow store /data/mlflow.db").
    Decided on types and error codes only, never on message wording.
    """
    for e in exception_chain(exc):
        if isinstance(e, LatentflowError):
            return e
        if isinstance(e, OSError) and e.errno in _ERRNO_TEXT:
            what, hint = _ERRNO_TEXT[e.errno]
            if e.filename is None:
                place = f"under {where}" if where else "(path not reported)"
            else:
                name = e.filename
                place = (
                    os.fsdecode(name)
                    if isinstance(name, (str, bytes, os.PathLike))
                    else str(name)
                )
                if isinstance(e.filename2, (str, bytes, os.PathLike)):
                    place += f" -> {os.fsdecode(e.filename2)}"
            name = errno.errorcode.get(e.errno, str(e.errno))
            return EnvironmentFault(f"{what} ({name}): {place}; {hint}")
        if isinstance(e, FileExistsError) and e.filename is not None:
            path = Path(os.fsdecode(e.filename))
            if path.exists() and not path.is_dir():
                return EnvironmentFault(
                    f"{path} exists and is not a directory; expected a directory there"
                )
        fault = _api_fault(e) or _device_fault(e)
        if fault is not None:
            return fault
    code = sqlite_code(exc)
    if code in _SQLITE_TEXT:
        return EnvironmentFault(
            f"{database or 'a SQLite database'} {_SQLITE_TEXT[code]}"
        )
    return None


def _api_fault(e: BaseException) -> EnvironmentFault | None:
    """Prefect's client speaks httpx, and nothing else here does: a transport
    error (refused, reset, timed out) is its API server not answering.

    Looked up in ``sys.modules``: if httpx was never imported, ``e`` is not one
    of its errors, and the check costs no import.
    """
    httpx = sys.modules.get("httpx")
    if httpx is None or not isinstance(e, httpx.TransportError):
        return None
    try:
        url = e.request.url
        server = f"the Prefect API at {url.scheme}://{url.netloc.decode()}"
    except (AttributeError, RuntimeError):  # an error raised without a request
        server = "the Prefect API"
    return EnvironmentFault(
        f"{server} did not answer ({type(e).__name__}): check that its server"
        " is running, or unset PREFECT_API_URL to run on a temporary one"
    )


def _device_fault(e: BaseException) -> EnvironmentFault | None:
    """The GPU ran out of memory (another job holds it, or the batches are too
    large for it): the machine's state, not a bug, and not the data's fault.

    Looked up in ``sys.modules`` like :func:`_api_fault`: no torch import.
    """
    torch = sys.modules.get("torch")
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is None or not isinstance(e, oom):
        return None
    return EnvironmentFault(
        "the GPU ran out of memory (torch.cuda.OutOfMemoryError): free it (see"
        " nvidia-smi), lower batch_size or score_batch_rows, or run with"
        " --device cpu"
    )


class UnsafePathError(ConfigError):
    """A path the run would write, rename or delete leaves the data dir.

    Raised for a symbolic link inside the data dir on such a path: a run never
    follows one out of the data dir, nor deletes through one.
    """
