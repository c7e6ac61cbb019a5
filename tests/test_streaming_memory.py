"""Streaming: block and batch sizes change nothing but memory, and memory is flat.

The first two tests check that the size of the pieces ingest and scoring work
in is invisible in their output. The last two check that peak memory does not
grow with the data: ingest and score N and then 4N rows with small blocks in a
fresh interpreter and compare the peak allocations.

Why allocations, not RSS: RSS is mostly the interpreter, torch and prefect
(~300-450 MiB) and moves with the allocator's caching, so at test sizes
"+30% RSS" would be noise in one direction and a blind spot in the other.
Instead the probe reads two allocation high-water marks that do not depend on
load or timing: pyarrow's memory pool (``max_memory``: every Arrow buffer, the
CSV reader's and the Parquet reader's and writer's included) and
``tracemalloc`` (every numpy array and Python object). Torch tensors are in
neither; scoring's are one batch by construction. Each probe also runs a
non-streaming control (one block or batch as large as the data), which must
blow the same budget, so the check demonstrably can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]
RUN = date(2024, 1, 1)
PRESET: dict[str, Any] = {
    "keys": ["Date", "Location"],
    "label": "RainTomorrow",
}
TINY_MODEL = {
    "latent_dim": 4,
    "hidden": (16,),
    "epochs": 2,
    "batch_size": 256,
    "device": "cpu",
    "random_state": 0,
}
SMALL_BLOCK = 32 << 10  # bytes: about 330 weatherAUS-like rows per block
PART_BLOCK = 256 << 10  # row groups of ~2,600 rows for the scoring probe
BIG_BLOCK = 64 << 20  # larger than any file here: one block, no streaming
SMALL_BATCH = 1024  # rows per scoring batch
N = 20_000
# Budgets for peak growth per extra row, in bytes. Holding the rows instead of
# streaming them costs far more: the CSV alone is ~97 bytes a row, its Arrow
# string columns more (the controls below measure it).
ARROW_BUDGET = 8.0  # Arrow buffers are per block/batch: growth should be ~0
# Ingest keeps a documented dedup index of 16 bytes per accepted row (hash +
# first position); merging its sorted runs briefly holds old and new runs.
INGEST_NUMPY_BUDGET = 48.0
# Scoring keeps a thinned copy of the errors for the p99 (at 1024-row batches,
# every row: 4 bytes) and concatenates it at the end (another 4 bytes).
SCORE_NUMPY_BUDGET = 16.0


# ---------------------------------------------------------------- fixtures


def _write_csv(path: Path, rows: int, seed: int = 3) -> Path:
    from tasks.synthetic import write_weatheraus_like_csv

    return write_weatheraus_like_csv(path, rows, seed=seed)


def _with_bad_rows(src: Path, dst: Path) -> Path:
    """The CSV plus rows each ingest check rejects, spread over the file."""
    lines = src.read_text().splitlines(keepends=True)
    header, body = lines[0], lines[1:]

    def edited(i: int, **cells: str) -> str:
        # Unique future dates keep these rows' keys clear of the real ones.
        fields = body[i].rstrip("\n").split(",")
        names = header.rstrip("\n").split(",")
        for name, value in cells.items():
            fields[names.index(name)] = value
        return ",".join(fields) + "\n"

    bad = {
        50: body[10],  # duplicate key
        400: edited(400, Date="2032-01-01", MinTemp="abc"),  # not a number
        900: edited(900, Date="2033-01-01", MinTemp="50", MaxTemp="10"),  # rule
        1500: "2031-01-01,Albury,1,2\n",  # too few fields
        2200: body[2200].rstrip("\n") + ",extra\n",  # too many fields
    }
    out = [header]
    for i, line in enumerate(body):
        if i in bad:
            out.append(bad[i])
        out.append(line)
    dst.write_text("".join(out))
    return dst


def _ingest(csv: Path, data_dir: Path, block_size: int) -> Any:
    from flows.config import PRESETS
    from tasks.ingest import ingest

    return ingest(
        csv,
        data_dir,
        "weatheraus",
        RUN,
        block_size=block_size,
        rules=PRESETS["weatheraus"]["rules"],
        max_reject_fraction=0.5,
        **PRESET,
    )


def _score(ingested: Path, bundle: Path, data_dir: Path, batch_rows: int) -> Path:
    from tasks.score import Provenance, score_partition

    res = score_partition(
        ingested,
        bundle,
        data_dir,
        "weatheraus",
        RUN,
        Provenance("m", 1, "r", "c"),
        batch_rows=batch_rows,
    )
    return Path(res.output_dir)


def _read(partition: str | Path) -> pa.Table:
    return pq.read_table(sorted(Path(partition).glob("*.parquet"))[0])


def _row_groups(partition: str | Path) -> list[int]:
    meta = pq.ParquetFile(sorted(Path(partition).glob("*.parquet"))[0]).metadata
    return [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("streaming")


@pytest.fixture(scope="module")
def ingested(work: Path) -> Path:
    """3,000 clean rows in one row group, so scoring batches split it."""
    csv = _write_csv(work / "clean.csv", 3000)
    return Path(_ingest(csv, work / "clean", BIG_BLOCK).ingested_dir)


@pytest.fixture(scope="module")
def bundle(work: Path, ingested: Path) -> Path:
    from tasks.train import train_model

    schema = json.loads(
        pq.read_schema(next(ingested.glob("*.parquet"))).metadata[b"latentflow.schema"]
    )
    out = work / "bundle"
    train_model(
        ingested, schema, out, dataset="weatheraus", estimator_params=TINY_MODEL
    )
    return out


# --------------------------------------------------------------- equivalence


def test_ingest_block_size_changes_nothing_but_row_groups(work: Path) -> None:
    csv = _with_bad_rows(_write_csv(work / "raw.csv", 3000), work / "bad.csv")
    tiny = _ingest(csv, work / "tiny", 4096)
    big = _ingest(csv, work / "big", BIG_BLOCK)
    assert tiny.rows_rejected == big.rows_rejected >= 4
    assert tiny.reject_reasons == big.reject_reasons
    assert tiny.schema == big.schema and tiny.warnings == big.warnings
    assert _read(tiny.ingested_dir).equals(_read(big.ingested_dir), check_metadata=True)
    # Rejected rows with a wrong field count are written when their block is,
    # ahead of that block's other rejects, so only their order may differ.
    rej_tiny, rej_big = _read(tiny.rejected_dir), _read(big.rejected_dir)
    assert rej_tiny.schema.equals(rej_big.schema, check_metadata=True)
    assert rej_tiny.sort_by("_row_number").equals(rej_big.sort_by("_row_number"))
    # The small blocks really were small: rows reached the writer in pieces.
    groups = _row_groups(tiny.ingested_dir)
    assert len(groups) >= 20 and max(groups) <= 100
    assert len(_row_groups(big.ingested_dir)) == 1


def test_score_batch_rows_changes_nothing_but_row_groups(
    work: Path, ingested: Path, bundle: Path
) -> None:
    small = _read(_score(ingested, bundle, work / "s1024", SMALL_BATCH))
    large = _read(_score(ingested, bundle, work / "s65536", 65536))
    assert small.schema.equals(large.schema, check_metadata=True)
    # Same rows in the same order: the input's.
    assert small["_row_id"].equals(large["_row_id"])
    assert small["_row_id"].equals(_read(ingested)["_row_id"])
    for name in small.column_names:
        a, b = small[name].to_numpy(), large[name].to_numpy()
        if name.startswith("latent_") or name in ("recon_error", "anomaly_score"):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
        elif name not in ("is_anomaly", "explanation"):
            assert small[name].equals(large[name]), name
    # A flag may only differ where float rounding sits on the threshold.
    threshold = float(
        pq.read_schema(next((work / "s1024").rglob("*.parquet"))).metadata[
            b"latentflow.threshold"
        ]
    )
    err = large["recon_error"].to_numpy()
    clear = np.abs(err - threshold) > 1e-5 * max(1.0, threshold)
    flags_a, flags_b = small["is_anomaly"].to_numpy(), large["is_anomaly"].to_numpy()
    assert (flags_a[clear] == flags_b[clear]).all()
    groups = _row_groups(next((work / "s1024").glob("latent/*/*")))
    assert max(groups) <= SMALL_BATCH and len(groups) >= 3


# ------------------------------------------------------------ bounded memory


def _probe_main(argv: list[str]) -> None:
    """In a fresh interpreter: peak allocations per ingest or scoring run.

    ``argv`` is one JSON object: ``{"kind": "ingest"|"score", "runs": [...]}``.
    The first run is done twice and only the second one counts: the first
    pays for lazy imports and first-call caches, which are not per-row memory.
    The Arrow high-water mark only rises, so the runs go in increasing order of
    expected peak (N, then 4N, then the non-streaming control) and each is read
    as the mark after it; tracemalloc's peak is reset before each run.
    """
    import tracemalloc

    spec = json.loads(argv[0])

    def run(item: dict[str, Any], data_dir: str) -> None:
        if spec["kind"] == "ingest":
            _ingest(Path(item["csv"]), Path(data_dir), item["block_size"])
        else:
            _score(
                Path(item["ingested"]),
                Path(spec["bundle"]),
                Path(data_dir),
                item["batch_rows"],
            )

    pool = pa.default_memory_pool()
    first = spec["runs"][0]
    run(first, first["data_dir"] + "-warmup")
    tracemalloc.start()  # after the warm-up: modules it imported are not counted
    out = []
    for item in spec["runs"]:
        tracemalloc.reset_peak()
        run(item, item["data_dir"])
        peak = tracemalloc.get_traced_memory()[1]
        out.append({"arrow": pool.max_memory(), "numpy": peak})
    print("PROBE " + json.dumps(out), flush=True)


def _probe(spec: dict[str, Any]) -> list[dict[str, int]]:
    code = "import sys, tests.test_streaming_memory as t; t._probe_main(sys.argv[1:])"
    proc = subprocess.run(
        [sys.executable, "-c", code, json.dumps(spec)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("PROBE ")][-1]
    return json.loads(line[len("PROBE ") :])


def _per_row(peaks: list[dict[str, int]], a: int, b: int, key: str) -> float:
    """Bytes of extra peak per extra row between run ``a`` and run ``b``."""
    return (peaks[b][key] - peaks[a][key]) / (3 * N)


@pytest.fixture(scope="module")
def sized(work: Path) -> dict[Any, Any]:
    """N and 4N rows as CSVs and as partitions with row groups of PART_BLOCK.

    Scoring reads a row group at a time, so its memory scales with the row
    group, which ingest bounds by its block size; ``"whole"`` is the 4N rows
    in one row group, for the non-streaming control.
    """
    out: dict[Any, Any] = {}
    for rows in (N, 4 * N):
        csv = _write_csv(work / f"rows{rows}.csv", rows, seed=5)
        res = _ingest(csv, work / f"part{rows}", PART_BLOCK)
        out[rows] = {"csv": str(csv), "ingested": res.ingested_dir}
    out["whole"] = _ingest(Path(out[4 * N]["csv"]), work / "whole", BIG_BLOCK)
    return out


def test_ingest_peak_memory_does_not_grow_with_rows(
    work: Path, sized: dict[Any, Any]
) -> None:
    runs = [
        {"csv": sized[N]["csv"], "block_size": SMALL_BLOCK},
        {"csv": sized[4 * N]["csv"], "block_size": SMALL_BLOCK},
        # Control: one block holds the whole file, i.e. no streaming.
        {"csv": sized[4 * N]["csv"], "block_size": BIG_BLOCK},
    ]
    for i, run in enumerate(runs):
        run["data_dir"] = str(work / f"probe-ingest-{i}")
    peaks = _probe({"kind": "ingest", "runs": runs})
    arrow, numpy_ = _per_row(peaks, 0, 1, "arrow"), _per_row(peaks, 0, 1, "numpy")
    control = (peaks[2]["arrow"] - peaks[0]["arrow"]) / (4 * N)
    detail = f"peaks {peaks}; per extra row: arrow {arrow:.1f} B, numpy {numpy_:.1f} B"
    assert arrow < ARROW_BUDGET, detail
    assert numpy_ < INGEST_NUMPY_BUDGET, detail
    assert control > 10 * ARROW_BUDGET, f"control measures {control:.1f} B/row"


def test_score_peak_memory_does_not_grow_with_rows(
    work: Path, sized: dict[Any, Any], bundle: Path
) -> None:
    runs = [
        {"ingested": sized[N]["ingested"], "batch_rows": SMALL_BATCH},
        {"ingested": sized[4 * N]["ingested"], "batch_rows": SMALL_BATCH},
        # Control: one row group and one batch hold every row: no streaming.
        {"ingested": sized["whole"].ingested_dir, "batch_rows": 4 * N},
    ]
    for i, run in enumerate(runs):
        run["data_dir"] = str(work / f"probe-score-{i}")
    peaks = _probe({"kind": "score", "bundle": str(bundle), "runs": runs})
    arrow, numpy_ = _per_row(peaks, 0, 1, "arrow"), _per_row(peaks, 0, 1, "numpy")
    control = (peaks[2]["arrow"] - peaks[0]["arrow"]) / (4 * N)
    detail = f"peaks {peaks}; per extra row: arrow {arrow:.1f} B, numpy {numpy_:.1f} B"
    assert arrow < ARROW_BUDGET, detail
    assert numpy_ < SCORE_NUMPY_BUDGET, detail
    assert control > 10 * ARROW_BUDGET, f"control measures {control:.1f} B/row"
