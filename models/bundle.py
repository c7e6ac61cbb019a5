"""One saved model: the preprocessor and the model family's estimator together.

A bundle directory holds ``bundle.json`` (input schema, training facts, drift
reference, the model family's registered name, optional cluster centres),
``preprocessor.json``, ``estimator/`` (state_dict plus JSON, written by the
family) and ``manifest.json``: the SHA-256 of every other file, checked before
anything is parsed. Nothing in it is a pickle, so loading a model cannot run
code.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa

from models import columns as cols
from models.alignment import Alignment
from models.atomic import atomic_write_bytes
from models.cells import as_text, cell_problems, parse_cells
from models.explain import explanation_array
from models.families import LEGACY_FAMILY, UnknownFamilyError, get_family
from models.family import ModelFamily, Scores, is_anomaly, score_rows
from models.integrity import check_manifest, write_manifest
from models.percentile import percentile
from models.preprocessing import TableLike, TabularPreprocessor
from models.sequence_windows import WindowState, row_context

BUNDLE_FORMAT = 1
#: The served output's per-row reason, null for rows scored.
SERVE_ERROR = "error"


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
    #: Quantiles of the training scores (models.percentile): anomaly_score.
    score_quantiles: list[float] = field(default_factory=list)
    #: The rotation onto the previous champion's axes (models.alignment).
    alignment: dict[str, Any] | None = None
    #: The latent space the codes are on; kept across aligned retrains.
    latent_space_id: str = ""


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
        #: Digest of the manifest the model was loaded and verified with.
        self.manifest_sha256: str | None = None
        self.alignment = Alignment.from_dict(info.alignment) if info.alignment else None

    @property
    def latent_dim(self) -> int:
        return int(self.estimator.latent_dim)

    @property
    def threshold(self) -> float:
        return float(self.estimator.threshold_)

    @property
    def latent_names(self) -> list[str]:
        return cols.latent_names(self.latent_dim)

    def encode(self, data: TableLike) -> np.ndarray:
        return self.preprocessor.transform(data)

    @property
    def context_columns(self) -> tuple[str, str] | None:
        """``(entity, time)`` for a family that scores rows in their series
        (``kind: sequence``), else None."""
        if not getattr(self.estimator, "needs_context", False):
            return None
        return getattr(self.estimator, "context_columns", None)

    def new_state(self) -> WindowState | None:
        """What a stream of batches carries between them (None: nothing)."""
        if self.context_columns is None:
            return None
        return self.estimator.new_state()  # type: ignore[attr-defined]

    def score(self, data: TableLike, state: WindowState | None = None) -> Scores:
        """Latent features, anomaly scores and flags for ``data``.

        Arrays of shapes (n, latent_dim) float32, (n,) float32, (n,) bool.
        The codes are on the aligned axes when the model has an alignment. A
        sequence model takes each row's history from the rows before it in
        ``data`` and from ``state`` (the earlier batches of a stream), which
        it updates; without ``state`` the rows are their own history.
        """
        return self.score_features(self.preprocessor.transform(data), data, state)

    def score_features(
        self, x: np.ndarray, data: TableLike, state: WindowState | None = None
    ) -> Scores:
        """:meth:`score` of rows already preprocessed: ``x`` is
        ``preprocessor.transform(data)``, shape (n, n_features); ``data`` gives
        a sequence model its rows' series and order."""
        columns = self.context_columns
        if columns is None:
            scores = score_rows(self.estimator, x)
        else:
            latent, score = self.estimator.score_stream(  # type: ignore[attr-defined]
                x, row_context(data, *columns), state
            )
            scores = Scores(latent, score, is_anomaly(score, self.threshold))
        if self.alignment is None:
            return scores
        return replace(scores, latent=self.alignment.apply(scores.latent))

    def anomaly_score(self, score: np.ndarray) -> np.ndarray:
        """Each score's percentile among the training scores (0..1, float32)."""
        quantiles = self.info.score_quantiles
        if not quantiles:
            # A bundle saved before the quantiles were kept: its training scores.
            from models.percentile import score_quantiles

            train = getattr(self.estimator, "decision_scores_", None)
            quantiles = [] if train is None else score_quantiles(np.asarray(train))
            self.info.score_quantiles = quantiles
        return percentile(score, quantiles)

    def advance(self, data: TableLike, state: WindowState | None) -> None:
        """Feed rows into a stream's ``state`` without scoring them."""
        columns = self.context_columns
        if state is None or columns is None:
            return
        self.estimator.advance(  # type: ignore[attr-defined]
            self.preprocessor.transform(data), row_context(data, *columns), state
        )

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
        columns = self.context_columns
        if columns is None:
            fe = self.estimator.feature_contributions(x)
        else:
            fe = self.estimator.feature_contributions(  # type: ignore[call-arg]
                x, row_context(data, *columns)
            )
        names, per_col = self.preprocessor.source_errors(
            np.asarray(fe, dtype=np.float64)
        )
        return pd.DataFrame(per_col, columns=names)

    def day_contributions(self, data: TableLike) -> tuple[np.ndarray, np.ndarray]:
        """For a sequence model: each row's score split over its window's days,
        ``(n, window)``, and the day number each slot stands for (days since
        1970-01-01, or the integer step), with the rows before it in ``data``
        as its history."""
        from models.sequence_windows import context_days

        columns = self.context_columns
        if columns is None:
            raise ValueError("only a sequence model splits its scores over days")
        ctx = row_context(data, *columns)
        x = self.preprocessor.transform(data)
        _, by_day = self.estimator.explain(x, ctx)  # type: ignore[attr-defined]
        return by_day, context_days(ctx, by_day.shape[1])

    def predict_frame(self, data: pd.DataFrame | pa.Table) -> pd.DataFrame:
        """The pyfunc output: latent_*, recon_error, anomaly_score, is_anomaly
        (and cluster), then explanation."""
        # MLflow may hand over a frame with the index of the caller; keep it.
        index = data.index if isinstance(data, pd.DataFrame) else None
        features = self.preprocessor.transform(data)
        scores = self.score_features(features, data)
        out = pd.DataFrame(scores.latent, columns=self.latent_names, index=index)
        out[cols.RECON_ERROR] = scores.score
        out[cols.ANOMALY_SCORE] = self.anomaly_score(scores.score)
        out[cols.IS_ANOMALY] = scores.is_anomaly
        labels = self.clusters(scores.latent)
        if labels is not None:
            out[cols.CLUSTER] = labels
        out[cols.EXPLANATION] = pd.Series(
            explanation_array(
                self, data, scores.is_anomaly, features=features
            ).to_pylist(),
            index=index,
            dtype=object,
        )
        return out

    def predict_raw(self, data: pd.DataFrame) -> pd.DataFrame:
        """Score raw rows exactly as batch ingest + scoring would (the pyfunc).

        Cells go through the ingest's parsing (:mod:`models.cells`): null
        markers such as ``"NA"`` are missing values, junk such as ``"abc"`` in a
        numeric column is an error, never imputed. A row the batch path would
        reject gets null outputs and its reason in ``error`` (the same wording
        as ``_reject_reason``); good rows get ``error`` null. Every column of
        the model's input schema present in ``data`` is checked (keys, label
        and excluded columns too, as ingest does); only features are required.

        Returns a frame with ``latent_*``, ``recon_error`` (Float32),
        ``is_anomaly`` (boolean), ``cluster`` (Int32, with clusters) and
        ``error`` (object), nullable, in ``data``'s index.
        """
        self.preprocessor.check_columns(data)
        n = len(data)
        # A sequence model reads each row's entity and time as well.
        needed = [*self.preprocessor.input_columns, *(self.context_columns or ())]
        inputs = set(needed)
        missing = [c for c in needed if c not in data.columns]
        if missing:
            raise ValueError(
                f"the data lacks column(s) the model needs: {', '.join(missing)}"
            )
        specs = {
            c["name"]: (c.get("kind", "text"), c.get("role", "feature"))
            for c in self.info.input_schema.get("columns", [])
        }
        for name in self.preprocessor.numeric:
            specs.setdefault(name, ("numeric", "feature"))
        for name in self.preprocessor.categorical:
            specs.setdefault(name, ("categorical", "feature"))
        typed: dict[str, pa.Array] = {}
        reasons: list[list[str]] = [[] for _ in range(n)]
        bad = np.zeros(n, bool)
        # Schema order is the file's column order: reasons come out in the
        # order ingest writes them.
        for name, (kind, role) in specs.items():
            if name not in data.columns:
                continue
            parsed = parse_cells(kind, as_text(data[name]))
            if name in inputs:
                typed[name] = parsed.values
            for problem in cell_problems(name, kind, role, parsed):
                idx = np.flatnonzero(problem.mask)
                for i, text in zip(idx.tolist(), problem.describe(idx), strict=True):
                    reasons[i].append(text)
                bad |= problem.mask
        good = np.flatnonzero(~bad)
        latent = np.full((n, self.latent_dim), np.nan, np.float32)
        score = np.full(n, np.nan, np.float32)
        flag = np.zeros(n, bool)
        labels = np.zeros(n, np.int32)
        why: list[Any] = [None] * n
        if len(good):
            table = pa.table({c: typed[c] for c in needed})
            rows = table.take(pa.array(good))
            features = self.preprocessor.transform(rows)
            scores = self.score_features(features, rows)
            latent[good] = scores.latent
            score[good] = scores.score
            flag[good] = scores.is_anomaly
            explained = explanation_array(
                self, rows, scores.is_anomaly, features=features
            ).to_pylist()
            for i, e in zip(good.tolist(), explained, strict=True):
                why[i] = e
            found = self.clusters(scores.latent)
            if found is not None:
                labels[good] = found
        index = data.index
        out = pd.DataFrame(
            {
                name: pd.array(np.where(bad, np.nan, latent[:, i]), dtype="Float32")
                for i, name in enumerate(self.latent_names)
            },
            index=index,
        )
        out[cols.RECON_ERROR] = pd.array(np.where(bad, np.nan, score), "Float32")
        pct = self.anomaly_score(score)
        out[cols.ANOMALY_SCORE] = pd.array(np.where(bad, np.nan, pct), "Float32")
        out[cols.IS_ANOMALY] = pd.array(
            np.where(bad, None, flag).astype(object), dtype="boolean"
        )
        if self.info.cluster_centers:
            out[cols.CLUSTER] = pd.array(
                np.where(bad, None, labels).astype(object), dtype="Int32"
            )
        out[cols.EXPLANATION] = pd.Series(why, index=index, dtype=object)
        out[SERVE_ERROR] = pd.Series(
            ["; ".join(r) if r else None for r in reasons], index=index, dtype=object
        )
        return out

    # -- persistence ----------------------------------------------------------
    def save(self, path: Path) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.preprocessor.save(path / "preprocessor.json")
        self.estimator.save(path / "estimator")
        meta = {"format": BUNDLE_FORMAT, **self.info.__dict__}
        text = json.dumps(meta, indent=1, default=_json_default)
        atomic_write_bytes(path / "bundle.json", text.encode())
        # Last: the manifest covers every file written above, JSON included.
        write_manifest(path)
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        device: str = "cpu",
        expected_sha256: str | None = None,
    ) -> LatentModel:
        """Load a bundle; a missing or tampered file raises a one-line ValueError.

        Every file is checked against ``manifest.json`` first (a changed
        threshold or drift reference in the JSON is refused, not used). With
        ``expected_sha256`` (the manifest digest the registry recorded) the
        manifest itself must match it, so rewriting it does not help. Bundles
        saved before manifests existed load with only the weights checksum.
        """
        path = Path(path)
        digest = check_manifest(path, expected_sha256)
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
        model = cls(pre, est, info)
        model.manifest_sha256 = digest
        return model


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
