"""Checks of the machine a run is about to use, before any work starts.

A run that cannot succeed here (no CUDA for ``device: cuda``, a data dir that
is a regular file, a Prefect database that is not one) stops with one line
naming what is wrong, before anything is read or written.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from flows.config import PipelineConfig
from tasks.errors import ConfigError, EnvironmentFault, describe_fault
from tasks.storage import check_run_paths


def check_device(device: str) -> None:
    """``device: cuda`` needs a CUDA device here; ``auto`` falls back to CPU."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(
            "device 'cuda' was requested but this machine has no usable CUDA"
            " device (torch.cuda.is_available() is False); use --device cpu or"
            " auto"
        )


def check_data_dir(data_dir: str) -> None:
    """The data dir, or its nearest existing ancestor, must be a directory."""
    path = Path(data_dir).expanduser()
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is" if p == path else f"lies under {p}, which is"
                raise ConfigError(
                    f"data dir {path} {what} a regular file; expected a directory"
                )
            return


def check_runtime(cfg: PipelineConfig) -> None:
    """Everything a run of ``cfg`` needs from this machine before it starts.

    The CLI calls it before any engine starts, so a bad data dir or device is
    one line in a second; the flow calls it again for runs from deployments.
    """
    check_data_dir(cfg.data.data_dir)
    check_device(cfg.execution.device)
    data = cfg.resolved().data
    if data.dataset and data.run_date:
        data_dir = Path(data.data_dir).expanduser().resolve()
        check_run_paths(data_dir, data.dataset, data.run_date)


def check_prefect_database() -> None:
    """With no ``PREFECT_API_URL`` the CLI starts Prefect's ephemeral server on
    its SQLite database; a corrupt or locked one would only show as a startup
    timeout in a child process. Read its header here, read-only, first."""
    from prefect.settings import get_current_settings
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    settings = get_current_settings()
    if settings.api.url:
        return  # a running server owns its database
    secret = settings.server.database.connection_url
    if secret is None:
        return
    text = secret.get_secret_value()
    try:
        url = make_url(text)
    except ArgumentError:
        raise ConfigError(
            "the Prefect database URL (PREFECT_API_DATABASE_CONNECTION_URL or"
            " PREFECT_SERVER_DATABASE_CONNECTION_URL) is not a database URL"
        ) from None
    if url.get_backend_name() != "sqlite" or not url.database:
        return
    if url.database.startswith(":memory:") or "mode=memory" in str(url.query):
        return
    path = Path(url.database).expanduser()
    if not path.exists():
        return  # created on first use
    if not path.is_file():
        raise EnvironmentFault(f"Prefect database {path} is not a regular file")
    try:
        con = sqlite3.connect(f"file:{os.fspath(path)}?mode=ro", uri=True, timeout=10)
        try:
            con.execute("SELECT count(*) FROM sqlite_master").fetchone()
        finally:
            con.close()
    except sqlite3.Error as exc:
        fault = describe_fault(exc, database=f"Prefect database {path}")
        if fault is None:
            raise
        raise fault from None
