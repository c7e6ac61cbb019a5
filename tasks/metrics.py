"""The run's metrics partition: one row per run in
``metrics/<dataset>/run_date=<date>/metrics.parquet``.

Every run writes it, reuse nights included, so a dashboard can trend a
dataset's nights with one query (docs/output.md). The partition is staged and
published with the run date's other partitions in one commit
(:mod:`tasks.partitions`), so a failed run leaves the previous one untouched;
it is a partition root like ``latent/`` to anything that prunes old dates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from tasks.policy import PLAIN
from tasks.storage import StagedPartition

AREA = "metrics"
FILE = "metrics.parquet"

#: The partition's columns (besides the hive ``run_date``), in order.
SCHEMA = pa.schema(
    [
        pa.field("dataset", pa.string()),
        pa.field("rows_in", pa.int64()),
        pa.field("rows_rejected", pa.int64()),
        pa.field("rows_scored", pa.int64()),
        pa.field("anomalies", pa.int64()),
        pa.field("anomaly_rate", pa.float64()),
        pa.field("recon_error_mean", pa.float64()),
        pa.field("recon_error_p50", pa.float64()),
        pa.field("recon_error_p90", pa.float64()),
        pa.field("recon_error_p99", pa.float64()),
        pa.field("recon_error_p999", pa.float64()),
        pa.field("recon_error_max", pa.float64()),
        pa.field("psi", pa.map_(pa.string(), pa.float64())),
        pa.field("drifted", pa.list_(pa.string())),
        pa.field("error_median_ratio", pa.float64()),
        pa.field("error_p99_ratio", pa.float64()),
        pa.field("decision", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("promote_override", pa.bool_()),
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.int32()),
        pa.field("latent_space_id", pa.string()),
        pa.field("seconds", pa.map_(pa.string(), pa.float64())),
    ]
)


@dataclass
class RunMetrics:
    """One run's facts, as the metrics partition holds them."""

    dataset: str
    rows_in: int
    rows_rejected: int
    rows_scored: int
    anomalies: int
    recon_error_mean: float
    score_quantiles: dict[str, float]
    decision: str
    reason: str
    model_name: str
    model_version: int
    psi: dict[str, float] | None = None
    drifted: list[str] | None = None
    error_median_ratio: float | None = None
    error_p99_ratio: float | None = None
    promote_override: bool = False
    latent_space_id: str = ""
    #: Wall seconds per step (ingest, decide, train, score, total).
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def anomaly_rate(self) -> float:
        return self.anomalies / self.rows_scored if self.rows_scored else 0.0

    def row(self) -> dict[str, Any]:
        q = self.score_quantiles
        return {
            "dataset": self.dataset,
            "rows_in": self.rows_in,
            "rows_rejected": self.rows_rejected,
            "rows_scored": self.rows_scored,
            "anomalies": self.anomalies,
            "anomaly_rate": self.anomaly_rate,
            "recon_error_mean": self.recon_error_mean,
            **{f"recon_error_{k}": q.get(k) for k in ("p50", "p90", "p99", "p999")},
            "recon_error_max": q.get("max"),
            "psi": None if self.psi is None else sorted(self.psi.items()),
            "drifted": self.drifted,
            "error_median_ratio": self.error_median_ratio,
            "error_p99_ratio": self.error_p99_ratio,
            "decision": self.decision,
            "reason": self.reason,
            "promote_override": self.promote_override,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "latent_space_id": self.latent_space_id,
            "seconds": sorted(self.seconds.items()),
        }

    def mlflow_metrics(self) -> dict[str, float]:
        """The same facts as MLflow metrics (numbers only)."""
        out: dict[str, float] = {
            "rows_in": self.rows_in,
            "rows_rejected": self.rows_rejected,
            "rows_scored": self.rows_scored,
            "anomalies": self.anomalies,
            "anomaly_rate": self.anomaly_rate,
            "recon_error_mean": self.recon_error_mean,
        }
        out.update({f"recon_error_{k}": v for k, v in self.score_quantiles.items()})
        out.update({f"psi_{k}": v for k, v in (self.psi or {}).items()})
        if self.error_median_ratio is not None:
            out["error_median_ratio"] = self.error_median_ratio
        if self.error_p99_ratio is not None:
            out["error_p99_ratio"] = self.error_p99_ratio
        out.update({f"seconds_{k}": v for k, v in self.seconds.items()})
        return out


def stage_metrics(
    data_dir: Path, dataset: str, run_date: date, metrics: RunMetrics
) -> str:
    """Write the run's metrics row into a sealed staged partition; returns its
    path for the run date's commit."""
    table = pa.Table.from_pylist([metrics.row()], schema=SCHEMA)
    with StagedPartition(data_dir, AREA, dataset, run_date) as part:
        pq.write_table(table, part.file(FILE), compression="zstd")
        return str(part.seal())


stage_metrics_task = task(stage_metrics, name="stage-metrics", **PLAIN)
