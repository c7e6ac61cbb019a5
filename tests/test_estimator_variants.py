"""Each autoencoder variant shows its defining property on small seeded data."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from sklearn.preprocessing import StandardScaler

from models import AutoencoderReducer
from models.networks import ACTIVATIONS, AutoencoderNetwork, encode_with_jacobian


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    # Tiny models: intra-op threads only add OpenMP barriers that stall on a
    # busy shared runner.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _curve_data(n: int, seed: int, d: int = 12) -> np.ndarray:
    """Rows near a curved 2-D surface in ``d`` dimensions (fixed embedding)."""
    rng = np.random.default_rng(seed)
    embed = np.random.default_rng(99).normal(size=(2, d))
    return np.tanh(rng.normal(size=(n, 2)) @ embed / 2) + 0.05 * rng.normal(size=(n, d))


@pytest.fixture(scope="module")
def curve() -> tuple[np.ndarray, np.ndarray]:
    scaler = StandardScaler().fit(_curve_data(1000, 0))
    return scaler.transform(_curve_data(1000, 0)), scaler.transform(_curve_data(400, 1))


def _fit(X: np.ndarray, **kwargs: object) -> AutoencoderReducer:
    params: dict[str, object] = {
        "latent_dim": 8,
        "hidden": (64,),
        "epochs": 60,
        "batch_size": 64,
        "lr": 3e-3,
        "random_state": 0,
    }
    params.update(kwargs)
    return AutoencoderReducer(**params).fit(X)


# -- denoising --------------------------------------------------------------------
def test_denoising_removes_noise_a_plain_autoencoder_passes_through(
    curve: tuple[np.ndarray, np.ndarray],
) -> None:
    X, X_test = curve
    noisy = X_test + 0.5 * np.random.default_rng(5).normal(size=X_test.shape)
    # An overcomplete code (latent_dim = n_features) lets a plain autoencoder
    # learn something close to the identity; only the denoising objective forces
    # it to project back onto the data surface.
    errors = {}
    for kind in ("ae", "denoising"):
        est = _fit(X, kind=kind, latent_dim=12, noise_std=0.5)
        cleaned = est.inverse_transform(est.transform(noisy))
        errors[kind] = np.mean((cleaned - X_test) ** 2)
        if kind == "denoising":
            # Noise is a training-time corruption only: inference is deterministic.
            np.testing.assert_array_equal(est.transform(X_test), est.transform(X_test))
            _, err = est.encode_and_score(X_test.astype(np.float32))
            np.testing.assert_array_equal(err, est.encode_and_score(X_test)[1])
    # Measured ~0.06 vs ~0.10 (noisy input itself: 0.25).
    assert errors["denoising"] < 0.8 * errors["ae"], errors


# -- sparse -----------------------------------------------------------------------
def test_sparse_codes_have_more_exact_zeros(
    curve: tuple[np.ndarray, np.ndarray],
) -> None:
    X, X_test = curve
    plain = _fit(X, kind="ae").transform(X_test)
    relu_only = _fit(X, kind="sparse", sparsity_weight=0.0).transform(X_test)
    sparse = _fit(X, kind="sparse", sparsity_weight=1e-2).transform(X_test)

    def zero_share(Z: np.ndarray) -> float:
        return float(np.mean(np.abs(Z) < 1e-6))

    assert zero_share(plain) < 0.01
    # The L1 penalty, not just the ReLU on the code, drives units to zero
    # (measured shares: plain 0.0, ReLU only ~0.3, L1 ~0.6).
    assert zero_share(sparse) > zero_share(relu_only) + 0.15
    assert zero_share(sparse) > 0.4
    l1_sparse = np.abs(sparse).sum(axis=1).mean()
    assert l1_sparse < 0.5 * np.abs(relu_only).sum(axis=1).mean()


# -- contractive ------------------------------------------------------------------
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_encoder_jacobian_matches_autograd(activation: str) -> None:
    torch.manual_seed(0)
    net = AutoencoderNetwork(7, 3, (16, 8), activation).double()
    x = torch.randn(5, 7, dtype=torch.float64)
    code, sq_norm = encode_with_jacobian(net, x)
    reference = torch.stack(
        [
            torch.autograd.functional.jacobian(
                lambda row: net.encode(row.unsqueeze(0)).squeeze(0), x[i]
            )
            .square()
            .sum()
            for i in range(x.shape[0])
        ]
    )
    torch.testing.assert_close(sq_norm, reference)
    torch.testing.assert_close(code, net.encode(x))


def _mean_jacobian_norm(est: AutoencoderReducer, X: np.ndarray) -> float:
    x = torch.as_tensor(X, dtype=torch.float32)
    with torch.no_grad():
        _, sq_norm = encode_with_jacobian(est.network_, x)
    return float(sq_norm.sqrt().mean())


def test_contractive_shrinks_the_encoder_jacobian(
    curve: tuple[np.ndarray, np.ndarray],
) -> None:
    X, X_test = curve
    plain = _fit(X, kind="ae")
    contractive = _fit(X, kind="contractive", contractive_weight=1e-2)
    # Measured ~2.0 vs ~0.45, at a small reconstruction cost.
    assert _mean_jacobian_norm(contractive, X_test) < 0.5 * _mean_jacobian_norm(
        plain, X_test
    )
    assert -contractive.score(X_test) < 0.1


# -- VAE --------------------------------------------------------------------------
def _vae_data(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    embed = np.random.default_rng(7).normal(size=(2, 6))
    return np.tanh(rng.normal(size=(n, 2)) @ embed) + 0.1 * rng.normal(size=(n, 6))


@pytest.fixture(scope="module")
def vae_fits() -> tuple[np.ndarray, AutoencoderReducer, AutoencoderReducer]:
    X = StandardScaler().fit_transform(_vae_data(1000, 0))
    common = {"kind": "vae", "latent_dim": 2, "hidden": (64, 32), "epochs": 60}
    vae = _fit(X, beta=1.0, **common)
    no_kl = _fit(X, beta=1e-3, **common)
    return X, vae, no_kl


def _posterior(est: AutoencoderReducer, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        mu, logvar = est.network_.encode_distribution(
            torch.as_tensor(X, dtype=torch.float32)
        )
    return mu.double().numpy(), logvar.exp().double().numpy()


def _aggregate_kl(est: AutoencoderReducer, X: np.ndarray) -> float:
    """KL(N(m, S) || N(0, I)) for the moment-matched aggregate posterior."""
    mu, var = _posterior(est, X)
    m = mu.mean(axis=0)
    S = np.cov(mu, rowvar=False) + np.diag(var.mean(axis=0))
    return 0.5 * float(np.trace(S) + m @ m - len(m) - np.linalg.slogdet(S)[1])


def test_vae_kl_acts_and_pulls_the_aggregate_posterior_to_the_prior(
    vae_fits: tuple[np.ndarray, AutoencoderReducer, AutoencoderReducer],
) -> None:
    X, vae, no_kl = vae_fits
    mu, var = _posterior(vae, X)
    kl_per_row = 0.5 * (mu**2 + var - 1.0 - np.log(var)).sum(axis=1).mean()
    assert kl_per_row > 0.5  # the code carries information (measured ~1.7 nats)
    # Measured ~0.01 (beta=1) vs 1.3-2.1 (beta=1e-3) over three seeds.
    assert _aggregate_kl(vae, X) < 0.1
    assert _aggregate_kl(vae, X) < 0.25 * _aggregate_kl(no_kl, X)
    # Inference uses the posterior mean, so it is deterministic.
    np.testing.assert_array_equal(vae.transform(X), mu.astype(np.float64))


def test_vae_samples_match_training_marginals(
    vae_fits: tuple[np.ndarray, AutoencoderReducer, AutoencoderReducer],
) -> None:
    X, vae, _ = vae_fits
    samples = vae.sample(5000, random_state=0)
    assert samples.shape == (5000, X.shape[1])
    np.testing.assert_array_equal(samples, vae.sample(5000, random_state=0))
    # Data are standardized; the standard error of a 5000-draw mean is ~0.015,
    # the rest of the slack covers the VAE's aggregate-posterior mismatch.
    np.testing.assert_array_less(np.abs(samples.mean(axis=0) - X.mean(axis=0)), 0.15)
    # sample() returns decoder means, so by the law of total variance
    # Var(x) = Var(E[x|z]) + E[Var(x|z)] their variance falls short of the data's
    # by about the residual variance, estimated by the training feature errors.
    # Measured (var + residual) / var in 0.8-1.0; allow 0.65-1.15.
    residual = np.asarray(vae.feature_errors(X)).mean(axis=0)
    ratio = (samples.var(axis=0) + residual) / X.var(axis=0)
    assert np.all((ratio > 0.65) & (ratio < 1.15)), ratio
    assert np.all(samples.var(axis=0) < 1.1 * X.var(axis=0))


def _numbers_and_a_category(n: int, seed: int) -> np.ndarray:
    """Six numeric columns on a 2-D plane, then a 12-way one-hot independent of
    them: its columns carry little variance each, as a wind direction does."""
    rng = np.random.default_rng(seed)
    mix = np.random.default_rng(5).normal(size=(2, 6))
    numbers = rng.normal(size=(n, 2)) @ mix + 0.1 * rng.normal(size=(n, 6))
    category = np.eye(12)[rng.integers(0, 12, n)]
    return np.hstack([numbers, category]).astype(np.float32)


def test_one_hot_groups_reconstruct_the_category_squared_error_leaves_out() -> None:
    X, held = _numbers_and_a_category(1500, 0), _numbers_and_a_category(500, 1)
    group = list(range(6, 18))
    errors = {}
    for groups in (None, [group]):
        est = _fit(
            X,
            latent_dim=3,
            hidden=(32,),
            epochs=30,
            batch_size=128,
            lr=5e-3,
            one_hot_groups=groups,
        )
        recon = est.inverse_transform(est.transform(held))
        errors[groups is not None] = (recon - held) ** 2
        if groups:
            # A group's reconstruction is a distribution over its categories.
            assert recon[:, group].min() >= 0
            np.testing.assert_allclose(recon[:, group].sum(axis=1), 1.0, rtol=1e-5)
            # ... and the reported loss is the plain MSE in X's space.
            assert -est.score(held) == pytest.approx(errors[True].mean(), rel=1e-4)
    category = {k: e[:, 6:].sum(axis=1).mean() for k, e in errors.items()}
    assert category[True] < 0.75 * category[False]
    assert errors[True].mean() < 0.8 * errors[False].mean()


@pytest.mark.parametrize(
    "groups",
    [[[2, 3, 4]], [[3, 4, 2]]],
    ids=["consecutive columns", "scattered columns"],
)
def test_reconstruction_loss_is_squared_error_plus_cross_entropy(groups) -> None:
    net = AutoencoderNetwork(5, 2, (4,), one_hot_groups=groups)
    x = torch.tensor([[0.5, -1.0, 0.0, 1.0, 0.0], [2.0, 0.0, 1.0, 0.0, 0.0]])
    with torch.no_grad():
        z = net.encode(x)
        fit, mse = net.reconstruction_loss(z, x)
        raw = net.decoder(z)
    expected = (raw[:, :2] - x[:, :2]).square().sum(dim=1) - (
        torch.log_softmax(raw[:, 2:], dim=1) * x[:, 2:]
    ).sum(dim=1)
    assert float(fit) == pytest.approx(float(expected.mean() / 5), rel=1e-6)
    with torch.no_grad():
        plain_mse = float((net(x) - x).square().mean())
    assert float(mse) == pytest.approx(plain_mse, rel=1e-6)
    with torch.inference_mode():
        assert torch.allclose(net.infer_decode(net.infer_encode(x)), net(x))


def test_split_loss_equals_gathered_loss_with_its_gradients() -> None:
    """Training cuts consecutive groups out of the output with one split; the
    loss, the reported MSE and every gradient are those of the gather path
    that scattered groups take."""
    torch.manual_seed(0)
    # Plain runs before, between and after the groups.
    net = AutoencoderNetwork(10, 3, (16,), one_hot_groups=[[6, 7, 8], [2, 3]])
    x = torch.randn(64, 10)
    x[:, 2:4] = torch.nn.functional.one_hot(torch.randint(2, (64,)), 2).float()
    x[:, 6:9] = torch.nn.functional.one_hot(torch.randint(3, (64,)), 3).float()
    results = []
    for gathered in (False, True):
        net.zero_grad()
        z = net.encode(x)
        if gathered:
            fit, mse = net._gathered_loss(net.decoder(z), x)
        else:
            fit, mse = net.reconstruction_loss(z, x)
        fit.backward()
        grads = [p.grad.clone() for p in net.parameters()]
        results.append((fit.detach(), mse.detach(), grads))
    (fit_a, mse_a, grads_a), (fit_b, mse_b, grads_b) = results
    assert torch.allclose(fit_a, fit_b, rtol=1e-6)
    assert torch.allclose(mse_a, mse_b, rtol=1e-6)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "groups",
    [[[2, 3, 4], [5, 6]], [[4, 2, 6], [3, 5]]],
    ids=["consecutive columns", "scattered columns"],
)
def test_inference_softmax_of_groups_equals_training_decode(groups) -> None:
    """Scoring activates a group on a slice of the output when its columns are
    consecutive and by gather/scatter otherwise: both give decode's values,
    bit for bit, and every group sums to 1."""
    torch.manual_seed(0)
    net = AutoencoderNetwork(8, 3, (16,), one_hot_groups=groups).eval()
    z = torch.randn(257, 3) * 4
    with torch.inference_mode():
        inferred = net.infer_decode(z.clone())
        trained = net.decode(z)
    assert torch.equal(inferred, trained)
    for group in groups:
        sums = inferred[:, group].sum(dim=1)
        assert torch.allclose(sums, torch.ones_like(sums), atol=1e-6)
    plain = [i for i in range(8) if all(i not in g for g in groups)]
    with torch.inference_mode():
        raw = net.decoder(z)
    assert torch.equal(inferred[:, plain], raw[:, plain])


@pytest.mark.parametrize(
    ("groups", "words"),
    [
        ([[0]], "2 or more columns"),
        ([[0, 9]], "column 9 is outside 0..5"),
        ([[0, 1], [1, 2]], "more than one group"),
    ],
)
def test_bad_one_hot_groups_fail_in_one_line(groups: list, words: str) -> None:
    X = np.random.default_rng(0).normal(size=(50, 6))
    with pytest.raises(ValueError, match=words) as info:
        AutoencoderReducer(epochs=1, one_hot_groups=groups).fit(X)
    assert "\n" not in str(info.value)
