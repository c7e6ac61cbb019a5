"""Latent axes that survive retraining: a retrained model's codes rotated
onto the previous champion's.

Two autoencoders trained on the same data learn the same structure in
different coordinates (another seed permutes, flips and rotates the axes), so
after a retrain ``latent_0`` would mean something else. The new model's codes
are therefore mapped onto the old model's by an orthogonal Procrustes
rotation plus a shift, ``z' = (z - source_mean) @ rotation + target_mean``,
fitted on a shared reference sample (both models encode the same raw rows).
A rotation keeps every distance and angle between codes, so nothing the codes
say changes, only the axes they are read on. The part of the old codes that no
rotation reproduces is the *residual* (share of their variance), recorded with
the alignment: close to 0 when the two models learned the same thing.

A latent space has an id (:func:`new_space_id`) carried in every latent file's
metadata; an aligned model keeps its predecessor's id. The id changes only
when alignment is impossible: no previous champion, a different
``latent_dim``, or a champion that cannot read the new data.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

#: Reference rows the rotation is fitted on (a seeded sample of training).
REFERENCE_ROWS = 5000


@dataclass(frozen=True)
class Alignment:
    """A fitted rigid map of codes onto a previous model's axes."""

    rotation: list[list[float]]
    source_mean: list[float]
    target_mean: list[float]
    #: Share of the target codes' variance the rotation leaves unexplained.
    residual: float
    reference_rows: int
    #: The champion version it was aligned to.
    aligned_to: str = ""

    def apply(self, latent: np.ndarray) -> np.ndarray:
        """``latent`` on the aligned axes, float32."""
        r = np.asarray(self.rotation, dtype=np.float64)
        mu_s = np.asarray(self.source_mean, dtype=np.float64)
        mu_t = np.asarray(self.target_mean, dtype=np.float64)
        out = (np.asarray(latent, dtype=np.float64) - mu_s) @ r + mu_t
        return out.astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Alignment:
        return cls(**d)


def fit_procrustes(
    source: np.ndarray, target: np.ndarray, aligned_to: str = ""
) -> Alignment:
    """The rotation (and shift) taking ``source`` codes closest to ``target``'s.

    Orthogonal Procrustes (Schoenemann 1966): with centred codes ``A`` and
    ``B``, ``R = U V^T`` where ``U S V^T = A^T B`` minimises ``||A R - B||``
    over orthogonal ``R``.
    """
    a = np.asarray(source, dtype=np.float64)
    b = np.asarray(target, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"codes of shapes {a.shape} and {b.shape} cannot be aligned")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    ac, bc = a - mu_a, b - mu_b
    u, _, vt = np.linalg.svd(ac.T @ bc)
    rotation = u @ vt
    total = float((bc**2).sum())
    residual = float(((ac @ rotation - bc) ** 2).sum()) / total if total > 0 else 0.0
    return Alignment(
        rotation=rotation.tolist(),
        source_mean=mu_a.tolist(),
        target_mean=mu_b.tolist(),
        residual=residual,
        reference_rows=int(a.shape[0]),
        aligned_to=aligned_to,
    )


def new_space_id(dataset: str, latent: np.ndarray) -> str:
    """A new latent space's id: the dataset and a digest of reference codes,
    so the same seed and data give the same id."""
    digest = hashlib.sha256(np.ascontiguousarray(latent, dtype=np.float32).tobytes())
    return f"{dataset}-{digest.hexdigest()[:12]}"
