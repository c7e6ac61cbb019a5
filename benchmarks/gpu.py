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
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.perf import (
    step_bundle,
    step_generate,
    step_ingest,
    step_prepare_training,
    step_score,
    step_score_floor,
    step_train_product,
)

REPO = Path(__file__).resolve().parents[1]
WEATHER_CSV = REPO.parent / "shared" / "data" / "weatherAUS.csv"
RESULTS = REPO / "benchmarks" / "results" / "gpu.json"
TRAIN_SPEEDUP_TARGET = 20.0  # CUDA training vs the 2-core CPU rate
SKIPPED = "CUDA not available: skipped"


def _log(msg: str) -> None:
    print(f"[gpu-bench] {msg}", file=sys.stderr, flush=True)


def train_rate(x_npy: str, epochs: int, device: str) -> dict[str, Any]:
    """Rows x epochs per second of ``fit`` on ``device`` (``perf.step_train_product``;
    the first epoch, which pays for set-up, is left out)."""
    res = step_train_product(x_npy, epochs, device)
    timed = res["epoch_seconds"][1:] or res["epoch_seconds"]
    return {
        "device": device,
        "rows_per_epoch": res["rows_per_epoch"],
        "epochs_timed": len(timed),
        "rows_epochs_per_s": res["rows_per_epoch"] * len(timed) / max(sum(timed), 1e-9),
    }


def score_rate(
    ingested_dir: str,
    bundle_dir: str,
    data_dir: str,
    device: str,
    workers: int | None = None,
    profile: Path | None = None,
) -> dict[str, Any]:
    """Rows per second of ``score_partition`` on ``device`` (``perf.step_score``:
    the pipeline's batch size; ``workers`` None: its default for the device).

    With ``profile``, the run is also profiled (cProfile, this thread only)
    and the 40 costliest calls are written there.
    """
    profiler = cProfile.Profile() if profile is not None else None
    if profiler is not None:
        profiler.enable()
    res = step_score(ingested_dir, bundle_dir, data_dir, device=device, workers=workers)
    if profiler is not None:
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(40)
        profile.write_text(text.getvalue())
    return {
        "device": device,
        "workers": res["workers"],
        "batch_rows": res["batch_rows"],
        "rows": res["rows"],
        "seconds": res["seconds"],
        "rows_per_s": res["rows"] / res["seconds"],
    }


def e2e(csv: Path, accel: str, scratch: Path) -> dict[str, Any]:
    """The weatherAUS run on ``accel``, then on the CPU (each trains)."""
    return {
        "accelerated": e2e_seconds(csv, accel, scratch / "e2e-accelerated"),
        "cpu": e2e_seconds(csv, "cpu", scratch / "e2e-cpu"),
    }


def e2e_seconds(csv: Path, device: str, where: Path) -> dict[str, Any]:
    """Wall time of ``latentflow run --retrain --device DEVICE`` on ``csv``,
    in a fresh process (``python -m flows.cli``: the console script's code)."""
    (where / "prefect").mkdir(parents=True)
    env = {**os.environ, "PREFECT_HOME": str(where / "prefect")}
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env.update(LATENTFLOW_WARM="off", PYTHONPATH=os.pathsep.join(path))
    env.pop("MLFLOW_TRACKING_URI", None)
    argv = [sys.executable, "-m", "flows.cli", "run", "--input", str(csv)]
    argv += ["--retrain", "--device", device, "--quiet"]
    argv += ["--data-dir", str(where / "data")]
    t0 = time.perf_counter()
    proc = subprocess.run(
        argv, env=env, cwd=REPO, capture_output=True, text=True, check=False
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"latentflow run on {device} failed: {proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "device": device,
        "seconds": seconds,
        "rows": summary["rows_scored"],
        "trained": summary["trained"],
    }


class Results:
    """The results so far, rewritten to ``out`` after every section, so that a
    run cut short (a lease's time limit) still leaves what it measured."""

    def __init__(self, out: Path, **facts: Any) -> None:
        self.out = out
        self.data: dict[str, Any] = dict(facts)
        self.save()

    def add(self, section: str, value: Any) -> None:
        self.data[section] = value
        self.save()
        for line in report({section: value}):
            print(line, flush=True)

    def save(self) -> None:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(json.dumps(self.data, indent=2, default=str) + "\n")


def _section(results: Results, name: str, measure: Callable[[], Any]) -> None:
    """Run one section; a failure is recorded and the next section still runs."""
    try:
        results.add(name, measure())
    except Exception as exc:
        _log(f"{name} failed: {type(exc).__name__}: {exc}")
        results.add(f"{name}_error", f"{type(exc).__name__}: {exc}")


def run(args: argparse.Namespace, accel: str) -> dict[str, Any]:
    """Every measurement, ``accel`` (``cuda``, or ``cpu`` for a dry run)
    against the CPU with ``--cpu-threads`` threads."""
    import torch

    all_threads = torch.get_num_threads()
    results = Results(
        args.out,
        accelerator=accel,
        gpu=torch.cuda.get_device_name(0) if accel == "cuda" else None,
        torch=torch.__version__,
        cpu_threads=args.cpu_threads,
        host_cpus=os.cpu_count(),
    )
    with tempfile.TemporaryDirectory(prefix="lf-gpu-bench-") as tmp:
        scratch = Path(tmp)
        csv = scratch / "bench.csv"
        _log(f"generating {args.score_rows:,} rows")
        step_generate(str(csv), args.score_rows)
        ingested = step_ingest(str(csv), str(scratch / "data"))["ingested_dir"]
        csv.unlink()

        def training() -> dict[str, Any]:
            x_npy = str(scratch / "x.npy")
            step_prepare_training(ingested, x_npy, args.train_rows)
            torch.set_num_threads(args.cpu_threads)
            _log(f"training on the CPU ({args.cpu_threads} threads)")
            cpu = train_rate(x_npy, args.epochs, "cpu")
            torch.set_num_threads(all_threads)
            _log(f"training on {accel}")
            train_rate(x_npy, 2, accel)  # warm-up: CUDA context, kernels
            fast = train_rate(x_npy, args.epochs, accel)
            speedup = fast["rows_epochs_per_s"] / cpu["rows_epochs_per_s"]
            return {
                "cpu": cpu,
                "accelerated": fast,
                "speedup": speedup,
                "target": TRAIN_SPEEDUP_TARGET,
                "met": speedup >= TRAIN_SPEEDUP_TARGET,
            }

        if "training" in args.sections:
            _section(results, "training", training)

        def scoring() -> dict[str, Any]:
            bundle = str(scratch / "bundle")
            step_bundle(ingested, bundle, 2, min(args.train_rows, 50_000))
            _log("scoring: floor, then the pipeline")
            floor = step_score_floor(ingested, bundle, str(scratch / "floor.parquet"))
            # Once untimed, single-threaded (profiled with --profile): CUDA's
            # context and kernels, the model's first load.
            score_rate(
                ingested,
                bundle,
                str(scratch / "score-warm"),
                accel,
                1,
                profile=args.profile,
            )
            default = score_rate(ingested, bundle, str(scratch / "score-a"), accel)
            # The pipeline's thread count against others: how it scales.
            most = 2 * (os.cpu_count() or 1)
            threads = [
                score_rate(ingested, bundle, str(scratch / f"score-{w}"), accel, w)
                for w in (1, 8, 16)
                if w < most and w != default["workers"]
            ]
            torch.set_num_threads(args.cpu_threads)
            on_cpu = score_rate(ingested, bundle, str(scratch / "score-cpu"), "cpu")
            torch.set_num_threads(all_threads)
            return {
                "rows": args.score_rows,
                "floor_seconds": floor["seconds"],
                "accelerated": default,
                "accelerated_threads": threads,
                "cpu": on_cpu,
                "vs_floor": default["seconds"] / floor["seconds"],
                "met": default["seconds"] <= floor["seconds"],
            }

        if "scoring" in args.sections:
            _section(results, "scoring", scoring)

        if "e2e" in args.sections and args.weather.is_file():
            _log(f"end to end on {args.weather}")
            _section(results, "e2e", lambda: e2e(args.weather, accel, scratch))
    return results.data


def report(results: dict[str, Any]) -> list[str]:
    """One line per measured section in ``results``."""
    lines = []
    if "training" in results:
        t = results["training"]
        lines.append(
            "training rows x epochs/s:"
            f" accelerated {t['accelerated']['rows_epochs_per_s']:,.0f},"
            f" CPU {t['cpu']['rows_epochs_per_s']:,.0f}: {t['speedup']:.1f}x"
            f" (target >= {t['target']:.0f}x: {'met' if t['met'] else 'NOT met'})"
        )
    if "scoring" in results:
        s = results["scoring"]
        a, c = s["accelerated"], s["cpu"]
        others = ", ".join(
            f"{t['seconds']:.1f} s with {t['workers']}"
            for t in s["accelerated_threads"]
        )
        lines.append(
            f"scoring {s['rows']:,} rows: accelerated {a['rows_per_s']:,.0f} rows/s"
            f" ({a['seconds']:.1f} s, {a['workers']} threads; {others}),"
            f" CPU {c['rows_per_s']:,.0f} rows/s"
            f" ({c['seconds']:.1f} s), Parquet floor {s['floor_seconds']:.1f} s:"
            f" {s['vs_floor']:.2f}x floor"
            f" (target <= 1x: {'met' if s['met'] else 'NOT met'})"
        )
    if "e2e" in results:
        e = results["e2e"]
        lines.append(
            "weatherAUS end to end (--retrain): "
            + ", ".join(f"{d} {v['seconds']:.1f} s" for d, v in e.items())
        )
    lines += [f"{k}: {v}" for k, v in results.items() if k.endswith("_error")]
    return lines


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    p.add_argument("--score-rows", type=int, default=10_000_000)
    p.add_argument("--train-rows", type=int, default=100_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--cpu-threads", type=int, default=2)
    p.add_argument("--weather", type=Path, default=WEATHER_CSV)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="profile the untimed first scoring run (one thread) into this file",
    )
    p.add_argument(
        "--sections",
        type=lambda text: set(text.split(",")),
        default={"training", "scoring", "e2e"},
        help="which to measure, comma-separated: training,scoring,e2e (all)",
    )
    p.add_argument(
        "--dry-run-on-cpu",
        action="store_true",
        help="measure the CPU in CUDA's place: checks this script without a GPU",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import torch

    if args.dry_run_on_cpu:
        accel = "cpu"
    elif torch.cuda.is_available():
        accel = "cuda"
    else:
        print(SKIPPED, flush=True)
        return 0
    results = run(args, accel)
    print("--- summary", flush=True)
    for line in report(results):
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
