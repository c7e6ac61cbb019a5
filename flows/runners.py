"""Where a run's partitioned work executes: Prefect task runners from the config.

A flow's task runner is fixed when it is decorated, so the partitioned steps
are small subflows given their runner per run with ``.with_options``:

- ``sequential``: no fan-out; ingest and scoring run as single tasks in the
  flow's process (the default, and the path every other runner must match);
- ``threads``: Prefect's ``ThreadPoolTaskRunner`` in the flow's process;
- ``dask``: prefect-dask's ``DaskTaskRunner`` on an existing scheduler
  (``dask_address``) or on a ``LocalCluster`` of ``dask_workers`` processes
  with one thread each, bound to 127.0.0.1.

The local cluster is started once per flow run, on first use, and shared by
the run's partitioned steps: a Dask worker process pays for its imports
(torch, Prefect) and for loading the model once, and a second cluster for the
second step would pay again (measured: ~16 s for 2 workers on 2 cores).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

from tasks.errors import LatentflowError

#: Seconds to wait for a scheduler's port before giving up on it.
CONNECT_TIMEOUT_S = 5.0


class ClusterError(LatentflowError):
    """The Dask cluster cannot be reached or started."""


def check_scheduler(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail fast, in one line, when nothing listens at a TCP scheduler address.

    Dask's client retries a refused connection until its own timeout (30 s by
    default) and then raises a long ``OSError``; a user who mistyped the port
    should hear it at once. Other protocols (tls://, ucx://) are left to Dask.

    Raises
    ------
    ClusterError
        ``cannot reach the Dask scheduler at tcp://...: <reason>``.
    """
    text = address if "://" in address else f"tcp://{address}"
    parts = urlsplit(text)
    if parts.scheme != "tcp":
        return
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ClusterError(
            f"invalid Dask scheduler address {address!r}: {exc}"
        ) from None
    if not host or port is None:
        raise ClusterError(
            f"invalid Dask scheduler address {address!r}: expected tcp://HOST:PORT"
        )
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise ClusterError(
            f"cannot reach the Dask scheduler at {text}: {reason}"
        ) from None


class RunnerScope:
    """Task runners for one flow run's partitioned steps.

    ``task_runner()`` returns a fresh runner for a subflow's ``with_options``
    (a runner instance belongs to one flow run), or ``None`` for sequential.
    For ``dask`` without an address, the first call starts the local cluster
    that later calls share; :meth:`close` stops it.
    """

    def __init__(
        self, runner: str, dask_address: str | None, dask_workers: int | None
    ) -> None:
        self.runner = runner
        self.dask_address = dask_address
        self.dask_workers = dask_workers
        self._cluster: Any = None

    @property
    def parallel(self) -> bool:
        return self.runner != "sequential"

    def task_runner(self) -> Any:
        """A Prefect task runner for a partitioned subflow, or None."""
        if self.runner == "sequential":
            return None
        if self.runner == "threads":
            from prefect.task_runners import ThreadPoolTaskRunner

            return ThreadPoolTaskRunner(max_workers=os.cpu_count() or 1)
        from prefect_dask import DaskTaskRunner

        return DaskTaskRunner(address=self.address())

    def address(self) -> str:
        """The scheduler's address, starting the local cluster if needed."""
        if self.dask_address:
            return self.dask_address
        if self._cluster is None:
            self._cluster = start_local_cluster(self.dask_workers)
        return str(self._cluster.scheduler_address)

    def close(self) -> None:
        """Stop the local cluster this scope started, if any."""
        cluster, self._cluster = self._cluster, None
        if cluster is not None:
            cluster.close()


#: Environment for local Dask workers. Dask's nanny sets MALLOC_TRIM_THRESHOLD_,
#: which also switches off glibc's adaptive mmap threshold: every batch-sized
#: array (tens of MB) is then a fresh mmap with fresh page faults, and a worker
#: scored at ~0.7x the in-process rate. A fixed 32 MiB mmap threshold (glibc's
#: maximum) keeps those arrays on the reusable heap again. glibc reads it at
#: process start, so it must go to the nanny's pre-spawn environment (see
#: :func:`worker_environment`), not to ``env=``.
WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def worker_environment() -> Any:
    """A ``dask.config.set`` context adding :data:`WORKER_ENV` to the variables
    the nanny sets before spawning a worker (read when each nanny is created,
    so workers it restarts later get them too)."""
    import dask

    return dask.config.set(
        {f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in WORKER_ENV.items()}
    )


def start_local_cluster(n_workers: int | None) -> Any:
    """A ``distributed.LocalCluster`` on 127.0.0.1: processes, 1 thread each.

    One thread per worker process: the work is CPU-bound numpy/torch code
    that holds the GIL for much of a batch, so processes, not threads, scale.
    No dashboard (nothing listens beyond the scheduler and workers).
    """
    try:
        from distributed import LocalCluster

        with worker_environment():
            return LocalCluster(
                n_workers=n_workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address=None,
                silence_logs=logging.ERROR,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()
        raise ClusterError(
            "cannot start a local Dask cluster: "
            + (first[0] if first else type(exc).__name__)
        ) from None


@contextmanager
def runner_scope(
    runner: str, dask_address: str | None, dask_workers: int | None
) -> Iterator[RunnerScope]:
    """A :class:`RunnerScope` for one run; checks a scheduler address first."""
    if runner == "dask" and dask_address:
        check_scheduler(dask_address)
    scope = RunnerScope(runner, dask_address, dask_workers)
    try:
        yield scope
    finally:
        scope.close()
