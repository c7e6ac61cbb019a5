"""One saved model: the preprocessor and the model family's estimator together.

A bundle directory holds ``bundle.json`` (input schema, training facts, the
model family's registered name, optional cluster centres), ``preprocessor.json``
and ``estimator/`` (state_dict plus JSON, written by the family). Nothing in it
is a pickle, so loading a model cannot run code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models.families import LEGACY_FAMILY, UnknownFamilyError, get_family
from models.family import ModelFamily, Scores, score_rows
from models.preprocessing import TableLike, TabularPreprocessor

BUNDLE_FORMAT = 1


@dataclass
class BundleInfo:
    """Facts saved with a model: what it expects and how it was made.

    ``input_schema`` maps each input column to its kind (numeric, categorical,
    date, text) and role (key, feature, label); downstream checks compare it
    with new data before reusing the model.
    """

    dataset: str
    input_schema: dict[str, Any]
    keys: list[str] = field(default_factory=list)
    label: str | None = None
    trained_at: str = ""
    n_train_rows: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    reference: dict[str, Any] = field(default_factory=dict)
    cluster_centers: list[list[float]] | None = None
    # The registered name of the model family (models.families); bundles saved
    # before families existed have none and are autoencoders.
    family: str = LEGACY_FAMILY


class LatentModel:
    """Preprocessor + model, scored as one.

    Parameters
    ----------
    preprocessor : TabularPreprocessor
        Fitted preprocessor turning raw columns into the model's input.
    estimator : ModelFamily
        Fitted model of the family ``info.family``.
    info : BundleInfo
        Schema and training facts.
    """

    def __init__(
        self,
        preprocessor: TabularPreprocessor,
        estimator: ModelFamily,
        info: BundleInfo,
    ) -> None:
        self.preprocessor = preprocessor
        self.estimator = estimator
        self.info = info

    @property
    def latent_dim(self) -> int:
        return int(self.estimator.latent_dim)

    @property
    def threshold(self) -> float:
        return float(self.estimator.threshold_)

    @property
    def latent_names(self) -> list[str]:
        return [f"latent_{i}" for i in range(self.latent_dim)]

    def encode(self, data: TableLike) -> np.ndarray:
        return self.preprocessor.transform(data)

    def score(self, data: TableLike) -> Scores:
        """Latent features, anomaly scores and flags for ``data``.

        Arrays of shapes (n, latent_dim) float32, (n,) float32, (n,) bool.
        """
        return score_rows(self.estimator, self.preprocessor.transform(data))

    def clusters(self, latent: np.ndarray) -> np.ndarray | None:
        """Nearest learned cluster centre for each latent row, or None."""
        if not self.info.cluster_centers:
            return None
        centers = np.asarray(self.info.cluster_centers, dtype=np.float32)
        d = ((latent[:, None, :] - centers[None, :, :]) ** 2).sum(-1)
        return d.argmin(axis=1).astype(np.int32)

    def source_errors(self, data: TableLike) -> pd.DataFrame:
        """Per-input-column contributions to the score (rows x input columns):
        squared reconstruction errors for a reconstruction model."""
        x = self.preprocessor.transform(data)
        fe = np.asarray(self.estimator.feature_contributions(x), dtype=np.float64)
        names, per_col = self.preprocessor.source_errors(fe)
        return pd.DataFrame(per_col, columns=names)

    def predict_frame(self, data: pd.DataFrame | pa.Table) -> pd.DataFrame:
        """The pyfunc output: latent_*, recon_error, is_anomaly (and cluster)."""
        # MLflow may hand over a frame with the index of the caller; keep it.
        index = data.index if isinstance(data, pd.DataFrame) else None
        scores = self.score(data)
        out = pd.DataFrame(scores.latent, columns=self.latent_names, index=index)
        out["recon_error"] = scores.score
        out["is_anomaly"] = scores.is_anomaly
        labels = self.clusters(scores.latent)
        if labels is not None:
            out["cluster"] = labels
        return out

    # -- persistence ----------------------------------------------------------
    def save(self, path: Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.preprocessor.save(path / "preprocessor.json")
        self.estimator.save(path / "estimator")
        meta = {"format": BUNDLE_FORMAT, **self.info.__dict__}
        tmp = path / ".bundle.json.tmp"
        tmp.write_text(json.dumps(meta, indent=1, default=_json_default))
        os.replace(tmp, path / "bundle.json")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> LatentModel:
        """Load a bundle; a missing or tampered file raises a one-line ValueError."""
        path = Path(path)
        meta_path = path / "bundle.json"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{meta_path} is not a readable model file: {exc}"
            ) from None
        if not isinstance(meta, dict) or meta.pop("format", None) != BUNDLE_FORMAT:
            raise ValueError(f"{meta_path} is not a latentflow model (unknown format)")
        try:
            info = BundleInfo(**meta)
        except TypeError as exc:
            raise ValueError(f"{meta_path} has unexpected fields: {exc}") from None
        pre = TabularPreprocessor.load(path / "preprocessor.json")
        try:
            family = get_family(str(info.family))
        except UnknownFamilyError as exc:
            raise ValueError(f"{meta_path}: {exc}") from None
        est = family.load(path / "estimator", device=device)
        if est.n_features_in_ != pre.n_features_out:
            raise ValueError(
                f"{path}: the network expects {est.n_features_in_} inputs but the"
                f" preprocessor makes {pre.n_features_out}"
            )
        return cls(pre, est, info)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def schema_columns(schema: dict[str, Any], role: str | Sequence[str]) -> list[str]:
    """Names of the columns in a saved input schema with the given role(s)."""
    roles = {role} if isinstance(role, str) else set(role)
    return [c["name"] for c in schema.get("columns", []) if c.get("role") in roles]
