"""``kind: sequence``: a 1-D convolutional autoencoder over windows of days.

A row's *window* is its entity's rows on the ``window`` days up to and
including its own (:mod:`models.sequence_windows`: gaps and the first days of
a series are masked slots, no row is dropped). The family scores a row as

    score = row part + temporal part

* **row part**: the row-wise default model (an :class:`AutoencoderFamily`,
  ``kind: ae``, trained with the same settings) scores the row on its own,
  divided by its training standard deviation. A single-row anomaly is found
  as the row-wise model finds it.
* **temporal part**: a convolutional autoencoder (``Conv1d`` over the days,
  the features as channels, a mask channel for empty slots) reconstructs the
  whole window through a ``latent_dim`` code, which is the row's latent. Three
  figures of the window are each turned into a tail surprisal (``-log`` of
  their tail probability among the training rows) and divided by its training
  standard deviation:

  - ``context``: the current day's reconstruction error given its window (a
    day that does not fit its days, e.g. two days swapped across a season);
  - ``change``: the mean squared change from the previous observed day, in
    both tails (a station stuck at one reading changes by exactly nothing);
  - ``offset``: the window's persistent residual, per column the squared mean
    of the signed errors over the days times their number (one sensor
    drifting slowly: the noise averages out, the offset does not).

Explanations split the score over the columns and over the window's days
(:meth:`SequenceFamily.explain`). Saved as the row model's own files under
``row/`` plus ``weights.pt`` (a state_dict) and ``estimator.json`` holding
both checksums: no pickle.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from models.atomic import atomic_write_bytes
from models.density import marginal_columns
from models.families import get_family, register_family
from models.family import META_FILE, EpochCallback, contamination_threshold
from models.schedule import make_schedule
from models.sequence_windows import (
    ContextColumnError,
    RowContext,
    WindowState,
    gather,
    single_rows,
)

FORMAT_NAME = "latentflow.SequenceFamily"
FORMAT_VERSION = 1
WEIGHTS_FILE = "weights.pt"
ROW_DIR = "row"
#: The row-wise model: the default autoencoder.
ROW_KIND = "ae"
#: Channels of the convolutions: enough for weather-like tables, cheap on CPU.
CHANNELS = 32
#: Smallest per-column spread of errors and changes (standardised units).
SPREAD_FLOOR = 0.05
#: Quantiles kept per temporal figure: the tail table (JSON, a few KiB).
N_QUANTILES = 1025
#: The three temporal figures, in the order of :func:`_figures`' columns.
FIGURES = ("context", "change", "offset")
#: Which tails of each figure are surprising: change is both (stuck: none).
TWO_SIDED = (False, True, False)
#: Rows per forward pass at inference (windows are ``window`` times wider).
INFERENCE_BATCH = 4096
#: Settings passed on to the row-wise model.
ROW_SETTINGS = (
    "latent_dim",
    "hidden",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "lr_schedule",
    "val_fraction",
    "patience",
    "contamination",
    "random_state",
    "device",
)


class WindowNetwork(nn.Module):
    """Conv1d encoder over the days -> code -> Conv1d decoder of the window."""

    def __init__(self, n_features: int, window: int, latent_dim: int) -> None:
        super().__init__()
        self.n_features, self.window, self.latent_dim = n_features, window, latent_dim
        c = CHANNELS
        self.encoder_conv = nn.Sequential(
            nn.Conv1d(n_features + 1, c, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv1d(c, c, kernel_size=3, padding=1),
            nn.ReLU(),
        )
        self.to_code = nn.Linear(c * window, latent_dim)
        self.from_code = nn.Linear(latent_dim, c * window)
        self.decoder_conv = nn.Sequential(
            nn.ReLU(),
            nn.Conv1d(c, c, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv1d(c, n_features, kernel_size=1),
        )

    def forward(
        self, windows: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(code (n, latent), reconstruction (n, window, F))``."""
        inp = torch.cat([windows, mask.unsqueeze(-1)], dim=-1).transpose(1, 2)
        h = self.encoder_conv(inp).flatten(1)
        code = self.to_code(h)
        g = self.from_code(code).view(-1, CHANNELS, self.window)
        return code, self.decoder_conv(g).transpose(1, 2)

    def config(self) -> dict[str, int]:
        return {
            "n_features": self.n_features,
            "window": self.window,
            "latent_dim": self.latent_dim,
        }


def _figures(
    x: np.ndarray,
    mask: np.ndarray,
    recon: np.ndarray,
    resid_scale: np.ndarray,
    change_scale: np.ndarray,
    continuous: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """The temporal figures ``(n, 3)`` (NaN where undefined) and the per-cell
    evidence behind each, ``(n, 3, window, F)``, non-negative.

    Errors and changes are divided per column by their training spread, so a
    column the network reconstructs well (or that rarely changes) weighs by
    how unusual its error (or change) is, not by its units.
    """
    n, w, f = x.shape
    m = mask.astype(np.float32)[..., None]
    z = (x - recon) * m / resid_scale
    cells = np.zeros((n, 3, w, f), dtype=np.float32)
    cells[:, 0, -1] = z[:, -1] ** 2
    figures = np.full((n, 3), np.nan, dtype=np.float64)
    figures[:, 0] = cells[:, 0, -1].mean(axis=1)
    # The previous observed day: the latest filled slot before the row.
    earlier = mask[:, :-1]
    has_prev = earlier.any(axis=1)
    prev = (w - 2) - np.argmax(earlier[:, ::-1], axis=1)
    rows = np.flatnonzero(has_prev)
    change = ((x[rows, -1] - x[rows, prev[rows]]) / change_scale) ** 2
    figures[rows, 1] = change.mean(axis=1)
    # Evidence of a change (or of its absence) sits on both days; a day with
    # no change at all (stuck) spreads it evenly over the columns.
    spread = np.where(change.sum(axis=1, keepdims=True) > 0, change, 1.0)
    cells[rows, 1, -1] = spread / 2
    cells[rows, 1, prev[rows]] = spread / 2
    # The offset: the column whose standardised errors agree most over the
    # days (their sum squared over the days, ~chi-square(1) for noise).
    count = np.maximum(mask.sum(axis=1), 1).astype(np.float32)
    total = z.sum(axis=1)
    # Only columns of many values: a 0/1 column's errors flip with the
    # category and agree by chance far more often than a sensor's.
    offset = np.where(continuous, total**2 / count[:, None], 0.0)
    worst = offset.argmax(axis=1)
    figures[:, 2] = offset[np.arange(n), worst]
    mean_z = total[np.arange(n), worst] / count
    agree = np.maximum(z[np.arange(n), :, worst] * mean_z[:, None], 0.0)
    cells[np.arange(n), 2, :, worst] = agree
    return figures, cells


class TailTable:
    """Tail surprisal of a figure among the training rows (quantile table)."""

    def __init__(self, quantiles: np.ndarray, n: int, two_sided: bool) -> None:
        self.quantiles = np.asarray(quantiles, dtype=np.float64)
        self.n = int(n)
        self.two_sided = bool(two_sided)

    @classmethod
    def fit(cls, values: np.ndarray, two_sided: bool) -> TailTable:
        v = values[np.isfinite(values)]
        if len(v) == 0:
            v = np.zeros(1)
        q = np.quantile(v, np.linspace(0, 1, N_QUANTILES))
        return cls(q, len(v), two_sided)

    def surprisal(self, values: np.ndarray) -> np.ndarray:
        """``-log`` of the tail probability, 0 where the figure is undefined."""
        v = np.nan_to_num(values, nan=float(np.median(self.quantiles)))
        # The CDF at a value tied with many quantiles is the middle of the tie
        # (a common value, e.g. no change at all in a rainless column, is not
        # extreme); the table's steps are 1 / (N_QUANTILES - 1) wide.
        q, steps = self.quantiles, len(self.quantiles) - 1
        lo = np.searchsorted(q, v, side="left") / steps
        hi = np.searchsorted(q, v, side="right") / steps
        cdf = np.clip((lo + hi) / 2, 0.0, 1.0)
        floor = 1.0 / (self.n + 1)
        upper = np.maximum(1.0 - cdf, floor)
        p = np.minimum(2 * np.minimum(cdf, 1.0 - cdf), 1.0) if self.two_sided else upper
        s = -np.log(np.clip(p, floor, 1.0))
        return np.where(np.isfinite(values), s, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {
            "quantiles": [float(q) for q in self.quantiles],
            "n": self.n,
            "two_sided": self.two_sided,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TailTable:
        return cls(np.asarray(d["quantiles"]), int(d["n"]), bool(d["two_sided"]))


@register_family("sequence")
class SequenceFamily:
    """Row-wise autoencoder + a convolutional autoencoder over each row's window.

    Settings: ``window`` (days per window, the row's included),
    ``entity_column`` / ``time_column`` (default: from the dataset's keys, the
    date key is the time and the other key the entity) and the autoencoder's
    training settings, shared by both networks.
    """

    settings: ClassVar[tuple[str, ...]] = (
        "kind",
        "window",
        "entity_column",
        "time_column",
        *ROW_SETTINGS,
    )
    #: Scoring needs each row's entity and time (see :meth:`bind_context`).
    needs_context: ClassVar[bool] = True

    def __init__(
        self,
        window: int = 7,
        entity_column: str | None = None,
        time_column: str | None = None,
        latent_dim: int = 8,
        hidden: tuple[int, ...] = (128, 64),
        epochs: int = 80,
        batch_size: int = 1024,
        lr: float = 5e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        val_fraction: float = 0.1,
        patience: int = 8,
        contamination: float = 0.01,
        random_state: int | None = 42,
        device: str = "cpu",
        epoch_callback: EpochCallback | None = None,
    ) -> None:
        if int(window) < 2:
            raise ValueError(f"window must be at least 2 days, got {window}")
        self.window = int(window)
        self.entity_column = entity_column
        self.time_column = time_column
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.epochs = int(epochs)
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.lr_schedule = str(lr_schedule)
        self.val_fraction = float(val_fraction)
        self.patience = int(patience)
        self.contamination = float(contamination)
        self.random_state = random_state
        self.device = device
        self.epoch_callback = epoch_callback
        self.context_columns: tuple[str, str] | None = None
        self.history_: dict[str, list[float]] = {"train_loss": [], "val_loss": []}

    # -- the contract ---------------------------------------------------------
    @classmethod
    def build(
        cls, params: Mapping[str, Any], epoch_callback: EpochCallback | None = None
    ) -> SequenceFamily:
        unknown = sorted(set(params) - set(cls.settings))
        if unknown:
            raise ValueError(
                f"unknown sequence setting(s) {', '.join(unknown)}; known:"
                f" {', '.join(cls.settings)}"
            )
        args = {k: v for k, v in params.items() if k != "kind"}
        return cls(**args, epoch_callback=epoch_callback)

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        del deep
        return {
            "kind": "sequence",
            "window": self.window,
            "entity_column": self.entity_column,
            "time_column": self.time_column,
            **{k: getattr(self, k) for k in ROW_SETTINGS if k != "device"},
        }

    @property
    def can_sample(self) -> bool:
        return False

    @property
    def n_features_in_(self) -> int:
        return int(self.row_.n_features_in_)

    def sample(self, n: int, random_state: Any = None) -> np.ndarray:
        raise NotImplementedError("the sequence family does not sample rows")

    def bind_context(
        self, keys: list[str], kinds: Mapping[str, str]
    ) -> tuple[str, str]:
        """Fix the entity and time columns from the settings, else the keys.

        ``kinds`` maps column names to their kind (``date`` for a time key).
        Raises ``ContextColumnError`` (one line) when they cannot be told.
        """
        time = self.time_column or next(
            (k for k in keys if kinds.get(k) == "date"), None
        )
        entity = self.entity_column or next(
            (k for k in keys if k != time and kinds.get(k) != "date"), None
        )
        if time is None or entity is None:
            missing = "time_column" if time is None else "entity_column"
            raise ContextColumnError(
                f"kind sequence needs an entity and a time column: set {missing}"
                f" (the keys {keys or 'are none'} do not name one)"
            )
        if time == entity:
            raise ContextColumnError(
                f"entity_column and time_column are both {time!r}; they must differ"
            )
        self.context_columns = (entity, time)
        return self.context_columns

    def fit(
        self,
        X: np.ndarray,
        context: RowContext | None = None,
        train_rows: np.ndarray | None = None,
    ) -> SequenceFamily:
        """Fit on ``X`` in stream order; ``train_rows`` (default all) are the rows
        trained on, the others serve only as their windows' earlier days."""
        x = np.ascontiguousarray(X, dtype=np.float32)
        n, n_features = x.shape
        train = np.arange(n) if train_rows is None else np.asarray(train_rows)
        row_params = {k: getattr(self, k) for k in ROW_SETTINGS}
        self.row_ = _row_family().build({**row_params, "kind": ROW_KIND})
        self.row_.fit(x[train])
        row_train = np.asarray(self.row_.decision_scores_, dtype=np.float64)
        pool, index = self._windows(x, context, None)
        seed = int(self.random_state or 0)
        torch.manual_seed(seed)
        self.network_ = WindowNetwork(n_features, self.window, self.latent_dim)
        self._train(pool, index[train], np.random.default_rng([seed, 5]))
        self.network_.eval()
        self.resid_scale_, self.change_scale_ = self._spreads(pool, index[train])
        self.continuous_ = np.zeros(n_features, bool)
        self.continuous_[marginal_columns(x[train])] = True
        _, figures, _ = self._run(pool, index[train])
        self.tails_ = [
            TailTable.fit(figures[:, k], TWO_SIDED[k]) for k in range(len(FIGURES))
        ]
        surprise = np.stack(
            [t.surprisal(figures[:, k]) for k, t in enumerate(self.tails_)], axis=1
        )
        self.row_scale_ = float(max(row_train.std(), 1e-12))
        self.figure_scales_ = [float(max(s, 1e-12)) for s in surprise.std(axis=0)]
        scores = row_train / self.row_scale_ + (surprise / self.figure_scales_).sum(1)
        self.threshold_ = contamination_threshold(scores, self.contamination)
        return self

    @torch.no_grad()
    def _spreads(
        self, pool: np.ndarray, index: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per column: the spread of the current day's reconstruction error and
        of the day-to-day change over the training windows (floored, so a
        column that never moves does not divide by zero)."""
        f = pool.shape[1]
        err_sq, err_n = np.zeros(f), 0
        chg_sq, chg_n = np.zeros(f), 0
        for start in range(0, len(index), INFERENCE_BATCH):
            w, m = gather(pool, index[start : start + INFERENCE_BATCH])
            _, recon = self.network_(torch.from_numpy(w), torch.from_numpy(m).float())
            err_sq += ((w[:, -1] - recon.numpy()[:, -1]) ** 2).sum(axis=0)
            err_n += len(w)
            has = m[:, -2]
            chg_sq += ((w[has, -1] - w[has, -2]) ** 2).sum(axis=0)
            chg_n += int(has.sum())
        floor = np.float32(SPREAD_FLOOR)
        resid = np.sqrt(err_sq / max(err_n, 1)).astype(np.float32)
        change = np.sqrt(chg_sq / max(chg_n, 1)).astype(np.float32)
        return np.maximum(resid, floor), np.maximum(change, floor)

    def _train(
        self, pool: np.ndarray, index: np.ndarray, rng: np.random.Generator
    ) -> None:
        net = self.network_
        opt = torch.optim.Adam(
            net.parameters(), lr=self.lr, weight_decay=self.weight_decay
        )
        order = rng.permutation(len(index))
        n_val = int(len(index) * self.val_fraction) if len(index) >= 200 else 0
        val, tr = index[order[:n_val]], index[order[n_val:]]
        # The row-wise model's schedule, so one setting means one thing.
        schedule = make_schedule(
            opt, self.lr_schedule, self.epochs * math.ceil(len(tr) / self.batch_size)
        )
        best, best_state, stale = math.inf, None, 0
        for epoch in range(self.epochs):
            net.train()
            total = 0.0
            perm = rng.permutation(len(tr))
            for start in range(0, len(tr), self.batch_size):
                w, m = gather(pool, tr[perm[start : start + self.batch_size]])
                wt, mt = torch.from_numpy(w), torch.from_numpy(m)
                _, recon = net(wt, mt.float())
                loss = _masked_mse(recon, wt, mt)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if schedule is not None:
                    schedule.step()
                total += float(loss.detach()) * len(w)
            train_loss = total / max(len(tr), 1)
            val_loss = self._loss(pool, val) if n_val else train_loss
            self.history_["train_loss"].append(train_loss)
            self.history_["val_loss"].append(val_loss)
            if self.epoch_callback is not None:
                self.epoch_callback(epoch, train_loss, val_loss)
            if val_loss < best - 1e-6:
                best, stale = val_loss, 0
                best_state = {k: v.clone() for k, v in net.state_dict().items()}
            else:
                stale += 1
                if stale >= self.patience:
                    break
        if best_state is not None:
            net.load_state_dict(best_state)

    @torch.no_grad()
    def _loss(self, pool: np.ndarray, index: np.ndarray) -> float:
        self.network_.eval()
        total = 0.0
        for start in range(0, len(index), INFERENCE_BATCH):
            w, m = gather(pool, index[start : start + INFERENCE_BATCH])
            wt, mt = torch.from_numpy(w), torch.from_numpy(m)
            _, recon = self.network_(wt, mt.float())
            total += float(_masked_mse(recon, wt, mt)) * len(w)
        return total / max(len(index), 1)

    def _windows(
        self, x: np.ndarray, context: RowContext | None, state: WindowState | None
    ) -> tuple[np.ndarray, np.ndarray]:
        if context is None:
            return np.asarray(x, dtype=np.float32), single_rows(len(x), self.window)
        if len(context) != len(x):
            raise ValueError(f"{len(context)} context rows for {len(x)} rows")
        if state is None:
            state = self.new_state(x.shape[1])
        return state.windows(np.asarray(x, dtype=np.float32), context)

    def new_state(self, n_features: int | None = None) -> WindowState:
        """An empty window state for streaming rows through :meth:`score_stream`."""
        return WindowState(self.window, n_features or self.n_features_in_)

    @torch.no_grad()
    def _run(
        self, pool: np.ndarray, index: np.ndarray, *, cells: bool = False
    ) -> tuple[np.ndarray, np.ndarray, Any]:
        """Codes, figures and (with ``cells``) the evidence of each window."""
        self.network_.eval()
        codes, figs, evidence = [], [], []
        for start in range(0, len(index), INFERENCE_BATCH):
            w, m = gather(pool, index[start : start + INFERENCE_BATCH])
            code, recon = self.network_(
                torch.from_numpy(w), torch.from_numpy(m).float()
            )
            f, c = _figures(
                w,
                m,
                recon.numpy(),
                self.resid_scale_,
                self.change_scale_,
                self.continuous_,
            )
            codes.append(code.numpy())
            figs.append(f)
            if cells:
                evidence.append(c)
        latent = (
            np.concatenate(codes).astype(np.float32)
            if codes
            else np.zeros((0, self.latent_dim), np.float32)
        )
        figures = np.concatenate(figs) if figs else np.zeros((0, len(FIGURES)))
        return latent, figures, evidence

    def _combine(self, row_score: np.ndarray, figures: np.ndarray) -> np.ndarray:
        return self._row_part(row_score) + self._parts(figures).sum(axis=1)

    def _row_part(self, row_score: np.ndarray) -> np.ndarray:
        return np.asarray(row_score, dtype=np.float64) / self.row_scale_

    def _parts(self, figures: np.ndarray) -> np.ndarray:
        """Each temporal figure's standardised surprisal, ``(n, 3)``."""
        return np.stack(
            [
                t.surprisal(figures[:, k]) / self.figure_scales_[k]
                for k, t in enumerate(self.tails_)
            ],
            axis=1,
        )

    def score_stream(
        self,
        X: np.ndarray,
        context: RowContext | None = None,
        state: WindowState | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(latent, score)`` of rows in stream order; ``state`` carries each
        entity's last days between calls (a fresh one when None)."""
        x = np.asarray(X, dtype=np.float32)
        pool, index = self._windows(x, context, state)
        latent, figures, _ = self._run(pool, index)
        row = np.asarray(self.row_.anomaly_score(x), dtype=np.float64)
        return latent, self._combine(row, figures).astype(np.float32)

    def advance(self, X: np.ndarray, context: RowContext, state: WindowState) -> None:
        """Feed rows into ``state`` without scoring them (a unit's earlier rows)."""
        state.windows(np.asarray(X, dtype=np.float32), context)

    def encode_and_score(
        self, X: np.ndarray, context: RowContext | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.score_stream(X, context)

    def encode(self, X: np.ndarray, context: RowContext | None = None) -> np.ndarray:
        return self.score_stream(X, context)[0]

    def anomaly_score(
        self, X: np.ndarray, context: RowContext | None = None
    ) -> np.ndarray:
        return self.score_stream(X, context)[1]

    def reconstruct(self, X: np.ndarray) -> np.ndarray:
        """The row-wise model's reconstruction: what the promotion gate and the
        PCA baseline compare (a window's reconstruction is not a row's)."""
        return self.row_.reconstruct(X)

    def explain(
        self,
        X: np.ndarray,
        context: RowContext | None = None,
        state: WindowState | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each row's score split over the columns ``(n, F)`` and over its
        window's days ``(n, window)`` (slot ``window - 1`` is the row's day);
        both are non-negative and each row's sum of either is its score."""
        x = np.asarray(X, dtype=np.float32)
        pool, index = self._windows(x, context, state)
        _, figures, evidence = self._run(pool, index, cells=True)
        n, f, w = len(x), x.shape[1], self.window
        row_c = np.asarray(self.row_.feature_contributions(x), dtype=np.float64)
        row_total = row_c.sum(axis=1, keepdims=True)
        row_score = np.asarray(self.row_.anomaly_score(x), dtype=np.float64)
        share = np.divide(
            row_c, row_total, out=np.full_like(row_c, 1.0 / f), where=row_total > 0
        )
        by_feature = share * self._row_part(row_score)[:, None]
        by_day = np.zeros((n, w))
        by_day[:, -1] = self._row_part(row_score)
        parts = self._parts(figures)
        cells = np.concatenate(evidence) if evidence else None
        if cells is not None:
            for k in range(len(FIGURES)):
                c = cells[:, k].astype(np.float64)  # (n, w, f)
                tot = c.sum(axis=(1, 2))
                ok = tot > 0
                frac = np.zeros_like(c)
                frac[ok] = c[ok] / tot[ok, None, None]
                frac[~ok, -1, :] = 1.0 / f
                by_feature += frac.sum(axis=1) * parts[:, k : k + 1]
                by_day += frac.sum(axis=2) * parts[:, k : k + 1]
        return by_feature.astype(np.float32), by_day.astype(np.float32)

    def feature_contributions(
        self, X: np.ndarray, context: RowContext | None = None
    ) -> np.ndarray:
        # Scaled so that a row's mean over the columns is its score, as the
        # autoencoder family's are.
        return self.explain(X, context)[0] * np.float32(X.shape[1])

    # -- persistence ----------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.row_.save(path / ROW_DIR)
        row_meta = (path / ROW_DIR / META_FILE).read_bytes()
        buffer = io.BytesIO()
        tensors = {
            k: v.detach().cpu().contiguous()
            for k, v in self.network_.state_dict().items()
        }
        torch.save(tensors, buffer)
        weights = buffer.getvalue()
        params = self.get_params()
        params["hidden"] = list(self.hidden)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "params": params,
            "architecture": self.network_.config(),
            "fitted": {
                "context_columns": list(self.context_columns or ()),
                "threshold_": float(self.threshold_),
                "row_scale_": self.row_scale_,
                "figure_scales_": self.figure_scales_,
                "resid_scale_": [float(v) for v in self.resid_scale_],
                "change_scale_": [float(v) for v in self.change_scale_],
                "continuous_": [bool(v) for v in self.continuous_],
                "tails_": [t.to_json() for t in self.tails_],
                "history_": self.history_,
            },
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
            # The row model's JSON records its weights' digest: this file
            # changes whenever any weight does (the scoring cache keys on it).
            "row_meta_sha256": hashlib.sha256(row_meta).hexdigest(),
        }
        atomic_write_bytes(path / WEIGHTS_FILE, weights)
        atomic_write_bytes(path / META_FILE, json.dumps(meta, indent=1).encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], device: str = "cpu") -> SequenceFamily:
        path = Path(path)
        where = f"{META_FILE} in {path}"
        try:
            meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"{where} is not readable: {_first_line(exc)}") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ValueError(f"{where} is not a saved sequence model")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{where} has format_version {meta.get('format_version')!r};"
                f" this version reads {FORMAT_VERSION}"
            )
        try:
            row_meta = (path / ROW_DIR / META_FILE).read_bytes()
        except OSError as exc:
            raise ValueError(
                f"{path / ROW_DIR / META_FILE}: {_first_line(exc)}"
            ) from None
        if hashlib.sha256(row_meta).hexdigest() != meta.get("row_meta_sha256"):
            raise ValueError(
                f"{path / ROW_DIR / META_FILE} does not match the checksum recorded"
                f" in {where}"
            )
        try:
            params = dict(meta["params"])
            params.pop("kind", None)
            model = cls(**params, device=device)
            fitted = meta["fitted"]
            arch = meta["architecture"]
            model.network_ = WindowNetwork(
                int(arch["n_features"]), int(arch["window"]), int(arch["latent_dim"])
            )
            cols = fitted["context_columns"]
            model.context_columns = (cols[0], cols[1]) if cols else None
            model.threshold_ = float(fitted["threshold_"])
            model.row_scale_ = float(fitted["row_scale_"])
            model.figure_scales_ = [float(s) for s in fitted["figure_scales_"]]
            model.resid_scale_ = np.asarray(fitted["resid_scale_"], np.float32)
            model.change_scale_ = np.asarray(fitted["change_scale_"], np.float32)
            model.continuous_ = np.asarray(fitted["continuous_"], bool)
            model.tails_ = [TailTable.from_json(t) for t in fitted["tails_"]]
            model.history_ = {k: list(v) for k, v in fitted["history_"].items()}
            expected = str(meta["weights_sha256"])
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ValueError(f"{where} is inconsistent: {_first_line(exc)}") from None
        tensors = _read_weights(path / WEIGHTS_FILE, expected)
        try:
            model.network_.load_state_dict(tensors)
        except RuntimeError as exc:
            raise ValueError(
                f"{path / WEIGHTS_FILE} does not fit the recorded architecture:"
                f" {_first_line(exc)}"
            ) from None
        model.network_.eval()
        model.row_ = _row_family().load(path / ROW_DIR, device=device)
        if model.row_.n_features_in_ != model.network_.n_features:
            raise ValueError(f"{path}: the row model and the window model disagree")
        return model


def _row_family() -> Any:
    # Looked up when used, not imported: importing either family module first
    # registers the built-ins, which imports the other.
    return get_family(ROW_KIND)


def _masked_mse(
    recon: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    m = mask.unsqueeze(-1).float()
    return ((recon - target) ** 2 * m).sum() / (m.sum() * target.shape[-1]).clamp_min(1)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:160]


def _read_weights(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    """A state_dict of plain tensors, checked against its recorded SHA-256."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"{path} cannot be read: {_first_line(exc)}") from None
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise ValueError(
            f"{path} does not match the checksum recorded in {META_FILE} (the files"
            " come from different saves or one was modified)"
        )
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # weights_only: only tensors and plain containers are rebuilt.
            tensors = torch.load(
                io.BytesIO(data), weights_only=True, map_location="cpu"
            )
    except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        raise ValueError(
            f"{path} is not a valid weights file: {_first_line(exc)}"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(f"{path} is not a valid weights file: expected named tensors")
    return tensors
