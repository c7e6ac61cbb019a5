"""Scoring on a Dask cluster: 1 vs 2 worker processes, and the cost per task.

``python -m benchmarks.scaling --rows 10000000`` builds (or reuses) a
weatherAUS-shaped ingested partition of that many rows, trains a small model
once, then scores the partition with the product's partitioned path (the
``latentflow-score`` subflow on prefect-dask's ``DaskTaskRunner``) on a
``LocalCluster`` of 1 and then 2 worker processes with one thread each (Dask's
nanny sets ``OMP_NUM_THREADS=1``, so torch uses one thread per worker: the
result records it). It prints one JSON line (also written to
``<scratch>/scaling.json``):

- per worker count: the first (cold) run, which pays for the workers' imports
  and model loading, and the median of 3 warm runs: seconds, rows/s, the sum
  of in-task compute (each unit's own wall time) and the overhead per task;
- ``speedup_2v1``: median rows/s with 2 workers over 1 worker;
- ``sequential``: the single-process path (``score_partition``, torch limited
  to 1 thread) on the same partition, for reference.

Overhead per task is ``(workers * wall - sum of in-task seconds) / tasks``:
the worker-seconds a run spends on anything but scoring (Prefect task runs,
Dask scheduling, the subflow, planning and the commit), per task. With one
worker it is simply wall time minus compute, per task.

The data comes from ``tasks.synthetic`` through ``benchmarks.perf``'s steps: the
CSV is reused from ``benchmarks/results/data`` (where ``make bench`` keeps
it) and the ingested partition and model from ``<scratch>``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "results" / "data"
DEFAULT_SCRATCH = REPO / "benchmarks" / "results" / "scaling"
REPEATS = 3
BUNDLE_EPOCHS = 2
BUNDLE_TRAIN_ROWS = 50_000


def _prepare(rows: int, scratch: Path) -> tuple[Path, Path]:
    """The ingested partition and a model bundle for ``rows`` rows (cached)."""
    from benchmarks import perf

    marker = scratch / f"prepared-{rows}.json"
    if marker.is_file():
        prepared = json.loads(marker.read_text())
        ingested, bundle = Path(prepared["ingested"]), Path(prepared["bundle"])
        if ingested.is_dir() and (bundle / "bundle.json").is_file():
            return ingested, bundle
    csv = DATA / f"weatheraus_like_{rows}_seed0.csv"
    if not csv.is_file():
        csv = scratch / csv.name
        if not csv.is_file():
            perf.step_generate(str(csv), rows)
    ingested = Path(
        perf.step_ingest(str(csv), str(scratch / f"data-{rows}"))["ingested_dir"]
    )
    bundle = scratch / f"bundle-{rows}"
    perf.step_bundle(
        str(ingested), str(bundle), BUNDLE_EPOCHS, min(rows, BUNDLE_TRAIN_ROWS)
    )
    marker.write_text(json.dumps({"ingested": str(ingested), "bundle": str(bundle)}))
    return ingested, bundle


def _score_once(
    client: Any, ingested: Path, bundle: Path, out: Path, unit_rows: int
) -> dict[str, Any]:
    """One run of the partitioned scoring subflow: wall and in-task seconds.

    Dask's task stream gives each unit task's time on its worker (the Prefect
    task engine around the unit), so the overhead splits into a per-task part
    (that time minus the unit's own) and what the run pays once (subflow,
    planning, connecting, committing).
    """
    from distributed import get_task_stream
    from prefect_dask import DaskTaskRunner

    from benchmarks.perf import DATASET, RUN_DATE
    from flows.nightly import score_partitioned
    from tasks.score import Provenance

    address = client.scheduler.address
    t0 = time.perf_counter()
    with get_task_stream(client=client) as stream:
        res = score_partitioned.with_options(
            task_runner=DaskTaskRunner(address=address)
        )(
            ingested,
            bundle,
            out,
            DATASET,
            RUN_DATE,
            Provenance(f"{DATASET}-autoencoder", 1, "bench", "bench"),
            tag="bench",
            batch_rows=65536,
            unit_rows=unit_rows,
        )
    wall = time.perf_counter() - t0
    spans = [
        ss["stop"] - ss["start"]
        for item in stream.data
        for ss in item.get("startstops", ())
        if ss.get("action") == "compute"
    ]
    return {
        "wall_s": wall,
        "compute_s": res.compute_seconds,
        "worker_task_s": sum(spans),
        "tasks": res.units,
        "rows": res.rows_scored,
    }


def _summarise(runs: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Medians over the warm runs, and the overhead split per task / per run."""
    wall = statistics.median(r["wall_s"] for r in runs)
    compute = statistics.median(r["compute_s"] for r in runs)
    on_worker = statistics.median(r["worker_task_s"] for r in runs)
    tasks, rows = runs[0]["tasks"], runs[0]["rows"]
    return {
        "median_s": wall,
        "runs_s": [r["wall_s"] for r in runs],
        "rows_per_s": rows / wall,
        "tasks": tasks,
        "compute_s": compute,
        # What the brief asks for: worker-seconds not spent scoring, per task.
        "overhead_per_task_s": (workers * wall - compute) / tasks,
        # Its parts: the Prefect task engine around each unit on its worker...
        "engine_per_task_s": (on_worker - compute) / tasks,
        # ...and the run's fixed cost (subflow, plan, connect, commit).
        "fixed_per_run_s": wall - on_worker / workers,
    }


def bench_dask_scaling(
    rows: int,
    scratch: Path,
    unit_rows: int | None = None,
    prepared: tuple[Path, Path] | None = None,
) -> dict[str, Any]:
    """Score ``rows`` rows on 1 and 2 Dask workers; scaling and overhead per task.

    Parameters
    ----------
    rows
        Rows in the synthetic weatherAUS-shaped partition.
    scratch
        Working directory: the ingested partition, the model and the outputs
        (reused by later calls with the same ``rows``).
    unit_rows
        Most rows per scoring unit; default: the pipeline's
        (:data:`tasks.partitions.DEFAULT_UNIT_ROWS`, fewer for small
        partitions: :func:`tasks.partitions.unit_size`).
    prepared
        An existing (ingested partition, model bundle) to score instead of
        building them (``make bench`` passes the ones its scoring section made).

    Returns
    -------
    dict
        JSON-able results (see the module docstring).
    """
    import pyarrow.parquet as pq
    import torch
    from distributed import Client, LocalCluster

    from benchmarks.perf import DATASET, RUN_DATE
    from flows.runners import worker_environment
    from tasks.partitions import DEFAULT_UNIT_ROWS, partition_files, unit_size
    from tasks.score import Provenance, score_partition

    unit_rows = unit_rows or DEFAULT_UNIT_ROWS
    scratch = Path(scratch).resolve()
    scratch.mkdir(parents=True, exist_ok=True)
    ingested, bundle = prepared or _prepare(rows, scratch)
    metas = [pq.read_metadata(f) for f in partition_files(ingested)]
    total = sum(m.num_rows for m in metas)
    out: dict[str, Any] = {
        "rows": total,
        "row_groups": sum(m.num_row_groups for m in metas),
        "unit_rows": unit_size(total, unit_rows),
        "cpu_count": os.cpu_count(),
        "load_before": os.getloadavg(),
        "workers": {},
    }
    for workers in (1, 2):
        with (
            worker_environment(),
            LocalCluster(
                n_workers=workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            ) as cluster,
            Client(cluster, set_as_default=False) as client,
        ):
            target = scratch / f"out-{rows}-{workers}w"
            cold = _score_once(client, ingested, bundle, target, unit_rows)
            runs = [
                _score_once(client, ingested, bundle, target, unit_rows)
                for _ in range(REPEATS)
            ]
            threads = sorted(set(client.run(torch.get_num_threads).values()))
        result = _summarise(runs, workers)
        result["cold_s"] = cold["wall_s"]
        result["torch_threads_per_worker"] = threads
        out["workers"][str(workers)] = result
    one, two = out["workers"]["1"], out["workers"]["2"]
    out["speedup_2v1"] = two["rows_per_s"] / one["rows_per_s"]

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    seq = score_partition(
        ingested,
        bundle,
        scratch / f"out-{rows}-sequential",
        DATASET,
        RUN_DATE,
        Provenance(f"{DATASET}-autoencoder", 1, "bench", "bench"),
    )
    seconds = time.perf_counter() - t0
    out["sequential"] = {
        "seconds": seconds,
        "rows_per_s": seq.rows_scored / seconds,
        "torch_threads": 1,
    }
    out["load_after"] = os.getloadavg()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--scratch", type=Path, default=DEFAULT_SCRATCH)
    p.add_argument("--unit-rows", type=int, default=None)
    p.add_argument("--ingested", type=Path, help="an ingested partition to score")
    p.add_argument("--bundle", type=Path, help="the model bundle to score it with")
    args = p.parse_args(argv)
    if (args.ingested is None) != (args.bundle is None):
        p.error("--ingested and --bundle go together")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    logging.getLogger("distributed").setLevel(logging.ERROR)
    prepared = (args.ingested, args.bundle) if args.ingested else None
    result = bench_dask_scaling(args.rows, args.scratch, args.unit_rows, prepared)
    line = json.dumps(result)
    (Path(args.scratch) / "scaling.json").write_text(line + "\n")
    print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
