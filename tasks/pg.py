"""PostgreSQL behind MLflow and Prefect: URL checks, a reachability probe and
the advisory lock that lets one process at a time create a schema.

Both libraries create their schema on first use, in every process that finds
it missing; runs started together on a fresh database then race in alembic
(``DuplicateColumnError``). On PostgreSQL the lock is the database's own
(``pg_advisory_lock``): it covers every machine that shares the database, and
the server drops it when the holder's connection dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from tasks.errors import ConfigError, EnvironmentFault

CONNECT_TIMEOUT_SECONDS = 10
# Sync drivers MLflow can use; asyncpg is Prefect's, and only Prefect's.
SYNC_DRIVERS = ("psycopg2", "psycopg")


def is_postgres(url: str) -> bool:
    """``postgresql://…`` or ``postgresql+<driver>://…`` (SQLAlchemy's spelling)."""
    return url.split(":", 1)[0].split("+", 1)[0].lower() == "postgresql"


def masked(url: str) -> str:
    """The URL as error messages and logs show it: no password."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<not a URL>"


def _driver(url: str) -> str:
    scheme = url.split(":", 1)[0]
    return scheme.split("+", 1)[1].lower() if "+" in scheme else ""


def prefect_url(url: str) -> str:
    """The Prefect server's form of a PostgreSQL URL: ``postgresql+asyncpg://``."""
    rest = url.split("://", 1)[1]
    return f"postgresql+asyncpg://{rest}"


def mlflow_url(url: str) -> str:
    """MLflow's form: a sync driver (``postgresql://`` means psycopg2)."""
    driver = _driver(url)
    rest = url.split("://", 1)[1]
    return url if driver in SYNC_DRIVERS else f"postgresql://{rest}"


def with_search_path(url: str, schema: str) -> str:
    """A sync (libpq) URL whose sessions use ``schema``: MLflow's tables there."""
    from urllib.parse import quote

    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options={quote(f'-csearch_path={schema}', safe='')}"


def same_database(a: str, b: str) -> bool:
    """Both URLs name one database on one server (drivers aside)."""
    from sqlalchemy.engine import make_url

    ua, ub = make_url(a), make_url(b)
    return (ua.host, ua.port or 5432, ua.database) == (
        ub.host,
        ub.port or 5432,
        ub.database,
    )


def ensure_schemas(url: str, schemas: tuple[str, ...], what: str) -> None:
    """Create the schemas if missing (needs CREATE on the database)."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    engine = sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect() as conn:
            for schema in schemas:
                conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    except SQLAlchemyError as exc:
        raise _unreachable(what, url, exc) from None
    finally:
        engine.dispose()


def check_mlflow_url(url: str) -> None:
    """MLflow's store needs a sync driver: asyncpg is refused in one line."""
    driver = _driver(url)
    if driver and driver not in SYNC_DRIVERS:
        raise ConfigError(
            f"MLFLOW_TRACKING_URI {masked(url)} uses the driver {driver!r};"
            f" MLflow needs a sync one: postgresql://… (psycopg2) or"
            f" postgresql+psycopg2://…"
        )


def check_prefect_url(url: str) -> None:
    """Prefect's server is async: only ``postgresql+asyncpg://`` works."""
    if _driver(url) != "asyncpg":
        raise ConfigError(
            f"the Prefect database URL {masked(url)} must use the asyncpg driver:"
            f" postgresql+asyncpg://… (PREFECT_API_DATABASE_CONNECTION_URL)"
        )


def lock_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock``."""
    digest = hashlib.sha256(f"latentflow:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _unreachable(what: str, url: str, exc: BaseException) -> EnvironmentFault:
    first = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    reason = first[0] if first else type(exc).__name__
    return EnvironmentFault(
        f"{what} {masked(url)} failed: {reason}; is PostgreSQL running, the URL"
        " right and the user allowed to connect and create tables?"
    )


# Waiting polls in autocommit mode, never inside a statement or a transaction:
# Prefect's migrations build indexes CONCURRENTLY, which wait for every open
# transaction in the database, a blocked pg_advisory_lock() call included.
_POLL_SECONDS = 0.5
_TRY_LOCK = "SELECT pg_try_advisory_lock(:k)"
_UNLOCK = "SELECT pg_advisory_unlock(:k)"
LOCK_WAIT_SECONDS = 600.0


def _lock_timeout(what: str, url: str) -> EnvironmentFault:
    return EnvironmentFault(
        f"{what} {masked(url)}: another process held its schema lock for"
        f" {LOCK_WAIT_SECONDS:.0f}s; retry when it has finished"
    )


def probe(url: str, what: str) -> None:
    """Connect once, with a short timeout; one line naming the server if not."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    engine = sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    try:
        with engine.connect():
            pass
    except SQLAlchemyError as exc:
        raise _unreachable(what, url, exc) from None
    finally:
        engine.dispose()


@contextlib.contextmanager
def advisory_lock(url: str, name: str, what: str) -> Iterator[None]:
    """Hold ``pg_advisory_lock`` on a sync connection to ``url`` meanwhile.

    Connecting is tried once, with a short timeout: a server that is down is
    one line in seconds (MLflow's own engine retries for minutes).
    """
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    engine = sa.create_engine(
        url,
        poolclass=sa.pool.NullPool,
        isolation_level="AUTOCOMMIT",
        connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
    )
    key = {"k": lock_key(name)}
    try:
        try:
            conn = engine.connect()
        except SQLAlchemyError as exc:
            raise _unreachable(what, url, exc) from None
        with conn:
            deadline = time.monotonic() + LOCK_WAIT_SECONDS
            while not conn.execute(sa.text(_TRY_LOCK), key).scalar():
                if time.monotonic() > deadline:
                    raise _lock_timeout(what, url)
                time.sleep(_POLL_SECONDS)
            try:
                yield
            finally:
                conn.execute(sa.text(_UNLOCK), key)
    finally:
        engine.dispose()


def run_locked_async(
    url: str, name: str, what: str, work: Callable[[], Awaitable[Any]]
) -> Any:
    """Await ``work()`` while an async connection to ``url`` (an asyncpg URL,
    as Prefect's) holds ``pg_advisory_lock``; in a new event loop."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.ext.asyncio import create_async_engine

    async def locked() -> Any:
        engine = create_async_engine(
            url,
            poolclass=sa.pool.NullPool,
            isolation_level="AUTOCOMMIT",
            connect_args={"timeout": CONNECT_TIMEOUT_SECONDS},
        )
        key = {"k": lock_key(name)}
        try:
            try:
                conn = await engine.connect()
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                raise _unreachable(what, url, exc) from None
            try:
                deadline = time.monotonic() + LOCK_WAIT_SECONDS
                while not (await conn.execute(sa.text(_TRY_LOCK), key)).scalar():
                    if time.monotonic() > deadline:
                        raise _lock_timeout(what, url)
                    await asyncio.sleep(_POLL_SECONDS)
                try:
                    return await work()
                finally:
                    await conn.execute(sa.text(_UNLOCK), key)
            finally:
                await conn.close()
        finally:
            await engine.dispose()

    return asyncio.run(locked())
