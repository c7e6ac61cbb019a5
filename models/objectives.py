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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training objective and its pure reconstruction-MSE part for one batch
        (see :meth:`AutoencoderNetwork.reconstruction_loss`)."""
        return network.reconstruction_loss(network.encode(batch), batch)


class DenoisingObjective(Objective):
    """Reconstruct the clean row from one corrupted with Gaussian noise."""

    graph_safe = False

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(
            batch.shape, generator=generator, device=batch.device, dtype=batch.dtype
        )
        noisy = batch + weights.noise_std * noise
        return network.reconstruction_loss(network.encode(noisy), batch)


class SparseObjective(Objective):
    """MSE plus an L1 penalty on the (ReLU) code."""

    code_activation = "relu"

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        code = network.encode(batch)
        fit, recon = network.reconstruction_loss(code, batch)
        penalty = code.abs().sum(dim=1).mean()
        return fit + weights.sparsity_weight * penalty, recon


class ContractiveObjective(Objective):
    """MSE plus the squared Frobenius norm of the encoder Jacobian."""

    graph_safe = False

    def __call__(
        self,
        weights: ObjectiveWeights,
        network: AutoencoderNetwork,
        batch: torch.Tensor,
        generator: torch.Generator,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        code, jac_sq = encode_with_jacobian(network, batch)
        fit, recon = network.reconstruction_loss(code, batch)
        return fit + weights.contractive_weight * jac_sq.mean(), recon


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = network.encode_distribution(batch)
        eps = torch.randn(
            mu.shape, generator=generator, device=mu.device, dtype=mu.dtype
        )
        z = mu + eps * torch.exp(0.5 * logvar)
        fit, recon = network.reconstruction_loss(z, batch)
        kl = 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).sum(dim=1).mean()
        return fit + (weights.beta / batch.shape[1]) * kl, recon


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
