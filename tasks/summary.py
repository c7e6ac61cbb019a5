"""What a run tells people: its summary line, the drift summary and the model
card. Pure functions over the steps' typed results, each with a thin task."""

from __future__ import annotations

import subprocess
from datetime import date
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from prefect import task

from models.schema import TableSchema
from tasks.decide import ChosenModel, Decision
from tasks.drift import DriftReport
from tasks.ingest import IngestResult
from tasks.policy import PLAIN
from tasks.run_target import RunTarget
from tasks.score import ScoreResult
from tasks.train import TrainResult


def drift_summary(drift: DriftReport) -> dict[str, Any]:
    """The few drift facts the summary line carries."""
    return {
        "drifted": drift.drifted,
        "max_psi": max(drift.psi.values(), default=0.0),
        "error_median_ratio": round(drift.error_median_ratio, 4),
        "error_p99_ratio": round(drift.error_p99_ratio, 4),
    }


def run_summary(
    run: RunTarget,
    ingested: IngestResult,
    decision: Decision,
    model: ChosenModel,
    scored: ScoreResult,
    drift: DriftReport | None = None,
    links: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The run's one JSON line (the CLI prints it; the flow returns it).

    ``decision`` is the run's outcome in the one vocabulary used everywhere
    (JSON, logs, artifacts, MLflow tags, docs): ``reuse``, ``promote`` or
    ``keep_champion``. ``links`` are the MLflow UI links of the night's run
    and of the scoring model version.
    """
    gate_reason = f"; {model.gate_reason}" if model.gate_reason else ""
    summary: dict[str, Any] = {
        "dataset": run.dataset,
        "run_date": str(run.run_date),
        "rows_in": ingested.rows_in,
        "rows_rejected": ingested.rows_rejected,
        "rows_scored": scored.rows_scored,
        "anomalies": scored.anomalies,
        "trained": decision.action == "train",
        "decision": model.outcome,
        "reason": decision.reason + gate_reason,
        "model_name": run.model_name,
        "model_version": model.version,
        "mlflow_run_id": model.run_id,
        "output": scored.output_dir,
        # New keys go last: the line's order is part of its contract.
        "promote_override": model.override,
    }
    summary.update(links or {})
    if drift is not None:
        summary["drift"] = drift_summary(drift)
    return summary


def code_version(root: Path | None = None) -> str:
    """The git commit of the running code (with +dirty), or the package version."""
    root = root or Path(__file__).resolve().parents[1]
    try:
        sha = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
        return f"commit {sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"version {version('latentflow')}"
        except PackageNotFoundError:
            return "version unknown"


def _git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args],
        capture_output=True,
        text=True,
        timeout=5,
        check=True,
    ).stdout.strip()


def model_card(
    dataset: str,
    run_date: date,
    schema: TableSchema,
    trained: TrainResult,
    estimator_params: dict[str, Any],
    latent_dim: int,
    contamination: float,
    code: str,
) -> str:
    """The registered model version's description, in plain sentences."""
    m = trained.metrics
    features = TableSchema.coerce(schema).features
    lines = [
        f"latentflow {estimator_params['kind']} autoencoder for {dataset},"
        f" run date {run_date}.",
        f"Data: {trained.n_rows_total} rows ingested; {trained.n_train} train,"
        f" {trained.n_holdout} holdout.",
        f"Features ({len(features)}): {', '.join(features)}.",
        "Preprocessing: median imputation + missing indicators + standard scaling;"
        " one-hot categoricals with an unknown slot.",
        f"Hyperparameters: {estimator_params}.",
        f"Code: latentflow {code}.",
        f"Holdout MSE {m['val_mse']:.4f}"
        f" vs PCA({latent_dim}) {m['pca_val_mse']:.4f};"
        f" threshold {m['threshold']:.4f} (contamination {contamination}).",
    ]
    return "\n".join(lines)


summarize_task = task(run_summary, name="summarize", **PLAIN)


@task(name="model-card", **PLAIN)
def model_card_task(
    dataset: str,
    run_date: date,
    schema: TableSchema,
    trained: TrainResult,
    estimator_params: dict[str, Any],
    latent_dim: int,
    contamination: float,
) -> str:
    """:func:`model_card` for the code that is running now."""
    code = code_version()
    return model_card(
        dataset,
        run_date,
        schema,
        trained,
        estimator_params,
        latent_dim,
        contamination,
        code,
    )
