"""Inputs at the edges: they work as a demanding user expects, or fail in one
short line naming the file and what was expected."""

from __future__ import annotations

import gzip
import random
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models import columns as cols
from tasks.errors import InputError, LatentflowError
from tasks.ingest import WEATHERAUS_RULES, IngestResult, ingest

RUN = date(2024, 1, 1)


def put(path: Path, data: str | bytes) -> Path:
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def run(src: Path, out: Path, **kw) -> IngestResult:
    kw.setdefault("block_size", 256)
    return ingest(src, out, "ds", RUN, **kw)


def table(result: IngestResult, area: str = "ingested") -> pa.Table:
    d = result.ingested_dir if area == "ingested" else result.rejected_dir
    return pq.read_table(Path(d) / "part-00000.parquet")


def frame(n: int) -> dict[str, list]:
    rng = random.Random(3)
    return {
        "Date": [str(date(2020, 1, 1) + timedelta(days=i // 3)) for i in range(n)],
        "Location": [("Albury", "Sydney", "Perth")[i % 3] for i in range(n)],
        "MinTemp": [round(rng.uniform(0, 15), 1) for _ in range(n)],
        "MaxTemp": [round(rng.uniform(16, 35), 1) for _ in range(n)],
        "RainToday": [rng.choice(["No", "Yes"]) for _ in range(n)],
    }


def csv_text(cols_: dict[str, list], order: list[str]) -> str:
    lines = [",".join(order)]
    n = len(next(iter(cols_.values())))
    lines += [",".join(str(cols_[c][i]) for c in order) for i in range(n)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------ row ids


@pytest.mark.parametrize("keys", [["Date", "Location"], []], ids=["keyed", "keyless"])
def test_column_order_does_not_change_row_ids(tmp_path: Path, keys) -> None:
    data = frame(30)
    a = put(tmp_path / "a.csv", csv_text(data, list(data)))
    b = put(tmp_path / "b.csv", csv_text(data, list(reversed(data))))
    ids = []
    for src in (a, b):
        t = table(run(src, tmp_path / src.stem, keys=keys))
        by_key = dict(
            zip(
                zip(t["Date"].to_pylist(), t["Location"].to_pylist(), strict=True),
                t["_row_id"].to_pylist(),
                strict=True,
            )
        )
        ids.append(by_key)
    assert len(ids[0]) == 30
    assert ids[0] == ids[1]


# ----------------------------------------------------- names of output columns


@pytest.mark.parametrize(
    "name", ["recon_error", "latent_0", "latent_12", "is_anomaly", "model_version"]
)
def test_key_named_like_an_output_column_is_refused(tmp_path: Path, name) -> None:
    data = frame(30)
    data[name] = data.pop("Location")
    src = put(tmp_path / "k.csv", csv_text(data, list(data)))
    with pytest.raises(InputError) as info:
        run(src, tmp_path / "out", keys=["Date", name])
    msg = str(info.value)
    assert f"key column {name!r}" in msg and "recon_error" in msg and "run_date" in msg
    assert "\n" not in msg
    assert not (tmp_path / "out" / "ingested").exists()


def test_a_column_named_run_date_is_refused(tmp_path: Path) -> None:
    # run_date is the partition column of every output: reading ingested/
    # with hive partitioning would meet it twice.
    data = frame(30)
    data["run_date"] = data.pop("MinTemp")
    src = put(tmp_path / "r.csv", csv_text(data, list(data)))
    with pytest.raises(InputError, match="column 'run_date' has the name of an output"):
        run(src, tmp_path / "out", keys=["Date", "Location"])


def test_features_may_share_output_names(tmp_path: Path) -> None:
    # Only keys are copied into latent/: a feature called latent_0 is harmless.
    data = frame(30)
    data["latent_0"] = data.pop("MinTemp")
    src = put(tmp_path / "f.csv", csv_text(data, list(data)))
    assert run(src, tmp_path / "out", keys=["Date", "Location"]).rows_accepted == 30


def test_output_schema_names_are_all_reserved() -> None:
    from tasks.score import output_schema

    schema = output_schema([("Date", pa.date32())], latent_dim=3, with_cluster=True)
    written = [n for n in schema.names if n != "Date"]
    assert all(cols.is_output_column(n) for n in written), written
    assert not cols.is_output_column("Date")


# ------------------------------------------------------------------ timestamps


def test_parquet_zoned_timestamps_are_utc_timestamps(tmp_path: Path) -> None:
    n = 30
    start = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
    stamps = [start + timedelta(hours=i) for i in range(n)]
    t = pa.table(
        {
            "At": pa.array(stamps, pa.timestamp("ns", tz="UTC")).cast(
                pa.timestamp("ns", tz="Australia/Sydney")
            ),
            "Station": ["A"] * n,
            "Value": [float(i % 7) for i in range(n)],
        }
    )
    src = tmp_path / "z.parquet"
    pq.write_table(t, src)
    res = run(src, tmp_path / "out")
    out = table(res)
    assert out.schema.field("At").type == pa.timestamp("us", tz="UTC")
    assert out["At"].to_pylist() == stamps
    kinds = {c.name: (c.kind, c.role) for c in res.schema.columns}
    assert kinds["At"] == ("timestamp", "key")  # a timestamp keys rows like a date


def test_csv_zoned_timestamps_match_parquet_ids(tmp_path: Path) -> None:
    # The same instants, written with an offset in a CSV: same values, same ids.
    n = 20
    start = datetime(2024, 1, 1, 9, 0, tzinfo=UTC)
    stamps = [start + timedelta(hours=i) for i in range(n)]
    text = "At,Value\n" + "".join(
        f"{(s + timedelta(hours=11)).strftime('%Y-%m-%dT%H:%M:%S')}+11:00,{i % 5}\n"
        for i, s in enumerate(stamps)
    )
    csv_res = run(put(tmp_path / "z.csv", text), tmp_path / "a", keys=["At"])
    pq.write_table(
        pa.table(
            {
                "At": pa.array(stamps, pa.timestamp("us", tz="Asia/Tokyo")),
                "Value": [float(i % 5) for i in range(n)],
            }
        ),
        tmp_path / "z.parquet",
    )
    pq_res = run(tmp_path / "z.parquet", tmp_path / "b", keys=["At"])
    a, b = table(csv_res), table(pq_res)
    assert a["At"].to_pylist() == stamps == b["At"].to_pylist()
    assert a["_row_id"].to_pylist() == b["_row_id"].to_pylist()


def test_bad_timestamp_rejects_its_row(tmp_path: Path) -> None:
    text = "At,Value\n" + "".join(f"2024-01-01T{h:02d}:00:00Z,{h}\n" for h in range(20))
    text += "2024-01-01T25:00:00Z,1\n"
    res = run(put(tmp_path / "t.csv", text), tmp_path / "out", keys=["At"])
    rej = table(res, "rejected")
    assert res.rows_rejected == 1
    assert (
        "At: '2024-01-01T25:00:00Z' is not a timestamp"
        in rej["_reject_reason"][0].as_py()
    )


# ------------------------------------------------------------------ labels


def test_all_missing_label_works_with_a_warning(tmp_path: Path) -> None:
    data = frame(60)
    data["Rainfall"] = [0.0] * 60
    data["RainToday"] = ["No"] * 60
    data["RainTomorrow"] = ["NA"] * 60
    src = put(tmp_path / "w.csv", csv_text(data, list(data)))
    res = run(
        src,
        tmp_path / "out",
        keys=["Date", "Location"],
        label="RainTomorrow",
        rules=[r for r in WEATHERAUS_RULES if "Rain" in r or "Temp" in r],
    )
    assert res.rows_accepted == 60
    assert any("'RainTomorrow' is entirely missing" in w for w in res.warnings)

    from tasks.train import train_model

    trained = train_model(
        Path(res.ingested_dir),
        res.schema,
        tmp_path / "bundle",
        dataset="ds",
        estimator_params={"latent_dim": 2, "epochs": 2, "random_state": 0},
        label="RainTomorrow",
    )
    assert "probe_auc" not in trained.metrics
    assert any("RainTomorrow" in w for w in trained.warnings)


# ------------------------------------------------------------------ headers


def test_rfc4180_header_with_quoted_comma_and_line_break(tmp_path: Path) -> None:
    text = '"a,b","c\nd",Date,v\n' + "".join(
        f"{i},x{i % 3},2024-01-{i + 1:02d},{i * 2}\n" for i in range(25)
    )
    res = run(put(tmp_path / "h.csv", text), tmp_path / "out", keys=["Date"])
    out = table(res)
    assert out.column_names == ["_row_id", "a,b", "c\nd", "Date", "v"]
    assert out["a,b"].to_pylist()[:3] == [0.0, 1.0, 2.0]


def test_header_with_unclosed_quote_is_still_refused(tmp_path: Path) -> None:
    src = put(tmp_path / "q.csv", '"a,b,c\n1,2,3\n4,5,6\n')
    with pytest.raises(InputError, match="the header row never ends"):
        run(src, tmp_path / "out")


# ------------------------------------------------------------------ garbage


def _garbage(kind: str) -> bytes:
    rnd = random.Random(kind).randbytes(6000)
    if kind == "random":
        return rnd
    if kind == "utf16-bom":
        return b"\xff\xfe" + rnd
    if kind == "utf8-bom":
        return b"\xef\xbb\xbf" + rnd
    if kind == "parquet-magic":
        return b"PAR1" + rnd + b"PAR1"
    if kind == "gzip-magic":
        return b"\x1f\x8b" + rnd
    if kind == "gzip-of-random":
        return gzip.compress(rnd)
    if kind == "cjk-text":
        r = random.Random(1)
        return "".join(chr(r.randrange(0x4E00, 0x9FFF)) for _ in range(3000)).encode()
    if kind == "long-ascii-line":
        r = random.Random(2)
        return bytes(r.randrange(33, 127) for _ in range(5000)) + b"\n1\n"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "random",
        "utf16-bom",
        "utf8-bom",
        "parquet-magic",
        "gzip-magic",
        "gzip-of-random",
        "cjk-text",
        "long-ascii-line",
    ],
)
def test_garbage_input_gets_a_short_message(tmp_path: Path, kind: str) -> None:
    src = put(tmp_path / "junk.csv", _garbage(kind))
    with pytest.raises(LatentflowError) as info:
        run(src, tmp_path / "out", keys=["Date"])
    msg = str(info.value)
    assert str(src) in msg
    # The path, what was wrong, and at most a capped excerpt of the input.
    assert len(msg.replace(str(src), "")) <= 240, msg
    assert msg.isprintable(), msg
    assert not (tmp_path / "out" / "ingested").exists()


def test_reject_reasons_cap_long_cells(tmp_path: Path) -> None:
    text = "Date,Value\n" + "".join(f"2024-01-{i + 1:02d},{i}\n" for i in range(25))
    text += "2024-02-01," + "x" * 5000 + "\n"
    res = run(put(tmp_path / "c.csv", text), tmp_path / "out", keys=["Date"])
    reason = table(res, "rejected")["_reject_reason"][0].as_py()
    assert reason.startswith("Value: 'xxx") and "(5000 chars)" in reason
    assert len(reason) < 120


# ------------------------------------------------------------------ float32 range


def test_values_outside_float32_are_rejected_rows(tmp_path: Path) -> None:
    text = "Date,Value,Other\n" + "".join(
        f"2024-01-{i + 1:02d},{i}.5,{i}\n" for i in range(25)
    )
    text += "2024-02-01,1e308,1\n2024-02-02,-3.5e38,1\n2024-02-03,3e38,1\n"
    res = run(
        put(tmp_path / "b.csv", text),
        tmp_path / "out",
        keys=["Date"],
        max_reject_fraction=0.2,
    )
    assert res.rows_rejected == 2
    reasons = table(res, "rejected")["_reject_reason"].to_pylist()
    assert reasons == [
        "Value: '1e308' is outside the float32 range (magnitude at most 3.403e+38)",
        "Value: '-3.5e38' is outside the float32 range (magnitude at most 3.403e+38)",
    ]
    values = table(res)["Value"].to_numpy()
    assert np.isfinite(values.astype(np.float32)).all()


def test_preprocessor_output_stays_finite_for_extreme_values() -> None:
    # Training saw a narrow column; scoring meets the largest float32s.
    from models.preprocessing import PreprocessorStats, TabularPreprocessor

    train = pa.table({"x": [1.0, 1.001, 0.999, 1.0005] * 10})
    stats = PreprocessorStats(["x"], [])
    stats.update(train)
    pre = TabularPreprocessor(["x"], []).fit_stats(stats, lambda _c: [train])
    out = pre.transform(pa.table({"x": [3.4e38, -3.4e38, 1e308, 1.0]}))
    assert np.isfinite(out).all()
    assert out[0, 0] > 1e5 and out[1, 0] < -1e5
