"""Label guidance: the table's label, read linearly from the code while training.

An autoencoder's code keeps what reconstructs the row, which is not what a
downstream model needs most: a low-dimensional code spends itself on the
columns with the most variance and bends the rest. When the table has a label
(weatherAUS: ``RainTomorrow``), a linear head reads it from the code during
training, and its loss is added to the reconstruction's with weight
``label_weight``. The code then keeps what predicts the label *linearly* (what
a logistic regression downstream, or a DuckDB ``regr_slope``, can use) and
the rest of its capacity still goes to the reconstruction. This is the
supervised autoencoder of Le, Patterson and White (NeurIPS 2018). The head is
discarded after training: scoring runs the encoder alone, and rows whose label
is not known yet (tomorrow's rain) are encoded like any other.

A two-valued label is fitted by logistic loss, any other numeric label by
squared error after standardising. Rows with an unknown label (NaN) take no
part in the head's loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

#: Columns the label adds to each training row: its value and its weight.
LABEL_COLUMNS = 2


def label_columns(y: Any, n_samples: int) -> tuple[np.ndarray, bool]:
    """The label as training columns: ``(target of shape (n_samples, 2), binary)``.

    Column 0 is the value (0/1 for a two-valued label, else standardised).
    Column 1 is the row's weight: 0 where the label is NaN, else ``n_samples /
    known rows``, so that a batch's mean of weighted losses is, in
    expectation, the mean over its rows with a known label.

    Raises
    ------
    ValueError
        One line, when ``y`` is not numeric, has the wrong length, or has fewer
        than two distinct known values.
    """
    try:
        values = np.asarray(y, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(
            "y must be numeric (NaN where the label is unknown) to guide the code"
        ) from None
    if values.ndim != 1 or values.shape[0] != n_samples:
        raise ValueError(
            f"y must have shape ({n_samples},) to guide the code, got {values.shape}"
        )
    known = np.isfinite(values)
    present = values[known]
    if present.size == 0 or np.ptp(present) == 0:
        raise ValueError(
            "y has fewer than two distinct known values: it cannot guide the code"
        )
    binary = bool(np.isin(present, (0.0, 1.0)).all())
    scaled = values if binary else (values - present.mean()) / present.std()
    target = np.zeros((n_samples, LABEL_COLUMNS), dtype=np.float32)
    target[known, 0] = scaled[known]
    target[:, 1] = known * (n_samples / present.size)
    return target, binary


class LabelHead(nn.Module):
    """A linear read-out of the label from the code, used only in training."""

    def __init__(self, latent_dim: int, binary: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(latent_dim, 1)
        self.binary = binary

    def loss(
        self, code: torch.Tensor, value: torch.Tensor, weight: torch.Tensor
    ) -> torch.Tensor:
        """Weighted mean loss over the batch's rows (see :func:`label_columns`)."""
        predicted = self.linear(code).squeeze(1)
        if self.binary:
            # Logistic loss from the logit, as binary_cross_entropy_with_logits
            # computes it, in fewer kernels: each one counts in a small step.
            per_row = nn.functional.softplus(predicted) - predicted * value
        else:
            per_row = (predicted - value).square()
        return (per_row @ weight) / code.shape[0]
