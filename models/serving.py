"""Load a registered model only after every file has been verified.

``mlflow.pyfunc.load_model("models:/...")`` executes the stored
``pyfunc_model.py`` and puts the copied ``code/`` on ``sys.path``: whoever can
write to the artifact store can make it run code. At registration latentflow
records, as model version tags in the registry, a manifest of every file of the
logged model (SHA-256 each) and its digest. :func:`load_model` downloads a
version, checks every file (code, MLmodel, JSON, weights) against that record,
and only then lets MLflow load the verified local copy. Trusted: the registry
(tracking database or server) and the installed latentflow package.
"""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from models.integrity import (
    IntegrityError,
    compare,
    manifest_digest,
    safe_tree_manifest,
)

#: Version tags written at registration (see tasks/registry.log_and_register).
TAG_DIGEST = "latentflow.model_sha256"  # digest of the whole logged model's manifest
TAG_MANIFEST = "latentflow.model_manifest"  # that manifest: {path: sha256}
TAG_BUNDLE = "latentflow.bundle_sha256"  # digest of artifacts/model_dir/manifest.json
BUNDLE_DIR = "artifacts/model_dir"  # the bundle inside a logged model
#: MLflow writes this file itself into any model it downloads through
#: ``models:/``, even into a local artifact store; it holds the name and version
#: and nothing reads it back, so it is left out of manifests.
MLFLOW_META = "registered_model_meta"
CHAMPION = "champion"


def recorded_manifest(tags: Mapping[str, str], what: str) -> dict[str, str] | None:
    """The file manifest the registry holds for a version, or None if it has none.

    Raises IntegrityError when the two tags disagree with each other.
    """
    digest, text = tags.get(TAG_DIGEST), tags.get(TAG_MANIFEST)
    if not digest and not text:
        return None
    try:
        manifest = json.loads(text or "")
    except ValueError:
        manifest = None
    if (
        not isinstance(manifest, dict)
        or not all(isinstance(v, str) for v in manifest.values())
        or manifest_digest(manifest) != digest
    ):
        raise IntegrityError(
            f"the registry's record of {what} is inconsistent (tags {TAG_MANIFEST}"
            f" and {TAG_DIGEST} disagree)"
        )
    return manifest


def verify_model_dir(root: Path, manifest: Mapping[str, str]) -> None:
    """Every file under ``root`` must be exactly the recorded one, none added."""
    actual = safe_tree_manifest(Path(root), skip=(MLFLOW_META,))
    compare(Path(root), manifest, actual)


def download_version(
    name: str, version: int, dst: Path, client: Any, tracking_uri: str
) -> Path:
    """Download a version's files into ``dst`` as stored (MLflow's ``models:/``
    download would add a ``registered_model_meta`` file; this adds nothing)."""
    import mlflow

    uri = client.get_model_version_download_uri(name, str(version))
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=uri, dst_path=str(dst), tracking_uri=tracking_uri
    )
    return Path(local)


@contextlib.contextmanager
def no_bytecode_writes() -> Iterator[None]:
    """Importing the verified copy must not add ``__pycache__`` files to it
    (the next check would see files the record does not have)."""
    saved = sys.dont_write_bytecode
    sys.dont_write_bytecode = True
    try:
        yield
    finally:
        sys.dont_write_bytecode = saved


def load_model(
    name: str,
    *,
    alias: str = CHAMPION,
    version: int | None = None,
    tracking_uri: str | None = None,
    dst: str | Path | None = None,
) -> Any:
    """A registered latentflow model as an MLflow pyfunc, verified before it runs.

    Parameters
    ----------
    name : str
        Registered model name, e.g. ``"weatheraus-autoencoder"``.
    alias : str, default "champion"
        Alias to load; ignored when ``version`` is given.
    version : int, optional
        Version to load.
    tracking_uri : str, optional
        The registry, e.g. ``"sqlite:////tmp/lf/mlflow.db"`` (default: MLflow's
        current tracking URI).
    dst : path, optional
        Where to download (default: a new private temporary directory).

    Returns
    -------
    mlflow.pyfunc.PyFuncModel

    Raises
    ------
    IntegrityError
        (a ValueError) with one line naming the file that does not match, when
        the version has no recorded manifest, or when the record is inconsistent.
        Nothing from the download has run.
    """
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri or mlflow.get_tracking_uri()
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if version is None:
        mv = client.get_model_version_by_alias(name, alias)
    else:
        mv = client.get_model_version(name, str(version))
    what = f"{name} v{mv.version}"
    manifest = recorded_manifest(mv.tags, what)
    if manifest is None:
        raise IntegrityError(
            f"{what} has no recorded file manifest (registered before latentflow"
            " recorded one), so it cannot be verified; retrain to replace it"
        )
    target = (
        Path(dst) if dst is not None else Path(tempfile.mkdtemp(prefix="lf-model-"))
    )
    local = download_version(name, int(mv.version), target, client, uri)
    verify_model_dir(local, manifest)
    with no_bytecode_writes():
        return mlflow.pyfunc.load_model(
            str(local), model_config={TAG_BUNDLE: mv.tags.get(TAG_BUNDLE)}
        )
