"""Stream the ingested partition through the model into ``latent/``.

Memory stays flat at any size: record batches are read one row group at a
time, encoded, scored and written as Parquet row groups, into a staged
partition that is swapped into place only when every row has been written.

The work is cut into :class:`~tasks.partitions.WorkUnit` s (whole row groups of
the ingested files). The single-machine path scores one unit that covers the
whole partition into ``part-00000.parquet``; a partitioned run scores many
units in parallel, each into its own file, and :func:`commit_scores` swaps them
in together. With ``publish=False`` (the nightly flow) the checked partition is
left sealed in ``.staging`` instead, and the flow publishes it with the run
date's ingested and rejected partitions in one commit.

Both paths read every row group on its own (batches never span two row
groups), so a row is scored in the same batch shape, with the same result,
whichever way the partition was cut.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import task

from models import columns as cols
from models.bundle import LatentModel
from models.explain import EXPLANATION_TYPE, explanation_array
from models.integrity import MANIFEST, IntegrityError
from models.sequence_windows import WindowState
from tasks.errors import SchemaError, TamperError
from tasks.faults import checkpoint
from tasks.ingest.writer import WriteBehind
from tasks.partitions import (
    Piece,
    WorkUnit,
    keep_only,
    partition_files,
    plan_units,
    single_unit,
    unit_size,
)
from tasks.policy import IO, PLAIN
from tasks.storage import StagedPartition, atomic_path

TOP_K = 20
#: Scored errors kept per batch for the p99 estimate: bounded memory at any size.
_ERROR_SAMPLE = 4096


@dataclass(frozen=True)
class Provenance:
    """Which model and run made a latent/ partition: written into its metadata."""

    model_name: str
    model_version: int
    mlflow_run_id: str
    config_hash: str


@dataclass
class ScoreResult:
    output_dir: str
    rows_scored: int
    anomalies: int
    recon_error_mean: float
    recon_error_p99: float
    top_anomalies: list[dict[str, Any]] = field(default_factory=list)
    units: int = 1
    compute_seconds: float = 0.0  # summed over units: in-task wall time
    #: recon_error quantiles (p50, p90, p99, p999, max) over a thinned sample.
    score_quantiles: dict[str, float] = field(default_factory=dict)
    #: Where the rows are until the run date's commit; "" once published
    #: (``output_dir`` is the partition's final place either way).
    staged_dir: str = ""


@dataclass
class ScoreLayout:
    """What every unit writes: the output schema (with its metadata) and what
    it reads. Small, so it travels with each task instead of the model."""

    schema: pa.Schema
    columns: list[str]
    keys: list[str]
    model_name: str
    model_version: int
    bundle_sha256: str | None = None  # the manifest digest every unit must load
    #: A fixed anomaly_score cut; None flags by the model's threshold.
    anomaly_cut: float | None = None
    #: String columns read dictionary-encoded, as Parquet stores them: the
    #: model's categoricals that are not copied to the output. The model maps
    #: each distinct value once instead of every row's string.
    dictionary_columns: tuple[str, ...] = ()


@dataclass
class UnitResult:
    """One unit's output file and the facts :func:`merge_results` combines."""

    index: int
    file: str
    rows: int
    anomalies: int
    error_sum: float
    top: list[tuple[float, int]]
    error_sample: np.ndarray
    seconds: float  # wall time inside the unit, model loading included


@dataclass
class ScorePlan:
    """A partitioned scoring run: the layout and the units, in order."""

    layout: ScoreLayout
    units: list[WorkUnit]

    @property
    def rows(self) -> int:
        return sum(u.rows for u in self.units)


def output_schema(
    keys: list[tuple[str, pa.DataType]], latent_dim: int, with_cluster: bool
) -> pa.Schema:
    """The latent/ contract: _row_id, keys, latent_*, recon_error, anomaly_score,
    is_anomaly, (cluster), explanation, model."""
    types = {cols.IS_ANOMALY: pa.bool_(), cols.CLUSTER: pa.int32()}
    fields = [pa.field(cols.ROW_ID, pa.int64(), nullable=False)]
    fields += [pa.field(k, t) for k, t in keys]
    fields += [
        pa.field(name, types.get(name, pa.float32()))
        for name in cols.score_columns(latent_dim, with_cluster)
    ]
    fields += [pa.field(cols.EXPLANATION, EXPLANATION_TYPE)]
    fields += [
        pa.field(cols.MODEL_NAME, pa.string()),
        pa.field(cols.MODEL_VERSION, pa.int32()),
    ]
    return pa.schema(fields)


# ------------------------------------------------------------------- the model


def bundle_fingerprint(bundle_dir: Path) -> str:
    """SHA-256 of the bundle's ``manifest.json`` (which holds every file's
    SHA-256); for a bundle saved before manifests, over its JSON files.

    Cheap (a few KiB are read), and it changes whenever the model does, so a
    cache keyed by it never serves a stale model for a reused path.
    """
    manifest = Path(bundle_dir) / MANIFEST
    if manifest.exists():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()
    h = hashlib.sha256()
    for name in ("bundle.json", "preprocessor.json", "estimator/estimator.json"):
        h.update(name.encode() + b"\0")
        h.update((Path(bundle_dir) / name).read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=2)
def _cached_model(path: str, fingerprint: str, device: str) -> LatentModel:
    del fingerprint  # part of the cache key only
    return LatentModel.load(path, device=device)


def load_model(
    bundle_dir: Path, device: str = "cpu", expected_sha256: str | None = None
) -> LatentModel:
    """The bundle's model, loaded once per process (weights only, no pickle).

    Scoring tasks get the bundle's *path* on shared storage; each worker
    process loads the weights the first time and reuses them for every later
    unit, so the model is never pickled into a task. Every file is checked
    against the bundle's manifest on load; ``expected_sha256`` (the digest
    :func:`prepare_scoring` verified) pins the manifest itself, so a worker
    never scores with files changed after the run checked them.
    """
    path = Path(bundle_dir).resolve()
    try:
        try:
            fingerprint = bundle_fingerprint(path)
        except OSError:
            # Let the loader report what is wrong with the bundle.
            return LatentModel.load(path, device=device)
        if expected_sha256 is not None and fingerprint != expected_sha256:
            raise IntegrityError(
                f"{path / MANIFEST} changed after the run verified the model"
            )
        model = _cached_model(str(path), fingerprint, device)
    except IntegrityError as exc:
        raise TamperError(f"model {path} failed its integrity check: {exc}") from None
    return model


# -------------------------------------------------------------------- planning


def prepare_scoring(
    ingested_dir: Path,
    bundle_dir: Path,
    dataset: str,
    run_date: date,
    provenance: Provenance,
    *,
    device: str = "cpu",
    anomaly_cut: float | None = None,
) -> ScoreLayout:
    """Check the data against the model and fix the output schema and metadata.

    ``anomaly_cut`` flags rows whose ``anomaly_score`` exceeds it instead of
    those over the model's threshold (docs/output.md says when to use which).

    Raises
    ------
    SchemaError
        The data lacks a column the model needs.
    """
    model = load_model(bundle_dir, device=device)
    files = partition_files(ingested_dir)
    source = pq.read_schema(files[0]) if files else pa.schema([])
    names = set(source.names)
    needed = model.preprocessor.input_columns
    missing = [c for c in needed if c not in names]
    if missing:
        raise SchemaError(
            f"{ingested_dir}: the data lacks column(s) the model"
            f" {provenance.model_name} v{provenance.model_version} needs:"
            f" {', '.join(missing)}"
        )
    keys = [k for k in model.info.keys if k in names]
    key_types = [(k, source.field(k).type) for k in keys]
    schema = output_schema(
        key_types, model.latent_dim, bool(model.info.cluster_centers)
    )
    metadata = {
        "latentflow.model_name": provenance.model_name,
        "latentflow.model_version": str(provenance.model_version),
        "latentflow.mlflow_run_id": provenance.mlflow_run_id,
        "latentflow.config_hash": provenance.config_hash,
        "latentflow.dataset": dataset,
        "latentflow.run_date": run_date.isoformat(),
        "latentflow.threshold": repr(model.threshold),
        "latentflow.latent_dim": str(model.latent_dim),
        "latentflow.latent_space_id": model.info.latent_space_id,
        "latentflow.alignment_residual": (
            repr(model.alignment.residual) if model.alignment else ""
        ),
        "latentflow.flag_rule": (
            f"anomaly_score > {anomaly_cut!r}"
            if anomaly_cut is not None
            else f"recon_error > {model.threshold!r}"
        ),
    }
    schema = schema.with_metadata({k: v.encode() for k, v in metadata.items()})
    # A sequence model also reads each row's entity and time columns.
    context = [c for c in model.context_columns or () if c not in keys]
    missing = [c for c in context if c not in names]
    if missing:
        raise SchemaError(
            f"{ingested_dir}: the data lacks column(s) the sequence model"
            f" {provenance.model_name} v{provenance.model_version} orders rows by:"
            f" {', '.join(missing)}"
        )
    needed = [*needed, *[c for c in context if c not in needed]]
    columns = ["_row_id", *keys, *[c for c in needed if c not in keys]]
    dictionary = tuple(
        c
        for c in model.preprocessor.categorical
        if c not in keys
        and c not in context
        and (
            pa.types.is_string(source.field(c).type)
            or pa.types.is_large_string(source.field(c).type)
        )
    )
    return ScoreLayout(
        schema,
        columns,
        keys,
        provenance.model_name,
        provenance.model_version,
        model.manifest_sha256,
        anomaly_cut,
        dictionary,
    )


def plan_scoring(
    ingested_dir: Path,
    bundle_dir: Path,
    dataset: str,
    run_date: date,
    provenance: Provenance,
    *,
    unit_rows: int,
    device: str = "cpu",
    anomaly_cut: float | None = None,
) -> ScorePlan:
    """The layout and the work units of a partitioned scoring run.

    Units hold about ``unit_rows`` rows, fewer for a small partition
    (:func:`tasks.partitions.unit_size`); row groups are never split.
    """
    layout = prepare_scoring(
        ingested_dir,
        bundle_dir,
        dataset,
        run_date,
        provenance,
        device=device,
        anomaly_cut=anomaly_cut,
    )
    files = partition_files(ingested_dir)
    total = sum(pq.read_metadata(f).num_rows for f in files)
    return ScorePlan(layout, plan_units(files, unit_size(total, unit_rows)))


# --------------------------------------------------------------------- scoring


def _batches(
    unit: WorkUnit,
    columns: list[str],
    batch_rows: int,
    dictionary: Sequence[str] = (),
) -> Iterator[pa.RecordBatch]:
    """The unit's record batches, one row group at a time.

    Each row group is read on its own: ``Dataset.to_batches`` decodes ahead of
    the consumer without bound (peak memory grew with the file), and a batch
    that spanned two row groups would be cut differently when the row groups
    are scored by different units, changing float results in the last digit.
    """
    for piece in unit.pieces:
        # A file without one of the columns fails on reading them, with the
        # error every reader gives; asking for its dictionary would fail first.
        present = set(pq.read_schema(piece.file).names) if dictionary else set()
        wanted = [c for c in dictionary if c in present]
        with pq.ParquetFile(piece.file, read_dictionary=wanted or None) as pf:
            for rg in range(piece.start, piece.stop):
                yield from pf.iter_batches(
                    batch_size=batch_rows, row_groups=[rg], columns=columns
                )


def _preceding(unit: WorkUnit) -> WorkUnit:
    """The partition's row groups before ``unit``'s first, as one unit."""
    if not unit.pieces:
        return WorkUnit(unit.index, ())
    first = unit.pieces[0]
    pieces = [
        Piece(str(f), 0, pq.read_metadata(f).num_row_groups, 0)
        for f in partition_files(Path(first.file).parent)
        if f.name < Path(first.file).name
    ]
    if first.start:
        pieces.append(Piece(first.file, 0, first.start, 0))
    return WorkUnit(unit.index, tuple(pieces))


#: Batches decoded ahead of the model: reading overlaps the model's work.
_READ_AHEAD = 2
_END = object()


def _read_ahead(
    batches: Iterator[pa.RecordBatch], depth: int = _READ_AHEAD
) -> Iterator[pa.RecordBatch]:
    """``batches``, decoded on a background thread at most ``depth`` ahead.

    pyarrow decodes Parquet with the GIL released, so the next row group is
    read while the model scores this one; memory stays ``depth`` batches. A
    read error is raised here, in the consumer's thread; a consumer that stops
    early (an error of its own) stops the reader too.
    """
    slots: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                slots.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
        except BaseException as exc:  # re-raised in the consumer's thread
            put(exc)
            return
        put(_END)

    reader = threading.Thread(target=produce, name="latentflow-score-reader")
    reader.start()
    try:
        while (item := slots.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        reader.join()


class _Constants:
    """The constant model columns, built once and sliced per batch."""

    def __init__(self, name: str, version: int) -> None:
        self._values = (pa.scalar(name, pa.string()), pa.scalar(version, pa.int32()))
        self._arrays: list[pa.Array] = []

    def arrays(self, n: int) -> list[pa.Array]:
        if not self._arrays or len(self._arrays[0]) < n:
            self._arrays = [pa.repeat(v, n) for v in self._values]
        return [a.slice(0, n) for a in self._arrays]


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Columns worth dictionary-encoding: keys and the constant model columns.

    Latents and errors are distinct floats: trying a dictionary on them first
    made writing 2.5x slower and the files 30% larger.
    """
    return [
        f.name
        for f in schema
        if f.name != "_row_id" and not pa.types.is_floating(f.type)
    ]


@dataclass(frozen=True)
class _ScoredBatch:
    """One batch's output rows and what the unit's result keeps of them."""

    record_batch: pa.RecordBatch
    error: np.ndarray  # (n,) float32: the model's score
    row_ids: np.ndarray  # (n,) int64
    anomalies: int


def _score_batch(
    model: LatentModel,
    layout: ScoreLayout,
    constants: _Constants,
    batch: pa.RecordBatch,
    state: WindowState | None = None,
) -> _ScoredBatch:
    """Score one batch into the output rows of ``layout.schema``.

    Depends on nothing but the batch (and, for a sequence model, ``state``),
    so batches can be scored on several threads and still give the same rows.
    """
    features = model.preprocessor.transform(batch)
    scores = model.score_features(features, batch, state)
    err = scores.score
    pct = model.anomaly_score(err)
    flag = scores.is_anomaly if layout.anomaly_cut is None else pct > layout.anomaly_cut
    row_ids = batch.column("_row_id").cast(pa.int64())
    arrays: list[pa.Array] = [row_ids]
    arrays += [batch.column(k) for k in layout.keys]
    # One transposing copy; each latent column is then a contiguous row that
    # Arrow wraps without copying.
    latent_t = np.ascontiguousarray(scores.latent.T)
    arrays += [pa.array(col) for col in latent_t]
    arrays += [pa.array(err), pa.array(pct), pa.array(flag)]
    labels = model.clusters(scores.latent)
    if labels is not None:
        arrays.append(pa.array(labels))
    arrays.append(explanation_array(model, batch, flag, features=features))
    arrays += constants.arrays(batch.num_rows)
    return _ScoredBatch(
        pa.RecordBatch.from_arrays(arrays, schema=layout.schema),
        err,
        row_ids.to_numpy(),
        int(flag.sum()),
    )


def _in_order(
    fn: Callable[[pa.RecordBatch], _ScoredBatch],
    batches: Iterator[pa.RecordBatch],
    workers: int,
) -> Iterator[_ScoredBatch]:
    """``fn`` of each non-empty batch, in order, ``workers`` batches at a time.

    The model's numpy, Arrow and torch work runs with the GIL released, so
    threads overlap one batch's preprocessing with another's forward pass
    (on a GPU machine that is most of the work left on the CPU). At most
    ``workers`` batches are in flight, so memory stays bounded.
    """
    batches = (b for b in batches if b.num_rows)
    if workers <= 1:
        yield from map(fn, batches)
        return
    pending: deque[Future[_ScoredBatch]] = deque()
    with ThreadPoolExecutor(workers, thread_name_prefix="latentflow-score") as pool:
        try:
            for batch in batches:
                pending.append(pool.submit(fn, batch))
                if len(pending) >= workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for f in pending:
                f.cancel()


def score_workers(device: str, cpus: int | None = None) -> int:
    """Threads that score batches at once on ``device``: the pipeline's default.

    On the CPU the forward pass already uses every core (torch's own
    threads), so a second scoring thread only contends with it. On CUDA the
    forward pass leaves the CPU, and preprocessing, explanations and Arrow
    building are what is left there. Four threads: on an H200 with 16
    cores, 10M rows took 9.7 s on 1 thread, 5.9 s on 4, 6.3 s on 8 and 7.4 s
    on 16 (past 4, the GIL-held parts of each batch contend).
    """
    if not str(device).startswith("cuda"):
        return 1
    return max(1, min(4, cpus if cpus is not None else os.cpu_count() or 1))


def score_unit(
    unit: WorkUnit,
    layout: ScoreLayout,
    bundle_dir: Path,
    out_dir: Path,
    *,
    batch_rows: int = 65536,
    device: str = "cpu",
    workers: int | None = None,
) -> UnitResult:
    """Score one unit into ``out_dir/part-<index>.parquet``, written atomically.

    Parameters
    ----------
    unit
        The row groups to score.
    layout
        Output schema and input columns (from :func:`prepare_scoring`).
    bundle_dir
        The model bundle, on storage this process can read; loaded once per
        process (:func:`load_model`).
    out_dir
        The staged partition's directory.
    batch_rows
        Most rows per batch (and per output row group).
    workers
        Batches scored at once, on as many threads (None: :func:`score_workers`
        for ``device``). The output is the same for any number: each batch is
        scored on its own and written in order.

    Returns
    -------
    UnitResult
        Counts, the error sum, the unit's top anomalies and a thinned sample
        of its errors (for the p99), small enough to return to the flow.
    """
    t0 = time.perf_counter()
    if workers is None:
        workers = score_workers(device)
    model = load_model(bundle_dir, device=device, expected_sha256=layout.bundle_sha256)
    schema = layout.schema
    rows = anomalies = 0
    err_sum = 0.0
    top: list[tuple[float, int]] = []
    sample: list[np.ndarray] = []
    target = Path(out_dir) / unit.output_name
    # A sequence model's windows reach back into the rows before the unit:
    # replay them into its state (no scoring; memory: window x entities), so
    # a unit scores every row exactly as the single pass does.
    state = model.new_state()
    if state is not None:
        for batch in _batches(
            _preceding(unit), layout.columns, batch_rows, layout.dictionary_columns
        ):
            model.advance(batch, state)
    constants = _Constants(layout.model_name, layout.model_version)
    # The stages overlap: the next row groups are decoded (a reader thread)
    # and the previous batch compressed and written (a writer thread) while
    # the model scores ``workers`` batches. Reader and writer run in pyarrow
    # without the GIL.
    behind = WriteBehind(depth=1)
    with (
        atomic_path(target) as tmp,
        pq.ParquetWriter(
            tmp, schema, compression="zstd", use_dictionary=_dictionary_columns(schema)
        ) as writer,
    ):
        try:
            batches = _read_ahead(
                _batches(unit, layout.columns, batch_rows, layout.dictionary_columns),
                depth=max(2, workers),
            )
            score_one = functools.partial(
                _score_batch, model, layout, constants, state=state
            )
            for out in _in_order(score_one, batches, workers if state is None else 1):
                behind.submit(writer, out.record_batch)
                checkpoint("score")
                n = out.record_batch.num_rows
                rows += n
                anomalies += out.anomalies
                err_sum += float(out.error.sum(dtype=np.float64))
                _keep_top(top, out.error, out.row_ids)
                # A thinned copy keeps the p99 estimate's memory bounded.
                sample.append(out.error[:: max(1, n // _ERROR_SAMPLE)])
            # Every batch is written before the writer closes the file.
            behind.close()
        except BaseException:
            # The writer thread stops before the file is closed and discarded.
            behind.close(discard=True)
            raise
    if rows != unit.rows:
        raise RuntimeError(f"unit {unit.index}: read {rows} rows, planned {unit.rows}")
    return UnitResult(
        index=unit.index,
        file=unit.output_name,
        rows=rows,
        anomalies=anomalies,
        error_sum=err_sum,
        top=top,
        error_sample=(
            np.concatenate(sample) if sample else np.zeros(0, dtype=np.float32)
        ),
        seconds=time.perf_counter() - t0,
    )


def merge_results(output_dir: Path, results: Sequence[UnitResult]) -> ScoreResult:
    """Combine the units' results into the run's :class:`ScoreResult`."""
    rows = sum(r.rows for r in results)
    samples = [r.error_sample for r in results if len(r.error_sample)]
    all_err = np.concatenate(samples) if samples else np.zeros(1)
    top = heapq.nlargest(TOP_K, (t for r in results for t in r.top))
    levels = {"p50": 0.5, "p90": 0.9, "p99": 0.99, "p999": 0.999, "max": 1.0}
    quantiles = np.quantile(all_err, list(levels.values()))
    return ScoreResult(
        output_dir=str(output_dir),
        rows_scored=rows,
        anomalies=sum(r.anomalies for r in results),
        recon_error_mean=sum(r.error_sum for r in results) / max(rows, 1),
        recon_error_p99=float(np.quantile(all_err, 0.99)),
        top_anomalies=[{"_row_id": int(r), "recon_error": float(e)} for e, r in top],
        units=len(results),
        compute_seconds=sum(r.seconds for r in results),
        score_quantiles={k: float(v) for k, v in zip(levels, quantiles, strict=True)},
    )


def commit_scores(
    staged: StagedPartition,
    units: Sequence[WorkUnit],
    results: Sequence[UnitResult],
    publish: bool = True,
) -> ScoreResult:
    """Check every unit's file, then swap the staged partition in whole
    (``publish=False``: seal it for the run date's commit instead).

    Each unit has exactly one file, named by its index, holding exactly its
    planned rows; anything else in the staged directory (a killed attempt's
    temporary file) is removed first. So the committed partition has every
    ingested row exactly once, or the partition is not replaced at all.
    """
    by_index = {r.index: r for r in results}
    if sorted(by_index) != [u.index for u in units]:
        raise RuntimeError(
            f"scoring results for units {sorted(by_index)}, planned {len(units)}"
        )
    keep_only(staged, [u.output_name for u in units])
    for u in units:
        path = staged.file(u.output_name)
        written = pq.read_metadata(path).num_rows if path.is_file() else None
        if written != u.rows or by_index[u.index].rows != u.rows:
            raise RuntimeError(
                f"{path}: {written} rows written, {u.rows} planned for unit {u.index}"
            )
    merged = [by_index[u.index] for u in units]
    if publish:
        return merge_results(staged.commit(), merged)
    result = merge_results(staged.final, merged)
    result.staged_dir = str(staged.seal())
    return result


def score_partition(
    ingested_dir: Path,
    bundle_dir: Path,
    data_dir: Path,
    dataset: str,
    run_date: date,
    provenance: Provenance,
    *,
    batch_rows: int = 65536,
    device: str = "cpu",
    publish: bool = True,
    anomaly_cut: float | None = None,
    workers: int | None = None,
) -> ScoreResult:
    """Score every ingested row and commit ``latent/<dataset>/run_date=...``
    (``publish=False``: leave it sealed in ``.staging``, see :func:`commit_scores`).

    The single-machine path: one unit, one output file, in this process,
    ``workers`` batches at a time (None: :func:`score_workers` for ``device``).
    """
    layout = prepare_scoring(
        ingested_dir,
        bundle_dir,
        dataset,
        run_date,
        provenance,
        device=device,
        anomaly_cut=anomaly_cut,
    )
    units = single_unit(partition_files(ingested_dir))
    with StagedPartition(data_dir, "latent", dataset, run_date) as part:
        results = [
            score_unit(
                u,
                layout,
                bundle_dir,
                part.path,
                batch_rows=batch_rows,
                device=device,
                workers=workers,
            )
            for u in units
        ]
        return commit_scores(part, units, results, publish=publish)


def _keep_top(top: list[tuple[float, int]], err: np.ndarray, ids: np.ndarray) -> None:
    k = min(TOP_K, len(err))
    idx = np.argpartition(err, -k)[-k:]
    for i in idx:
        item = (float(err[i]), int(ids[i]))
        if len(top) < TOP_K:
            heapq.heappush(top, item)
        elif item > top[0]:
            heapq.heapreplace(top, item)


def read_metadata(partition: Path) -> dict[str, str]:
    """The latentflow key-value metadata of a latent/ partition's first file."""
    files = sorted(partition.glob("*.parquet"))
    if not files:
        return {}
    meta = pq.read_schema(files[0]).metadata or {}
    return {
        k.decode(): v.decode() for k, v in meta.items() if k.startswith(b"latentflow.")
    }


score_task = task(score_partition, name="score", **IO)
plan_score_task = task(plan_scoring, name="plan-score", **PLAIN)
# Each unit overwrites only its own file, so a retry (or Dask running a unit
# again after its worker died) is safe.
score_unit_task = task(
    score_unit, name="score-unit", task_run_name="score-unit-{unit.index}", **IO
)
commit_scores_task = task(commit_scores, name="commit-scores", **PLAIN)
