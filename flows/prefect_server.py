"""Prefect's temporary server for one ``latentflow run``, started early.

With no ``PREFECT_API_URL``, Prefect starts a temporary server the first time
a flow needs its API: it imports the whole server application in the calling
process (only to reach the class that launches it), launches
``uvicorn prefect.server.api.server:create_app`` in a child process, and waits
for it, after the CLI has already spent seconds importing torch, MLflow and
scikit-learn. The child's own start is mostly importing the same application.

:class:`TemporaryServer` launches the same child (same command, same
ephemeral-mode environment) before those imports, so the two start-ups overlap
on different cores, and the CLI never imports the server application itself.
The flow then talks to it as to any running server, and it is stopped when the
CLI exits, after Prefect's log and event workers have drained (they stop in
``threading``'s exit hooks, which run before ``atexit``'s).

A ``PREFECT_API_URL`` from the environment, a profile or a settings file wins:
no temporary server is started, or the one started early is stopped unused.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tasks.errors import EnvironmentFault

#: uvicorn's exit status when its port was taken between our check and its bind.
_PORT_IN_USE = 3
_STARTS = 3


def _free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _site_packages() -> str:
    """The directory holding the ``prefect`` package, found without importing it."""
    spec = importlib.util.find_spec("prefect")
    if spec is None or spec.origin is None:
        raise EnvironmentFault("the prefect package is not installed")
    return str(Path(spec.origin).parent.parent)


def wants_temporary_server(env: os._Environ[str] | dict[str, str]) -> bool:
    """Whether the environment leaves the run to a temporary server.

    Only the environment is read (cheaply, before Prefect is imported); a
    profile's API URL is found later by :func:`configured_api_url`.
    """
    if env.get("PREFECT_API_URL"):
        return False
    enabled = env.get("PREFECT_SERVER_EPHEMERAL_ENABLED", "true")
    return enabled.strip().lower() not in ("0", "false", "no", "off")


def configured_api_url() -> str | None:
    """``PREFECT_API_URL`` as Prefect resolves it (environment, profile, files)."""
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


class TemporaryServer:
    """One Prefect server process on 127.0.0.1, for this process's lifetime."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self._starts = 0
        self._ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> TemporaryServer:
        """Launch the server; returns at once (see :meth:`wait`)."""
        self.port = _free_port()
        self._starts += 1
        env = {
            **os.environ,
            # What Prefect's own temporary server runs with: no UI, the
            # ephemeral set of services.
            "PREFECT_UI_ENABLED": "0",
            "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1",
        }
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "--app-dir",
                _site_packages(),
                "--factory",
                "prefect.server.api.server:create_app",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--log-level",
                "error",
                "--lifespan",
                "on",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            # stdout carries the CLI's one JSON line: the server's goes to stderr.
            stdout=_stderr_fd(),
        )
        if self._starts == 1:
            atexit.register(self.stop)
        return self

    def wait(self, timeout: float) -> str:
        """Block until the server answers its health check; returns the API URL."""
        if self._ready:
            return self.api_url
        deadline = time.monotonic() + timeout
        while True:
            proc = self.process
            if proc is None:
                raise EnvironmentFault("Prefect's temporary server was stopped")
            code = proc.poll()
            if code == _PORT_IN_USE and self._starts < _STARTS:
                self.start()
                continue
            if code is not None:
                raise EnvironmentFault(
                    f"Prefect's temporary server on 127.0.0.1:{self.port} exited"
                    f" with status {code} before it answered (its messages are"
                    " above); set PREFECT_API_URL to use a running server"
                )
            if self._healthy():
                self._ready = True
                return self.api_url
            if time.monotonic() > deadline:
                raise EnvironmentFault(
                    f"Prefect's temporary server on 127.0.0.1:{self.port} did not"
                    f" answer within {timeout:g} s (a busy machine, or a slow"
                    " database); raise"
                    " PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS or set"
                    " PREFECT_API_URL"
                )
            time.sleep(0.05)

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return bool(r.status == 200)
        except (OSError, urllib.error.URLError):
            return False

    def stop(self) -> None:
        """Terminate the server (idempotent); killed if it lingers."""
        proc, self.process = self.process, None
        self._ready = False
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stderr_fd() -> int:
    """stderr's file descriptor, or DEVNULL when stderr is not a real file
    (the CLI called in-process with captured streams)."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        # io.UnsupportedOperation is an OSError and a ValueError.
        return subprocess.DEVNULL
