"""What an ``input`` names: a file, a directory of data files, or a glob.

Kept free of Prefect, pyarrow and torch: the CLI checks the input with it
before any engine starts, so a mistyped path fails in well under a second and
writes nothing; the ingest resolves the same input with the same function.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

from tasks.errors import InputError
from tasks.ingest.formats import DATA_SUFFIXES, describe_formats


def is_data_file(path: Path) -> bool:
    return path.name.lower().endswith(DATA_SUFFIXES)


def resolve_sources(source: str | Path) -> list[Path]:
    """The data files ``source`` names: a file, a directory of them, or a glob."""
    text = str(source)
    path = Path(text)
    if path.is_dir():
        try:
            entries = list(path.iterdir())
        except OSError as exc:
            raise InputError(
                f"cannot list input directory {path}: {exc.strerror or exc}"
            ) from None
        files = sorted(p for p in entries if p.is_file() and is_data_file(p))
        if not files:
            raise InputError(
                f"directory {path} has no data files: expected {describe_formats()}"
            )
        return files
    if path.exists():
        if not path.is_file():
            raise InputError(f"input {path} is not a regular file")
        return [path]
    if glob.has_magic(text):
        matches = sorted(Path(p) for p in glob.glob(text))
        files = [p for p in matches if p.is_file() and is_data_file(p)]
        if not files:
            raise InputError(
                f"no data files match {text!r}: expected {describe_formats()}"
            )
        return files
    raise InputError(f"input file {path} does not exist")


def check_sources(source: str | Path) -> list[Path]:
    """Resolve ``source`` and open each file once: a user's mistake, found early."""
    files = resolve_sources(source)
    for path in files:
        try:
            os.close(os.open(path, os.O_RDONLY))
        except PermissionError:
            raise InputError(f"cannot read {path}: permission denied") from None
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    return files
