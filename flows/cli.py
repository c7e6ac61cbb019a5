"""``latentflow``: the command-line entry point.

``latentflow run`` executes the nightly flow once, in-process, and prints ONE
line of JSON to stdout. A user's mistake (bad input, bad config, a registry that
is down, a run already in progress) is one line on stderr and exit status 2,
never a traceback. Stage lines and training progress go to stderr
(:mod:`tasks.progress`); ``--quiet`` leaves only the JSON line and errors,
``--verbose`` adds Prefect's and MLflow's logs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import os
import sys
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tasks import progress
from tasks.errors import LatentflowError, describe_fault
from tasks.sources import check_sources

if TYPE_CHECKING:
    from flows.prefect_server import TemporaryServer

EXIT_USER_ERROR = 2
QUIET, NORMAL, VERBOSE = -1, 0, 1


def _date(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected YYYY-MM-DD, got {text!r}") from None


class _Version(argparse.Action):
    """``--version``: the installed version, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: Any) -> None:
        kwargs.setdefault("nargs", 0)
        kwargs.setdefault("default", argparse.SUPPRESS)
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("latentflow")
        except PackageNotFoundError:
            found = "unknown"
        print(f"latentflow {found}")
        parser.exit()


def _output_flags(parser: argparse.ArgumentParser, default: Any) -> None:
    """``--quiet`` / ``--verbose``, before or after the subcommand."""
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument(
        "-q",
        "--quiet",
        dest="verbosity",
        action="store_const",
        const=QUIET,
        default=default,
        help="print only the JSON line and errors",
    )
    loud.add_argument(
        "-v",
        "--verbose",
        dest="verbosity",
        action="store_const",
        const=VERBOSE,
        default=default,
        help="also print Prefect's and MLflow's logs",
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentflow",
        description="Tabular data in; latent features and anomaly flags out.",
    )
    p.add_argument("--version", action=_Version, help="print the version and exit")
    _output_flags(p, NORMAL)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the pipeline once, in-process")
    _output_flags(run, argparse.SUPPRESS)
    run.add_argument("--input", help="CSV/Parquet file, directory or glob")
    run.add_argument("--dataset", help="dataset name (default: from the file name)")
    run.add_argument("--data-dir", help="output root (default: ./latentflow-data)")
    run.add_argument("--run-date", type=_date, help="partition date (default: today)")
    run.add_argument(
        "--retrain", action="store_true", default=None, help="force training"
    )
    run.add_argument(
        "--promote",
        action="store_true",
        default=None,
        help="train a challenger and promote it whatever the gate says",
    )
    run.add_argument("--latent-dim", type=int, help="size of the latent code")
    run.add_argument(
        "--kind", help="model family, e.g. ae or vae (docs/models.md lists them)"
    )
    run.add_argument("--epochs", type=int, help="most training epochs")
    run.add_argument(
        "--window", type=int, help="with --kind sequence: days per window (default 7)"
    )
    run.add_argument("--device", help="auto | cpu | cuda")
    run.add_argument(
        "--runner",
        choices=["sequential", "threads", "dask"],
        help="where ingest and scoring run (default: sequential)",
    )
    run.add_argument(
        "--dask-address",
        metavar="ADDRESS",
        help="with --runner dask: a running scheduler, e.g. tcp://127.0.0.1:8786",
    )
    run.add_argument(
        "--dask-workers",
        type=int,
        metavar="N",
        help="with --runner dask: start a local cluster of N worker processes",
    )
    run.add_argument(
        "--config",
        help="YAML or TOML file with PipelineConfig fields, flat or in sections",
    )
    _add_operations_options(run)
    _add_backfill(sub)

    warm = sub.add_parser(
        "warm",
        help="keep the libraries loaded, so later runs start fast (docs/pipeline.md)",
    )
    _output_flags(warm, argparse.SUPPRESS)
    warm.add_argument(
        "--idle-exit",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="stop after this long without a command (default: never)",
    )

    demo = sub.add_parser("demo", help="run on generated weatherAUS-shaped data")
    _output_flags(demo, argparse.SUPPRESS)
    demo.add_argument("--data-dir", default=".demo", help="output root (default .demo)")
    demo.add_argument("--rows", type=int, default=20_000, help="rows to generate")
    demo.add_argument("--run-date", type=_date, help="partition date (default: today)")

    serve = sub.add_parser(
        "serve-model", help="verify a registered model and serve it on 127.0.0.1"
    )
    serve.add_argument("--data-dir", required=True, help="the run's output root")
    serve.add_argument("--dataset", required=True, help="dataset name")
    which = serve.add_mutually_exclusive_group()
    which.add_argument("--version", type=int, help="model version")
    which.add_argument("--alias", default="champion", help="alias (default champion)")
    serve.add_argument("--port", type=int, default=5001, help="port (default 5001)")

    synth = sub.add_parser(
        "synthesize",
        help="write synthetic rows of an ingested dataset (docs/synthesis.md)",
    )
    synth.add_argument("--data-dir", required=True, help="the pipeline's output root")
    synth.add_argument("--dataset", required=True, help="dataset name, as ingested")
    synth.add_argument("--rows", required=True, type=int, help="rows to write")
    synth.add_argument("--output", required=True, help="Parquet file to write")
    synth.add_argument("--generator", choices=["gan", "vae"], default="gan")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    # Unset: the generators' own defaults (models.synthesis.GeneratorSettings).
    synth.add_argument("--gan-steps", type=int, help="GAN training steps")
    synth.add_argument("--vae-epochs", type=int, help="VAE training epochs")
    return p


def _add_operations_options(p: argparse.ArgumentParser) -> None:
    """Retention and the training window (docs/operations.md)."""
    p.add_argument(
        "--train-window-days",
        type=int,
        metavar="N",
        help="a run that trains uses the last N days of ingested partitions",
    )
    p.add_argument(
        "--keep-days",
        type=int,
        metavar="N",
        help="after a successful run, remove partitions older than N days",
    )
    p.add_argument(
        "--keep-versions",
        type=int,
        metavar="N",
        help="keep N model versions besides the champion (and previous champion)",
    )


def _add_backfill(sub: Any) -> None:
    b = sub.add_parser(
        "backfill",
        help="run the pipeline for every date of a range, in order; resumable",
    )
    b.add_argument("--from", dest="start", type=_date, required=True, metavar="D1")
    b.add_argument("--to", dest="end", type=_date, required=True, metavar="D2")
    b.add_argument("--input", help="file, or a template such as drops/{run_date}.csv")
    b.add_argument("--dataset", help="dataset name (default: from the input)")
    b.add_argument("--data-dir", help="output root (default: ./latentflow-data)")
    b.add_argument(
        "--retrain", action="store_true", default=None, help="force training"
    )
    b.add_argument("--latent-dim", type=int, help="size of the latent code")
    b.add_argument("--kind", help="model family, e.g. ae or vae")
    b.add_argument("--epochs", type=int, help="most training epochs")
    b.add_argument("--device", help="auto | cpu | cuda")
    b.add_argument(
        "--runner",
        choices=["sequential", "threads", "dask"],
        help="where ingest and scoring run (default: sequential)",
    )
    b.add_argument("--config", help="YAML or TOML file with PipelineConfig fields")
    _add_operations_options(b)


def run_backfill(
    config_file: str | None, overrides: dict[str, Any], start: date, end: date
) -> dict[str, Any]:
    """Build the config and run the backfill flow; returns its summary."""
    from flows.config import build_config
    from tasks.drops import is_template, run_dates

    cfg = build_config(config_file, overrides)
    run_dates(start, end)  # an empty or huge range fails before Prefect starts
    if not is_template(cfg.data.input):
        check_sources(cfg.data.input)
    from flows.backfill import backfill
    from flows.runtime_checks import check_prefect_database, check_runtime

    _install_log_filter()
    check_runtime(cfg)
    check_prefect_database()
    with _stdout_to_stderr():
        return backfill(start=start, end=end, config=cfg)


def _engine_defaults() -> None:
    # The in-process Prefect server gets 20 s to start by default; a first run on
    # a fresh PREFECT_HOME (migrations), several runs at once, or a busy machine
    # need longer, and a timeout there is a traceback, not a result.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


def quiet_logging(verbosity: int = NORMAL) -> None:
    # stdout carries exactly one JSON line; library chatter goes to stderr or away.
    if verbosity != NORMAL:
        # Asked for on the command line: wins over the environment.
        level = "INFO" if verbosity == VERBOSE else "ERROR"
        for name in ("PREFECT_LOGGING_LEVEL", "MLFLOW_LOGGING_LEVEL"):
            os.environ[name] = level
    if verbosity == QUIET:
        import warnings

        warnings.simplefilter("ignore")
    if verbosity == VERBOSE:
        os.environ["PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"] = "NOTSET"
    else:
        # Prefect's run logs still reach its API (the UI's run page); the
        # terminal gets the stage lines and, on a failure, one error line or
        # a bug's traceback, not the same failure again in Prefect's words.
        os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
        # Prefect's own machinery (its event and log workers) logs to stderr
        # past the console handler, and a log handler that fails prints its
        # error: a Prefect server gone mid-run would bury the one error line
        # under one such message per queued event.
        os.environ.setdefault("PREFECT_INTERNAL_LOGGING_LEVEL", "CRITICAL")
        logging.raiseExceptions = False
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # MLflow sets its own loggers to INFO when imported, after this runs.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    # No network here or on most workers: telemetry only produces error lines.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    logging.getLogger("mlflow").setLevel(
        logging.INFO if verbosity == VERBOSE else logging.ERROR
    )
    # A local Dask cluster's scheduler and nannies log their routine here,
    # some of it with a traceback (a connection closed at shutdown).
    logging.getLogger("distributed").setLevel(logging.ERROR)
    logging.getLogger("alembic").setLevel(logging.ERROR)
    # MLflow logs a traceback for each SQLite "database is locked" before raising;
    # the registry retries those and reports a final failure in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _is_user_facing(exc: BaseException | None) -> bool:
    return exc is not None and describe_fault(exc) is not None


def _install_log_filter() -> None:
    """A user's mistake or an environmental fault is reported in one line: drop
    the traceback Prefect's engine (or MLflow's store) attaches to its log
    record. Done where records are made, since libraries add their handlers
    late and some (MLflow's) do not propagate."""
    make = logging.getLogRecordFactory()
    if getattr(make, "_latentflow", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        if record.exc_info and _is_user_facing(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return record

    factory._latentflow = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)


def run_pipeline(
    config_file: str | None,
    overrides: dict[str, Any],
    *,
    early_server: bool = False,
    verbosity: int = NORMAL,
) -> dict[str, Any]:
    """Build the config and run the flow; returns the summary dict.

    ``early_server`` (the CLI): with no Prefect API configured, start the
    temporary server now, so it starts while torch and MLflow are imported
    (:mod:`flows.prefect_server`). Without it, Prefect's own starts on demand.
    """
    from flows.config import build_config

    cfg = build_config(config_file, overrides)
    # The options first, then the input: both in well under a second, before
    # Prefect or MLflow is imported and before anything is created on disk.
    # (A date-templated input is checked by the flow, which alerts when the
    # night's drop is missing.)
    from tasks.drops import is_template

    if not is_template(cfg.data.input):
        check_sources(cfg.data.input)
    from flows.runtime_checks import check_local

    check_local(cfg)
    server = start_early_server() if early_server else None
    progress.current().status("starting Prefect and loading libraries …")
    # The flow imports torch and MLflow (seconds): only once the run is valid.
    from flows.runtime_checks import check_runtime

    server = prepare_prefect(server, early_server)
    from flows.nightly import nightly

    _install_log_filter()
    check_runtime(cfg)
    if verbosity != VERBOSE:
        _silence_mlflow_prints()
    if server is not None:
        use_api(server.wait(startup_timeout()))
    with _stdout_to_stderr():
        return nightly(config=cfg)


def start_early_server() -> TemporaryServer | None:
    """Prefect's temporary server on the SQLite database, launched now (it
    boots while the caller imports); None when the environment names a
    running server or a database URL, which :func:`prepare_prefect` handles."""
    from flows.prefect_server import TemporaryServer, wants_temporary_server
    from flows.runtime_checks import check_prefect_sqlite, default_prefect_database

    if not wants_temporary_server(os.environ) or _env_sets_prefect_database():
        # A running server; or a database URL, checked (and a PostgreSQL one
        # migrated) before a server starts on it (below).
        return None
    # A corrupt database is one line here, not a server's traceback.
    check_prefect_sqlite(default_prefect_database())
    return TemporaryServer().start()


def _env_sets_prefect_database() -> bool:
    return any(
        os.environ.get(name)
        for name in (
            "PREFECT_API_DATABASE_CONNECTION_URL",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL",
        )
    )


def prepare_prefect(
    server: TemporaryServer | None, early: bool
) -> TemporaryServer | None:
    """Check Prefect's database; keep the early server only if it is wanted.

    Prefect's settings can also come from a profile or a settings file, which
    only Prefect reads: an API URL there means no temporary server, and a
    PostgreSQL database is migrated (:func:`check_prefect_database`) before
    any server starts on it.
    """
    from flows.prefect_server import (
        TemporaryServer,
        configured_api_url,
        wants_temporary_server,
    )
    from flows.runtime_checks import check_prefect_database, prefect_on_postgres

    if configured_api_url():
        if server is not None:
            server.stop()
        return None
    if server is not None and prefect_on_postgres():
        server.stop()
        server = None
    check_prefect_database()
    if server is None and early and wants_temporary_server(os.environ):
        # The database is checked (a PostgreSQL one migrated): start it now.
        server = TemporaryServer().start()
    return server


def startup_timeout() -> float:
    """Seconds to wait for the temporary server: Prefect's own setting."""
    try:
        return float(os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"])
    except (KeyError, ValueError):
        return 120.0


def use_api(url: str) -> None:
    """Point this process (and processes it starts) at ``url``."""
    from prefect.context import refresh_global_settings_context

    os.environ["PREFECT_API_URL"] = url
    refresh_global_settings_context()


def _silence_mlflow_prints() -> None:
    """Mute MLflow's event stream for the rest of the process.

    "Successfully registered model …", "Created version …": MLflow prints these
    to its own stream, past its log level (--verbose keeps them). Its
    ``disable_logging()`` does not last: logging a model re-enables the stream
    on its way out, so the stream's switch is pinned off instead.
    """
    from mlflow.utils import logging_utils

    stream = logging_utils.MLFLOW_LOGGING_STREAM

    class _Muted(type(stream)):  # type: ignore[misc]
        _enabled = property(lambda self: False, lambda self, value: None)

    stream.__class__ = _Muted


class _stdout_to_stderr:
    """Anything a library prints while the flow runs must not reach stdout."""

    def __enter__(self) -> None:
        self._saved = sys.stdout
        sys.stdout = sys.stderr

    def __exit__(self, *exc: object) -> None:
        sys.stdout = self._saved


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "input": args.input,
        "dataset": args.dataset,
        "data_dir": args.data_dir,
        "run_date": getattr(args, "run_date", None),
        "retrain": getattr(args, "retrain", None),
        "promote": getattr(args, "promote", None),
        "latent_dim": args.latent_dim,
        "kind": args.kind,
        "epochs": args.epochs,
        "window": getattr(args, "window", None),
        "device": args.device,
        "runner": args.runner,
        "dask_workers": getattr(args, "dask_workers", None),
        "dask_address": getattr(args, "dask_address", None),
        "train_window_days": args.train_window_days,
        "keep_days": args.keep_days,
        "keep_versions": args.keep_versions,
    }


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    from tasks.synthetic import write_weatheraus_like_csv

    data_dir = Path(args.data_dir).resolve()
    src = data_dir / "input" / "weatherAUS-sample.csv"
    if not src.exists():
        write_weatheraus_like_csv(src, args.rows, seed=0)
    summary = run_pipeline(
        None,
        {
            "input": str(src),
            "dataset": "weatheraus",
            "data_dir": str(data_dir),
            "run_date": getattr(args, "run_date", None),
            "epochs": 30,
        },
        early_server=True,
        verbosity=args.verbosity,
    )
    if args.verbosity == QUIET:
        return summary
    print(f"input:   {src}", file=sys.stderr)
    print(
        f"outputs: {data_dir}/{{ingested,rejected,latent}}/weatheraus/", file=sys.stderr
    )
    print(
        f"mlflow:  mlflow ui --backend-store-uri sqlite:///{data_dir}/mlflow.db",
        file=sys.stderr,
    )
    return summary


def _data_dir(args: argparse.Namespace) -> Path:
    """The run's data dir as the user gave it (for naming paths in errors)."""
    from flows.config import DEFAULT_DATA_DIR, lift_flat, load_config_file

    given = args.data_dir
    if not given and getattr(args, "config", None):
        try:
            data = lift_flat(load_config_file(args.config)).get("data")
            given = data.get("data_dir") if isinstance(data, dict) else None
        except (LatentflowError, ValueError):
            given = None
    given = given or os.environ.get("LATENTFLOW_DATA_DIR", DEFAULT_DATA_DIR)
    return Path(str(given)).expanduser().resolve()


def _store_file(data_dir: Path) -> str | None:
    from tasks.registry import tracking_uri_for

    uri = tracking_uri_for(data_dir)
    if not uri.startswith("sqlite:///"):
        return None
    return f"MLflow store {uri.removeprefix('sqlite:///')}"


def verbosity_of(argv: list[str]) -> int:
    """The ``--quiet`` / ``--verbose`` level of a command line."""
    return int(_parser().parse_args(argv).verbosity)


def entry() -> int:
    """The ``latentflow`` console script: :func:`main`, handed to a warm process
    when one serves this code and environment (:mod:`flows.warm`).

    Run here, the process then exits as soon as its exit hooks have run: the
    interpreter's own teardown of torch, Prefect and MLflow adds 1.5-2 s and
    does nothing a finished run needs.
    """
    from flows.warm import hand_over

    argv = sys.argv[1:]
    try:
        status = hand_over(argv)
    except KeyboardInterrupt:  # before a warm process started the command
        print("latentflow: interrupted", file=sys.stderr)
        return 130
    if status is not None:
        return status
    exit_now = _ExitNow()
    # Registered before anything else the run registers, so it runs after all
    # of it: every later hook (Prefect's log and event drains, the temporary
    # server's stop) runs first.
    atexit.register(exit_now)
    try:
        exit_now.status = main(argv)
    except SystemExit as exc:
        exit_now.status = exit_status_of(exc.code)
        raise
    except KeyboardInterrupt:
        exit_now.status = 130
        raise
    return exit_now.status


class _ExitNow:
    """The last exit hook: flush, then end the process with its status."""

    def __init__(self) -> None:
        self.status = 1  # an uncaught exception's status

    def __call__(self) -> None:
        flush_output()
        os._exit(self.status)


def flush_output() -> None:
    """Close the logging handlers and flush stdout and stderr.

    ``logging.shutdown`` is an exit hook registered when logging is imported,
    before any of ours, so it would otherwise run after them.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or a gone pipe
            stream.flush()


def exit_status_of(code: object) -> int:
    """The exit status Python gives ``SystemExit(code)``."""
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def main(argv: list[str] | None = None) -> int:
    environment = dict(os.environ)  # as it was, before the defaults below
    args = _parser().parse_args(argv)
    verbosity = args.verbosity
    quiet_logging(verbosity)
    _engine_defaults()
    progress.configure(verbosity != QUIET)
    try:
        if args.command == "warm":
            from flows.warm import serve

            return serve(environment, idle_exit_s=args.idle_exit)
        if args.command == "serve-model":
            from flows.serve_model import serve_model

            serve_model(
                Path(args.data_dir), args.dataset, args.version, args.alias, args.port
            )
            return 0
        if args.command == "synthesize":
            from flows.synthesize_cli import run_synthesize

            summary = run_synthesize(args)
        elif args.command == "demo":
            summary = _demo(args)
        elif args.command == "backfill":
            if not args.input and not args.config:
                raise LatentflowError(
                    "--input (or a --config with 'input') is required"
                )
            summary = run_backfill(args.config, _overrides(args), args.start, args.end)
            for miss in summary.get("missing", []):
                print(
                    f"latentflow: warning: no drop for {miss['run_date']}:"
                    f" expected {miss['expected']}",
                    file=sys.stderr,
                )
        else:
            if not args.input and not args.config:
                raise LatentflowError(
                    "--input (or a --config with 'input') is required"
                )
            summary = run_pipeline(
                args.config, _overrides(args), early_server=True, verbosity=verbosity
            )
    except LatentflowError as exc:
        progress.current().close()
        print(f"latentflow: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except Exception as exc:
        # Disk full, read-only or forbidden paths, a locked or corrupt store:
        # the environment's fault, one line; anything else is a bug.
        where = _data_dir(args)
        fault = describe_fault(exc, where=str(where), database=_store_file(where))
        progress.current().close()
        if fault is None:
            raise
        print(f"latentflow: error: {fault}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        progress.current().close()
        print("latentflow: interrupted", file=sys.stderr)
        return 130
    progress.current().close()
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(entry())
