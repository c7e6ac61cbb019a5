"""Measured steps for ``make bench``, each run in a fresh interpreter.

``python -m benchmarks.perf STEP '{"json": "kwargs"}'`` runs one step and prints
one line ``BENCH_RESULT {...}`` (JSON) as its last line on stdout. Every step
imports what it needs first, then times only the work inside :class:`Measure`,
so interpreter and import start-up never count towards a step's seconds.

Why a fresh process per step: peak RSS is a per-process high-water mark, so it
only describes one step if the process ran nothing else. It is read from
``VmHWM`` in ``/proc/self/status`` (the high-water mark of this process image)
rather than ``ru_maxrss``, which on Linux also inherits the pre-``exec``
high-water mark of the parent when the child was started with ``vfork``.
"""

from __future__ import annotations

import itertools
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.schema import TableSchema

RESULT_MARK = "BENCH_RESULT "
RUN_DATE = date(2024, 1, 1)
DATASET = "weatheraus"
MIB = 1024 * 1024


def peak_rss_mib() -> float:
    """This process's peak resident set size so far, in MiB."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024 / MIB
    except OSError:
        pass
    # Not Linux: ru_maxrss is KiB on Linux, bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / MIB


def _process_age_s() -> float:
    """Seconds since this interpreter started: its start-up plus imports so far."""
    import psutil

    return time.time() - psutil.Process().create_time()


class Measure:
    """Times a block and records peak RSS before (after imports) and after it."""

    def __enter__(self) -> Measure:
        self.startup_s = _process_age_s()
        self.rss_before_mib = peak_rss_mib()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0
        self.peak_rss_mib = peak_rss_mib()

    def result(self, **extra: Any) -> dict[str, Any]:
        """The measurements plus step-specific facts, JSON-able."""
        return {
            "seconds": self.seconds,
            "peak_rss_mib": self.peak_rss_mib,
            "rss_after_imports_mib": self.rss_before_mib,
            "startup_s": self.startup_s,
            **extra,
        }


# ------------------------------------------------------------------------- data


def step_generate(path: str, rows: int, seed: int = 0) -> dict[str, Any]:
    """Write the deterministic weatherAUS-shaped CSV (streamed, flat memory)."""
    from tasks.synthetic import write_weatheraus_like_csv

    with Measure() as m:
        write_weatheraus_like_csv(Path(path), rows, seed=seed)
    return m.result(rows=rows, bytes=Path(path).stat().st_size)


# ----------------------------------------------------------------------- ingest


def step_ingest(csv: str, data_dir: str) -> dict[str, Any]:
    """The product: ``tasks.ingest.ingest`` with the weatherAUS preset."""
    from flows.config import PRESETS
    from tasks.ingest import ingest

    preset = PRESETS[DATASET]
    with Measure() as m:
        res = ingest(
            csv,
            Path(data_dir),
            DATASET,
            RUN_DATE,
            keys=preset["keys"],
            label=preset["label"],
            rules=preset["rules"],
        )
    return m.result(
        rows=res.rows_in,
        rows_accepted=res.rows_accepted,
        rows_rejected=res.rows_rejected,
        ingested_dir=res.ingested_dir,
    )


def step_ingest_floor(csv: str, out: str) -> dict[str, Any]:
    """The floor: pyarrow's own (threaded, whole-file) CSV read and Parquet write."""
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    with Measure() as m:
        table = pacsv.read_csv(csv)
        pq.write_table(table, out)
    return m.result(rows=table.num_rows)


# --------------------------------------------------------------------- training


def pipeline_estimator_params(epochs: int) -> dict[str, Any]:
    """The flow's default hyperparameters (PipelineConfig), on the CPU."""
    from flows.config import PipelineConfig

    params = PipelineConfig(input="bench.csv").estimator_params()
    params.update(epochs=epochs, device="cpu")
    return params


def step_prepare_training(ingested_dir: str, out: str, rows: int) -> dict[str, Any]:
    """Preprocess a seeded sample of an ingested partition into a float32 .npy.

    As ``train_model`` does: statistics over all rows (streamed), the sample
    only transformed.
    """
    import functools

    import numpy as np

    from models.preprocessing import PreprocessorStats, TabularPreprocessor
    from tasks.sampling import iter_partition, read_training_rows

    schema = _ingested_schema(ingested_dir)
    numeric, categorical = schema.numeric_features, schema.categorical_features
    stats = PreprocessorStats(numeric, categorical)
    table, _ = read_training_rows(
        Path(ingested_dir), numeric + categorical, rows, 0, on_batch=stats.update
    )
    table = table.slice(0, rows)
    pre = TabularPreprocessor(numeric, categorical).fit_stats(
        stats, functools.partial(iter_partition, Path(ingested_dir))
    )
    x = pre.transform(table)
    np.save(out, x)
    return {"rows": int(x.shape[0]), "features": int(x.shape[1])}


def _timed_epochs(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def step_train_product(x_npy: str, epochs: int, device: str = "cpu") -> dict[str, Any]:
    """``AutoencoderReducer.fit`` at the pipeline defaults on ``device``;
    per-epoch wall times.

    Epoch times come from ``epoch_callback``; the first epoch also pays for
    set-up (validation, tensor copies), so callers use the later ones.
    """
    import numpy as np
    import torch

    from models.estimator import AutoencoderReducer

    x = np.load(x_npy)
    params = pipeline_estimator_params(epochs)
    params.update(device=device, patience=None)  # a few epochs: never stop early
    stamps: list[float] = []
    est = AutoencoderReducer(
        **params, epoch_callback=lambda *_: stamps.append(time.perf_counter())
    )
    with Measure() as m:
        stamps.append(time.perf_counter())
        est.fit(x)
    n_val = int(params["val_fraction"] * len(x))
    return m.result(
        epoch_seconds=_timed_epochs(stamps),
        rows_per_epoch=len(x) - n_val,
        torch_threads=torch.get_num_threads(),
        hidden=list(params["hidden"]),
        latent_dim=params["latent_dim"],
        batch_size=params["batch_size"],
    )


def step_train_hand(x_npy: str, epochs: int) -> dict[str, Any]:
    """The floor: the plainest PyTorch loop over the same tensor and network."""
    import numpy as np
    import torch
    from torch import nn

    x = torch.from_numpy(np.load(x_npy))
    params = pipeline_estimator_params(epochs)
    torch.manual_seed(0)
    widths = [x.shape[1], *params["hidden"], params["latent_dim"]]
    layers: list[nn.Module] = []
    for sizes in (widths, widths[::-1]):
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
    net = nn.Sequential(*layers)
    opt = torch.optim.Adam(net.parameters(), lr=params["lr"])
    bs = params["batch_size"]
    stamps: list[float] = []
    with Measure() as m:
        stamps.append(time.perf_counter())
        for _ in range(epochs):
            order = torch.randperm(len(x))
            for start in range(0, len(x), bs):
                batch = x[order[start : start + bs]]
                loss = nn.functional.mse_loss(net(batch), batch)
                opt.zero_grad()
                loss.backward()
                opt.step()
            stamps.append(time.perf_counter())
    return m.result(epoch_seconds=_timed_epochs(stamps), rows_per_epoch=len(x))


def step_train_pyod(x_npy: str, epochs: int) -> dict[str, Any]:
    """PyOD's AutoEncoder at the same widths, without its extras.

    ``hidden_neuron_list=[*hidden, latent_dim]`` gives the same layer widths;
    PyOD also puts its activation on the code layer (one ReLU more).
    """
    import numpy as np
    from pyod.models.auto_encoder import AutoEncoder

    x = np.load(x_npy)
    params = pipeline_estimator_params(epochs)
    stamps: list[float] = []

    class TimedAutoEncoder(AutoEncoder):  # type: ignore[misc]
        def epoch_update(self) -> None:
            stamps.append(time.perf_counter())

    det = TimedAutoEncoder(
        contamination=params["contamination"],
        preprocessing=False,
        lr=params["lr"],
        epoch_num=epochs,
        batch_size=params["batch_size"],
        device="cpu",
        random_state=0,
        verbose=0,
        optimizer_params={"weight_decay": params["weight_decay"]},
        hidden_neuron_list=[*params["hidden"], params["latent_dim"]],
        batch_norm=False,
        dropout_rate=0.0,
    )
    with Measure() as m:
        stamps.append(time.perf_counter())
        det.fit(x)
    bs = params["batch_size"]
    return m.result(
        epoch_seconds=_timed_epochs(stamps),
        rows_per_epoch=len(x) // bs * bs,  # drop_last=True
    )


def step_bundle(
    ingested_dir: str, bundle_dir: str, epochs: int, rows: int
) -> dict[str, Any]:
    """A model bundle for the scoring benchmark: a quick ``train_model``."""
    from tasks.train import train_model

    schema = _ingested_schema(ingested_dir)
    label = schema.label
    with Measure() as m:
        res = train_model(
            Path(ingested_dir),
            schema,
            Path(bundle_dir),
            dataset=DATASET,
            estimator_params=pipeline_estimator_params(epochs),
            label=label,
            max_train_rows=rows,
        )
    return m.result(n_train=res.n_train, features=res.metrics["n_features_in"])


def _ingested_schema(ingested_dir: str) -> TableSchema:
    import pyarrow.parquet as pq

    from models.schema import TableSchema

    part = sorted(Path(ingested_dir).glob("*.parquet"))[0]
    meta = pq.read_schema(part).metadata or {}
    return TableSchema.from_dict(json.loads(meta[b"latentflow.schema"]))


# ---------------------------------------------------------------------- scoring


def step_score(
    ingested_dir: str,
    bundle_dir: str,
    data_dir: str,
    batch_rows: int | None = None,
    device: str = "cpu",
    workers: int | None = None,
) -> dict[str, Any]:
    """The product: ``score_partition`` Parquet -> model -> Parquet.

    ``batch_rows`` defaults to the pipeline's (``PipelineConfig.score_batch_rows``),
    ``workers`` to the pipeline's for ``device`` (``tasks.score.score_workers``).
    """
    from flows.config import PipelineConfig
    from models.families import family_names
    from tasks.score import Provenance, score_partition, score_workers

    if batch_rows is None:
        batch_rows = PipelineConfig(input="bench.csv").execution.score_batch_rows
    # The model families import torch and scikit-learn when first asked for
    # (seconds): here, with the other imports, not inside the timed scoring.
    family_names()

    with Measure() as m:
        res = score_partition(
            Path(ingested_dir),
            Path(bundle_dir),
            Path(data_dir),
            DATASET,
            RUN_DATE,
            Provenance(f"{DATASET}-autoencoder", 1, "bench", "bench"),
            batch_rows=batch_rows,
            device=device,
            workers=workers,
        )
    return m.result(
        rows=res.rows_scored,
        output_dir=res.output_dir,
        batch_rows=batch_rows,
        device=device,
        workers=score_workers(device) if workers is None else workers,
    )


def step_score_floor(ingested_dir: str, bundle_dir: str, out: str) -> dict[str, Any]:
    """The floor: read the columns scoring reads, write the same-shaped output.

    The output has ``score_partition``'s schema, row count and compression, with
    random values where the model's outputs would be; generating them is not
    timed (it is not I/O).
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models import columns as cols
    from models.bundle import LatentModel
    from models.explain import TOP_COLUMNS
    from tasks.score import output_schema

    model = LatentModel.load(Path(bundle_dir))
    part = sorted(Path(ingested_dir).glob("*.parquet"))[0]
    in_schema = pq.read_schema(part)
    keys = [k for k in model.info.keys if k in in_schema.names]
    needed = model.preprocessor.input_columns
    columns = ["_row_id", *keys, *[c for c in needed if c not in keys]]
    schema = output_schema(
        [(k, in_schema.field(k).type) for k in keys], model.latent_dim, False
    )
    n = pq.ParquetFile(part).metadata.num_rows
    rng = np.random.default_rng(0)
    flag = rng.random(n) > 0.99
    # Every output column after the keys, as scoring fills it: floats, the
    # flag, an explanation on each flagged row, the model's name and version.
    made: dict[str, pa.Array] = {}
    for f in schema:
        if f.name == cols.IS_ANOMALY:
            made[f.name] = pa.array(flag)
        elif f.name == cols.EXPLANATION:
            entry = [
                {"column": c, "observed": "1.0", "expected": "0.5", "contribution": 0.3}
                for c in needed[:TOP_COLUMNS]
            ]
            made[f.name] = pa.array(
                [entry if x else None for x in flag.tolist()], type=f.type
            )
        elif f.name == cols.MODEL_NAME:
            made[f.name] = pa.array(np.full(n, model.info.dataset, dtype=object))
        elif f.name == cols.MODEL_VERSION:
            made[f.name] = pa.array(np.ones(n, dtype=np.int32))
        elif pa.types.is_floating(f.type):
            made[f.name] = pa.array(rng.random(n, dtype=np.float32))
    with Measure() as m:
        table = pq.read_table(part, columns=columns)
        arrays = [
            table.column(f.name) if f.name not in made else made[f.name] for f in schema
        ]
        pq.write_table(pa.table(arrays, schema=schema), out, compression="zstd")
    return m.result(rows=n)


STEPS: dict[str, Callable[..., dict[str, Any]]] = {
    "generate": step_generate,
    "ingest": step_ingest,
    "ingest_floor": step_ingest_floor,
    "prepare_training": step_prepare_training,
    "train_product": step_train_product,
    "train_hand": step_train_hand,
    "train_pyod": step_train_pyod,
    "bundle": step_bundle,
    "score": step_score,
    "score_floor": step_score_floor,
}


def main(argv: list[str]) -> int:
    """Run ``STEP`` with JSON kwargs; print its result line."""
    step, kwargs = argv[0], json.loads(argv[1]) if len(argv) > 1 else {}
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    result = STEPS[step](**kwargs)
    print(RESULT_MARK + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
