"""The saved model (preprocessor + network) loads only when it is intact."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.bundle import LatentModel
from tasks.train import train_model

SCHEMA = {
    "columns": [
        {"name": "a", "kind": "numeric", "role": "feature"},
        {"name": "b", "kind": "numeric", "role": "feature"},
        {"name": "c", "kind": "categorical", "role": "feature"},
    ]
}


@pytest.fixture
def bundle(tmp_path):
    rng = np.random.default_rng(0)
    t = rng.normal(size=500)
    d = tmp_path / "in"
    d.mkdir()
    pq.write_table(
        pa.table(
            {"_row_id": np.arange(500), "a": t, "b": -t, "c": np.where(t > 0, "p", "n")}
        ),
        d / "part-00000.parquet",
    )
    params = {"latent_dim": 1, "hidden": (8,), "epochs": 2, "random_state": 0}
    train_model(d, SCHEMA, tmp_path / "m", dataset="x", estimator_params=params)
    return tmp_path / "m"


def test_round_trip_scores_identically(bundle):
    m1, m2 = LatentModel.load(bundle), LatentModel.load(bundle)
    t = pa.table({"a": [0.1, None], "b": [1.0, 2.0], "c": ["p", "never-seen"]})
    s1, s2 = m1.score(t), m2.score(t)
    for field in ("latent", "score", "is_anomaly"):
        np.testing.assert_array_equal(getattr(s1, field), getattr(s2, field))
    assert s1.latent.shape == (2, 1) and s1.is_anomaly.dtype == bool


def test_bundle_records_its_family_and_old_bundles_load_as_autoencoders(bundle):
    import json

    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    assert meta["family"] == "ae"
    t = pa.table({"a": [0.1, 0.5], "b": [1.0, 2.0], "c": ["p", "n"]})
    before = LatentModel.load(bundle).score(t)
    # A bundle saved before model families existed has no "family" field.
    del meta["family"]
    meta_path.write_text(json.dumps(meta))
    old = LatentModel.load(bundle)
    assert old.info.family == "ae"
    np.testing.assert_array_equal(old.score(t).score, before.score)


def test_bundle_of_an_unregistered_family_fails_with_one_line(bundle):
    import json

    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "family": "gan"}))
    with pytest.raises(ValueError) as exc:
        LatentModel.load(bundle)
    msg = str(exc.value)
    assert "\n" not in msg and "bundle.json" in msg
    assert "unknown model family 'gan'; registered: ae, denoising" in msg


@pytest.mark.parametrize(
    ("target", "payload"),
    [
        ("estimator/weights.pt", b"\x00garbage"),
        ("estimator/weights.pt", pickle.dumps({"evil": print})),
        ("preprocessor.json", b"{"),
        ("bundle.json", b'{"format": 99}'),
    ],
)
def test_tampered_files_fail_with_one_line_naming_the_file(bundle, target, payload):
    (bundle / target).write_bytes(payload)
    with pytest.raises(ValueError) as exc:
        LatentModel.load(bundle)
    msg = str(exc.value)
    assert "\n" not in msg and target.split("/")[-1] in msg


def test_swapped_weights_from_another_model_are_refused(bundle, tmp_path):
    import shutil

    other = tmp_path / "other"
    shutil.copytree(bundle, other)
    w = other / "estimator" / "weights.pt"
    import torch

    state = torch.load(w, weights_only=True)
    state = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save(state, w)
    with pytest.raises(ValueError, match=r"weights\.pt"):
        LatentModel.load(other)
