"""Everything that talks to MLflow: tracking, the model registry, aliases.

Tracking defaults to ``sqlite:///<data_dir>/mlflow.db`` with artifacts under
``<data_dir>/mlartifacts``; ``MLFLOW_TRACKING_URI`` wins when set. Nothing here
runs at import time: the URI is set by :func:`configure` when a run starts.
"""

from __future__ import annotations

import os
import shutil
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
from models.bundle import LatentModel
from tasks.decide import ChampionInfo
from tasks.errors import RegistryError
from tasks.faults import checkpoint
from tasks.policy import PLAIN

CHAMPION = "champion"
BUNDLE_ARTIFACT = "model_dir"
PYFUNC_FILE = Path(models.__file__).with_name("pyfunc_model.py")
MODELS_PKG = Path(models.__file__).parent
_T = TypeVar("_T")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: int
    run_id: str
    tracking_uri: str


def tracking_uri_for(data_dir: Path) -> str:
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{(Path(data_dir).resolve() / 'mlflow.db').as_posix()}"


def configure(data_dir: Path) -> str:
    """Point MLflow at the run's store; returns the tracking URI."""
    import mlflow

    uri = tracking_uri_for(data_dir)
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Bounded retries: a registry that is down fails the run in seconds, not hours.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    return uri


def _safe(
    what: str, fn: Callable[[], _T], attempts: int = 3, backoff: float = 1.0
) -> _T:
    """Run a registry call with bounded retries; raise RegistryError at the end."""
    from mlflow.exceptions import MlflowException

    last: Exception | None = None
    for i in range(attempts):
        try:
            return fn()
        except MlflowException as exc:
            if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                raise
            last = exc
        except (OSError, ConnectionError) as exc:
            last = exc
        if i + 1 < attempts:
            time.sleep(backoff * 2**i)
    first = str(last).splitlines()[0][:300] if last else "unknown error"
    raise RegistryError(f"MLflow registry failed to {what}: {first}")


def ensure_experiment(dataset: str, data_dir: Path) -> str:
    """The experiment of a dataset, created with artifacts under the data dir."""
    import mlflow

    name = f"latentflow-{dataset}"

    def get_or_create() -> str:
        exp = mlflow.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        location = None
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            location = (Path(data_dir).resolve() / "mlartifacts" / dataset).as_uri()
        return mlflow.create_experiment(name, artifact_location=location)

    return _safe(f"open experiment {name}", get_or_create)


def _bundle_path(downloaded: Path) -> Path:
    return downloaded / "artifacts" / BUNDLE_ARTIFACT


def fetch_model(name: str, version: int, cache_dir: Path) -> Path:
    """Download a model version once into the cache and return its bundle dir."""
    import mlflow

    target = cache_dir / name / f"v{version}"
    if (target / "MLmodel").is_file():
        return _bundle_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".v{version}-", dir=target.parent))
    try:
        _safe(
            f"download {name} v{version}",
            lambda: mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{name}/{version}", dst_path=str(tmp)
            ),
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return _bundle_path(target)


def find_champion(name: str, cache_dir: Path) -> ChampionInfo | None:
    """The current champion of ``name``, downloaded and loadable, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        mv = _safe(
            f"look up {name}@{CHAMPION}",
            lambda: client.get_model_version_by_alias(name, CHAMPION),
        )
    except MlflowException:
        return None
    version = int(mv.version)
    bundle = fetch_model(name, version, cache_dir)
    try:
        model = LatentModel.load(bundle)
    except ValueError as exc:
        # A champion that fails its checks may have been tampered with: stop and
        # say so rather than silently training around it.
        raise RegistryError(
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
    skip = {"device", "verbose", "epoch_callback"}
    params = {k: v for k, v in model.estimator.get_params().items() if k not in skip}
    # A family whose settings do not name it is still told apart from another.
    params.setdefault("kind", model.info.family)
    centers = model.info.cluster_centers
    params["n_clusters"] = len(centers) if centers else None
    return params


def _signature_example(model: LatentModel, sample: pd.DataFrame) -> pd.DataFrame:
    """Feature columns only, typed as a user's raw frame would be."""
    cols = model.preprocessor.input_columns
    ex = sample[cols].head(5).copy()
    for c in model.preprocessor.categorical:
        ex[c] = ex[c].astype(object)
    for c in model.preprocessor.numeric:
        ex[c] = ex[c].astype("float64")
    return ex


def _signature(model: LatentModel, example: pd.DataFrame) -> Any:
    """Input columns by name, any type: raw frames carry ints, floats, strings and
    missing values, and the preprocessor coerces them itself (junk -> missing)."""
    from mlflow.models import ModelSignature, infer_signature
    from mlflow.types.schema import AnyType, ColSpec, Schema

    inputs = Schema(
        [ColSpec(AnyType(), c, required=True) for c in model.preprocessor.input_columns]
    )
    outputs = infer_signature(example, model.predict_frame(example)).outputs
    return ModelSignature(inputs=inputs, outputs=outputs)


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
) -> RegisteredVersion:
    """Log a trained bundle as a pyfunc-from-code run and register a new version.

    The version is registered but not promoted: :func:`promote` moves the
    ``champion`` alias only after the version has been downloaded and loaded.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    experiment_id = ensure_experiment(dataset, data_dir)
    model = LatentModel.load(bundle_dir)
    example = _signature_example(model, sample)
    signature = _signature(model, example)
    client = MlflowClient()

    def run() -> RegisteredVersion:
        with mlflow.start_run(experiment_id=experiment_id, tags=tags) as active:
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
            for k, v in tags.items():
                client.set_model_version_tag(name, str(version), k, v)
            return RegisteredVersion(name, version, run_id, mlflow.get_tracking_uri())

    return _safe(f"register a new version of {name}", run, attempts=2)


def promote(name: str, version: int, cache_dir: Path) -> None:
    """Point ``champion`` at ``version`` once its artifacts load completely."""
    from mlflow import MlflowClient

    bundle = fetch_model(name, version, cache_dir)
    try:
        LatentModel.load(bundle)
    except ValueError as exc:
        raise RegistryError(
            f"{name} v{version} is not loadable, champion left unchanged: {exc}"
        ) from None
    client = MlflowClient()
    _safe(
        f"set {name}@{CHAMPION}",
        lambda: client.set_registered_model_alias(name, CHAMPION, str(version)),
    )


def tag_version(name: str, version: int, run_id: str, tags: dict[str, str]) -> None:
    """Record a decision on both the model version and its MLflow run."""
    from mlflow import MlflowClient

    client = MlflowClient()

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
