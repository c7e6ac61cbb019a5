"""``latentflow synthesize``: the request checked at once, then the flow.

The checks (dataset, rows, output) run before Prefect, MLflow or torch is
imported, so a mistake costs well under a second and writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tasks.errors import ConfigError
from tasks.synth_source import check_request


def run_synthesize(args: argparse.Namespace) -> dict[str, Any]:
    """Check the request, run the flow in-process; the report goes to stderr,
    the summary (returned) to stdout as one JSON line."""
    for flag, value, low in (
        ("--seed", args.seed, 0),
        ("--gan-steps", args.gan_steps, 1),
        ("--vae-epochs", args.vae_epochs, 1),
    ):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be {low} or more, got {value}")
    check_request(Path(args.data_dir), args.dataset, args.rows, Path(args.output))
    from flows.cli import _install_log_filter, _stdout_to_stderr
    from flows.runtime_checks import check_prefect_database
    from flows.synthesize import SynthesizeParams, synthesize

    params = SynthesizeParams(
        data_dir=str(Path(args.data_dir).resolve()),
        dataset=args.dataset,
        rows=args.rows,
        output=str(Path(args.output).resolve()),
        generator=args.generator,
        seed=args.seed,
        **{
            name: value
            for name, value in (
                ("gan_steps", args.gan_steps),
                ("vae_epochs", args.vae_epochs),
            )
            if value is not None
        },
    )
    _install_log_filter()
    check_prefect_database()
    with _stdout_to_stderr():
        summary = synthesize(params=params)
    report = summary.pop("report")
    print(report, file=sys.stderr)
    return summary
