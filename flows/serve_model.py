"""``latentflow serve-model``: a registered model behind MLflow's scoring server.

The model is downloaded and every file checked against the manifest recorded
in the registry (:func:`models.serving.load_model`) before any of its code
runs; the verified copy is then served in this process by MLflow's own scoring
app (``/invocations``, ``/ping``, ``/version``) with uvicorn, on 127.0.0.1 only.
In-process, so nothing depends on ``uvicorn`` being on ``PATH`` (``mlflow models
serve`` execs it by name and fails outside an activated venv), and the model
that is served is the one that was verified.
"""

from __future__ import annotations

import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError, RegistryError, TamperError

HOST = "127.0.0.1"


def _listen(port: int) -> socket.socket:
    """Bind before loading anything, so a busy port is one line, not a trace."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot listen on {HOST}:{port}: {exc.strerror or exc}"
        ) from None
    sock.listen(128)
    return sock


def load_verified(
    data_dir: Path, dataset: str, version: int | None, alias: str, dst: Path
) -> tuple[Any, str]:
    """The registered model of ``dataset``, verified; and a one-line description."""
    from mlflow.exceptions import MlflowException

    from models.integrity import IntegrityError
    from models.serving import load_model
    from tasks.registry import tracking_uri_for
    from tasks.storage import validate_dataset_name

    validate_dataset_name(dataset)
    uri = tracking_uri_for(data_dir)
    db = Path(data_dir) / "mlflow.db"
    if uri.startswith("sqlite:") and not db.is_file():
        # MLflow would create an empty store here; a typo must not.
        raise ConfigError(f"no model registry at {db}: run `latentflow run` first")
    name = f"{dataset}-autoencoder"
    which = f"v{version}" if version is not None else f"@{alias}"
    try:
        model = load_model(
            name, alias=alias, version=version, tracking_uri=uri, dst=dst
        )
    except IntegrityError as exc:
        raise TamperError(f"{name} {which} refused: {exc}") from None
    except MlflowException as exc:
        first = str(exc).splitlines()[0][:300] if str(exc) else exc.error_code
        raise RegistryError(f"cannot load {name} {which}: {first}") from None
    return model, f"{name} {which}"


def serve_model(
    data_dir: Path, dataset: str, version: int | None, alias: str, port: int
) -> None:
    """Verify, load and serve until interrupted (Ctrl-C, SIGTERM)."""
    import uvicorn
    from mlflow.pyfunc import scoring_server

    sock = _listen(port)
    try:
        with tempfile.TemporaryDirectory(prefix="lf-serve-") as tmp:
            model, what = load_verified(data_dir, dataset, version, alias, Path(tmp))
            app = scoring_server.init(model)
            bound = sock.getsockname()[1]
            print(
                f"latentflow: serving {what} (verified) at"
                f" http://{HOST}:{bound}/invocations",
                file=sys.stderr,
                flush=True,
            )
            config = uvicorn.Config(app, log_level="warning", access_log=False)
            uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
