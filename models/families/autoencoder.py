"""The autoencoder kinds (ae, denoising, sparse, contractive, vae) as one family.

:class:`AutoencoderFamily` is :class:`models.estimator.AutoencoderReducer` with
the contract's names added on top (an adapter by subclassing): its fitting,
scores, files and parameters are the estimator's own, so a bundle saved before
the family seam existed loads unchanged. Its names are the estimator's kinds,
taken from :data:`models.objectives.OBJECTIVES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

from models.estimator import KINDS, AutoencoderReducer
from models.families import register_family
from models.family import EpochCallback
from models.objectives import OBJECTIVES

# Everything the estimator's constructor takes, except what is not a setting of
# the model: logging and the per-epoch hook.
_NOT_SETTINGS = frozenset({"self", "verbose", "epoch_callback"})


@register_family(*KINDS)
class AutoencoderFamily(AutoencoderReducer):
    """An :class:`AutoencoderReducer` answering to :class:`models.family.ModelFamily`.

    The registered name is the estimator's ``kind``.
    """

    settings: ClassVar[tuple[str, ...]] = tuple(
        name
        for name in inspect.signature(AutoencoderReducer.__init__).parameters
        if name not in _NOT_SETTINGS
    )

    @classmethod
    def build(
        cls, params: Mapping[str, Any], epoch_callback: EpochCallback | None = None
    ) -> AutoencoderFamily:
        unknown = sorted(set(params) - set(cls.settings))
        if unknown:
            raise ValueError(
                f"unknown autoencoder setting(s) {', '.join(unknown)}; known:"
                f" {', '.join(cls.settings)}"
            )
        return cls(**params, epoch_callback=epoch_callback)

    @property
    def can_sample(self) -> bool:
        return OBJECTIVES[self.kind].variational

    def encode(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.transform(X), dtype=np.float32)

    def anomaly_score(self, X: np.ndarray) -> np.ndarray:
        # decision_function's float64 holds the float32 scores exactly.
        return self.decision_function(X).astype(np.float32)

    def feature_contributions(self, X: np.ndarray) -> np.ndarray:
        return self.score_contributions(X)

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        return np.asarray(self.inverse_transform(self.transform(X)), dtype=np.float32)

    def contributions_and_reconstruction(
        self, X: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        # One encoder and one decoder pass instead of two of each.
        return self.score_contributions_and_reconstruction(X)
