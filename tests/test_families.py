"""The model seam: the family registry, the contract, and a toy family run through
the whole pipeline (real Prefect engine, real MLflow, real Parquet)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Iterator, Mapping
from datetime import date
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd
import pytest
import torch

from models.families import (
    FamilyError,
    UnknownFamilyError,
    family_names,
    get_family,
    register_family,
    unregister_family,
)
from models.family import (
    META_FILE,
    ModelFamily,
    contamination_threshold,
    reconstruction_mse,
)

BUILTIN = ("ae", "denoising", "sparse", "contractive", "vae", "sequence")


# ------------------------------------------------------------------ a toy family


class PCAFamily:
    """PCA as a model family: code = projection, score = mean squared residual.

    Saved as a dict of tensors (``torch.load(weights_only=True)``) plus JSON.
    """

    settings: ClassVar[tuple[str, ...]] = (
        "kind",
        "latent_dim",
        "contamination",
        "random_state",
    )
    can_sample = False

    def __init__(
        self, latent_dim: int = 3, contamination: float = 0.01, random_state: int = 0
    ) -> None:
        self.latent_dim = latent_dim
        self.contamination = contamination
        self.random_state = random_state

    @classmethod
    def build(cls, params: Mapping[str, Any], epoch_callback: Any = None) -> PCAFamily:
        return cls(**{k: v for k, v in params.items() if k != "kind"})

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {
            "latent_dim": self.latent_dim,
            "contamination": self.contamination,
            "random_state": self.random_state,
        }

    def fit(self, X: np.ndarray) -> PCAFamily:
        x = np.asarray(X, dtype=np.float64)
        self.n_features_in_ = x.shape[1]
        self.mean_ = x.mean(axis=0)
        _, _, vt = np.linalg.svd(x - self.mean_, full_matrices=False)
        # Fix each component's sign so that the fit is deterministic.
        signs = np.sign(vt[np.arange(vt.shape[0]), np.abs(vt).argmax(axis=1)])
        self.components_ = (vt * signs[:, None])[: self.latent_dim]
        self.history_: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        self.threshold_ = contamination_threshold(
            self.anomaly_score(X), self.contamination
        )
        return self

    def encode(self, X: np.ndarray) -> np.ndarray:
        return ((np.asarray(X, np.float64) - self.mean_) @ self.components_.T).astype(
            np.float32
        )

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        z = self.encode(X).astype(np.float64)
        return (z @ self.components_ + self.mean_).astype(np.float32)

    def feature_contributions(self, X: np.ndarray) -> np.ndarray:
        diff = self.reconstruct(X).astype(np.float64) - X
        return np.square(diff).astype(np.float32)

    def anomaly_score(self, X: np.ndarray) -> np.ndarray:
        return self.feature_contributions(X).mean(axis=1)

    def encode_and_score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.encode(X), self.anomaly_score(X)

    def sample(self, n: int, random_state: Any = None) -> np.ndarray:
        raise ValueError("PCAFamily cannot sample")

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(
            {
                "mean": torch.from_numpy(self.mean_.copy()),
                "components": torch.from_numpy(self.components_.copy()),
            },
            buffer,
        )
        weights = buffer.getvalue()
        meta = {
            "params": self.get_params(),
            "threshold_": self.threshold_,
            "n_features_in_": self.n_features_in_,
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        }
        for name, data in (("weights.pt", weights), (META_FILE, json.dumps(meta))):
            tmp = path / f".{name}.tmp"
            tmp.write_bytes(data if isinstance(data, bytes) else data.encode())
            os.replace(tmp, path / name)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> PCAFamily:
        path = Path(path)
        meta = json.loads((path / META_FILE).read_text())
        data = (path / "weights.pt").read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["weights_sha256"]:
            raise ValueError(f"weights.pt in {path} does not match its checksum")
        tensors = torch.load(io.BytesIO(data), weights_only=True)
        model = cls(**meta["params"])
        model.mean_ = tensors["mean"].numpy()
        model.components_ = tensors["components"].numpy()
        model.threshold_ = float(meta["threshold_"])
        model.n_features_in_ = int(meta["n_features_in_"])
        model.history_ = {"train_loss": [], "val_loss": []}
        return model


@pytest.fixture
def pca_family() -> Iterator[type[PCAFamily]]:
    register_family("pca")(PCAFamily)
    try:
        yield PCAFamily
    finally:
        # Other tests must see only the built-in families.
        unregister_family("pca")


# --------------------------------------------------------------------- registry


def test_builtin_families_are_the_autoencoder_kinds_and_sequence() -> None:
    from models.estimator import KINDS
    from models.families.autoencoder import AutoencoderFamily
    from models.families.sequence import SequenceFamily

    assert family_names() == BUILTIN and BUILTIN[:-1] == KINDS
    for name in KINDS:
        assert get_family(name) is AutoencoderFamily
    assert get_family("sequence") is SequenceFamily


def test_unknown_family_is_one_line_listing_the_names() -> None:
    with pytest.raises(UnknownFamilyError) as exc:
        get_family("gan")
    msg = str(exc.value)
    assert "\n" not in msg
    assert msg == (
        "unknown model family 'gan'; registered:"
        " ae, denoising, sparse, contractive, vae, sequence"
    )


def test_unknown_kind_in_config_is_a_one_line_config_error(pca_family) -> None:
    from flows.config import build_config
    from tasks.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        build_config(None, {"input": "a.csv", "kind": "gan"})
    msg = str(exc.value)
    assert "\n" not in msg and "kind: unknown model family 'gan'" in msg
    assert msg.endswith(
        "registered: ae, denoising, sparse, contractive, vae, sequence, pca"
    )
    # A registered family is a valid kind, with only its own settings passed on.
    cfg = build_config(None, {"input": "a.csv", "kind": "pca", "latent_dim": 2})
    assert cfg.estimator_params() == {
        "kind": "pca",
        "latent_dim": 2,
        "contamination": 0.01,
        "random_state": 42,
    }


def test_config_schema_lists_the_registered_families(pca_family) -> None:
    from flows.config import PipelineConfig

    schema = PipelineConfig.model_json_schema()
    kind = schema["$defs"]["ModelSection"]["properties"]["kind"]
    assert kind["enum"] == [*BUILTIN, "pca"]


def test_duplicate_registration_is_refused(pca_family) -> None:
    class Other(PCAFamily):
        pass

    with pytest.raises(FamilyError, match=r"'pca' is already registered .*PCAFamily"):
        register_family("pca")(Other)
    with pytest.raises(FamilyError, match="'vae' is already registered"):
        register_family("vae")(Other)
    with pytest.raises(FamilyError, match="'x' is already registered"):
        register_family("x", "x")(Other)
    assert get_family("pca") is PCAFamily and "x" not in family_names()


def test_unregistered_family_leaves_no_trace() -> None:
    register_family("tmp-family")(PCAFamily)
    unregister_family("tmp-family")
    assert family_names() == BUILTIN
    with pytest.raises(UnknownFamilyError):
        unregister_family("tmp-family")


def test_autoencoder_family_answers_the_contract() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 6)).astype(np.float32)
    params = {"kind": "vae", "latent_dim": 2, "hidden": (8,), "epochs": 2}
    est = get_family("vae").build({**params, "random_state": 0}).fit(x)
    assert isinstance(est, ModelFamily)
    assert isinstance(PCAFamily(latent_dim=2).fit(x), ModelFamily)
    z, score = est.encode_and_score(x)
    assert z.dtype == score.dtype == np.float32 and z.shape == (300, 2)
    np.testing.assert_array_equal(est.encode(x), z)
    np.testing.assert_array_equal(est.anomaly_score(x), score)
    contributions = est.feature_contributions(x)
    assert contributions.shape == x.shape and (contributions >= 0).all()
    np.testing.assert_allclose(contributions.mean(axis=1), score, rtol=1e-5)
    assert reconstruction_mse(est, x) == pytest.approx(-est.score(x), rel=1e-5)
    assert est.threshold_ == contamination_threshold(
        est.decision_scores_, est.contamination
    )
    assert est.can_sample and est.sample(4, random_state=0).shape == (4, 6)
    assert not get_family("ae").build({"kind": "ae"}).can_sample
    with pytest.raises(ValueError, match="unknown autoencoder setting"):
        get_family("ae").build({"kind": "ae", "latnet_dim": 2})


# ----------------------------------------------------------------- the pipeline


@pytest.mark.slow
def test_toy_family_runs_through_the_whole_pipeline(
    prefect_harness, pca_family, small_csv, tmp_path
) -> None:
    import mlflow

    from flows.cli import run_pipeline
    from models.bundle import LatentModel

    data = tmp_path / "lf"
    overrides = {
        "input": str(small_csv),
        "data_dir": str(data),
        "run_date": date(2024, 3, 1),
        "latent_dim": 3,
        "kind": "pca",
    }
    s1 = run_pipeline(None, overrides)
    assert s1["trained"] and s1["model_version"] == 1
    out = pd.read_parquet(s1["output"]).sort_values("_row_id").reset_index(drop=True)
    assert list(out.columns) == [
        "_row_id",
        "Date",
        "Location",
        "latent_0",
        "latent_1",
        "latent_2",
        "recon_error",
        "anomaly_score",
        "is_anomaly",
        "explanation",
        "model_name",
        "model_version",
    ]
    assert len(out) == s1["rows_scored"] > 0
    assert 0 < out["is_anomaly"].sum() < 0.03 * len(out)

    client = mlflow.MlflowClient()
    run = client.get_run(s1["mlflow_run_id"])
    assert run.data.params["kind"] == "pca" and "epochs" not in run.data.params
    assert run.data.metrics["val_mse"] == pytest.approx(
        run.data.metrics["pca_val_mse"], rel=1e-4
    )
    # The registered model loads, through the registry, as the toy family; its
    # pyfunc reproduces the scored partition.
    model_uri = "models:/weatheraus-autoencoder@champion"
    bundle = Path(mlflow.artifacts.download_artifacts(f"{model_uri}")) / "artifacts"
    loaded = LatentModel.load(bundle / "model_dir")
    assert isinstance(loaded.estimator, PCAFamily) and loaded.info.family == "pca"
    ingested = pd.read_parquet(data / "ingested" / "weatheraus").head(50)
    pred = mlflow.pyfunc.load_model(model_uri).predict(ingested.drop(columns="_row_id"))
    assert list(pred.columns) == [*out.columns[3:10], "error"]
    assert pred["error"].isna().all()
    scored = out.set_index("_row_id").loc[ingested["_row_id"]]
    np.testing.assert_allclose(pred["recon_error"], scored["recon_error"], rtol=1e-6)
    np.testing.assert_array_equal(pred["is_anomaly"], scored["is_anomaly"])
    # ... and the scores are the toy's: PCA's squared residuals.
    x = loaded.preprocessor.transform(ingested)
    np.testing.assert_allclose(
        scored["recon_error"], loaded.estimator.anomaly_score(x), rtol=1e-6
    )

    # The second run reuses the toy champion: same outputs, no training.
    s2 = run_pipeline(None, overrides)
    assert not s2["trained"] and s2["model_version"] == 1
    again = pd.read_parquet(s2["output"]).sort_values("_row_id")
    pd.testing.assert_frame_equal(again.reset_index(drop=True), out)

    # Asking for another family is a different model: retrain, not reuse.
    s3 = run_pipeline(None, {**overrides, "kind": "ae", "epochs": 2, "hidden": (8,)})
    assert s3["trained"] and "params_changed: kind 'pca'->'ae'" in s3["reason"]
