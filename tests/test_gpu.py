"""The GPU end to end: scoring, drift and explanations on the run's device.

Every CUDA test skips cleanly on a machine without CUDA; the benchmark's own
skip is checked there instead.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import run_pipeline

HAS_CUDA = torch.cuda.is_available()
cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA; none on this machine")
FAST = {"epochs": 3, "hidden": (16,), "latent_dim": 3, "batch_size": 128}


@pytest.mark.skipif(HAS_CUDA, reason="checks the benchmark's skip without CUDA")
def test_gpu_benchmark_skips_cleanly_without_cuda():
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "CUDA not available: skipped"
    assert "Traceback" not in proc.stderr


@cuda
@pytest.mark.gpu
def test_reuse_run_scores_drifts_and_explains_on_cuda(
    prefect_harness, small_csv, tmp_path
):
    """A reuse run trains nothing: whatever CUDA memory it allocates is scoring,
    drift and explanations. Before, they loaded the model on the CPU (0 bytes)."""
    base = {"input": str(small_csv), "data_dir": str(tmp_path / "lf"), **FAST}
    first = run_pipeline(None, {**base, "run_date": date(2024, 3, 1), "device": "cpu"})
    assert first["trained"]
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    on_cpu = torch.cuda.max_memory_allocated()
    again = run_pipeline(None, {**base, "run_date": date(2024, 3, 2), "device": "cuda"})
    assert not again["trained"] and "drift" in again
    assert torch.cuda.max_memory_allocated() > on_cpu == 0

    import pandas as pd

    a = pd.read_parquet(first["output"]).sort_values("_row_id")
    b = pd.read_parquet(again["output"]).sort_values("_row_id")
    np.testing.assert_allclose(a["recon_error"], b["recon_error"], rtol=1e-3, atol=1e-5)


@cuda
@pytest.mark.gpu
def test_gpu_benchmark_runs_small(tmp_path):
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    argv = ["--score-rows", "20000", "--train-rows", "5000", "--epochs", "3"]
    argv += ["--weather", str(tmp_path / "absent.csv"), "--out", str(out)]
    assert gpu.main(argv) == 0
    import json

    res = json.loads(out.read_text())
    assert not [k for k in res if k.endswith("_error")], res
    assert res["accelerator"] == "cuda"
    assert res["training"]["accelerated"]["rows_epochs_per_s"] > 0
    assert res["scoring"]["accelerated"]["rows"] == 20000
    assert res["scoring"]["accelerated"]["workers"] > 1


def test_gpu_benchmark_dry_run_on_cpu(tmp_path):
    """The benchmark's whole path, with the CPU in CUDA's place: the script a
    GPU lease runs cannot rot on machines without one."""
    import json

    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    argv = ["--dry-run-on-cpu", "--score-rows", "3000", "--train-rows", "2000"]
    argv += ["--epochs", "2", "--weather", str(tmp_path / "absent.csv")]
    argv += ["--out", str(out), "--profile", str(tmp_path / "profile.txt")]
    assert gpu.main(argv) == 0
    res = json.loads(out.read_text())
    assert not [k for k in res if k.endswith("_error")], res
    assert res["accelerator"] == "cpu"
    assert res["training"]["accelerated"]["rows_epochs_per_s"] > 0
    scoring = res["scoring"]
    assert scoring["accelerated"]["rows"] == scoring["cpu"]["rows"] == 3000
    assert scoring["accelerated"]["workers"] == 1
    assert "score_partition" in (tmp_path / "profile.txt").read_text()


@cuda
@pytest.mark.gpu
def test_cuda_scoring_on_threads_equals_one_thread(small_csv, tmp_path):
    """Threads score batches at once on CUDA: the same output as one thread,
    and the same scores as the CPU up to float rounding."""
    import pyarrow.parquet as pq

    from benchmarks.perf import step_bundle, step_ingest
    from tasks.score import Provenance, score_partition

    ingested = step_ingest(str(small_csv), str(tmp_path / "data"))["ingested_dir"]
    bundle = tmp_path / "bundle"
    step_bundle(ingested, str(bundle), 2, 3000)
    meta = Provenance("m", 1, "r", "c")
    out = {}
    for device, workers in (("cuda", 1), ("cuda", 4), ("cpu", 1)):
        res = score_partition(
            Path(ingested),
            bundle,
            tmp_path / f"{device}-{workers}",
            "weatheraus",
            date(2024, 1, 1),
            meta,
            batch_rows=256,
            device=device,
            workers=workers,
        )
        out[device, workers] = pq.read_table(res.output_dir)
    assert out["cuda", 1].equals(out["cuda", 4])
    np.testing.assert_allclose(
        out["cuda", 1]["recon_error"].to_numpy(),
        out["cpu", 1]["recon_error"].to_numpy(),
        rtol=1e-3,
        atol=1e-5,
    )


def _fit_on_cuda(graphs: bool, epochs: int = 4):
    """The pipeline's default estimator on CUDA, with graphed steps or eager."""
    from benchmarks.perf import pipeline_estimator_params
    from models.estimator import AutoencoderReducer
    from models.objectives import OBJECTIVES

    rng = np.random.default_rng(0)
    x = rng.standard_normal((5000, 12)).astype(np.float32)
    x[:, 6:] = x[:, :6] @ rng.standard_normal((6, 6)).astype(np.float32)
    params = pipeline_estimator_params(epochs)
    params.update(device="cuda", patience=None, latent_dim=3, pca_axes=2)
    before = OBJECTIVES["ae"].graph_safe
    OBJECTIVES["ae"].graph_safe = graphs
    try:
        return AutoencoderReducer(**params).fit(x), x
    finally:
        OBJECTIVES["ae"].graph_safe = before


@cuda
@pytest.mark.gpu
def test_graphed_training_repeats_and_matches_eager_steps():
    """CUDA-graph steps run the eager steps' arithmetic: the same seed gives
    the same model twice, and the eager loop's model up to float rounding
    (4 epochs: each shape's warm-up, its capture, then replays)."""
    a, x = _fit_on_cuda(True)
    b, _ = _fit_on_cuda(True)
    eager, _ = _fit_on_cuda(False)
    assert a.history_["train_loss"] == b.history_["train_loss"]
    np.testing.assert_array_equal(a.transform(x), b.transform(x))
    np.testing.assert_allclose(
        a.history_["train_loss"], eager.history_["train_loss"], rtol=1e-3
    )
    np.testing.assert_allclose(a.transform(x), eager.transform(x), atol=1e-3)
    assert a.history_["train_loss"][-1] < a.history_["train_loss"][0]
