"""``latentflow warm``: commands handed to a process that keeps the libraries
loaded give what a fresh process gives; anything it cannot serve alike runs in
its own process. A real warm process, real runs through the console script.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pandas as pd
import pytest

from flows.warm import address, code_fingerprint, command_of
from tests.warm_process import BIN, WarmProcess, warm_process

ARGS = ["--dataset", "weatheraus", "--run-date", "2024-05-01", "--latent-dim", "2"]


def _env(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PREFECT_API", "MLFLOW_", "PREFECT_LOGGING", "LATENTFLOW"))
    }
    env["PREFECT_HOME"] = str(home)
    return env


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    from tasks.synthetic import write_weatheraus_like_csv

    cwd = tmp_path_factory.mktemp("warm")
    csv = write_weatheraus_like_csv(cwd / "weatherAUS.csv", 600, seed=5)
    env = _env(cwd / "prefect-home")
    with warm_process(env, cwd) as warm:
        yield cwd, csv, env, warm


def _run(
    args: list[str], cwd: Path, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def _outputs(data_dir: Path) -> pd.DataFrame:
    files = sorted((data_dir / "latent" / "weatheraus").rglob("*.parquet"))
    assert files, f"no output under {data_dir}"
    return pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)


@pytest.mark.slow
def test_a_served_run_gives_what_a_fresh_process_gives(setting):
    cwd, csv, env, warm = setting
    base = ["run", "--input", str(csv), "--epochs", "3", *ARGS]
    before = warm.served()
    fresh = _run(
        [*base, "--data-dir", str(cwd / "fresh")],
        cwd,
        {**env, "LATENTFLOW_WARM": "off"},
    )
    assert fresh.returncode == 0, fresh.stderr[-2000:]
    assert warm.served() == before  # off: run in its own process
    served = _run([*base, "--data-dir", str(cwd / "served")], cwd, env)
    assert served.returncode == 0, served.stderr[-2000:]
    assert warm.served() == before + 1, warm.text()
    assert len(served.stdout.splitlines()) == 1
    assert "latentflow: ingest: 600 rows" in served.stderr
    pd.testing.assert_frame_equal(_outputs(cwd / "fresh"), _outputs(cwd / "served"))


def test_a_served_mistake_is_one_line_and_status_2(setting):
    cwd, _csv, env, warm = setting
    before = warm.served()
    r = _run(["run", "--input", str(cwd / "missing.csv")], cwd, env)
    assert warm.served() == before + 1, warm.text()
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.splitlines() == [
        f"latentflow: error: input file {cwd / 'missing.csv'} does not exist"
    ]
    usage = _run(["run", "--no-such-option"], cwd, env)
    assert usage.returncode == 2 and "unrecognized arguments" in usage.stderr


def test_another_environment_runs_in_its_own_process(setting):
    cwd, _csv, env, warm = setting
    before = warm.served()
    r = _run(["run", "--input", "missing.csv"], cwd, {**env, "LATENTFLOW_X": "1"})
    assert r.returncode == 2 and "missing.csv" in r.stderr
    assert warm.served() == before
    # Shell bookkeeping is not a difference.
    r = _run(["run", "--input", "missing.csv"], cwd, {**env, "SHLVL": "7"})
    assert r.returncode == 2 and warm.served() == before + 1


def _start_training(
    setting: tuple[Path, Path, dict[str, str], WarmProcess], name: str
) -> tuple[subprocess.Popen[str], int]:
    from tasks.synthetic import write_weatheraus_like_csv

    cwd, _csv, env, warm = setting
    # Large enough that 1000 epochs take minutes: the signal finds it training.
    big = cwd / "big" / "weatherAUS.csv"
    if not big.exists():
        big.parent.mkdir()
        write_weatheraus_like_csv(big, 20_000, seed=6)
    before = warm.served()
    args = ["run", "--input", str(big), "--data-dir", str(cwd / name), *ARGS]
    proc = subprocess.Popen(
        [str(BIN), *args, "--epochs", "1000", "--retrain"],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 120
    while warm.served() == before:
        assert proc.poll() is None and time.monotonic() < deadline, warm.text()
        time.sleep(0.05)
    return proc, warm.child_pids()[-1]


def _gone(pid: int, within_s: float) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_reaches_the_served_run(setting):
    proc, child = _start_training(setting, "interrupted")
    time.sleep(3)  # into the flow
    # Python drops a KeyboardInterrupt that lands inside a finalizer
    # ("Exception ignored in ..."), in a served run as in any process; a user
    # then presses Ctrl-C again, and so does this test.
    for _ in range(4):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
            break
        except subprocess.TimeoutExpired:
            continue
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "latentflow: interrupted" in err
    assert _gone(child, 30)


def test_a_served_run_stops_when_its_command_is_killed(setting):
    proc, child = _start_training(setting, "killed")
    time.sleep(1)
    proc.kill()
    proc.wait(timeout=30)
    assert _gone(child, 30), "the served run outlived its command"


def test_the_fingerprint_follows_edits_and_new_files(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text("x = 1\n")
    first = code_fingerprint([pkg])
    assert code_fingerprint([pkg]) == first
    (pkg / "a.py").write_text("x = 22\n")
    edited = code_fingerprint([pkg])
    assert edited != first
    (pkg / "b.py").write_text("")
    assert code_fingerprint([pkg]) != edited
    site = tmp_path / "site"
    site.mkdir()
    marked = code_fingerprint([pkg], [site])
    os.utime(site, ns=(1, 1))
    assert code_fingerprint([pkg], [site]) != marked


def test_the_address_depends_on_the_environment_not_shell_bookkeeping():
    env = {"PATH": "/bin", "PREFECT_HOME": "/a", "PWD": "/x", "SHLVL": "1"}
    name = address(env, "f")
    assert name.startswith("\0latentflow-warm-")
    assert address({**env, "PWD": "/y", "SHLVL": "2", "_": "z"}, "f") == name
    assert address({**env, "PREFECT_HOME": "/b"}, "f") != name
    assert address(env, "g") != name


def test_the_command_is_the_first_bare_word():
    assert command_of(["-q", "run", "--input", "x"]) == "run"
    assert command_of(["--version"]) is None


def test_a_second_warm_process_for_the_same_environment_steps_aside(setting):
    cwd, _csv, env, warm = setting
    r = subprocess.run(
        [str(BIN), "warm"], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    assert "one is already running" in r.stderr
    assert warm.proc.poll() is None


@pytest.mark.slow
def test_stopping_the_warm_process_lets_a_running_command_finish(tmp_path, setting):
    _cwd, csv, _env_unused, _warm = setting
    env = _env(tmp_path / "prefect-home")
    with warm_process(env, tmp_path) as warm:
        args = ["run", "--input", str(csv), "--data-dir", str(tmp_path / "lf")]
        proc = subprocess.Popen(
            [str(BIN), *args, *ARGS, "--epochs", "60"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        deadline = time.monotonic() + 120
        while warm.served() == 0:
            assert proc.poll() is None and time.monotonic() < deadline, warm.text()
            time.sleep(0.05)
        warm.proc.terminate()
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        assert json.loads(out.splitlines()[-1])["trained"] is True
        assert warm.proc.wait(timeout=60) == 0, warm.text()
    assert "waiting for 1 running command(s) to finish" in warm.text()
    assert "latentflow warm: stopped" in warm.text()
