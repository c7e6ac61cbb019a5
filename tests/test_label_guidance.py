"""The label guides the code: the pipeline's config, its training step and
what it does with a label that cannot guide (real Parquet, real training)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.config import build_config
from tasks.train import label_guide, train_model

SCHEMA = {
    "columns": [
        {"name": "_k", "kind": "numeric", "role": "key"},
        *({"name": f"x{i}", "kind": "numeric", "role": "feature"} for i in range(6)),
        {"name": "y", "kind": "categorical", "role": "label"},
    ]
}
PARAMS = {
    "latent_dim": 2,
    "hidden": (16,),
    "epochs": 30,
    "lr": 1e-2,
    "random_state": 0,
}


def _ingested(tmp: Path, labels: list[str | None], seed: int = 0) -> Path:
    """Six columns, four of them spanning two loud directions; the label is the
    sign of a quiet column the loud ones do not predict."""
    rng = np.random.default_rng(seed)
    n = len(labels)
    loud = rng.normal(size=(n, 2)) @ rng.normal(size=(2, 4))
    quiet = rng.normal(size=n)
    columns = {f"x{i}": loud[:, i] + 0.05 * rng.normal(size=n) for i in range(4)}
    columns["x4"] = quiet
    columns["x5"] = rng.normal(size=n)
    table = pa.table({"_k": np.arange(n), **columns, "y": labels})
    out = tmp / "ingested"
    out.mkdir()
    pq.write_table(table, out / "part-0.parquet")
    return out


def _labels(n: int, seed: int = 0) -> list[str | None]:
    rng = np.random.default_rng(seed)
    rng.normal(size=(n, 2)), rng.normal(size=(2, 4))  # the loud draws
    quiet = rng.normal(size=n)
    return [
        None if i % 10 == 0 else ("Yes" if q > 0 else "No") for i, q in enumerate(quiet)
    ]


def test_a_two_valued_label_guides_the_code_in_training(tmp_path: Path) -> None:
    src = _ingested(tmp_path, _labels(2000))
    kwargs = {"dataset": "d", "label": "y"}
    guided = train_model(
        src,
        SCHEMA,
        tmp_path / "g",
        estimator_params={**PARAMS, "label_weight": 0.5},
        **kwargs,
    )
    plain = train_model(
        src,
        SCHEMA,
        tmp_path / "p",
        estimator_params={**PARAMS, "label_weight": 0.0},
        **kwargs,
    )
    assert not guided.warnings
    # The probe reads the label from the guided code, not from the plain one
    # (nor from PCA's, which follows the loud columns).
    assert guided.metrics["probe_auc"] > 0.9
    assert plain.metrics["probe_auc"] < 0.75
    assert guided.metrics["pca_probe_auc"] < 0.75


def test_a_label_with_many_classes_trains_unguided_with_a_warning(
    tmp_path: Path,
) -> None:
    labels = [("a", "b", "c")[i % 3] for i in range(600)]
    src = _ingested(tmp_path, labels)
    res = train_model(
        src,
        SCHEMA,
        tmp_path / "m",
        dataset="d",
        estimator_params={**PARAMS, "label_weight": 0.5},
        label="y",
    )
    (warning,) = res.warnings
    assert warning.startswith("label 'y' has 3 classes, so it does not guide the code")
    assert "label_weight 0" in warning and "\n" not in warning


def test_label_guide_reads_two_valued_and_numeric_labels() -> None:
    two, why = label_guide(pd.Series(["No", None, "Yes", "No"]), "y")
    assert why == "" and two is not None
    np.testing.assert_array_equal(two, [0.0, np.nan, 1.0, 0.0])
    numbers, _ = label_guide(pd.Series([1.5, None, 3.0, 9.0]), "y")
    assert numbers is not None
    np.testing.assert_array_equal(numbers, [1.5, np.nan, 3.0, 9.0])
    constant, why = label_guide(pd.Series([2.0, 2.0, None]), "y")
    assert constant is None and "fewer than two distinct known values" in why
    one_class, why = label_guide(pd.Series(["Yes", None, "Yes"]), "y")
    assert one_class is None and why.endswith("fewer than two distinct known values")


@pytest.mark.parametrize(
    ("fields", "axes", "weight"),
    [
        ({"input": "weatherAUS.csv"}, 0, 0.1),  # the preset's label guides
        ({"input": "plain.csv"}, 6, 0.1),  # no label: principal axes
        ({"input": "weatherAUS.csv", "label_weight": 0}, 6, 0.0),
        ({"input": "weatherAUS.csv", "pca_axes": 2}, 2, 0.1),
        ({"input": "plain.csv", "label": "y", "latent_dim": 3}, 0, 0.1),
        ({"input": "weatherAUS.csv", "kind": "vae"}, 0, 0.1),
    ],
)
def test_config_defaults_follow_the_label(
    fields: dict, axes: int, weight: float
) -> None:
    params = build_config(None, fields).resolved().estimator_params()
    assert params["pca_axes"] == axes
    assert params["label_weight"] == weight
