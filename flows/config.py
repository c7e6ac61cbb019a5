"""The flow's one parameter: a validated pydantic model.

Prefect renders it as a form in the UI, one group per section (data, model,
policy, execution; descriptions become help text, bounds and enums become
validation), the CLI builds it from flags and a YAML/TOML file (flat or
sectioned), and deployments set its defaults. Nothing below ``flows/`` imports
it: tasks take explicit arguments.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from models.families import DEFAULT_FAMILY, family_names, get_family
from models.families import model_params as family_params
from models.schema import Roles
from tasks.drops import is_template, render_input, template_stem
from tasks.errors import ConfigError
from tasks.presets import WEATHERAUS_RULES
from tasks.roles import IngestRoles
from tasks.storage import dataset_from_path, validate_dataset_name

Device = Literal["auto", "cpu", "cuda"]
Runner = Literal["sequential", "threads", "dask"]

#: Fields that say when or how a run is executed, not what it computes: they are
#: left out of the config hash, so changing them never looks like a new model.
#: (Not the same as the form's execution section: device and score_batch_rows
#: are there but were always hashed, and hashes must not change.)
UNHASHED_FIELDS = frozenset(
    {
        "run_date",
        "retrain",
        "promote",
        "lock_wait_seconds",
        "runner",
        "dask_address",
        "dask_workers",
        # Operations, not the model: added after hashes were first recorded,
        # and hashes must not change.
        "timezone",
        "train_window_days",
        "keep_days",
        "keep_versions",
        "alert_reject_share",
        "alert_anomaly_rate",
    }
)

#: Fields added after hashes were published: hashed only when set to something
#: other than their default, so every earlier config keeps its hash.
_HASHED_WHEN_SET: dict[str, Any] = {
    "anomaly_score_threshold": None,
    "pca_axes": None,
    "label_weight": 0.1,
    "window": 7,
    "entity_column": None,
    "time_column": None,
}

DEFAULT_DATA_DIR = "latentflow-data"

# Known datasets: what a user would otherwise have to type every night.
PRESETS: dict[str, dict[str, Any]] = {
    "weatheraus": {
        "keys": ["Date", "Location"],
        "label": "RainTomorrow",
        "rules": list(WEATHERAUS_RULES),
    },
}


def _kind_schema(schema: dict[str, Any]) -> None:
    """The registered family names as the field's JSON-schema enum.

    Computed when a schema is asked for (deploying, rendering the UI form), not
    at import: the server then refuses an unknown kind before any run starts.
    """
    names = list(family_names())
    schema["enum"] = names
    schema["description"] = "Model family: " + ", ".join(names)


# The form is grouped: Prefect renders each section as a group, in this order,
# and each section's common fields come first. Files, flags and API callers
# may still give every field flat (``latent_dim: 4``); see ``lift_flat``.
_SECTION_CONFIG = ConfigDict(
    extra="forbid",
    validate_assignment=True,
    validate_by_name=True,
    validate_by_alias=True,
    serialize_by_alias=True,
)


class DataSection(BaseModel):
    """What to read, where to write, and which columns play which role."""

    # ``keys`` is an alias: a field named ``keys`` would shadow the mapping protocol
    # that dict(model) (and Prefect's parameter resolution) relies on.
    model_config = _SECTION_CONFIG

    input: str = Field(
        description="CSV (optionally .gz) or Parquet file, a directory of them, or a"
        " glob such as drops/*.csv; {run_date} or {run_date:%Y/%m/%d} reads each"
        " night's own drop, e.g. drops/{run_date}.csv",
        min_length=1,
    )
    data_dir: str = Field(
        # Read when a config is built, never at import: deployments and workers
        # point every run at their shared data dir through the environment.
        default_factory=lambda: os.environ.get("LATENTFLOW_DATA_DIR", DEFAULT_DATA_DIR),
        description="Where ingested/, rejected/, latent/ and the MLflow store live",
        min_length=1,
    )
    dataset: str | None = Field(
        None,
        description="Dataset name (a-z, 0-9, - and _); default: the input file name,"
        " lower-cased",
        pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$",
    )
    run_date: date | None = Field(
        None,
        description="Partition date; default: the date a scheduled run was due"
        " (in timezone), else today",
    )
    timezone: str | None = Field(
        None,
        description="IANA zone of the default run date, e.g. Australia/Sydney;"
        " default: the host's",
        min_length=1,
    )
    key_columns: list[str] | None = Field(
        None, alias="keys", description="Key columns (default: preset, else inferred)"
    )
    label: str | None = Field(
        None, description="Label column kept for evaluation, never a feature"
    )
    features: list[str] | None = Field(
        None, description="Feature columns (default: all non-key, non-label columns)"
    )
    exclude: list[str] = Field(
        default_factory=list, description="Columns never used as features"
    )
    rules: list[str] | None = Field(
        None, description="Domain rules, e.g. 'MinTemp <= MaxTemp' (default: preset)"
    )
    preset: Literal["auto", "none", "weatheraus"] = Field(
        "auto", description="Dataset defaults; auto picks one by dataset name"
    )

    @field_validator("data_dir")
    @classmethod
    def _local_data_dir(cls, v: str) -> str:
        # Partition swaps (renameat2) and dataset locks (flock) need a POSIX
        # filesystem; an object store has neither, so a URL is refused rather
        # than written as a local directory named "s3:".
        if "://" in v:
            raise ValueError(
                "object-store URLs are not supported; use a path on a filesystem"
                " every worker mounts (local disk, NFS, a mounted bucket)"
            )
        return v


#: Kinds whose code is plain (no variational posterior, no code activation),
#: so some of its axes can be principal components.
PCA_AXES_KINDS = frozenset({"ae", "denoising", "contractive"})


def resolve_pca_axes(
    value: int | None, latent_dim: int, kind: str, guided: bool = False
) -> int:
    """The principal axes a model gets: ``value``, or by default none when a
    label guides the code, three quarters of the latent (rounded up) for the
    plain kinds otherwise, and none for the other kinds.

    Both defaults aim at a code a linear model downstream can read (measured
    on weatherAUS, docs/benchmarks.md, "The latent code"). A guided code keeps
    what predicts the label by training (models/label_guidance.py), so all of
    it is learned: it reconstructs better and the probe reads more from it
    than from PCA's. Without a label, fixed principal axes keep what a linear
    model reads from PCA's code and the learned rest carries what a linear
    projection misses: at latent 8, 4 or 5 fixed axes left the probe under
    PCA's and 7 left too little to learn for the reconstruction; 6 meets both.
    """
    if value is None:
        if guided or kind not in PCA_AXES_KINDS:
            return 0
        return (3 * latent_dim + 3) // 4
    return value


class ModelSection(BaseModel):
    """The model family, its shape and its training."""

    model_config = _SECTION_CONFIG

    kind: str = Field(
        DEFAULT_FAMILY,
        description="Model family (a registered name)",
        json_schema_extra=_kind_schema,
    )
    latent_dim: int = Field(8, ge=1, le=128, description="Size of the latent code")
    # Defaults measured on weatherAUS (2 CPU cores): about 50 s of training,
    # holdout MSE about 0.43x PCA(8); see docs/benchmarks.md, "The latent code".
    epochs: int = Field(80, ge=1, le=1000, description="Most training epochs")
    contamination: float = Field(
        0.01, gt=0, le=0.5, description="Expected share of anomalies; sets threshold"
    )
    anomaly_score_threshold: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="Flag rows whose anomaly_score (training percentile) exceeds"
        " this, instead of the model's contamination threshold; no retrain",
    )
    hidden: tuple[int, ...] = Field(
        (128, 64), description="Encoder hidden layer widths (decoder mirrors them)"
    )
    pca_axes: int | None = Field(
        None,
        ge=0,
        le=128,
        description="Latent axes that are the leading principal components"
        " (empty: 0 when a label guides the code; else three quarters of the"
        " latent, rounded up, for the plain kinds, and 0 for the others)",
    )
    label_weight: float = Field(
        0.1,
        ge=0,
        le=10,
        description="Weight of the label in training, when the data has a"
        " two-valued or numeric label: the code keeps what predicts it linearly"
        " (0: the label is only evaluated)",
    )
    batch_size: int = Field(
        1024, ge=8, le=65536, description="Training mini-batch size"
    )
    lr: float = Field(
        1e-2, gt=0, le=1, description="Adam learning rate (the cosine schedule's peak)"
    )
    weight_decay: float = Field(0.0, ge=0, le=1, description="Adam weight decay")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine",
        description="Learning rate over the epochs: constant, or decayed to 0"
        " along half a cosine",
    )
    val_fraction: float = Field(
        0.1, ge=0, le=0.5, description="Share of training rows for early stopping"
    )
    patience: int = Field(
        8, ge=1, le=200, description="Early-stopping patience (epochs)"
    )
    noise_std: float = Field(0.2, ge=0, le=5, description="Denoising: input noise std")
    sparsity_weight: float = Field(1e-3, ge=0, description="Sparse: L1 weight on codes")
    contractive_weight: float = Field(
        1e-4, ge=0, description="Contractive: Jacobian penalty weight"
    )
    beta: float = Field(1.0, ge=0, description="VAE: weight of the KL term")
    window: int = Field(
        7,
        ge=2,
        le=366,
        description="Sequence: days per window (the row's own and the ones before)",
    )
    entity_column: str | None = Field(
        None,
        min_length=1,
        description="Sequence: the column naming each series (default: the"
        " non-date key)",
    )
    time_column: str | None = Field(
        None,
        min_length=1,
        description="Sequence: the date or integer column ordering each series"
        " (default: the date key)",
    )
    random_state: int = Field(42, ge=0, description="Seed: same seed, same model")
    n_clusters: int | None = Field(
        None, ge=2, le=256, description="Add a KMeans cluster column on the latent"
    )
    max_train_rows: int = Field(
        2_000_000, ge=100, description="Seeded uniform sample cap for training"
    )
    holdout_fraction: float = Field(
        0.2, gt=0, le=0.5, description="Held-out share for val MSE vs PCA"
    )

    @field_validator("kind")
    @classmethod
    def _registered_kind(cls, v: str) -> str:
        names = family_names()
        if v not in names:
            raise ValueError(
                f"unknown model family {v!r}; registered: {', '.join(names)}"
            )
        return v

    @model_validator(mode="after")
    def _pca_axes_fit(self) -> ModelSection:
        n = self.pca_axes
        if n is not None and n > self.latent_dim:
            raise ValueError(f"pca_axes {n} is more than latent_dim {self.latent_dim}")
        if n and self.kind not in PCA_AXES_KINDS:
            raise ValueError(
                f"pca_axes needs a plain code; kind {self.kind!r} has none (use"
                f" one of {', '.join(sorted(PCA_AXES_KINDS))}, or pca_axes 0)"
            )
        return self

    @field_validator("hidden")
    @classmethod
    def _hidden_positive(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(h < 1 or h > 8192 for h in v):
            raise ValueError("hidden widths must be 1..8192, at least one layer")
        return v


class PolicySection(BaseModel):
    """When to train, reuse or promote, and how many bad rows a run tolerates."""

    model_config = _SECTION_CONFIG

    retrain: bool = Field(
        False, description="Train a new model even if one is reusable"
    )
    promote: bool = Field(
        False,
        description="Operator override: train a challenger and promote it"
        " whatever the gate says (recorded in its tags and the summary)",
    )
    max_model_age_days: int = Field(
        7, ge=0, le=3650, description="Older champions are retrained"
    )
    min_improvement: float = Field(
        0.02,
        ge=0,
        lt=1,
        description="A challenger replaces the champion only if its holdout MSE is"
        " lower by at least this share",
    )
    drift_psi_threshold: float = Field(
        0.2, gt=0, le=10, description="A feature drifts when its PSI exceeds this"
    )
    max_drifted_features: int = Field(
        0, ge=0, le=10000, description="Retrain when more features than this drift"
    )
    max_error_ratio: float = Field(
        1.5,
        gt=1,
        le=100,
        description="Retrain when the median reconstruction error on new data"
        " exceeds the training median by this factor",
    )
    max_reject_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail the run if more rows are rejected"
    )
    train_window_days: int = Field(
        28,
        ge=1,
        le=3650,
        description="A run that trains uses the ingested partitions of this many"
        " days up to its run date",
    )
    keep_days: int | None = Field(
        None,
        ge=1,
        le=36500,
        description="Remove ingested/, rejected/, latent/ and metrics/ partitions"
        " older than this many days (after a successful run); default: keep all",
    )
    keep_versions: int | None = Field(
        None,
        ge=1,
        le=10000,
        description="Keep this many model versions besides the champion (the"
        " previous champion is never removed); default: keep all",
    )
    alert_reject_share: float = Field(
        0.01, ge=0, le=1, description="Alert when a larger share of rows is rejected"
    )
    alert_anomaly_rate: float = Field(
        0.05, ge=0, le=1, description="Alert when a larger share of rows is anomalous"
    )

    @model_validator(mode="after")
    def _window_kept(self) -> PolicySection:
        # Retention must not delete the history a retrain is meant to use.
        if self.keep_days is not None and self.keep_days < self.train_window_days:
            raise ValueError(
                f"keep_days {self.keep_days} is less than train_window_days"
                f" {self.train_window_days}: training would lose its history"
            )
        return self


class ExecutionSection(BaseModel):
    """Where and how the run executes."""

    model_config = _SECTION_CONFIG

    runner: Runner = Field(
        "sequential",
        description="How ingest and scoring run: sequential (in the flow's"
        " process), threads (a thread pool there) or dask (work units on a Dask"
        " cluster: dask_address, or a local one with dask_workers)",
    )
    dask_address: str | None = Field(
        None,
        description="runner dask: address of a running Dask scheduler, e.g."
        " tcp://scheduler:8786; workers must see data_dir at the same path",
        min_length=1,
        pattern=r"^\S+$",
    )
    dask_workers: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="runner dask: start a local cluster of this many worker"
        " processes (1 thread each) for the run; default: one per CPU core",
    )
    device: Device = Field("auto", description="auto uses CUDA when available")
    score_batch_rows: int = Field(
        65536, ge=1024, le=4_194_304, description="Rows per scoring batch"
    )
    lock_wait_seconds: float = Field(
        0.0, ge=0, le=86400, description="Wait this long for another run's lock"
    )

    @model_validator(mode="after")
    def _runner_options(self) -> ExecutionSection:
        given = [
            n for n in ("dask_address", "dask_workers") if getattr(self, n) is not None
        ]
        if given and self.runner != "dask":
            verb = "applies" if len(given) == 1 else "apply"
            raise ValueError(
                f"{' and '.join(given)} {verb} only with runner 'dask'"
                f" (runner is {self.runner!r})"
            )
        if len(given) == 2:
            raise ValueError(
                "give dask_address (an existing cluster) or dask_workers (a local"
                " cluster), not both"
            )
        return self


SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataSection,
    "model": ModelSection,
    "policy": PolicySection,
    "execution": ExecutionSection,
}


def _flat_names() -> dict[str, str]:
    """Every flat name a user may give (field names and aliases) -> its section."""
    names: dict[str, str] = {}
    for section, model in SECTIONS.items():
        for name, info in model.model_fields.items():
            names[name] = section
            if info.alias:
                names[info.alias] = section
    return names


def lift_flat(data: Mapping[str, Any]) -> dict[str, Any]:
    """A config mapping in the sectioned shape, whether given flat, sectioned or
    mixed: ``{"latent_dim": 4}`` becomes ``{"model": {"latent_dim": 4}}``.

    Unknown keys stay at the top, where validation names them. A field given
    both flat and in its section with different values is refused.
    """
    where = _flat_names()
    out: dict[str, Any] = {}
    for key, value in data.items():
        if key in SECTIONS:
            given = (
                value.model_dump(by_alias=True)
                if isinstance(value, BaseModel)
                else value
            )
            if not isinstance(given, Mapping):
                out[key] = value  # validation says what was expected
                continue
            section = out.setdefault(key, {})
            for name, v in given.items():
                _put(section, key, name, v)
        elif key in where:
            section = out.setdefault(where[key], {})
            if not isinstance(section, dict):
                continue  # the section itself is malformed; validation reports it
            _put(section, where[key], key, value)
        else:
            out[key] = value
    return out


def _put(section: dict[str, Any], name: str, key: str, value: Any) -> None:
    if key in section and section[key] != value:
        raise ValueError(f"{key} is given twice, flat and in {name}, with two values")
    section[key] = value


def merge_configs(base: Mapping[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top``'s fields over ``base``'s, section by section (either shape)."""
    merged = lift_flat(base)
    for key, value in lift_flat(top).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def _form_schema(schema: dict[str, Any]) -> None:
    """The form shows the sections; the API still takes flat fields.

    Prefect validates a deployment's parameters against this schema before it
    creates a run, so the flat names are allowed as ``patternProperties`` (the
    UI form draws only ``properties``) with their own checks, and ``input`` is
    required flat unless a ``data`` section is given.
    """
    flat: dict[str, Any] = {}
    for model in SECTIONS.values():
        section_schema = model.model_json_schema(by_alias=True)
        for name, field_schema in section_schema["properties"].items():
            flat[f"^{name}$"] = field_schema
    schema["patternProperties"] = flat
    schema.pop("required", None)
    schema["if"] = {"required": ["data"]}
    schema["else"] = {"required": ["input"]}


class PipelineConfig(BaseModel):
    """Settings for one run of the latentflow pipeline."""

    model_config = ConfigDict(
        extra="forbid",
        validate_assignment=True,
        serialize_by_alias=True,
        json_schema_extra=_form_schema,
    )

    data: DataSection = Field(
        title="Data", description="Input (required), output and column roles"
    )
    model: ModelSection = Field(
        default_factory=ModelSection,
        title="Model",
        description="Model family, shape and training",
    )
    policy: PolicySection = Field(
        default_factory=PolicySection,
        title="Policy",
        description="Train or reuse, promotion, drift and reject limits",
    )
    execution: ExecutionSection = Field(
        default_factory=ExecutionSection,
        title="Execution",
        description="Runner, Dask cluster, device, scoring batch size, lock wait",
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_flat(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        lifted = lift_flat(data)
        # A missing input is reported as input, not as a missing section.
        lifted.setdefault("data", {})
        return lifted

    # -- derived values -------------------------------------------------------
    def resolved(self) -> PipelineConfig:
        """Fill defaults that depend on other fields: dataset, run date, preset."""
        data = self.data
        updates: dict[str, Any] = {}
        templated = is_template(data.input)
        stem = template_stem(data.input) if templated else data.input.split("*")[0]
        dataset = data.dataset or dataset_from_path(stem or "data")
        validate_dataset_name(dataset)
        updates["dataset"] = dataset
        run_date = data.run_date or date.today()
        updates["run_date"] = run_date
        if templated:
            # Each night reads its own drop, never an older one.
            updates["input"] = render_input(data.input, run_date)
        preset_name = dataset if data.preset == "auto" else data.preset
        preset = PRESETS.get(preset_name, {}) if data.preset != "none" else {}
        for field_name, key in (
            ("key_columns", "keys"),
            ("label", "label"),
            ("rules", "rules"),
        ):
            if getattr(data, field_name) is None and key in preset:
                updates[field_name] = preset[key]
        return self.model_copy(update={"data": data.model_copy(update=updates)})

    @property
    def model_name(self) -> str:
        return f"{self.data.dataset}-autoencoder"

    def ingest_roles(self) -> IngestRoles:
        """The data section's column roles, as ingest takes them."""
        data = self.data
        roles = Roles.of(data.key_columns, data.features, data.exclude, data.label)
        return IngestRoles(roles, tuple(data.rules or ()))

    def flat(self, mode: Literal["python", "json"] = "python") -> dict[str, Any]:
        """Every field by its flat name (``keys`` for the key columns)."""
        out: dict[str, Any] = {}
        for name in SECTIONS:
            out.update(getattr(self, name).model_dump(mode=mode, by_alias=True))
        return out

    def estimator_params(self) -> dict[str, Any]:
        """Settings for the model family ``kind``: those of its ``settings``
        (see :mod:`models.families`) that are fields here, plus ``kind``."""
        settings = get_family(self.model.kind).settings
        fields = self.flat()
        params = {n: fields[n] for n in settings if n in fields}
        params["kind"] = self.model.kind
        if "pca_axes" in params:
            guided = bool(self.data.label) and params.get("label_weight", 0) > 0
            params["pca_axes"] = resolve_pca_axes(
                params["pca_axes"], self.model.latent_dim, self.model.kind, guided
            )
        return params

    def model_params(self) -> dict[str, Any]:
        """Settings that define a model: a champion with others is not reused."""
        return family_params(self.estimator_params(), self.model.n_clusters)

    def config_hash(self) -> str:
        """A short hash of everything that shapes the model and its outputs.

        Over the flat fields, so grouping them into sections changed no hash.
        """
        payload = {
            k: v
            for k, v in self.flat("json").items()
            if k not in UNHASHED_FIELDS
            and not (k in _HASHED_WHEN_SET and v == _HASHED_WHEN_SET[k])
        }
        blob = json.dumps(payload, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def load_config_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a YAML or TOML config file into a dict (fields as in PipelineConfig)."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {p} cannot be read: {exc}") from None
    try:
        if p.suffix.lower() == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"config file {p} is not valid YAML/TOML: {first}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of fields, got a list")
    return data


def describe_validation_error(exc: ValidationError, source: str) -> str:
    """One line naming each bad field and what was expected."""
    parts = []
    for err in exc.errors()[:5]:
        # Field names are unique across sections: name them flat, as users
        # write them in files and flags (a section's own check names none).
        loc_parts = err["loc"]
        if loc_parts and loc_parts[0] in SECTIONS:
            loc_parts = loc_parts[1:]
        loc = ".".join(str(x) for x in loc_parts)
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        elif err["type"] == "value_error":
            # Our own validators' messages, without pydantic's "Value error, ".
            msg = str(err.get("ctx", {}).get("error", msg))
        parts.append(f"{loc}: {msg}" if loc else msg)
    more = f" (+{len(exc.errors()) - 5} more)" if len(exc.errors()) > 5 else ""
    return f"invalid configuration in {source}: " + "; ".join(parts) + more


def build_config(file: str | None, overrides: dict[str, Any]) -> PipelineConfig:
    """Merge a config file and explicit overrides into a validated config."""
    data: dict[str, Any] = load_config_file(file) if file else {}
    source = file or "command-line options"
    try:
        merged = merge_configs(
            data, {k: v for k, v in overrides.items() if v is not None}
        )
        return PipelineConfig(**merged)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source)) from None
    except ValueError as exc:  # the same field twice, flat and in its section
        raise ConfigError(f"invalid configuration in {source}: {exc}") from None


# -- confinement of served runs ---------------------------------------------------

#: Where a served run may read inputs / write its data dir (os.pathsep-separated).
INPUT_ROOTS_ENV = "LATENTFLOW_INPUT_ROOTS"
DATA_ROOTS_ENV = "LATENTFLOW_DATA_ROOTS"
#: Dask schedulers a served run may connect to (comma-separated addresses).
DASK_ADDRESSES_ENV = "LATENTFLOW_DASK_ADDRESSES"
#: Default input root of a served run, under each data root.
INPUT_SUBDIR = "input"


@dataclass(frozen=True)
class Confinement:
    """Where a run may read and write: set by the host, never by a run.

    A path is inside when, resolved (symlinks followed, ``..`` collapsed), it is
    a root or lies under one; a root may be a single file. ``None`` leaves that
    side unchecked (only outside deployments, see :func:`confinement`).
    """

    input_roots: tuple[Path, ...] | None
    data_roots: tuple[Path, ...] | None
    dask_addresses: frozenset[str] | None = None

    def check(self, cfg: PipelineConfig) -> list[Path]:
        """The input's files; :class:`ConfigError` (one line) if anything is outside."""
        # Inputs first: reading what it should not is the worse leak.
        if self.input_roots is None:
            files = [Path(p) for p in _list_sources(cfg.data.input)]
        else:
            files = input_files(cfg.data.input, self.input_roots)
        self.check_writes(data_dir=cfg.data.data_dir)
        address = cfg.execution.dask_address
        if (
            self.dask_addresses is not None
            and address is not None
            and address not in self.dask_addresses
        ):
            allowed = ", ".join(sorted(self.dask_addresses)) or "none"
            raise ConfigError(
                f"dask_address {address} is not one this host allows"
                f" ({allowed}; set {DASK_ADDRESSES_ENV} on the host that runs them)"
            )
        return files

    def check_writes(self, **paths: str | Path) -> None:
        """:class:`ConfigError` (one line) for the first of ``paths`` (by its
        parameter name) that is outside the data roots."""
        if self.data_roots is None:
            return
        for name, path in paths.items():
            real = Path(path).expanduser().resolve()
            if not _inside(real, self.data_roots):
                raise ConfigError(
                    f"{name} {path} (resolved {real}) is outside the data roots"
                    f" {_show(self.data_roots)}; runs here write only under them"
                    f" (set {DATA_ROOTS_ENV} on the host that runs them)"
                )


def _list_sources(source: str) -> list[str]:
    from tasks.ingest.parts import list_sources

    return list_sources(source)


def input_files(source: str, roots: tuple[Path, ...]) -> list[Path]:
    """The files ``source`` names, once its own location is known to be inside.

    ``source`` is read as ingest reads it (a file, a directory or a glob, no
    ``~``). Its fixed part (for a glob, the directories before the first
    wildcard) is resolved and checked before anything in it is listed, so a
    refused path says nothing about what exists there.
    """
    base = _fixed_prefix(source)
    real = base.resolve()
    if not _inside(real, roots) and not _glob_under_root(source, real, roots):
        raise ConfigError(
            f"input {source} (resolved {real}) is outside the input roots"
            f" {_show(roots)}; runs here read only under them"
            f" (set {INPUT_ROOTS_ENV} on the host that runs them)"
        )
    files = [Path(p) for p in _list_sources(source)]
    for path in files:
        # Listed files are checked again: a symlink in a drop leads anywhere.
        target = path.resolve()
        if not _inside(target, roots):
            raise ConfigError(
                f"input file {path} leads to {target} through a symlink, outside"
                f" the input roots {_show(roots)}; runs here read only under them"
                f" (set {INPUT_ROOTS_ENV} on the host that runs them)"
            )
    return files


def _fixed_prefix(source: str) -> Path:
    import glob

    if not glob.has_magic(source):
        return Path(source).absolute()
    parts = Path(source).parts
    fixed = list(itertools.takewhile(lambda p: not glob.has_magic(p), parts))
    return Path(*fixed).absolute() if fixed else Path.cwd()


def _glob_under_root(source: str, real_base: Path, roots: tuple[Path, ...]) -> bool:
    # A glob whose fixed part is a directory holding a root (drops/*/x.csv with a
    # root at drops/a) is allowed; each file it matches is checked on its own.
    import glob

    return glob.has_magic(source) and any(real_base in r.parents for r in roots)


def _inside(path: Path, roots: tuple[Path, ...]) -> bool:
    return any(path == r or r in path.parents for r in roots)


def _show(roots: tuple[Path, ...]) -> str:
    return os.pathsep.join(str(r) for r in roots) if roots else "(none)"


def _roots_from_env(name: str, env: Mapping[str, str]) -> tuple[Path, ...] | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    return tuple(
        Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()
    )


def run_confinement() -> Confinement | None:
    """The policy of the flow run in progress: confined when it was started
    from a deployment (an API caller chose its parameters)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    run = ctx.flow_run if ctx is not None else None
    return confinement(deployed=run is not None and run.deployment_id is not None)


def confinement(
    *, deployed: bool, env: Mapping[str, str] | None = None
) -> Confinement | None:
    """The policy a run is held to, from the host's environment only.

    A run from a deployment (an API caller chose its parameters) is always
    confined: to ``LATENTFLOW_INPUT_ROOTS`` / ``LATENTFLOW_DATA_ROOTS``, which
    default to the host's data dir (``LATENTFLOW_DATA_DIR``) and its ``input/``
    folder, and to the Dask schedulers in ``LATENTFLOW_DASK_ADDRESSES`` (none by
    default). Any other run (``latentflow run``: a local user with their own
    permissions) is held only to the roots that are set.
    """
    env = os.environ if env is None else env
    inputs = _roots_from_env(INPUT_ROOTS_ENV, env)
    data = _roots_from_env(DATA_ROOTS_ENV, env)
    raw_addresses = env.get(DASK_ADDRESSES_ENV, "")
    addresses = frozenset(a.strip() for a in raw_addresses.split(",") if a.strip())
    if not deployed:
        if inputs is None and data is None and not addresses:
            return None
        return Confinement(inputs, data, addresses or None)
    if data is None:
        data = (Path(env.get("LATENTFLOW_DATA_DIR") or DEFAULT_DATA_DIR).resolve(),)
    if inputs is None:
        inputs = tuple(r / INPUT_SUBDIR for r in data)
    return Confinement(inputs, data, addresses)
