import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from models.preprocessing import UNKNOWN, TabularPreprocessor


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
