"""The generators in MLflow: one registered model, ``<dataset>-generator``.

Each trained generator (the GAN or the VAE) is a version of it, logged as a
pyfunc "from code" (:mod:`models.generator_pyfunc`) with the saved generator
as its ``model_dir`` artifact. The alias named after its kind (``gan``,
``vae``) points at the newest version of that kind: aliases, not stages.

As for the main model (:mod:`tasks.registry`), the SHA-256 of every stored
file is recorded as version tags at registration, and a version is used again
only after its files verify against that record. A version is reused when its
``latentflow.data_fingerprint`` tag matches: same rows, same settings, same
seed, so training again would give the same generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import models
import tasks
from models.integrity import check_manifest
from models.serving import TAG_BUNDLE
from models.synthesis import TableGenerator
from tasks.errors import TamperError
from tasks.registry import (
    BUNDLE_ARTIFACT,
    _requirements,
    _safe,
    ensure_experiment,
    fetch_model,
    record_logged_files,
    recorded_files,
)

PYFUNC_FILE = Path(models.__file__).with_name("generator_pyfunc.py")
MODELS_PKG = Path(models.__file__).parent
TASKS_PKG = Path(tasks.__file__).parent
TAG_KIND = "latentflow.generator"
TAG_FINGERPRINT = "latentflow.data_fingerprint"


def generator_name(dataset: str) -> str:
    return f"{dataset}-generator"


@dataclass(frozen=True)
class GeneratorVersion:
    name: str
    version: int
    run_id: str
    reused: bool


def find_generator(
    dataset: str, kind: str, fingerprint: str, cache_dir: Path
) -> tuple[TableGenerator, GeneratorVersion] | None:
    """The newest registered ``kind`` generator trained on the same rows and
    settings, verified and loaded; None when there is none."""
    from mlflow import MlflowClient

    name = generator_name(dataset)
    client = _safe("open the tracking store", MlflowClient)
    versions = _safe(
        f"list the versions of {name}",
        lambda: client.search_model_versions(f"name = '{name}'"),
    )
    matching = [
        v
        for v in versions
        if (v.tags or {}).get(TAG_KIND) == kind
        and (v.tags or {}).get(TAG_FINGERPRINT) == fingerprint
    ]
    if not matching:
        return None
    mv = max(matching, key=lambda v: int(v.version))
    version = int(mv.version)
    tags = dict(mv.tags or {})
    bundle = fetch_model(name, version, cache_dir, recorded_files(name, version, tags))
    try:
        gen = TableGenerator.load(bundle, expected_sha256=tags.get(TAG_BUNDLE) or None)
    except ValueError as exc:
        raise TamperError(f"{name} v{version} cannot be loaded: {exc}") from None
    return gen, GeneratorVersion(name, version, mv.run_id or "", reused=True)


def register_generator(
    *,
    gen_dir: Path,
    dataset: str,
    data_dir: Path,
    kind: str,
    fingerprint: str,
    params: dict[str, Any],
    history: dict[str, list[float]],
) -> GeneratorVersion:
    """Log a saved generator as a pyfunc-from-code model, register it as a new
    version of ``<dataset>-generator``, record its files, move its alias."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, DataType, Schema

    name = generator_name(dataset)
    experiment_id = ensure_experiment(dataset, data_dir)
    client = _safe("open the tracking store", MlflowClient)
    signature = ModelSignature(
        inputs=Schema([ColSpec(DataType.long, "rows"), ColSpec(DataType.long, "seed")])
    )
    tags = {TAG_KIND: kind, TAG_FINGERPRINT: fingerprint}

    def run() -> GeneratorVersion:
        with mlflow.start_run(
            experiment_id=experiment_id,
            run_name=f"generator-{kind}",
            tags={**tags, "latentflow.step": "synthesize"},
        ) as active:
            run_id = active.info.run_id
            now = int(time.time() * 1000)
            client.log_batch(
                run_id,
                params=[Param(k, str(v)[:6000]) for k, v in sorted(params.items())],
            )
            metrics = [
                Metric(key, float(v), now, step)
                for key, values in history.items()
                for step, v in enumerate(values)
            ]
            for i in range(0, len(metrics), 900):
                client.log_batch(run_id, metrics=metrics[i : i + 900])
            info = mlflow.pyfunc.log_model(
                name="generator",
                python_model=str(PYFUNC_FILE),
                artifacts={BUNDLE_ARTIFACT: str(gen_dir)},
                code_paths=[str(MODELS_PKG), str(TASKS_PKG)],
                model_config={TAG_BUNDLE: check_manifest(gen_dir) or ""},
                signature=signature,
                registered_model_name=name,
                pip_requirements=_requirements(),
                await_registration_for=60,
            )
            version = int(info.registered_model_version)
            for k, v in tags.items():
                client.set_model_version_tag(name, str(version), k, v)
            record_logged_files(client, name, version, gen_dir, PYFUNC_FILE)
            client.set_registered_model_alias(name, kind, str(version))
            return GeneratorVersion(name, version, run_id, reused=False)

    return _safe(f"register a new version of {name}", run, attempts=2)


def log_report(
    dataset: str,
    data_dir: Path,
    report_text: str,
    report: dict[str, Any],
    tags: dict[str, str],
) -> str:
    """A run holding the quality report (``synthesis_report.md`` and ``.json``)."""
    import mlflow

    experiment_id = ensure_experiment(dataset, data_dir)

    def run() -> str:
        with mlflow.start_run(
            experiment_id=experiment_id, run_name="synthesize", tags=tags
        ) as active:
            mlflow.log_text(report_text, "synthesis_report.md")
            mlflow.log_dict(report, "synthesis_report.json")
            for kind, figures in report["generators"].items():
                for key in (
                    "column_distance_mean",
                    "correlation_difference",
                    "detection_auc",
                    "probe_auc",
                ):
                    value = figures.get(key)
                    if value is not None:
                        mlflow.log_metric(f"{kind}_{key}", float(value))
            return active.info.run_id

    return _safe("log the synthesis report", run, attempts=2)
