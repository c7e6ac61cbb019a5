"""Served runs stay inside their roots, never widen permissions, and can need auth.

The policy and the permission narrowing are tested in-process first. Then one
``make serve`` stack for the module (``python -m deployments.serve`` with
``LATENTFLOW_SERVER_AUTH`` set, so the Prefect API wants basic auth): flow runs
of ``latentflow-on-demand`` are created through the raw API, as any caller of
the API could, with paths outside the served roots, and the served run must
refuse them before anything is read or written. The roots are the serve
defaults: data under ``<data-dir>``, inputs under ``<data-dir>/input`` and the
nightly's own input file. A served run inside the roots, and the modes of its
outputs, are checked in ``tests/test_deployments.py`` (one full run there).
"""

from __future__ import annotations

import os
import shutil
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.test_deployments import FLOW, RUN_TIMEOUT, ServeStack

AUTH = "latentflow:s3cret-for-tests"


# -- the policy and the permissions, in-process -----------------------------------


def _cfg(**fields: Any) -> Any:
    from flows.config import PipelineConfig

    return PipelineConfig(**fields).resolved()


@pytest.fixture
def roots(tmp_path: Path) -> dict[str, Path]:
    """A data root with an input/ folder, a drop in it, and a secret outside."""
    from tasks.synthetic import write_weatheraus_like_csv

    data = tmp_path / "served"
    drop = data / "input" / "drop"
    drop.mkdir(parents=True)
    write_weatheraus_like_csv(drop / "a.csv", 50)
    secret = write_weatheraus_like_csv(tmp_path / "secret" / "s.csv", 50)
    secret.chmod(0o600)
    return {"data": data, "drop": drop, "secret": secret}


def test_cli_runs_unconfined_unless_roots_set(tmp_path):
    from flows.config import confinement

    assert confinement(deployed=False, env={}) is None
    env = {"LATENTFLOW_INPUT_ROOTS": f"{tmp_path / 'in'}{os.pathsep}{tmp_path}/x.csv"}
    policy = confinement(deployed=False, env=env)
    assert policy is not None
    assert policy.input_roots == (tmp_path / "in", tmp_path / "x.csv")
    # Only what the host set: a local user's data dir stays theirs to choose.
    assert policy.data_roots is None and policy.dask_addresses is None


def test_deployed_runs_always_confined_to_host_data_dir(tmp_path):
    from flows.config import confinement

    policy = confinement(deployed=True, env={"LATENTFLOW_DATA_DIR": str(tmp_path)})
    assert policy is not None
    assert policy.data_roots == (tmp_path,)
    assert policy.input_roots == (tmp_path / "input",)
    assert policy.dask_addresses == frozenset()


@pytest.mark.parametrize(
    ("make_input", "data_dir", "expected"),
    [
        # A file outside; the same reached with '..'; a glob over a folder outside.
        (lambda r: r["secret"], None, "outside the input roots"),
        (
            lambda r: r["data"] / "input" / ".." / ".." / "secret" / "s.csv",
            None,
            "outside the input roots",
        ),
        (lambda r: r["secret"].parent / "*.csv", None, "outside the input roots"),
        # A symlinked drop folder, and the drop itself but data_dir elsewhere.
        (lambda r: r["data"] / "input" / "linked", None, "outside the input roots"),
        (lambda r: r["drop"], "/tmp/elsewhere", "outside the data roots"),
        (lambda r: r["drop"], "{data}/../escape", "outside the data roots"),
    ],
)
def test_paths_resolved_then_checked(roots, make_input, data_dir, expected):
    from flows.config import confinement
    from tasks.errors import ConfigError

    (roots["data"] / "input" / "linked").symlink_to(roots["secret"].parent)
    policy = confinement(deployed=True, env={"LATENTFLOW_DATA_DIR": str(roots["data"])})
    assert policy is not None
    data = (data_dir or str(roots["data"])).format(data=roots["data"])
    with pytest.raises(ConfigError, match=expected) as err:
        policy.check(_cfg(input=str(make_input(roots)), data_dir=data))
    assert str(roots["data"]) in str(err.value)  # the roots are named
    assert "\n" not in str(err.value)


def test_symlink_in_drop_named(roots):
    from flows.config import confinement
    from tasks.errors import ConfigError

    policy = confinement(deployed=True, env={"LATENTFLOW_DATA_DIR": str(roots["data"])})
    assert policy is not None
    files = policy.check(_cfg(input=str(roots["drop"]), data_dir=str(roots["data"])))
    assert files == [roots["drop"] / "a.csv"]
    # A symlink inside the roots is fine; one leading out is refused by name.
    (roots["drop"] / "b.csv").symlink_to(roots["drop"] / "a.csv")
    (roots["drop"] / "c.csv").symlink_to(roots["secret"])
    for source in (str(roots["drop"]), f"{roots['drop']}/*.csv"):
        with pytest.raises(ConfigError) as err:
            policy.check(_cfg(input=source, data_dir=str(roots["data"])))
        message = str(err.value)
        assert f"{roots['drop'] / 'c.csv'} leads to {roots['secret']}" in message


def test_dask_address_needs_allowing(roots):
    from flows.config import confinement
    from tasks.errors import ConfigError

    cfg = _cfg(
        input=str(roots["drop"]),
        data_dir=str(roots["data"]),
        runner="dask",
        dask_address="tcp://10.0.0.9:8786",
    )
    env = {"LATENTFLOW_DATA_DIR": str(roots["data"])}
    policy = confinement(deployed=True, env=env)
    assert policy is not None
    with pytest.raises(ConfigError, match=r"dask_address tcp://10\.0\.0\.9:8786"):
        policy.check(cfg)
    env["LATENTFLOW_DASK_ADDRESSES"] = "tcp://10.0.0.9:8786"
    allowed = confinement(deployed=True, env=env)
    assert allowed is not None
    allowed.check(cfg)


@pytest.mark.parametrize(
    ("source_mode", "file_mode", "dir_mode"),
    [(0o600, 0o600, 0o700), (0o640, 0o640, 0o750), (0o644, 0o644, 0o755)],
)
def test_outputs_never_wider_than_sources(tmp_path, source_mode, file_mode, dir_mode):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.storage import atomic_path, narrowed_umask

    src = tmp_path / "in.csv"
    src.write_text("a\n1\n")
    src.chmod(source_mode)
    other = tmp_path / "other.csv"
    other.write_text("a\n1\n")
    other.chmod(0o666)  # the narrowest source decides
    before = os.umask(0o022)
    try:
        with narrowed_umask([src, other]):
            out = tmp_path / "out" / "run_date=x" / "part.parquet"
            with atomic_path(out) as tmp:
                pq.write_table(pa.table({"a": [1]}), tmp)
        assert os.umask(0o022) == 0o022  # restored
    finally:
        os.umask(before)
    assert stat.S_IMODE(out.stat().st_mode) == file_mode
    assert stat.S_IMODE(out.parent.stat().st_mode) == dir_mode


def test_service_env_auth(tmp_path):
    from deployments.serve import service_env

    inherited = {
        "PREFECT_API_AUTH_STRING": "old:one",
        "PREFECT_SERVER_API_AUTH_STRING": "old:one",
        "PREFECT_API_KEY": "pnu_cloud",
    }
    off = service_env(host="127.0.0.1", port=1, data_dir=tmp_path, base=inherited)
    assert "PREFECT_API_AUTH_STRING" not in off
    assert "PREFECT_SERVER_API_AUTH_STRING" not in off
    on = service_env(
        host="127.0.0.1", port=1, data_dir=tmp_path, base=inherited, auth="u:p"
    )
    assert on["PREFECT_SERVER_API_AUTH_STRING"] == on["PREFECT_API_AUTH_STRING"]
    assert on["PREFECT_API_AUTH_STRING"] == "u:p"
    assert "PREFECT_API_KEY" not in on  # it would take precedence and fail


def test_serve_refuses_public_bind_without_auth(tmp_path, capsys):
    from deployments.serve import main

    data = tmp_path / "serve-data"
    assert main(["--host", "0.0.0.0", "--data-dir", str(data)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--auth-string" in err and len(err.splitlines()) == 1
    assert not data.exists()


def test_served_roots_default_to_data_dir_and_nightly_input(monkeypatch, tmp_path):
    from deployments.definitions import confinement_env

    monkeypatch.delenv("LATENTFLOW_INPUT_ROOTS", raising=False)
    monkeypatch.delenv("LATENTFLOW_ON_DEMAND_INPUT", raising=False)
    env = confinement_env(tmp_path, [tmp_path.parent / "weather.csv"], env={})
    assert env["LATENTFLOW_DATA_ROOTS"] == str(tmp_path)
    assert env["LATENTFLOW_INPUT_ROOTS"].split(os.pathsep) == [
        str(tmp_path / "input"),
        str(tmp_path.parent / "weather.csv"),
    ]
    kept = confinement_env(tmp_path, [], env={"LATENTFLOW_INPUT_ROOTS": "/drops"})
    assert kept["LATENTFLOW_INPUT_ROOTS"] == "/drops"


# -- against a served stack with auth ------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeStack]:
    s = ServeStack(
        tmp_path_factory.mktemp("serve-confined"), mlflow=False, auth=AUTH
    ).start()
    try:
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A readable CSV only its owner may read, outside every served root."""
    from tasks.synthetic import write_weatheraus_like_csv

    path = write_weatheraus_like_csv(
        tmp_path_factory.mktemp("secrets") / "secret.csv", 300, seed=3
    )
    path.chmod(0o600)
    return path


def _on_demand_id(stack: ServeStack) -> str:
    from deployments.definitions import ON_DEMAND

    (dep,) = stack.post(
        "/deployments/filter", {"deployments": {"name": {"any_": [ON_DEMAND]}}}
    )
    return str(dep["id"])


def _deployment_id(stack: ServeStack, name: str) -> str:
    (dep,) = stack.post(
        "/deployments/filter", {"deployments": {"name": {"any_": [name]}}}
    )
    return str(dep["id"])


def _run(
    stack: ServeStack, config: dict[str, Any], deployment: str | None = None
) -> dict[str, Any]:
    """Create a run through the API (on-demand unless ``deployment`` names
    another, whose parameters ``config`` then is) and wait for its final state."""
    if deployment is None:
        url = f"/deployments/{_on_demand_id(stack)}/create_flow_run"
        parameters = {"config": config}
    else:
        url = f"/deployments/{_deployment_id(stack, deployment)}/create_flow_run"
        parameters = config
    run = stack.post(url, {"parameters": parameters})
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        run = stack.get(f"/flow_runs/{run['id']}")
        if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
            return run
        time.sleep(1.0)
    raise TimeoutError(f"run {run['id']} not final:\n{stack.logs()}")


def _parquet_since(root: Path, t0: float) -> list[Path]:
    return [p for p in root.rglob("*.parquet") if p.stat().st_mtime >= t0]


@pytest.mark.slow
def test_input_outside_roots_refused(stack, secret, tmp_path_factory):
    """(a) A 0600 file outside the roots, data_dir anywhere: Failed, nothing written."""
    elsewhere = tmp_path_factory.getbasetemp() / "anywhere" / "out"
    t0 = time.time() - 1
    run = _run(
        stack,
        {"input": str(secret), "data_dir": str(elsewhere), "epochs": 1},
    )
    message = run["state"].get("message") or ""
    assert run["state"]["type"] == "FAILED", (run["state"], stack.logs())
    assert str(secret) in message, message
    assert str(stack.data_dir / "input") in message, message  # names the roots
    assert "\n" not in message.strip()
    assert not elsewhere.exists()
    assert not _parquet_since(tmp_path_factory.getbasetemp(), t0)


@pytest.mark.slow
def test_symlink_in_drop_refused(stack, secret, tmp_path_factory):
    """(b) A drop inside the roots with a symlink to an outside file is refused."""
    drop = stack.data_dir / "input" / "drop"
    drop.mkdir(parents=True)
    shutil.copy(stack.csv, drop / "a.csv")
    (drop / "b.csv").symlink_to(secret)
    t0 = time.time() - 1
    run = _run(
        stack, {"input": str(drop), "data_dir": str(stack.data_dir), "epochs": 1}
    )
    message = run["state"].get("message") or ""
    assert run["state"]["type"] == "FAILED", (run["state"], stack.logs())
    assert str(drop / "b.csv") in message and str(secret) in message, message
    assert not _parquet_since(tmp_path_factory.getbasetemp(), t0)


@pytest.mark.slow
def test_synthesis_output_outside_roots_refused(stack, tmp_path_factory):
    """A served synthesize run may write its rows only under the data roots."""
    from deployments.definitions import SYNTHESIZE

    outside = tmp_path_factory.getbasetemp() / "synth-outside"
    outside.mkdir()
    target = outside / "rows.parquet"
    params = {
        "data_dir": str(stack.data_dir),
        "dataset": "weatheraus",
        "rows": 10,
        "output": str(target),
    }
    run = _run(stack, {"params": params}, deployment=SYNTHESIZE)
    message = run["state"].get("message") or ""
    assert run["state"]["type"] == "FAILED", (run["state"], stack.logs())
    assert f"output {target}" in message and "outside the data roots" in message
    assert str(stack.data_dir) in message and "\n" not in message.strip()
    assert not any(outside.iterdir())


@pytest.mark.slow
def test_confinement_is_not_a_parameter(stack, secret):
    """Parameters cannot carry roots or switch the check off: schema refuses them."""
    for extra in ({"confine": False}, {"input_roots": ["/"]}):
        config = {"input": str(secret), "data_dir": "/tmp", **extra}
        with pytest.raises(urllib.error.HTTPError) as err:
            stack.post(
                f"/deployments/{_on_demand_id(stack)}/create_flow_run",
                {"parameters": {"config": config}},
            )
        assert err.value.code == 409


@pytest.mark.slow
def test_auth_required_and_works(stack):
    """(d) Without the auth string: 401; with it, Prefect's own client works."""
    for token in (None, "latentflow:wrong"):
        headers = stack.headers(auth=token or "")
        req = urllib.request.Request(
            f"{stack.api_url}/deployments/filter", data=b"{}", headers=headers
        )
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 401
    # Health probes stay open, so supervisors and load balancers still work.
    with urllib.request.urlopen(f"{stack.api_url}/health", timeout=10) as resp:
        assert resp.status == 200
    from deployments.definitions import ON_DEMAND

    with stack.client() as client:
        dep = client.read_deployment_by_name(f"{FLOW}/{ON_DEMAND}")
    assert dep.name == ON_DEMAND
    # The served runner and its flow-run processes authenticate too: the runs
    # above reached a final state through the API.
