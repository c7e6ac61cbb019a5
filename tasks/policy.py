"""Orchestration options shared by the @task wrappers in this package."""

from __future__ import annotations

from typing import Any

from prefect.cache_policies import NO_CACHE

from tasks.errors import LatentflowError


def retry_unless_user_error(task: Any, task_run: Any, state: Any) -> bool:
    """Retry transient I/O failures, never a user's mistake: a bad file stays bad."""
    try:
        state.result()
    except LatentflowError:
        return False
    except Exception:
        return True
    return True


# Side-effecting steps: never cached; I/O steps retried with backoff.
PLAIN: dict[str, Any] = {"cache_policy": NO_CACHE}
IO: dict[str, Any] = {
    "cache_policy": NO_CACHE,
    "retries": 2,
    "retry_delay_seconds": [2, 10],
    "retry_condition_fn": retry_unless_user_error,
}
