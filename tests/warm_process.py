"""A real ``latentflow warm`` process for tests: started, awaited, stopped."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).with_name("latentflow")


class WarmProcess:
    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def served(self) -> int:
        """How many commands it has forked so far."""
        return len(re.findall(r"^latentflow warm: command \d+:", self.text(), re.M))

    def child_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"\(pid (\d+)\)$", self.text(), re.M)][1:]


@contextmanager
def warm_process(
    env: dict[str, str], cwd: Path, timeout_s: float = 240.0
) -> Iterator[WarmProcess]:
    """``latentflow warm`` with ``env``, ready to serve; stopped on exit."""
    log = cwd / "warm.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(BIN), "warm"],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    warm = WarmProcess(proc, log)
    try:
        deadline = time.monotonic() + timeout_s
        while "latentflow warm: ready in" not in warm.text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"latentflow warm did not start:\n{warm.text()}")
            time.sleep(0.1)
        yield warm
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
