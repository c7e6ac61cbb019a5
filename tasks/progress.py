"""What a person at a terminal sees while ``latentflow run`` works.

One line per finished stage and, while the model trains, its epoch and losses,
all on stderr (stdout carries only the run's JSON line). In a terminal the
current stage and the epoch display are rewritten in place; elsewhere (a log
file, CI) only finished stages are written, plus an epoch line every
:data:`EPOCH_LINE_SECONDS`.

Nothing is shown unless the CLI calls :func:`configure`: a flow run from a
deployment, a test or a notebook prints nothing extra. The reporter lives in
this process only; tasks that run on Dask workers report nothing.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

PREFIX = "latentflow: "
#: Off a terminal, training reports at most one epoch line this often.
EPOCH_LINE_SECONDS = 10.0
_CLEAR = "\r\033[K"


class Progress:
    """Stage lines and an epoch display on one text stream."""

    def __init__(self, stream: TextIO | None, live: bool) -> None:
        self.stream = stream
        self.live = live  # a terminal: transient lines are rewritten in place
        self._transient = False
        self._last_epoch_line = 0.0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.stream is not None

    def _write(self, text: str, transient: bool) -> None:
        stream = self.stream
        if stream is None:
            return
        with self._lock:
            head = _CLEAR if self._transient else ""
            try:
                if transient:
                    stream.write(f"{head}{PREFIX}{text}")
                else:
                    stream.write(f"{head}{PREFIX}{text}\n")
                stream.flush()
            except (OSError, ValueError):
                # A closed or broken stream (a closed pipe, an earlier caller's
                # captured stderr): progress is best effort, never a failure.
                self.stream = None
                return
            self._transient = transient

    def line(self, text: str) -> None:
        """A line that stays."""
        self._write(text, transient=False)

    def status(self, text: str) -> None:
        """A line a terminal shows until the next one replaces it."""
        if self.live:
            self._write(text, transient=True)

    def epoch(
        self, epoch: int, epochs: int, train_loss: float, val_loss: float
    ) -> None:
        """Training's progress: ``epoch`` is 0-based, ``epochs`` the most to run."""
        text = (
            f"train: epoch {epoch + 1}/{epochs}"
            f"  train_loss {train_loss:.5f}  val_loss {val_loss:.5f}"
        )
        if self.live:
            self._write(text, transient=True)
            return
        now = time.monotonic()
        if now - self._last_epoch_line >= EPOCH_LINE_SECONDS:
            self._last_epoch_line = now
            self._write(text, transient=False)

    def close(self) -> None:
        """End a transient line, so what follows starts on its own line."""
        if self.stream is not None and self._transient:
            with self._lock:
                self.stream.write(_CLEAR)
                self.stream.flush()
                self._transient = False


_current = Progress(None, live=False)


def configure(enabled: bool, stream: TextIO | None = None) -> Progress:
    """Report to ``stream`` (default stderr), live when it is a terminal."""
    global _current
    out = (stream or sys.stderr) if enabled else None
    live = bool(out is not None and hasattr(out, "isatty") and out.isatty())
    _current = Progress(out, live)
    return _current


def current() -> Progress:
    return _current


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Show ``name …`` while the block runs (in a terminal)."""
    _current.status(f"{name} …")
    try:
        yield
    finally:
        _current.close()


def done(name: str, text: str, started: float | None = None) -> None:
    """The finished stage's line; ``started`` (``time.perf_counter()``) adds seconds."""
    took = f" ({time.perf_counter() - started:.1f} s)" if started is not None else ""
    _current.line(f"{name}: {text}{took}")


def epoch(epoch: int, epochs: int, train_loss: float, val_loss: float) -> None:
    _current.epoch(epoch, epochs, train_loss, val_loss)
