"""``anomaly_score``: a row's score as its percentile among the training scores.

A raw score (``recon_error``) is on the scale of the model that made it, and
every retrain moves that scale. The share of the model's own training rows
that score below a row does not move: 0.5 is a typical row for any model,
0.99 is rarer than 99% of what the model was trained on. So ``anomaly_score``
compares across models and dates, where ``recon_error`` does not.

The training scores are kept as :data:`GRID` quantiles in the bundle (a few
KiB of JSON, whatever the training size); a score between two quantiles is
interpolated linearly, a score beyond the largest is 1.
"""

from __future__ import annotations

import numpy as np

#: Quantiles kept of the training scores: every 0.1%.
GRID = 1001


def score_quantiles(train_scores: np.ndarray) -> list[float]:
    """The training scores' quantiles at ``0, 0.001, ..., 1``: what a bundle keeps."""
    scores = np.asarray(train_scores, dtype=np.float64)
    scores = scores[np.isfinite(scores)]
    if scores.size == 0:
        return []
    return np.quantile(scores, np.linspace(0.0, 1.0, GRID)).tolist()


def percentile(scores: np.ndarray, quantiles: list[float]) -> np.ndarray:
    """Each score's percentile among the training scores, float32 in [0, 1].

    Ties in the quantiles (many equal training scores) take the highest
    percentile they span, so a score equal to a common value is not called
    rarer than it is. NaN where there are no quantiles (a bundle saved before
    they were kept and without its training scores).
    """
    scores = np.asarray(scores, dtype=np.float64)
    if not quantiles:
        return np.full(scores.shape, np.nan, dtype=np.float32)
    q = np.asarray(quantiles, dtype=np.float64)
    probs = np.linspace(0.0, 1.0, len(q))
    # Of equal quantiles keep the last: np.interp needs increasing xp.
    last = np.append(q[1:] != q[:-1], True)
    q, probs = q[last], probs[last]
    if len(q) == 1:
        return np.where(scores >= q[0], 1.0, 0.0).astype(np.float32)
    return np.interp(scores, q, probs, left=0.0, right=1.0).astype(np.float32)
