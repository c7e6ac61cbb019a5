"""The input formats ingest reads: one line per format.

Pure data, free of pyarrow and Prefect: :mod:`tasks.sources` (which the CLI
uses before any engine starts) takes the data-file suffixes from here, and
:func:`tasks.ingest.sources.open_source` picks a file's reader with
:func:`format_of`. Adding a format is one reader module under
``tasks/ingest/sources/`` (implementing :class:`tasks.ingest.sources.Source`)
plus its line in :data:`FORMATS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Format:
    """How to recognise one input format, and which class reads it."""

    name: str
    #: File-name endings (lower case) that mean this format.
    suffixes: tuple[str, ...]
    #: Leading bytes that mean this format whatever the file's name, if any.
    magic: bytes | None
    #: ``"module:Class"`` of the reader, imported on first use.
    reader: str


#: Every format. A file's format is the one whose magic bytes it starts with,
#: else the one its name ends with, else CSV (the first line), as it always was.
# fmt: off
FORMATS: tuple[Format, ...] = (
    Format("csv", (".csv", ".csv.gz"), None, "tasks.ingest.sources.csv:CsvSource"),
    Format("parquet", (".parquet",), b"PAR1", "tasks.ingest.sources.parquet:ParquetSource"),  # noqa: E501
    Format("jsonl", (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz"), None, "tasks.ingest.sources.jsonl:JsonLinesSource"),  # noqa: E501
)
# fmt: on

#: The fallback for a file no magic or suffix identifies.
DEFAULT_FORMAT = FORMATS[0]

#: Suffixes of the files a directory or glob input picks up.
DATA_SUFFIXES: tuple[str, ...] = tuple(s for f in FORMATS for s in f.suffixes)


def format_of(path: Path, head: bytes) -> Format:
    """The format of the file at ``path`` whose first bytes are ``head``."""
    for fmt in FORMATS:
        if fmt.magic is not None and head.startswith(fmt.magic):
            return fmt
    name = path.name.lower()
    for fmt in FORMATS:
        if name.endswith(fmt.suffixes):
            return fmt
    return DEFAULT_FORMAT


def describe_formats() -> str:
    """The suffixes, as error messages list them: ``*.csv, *.csv.gz or ...``."""
    globs = [f"*{s}" for s in DATA_SUFFIXES]
    return ", ".join(globs[:-1]) + f" or {globs[-1]}"
