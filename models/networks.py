"""Torch modules behind :class:`models.estimator.AutoencoderReducer`.

The modules know nothing about training, validation or persistence: the estimator
builds one lazily in ``fit`` once the number of input features is known, and
rebuilds one from :meth:`AutoencoderNetwork.config` when loading a saved model.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}

# Bounds the posterior variance exp(logvar) so that a bad step cannot overflow
# it to inf; the range is far wider than any variance a trained model uses.
_LOGVAR_MIN = -30.0
_LOGVAR_MAX = 20.0


def _mlp(sizes: Sequence[int], activation: str) -> list[nn.Module]:
    """Linear layers between consecutive ``sizes``, activated except the last."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return layers


class AutoencoderNetwork(nn.Module):
    """Fully connected autoencoder with a linear output layer.

    The encoder maps ``n_features -> hidden[0] -> ... -> hidden[-1] -> code`` and
    the decoder mirrors it back to ``n_features``. The output layer is linear
    because inputs are standardized, not bounded to [0, 1].

    Parameters
    ----------
    n_features : int
        Width of the input and of the reconstruction.
    latent_dim : int
        Width of the code.
    hidden : sequence of int, default=(64, 32)
        Widths of the encoder's hidden layers; the decoder uses them reversed.
        Empty gives a shallow autoencoder (one linear map each way).
    activation : str, default="relu"
        Hidden-layer activation, a key of ``ACTIVATIONS``.
    variational : bool, default=False
        If True the encoder emits ``2 * latent_dim`` values per row, split into the
        posterior mean and log-variance of a diagonal Gaussian.
    code_activation : {"relu"} or None, default=None
        Activation applied to the (non-variational) code, e.g. ReLU so that a
        sparse autoencoder's zeros are exact zeros.
    one_hot_groups : sequence of sequences of int, default=()
        Output columns that one-hot encode one categorical each. The
        reconstruction of a group is a softmax over its columns (a probability
        per category, summing to 1) and training fits it by cross-entropy;
        every other column stays a linear output fitted by squared error.
    pca_axes : int, default=0
        The first ``pca_axes`` code axes are the input's leading principal
        components (fixed buffers ``pca_mean``, ``pca_components`` set by the
        caller before training); the encoder learns only the other
        ``latent_dim - pca_axes``. Not with a variational code or a code
        activation.
    """

    def __init__(
        self,
        n_features: int,
        latent_dim: int,
        hidden: Sequence[int] = (64, 32),
        activation: str = "relu",
        variational: bool = False,
        code_activation: str | None = None,
        one_hot_groups: Sequence[Sequence[int]] = (),
        pca_axes: int = 0,
    ) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}"
            )
        if code_activation not in (None, "relu"):
            raise ValueError(
                f"code_activation must be None or 'relu', got {code_activation!r}"
            )
        if variational and code_activation is not None:
            raise ValueError("a variational code cannot have a code activation")
        if not 0 <= pca_axes <= latent_dim:
            raise ValueError(f"pca_axes must be in 0..{latent_dim}, got {pca_axes}")
        if pca_axes and (variational or code_activation is not None):
            raise ValueError(
                "pca_axes needs a plain code (not variational, no code activation)"
            )
        self.n_features = int(n_features)
        self.latent_dim = int(latent_dim)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self.variational = bool(variational)
        self.code_activation = code_activation
        self.pca_axes = int(pca_axes)
        self.one_hot_groups = tuple(tuple(int(i) for i in g) for g in one_hot_groups)
        # Index buffers follow the module to its device; they are rebuilt from
        # the config, so they stay out of the state_dict.
        grouped = {i for g in self.one_hot_groups for i in g}
        plain = [i for i in range(self.n_features) if i not in grouped]
        self.register_buffer("plain_columns", _columns(plain), persistent=False)
        for i, group in enumerate(self.one_hot_groups):
            self.register_buffer(f"group_{i}", _columns(group), persistent=False)
        # A group of consecutive columns (the preprocessor makes them so) is a
        # slice at inference: its softmax runs on a view, without the gather
        # and scatter an index needs (the same values, a third faster).
        self._group_spans = tuple(_span(g) for g in self.one_hot_groups)
        # The same layout lets training cut the output into its plain runs and
        # groups with one split, whose backward is a single concatenation
        # (a gather per group costs a full-width scatter each way).
        self._segments = _segments(self.n_features, self._group_spans)

        code_width = 2 * self.latent_dim if self.variational else self.latent_dim
        code_width -= self.pca_axes
        if self.pca_axes:
            # Only then: files saved before principal axes existed still load.
            self.register_buffer("pca_mean", torch.zeros(self.n_features))
            self.register_buffer(
                "pca_components", torch.zeros(self.pca_axes, self.n_features)
            )
        # Every layer starts with a Linear (see _run_inplace); with no learned
        # axis left the encoder is just the principal components.
        encoder = (
            _mlp((self.n_features, *self.hidden, code_width), activation)
            if code_width
            else []
        )
        if code_activation == "relu":
            encoder.append(nn.ReLU())
        self.encoder = nn.Sequential(*encoder)
        self.decoder = nn.Sequential(
            *_mlp(
                (self.latent_dim, *reversed(self.hidden), self.n_features), activation
            )
        )

    def config(self) -> dict[str, Any]:
        """Constructor arguments, JSON-serialisable, for :meth:`from_config`."""
        return {
            "n_features": self.n_features,
            "latent_dim": self.latent_dim,
            "hidden": list(self.hidden),
            "activation": self.activation,
            "variational": self.variational,
            "code_activation": self.code_activation,
            "one_hot_groups": [list(g) for g in self.one_hot_groups],
            "pca_axes": self.pca_axes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> AutoencoderNetwork:
        """Rebuild an (untrained) network from :meth:`config`'s output."""
        return cls(**config)

    def encode_distribution(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each of shape (n, latent_dim).

        Only for a variational network.
        """
        if not self.variational:
            raise ValueError("encode_distribution needs a variational network")
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar.clamp(_LOGVAR_MIN, _LOGVAR_MAX)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic code of shape (n, latent_dim); the posterior mean for a VAE."""
        code = self.encoder(x) if len(self.encoder) else x[:, :0]
        if self.variational:
            return code[..., : self.latent_dim]
        return self._with_pca_axes(x, code)

    def _with_pca_axes(self, x: torch.Tensor, learned: torch.Tensor) -> torch.Tensor:
        if not self.pca_axes:
            return learned
        fixed = torch.addmm(
            -(self.pca_components @ self.pca_mean), x, self.pca_components.t()
        )
        return torch.cat([fixed, learned], dim=1) if learned.shape[1] else fixed

    def set_pca_axes(self, mean: torch.Tensor, components: torch.Tensor) -> None:
        """Fix the principal axes: ``mean`` (n_features,), ``components``
        (pca_axes, n_features) with orthonormal rows."""
        self.pca_mean.copy_(mean)
        self.pca_components.copy_(components)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Reconstruction of shape (n, n_features) from codes (n, latent_dim)."""
        return self._activate_groups(self.decoder(z))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Deterministic reconstruction ``decode(encode(x))``, shape (n, n_features)."""
        return self.decode(self.encode(x))

    def reconstruction_loss(
        self, z: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training loss of decoding ``z`` towards ``target``, and its pure MSE.

        Both are averaged over rows and features. Without one-hot groups they
        are the same tensor. With them, a group's share of the training loss is
        its cross-entropy instead of its squared error: the squared error of a
        softmax barely moves while the category is wrong (its gradient vanishes
        with the probability), so plain MSE training leaves a many-valued
        categorical unreconstructed; cross-entropy is a proper score for the
        same probabilities, so both losses are minimised by the same
        reconstruction.
        """
        raw = self.decoder(z)
        if not self.one_hot_groups:
            mse = (raw - target).square().mean()
            return mse, mse
        if self._segments is None:
            return self._gathered_loss(raw, target)
        sizes = [stop - start for start, stop, _ in self._segments]
        total = raw.new_zeros(raw.shape[0])
        # The pure MSE is only reported (early stopping and the history watch
        # it), so it is summed outside the graph, from the same log-softmax.
        squares = raw.new_zeros(())
        for (_, _, grouped), out, want in zip(
            self._segments,
            raw.split(sizes, dim=1),
            target.split(sizes, dim=1),
            strict=True,
        ):
            if grouped:
                logp = torch.log_softmax(out, dim=1)
                total = total - (logp * want).sum(dim=1)
                with torch.no_grad():
                    squares += (logp.exp() - want).square().sum()
            else:
                cells = (out - want).square()
                total = total + cells.sum(dim=1)
                squares += cells.detach().sum()
        return total.mean() / self.n_features, squares / target.numel()

    def _gathered_loss(
        self, raw: torch.Tensor, target: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`reconstruction_loss` for groups whose columns are scattered."""
        recon = self._activate_groups(raw)
        mse = (recon - target).square().mean()
        plain = raw.index_select(1, self.plain_columns) - target.index_select(
            1, self.plain_columns
        )
        total = plain.square().sum(dim=1)
        for index in self._group_indices():
            logp = torch.log_softmax(raw.index_select(1, index), dim=1)
            total = total - (logp * target.index_select(1, index)).sum(dim=1)
        return total.mean() / self.n_features, mse

    def _group_indices(self) -> list[torch.Tensor]:
        return [getattr(self, f"group_{i}") for i in range(len(self.one_hot_groups))]

    def _activate_groups(self, raw: torch.Tensor) -> torch.Tensor:
        out = raw
        for index in self._group_indices():
            out = out.index_copy(
                1, index, torch.softmax(raw.index_select(1, index), dim=1)
            )
        return out

    def infer_encode(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`encode` for inference: same values, fewer memory passes.

        Only under ``torch.inference_mode()`` (it activates in place, which
        autograd would refuse); ``x`` itself is never modified.
        """
        code = _run_inplace(self.encoder, x) if len(self.encoder) else x[:, :0]
        if self.variational:
            return code[..., : self.latent_dim]
        return self._with_pca_axes(x, code)

    def infer_decode(self, z: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` for inference (see :meth:`infer_encode`)."""
        out = _run_inplace(self.decoder, z)
        for span, index in zip(self._group_spans, self._group_indices(), strict=True):
            if span is None:
                probs = torch.softmax(out.index_select(1, index), dim=1)
                out.index_copy_(1, index, probs)
            else:
                block = out[:, span[0] : span[1]]
                block.copy_(torch.softmax(block, dim=1))
        return out


def _columns(indices: Sequence[int]) -> torch.Tensor:
    return torch.tensor(list(indices), dtype=torch.long)


def _span(group: Sequence[int]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``group`` is consecutive ascending columns."""
    if group and list(group) == list(range(group[0], group[0] + len(group))):
        return group[0], group[0] + len(group)
    return None


def _segments(
    n_features: int, spans: Sequence[tuple[int, int] | None]
) -> tuple[tuple[int, int, bool], ...] | None:
    """The columns cut into consecutive ``(start, stop, is_group)`` runs, in
    order: each group's span and the plain runs between them. None when a
    group's columns are not consecutive."""
    if any(span is None for span in spans):
        return None
    runs: list[tuple[int, int, bool]] = []
    at = 0
    for start, stop in sorted(s for s in spans if s is not None):
        if start > at:
            runs.append((at, start, False))
        runs.append((start, stop, True))
        at = stop
    if at < n_features:
        runs.append((at, n_features, False))
    return tuple(runs)


def _run_inplace(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    # Scoring is memory-bound: a ReLU that writes a new tensor costs as much as
    # the matmul before it. Every layer here starts with a Linear, which makes
    # a fresh tensor, so activating that tensor in place never touches the
    # input; addmm is what nn.Linear runs for 2-D input, so values are equal.
    for layer in layers:
        if isinstance(layer, nn.Linear):
            x = torch.addmm(layer.bias, x, layer.weight.t())
        elif isinstance(layer, nn.ReLU):
            x = x.relu_()
        else:
            x = layer(x)
    return x


def _gelu_derivative(u: torch.Tensor) -> torch.Tensor:
    cdf = 0.5 * (1.0 + torch.erf(u * 0.7071067811865476))
    pdf = torch.exp(-0.5 * u * u) * 0.3989422804014327
    return cdf + u * pdf


def _silu_derivative(u: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(u)
    return s * (1.0 + u * (1.0 - s))


# d act(u) / du as a function of the pre-activation u, matching the default
# arguments of the modules in ACTIVATIONS (ELU alpha=1, LeakyReLU slope=0.01,
# exact-erf GELU).
ACTIVATION_DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": lambda u: (u > 0).to(u.dtype),
    "tanh": lambda u: 1.0 - torch.tanh(u).square(),
    "sigmoid": lambda u: torch.sigmoid(u) * (1.0 - torch.sigmoid(u)),
    "elu": lambda u: torch.where(u > 0, torch.ones_like(u), torch.exp(u)),
    "leaky_relu": lambda u: torch.where(
        u > 0, torch.ones_like(u), torch.full_like(u, 0.01)
    ),
    "gelu": _gelu_derivative,
    "silu": _silu_derivative,
}


def encode_with_jacobian(
    network: AutoencoderNetwork, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and the squared Frobenius norm of the encoder Jacobian, per row.

    The encoder is ``W_L a(W_{L-1} ... a(W_1 x + b_1) ...) + b_L``, so its exact
    Jacobian for row i is ``W_L D_{L-1,i} W_{L-1} ... D_{1,i} W_1`` with ``D`` the
    diagonal of activation derivatives at that row's pre-activations. This builds
    all rows' Jacobians with batched matrix products, starting from the narrow
    code side (cost ~ latent_dim backward passes, but in one fused expression and
    sharing the forward pass that also yields the codes). The result is an ordinary
    differentiable expression, so plain autograd trains through the penalty;
    ``tests/test_estimator_variants.py`` checks it against
    ``torch.autograd.functional.jacobian``.

    Parameters
    ----------
    network : AutoencoderNetwork
        A non-variational network without a code activation.
    x : torch.Tensor of shape (n, n_features)
        Input rows.

    Returns
    -------
    code : torch.Tensor of shape (n, latent_dim)
        ``network.encode(x)``.
    sq_norm : torch.Tensor of shape (n,)
        ``||d code / d x (x_i)||_F^2`` for each row.
    """
    if network.variational or network.code_activation is not None:
        raise ValueError("encode_with_jacobian needs a plain (linear-code) encoder")
    # The principal axes are linear with orthonormal rows: their Jacobian is
    # the components themselves, of squared norm pca_axes, and has no gradient.
    fixed_norm = float(network.pca_axes)
    linears = [m for m in network.encoder if isinstance(m, nn.Linear)]
    if not linears:
        code = network.encode(x)
        return code, torch.full((x.shape[0],), fixed_norm, device=x.device)
    derivative = ACTIVATION_DERIVATIVES[network.activation]
    activation = ACTIVATIONS[network.activation]()
    h = x
    slopes: list[torch.Tensor] = []
    for layer in linears[:-1]:
        pre = layer(h)
        slopes.append(derivative(pre))
        h = activation(pre)
    code = network._with_pca_axes(x, linears[-1](h))
    jac = linears[-1].weight.expand(x.shape[0], -1, -1)
    for layer, slope in zip(reversed(linears[:-1]), reversed(slopes), strict=True):
        jac = (jac * slope.unsqueeze(1)) @ layer.weight
    return code, jac.square().sum(dim=(1, 2)) + fixed_norm
