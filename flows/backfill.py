"""``latentflow-backfill``: the nightly flow over a range of run dates, in order.

Each date runs as a ``latentflow-nightly`` subflow with the same config and
its own run date, so it trains only where the policy says so (a first night,
drift, age, a forced retrain) and reads its own drop of a date-templated
input. The range is:

- in order: a date's champion is the one the dates before it left;
- idempotent: a date whose published ``latent/`` partition was written with
  this config (its recorded config hash) is skipped, so a second identical
  backfill rewrites nothing and trains nothing;
- resumable: a run date is published whole or not at all, so after a kill a
  rerun finds the finished dates done and completes only the others;
- within retention: with ``keep_days``, a date that retention has already
  removed (``keep_days`` or more before the newest published run date) is
  listed under ``expired`` and not run again;
- tolerant of missing drops: a night without its drop is alerted, listed
  under ``missing`` and skipped; any other failure stops the backfill there.
"""

from __future__ import annotations

import time
from datetime import date
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from prefect import flow, get_run_logger

from flows.config import PipelineConfig
from flows.nightly import nightly
from tasks.alerts import missing_drop_alert
from tasks.alerts import send as send_alert
from tasks.drops import check_drop, is_template, run_dates
from tasks.errors import MissingDropError
from tasks.retention import partition_dates
from tasks.storage import partition_dir

FLOW_NAME = "latentflow-backfill"
CONFIG_HASH_KEY = b"latentflow.config_hash"


def for_date(config: PipelineConfig, day: date) -> PipelineConfig:
    """``config`` with run date ``day`` (its input still a template)."""
    return config.model_copy(
        update={"data": config.data.model_copy(update={"run_date": day})}
    )


def is_done(cfg: PipelineConfig) -> bool:
    """Whether ``cfg``'s run date is published with this very config: its
    ``latent/`` partition's files all record ``cfg``'s config hash."""
    resolved = cfg.resolved()
    data = resolved.data
    assert data.dataset is not None and data.run_date is not None
    base = Path(data.data_dir).expanduser().resolve()
    latent = partition_dir(base, "latent", data.dataset, data.run_date)
    files = sorted(latent.glob("*.parquet")) if latent.is_dir() else []
    if not files:
        return False
    want = resolved.config_hash().encode()
    for f in files:
        meta = pq.read_schema(f).metadata or {}
        if meta.get(CONFIG_HASH_KEY) != want:
            return False
    return True


def is_expired(cfg: PipelineConfig) -> bool:
    """Whether retention would remove ``cfg``'s run date at once: it is
    ``keep_days`` or more before the newest published ``latent/`` run date."""
    keep = cfg.policy.keep_days
    if keep is None:
        return False
    data = cfg.resolved().data
    assert data.dataset is not None and data.run_date is not None
    base = Path(data.data_dir).expanduser().resolve()
    published = partition_dates(base, "latent", data.dataset)
    return bool(published) and (max(published) - data.run_date).days >= keep


def _name() -> str:
    from prefect.runtime import flow_run

    p = flow_run.parameters
    return f"backfill-{p.get('start')}-{p.get('end')}"


@flow(name=FLOW_NAME, flow_run_name=_name, log_prints=False)
def backfill(start: date, end: date, config: PipelineConfig) -> dict[str, Any]:
    """Run the nightly pipeline for every date from ``start`` to ``end``, in
    order; dates already done with this config are skipped."""
    log = get_run_logger()
    dates = run_dates(start, end)
    template = config.data.input
    out: dict[str, Any] = {
        "from": str(start),
        "to": str(end),
        "dates": len(dates),
        "ran": [],
        "skipped": [],
        "missing": [],
        "expired": [],
        "trained": [],
    }
    t0 = time.perf_counter()
    for day in dates:
        cfg = for_date(config, day)
        if is_done(cfg):
            out["skipped"].append(str(day))
            continue
        if is_expired(cfg):
            out["expired"].append(str(day))
            continue
        if is_template(template):
            try:
                check_drop(template, day)
            except MissingDropError as exc:
                resolved = cfg.resolved()
                dataset = resolved.data.dataset or "dataset"
                send_alert(dataset, day, missing_drop_alert(dataset, day, exc.expected))
                out["missing"].append({"run_date": str(day), "expected": exc.expected})
                continue
        summary = nightly(config=cfg)
        out["ran"].append(str(day))
        if summary.get("trained"):
            out["trained"].append(str(day))
        log.info("%s: %s (%s)", day, summary.get("decision"), summary.get("reason"))
    out["seconds"] = round(time.perf_counter() - t0, 2)
    ran = len(out["ran"])
    out["seconds_per_day"] = round(out["seconds"] / ran, 2) if ran else None
    return out
