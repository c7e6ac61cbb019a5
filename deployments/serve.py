"""``make serve``: a local Prefect server, the deployments and the MLflow UI.

Starts, all on 127.0.0.1 unless ``--host`` says otherwise:

1. ``prefect server start`` (SQLite under ``<data-dir>/.prefect``), API and UI
   on ``--port`` (4200);
2. ``mlflow ui`` on the data dir's store (``sqlite:///<data-dir>/mlflow.db``),
   on ``--mlflow-port`` (5000);
3. ``python -m deployments.deploy serve``: registers ``weatheraus-nightly``
   (02:00 Australia/Sydney) and ``latentflow-on-demand`` and runs their flow
   runs as subprocesses, writing under the same data dir.

With ``--database-url postgresql://USER@HOST:PORT/DB`` both the Prefect
server and MLflow (the UI and every run's tracking and registry) use that
PostgreSQL database instead of SQLite; ``--prefect-database-url`` and
``--mlflow-database-url`` give each its own (better: the ``LATENTFLOW_*``
variables of the same names, which ``ps`` does not show). Prefect gets the
URL as ``postgresql+asyncpg://``, MLflow as ``postgresql://`` (psycopg2).
Artifacts stay under the data dir either way.

It prints the URLs and waits. Ctrl-C or SIGTERM stops the three (runner first,
then MLflow, then the server; SIGKILL after a grace period), each started in
its own process group so that their own children go too. If one of them dies
the others are stopped and the exit status is 1.

Every child gets the same settings: ``PREFECT_API_URL`` and
``PREFECT_UI_API_URL`` both point at this server (the UI would otherwise call
port 4200 whatever ``--port`` is), telemetry is off.

With ``--auth-string user:pass`` (better: ``LATENTFLOW_SERVER_AUTH``, which
``ps`` does not show) the Prefect server wants HTTP basic auth on its API
(``PREFECT_SERVER_API_AUTH_STRING``) and the runner, its flow runs and this
supervisor send it (``PREFECT_API_AUTH_STRING``). A host other than loopback is
refused without it: whoever reaches the API can start runs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
STOP_GRACE_SECONDS = 20.0
# Same as deployments.definitions.NIGHTLY / ON_DEMAND (a test keeps them equal);
# not imported from there, which would load torch and MLflow into the supervisor.
DEPLOYMENT_NAMES = (
    "weatheraus-nightly",
    "latentflow-on-demand",
    "latentflow-backfill",
    "latentflow-synthesize",
)
# One database for both (--database-url): a schema each.
PREFECT_SCHEMA = "prefect"
MLFLOW_SCHEMA = "mlflow"
PREFECT_SEARCH_PATH_ENV = "PREFECT_SERVER_DATABASE_SQLALCHEMY_CONNECT_ARGS_SEARCH_PATH"


@dataclass
class Child:
    """One supervised process and how to tell it is ready."""

    name: str
    argv: list[str]
    health_url: str | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], cwd: Path, log_dir: Path) -> None:
        log_dir.mkdir(parents=True, exist_ok=True)
        log = open(log_dir / f"{self.name}.log", "ab")  # noqa: SIM115 - owned by Popen
        # Own process group: Ctrl-C in the terminal reaches only us, and we stop
        # children in order; killing the group also ends their own children.
        self.proc = subprocess.Popen(
            self.argv,
            env=env,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> str:
        """SIGTERM the process group, SIGKILL it after ``grace``; says which."""
        if self.proc is None or self.proc.poll() is not None:
            return "had exited"
        how = "SIGTERM"
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            how = "SIGKILL after SIGTERM timed out"
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        # Leftovers of the group (e.g. a flow run that ignored SIGTERM).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        return how


@dataclass(frozen=True)
class Databases:
    """Where the Prefect server and MLflow keep their state; None: SQLite in the
    data dir. URLs in the form each library wants (:func:`databases`)."""

    prefect: str | None = None
    mlflow: str | None = None
    #: Prefect's schema when both share one database (their alembic tables
    #: would collide in one schema); MLflow's is in its URL.
    prefect_search_path: str | None = None
    #: (sync URL, schemas) to create before the servers start.
    schemas: tuple[str, tuple[str, ...]] | None = None


def databases(both: str | None, prefect: str | None, mlflow: str | None) -> Databases:
    """The two URLs from the options; ValueError (one line) for one that is
    not PostgreSQL. A URL of its own wins over ``both``."""
    from tasks.pg import (
        is_postgres,
        mlflow_url,
        prefect_url,
        same_database,
        with_search_path,
    )

    chosen = {"prefect": prefect or both, "mlflow": mlflow or both}
    for name, url in chosen.items():
        if url and not is_postgres(url):
            raise ValueError(
                f"the {name} database URL must be postgresql://USER@HOST:PORT/DB"
                f" (SQLite in the data dir is the default without one)"
            )
    if prefect and mlflow and same_database(prefect, mlflow):
        raise ValueError(
            "--prefect-database-url and --mlflow-database-url name one database:"
            " give it as --database-url (each gets its own schema there)"
        )
    if both and not prefect and not mlflow:
        # One database for both: a schema each, or their alembic_version
        # tables (and so their migrations) collide.
        sync = mlflow_url(both)
        return Databases(
            prefect=prefect_url(both),
            mlflow=with_search_path(sync, MLFLOW_SCHEMA),
            prefect_search_path=f"{PREFECT_SCHEMA}, public",
            schemas=(sync, (PREFECT_SCHEMA, MLFLOW_SCHEMA)),
        )
    return Databases(
        prefect=prefect_url(chosen["prefect"]) if chosen["prefect"] else None,
        mlflow=mlflow_url(chosen["mlflow"]) if chosen["mlflow"] else None,
    )


def check_databases(dbs: Databases) -> None:
    """Each PostgreSQL server answers (one line naming it, in seconds, if not)."""
    from tasks.pg import ensure_schemas, probe

    if dbs.schemas:
        url, schemas = dbs.schemas
        ensure_schemas(url, schemas, "PostgreSQL database")
    if dbs.prefect:
        # Probed through a sync driver: same server, database and credentials.
        from tasks.pg import mlflow_url

        probe(mlflow_url(dbs.prefect), "Prefect database")
    if dbs.mlflow:
        probe(dbs.mlflow, "MLflow store")


def service_env(
    *,
    host: str,
    port: int,
    data_dir: Path,
    base: dict[str, str] | None = None,
    auth: str | None = None,
    dbs: Databases | None = None,
) -> dict[str, str]:
    """The environment shared by the server, the runner, flow runs and MLflow."""
    dbs = dbs or Databases()
    env = dict(os.environ if base is None else base)
    # Never inherited by accident: auth is on exactly when this serve says so.
    for name in ("PREFECT_SERVER_API_AUTH_STRING", "PREFECT_API_AUTH_STRING"):
        env.pop(name, None)
    env.pop("LATENTFLOW_SERVER_AUTH", None)
    if auth:
        env["PREFECT_SERVER_API_AUTH_STRING"] = auth
        env["PREFECT_API_AUTH_STRING"] = auth
        # A Prefect Cloud key would take precedence and fail with 401 here.
        env.pop("PREFECT_API_KEY", None)
    api = f"http://{_url_host(host)}:{port}/api"
    env.update(
        {
            "PREFECT_HOME": str(data_dir / ".prefect"),
            "PREFECT_API_URL": api,
            "PREFECT_UI_API_URL": api,
            "PREFECT_UI_URL": api.removesuffix("/api"),
            "PREFECT_SERVER_API_HOST": host,
            "PREFECT_SERVER_API_PORT": str(port),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "1",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
            "GIT_PYTHON_REFRESH": "quiet",
            "LATENTFLOW_DATA_DIR": str(data_dir),
            "PYTHONUNBUFFERED": "1",
        }
    )

    # A user's MLflow server would split the runs' store from the UI shown here.
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MLFLOW_BACKEND_STORE_URI", None)
    if dbs.mlflow:
        # Runs track and register there (artifacts stay in the data dir); the
        # MLflow UI reads it from MLFLOW_BACKEND_STORE_URI, not from argv (ps).
        env["MLFLOW_TRACKING_URI"] = dbs.mlflow
        env["MLFLOW_BACKEND_STORE_URI"] = dbs.mlflow
    if dbs.prefect:
        # Read by the server only: the runner and flow runs call its API.
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = dbs.prefect
    if dbs.prefect_search_path:
        env[PREFECT_SEARCH_PATH_ENV] = dbs.prefect_search_path
    return env


def _url_host(host: str) -> str:
    # 0.0.0.0 is a bind address, not one a browser can call.
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost: nobody else can connect."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_header(auth: str | None) -> dict[str, str]:
    """The basic-auth header the server wants, or none."""
    if not auth:
        return {}
    return {"authorization": "Basic " + base64.b64encode(auth.encode()).decode()}


def port_free(host: str, port: int) -> bool:
    """True when nothing listens on ``host:port`` (so we can bind it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        # As the servers do: connections of a previous run in TIME_WAIT do not
        # make the port busy, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def wait_http_ok(url: str, timeout: float, child: Child | None = None) -> None:
    """Poll ``url`` until it answers 200; fail early if ``child`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child is not None and not child.alive():
            raise RuntimeError(f"{child.name} exited while starting")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def wait_deployments_applied(
    api_url: str,
    since: datetime,
    timeout: float,
    child: Child,
    auth: str | None = None,
) -> None:
    """Wait until the runner has (re-)registered every deployment after ``since``.

    Ready means a run started from the UI now will be picked up, with this
    serve's parameters, not those a previous serve left in the database.
    """
    body = json.dumps({"deployments": {"name": {"any_": list(DEPLOYMENT_NAMES)}}})
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not child.alive():
            raise RuntimeError(f"{child.name} exited while registering")
        req = urllib.request.Request(
            f"{api_url}/deployments/filter",
            data=body.encode(),
            headers={"content-type": "application/json", **auth_header(auth)},
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                found = json.load(resp)
        except (urllib.error.URLError, OSError, ValueError):
            found = []
        fresh = {
            d["name"]
            for d in found
            if datetime.fromisoformat(d["updated"].replace("Z", "+00:00")) >= since
        }
        if fresh >= set(DEPLOYMENT_NAMES):
            return
        time.sleep(1.0)
    raise TimeoutError(f"deployments not registered within {timeout:.0f}s")


def children(
    *,
    host: str,
    port: int,
    mlflow_port: int | None,
    data_dir: Path,
    mlflow_db: bool = False,
) -> list[Child]:
    """The processes to start, in start order."""
    url = f"http://{_url_host(host)}:{port}"
    procs = [
        Child(
            "prefect-server",
            [
                str(BIN / "prefect"),
                "server",
                "start",
                "--host",
                host,
                "--port",
                str(port),
            ],
            health_url=f"{url}/api/health",
        )
    ]
    if mlflow_port is not None:
        # The MLflow UI has no auth of its own: it stays on loopback whatever
        # --host says (reach it through an SSH tunnel or a proxy with auth).
        ml_host = host if is_loopback(host) else "127.0.0.1"
        procs.append(
            Child(
                "mlflow-ui",
                [
                    str(BIN / "mlflow"),
                    "ui",
                    # With a database: MLFLOW_BACKEND_STORE_URI (service_env).
                    *(
                        []
                        if mlflow_db
                        else [
                            "--backend-store-uri",
                            f"sqlite:///{(data_dir / 'mlflow.db').as_posix()}",
                        ]
                    ),
                    "--host",
                    ml_host,
                    "--port",
                    str(mlflow_port),
                ],
                health_url=f"http://{_url_host(ml_host)}:{mlflow_port}/health",
            )
        )
    procs.append(
        Child("deployments", [sys.executable, "-m", "deployments.deploy", "serve"])
    )
    return procs


class _Stop(Exception):
    """Raised from the signal handler to leave the wait loop."""


def run(
    *,
    host: str = "127.0.0.1",
    port: int = 4200,
    mlflow_port: int | None = 5000,
    data_dir: Path,
    start_timeout: float = 180.0,
    auth: str | None = None,
    dbs: Databases | None = None,
) -> int:
    """Start everything, print the URLs, wait for a signal; returns the exit code."""
    dbs = dbs or Databases()
    if not auth and not is_loopback(host):
        print(
            f"serve: --host {host} lets others reach an API that starts runs;"
            " turn on auth with --auth-string or LATENTFLOW_SERVER_AUTH",
            file=sys.stderr,
        )
        return 2
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    log_dir = data_dir / ".serve-logs"
    busy = [p for p in (port, mlflow_port) if p is not None and not port_free(host, p)]
    if busy:
        print(
            f"serve: port(s) {', '.join(map(str, busy))} on {host} are in use;"
            " pick others with --port / --mlflow-port",
            file=sys.stderr,
        )
        return 2
    from tasks.errors import LatentflowError

    try:
        check_databases(dbs)
    except LatentflowError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    env = service_env(host=host, port=port, data_dir=data_dir, auth=auth, dbs=dbs)
    procs = children(
        host=host,
        port=port,
        mlflow_port=mlflow_port,
        data_dir=data_dir,
        mlflow_db=dbs.mlflow is not None,
    )

    def on_signal(signum: int, _frame: object) -> None:
        raise _Stop(signal.Signals(signum).name)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 0
    try:
        for child in procs:
            print(f"serve: starting {child.name} …", file=sys.stderr, flush=True)
            started = datetime.now(UTC) - timedelta(seconds=1)
            # In the data dir: a relative path in a run's config (flow runs inherit
            # the runner's directory) or MLflow's default artifact root lands
            # there, not in the checkout.
            child.start(env, data_dir, log_dir)
            if child.health_url:
                # MLflow creates its SQLite store before runs may write to it.
                wait_http_ok(child.health_url, start_timeout, child)
        runner = procs[-1]  # started last, once the server answers
        wait_deployments_applied(
            env["PREFECT_API_URL"], started, start_timeout, runner, auth
        )
        ui = f"http://{_url_host(host)}:{port}"
        print(f"Prefect UI:  {ui}", flush=True)
        print(f"Prefect API: {ui}/api", flush=True)
        if mlflow_port is not None:
            ml = host if is_loopback(host) else "127.0.0.1"
            print(f"MLflow UI:   http://{_url_host(ml)}:{mlflow_port}", flush=True)
        print(f"API auth:    {'basic' if auth else 'off'}", flush=True)
        print(f"Prefect DB:  {_shown(dbs.prefect, data_dir / '.prefect')}", flush=True)
        print(f"MLflow DB:   {_shown(dbs.mlflow, data_dir / 'mlflow.db')}", flush=True)
        print(f"data dir:    {data_dir}", flush=True)
        print(f"logs:        {log_dir}", flush=True)
        print("Ctrl-C stops everything.", flush=True)
        while True:
            dead = [c for c in procs if c.proc is not None and not c.alive()]
            if dead:
                names = ", ".join(f"{c.name} (exit {c.proc.returncode})" for c in dead)
                print(f"serve: {names} stopped; see {log_dir}", file=sys.stderr)
                code = 1
                break
            time.sleep(1.0)
    except _Stop as stop:
        print(f"serve: {stop}, stopping …", file=sys.stderr, flush=True)
    except (RuntimeError, TimeoutError) as exc:
        print(f"serve: {exc}; see {log_dir}", file=sys.stderr)
        code = 1
    finally:
        # A second Ctrl-C while stopping must not leave orphans behind.
        for s in previous:
            signal.signal(s, signal.SIG_IGN)
        for child in reversed(procs):
            if child.proc is None:
                continue
            t0 = time.monotonic()
            how = child.stop()
            print(
                f"serve: {child.name} stopped ({how}, {time.monotonic() - t0:.1f}s)",
                file=sys.stderr,
                flush=True,
            )
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code


def _shown(url: str | None, sqlite: Path) -> str:
    from tasks.pg import masked

    return masked(url) if url else f"SQLite under {sqlite}"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m deployments.serve",
        description="Local Prefect server + latentflow deployments + MLflow UI.",
    )
    p.add_argument(
        "--host", default=os.environ.get("LATENTFLOW_SERVE_HOST", "127.0.0.1")
    )
    p.add_argument(
        "--port", type=int, default=int(os.environ.get("LATENTFLOW_SERVE_PORT", 4200))
    )
    p.add_argument(
        "--mlflow-port",
        type=int,
        default=int(os.environ.get("LATENTFLOW_MLFLOW_PORT", 5000)),
    )
    p.add_argument(
        "--no-mlflow", action="store_true", help="do not start the MLflow UI"
    )
    p.add_argument(
        "--data-dir",
        default=os.environ.get("LATENTFLOW_DATA_DIR", str(REPO / ".serve")),
        help="outputs, MLflow store and Prefect database (default ./.serve)",
    )
    p.add_argument(
        "--auth-string",
        default=os.environ.get("LATENTFLOW_SERVER_AUTH") or None,
        metavar="USER:PASS",
        help="require HTTP basic auth on the Prefect API (default:"
        " $LATENTFLOW_SERVER_AUTH, which ps does not show)",
    )
    for flag, env, what in (
        ("--database-url", "LATENTFLOW_DATABASE_URL", "both Prefect and MLflow"),
        ("--prefect-database-url", "LATENTFLOW_PREFECT_DATABASE_URL", "Prefect"),
        ("--mlflow-database-url", "LATENTFLOW_MLFLOW_DATABASE_URL", "MLflow"),
    ):
        p.add_argument(
            flag,
            default=os.environ.get(env) or None,
            metavar="postgresql://USER@HOST:PORT/DB",
            help=f"PostgreSQL for {what} (default: ${env}, which ps does not"
            " show; none: SQLite in the data dir)",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        dbs = databases(
            args.database_url, args.prefect_database_url, args.mlflow_database_url
        )
    except ValueError as exc:
        print(f"serve: {exc}", file=sys.stderr)
        return 2
    return run(
        dbs=dbs,
        host=args.host,
        port=args.port,
        mlflow_port=None if args.no_mlflow else args.mlflow_port,
        data_dir=Path(args.data_dir),
        auth=args.auth_string,
    )


if __name__ == "__main__":
    sys.exit(main())
