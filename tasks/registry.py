"""Everything that talks to MLflow: tracking, the model registry, aliases.

Tracking defaults to ``sqlite:///<data_dir>/mlflow.db`` with artifacts under
``<data_dir>/mlartifacts``; ``MLFLOW_TRACKING_URI`` wins when set. Nothing here
runs at import time: the URI is set by :func:`configure` when a run starts.
Where artifacts go is decided by :func:`configure` too, once, from what the user
set: ``mlflow.set_tracking_uri`` itself exports ``MLFLOW_TRACKING_URI``, so the
variable cannot tell a user's server from our own default afterwards.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd
from prefect import task

import models
from models import columns as cols
from models.bundle import SERVE_ERROR, LatentModel
from models.families import model_params as family_params
from models.integrity import (
    IntegrityError,
    check_manifest,
    compare,
    file_sha256,
    manifest_digest,
    tree_manifest,
)
from models.serving import (
    MLFLOW_META,
    TAG_BUNDLE,
    TAG_DIGEST,
    TAG_MANIFEST,
    download_version,
    recorded_manifest,
    verify_model_dir,
)
from tasks.decide import ChampionInfo
from tasks.errors import (
    SQLITE_BUSY_CODES,
    RegistryError,
    TamperError,
    describe_fault,
    sqlite_code,
)
from tasks.faults import checkpoint
from tasks.pg import advisory_lock, check_mlflow_url, is_postgres
from tasks.policy import PLAIN
from tasks.storage import resolve_under

CHAMPION = "champion"
#: The champion before the current one: never pruned, so a rollback is one
#: alias move away.
PREVIOUS_CHAMPION = "previous-champion"
ALIASES = (CHAMPION, PREVIOUS_CHAMPION)
BUNDLE_ARTIFACT = "model_dir"
#: MLflow 3 opens an experiment on its GenAI page unless told it holds models.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
#: Where the MLflow UI is, for links in the run's summary (the default is
#: ``mlflow ui``'s and ``make serve``'s).
MLFLOW_UI_ENV = "LATENTFLOW_MLFLOW_UI_URL"
DEFAULT_MLFLOW_UI = "http://127.0.0.1:5000"
#: The tag holding the Prefect flow run's page.
TAG_FLOW_RUN_URL = "prefect.flow_run_url"
PYFUNC_FILE = Path(models.__file__).with_name("pyfunc_model.py")
MODELS_PKG = Path(models.__file__).parent
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    tracking_uri: str


# Set by configure() beside MLFLOW_TRACKING_URI when the URI is the data dir's own
# store, so that this process and its children can tell it from a user's.
EMBEDDED_URI_ENV = "LATENTFLOW_EMBEDDED_TRACKING_URI"
# Database stores without a server: MLflow would put their artifacts in ./mlruns.
_DB_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
INIT_LOCK_WAIT_SECONDS = 300.0

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Tracking:
    """Where a run's MLflow calls go, decided before MLflow is configured.

    ``embedded`` is the data dir's own SQLite store (no user URI). With
    ``artifact_root`` set, new experiments keep their artifacts under it, in the
    data dir; None leaves the choice to the user's tracking server.
    """

    uri: str
    embedded: bool
    data_dir: Path
    artifact_root: Path | None


_active: Tracking | None = None


def user_tracking_uri() -> str | None:
    """``MLFLOW_TRACKING_URI`` as the user set it; None if unset or set by us."""
    env = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if not env or env == os.environ.get(EMBEDDED_URI_ENV):
        return None
    return env


def is_database_store(uri: str) -> bool:
    """A SQLAlchemy database URI (``sqlite:///…``, ``postgresql+psycopg2://…``)."""
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    return scheme in _DB_SCHEMES


def tracking_for(data_dir: Path) -> Tracking:
    """The tracking target of a run on ``data_dir``; sets nothing."""
    data_dir = Path(data_dir).resolve()
    artifacts = data_dir / "mlartifacts"
    user = user_tracking_uri()
    if user is None:
        uri = f"sqlite:///{(data_dir / 'mlflow.db').as_posix()}"
        return Tracking(uri, embedded=True, data_dir=data_dir, artifact_root=artifacts)
    # A database URI has no server to hold artifacts: keep them in the data dir,
    # not in MLflow's default ./mlruns. A server (http, databricks) decides itself.
    root = artifacts if is_database_store(user) else None
    return Tracking(user, embedded=False, data_dir=data_dir, artifact_root=root)


def tracking_uri_for(data_dir: Path) -> str:
    return tracking_for(data_dir).uri


def configure(data_dir: Path) -> Tracking:
    """Point MLflow at the run's store, created if new; returns where it points."""
    import mlflow

    global _active
    tracking = tracking_for(data_dir)
    tracking.data_dir.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking.uri)
    mlflow.set_registry_uri(tracking.uri)
    if tracking.embedded:
        os.environ[EMBEDDED_URI_ENV] = tracking.uri
    # Bounded retries: a registry that is down fails the run in seconds, not hours.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    if is_database_store(tracking.uri):
        init_store(tracking)
    _active = tracking
    _warn_outside(tracking)
    return tracking


def active_tracking(data_dir: Path) -> Tracking:
    """What :func:`configure` decided for ``data_dir``, configuring it if not yet."""
    if _active is not None and _active.data_dir == Path(data_dir).resolve():
        return _active
    return configure(data_dir)


class _InitLock:
    """``flock`` on ``<data_dir>/.locks/mlflow-init.lock``: one store creator."""

    def __init__(self, data_dir: Path, wait_seconds: float) -> None:
        self.path = resolve_under(data_dir, ".locks", "mlflow-init.lock")
        self.wait_seconds = wait_seconds
        self._fd: int | None = None

    def __enter__(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise RegistryError(
                        f"the MLflow store was not free within {self.wait_seconds:.0f}s"
                        f" (lock {self.path} held by another run)"
                    ) from None
                time.sleep(0.1)
        self._fd = fd

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def init_store(
    tracking: Tracking, wait_seconds: float = INIT_LOCK_WAIT_SECONDS
) -> None:
    """Create (or migrate) the database store, one process at a time.

    MLflow creates a store's schema on first use, in every process that finds it
    missing; runs started together on a fresh data dir then race in alembic
    ("Online migration expected to match one row"). Under the data dir's lock the
    first run creates it and the others find it complete. The store is built here
    with the data dir's artifact root so that even MLflow's "Default" experiment,
    created with the schema, points into the data dir rather than at ./mlruns.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from sqlalchemy.exc import SQLAlchemyError

    root = tracking.artifact_root or tracking.data_dir / "mlartifacts"

    def create() -> None:
        try:
            SqlAlchemyStore(tracking.uri, root.as_uri())
        except SQLAlchemyError as exc:
            # e.g. "database is locked" beyond SQLite's busy timeout: retried.
            raise MlflowException(
                str(exc).splitlines()[0], error_code=TEMPORARILY_UNAVAILABLE
            ) from exc

    with _InitLock(tracking.data_dir, wait_seconds):
        if not is_postgres(tracking.uri):
            _safe("open its store", create)
            return
        # Data dirs on other machines may share the database: its own lock.
        # Connecting is tried once first, so a server that is down is one line
        # in seconds rather than MLflow's minutes of engine retries.
        check_mlflow_url(tracking.uri)
        with advisory_lock(tracking.uri, "mlflow-schema", "MLflow store"):
            _safe("open its store", create)


def _store_file() -> str | None:
    """The SQLite file behind the tracking URI, as error messages name it."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    if not uri.startswith("sqlite:///"):
        return None
    return f"MLflow store {uri.removeprefix('sqlite:///')}"


def _safe(
    what: str, fn: Callable[[], _T], attempts: int = 3, backoff: float = 1.0
) -> _T:
    """Run a registry call with bounded retries; raise RegistryError at the end.

    A corrupt or unwritable store fails at once; a locked one (another
    process holds the SQLite file) is retried like a server that is down.
    """
    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import SQLAlchemyError

    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            last = exc
        except (OSError, ConnectionError, SQLAlchemyError, sqlite3.Error) as exc:
            last = exc
        if (
            describe_fault(last) is not None
            and sqlite_code(last) not in SQLITE_BUSY_CODES
        ):
            break  # retrying cannot fix a corrupt, full or read-only store
        if i + 1 < attempts:
            time.sleep(backoff * 2**i)
    assert last is not None
    fault = describe_fault(last, database=_store_file())
    if fault is not None:
        raise RegistryError(f"MLflow registry failed to {what}: {fault}") from last
    first = str(last).splitlines()[0][:300] if str(last) else type(last).__name__
    raise RegistryError(f"MLflow registry failed to {what}: {first}") from last


def ensure_experiment(dataset: str, data_dir: Path) -> str:
    """The experiment of a dataset, created with artifacts under the data dir."""
    import mlflow

    name = f"latentflow-{dataset}"
    tracking = active_tracking(data_dir)

    def get_or_create() -> str:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
                # Made by an older version: shown as a GenAI experiment.
                mlflow.MlflowClient().set_experiment_tag(
                    exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND
                )
            return exp.experiment_id
        location = None
        if tracking.artifact_root is not None:
            location = (tracking.artifact_root / dataset).as_uri()
        return mlflow.create_experiment(
            name,
            artifact_location=location,
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
        )

    return _safe(f"open experiment {name}", get_or_create)


def outside_data_dir(tracking: Tracking) -> dict[str, Path]:
    """latentflow experiments whose artifacts are local but not in the data dir.

    Older versions let them default to ``<working dir>/mlruns``. MLflow cannot
    change an experiment's artifact location, so their runs and models stay
    where they are; docs/operations.md says how to move them.
    """
    from urllib.parse import unquote, urlparse

    from mlflow import MlflowClient

    if tracking.artifact_root is None:
        return {}
    experiments = _safe(
        "list experiments",
        lambda: MlflowClient().search_experiments(
            filter_string="name LIKE 'latentflow-%'"
        ),
    )
    found: dict[str, Path] = {}
    for exp in experiments:
        parsed = urlparse(exp.artifact_location)
        if parsed.scheme not in ("", "file"):
            continue
        raw = unquote(parsed.path) if parsed.scheme else exp.artifact_location
        path = Path(raw).resolve()
        if not path.is_relative_to(tracking.data_dir):
            found[exp.name] = path
    return found


def _warn_outside(tracking: Tracking) -> None:
    """One warning line naming every experiment kept outside the data dir."""
    outside = outside_data_dir(tracking)
    if outside:
        where = "; ".join(f"{name} in {path}" for name, path in outside.items())
        _warning(
            f"model artifacts outside the data dir {tracking.data_dir}: {where};"
            " deleting those directories loses the models. To move them, see"
            " 'Artifacts outside the data dir' in docs/operations.md"
        )


def _warning(message: str) -> None:
    """A warning in the run's log when there is a run, else Python logging."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        get_run_logger().warning(message)
    except MissingContextError:
        _log.warning(message)


def _bundle_path(downloaded: Path) -> Path:
    return downloaded / "artifacts" / BUNDLE_ARTIFACT


def fetch_model(
    name: str,
    version: int,
    cache_dir: Path,
    manifest: dict[str, str] | None = None,
) -> Path:
    """Download a model version once into the cache and return its bundle dir.

    Every file of the cached copy is verified against the registry's record
    (``manifest``, else looked up) on every call, a fresh download or not: the
    cache lives in the data dir and is no more trusted than the artifact store.
    Only a version registered before records existed is returned unverified.
    """
    import mlflow
    from mlflow import MlflowClient

    if manifest is None:
        mv = _safe(
            f"look up {name} v{version}",
            lambda: MlflowClient().get_model_version(name, str(version)),
        )
        tags = dict(mv.tags or {})
        if TAG_DIGEST in tags or TAG_MANIFEST in tags:
            manifest = recorded_files(name, version, tags)
    target = cache_dir / name / f"v{version}"
    if not (target / "MLmodel").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=target.parent))
        try:
            local = _safe(
                f"download {name} v{version}",
                lambda: download_version(
                    name, version, tmp, MlflowClient(), mlflow.get_tracking_uri()
                ),
            )
            if target.exists():
                shutil.rmtree(target)
            os.replace(local, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if manifest is not None:
        try:
            verify_model_dir(target, manifest)
        except IntegrityError as exc:
            raise TamperError(
                f"{name} v{version} failed its integrity check: {exc}; not used"
            ) from None
    return _bundle_path(target)


def recorded_files(name: str, version: int, tags: dict[str, str]) -> dict[str, str]:
    """The file manifest recorded at registration; TamperError if absent or bad."""
    try:
        manifest = recorded_manifest(tags, f"{name} v{version}")
    except IntegrityError as exc:
        raise TamperError(str(exc)) from None
    if manifest is None:
        raise TamperError(
            f"{name} v{version} has no recorded file manifest (tag {TAG_DIGEST}):"
            " it was not fully registered and cannot be verified"
        )
    return manifest


def find_champion(name: str, cache_dir: Path) -> ChampionInfo | None:
    """The current champion of ``name``, downloaded, verified and loadable, or None.

    Every file is checked against the manifest the registry recorded when the
    version was registered; a mismatch stops the run (TamperError) instead of
    training around it, so a tampered champion is never silently replaced.
    """
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = _safe("open the tracking store", MlflowClient)
    try:
        mv = _safe(
            f"look up {name}@{CHAMPION}",
            lambda: client.get_model_version_by_alias(name, CHAMPION),
        )
    except MlflowException:
        return None
    version = int(mv.version)
    tags = dict(mv.tags or {})
    expected: str | None = None
    if TAG_DIGEST in tags or TAG_MANIFEST in tags:
        bundle = fetch_model(
            name, version, cache_dir, recorded_files(name, version, tags)
        )
        expected = tags.get(TAG_BUNDLE) or None
    else:
        # Registered before manifests were recorded: only the bundle's own
        # checks apply. Retraining replaces it with a verifiable version.
        _log.warning(
            "champion %s v%s has no recorded file manifest; loaded unverified",
            name,
            version,
        )
        bundle = fetch_model(name, version, cache_dir)
    try:
        model = LatentModel.load(bundle, expected_sha256=expected)
    except ValueError as exc:
        # A champion that fails its checks may have been tampered with: stop and
        # say so rather than silently training around it.
        error = TamperError if isinstance(exc, IntegrityError) else RegistryError
        raise error(
            f"champion {name} v{version} cannot be loaded: {exc}; move the"
            f" '{CHAMPION}' alias to a good version, or delete {bundle.parent.parent}"
        ) from None
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, tz=UTC)
    return ChampionInfo(
        name=name,
        version=version,
        run_id=mv.run_id or "",
        created_at=created,
        model_dir=str(bundle),
        input_schema=model.info.input_schema,
        params=model_params(model),
    )


def model_params(model: LatentModel) -> dict[str, Any]:
    """The settings that define a model, comparable with the requested ones."""
    settings = dict(model.estimator.get_params())
    # A family whose settings do not name it is still told apart from another.
    settings.setdefault("kind", model.info.family)
    centers = model.info.cluster_centers
    return family_params(settings, len(centers) if centers else None)


def _signature_example(model: LatentModel, sample: pd.DataFrame) -> pd.DataFrame:
    """Feature columns only (and a sequence model's entity and time), typed as
    a user's raw frame would be."""
    cols = _served_columns(model)
    ex = sample[cols].head(5).copy()
    for c in model.preprocessor.categorical:
        ex[c] = ex[c].astype(object)
    for c in model.preprocessor.numeric:
        ex[c] = ex[c].astype("float64")
    for c in cols[len(model.preprocessor.input_columns) :]:
        # Dates as a user sends them: ISO text (JSON has no date type).
        ex[c] = ex[c].astype(str)
    return ex


def _served_columns(model: LatentModel) -> list[str]:
    """The columns a served request must carry."""
    own = model.preprocessor.input_columns
    return [*own, *[c for c in model.context_columns or () if c not in own]]


def _signature(model: LatentModel, example: pd.DataFrame) -> Any:
    """Input columns by name, any type: raw frames carry ints, floats, strings and
    missing values, parsed by the ingest's rules (junk -> the row's ``error``);
    outputs nullable, since a row with an error has none."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    inputs = Schema(
        [ColSpec(AnyType(), c, required=True) for c in _served_columns(model)]
    )
    del example  # the outputs are fixed by predict_raw, whatever the rows
    kinds = {cols.IS_ANOMALY: DataType.boolean, cols.CLUSTER: DataType.integer}
    names = cols.score_columns(model.latent_dim, bool(model.info.cluster_centers))
    out = [ColSpec(kinds.get(c, DataType.float), c, required=False) for c in names]
    out.append(ColSpec(DataType.string, SERVE_ERROR, required=False))
    return ModelSignature(inputs=inputs, outputs=Schema(out))


def log_and_register(
    *,
    bundle_dir: Path,
    name: str,
    dataset: str,
    data_dir: Path,
    params: dict[str, Any],
    history: dict[str, list[float]],
    metrics: dict[str, float],
    tags: dict[str, str],
    sample: pd.DataFrame,
    plots: list[Path] = (),  # type: ignore[assignment]
    description: str = "",
    run_name: str | None = None,
    started_ms: int | None = None,
) -> RegisteredVersion:
    """Log a trained bundle as a pyfunc-from-code run and register a new version.

    The version is registered but not promoted: :func:`promote` moves the
    ``champion`` alias only after the version has been downloaded and loaded.
    ``run_name`` names the MLflow run (``<dataset>-<run_date>``) and
    ``started_ms`` (epoch milliseconds) is when training began, so that the
    run's duration covers the training.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    experiment_id = ensure_experiment(dataset, data_dir)
    model = LatentModel.load(bundle_dir)
    example = _signature_example(model, sample)
    signature = _signature(model, example)
    client = _safe("open the tracking store", MlflowClient)

    def run() -> RegisteredVersion:
        created = client.create_run(
            experiment_id, start_time=started_ms, tags=tags, run_name=run_name
        )
        with mlflow.start_run(run_id=created.info.run_id) as active:
            run_id = active.info.run_id
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
            )
            epoch_metrics = [
                Metric(key, float(v), now, step)
                for key, values in history.items()
                for step, v in enumerate(values)
            ]
            final = [Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
            batch = epoch_metrics + final
            for i in range(0, len(batch), 900):
                client.log_batch(run_id, metrics=batch[i : i + 900])
            for p in plots:
                mlflow.log_artifact(str(p), artifact_path="plots")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_FILE),
                artifacts={"model_dir": str(bundle_dir)},
                code_paths=[str(MODELS_PKG)],
                # The verified loader overrides it with the registry's record.
                model_config={TAG_BUNDLE: check_manifest(bundle_dir) or ""},
                signature=signature,
                input_example=example,
                registered_model_name=name,
                pip_requirements=_requirements(),
                await_registration_for=60,
            )
            version = int(info.registered_model_version)
            checkpoint("register")
            if description:
                client.update_model_version(name, str(version), description=description)
            client.update_registered_model(name, description=model_description(dataset))
            for k, v in tags.items():
                client.set_model_version_tag(name, str(version), k, v)
            _record_manifest(client, name, version, bundle_dir)
            return RegisteredVersion(name, version, run_id, mlflow.get_tracking_uri())

    return _safe(f"register a new version of {name}", run, attempts=2)


def model_description(dataset: str) -> str:
    """The registered model's description: what every version of it is."""
    return (
        f"latentflow model of the {dataset} dataset: turns its rows into latent"
        " features (latent_*), an anomaly score (recon_error; anomaly_score is its"
        " percentile among the training scores), an is_anomaly flag and, on flagged"
        " rows, an explanation. The 'champion' alias is the version the nightly"
        " run scores with; each version's description is its model card and its"
        " tags say how the promotion gate decided. Load it with"
        " models.load_model (docs/serving.md)."
    )


def ui_links(
    experiment_id: str, run_id: str, name: str, version: int
) -> dict[str, str]:
    """MLflow UI links to a run and a model version."""
    base = os.environ.get(MLFLOW_UI_ENV, DEFAULT_MLFLOW_UI).rstrip("/")
    return {
        "mlflow_run_url": f"{base}/#/experiments/{experiment_id}/runs/{run_id}",
        "model_version_url": f"{base}/#/models/{name}/versions/{version}",
    }


@dataclass(frozen=True)
class RunRecord:
    """The night's MLflow run, as the summary links it."""

    run_id: str
    experiment_id: str
    links: dict[str, str]


def _metric_key(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_-. /``)."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def record_run(
    *,
    dataset: str,
    data_dir: Path,
    run_name: str,
    run_id: str | None,
    started_ms: int,
    tags: dict[str, str],
    metrics: dict[str, float],
    dataset_path: Path,
    dataset_digest: str,
    model_name: str,
    model_version: int,
) -> RunRecord:
    """Make the night an MLflow run, reuse nights included.

    A night that trained records into its training run (``run_id``); any other
    night gets a run of its own named ``run_name``. Either way the run gets
    the decision tags, the night's metrics (counts, score quantiles, drift),
    the ingested partition as its input dataset, and ends now, so its duration
    covers the whole night since ``started_ms``.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Metric

    experiment_id = ensure_experiment(dataset, data_dir)
    client = _safe("open the tracking store", MlflowClient)

    def write() -> str:
        rid = run_id
        if not rid:
            created = client.create_run(
                experiment_id, start_time=started_ms, run_name=run_name
            )
            rid = created.info.run_id
        now = int(time.time() * 1000)
        for k, v in tags.items():
            client.set_tag(rid, k, v)
        batch = [
            Metric(_metric_key(k), float(v), now, 0) for k, v in sorted(metrics.items())
        ]
        for i in range(0, len(batch), 900):
            client.log_batch(rid, metrics=batch[i : i + 900])
        source = LocalArtifactDatasetSource(str(dataset_path))
        data = MetaDataset(source, name=run_name, digest=dataset_digest[:36])
        with mlflow.start_run(run_id=rid):
            mlflow.log_input(data, context="scoring")
        client.set_terminated(rid, "FINISHED", end_time=int(time.time() * 1000))
        return rid

    rid = _safe(f"record the run {run_name}", write, attempts=2)
    return RunRecord(
        rid, experiment_id, ui_links(experiment_id, rid, model_name, model_version)
    )


def _record_manifest(client: Any, name: str, version: int, bundle_dir: Path) -> None:
    """Record, as version tags, the SHA-256 of every file of the logged model.

    The files are read back from the store and the executable and model parts
    (``pyfunc_model.py``, ``code/``, the bundle) must be the very bytes that
    were logged from this installation; MLflow's own files (MLmodel, the
    environment, examples) are recorded as stored. From then on every loader
    compares against this record, which the artifact store cannot rewrite.
    """
    record_logged_files(
        client, name, version, bundle_dir, PYFUNC_FILE, code_dirs=(MODELS_PKG,)
    )


def record_logged_files(
    client: Any,
    name: str,
    version: int,
    bundle_dir: Path,
    pyfunc_file: Path,
    *,
    code_dirs: tuple[Path, ...] = (),
) -> None:
    """Check that version ``version`` of ``name`` stores the bytes logged from
    ``bundle_dir``, ``pyfunc_file`` and ``code_dirs``, then record the SHA-256
    of every stored file as version tags (a :class:`TamperError` if not)."""
    import mlflow

    try:
        with tempfile.TemporaryDirectory(prefix="lf-record-") as tmp:
            local = download_version(
                name, version, Path(tmp), client, mlflow.get_tracking_uri()
            )
            stored = tree_manifest(local, skip=(MLFLOW_META,))
            sources = {
                # MLflow stores an artifact directory under its own name.
                f"artifacts/{Path(bundle_dir).name}": tree_manifest(bundle_dir),
                **{
                    f"code/{d.name}": tree_manifest(d, ignore_dirs=("__pycache__",))
                    for d in code_dirs
                },
            }
            for prefix, logged in sources.items():
                part = {
                    k.removeprefix(prefix + "/"): v
                    for k, v in stored.items()
                    if k.startswith(prefix + "/")
                }
                compare(local / prefix, logged, part)
            if stored.get(pyfunc_file.name) != file_sha256(pyfunc_file):
                raise IntegrityError(f"{pyfunc_file.name} is not the logged file")
    except IntegrityError as exc:
        raise TamperError(
            f"{name} v{version}: the stored model is not what was logged: {exc}"
        ) from None
    text = json.dumps(stored, sort_keys=True, separators=(",", ":"))
    bundle_digest = check_manifest(bundle_dir)
    for key, value in (
        (TAG_MANIFEST, text),
        (TAG_BUNDLE, bundle_digest or ""),
        # Last: a version whose record is incomplete never verifies.
        (TAG_DIGEST, manifest_digest(stored)),
    ):
        client.set_model_version_tag(name, str(version), key, value)


def promote(name: str, version: int, cache_dir: Path) -> None:
    """Point ``champion`` at ``version`` once its files verify against the
    registry's record and load completely."""
    from mlflow import MlflowClient

    client = _safe("open the tracking store", MlflowClient)
    mv = _safe(
        f"look up {name} v{version}",
        lambda: client.get_model_version(name, str(version)),
    )
    tags = dict(mv.tags or {})
    try:
        bundle = fetch_model(
            name, version, cache_dir, recorded_files(name, version, tags)
        )
        LatentModel.load(bundle, expected_sha256=tags.get(TAG_BUNDLE) or None)
    except (ValueError, TamperError) as exc:
        error = (
            TamperError
            if isinstance(exc, (IntegrityError, TamperError))
            else RegistryError
        )
        raise error(
            f"{name} v{version} is not loadable, champion left unchanged: {exc}"
        ) from None
    current = _alias_version(client, name, CHAMPION)

    def move_aliases() -> None:
        if current is not None and current != int(version):
            client.set_registered_model_alias(name, PREVIOUS_CHAMPION, str(current))
        client.set_registered_model_alias(name, CHAMPION, str(version))

    _safe(f"set {name}@{CHAMPION}", move_aliases)


def prune_versions(name: str, keep: int, cache_dir: Path) -> list[int]:
    """Delete the oldest versions of ``name`` beyond ``keep`` others than the
    champion; the champion and previous champion are never deleted.

    Returns the deleted version numbers. Their verified local copies in
    ``cache_dir`` go too; their run's artifacts stay with the MLflow run.
    """
    from mlflow import MlflowClient

    client = _safe("open the tracking store", MlflowClient)
    found = _safe(
        f"list {name}'s versions",
        lambda: client.search_model_versions(f"name = '{name}'"),
    )
    protected = {
        v for v in (_alias_version(client, name, a) for a in ALIASES) if v is not None
    }
    champion = _alias_version(client, name, CHAMPION)
    # The previous champion counts among the ``keep`` others.
    room = max(0, keep - len(protected - {champion}))
    others = sorted(
        (int(mv.version) for mv in found if int(mv.version) not in protected),
        reverse=True,
    )
    doomed = sorted(others[room:])
    for version in doomed:
        _safe(
            f"delete {name} v{version}",
            lambda v=version: client.delete_model_version(name, str(v)),
        )
        shutil.rmtree(Path(cache_dir) / name / f"v{version}", ignore_errors=True)
    return doomed


def _alias_version(client: Any, name: str, alias: str) -> int | None:
    from mlflow.exceptions import MlflowException

    try:
        mv = _safe(
            f"look up {name}@{alias}",
            lambda: client.get_model_version_by_alias(name, alias),
        )
    except MlflowException:
        return None
    return int(mv.version)


prune_versions_task = task(prune_versions, name="prune-versions", **PLAIN)


def tag_version(name: str, version: int, run_id: str, tags: dict[str, str]) -> None:
    """Record a decision on both the model version and its MLflow run."""
    from mlflow import MlflowClient

    client = _safe("open the tracking store", MlflowClient)

    def write() -> None:
        for k, v in tags.items():
            client.set_model_version_tag(name, str(version), k, v)
            client.set_tag(run_id, k, v)

    _safe(f"tag {name} v{version}", write)


def _requirements() -> list[str]:
    from importlib.metadata import version

    pins = []
    for pkg in ("torch", "numpy", "pandas", "pyarrow", "mlflow"):
        try:
            pins.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except Exception:
            pins.append(pkg)
    return pins


# Registry calls retry inside _safe with bounded backoff; no second retry layer.
find_champion_task = task(find_champion, name="find-champion", **PLAIN)
register_task = task(log_and_register, name="register", **PLAIN)
promote_task = task(promote, name="promote", **PLAIN)
tag_version_task = task(tag_version, name="tag-decision", **PLAIN)
record_run_task = task(record_run, name="record-run", **PLAIN)
