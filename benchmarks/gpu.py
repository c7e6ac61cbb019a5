"""``python -m benchmarks.gpu``: CUDA against the CPU, on the pipeline's own code.

Measures, each on CUDA and on the CPU (``--cpu-threads`` torch threads, 2 by
default: the targets are stated against a 2-core machine):

1. training: rows x epochs per second of ``AutoencoderReducer.fit`` at the
   pipeline's defaults (the first epoch, which pays for set-up, is left out);
2. scoring: rows per second of ``score_partition`` (Parquet -> model ->
   Parquet) at ``--score-rows`` (10M by default), next to the bare Parquet
   read + write floor of the same rows;
3. the end-to-end weatherAUS run: wall time of ``latentflow run --retrain``
   with ``--device cuda`` and ``--device cpu`` (skipped if the file is absent).

Without CUDA it prints ``CUDA not available: skipped`` and exits 0. Results go
to ``benchmarks/results/gpu.json``; docs/benchmarks.md has the protocol.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.perf import (
    DATASET,
    RUN_DATE,
    pipeline_estimator_params,
    step_bundle,
    step_generate,
    step_ingest,
    step_prepare_training,
    step_score_floor,
)

REPO = Path(__file__).resolve().parents[1]
WEATHER_CSV = REPO.parent / "shared" / "data" / "weatherAUS.csv"
RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
TRAIN_SPEEDUP_TARGET = 20.0  # CUDA training vs the 2-core CPU rate
SKIPPED = "CUDA not available: skipped"


def _log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


def train_rate(x_npy: str, epochs: int, device: str) -> dict[str, Any]:
    """Rows x epochs per second of ``fit`` on ``device`` (first epoch excluded)."""
    import numpy as np

    from models.estimator import AutoencoderReducer

    x = np.load(x_npy)
    params = pipeline_estimator_params(epochs)
    params.update(device=device, patience=None)
    stamps: list[float] = []
    est = AutoencoderReducer(
        **params, epoch_callback=lambda *_: stamps.append(time.perf_counter())
    )
    stamps.append(time.perf_counter())
    est.fit(x)
    rows = len(x) - int(params["val_fraction"] * len(x))
    later = [b - a for a, b in itertools.pairwise(stamps[1:])]
    seconds = sum(later) if later else stamps[-1] - stamps[0]
    counted = len(later) if later else len(stamps) - 1
    return {
        "device": device,
        "rows_per_epoch": rows,
        "epochs_timed": counted,
        "rows_epochs_per_s": rows * counted / max(seconds, 1e-9),
    }


def score_rate(
    ingested_dir: str, bundle_dir: str, data_dir: str, device: str
) -> dict[str, Any]:
    """Rows per second of ``score_partition`` on ``device``."""
    from flows.config import PipelineConfig
    from tasks.score import score_partition

    batch_rows = PipelineConfig(input="bench.csv").score_batch_rows
    t0 = time.perf_counter()
    res = score_partition(
        Path(ingested_dir),
        Path(bundle_dir),
        Path(data_dir),
        DATASET,
        RUN_DATE,
        model_name=f"{DATASET}-autoencoder",
        model_version=1,
        mlflow_run_id="bench",
        config_hash="bench",
        batch_rows=batch_rows,
        device=device,
    )
    seconds = time.perf_counter() - t0
    return {
        "device": device,
        "rows": res.rows_scored,
        "seconds": seconds,
        "rows_per_s": res.rows_scored / seconds,
    }


def e2e_seconds(csv: Path, device: str, scratch: Path) -> dict[str, Any]:
    """Wall time of ``latentflow run --retrain --device DEVICE`` on ``csv``."""
    exe = Path(sys.executable).with_name("latentflow")
    env = {**os.environ, "PREFECT_HOME": str(scratch / f"prefect-{device}")}
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [str(exe), "run", "--input", str(csv), "--retrain", "--device", device]
    argv += ["--data-dir", str(scratch / f"e2e-{device}")]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"latentflow run on {device} failed: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"device": device, "seconds": seconds, "rows": summary["rows_scored"]}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    results: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(0),
        "cpu_threads": args.cpu_threads,
        "host_cpus": os.cpu_count(),
    }
    with tempfile.TemporaryDirectory(prefix="lf-gpu-bench-") as tmp:
        scratch = Path(tmp)
        csv = scratch / "bench.csv"
        _log(f"generating {args.score_rows:,} rows")
        step_generate(str(csv), args.score_rows)
        ingested = step_ingest(str(csv), str(scratch / "data"))["ingested_dir"]
        csv.unlink()

        x_npy = str(scratch / "x.npy")
        step_prepare_training(ingested, x_npy, args.train_rows)
        torch.set_num_threads(args.cpu_threads)
        _log(f"training on the CPU ({args.cpu_threads} threads)")
        cpu = train_rate(x_npy, args.epochs, "cpu")
        torch.set_num_threads(os.cpu_count() or 1)
        _log("training on CUDA")
        train_rate(x_npy, 2, "cuda")  # warm-up: CUDA context, kernels
        cuda = train_rate(x_npy, args.epochs, "cuda")
        speedup = cuda["rows_epochs_per_s"] / cpu["rows_epochs_per_s"]
        results["training"] = {
            "cpu": cpu,
            "cuda": cuda,
            "speedup": speedup,
            "target": TRAIN_SPEEDUP_TARGET,
            "met": speedup >= TRAIN_SPEEDUP_TARGET,
        }

        bundle = str(scratch / "bundle")
        step_bundle(ingested, bundle, 2, min(args.train_rows, 50_000))
        _log("scoring: floor, CUDA, CPU")
        floor = step_score_floor(ingested, bundle, str(scratch / "floor.parquet"))
        on_cuda = score_rate(ingested, bundle, str(scratch / "score-cuda"), "cuda")
        torch.set_num_threads(args.cpu_threads)
        on_cpu = score_rate(ingested, bundle, str(scratch / "score-cpu"), "cpu")
        torch.set_num_threads(os.cpu_count() or 1)
        results["scoring"] = {
            "rows": args.score_rows,
            "floor_seconds": floor["seconds"],
            "cuda": on_cuda,
            "cpu": on_cpu,
            "cuda_vs_floor": on_cuda["seconds"] / floor["seconds"],
            "met": on_cuda["seconds"] <= floor["seconds"],
        }

        if args.weather.is_file():
            _log(f"end to end on {args.weather}")
            results["e2e"] = {
                d: e2e_seconds(args.weather, d, scratch) for d in ("cuda", "cpu")
            }
    return results


def report(results: dict[str, Any]) -> list[str]:
    t, s = results["training"], results["scoring"]
    lines = [
        f"GPU {results['gpu']}; CPU rates with {results['cpu_threads']} threads",
        f"training rows x epochs/s: CUDA {t['cuda']['rows_epochs_per_s']:,.0f},"
        f" CPU {t['cpu']['rows_epochs_per_s']:,.0f}: {t['speedup']:.1f}x"
        f" (target >= {t['target']:.0f}x: {'met' if t['met'] else 'NOT met'})",
        f"scoring {s['rows']:,} rows: CUDA {s['cuda']['rows_per_s']:,.0f} rows/s"
        f" ({s['cuda']['seconds']:.1f} s), CPU {s['cpu']['rows_per_s']:,.0f} rows/s"
        f" ({s['cpu']['seconds']:.1f} s), Parquet floor {s['floor_seconds']:.1f} s:"
        f" CUDA {s['cuda_vs_floor']:.2f}x floor"
        f" (target <= 1x: {'met' if s['met'] else 'NOT met'})",
    ]
    if "e2e" in results:
        e = results["e2e"]
        lines.append(
            f"weatherAUS end to end (--retrain): CUDA {e['cuda']['seconds']:.1f} s,"
            f" CPU {e['cpu']['seconds']:.1f} s"
        )
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    p.add_argument("--score-rows", type=int, default=10_000_000)
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--weather", type=Path, default=WEATHER_CSV)
    p.add_argument("--out", type=Path, default=RESULTS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(SKIPPED, flush=True)
        return 0
    results = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for line in report(results):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
