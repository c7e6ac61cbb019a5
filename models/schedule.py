"""Learning-rate schedules, one definition for every model family.

``"constant"`` keeps the optimiser's rate; ``"cosine"`` decays it to 0 along
half a cosine over all the training steps (one step per batch), so the last
epochs take small steps and settle in the minimum a constant rate keeps
circling.
"""

from __future__ import annotations

import torch

#: The schedules a model accepts (its ``lr_schedule`` setting).
LR_SCHEDULES = ("constant", "cosine")


def make_schedule(
    optimizer: torch.optim.Optimizer, schedule: str, steps: int
) -> torch.optim.lr_scheduler.LRScheduler | None:
    """The scheduler for ``schedule`` over ``steps`` optimiser steps; None for a
    constant rate. Call its ``step()`` after each ``optimizer.step()``."""
    if schedule == "constant":
        return None
    if schedule != "cosine":
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")
    return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(steps, 1))
