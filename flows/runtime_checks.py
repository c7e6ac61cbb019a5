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


def check_mlflow_database() -> None:
    """A PostgreSQL ``MLFLOW_TRACKING_URI`` must take a sync driver and answer:
    checked before the run starts, in seconds, not after ingest and training."""
    from tasks.pg import check_mlflow_url, is_postgres, probe
    from tasks.registry import user_tracking_uri

    uri = user_tracking_uri()
    if uri is None or not is_postgres(uri):
        return
    check_mlflow_url(uri)
    probe(uri, "MLflow store")


def check_runtime(cfg: PipelineConfig) -> None:
    """Everything a run of ``cfg`` needs from this machine before it starts.

    The CLI calls it before any engine starts, so a bad data dir or device is
    one line in a second; the flow calls it again for runs from deployments.
    """
    check_local(cfg)
    check_mlflow_database()


def check_local(cfg: PipelineConfig) -> None:
    """The checks that need no registry or engine (and no MLflow import): the
    data dir, the device and the run's paths."""
    check_data_dir(cfg.data.data_dir)
    check_device(cfg.execution.device)
    data = cfg.resolved().data
    if data.dataset and data.run_date:
        data_dir = Path(data.data_dir).expanduser().resolve()
        check_run_paths(data_dir, data.dataset, data.run_date)


def prefect_on_postgres() -> bool:
    """Whether Prefect's settings put its server's database on PostgreSQL."""
    from prefect.settings import get_current_settings

    secret = get_current_settings().server.database.connection_url
    return secret is not None and secret.get_secret_value().startswith("postgresql")


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
    if url.get_backend_name() == "postgresql":
        migrate_prefect_postgres(text)
        return
    if url.get_backend_name() != "sqlite" or not url.database:
        return
    if url.database.startswith(":memory:") or "mode=memory" in str(url.query):
        return
    check_prefect_sqlite(Path(url.database).expanduser())


def default_prefect_database() -> Path:
    """Where Prefect keeps its SQLite database when nothing else is configured."""
    home = os.environ.get("PREFECT_HOME") or "~/.prefect"
    return Path(home).expanduser() / "prefect.db"


def check_prefect_sqlite(path: Path) -> None:
    """A Prefect SQLite database that exists must be a readable database."""
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


def migrate_prefect_postgres(url: str) -> None:
    """Bring Prefect's PostgreSQL schema and block types up to date, one
    process at a time.

    The temporary server of every ``latentflow run`` migrates its database and
    registers Prefect's block types on start; several runs started together on
    a fresh database raced in both (``DuplicateColumnError``, a unique
    violation, tracebacks on stderr). Here the first run does both under the
    database's advisory lock; the others, once it is free, find the schema at
    head and the blocks registered, so their servers change nothing. A server
    that cannot be reached is one line, in seconds.
    """
    from tasks.pg import check_prefect_url, run_locked_async

    check_prefect_url(url)
    run_locked_async(url, "prefect-schema", "Prefect database", _prepare_prefect)


async def _prepare_prefect() -> None:
    import anyio.to_thread
    from prefect.server.api.server import _memoize_block_auto_registration
    from prefect.server.database import provide_database_interface
    from prefect.server.database.alembic_commands import alembic_upgrade
    from prefect.server.models.block_registration import run_block_auto_registration

    # An AnyIO worker thread: Prefect's migrations call back into this loop.
    await anyio.to_thread.run_sync(alembic_upgrade)

    async def register() -> None:
        db = provide_database_interface()
        async with await db.session() as session:
            await run_block_auto_registration(session=session)

    # Prefect's own memo (PREFECT_HOME/memo_store.toml): registered once per
    # block registry and database, as the server itself would skip it.
    await _memoize_block_auto_registration(register)()
