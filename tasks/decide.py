"""Train or reuse: a pure decision over small typed facts."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal

from prefect import task

from models.schema import TableSchema
from tasks.errors import SchemaError
from tasks.policy import PLAIN

#: A schema, typed or in its saved JSON form (a bundle's ``input_schema``).
SchemaLike = TableSchema | dict[str, Any]


@dataclass(frozen=True)
class ChampionInfo:
    """What the registry knows about the current champion of a dataset."""

    name: str
    version: int
    run_id: str
    created_at: datetime
    model_dir: str
    input_schema: TableSchema
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # A saved bundle records the schema as JSON: typed once, here.
        object.__setattr__(self, "input_schema", TableSchema.coerce(self.input_schema))


@dataclass(frozen=True)
class Decision:
    action: Literal["train", "reuse"]
    reason: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def schema_difference(model_schema: SchemaLike, data_schema: SchemaLike) -> str:
    """Empty when the data fits the model; else a short description of the change."""
    want = TableSchema.coerce(model_schema).required()
    have = TableSchema.coerce(data_schema).required()
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


def params_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Empty when the requested model settings equal the champion's."""

    def norm(v: Any) -> str:
        return json.dumps(v, sort_keys=True, default=str)

    changed = [
        f"{k} {old.get(k)!r}->{new[k]!r}"
        for k in sorted(new)
        if k in old and norm(old[k]) != norm(new[k])
    ]
    return ", ".join(changed)


def require_champion_columns(
    champion: ChampionInfo | None, data_schema: SchemaLike, retrain: bool
) -> None:
    """Refuse data that lacks a column the champion needs, unless retraining:
    a silent retrain would change the output contract behind the user's back."""
    if champion is None or retrain:
        return
    have = set(TableSchema.coerce(data_schema).names)
    need = [
        name
        for name in champion.input_schema.with_role("key", "feature")
        if name not in have
    ]
    if need:
        raise SchemaError(
            f"the input lacks column(s) the champion {champion.name} needs:"
            f" {', '.join(need)}; fix the input, or pass --retrain to train a model"
            " on the new schema"
        )


def _train_reason(
    champion: ChampionInfo | None,
    data_schema: SchemaLike,
    now: datetime,
    max_model_age_days: int,
    retrain: bool,
    params: dict[str, Any] | None,
) -> Decision | None:
    """Why the champion cannot be reused whatever the drift; None if it may."""
    if retrain:
        return Decision("train", "forced")
    if champion is None:
        return Decision("train", "no_champion")
    diff = schema_difference(champion.input_schema, data_schema)
    if diff:
        return Decision("train", f"schema_changed: {diff}")
    changed = params_difference(champion.params, params or {})
    if changed:
        # An analyst asked for a different model: that is a new output contract.
        return Decision("train", f"params_changed: {changed}")
    age_days = (now - champion.created_at).total_seconds() / 86400
    if age_days > max_model_age_days:
        return Decision("train", f"too_old: {age_days:.1f} days > {max_model_age_days}")
    return None


def drift_matters(
    champion: ChampionInfo | None,
    data_schema: SchemaLike,
    now: datetime,
    max_model_age_days: int,
    retrain: bool,
    params: dict[str, Any] | None = None,
) -> bool:
    """Whether measuring drift can change the decision: only when the champion
    could otherwise be reused (drift is measured against it, which costs a
    pass over a sample of the data)."""
    reason = _train_reason(
        champion, data_schema, now, max_model_age_days, retrain, params
    )
    return reason is None


def decide(
    champion: ChampionInfo | None,
    data_schema: SchemaLike,
    now: datetime,
    max_model_age_days: int,
    retrain: bool,
    drift: Any | None = None,
    max_drifted_features: int = 0,
    max_error_ratio: float = 1.5,
    params: dict[str, Any] | None = None,
) -> Decision:
    """Reuse the champion only when it exists, fits the data, is young enough and
    the new data has not drifted from its training reference.

    ``params`` are the requested model settings; any difference from the
    champion's retrains. ``drift`` is a :class:`tasks.drift.DriftReport`: more than
    ``max_drifted_features`` features over the PSI threshold, or a median
    reconstruction error more than ``max_error_ratio`` times the training one,
    means retrain.
    """
    reason = _train_reason(
        champion, data_schema, now, max_model_age_days, retrain, params
    )
    if reason is not None or champion is None:
        return reason or Decision("train", "no_champion")
    age_days = (now - champion.created_at).total_seconds() / 86400
    if drift is not None:
        if len(drift.drifted) > max_drifted_features:
            return Decision("train", f"feature_drift: {drift.drifted}")
        if drift.error_median_ratio > max_error_ratio:
            return Decision("train", f"error_drift: x{drift.error_median_ratio:.2f}")
    return Decision(
        "reuse",
        f"champion v{champion.version} fits the schema, {age_days:.1f} days old",
    )


decide_task = task(decide, name="decide", **PLAIN)


@dataclass(frozen=True)
class ChosenModel:
    """The model version that scores the run's rows, and how it was chosen."""

    version: int
    run_id: str
    bundle_dir: str
    #: "reuse" (no training), "promote" (the challenger won) or "keep_champion".
    outcome: str
    gate_reason: str = ""
    #: The challenger's training metrics; empty when nothing was trained.
    metrics: dict[str, float] = field(default_factory=dict)
    #: The operator promoted the challenger whatever the gate said (--promote).
    override: bool = False
    #: The MLflow run of the challenger trained tonight, if any.
    trained_run_id: str = ""

    @classmethod
    def reused(cls, champion: ChampionInfo) -> ChosenModel:
        return cls(champion.version, champion.run_id, champion.model_dir, "reuse")


@dataclass(frozen=True)
class Gate:
    """The champion/challenger verdict after a retrain."""

    promote: bool
    reason: str
    challenger_mse: float
    champion_mse: float | None

    def tags(
        self, champion: ChampionInfo | None, override: bool = False
    ) -> dict[str, str]:
        """The verdict as tags on the challenger's model version, in the run's
        decision vocabulary (``promote`` or ``keep_champion``)."""
        return {
            "decision": "promote" if self.promote or override else "keep_champion",
            "promote_override": "true" if override else "false",
            "gate_reason": self.reason,
            "challenger_holdout_mse": f"{self.challenger_mse:.6g}",
            "champion_holdout_mse": (
                "" if self.champion_mse is None else f"{self.champion_mse:.6g}"
            ),
            "champion_version": str(champion.version) if champion else "",
        }


def gate(
    challenger_mse: float, champion_mse: float | None, min_improvement: float
) -> Gate:
    """Promote only a challenger that beats the champion by ``min_improvement``
    (relative) on the same holdout, or when there is no comparable champion."""
    if champion_mse is None:
        return Gate(True, "no comparable champion", challenger_mse, None)
    bar = champion_mse * (1.0 - min_improvement)
    if challenger_mse <= bar:
        gain = 1 - challenger_mse / max(champion_mse, 1e-12)
        return Gate(True, f"holdout MSE {gain:.1%} lower", challenger_mse, champion_mse)
    return Gate(
        False,
        f"holdout MSE {challenger_mse:.5f} not {min_improvement:.0%} below the"
        f" champion's {champion_mse:.5f}",
        challenger_mse,
        champion_mse,
    )


def comparable(
    champion: ChampionInfo | None, data_schema: SchemaLike, params: dict[str, Any]
) -> bool:
    """Whether a challenger can be judged against the champion on the same terms:
    not when the schema or the requested model settings changed (a new output
    contract is the analyst's decision, not a contest)."""
    return (
        champion is not None
        and not schema_difference(champion.input_schema, data_schema)
        and not params_difference(champion.params, params)
    )


gate_task = task(gate, name="gate", **PLAIN)
