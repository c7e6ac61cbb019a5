"""The pipeline's alert events: what Prefect automations turn into notifications.

Each condition the operators want to hear about is a Prefect event about the
dataset (resource ``latentflow.dataset.<name>``) with a one-line ``message``
in its payload; the automations in :mod:`deployments.alerts` match the event
names below. Levels are compared here, where the numbers are known, because
an automation matches events, not values.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from typing import Any

MISSING_DROP = "latentflow.drop.missing"
REJECT_SHARE = "latentflow.quality.reject-share"
ANOMALY_RATE = "latentflow.quality.anomaly-rate"
DRIFT_RETRAIN = "latentflow.retrain.drift"
#: Every alert event, for the automations.
EVENTS = (MISSING_DROP, REJECT_SHARE, ANOMALY_RATE, DRIFT_RETRAIN)

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alert:
    """One alert: its event name and the line a person reads."""

    event: str
    message: str
    values: dict[str, Any]


def resource(dataset: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"latentflow.dataset.{dataset}",
        "prefect.resource.name": dataset,
    }


def quality_alerts(
    dataset: str,
    run_date: date,
    rows_in: int,
    rows_rejected: int,
    anomalies: int,
    rows_scored: int,
    max_reject_share: float,
    max_anomaly_rate: float,
) -> list[Alert]:
    """The reject-share and anomaly-rate alerts a finished run raises."""
    out = []
    share = rows_rejected / rows_in if rows_in else 0.0
    if share > max_reject_share:
        out.append(
            Alert(
                REJECT_SHARE,
                f"{dataset} {run_date}: {share:.2%} of rows rejected"
                f" ({rows_rejected} of {rows_in}), above {max_reject_share:.2%}",
                {"reject_share": share, "level": max_reject_share},
            )
        )
    rate = anomalies / rows_scored if rows_scored else 0.0
    if rate > max_anomaly_rate:
        out.append(
            Alert(
                ANOMALY_RATE,
                f"{dataset} {run_date}: {rate:.2%} of rows anomalous"
                f" ({anomalies} of {rows_scored}), above {max_anomaly_rate:.2%}",
                {"anomaly_rate": rate, "level": max_anomaly_rate},
            )
        )
    return out


def drift_alert(dataset: str, run_date: date, reason: str) -> Alert:
    return Alert(
        DRIFT_RETRAIN,
        f"{dataset} {run_date}: retrained because the data drifted ({reason})",
        {"reason": reason},
    )


def missing_drop_alert(dataset: str, run_date: date, expected: str) -> Alert:
    return Alert(
        MISSING_DROP,
        f"{dataset} {run_date}: no drop; expected {expected}",
        {"expected": expected},
    )


def send(dataset: str, run_date: date, alert: Alert) -> None:
    """Emit ``alert`` as a Prefect event (a no-op where events are off)."""
    from prefect.events import emit_event

    payload = {"message": alert.message, "run_date": str(run_date), **alert.values}
    _log.warning("alert %s: %s", alert.event, alert.message)
    emit_event(alert.event, resource=resource(dataset), payload=payload)
