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
    # A bundle saved before model families existed has no "family" field (and,
    # older than manifests, no manifest.json).
    del meta["family"]
    meta_path.write_text(json.dumps(meta))
    (bundle / "manifest.json").unlink()
    old = LatentModel.load(bundle)
    assert old.info.family == "ae"
    np.testing.assert_array_equal(old.score(t).score, before.score)


def test_bundle_of_an_unregistered_family_fails_with_one_line(bundle):
    import json

    from models.integrity import write_manifest

    meta_path = bundle / "bundle.json"
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "family": "gan"}))
    write_manifest(bundle)  # saved whole by a latentflow that knows "gan"
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


def _edit_json(path, change) -> None:
    import json

    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("target", "change"),
    [
        # A raised threshold hides anomalies; the JSON used to be unchecked.
        ("estimator/estimator.json", lambda d: d["fitted"].update(threshold_=1e9)),
        # A changed drift reference makes every later run "reuse" the champion.
        ("bundle.json", lambda d: d.update(reference={"features": {}})),
        ("preprocessor.json", lambda d: d.update(means=[0.0] * len(d["means"]))),
    ],
)
def test_changed_json_is_refused_naming_the_file(bundle, target, change):
    _edit_json(bundle / target, change)
    with pytest.raises(ValueError) as exc:
        LatentModel.load(bundle)
    msg = str(exc.value)
    assert "\n" not in msg and target in msg and "SHA-256" in msg


def test_added_or_linked_files_are_refused(bundle, tmp_path):
    (bundle / "estimator" / "extra.py").write_text("print('hi')\n")
    with pytest.raises(ValueError, match=r"extra\.py is not part of the saved model"):
        LatentModel.load(bundle)
    (bundle / "estimator" / "extra.py").unlink()
    outside = tmp_path / "outside.json"
    outside.write_bytes((bundle / "bundle.json").read_bytes())
    (bundle / "bundle.json").unlink()
    (bundle / "bundle.json").symlink_to(outside)
    with pytest.raises(ValueError, match=r"bundle\.json is not a regular file"):
        LatentModel.load(bundle)


def test_rewritten_manifest_is_caught_by_the_recorded_digest(bundle):
    from models.integrity import write_manifest

    good = LatentModel.load(bundle).manifest_sha256
    assert good and len(good) == 64
    _edit_json(
        bundle / "estimator" / "estimator.json",
        lambda d: d["fitted"].update(threshold_=1e9),
    )
    write_manifest(bundle)  # the attacker re-signs the bundle locally ...
    assert LatentModel.load(bundle).threshold == 1e9  # ... which alone passes,
    with pytest.raises(ValueError, match=r"manifest\.json does not match the digest"):
        LatentModel.load(bundle, expected_sha256=good)  # but not the record.
