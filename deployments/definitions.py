"""The latentflow deployments, as code: one place for names, schedules and limits.

Two deployments of the flow ``latentflow-nightly`` and one of
``latentflow-backfill``:

``weatheraus-nightly``
    Every day at 02:00 Australia/Sydney (DST handled by the scheduler), on
    that night's weatherAUS drop (a date-templated input, rendered for the
    date the run was due in Sydney) with its preset.
``latentflow-on-demand``
    No schedule: run it from the UI (Run > Custom run), ``prefect deployment
    run`` or ``run_deployment`` with any dataset.
``latentflow-backfill``
    No schedule: the form asks for a range (start, end) and the config, with
    the nightly's defaults; the dates run in order and a rerun completes only
    those not done.

All refuse parameters that do not match ``PipelineConfig``'s JSON schema
before a run is created (``enforce_parameter_schema``), allow one run at a time
and queue the rest (concurrency limit 1, ``ENQUEUE``), and time out after
``LATENTFLOW_FLOW_TIMEOUT_SECONDS`` (default 6 h).

The flow object every deployment runs is :data:`nightly_deployed`, the flow
with the deployment's options, and it is referenced by its *module path*
(:data:`ENTRYPOINT`): a process that executes a run (the serve runner, a
process worker or a container) re-imports that object, so options given with
``with_options`` here are the options that run, and no working directory or
code copy is involved (latentflow is an installed package).

Environment (read when the deployments are built, i.e. when they are served or
applied):

- ``LATENTFLOW_DATA_DIR``: output root for both deployments
  (default ``<repo>/.serve``, the ``make serve`` data dir);
- ``LATENTFLOW_WEATHERAUS_DROPS``: the nightly input, a template such as
  ``/feeds/weatheraus/{run_date}.csv`` (default
  ``<data-dir>/input/weatheraus/{run_date}.csv``);
- ``LATENTFLOW_WEATHERAUS_CSV``: a plain file instead (the whole CSV again
  every night; only when no template is set);
- ``LATENTFLOW_ON_DEMAND_INPUT``: an optional default input for the on-demand
  deployment (otherwise the person starting a run fills it in);
- ``LATENTFLOW_FLOW_TIMEOUT_SECONDS``: flow-run timeout (default 21600);
- ``LATENTFLOW_INPUT_ROOTS`` / ``LATENTFLOW_DATA_ROOTS`` (os.pathsep-separated):
  where runs of these deployments may read inputs and write data dirs; by
  default (:func:`confinement_env`) the data dir, its ``input/`` folder and
  the nightly's input file. Every run from a deployment is held to them (see
  :func:`flows.config.confinement`), whatever its parameters say.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect.client.schemas.objects import (
    ConcurrencyLimitConfig,
    ConcurrencyLimitStrategy,
)
from prefect.client.schemas.schedules import CronSchedule

from flows.backfill import backfill
from flows.nightly import nightly
from flows.synthesize import synthesize
from tasks.drops import is_template, template_stem

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

REPO = Path(__file__).resolve().parents[1]

NIGHTLY = "weatheraus-nightly"
ON_DEMAND = "latentflow-on-demand"
BACKFILL = "latentflow-backfill"
NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_TIMEZONE = "Australia/Sydney"
DEFAULT_TIMEOUT_SECONDS = 6 * 3600
# A nightly run that finds an on-demand run of weatherAUS holding the dataset
# lock waits this long for it instead of failing at once.
NIGHTLY_LOCK_WAIT_SECONDS = 3600.0
TAGS = ["latentflow"]

ENTRYPOINT = "deployments.definitions.nightly_deployed"
SYNTHESIZE = "latentflow-synthesize"
SYNTHESIZE_ENTRYPOINT = "deployments.definitions.synthesize_deployed"
BACKFILL_ENTRYPOINT = "deployments.definitions.backfill_deployed"
#: Retention of the nightly: partitions for a quarter, ten older models.
NIGHTLY_KEEP_DAYS = 90
NIGHTLY_KEEP_VERSIONS = 10


def flow_timeout_seconds() -> float:
    """The flow-run timeout: ``LATENTFLOW_FLOW_TIMEOUT_SECONDS`` or 6 hours."""
    raw = os.environ.get("LATENTFLOW_FLOW_TIMEOUT_SECONDS", "")
    try:
        value = float(raw) if raw.strip() else DEFAULT_TIMEOUT_SECONDS
    except ValueError:
        raise ValueError(
            f"LATENTFLOW_FLOW_TIMEOUT_SECONDS must be a number of seconds, got {raw!r}"
        ) from None
    if value <= 0:
        raise ValueError("LATENTFLOW_FLOW_TIMEOUT_SECONDS must be positive")
    return value


# The flow as deployed. The timeout is deployment policy, so it is set here and
# flows/nightly.py stays runnable without one from the CLI.
nightly_deployed = nightly.with_options(timeout_seconds=flow_timeout_seconds())
backfill_deployed = backfill


synthesize_deployed = synthesize.with_options(timeout_seconds=flow_timeout_seconds())


def default_data_dir() -> Path:
    """``LATENTFLOW_DATA_DIR``, else ``<repo>/.serve``; always absolute."""
    raw = os.environ.get("LATENTFLOW_DATA_DIR")
    return Path(raw).expanduser().resolve() if raw else REPO / ".serve"


def default_weatheraus_input(data_dir: Path | str | None = None) -> str:
    """The nightly's input: ``LATENTFLOW_WEATHERAUS_DROPS`` (a template), else
    ``LATENTFLOW_WEATHERAUS_CSV`` (one file), else
    ``<data-dir>/input/weatheraus/{run_date}.csv``; always absolute."""
    drops = os.environ.get("LATENTFLOW_WEATHERAUS_DROPS")
    if drops:
        return str(Path(drops).expanduser().absolute())
    if os.environ.get("LATENTFLOW_WEATHERAUS_CSV"):
        return str(default_weatheraus_csv())
    base = Path(data_dir) if data_dir else default_data_dir()
    return f"{base}/input/weatheraus/{{run_date}}.csv"


def input_root(source: Path | str) -> str:
    """What a confinement root must hold for ``source``: the file itself, or
    for a template the fixed directory before its first field."""
    text = str(source)
    if not is_template(text):
        return text
    stem = template_stem(text)
    return stem if text[len(stem) :].startswith("/") else str(Path(stem).parent)


def default_weatheraus_csv() -> Path:
    """``LATENTFLOW_WEATHERAUS_CSV``, else ``<repo>/../shared/data/weatherAUS.csv``."""
    raw = os.environ.get("LATENTFLOW_WEATHERAUS_CSV")
    path = Path(raw) if raw else REPO.parent / "shared" / "data" / "weatherAUS.csv"
    # Absolute: served runs start in a temporary working directory.
    return path.expanduser().resolve()


def confinement_env(
    data_dir: Path | str | None = None,
    inputs: list[Path | str | None] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """``LATENTFLOW_INPUT_ROOTS`` / ``LATENTFLOW_DATA_ROOTS`` for the hosts that run
    the deployments: those already set in ``env`` (default ``os.environ``) are
    kept, others default to the data dir, ``<data-dir>/input`` and ``inputs``
    (the nightly's file, ``LATENTFLOW_ON_DEMAND_INPUT``).
    """
    from flows.config import DATA_ROOTS_ENV, INPUT_ROOTS_ENV, INPUT_SUBDIR

    env = dict(os.environ if env is None else env)
    data = str(data_dir or default_data_dir())
    if inputs is None:
        inputs = [
            default_weatheraus_input(data),
            os.environ.get("LATENTFLOW_ON_DEMAND_INPUT"),
        ]
    roots = [
        f"{data.rstrip('/')}/{INPUT_SUBDIR}",
        *(input_root(p) for p in inputs if p),
    ]
    return {
        DATA_ROOTS_ENV: env.get(DATA_ROOTS_ENV) or data,
        INPUT_ROOTS_ENV: env.get(INPUT_ROOTS_ENV) or os.pathsep.join(roots),
    }


def one_at_a_time() -> ConcurrencyLimitConfig:
    """One active run per deployment; later ones wait in the queue, never fail."""
    return ConcurrencyLimitConfig(
        limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
    )


def nightly_parameters(
    data_dir: Path | str | None = None, input_path: Path | str | None = None
) -> dict[str, Any]:
    """Default parameters of ``weatheraus-nightly`` (JSON, as the API stores them),
    in the config's sections, so the UI form shows them in their groups."""
    return {
        "config": {
            "data": {
                "input": str(input_path or default_weatheraus_input(data_dir)),
                "data_dir": str(data_dir or default_data_dir()),
                "dataset": "weatheraus",
                # The run date is the night the schedule fired, in Sydney.
                "timezone": NIGHTLY_TIMEZONE,
            },
            "policy": {
                "keep_days": NIGHTLY_KEEP_DAYS,
                "keep_versions": NIGHTLY_KEEP_VERSIONS,
            },
            "execution": {"lock_wait_seconds": NIGHTLY_LOCK_WAIT_SECONDS},
        }
    }


def on_demand_parameters(
    data_dir: Path | str | None = None, input_path: Path | str | None = None
) -> dict[str, Any]:
    """Default parameters of ``latentflow-on-demand``.

    ``input`` is left out unless given (or ``LATENTFLOW_ON_DEMAND_INPUT`` is set):
    the UI then asks for it, and an API call without it is refused.
    """
    data: dict[str, Any] = {"data_dir": str(data_dir or default_data_dir())}
    chosen = input_path or os.environ.get("LATENTFLOW_ON_DEMAND_INPUT")
    if chosen:
        data["input"] = str(Path(chosen).expanduser().resolve())
    return {"config": {"data": data}}


def build_deployments(
    *,
    data_dir: Path | str | None = None,
    weatheraus_csv: Path | str | None = None,
    on_demand_input: Path | str | None = None,
    work_pool_name: str | None = None,
    job_variables: dict[str, Any] | None = None,
) -> list[RunnerDeployment]:
    """The four deployments (nightly, on-demand, backfill, synthesize), ready
    for ``prefect.serve(*...)`` or ``.apply()``.

    Without ``work_pool_name`` they are for ``serve`` (runs are subprocesses of
    the serving process); with one, a worker of that pool runs them.
    """
    from prefect.deployments.runner import RunnerDeployment

    common: dict[str, Any] = {
        "concurrency_limit": one_at_a_time(),
        "enforce_parameter_schema": True,
        "work_pool_name": work_pool_name,
        "job_variables": job_variables if work_pool_name else None,
    }
    nightly_dep = RunnerDeployment.from_entrypoint(
        ENTRYPOINT,
        name=NIGHTLY,
        schedules=[CronSchedule(cron=NIGHTLY_CRON, timezone=NIGHTLY_TIMEZONE)],
        # Explicit: re-applying must not leave a schedule paused by an earlier stop.
        paused=False,
        parameters=nightly_parameters(data_dir, weatheraus_csv),
        description=(
            "weatherAUS every night at 02:00 Australia/Sydney: ingest, train or"
            " reuse the champion, score, publish latent features and anomalies."
        ),
        tags=[*TAGS, "weatheraus", "nightly"],
        **common,
    )
    on_demand = RunnerDeployment.from_entrypoint(
        ENTRYPOINT,
        name=ON_DEMAND,
        parameters=on_demand_parameters(data_dir, on_demand_input),
        description=(
            "Run latentflow once on any dataset: set the input (file, directory"
            " or glob) under Data, and any other setting in its group."
        ),
        tags=[*TAGS, "on-demand"],
        **common,
    )
    backfill_dep = RunnerDeployment.from_entrypoint(
        BACKFILL_ENTRYPOINT,
        name=BACKFILL,
        # The range is asked for; the config defaults to the nightly's.
        parameters=nightly_parameters(data_dir, weatheraus_csv),
        description=(
            "Run the nightly pipeline for every date from start to end, in"
            " order; dates already done with the same config are skipped, so a"
            " rerun after a failure completes only the rest."
        ),
        tags=[*TAGS, "backfill"],
        **common,
    )
    synthesize_dep = build_synthesis_deployment(
        data_dir=data_dir, work_pool_name=work_pool_name, job_variables=job_variables
    )
    return [nightly_dep, on_demand, backfill_dep, synthesize_dep]


def synthesize_parameters(data_dir: Path | str | None = None) -> dict[str, Any]:
    """Default parameters of ``latentflow-synthesize``: 10,000 weatherAUS rows
    by the GAN into ``<data-dir>/weatheraus-synthetic.parquet``."""
    data = Path(data_dir or default_data_dir())
    return {
        "params": {
            "data_dir": str(data),
            "dataset": "weatheraus",
            "rows": 10_000,
            "output": str(data / "weatheraus-synthetic.parquet"),
            "generator": "gan",
        }
    }


def build_synthesis_deployment(
    *,
    data_dir: Path | str | None = None,
    work_pool_name: str | None = None,
    job_variables: dict[str, Any] | None = None,
) -> RunnerDeployment:
    """The ``latentflow-synthesize`` deployment (no schedule): its run form is
    :class:`flows.synthesize.SynthesizeParams`, checked before a run is created."""
    from prefect.deployments.runner import RunnerDeployment

    return RunnerDeployment.from_entrypoint(
        SYNTHESIZE_ENTRYPOINT,
        name=SYNTHESIZE,
        parameters=synthesize_parameters(data_dir),
        description=(
            "Write synthetic rows of an ingested dataset (GAN or VAE) and their"
            " quality report against the independent-columns baseline."
        ),
        tags=[*TAGS, "synthesize"],
        concurrency_limit=one_at_a_time(),
        enforce_parameter_schema=True,
        work_pool_name=work_pool_name,
        job_variables=job_variables if work_pool_name else None,
    )
