"""A real ``latentflow warm`` process for tests: started, awaited, stopped."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.warm import started

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
    with started(BIN, env, cwd, log, timeout_s) as proc:
        yield WarmProcess(proc, log)
