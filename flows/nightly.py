"""The nightly reduce-dataset flow: ingest, decide, (train, register), score, publish.

Only wiring lives here: every step is a task over a plain function in
``tasks/``, and steps pass paths and small typed results, not DataFrames.

With ``runner`` threads or dask, ingest (of several files) and scoring fan out
as the subflows ``latentflow-ingest`` and ``latentflow-score``, whose task
runner is chosen per run (:mod:`flows.runners`); training stays in this
flow's process.

A run date's outputs are published together: ingest and scoring leave their
partitions sealed in ``.staging`` (training, drift and scoring read the staged
ingested partition), and one commit at the end of a successful run swaps
``ingested/``, ``rejected/`` and ``latent/`` in (:mod:`tasks.storage`). A run
that fails before it publishes nothing.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from flows.config import PipelineConfig, confinement
from flows.runners import RunnerScope, runner_scope
from flows.runtime_checks import check_runtime
from models.schema import TableSchema
from tasks import registry
from tasks.decide import ChampionInfo, comparable, decide_task, gate
from tasks.drift import measure_drift_task
from tasks.errors import SchemaError
from tasks.ingest import IngestResult, ingest_task
from tasks.ingest.parts import (
    FileIngest,
    commit_ingest_task,
    ingest_file_task,
    list_sources,
    needs_typing,
    reference_part,
)
from tasks.partitions import (
    DEFAULT_UNIT_ROWS,
    RunOutputs,
    commit_run_date_task,
    discard_staged,
    open_staged,
    remove_scratch,
    scratch_dir,
)
from tasks.registry import (
    find_champion_task,
    promote_task,
    register_task,
    tag_version_task,
)
from tasks.report import publish_report, worst_features_task
from tasks.score import (
    ScoreResult,
    commit_scores_task,
    plan_score_task,
    score_task,
    score_unit_task,
)
from tasks.storage import (
    DatasetLock,
    check_run_paths,
    clean_stale_staging,
    narrowed_umask,
    remove_tree,
    staging_root,
)
from tasks.train import train_task

FLOW_NAME = "latentflow-nightly"


def _run_name() -> str:
    cfg = flow_run.parameters.get("config")
    if isinstance(cfg, dict):
        cfg = PipelineConfig(**cfg)
    if isinstance(cfg, PipelineConfig):
        cfg = cfg.resolved()
        return f"{cfg.dataset}-{cfg.run_date}"
    return "latentflow"


@flow(name=FLOW_NAME, flow_run_name=_run_name, log_prints=False)
def nightly(config: PipelineConfig) -> dict[str, Any]:
    """Turn a tabular file into latent features, reconstruction errors and flags."""
    logger = get_run_logger()
    cfg = config.resolved()
    check_runtime(cfg)  # before any output or lock exists
    dataset, run_date = cfg.dataset or "", cfg.run_date
    assert run_date is not None
    tag = f"{dataset}-{run_date}"
    # Before anything is read or written: where this run may go, then whose
    # eyes its outputs are for (never more than its inputs').
    sources = _allowed_sources(cfg)
    data_dir = Path(cfg.data_dir).expanduser().resolve()
    cache_dir = data_dir / ".cache" / "models"
    # Before anything is written: no path of the run may lead out of the data dir.
    check_run_paths(data_dir, dataset, run_date)

    with (
        narrowed_umask(sources),
        runner_scope(cfg.runner, cfg.dask_address, cfg.dask_workers) as scope,
        DatasetLock(data_dir, dataset, cfg.lock_wait_seconds),
        RunOutputs(data_dir) as outputs,
    ):
        # Finishes a commit a killed run cut short, then drops its leftovers.
        removed = clean_stale_staging(data_dir, dataset)
        if removed:
            logger.info("removed %d staging leftovers of killed runs", removed)
        registry.configure(data_dir)
        champion = find_champion_task.with_options(task_run_name=f"champion-{tag}")(
            cfg.model_name, cache_dir
        )
        ingest_args: dict[str, Any] = {
            "keys": cfg.key_columns,
            "features": cfg.features,
            "exclude": cfg.exclude,
            "label": cfg.label,
            "rules": cfg.rules or [],
            "max_reject_fraction": cfg.max_reject_fraction,
        }
        # Keyless ids count identical rows across files: one process only.
        fan_out = scope.parallel and cfg.key_columns != []
        if fan_out and len(list_sources(cfg.input)) > 1:
            ing = ingest_partitioned.with_options(task_runner=scope.task_runner())(
                cfg.input,
                data_dir,
                dataset,
                run_date,
                tag=tag,
                publish=False,
                **ingest_args,
            )
        else:
            ing = ingest_task.with_options(task_run_name=f"ingest-{tag}")(
                cfg.input, data_dir, dataset, run_date, publish=False, **ingest_args
            )
        # Staged until the commit below: training, drift and scoring read it there.
        outputs.add("ingested", ing.ingested_dir)
        outputs.add("rejected", ing.rejected_dir)
        if champion is not None and not cfg.retrain:
            _require_columns(champion.input_schema, ing.schema, champion.name)
        now = datetime.now(UTC)
        decision = decide_task.with_options(task_run_name=f"decide-{tag}")(
            champion,
            ing.schema,
            now,
            cfg.max_model_age_days,
            cfg.retrain,
            params=cfg.model_params(),
        )
        drift = None
        if decision.action == "reuse":
            assert champion is not None
            drift = measure_drift_task.with_options(task_run_name=f"drift-{tag}")(
                Path(ing.ingested_dir),
                Path(champion.model_dir),
                psi_threshold=cfg.drift_psi_threshold,
                seed=cfg.random_state,
                device=cfg.device,
            )
            logger.info("drift: %s", drift.to_dict())
            decision = decide_task.with_options(task_run_name=f"decide-{tag}")(
                champion,
                ing.schema,
                now,
                cfg.max_model_age_days,
                cfg.retrain,
                drift=drift,
                max_drifted_features=cfg.max_drifted_features,
                max_error_ratio=cfg.max_error_ratio,
                params=cfg.model_params(),
            )
        logger.info("decision: %s (%s)", decision.action, decision.reason)

        metrics: dict[str, float] = {}
        outcome, gate_reason = "reuse", ""
        if decision.action == "train":
            result = challenge(cfg, ing, champion, decision.reason, data_dir, tag)
            metrics, outcome, gate_reason = (
                result.metrics,
                result.outcome,
                result.reason,
            )
            version, run_id = result.version, result.run_id
            if outcome == "keep_champion":
                assert champion is not None
                version, run_id = champion.version, champion.run_id
            bundle = registry.fetch_model(cfg.model_name, version, cache_dir)
        else:
            assert champion is not None
            version, run_id = champion.version, champion.run_id
            bundle = Path(champion.model_dir)

        scored = _score(
            scope,
            Path(ing.ingested_dir),
            bundle,
            data_dir,
            dataset,
            run_date,
            tag=tag,
            model_name=cfg.model_name,
            model_version=version,
            mlflow_run_id=run_id,
            config_hash=cfg.config_hash(),
            batch_rows=cfg.score_batch_rows,
            device=cfg.device,
        )
        outputs.add("latent", scored.staged_dir)
        published = commit_run_date_task.with_options(task_run_name=f"commit-{tag}")(
            data_dir, dataset, run_date, outputs.to_commit()
        )
        ing = replace(
            ing,
            ingested_dir=published["ingested"],
            rejected_dir=published["rejected"],
            published=True,
        )

    summary: dict[str, Any] = {
        "dataset": dataset,
        "run_date": str(run_date),
        "rows_in": ing.rows_in,
        "rows_rejected": ing.rows_rejected,
        "rows_scored": scored.rows_scored,
        "anomalies": scored.anomalies,
        "trained": decision.action == "train",
        "decision": outcome,
        "reason": decision.reason + (f"; {gate_reason}" if gate_reason else ""),
        "model_name": cfg.model_name,
        "model_version": version,
        "mlflow_run_id": run_id,
        "output": scored.output_dir,
    }
    if drift is not None:
        summary["drift"] = {
            "drifted": drift.drifted,
            "max_psi": max(drift.psi.values(), default=0.0),
            "error_median_ratio": round(drift.error_median_ratio, 4),
            "error_p99_ratio": round(drift.error_p99_ratio, 4),
        }
    keys = ing.schema.keys
    top = worst_features_task.with_options(task_run_name=f"explain-{tag}")(
        Path(ing.ingested_dir),
        bundle,
        [r["_row_id"] for r in scored.top_anomalies],
        keys,
        device=cfg.device,
    )
    publish_report.with_options(task_run_name=f"report-{tag}")(
        summary, metrics, summary["reason"], top, key=dataset.replace("_", "-")
    )
    return summary


def _allowed_sources(cfg: PipelineConfig) -> list[Path]:
    """The input's files, once the host's confinement policy allows the run.

    The policy comes from the executing host's environment, never from the
    run's parameters; a run started from a deployment is always confined.
    """
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    deployed = run is not None and run.deployment_id is not None
    policy = confinement(deployed=deployed)
    if policy is not None:
        return policy.check(cfg)
    return [Path(p) for p in list_sources(cfg.input)]


def _score(
    scope: RunnerScope,
    ingested_dir: Path,
    bundle: Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    tag: str,
    **kwargs: Any,
) -> ScoreResult:
    """One scoring task, or the partitioned subflow on the run's task runner."""
    if not scope.parallel:
        return score_task.with_options(task_run_name=f"score-{tag}")(
            ingested_dir, bundle, data_dir, dataset, run_date, publish=False, **kwargs
        )
    return score_partitioned.with_options(task_runner=scope.task_runner())(
        ingested_dir,
        bundle,
        data_dir,
        dataset,
        run_date,
        tag=tag,
        publish=False,
        **kwargs,
    )


def _gather(futures: Sequence[PrefectFuture[Any]]) -> list[Any]:
    """Every future's result, after all have finished.

    Waiting for all first means no task is still writing into a staged
    directory when a failure makes the caller discard it; the first failure
    in submission order is the one raised.
    """
    wait(list(futures))
    return [f.result() for f in futures]


@flow(name="latentflow-score", flow_run_name="score-{tag}")
def score_partitioned(
    ingested_dir: Path,
    bundle: Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    tag: str,
    model_name: str,
    model_version: int,
    mlflow_run_id: str,
    config_hash: str,
    batch_rows: int,
    unit_rows: int = DEFAULT_UNIT_ROWS,
    publish: bool = True,
    device: str = "cpu",
) -> ScoreResult:
    """Score the partition's row-group units in parallel; commit them as one.

    Each unit task writes its own file into one staged partition; the commit
    checks them all and swaps the partition in whole, or nothing changes.
    With ``publish=False`` the checked partition stays sealed in ``.staging``
    for the run date's commit.
    """
    plan = plan_score_task.with_options(task_run_name=f"plan-score-{tag}")(
        ingested_dir,
        bundle,
        dataset,
        run_date,
        model_name=model_name,
        model_version=model_version,
        mlflow_run_id=mlflow_run_id,
        config_hash=config_hash,
        unit_rows=unit_rows,
        device=device,
    )
    get_run_logger().info("scoring %d rows in %d units", plan.rows, len(plan.units))
    staged = open_staged(data_dir, "latent", dataset, run_date)
    try:
        futures = [
            score_unit_task.submit(
                unit,
                plan.layout,
                bundle,
                staged.path,
                batch_rows=batch_rows,
                device=device,
            )
            for unit in plan.units
        ]
        results = _gather(futures)
        return commit_scores_task.with_options(task_run_name=f"commit-score-{tag}")(
            staged, plan.units, results, publish=publish
        )
    finally:
        discard_staged(staged)


@flow(name="latentflow-ingest", flow_run_name="ingest-{tag}")
def ingest_partitioned(
    source: str,
    data_dir: Path,
    dataset: str,
    run_date: date,
    *,
    tag: str,
    keys: list[str] | None,
    features: list[str] | None,
    exclude: list[str],
    label: str | None,
    rules: list[str],
    max_reject_fraction: float,
    publish: bool = True,
) -> IngestResult:
    """Ingest the source's files in parallel; commit them as one partition
    (``publish=False``: leave the pair sealed for the run date's commit).

    See :mod:`tasks.ingest.parts`: when the files cannot be combined exactly,
    the single-process ingest runs instead.
    """
    scratch = scratch_dir(data_dir, "ingest-parts", dataset, run_date)
    try:
        per_file = {
            "keys": keys,
            "features": features,
            "exclude": exclude,
            "label": label,
            "rules": rules,
        }
        files = list_sources(source)
        parts: list[FileIngest] = _gather(
            [
                ingest_file_task.submit(
                    i, path, scratch, dataset, run_date, speculative=True, **per_file
                )
                for i, path in enumerate(files)
            ]
        )
        ref = reference_part(parts)
        if ref is not None and ref.result is not None:
            retyped = _gather(
                [
                    ingest_file_task.submit(
                        p.index,
                        p.path,
                        scratch,
                        dataset,
                        run_date,
                        expected_schema=ref.result.schema,
                        **per_file,
                    )
                    for p in needs_typing(parts, ref)
                ]
            )
            for p in retyped:
                parts[p.index] = p
        result = commit_ingest_task.with_options(task_run_name=f"commit-ingest-{tag}")(
            parts,
            data_dir,
            dataset,
            run_date,
            source=source,
            max_reject_fraction=max_reject_fraction,
            publish=publish,
        )
    finally:
        remove_scratch(scratch)
    if result is None:
        get_run_logger().info(
            "files share keys or have none: ingesting them in one process"
        )
        result = ingest_task.with_options(task_run_name=f"ingest-{tag}")(
            source,
            data_dir,
            dataset,
            run_date,
            keys=keys,
            features=features,
            exclude=exclude,
            label=label,
            rules=rules,
            max_reject_fraction=max_reject_fraction,
            publish=publish,
        )
    return result


@dataclass
class Challenge:
    outcome: str  # "promote" or "keep_champion"
    reason: str
    version: int
    run_id: str
    metrics: dict[str, float]


@flow(name="latentflow-challenge", flow_run_name="challenge-{tag}")
def challenge(
    cfg: PipelineConfig,
    ing: Any,
    champion: ChampionInfo | None,
    reason: str,
    data_dir: Path,
    tag: str,
) -> Challenge:
    """Train a challenger, register it, and promote it only if it beats the
    champion on the same holdout of the new data."""
    cache_dir = data_dir / ".cache" / "models"
    # The directory's name becomes the artifact's name in MLflow.
    stage = staging_root(data_dir) / f"model.{cfg.dataset}.{uuid.uuid4().hex[:12]}"
    bundle_dir = stage / registry.BUNDLE_ARTIFACT
    try:
        trained = train_task.with_options(task_run_name=f"train-{tag}")(
            ingested_dir=Path(ing.ingested_dir),
            schema=ing.schema,
            bundle_dir=bundle_dir,
            dataset=cfg.dataset,
            estimator_params=cfg.estimator_params(),
            label=cfg.label,
            max_train_rows=cfg.max_train_rows,
            holdout_fraction=cfg.holdout_fraction,
            n_clusters=cfg.n_clusters,
            plots_dir=stage / "plots",
            champion_dir=(
                Path(champion.model_dir)
                if champion and comparable(champion, ing.schema, cfg.model_params())
                else None
            ),
        )
        reg = register_task.with_options(task_run_name=f"register-{tag}")(
            bundle_dir=bundle_dir,
            name=cfg.model_name,
            dataset=cfg.dataset,
            data_dir=data_dir,
            params={**trained.params, "config_hash": cfg.config_hash()},
            history=trained.history,
            metrics=trained.metrics,
            tags={
                "reason": reason,
                "dataset": cfg.dataset or "",
                "run_date": str(cfg.run_date),
                "config_hash": cfg.config_hash(),
            },
            sample=trained.sample,
            plots=[Path(p) for p in trained.plots],
            description=_model_card(cfg, ing, trained),
        )
    finally:
        with contextlib.suppress(OSError):
            remove_tree(data_dir, stage)
    verdict = gate(
        trained.metrics["val_mse"],
        trained.metrics.get("champion_holdout_mse"),
        cfg.min_improvement,
    )
    tags = {
        "decision": "promoted" if verdict.promote else "rejected",
        "gate_reason": verdict.reason,
        "challenger_holdout_mse": f"{verdict.challenger_mse:.6g}",
        "champion_holdout_mse": (
            "" if verdict.champion_mse is None else f"{verdict.champion_mse:.6g}"
        ),
        "champion_version": str(champion.version) if champion else "",
    }
    tag_version_task.with_options(task_run_name=f"tag-{tag}")(
        reg.name, reg.version, reg.run_id, tags
    )
    if verdict.promote:
        promote_task.with_options(task_run_name=f"promote-{tag}")(
            reg.name, reg.version, cache_dir
        )
    get_run_logger().info("challenger v%s: %s", reg.version, tags)
    return Challenge(
        outcome="promote" if verdict.promote else "keep_champion",
        reason=verdict.reason,
        version=reg.version,
        run_id=reg.run_id,
        metrics=trained.metrics,
    )


def _require_columns(
    model_schema: TableSchema, data_schema: TableSchema, name: str
) -> None:
    need = [c for c in model_schema.required() if c not in data_schema]
    if need:
        raise SchemaError(
            f"the input lacks column(s) the champion {name} needs: {', '.join(need)};"
            " fix the input, or pass --retrain to train a model on the new schema"
        )


def code_version() -> str:
    """The git commit of the running code (with +dirty), or the package version."""
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"commit {sha}{'+dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        try:
            return f"version {version('latentflow')}"
        except PackageNotFoundError:
            return "version unknown"


def _model_card(cfg: PipelineConfig, ing: Any, trained: Any) -> str:
    m = trained.metrics
    feats = ing.schema.features
    lines = [
        f"latentflow {cfg.kind} autoencoder for {cfg.dataset},"
        f" run date {cfg.run_date}.",
        f"Data: {trained.n_rows_total} rows ingested; {trained.n_train} train,"
        f" {trained.n_holdout} holdout.",
        f"Features ({len(feats)}): {', '.join(feats)}.",
        "Preprocessing: median imputation + missing indicators + standard scaling;"
        " one-hot categoricals with an unknown slot.",
        f"Hyperparameters: {cfg.estimator_params()}.",
        f"Code: latentflow {code_version()}.",
        f"Holdout MSE {m['val_mse']:.4f}"
        f" vs PCA({cfg.latent_dim}) {m['pca_val_mse']:.4f};"
        f" threshold {m['threshold']:.4f} (contamination {cfg.contamination}).",
    ]
    return "\n".join(lines)
