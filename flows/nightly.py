"""The nightly reduce-dataset flow: ingest, decide, (train, register), score, publish.

Only wiring lives here. The flow body reads as the run's story; each line is
a small function below that calls one or two tasks over plain functions in
``tasks/``. Steps pass paths and small typed results (``RunTarget``,
``IngestRoles``, ``ChosenModel``, ``Provenance``), not DataFrames.

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
import hashlib
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.client.schemas.objects import RunType
from prefect.context import FlowRunContext
from prefect.futures import PrefectFuture, wait
from prefect.runtime import flow_run

from flows.config import PipelineConfig, run_confinement
from flows.runners import RunnerScope, runner_scope
from flows.runtime_checks import check_runtime
from models.estimator import resolved_device
from tasks import progress, registry
from tasks.alerts import (
    drift_alert,
    missing_drop_alert,
    quality_alerts,
)
from tasks.alerts import send as send_alert
from tasks.decide import (
    ChampionInfo,
    ChosenModel,
    Decision,
    comparable,
    decide_task,
    drift_matters,
    gate_task,
    require_champion_columns,
)
from tasks.drift import DriftReport, measure_drift_task
from tasks.drops import is_template, local_date
from tasks.errors import ConfigError, InputError, LatentflowError, MissingDropError
from tasks.history import gather_window
from tasks.ingest import IngestResult, ingest_task
from tasks.ingest.parts import (
    FileIngest,
    commit_ingest_task,
    ingest_file_task,
    list_sources,
    needs_typing,
    reference_part,
)
from tasks.metrics import RunMetrics, stage_metrics_task
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
    TAG_FLOW_RUN_URL,
    RegisteredVersion,
    find_champion_task,
    promote_task,
    prune_versions_task,
    record_run_task,
    register_task,
    tag_version_task,
)
from tasks.report import drift_rows, publish_plots, publish_report, top_anomalies_task
from tasks.retention import retention_task
from tasks.roles import IngestRoles
from tasks.run_target import RunTarget
from tasks.score import (
    Provenance,
    ScoreResult,
    commit_scores_task,
    plan_score_task,
    read_metadata,
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
from tasks.summary import model_card_task, summarize_task
from tasks.train import TrainResult, train_task

FLOW_NAME = "latentflow-nightly"


def _run_name() -> str:
    cfg = flow_run.parameters.get("config")
    if isinstance(cfg, dict):
        cfg = PipelineConfig(**cfg)
    if isinstance(cfg, PipelineConfig):
        data = dated(cfg).resolved().data
        return f"{data.dataset}-{data.run_date}"
    return "latentflow"


@flow(name=FLOW_NAME, flow_run_name=_run_name, log_prints=False)
def nightly(config: PipelineConfig) -> dict[str, Any]:
    """Turn a tabular file into latent features, reconstruction errors and flags."""
    template = config.data.input
    cfg = dated(config).resolved()
    clock = Clock()
    run, sources = preflight(cfg, template)
    with run_guards(cfg, run, sources) as (scope, outputs):
        champion = find_champion(run)
        ingested = clock.step("ingest", ingest(cfg, run, scope, outputs))
        drift, decision = clock.step("decide", decide(cfg, run, ingested, champion))
        model = clock.step(
            "train", train_or_reuse(cfg, run, ingested, champion, decision, clock)
        )
        scored = clock.step("score", score(cfg, run, scope, ingested, model, outputs))
        night = measure(cfg, run, ingested, decision, model, scored, drift, clock)
        stage_night(run, night, outputs)
        ingested = publish(run, ingested, outputs)
        removed = retain(cfg, run)
    links = record(run, ingested, decision, model, night, clock)
    summary = summarize_task.with_options(task_run_name=f"summarize-{run.tag}")(
        run, ingested, decision, model, scored, drift, links
    )
    summary.update(removed)
    get_run_logger().info("decision: %s (%s)", summary["decision"], summary["reason"])
    alert(cfg, run, summary, drift, decision)
    report(run, ingested, scored, summary, drift)
    return summary


# -- the steps, in the order the flow runs them ---------------------------------


class Clock:
    """When the run started, and each step's wall seconds (the metrics
    partition's ``seconds``)."""

    def __init__(self) -> None:
        self.started_ms = int(time.time() * 1000)
        self._t0 = self._last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def step(self, name: str, value: Any) -> Any:
        """Record the time since the previous step as ``name``'s; returns ``value``."""
        now = time.perf_counter()
        self.seconds[name] = round(now - self._last, 3)
        self._last = now
        return value

    def total(self) -> dict[str, float]:
        return {**self.seconds, "total": round(time.perf_counter() - self._t0, 3)}


def dated(config: PipelineConfig) -> PipelineConfig:
    """The config with its run date: as given, else the date a scheduled run was
    due in ``timezone`` (a run that starts late still reads its own night's
    drop), else today (resolved later)."""
    data = config.data
    if data.run_date is not None:
        return config
    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    due = run.expected_start_time if run is not None else None
    if run is None or run.deployment_id is None or due is None:
        if data.timezone is None:
            return config
        due = datetime.now(UTC)
    day = local_date(due, data.timezone)
    return config.model_copy(update={"data": data.model_copy(update={"run_date": day})})


def preflight(
    cfg: PipelineConfig, template: str | None = None
) -> tuple[RunTarget, list[Path]]:
    """Before anything is read or written: this machine can run it, where the
    run may go, and the input's files (whose owners' eyes the outputs are for,
    never more than the inputs'). A date-templated input whose drop is missing
    fails here, naming the path it expected, and sends the missing-drop alert."""
    check_runtime(cfg)  # before any output or lock exists
    data = cfg.data
    if data.dataset is None or data.run_date is None:
        raise ConfigError("the run's configuration has no dataset or run date")
    run = RunTarget(
        data.dataset,
        data.run_date,
        Path(data.data_dir).expanduser().resolve(),
        cfg.model_name,
    )
    try:
        sources = _allowed_sources(cfg)
    except InputError:
        if template is None or not is_template(template):
            raise
        expected = cfg.data.input
        send_alert(
            run.dataset,
            run.run_date,
            missing_drop_alert(run.dataset, run.run_date, expected),
        )
        raise MissingDropError(
            f"no drop for {run.run_date}: expected {expected}"
            f" (input template {template})",
            expected=expected,
        ) from None
    # No path of the run may lead out of the data dir.
    check_run_paths(run.data_dir, run.dataset, run.run_date)
    return run, sources


@contextlib.contextmanager
def run_guards(
    cfg: PipelineConfig, run: RunTarget, sources: list[Path]
) -> Iterator[tuple[RunnerScope, RunOutputs]]:
    """The run's umask, task runner, dataset lock and staged outputs (discarded
    if the run fails before its commit); the store is ready inside."""
    execution = cfg.execution
    with (
        narrowed_umask(sources),
        runner_scope(
            execution.runner, execution.dask_address, execution.dask_workers
        ) as scope,
        DatasetLock(run.data_dir, run.dataset, execution.lock_wait_seconds),
        RunOutputs(run.data_dir) as outputs,
    ):
        # Finishes a commit a killed run cut short, then drops its leftovers.
        removed = clean_stale_staging(run.data_dir, run.dataset)
        if removed:
            get_run_logger().info(
                "removed %d staging leftovers of killed runs", removed
            )
        registry.configure(run.data_dir)
        yield scope, outputs


def find_champion(run: RunTarget) -> ChampionInfo | None:
    """The dataset's current champion (fetched into the model cache), if any."""
    with progress.stage("champion"):
        champion = find_champion_task.with_options(task_run_name=f"champion-{run.tag}")(
            run.model_name, run.cache_dir
        )
    found = f"{run.model_name} v{champion.version}" if champion else "none yet"
    progress.done("champion", found)
    return champion


def ingest(
    cfg: PipelineConfig, run: RunTarget, scope: RunnerScope, outputs: RunOutputs
) -> IngestResult:
    """Type, check and stage the input: one task, or one task per file."""
    roles = cfg.ingest_roles()
    source, limit = cfg.data.input, cfg.policy.max_reject_fraction
    started = time.perf_counter()
    progress.current().status("ingest …")
    # Keyless ids count identical rows across files: one process only.
    if scope.parallel and not roles.keyless and len(list_sources(source)) > 1:
        ingested = ingest_partitioned.with_options(task_runner=scope.task_runner())(
            source,
            run.data_dir,
            run.dataset,
            run.run_date,
            roles,
            tag=run.tag,
            max_reject_fraction=limit,
            publish=False,
        )
        ingested = unlinked(ingested)
    else:
        ingested = ingest_task.with_options(task_run_name=f"ingest-{run.tag}")(
            source,
            run.data_dir,
            run.dataset,
            run.run_date,
            max_reject_fraction=limit,
            publish=False,
            **roles.as_kwargs(),
        )
    progress.done(
        "ingest",
        f"{ingested.rows_in:,} rows, {ingested.rows_rejected:,} rejected",
        started,
    )
    # Staged until the run date's commit: training, drift and scoring read it there.
    outputs.add("ingested", ingested.ingested_dir)
    outputs.add("rejected", ingested.rejected_dir)
    return ingested


def decide(
    cfg: PipelineConfig,
    run: RunTarget,
    ingested: IngestResult,
    champion: ChampionInfo | None,
) -> tuple[DriftReport | None, Decision]:
    """Train or reuse: drift is measured only when it can change the answer."""
    policy, params = cfg.policy, cfg.model_params()
    require_champion_columns(champion, ingested.schema, policy.retrain)
    now = datetime.now(UTC)
    drift = None
    if champion is not None and drift_matters(
        champion,
        ingested.schema,
        now,
        policy.max_model_age_days,
        policy.retrain or policy.promote,
        params,
    ):
        drift = measure_drift_task.with_options(task_run_name=f"drift-{run.tag}")(
            Path(ingested.ingested_dir),
            Path(champion.model_dir),
            psi_threshold=policy.drift_psi_threshold,
            seed=cfg.model.random_state,
            device=resolved_device(cfg.execution.device),
        )
        get_run_logger().info("drift: %s", drift.to_dict())
    decision = decide_task.with_options(task_run_name=f"decide-{run.tag}")(
        champion,
        ingested.schema,
        now,
        policy.max_model_age_days,
        # --promote needs a challenger to promote.
        policy.retrain or policy.promote,
        drift=drift,
        max_drifted_features=policy.max_drifted_features,
        max_error_ratio=policy.max_error_ratio,
        params=params,
    )
    # The run's decision (reuse, promote, keep_champion) is logged once known;
    # this step only says whether a challenger is trained.
    if decision.action == "train":
        get_run_logger().info("training a challenger: %s", decision.reason)
        progress.done("decide", f"train a challenger ({decision.reason})")
    else:
        get_run_logger().info("reusing the champion: %s", decision.reason)
        progress.done("decide", f"reuse ({decision.reason})")
    return drift, decision


def train_or_reuse(
    cfg: PipelineConfig,
    run: RunTarget,
    ingested: IngestResult,
    champion: ChampionInfo | None,
    decision: Decision,
    clock: Clock,
) -> ChosenModel:
    """The model that scores the run: the champion, or the challenge's winner."""
    if decision.action == "reuse" and champion is not None:
        return ChosenModel.reused(champion)
    chosen = challenge(cfg, run, ingested, champion, decision.reason, clock.started_ms)
    return unlinked(chosen)


def score(
    cfg: PipelineConfig,
    run: RunTarget,
    scope: RunnerScope,
    ingested: IngestResult,
    model: ChosenModel,
    outputs: RunOutputs,
) -> ScoreResult:
    """Stage latent/: one scoring task, or the partitioned subflow on the
    run's task runner."""
    provenance = Provenance(
        run.model_name, model.version, model.run_id, cfg.config_hash()
    )
    where = (
        Path(ingested.ingested_dir),
        Path(model.bundle_dir),
        run.data_dir,
        run.dataset,
        run.run_date,
        provenance,
    )
    batch_rows = cfg.execution.score_batch_rows
    cut = cfg.model.anomaly_score_threshold
    # On the device training uses: CUDA when present, unless the run says cpu.
    device = resolved_device(cfg.execution.device)
    started = time.perf_counter()
    progress.current().status(f"score with v{model.version} …")
    if scope.parallel:
        scored = score_partitioned.with_options(task_runner=scope.task_runner())(
            *where,
            tag=run.tag,
            batch_rows=batch_rows,
            publish=False,
            anomaly_cut=cut,
            device=device,
        )
        scored = unlinked(scored)
    else:
        scored = score_task.with_options(task_run_name=f"score-{run.tag}")(
            *where, batch_rows=batch_rows, publish=False, anomaly_cut=cut, device=device
        )
    progress.done(
        "score",
        f"{scored.rows_scored:,} rows, {scored.anomalies:,} anomalies",
        started,
    )
    outputs.add("latent", scored.staged_dir)
    return scored


def measure(
    cfg: PipelineConfig,
    run: RunTarget,
    ingested: IngestResult,
    decision: Decision,
    model: ChosenModel,
    scored: ScoreResult,
    drift: DriftReport | None,
    clock: Clock,
) -> RunMetrics:
    """The night in numbers: what the metrics partition and MLflow record."""
    gate = f"; {model.gate_reason}" if model.gate_reason else ""
    return RunMetrics(
        dataset=run.dataset,
        rows_in=ingested.rows_in,
        rows_rejected=ingested.rows_rejected,
        rows_scored=scored.rows_scored,
        anomalies=scored.anomalies,
        recon_error_mean=scored.recon_error_mean,
        score_quantiles=scored.score_quantiles,
        decision=model.outcome,
        reason=decision.reason + gate,
        model_name=run.model_name,
        model_version=model.version,
        psi=None if drift is None else dict(drift.psi),
        drifted=None if drift is None else list(drift.drifted),
        error_median_ratio=None if drift is None else drift.error_median_ratio,
        error_p99_ratio=None if drift is None else drift.error_p99_ratio,
        promote_override=model.override,
        latent_space_id=read_metadata(Path(scored.staged_dir or scored.output_dir)).get(
            "latentflow.latent_space_id", ""
        ),
        seconds=clock.total(),
    )


def stage_night(run: RunTarget, night: RunMetrics, outputs: RunOutputs) -> None:
    """Stage the metrics partition: published with the run date's others."""
    staged = stage_metrics_task.with_options(task_run_name=f"metrics-{run.tag}")(
        run.data_dir, run.dataset, run.run_date, night
    )
    outputs.add("metrics", staged)


def record(
    run: RunTarget,
    ingested: IngestResult,
    decision: Decision,
    model: ChosenModel,
    night: RunMetrics,
    clock: Clock,
) -> dict[str, str]:
    """The night as an MLflow run (reuse nights too); returns the UI links."""
    tags = {
        "dataset": run.dataset,
        "run_date": str(run.run_date),
        "decision": model.outcome,
        "reason": night.reason,
        "gate_reason": model.gate_reason,
        "promote_override": "true" if model.override else "false",
        "model_version": str(model.version),
        TAG_FLOW_RUN_URL: _flow_run_url(),
    }
    ingested_dir = Path(ingested.ingested_dir)
    record = record_run_task.with_options(task_run_name=f"record-{run.tag}")(
        dataset=run.dataset,
        data_dir=run.data_dir,
        run_name=run.tag,
        run_id=model.trained_run_id or None,
        started_ms=clock.started_ms,
        tags=tags,
        metrics=night.mlflow_metrics(),
        dataset_path=ingested_dir,
        dataset_digest=_partition_digest(ingested_dir),
        model_name=run.model_name,
        model_version=model.version,
    )
    return {"mlflow_night_run_id": record.run_id, **record.links}


def _flow_run_url() -> str:
    """The Prefect UI page of this flow run ("" without a UI)."""
    try:
        return flow_run.get_flow_run_ui_url() or ""
    except Exception:  # no API configured: no page to link
        return ""


def _partition_digest(directory: Path) -> str:
    """A digest of a partition's files (names, sizes, Parquet footers): the
    logged dataset's identity, without reading the rows."""
    h = hashlib.sha256()
    for f in sorted(directory.glob("*.parquet")):
        h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()


def unlinked(value: Any) -> Any:
    """``value``, no longer linked to the subflow run that returned it.

    Prefect records the task inputs that came from a subflow's result as
    ``flow_run`` references, which its UI cannot show: the flow run's Task
    Runs tab stayed empty ("Invalid TaskInputResponse"). Forgetting the link
    keeps every later task's inputs plain values; the subflow run itself is
    still shown as the parent task run it is.
    """
    ctx = FlowRunContext.get()
    if ctx is not None:
        ctx.run_results = {
            k: v for k, v in ctx.run_results.items() if v[1] != RunType.FLOW_RUN
        }
    return value


def publish(
    run: RunTarget, ingested: IngestResult, outputs: RunOutputs
) -> IngestResult:
    """Swap the run date's ingested/, rejected/ and latent/ in, in one commit."""
    published = commit_run_date_task.with_options(task_run_name=f"commit-{run.tag}")(
        run.data_dir, run.dataset, run.run_date, outputs.to_commit()
    )
    progress.done("publish", published.get("latent", str(run.data_dir)))
    return replace(
        ingested,
        ingested_dir=published["ingested"],
        rejected_dir=published["rejected"],
        published=True,
    )


def retain(cfg: PipelineConfig, run: RunTarget) -> dict[str, Any]:
    """After the commit, under the lock: drop partitions older than
    ``keep_days`` and model versions beyond ``keep_versions``.

    The run's outputs are published by now, so a failure here is logged and
    reported, never a failed run; the next run tries again.
    """
    policy, out = cfg.policy, {}
    tag = run.tag
    try:
        if policy.keep_days is not None:
            out["partitions_removed"] = retention_task.with_options(
                task_run_name=f"retention-{tag}"
            )(run.data_dir, run.dataset, run.run_date, policy.keep_days)
        if policy.keep_versions is not None:
            out["versions_removed"] = prune_versions_task.with_options(
                task_run_name=f"prune-versions-{tag}"
            )(run.model_name, policy.keep_versions, run.cache_dir)
    except (LatentflowError, OSError) as exc:
        get_run_logger().warning("retention failed, will retry next run: %s", exc)
        out["retention_error"] = str(exc)
    return out


def alert(
    cfg: PipelineConfig,
    run: RunTarget,
    summary: dict[str, Any],
    drift: DriftReport | None,
    decision: Decision,
) -> None:
    """Send the run's alerts: reject share or anomaly rate above their levels,
    and a retrain the drift caused (drift is measured only when the champion
    could otherwise be reused, so training after a measurement is its doing)."""
    policy = cfg.policy
    alerts = quality_alerts(
        run.dataset,
        run.run_date,
        summary["rows_in"],
        summary["rows_rejected"],
        summary["anomalies"],
        summary["rows_scored"],
        policy.alert_reject_share,
        policy.alert_anomaly_rate,
    )
    if drift is not None and decision.action == "train":
        alerts.append(drift_alert(run.dataset, run.run_date, decision.reason))
    for one in alerts:
        send_alert(run.dataset, run.run_date, one)


def report(
    run: RunTarget,
    ingested: IngestResult,
    scored: ScoreResult,
    summary: dict[str, Any],
    drift: DriftReport | None,
) -> None:
    """The run's Prefect artifacts: the summary with its links, the top
    anomalies with their explanations, and the drift table."""
    top = top_anomalies_task.with_options(task_run_name=f"top-anomalies-{run.tag}")(
        Path(scored.output_dir), ingested.schema.keys
    )
    publish_report.with_options(task_run_name=f"report-{run.tag}")(
        summary,
        {},
        summary["reason"],
        top,
        key=_artifact_key(run),
        drift=None if drift is None else drift_rows(drift),
    )


def _artifact_key(run: RunTarget) -> str:
    return run.dataset.replace("_", "-")


def _allowed_sources(cfg: PipelineConfig) -> list[Path]:
    """The input's files, once the host's confinement policy allows the run.

    The policy comes from the executing host's environment, never from the
    run's parameters; a run started from a deployment is always confined.
    """
    policy = run_confinement()
    if policy is not None:
        return policy.check(cfg)
    return [Path(p) for p in list_sources(cfg.data.input)]


def _gather(futures: Sequence[PrefectFuture[Any]]) -> list[Any]:
    """Every future's result, after all have finished.

    Waiting for all first means no task is still writing into a staged
    directory when a failure makes the caller discard it; the first failure
    in submission order is the one raised.
    """
    wait(list(futures))
    return [f.result() for f in futures]


# -- subflows ---------------------------------------------------------------------


@flow(name="latentflow-score", flow_run_name="score-{tag}")
def score_partitioned(
    ingested_dir: Path,
    bundle: Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    provenance: Provenance,
    *,
    tag: str,
    batch_rows: int,
    unit_rows: int = DEFAULT_UNIT_ROWS,
    publish: bool = True,
    anomaly_cut: float | None = None,
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
        provenance,
        unit_rows=unit_rows,
        anomaly_cut=anomaly_cut,
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
    roles: IngestRoles,
    *,
    tag: str,
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
        per_file = roles.as_kwargs()
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
            max_reject_fraction=max_reject_fraction,
            publish=publish,
            **roles.as_kwargs(),
        )
    return result


@flow(name="latentflow-challenge", flow_run_name="challenge-{run.tag}")
def challenge(
    cfg: PipelineConfig,
    run: RunTarget,
    ingested: IngestResult,
    champion: ChampionInfo | None,
    reason: str,
    started_ms: int | None = None,
) -> ChosenModel:
    """Train a challenger, register it, and promote it only if it beats the
    champion on the same holdout of the new data (or the operator said
    ``--promote``: then whatever the gate says, and recorded as such)."""
    trained, registered = train_and_register(
        cfg, run, ingested, champion, reason, started_ms
    )
    verdict = gate_task.with_options(task_run_name=f"gate-{run.tag}")(
        trained.metrics["val_mse"],
        trained.metrics.get("champion_holdout_mse"),
        cfg.policy.min_improvement,
    )
    override = cfg.policy.promote and not verdict.promote
    tags = verdict.tags(champion, override=override)
    tag_version_task.with_options(task_run_name=f"tag-{run.tag}")(
        registered.name, registered.version, registered.run_id, tags
    )
    promoted = verdict.promote or override
    if override:
        get_run_logger().warning(
            "operator override (--promote): promoting v%s although the gate said: %s",
            registered.version,
            verdict.reason,
        )
    if promoted:
        promote_task.with_options(task_run_name=f"promote-{run.tag}")(
            registered.name, registered.version, run.cache_dir
        )
    get_run_logger().info("challenger v%s: %s", registered.version, tags)
    progress.done(
        "gate",
        f"challenger v{registered.version}:"
        f" {'promote' if promoted else 'keep_champion'}"
        f" ({'operator override' if override else verdict.reason})",
    )
    # A challenger that lost leaves the champion scoring the run.
    kept = None if promoted else champion
    version = kept.version if kept else registered.version
    gate_reason = (
        f"operator override (--promote); the gate said: {verdict.reason}"
        if override
        else verdict.reason
    )
    return ChosenModel(
        version=version,
        run_id=kept.run_id if kept else registered.run_id,
        bundle_dir=str(registry.fetch_model(run.model_name, version, run.cache_dir)),
        outcome="promote" if promoted else "keep_champion",
        gate_reason=gate_reason,
        metrics=trained.metrics,
        override=override,
        trained_run_id=registered.run_id,
    )


def train_and_register(
    cfg: PipelineConfig,
    run: RunTarget,
    ingested: IngestResult,
    champion: ChampionInfo | None,
    reason: str,
    started_ms: int | None = None,
) -> tuple[TrainResult, RegisteredVersion]:
    """Train on the staged partition and register the bundle with its card.

    The MLflow run is named ``<dataset>-<run_date>`` and starts when the
    night did, so its duration covers the training."""
    model, params = cfg.model, cfg.estimator_params()
    # The directory's name becomes the artifact's name in MLflow.
    stage = staging_root(run.data_dir) / f"model.{run.dataset}.{uuid.uuid4().hex[:12]}"
    bundle_dir = stage / registry.BUNDLE_ARTIFACT
    fair = champion is not None and comparable(
        champion, ingested.schema, cfg.model_params()
    )
    started = time.perf_counter()
    progress.current().status("train: preparing the sample …")
    # The drop and the days before it, up to train_window_days.
    window = gather_window(
        run.data_dir,
        run.dataset,
        run.run_date,
        Path(ingested.ingested_dir),
        cfg.policy.train_window_days,
    )
    rows_dir = window.directory if window else Path(ingested.ingested_dir)
    trained_on = window.describe() if window else str(run.run_date)
    if window and window.skipped:
        get_run_logger().info(
            "training leaves out %s: columns differ from the drop's",
            ", ".join(map(str, window.skipped)),
        )
    try:
        trained = train_task.with_options(task_run_name=f"train-{run.tag}")(
            rows_dir,
            ingested.schema,
            bundle_dir,
            dataset=run.dataset,
            estimator_params=params,
            label=cfg.data.label,
            max_train_rows=model.max_train_rows,
            holdout_fraction=model.holdout_fraction,
            n_clusters=model.n_clusters,
            plots_dir=stage / "plots",
            champion_dir=Path(champion.model_dir) if fair and champion else None,
            # Any champion of the same latent size: its axes are kept.
            align_to=Path(champion.model_dir) if champion else None,
        )
        publish_plots.with_options(task_run_name=f"plots-{run.tag}")(
            [Path(p) for p in trained.plots], key=_artifact_key(run)
        )
        progress.done(
            "train",
            f"{trained.metrics.get('epochs_run', 0):.0f} epochs,"
            f" val_mse {trained.metrics['val_mse']:.5f}",
            started,
        )
        card = model_card_task.with_options(task_run_name=f"card-{run.tag}")(
            run.dataset,
            run.run_date,
            ingested.schema,
            trained,
            params,
            model.latent_dim,
            model.contamination,
        )
        registered = register_task.with_options(task_run_name=f"register-{run.tag}")(
            bundle_dir=bundle_dir,
            name=run.model_name,
            dataset=run.dataset,
            data_dir=run.data_dir,
            params={**trained.params, "config_hash": cfg.config_hash()},
            history=trained.history,
            metrics=trained.metrics,
            tags={
                "reason": reason,
                "dataset": run.dataset,
                "run_date": str(run.run_date),
                "config_hash": cfg.config_hash(),
                "trained_on": trained_on,
            },
            sample=trained.sample,
            plots=[Path(p) for p in trained.plots],
            description=card,
            run_name=run.tag,
            started_ms=started_ms,
        )
    finally:
        with contextlib.suppress(OSError):
            remove_tree(run.data_dir, stage)
        if window is not None:
            remove_scratch(window.directory)
    return trained, registered
