"""``latentflow warm``: a process that keeps the libraries loaded, so runs start fast.

Most of a reusing run's seconds go to importing torch, scikit-learn, Prefect and
MLflow and to starting Prefect's temporary server (docs/pipeline.md, "Start-up").
``latentflow warm`` pays for them once, then waits on a local socket. A later
``latentflow run`` or ``backfill`` that finds it hands over its arguments, working
directory, environment, umask and standard streams; the warm process forks a
child that runs the command exactly as a fresh process would, with the
libraries already imported and the server already up. The command's process
waits for the child's exit status and exits with it; Ctrl-C and SIGTERM are
passed on, and a child whose command process goes away is stopped.

A command is handed over only where a fresh process would do the same thing:

- the same user: the socket checks its peer's uid;
- the same code and libraries: the address is derived from a fingerprint of the
  package's source files and of site-packages, so a ``git pull`` or an upgrade
  leaves the old warm process unreachable (it then exits by itself);
- the same interpreter and the same environment, bar a few shell bookkeeping
  variables: any other difference, and the command runs in its own process.

The address is an abstract Unix socket (Linux): nothing is written to disk.
``LATENTFLOW_WARM=off`` makes a command skip the lookup.

Forking is safe here because the warm process stays single-threaded and never
runs torch or CUDA code before it forks: each child starts its own thread pools.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flows.prefect_server import TemporaryServer

#: Commands a warm process runs; the others gain nothing from it.
WARM_COMMANDS = ("run", "backfill")
#: Shell bookkeeping that differs between two shells but changes no run.
_VOLATILE = frozenset({"_", "PWD", "OLDPWD", "SHLVL", "COLUMNS", "LINES"})
_PACKAGES = ("flows", "tasks", "models", "deployments")
_HEADER = struct.Struct("!I")
_MAX_REQUEST = 8 << 20
#: Client -> child: the signal number to raise. Child -> client: the exit status.
_STATUS = struct.Struct("!i")
#: How long a command waits for a warm process to start it.
_ACK_TIMEOUT_S = 30.0
#: How often the warm process checks that the code on disk is still its own.
_CODE_CHECK_S = 5.0


def code_fingerprint(roots: Iterable[Path], markers: Iterable[Path] = ()) -> str:
    """A digest of every ``.py`` file's path, size and mtime under ``roots``,
    and of each of ``markers``' own mtime (a directory's changes when an entry
    is added or removed, as installing a distribution does to site-packages).

    Stats only (milliseconds): any edit, added or removed file changes it.
    """
    digest = hashlib.sha256()
    for marker in markers:
        digest.update(f"{marker}\0{_mtime(marker)}\n".encode())
    for root in roots:
        digest.update(f"{root}\0{_mtime(root)}\n".encode())
        for path in sorted(root.rglob("*.py")):
            try:
                stat = path.stat()
            except OSError:
                continue
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _mtime(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return -1


def current_fingerprint() -> str:
    """:func:`code_fingerprint` of this installation: its packages, site-packages."""
    here = Path(__file__).resolve().parent.parent
    roots = [here / name for name in _PACKAGES]
    installed = [Path(p) for p in sys.path if p.endswith("-packages")]
    return code_fingerprint(roots, installed)


def address(env: Mapping[str, str], fingerprint: str | None = None) -> str:
    """The abstract socket name for this user, code, interpreter and environment."""
    digest = hashlib.sha256()
    digest.update(f"{os.getuid()}\0{sys.executable}\0{sys.version}\0".encode())
    digest.update((fingerprint or current_fingerprint()).encode())
    for key in sorted(set(env) - _VOLATILE):
        digest.update(f"{key}={env[key]}\0".encode())
    return "\0latentflow-warm-" + digest.hexdigest()[:32]


def command_of(argv: list[str]) -> str | None:
    """The subcommand of a ``latentflow`` command line (its first bare word)."""
    return next((a for a in argv if not a.startswith("-")), None)


# ---------------------------------------------------------------- the command side


def hand_over(argv: list[str]) -> int | None:
    """Run ``latentflow argv`` in a warm process; its exit status, or None.

    None: no warm process serves this code and environment (or it went away
    before starting the command), so the caller runs the command itself.
    """
    if os.environ.get("LATENTFLOW_WARM", "").lower() in ("0", "off", "false", "no"):
        return None
    if command_of(argv) not in WARM_COMMANDS:
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address(os.environ))
    except OSError:
        sock.close()
        return None
    with sock:
        umask = os.umask(0)
        os.umask(umask)
        request = json.dumps(
            {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
        ).encode()
        try:
            # A wedged warm process must not hang the command: past this, the
            # command runs here, and a child forked later finds no one to
            # report to and exits before it starts.
            sock.settimeout(_ACK_TIMEOUT_S)
            socket.send_fds(sock, [_HEADER.pack(len(request)) + request], [0, 1, 2])
            started = _recv_exact(sock, 1)
            sock.settimeout(None)
        except OSError:  # TimeoutError included
            return None
        if started != b"+":
            return None  # refused or gone before the fork: run it here
        return _await_status(sock)


def _await_status(sock: socket.socket) -> int:
    def forward(signum: int, _frame: Any) -> None:
        with contextlib.suppress(OSError):  # the warm process is gone
            sock.sendall(_STATUS.pack(signum))

    previous = {
        sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        reply = _recv_exact(sock, _STATUS.size)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if len(reply) < _STATUS.size:
        print(
            "latentflow: error: the warm process running this command was stopped"
            " (see `latentflow warm`'s output)",
            file=sys.stderr,
        )
        return 2
    return int(_STATUS.unpack(reply)[0])


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


# -------------------------------------------------------------- the warm process


def _import_what_a_run_imports() -> None:
    """Import what a run imports; importing the flows builds their definitions.

    The list holds what a reusing run on weatherAUS imports that the flows'
    own imports do not (measured with an import hook; each was >= 10 ms).
    """
    for module in (
        "torch",
        "mlflow",
        "mlflow.pyfunc",
        "mlflow.tracking",
        "mlflow.store.tracking.sqlalchemy_store",
        "mlflow.store.model_registry.sqlalchemy_store",
        "mlflow.tracing.processor.base_mlflow",
        "sqlalchemy.engine",
        "prefect.flow_engine",
        "prefect.task_engine",
        "flows.backfill",
        "flows.nightly",
        "flows.runtime_checks",
        "tasks.registry",
        "tasks.score",
        "tasks.train",
    ):
        importlib.import_module(module)


def serve(environment: Mapping[str, str], *, idle_exit_s: float = 0.0) -> int:
    """``latentflow warm``: load the libraries, then serve commands until stopped.

    ``environment`` is the process's environment as it started, before the CLI
    set its logging defaults: commands are matched against it.
    """
    t0 = time.monotonic()
    fingerprint = current_fingerprint()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Bound now, listening only once ready: a command that comes earlier
        # is refused at once and runs in its own process.
        listener.bind(address(environment, fingerprint))
    except OSError:
        listener.close()
        _say("one is already running for this code and environment")
        return 0
    with listener:
        return _serve(listener, environment, fingerprint, idle_exit_s, t0)


def _serve(
    listener: socket.socket,
    environment: Mapping[str, str],
    fingerprint: str,
    idle_exit_s: float,
    t0: float,
) -> int:
    from flows import cli
    from tasks.errors import EnvironmentFault

    # Prefect's server by the CLI's own rules (none when an API URL is set; a
    # PostgreSQL database migrated first), started early as a run starts it.
    server = cli.start_early_server()
    _import_what_a_run_imports()
    server = cli.prepare_prefect(server, early=True)
    api_url = (
        server.wait(cli.startup_timeout())
        if server is not None
        else environment.get("PREFECT_API_URL")
    )
    if threading.active_count() != 1:
        names = ", ".join(t.name for t in threading.enumerate())
        raise EnvironmentFault(f"cannot fork safely: threads running ({names})")
    listener.listen(16)
    stop = _StopFlag()
    signal.signal(signal.SIGTERM, stop.set)
    signal.signal(signal.SIGINT, stop.set)
    _say(f"{READY} {time.monotonic() - t0:.1f} s (pid {os.getpid()})")
    children: set[int] = set()
    try:
        status = _serve_commands(
            listener, server, api_url, fingerprint, idle_exit_s, stop, children
        )
        # New commands now run on their own; the running ones finish first,
        # on the server they started with (a second signal stops them with it).
        listener.close()
        _reap(children)
        if children and status is not None:
            _say(f"waiting for {len(children)} running command(s) to finish")
            stop.is_set = False
            while children and not stop.is_set:
                time.sleep(0.2)
                _reap(children)
    finally:
        if server is not None:
            server.stop()
    _say("stopped")
    return status if status is not None else 2


def _serve_commands(
    listener: socket.socket,
    server: TemporaryServer | None,
    api_url: str | None,
    fingerprint: str,
    idle_exit_s: float,
    stop: _StopFlag,
    children: set[int],
) -> int | None:
    """Accept commands until told to stop; the exit status, None if the server
    died (the running commands cannot finish then)."""
    served = 0
    last_used = next_check = time.monotonic()
    while not stop.is_set:
        _reap(children)
        if server is not None and (
            server.process is None or server.process.poll() is not None
        ):
            _say("Prefect's temporary server exited; stopping")
            return None
        if time.monotonic() >= next_check:
            # Stat-only, but every few seconds, not every second: idle, the
            # warm process should cost next to nothing.
            next_check = time.monotonic() + _CODE_CHECK_S
            if current_fingerprint() != fingerprint:
                _say("the code or its libraries changed; stopping")
                return 0
        if children:
            last_used = time.monotonic()
        elif idle_exit_s and time.monotonic() - last_used > idle_exit_s:
            _say(f"idle for {idle_exit_s:g} s; stopping")
            return 0
        ready, _, _ = select.select([listener], [], [], 1.0)
        if not ready:
            continue
        conn, _ = listener.accept()
        served += 1
        last_used = time.monotonic()
        pid = _accept(conn, served, api_url)
        if pid is not None:
            children.add(pid)
    return 0


def _reap(children: set[int]) -> None:
    """Collect the exit of every finished child."""
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


class _StopFlag:
    def __init__(self) -> None:
        self.is_set = False

    def set(self, *_: Any) -> None:
        self.is_set = True


def _say(text: str) -> None:
    print(f"{PREFIX} {text}", file=sys.stderr, flush=True)


#: What every line of the warm process starts with, and the line it prints
#: once it serves: scripts that start one wait for it (:func:`started`).
PREFIX = "latentflow warm:"
READY = "ready in"


@contextlib.contextmanager
def started(
    executable: str | os.PathLike[str],
    env: Mapping[str, str],
    cwd: Path,
    log: Path,
    timeout_s: float = 240.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """``EXECUTABLE warm`` in its own session, once it serves; stopped on exit.

    For scripts and tests that start one around their commands. Its output
    goes to ``log``. Raises RuntimeError (with the log) if it exits or is not
    ready within ``timeout_s``. On exit it gets SIGTERM, which lets a running
    command finish, and its process group SIGKILL after 30 s more.
    """
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [os.fspath(executable), "warm"],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while f"{PREFIX} {READY}" not in log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"latentflow warm did not start:\n{log.read_text()}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _accept(conn: socket.socket, number: int, api_url: str | None) -> int | None:
    """Read one request and fork its child; the child's pid, None if refused."""
    fds: list[int] = []
    try:
        conn.settimeout(5.0)
        creds = conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")
        )
        _pid, uid, _gid = struct.unpack("3i", creds)
        if uid != os.getuid():
            _say(f"refused a command from uid {uid}")
            return None
        head, fds, _flags, _addr = socket.recv_fds(conn, _HEADER.size, 3)
        if len(head) < _HEADER.size or len(fds) != 3:
            return None
        (size,) = _HEADER.unpack(head)
        if size > _MAX_REQUEST:
            return None
        request = json.loads(_recv_exact(conn, size))
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its status
            _child(conn, fds, request, api_url)
        _say(f"command {number}: latentflow {' '.join(request['argv'])} (pid {pid})")
        return pid
    except (OSError, ValueError, KeyError) as exc:
        _say(f"a command could not be read: {exc}")
        return None
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _child(
    conn: socket.socket, fds: list[int], request: dict[str, Any], api_url: str | None
) -> None:
    """Become the command's process, run it, send its status, exit."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # The warm process's exit hooks (its server's stop) are not ours.
        atexit._clear()
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        os.environ.clear()
        os.environ.update(request["env"])
        if api_url and not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = api_url
        argv = [str(a) for a in request["argv"]]
        sys.argv = ["latentflow", *argv]
        conn.settimeout(None)
        try:
            conn.sendall(b"+")
        except OSError:
            os._exit(1)  # the command gave up waiting and runs on its own
        threading.Thread(target=_watch_command, args=(conn,), daemon=True).start()
        code = _run_command(argv)
    except SystemExit as exc:
        from flows.cli import exit_status_of

        code = exit_status_of(exc.code)
    except BaseException:  # a bug: its traceback, as a fresh process would print
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()
            from flows.cli import flush_output

            flush_output()
            conn.sendall(_STATUS.pack(code))
        finally:
            os._exit(code)


def _run_command(argv: list[str]) -> int:
    from flows import cli

    # Logging was configured in the warm process, for its own verbosity and
    # environment; configure it again for this command's, as a fresh one would.
    verbosity = cli.verbosity_of(argv)
    cli.quiet_logging(verbosity)
    _reconfigure_logging()
    return cli.main(argv)


def _reconfigure_logging() -> None:
    from mlflow.utils import logging_utils
    from prefect.context import refresh_global_settings_context
    from prefect.logging.configuration import setup_logging

    refresh_global_settings_context()
    setup_logging(incremental=False)
    logging_utils._configure_mlflow_loggers(root_module_name="mlflow")


def _watch_command(conn: socket.socket) -> None:
    """Raise in this process the signals sent to the command's process.

    The connection closing means that process was killed outright: end this
    one the same way. (SIGTERM would not do: during a run Prefect turns it
    into an exception, which the run may not see at once.) A killed run is
    one the pipeline recovers from (docs/failures.md).
    """
    while True:
        data = _recv_exact(conn, _STATUS.size)
        if len(data) < _STATUS.size:
            os.kill(os.getpid(), signal.SIGKILL)
            return
        os.kill(os.getpid(), int(_STATUS.unpack(data)[0]))
