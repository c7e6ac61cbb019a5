"""Scikit-learn compatible autoencoders: dimensionality reduction and anomaly scores.

:class:`AutoencoderReducer` is a transformer (``fit`` / ``transform`` /
``inverse_transform``) that also scores rows by reconstruction error, PyOD style
(``decision_scores_``, ``threshold_``, ``labels_``, ``decision_function``,
``predict``). The torch module lives in :mod:`models.networks` and is built in
``fit`` once the number of features is known.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import warnings
from collections.abc import Callable, Iterator
from numbers import Integral, Real
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import (
    _check_feature_names_in,
    check_array,
    check_is_fitted,
    validate_data,
)

from models.atomic import atomic_write_bytes as _atomic_write
from models.columns import latent_name
from models.density import DensityScore, marginal_columns
from models.family import contamination_threshold, is_anomaly
from models.label_guidance import LabelHead, label_columns
from models.networks import ACTIVATIONS, AutoencoderNetwork
from models.objectives import OBJECTIVES
from models.row_blocks import padded, row_blocks
from models.schedule import LR_SCHEDULES, make_schedule

KINDS = tuple(OBJECTIVES)

FORMAT_NAME = "latentflow.AutoencoderReducer"
#: 2 added ``score_method`` and the density scorer; version 1 files still load
#: (as ``score_method="reconstruction"``, the only score they knew).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
SCORE_METHODS = ("density", "reconstruction")
WEIGHTS_FILE = "weights.pt"
META_FILE = "estimator.json"

# Rows per forward pass at inference: large enough to amortise per-call
# overhead, small enough that a layer's activations (8192 x 128 floats, 4 MiB)
# stay in cache; 65,536 rows ran at half the speed on a 2-core machine.
INFERENCE_BATCH = 8192
#: On a GPU, larger inference blocks: fewer kernel launches per scored batch.
INFERENCE_BATCH_GPU = 65_536

# A validation split smaller than this gives a loss too noisy to stop on, so
# training then monitors the training loss instead.
MIN_VALIDATION_ROWS = 10

_SEED_HIGH = 2**31 - 1


def _resolve_device(device: str) -> torch.device:
    """Map the ``device`` parameter to a usable torch device or raise ValueError."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        ) from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}"
        )
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} was requested but CUDA is not available "
            "(torch.cuda.is_available() is False); use device='cpu' or 'auto'"
        )
    return resolved


def resolved_device(device: str) -> str:
    """The torch device name ``device`` stands for here (``auto``: CUDA when
    present), so that every stage of a run uses the one its model trained on."""
    return str(_resolve_device(device))


def _rows_tensor(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """A float32 C-contiguous numpy block as a tensor on ``device``."""
    # torch.from_numpy warns on read-only arrays (memmaps, Arrow buffers): copy just
    # this block rather than the whole input.
    if not rows.flags.writeable:
        rows = rows.copy()
    return torch.from_numpy(rows).to(device)


def principal_axes(X: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (d,) and the ``k`` leading principal directions (k, d) of ``X``.

    From the float64 covariance (d x d, cheap for tabular widths), each
    direction's sign fixed so its largest entry is positive: the same rows
    give the same axes on every machine.
    """
    mean = X.mean(axis=0, dtype=np.float64)
    cov = np.zeros((X.shape[1], X.shape[1]))
    for start in range(0, X.shape[0], 65_536):
        block = X[start : start + 65_536].astype(np.float64) - mean
        cov += block.T @ block
    _, vectors = np.linalg.eigh(cov)
    top = vectors[:, ::-1][:, :k].T
    signs = np.sign(top[np.arange(k), np.abs(top).argmax(axis=1)])
    top = top * np.where(signs == 0, 1.0, signs)[:, None]
    return (
        torch.from_numpy(mean.astype(np.float32)),
        torch.from_numpy(np.ascontiguousarray(top, dtype=np.float32)),
    )


def _first_line(exc: BaseException, limit: int = 160) -> str:
    text = str(exc).strip().splitlines()
    line = text[0] if text else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


class AutoencoderReducer(TransformerMixin, BaseEstimator):
    """Autoencoder for dimensionality reduction and reconstruction-error scores.

    A fully connected autoencoder (linear output layer, MSE loss averaged over
    features) trained with Adam on a random train/validation split, with early
    stopping on the validation reconstruction error and restoration of the best
    weights. The code is the reduced representation; the per-row reconstruction
    error is an anomaly score, thresholded at the ``1 - contamination`` quantile of
    the training scores.

    The network computes in float32. ``transform``, ``inverse_transform`` and
    ``feature_errors`` return float32 for float32 input and float64 otherwise;
    ``decision_function`` returns float64 (the float32 errors, upcast exactly);
    :meth:`encode_and_score` returns float32.

    Parameters
    ----------
    latent_dim : int, default=8
        Width of the code (number of output features of ``transform``).
    hidden : tuple of int, default=(64, 32)
        Encoder hidden-layer widths; the decoder mirrors them. Empty gives a
        shallow autoencoder.
    kind : {"ae", "denoising", "sparse", "contractive", "vae"}, default="ae"
        Variant:

        - ``"ae"``: plain autoencoder.
        - ``"denoising"``: inputs are corrupted with Gaussian noise of standard
          deviation ``noise_std`` during training only; the target is the clean
          row. Inference is deterministic.
        - ``"sparse"``: the code passes through a ReLU, so inactive units are exact
          zeros, and ``sparsity_weight * ||z||_1`` (per row, averaged over the
          batch) is added to the loss.
        - ``"contractive"``: adds ``contractive_weight * ||dz/dx||_F^2`` (per row,
          averaged), the squared Frobenius norm of the encoder Jacobian, computed
          exactly by batched chain-rule products (see
          :func:`models.networks.encode_with_jacobian`).
        - ``"vae"``: the encoder gives a diagonal Gaussian posterior ``(mu,
          logvar)``; training decodes a reparameterised sample ``z = mu + sigma *
          eps`` and minimises ``MSE + beta * KL(q(z|x) || N(0, I)) / n_features``.
          That is the negative ELBO divided by ``n_features`` for a Gaussian
          decoder of fixed variance 1/2 (so ``-log p(x|z) = SSE + const``), which
          keeps the KL term at full strength at ``beta=1``. ``transform`` returns
          the posterior mean and scores use ``decode(mu)``, so inference is
          deterministic; :meth:`sample` draws from the prior.
    activation : {"relu", "tanh", "sigmoid", "elu", "leaky_relu", "gelu", "silu"}, \
default="relu"
        Hidden-layer activation.
    epochs : int, default=100
        Maximum number of passes over the training rows.
    batch_size : int, default=256
        Rows per optimiser step.
    lr : float, default=1e-3
        Adam learning rate.
    weight_decay : float, default=0.0
        Adam (L2) weight decay.
    lr_schedule : {"constant", "cosine"}, default="constant"
        ``"cosine"`` decays the learning rate from ``lr`` to 0 along half a
        cosine over the ``epochs * batches`` steps, so the last epochs take
        small steps and settle in the minimum that a constant rate keeps
        circling. Early stopping then counts only the epochs of the second
        half: at the first half's high rates the validation loss is noisy and
        still falls later.
    val_fraction : float in [0, 1), default=0.1
        Share of rows held out to monitor early stopping. If 0, or if it would
        leave fewer than ``MIN_VALIDATION_ROWS`` rows, all rows are used for
        training and the training reconstruction error is monitored instead.
    patience : int or None, default=10
        Stop after this many epochs without improvement of the monitored loss.
        None trains for all ``epochs``. The best epoch's weights are restored
        either way.
    noise_std : float, default=0.2
        Corruption level for ``kind="denoising"``.
    sparsity_weight : float, default=1e-3
        L1 weight on the code for ``kind="sparse"``.
    contractive_weight : float, default=1e-4
        Jacobian penalty weight for ``kind="contractive"``.
    beta : float, default=1.0
        KL weight for ``kind="vae"``.
    contamination : float in (0, 0.5], default=0.01
        Expected share of anomalies in the training data; sets ``threshold_``.
    score_method : {"density", "reconstruction"}, default="density"
        The anomaly score (higher is more anomalous):

        - ``"density"``: how unusual the row is in the autoencoder's space and
          column by column: its distance to the nearest row of small random
          subsets of the training rows, measured on the standardised code plus
          the reconstruction-error norm, added to the histogram surprisal of each
          value (see :mod:`models.density`).
        - ``"reconstruction"``: the mean squared reconstruction error.
    one_hot_groups : sequence of sequences of int or None, default=None
        Column indices of each one-hot encoded categorical in ``X`` (like
        ``categorical_features`` of scikit-learn's gradient boosting). Each
        group's reconstruction is a softmax over its columns, fitted by
        cross-entropy (see :meth:`AutoencoderNetwork.reconstruction_loss`); every
        other column is fitted by squared error. Reported losses, scores and
        ``inverse_transform`` stay in ``X``'s space. None treats every column
        as numeric. The pipeline passes its preprocessor's groups.
    pca_axes : int, default=0
        How many code axes are the training rows' leading principal components
        (fixed, as PCA would give them); the network learns the other
        ``latent_dim - pca_axes`` and decodes from all of them. The code then
        keeps what PCA's keeps for a linear model downstream, and the learned
        axes add what a linear projection misses. Only for the kinds with a
        plain code (``"ae"``, ``"denoising"``, ``"contractive"``). At most
        ``n_features`` axes are fixed; the rest of the code is learned.
    label_weight : float, default=0.0
        When positive and ``fit`` is given ``y``, a linear head reads the label
        from the code during training and its loss (logistic for a 0/1 label,
        squared error on the standardised label otherwise; rows where ``y`` is
        NaN left out) is added to the reconstruction loss with this weight.
        The code then keeps what predicts the label linearly (see
        :mod:`models.label_guidance`). The head is not kept. 0, or no ``y``,
        trains on ``X`` alone.
    device : str, default="auto"
        ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"`` or
        ``"cuda:N"``.
    random_state : int, RandomState instance or None, default=None
        Seeds the split, the weight initialisation, the shuffling and the noise.
        An int gives identical weights and outputs across runs on the same
        hardware; the global torch and numpy RNG states are left untouched.
    verbose : int, default=0
        If positive, print one line per epoch.
    epoch_callback : callable or None, default=None
        ``epoch_callback(epoch, train_loss, val_loss)`` after each epoch (0-based
        epoch; the losses are the values appended to ``history_``). Never saved.

    Attributes
    ----------
    n_features_in_ : int
        Number of input features.
    feature_names_in_ : ndarray of shape (n_features_in_,)
        Input column names; only when fitted on a DataFrame with string columns.
    network_ : AutoencoderNetwork
        The trained module, on ``device_``.
    device_ : str
        Device the network lives on.
    history_ : dict of str to list of float
        ``"train_loss"``: mean training objective per epoch (regularisation terms
        included). ``"val_loss"``: reconstruction MSE on the validation rows per
        epoch, or the training reconstruction MSE when there is no validation
        split.
    n_epochs_ : int
        Epochs run (``len(history_["train_loss"])``).
    best_epoch_ : int
        0-based index into ``history_`` of the epoch whose weights were kept.
    val_loss_ : float
        ``history_["val_loss"][best_epoch_]``: pure reconstruction MSE averaged
        over rows and features, comparable with PCA's.
    decision_scores_ : ndarray of shape (n_samples,)
        Anomaly scores of the training rows (all of them, validation rows
        included); with ``score_method="density"`` a row is never its own
        neighbour.
    scorer_ : DensityScore or None
        The fitted density score (None with ``score_method="reconstruction"``).
    threshold_ : float
        ``np.quantile(decision_scores_, 1 - contamination)``.
    labels_ : ndarray of shape (n_samples,)
        ``(decision_scores_ > threshold_)`` as 0/1 integers.

    See Also
    --------
    sklearn.decomposition.PCA : Linear counterpart.

    Examples
    --------
    >>> import numpy as np
    >>> from models import AutoencoderReducer
    >>> X = np.random.default_rng(0).normal(size=(200, 6))
    >>> est = AutoencoderReducer(latent_dim=2, epochs=5, random_state=0).fit(X)
    >>> est.transform(X).shape
    (200, 2)
    """

    _parameter_constraints: dict = {
        "latent_dim": [Interval(Integral, 1, None, closed="left")],
        "hidden": [tuple, list],
        "kind": [StrOptions(set(KINDS))],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        "lr_schedule": [StrOptions(set(LR_SCHEDULES))],
        "val_fraction": [Interval(Real, 0, 1, closed="left")],
        "patience": [Interval(Integral, 1, None, closed="left"), None],
        "noise_std": [Interval(Real, 0, None, closed="left")],
        "sparsity_weight": [Interval(Real, 0, None, closed="left")],
        "contractive_weight": [Interval(Real, 0, None, closed="left")],
        "beta": [Interval(Real, 0, None, closed="left")],
        "contamination": [Interval(Real, 0, 0.5, closed="right")],
        "score_method": [StrOptions(set(SCORE_METHODS))],
        "one_hot_groups": [list, tuple, None],
        "pca_axes": [Interval(Integral, 0, None, closed="left")],
        "label_weight": [Interval(Real, 0, None, closed="left")],
        "device": [str],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
        "epoch_callback": [callable, None],
    }

    def __init__(
        self,
        latent_dim: int = 8,
        hidden: tuple[int, ...] = (64, 32),
        kind: str = "ae",
        activation: str = "relu",
        epochs: int = 100,
        batch_size: int = 256,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        val_fraction: float = 0.1,
        patience: int | None = 10,
        noise_std: float = 0.2,
        sparsity_weight: float = 1e-3,
        contractive_weight: float = 1e-4,
        beta: float = 1.0,
        contamination: float = 0.01,
        score_method: str = "density",
        one_hot_groups: Any = None,
        pca_axes: int = 0,
        label_weight: float = 0.0,
        device: str = "auto",
        random_state: int | np.random.RandomState | None = None,
        verbose: int = 0,
        epoch_callback: Callable[[int, float, float], Any] | None = None,
    ) -> None:
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.kind = kind
        self.activation = activation
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.weight_decay = weight_decay
        self.lr_schedule = lr_schedule
        self.val_fraction = val_fraction
        self.patience = patience
        self.noise_std = noise_std
        self.sparsity_weight = sparsity_weight
        self.contractive_weight = contractive_weight
        self.beta = beta
        self.contamination = contamination
        self.score_method = score_method
        self.one_hot_groups = one_hot_groups
        self.pca_axes = pca_axes
        self.label_weight = label_weight
        self.device = device
        self.random_state = random_state
        self.verbose = verbose
        self.epoch_callback = epoch_callback

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    # -- fitting --------------------------------------------------------------
    def fit(self, X: Any, y: Any = None) -> AutoencoderReducer:
        """Train the autoencoder on ``X``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training rows, numeric and finite, ideally standardized.
        y : array-like of shape (n_samples,), default=None
            The label that guides the code when ``label_weight > 0``: numeric,
            NaN where unknown. Ignored otherwise.

        Returns
        -------
        self : AutoencoderReducer
            The fitted estimator.
        """
        self._validate_params()
        hidden = self._checked_hidden()
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        device = _resolve_device(self.device)
        rng = check_random_state(self.random_state)

        n_samples, n_features = X.shape
        label, binary = (
            label_columns(y, n_samples)
            if self.label_weight > 0 and y is not None
            else (None, False)
        )
        n_val = int(self.val_fraction * n_samples)
        if n_val < MIN_VALIDATION_ROWS or n_val >= n_samples:
            n_val = 0
        order = rng.permutation(n_samples)
        init_seed, train_seed = (int(s) for s in rng.randint(0, _SEED_HIGH, size=2))
        score_seed = int(rng.randint(0, _SEED_HIGH))

        # X has no more principal directions than columns: the rest of the
        # code is learned.
        pca_axes = min(self.pca_axes, n_features)
        # Seed the initialisation without disturbing the caller's global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            network = AutoencoderNetwork(
                n_features,
                self.latent_dim,
                hidden,
                self.activation,
                variational=OBJECTIVES[self.kind].variational,
                code_activation=OBJECTIVES[self.kind].code_activation,
                one_hot_groups=self._checked_groups(n_features),
                pca_axes=pca_axes,
            )
            # Built after the network, so an unguided fit draws the same weights.
            head = None if label is None else LabelHead(self.latent_dim, binary)
        if pca_axes:
            train_rows = X if not n_val else X[order[n_val:]]
            network.set_pca_axes(*principal_axes(train_rows, pca_axes))
        network.to(device)
        if head is not None:
            head.to(device)

        X32 = np.ascontiguousarray(X, dtype=np.float32)
        if not X32.flags.writeable:
            X32 = X32.copy()  # torch.from_numpy warns on read-only buffers
        x_all = torch.from_numpy(X32).to(device)
        # The label travels as extra columns of the training rows, so one
        # index per batch gathers rows and labels alike.
        rows_all = (
            x_all
            if label is None
            else torch.cat([x_all, torch.from_numpy(label).to(device)], dim=1)
        )
        if n_val:
            index = torch.from_numpy(order).to(device)
            x_val: torch.Tensor | None = x_all[index[:n_val]]
            x_train = rows_all[index[n_val:]]
        else:
            x_val, x_train = None, rows_all
        generator = torch.Generator(device=device).manual_seed(train_seed)

        history, best_epoch = self._train(network, head, x_train, x_val, generator)
        del x_all, rows_all, x_train, x_val

        network.eval()
        self.network_ = network
        self.device_ = str(device)
        self.history_ = history
        self.n_epochs_ = len(history["train_loss"])
        self.best_epoch_ = best_epoch
        self.val_loss_ = float(history["val_loss"][best_epoch])
        self.scorer_ = None
        if self.score_method == "density":
            codes, sq_errors = self._codes_and_cell_errors(X32)
            columns = marginal_columns(X32)
            scorer = DensityScore(
                n_features, network.latent_dim, n_marginal=columns.shape[0]
            )
            self.decision_scores_ = scorer.fit(
                X32, codes, sq_errors, score_seed, columns=columns
            )
            self.scorer_ = scorer.to(device)
        else:
            _, errors = self._forward(X32, latent=False, error=True)
            self.decision_scores_ = errors.astype(np.float64)
        self.threshold_ = contamination_threshold(
            self.decision_scores_, self.contamination
        )
        self.labels_ = is_anomaly(self.decision_scores_, self.threshold_).astype(
            np.int64
        )
        return self

    def _checked_groups(self, n_features: int) -> list[list[int]]:
        """``one_hot_groups`` as lists of ints; a ValueError if they do not fit X."""
        if self.one_hot_groups is None:
            return []
        groups: list[list[int]] = []
        seen: set[int] = set()
        for group in self.one_hot_groups:
            columns = [int(i) for i in group]
            if len(columns) < 2:
                raise ValueError(
                    f"one_hot_groups: each group needs 2 or more columns, got {group!r}"
                )
            bad = [i for i in columns if not 0 <= i < n_features]
            if bad:
                raise ValueError(
                    f"one_hot_groups: column {bad[0]} is outside 0..{n_features - 1}"
                )
            if seen.intersection(columns) or len(set(columns)) < len(columns):
                raise ValueError("one_hot_groups: a column is in more than one group")
            seen.update(columns)
            groups.append(columns)
        return groups

    def _checked_hidden(self) -> tuple[int, ...]:
        hidden = tuple(self.hidden)
        if not all(isinstance(h, Integral) and not isinstance(h, bool) for h in hidden):
            raise ValueError(f"hidden must hold integers, got {self.hidden!r}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden layer widths must be >= 1, got {self.hidden!r}")
        return tuple(int(h) for h in hidden)

    def _make_optimizer(self, params: list[torch.Tensor]) -> torch.optim.Optimizer:
        kwargs: dict[str, Any] = {"lr": self.lr, "weight_decay": self.weight_decay}
        try:
            # The fused kernel updates every parameter in one call instead of a
            # Python loop over tensors: measurably faster for small networks.
            return torch.optim.Adam(params, fused=True, **kwargs)
        except (RuntimeError, TypeError):
            return torch.optim.Adam(params, **kwargs)

    def _step_function(
        self,
        network: AutoencoderNetwork,
        head: LabelHead | None,
        generator: torch.Generator,
        steps: int,
    ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """One optimiser step on a batch, returning its (loss, MSE) detached.

        On CUDA, for an objective without random draws, steps are replayed
        from CUDA graphs (:mod:`models.graphed_training`): launching a small
        network's kernels one by one from Python, not running them, is what a
        GPU step costs. Elsewhere, the plain eager loop.
        """

        def loss_of(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return self._batch_loss(network, head, batch, generator)

        params = list(network.parameters())
        if head is not None:
            params += list(head.parameters())
        device = params[0].device
        if device.type == "cuda" and OBJECTIVES[self.kind].graph_safe:
            from models.graphed_training import GraphedSteps

            return GraphedSteps(
                loss_of,
                params,
                lr=self.lr,
                weight_decay=self.weight_decay,
                schedule=self.lr_schedule,
                total_steps=steps,
            ).step
        optimizer = self._make_optimizer(params)
        schedule = make_schedule(optimizer, self.lr_schedule, steps)

        def eager(batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss, recon = loss_of(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None:
                schedule.step()
            done = loss.detach()
            return done, (done if recon is loss else recon.detach())

        return eager

    def _train(
        self,
        network: AutoencoderNetwork,
        head: LabelHead | None,
        x_train: torch.Tensor,
        x_val: torch.Tensor | None,
        generator: torch.Generator,
    ) -> tuple[dict[str, list[float]], int]:
        """Run the epochs; leave the best weights in ``network``.

        ``x_train`` holds the training rows, followed by the label's columns
        when ``head`` is given; ``x_val`` holds rows only (early stopping
        watches the reconstruction alone).
        """
        n_train = x_train.shape[0]
        device = x_train.device
        history: dict[str, list[float]] = {"train_loss": [], "val_loss": []}
        best_loss = math.inf
        best_epoch = -1
        best_state: dict[str, torch.Tensor] | None = None
        stale = 0
        batch_rows = self._batch_weights(n_train, device)
        total_steps = self.epochs * batch_rows.shape[0]
        step = self._step_function(network, head, generator, total_steps)
        # The first half of a cosine schedule runs at high rates, where the
        # validation loss is noisy and still falls in the second half: epochs
        # without improvement count towards ``patience`` only after it.
        patience_from = self.epochs // 2 if self.lr_schedule != "constant" else 0
        for epoch in range(self.epochs):
            network.train()
            # Data already sit on the device as one tensor: index it with a
            # permutation per batch (no DataLoader, no numpy round trips, no second
            # full copy of the training rows).
            order = torch.randperm(n_train, generator=generator, device=device)
            # Keep the per-batch losses as device tensors and reduce them once per
            # epoch: a .item() per batch would sync every step.
            losses: list[torch.Tensor] = []
            recons: list[torch.Tensor] = []
            for start in range(0, n_train, self.batch_size):
                loss, recon = step(x_train[order[start : start + self.batch_size]])
                losses.append(loss)
                if recon is not loss:
                    recons.append(recon)
            loss_sum = torch.stack(losses) @ batch_rows
            recon_sum = torch.stack(recons) @ batch_rows if recons else loss_sum
            train_loss = float(loss_sum) / n_train
            if x_val is None:
                monitored = float(recon_sum) / n_train
            else:
                monitored = self._validation_loss(network, x_val)
            history["train_loss"].append(train_loss)
            history["val_loss"].append(monitored)
            if self.verbose:
                print(
                    f"epoch {epoch}: train_loss={train_loss:.6g} "
                    f"val_loss={monitored:.6g}"
                )
            if self.epoch_callback is not None:
                self.epoch_callback(epoch, train_loss, monitored)
            if not (math.isfinite(train_loss) and math.isfinite(monitored)):
                warnings.warn(
                    f"training stopped at epoch {epoch}: the loss is not finite; "
                    "keeping the best earlier weights (consider a lower lr)",
                    RuntimeWarning,
                    stacklevel=3,
                )
                break
            if monitored < best_loss:
                best_loss, best_epoch, stale = monitored, epoch, 0
                best_state = {
                    k: v.detach().clone() for k, v in network.state_dict().items()
                }
            elif epoch >= patience_from:
                stale += 1
                if self.patience is not None and stale >= self.patience:
                    break
        if best_state is None:
            raise ValueError(
                "training diverged: the loss was not finite in the first epoch; "
                "check the input scale or lower lr"
            )
        network.load_state_dict(best_state)
        return history, best_epoch

    def _batch_weights(self, n_train: int, device: torch.device) -> torch.Tensor:
        """Rows per batch, to turn per-batch mean losses into an epoch mean."""
        sizes = torch.full(
            (math.ceil(n_train / self.batch_size),), float(self.batch_size)
        )
        sizes[-1] = n_train - self.batch_size * (sizes.shape[0] - 1)
        return sizes.to(device)

    def _batch_loss(
        self,
        network: AutoencoderNetwork,
        head: LabelHead | None,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training objective and its pure reconstruction-MSE part for one batch."""
        # Each kind's loss is an object in models.objectives, looked up by name.
        objective = OBJECTIVES[self.kind]
        if head is None:
            loss, recon, _ = objective(self, network, batch, generator)
            return loss, recon
        n_features = network.n_features
        # A contiguous copy of the rows: cheaper than strided reads in every
        # layer and loss term that follows.
        rows = batch[:, :n_features].contiguous()
        loss, recon, code = objective(self, network, rows, generator)
        guide = head.loss(code, batch[:, n_features], batch[:, n_features + 1])
        return loss + self.label_weight * guide, recon

    @staticmethod
    def _validation_loss(network: AutoencoderNetwork, x_val: torch.Tensor) -> float:
        network.eval()
        total = torch.zeros((), device=x_val.device)
        with torch.inference_mode():
            for start in range(0, x_val.shape[0], INFERENCE_BATCH):
                batch = x_val[start : start + INFERENCE_BATCH]
                total += (network(batch) - batch).square().sum()
        return float(total) / x_val.numel()

    # -- inference ------------------------------------------------------------
    def _blocks(
        self,
        X32: np.ndarray,
        *,
        decode: bool = True,
        reconstructions: np.ndarray | None = None,
    ) -> Iterator[tuple[slice, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """The one inference loop: each block of ``X32``'s rows with its codes and,
        when ``decode``, its squared cell errors (all on the fitted device).

        Yields ``(rows, batch, code, sq_error)`` with shapes (b, n_features),
        (b, latent_dim) and (b, n_features) or None. Runs under inference mode.
        When ``decode``, each block's reconstruction is also copied into
        ``reconstructions`` (shape of ``X32``) if one is given.
        """
        network = self.network_
        device = torch.device(self.device_)
        n = X32.shape[0]
        step = INFERENCE_BATCH if device.type == "cpu" else INFERENCE_BATCH_GPU
        with torch.inference_mode():
            # No block is so small that BLAS rounds it differently from a
            # large one (models/row_blocks.py): a row's results never depend
            # on the rows beside it.
            for rows in row_blocks(n, step):
                batch = _rows_tensor(X32[rows], device)
                m = batch.shape[0]
                codes = network.infer_encode(padded(batch))
                code = codes[:m]
                sq = None
                if decode:
                    out = network.infer_decode(codes)[:m]
                    if reconstructions is not None:
                        reconstructions[rows] = out.cpu().numpy()  # a copy
                    sq = out.sub_(batch).square_()
                yield rows, batch, code, sq

    def _forward(
        self,
        X32: np.ndarray,
        *,
        latent: bool,
        error: bool,
        reconstruction: bool = False,
    ) -> tuple[np.ndarray | None, np.ndarray | None]:
        """Codes and/or per-row scores for a float32 C-contiguous array.

        The single code path behind ``transform``, ``decision_function`` and
        ``encode_and_score``, so their outputs agree exactly. The score is the
        anomaly score of ``score_method``, or the reconstruction MSE when
        ``reconstruction`` is set.
        """
        scorer = None if reconstruction else getattr(self, "scorer_", None)
        n = X32.shape[0]
        latent_dim = self.network_.latent_dim
        codes = np.empty((n, latent_dim), dtype=np.float32) if latent else None
        errors = np.empty(n, dtype=np.float32) if error else None
        for rows, batch, code, sq in self._blocks(X32, decode=error):
            if codes is not None:
                codes[rows] = code.cpu().numpy()
            if errors is not None and sq is not None:
                row = sq.mean(dim=1) if scorer is None else scorer(batch, code, sq)
                errors[rows] = row.cpu().numpy()
        return codes, errors

    def _codes_and_cell_errors(self, X32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes (n, latent_dim) and squared errors of every cell (n, n_features)."""
        codes = np.empty((X32.shape[0], self.network_.latent_dim), dtype=np.float32)
        cells = np.empty_like(X32)
        for rows, _, code, sq in self._blocks(X32):
            codes[rows] = code.cpu().numpy()
            cells[rows] = sq.cpu().numpy()
        return codes, cells

    def _validated(self, X: Any) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=[np.float64, np.float32])

    def transform(self, X: Any) -> np.ndarray:
        """Encode rows into the latent space.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to encode.

        Returns
        -------
        Z : ndarray of shape (n_samples, latent_dim)
            Codes (the posterior mean for ``kind="vae"``); float32 for float32
            input, float64 otherwise.
        """
        X = self._validated(X)
        codes, _ = self._forward(
            np.ascontiguousarray(X, dtype=np.float32), latent=True, error=False
        )
        return codes.astype(X.dtype, copy=False)

    def inverse_transform(self, X: Any) -> np.ndarray:
        """Decode latent codes back to the input space.

        Parameters
        ----------
        X : array-like of shape (n_samples, latent_dim)
            Codes, e.g. from :meth:`transform`.

        Returns
        -------
        X_original : ndarray of shape (n_samples, n_features_in_)
            Reconstructions; float32 for float32 input, float64 otherwise.
        """
        check_is_fitted(self)
        Z = check_array(X, dtype=[np.float64, np.float32])
        latent_dim = self.network_.latent_dim
        if Z.shape[1] != latent_dim:
            raise ValueError(
                f"X has {Z.shape[1]} columns, but {type(self).__name__} decodes "
                f"codes of latent_dim={latent_dim}"
            )
        return self._decode(np.ascontiguousarray(Z, dtype=np.float32)).astype(
            Z.dtype, copy=False
        )

    def _decode(self, Z32: np.ndarray) -> np.ndarray:
        device = torch.device(self.device_)
        out = np.empty((Z32.shape[0], self.n_features_in_), dtype=np.float32)
        with torch.inference_mode():
            for rows in row_blocks(Z32.shape[0], INFERENCE_BATCH):
                z = _rows_tensor(Z32[rows], device)
                decoded = self.network_.infer_decode(padded(z))[: z.shape[0]]
                out[rows] = decoded.cpu().numpy()
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        """Output feature names ``latent_0, ..., latent_{latent_dim-1}``.

        Parameters
        ----------
        input_features : array-like of str or None, default=None
            Only checked for consistency with ``feature_names_in_``.

        Returns
        -------
        feature_names_out : ndarray of str objects of shape (latent_dim,)
            The latent column names.
        """
        check_is_fitted(self)
        _check_feature_names_in(self, input_features)
        return np.asarray(
            [latent_name(i) for i in range(self.network_.latent_dim)], dtype=object
        )

    def decision_function(self, X: Any) -> np.ndarray:
        """Anomaly score of each row (see ``score_method``): higher is more
        anomalous.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to score.

        Returns
        -------
        scores : ndarray of shape (n_samples,)
            Float64 holding the float32 values :meth:`encode_and_score` returns.
        """
        X = self._validated(X)
        _, errors = self._forward(
            np.ascontiguousarray(X, dtype=np.float32), latent=False, error=True
        )
        return errors.astype(np.float64)

    def predict(self, X: Any) -> np.ndarray:
        """Flag anomalies: 1 where the score exceeds ``threshold_``, else 0.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to label.

        Returns
        -------
        labels : ndarray of shape (n_samples,)
            0/1 integers (PyOD convention, not scikit-learn's -1/1).
        """
        return is_anomaly(self.decision_function(X), self.threshold_).astype(np.int64)

    def score(self, X: Any, y: Any = None) -> float:
        """Negative mean reconstruction error (higher is better).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to reconstruct.
        y : None
            Ignored.

        Returns
        -------
        score : float
            Minus the mean squared reconstruction error over rows and features,
            whatever ``score_method`` is.
        """
        X = self._validated(X)
        _, errors = self._forward(
            np.ascontiguousarray(X, dtype=np.float32),
            latent=False,
            error=True,
            reconstruction=True,
        )
        return -float(np.mean(errors, dtype=np.float64))

    def feature_errors(self, X: Any) -> np.ndarray | pd.DataFrame:
        """Squared reconstruction error of every cell.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to reconstruct.

        Returns
        -------
        errors : ndarray or DataFrame of shape (n_samples, n_features_in_)
            A DataFrame with ``feature_names_in_`` as columns (and ``X``'s index if
            ``X`` is a DataFrame) when fitted on a DataFrame, else an ndarray;
            float32 for float32 input, float64 otherwise. Row means equal
            :meth:`decision_function`.
        """
        index = X.index if isinstance(X, pd.DataFrame) else None
        X = self._validated(X)
        X32 = np.ascontiguousarray(X, dtype=np.float32)
        _, out = self._codes_and_cell_errors(X32)
        errors = out.astype(X.dtype, copy=False)
        if hasattr(self, "feature_names_in_"):
            return pd.DataFrame(
                errors, columns=list(self.feature_names_in_), index=index
            )
        return errors

    def score_contributions(self, X: Any) -> np.ndarray:
        """Each feature's part of the anomaly score.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to explain.

        Returns
        -------
        contributions : ndarray of shape (n_samples, n_features_in_), float32
            Non-negative; each row's mean equals :meth:`decision_function` (up to
            float32 rounding). With ``score_method="reconstruction"`` these are
            the squared cell errors of :meth:`feature_errors`.
        """
        scorer = getattr(self, "scorer_", None)
        if scorer is None:
            return np.asarray(self.feature_errors(X), dtype=np.float32)
        X32 = np.ascontiguousarray(self._validated(X), dtype=np.float32)
        return self._contributions(X32)

    def score_contributions_and_reconstruction(
        self, X: Any
    ) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`score_contributions` and the reconstruction, in one pass.

        What an explanation needs: the same values as ``score_contributions(X)``
        and ``inverse_transform(transform(X))``, for one encoder and one decoder
        pass instead of two of each.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features_in_)
            Rows to explain.

        Returns
        -------
        contributions : ndarray of shape (n_samples, n_features_in_), float32
        reconstruction : ndarray of shape (n_samples, n_features_in_), float32
        """
        X32 = np.ascontiguousarray(self._validated(X), dtype=np.float32)
        reconstruction = np.empty_like(X32)
        return self._contributions(X32, reconstruction), reconstruction

    def _contributions(
        self, X32: np.ndarray, reconstructions: np.ndarray | None = None
    ) -> np.ndarray:
        scorer = getattr(self, "scorer_", None)
        out = np.empty_like(X32)
        for rows, batch, code, sq in self._blocks(X32, reconstructions=reconstructions):
            out[rows] = (
                (sq if scorer is None else scorer.contributions(batch, code, sq))
                .cpu()
                .numpy()
            )
        return out

    def encode_and_score(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes and anomaly scores in one forward pass: the hot scoring path.

        No pandas and no scikit-learn validation (only a shape check): ``X``
        should already be a finite float32 array; other dtypes are converted.

        Parameters
        ----------
        X : ndarray of shape (n_samples, n_features_in_)
            Rows to score, float32.

        Returns
        -------
        latent : ndarray of shape (n_samples, latent_dim), float32
            Same values as ``transform(X)``.
        score : ndarray of shape (n_samples,), float32
            Same values as ``decision_function(X)``.
        """
        check_is_fitted(self)
        X = np.ascontiguousarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has shape {X.shape}, but {type(self).__name__} expects "
                f"(n_samples, {self.n_features_in_})"
            )
        latent, errors = self._forward(X, latent=True, error=True)
        return latent, errors

    def sample(self, n: int, random_state: Any = None) -> np.ndarray:
        """Draw new rows from a fitted VAE: decode ``z ~ N(0, I)``.

        Parameters
        ----------
        n : int
            Number of rows to draw.
        random_state : int, RandomState instance or None, default=None
            Seeds the draw.

        Returns
        -------
        X_new : ndarray of shape (n, n_features_in_), float64
            Decoder means (no observation noise is added).

        Raises
        ------
        ValueError
            If the estimator was not fitted with ``kind="vae"``.
        """
        check_is_fitted(self)
        if not self.network_.variational:
            raise ValueError(
                f"sample needs kind='vae'; this estimator was fitted with "
                f"kind={self.kind!r}"
            )
        if not isinstance(n, Integral) or n < 0:
            raise ValueError(f"n must be a non-negative integer, got {n!r}")
        seed = int(check_random_state(random_state).randint(0, _SEED_HIGH))
        generator = torch.Generator().manual_seed(seed)
        z = torch.randn((int(n), self.network_.latent_dim), generator=generator)
        return self._decode(z.numpy()).astype(np.float64)

    # -- persistence ----------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to directory ``path`` as ``weights.pt`` and ``estimator.json``.

        ``weights.pt`` is a ``torch.save`` of a flat dict of CPU tensors (the
        network's state_dict under ``network.*`` and ``decision_scores_``);
        ``estimator.json`` holds the hyperparameters (not ``epoch_callback``), the
        architecture, the fitted scalars, the history and the weights' SHA-256.
        Each file is written to a temporary name and moved into place atomically.

        Parameters
        ----------
        path : str or path-like
            Directory, created if missing.

        Returns
        -------
        path : Path
            The directory.
        """
        check_is_fitted(self)
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {
            f"network.{k}": v.detach().cpu().contiguous()
            for k, v in self.network_.state_dict().items()
        }
        tensors["decision_scores_"] = torch.from_numpy(
            np.asarray(self.decision_scores_, dtype=np.float64).copy()
        )
        scorer = getattr(self, "scorer_", None)
        if scorer is not None:
            tensors.update(
                {
                    f"scorer.{k}": v.detach().cpu().contiguous()
                    for k, v in scorer.state_dict().items()
                }
            )
        buffer = io.BytesIO()
        torch.save(tensors, buffer)
        weights = buffer.getvalue()

        params = self.get_params(deep=False)
        params.pop("epoch_callback")
        params["hidden"] = [int(h) for h in params["hidden"]]
        if params["one_hot_groups"] is not None:
            params["one_hot_groups"] = [
                [int(i) for i in g] for g in params["one_hot_groups"]
            ]
        random_state = params["random_state"]
        # A RandomState instance has no JSON form; the fitted weights do not need it.
        params["random_state"] = (
            int(random_state) if isinstance(random_state, Integral) else None
        )
        names = getattr(self, "feature_names_in_", None)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "params": params,
            "architecture": self.network_.config(),
            "scorer": None if scorer is None else scorer.config(),
            "fitted": {
                "n_features_in_": int(self.n_features_in_),
                "feature_names_in_": None if names is None else [str(c) for c in names],
                "device_": self.device_,
                "n_epochs_": int(self.n_epochs_),
                "best_epoch_": int(self.best_epoch_),
                "val_loss_": float(self.val_loss_),
                "threshold_": float(self.threshold_),
                "history_": {
                    k: [float(v) for v in vs] for k, vs in self.history_.items()
                },
            },
            "weights_sha256": hashlib.sha256(weights).hexdigest(),
        }
        _atomic_write(path / WEIGHTS_FILE, weights)
        _atomic_write(path / META_FILE, json.dumps(meta, indent=1).encode())
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str = "cpu"
    ) -> AutoencoderReducer:
        """Load an estimator written by :meth:`save`, without unpickling anything.

        Parameters
        ----------
        path : str or path-like
            Directory holding ``weights.pt`` and ``estimator.json``.
        device : str, default="cpu"
            Where the network is placed (a model saved on CUDA loads on CPU); also
            becomes the loaded estimator's ``device`` parameter.

        Returns
        -------
        estimator : AutoencoderReducer
            A fitted estimator.

        Raises
        ------
        ValueError
            With a one-line message naming the file, if a file is missing, corrupt,
            tampered with, or inconsistent with the other.
        """
        path = Path(path)
        meta = _read_meta(path)
        where = f"{META_FILE} in {path}"
        try:
            params = dict(meta["params"])
            if meta["format_version"] == 1:
                params["score_method"] = "reconstruction"
            params["hidden"] = tuple(params["hidden"])
            params["device"] = device
            estimator = cls(**params)
            estimator._validate_params()
            network = AutoencoderNetwork.from_config(meta["architecture"])
            scorer_config = meta.get("scorer")
            scorer = (
                None
                if scorer_config is None
                else DensityScore.from_config(dict(scorer_config))
            )
            if (scorer is None) != (estimator.score_method != "density"):
                raise ValueError(
                    f"score_method={estimator.score_method!r} does not match the "
                    f"scorer entry ({'none' if scorer is None else 'density'})"
                )
            fitted = meta["fitted"]
            n_features = int(fitted["n_features_in_"])
            names = fitted["feature_names_in_"]
            history = {
                key: [float(v) for v in fitted["history_"][key]]
                for key in ("train_loss", "val_loss")
            }
            scalars = {
                "n_epochs_": int(fitted["n_epochs_"]),
                "best_epoch_": int(fitted["best_epoch_"]),
                "val_loss_": float(fitted["val_loss_"]),
                "threshold_": float(fitted["threshold_"]),
            }
            expected_sha = str(meta["weights_sha256"])
        except KeyError as exc:
            raise ValueError(
                f"{where} is malformed: missing key {exc.args[0]!r}"
            ) from None
        except (TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{where} is malformed: {_first_line(exc)}") from None
        if n_features != network.n_features:
            raise ValueError(
                f"{where} is inconsistent: n_features_in_={n_features} but the "
                f"architecture has {network.n_features} inputs"
            )
        if names is not None and (
            len(names) != n_features or not all(isinstance(c, str) for c in names)
        ):
            raise ValueError(f"{where} is malformed: bad feature_names_in_")

        tensors = _read_weights(path, expected_sha)
        where = f"{WEIGHTS_FILE} in {path}"
        expected = {f"network.{k}": v for k, v in network.state_dict().items()}
        if scorer is not None:
            expected.update({f"scorer.{k}": v for k, v in scorer.state_dict().items()})
        required = {*expected, "decision_scores_"}
        missing = sorted(required - set(tensors))
        unexpected = sorted(set(tensors) - required)
        if missing or unexpected:
            raise ValueError(
                f"{where} does not match the architecture in {META_FILE}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for key, ref in expected.items():
            kind_ok = (
                tensors[key].is_floating_point()
                if ref.is_floating_point()
                else tensors[key].dtype == ref.dtype
            )
            if tensors[key].shape != ref.shape or not kind_ok:
                raise ValueError(
                    f"{where} does not match the architecture in {META_FILE}: "
                    f"{key} has shape {tuple(tensors[key].shape)} "
                    f"({tensors[key].dtype}), expected {tuple(ref.shape)}"
                )
        scores = tensors["decision_scores_"]
        if scores.ndim != 1 or not scores.is_floating_point():
            raise ValueError(f"{where} has a malformed decision_scores_ tensor")

        resolved = _resolve_device(device)
        network.load_state_dict(
            {
                k.removeprefix("network."): tensors[k]
                for k in expected
                if k.startswith("network.")
            },
            strict=True,
        )
        network.to(resolved).eval()
        if scorer is not None:
            scorer.load_state_dict(
                {
                    k.removeprefix("scorer."): tensors[k]
                    for k in expected
                    if k.startswith("scorer.")
                },
                strict=True,
            )
            scorer.to(resolved)
        estimator.scorer_ = scorer
        estimator.network_ = network
        estimator.device_ = str(resolved)
        estimator.n_features_in_ = n_features
        if names is not None:
            estimator.feature_names_in_ = np.asarray(names, dtype=object)
        estimator.history_ = history
        for key, value in scalars.items():
            setattr(estimator, key, value)
        estimator.decision_scores_ = scores.to(torch.float64).numpy()
        estimator.labels_ = is_anomaly(
            estimator.decision_scores_, estimator.threshold_
        ).astype(np.int64)
        return estimator


def _read_meta(path: Path) -> dict[str, Any]:
    where = f"{META_FILE} in {path}"
    try:
        text = (path / META_FILE).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ValueError(f"{where} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {_first_line(exc)}") from None
    try:
        meta = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{where} is not valid JSON: {_first_line(exc)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise ValueError(f"{where} is not a saved {AutoencoderReducer.__name__}")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"{where} has format_version {meta.get('format_version')!r}; this "
            f"version reads {', '.join(map(str, READABLE_VERSIONS))}"
        )
    return meta


def _read_weights(path: Path, expected_sha: str) -> dict[str, torch.Tensor]:
    where = f"{WEIGHTS_FILE} in {path}"
    try:
        data = (path / WEIGHTS_FILE).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{where} is missing") from None
    except OSError as exc:
        raise ValueError(f"{where} cannot be read: {_first_line(exc)}") from None
    if not data:
        raise ValueError(f"{where} is not a valid weights file: it is empty")
    try:
        with warnings.catch_warnings():
            # A foreign pickle protocol only draws a warning before the refusal
            # below; the ValueError already says what is wrong.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            # weights_only: the unpickler only rebuilds tensors and plain
            # containers, so a crafted file cannot run code.
            tensors = torch.load(
                io.BytesIO(data), weights_only=True, map_location="cpu"
            )
    except pickle.UnpicklingError:
        raise ValueError(
            f"{where} is not a valid weights file: it is not a torch.save archive "
            "of plain tensors (refused to unpickle it)"
        ) from None
    except Exception as exc:
        reason = _first_line(exc).split(". ")[0]
        raise ValueError(
            f"{where} is not a valid weights file: truncated or corrupt ({reason})"
        ) from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in tensors.items()
    ):
        raise ValueError(
            f"{where} is not a valid weights file: expected a dict of named tensors"
        )
    if hashlib.sha256(data).hexdigest() != expected_sha:
        raise ValueError(
            f"{where} does not match the checksum recorded in {META_FILE} (the files "
            "come from different saves or one was modified)"
        )
    return tensors
