"""A throwaway PostgreSQL cluster on 127.0.0.1 for the tests (stdlib only).

``.ci/run`` starts one before ``make test`` and exports its URL as
``LATENTFLOW_TEST_POSTGRES_URL``; without that variable the tests' fixture
starts its own when Debian's binaries are installed, and skips otherwise.

The cluster lives in a temporary directory: ``initdb`` with trust auth (it is
reachable from this machine only), ``pg_ctl`` on a free port and with its
socket in that directory. PostgreSQL refuses to run as root, so under root it
runs as the ``postgres`` user, who owns the directory.

    python3 tests/pg_cluster.py start      # prints "DIR URL"
    python3 tests/pg_cluster.py stop DIR
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

URL_ENV = "LATENTFLOW_TEST_POSTGRES_URL"
SUPERUSER = "postgres"


def bin_dir() -> Path | None:
    """The newest Debian PostgreSQL server binaries, or None when not installed."""
    found = sorted(
        (Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    for path in reversed(found):
        if (path / "initdb").is_file() and (path / "pg_ctl").is_file():
            return path
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as(user: pwd.struct_passwd | None, argv: list[str]) -> None:
    kwargs: dict[str, object] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8"}
    subprocess.run(
        argv,
        check=True,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # its chatter; errors go to stderr
        cwd="/",
        **kwargs,
    )


def _owner() -> pwd.struct_passwd | None:
    """Whom the server runs as: ``postgres`` under root, else ourselves."""
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def start() -> tuple[Path, str]:
    """Create and start a cluster in a new temporary directory.

    Returns the directory (for :func:`stop`) and the superuser's URL.
    """
    bins = bin_dir()
    if bins is None:
        raise FileNotFoundError(
            "no /usr/lib/postgresql/*/bin: apt-get install postgresql"
        )
    user = _owner()
    # Directly under the system temp dir: every parent must be searchable by
    # the server's user (pytest's and mktemp's directories are 0700 root).
    root = Path(tempfile.mkdtemp(prefix="latentflow-pg-"))
    root.chmod(0o755)
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    pgdata = root / "pgdata"
    port = _free_port()
    _run_as(
        user,
        [
            str(bins / "initdb"),
            "-D",
            str(pgdata),
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        ],
    )
    # fsync off: a test cluster is thrown away, and durability costs seconds.
    options = f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off"
    _run_as(
        user,
        [
            str(bins / "pg_ctl"),
            "-D",
            str(pgdata),
            "-l",
            str(root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        ],
    )
    url = f"postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres"
    return root, url


def stop(root: Path) -> None:
    """Stop the cluster under ``root`` (fast shutdown) and delete it."""
    bins = bin_dir()
    pgdata = root / "pgdata"
    if bins is not None and (pgdata / "postmaster.pid").exists():
        _run_as(
            _owner(),
            [str(bins / "pg_ctl"), "-D", str(pgdata), "-m", "fast", "-w", "stop"],
        )
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    if argv == ["start"]:
        root, url = start()
        print(root, url)
    elif len(argv) == 2 and argv[0] == "stop":
        stop(Path(argv[1]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
