"""Deployments as code, served for real: ``make serve`` against a real server.

One stack per module (the slow part is starting it): ``python -m
deployments.serve`` — what ``make serve`` runs — starts ``prefect server
start`` on a free 127.0.0.1 port with a temporary PREFECT_HOME, the MLflow UI,
and the served deployments. The tests then talk to it only through the API, as
a user would, and the last one stops it with SIGTERM and checks nothing is left.

``tests/test_browser.py`` reuses :class:`ServeStack` for its own stack.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
FLOW = "latentflow-nightly"
START_TIMEOUT = 240.0
RUN_TIMEOUT = 300.0


def free_port() -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Statuses Prefect's own client retries (a busy server's database answers 503
#: for a moment on a loaded 2-core runner); the tests' HTTP calls do the same.
_RETRIED_STATUSES = (429, 502, 503)


def _answer(req: urllib.request.Request, attempts: int = 5) -> Any:
    """The decoded JSON answer to ``req``, retried with backoff on a
    temporarily unavailable server, as Prefect's client does."""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.load(resp)
        except urllib.error.HTTPError as exc:
            if exc.code not in _RETRIED_STATUSES or attempt == attempts - 1:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


class ServeStack:
    """``python -m deployments.serve`` in a subprocess, and how to reach it."""

    def __init__(
        self,
        root: Path,
        *,
        mlflow: bool = True,
        auth: str | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        from tasks.synthetic import write_weatheraus_like_csv

        self.root = root
        self.data_dir = root / "data"
        self.port = free_port()
        self.mlflow_port = free_port() if mlflow else None
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_url = f"{self.url}/api"
        # The server's basic-auth string (``--auth-string``); None: no auth.
        self.auth = auth
        self.args = list(args)  # more options for deployments.serve
        # Tiny, deterministic input; also the nightly default, so a 02:00 Sydney
        # run that happens to fire during the tests costs nothing.
        self.csv = write_weatheraus_like_csv(root / "input" / "weatherAUS.csv", 2000)
        self.stdout = root / "serve.stdout"
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[Any] = []  # psutil.Process of every descendant

    def start(self) -> ServeStack:
        env = {
            **os.environ,
            "LATENTFLOW_WEATHERAUS_CSV": str(self.csv),
            "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
        }
        env.pop("PREFECT_API_URL", None)
        env.pop("LATENTFLOW_SERVER_AUTH", None)
        argv = [
            sys.executable,
            "-m",
            "deployments.serve",
            "--port",
            str(self.port),
            "--data-dir",
            str(self.data_dir),
        ]
        argv += (
            ["--mlflow-port", str(self.mlflow_port)]
            if self.mlflow_port
            else ["--no-mlflow"]
        )
        argv += self.args
        if self.auth is not None:
            env["LATENTFLOW_SERVER_AUTH"] = self.auth  # not on the command line
        with open(self.stdout, "wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=REPO,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import psutil

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"serve exited early:\n{self.logs()}")
            if (
                "Ctrl-C stops everything" in self.stdout.read_text(errors="replace")
                and self.deployment_ids_ready()
            ):
                self.children = psutil.Process(self.proc.pid).children(recursive=True)
                return
            time.sleep(1.0)
        raise TimeoutError(f"serve not ready in {START_TIMEOUT:.0f}s:\n{self.logs()}")

    def deployment_ids_ready(self) -> bool:
        """Both deployments registered (by the runner, after the server is up)."""
        try:
            found = self.post(
                "/deployments/filter", {"deployments": {"name": {"any_": _names()}}}
            )
        except OSError:
            return False
        return len(found) == 2

    def headers(self, auth: str | None = None) -> dict[str, str]:
        """JSON headers, with basic auth when the stack (or ``auth``) has it."""
        headers = {"content-type": "application/json"}
        token = self.auth if auth is None else auth
        if token:
            encoded = base64.b64encode(token.encode()).decode()
            headers["authorization"] = f"Basic {encoded}"
        return headers

    def get(self, path: str) -> Any:
        """GET from the API; the decoded answer."""
        req = urllib.request.Request(f"{self.api_url}{path}", headers=self.headers())
        return _answer(req)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        """POST JSON to the API; the decoded answer."""
        req = urllib.request.Request(
            f"{self.api_url}{path}",
            data=json.dumps(body).encode(),
            headers=self.headers(),
        )
        return _answer(req)

    @contextlib.contextmanager
    def settings(self) -> Iterator[None]:
        """Point this process's Prefect client at the stack."""
        from prefect.settings import (
            PREFECT_API_AUTH_STRING,
            PREFECT_API_URL,
            temporary_settings,
        )

        updates: dict[Any, Any] = {PREFECT_API_URL: self.api_url}
        if self.auth:
            updates[PREFECT_API_AUTH_STRING] = self.auth
        with temporary_settings(updates=updates):
            yield

    def client(self) -> Any:
        from prefect.client.orchestration import SyncPrefectClient

        return SyncPrefectClient(api=self.api_url, auth_string=self.auth)

    def logs(self) -> str:
        parts = [f"--- serve stdout\n{_tail(self.stdout)}"]
        for log in sorted((self.data_dir / ".serve-logs").glob("*.log")):
            parts.append(f"--- {log.name}\n{_tail(log)}")
        return "\n".join(parts)

    def stop(self, timeout: float = 90.0) -> tuple[int | None, list[int]]:
        """SIGTERM the supervisor, as Ctrl-C would.

        Returns its exit code and the pids still running afterwards (which are
        then killed: a failing test must not leave servers behind).
        """
        import psutil

        if self.proc is None:
            return None, []
        code = self.proc.poll()
        if code is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                code = None
        left = []
        for proc in self.children:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    left.append(proc.pid)
                    proc.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        return code, left


def _names() -> list[str]:
    from deployments.definitions import NIGHTLY, ON_DEMAND

    return [NIGHTLY, ON_DEMAND]


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "(missing)"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeStack]:
    s = ServeStack(tmp_path_factory.mktemp("serve")).start()
    try:
        yield s
    finally:
        s.stop()


# -- definitions (no server) --------------------------------------------------


def test_deployment_definitions(monkeypatch, tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from deployments import definitions as d

    monkeypatch.setenv("LATENTFLOW_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("LATENTFLOW_WEATHERAUS_CSV", raising=False)
    monkeypatch.delenv("LATENTFLOW_WEATHERAUS_DROPS", raising=False)
    monkeypatch.delenv("LATENTFLOW_ON_DEMAND_INPUT", raising=False)
    nightly, on_demand, backfill, synth = d.build_deployments()
    assert (nightly.name, on_demand.name) == (d.NIGHTLY, d.ON_DEMAND)
    assert (synth.name, synth.flow_name) == (d.SYNTHESIZE, "latentflow-synthesize")
    assert synth.parameters["params"]["data_dir"] == str(tmp_path / "data")
    assert nightly.entrypoint == on_demand.entrypoint == d.ENTRYPOINT
    assert nightly.flow_name == on_demand.flow_name == FLOW
    assert (backfill.name, backfill.flow_name) == (d.BACKFILL, "latentflow-backfill")
    assert {"start", "end", "config"} <= set(
        backfill._parameter_openapi_schema.properties
    )
    cfg = nightly.parameters["config"]["data"]
    # Each night reads its own drop (a template), dated in Sydney.
    assert cfg["input"] == f"{tmp_path / 'data'}/input/weatheraus/{{run_date}}.csv"
    assert cfg["timezone"] == "Australia/Sydney"
    assert cfg["data_dir"] == str(tmp_path / "data")
    monkeypatch.setenv("LATENTFLOW_WEATHERAUS_CSV", "weather.csv")
    (plain, *_) = d.build_deployments()
    assert plain.parameters["config"]["data"]["input"] == str(
        Path("weather.csv").resolve()
    )  # absolute
    assert on_demand.parameters == {
        "config": {"data": {"data_dir": str(tmp_path / "data")}}
    }
    for dep in (nightly, on_demand, backfill):
        assert dep.enforce_parameter_schema is True
        assert dep.concurrency_limit == 1
        assert dep.concurrency_options.collision_strategy == (
            ConcurrencyLimitStrategy.ENQUEUE
        )
        assert "config" in dep._parameter_openapi_schema.properties
    (sched,) = nightly.schedules
    assert sched.schedule.cron == "0 2 * * *"
    assert sched.schedule.timezone == "Australia/Sydney"
    assert on_demand.schedules == []
    # What a run's process imports (prefect.engine loads the entrypoint) is the
    # flow with the deployment's timeout, not the bare flows.nightly:nightly.
    from prefect.flows import load_flow_from_entrypoint

    loaded = load_flow_from_entrypoint(d.ENTRYPOINT)
    assert loaded is d.nightly_deployed
    assert loaded.timeout_seconds == d.DEFAULT_TIMEOUT_SECONDS
    assert loaded.name == FLOW
    # make serve waits for exactly these names without importing definitions.
    from deployments.serve import DEPLOYMENT_NAMES

    assert set(DEPLOYMENT_NAMES) == {d.NIGHTLY, d.ON_DEMAND, d.BACKFILL, d.SYNTHESIZE}

    pooled = d.build_deployments(
        work_pool_name="latentflow-gpu", job_variables={"image": "img:1"}
    )
    assert all(p.work_pool_name == "latentflow-gpu" for p in pooled)
    assert all(p.job_variables == {"image": "img:1"} for p in pooled)


def test_form_groups_the_config_and_still_takes_flat_parameters(monkeypatch, tmp_path):
    """The UI form draws the config in groups (data, model, policy, execution;
    common fields first); the server's own parameter check (the one run before
    a deployment run is created) takes the sectioned defaults, flat fields from
    API callers, and refuses a bad flat value by its flat name."""
    from prefect.utilities.schema_tools import ValidationError, validate

    from deployments import definitions as d

    monkeypatch.setenv("LATENTFLOW_DATA_DIR", str(tmp_path / "data"))
    nightly, on_demand, *_ = d.build_deployments()
    schema = nightly._parameter_openapi_schema.model_dump()
    defs = schema["definitions"]
    config = defs["PipelineConfig"]
    assert list(config["properties"]) == ["data", "model", "policy", "execution"]
    firsts = {}
    for name, prop in config["properties"].items():
        section = defs[prop["$ref"].rsplit("/", 1)[-1]]
        assert prop["title"] == name.capitalize()
        firsts[name] = list(section["properties"])[:3]
    assert firsts["data"] == ["input", "data_dir", "dataset"]
    assert firsts["model"] == ["kind", "latent_dim", "epochs"]
    assert firsts["policy"][0] == "retrain"
    assert firsts["execution"][0] == "runner"

    def check(params: dict[str, Any]) -> None:
        validate(params, schema, raise_on_error=True, ignore_required=False)

    check(nightly.parameters)
    check({"config": {"data": {"input": "a.csv"}, "model": {"latent_dim": 3}}})
    check({"config": {"input": "a.csv", "latent_dim": 3, "runner": "threads"}})
    for bad, field in (
        ({"input": "a.csv", "latent_dim": 0}, "config.latent_dim"),
        ({"input": "a.csv", "latnet_dim": 3}, "config"),
        ({"epochs": 1}, "config"),  # no input, flat or in a data section
        # The on-demand defaults alone: the person starting a run adds input.
        (on_demand.parameters["config"], "config.data"),
    ):
        with pytest.raises(ValidationError, match=field):
            check({"config": bad})


def test_timeout_from_env(monkeypatch):
    from deployments.definitions import flow_timeout_seconds

    monkeypatch.setenv("LATENTFLOW_FLOW_TIMEOUT_SECONDS", "90")
    assert flow_timeout_seconds() == 90
    monkeypatch.setenv("LATENTFLOW_FLOW_TIMEOUT_SECONDS", "soon")
    with pytest.raises(ValueError, match="LATENTFLOW_FLOW_TIMEOUT_SECONDS"):
        flow_timeout_seconds()


def test_service_env_is_local_and_consistent(tmp_path):
    from deployments.serve import service_env

    env = service_env(
        host="127.0.0.1",
        port=4321,
        data_dir=tmp_path,
        base={"MLFLOW_TRACKING_URI": "http://elsewhere"},
    )
    assert env["PREFECT_API_URL"] == env["PREFECT_UI_API_URL"]
    assert env["PREFECT_API_URL"] == "http://127.0.0.1:4321/api"
    assert env["PREFECT_SERVER_API_HOST"] == "127.0.0.1"
    assert env["PREFECT_HOME"] == str(tmp_path / ".prefect")
    assert env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert env["DO_NOT_TRACK"] == "1"
    assert env["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_TRACKING_URI" not in env  # runs and the UI share one store
    # A wildcard bind is never handed to a browser or a client as an address.
    wild = service_env(host="0.0.0.0", port=1, data_dir=tmp_path, base={})
    assert wild["PREFECT_UI_API_URL"] == "http://127.0.0.1:1/api"


def test_gpu_template_requests_an_nvidia_gpu():
    from deployments.deploy import gpu_pool_template

    tpl = gpu_pool_template()
    pod = tpl["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert tpl["variables"]["properties"]["gpu_count"]["default"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
        pod["tolerations"]
    )
    assert "image" in tpl["variables"]["required"]


# -- against the served stack ---------------------------------------------------


@pytest.mark.slow
def test_nightly_deployment_registered_with_schedule(stack):
    from deployments.definitions import ENTRYPOINT, NIGHTLY

    with stack.client() as client:
        dep = client.read_deployment_by_name(f"{FLOW}/{NIGHTLY}")
    (sched,) = dep.schedules
    assert sched.schedule.cron == "0 2 * * *"
    assert sched.schedule.timezone == "Australia/Sydney"
    assert sched.active and not dep.paused
    assert dep.enforce_parameter_schema is True
    assert dep.global_concurrency_limit is not None
    assert dep.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert dep.entrypoint == ENTRYPOINT
    assert dep.work_pool_name is None  # served: the runner executes it
    assert dep.parameters["config"]["data"]["input"] == str(stack.csv)
    assert dep.parameters["config"]["data"]["data_dir"] == str(stack.data_dir)


@pytest.mark.slow
def test_on_demand_runs_changed_parameters_one_at_a_time(stack):
    import pyarrow.parquet as pq
    from prefect.deployments import run_deployment

    from deployments.definitions import ON_DEMAND

    # Inside the served data roots: runs from a deployment may write only there.
    out = stack.data_dir / "on-demand"
    params = {
        "config": {
            "input": str(stack.csv),
            "data_dir": str(out),
            "latent_dim": 3,
            "epochs": 2,
        }
    }
    # A second run, submitted while the first is queued or running, must wait
    # for it (limit 1, ENQUEUE); it is made to fail fast (missing input) so it
    # costs little, which also shows a user error ending a served run.
    missing = stack.data_dir / "input" / "missing.csv"
    queued_params = {"config": {"input": str(missing)}}
    # Group-readable only: the outputs must not be readable by others either.
    stack.csv.chmod(0o640)
    t0 = time.monotonic()
    with stack.settings():
        first = run_deployment(f"{FLOW}/{ON_DEMAND}", parameters=params, timeout=0)
        second = run_deployment(
            f"{FLOW}/{ON_DEMAND}", parameters=queued_params, timeout=0
        )
    with stack.client() as client:
        deadline = time.monotonic() + RUN_TIMEOUT
        while time.monotonic() < deadline:
            run, later = client.read_flow_run(first.id), client.read_flow_run(second.id)
            if run.state.is_final() and later.state.is_final():
                break
            time.sleep(1.0)
    print(f"on-demand run {run.name}: {run.state_type} in {time.monotonic() - t0:.1f}s")
    assert run.state is not None and run.state.is_completed(), (
        f"{run.state}\n{stack.logs()}"
    )
    assert run.parameters["config"]["latent_dim"] == 3

    assert later.state.is_failed(), later.state
    assert "missing.csv" in (later.state.message or ""), later.state.message
    # Whichever the runner took first, the other started after it ended.
    one, two = sorted([run, later], key=lambda r: r.start_time)
    assert two.start_time >= one.end_time, "the runs overlapped"
    states = stack.get(f"/flow_run_states/?flow_run_id={two.id}")
    assert "AwaitingConcurrencySlot" in {st["name"] for st in states}

    files = sorted((out / "latent" / "weatheraus").glob("run_date=*/*.parquet"))
    assert files, f"no latent parquet under {out}"
    schema = pq.read_schema(files[0])
    assert {"latent_0", "latent_1", "latent_2", "recon_error", "is_anomaly"} <= set(
        schema.names
    )
    assert "latent_3" not in schema.names
    assert sum(pq.read_metadata(f).num_rows for f in files) == 2000
    # Never wider than the input (0640): files <= 0640, new directories <= 0750.
    for area in ("ingested", "latent"):
        for p in (out / area / "weatheraus").rglob("*"):
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode & ~(0o640 if p.is_file() else 0o750) == 0, f"{p}: {oct(mode)}"

    # Raw API call: SyncPrefectClient.read_artifacts in Prefect 3.8.8 sends
    # nulls the server refuses (422) unless every filter is given.
    artifacts = stack.post(
        "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [str(run.id)]}}}
    )
    by_key = {a["key"]: a for a in artifacts if a.get("key")}
    summary = by_key["weatheraus-summary"]
    assert summary["type"] == "markdown"
    assert "latentflow: weatheraus" in str(summary["data"])
    top = by_key["weatheraus-top-anomalies"]
    assert top["type"] == "table"
    rows = json.loads(top["data"]) if isinstance(top["data"], str) else top["data"]
    assert rows and "recon_error" in rows[0]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"latent_dim": 0}, "config.latent_dim"),
        ({"kind": "gan"}, "config.kind"),
        ({"input": None}, "config"),  # input is required and has no default
    ],
)
def test_invalid_parameters_refused_before_any_run(stack, change, field):
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError

    from deployments.definitions import ON_DEMAND

    config: dict[str, Any] = {"input": str(stack.csv), "epochs": 1, **change}
    config = {k: v for k, v in config.items() if v is not None}
    # Raw filters: the sync client sends limit/sort nulls this server refuses.
    on_demand = {"deployments": {"name": {"any_": [ON_DEMAND]}}, "limit": 200}
    runs_before = {r["id"] for r in stack.post("/flow_runs/filter", on_demand)}
    tasks_before = {r["id"] for r in stack.post("/task_runs/filter", on_demand)}
    with stack.settings(), pytest.raises(PrefectHTTPStatusError) as err:
        run_deployment(f"{FLOW}/{ON_DEMAND}", parameters={"config": config}, timeout=0)
    assert err.value.response.status_code == 409
    assert field in err.value.response.text
    # No run was created, so no task ever ran.
    assert {r["id"] for r in stack.post("/flow_runs/filter", on_demand)} == runs_before
    assert {r["id"] for r in stack.post("/task_runs/filter", on_demand)} == tasks_before


@pytest.mark.slow
def test_work_pools_created_from_templates(stack):
    from deployments.deploy import GPU_POOL, PROCESS_POOL, ensure_pools

    with stack.settings():
        assert ensure_pools() == {PROCESS_POOL: "process", GPU_POOL: "kubernetes"}
        ensure_pools()  # idempotent: updates the templates in place
    with stack.client() as client:
        cpu = client.read_work_pool(PROCESS_POOL)
        gpu = client.read_work_pool(GPU_POOL)
    assert cpu.type == "process"
    assert gpu.type == "kubernetes"
    container = gpu.base_job_template["job_configuration"]["job_manifest"]["spec"][
        "template"
    ]["spec"]["containers"][0]
    assert "nvidia.com/gpu" in container["resources"]["limits"]


SCHEDULE_TIMEOUT = 90.0


@pytest.mark.slow
def test_scheduler_creates_upcoming_nightly_runs(stack):
    """The server's scheduler turns the cron into scheduled runs, without errors.

    Registering a schedule proves nothing if the scheduler service cannot insert
    the runs (SQLAlchemy 2.1 with Prefect 3.8 logged a bulk-DML error every
    minute and the Upcoming tab stayed empty). Runs with ``zz`` tests last but one,
    so the log check covers everything this module did to the server.
    """
    from zoneinfo import ZoneInfo

    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort

    from deployments.definitions import NIGHTLY

    scheduled = FlowRunFilter(
        state=FlowRunFilterState(
            type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
        )
    )
    nightly = DeploymentFilter(name=DeploymentFilterName(any_=[NIGHTLY]))
    runs: list[Any] = []
    deadline = time.monotonic() + SCHEDULE_TIMEOUT
    with stack.client() as client:
        while time.monotonic() < deadline and not runs:
            runs = client.read_flow_runs(
                flow_run_filter=scheduled,
                deployment_filter=nightly,
                # The sync client sends sort=null otherwise, which the server refuses.
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=10,
            )
            if not runs:
                time.sleep(2.0)
    assert runs, (
        f"no scheduled nightly runs after {SCHEDULE_TIMEOUT:.0f}s\n{stack.logs()}"
    )
    sydney = ZoneInfo("Australia/Sydney")
    for run in runs:
        local = run.expected_start_time.astimezone(sydney)
        assert (local.hour, local.minute) == (2, 0), local
        assert run.expected_start_time.timestamp() > time.time() - 60
    server_log = _tail(stack.data_dir / ".serve-logs" / "prefect-server.log", 200_000)
    bad = [ln for ln in server_log.splitlines() if "Traceback" in ln or "Error" in ln]
    assert not bad, "prefect server logged errors:\n" + "\n".join(bad[:20])


@pytest.mark.slow
def test_zz_services_local_and_stop_cleanly(stack):
    """Last in the module: everything listens on 127.0.0.1; SIGTERM ends it all."""
    import psutil

    for url in (
        f"{stack.url}/api/health",
        f"http://127.0.0.1:{stack.mlflow_port}/health",
    ):
        with urllib.request.urlopen(url, timeout=10) as resp:
            assert resp.status == 200, url
    listening = []
    for proc in stack.children:
        with contextlib.suppress(psutil.NoSuchProcess):
            for conn in proc.net_connections(kind="inet"):
                if conn.status == psutil.CONN_LISTEN:
                    listening.append((proc.pid, conn.laddr.ip, conn.laddr.port))
    ports = {port for _, _, port in listening}
    assert {stack.port, stack.mlflow_port} <= ports, listening
    assert all(ip == "127.0.0.1" for _, ip, _ in listening), listening

    t0 = time.monotonic()
    code, left = stack.stop()
    print(f"serve stopped in {time.monotonic() - t0:.1f}s with exit code {code}")
    assert code == 0, stack.logs()
    assert not left, f"still running after SIGTERM: {left}"
