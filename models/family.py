"""The contract between the pipeline and a model family, and the typed scores.

A *model family* turns the preprocessed matrix (``n_samples x n_features``,
float32, finite, standardised) into latent features and per-row anomaly scores.
The pipeline (train, register, score, drift, the promotion gate) uses nothing
else of a model than :class:`ModelFamily` describes, so a new family (a
sequence autoencoder, a GAN, ...) plugs in by implementing it and registering a
name in :mod:`models.families`. The autoencoder kinds are
:class:`models.families.autoencoder.AutoencoderFamily`.

Kept free of torch and scikit-learn imports so that the config can name the
families without loading a network library.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np

#: The JSON file every family writes into its save directory. It must change
#: whenever the weights do (e.g. record their SHA-256): the scoring cache keys
#: on it, so a stale model is never served for a reused path.
META_FILE = "estimator.json"

#: Rows per chunk when a whole matrix is reconstructed only to measure an
#: error: bounds the extra memory to one chunk's worth of reconstructions.
_MSE_CHUNK = 65536

EpochCallback = Callable[[int, float, float], Any]


@runtime_checkable
class ModelFamily(Protocol):
    """What the pipeline needs from a model family.

    Class-level
    -----------
    settings
        Names of the settings the family takes (``kind`` among them when it
        cares which registered name it was built under). The config passes those
        of its fields with these names to :meth:`build`; the champion/challenger
        comparison and the MLflow run record them.
    build(params, epoch_callback=None)
        An unfitted model from the settings (``params["kind"]`` is the registered
        name). ``epoch_callback(epoch, train_loss, val_loss)``, if the family
        trains in epochs, is called after each one (progress, cancellation).
    load(path, device="cpu")
        Read what :meth:`save` wrote, without unpickling: ``torch.load(...,
        weights_only=True)`` for tensors, JSON for the rest. A missing, corrupt
        or inconsistent file raises a one-line ``ValueError`` naming it.

    Fitted state
    ------------
    latent_dim : int
        Width of :meth:`encode`'s output (the ``latent_*`` columns).
    n_features_in_ : int
        Width of the matrix it was fitted on.
    threshold_ : float
        Scores above it are anomalies; set by ``fit`` with
        :func:`contamination_threshold` from the training scores.
    history_ : dict of str to list of float
        Per-epoch ``train_loss`` / ``val_loss`` (empty lists when the family
        does not train in epochs); logged to MLflow and plotted.
    can_sample : bool
        Whether :meth:`sample` draws new rows.
    """

    settings: ClassVar[tuple[str, ...]]
    latent_dim: int
    n_features_in_: int
    threshold_: float
    history_: dict[str, list[float]]

    @classmethod
    def build(
        cls, params: Mapping[str, Any], epoch_callback: EpochCallback | None = None
    ) -> Self: ...

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> Self: ...

    @property
    def can_sample(self) -> bool: ...

    def fit(self, X: np.ndarray) -> Self:
        """Fit on the preprocessed training matrix (no labels)."""
        ...

    def encode(self, X: np.ndarray) -> np.ndarray:
        """Latent features, ``(n, latent_dim)`` float32."""
        ...

    def anomaly_score(self, X: np.ndarray) -> np.ndarray:
        """Per-row anomaly score, ``(n,)`` float32; higher is more anomalous."""
        ...

    def encode_and_score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(encode(X), anomaly_score(X))`` in one pass: the scoring hot path."""
        ...

    def feature_contributions(self, X: np.ndarray) -> np.ndarray:
        """Each feature's non-negative share of the score, ``(n, n_features_in_)``
        float32 (for a reconstruction model: the squared error per cell)."""
        ...

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        """The model's reconstruction of ``X``, ``(n, n_features_in_)`` float32.

        The pipeline's held-out MSE, its PCA baseline and the champion /
        challenger gate compare reconstructions, so every family gives one.
        """
        ...

    def sample(self, n: int, random_state: Any = None) -> np.ndarray:
        """``n`` new rows ``(n, n_features_in_)``; only when ``can_sample``."""
        ...

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The settings the model was built with (scikit-learn style)."""
        ...

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted model into directory ``path`` (created if missing):
        a state_dict of tensors plus JSON (:data:`META_FILE`), never a pickle;
        each file replaced atomically."""
        ...


@dataclass(frozen=True)
class Scores:
    """What scoring rows gives, by name rather than by position.

    ``score`` is the ``recon_error`` column of the output (the name is kept for
    downstream users; for a non-reconstruction family it is its anomaly score).
    """

    latent: np.ndarray  # (n, latent_dim) float32
    score: np.ndarray  # (n,) float32, higher = more anomalous
    is_anomaly: np.ndarray  # (n,) bool: score > threshold_


def contamination_threshold(scores: np.ndarray, contamination: float) -> float:
    """The anomaly threshold: the ``1 - contamination`` quantile of the training
    scores, so about ``contamination`` of the training rows score above it.

    The one place the rule lives: every family's ``fit`` sets ``threshold_``
    with it.
    """
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1 - contamination))


def is_anomaly(score: np.ndarray, threshold: float) -> np.ndarray:
    """Which scores flag an anomaly: strictly above the threshold.

    The one place the comparison lives (scoring, the pyfunc, the plots).
    """
    return np.asarray(score) > threshold


def score_rows(model: ModelFamily, x: np.ndarray) -> Scores:
    """Latent features, scores and flags of a preprocessed matrix."""
    latent, score = model.encode_and_score(x)
    return Scores(
        latent=latent, score=score, is_anomaly=is_anomaly(score, model.threshold_)
    )


def contributions_and_reconstruction(
    model: ModelFamily, x: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(feature_contributions(x), reconstruct(x))``, what an explanation needs.

    A family may compute both in one pass by defining
    ``contributions_and_reconstruction(X)`` with the same values; it is optional,
    so a family needs only the contract's methods.
    """
    both = getattr(model, "contributions_and_reconstruction", None)
    if callable(both):
        return both(x)
    return model.feature_contributions(x), model.reconstruct(x)


def reconstruction_mse(model: ModelFamily, x: np.ndarray) -> float:
    """Mean squared reconstruction error over all cells of ``x`` (float64 sums),
    reconstructing a chunk at a time."""
    total = 0.0
    for start in range(0, x.shape[0], _MSE_CHUNK):
        chunk = x[start : start + _MSE_CHUNK]
        diff = np.asarray(model.reconstruct(chunk), dtype=np.float64) - chunk
        total += float(np.square(diff).sum())
    return total / max(x.size, 1)
