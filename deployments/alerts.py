"""Alerts as code: the Prefect automations that turn latentflow's conditions
into notifications, created with the deployments.

Four automations, each sending to one notification block:

``latentflow: run failed``
    a ``latentflow-nightly`` or ``latentflow-backfill`` flow run entered
    Failed or Crashed;
``latentflow: data quality``
    a run's reject share or anomaly rate was above its configured level
    (``policy.alert_reject_share`` / ``policy.alert_anomaly_rate``);
``latentflow: retrain on drift``
    a run retrained because its data drifted from the champion's reference;
``latentflow: missing drop``
    a night's drop of a date-templated input was not there.

The flow compares the numbers and emits the events (:mod:`tasks.alerts`); an
automation matches event names, never values. The block is a Custom Webhook
block named ``latentflow-alerts`` that POSTs ``{"subject": ..., "body": ...}``
as JSON to ``LATENTFLOW_ALERT_WEBHOOK_URL``; ``LATENTFLOW_ALERT_BLOCK`` names
any other notification block instead (Slack, Teams, email: created in the UI
or with ``prefect block``). With neither set, no automations are created.
Applying again replaces the automations of the same names: there is always
one of each.
"""

from __future__ import annotations

import os
from typing import Any
from uuid import UUID

from flows.backfill import FLOW_NAME as BACKFILL_FLOW
from flows.nightly import FLOW_NAME as NIGHTLY_FLOW
from tasks.alerts import ANOMALY_RATE, DRIFT_RETRAIN, MISSING_DROP, REJECT_SHARE

WEBHOOK_ENV = "LATENTFLOW_ALERT_WEBHOOK_URL"
BLOCK_ENV = "LATENTFLOW_ALERT_BLOCK"
BLOCK_NAME = "latentflow-alerts"
PREFIX = "latentflow: "
FAILED = f"{PREFIX}run failed"
QUALITY = f"{PREFIX}data quality"
DRIFT = f"{PREFIX}retrain on drift"
MISSING = f"{PREFIX}missing drop"

_DATASET = {"prefect.resource.id": "latentflow.dataset.*"}
_MESSAGE = "{{ event.payload.message }}"


def webhook_block(url: str) -> Any:
    """The default destination: a JSON POST of the subject and body to ``url``."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock

    return CustomWebhookNotificationBlock(
        name="latentflow",
        url=url,
        method="POST",
        json_data={"subject": "{{subject}}", "body": "{{body}}"},
    )


def save_webhook_block(url: str) -> UUID:
    """Create or update the ``latentflow-alerts`` webhook block; its id."""
    return webhook_block(url).save(BLOCK_NAME, overwrite=True)


def block_id_by_name(name: str) -> UUID:
    """The id of an existing notification block, ``slug/name`` or a name that
    only one block type uses."""
    from prefect import get_client

    with get_client(sync_client=True) as client:
        if "/" in name:
            slug, block = name.split("/", 1)
            return client.read_block_document_by_name(block, slug).id
        docs = [d for d in client.read_block_documents() if d.name == name]
    if len(docs) != 1:
        raise ValueError(
            f"{BLOCK_ENV}={name}: expected one notification block of that name,"
            f" found {len(docs)}; give it as <block-type-slug>/<name>"
        )
    return docs[0].id


def automations(block_id: UUID) -> list[Any]:
    """The four automations, sending to ``block_id``."""
    from prefect.automations import AutomationCore
    from prefect.events.actions import SendNotification
    from prefect.events.schemas.automations import EventTrigger, Posture

    def event(
        expect: set[str],
        match: dict[str, Any],
        related: dict[str, Any] | None = None,
    ) -> EventTrigger:
        return EventTrigger(
            expect=expect,
            match=match,
            match_related=related or {},
            posture=Posture.Reactive,
            threshold=1,
            within=0,
        )

    def notify(subject: str, body: str) -> SendNotification:
        return SendNotification(block_document_id=block_id, subject=subject, body=body)

    failed = event(
        {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
        {"prefect.resource.id": "prefect.flow-run.*"},
        {
            "prefect.resource.role": "flow",
            "prefect.resource.name": [NIGHTLY_FLOW, BACKFILL_FLOW],
        },
    )
    return [
        AutomationCore(
            name=FAILED,
            description="A nightly or backfill flow run failed or crashed.",
            trigger=failed,
            actions=[
                notify(
                    "latentflow run failed",
                    "latentflow flow run {{ event.resource.name }}:"
                    " {{ event.event }}: {{ event.payload.validated_state.message }}",
                )
            ],
        ),
        AutomationCore(
            name=QUALITY,
            description="Reject share or anomaly rate above its configured level.",
            trigger=event({REJECT_SHARE, ANOMALY_RATE}, _DATASET),
            actions=[notify("latentflow data quality", _MESSAGE)],
        ),
        AutomationCore(
            name=DRIFT,
            description="A run retrained because its data drifted.",
            trigger=event({DRIFT_RETRAIN}, _DATASET),
            actions=[notify("latentflow retrain on drift", _MESSAGE)],
        ),
        AutomationCore(
            name=MISSING,
            description="A night's drop was not there.",
            trigger=event({MISSING_DROP}, _DATASET),
            actions=[notify("latentflow missing drop", _MESSAGE)],
        ),
    ]


def ensure_alerts(
    webhook_url: str | None = None, block_name: str | None = None
) -> list[str]:
    """Create (or replace) the automations against the current Prefect API.

    ``webhook_url`` / ``block_name`` default to ``LATENTFLOW_ALERT_WEBHOOK_URL``
    / ``LATENTFLOW_ALERT_BLOCK``; with neither, nothing is created and an empty
    list is returned. Returns the automations' names.
    """
    from prefect import get_client

    webhook_url = webhook_url or os.environ.get(WEBHOOK_ENV) or None
    block_name = block_name or os.environ.get(BLOCK_ENV) or None
    if block_name:
        block_id = block_id_by_name(block_name)
    elif webhook_url:
        block_id = save_webhook_block(webhook_url)
    else:
        return []
    made = []
    with get_client(sync_client=True) as client:
        for automation in automations(block_id):
            for old in client.read_automations_by_name(automation.name):
                client.delete_automation(old.id)
            client.create_automation(automation)
            made.append(automation.name)
    return made
