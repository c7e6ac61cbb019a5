"""Training objectives of :class:`models.estimator.AutoencoderReducer`, by kind.

Each ``kind`` of autoencoder differs from the plain one only in what it
minimises per batch, so each is one small object registered here by name. The
estimator looks its objective up by ``kind``; ``KINDS`` (and the config's list of
autoencoder families) come from this table, so a new variant is one class plus
one entry in :data:`OBJECTIVES`.

An objective reads its weights (``noise_std``, ``beta``, ...) from the estimator
at call time, so it holds no state and one instance serves every fit.
"""

from __future__ import annotations

from typing import Protocol

import torch

from models.networks import AutoencoderNetwork, encode_with_jacobian

#: (training objective, its reconstruction-MSE part, the code it decoded from).
BatchLoss = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class ObjectiveWeights(Protocol):
    """The estimator hyperparameters an objective may read."""

    noise_std: float
    sparsity_weight: float
    contractive_weight: float
    beta: float


class Objective:
    """Plain autoencoder: the reconstruction MSE, nothing added.

    ``variational`` and ``code_activation`` say what network the kind needs.
    """

    variational: bool = False
    code_activation: str | None = None
    #: Whether a CUDA graph may replay a step (models.graphed_training): not
    #: for objectives that draw random numbers or differentiate twice.
    graph_safe: bool = True

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> BatchLoss:
        """Training objective, its pure reconstruction-MSE part, and the code
        the batch was decoded from, shape (batch, latent_dim) (see
        :meth:`AutoencoderNetwork.reconstruction_loss`). The estimator reads the
        label from that code when the label guides training."""
        code = network.encode(batch)
        return (*network.reconstruction_loss(code, batch), code)


class DenoisingObjective(Objective):
    """Reconstruct the clean row from one corrupted with Gaussian noise."""

    graph_safe = False

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> BatchLoss:
        noise = torch.randn(
            batch.shape, generator=generator, device=batch.device, dtype=batch.dtype
        )
        noisy = batch + weights.noise_std * noise
        code = network.encode(noisy)
        return (*network.reconstruction_loss(code, batch), code)


class SparseObjective(Objective):
    """MSE plus an L1 penalty on the (ReLU) code."""

    code_activation = "relu"

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> BatchLoss:
        code = network.encode(batch)
        fit, recon = network.reconstruction_loss(code, batch)
        penalty = code.abs().sum(dim=1).mean()
        return fit + weights.sparsity_weight * penalty, recon, code


class ContractiveObjective(Objective):
    """MSE plus the squared Frobenius norm of the encoder Jacobian."""

    graph_safe = False

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> BatchLoss:
        code, jac_sq = encode_with_jacobian(network, batch)
        fit, recon = network.reconstruction_loss(code, batch)
        return fit + weights.contractive_weight * jac_sq.mean(), recon, code


class VariationalObjective(Objective):
    """Negative ELBO over ``n_features``: MSE of a reparameterised sample + KL."""

    variational = True
    graph_safe = False

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> BatchLoss:
        mu, logvar = network.encode_distribution(batch)
        eps = torch.randn(
            mu.shape, generator=generator, device=mu.device, dtype=mu.dtype
        )
        z = mu + eps * torch.exp(0.5 * logvar)
        fit, recon = network.reconstruction_loss(z, batch)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
        # The label is read from the posterior mean: that is the latent column.
        return fit + (weights.beta / batch.shape[1]) * kl, recon, mu


#: Every autoencoder kind, in the order the docs and the config list them.
OBJECTIVES: dict[str, Objective] = {
    "ae": Objective(),
    "denoising": DenoisingObjective(),
    "sparse": SparseObjective(),
    "contractive": ContractiveObjective(),
    "vae": VariationalObjective(),
}


def get_objective(kind: str) -> Objective:
    """The objective of ``kind``; a ValueError naming the known kinds otherwise."""
    try:
        return OBJECTIVES[kind]
    except KeyError:
        raise ValueError(
            f"unknown autoencoder kind {kind!r}; known: {', '.join(OBJECTIVES)}"
        ) from None
