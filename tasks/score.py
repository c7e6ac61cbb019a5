"""Stream the ingested partition through the model into ``latent/``.

Memory stays flat at any size: record batches are read, encoded, scored and
written as Parquet row groups one at a time, into a staged partition that is
swapped into place only when every row has been written.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
from prefect import task

from models.bundle import LatentModel
from tasks.errors import SchemaError
from tasks.faults import checkpoint
from tasks.policy import IO
from tasks.storage import StagedPartition

TOP_K = 20


@dataclass
class ScoreResult:
    output_dir: str
    rows_scored: int
    anomalies: int
    recon_error_mean: float
    recon_error_p99: float
    top_anomalies: list[dict[str, Any]] = field(default_factory=list)


def output_schema(
    keys: list[tuple[str, pa.DataType]], latent_dim: int, with_cluster: bool
) -> pa.Schema:
    """The latent/ contract: _row_id, keys, latent_*, recon_error, is_anomaly, model."""
    fields = [pa.field("_row_id", pa.int64(), nullable=False)]
    fields += [pa.field(k, t) for k, t in keys]
    fields += [pa.field(f"latent_{i}", pa.float32()) for i in range(latent_dim)]
    fields += [
        pa.field("recon_error", pa.float32()),
        pa.field("is_anomaly", pa.bool_()),
    ]
    if with_cluster:
        fields.append(pa.field("cluster", pa.int32()))
    fields += [
        pa.field("model_name", pa.string()),
        pa.field("model_version", pa.int32()),
    ]
    return pa.schema(fields)


def score_partition(
    ingested_dir: Path,
    bundle_dir: Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    model_name: str,
    model_version: int,
    mlflow_run_id: str,
    config_hash: str,
    batch_rows: int = 65536,
    device: str = "cpu",
) -> ScoreResult:
    """Score every ingested row and commit ``latent/<dataset>/run_date=...``."""
    model = LatentModel.load(bundle_dir, device=device)
    source = pads.dataset(str(ingested_dir), format="parquet")
    names = set(source.schema.names)
    needed = model.preprocessor.input_columns
    missing = [c for c in needed if c not in names]
    if missing:
        raise SchemaError(
            f"{ingested_dir}: the data lacks column(s) the model {model_name}"
            f" v{model_version} needs: {', '.join(missing)}"
        )
    keys = [k for k in model.info.keys if k in names]
    key_types = [(k, source.schema.field(k).type) for k in keys]
    schema = output_schema(
        key_types, model.latent_dim, bool(model.info.cluster_centers)
    )
    metadata = {
        "latentflow.model_name": model_name,
        "latentflow.model_version": str(model_version),
        "latentflow.mlflow_run_id": mlflow_run_id,
        "latentflow.config_hash": config_hash,
        "latentflow.dataset": dataset,
        "latentflow.run_date": run_date.isoformat(),
        "latentflow.threshold": repr(model.threshold),
        "latentflow.latent_dim": str(model.latent_dim),
    }
    schema = schema.with_metadata({k: v.encode() for k, v in metadata.items()})
    columns = ["_row_id", *keys, *[c for c in needed if c not in keys]]

    rows = anomalies = 0
    err_sum = 0.0
    top: list[tuple[float, int]] = []
    errors_hist: list[np.ndarray] = []
    with StagedPartition(data_dir, "latent", dataset, run_date) as part:
        target = part.file("part-00000.parquet")
        with pq.ParquetWriter(target, schema, compression="zstd") as writer:
            for batch in _batches(Path(ingested_dir), columns, batch_rows):
                n = batch.num_rows
                if n == 0:
                    continue
                latent, err, flag = model.score(batch)
                arrays: list[pa.Array] = [batch.column("_row_id").cast(pa.int64())]
                arrays += [batch.column(k) for k in keys]
                arrays += [pa.array(latent[:, i]) for i in range(latent.shape[1])]
                arrays += [pa.array(err), pa.array(flag)]
                labels = model.clusters(latent)
                if labels is not None:
                    arrays.append(pa.array(labels))
                arrays += [
                    pa.array(np.full(n, model_name, dtype=object), pa.string()),
                    pa.array(np.full(n, model_version, dtype=np.int32)),
                ]
                writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=schema))
                checkpoint("score")
                rows += n
                anomalies += int(flag.sum())
                err_sum += float(err.sum(dtype=np.float64))
                _keep_top(top, err, batch.column("_row_id").to_numpy())
                # A thinned copy keeps the p99 estimate's memory bounded.
                errors_hist.append(err[:: max(1, n // 4096)])
        part.commit()
    all_err = np.concatenate(errors_hist) if errors_hist else np.zeros(1)
    return ScoreResult(
        output_dir=str(part.final),
        rows_scored=rows,
        anomalies=anomalies,
        recon_error_mean=err_sum / max(rows, 1),
        recon_error_p99=float(np.quantile(all_err, 0.99)),
        top_anomalies=[
            {"_row_id": int(r), "recon_error": float(e)}
            for e, r in sorted(top, reverse=True)
        ],
    )


def _batches(
    ingested_dir: Path, columns: list[str], batch_rows: int
) -> Iterator[pa.RecordBatch]:
    """Record batches, one row group at a time: Dataset.to_batches decodes ahead
    of the consumer without bound, which made peak memory grow with the file."""
    for f in sorted(ingested_dir.glob("*.parquet")):
        with pq.ParquetFile(f) as pf:
            yield from pf.iter_batches(batch_size=batch_rows, columns=columns)


def _keep_top(top: list[tuple[float, int]], err: np.ndarray, ids: np.ndarray) -> None:
    k = min(TOP_K, len(err))
    idx = np.argpartition(err, -k)[-k:]
    for i in idx:
        item = (float(err[i]), int(ids[i]))
        if len(top) < TOP_K:
            heapq.heappush(top, item)
        elif item > top[0]:
            heapq.heapreplace(top, item)


def read_metadata(partition: Path) -> dict[str, str]:
    """The latentflow key-value metadata of a latent/ partition's first file."""
    files = sorted(partition.glob("*.parquet"))
    if not files:
        return {}
    meta = pq.read_schema(files[0]).metadata or {}
    return {
        k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"latentflow.")
    }


score_task = task(score_partition, name="score", **IO)
