"""Ingestion: bad inputs give one-line errors and no output; good ones stream through.

Files are tiny and ``block_size`` is small, so every test streams across blocks.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import random
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.ingest.run as run_mod
import tasks.ingest.sources as sources_mod
import tasks.ingest.sources.csv as csv_mod
from tasks.errors import ConfigError, InputError, LatentflowError, SchemaError
from tasks.ingest import (
    WEATHERAUS_RULES,
    ColumnSpec,
    IngestResult,
    TableSchema,
    ingest,
)
from tasks.validate import compile_rules, parse_rule

RUN = date(2024, 1, 1)
HEADER = "Date,Location,MinTemp,MaxTemp,Rainfall,RainToday\n"


def rows(n: int, start: int = 0) -> str:
    """``n`` weather-like CSV lines; row i is unique by (Date, Location)."""
    out = []
    for i in range(start, start + n):
        loc = ("Albury", "Sydney", "Perth")[i % 3]
        day = date(2020, 1, 1) + timedelta(days=i // 3)
        rain = (i * 7) % 5 * 0.6
        out.append(
            f"{day},{loc},{10 + i % 7}.5,{20 + i % 9}.1,{rain:.1f},"
            f"{'Yes' if rain > 1 else 'No'}\n"
        )
    return "".join(out)


GOOD = HEADER + rows(30)
SCHEMA = TableSchema(
    (
        ColumnSpec("Date", "date", "key"),
        ColumnSpec("Location", "categorical", "key"),
        ColumnSpec("MinTemp", "numeric", "feature"),
        ColumnSpec("MaxTemp", "numeric", "feature"),
        ColumnSpec("Rainfall", "numeric", "feature"),
        ColumnSpec("RainToday", "categorical", "feature"),
    )
).to_dict()


def put(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def run(src: str | Path, tmp_path: Path, run_date: date = RUN, **kw) -> IngestResult:
    kw.setdefault("block_size", 64)
    return ingest(src, tmp_path / "data", "ds", run_date, **kw)


def part(result: IngestResult, area: str = "ingested") -> pa.Table:
    d = result.ingested_dir if area == "ingested" else result.rejected_dir
    return pq.read_table(Path(d) / "part-00000.parquet")


def fails(exc_type: type[LatentflowError], src, tmp_path: Path, **kw) -> str:
    """Run, expect ``exc_type`` with a one-line message, and no partition written."""
    with pytest.raises(exc_type) as info:
        run(src, tmp_path, **kw)
    msg = str(info.value)
    assert "\n" not in msg and msg.strip() == msg
    assert not (tmp_path / "data" / "ingested").exists()
    assert not (tmp_path / "data" / "rejected").exists()
    return msg


# ------------------------------------------------------------------ missing input


def test_missing_file(tmp_path: Path) -> None:
    msg = fails(InputError, tmp_path / "nope.csv", tmp_path)
    assert msg == f"input file {tmp_path / 'nope.csv'} does not exist"


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read a chmod 000 file")
def test_unreadable_file(tmp_path: Path) -> None:
    src = put(tmp_path / "locked.csv", GOOD)
    src.chmod(0)
    try:
        msg = fails(InputError, src, tmp_path)
    finally:
        src.chmod(0o644)
    assert msg == f"cannot read {src}: permission denied"


def test_unreadable_file_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = put(tmp_path / "locked.csv", GOOD)

    def deny(*args: object, **kw: object) -> None:
        raise PermissionError(13, "Permission denied", str(src))

    monkeypatch.setattr(sources_mod, "open", deny, raising=False)
    assert fails(InputError, src, tmp_path) == f"cannot read {src}: permission denied"


def test_directory_without_data_files(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    put(tmp_path / "in" / "notes.txt", "hello")
    msg = fails(InputError, tmp_path / "in", tmp_path)
    assert "has no data files: expected *.csv, *.csv.gz, *.parquet," in msg


def test_glob_without_matches(tmp_path: Path) -> None:
    msg = fails(InputError, str(tmp_path / "day-*.csv"), tmp_path)
    assert msg.startswith("no data files match")


def test_empty_file(tmp_path: Path) -> None:
    src = put(tmp_path / "e.csv", b"")
    assert fails(InputError, src, tmp_path) == f"{src} is empty"
    put(src, "\n \n\n")
    assert fails(InputError, src, tmp_path) == f"{src} is empty (only blank lines)"


def test_header_only(tmp_path: Path) -> None:
    src = put(tmp_path / "h.csv", HEADER)
    assert fails(InputError, src, tmp_path) == f"{src} has a header but no rows"
    put(src, HEADER + "\n\n")
    assert fails(InputError, src, tmp_path) == f"{src} has a header but no rows"


# ------------------------------------------------------------- formats, encodings


def test_semicolon_file_is_sniffed_with_decimal_commas(tmp_path: Path) -> None:
    src = put(tmp_path / "eu.csv", GOOD.replace(",", ";").replace(".", ","))
    res = run(src, tmp_path)
    assert res.rows_accepted == 30
    assert any("using ';' as the delimiter" in w for w in res.warnings)
    ref = run(put(tmp_path / "us.csv", GOOD), tmp_path, date(2024, 1, 2))
    assert part(res).equals(part(ref))


def test_utf16_with_bom(tmp_path: Path) -> None:
    text = HEADER + rows(5) + "2021-01-01,Montréal,1.5,2.5,0.0,No\n"
    res = run(put(tmp_path / "u16.csv", text.encode("utf-16")), tmp_path)
    ref = run(put(tmp_path / "u8.csv", text), tmp_path, date(2024, 1, 2))
    assert part(res).equals(part(ref))
    assert "Montréal" in part(res).column("Location").to_pylist()


def test_utf8_bom(tmp_path: Path) -> None:
    res = run(put(tmp_path / "bom.csv", b"\xef\xbb\xbf" + GOOD.encode()), tmp_path)
    assert part(res).column_names[:2] == ["_row_id", "Date"]


def test_latin1_is_decoded_with_a_warning(tmp_path: Path) -> None:
    text = HEADER + rows(5) + "2021-01-01,Montréal,1.5,2.5,0.0,No\n"
    src = put(tmp_path / "l1.csv", text.encode("latin-1"))
    res = run(src, tmp_path)
    assert "Montréal" in part(res).column("Location").to_pylist()
    assert any("not valid UTF-8" in w and "Latin-1" in w for w in res.warnings)


def test_latin1_after_a_utf8_looking_start_reruns_as_latin1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(csv_mod, "_HEAD_BYTES", 128)  # the sniff sees ASCII only
    text = HEADER + rows(20) + "2021-01-01,Montréal,1.5,2.5,0.0,No\n" + rows(5, 20)
    res = run(put(tmp_path / "late.csv", text.encode("latin-1")), tmp_path)
    assert res.rows_accepted == 26
    assert "Montréal" in part(res).column("Location").to_pylist()
    assert any("Latin-1" in w for w in res.warnings)


def test_binary_garbage(tmp_path: Path) -> None:
    src = put(tmp_path / "junk.csv", random.Random(1).randbytes(4000))
    msg = fails(InputError, src, tmp_path)
    assert msg == (
        f"{src} does not look like CSV text: it contains binary data; expected"
        " UTF-8/Latin-1 text, .csv.gz or Parquet"
    )


def test_utf16_without_bom_gets_a_hint(tmp_path: Path) -> None:
    src = put(tmp_path / "u16le.csv", GOOD.encode("utf-16-le"))
    assert "(UTF-16 without a byte-order mark?)" in fails(InputError, src, tmp_path)


def test_zip_archive(tmp_path: Path) -> None:
    src = put(tmp_path / "book.csv", b"PK\x03\x04" + bytes(100))
    msg = fails(InputError, src, tmp_path)
    assert msg == (
        f"{src} is a zip archive (an Excel workbook?); expected CSV, CSV.gz or Parquet"
    )


def test_gzip_csv(tmp_path: Path) -> None:
    res = run(put(tmp_path / "g.csv.gz", gzip.compress(GOOD.encode())), tmp_path)
    assert res.rows_accepted == 30


@pytest.mark.parametrize("damage", ["corrupt", "truncated"])
def test_bad_gzip(tmp_path: Path, damage: str) -> None:
    data = gzip.compress((HEADER + rows(300)).encode())
    data = data[:40] + b"\xff" * 60 if damage == "corrupt" else data[:-40]
    src = put(tmp_path / "g.csv.gz", data)
    msg = fails(InputError, src, tmp_path)
    assert msg.startswith(f"{src}: corrupt or truncated gzip data")


def test_parquet_input_gets_the_same_rows_and_ids(tmp_path: Path) -> None:
    csv_res = run(put(tmp_path / "a.csv", GOOD), tmp_path)
    table = part(csv_res).drop(["_row_id"])
    pq.write_table(table, tmp_path / "a.parquet")
    pq_res = run(tmp_path / "a.parquet", tmp_path, date(2024, 1, 2))
    assert part(pq_res).equals(part(csv_res))


def test_empty_parquet(tmp_path: Path) -> None:
    pq.write_table(pa.table({"a": pa.array([], pa.float64())}), tmp_path / "e.parquet")
    msg = fails(InputError, tmp_path / "e.parquet", tmp_path)
    assert msg == f"{tmp_path / 'e.parquet'} has no rows"


def test_corrupt_parquet(tmp_path: Path) -> None:
    src = put(tmp_path / "x.parquet", b"PAR1" + bytes(50))
    assert fails(InputError, src, tmp_path).startswith(
        f"{src} is not a readable Parquet file"
    )


def test_directory_and_glob_read_as_one_dataset(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    put(tmp_path / "in" / "b.csv", HEADER + rows(10, 10) + rows(1, 2))
    put(tmp_path / "in" / "a.csv.gz", gzip.compress((HEADER + rows(10)).encode()))
    put(tmp_path / "in" / "readme.txt", "not data")
    res = run(tmp_path / "in", tmp_path, keys=["Date", "Location"])
    assert res.source_files == [str(tmp_path / "in" / n) for n in ("a.csv.gz", "b.csv")]
    assert (res.rows_in, res.rows_accepted, res.rows_rejected) == (21, 20, 1)
    reason = part(res, "rejected").column("_reject_reason")[0].as_py()
    assert reason == (
        "duplicate key (Date, Location) = (2020-01-01, Perth) first seen at row 4"
        f" of {tmp_path / 'in' / 'a.csv.gz'}"
    )
    again = run(str(tmp_path / "in" / "*.csv*"), tmp_path, keys=["Date", "Location"])
    assert again.source_files == res.source_files


def test_files_with_different_headers(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    put(tmp_path / "in" / "a.csv", GOOD)
    put(tmp_path / "in" / "b.csv", "Date,Location,MinTemp\n2020-01-01,X,1\n")
    msg = fails(InputError, tmp_path / "in", tmp_path)
    assert msg == (
        f"{tmp_path / 'in' / 'b.csv'}: header differs from {tmp_path / 'in' / 'a.csv'}:"
        " missing MaxTemp, Rainfall, RainToday"
    )


# ------------------------------------------------------------------- bad structure


def test_ragged_rows_are_rejected_with_their_line(tmp_path: Path) -> None:
    text = (
        HEADER
        + rows(10)
        + "2021-01-01,X,1,2,3,No,extra\n"
        + rows(5, 10)
        + "\n"  # a blank line is not a row
        + "2021-01-02,Y,1\n"
        + rows(10, 15)
    )
    res = run(put(tmp_path / "r.csv", text), tmp_path, max_reject_fraction=0.2)
    assert (res.rows_in, res.rows_accepted, res.rows_rejected) == (27, 25, 2)
    assert res.reject_reasons == {
        "expected 6 fields, found 7": 1,
        "expected 6 fields, found 3": 1,
    }
    rej = part(res, "rejected").to_pylist()
    assert [r["_row_number"] for r in rej] == [12, 18]
    assert rej[0]["_raw_line"] == "2021-01-01,X,1,2,3,No,extra"
    assert rej[1]["Location"] == "Y" and rej[1]["MaxTemp"] is None
    assert rej[0]["_source_file"] == str(tmp_path / "r.csv")


@pytest.mark.parametrize("block_size", [64, 1 << 20])
def test_unterminated_quote(tmp_path: Path, block_size: int) -> None:
    text = HEADER + rows(10) + '2021-01-01,"X,1,2,3,No\n' + rows(10, 10)
    src = put(tmp_path / "q.csv", text)
    msg = fails(InputError, src, tmp_path, block_size=block_size)
    assert msg.startswith(f"{src}: a ")
    assert 'quote (")' in msg and "never closed" in msg


def test_unterminated_quote_in_the_last_column(tmp_path: Path) -> None:
    text = HEADER + rows(10) + '2021-01-01,X,1,2,3,"No\n' + rows(3, 10)
    msg = fails(InputError, put(tmp_path / "q.csv", text), tmp_path, block_size=1 << 20)
    assert 'a quote (") opened near row 12 is never closed' in msg


def test_reading_ahead_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # pyarrow alone reads up to 32 blocks ahead (the whole file here); memory
    # must stay a few blocks whatever the file size.
    monkeypatch.setattr(csv_mod, "_HEAD_BYTES", 4096)
    src = put(tmp_path / "big.csv", HEADER + rows(40_000))  # ~1.5 MB, 90 blocks
    block = 16 << 10
    source = sources_mod.open_source(src, block, sources_mod.Hints())
    try:
        chunks = source.chunks()
        next(chunks)
        next(chunks)
        # Raw reads are at least 64 KiB; a few of them, not the whole file.
        assert source.stream.raw_bytes <= 4096 + 4 * (64 << 10)
        assert 2 + sum(1 for _ in chunks) > 60  # and the rest still streams
    finally:
        source.close()


def test_quoted_fields_with_commas_and_newlines_are_fine(tmp_path: Path) -> None:
    text = (
        "Date,Location,Note\n"
        '2020-01-01,"A, B","two\nlines"\n'
        '2020-01-02,C,"say ""hi"""\n'
    )
    res = run(put(tmp_path / "q.csv", text), tmp_path, keys=["Date"])
    assert part(res).column("Location").to_pylist() == ["A, B", "C"]
    assert part(res).column("Note").to_pylist() == ["two\nlines", 'say "hi"']


def test_duplicated_column_names(tmp_path: Path) -> None:
    src = put(tmp_path / "d.csv", "a,b,a\n1,2,3\n")
    msg = fails(InputError, src, tmp_path)
    assert msg == f"{src}: duplicated column names in the header: 'a' (columns 1, 3)"


def test_reserved_column_name(tmp_path: Path) -> None:
    src = put(tmp_path / "d.csv", "_row_id,b\n1,2\n")
    assert "is reserved" in fails(InputError, src, tmp_path)


# ------------------------------------------------------------------ columns, schema


def test_required_key_and_feature_columns(tmp_path: Path) -> None:
    src = put(tmp_path / "a.csv", GOOD)
    msg = fails(InputError, src, tmp_path, keys=["Date", "Station"])
    assert msg == (
        f"{src}: key column 'Station' not found; the header has: Date, Location,"
        " MinTemp, MaxTemp, Rainfall, RainToday"
    )
    msg = fails(InputError, src, tmp_path, features=["Sunshine"])
    assert msg.startswith(f"{src}: feature column 'Sunshine' not found")
    msg = fails(InputError, src, tmp_path, label="RainTomorrow")
    assert msg.startswith(f"{src}: label column 'RainTomorrow' not found")


def test_expected_schema_fixes_kinds_ignores_extras_and_requires_features(
    tmp_path: Path,
) -> None:
    first = run(put(tmp_path / "a.csv", GOOD), tmp_path, label="RainToday")
    schema = first.schema
    extra = put(
        tmp_path / "b.csv",
        HEADER.replace("\n", ",Extra\n") + rows(30).replace("\n", ",x\n"),
    )
    res = run(extra, tmp_path, date(2024, 1, 2), expected_schema=schema)
    assert res.schema == schema
    assert "Extra" not in part(res).column_names
    assert f"{extra}: columns not in the expected schema are ignored: Extra" in (
        res.warnings
    )
    assert "Extra" in part(res, "rejected").column_names  # raw rows keep all columns

    lacking = put(tmp_path / "c.csv", "Date,Location,MinTemp\n2020-01-01,X,1\n")
    msg = fails(SchemaError, lacking, tmp_path / "other", expected_schema=schema)
    assert msg == (
        f"{lacking} lacks columns the expected schema requires: MaxTemp, Rainfall"
    )


def test_inferred_kinds_roles_and_keys(tmp_path: Path) -> None:
    notes = [f"note number {i} about things" for i in range(60)]
    text = "Date,Location,Temp,Dir,Note\n" + "".join(
        f"{date(2020, 1, 1) + timedelta(days=i // 2)},{'AB'[i % 2]},{i / 3:.2f},"
        f"{'NSEW'[i % 4]},{notes[i]}\n"
        for i in range(60)
    )
    res = run(put(tmp_path / "k.csv", text), tmp_path)
    schema = res.schema
    assert schema.keys == ["Date", "Location"]
    assert [(c.name, c.kind, c.role) for c in schema.columns] == [
        ("Date", "date", "key"),
        ("Location", "categorical", "key"),
        ("Temp", "numeric", "feature"),
        ("Dir", "categorical", "feature"),
        ("Note", "text", "excluded"),
    ]
    assert any(
        w.startswith("keys inferred from the first 60 rows") for w in res.warnings
    )
    table = part(res)
    assert table.schema.field("Date").type == pa.date32()
    assert table.schema.field("Temp").type == pa.float64()
    assert table.schema.field("_row_id").type == pa.int64()
    meta = table.schema.metadata
    assert TableSchema.from_dict(json.loads(meta[b"latentflow.schema"])) == schema
    assert meta[b"latentflow.source"].decode() == str(tmp_path / "k.csv")


def test_table_schema_round_trip_and_helpers() -> None:
    schema = TableSchema(
        (
            ColumnSpec("Date", "date", "key"),
            ColumnSpec("Loc", "categorical", "key"),
            ColumnSpec("T", "numeric", "feature"),
            ColumnSpec("Dir", "categorical", "feature"),
            ColumnSpec("Note", "text", "excluded"),
            ColumnSpec("Rain", "categorical", "label"),
        )
    )
    assert TableSchema.from_dict(schema.to_dict()) == schema
    assert schema.keys == ["Date", "Loc"]
    assert schema.features == ["T", "Dir"]
    assert schema.numeric_features == ["T"]
    assert schema.categorical_features == ["Dir"]
    assert schema.label == "Rain"
    with pytest.raises(SchemaError, match="kind 'float'"):
        ColumnSpec("x", "float", "feature")
    with pytest.raises(SchemaError):
        TableSchema.from_dict({"cols": []})


def test_missing_and_constant_columns_are_kept_with_warnings(tmp_path: Path) -> None:
    text = "Date,Location,A,B,C\n" + "".join(
        f"2020-01-{i + 1:02d},X,1,NA,{i}\n" for i in range(20)
    )
    res = run(put(tmp_path / "c.csv", text), tmp_path, keys=["Date"])
    assert res.rows_accepted == 20
    assert "column 'A' is constant (1.0)" in res.warnings
    assert "column 'Location' is constant ('X')" in res.warnings
    assert "column 'B' is entirely missing" in res.warnings
    assert part(res).column("B").null_count == 20


# ---------------------------------------------------------------------- cell rules


def test_null_markers_and_junk_numbers(tmp_path: Path) -> None:
    text = (
        HEADER
        + rows(100)  # enough good rows that MinTemp is inferred numeric
        + "2021-01-01,X,abc,2,NA,No\n"
        + "2021-01-02,X, 1e3 ,-,inf,No\n"
        + "2021-01-03,X,1e999,1,2,Yes\n"
        + "2021-01-04,X,1e308,-1e308,null,?\n"
        + "2021-01-05,X,1,2,1,n/a\n"
        + "2021-01-06,X,1,2,1,2\n"
        + '2021-01-07,X,"1,2",2,1,No\n'
        + "2021-01-08,X,NaN,None,N/A,NULL\n"
    )
    res = run(put(tmp_path / "j.csv", text), tmp_path, max_reject_fraction=0.1)
    assert res.reject_reasons == {
        "MinTemp: not a number": 2,
        "MinTemp: not a finite number": 1,
        "Rainfall: not a finite number": 1,
        # The model computes in float32: larger magnitudes reject their row.
        "MinTemp: outside the float32 range": 1,
        "MaxTemp: outside the float32 range": 1,
    }
    rej = {r["_row_number"]: r for r in part(res, "rejected").to_pylist()}
    assert rej[102]["_reject_reason"] == "MinTemp: 'abc' is not a number"
    assert rej[103]["_reject_reason"] == "Rainfall: 'inf' is not a finite number"
    assert rej[103]["MinTemp"] == " 1e3 "  # rejected rows keep raw cells
    assert rej[104]["_reject_reason"] == "MinTemp: '1e999' is not a finite number"
    assert rej[108]["_reject_reason"] == "MinTemp: '1,2' is not a number"
    assert rej[105]["_reject_reason"] == (
        "MinTemp: '1e308' is outside the float32 range (magnitude at most"
        " 3.403e+38); MaxTemp: '-1e308' is outside the float32 range (magnitude"
        " at most 3.403e+38)"
    )
    ok = {r["Date"]: r for r in part(res).to_pylist()}
    assert date(2021, 1, 4) not in ok
    assert ok[date(2021, 1, 5)]["RainToday"] is None
    assert ok[date(2021, 1, 6)]["RainToday"] == "2"  # categorical: any text
    assert list(ok[date(2021, 1, 8)].values())[3:] == [None, None, None, None]


def test_bad_dates_and_missing_keys_are_rejected(tmp_path: Path) -> None:
    text = (
        HEADER
        + rows(30)
        + "2021-02-30,X,1,2,0,No\n2021-1-5,X,1,2,0,No\nNA,Y,1,2,0,No\n"
    )
    res = run(
        put(tmp_path / "d.csv", text),
        tmp_path,
        expected_schema=SCHEMA,
        max_reject_fraction=0.1,
    )
    reasons = part(res, "rejected").column("_reject_reason").to_pylist()
    assert reasons == [
        "Date: '2021-02-30' is not a date (YYYY-MM-DD)",
        "Date: '2021-1-5' is not a date (YYYY-MM-DD)",
        "Date: key is missing",
    ]


def test_too_many_rejects_fails_and_keeps_earlier_partitions(tmp_path: Path) -> None:
    earlier = run(put(tmp_path / "ok.csv", GOOD), tmp_path, date(2023, 12, 31))
    before = part(earlier)
    text = (
        HEADER + rows(20) + "".join(f"2021-01-{i:02d},X,abc,1,0,No\n" for i in (1, 2))
    )
    src = put(tmp_path / "bad.csv", text)
    with pytest.raises(InputError) as info:
        run(src, tmp_path, expected_schema=SCHEMA)
    assert str(info.value) == (
        f"{src}: 2 of 22 rows rejected (9.1%), more than max_reject_fraction 5.0%;"
        " top reasons: MinTemp: not a number (2); nothing was written"
    )
    data = tmp_path / "data"
    assert not (data / "ingested" / "ds" / "run_date=2024-01-01").exists()
    assert not (data / "rejected" / "ds" / "run_date=2024-01-01").exists()
    assert part(earlier).equals(before)
    assert list((data / ".staging").iterdir()) == []


def test_duplicate_keys_keep_the_first(tmp_path: Path) -> None:
    text = HEADER + rows(10) + rows(2, 3) + rows(3, 10)
    res = run(
        put(tmp_path / "k.csv", text),
        tmp_path,
        keys=["Date", "Location"],
        max_reject_fraction=0.5,
    )
    assert (res.rows_accepted, res.rows_rejected) == (13, 2)
    assert res.reject_reasons == {"duplicate key": 2}
    rej = part(res, "rejected").to_pylist()
    assert [r["_row_number"] for r in rej] == [12, 13]
    assert rej[0]["_reject_reason"] == (
        "duplicate key (Date, Location) = (2020-01-02, Albury) first seen at row 5"
    )
    ids = part(res).column("_row_id").to_pylist()
    assert len(set(ids)) == len(ids)


def test_a_rejected_row_does_not_claim_its_key(tmp_path: Path) -> None:
    text = HEADER + "2020-01-01,X,abc,1,0,No\n2020-01-01,X,1,2,0,No\n" + rows(30)
    res = run(put(tmp_path / "k.csv", text), tmp_path, keys=["Date", "Location"])
    assert res.rows_rejected == 1
    assert "X" in part(res).column("Location").to_pylist()


def test_keyless_identical_rows_get_distinct_stable_ids(tmp_path: Path) -> None:
    text = "a,b\n" + "1,x\n2,y\n1,x\n" * 20
    res = run(put(tmp_path / "n.csv", text), tmp_path, keys=[])
    ids = part(res).column("_row_id").to_pylist()
    assert res.rows_accepted == 60 and len(set(ids)) == 60
    again = run(
        put(tmp_path / "n2.csv", text),
        tmp_path,
        date(2024, 1, 2),
        keys=[],
        block_size=1 << 20,
    )
    assert part(again).column("_row_id").to_pylist() == ids


# ---------------------------------------------------------------------- domain rules


def test_domain_rules_reject_violations(tmp_path: Path) -> None:
    text = (
        HEADER
        + rows(30)
        + "2021-01-01,X,30,20,0.0,No\n"
        + "2021-01-02,X,1,2,5.0,No\n"
        + "2021-01-03,X,1,2,,Maybe\n"
        + "2021-01-04,X,NA,2,NA,NA\n"  # missing operands pass
    )
    res = run(
        put(tmp_path / "r.csv", text),
        tmp_path,
        rules=[
            "MinTemp <= MaxTemp",
            "if Rainfall > 1 then RainToday == Yes",
            "RainToday in {Yes, No}",
            "0 <= Rainfall <= 300",
        ],
        max_reject_fraction=0.1,
    )
    assert part(res, "rejected").column("_reject_reason").to_pylist() == [
        "rule 'MinTemp <= MaxTemp' violated (MinTemp=30, MaxTemp=20)",
        "rule 'if Rainfall > 1 then RainToday == Yes' violated (Rainfall=5.0,"
        " RainToday=No)",
        "rule 'RainToday in {Yes, No}' violated (RainToday=Maybe)",
    ]
    assert res.rows_accepted == 31


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        (
            "MinTemp <== MaxTemp",
            "rule 'MinTemp <== MaxTemp': cannot read '= MaxTemp'; expected 'A <= B',"
            " 'lo <= A <= hi', 'A in {x, y}' or 'if A > x then B == y'",
        ),
        (
            "MinTemp <= Sunshine",
            "rule 'MinTemp <= Sunshine': unknown column 'Sunshine'",
        ),
        (
            "RainToday < 3",
            "rule 'RainToday < 3': RainToday is categorical: only == and != apply",
        ),
        ("MinTemp == Yes", "rule 'MinTemp == Yes': unknown column 'Yes'"),
        ("if MinTemp > 1 RainToday == Yes", "'if' without 'then'"),
        ("__import__('os')", "cannot read"),
        ("1 < 2", "it compares no column"),
    ],
)
def test_bad_rules_are_config_errors(tmp_path: Path, rule: str, message: str) -> None:
    msg = fails(ConfigError, put(tmp_path / "a.csv", GOOD), tmp_path, rules=[rule])
    assert message in msg


def test_weatheraus_rules_parse_and_compile() -> None:
    """Each preset rule compiles against the weatherAUS kinds and catches the
    one row built to break it (row i + 1 breaks rule i; row 0 breaks none)."""
    good = {
        "MinTemp": 10.0,
        "MaxTemp": 20.0,
        "Humidity9am": 50.0,
        "Humidity3pm": 50.0,
        "Cloud9am": 4.0,
        "Cloud3pm": 4.0,
        "Rainfall": 0.0,
        "RainToday": "No",
        "RainTomorrow": "No",
    }
    breaks = [
        {"MinTemp": 30.0},
        {"Humidity9am": 101.0},
        {"Humidity3pm": -1.0},
        {"Cloud9am": 10.0},
        {"Cloud3pm": -1.0},
        {"Rainfall": -1.0},
        {"Rainfall": 5.0},
        {"RainToday": "Yes"},
        {"Rainfall": None, "RainToday": "Maybe"},
        {"RainTomorrow": "Maybe"},
    ]
    assert len(breaks) == len(WEATHERAUS_RULES)
    rows = [good] + [{**good, **b} for b in breaks]
    table = {c: pa.array([r[c] for r in rows]) for c in good}
    kinds = {
        c: "numeric" if isinstance(v, float) else "categorical" for c, v in good.items()
    }
    compiled = compile_rules([parse_rule(r) for r in WEATHERAUS_RULES], kinds)
    for i, rule in enumerate(compiled):
        broken = rule.violations(table)
        assert broken is not None, rule.text
        assert np.flatnonzero(broken).tolist() == [i + 1], rule.text


@pytest.mark.slow
def test_weatheraus_rules_hold_on_the_real_file(
    tmp_path: Path, weather_csv: Path
) -> None:
    res = ingest(
        weather_csv,
        tmp_path / "data",
        "weather",
        RUN,
        keys=["Date", "Location"],
        label="RainTomorrow",
        rules=WEATHERAUS_RULES,
    )
    assert (res.rows_in, res.rows_accepted, res.rows_rejected) == (145460, 145460, 0)
    assert res.schema.label == "RainTomorrow"


# ------------------------------------------------------------ ids, reruns, atomicity


def test_row_ids_are_stable_across_runs_reordering_and_blocks(tmp_path: Path) -> None:
    lines = rows(60).splitlines(keepends=True)
    first = run(put(tmp_path / "a.csv", HEADER + "".join(lines)), tmp_path)
    random.Random(7).shuffle(lines)
    second = run(
        put(tmp_path / "b.csv", HEADER + "".join(lines).replace(",", " , ")),
        tmp_path,
        date(2024, 1, 2),
        block_size=1 << 20,
    )

    def ids(res: IngestResult) -> dict[tuple, int]:
        t = part(res)
        return dict(
            zip(
                zip(
                    t.column("Date").to_pylist(),
                    t.column("Location").to_pylist(),
                    strict=True,
                ),
                t.column("_row_id").to_pylist(),
                strict=True,
            )
        )

    assert ids(first) == ids(second)
    assert len(set(ids(first).values())) == 60


def test_rerun_replaces_the_partition(tmp_path: Path) -> None:
    bad_row = "2021-01-01,X,abc,1,0,No\n"
    first = run(put(tmp_path / "a.csv", GOOD + bad_row), tmp_path)
    assert part(first, "rejected").num_rows == 1
    second = run(put(tmp_path / "b.csv", HEADER + rows(5)), tmp_path)
    assert second.ingested_dir == first.ingested_dir
    assert part(second).num_rows == 5
    assert part(second, "rejected").num_rows == 0  # an empty partition replaces it
    assert part(second, "rejected").schema.names[:3] == [
        "_row_number",
        "_source_file",
        "_reject_reason",
    ]


def test_failed_rerun_leaves_the_previous_partition(tmp_path: Path) -> None:
    first = run(put(tmp_path / "a.csv", GOOD), tmp_path)
    before = part(first)
    src = put(tmp_path / "b.csv", HEADER + rows(10) + '2021-01-01,"X,1,2,3,No\n')
    with pytest.raises(InputError):
        run(src, tmp_path, block_size=1 << 20)
    assert part(first).equals(before)
    assert list((tmp_path / "data" / ".staging").iterdir()) == []


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    src = put(tmp_path / "a.csv", GOOD)
    with pytest.raises(ConfigError, match="dataset name"):
        ingest(src, tmp_path, "Bad Name", RUN)
    with pytest.raises(ConfigError, match="max_reject_fraction"):
        ingest(src, tmp_path, "ds", RUN, max_reject_fraction=2)
    with pytest.raises(ConfigError, match="more than one role"):
        ingest(src, tmp_path, "ds", RUN, keys=["Date"], features=["Date"])


# ------------------------------------------------------------ threaded pipeline


def _force_serial(monkeypatch: pytest.MonkeyPatch) -> None:
    """Read every CSV with pyarrow's serial reader, as before threads."""
    init = csv_mod.CsvSource.__init__

    def serial_init(self, path, fh, block_size, hints) -> None:
        init(self, path, fh, block_size, dataclasses.replace(hints, serial=True))

    monkeypatch.setattr(csv_mod.CsvSource, "__init__", serial_init)


def _attempts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the ingestion attempts (a restart is a new ``_Ingestion``)."""
    calls: list[int] = []
    init = run_mod._Ingestion.__init__

    def counted(self, **kw) -> None:
        calls.append(1)
        init(self, **kw)

    monkeypatch.setattr(run_mod._Ingestion, "__init__", counted)
    return calls


@pytest.mark.parametrize("block_size", [64, 4096, 1 << 20])
@pytest.mark.parametrize("keys", [["Date", "Location"], []])
def test_threaded_pipeline_matches_a_serial_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_size: int, keys: list
) -> None:
    # Junk cells, rule violations and duplicate keys spread over many blocks:
    # every stage's output must come out in block order.
    lines = rows(400).splitlines(keepends=True)
    lines[37] = lines[37].replace("Albury", "Albury ").replace(".5,", ".5x,", 1)
    lines[120] = lines[5]  # duplicate key
    lines[250] = lines[250].replace(",No\n", ",Maybe\n")
    text = HEADER + "".join(lines)
    src = put(tmp_path / "t.csv", text)
    kw = {
        "block_size": block_size,
        "keys": keys,
        "rules": ["MinTemp <= MaxTemp", "RainToday in {No, Yes}"],
    }
    attempts = _attempts(monkeypatch)
    threaded = ingest(src, tmp_path / "a", "ds", RUN, **kw)
    assert len(attempts) == 1  # a clean-shaped file is read once
    _force_serial(monkeypatch)
    serial = ingest(src, tmp_path / "b", "ds", RUN, **kw)
    # Without keys the copied row is kept, with a salted id.
    assert threaded.rows_rejected == serial.rows_rejected == (3 if keys else 2)
    assert threaded.reject_reasons == serial.reject_reasons
    assert part(threaded).equals(part(serial), check_metadata=True)
    assert part(threaded, "rejected").equals(part(serial, "rejected"))


def test_wrong_field_count_restarts_the_file_serially_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = HEADER + rows(300) + "2021-01-01,X,1\n" + rows(300, 300)
    attempts = _attempts(monkeypatch)
    res = run(put(tmp_path / "r.csv", text), tmp_path, block_size=1024)
    assert len(attempts) == 2
    assert res.rows_rejected == 1 and res.rows_accepted == 600
    assert part(res, "rejected").column("_row_number").to_pylist() == [302]


def test_write_error_in_the_writer_thread_fails_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def disk_full(self, batch) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pq.ParquetWriter, "write_batch", disk_full)
    with pytest.raises(LatentflowError, match="No space left on device"):
        run(put(tmp_path / "g.csv", HEADER + rows(200)), tmp_path)
    assert not (tmp_path / "data" / "ingested").exists()


def test_roles_as_one_object_type_the_input_as_the_arguments_do(
    tmp_path: Path,
) -> None:
    from models.schema import Roles

    src = put(tmp_path / "a.csv", GOOD)
    one = run(src, tmp_path / "one", keys=["Date", "Location"], label="RainToday")
    roles = Roles.of(keys=["Date", "Location"], label="RainToday")
    other = run(src, tmp_path / "other", roles=roles)
    assert other.schema == one.schema and other.schema.label == "RainToday"
    assert part(other).equals(part(one))
    msg = fails(ConfigError, src, tmp_path, roles=roles, keys=["Date"])
    assert msg == "give roles either as one Roles object or one by one"
