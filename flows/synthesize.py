"""``latentflow-synthesize``: synthetic raw rows of an ingested dataset.

The flow reads the dataset's newest ingested partition, holds out a share of
its rows, trains (or reuses, when the rows and settings are unchanged) the
GAN and the VAE generators, registers each as a version of
``<dataset>-generator``, writes the requested generator's rows as Parquet and
judges all of them, beside the independent-columns baseline, in a quality
report (printed, logged to MLflow as ``synthesis_report.md``, and kept as a
Prefect artifact). ``latentflow synthesize`` runs it in-process; the
``synthesize`` deployment runs it with the form :class:`SynthesizeParams`.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import pyarrow.parquet as pq
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, ConfigDict, Field

from flows.config import PRESETS, run_confinement
from models.atomic import atomic_path
from models.synthesis import (
    GENERATOR_FORMAT,
    Generated,
    GeneratorSettings,
    TableGenerator,
    column_kinds,
    generate,
)
from tasks.generator_registry import (
    find_generator,
    log_report,
    register_generator,
)
from tasks.policy import PLAIN
from tasks.registry import configure
from tasks.synth_quality import EVAL_ROWS, QualityReport, evaluate
from tasks.synth_rules import rule_filter
from tasks.synth_source import SourceRows, check_request, load_rows

FLOW_NAME = "latentflow-synthesize"
LEARNT = ("gan", "vae")


class SynthesizeParams(BaseModel):
    """What to generate; the deployment's run form."""

    model_config = ConfigDict(extra="forbid")

    data_dir: str = Field(
        description="The pipeline's data dir (holds ingested/ and mlflow.db)",
        min_length=1,
    )
    dataset: str = Field(
        description="Dataset name, as ingested", pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$"
    )
    rows: int = Field(description="Rows to write", gt=0, le=10_000_000)
    output: str = Field(description="Parquet file to write (its directory must exist)")
    generator: Literal["gan", "vae"] = Field(
        "gan", description="Which generator writes the output rows"
    )
    seed: int = Field(0, ge=0, description="Same seed and rows: same output")
    gan_steps: int = Field(
        GeneratorSettings.gan_steps, gt=0, description="GAN training steps"
    )
    vae_epochs: int = Field(
        GeneratorSettings.vae_epochs, gt=0, description="VAE training epochs"
    )
    rules: list[str] | None = Field(
        None, description="Domain rules the rows must pass (default: the preset's)"
    )

    def settings(self) -> GeneratorSettings:
        return GeneratorSettings(
            gan_steps=self.gan_steps, vae_epochs=self.vae_epochs, seed=self.seed
        )

    def dataset_rules(self) -> list[str]:
        if self.rules is not None:
            return list(self.rules)
        return list(PRESETS.get(self.dataset, {}).get("rules", []))


def _confine(params: SynthesizeParams) -> None:
    """A run started from a deployment (an API caller chose its parameters)
    writes only under the host's data roots (:func:`flows.config.confinement`);
    a ConfigError before anything is read or written."""
    policy = run_confinement()
    if policy is not None:
        policy.check_writes(data_dir=params.data_dir, output=params.output)


def _load(params: SynthesizeParams) -> SourceRows:
    partition = check_request(
        Path(params.data_dir), params.dataset, params.rows, Path(params.output)
    )
    return load_rows(partition, params.seed)


def _train_or_reuse(
    kind: str,
    src: SourceRows,
    params: SynthesizeParams,
    base: TableGenerator,
    rules: list[str],
) -> tuple[TableGenerator, dict[str, Any]]:
    """A generator of ``kind``: the registered one for these rows and settings,
    else a new one, trained, saved and registered."""
    data_dir = Path(params.data_dir).resolve()
    settings = params.settings()
    fingerprint = src.fingerprint(
        base.forbidden,
        {
            "kind": kind,
            "rules": rules,
            "format": GENERATOR_FORMAT,
            **settings.to_dict(),
        },
    )
    found = find_generator(
        params.dataset, kind, fingerprint, data_dir / ".cache" / "models"
    )
    if found is not None:
        gen, version = found
        return gen, {"version": version.version, "reused": True}
    gen = TableGenerator.fit(
        kind,
        src.train,
        src.numeric,
        src.categorical,
        settings,
        label=src.label,
        forbidden=base.forbidden,
        rules=rules,
        keep=rule_filter(rules, column_kinds(src.numeric, src.categorical)),
    )
    tmp = Path(tempfile.mkdtemp(prefix=f".gen-{kind}-", dir=_scratch(data_dir)))
    try:
        gen_dir = gen.save(tmp / "model_dir")
        version = register_generator(
            gen_dir=gen_dir,
            dataset=params.dataset,
            data_dir=data_dir,
            kind=kind,
            fingerprint=fingerprint,
            params={
                "generator": kind,
                "train_rows": src.train.num_rows,
                "holdout_rows": src.holdout.num_rows,
                "partition": src.partition.name,
                **settings.to_dict(),
            },
            history=gen.history,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return gen, {"version": version.version, "reused": False}


def _scratch(data_dir: Path) -> Path:
    path = data_dir / ".staging"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write(table: Any, output: Path) -> None:
    """The rows as one Parquet file, replaced atomically (never half-written)."""
    with atomic_path(output) as tmp:
        pq.write_table(table, tmp)


load_task = task(_load, name="load-rows", **PLAIN)
train_task = task(
    _train_or_reuse, name="train-generator", task_run_name="train-{kind}", **PLAIN
)


@task(name="generate", task_run_name="generate-{kind}", **PLAIN)
def generate_task(
    kind: str, gen: TableGenerator, rows: int, seed: int, rules: list[str]
) -> Generated:
    return generate(gen, rows, seed, rule_filter(rules, gen.kinds()))


@task(name="quality-report", **PLAIN)
def report_task(src: SourceRows, synthetic: dict[str, Any], seed: int) -> QualityReport:
    return evaluate(
        src.train, src.holdout, synthetic, src.numeric, src.categorical, src.label, seed
    )


@flow(name=FLOW_NAME, flow_run_name="synthesize-{params.dataset}", log_prints=False)
def synthesize(params: SynthesizeParams) -> dict[str, Any]:
    """Train or reuse the generators, write the rows, report their quality.

    Returns the summary (also what the CLI prints as one JSON line); the report
    text is under ``report``.
    """
    _confine(params)
    data_dir = Path(params.data_dir).resolve()
    src = load_task(params)
    rules = params.dataset_rules()
    configure(data_dir)
    settings = params.settings()
    baseline = TableGenerator.fit(
        "independent",
        src.train,
        src.numeric,
        src.categorical,
        settings,
        label=src.label,
        rules=rules,
    )
    # Every row ever ingested in the partition is off limits, held-out ones too.
    baseline.forbidden = _all_hashes(baseline, src)
    gens: dict[str, TableGenerator] = {"independent": baseline}
    versions: dict[str, dict[str, Any]] = {}
    for kind in LEARNT:
        gens[kind], versions[kind] = train_task(kind, src, params, baseline, rules)
    n_eval = min(params.rows, EVAL_ROWS, max(src.holdout.num_rows, 1) * 2)
    out = generate_task(
        params.generator, gens[params.generator], params.rows, params.seed, rules
    )
    samples = {}
    for kind, gen in gens.items():
        if kind == params.generator:
            samples[kind] = out.table.slice(0, n_eval)
        else:
            samples[kind] = generate_task(kind, gen, n_eval, params.seed, rules).table
    report = report_task(
        src, {k: samples[k] for k in ("gan", "vae", "independent")}, params.seed
    )
    output = Path(params.output)
    _write(out.table, output)
    text = report.text()
    summary_report = report.to_dict()
    run_id = log_report(
        params.dataset,
        data_dir,
        text,
        summary_report,
        {"latentflow.step": "synthesize", "latentflow.generator": params.generator},
    )
    create_markdown_artifact(
        key=f"synthesis-{params.dataset}",
        markdown=report.table() + "\n\n" + text.split(report.table())[-1],
        description="Synthetic-data quality report",
    )
    return {
        "dataset": params.dataset,
        "generator": params.generator,
        "rows": out.table.num_rows,
        "output": str(output.resolve()),
        "drawn": out.drawn,
        "dropped_broke_rules": out.broke_rules,
        "dropped_copies": out.copies,
        "model_name": f"{params.dataset}-generator",
        "model_version": versions[params.generator]["version"],
        "reused": versions[params.generator]["reused"],
        "winner": report.winner(),
        "mlflow_run_id": run_id,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "report": text,
    }


def _all_hashes(gen: TableGenerator, src: SourceRows) -> Any:
    import numpy as np

    return np.unique(
        np.concatenate(
            [gen.space.row_hashes(src.train), gen.space.row_hashes(src.holdout)]
        )
    )
