"""Crash points for the crash-safety tests.

``checkpoint(name)`` does nothing unless ``LATENTFLOW_CRASH_AT`` names it; then it
SIGKILLs its own process on the spot, as the kernel's OOM killer or a node loss
would. It lets a test kill a real run at an exact stage (during ingest,
training, scoring, a partition swap, a registry update) instead of racing a timer.
"""

from __future__ import annotations

import os
import signal

ENV = "LATENTFLOW_CRASH_AT"


def checkpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
