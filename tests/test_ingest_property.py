"""Property tests: malformed CSV bytes never crash ingest with a foreign error."""

from __future__ import annotations

import dataclasses
import gzip
import random
import tempfile
from datetime import date, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tasks.ingest.sources.csv as csv_mod
from tasks.errors import LatentflowError
from tasks.ingest import ingest

RUN = date(2024, 1, 1)

CELLS = st.one_of(
    st.sampled_from(
        [
            "",
            "NA",
            "nan",
            "N/A",
            "-",
            "?",
            "None",
            "1",
            "2.5",
            " 7 ",
            "-3e2",
            "1e308",
            "1e999",
            "inf",
            "abc",
            "1,2",
            '"q"',
            '"',
            'x"y',
            '""',
            "2020-01-01",
            "2020-02-30",
            "2020-1-1",
            "\t",
            "é",
            "Montréal",
            "a\nb",
            "\x00",
            "\r",
        ]
    ),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.text(max_size=6),
)
NAMES = st.text(alphabet="abcdefgh_ ;", min_size=0, max_size=4)


@st.composite
def csv_bytes(draw: st.DrawFn) -> tuple[bytes, str]:
    """A CSV-ish file: a header, rows of any width, junk, quotes, encodings."""
    header = draw(st.lists(NAMES, min_size=1, max_size=5))
    width = len(header)
    lines = [",".join(header)]
    for _ in range(draw(st.integers(0, 25))):
        kind = draw(st.sampled_from(["good", "good", "good", "cells", "bytes"]))
        if kind == "good":
            i = draw(st.integers(0, 50))
            vals = [str(date(2020, 1, 1) + timedelta(days=i)), f"{i / 7:.3f}", "x"]
            lines.append(",".join((vals * 2)[:width]))
        elif kind == "cells":
            cells = draw(st.lists(CELLS, min_size=0, max_size=width + 2))
            if draw(st.booleans()):
                cells = [f'"{c}"' for c in cells]
            lines.append(",".join(cells))
        else:
            lines.append(draw(st.binary(max_size=20)).decode("latin-1"))
    newline = draw(st.sampled_from(["\n", "\r\n"]))
    text = newline.join(lines) + draw(st.sampled_from(["", newline]))
    encoding = draw(
        st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16", "gzip", "raw"])
    )
    if encoding == "raw":
        return draw(st.binary(max_size=400)), ".csv"
    if encoding == "gzip":
        data = gzip.compress(text.encode("utf-8", "replace"))
        if draw(st.booleans()):
            data = data[: draw(st.integers(0, len(data)))]
        return data, ".csv.gz"
    return text.encode(encoding, "replace"), ".csv"


def _check(data: bytes, suffix: str, **kw: object) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{suffix}"
        src.write_bytes(data)
        try:
            res = ingest(src, Path(tmp) / "data", "ds", RUN, **kw)  # type: ignore[arg-type]
        except LatentflowError as exc:
            msg = str(exc)
            assert msg and "\n" not in msg and "\r" not in msg, msg
            assert not (Path(tmp) / "data" / "ingested").exists()
            return
        assert res.rows_accepted + res.rows_rejected == res.rows_in
        ok = pq.read_table(Path(res.ingested_dir) / "part-00000.parquet")
        bad = pq.read_table(Path(res.rejected_dir) / "part-00000.parquet")
        assert ok.num_rows == res.rows_accepted
        assert bad.num_rows == res.rows_rejected
        ids = ok.column("_row_id").to_pylist()
        assert len(set(ids)) == len(ids)
        assert ok.column_names[0] == "_row_id"


# pyarrow swallows an exception in a row handler and prints it: fail on that too.
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    file=csv_bytes(),
    block_size=st.integers(1, 400),
    max_reject_fraction=st.sampled_from([0.0, 0.5, 1.0]),
    keys=st.sampled_from([None, []]),
)
def test_malformed_csv_never_crashes(
    file: tuple[bytes, str],
    block_size: int,
    max_reject_fraction: float,
    keys: list[str] | None,
) -> None:
    data, suffix = file
    _check(
        data,
        suffix,
        block_size=block_size,
        max_reject_fraction=max_reject_fraction,
        keys=keys,
    )


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    seed=st.integers(0, 2**32 - 1),
    block_size=st.integers(1, 2000),
)
def test_row_ids_do_not_depend_on_order_or_blocks(
    n: int, seed: int, block_size: int
) -> None:
    rows = [
        f"{date(2020, 1, 1) + timedelta(days=i // 2)},{'AB'[i % 2]},{i * 1.5}\n"
        for i in range(n)
    ]
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    with tempfile.TemporaryDirectory() as tmp:
        ids = []
        for k, body in enumerate((rows, shuffled)):
            src = Path(tmp) / f"{k}.csv"
            src.write_text("Date,Location,Value\n" + "".join(body))
            res = ingest(
                src,
                Path(tmp) / "data",
                "ds",
                RUN,
                keys=["Date", "Location"],
                block_size=block_size if k else 1 << 20,
            )
            table = pq.read_table(Path(res.ingested_dir) / "part-00000.parquet")
            ids.append(
                dict(
                    zip(
                        table.column("Value").to_pylist(),
                        table.column("_row_id").to_pylist(),
                        strict=True,
                    )
                )
            )
        assert ids[0] == ids[1]
        assert len(set(ids[0].values())) == n


def _outcome(src: Path, out: Path, **kw: object) -> tuple:
    """What ingest did: the error, or every output table and count."""
    try:
        res = ingest(src, out, "ds", RUN, **kw)  # type: ignore[arg-type]
    except LatentflowError as exc:
        return (type(exc).__name__, str(exc))
    tables = [
        pq.read_table(Path(d) / "part-00000.parquet")
        for d in (res.ingested_dir, res.rejected_dir)
    ]
    facts = {k: v for k, v in res.to_dict().items() if not k.endswith("_dir")}
    return (facts, *tables)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(file=csv_bytes(), block_size=st.integers(1, 400))
def test_threaded_read_gives_what_the_serial_read_gives(
    file: tuple[bytes, str], block_size: int
) -> None:
    """Reading with pyarrow's threads (and restarting serially on a parse error)
    is invisible: same tables, counts, warnings and error messages."""
    data, suffix = file
    init = csv_mod.CsvSource.__init__

    def serial_init(self, path, fh, size, hints) -> None:  # type: ignore[no-untyped-def]
        init(self, path, fh, size, dataclasses.replace(hints, serial=True))

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / f"in{suffix}"
        src.write_bytes(data)
        kw = {"block_size": block_size, "max_reject_fraction": 1.0}
        threaded = _outcome(src, Path(tmp) / "a", **kw)
        csv_mod.CsvSource.__init__ = serial_init  # type: ignore[method-assign]
        try:
            serial = _outcome(src, Path(tmp) / "b", **kw)
        finally:
            csv_mod.CsvSource.__init__ = init  # type: ignore[method-assign]
    if isinstance(threaded[0], str) or isinstance(serial[0], str):
        assert threaded == serial  # the same error, word for word
        return
    assert threaded[0] == serial[0]
    for a, b in zip(threaded[1:], serial[1:], strict=True):
        assert a.equals(b, check_metadata=False)
