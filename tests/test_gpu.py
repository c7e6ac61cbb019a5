"""The GPU end to end: scoring, drift and explanations on the run's device.

Every CUDA test skips cleanly on a machine without CUDA; the benchmark's own
skip is checked there instead.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import date

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
    assert res["training"]["cuda"]["rows_epochs_per_s"] > 0
    assert res["scoring"]["cuda"]["rows"] == 20000
