"""What a person sees of a run: the summary line and the Prefect artifacts."""

from __future__ import annotations

import base64
import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from prefect import task

from models import columns as cols
from tasks.drift import DriftReport
from tasks.policy import PLAIN
from tasks.sampling import iter_partition

if TYPE_CHECKING:
    from models.bundle import LatentModel

#: Rows in the top-anomalies artifact.
TOP_ROWS = 20


def top_anomalies(
    latent_dir: Path, keys: list[str], n: int = TOP_ROWS
) -> list[dict[str, Any]]:
    """The ``n`` flagged rows with the highest scores, with their explanations,
    read back from the published ``latent/`` partition (what analysts read).

    ``_row_id`` is a string: a browser shows a 64-bit integer rounded, so the
    number would match no row.
    """
    columns = [cols.ROW_ID, *keys, cols.RECON_ERROR, cols.ANOMALY_SCORE]
    data = pads.dataset(str(latent_dir), format="parquet")
    names = set(data.schema.names)
    if cols.EXPLANATION not in names:
        return []
    table = data.to_table(
        columns=[c for c in columns if c in names] + [cols.EXPLANATION],
        filter=pc.field(cols.IS_ANOMALY),
    )
    if table.num_rows == 0:
        return []
    order = pc.sort_indices(table, sort_keys=[(cols.RECON_ERROR, "descending")])
    rows = []
    for r in table.take(order.slice(0, n)).to_pylist():
        row: dict[str, Any] = {cols.ROW_ID: str(r[cols.ROW_ID])}
        row.update({k: str(r[k]) for k in keys if k in r})
        row[cols.RECON_ERROR] = round(float(r[cols.RECON_ERROR]), 4)
        row[cols.ANOMALY_SCORE] = round(float(r[cols.ANOMALY_SCORE]), 4)
        for rank, e in enumerate(r[cols.EXPLANATION] or [], start=1):
            row[f"column_{rank}"] = (
                f"{e['column']}: {e['observed']} (expected {e['expected']},"
                f" {e['contribution']:.3g})"
            )
        rows.append(row)
    return rows


def worst_features(
    ingested_dir: Path,
    bundle_dir: Path,
    row_ids: list[int],
    keys: list[str],
    n: int = 3,
    device: str = "cpu",
) -> list[dict[str, Any]]:
    """For the given rows, the ``n`` input columns with the largest errors,
    computed on ``device`` (the run's: ``auto`` is CUDA when present); for a
    sequence model also the ``n`` days of the row's window that weigh most
    (``day_1`` ...)."""
    from models.bundle import LatentModel

    if not row_ids:
        return []
    model = LatentModel.load(bundle_dir, device=device)
    wanted = [
        "_row_id",
        *keys,
        *[c for c in model.preprocessor.input_columns if c not in keys],
    ]
    wanted += [c for c in model.context_columns or () if c not in wanted]
    table = pads.dataset(str(ingested_dir), format="parquet").to_table(
        columns=wanted, filter=pc.field("_row_id").isin(row_ids)
    )
    days: list[list[str]] | None = None
    if model.context_columns is not None:
        table, days = _in_series(ingested_dir, model, table, wanted, n)
    errs = model.source_errors(table)
    rec_err = model.score(table).score
    frame = table.to_pandas()
    asked = set(row_ids)
    rows = []
    for i in range(table.num_rows):
        if int(frame["_row_id"].iat[i]) not in asked:
            continue  # history only
        worst = errs.iloc[i].sort_values(ascending=False).head(n)
        row = {"_row_id": int(frame["_row_id"].iat[i])}
        row.update({k: str(frame[k].iat[i]) for k in keys})
        row["recon_error"] = round(float(rec_err[i]), 4)
        for rank, (col, val) in enumerate(worst.items(), start=1):
            row[f"feature_{rank}"] = f"{col} ({val:.2f})"
        for rank, text in enumerate(days[i] if days else [], start=1):
            row[f"day_{rank}"] = text
        rows.append(row)
    return rows


def drift_rows(drift: DriftReport) -> list[dict[str, Any]]:
    """The drift table artifact: each feature's PSI, worst first."""
    drifted = set(drift.drifted)
    return [
        {"feature": k, "psi": round(v, 4), "drifted": k in drifted}
        for k, v in sorted(drift.psi.items(), key=lambda kv: -kv[1])
    ]


def plots_markdown(plots: list[Path], max_bytes: int = 400_000) -> str:
    """The training plots inline (PNG data URIs) for a Prefect artifact; a plot
    larger than ``max_bytes`` is named instead (it is on the MLflow run)."""
    lines = ["# Training plots", ""]
    for p in plots:
        data = Path(p).read_bytes()
        if len(data) > max_bytes:
            lines.append(f"- `{Path(p).name}`: on the MLflow run, under plots/")
            continue
        b64 = base64.b64encode(data).decode()
        name = Path(p).stem
        lines += [f"## {name}", "", f"![{name}](data:image/png;base64,{b64})", ""]
    return "\n".join(lines) + "\n"


def _in_series(
    ingested_dir: Path,
    model: LatentModel,
    rows: pa.Table,
    columns: list[str],
    n: int,
) -> tuple[pa.Table, list[list[str]]]:
    """A sequence model explains a row from its window: the rows' series over
    their windows (in stream order) and, per row, its ``n`` heaviest days as
    ``"<day> (<share>)"``."""
    entity, time = model.context_columns or ("", "")
    window = int(getattr(model.estimator, "window", 1))
    times = rows.column(time)
    start = pc.min(times).as_py()
    if isinstance(start, dt.date):
        start = start - dt.timedelta(days=window - 1)
    elif start is not None:
        start = start - (window - 1)
    entities = rows.column(entity).unique()
    end = pc.max(times).as_py()
    # File and row-group order is the series' stream order (the scorer's).
    parts = []
    for batch in iter_partition(ingested_dir, columns):
        t = batch.column(time)
        keep = pc.and_(
            pc.is_in(batch.column(entity), value_set=entities),
            pc.and_(
                pc.greater_equal(t, pa.scalar(start, t.type)),
                pc.less_equal(t, pa.scalar(end, t.type)),
            ),
        )
        parts.append(batch.filter(keep))
    table = pa.Table.from_batches(parts).select(columns) if parts else rows
    by_day, day_of = model.day_contributions(table)
    as_date = pa.types.is_date(table.schema.field(time).type) or pa.types.is_timestamp(
        table.schema.field(time).type
    )
    texts = []
    for shares, days in zip(by_day, day_of, strict=True):
        order = np.argsort(-shares, kind="stable")[:n]
        texts.append(
            [
                f"{_day_text(int(days[j]), as_date)} ({float(shares[j]):.2f})"
                for j in order
                if shares[j] > 0
            ]
        )
    return table, texts


def _day_text(day: int, as_date: bool) -> str:
    return (
        (dt.date(1970, 1, 1) + dt.timedelta(days=day)).isoformat()
        if as_date
        else str(day)
    )


def summary_markdown(
    summary: dict[str, Any], metrics: dict[str, float], reason: str
) -> str:
    """The run summary shown as a Prefect markdown artifact."""
    override = "yes (--promote)" if summary.get("promote_override") else "no"
    model = f"{summary['model_name']} v{summary['model_version']}"
    run_id = summary.get("mlflow_night_run_id") or summary.get("mlflow_run_id", "")
    lines = [
        f"# latentflow: {summary['dataset']} {summary['run_date']}",
        "",
        "| | |",
        "|---|---|",
        f"| rows in | {summary['rows_in']:,} |",
        f"| rows rejected | {summary['rows_rejected']:,} |",
        f"| rows scored | {summary['rows_scored']:,} |",
        f"| anomalies | {summary['anomalies']:,} |",
        f"| decision | {summary['decision']}: {reason} |",
        f"| operator override | {override} |",
        f"| model | {_link(model, summary.get('model_version_url'))} |",
        f"| MLflow run | {_link(run_id, summary.get('mlflow_run_url'))} |",
        f"| output | `{summary['output']}` |",
    ]
    drift = summary.get("drift")
    if drift:
        lines += [
            f"| drift | max PSI {drift['max_psi']:.3f};"
            f" drifted {drift['drifted'] or 'none'};"
            f" error ratio median x{drift['error_median_ratio']:.2f},"
            f" p99 x{drift['error_p99_ratio']:.2f} |",
        ]
    if metrics:
        lines += [
            "",
            "## Model quality (held-out rows)",
            "",
            "| metric | autoencoder | PCA, same latent size |",
            "|---|---|---|",
        ]
        if "val_mse" in metrics:
            lines.append(
                f"| reconstruction MSE | {metrics['val_mse']:.4f}"
                f" | {metrics.get('pca_val_mse', float('nan')):.4f} |"
            )
        if "probe_auc" in metrics:
            lines.append(
                f"| linear probe ROC-AUC (label) | {metrics['probe_auc']:.4f}"
                f" | {metrics.get('pca_probe_auc', float('nan')):.4f} |"
            )
    return "\n".join(lines) + "\n"


def _link(text: Any, url: str | None) -> str:
    return f"[{text}]({url})" if url else str(text)


@task(name="report", **PLAIN)
def publish_report(
    summary: dict[str, Any],
    metrics: dict[str, float],
    reason: str,
    top_rows: list[dict[str, Any]],
    key: str,
    drift: list[dict[str, Any]] | None = None,
) -> None:
    """Create the run's Prefect artifacts: a summary (linking the MLflow run
    and the model version), the top anomalies explained, and the drift table."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    create_markdown_artifact(
        key=f"{key}-summary",
        markdown=summary_markdown(summary, metrics, reason),
        description=f"latentflow run summary for {summary['dataset']}",
    )
    if top_rows:
        create_table_artifact(
            key=f"{key}-top-anomalies",
            table=top_rows,
            description="Top anomalies and the three input columns (and, for a"
            " sequence model, days) that made them",
        )
    if drift:
        create_table_artifact(
            key=f"{key}-drift",
            table=drift,
            description="Each feature's PSI against the champion's training data",
        )


@task(name="publish-plots", **PLAIN)
def publish_plots(plots: list[Path], key: str) -> None:
    """The training plots as a Prefect artifact (they are on the MLflow run too)."""
    from prefect.artifacts import create_markdown_artifact

    if plots:
        create_markdown_artifact(
            key=f"{key}-plots",
            markdown=plots_markdown(plots),
            description="Training plots of tonight's challenger",
        )


top_anomalies_task = task(top_anomalies, name="top-anomalies", **PLAIN)
