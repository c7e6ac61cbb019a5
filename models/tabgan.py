"""A small conditional tabular GAN (after CTGAN, Xu et al. 2019) over the
preprocessed space.

The preprocessed matrix (:class:`models.preprocessing.TabularPreprocessor`) mixes
scaled numbers with 0/1 missing indicators and one-hot blocks. A plain GAN on
it does badly on both: numeric columns are multi-modal and skewed (Rainfall is
mostly 0 with a long tail), and rare categories are dropped (mode collapse).
CTGAN's three answers, kept here at a size that trains in seconds on a CPU:

* **Mode-specific normalisation.** Each numeric column gets a variational
  Gaussian mixture (modes whose weight is under 0.5 % are dropped); a value
  becomes the one-hot of a mode drawn from its posterior plus its offset in
  that mode, ``(x - mu_k) / (4 sigma_k)`` in [-1, 1]. The generator emits the
  offset through ``tanh`` and the mode through a softmax.
* **Conditional generator.** Every discrete span (each one-hot block and each
  missing indicator as a two-level block) is a condition. The generator gets
  the condition vector beside its noise and is penalised (cross-entropy) when
  it does not produce the asked level.
* **Training-by-sampling.** A batch's conditions pick a span uniformly and a
  level with probability proportional to the log of its frequency, then real
  rows with that level: rare levels are seen often enough to be learnt, and the
  critic compares like with like. When sampling, levels are drawn with their
  real frequencies, so the output keeps the data's proportions.

The critic is a WGAN-GP critic. It can judge packs of ``pac`` rows (PacGAN,
against a generator that gives the same row again and again), but the default
is single rows (``pac=1``) at a learning rate of 1e-3: on weatherAUS, with the
few thousand steps a CPU affords, packs of 10 left the columns' dependence
unlearnt (correlation error 0.29, as for independent columns; 0.075 with single
rows), and CTGAN's 2e-4 learns several times slower.

Sampled rows keep the discrete columns (missing indicators, category blocks)
as the generator's probabilities, not drawn levels: the caller draws them, after
bringing their rates to the data's (``models.synthesis``).

Saved as a state_dict (``torch.load(weights_only=True)``) plus JSON.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

#: Drop mixture modes lighter than this (CTGAN's weight threshold).
MODE_WEIGHT_MIN = 0.005
#: Values per column a mixture is fitted on: enough for its modes, fast.
MIXTURE_ROWS = 1000
_EPS = 1e-6


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one thread, then restore the setting.

    The networks here are small (a few hundred rows by a few hundred
    columns): on a shared 2-core machine, two threads spent more time waiting
    for each other than computing (a softmax of a 500 x 30 batch took 1.8 ms
    on two threads, 0.13 ms on one).
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Span:
    """One column group of the preprocessed matrix.

    ``kind`` is "num" (one scaled column at ``start``) or "cat" (``width``
    columns from ``start``: a one-hot block, or a missing indicator seen as
    two levels, ``indicator=True``).
    """

    kind: str
    start: int
    width: int = 1
    indicator: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "start": self.start,
            "width": self.width,
            "indicator": self.indicator,
        }


def _gmm_modes(x: np.ndarray, max_modes: int, seed: int) -> tuple[np.ndarray, ...]:
    """Means, standard deviations and weights of the column's mixture modes.

    A one-dimensional Gaussian mixture by EM, started from evenly spaced
    quantiles; modes lighter than MODE_WEIGHT_MIN are dropped, as CTGAN drops
    those its variational mixture leaves nearly empty. Plain numpy: a
    scikit-learn BayesianGaussianMixture took 0.8 s per column here, this
    takes milliseconds, the same for the same seed.
    """
    rng = np.random.default_rng(seed)
    x = np.asarray(x, np.float64)
    if len(x) > MIXTURE_ROWS:
        x = rng.choice(x, MIXTURE_ROWS, replace=False)
    distinct = np.unique(x)
    if len(distinct) < 2:
        mean = float(x.mean()) if len(x) else 0.0
        return np.array([mean]), np.full(1, 1e-3), np.ones(1)
    k = min(max_modes, len(distinct))
    means = np.quantile(x, (np.arange(k) + 0.5) / k)
    spread = float(x.std()) or 1.0
    stds = np.full(k, spread / k)
    weights = np.full(k, 1.0 / k)
    floor = 1e-3 * spread
    for _ in range(50):
        logp = (
            -0.5 * ((x[:, None] - means) / stds) ** 2 - np.log(stds) + np.log(weights)
        )
        logp -= logp.max(axis=1, keepdims=True)
        resp = np.exp(logp)
        resp /= resp.sum(axis=1, keepdims=True)
        nk = resp.sum(axis=0) + 1e-12
        new_means = (resp * x[:, None]).sum(axis=0) / nk
        var = (resp * (x[:, None] - new_means) ** 2).sum(axis=0) / nk
        stds = np.sqrt(np.maximum(var, floor**2))
        weights = nk / nk.sum()
        done = np.max(np.abs(new_means - means)) < 1e-3 * spread
        means = new_means
        if done:
            break
    keep = weights > MODE_WEIGHT_MIN
    return means[keep], stds[keep], weights[keep] / weights[keep].sum()


class ModeNormalizer:
    """Mode-specific normalisation of the numeric spans (see the module doc)."""

    def __init__(self, spans: Sequence[Span], modes: list[dict[str, list[float]]]):
        self.spans = list(spans)
        self.modes = modes  # per num span: {"means", "stds", "weights"}

    @classmethod
    def fit(
        cls,
        x: np.ndarray,
        spans: Sequence[Span],
        observed: dict[int, np.ndarray],
        max_modes: int,
        seed: int,
    ) -> ModeNormalizer:
        """``observed[start]`` masks the rows whose value was not imputed."""
        modes = []
        for i, s in enumerate(s for s in spans if s.kind == "num"):
            col = x[:, s.start].astype(np.float64)
            obs = observed.get(s.start)
            means, stds, weights = _gmm_modes(
                col[obs] if obs is not None else col, max_modes, seed + i
            )
            modes.append(
                {
                    "means": means.tolist(),
                    "stds": stds.tolist(),
                    "weights": weights.tolist(),
                }
            )
        return cls(spans, modes)

    def _num(self) -> list[tuple[Span, dict[str, list[float]]]]:
        return list(
            zip([s for s in self.spans if s.kind == "num"], self.modes, strict=True)
        )

    def widths(self) -> list[tuple[str, int]]:
        """Output layout in span order: ("tanh", 1) and ("mode", k) pieces per
        number, ("softmax", k) per discrete span."""
        out: list[tuple[str, int]] = []
        modes = iter(self.modes)
        for s in self.spans:
            if s.kind == "num":
                out += [("tanh", 1), ("mode", len(next(modes)["means"]))]
            else:
                out.append(("softmax", 2 if s.indicator else s.width))
        return out

    def transform(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Preprocessed rows to the GAN's representation."""
        parts = []
        modes = iter(self.modes)
        for s in self.spans:
            if s.kind == "num":
                m = next(modes)
                mu, sd, w = (np.asarray(m[k]) for k in ("means", "stds", "weights"))
                v = x[:, s.start : s.start + 1].astype(np.float64)
                # Posterior of each mode; a mode is drawn from it, as CTGAN does.
                logp = -0.5 * ((v - mu) / sd) ** 2 - np.log(sd) + np.log(w)
                logp -= logp.max(axis=1, keepdims=True)
                p = np.exp(logp)
                p /= p.sum(axis=1, keepdims=True)
                u = rng.random((len(v), 1))
                k = np.minimum((p.cumsum(axis=1) < u).sum(axis=1), len(mu) - 1)
                alpha = np.clip((v[:, 0] - mu[k]) / (4 * sd[k]), -0.99, 0.99)
                onehot = np.zeros((len(v), len(mu)))
                onehot[np.arange(len(v)), k] = 1.0
                parts += [alpha[:, None], onehot]
            elif s.indicator:
                ind = x[:, s.start : s.start + 1]
                parts.append(np.hstack([1.0 - ind, ind]))
            else:
                parts.append(x[:, s.start : s.start + s.width])
        return np.hstack(parts).astype(np.float32)

    def inverse(self, g: np.ndarray, n_features: int) -> np.ndarray:
        """The GAN's representation (activated) back to preprocessed rows."""
        out = np.zeros((len(g), n_features), np.float32)
        j = 0
        modes = iter(self.modes)
        for s in self.spans:
            if s.kind == "num":
                m = next(modes)
                mu, sd = np.asarray(m["means"]), np.asarray(m["stds"])
                alpha = g[:, j]
                k = np.argmax(g[:, j + 1 : j + 1 + len(mu)], axis=1)
                out[:, s.start] = alpha * 4 * sd[k] + mu[k]
                j += 1 + len(mu)
            elif s.indicator:  # probability of "missing", the second level
                out[:, s.start] = g[:, j + 1]
                j += 2
            else:  # the levels' probabilities
                out[:, s.start : s.start + s.width] = g[:, j : j + s.width]
                j += s.width
        return out


class _Residual(nn.Module):
    """CTGAN's generator block: the input concatenated to ReLU(BN(Wx))."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.fc = nn.Linear(i, o)
        self.bn = nn.BatchNorm1d(o)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.relu(self.bn(self.fc(x))), x], dim=1)


class Generator(nn.Module):
    def __init__(self, noise: int, cond: int, hidden: Sequence[int], out: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = noise + cond
        for h in hidden:
            layers.append(_Residual(width, h))
            width += h
        layers.append(nn.Linear(width, out))
        self.seq = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x)


class Critic(nn.Module):
    """WGAN critic over packs of ``pac`` rows (PacGAN)."""

    def __init__(self, width: int, hidden: Sequence[int], pac: int) -> None:
        super().__init__()
        self.pac = pac
        layers: list[nn.Module] = []
        w = width * pac
        for h in hidden:
            layers += [nn.Linear(w, h), nn.LeakyReLU(0.2), nn.Dropout(0.5)]
            w = h
        layers.append(nn.Linear(w, 1))
        self.seq = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.seq(x.reshape(-1, x.shape[1] * self.pac))


def _activate(
    raw: torch.Tensor,
    layout: list[tuple[str, int]],
    tau: float,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """tanh for offsets; Gumbel-softmax for modes and levels in training
    (``tau`` > 0). When sampling (``tau`` 0) a mode is drawn (one-hot, with the
    softmax's probabilities) and a discrete span keeps its probabilities."""
    parts = []
    j = 0
    for how, w in layout:
        piece = raw[:, j : j + w]
        if how == "tanh":
            parts.append(torch.tanh(piece))
        elif how == "softmax" and tau == 0:
            parts.append(F.softmax(piece, dim=1))
        else:
            u = torch.rand(piece.shape, generator=gen).clamp(_EPS, 1 - _EPS)
            logits = piece - torch.log(-torch.log(u))
            if tau > 0:
                parts.append(F.softmax(logits / tau, dim=1))
            else:
                parts.append(F.one_hot(logits.argmax(1), w).to(piece.dtype))
        j += w
    return torch.cat(parts, dim=1)


class ConditionSampler:
    """Condition vectors and the real rows that match them (see the module doc)."""

    def __init__(
        self, data: np.ndarray, layout: list[tuple[str, int]], spans: Sequence[Span]
    ):
        # The discrete spans' (offset in data, width), in condition order.
        self.blocks: list[tuple[int, int]] = []
        j = 0
        for s, piece in zip(spans, _span_pieces(layout, spans), strict=True):
            if s.kind == "cat":
                self.blocks.append((j, piece))
            j += piece
        self.width = sum(w for _, w in self.blocks)
        self.rows: list[list[np.ndarray]] = []
        self.freq: list[np.ndarray] = []
        self.logfreq: list[np.ndarray] = []
        for off, w in self.blocks:
            level = np.argmax(data[:, off : off + w], axis=1)
            counts = np.bincount(level, minlength=w).astype(np.float64)
            self.rows.append([np.flatnonzero(level == k) for k in range(w)])
            self.freq.append(counts / counts.sum())
            lf = np.log(counts + 1) * (counts > 0)
            self.logfreq.append(lf / lf.sum())

    def offsets(self) -> list[int]:
        out, c = [], 0
        for _, w in self.blocks:
            out.append(c)
            c += w
        return out

    def draw(
        self, n: int, rng: np.random.Generator, train: bool
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Conditions ``(n, width)``, the span and level of each, by log
        frequency (training) or frequency (sampling)."""
        cond = np.zeros((n, self.width), np.float32)
        span = rng.integers(0, len(self.blocks), n)
        level = np.zeros(n, np.int64)
        offs = self.offsets()
        for b in range(len(self.blocks)):
            idx = np.flatnonzero(span == b)
            p = self.logfreq[b] if train else self.freq[b]
            level[idx] = rng.choice(len(p), size=len(idx), p=p)
            cond[idx, offs[b] + level[idx]] = 1.0
        return cond, span, level

    def real_rows(
        self, span: np.ndarray, level: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        out = np.empty(len(span), np.int64)
        for i, (b, k) in enumerate(zip(span.tolist(), level.tolist(), strict=True)):
            rows = self.rows[b][k]
            out[i] = rows[rng.integers(len(rows))]
        return out


def _span_pieces(layout: list[tuple[str, int]], spans: Sequence[Span]) -> list[int]:
    """Width of each span in the GAN representation."""
    out = []
    it = iter(layout)
    for s in spans:
        if s.kind == "num":
            next(it)
            out.append(1 + next(it)[1])
        else:
            out.append(next(it)[1])
    return out


class TabularGAN:
    """The conditional GAN; fit on the preprocessed matrix, sample rows of it.

    Parameters
    ----------
    spans : sequence of Span
        The matrix's column groups (numbers, indicators, one-hot blocks).
    steps : int
        Optimiser steps (one critic and one generator update each).
    batch_size : int
        Rows per step; a multiple of ``pac``.
    noise_dim, hidden, pac, max_modes, lr : model shape and training settings.
    random_state : int
        Same seed, same data: same weights and samples.
    """

    def __init__(
        self,
        spans: Sequence[Span],
        steps: int = 2000,
        batch_size: int = 500,
        noise_dim: int = 64,
        hidden: Sequence[int] = (128, 128),
        pac: int = 1,
        max_modes: int = 6,
        lr: float = 1e-3,
        random_state: int = 0,
    ) -> None:
        if batch_size % pac:
            raise ValueError(f"batch_size {batch_size} is not a multiple of pac {pac}")
        self.spans = list(spans)
        self.steps = steps
        self.batch_size = batch_size
        self.noise_dim = noise_dim
        self.hidden = tuple(hidden)
        self.pac = pac
        self.max_modes = max_modes
        self.lr = lr
        self.random_state = random_state
        self.history_: dict[str, list[float]] = {
            "critic_loss": [],
            "generator_loss": [],
        }

    def settings(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "batch_size": self.batch_size,
            "noise_dim": self.noise_dim,
            "hidden": list(self.hidden),
            "pac": self.pac,
            "max_modes": self.max_modes,
            "lr": self.lr,
            "random_state": self.random_state,
        }

    def _build(self, n_features: int) -> None:
        self.n_features_in_ = n_features
        self.layout_ = self.norm_.widths()
        self.width_ = sum(w for _, w in self.layout_)
        self.cond_width_ = sum(
            (2 if s.indicator else s.width) for s in self.spans if s.kind == "cat"
        )
        self.generator_ = Generator(
            self.noise_dim, self.cond_width_, self.hidden, self.width_
        )

    def fit(self, x: np.ndarray, observed: dict[int, np.ndarray]) -> TabularGAN:
        seed = int(self.random_state)
        rng = np.random.default_rng([seed, 7])
        self.norm_ = ModeNormalizer.fit(x, self.spans, observed, self.max_modes, seed)
        self._build(x.shape[1])
        data = self.norm_.transform(x, rng)
        self.sampler_ = ConditionSampler(data, self.layout_, self.spans)
        self.freq_ = [f.tolist() for f in self.sampler_.freq]
        with torch.random.fork_rng(devices=[]), one_thread():
            torch.manual_seed(seed)
            self._train(torch.from_numpy(data), rng)
        del self.sampler_
        return self

    def _train(self, data: torch.Tensor, rng: np.random.Generator) -> None:
        gen = self.generator_
        critic = Critic(self.width_ + self.cond_width_, self.hidden, self.pac)
        opt_g = torch.optim.Adam(
            gen.parameters(), self.lr, betas=(0.5, 0.9), weight_decay=1e-6
        )
        opt_d = torch.optim.Adam(
            critic.parameters(), self.lr, betas=(0.5, 0.9), weight_decay=1e-6
        )
        b = self.batch_size
        blocks = self.sampler_.blocks
        for _step in range(self.steps):
            cond_np, span, level = self.sampler_.draw(b, rng, train=True)
            cond = torch.from_numpy(cond_np)
            real = data[torch.from_numpy(self.sampler_.real_rows(span, level, rng))]
            z = torch.randn(b, self.noise_dim)
            fake = _activate(gen(torch.cat([z, cond], 1)), self.layout_, 0.2, None)
            real_in = torch.cat([real, cond], 1)
            fake_in = torch.cat([fake, cond], 1)
            loss_d = critic(fake_in.detach()).mean() - critic(real_in).mean()
            loss_d = loss_d + 10.0 * self._penalty(critic, real_in, fake_in.detach())
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()

            z = torch.randn(b, self.noise_dim)
            raw = gen(torch.cat([z, cond], 1))
            fake = _activate(raw, self.layout_, 0.2, None)
            # Cross-entropy of the asked level, on the raw logits of its span.
            ce = torch.zeros((), dtype=raw.dtype)
            span_t = torch.from_numpy(span)
            for bi, (off, w) in enumerate(blocks):
                rows = torch.nonzero(span_t == bi).ravel()
                if len(rows):
                    target = torch.from_numpy(level[rows.numpy()])
                    ce = ce + F.cross_entropy(
                        raw[rows, off : off + w], target, reduction="sum"
                    )
            loss_g = -critic(torch.cat([fake, cond], 1)).mean() + ce / b
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            self.history_["critic_loss"].append(float(loss_d.detach()))
            self.history_["generator_loss"].append(float(loss_g.detach()))

    def _penalty(
        self, critic: Critic, real: torch.Tensor, fake: torch.Tensor
    ) -> torch.Tensor:
        pac = self.pac
        alpha = torch.rand(real.shape[0] // pac, 1, 1).repeat(1, pac, real.shape[1])
        alpha = alpha.reshape(-1, real.shape[1])
        mix = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
        (grad,) = torch.autograd.grad(critic(mix).sum(), mix, create_graph=True)
        norms = grad.reshape(-1, pac * real.shape[1]).norm(2, dim=1)
        return ((norms - 1) ** 2).mean()

    def sample(self, n: int, seed: int) -> np.ndarray:
        """``n`` rows of the preprocessed matrix, ``(n, n_features_in_)``;
        missing indicators and category blocks hold probabilities."""
        rng = np.random.default_rng([seed, 11])
        gen = torch.Generator().manual_seed(int(seed))
        self.generator_.eval()
        out = []
        with torch.no_grad(), one_thread():
            for start in range(0, n, 4096):
                m = min(4096, n - start)
                cond = self._sample_conditions(m, rng)
                z = torch.randn(m, self.noise_dim, generator=gen)
                raw = self.generator_(torch.cat([z, torch.from_numpy(cond)], 1))
                g = _activate(raw, self.layout_, 0.0, gen).numpy()
                out.append(self.norm_.inverse(g, self.n_features_in_))
        if not out:
            return np.zeros((0, self.n_features_in_), np.float32)
        return np.vstack(out)

    def _sample_conditions(self, n: int, rng: np.random.Generator) -> np.ndarray:
        widths = [2 if s.indicator else s.width for s in self.spans if s.kind == "cat"]
        cond = np.zeros((n, sum(widths)), np.float32)
        span = rng.integers(0, len(widths), n)
        off = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(int)
        for b, w in enumerate(widths):
            idx = np.flatnonzero(span == b)
            lv = rng.choice(w, size=len(idx), p=np.asarray(self.freq_[b]))
            cond[idx, off[b] + lv] = 1.0
        return cond

    # -- persistence -------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings(),
            "spans": [s.to_dict() for s in self.spans],
            "modes": self.norm_.modes,
            "freq": self.freq_,
            "n_features_in": self.n_features_in_,
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.generator_.state_dict().items()}

    @classmethod
    def restore(
        cls, meta: dict[str, Any], state: dict[str, torch.Tensor]
    ) -> TabularGAN:
        settings = dict(meta["settings"])
        spans = [Span(**s) for s in meta["spans"]]
        self = cls(spans, **settings)
        self.norm_ = ModeNormalizer(spans, meta["modes"])
        self.freq_ = meta["freq"]
        self._build(int(meta["n_features_in"]))
        self.generator_.load_state_dict(state)
        self.generator_.eval()
        return self


def spans_of(
    n_numeric: int, indicators: Sequence[int], blocks: Sequence[tuple[int, int]]
) -> list[Span]:
    """Spans of a preprocessed matrix: numbers, then indicators, then blocks."""
    out = [Span("num", i) for i in range(n_numeric)]
    out += [Span("cat", j, 1, indicator=True) for j in indicators]
    out += [Span("cat", j, w) for j, w in blocks]
    return out


__all__ = ["ModeNormalizer", "Span", "TabularGAN", "spans_of"]
