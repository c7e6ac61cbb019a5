"""JSON-lines input: one source module and one registry line, typed as CSV is."""

from __future__ import annotations

import csv
import gzip
import json
import os
import subprocess
import sys
from datetime import date
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import tasks.ingest.sources.jsonl as jsonl_mod
from tasks.errors import InputError
from tasks.ingest import ingest
from tasks.synthetic import write_weatheraus_like_csv

RUN = date(2024, 1, 1)
ROLES = {"keys": ["Date", "Location"], "label": "RainTomorrow"}


def to_jsonl(src: Path, dst: Path) -> Path:
    """The CSV's rows as JSON objects: numbers as numbers, ``NA`` as null."""

    def value(cell: str) -> object:
        if cell == "NA":
            return None
        try:
            return json.loads(cell)
        except ValueError:
            return cell

    with open(src, newline="") as fh:
        lines = [
            json.dumps({k: value(v) for k, v in row.items()})
            for row in csv.DictReader(fh)
        ]
    text = "\n".join(lines) + "\n"
    if dst.name.endswith(".gz"):
        dst.write_bytes(gzip.compress(text.encode()))
    else:
        dst.write_text(text)
    return dst


@pytest.fixture
def weather(tmp_path: Path) -> Path:
    return write_weatheraus_like_csv(tmp_path / "w.csv", 300, seed=3)


def table(path: str) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.mark.parametrize("suffix", [".jsonl", ".ndjson.gz"])
def test_jsonl_is_typed_and_identified_as_the_same_csv(
    tmp_path: Path, weather: Path, suffix: str
) -> None:
    src = to_jsonl(weather, tmp_path / f"w{suffix}")
    want = ingest(weather, tmp_path / "csv", "w", RUN, **ROLES)
    got = ingest(src, tmp_path / "json", "w", RUN, **ROLES)
    assert got.schema == want.schema
    assert got.schema.column("MinTemp").kind == "numeric"
    assert got.schema.column("Date").kind == "date"
    assert (got.rows_accepted, got.rows_rejected) == (want.rows_accepted, 0)
    # Same types, values and _row_id as the CSV: one typing path downstream.
    typed, same = pq.read_table(got.ingested_dir), pq.read_table(want.ingested_dir)
    assert typed.schema.remove_metadata() == same.schema.remove_metadata()
    assert typed.to_pylist() == same.to_pylist()


def test_bad_lines_are_rejected_with_their_line_number(tmp_path: Path) -> None:
    good = [
        json.dumps({"Date": f"2020-01-{d:02d}", "Loc": "A", "T": d / 2})
        for d in range(1, 29)
    ]
    lines = [*good[:2], '{"Date": "2020-02-01", "Loc": "A", "T": ', "", *good[2:]]
    lines.insert(5, '{"Date": "2020-02-02", "Loc": "A", "T": "warm"}')
    lines.insert(6, "[1, 2]")
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(lines) + "\n")
    res = ingest(src, tmp_path / "out", "d", RUN, keys=["Date", "Loc"],
                 max_reject_fraction=0.5)  # fmt: skip
    assert res.rows_accepted == 28 and res.rows_rejected == 3
    rejected = {r["_row_number"]: r for r in table(res.rejected_dir)}
    assert sorted(rejected) == [3, 6, 7]
    assert rejected[3]["_reject_reason"].startswith("not valid JSON (")
    assert rejected[3]["_raw_line"] == lines[2]
    assert rejected[6]["_reject_reason"] == "T: 'warm' is not a number"
    assert rejected[7]["_reject_reason"] == "not a JSON object (a JSON array)"
    assert res.reject_reasons["not valid JSON"] == 1

    with pytest.raises(InputError) as err:
        ingest(src, tmp_path / "strict", "d", RUN, keys=["Date", "Loc"])
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{src}: 3 of 31 rows rejected")
    assert not (tmp_path / "strict" / "ingested").exists()


@pytest.mark.parametrize(
    ("content", "expect"),
    [
        (b"Date,Loc,T\n2020-01-01,A,1\n", "line 1 is not a JSON object (not valid"),
        (b"\n[1, 2]\n", "line 2 is not a JSON object (a JSON array)"),
        (b"", "is empty"),
        (b"\n\n", "is empty (only blank lines)"),
        (b'{"a": 1}\x00\x01\x02', "contains binary data"),
        (b'{"a": "caf\xe9"}\n', "line 1 is not valid UTF-8"),
    ],
)
def test_a_file_that_is_not_json_lines_is_one_line_error(
    tmp_path: Path, content: bytes, expect: str
) -> None:
    src = tmp_path / "x.jsonl"
    src.write_bytes(content)
    with pytest.raises(InputError) as err:
        ingest(src, tmp_path / "out", "x", RUN)
    msg = str(err.value)
    assert msg.startswith(str(src)) and expect in msg and "\n" not in msg
    assert not (tmp_path / "out").exists() or not any(
        (tmp_path / "out").rglob("*.parquet")
    )


def test_a_field_first_seen_after_the_head_rejects_its_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl_mod, "_HEAD_BYTES", 200)  # the first few lines
    lines = [
        json.dumps({"Date": f"2020-01-{d:02d}", "Loc": "A", "T": d})
        for d in range(1, 21)
    ]
    lines[15] = json.dumps({"Date": "2020-01-16", "Loc": "A", "T": 1, "Wind": 3})
    src = tmp_path / "late.ndjson"
    src.write_text("\n".join(lines) + "\n")
    res = ingest(src, tmp_path / "out", "d", RUN, max_reject_fraction=0.1)
    assert res.schema.names == ["Date", "Loc", "T"] and res.rows_accepted == 19
    (row,) = table(res.rejected_dir)
    assert row["_row_number"] == 16 and row["Date"] == "2020-01-16"
    assert row["_reject_reason"].startswith("field 'Wind' is not a column")
    assert res.reject_reasons == {"unknown field": 1}


def test_truncated_gzip_is_one_line_error(tmp_path: Path, weather: Path) -> None:
    whole = to_jsonl(weather, tmp_path / "w.jsonl.gz").read_bytes()
    src = tmp_path / "cut.jsonl.gz"
    src.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(InputError, match="corrupt or truncated gzip data"):
        ingest(src, tmp_path / "out", "w", RUN, **ROLES)


def test_a_directory_picks_up_jsonl_files(tmp_path: Path, weather: Path) -> None:
    drop = tmp_path / "drop"
    drop.mkdir()
    to_jsonl(weather, drop / "a.jsonl")
    (drop / "notes.txt").write_text("not data")
    res = ingest(drop, tmp_path / "out", "w", RUN, **ROLES)
    assert res.source_files == [str(drop / "a.jsonl")] and res.rows_accepted == 300


@pytest.mark.slow
def test_cli_runs_on_jsonl(tmp_path: Path) -> None:
    csv_src = write_weatheraus_like_csv(tmp_path / "w.csv", 600, seed=1)
    src = to_jsonl(csv_src, tmp_path / "weatherAUS.jsonl.gz")
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_"))
    }
    env["PREFECT_HOME"] = str(tmp_path / "prefect-home")
    r = subprocess.run(
        [
            str(Path(sys.executable).with_name("latentflow")),
            "run",
            "--input",
            str(src),
            "--data-dir",
            str(tmp_path / "lf"),
            "--run-date",
            "2024-05-01",
            "--latent-dim",
            "2",
            "--epochs",
            "2",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout.strip())
    assert summary["dataset"] == "weatheraus"
    assert summary["rows_scored"] + summary["rows_rejected"] == 600
    latent = pq.read_table(summary["output"])
    assert (
        latent.num_rows == summary["rows_scored"] and "latent_1" in latent.column_names
    )
