"""Synthetic rows on weatherAUS: the GAN, the VAE and the independent baseline.

``make bench-synthesis`` (or ``python -m benchmarks.synthesis``) ingests
``../shared/data/weatherAUS.csv`` into a temporary data dir with the pipeline's
own ingest and preset rules, fits the three generators with the settings
``latentflow synthesize`` uses, draws rows through the same checks (rules,
copies) and prints the quality report, plus how long each generator took.
Skips cleanly (exit 0) when the file is absent.

The same code as the flow, without Prefect and MLflow around it: the numbers
are the ones a ``latentflow synthesize`` run would print for the same rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from benchmarks.common import WEATHER_CSV
from flows.config import PRESETS
from models.synthesis import GeneratorSettings, TableGenerator, generate
from tasks.ingest import ingest
from tasks.synth_quality import EVAL_ROWS, evaluate
from tasks.synth_rules import rule_filter
from tasks.synth_source import latest_partition, load_rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--input", default=str(WEATHER_CSV))
    p.add_argument("--rows", type=int, default=EVAL_ROWS, help="rows per generator")
    p.add_argument("--gan-steps", type=int, default=GeneratorSettings.gan_steps)
    p.add_argument("--vae-epochs", type=int, default=GeneratorSettings.vae_epochs)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the report as JSON here")
    args = p.parse_args(argv)
    src_csv = Path(args.input)
    if not src_csv.is_file():
        print(f"skipped: {src_csv} not found", file=sys.stderr)
        return 0
    preset = PRESETS["weatheraus"]
    rules = list(preset["rules"])
    settings = GeneratorSettings(
        gan_steps=args.gan_steps, vae_epochs=args.vae_epochs, seed=args.seed
    )
    with tempfile.TemporaryDirectory(prefix="lf-bench-synth-") as tmp:
        data_dir = Path(tmp)
        ingest(
            src_csv,
            data_dir,
            "weatheraus",
            date(2000, 1, 1),
            keys=preset["keys"],
            label=preset["label"],
            rules=rules,
        )
        src = load_rows(latest_partition(data_dir, "weatheraus"), args.seed)
    base = TableGenerator.fit(
        "independent",
        src.train,
        src.numeric,
        src.categorical,
        settings,
        label=src.label,
    )
    import numpy as np

    base.forbidden = np.unique(
        np.concatenate(
            [base.space.row_hashes(src.train), base.space.row_hashes(src.holdout)]
        )
    )
    samples = {}
    timings = {}
    notes = []
    for kind in ("gan", "vae", "independent"):
        t0 = time.perf_counter()
        gen = (
            base
            if kind == "independent"
            else TableGenerator.fit(
                kind,
                src.train,
                src.numeric,
                src.categorical,
                settings,
                label=src.label,
                forbidden=base.forbidden,
                rules=rules,
                keep=rule_filter(rules, base.kinds()),
            )
        )
        fit_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = generate(gen, args.rows, args.seed, rule_filter(rules, gen.kinds()))
        gen_s = time.perf_counter() - t0
        samples[kind] = out.table
        timings[kind] = {"fit_s": round(fit_s, 1), "generate_s": round(gen_s, 1)}
        notes.append(
            f"{kind}: fit {fit_s:.1f} s, {args.rows} rows in {gen_s:.1f} s;"
            f" {out.broke_rules} of {out.drawn} draws broke a rule,"
            f" {out.copies} copied a real row"
        )
    t0 = time.perf_counter()
    report = evaluate(
        src.train,
        src.holdout,
        samples,
        src.numeric,
        src.categorical,
        src.label,
        args.seed,
    )
    report.notes = [
        *notes,
        f"train rows {src.train.num_rows}, held-out rows {src.holdout.num_rows},"
        f" report {time.perf_counter() - t0:.1f} s",
    ]
    print(report.text())
    if args.json:
        Path(args.json).write_text(
            json.dumps({**report.to_dict(), "timings": timings}, indent=1)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
