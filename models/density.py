"""The density anomaly score of :class:`models.estimator.AutoencoderReducer`.

Reconstruction error alone misses two kinds of anomaly that real data sets are
full of: a row that the network reconstructs well because it sits *on* the
learned manifold but in an empty region of it, and a row with one value that
is rare for its column although the row as a whole is easy to reconstruct
(a sparse or near-constant column the network ignores). The density score adds
both views to the autoencoder's own:

``neighbour``
    The row is embedded in the autoencoder's space as its standardised code plus
    its normalised reconstruction-error norm, ``[(z - mean) / std, ||e / v||]``
    (``e`` the per-feature squared error, ``v`` its training mean per feature),
    and scored by its mean distance to the nearest row of ``n_sets`` small
    random subsets of the training rows. Small subsets are the point: a cluster
    of anomalies in the training data (anomalies are left in, as in real data)
    shows up in a subset by at most a member or two, so it cannot vouch for
    itself, which a nearest-neighbour search over all rows lets it do
    (Aggarwal & Sathe, "Theoretical foundations and algorithms for outlier
    ensembles", 2015).
``marginal``
    Per feature, the surprisal of the row's value under a histogram of the
    training column (HBOS, Goldstein & Dengel 2012): ``-log2(density + alpha)``,
    shifted so the densest bin scores 0. The number of bins comes from the
    Birge-Rozenblac rule per column, as in PyOD's ``HBOS(n_bins="auto")``.
    Each column also gets the tail surprisal of ECOD (Li et al. 2022):
    ``-log`` of the smaller of the two empirical tail probabilities of the value,
    tabulated at the midpoints of ``tail_points`` equal cells spanning the
    training range (values beyond it score the largest surprisal,
    ``log(n + 1)``). The histogram says "rare",
    the tail says "extreme"; the marginal term is their mean, each divided by
    its training standard deviation.
    Columns with at most two distinct training values (one-hot and missing
    indicators) are left out: a histogram of a 0/1 column only says how rare
    the category is, which the code already carries, and skipping them keeps
    scoring cheap on wide encoded tables.

The score is ``(hist / s_h + tail / s_t) / 2 + neighbour / s_n`` (``hist`` and
``tail`` summed over the columns), each term divided by its standard deviation
over the training rows: a weighted z-score sum, less a constant, so it ranks
rows as that sum does while staying non-negative. Per-feature contributions
split it exactly: each feature's own marginal term plus the neighbour term,
shared in proportion to the feature's normalised reconstruction error.

Everything fitted is a tensor buffer, so it saves in the estimator's
``state_dict`` file and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from models.row_blocks import padded, row_blocks

#: Random subsets of training rows that the neighbour term measures against.
N_SETS = 8
#: Rows per subset; small on purpose (see the module docstring).
SET_ROWS = 64
#: Upper bound of the histogram bins per feature (the rule's own bound is
#: sqrt(n), which would cost a search over hundreds of candidates).
MAX_BINS = 64
#: Rows the bin-count rule looks at per feature; the histogram uses all rows.
BIN_RULE_ROWS = 20_000
#: Cells per column of the tail-probability table.
TAIL_POINTS = 256
#: HBOS regulariser: keeps an empty bin's surprisal finite.
ALPHA = 0.1
#: Values this many bin widths beyond the training range count as the edge bin.
EDGE_TOLERANCE = 0.5
_EPS = 1e-12
#: Training rows scored per step while fitting (bounds the index tensors).
FIT_CHUNK = 65_536
#: Rows per distance block in the neighbour term: the (rows x references)
#: matrix stays in the CPU's cache; on a GPU, larger blocks mean fewer launches.
NEIGHBOUR_BLOCK = 1024
NEIGHBOUR_BLOCK_GPU = 16_384


def marginal_columns(x: np.ndarray) -> np.ndarray:
    """Indices of the columns with more than two distinct values, shape (m,)."""
    low, high = x.min(axis=0), x.max(axis=0)
    two_valued = ((x == low) | (x == high)).all(axis=0)
    return np.flatnonzero(~two_valued).astype(np.int64)


def birge_rozenblac_bins(values: np.ndarray, upper: int) -> int:
    """Bins of a regular histogram by the penalised likelihood of Birge & Rozenblac.

    The criterion is the one PyOD's ``HBOS(n_bins="auto")`` computes.

    Parameters
    ----------
    values : ndarray of shape (n,)
        One column.
    upper : int
        Candidates are ``1 .. upper - 1``.

    Returns
    -------
    n_bins : int
    """
    n = values.shape[0]
    best, best_bins = -math.inf, 1
    for bins in range(1, max(2, upper)):
        hist, _ = np.histogram(values, bins=bins)
        penalty = bins - 1 + math.log(bins) ** 2.5
        likelihood = float(np.sum(hist * np.log(bins * hist / n + 1.0) - penalty))
        if likelihood > best:
            best, best_bins = likelihood, bins
    return best_bins


class DensityScore(nn.Module):
    """Fitted state of the density score; see the module docstring.

    Parameters
    ----------
    n_features : int
        Width of the input rows.
    latent_dim : int
        Width of the codes.
    n_sets : int, default=N_SETS
        Training-row subsets of the neighbour term.
    set_rows : int, default=SET_ROWS
        Rows per subset (fewer when training has fewer rows).
    max_bins : int, default=MAX_BINS
        Most bins of a per-feature histogram.
    n_marginal : int or None, default=None
        Features with a histogram (those with more than two distinct training
        values); None means all. Set by :meth:`fit`'s caller, see
        :func:`marginal_columns`.
    tail_points : int, default=TAIL_POINTS
        Cells of the per-column tail table.
    """

    def __init__(
        self,
        n_features: int,
        latent_dim: int,
        n_sets: int = N_SETS,
        set_rows: int = SET_ROWS,
        max_bins: int = MAX_BINS,
        n_marginal: int | None = None,
        tail_points: int = TAIL_POINTS,
    ) -> None:
        super().__init__()
        self.n_features = int(n_features)
        self.latent_dim = int(latent_dim)
        self.n_sets = int(n_sets)
        self.set_rows = int(set_rows)
        self.max_bins = int(max_bins)
        d, k = self.n_features, self.latent_dim
        self.register_buffer("code_mean", torch.zeros(k))
        self.register_buffer("code_scale", torch.ones(k))
        self.register_buffer("error_scale", torch.ones(d))
        self.register_buffer(
            "references", torch.zeros(self.n_sets, self.set_rows, k + 1)
        )
        m = self.n_marginal = d if n_marginal is None else int(n_marginal)
        # The histograms are looked up in half-bin steps so that one floor, one
        # clamp and one gather also cover the edge tolerance: a row of the table
        # holds [worst, bin 0 (tolerance), bin 0, bin 0, bin 1, bin 1, ...,
        # last bin (tolerance), worst, ...], see _fit_histograms.
        self.register_buffer("marginal_columns", torch.arange(m))
        self.register_buffer("hist_low", torch.zeros(m))
        self.register_buffer("hist_halfsteps", torch.ones(m))
        self.register_buffer("hist_top", torch.ones(m))
        self.register_buffer("hist_table", torch.zeros(m, 2 * self.max_bins + 4))
        self.tail_points = int(tail_points)
        # Row i: [below the range, cell 0 .. cell G-1, the maximum, beyond].
        self.register_buffer("tail_table", torch.zeros(m, self.tail_points + 3))
        self.register_buffer("tail_low", torch.zeros(m))
        self.register_buffer("tail_inverse_step", torch.ones(m))
        # Standard deviations over the training rows of [hist, tail, neighbour].
        self.register_buffer("term_scale", torch.ones(3))

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable."""
        return {
            "n_features": self.n_features,
            "latent_dim": self.latent_dim,
            "n_sets": self.n_sets,
            "set_rows": self.set_rows,
            "max_bins": self.max_bins,
            "n_marginal": self.n_marginal,
            "tail_points": self.tail_points,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DensityScore:
        return cls(**config)

    # -- fitting ------------------------------------------------------------
    def fit(
        self,
        x: np.ndarray,
        code: np.ndarray,
        sq_error: np.ndarray,
        seed: int,
        columns: np.ndarray | None = None,
    ) -> np.ndarray:
        """Fit on the training rows; return their scores, shape (n,), float64.

        A training row is never its own neighbour: where it was drawn into a
        subset, that subset's distance is to its nearest *other* member, so the
        training scores (and the threshold taken from them) are distributed like
        the scores of new rows.

        Parameters
        ----------
        x : ndarray of shape (n, n_features), float32
        code : ndarray of shape (n, latent_dim), float32
        sq_error : ndarray of shape (n, n_features), float32
            Squared reconstruction error of every cell.
        seed : int
            Draws the subsets.
        columns : ndarray of shape (n_marginal,) or None
            :func:`marginal_columns` of ``x`` when the caller already has it.
        """
        n = x.shape[0]
        rng = np.random.default_rng(seed)
        self.code_mean.copy_(torch.from_numpy(code.mean(axis=0, dtype=np.float64)))
        std = code.std(axis=0, dtype=np.float64)
        self.code_scale.copy_(torch.from_numpy(np.where(std > _EPS, std, 1.0)))
        self.error_scale.copy_(
            torch.from_numpy(sq_error.mean(axis=0, dtype=np.float64) + 1e-6)
        )
        self._fit_histograms(
            x, rng, marginal_columns(x) if columns is None else columns
        )

        take = min(self.set_rows, n)
        # Fewer training rows than a subset holds: members repeat (a repeat
        # changes no nearest distance) so the buffer keeps its fixed shape.
        members = np.stack(
            [
                np.resize(rng.choice(n, size=take, replace=False), self.set_rows)
                for _ in range(self.n_sets)
            ]
        )
        chosen = torch.from_numpy(members.reshape(-1))
        self.references.copy_(
            self.embed(
                torch.from_numpy(code)[chosen], torch.from_numpy(sq_error)[chosen]
            ).reshape(self.references.shape)
        )
        terms = np.empty((3, n))
        for start in range(0, n, FIT_CHUNK):
            stop = min(start + FIT_CHUNK, n)
            rows = torch.from_numpy(x[start:stop])
            terms[0, start:stop] = self.histogram(rows).sum(dim=1).numpy()
            terms[1, start:stop] = self.tail(rows).sum(dim=1).numpy()
            emb = self.embed(
                torch.from_numpy(code[start:stop]),
                torch.from_numpy(sq_error[start:stop]),
            )
            terms[2, start:stop] = self._neighbour(
                emb, members=members, first_row=start
            ).numpy()
        scale = terms.std(axis=1)
        scale = np.where(np.isfinite(scale) & (scale > _EPS), scale, 1.0)
        self.term_scale.copy_(torch.from_numpy(scale))
        return (terms[0] / scale[0] + terms[1] / scale[1]) / 2 + terms[2] / scale[2]

    def _fit_histograms(
        self, x: np.ndarray, rng: np.random.Generator, columns: np.ndarray
    ) -> None:
        n = x.shape[0]
        if columns.shape[0] != self.n_marginal:
            raise ValueError(
                f"{columns.shape[0]} columns have more than two values, but this "
                f"scorer was built for n_marginal={self.n_marginal}"
            )
        upper = min(max(2, int(math.sqrt(n))), self.max_bins + 1)
        sample = x if n <= BIN_RULE_ROWS else x[rng.choice(n, BIN_RULE_ROWS, False)]
        width = self.hist_table.shape[1]
        low = np.empty(self.n_marginal)
        halfsteps = np.empty(self.n_marginal)
        top = np.empty(self.n_marginal)
        table = np.empty((self.n_marginal, width))
        for i, j in enumerate(columns):
            column = x[:, j].astype(np.float64)
            b = birge_rozenblac_bins(sample[:, j].astype(np.float64), upper)
            density, edges = np.histogram(column, bins=b, density=True)
            surprisal = -np.log2(density + ALPHA)
            surprisal -= surprisal.min()  # the densest bin scores 0
            step = edges[1] - edges[0]
            low[i] = edges[0]
            halfsteps[i] = 2.0 / step if step > 0 else 2.0
            top[i] = 2 * b + 1
            # Half-bin h = floor(2 (x - low) / step), looked up at h + 2:
            # h <= -2 is beyond the tolerance below, h = -1 within it, 0 .. 2b-1
            # the bins, 2b within the tolerance above, 2b + 1 (the clamp) beyond.
            table[i] = surprisal.max()
            table[i, 1] = surprisal[0]
            table[i, 2 : 2 + 2 * b] = np.repeat(surprisal, 2)
            table[i, 2 + 2 * b] = surprisal[-1]
        self._fit_tails(x[:, columns])
        self.marginal_columns.copy_(torch.from_numpy(columns))
        self.hist_low.copy_(torch.from_numpy(low))
        self.hist_halfsteps.copy_(torch.from_numpy(halfsteps))
        self.hist_top.copy_(torch.from_numpy(top))
        self.hist_table.copy_(torch.from_numpy(table))

    # -- terms --------------------------------------------------------------
    def embed(self, code: torch.Tensor, sq_error: torch.Tensor) -> torch.Tensor:
        """Rows in the neighbour term's space, shape (n, latent_dim + 1)."""
        z = (code - self.code_mean) / self.code_scale
        # Elementwise, then a row mean: each row's value never depends on how
        # many rows share its batch (a matrix-vector product's BLAS kernel
        # does, in the last bits), so every runner and batch size agree.
        err = (sq_error / self.error_scale).mean(dim=1, keepdim=True).sqrt()
        return torch.cat([z, err], dim=1)

    def _fit_tails(self, columns: np.ndarray) -> None:
        n, m = columns.shape
        cells = self.tail_points
        table = np.empty((m, cells + 3))
        low = columns.min(axis=0).astype(np.float64)
        span = columns.max(axis=0).astype(np.float64) - low
        step = np.where(span > 0, span / cells, 1.0)
        extreme = math.log(n + 1)
        for i in range(m):
            ordered = np.sort(columns[:, i].astype(np.float64))
            mids = low[i] + (np.arange(cells) + 0.5) * step[i]
            below = np.searchsorted(ordered, mids, side="right")
            above = n - np.searchsorted(ordered, mids, side="left")
            # The smaller tail, at least one row so no value scores infinity.
            count = np.maximum(np.minimum(below, above), 1)
            table[i, 1 : cells + 1] = np.log((n + 1) / count)
            table[i, cells + 1] = table[i, cells]
            table[i, 0] = table[i, cells + 2] = extreme
        self.tail_table.copy_(torch.from_numpy(table))
        self.tail_low.copy_(torch.from_numpy(low))
        self.tail_inverse_step.copy_(torch.from_numpy(1.0 / step))

    def tail(self, x: torch.Tensor) -> torch.Tensor:
        """Tail surprisal of each marginal column, shape (n, n_marginal), > 0."""
        return self._tail_of(x.index_select(1, self.marginal_columns))

    def _tail_of(self, columns: torch.Tensor) -> torch.Tensor:
        cell = columns.sub(self.tail_low).mul_(self.tail_inverse_step).floor_()
        cell = cell.clamp_(-1.0, self.tail_points + 1.0).add_(self._tail_offsets)
        return self.tail_table.reshape(-1).take(cell.long())

    @property
    def _tail_offsets(self) -> torch.Tensor:
        width = self.tail_table.shape[1]
        rows = torch.arange(self.n_marginal, device=self.tail_table.device)
        return (rows * width + 1).to(self.tail_table.dtype)

    def marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Marginal term of each marginal column, shape (n, n_marginal), >= 0:
        the mean of the histogram and tail surprisals, each divided by its
        training scale."""
        columns = x.index_select(1, self.marginal_columns)
        half = (0.5 / self.term_scale[:2]).to(x.dtype)
        out = self._histogram_of(columns).mul_(half[0])
        return out.add_(self._tail_of(columns).mul_(half[1]))

    def histogram(self, x: torch.Tensor) -> torch.Tensor:
        """Histogram surprisal of each column that has one, shape (n, n_marginal),
        >= 0."""
        return self._histogram_of(x.index_select(1, self.marginal_columns))

    def _histogram_of(self, columns: torch.Tensor) -> torch.Tensor:
        half = columns.sub(self.hist_low).mul_(self.hist_halfsteps).floor_()
        half = torch.minimum(half, self.hist_top)
        half = half.clamp_(min=-2.0).add_(self._table_offsets)
        return self.hist_table.reshape(-1).take(half.long())

    @property
    def _table_offsets(self) -> torch.Tensor:
        width = self.hist_table.shape[1]
        rows = torch.arange(self.n_marginal, device=self.hist_table.device)
        return (rows * width + 2).to(self.hist_table.dtype)

    def _neighbour(
        self,
        emb: torch.Tensor,
        members: np.ndarray | None = None,
        first_row: int = 0,
    ) -> torch.Tensor:
        """Mean over subsets of the distance to the nearest member, shape (n,).

        ``members`` (training rows only): the row indices of each subset, so
        that a row's own slots are masked; ``emb`` holds rows ``first_row ...``.
        """
        refs = self.references.reshape(-1, self.references.shape[-1]).to(emb.dtype)
        ref_sq = refs.square().sum(dim=1)
        nearest = torch.empty(
            emb.shape[0], self.n_sets, dtype=emb.dtype, device=emb.device
        )
        own = None if members is None else torch.from_numpy(members.reshape(-1))
        step = NEIGHBOUR_BLOCK if emb.device.type == "cpu" else NEIGHBOUR_BLOCK_GPU
        # Only the distance matrix is built in blocks (it is what must stay in
        # cache); the per-row steps after the minimum run once over all rows,
        # since on blocks this small their per-call cost was most of their time.
        # Blocks never so small that BLAS rounds them differently from large
        # ones (models/row_blocks.py): a row's score never depends on its batch.
        for part in row_blocks(emb.shape[0], step):
            block = emb[part]
            m = block.shape[0]
            # |e - r|^2 = |e|^2 + (|r|^2 - 2 e.r): |e|^2 is the same for every
            # reference, so it is added after the minimum (one pass fewer).
            sq = torch.addmm(ref_sq, padded(block), refs.t(), alpha=-2.0)[:m]
            if own is not None:
                rows = torch.arange(first_row + part.start, first_row + part.stop)
                sq.masked_fill_(own.unsqueeze(0) == rows.unsqueeze(1), math.inf)
            torch.amin(
                sq.view(-1, self.n_sets, self.set_rows),
                dim=2,
                out=nearest[part],
            )
        nearest += emb.square().sum(dim=1, keepdim=True)
        # A subset made only of the row itself (a one-row fit) adds nothing.
        nearest = torch.where(torch.isfinite(nearest), nearest, 0.0)
        return nearest.clamp_min_(0).sqrt_().mean(dim=1)

    def forward(
        self, x: torch.Tensor, code: torch.Tensor, sq_error: torch.Tensor
    ) -> torch.Tensor:
        """Scores of new rows, shape (n,)."""
        marginal = self.marginal(x).sum(dim=1)
        neighbour = self._neighbour(self.embed(code, sq_error))
        return marginal + neighbour / self.term_scale[2].to(marginal.dtype)

    def contributions(
        self, x: torch.Tensor, code: torch.Tensor, sq_error: torch.Tensor
    ) -> torch.Tensor:
        """Per-feature parts of the score, shape (n, n_features); the row mean
        equals :meth:`forward`."""
        marginal = torch.zeros_like(x)
        marginal[:, self.marginal_columns] = self.marginal(x)
        neighbour = self._neighbour(self.embed(code, sq_error))
        neighbour = neighbour / self.term_scale[2].to(x.dtype)
        share = sq_error / self.error_scale
        total = share.sum(dim=1, keepdim=True)
        share = torch.where(
            total > 0, share / total.clamp_min(_EPS), 1.0 / self.n_features
        )
        return (marginal + neighbour.unsqueeze(1) * share) * self.n_features
