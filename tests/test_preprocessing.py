import itertools

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.preprocessing import UNKNOWN, PreprocessorStats, TabularPreprocessor


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    n = 200
    a = rng.normal(10, 2, n)
    a[::10] = np.nan
    return pd.DataFrame(
        {
            "a": a,
            "b": rng.normal(0, 1, n),
            "const": np.full(n, 3.0),
            "city": rng.choice(["x", "y", "z"], n),
            "dir": pd.Series(rng.choice(["N", "S", None], n), dtype=object),
        }
    )


def test_impute_indicator_scale_onehot(frame):
    pre = TabularPreprocessor(["a", "b", "const"], ["city", "dir"]).fit(frame)
    x = pre.transform(frame)
    names = pre.feature_names_out_
    assert x.dtype == np.float32 and x.shape == (len(frame), len(names))
    assert not np.isnan(x).any(), "every row is kept and imputed"
    assert "a__missing" in names and "b__missing" not in names
    # Scaled numeric columns have mean 0, std 1; the constant column stays 0.
    ia, ic = names.index("a"), names.index("const")
    assert abs(x[:, ia].mean()) < 1e-5 and abs(x[:, ia].std() - 1) < 1e-4
    assert np.all(x[:, ic] == 0)
    np.testing.assert_array_equal(x[:, names.index("a__missing")], frame["a"].isna())
    # One-hot blocks sum to one per row, missing is a category of its own.
    city = [i for i, n in enumerate(names) if n.startswith("city=")]
    np.testing.assert_allclose(x[:, city].sum(1), 1.0)
    assert "dir=__missing__" in names


def test_median_imputation_uses_training_median(frame):
    pre = TabularPreprocessor(["a"], []).fit(frame)
    med = np.nanmedian(frame["a"])
    assert pre.medians_[0] == pytest.approx(med)
    row = pd.DataFrame({"a": [np.nan]})
    x = pre.transform(row)
    assert x[0, 0] == pytest.approx((med - pre.means_[0]) / pre.scales_[0])
    assert x[0, 1] == 1.0


def test_unseen_category_maps_to_unknown_not_error(frame):
    pre = TabularPreprocessor(["a"], ["city"]).fit(frame)
    x = pre.transform(pd.DataFrame({"a": [1.0], "city": ["never-seen"]}))
    assert x[0, pre.feature_names_out_.index(f"city={UNKNOWN}")] == 1.0


def test_raw_strings_and_junk_are_missing(frame):
    pre = TabularPreprocessor(["a"], ["city"]).fit(frame)
    raw = pd.DataFrame({"a": ["NA", "12.5", "abc"], "city": ["x", "y", None]})
    x = pre.transform(raw)
    assert x[0, 1] == 1.0 and x[1, 1] == 0.0 and x[2, 1] == 1.0


def test_missing_column_named(frame):
    pre = TabularPreprocessor(["a", "b"], ["city"]).fit(frame)
    with pytest.raises(ValueError, match=r"b, city"):
        pre.transform(frame[["a"]])


def test_arrow_and_pandas_agree_and_roundtrip(frame, tmp_path):
    pre = TabularPreprocessor(["a", "b"], ["city", "dir"]).fit(frame)
    x1 = pre.transform(frame)
    x2 = pre.transform(pa.Table.from_pandas(frame))
    np.testing.assert_array_equal(x1, x2)
    pre.save(tmp_path / "p.json")
    again = TabularPreprocessor.load(tmp_path / "p.json")
    np.testing.assert_array_equal(again.transform(frame), x1)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json"):
        TabularPreprocessor.load(tmp_path / "bad.json")


@given(
    values=st.lists(
        st.sampled_from(["x", " y ", "z", "", "never-seen", "  ", None]),
        min_size=0,
        max_size=40,
    ),
    cut=st.integers(0, 40),
)
@settings(max_examples=60, deadline=None)
def test_dictionary_encoded_categories_equal_plain_strings(values, cut) -> None:
    """Scoring reads the categoricals dictionary-encoded (one lookup per
    distinct value): trimming, the missing category and unseen categories give
    the same matrix as plain strings, in one chunk or several."""
    fit_rows = pd.DataFrame({"a": [1.0, 2.0, 3.0], "city": ["x", "y", None]})
    pre = TabularPreprocessor(["a"], ["city"]).fit(fit_rows)
    plain = pa.array(values, type=pa.string())
    a = pa.array(np.arange(len(values), dtype=np.float64))
    expected = pre.transform(pa.table({"a": a, "city": plain}))
    encoded = plain.dictionary_encode()
    assert pa.types.is_dictionary(encoded.type)
    np.testing.assert_array_equal(
        pre.transform(pa.record_batch({"a": a, "city": encoded})), expected
    )
    cut = min(cut, len(values))
    chunked = pa.chunked_array(
        [plain[:cut].dictionary_encode(), plain[cut:].dictionary_encode()]
    )
    np.testing.assert_array_equal(
        pre.transform(pa.table({"a": a, "city": chunked})), expected
    )


_NUMERIC_TYPES = {
    "float64": pa.float64(),
    "float32": pa.float32(),
    "float16": pa.float16(),
    "int64": pa.int64(),
    "int8": pa.int8(),
    "uint32": pa.uint32(),
    "bool": pa.bool_(),
    "string": pa.string(),
}


@given(
    values=st.lists(
        st.one_of(
            st.none(),
            st.integers(-100, 100),
            st.sampled_from([0.5, -2.25, 1e30, -1e30, np.inf, -np.inf, np.nan]),
        ),
        min_size=1,
        max_size=40,
    ),
    kind=st.sampled_from(sorted(_NUMERIC_TYPES)),
    cut=st.integers(0, 40),
)
@settings(max_examples=120, deadline=None)
def test_numeric_columns_of_every_type_scale_as_imputed_float64(
    values, kind, cut
) -> None:
    """Each numeric cell is its float64 value, a missing one (null, NaN, an
    infinity, junk text) the training median, then (x - mean) / scale clipped
    to +-MAX_SCALED, as float32, whatever the column's Arrow type and
    chunking; the missing flag marks exactly the imputed cells."""
    from models.preprocessing import MAX_SCALED

    fit_rows = pd.DataFrame({"a": [1.0, 2.0, np.nan, 7.0]})
    pre = TabularPreprocessor(["a"], []).fit(fit_rows)
    arrow_type = _NUMERIC_TYPES[kind]
    cells: list[object] = []
    for v in values:
        if v is None:
            cells.append(None)
        elif kind == "bool":
            cells.append(
                bool(v) if not isinstance(v, float) or np.isfinite(v) else None
            )
        elif kind == "string":
            cells.append("NA" if isinstance(v, float) and np.isnan(v) else str(v))
        elif kind.startswith(("int", "uint")):
            cells.append(abs(int(v)) if np.isfinite(v) and abs(v) <= 100 else None)
        else:
            cells.append(float(v))
    column = pa.array(cells, type=arrow_type)
    # The float64 value of each cell as stored (narrow floats round first).
    as_number = pd.to_numeric(pd.Series(cells, dtype=object), errors="coerce")
    reference = as_number.to_numpy(dtype=np.float64, na_value=np.nan)
    if kind in ("float32", "float16"):
        with np.errstate(over="ignore"):
            reference = reference.astype(kind).astype(np.float64)
    missing = ~np.isfinite(reference)
    imputed = np.where(missing, pre.medians_[0], reference)
    with np.errstate(over="ignore"):
        expected = np.clip(
            (imputed - pre.means_[0]) / pre.scales_[0], -MAX_SCALED, MAX_SCALED
        ).astype(np.float32)
    cut = min(cut, len(cells))
    for data in (
        pa.table({"a": column}),
        pa.table({"a": pa.chunked_array([column[:cut], column[cut:]])}),
    ):
        x = pre.transform(data)
        names = pre.feature_names_out_
        np.testing.assert_array_equal(x[:, names.index("a")], expected)
        np.testing.assert_array_equal(
            x[:, names.index("a__missing")], missing.astype(np.float32)
        )


def test_max_categories_caps_rare_values():
    df = pd.DataFrame({"c": ["a"] * 5 + ["b"] * 3 + ["c"]})
    pre = TabularPreprocessor([], ["c"], max_categories=2).fit(df)
    assert pre.categories_["c"] == ["a", "b"]
    x = pre.transform(df)
    assert x[-1, pre.feature_names_out_.index(f"c={UNKNOWN}")] == 1.0


def test_source_errors_sum_per_input(frame):
    pre = TabularPreprocessor(["a", "b"], ["city"]).fit(frame)
    fe = np.ones((3, pre.n_features_out))
    names, per = pre.source_errors(fe)
    assert names == ["a", "b", "city"]
    np.testing.assert_array_equal(
        per[0], [2, 1, 4]
    )  # a + a__missing; 3 cities + unknown


# --------------------------------------------------------------- streaming fit
#
# The reference below is the in-memory fit as it was before the streaming one
# (np.median, mean and std of the median-imputed column, value counts), written
# out independently so the streaming code is checked against plain numpy.


def _reference(table: pa.Table, numeric, categorical, max_categories=64) -> dict:
    out: dict = {
        "medians": [],
        "means": [],
        "scales": [],
        "has_missing": [],
        "magnitudes": [],
    }
    for name in numeric:
        x = table.column(name).to_numpy(zero_copy_only=False).astype(np.float64)
        miss = ~np.isfinite(x)
        med = float(np.median(x[~miss])) if (~miss).any() else 0.0
        filled = np.where(miss, med, x)
        # Shifted by one of its values: np.std of three copies of 3.7e11 is
        # ulp noise (6e-5), not 0, because their mean rounds.
        std = float((filled - filled[0]).std())
        out["medians"].append(med)
        out["means"].append(float(filled.mean()))
        out["scales"].append(std if std > 1e-12 else 1.0)
        out["has_missing"].append(bool(miss.any()))
        out["magnitudes"].append(float(np.abs(filled).max()) if len(x) else 0.0)
    out["categories"] = {}
    for name in categorical:
        values = [
            "__missing__" if v is None else v.strip()
            for v in table.column(name).to_pylist()
        ]
        counts: dict[str, int] = {}
        for v in values:
            counts[v] = counts.get(v, 0) + 1
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        out["categories"][name] = [v for v, _ in ranked[:max_categories]]
    return out


def _assert_matches(pre: TabularPreprocessor, ref: dict) -> None:
    # Medians, flags and categories exactly; moments to a few ulps (the sums
    # run in a different order).
    np.testing.assert_array_equal(pre.medians_, ref["medians"])
    np.testing.assert_array_equal(pre.has_missing_, ref["has_missing"])
    assert pre.categories_ == ref["categories"]
    # A mean's rounding error scales with the values summed, not with the mean:
    # 0, 2, -2 summed in another order can give 1e-17 instead of 0.
    atol = 1e-12 * np.asarray(ref["magnitudes"])
    np.testing.assert_array_less(np.abs(pre.means_ - ref["means"]), atol + 1e-300)
    np.testing.assert_allclose(pre.scales_, ref["scales"], rtol=1e-12)


NUMS = ["grid", "const", "empty", "offset", "wide"]
CATS = ["city", "rare"]


def _cell(values):
    # None is an Arrow null, nan a float NaN: both must count as missing.
    return st.one_of(st.none(), st.just(float("nan")), values)


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    n = draw(st.integers(1, 60))
    grid = st.integers(-12, 12).map(lambda v: v / 4) | st.just(-0.0)
    cols = {
        "grid": draw(st.lists(_cell(grid), min_size=n, max_size=n)),
        "const": draw(st.lists(_cell(st.just(3.0)), min_size=n, max_size=n)),
        "empty": draw(
            st.lists(st.sampled_from([None, np.nan]), min_size=n, max_size=n)
        ),
        # A large offset: naive sum-of-squares variance would cancel badly.
        "offset": draw(
            st.lists(_cell(grid.map(lambda v: 1e9 + v)), min_size=n, max_size=n)
        ),
        "wide": draw(
            st.lists(
                _cell(st.floats(-1e12, 1e12, allow_nan=False, allow_infinity=False)),
                min_size=n,
                max_size=n,
            )
        ),
    }
    arrays = {k: pa.array(v, pa.float64(), from_pandas=False) for k, v in cols.items()}
    for name, choices in (("city", ["x", " y", "y ", "z", "w"]), ("rare", ["a", "b"])):
        cells = st.one_of(st.none(), st.sampled_from(choices))
        arrays[name] = pa.array(draw(st.lists(cells, min_size=n, max_size=n)))
    return pa.table(arrays)


@st.composite
def splits(draw: st.DrawFn, n: int) -> list[tuple[int, int]]:
    """Batch boundaries with empty and single-row batches likely."""
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=8)))
    bounds = [0, *cuts, n]
    return list(itertools.pairwise(bounds))


def _piece(t: pa.Table, kind: str) -> pa.Table | pa.RecordBatch:
    if kind == "batch":  # one RecordBatch, even for 0 rows
        cols = [c.combine_chunks() for c in t.columns]
        return pa.RecordBatch.from_arrays(cols, schema=t.schema)
    return t


@settings(max_examples=60, deadline=None)
@given(data=st.data(), table=tables(), kind=st.sampled_from(["table", "batch"]))
def test_streaming_fit_equals_in_memory_for_any_split(data, table, kind) -> None:
    parts = [
        _piece(table.slice(a, b - a), kind) for a, b in data.draw(splits(len(table)))
    ]
    ref = _reference(table, NUMS, CATS, max_categories=3)
    streamed = TabularPreprocessor(NUMS, CATS, max_categories=3).fit_batches(parts)
    _assert_matches(streamed, ref)
    whole = TabularPreprocessor(NUMS, CATS, max_categories=3).fit(table)
    _assert_matches(whole, ref)
    # Merging accumulators of two halves is the same as one pass.
    k = len(parts) // 2
    left, right = (PreprocessorStats(NUMS, CATS) for _ in range(2))
    for p in parts[:k]:
        left.update(p)
    for p in parts[k:]:
        right.update(p)
    merged = TabularPreprocessor(NUMS, CATS, max_categories=3).fit_stats(
        left.merge(right), lambda _cols: parts
    )
    _assert_matches(merged, ref)


@settings(max_examples=30, deadline=None)
@given(table=tables())
def test_pandas_batches_match_arrow(table) -> None:
    frames = [table.slice(i, 7).to_pandas() for i in range(0, table.num_rows, 7)]
    pre = TabularPreprocessor(NUMS, CATS).fit_batches(frames)
    _assert_matches(pre, _reference(table, NUMS, CATS))


def test_median_needs_every_digit_and_stops_early_when_it_can() -> None:
    # Values 1 ulp apart share their top 48 bits: the radix select needs all
    # four 16-bit digits (three passes after the first).
    base = np.nextafter(1.0, 2.0, dtype=np.float64)
    x = np.array([base + k * np.finfo(float).eps for k in range(1000)])
    x = np.concatenate([x, -x[:10], [np.nan] * 5])
    rng = np.random.default_rng(0)
    rng.shuffle(x)
    table = pa.table({"x": x})
    calls: list[list[str]] = []

    def reopen(cols):
        calls.append(list(cols))
        return [table.slice(i, 64) for i in range(0, len(table), 64)]

    stats = PreprocessorStats(["x"], [])
    for b in reopen(["x"]):
        stats.update(b)
    calls.clear()
    pre = TabularPreprocessor(["x"], []).fit_stats(stats, reopen)
    assert pre.medians_[0] == np.median(x[~np.isnan(x)])
    assert calls == [["x"]] * 3
    # A column whose middle bin holds one distinct value needs no extra pass:
    # Rainfall-like data, median 0.0 among many zeros.
    y = np.concatenate([np.zeros(600), rng.exponential(5, 400)])
    stats = PreprocessorStats(["y"], [])
    stats.update(pa.table({"y": y}))
    calls.clear()
    pre = TabularPreprocessor(["y"], []).fit_stats(stats, reopen)
    assert pre.medians_[0] == 0.0 and calls == []


def test_fit_batches_accepts_a_callable_and_rejects_changed_rows() -> None:
    rng = np.random.default_rng(1)
    table = pa.table({"x": rng.normal(0, 1, 500), "c": rng.choice(["p", "q"], 500)})

    def batches():
        yield from table.to_batches(max_chunksize=50)

    pre = TabularPreprocessor(["x"], ["c"]).fit_batches(batches)
    _assert_matches(pre, _reference(table, ["x"], ["c"]))
    # Values 1 ulp apart need extra passes; a reopen() that streams other rows
    # is caught, not turned into a wrong median.
    close = pa.table({"x": 1.0 + np.arange(101) * np.finfo(float).eps})
    stats = PreprocessorStats(["x"], [])
    stats.update(close)
    with pytest.raises(ValueError, match="changed between passes"):
        TabularPreprocessor(["x"], []).fit_stats(stats, lambda _c: [close.slice(1)])
    with pytest.raises(ValueError, match="0 rows"):
        TabularPreprocessor(["x"], []).fit_batches([table.slice(0, 0)])
    with pytest.raises(ValueError, match="lacks 1 column"):
        TabularPreprocessor(["x", "nope"], []).fit_batches([table])


def test_saved_format_unchanged(frame, tmp_path) -> None:
    pre = TabularPreprocessor(["a", "b", "const"], ["city", "dir"]).fit(frame)
    d = pre.to_dict()
    assert set(d) == {
        "format",
        "numeric",
        "categorical",
        "max_categories",
        "medians",
        "means",
        "scales",
        "has_missing",
        "categories",
    }
    assert d["format"] == 1 and isinstance(d["has_missing"][0], bool)
    again = TabularPreprocessor.from_dict(d)
    np.testing.assert_array_equal(again.transform(frame), pre.transform(frame))
