"""Register or serve the latentflow deployments against a Prefect API.

Uses whatever ``PREFECT_API_URL`` points at (``make serve`` sets it for you)::

    python -m deployments.deploy serve                 # run them here (subprocesses)
    python -m deployments.deploy pools                 # create/update the work pools
    python -m deployments.deploy apply --pool latentflow-process
    python -m deployments.deploy apply --pool latentflow-gpu --image REG/latentflow:TAG

``serve`` is what ``make serve`` runs: the deployments are registered with
their schedules and every flow run (scheduled or started from the UI/API)
executes as a subprocess of this process. ``apply`` instead hands the same
deployments to a work pool, whose worker (``prefect worker start --pool
latentflow-process``, or a Kubernetes worker for ``latentflow-gpu``) runs them.
A deployment has one home: applying to a pool re-points it there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

PROCESS_POOL = "latentflow-process"
GPU_POOL = "latentflow-gpu"
GPU_POOL_TYPE = "kubernetes"
GPU_TEMPLATE = Path(__file__).with_name("gpu-pool-template.json")
# Inside the GPU job's container the data volume is mounted here (see the template).
GPU_DATA_DIR = "/data"


def gpu_pool_template() -> dict[str, Any]:
    """The GPU pool's base job template: a Kubernetes Job asking for NVIDIA GPUs."""
    return json.loads(GPU_TEMPLATE.read_text(encoding="utf-8"))


def process_pool_template() -> dict[str, Any]:
    """Prefect's own default template for a ``process`` pool."""
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


def ensure_pools() -> dict[str, str]:
    """Create the two work pools, or update their templates; returns name -> type."""
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists

    pools = {
        PROCESS_POOL: (
            "process",
            process_pool_template(),
            "CPU: flow runs as local processes of a `prefect worker start` host",
        ),
        GPU_POOL: (
            GPU_POOL_TYPE,
            gpu_pool_template(),
            "GPU: each flow run is a Kubernetes Job with nvidia.com/gpu limits",
        ),
    }
    with get_client(sync_client=True) as client:
        for name, (kind, template, description) in pools.items():
            try:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type=kind,
                        base_job_template=template,
                        description=description,
                    )
                )
            except ObjectAlreadyExists:
                client.update_work_pool(
                    name,
                    WorkPoolUpdate(base_job_template=template, description=description),
                )
    return {name: spec[0] for name, spec in pools.items()}


def apply(
    pool: str,
    *,
    image: str | None = None,
    data_dir: str | None = None,
    weatheraus_csv: str | None = None,
) -> list[str]:
    """Register the deployments on ``pool``; returns their full names."""
    from deployments.definitions import (
        build_deployments,
        confinement_env,
        default_weatheraus_input,
    )

    job_variables: dict[str, Any] = {}
    if pool == GPU_POOL:
        if not image:
            raise SystemExit(
                f"--image is required for {GPU_POOL}: the Kubernetes Job runs it"
            )
        data_dir = data_dir or GPU_DATA_DIR
        weatheraus_csv = weatheraus_csv or f"{GPU_DATA_DIR}/input/weatherAUS.csv"
    if image:
        job_variables["image"] = image
    # The worker's runs are confined to these roots. Job variables can be
    # overridden per run through the API, so the API needs auth on this path
    # (see docs/operations.md, "Serving safely").
    job_variables["env"] = confinement_env(
        data_dir, [weatheraus_csv or default_weatheraus_input(data_dir)]
    )
    deployments = build_deployments(
        data_dir=data_dir,
        weatheraus_csv=weatheraus_csv,
        work_pool_name=pool,
        job_variables=job_variables,
    )
    names = []
    for dep in deployments:
        dep.apply()
        names.append(dep.full_name)
    return names


def serve(*, limit: int | None = None) -> None:
    """Register the deployments and execute their runs here until stopped."""
    from prefect import serve as prefect_serve

    from deployments.definitions import build_deployments, confinement_env

    # Flow runs are subprocesses of this one and inherit its environment: their
    # roots are fixed here, on the serving host, out of any API caller's reach.
    os.environ.update(confinement_env())
    deployments = build_deployments()
    # The automations are applied with the deployments: alerts as code.
    for name in ensure_alerts():
        print(f"automation {name}", flush=True)
    for dep in deployments:
        # Assigned, not just defaulted: the update then clears a work pool left by
        # an earlier ``apply``, so no worker competes with this process for runs
        # (the same thing ``Runner.add_flow`` does).
        dep.work_pool_name = None
        dep.work_queue_name = None
    # Schedules stay active on shutdown: ``make serve`` stops the server with us,
    # and a later serve re-applies them anyway.
    prefect_serve(*deployments, pause_on_shutdown=False, limit=limit)


def ensure_alerts() -> list[str]:
    """The alert automations (deployments/alerts.py), if a destination is set."""
    from deployments.alerts import ensure_alerts as apply_alerts

    return apply_alerts()


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deployments.deploy", description=__doc__
    )
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="register the deployments and run them here")
    s.add_argument("--limit", type=int, help="most flow runs at once (all deployments)")
    sub.add_parser("pools", help=f"create/update {PROCESS_POOL} and {GPU_POOL}")
    a = sub.add_parser("apply", help="register the deployments on a work pool")
    a.add_argument("--pool", default=PROCESS_POOL, help=f"default {PROCESS_POOL}")
    a.add_argument("--image", help="container image (required for the GPU pool)")
    a.add_argument("--data-dir", help="data_dir as the worker's runs see it")
    a.add_argument("--weatheraus-csv", help="nightly input as the runs see it")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        serve(limit=args.limit)
    elif args.command == "pools":
        for name, kind in ensure_pools().items():
            print(f"work pool {name} ({kind})")
    else:
        for name in apply(
            args.pool,
            image=args.image,
            data_dir=args.data_dir,
            weatheraus_csv=args.weatheraus_csv,
        ):
            print(f"deployment {name} -> work pool {args.pool}")
        # The automations are applied with the deployments: alerts as code.
        for name in ensure_alerts():
            print(f"automation {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
