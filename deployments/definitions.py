"""The latentflow deployments, as code: one place for names, schedules and limits.

Two deployments of the flow ``latentflow-nightly``:

``weatheraus-nightly``
    Every day at 02:00 Australia/Sydney (DST handled by the scheduler), on the
    weatherAUS file with its preset.
``latentflow-on-demand``
    No schedule: run it from the UI (Run > Custom run), ``prefect deployment
    run`` or ``run_deployment`` with any dataset.

Both refuse parameters that do not match ``PipelineConfig``'s JSON schema
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
- ``LATENTFLOW_WEATHERAUS_CSV``: the nightly input
  (default ``<repo>/../shared/data/weatherAUS.csv``);
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

from flows.nightly import nightly
from flows.synthesize import synthesize

if TYPE_CHECKING:
    from prefect.deployments.runner import RunnerDeployment

REPO = Path(__file__).resolve().parents[1]

NIGHTLY = "weatheraus-nightly"
ON_DEMAND = "latentflow-on-demand"
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


synthesize_deployed = synthesize.with_options(timeout_seconds=flow_timeout_seconds())


def default_data_dir() -> Path:
    """``LATENTFLOW_DATA_DIR``, else ``<repo>/.serve``; always absolute."""
    raw = os.environ.get("LATENTFLOW_DATA_DIR")
    return Path(raw).expanduser().resolve() if raw else REPO / ".serve"


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
            default_weatheraus_csv(),
            os.environ.get("LATENTFLOW_ON_DEMAND_INPUT"),
        ]
    roots = [f"{data.rstrip('/')}/{INPUT_SUBDIR}", *(str(p) for p in inputs if p)]
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
                "input": str(input_path or default_weatheraus_csv()),
                "data_dir": str(data_dir or default_data_dir()),
                "dataset": "weatheraus",
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
    """Both deployments, ready for ``prefect.serve(*...)`` or ``.apply()``.

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
    return [nightly_dep, on_demand]


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
