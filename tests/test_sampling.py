"""Training reads a bounded, seeded sample, but fits the preprocessor on all rows.

The partitions here are written directly (no ingest): the tests need rows whose
statistics a sample would get wrong, and row groups of a chosen size.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from models.bundle import LatentModel
from models.preprocessing import MISSING, PreprocessorStats, TabularPreprocessor
from tasks.sampling import count_rows, iter_partition, read_training_rows

TINY_MODEL = {
    "latent_dim": 2,
    "hidden": (8,),
    "epochs": 2,
    "batch_size": 256,
    "device": "cpu",
    "random_state": 7,
}
N = 6000
NUMERIC = ["trend", "gappy", "onegap"]
CATEGORICAL = ["city"]
RARE_ROWS = (13, N - 20)  # the only rows of the rare city
GAP_ROW = 4321  # the only missing value of "onegap"


def _skewed_table(n: int = N) -> pa.Table:
    """Columns whose first and last rows differ strongly, plus rare events.

    A few hundred sampled rows estimate the mean and median of ``trend`` only
    roughly, miss the single gap of ``onegap`` and the rare city (most likely:
    the tests check that they do, for this seed).
    """
    rng = np.random.default_rng(0)
    i = np.arange(n)
    trend = np.where(i < n // 2, rng.normal(0, 1, n), rng.normal(1000, 50, n))
    gappy = np.where(i < n // 3, np.nan, rng.exponential(3, n))  # missing early
    onegap = rng.normal(5, 1, n)
    onegap[GAP_ROW] = np.nan
    city = rng.choice(["Albury", "Sydney", "Perth"], n).astype(object)
    city[list(RARE_ROWS)] = "Uluru"
    city[i % 97 == 0] = None
    return pa.table(
        {
            "trend": trend,
            "gappy": pa.array(gappy, from_pandas=True),  # NaN -> null, as ingested
            "onegap": onegap,  # a float NaN: missing too
            "city": pa.array(city, pa.string()),
            "label": pa.array(np.where(rng.random(n) < 0.3, "Yes", "No")),
        }
    )


def _write_partition(path: Path, table: pa.Table, row_group: int = 1000) -> Path:
    path.mkdir(parents=True)
    pq.write_table(table, path / "part-00000.parquet", row_group_size=row_group)
    return path


def _schema() -> dict:
    cols = [{"name": c, "kind": "numeric", "role": "feature"} for c in NUMERIC]
    cols.append({"name": "city", "kind": "categorical", "role": "feature"})
    cols.append({"name": "label", "kind": "categorical", "role": "label"})
    return {"columns": cols}


def _full_stats(table: pa.Table) -> dict:
    """The statistics, straight from all rows with numpy."""
    out: dict = {"medians": [], "means": [], "scales": [], "has_missing": []}
    for name in NUMERIC:
        x = table.column(name).to_numpy(zero_copy_only=False).astype(float)
        miss = np.isnan(x)
        med = float(np.median(x[~miss]))
        filled = np.where(miss, med, x)
        out["medians"].append(med)
        out["means"].append(filled.mean())
        out["scales"].append(filled.std())
        out["has_missing"].append(bool(miss.any()))
    counts = pc.value_counts(table.column("city").fill_null(MISSING)).to_pylist()
    counts.sort(key=lambda d: (-d["counts"], d["values"]))
    out["categories"] = {"city": [d["values"] for d in counts]}
    return out


@pytest.fixture(scope="module")
def partition(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pa.Table]:
    table = _skewed_table()
    return _write_partition(tmp_path_factory.mktemp("p") / "part", table), table


def _old_sample(path: Path, columns: list[str], max_rows: int, seed: int) -> pa.Table:
    """The sampler before streaming by row group (Dataset.to_batches)."""
    dataset = pads.dataset(str(path), format="parquet")
    frac = max_rows / dataset.count_rows()
    rng = np.random.default_rng([seed, 1])
    parts = []
    for batch in dataset.to_batches(columns=columns, batch_size=262_144):
        keep = rng.random(batch.num_rows) < frac
        if keep.any():
            parts.append(batch.filter(pa.array(keep)))
    return pa.Table.from_batches(parts, schema=parts[0].schema)


def test_sample_is_seeded_and_independent_of_batch_size(partition) -> None:
    path, _ = partition
    cols = ["trend", "city"]
    a, total = read_training_rows(path, cols, 500, seed=3)
    b, _ = read_training_rows(path, cols, 500, seed=3, batch_rows=77)
    c, _ = read_training_rows(path, cols, 500, seed=4)
    assert total == N == count_rows(path)
    assert a.equals(b) and not a.equals(c)
    assert 400 < a.num_rows < 600  # binomial around max_rows
    # The same rows as the sampler it replaces, for the same seed.
    assert a.equals(_old_sample(path, cols, 500, 3))


def test_small_partition_is_read_whole_and_every_batch_is_seen(partition) -> None:
    path, table = partition
    seen: list[pa.RecordBatch] = []
    sample, total = read_training_rows(
        path, ["trend"], 10 * N, seed=0, on_batch=seen.append, batch_rows=512
    )
    assert total == N and sample.equals(table.select(["trend"]))
    # Bounded batches: never more than a row group or batch_rows.
    assert max(b.num_rows for b in seen) <= 512
    sampled_seen: list[pa.RecordBatch] = []
    sample, _ = read_training_rows(
        path, ["trend"], 100, seed=0, on_batch=sampled_seen.append
    )
    assert sample.num_rows < 200
    assert pa.Table.from_batches(sampled_seen).equals(table.select(["trend"]))


def test_train_model_fits_statistics_on_all_rows(partition, tmp_path) -> None:
    from tasks.train import train_model

    path, table = partition
    res = train_model(
        path,
        _schema(),
        tmp_path / "bundle",
        dataset="skewed",
        estimator_params=TINY_MODEL,
        label="label",
        max_train_rows=300,
    )
    assert res.n_rows_total == N and res.n_train + res.n_holdout < 400
    pre = LatentModel.load(tmp_path / "bundle").preprocessor
    want = _full_stats(table)
    np.testing.assert_array_equal(pre.medians_, want["medians"])
    np.testing.assert_array_equal(pre.has_missing_, want["has_missing"])
    assert pre.categories_ == want["categories"]
    np.testing.assert_allclose(pre.means_, want["means"], rtol=1e-12)
    np.testing.assert_allclose(pre.scales_, want["scales"], rtol=1e-12)
    # The test has teeth: fitted on the sample alone, every one of them differs.
    sample, _ = read_training_rows(path, [*NUMERIC, "city"], 300, seed=7)
    on_sample = TabularPreprocessor(NUMERIC, CATEGORICAL).fit(sample)
    assert (on_sample.medians_ != pre.medians_).all()
    assert (on_sample.means_ != pre.means_).all()
    assert not on_sample.has_missing_[NUMERIC.index("onegap")]
    assert "Uluru" not in on_sample.categories_["city"]
    assert "Uluru" in pre.categories_["city"]


def test_streamed_statistics_from_row_groups_are_deterministic(partition) -> None:
    path, table = partition

    def fit() -> TabularPreprocessor:
        stats = PreprocessorStats(NUMERIC, CATEGORICAL)
        read_training_rows(path, [*NUMERIC, "city"], 100, 1, on_batch=stats.update)
        reopen = functools.partial(iter_partition, path, batch_rows=333)
        return TabularPreprocessor(NUMERIC, CATEGORICAL).fit_stats(stats, reopen)

    first, second = fit(), fit()
    assert first.to_dict() == second.to_dict()
    whole = TabularPreprocessor(NUMERIC, CATEGORICAL).fit(table)
    np.testing.assert_array_equal(first.medians_, whole.medians_)
    np.testing.assert_allclose(first.scales_, whole.scales_, rtol=1e-12)


def _peak_arrow_bytes(path: Path, max_rows: int) -> int:
    """Largest Arrow allocation seen while sampling and fitting the statistics.

    Read at every batch boundary of every pass (the sample grows between
    them, a batch lives across them), which is where the training path's
    memory can pile up.
    """
    peak = 0

    def probe(batch: pa.RecordBatch) -> None:
        nonlocal peak
        peak = max(peak, pa.total_allocated_bytes())

    stats = PreprocessorStats(["a", "b"], ["c"])

    def update(batch: pa.RecordBatch) -> None:
        stats.update(batch)
        probe(batch)

    sample, _ = read_training_rows(
        path, ["a", "b", "c"], max_rows, 0, on_batch=update, batch_rows=1024
    )

    def reopen(cols):
        for batch in iter_partition(path, cols, batch_rows=1024):
            probe(batch)
            yield batch

    TabularPreprocessor(["a", "b"], ["c"]).fit_stats(stats, reopen)
    del sample
    return peak


def test_training_memory_is_bounded_by_the_sample(tmp_path) -> None:
    rng = np.random.default_rng(0)

    def part(name: str, n: int) -> Path:
        # Values 1 ulp apart keep the median search going for all passes.
        a = 1.0 + rng.integers(0, 1 << 40, n) * np.finfo(float).eps
        t = pa.table(
            {
                "a": a,
                "b": rng.normal(0, 1, n),
                "c": rng.choice(["x", "y", "z"], n),
            }
        )
        return _write_partition(tmp_path / name, t, row_group=1024)

    n = 20_000
    small, large = part("small", n), part("large", 4 * n)
    base = pa.total_allocated_bytes()
    bounded = [_peak_arrow_bytes(p, 1000) - base for p in (small, large)]
    # The control keeps every row (max_rows above the size): memory grows.
    whole = [_peak_arrow_bytes(p, 10 * n) - base for p in (small, large)]
    budget = 4.0 * 3 * n  # bytes per extra row: ~0 expected
    assert bounded[1] - bounded[0] < budget, bounded
    assert whole[1] - whole[0] > budget, whole
