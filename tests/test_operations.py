"""Nightly operation on daily drops (issue 17), end to end on real parts.

One module-scoped world, reused by every slow test: a real ``prefect server
start`` on 127.0.0.1 with the alert automations applied from ``deployments/``
(their webhook block points at an HTTP receiver on 127.0.0.1), real MLflow on
SQLite, real Parquet. It plays 30 nights of weatherAUS drops (one file per
day, the 49 locations of January 2016) through the pipeline: a first training
night, reuse nights, a drifted night that retrains, a night with rejected
rows, a missing drop, a ``latentflow backfill`` process killed in the middle
and resumed, and retention. The tests then check what an operator relies on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import date, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from tests.test_deployments import free_port

REPO = Path(__file__).resolve().parents[1]
LATENTFLOW = Path(sys.executable).with_name("latentflow")
FIRST = date(2016, 1, 1)
NIGHTS = 30
LAST = FIRST + timedelta(days=NIGHTS - 1)
DRIFTED = FIRST + timedelta(days=9)  # night 10
REJECTS = FIRST + timedelta(days=11)  # night 12: one row breaks a rule
MISSING = FIRST + timedelta(days=14)  # night 15: no drop
KILLED_FROM = FIRST + timedelta(days=13)  # the killed backfill's range
KEEP_DAYS = 10
KEEP_VERSIONS = 1
KEYS = ["Date", "Location"]


# -- the drops ----------------------------------------------------------------


def write_drops(csv: Path, folder: Path) -> dict[date, pd.DataFrame]:
    """One CSV per day from the real file, with the drifted and faulty nights."""
    df = pd.read_csv(csv)
    drops: dict[date, pd.DataFrame] = {}
    for i in range(NIGHTS):
        day = FIRST + timedelta(days=i)
        rows = df[df["Date"] == day.isoformat()].reset_index(drop=True)
        if day == DRIFTED:
            # A different climate: every numeric feature far outside January's.
            rows = rows.assign(
                MinTemp=rows.MinTemp + 30,
                MaxTemp=rows.MaxTemp + 30,
                Temp9am=rows.Temp9am + 30,
                Temp3pm=rows.Temp3pm + 30,
                Pressure9am=rows.Pressure9am - 80,
                Pressure3pm=rows.Pressure3pm - 80,
                WindGustSpeed=rows.WindGustSpeed * 4,
                WindSpeed9am=rows.WindSpeed9am * 4,
                WindSpeed3pm=rows.WindSpeed3pm * 4,
                Evaporation=rows.Evaporation * 6 + 40,
                Sunshine=rows.Sunshine + 40,
            )
        if day == REJECTS:
            rows.loc[0, "MinTemp"] = rows.loc[0, "MaxTemp"] + 10
        drops[day] = rows
        if day != MISSING:
            rows.to_csv(folder / f"{day.isoformat()}.csv", index=False)
    return drops


# -- an HTTP receiver for the webhook ----------------------------------------


class Receiver:
    """Collects every JSON POST made to it, on 127.0.0.1."""

    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        received = self.messages

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with contextlib.suppress(ValueError):
                    received.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def bodies(self) -> list[str]:
        return [str(m.get("body", "")) for m in self.messages]

    def wait_for(self, *needles: str, timeout: float = 60.0) -> list[str]:
        """The needles no message contained when the time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            text = "\n".join(self.bodies())
            left = [n for n in needles if n not in text]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.5)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# -- a real Prefect server ------------------------------------------------------


class PrefectServer:
    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.log = home / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> PrefectServer:
        env = {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
            # The scheduler looks every second, not every minute.
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "1",
        }
        env.pop("PREFECT_API_URL", None)
        self.home.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    str(LATENTFLOW.with_name("prefect")),
                    *("server", "start", "--host", "127.0.0.1"),
                    *("--port", str(self.port)),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log.read_text(errors="replace")[-3000:])
            health = f"{self.api_url}/health"
            with (
                contextlib.suppress(OSError),
                urllib.request.urlopen(health, timeout=2),
            ):
                return self
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(self.log.read_text(errors="replace")[-3000:])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


# -- the world ------------------------------------------------------------------


@dataclass
class World:
    root: Path
    data_dir: Path
    template: str
    drops: dict[date, pd.DataFrame]
    server: PrefectServer
    receiver: Receiver
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)
    backfills: list[dict[str, Any]] = field(default_factory=list)
    missing_error: str = ""
    killed_done: list[str] = field(default_factory=list)
    inodes_before_repeat: dict[str, int] = field(default_factory=dict)
    repeat: dict[str, Any] = field(default_factory=dict)
    alerts_applied: list[str] = field(default_factory=list)

    def config(self, **more: Any) -> Any:
        from flows.config import PipelineConfig

        return PipelineConfig(
            input=self.template,
            dataset="weatheraus",
            data_dir=str(self.data_dir),
            epochs=2,
            hidden=(16,),
            latent_dim=3,
            # ~49 rows a night: PSI is noisy at that size and real weather
            # moves several features a day, so only a shift of most features
            # far outside the reference counts as drift.
            drift_psi_threshold=3.0,
            max_drifted_features=8,
            max_error_ratio=50.0,
            train_window_days=7,
            keep_days=KEEP_DAYS,
            keep_versions=KEEP_VERSIONS,
            alert_reject_share=0.01,
            # A night of 49 rows flags 0-2 of them: 2 (4.1%) must alert.
            alert_anomaly_rate=0.03,
            **more,
        )

    def latent_dates(self) -> list[str]:
        base = self.data_dir / "latent" / "weatheraus"
        return sorted(p.name.removeprefix("run_date=") for p in base.glob("run_date=*"))


def _cli_env(world: World) -> dict[str, str]:
    env = {**os.environ, "PREFECT_API_URL": world.server.api_url}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    env["PREFECT_HOME"] = str(world.root / "cli-prefect")
    return env


def _backfill_argv(world: World, start: date, end: date) -> list[str]:
    return [
        str(LATENTFLOW),
        "backfill",
        "--from",
        start.isoformat(),
        "--to",
        end.isoformat(),
        "--config",
        str(world.root / "config.json"),
    ]


def _kill_mid_backfill(world: World) -> None:
    """Start ``latentflow backfill`` and SIGKILL it once it has published two
    new nights (and is working on a third)."""
    before = set(world.latent_dates())
    proc = subprocess.Popen(
        _backfill_argv(world, KILLED_FROM, LAST),
        env=_cli_env(world),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(set(world.latent_dates()) - before) >= 2:
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    world.killed_done = sorted(set(world.latent_dates()) - before)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, weather_csv: Path):
    from prefect.events.clients import PrefectEventsClient
    from prefect.events.worker import EventsWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.alerts import ensure_alerts
    from flows.backfill import backfill
    from flows.nightly import nightly
    from tasks.errors import MissingDropError

    root = tmp_path_factory.mktemp("ops")
    drops_dir = root / "data" / "input" / "weatheraus"
    drops_dir.mkdir(parents=True)
    server = PrefectServer(root / "prefect").start()
    receiver = Receiver()
    w = World(
        root=root,
        data_dir=root / "data",
        template=str(drops_dir / "{run_date}.csv"),
        drops=write_drops(weather_csv, drops_dir),
        server=server,
        receiver=receiver,
    )
    (root / "config.json").write_text(w.config().model_dump_json())
    # Events go through one worker per process, keyed without the API URL:
    # one started for another server earlier in the session would get ours.
    EventsWorker.set_client_override(PrefectEventsClient, api_url=server.api_url)
    try:
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            w.alerts_applied = ensure_alerts(webhook_url=receiver.url)
            # Nights 1-12 as one backfill: first training, reuse, drift, rejects.
            w.backfills.append(backfill(start=FIRST, end=REJECTS, config=w.config()))
            # Night 13 as the nightly runs it.
            day = REJECTS + timedelta(days=1)
            w.summaries[str(day)] = nightly(config=w.config(run_date=day))
            # Nights 14-30 by a backfill process, killed in the middle.
            _kill_mid_backfill(w)
            # Night 15's drop is missing: the nightly fails, naming the file.
            with pytest.raises(MissingDropError) as err:
                nightly(config=w.config(run_date=MISSING))
            w.missing_error = str(err.value)
            # The rerun completes only what the killed one left.
            w.backfills.append(backfill(start=KILLED_FROM, end=LAST, config=w.config()))
            # The same again: nothing to do.
            w.inodes_before_repeat = {
                str(p): p.stat().st_ino
                for p in (w.data_dir / "latent" / "weatheraus").glob("*/*.parquet")
            }
            w.repeat = backfill(start=KILLED_FROM, end=LAST, config=w.config())
            yield w
    finally:
        EventsWorker.set_client_override(None)
        receiver.stop()
        server.stop()


# -- units (no server) ------------------------------------------------------------


def test_input_templates_render_per_night():
    from flows.config import PipelineConfig
    from tasks.drops import render_input
    from tasks.errors import ConfigError

    day = date(2026, 3, 7)
    assert render_input("d/{run_date}.csv", day) == "d/2026-03-07.csv"
    assert render_input("d/{run_date:%Y/%m/%d}/*.parquet", day) == (
        "d/2026/03/07/*.parquet"
    )
    with pytest.raises(ConfigError, match="unknown field"):
        render_input("d/{rundate}.csv", day)
    cfg = PipelineConfig(input="/feed/weather/{run_date}.csv", run_date=day)
    resolved = cfg.resolved()
    assert resolved.data.input == "/feed/weather/2026-03-07.csv"
    assert resolved.data.dataset == "weather"  # from the template, not the day
    with pytest.raises(ValueError, match="train_window_days"):
        PipelineConfig(input="x.csv", keep_days=3, train_window_days=7)


def test_retention_removes_only_old_partitions_of_every_root(tmp_path):
    from tasks.retention import RETAINED_ROOTS, apply_retention

    day = date(2026, 1, 31)
    for root in RETAINED_ROOTS:
        for back in range(5):
            part = tmp_path / root / "ds" / f"run_date={day - timedelta(days=back)}"
            part.mkdir(parents=True)
            (part / "part-00000.parquet").write_bytes(b"x")
    other = tmp_path / "latent" / "other" / "run_date=2020-01-01"
    other.mkdir(parents=True)
    removed = apply_retention(tmp_path, "ds", day, keep_days=3)
    assert len(removed) == 2 * len(RETAINED_ROOTS)
    for root in RETAINED_ROOTS:
        left = sorted(p.name for p in (tmp_path / root / "ds").iterdir())
        assert left == [f"run_date={day - timedelta(days=b)}" for b in (2, 1, 0)]
    assert other.is_dir()  # another dataset is never touched
    assert list((tmp_path / ".staging").iterdir()) == []


def test_backfill_refuses_an_empty_range_in_one_line(capsys, tmp_path):
    from flows.cli import main

    argv = ["backfill", "--from", "2016-01-05", "--to", "2016-01-01"]
    code = main([*argv, "--input", "x/{run_date}.csv", "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err == [
        "latentflow: error: backfill range is empty: --to 2016-01-01 is before"
        " --from 2016-01-05"
    ]
    assert list(tmp_path.iterdir()) == []


def test_cli_run_without_its_drop_fails_in_one_line(prefect_harness, capsys, tmp_path):
    from flows.cli import main

    drops = tmp_path / "drops"
    drops.mkdir()
    (drops / "2016-01-14.csv").write_text("Date,Location,MinTemp\n")  # yesterday's
    data = tmp_path / "data"
    template = f"{drops}/{{run_date}}.csv"
    code = main(
        [
            *("run", "--input", template, "--run-date", "2016-01-15"),
            *("--dataset", "weatheraus", "--data-dir", str(data)),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        f"latentflow: error: no drop for 2016-01-15: expected {drops}/2016-01-15.csv"
        f" (input template {drops}/{{run_date}}.csv)"
    )
    assert not (data / "latent").exists() and not (data / "ingested").exists()


# -- the 30 nights --------------------------------------------------------------


@pytest.mark.slow
def test_backfill_trains_where_the_policy_says(world):
    first = world.backfills[0]
    assert first["ran"] == [str(FIRST + timedelta(days=i)) for i in range(12)]
    # The first night (no champion) and the drifted one; every other night reuses.
    assert first["trained"] == [str(FIRST), str(DRIFTED)]
    night13 = world.summaries[str(REJECTS + timedelta(days=1))]
    assert night13["decision"] == "reuse"


@pytest.mark.slow
def test_missing_drop_fails_naming_the_expected_file(world):
    expected = world.template.replace("{run_date}", str(MISSING))
    assert "\n" not in world.missing_error
    assert f"no drop for {MISSING}: expected {expected}" in world.missing_error
    assert str(MISSING) not in world.latent_dates()


@pytest.mark.slow
def test_killed_backfill_resumes_with_only_the_missing_dates(world):
    assert world.killed_done, "the kill came before any night was published"
    resumed = world.backfills[1]
    all_dates = [str(KILLED_FROM + timedelta(days=i)) for i in range(17)]
    assert set(resumed["skipped"]) >= set(world.killed_done)
    assert not set(resumed["ran"]) & set(world.killed_done)
    assert set(resumed["ran"]) | set(resumed["skipped"]) == set(all_dates) - {
        str(MISSING)
    }
    assert [m["run_date"] for m in resumed["missing"]] == [str(MISSING)]
    # A second identical backfill rewrites nothing and trains nothing; what
    # retention removed since is not brought back.
    assert world.repeat["ran"] == [] and world.repeat["trained"] == []
    horizon = str(LAST - timedelta(days=KEEP_DAYS - 1))
    assert world.repeat["expired"] == [d for d in all_dates if d < horizon]
    now = {
        str(p): p.stat().st_ino
        for p in (world.data_dir / "latent" / "weatheraus").glob("*/*.parquet")
    }
    assert now == world.inodes_before_repeat


@pytest.mark.slow
def test_every_delivered_row_scored_once_and_retention_held(world):
    import duckdb

    kept = world.latent_dates()
    oldest = LAST - timedelta(days=KEEP_DAYS - 1)
    assert kept == [
        str(oldest + timedelta(days=i))
        for i in range(KEEP_DAYS)
        if oldest + timedelta(days=i) != MISSING
    ]
    for root in ("ingested", "rejected", "latent"):
        dates = sorted(
            p.name.removeprefix("run_date=")
            for p in (world.data_dir / root / "weatheraus").glob("run_date=*")
        )
        assert dates and min(dates) >= str(oldest), (root, dates)
    glob = f"{world.data_dir}/latent/weatheraus/*/*.parquet"
    scored = duckdb.sql(
        f"SELECT CAST(run_date AS VARCHAR) AS run_date, Date, Location, count(*) AS n"
        f" FROM read_parquet('{glob}', hive_partitioning = true)"
        " GROUP BY ALL"
    ).df()
    assert (scored["n"] == 1).all()
    for day in kept:
        delivered = world.drops[date.fromisoformat(day)]
        got = scored[scored["run_date"] == day]
        want = len(delivered) - (1 if day == str(REJECTS) else 0)
        assert len(got) == want, day
        assert set(got["Location"]) <= set(delivered["Location"])


@pytest.mark.slow
def test_registry_keeps_champion_and_at_most_keep_versions(world):
    from mlflow import MlflowClient

    from tasks import registry

    registry.configure(world.data_dir)
    client = MlflowClient()
    name = "weatheraus-autoencoder"
    versions = {int(v.version) for v in client.search_model_versions(f"name='{name}'")}
    champion = int(client.get_model_version_by_alias(name, "champion").version)
    assert champion in versions
    assert len(versions - {champion}) <= KEEP_VERSIONS
    # Every training (an MLflow run each) registered a version; the oldest
    # beyond the limit went, never the champion or the previous champion.
    # Every night is an MLflow run; those that trained carry the gate's word.
    experiment = client.get_experiment_by_name("latentflow-weatheraus")
    trainings = sum(
        len(client.search_runs([experiment.experiment_id], f"tags.decision = '{word}'"))
        for word in ("promote", "keep_champion")
    )
    assert trainings >= 2 and max(versions) == trainings
    assert len(versions) == min(trainings, 1 + KEEP_VERSIONS)
    aliases = client.get_registered_model(name).aliases
    assert {int(v) for v in aliases.values()} <= versions


@pytest.mark.slow
def test_alerts_reach_the_webhook(world):
    from deployments import alerts

    assert set(world.alerts_applied) == {
        alerts.FAILED,
        alerts.QUALITY,
        alerts.DRIFT,
        alerts.MISSING,
    }
    missing = world.receiver.wait_for(
        f"weatheraus {MISSING}: no drop",  # the missing drop
        "prefect.flow-run.Failed",  # the nightly that failed on it
        f"weatheraus {DRIFTED}: retrained because the data drifted",
        f"weatheraus {REJECTS}: 2.04% of rows rejected",
        "of rows anomalous",
    )
    assert not missing, world.receiver.bodies()


@pytest.mark.slow
def test_cron_creates_scheduled_runs_with_the_templated_input(world):
    from zoneinfo import ZoneInfo

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from deployments.definitions import NIGHTLY, build_deployments
    from tasks.drops import local_date, render_input

    with temporary_settings(updates={PREFECT_API_URL: world.server.api_url}):
        for dep in build_deployments(data_dir=world.data_dir):
            dep.apply()
    runs: list[Any] = []
    with SyncPrefectClient(api=world.server.api_url) as client:
        deadline = time.monotonic() + 60
        while not runs and time.monotonic() < deadline:
            runs = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    state=FlowRunFilterState(
                        type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])
                    )
                ),
                deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=[NIGHTLY])
                ),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=5,
            )
            if not runs:
                time.sleep(1)
    assert runs, "the scheduler made no runs of the nightly"
    for run in runs:
        data = run.parameters["config"]["data"]
        assert data["input"] == world.template  # the template, rendered at run time
        due = run.expected_start_time
        local = due.astimezone(ZoneInfo("Australia/Sydney"))
        assert (local.hour, local.minute) == (2, 0)
        day = local_date(due, data["timezone"])
        assert render_input(data["input"], day) == world.template.replace(
            "{run_date}", day.isoformat()
        )
