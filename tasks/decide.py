"""Train or reuse: a pure decision over small typed facts."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from prefect import task


@dataclass(frozen=True)
class ChampionInfo:
    """What the registry knows about the current champion of a dataset."""

    name: str
    version: int
    run_id: str
    created_at: datetime
    model_dir: str
    input_schema: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    action: Literal["train", "reuse"]
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _required(schema: dict[str, Any]) -> dict[str, str]:
    return {
        c["name"]: c["kind"]
        for c in schema.get("columns", [])
        if c.get("role") in ("key", "feature")
    }


def schema_difference(model_schema: dict[str, Any], data_schema: dict[str, Any]) -> str:
    """Empty when the data fits the model; else a short description of the change."""
    want, have = _required(model_schema), _required(data_schema)
    missing = sorted(set(want) - set(have))
    added = sorted(set(have) - set(want))
    retyped = sorted(c for c in set(want) & set(have) if want[c] != have[c])
    parts = []
    if missing:
        parts.append("missing " + ", ".join(missing))
    if added:
        parts.append("new " + ", ".join(added))
    if retyped:
        parts.append(
            "retyped " + ", ".join(f"{c} {want[c]}->{have[c]}" for c in retyped)
        )
    return "; ".join(parts)


def decide(
    champion: ChampionInfo | None,
    data_schema: dict[str, Any],
    now: datetime,
    max_model_age_days: int,
    retrain: bool,
) -> Decision:
    """Reuse the champion only when it exists, fits the data and is young enough."""
    if retrain:
        return Decision("train", "forced")
    if champion is None:
        return Decision("train", "no_champion")
    diff = schema_difference(champion.input_schema, data_schema)
    if diff:
        return Decision("train", f"schema_changed: {diff}")
    age_days = (now - champion.created_at).total_seconds() / 86400
    if age_days > max_model_age_days:
        return Decision("train", f"too_old: {age_days:.1f} days > {max_model_age_days}")
    return Decision(
        "reuse",
        f"champion v{champion.version} fits the schema, {age_days:.1f} days old",
    )


decide_task = task(decide, name="decide")
