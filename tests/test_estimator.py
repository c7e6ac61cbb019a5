"""AutoencoderReducer: scikit-learn contract, determinism, quality and persistence."""

from __future__ import annotations

import itertools
import json
import math
import pickle
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.base import clone
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

from models import AutoencoderReducer


@pytest.fixture(autouse=True, scope="module")
def _single_torch_thread() -> Iterator[None]:
    # These models are tiny, so intra-op threads only add OpenMP barriers, which
    # spin badly when a shared CI runner is busy (10x slowdowns seen).
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def _gaussian(n: int = 300, d: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 3))
    return z @ rng.normal(size=(3, d)) + 0.1 * rng.normal(size=(n, d))


def _small(**kwargs: object) -> AutoencoderReducer:
    params: dict[str, object] = {
        "latent_dim": 2,
        "hidden": (16,),
        "epochs": 5,
        "batch_size": 64,
        "random_state": 0,
    }
    params.update(kwargs)
    return AutoencoderReducer(**params)


# -- scikit-learn contract --------------------------------------------------------
@parametrize_with_checks(
    [AutoencoderReducer(epochs=3, random_state=0)],
)
def test_sklearn_compatible(estimator: AutoencoderReducer, check) -> None:
    check(estimator)


def test_params_clone_and_fitted_attributes() -> None:
    est = _small(kind="denoising", epochs=4)
    params = est.get_params()
    assert params["kind"] == "denoising" and params["hidden"] == (16,)
    assert est.set_params(lr=0.01) is est and est.lr == 0.01
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    assert not hasattr(twin, "network_")

    X = _gaussian()
    assert est.fit(X) is est
    assert est.n_features_in_ == X.shape[1]
    assert not hasattr(est, "feature_names_in_")
    assert est.device_ == "cpu"
    assert set(est.history_) == {"train_loss", "val_loss"}
    assert len(est.history_["train_loss"]) == len(est.history_["val_loss"])
    assert len(est.history_["train_loss"]) == est.n_epochs_ <= 4
    assert 0 <= est.best_epoch_ < est.n_epochs_
    assert est.val_loss_ == est.history_["val_loss"][est.best_epoch_]
    assert est.val_loss_ == min(est.history_["val_loss"])
    assert est.decision_scores_.shape == (X.shape[0],)
    assert set(np.unique(est.labels_)) <= {0, 1}
    assert isinstance(est.network_, torch.nn.Module)
    # The fitted clone is independent of the original.
    assert not hasattr(clone(est), "network_")


def test_transform_shapes_dtypes_and_consistency() -> None:
    X = _gaussian()
    # The identities below are those of the reconstruction score.
    est = _small(latent_dim=3, score_method="reconstruction").fit(X)
    Z64 = est.transform(X)
    Z32 = est.transform(X.astype(np.float32))
    assert Z64.shape == (X.shape[0], 3) and Z64.dtype == np.float64
    assert Z32.dtype == np.float32
    np.testing.assert_array_equal(Z64, Z32.astype(np.float64))
    np.testing.assert_array_equal(est.fit_transform(X), Z64)

    recon = est.inverse_transform(Z64)
    assert recon.shape == X.shape and recon.dtype == np.float64
    scores = est.decision_function(X)
    np.testing.assert_allclose(((recon - X) ** 2).mean(axis=1), scores, rtol=1e-4)
    fe = est.feature_errors(X)
    assert isinstance(fe, np.ndarray) and fe.shape == X.shape
    np.testing.assert_allclose(fe.mean(axis=1), scores, rtol=1e-5)
    assert est.score(X) == pytest.approx(-scores.mean())

    latent, err = est.encode_and_score(X.astype(np.float32))
    assert latent.dtype == np.float32 and err.dtype == np.float32
    np.testing.assert_array_equal(latent, Z32)
    np.testing.assert_array_equal(err.astype(np.float64), scores)
    with pytest.raises(ValueError, match="expects"):
        est.encode_and_score(X[:, :-1].astype(np.float32))
    with pytest.raises(ValueError, match="latent_dim=3"):
        est.inverse_transform(np.zeros((2, 2)))
    names = est.get_feature_names_out()
    assert names.dtype == object
    assert list(names) == ["latent_0", "latent_1", "latent_2"]


def test_epoch_callback_and_early_stopping() -> None:
    seen: list[tuple[int, float, float]] = []
    X = _gaussian(400)
    est = _small(
        epochs=200,
        patience=3,
        lr=0.05,
        epoch_callback=lambda e, tr, va: seen.append((e, tr, va)),
    ).fit(X)
    assert [s[0] for s in seen] == list(range(est.n_epochs_))
    assert [s[1] for s in seen] == est.history_["train_loss"]
    assert [s[2] for s in seen] == est.history_["val_loss"]
    assert est.n_epochs_ < 200, "patience=3 should stop long before 200 epochs"
    assert est.n_epochs_ - 1 - est.best_epoch_ == 3


def test_cosine_schedule_settles_where_a_constant_rate_keeps_moving() -> None:
    # At a high rate a constant schedule keeps circling the minimum; the cosine
    # one takes ever smaller steps, so its last epochs barely change the loss.
    X = _gaussian(1000, d=8)
    moves = {}
    for schedule in ("constant", "cosine"):
        est = _small(epochs=30, patience=None, lr=0.05, lr_schedule=schedule).fit(X)
        assert est.n_epochs_ == 30
        moves[schedule] = np.abs(np.diff(est.history_["val_loss"][-4:])).max()
    assert moves["cosine"] < 0.1 * moves["constant"]
    with pytest.raises(ValueError, match="lr_schedule"):
        _small(lr_schedule="linear").fit(X)


def test_leading_code_axes_are_the_principal_components() -> None:
    X = _gaussian(600, d=8)
    est = _small(latent_dim=4, pca_axes=3, val_fraction=0.0).fit(X)
    z = est.transform(X)
    pcs = PCA(3).fit(X).transform(X)
    for i in range(3):
        # The same direction as PCA's, up to the sign PCA happens to choose.
        assert abs(np.corrcoef(z[:, i], pcs[:, i])[0, 1]) > 0.9999
    np.testing.assert_allclose(z[:, :3].mean(axis=0), 0, atol=1e-4)
    # The learned axis is not a principal component.
    assert abs(np.corrcoef(z[:, 3], PCA(4).fit_transform(X)[:, 3])[0, 1]) < 0.999


def test_more_principal_axes_than_columns_learns_the_rest() -> None:
    X = _gaussian(400, d=3)
    est = _small(latent_dim=5, pca_axes=4).fit(X)
    assert est.network_.pca_axes == 3
    z = est.transform(X)
    assert z.shape == (400, 5) and np.isfinite(z).all()


def test_no_validation_split_monitors_training_loss() -> None:
    X = _gaussian(50)  # 10% would be 5 rows: too few to validate on
    est = _small(epochs=3, patience=None).fit(X)
    assert est.n_epochs_ == 3
    # For kind="ae" the objective is the reconstruction MSE itself.
    assert est.history_["val_loss"] == pytest.approx(est.history_["train_loss"])


def test_dataframe_input_and_pandas_output() -> None:
    X = _gaussian()
    df = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    df.index = df.index + 1000
    est = _small().set_output(transform="pandas")
    out = est.fit_transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == ["latent_0", "latent_1"]
    assert out.index.equals(df.index)
    assert list(est.feature_names_in_) == list(df.columns)
    fe = est.feature_errors(df)
    assert isinstance(fe, pd.DataFrame)
    assert list(fe.columns) == list(df.columns) and fe.index.equals(df.index)


# -- determinism ------------------------------------------------------------------
def test_same_seed_same_weights_different_seed_differs() -> None:
    X = _gaussian()
    a = _small(kind="vae", random_state=3).fit(X)
    b = _small(kind="vae", random_state=3).fit(X)
    c = _small(kind="vae", random_state=4).fit(X)
    sa, sb, sc = (e.network_.state_dict() for e in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.decision_scores_, b.decision_scores_)
    assert a.history_ == b.history_
    assert not np.array_equal(a.transform(X), c.transform(X))


def test_fit_leaves_global_rng_state_alone() -> None:
    torch_state = torch.random.get_rng_state()
    np_state = np.random.get_state()
    _small(kind="denoising").fit(_gaussian())
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], np_state[1])


# -- quality ----------------------------------------------------------------------
def _curved_sheet(n: int, seed: int) -> np.ndarray:
    """A 2-D manifold curved through 10 dimensions, plus small noise."""
    rng = np.random.default_rng(seed)
    u, v = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
    coords = np.column_stack(
        [
            np.cos(np.pi * u),
            np.sin(np.pi * u),
            np.cos(2 * np.pi * u),
            np.sin(2 * np.pi * u),
            v,
            v * np.cos(np.pi * u),
            v**2,
        ]
    )
    embed = np.random.default_rng(123).normal(size=(coords.shape[1], 10))
    return coords @ embed + 0.05 * rng.normal(size=(n, 10))


def test_beats_pca_on_a_nonlinear_manifold() -> None:
    scaler = StandardScaler().fit(_curved_sheet(1000, 0))
    X_train = scaler.transform(_curved_sheet(1000, 0))
    X_test = scaler.transform(_curved_sheet(400, 1))
    pca = PCA(n_components=2).fit(X_train)
    pca_mse = np.mean((pca.inverse_transform(pca.transform(X_test)) - X_test) ** 2)
    est = AutoencoderReducer(
        latent_dim=2, epochs=60, batch_size=64, lr=5e-3, random_state=0
    ).fit(X_train)
    ae_mse = -est.score(X_test)
    # Measured: PCA ~0.40, autoencoder ~0.01; demand at least a 2x improvement.
    assert ae_mse < 0.5 * pca_mse, (ae_mse, pca_mse)
    assert est.val_loss_ < 0.5 * pca_mse


def test_planted_outliers_rank_high() -> None:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1000, 3)) @ rng.normal(size=(3, 8))
    X += 0.1 * rng.normal(size=X.shape)
    outliers = rng.choice(len(X), size=10, replace=False)
    X[outliers] += 3 * rng.normal(size=(10, 8))
    X = StandardScaler().fit_transform(X)
    y = np.zeros(len(X), dtype=int)
    y[outliers] = 1

    est = AutoencoderReducer(
        latent_dim=3,
        hidden=(16,),
        epochs=40,
        batch_size=64,
        lr=5e-3,
        contamination=0.02,
        random_state=0,
    ).fit(X)
    assert roc_auc_score(y, est.decision_scores_) > 0.9
    assert roc_auc_score(y, est.decision_function(X)) > 0.9
    assert est.threshold_ == np.quantile(est.decision_scores_, 1 - 0.02)
    labels = est.predict(X)
    assert set(np.unique(labels)) <= {0, 1}
    np.testing.assert_array_equal(est.labels_, est.decision_scores_ > est.threshold_)
    # Training scores never count a row as its own neighbour; predict on the
    # same rows does (as PyOD's KNN), which moves only rows near the threshold.
    assert (labels == est.labels_).mean() >= 0.99
    assert abs(est.labels_.mean() - 0.02) <= 2 / len(X)


# -- persistence ------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path: Path) -> tuple[AutoencoderReducer, Path, np.ndarray]:
    X = _gaussian()
    df = pd.DataFrame(X, columns=[f"c{i}" for i in range(X.shape[1])])
    est = _small(epoch_callback=lambda *a: None).fit(df)
    path = est.save(tmp_path / "model")
    return est, path, X


def test_save_load_round_trip(
    saved: tuple[AutoencoderReducer, Path, np.ndarray],
) -> None:
    est, path, X = saved
    assert sorted(p.name for p in path.iterdir()) == ["estimator.json", "weights.pt"]
    meta = json.loads((path / "estimator.json").read_text())
    assert "epoch_callback" not in meta["params"]
    assert meta["format_version"] == 2
    assert meta["params"]["score_method"] == "density" and meta["scorer"]

    loaded = AutoencoderReducer.load(path)
    assert loaded.device_ == "cpu" and loaded.epoch_callback is None
    params = {k: v for k, v in est.get_params().items() if k != "epoch_callback"}
    assert {k: loaded.get_params()[k] for k in params} == params | {"device": "cpu"}
    df = pd.DataFrame(X, columns=list(est.feature_names_in_))
    np.testing.assert_array_equal(loaded.transform(df), est.transform(df))
    np.testing.assert_array_equal(
        loaded.decision_function(df), est.decision_function(df)
    )
    np.testing.assert_array_equal(loaded.decision_scores_, est.decision_scores_)
    np.testing.assert_array_equal(loaded.labels_, est.labels_)
    assert list(loaded.feature_names_in_) == list(est.feature_names_in_)
    for attr in ("threshold_", "val_loss_", "n_epochs_", "best_epoch_", "history_"):
        assert getattr(loaded, attr) == getattr(est, attr)
    # Saving again over an existing model replaces it cleanly.
    loaded.save(path)
    assert sorted(p.name for p in path.iterdir()) == ["estimator.json", "weights.pt"]


def test_load_rejects_random_bytes(
    saved: tuple[AutoencoderReducer, Path, np.ndarray],
) -> None:
    _, path, _ = saved
    (path / "weights.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=r"weights\.pt in .*model.* not a valid"):
        AutoencoderReducer.load(path)


class _Payload:
    """Unpickling this would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (self.marker,))


def test_load_never_unpickles_objects(
    saved: tuple[AutoencoderReducer, Path, np.ndarray], tmp_path: Path
) -> None:
    _, path, _ = saved
    marker = tmp_path / "code-ran"
    torch.save({"network.encoder.0.weight": _Payload(marker)}, path / "weights.pt")
    with pytest.raises(ValueError, match=r"weights\.pt in .* not a valid weights file"):
        AutoencoderReducer.load(path)
    assert not marker.exists()
    # Plain pickle too, not only torch.save's zip container.
    (path / "weights.pt").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match=r"weights\.pt"):
        AutoencoderReducer.load(path)
    assert not marker.exists()


def test_load_rejects_non_tensor_values_and_swapped_weights(
    saved: tuple[AutoencoderReducer, Path, np.ndarray], tmp_path: Path
) -> None:
    _, path, X = saved
    original = (path / "weights.pt").read_bytes()
    torch.save({"network.encoder.0.weight": "not a tensor"}, path / "weights.pt")
    with pytest.raises(ValueError, match="dict of named tensors"):
        AutoencoderReducer.load(path)

    # Same architecture, other weights: caught by the checksum in the JSON.
    columns = [f"c{i}" for i in range(X.shape[1])]
    other = _small(random_state=99).fit(pd.DataFrame(X, columns=columns))
    other.save(tmp_path / "other")
    (path / "weights.pt").write_bytes((tmp_path / "other" / "weights.pt").read_bytes())
    with pytest.raises(ValueError, match="checksum"):
        AutoencoderReducer.load(path)
    (path / "weights.pt").write_bytes(original)
    AutoencoderReducer.load(path)


def test_load_rejects_shape_mismatch_and_bad_json(
    saved: tuple[AutoencoderReducer, Path, np.ndarray],
) -> None:
    _, path, _ = saved
    meta_path = path / "estimator.json"
    meta = json.loads(meta_path.read_text())

    meta["architecture"]["hidden"] = [17]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"weights\.pt in .* does not match"):
        AutoencoderReducer.load(path)

    meta_path.write_text("{not json")
    with pytest.raises(ValueError, match=r"estimator\.json in .* not valid JSON"):
        AutoencoderReducer.load(path)

    meta_path.unlink()
    with pytest.raises(ValueError, match=r"estimator\.json in .* missing"):
        AutoencoderReducer.load(path)


def test_errors_are_one_line(
    saved: tuple[AutoencoderReducer, Path, np.ndarray],
) -> None:
    _, path, _ = saved
    (path / "weights.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError) as info:
        AutoencoderReducer.load(path)
    assert "\n" not in str(info.value)


# -- integration ------------------------------------------------------------------
def test_pipeline_with_kmeans() -> None:
    X = _gaussian(400)
    Y = _gaussian(50, seed=1)
    pipe = make_pipeline(
        StandardScaler(),
        _small(latent_dim=2),
        KMeans(n_clusters=4, n_init=3, random_state=0),
    )
    labels = pipe.fit(X).predict(Y)
    assert labels.shape == (50,)
    assert set(np.unique(labels)) <= set(range(4))


def test_sample_needs_vae() -> None:
    est = _small().fit(_gaussian())
    with pytest.raises(ValueError, match="kind='vae'"):
        est.sample(3)


def test_invalid_hyperparameters() -> None:
    X = _gaussian()
    with pytest.raises(ValueError, match="hidden"):
        _small(hidden=(16, 0)).fit(X)
    with pytest.raises(ValueError, match="kind"):
        _small(kind="gan").fit(X)
    with pytest.raises(ValueError, match="device"):
        _small(device="tpu").fit(X)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cuda_requested_without_cuda() -> None:
    with pytest.raises(ValueError, match="CUDA is not available"):
        _small(device="cuda").fit(_gaussian())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_fit_save_load_on_cpu(tmp_path: Path) -> None:
    X = _gaussian()
    est = _small(device="cuda", kind="vae").fit(X)
    assert est.device_.startswith("cuda")
    assert next(est.network_.parameters()).is_cuda
    est.save(tmp_path / "m")
    loaded = AutoencoderReducer.load(tmp_path / "m", device="cpu")
    assert loaded.device_ == "cpu"
    np.testing.assert_allclose(loaded.transform(X), est.transform(X), atol=1e-5)
    # The density score's nearest-neighbour and histogram terms carry the
    # devices' float rounding (about 1e-4 of the code) a little further.
    np.testing.assert_allclose(
        loaded.decision_function(X), est.decision_function(X), rtol=5e-3, atol=1e-5
    )
    _, err = est.encode_and_score(X.astype(np.float32))
    np.testing.assert_array_equal(err.astype(np.float64), est.decision_function(X))


def test_density_score_splits_into_contributions_and_excludes_self() -> None:
    X = _gaussian()
    est = _small().fit(X)
    scores = est.decision_function(X)
    parts = est.score_contributions(X)
    assert parts.shape == X.shape and (parts >= 0).all()
    np.testing.assert_allclose(parts.mean(axis=1), scores, rtol=1e-5, atol=1e-6)
    # A training row drawn into a reference subset scores 0 there when it meets
    # itself, so the leave-one-out training scores are never lower.
    assert (est.decision_scores_ >= scores - 1e-5).all()
    assert (est.decision_scores_ > scores + 1e-3).any()
    # score() stays minus the reconstruction MSE, whatever the anomaly score.
    recon = est.inverse_transform(est.transform(X))
    assert est.score(X) == pytest.approx(-((recon - X) ** 2).mean(), rel=1e-4)


@pytest.mark.parametrize("score_method", ["density", "reconstruction"])
def test_contributions_and_reconstruction_in_one_pass_equal_two_passes(
    score_method: str,
) -> None:
    """What an explanation asks for in one pass is, bit for bit, what
    ``score_contributions`` and ``inverse_transform(transform(X))`` give, on
    more rows than one inference block and with a one-hot group activated."""
    from models.estimator import INFERENCE_BATCH

    rng = np.random.default_rng(3)
    n = INFERENCE_BATCH + 77
    X = np.hstack([_gaussian(n=n, d=5), np.eye(3)[rng.integers(0, 3, n)]])
    est = _small(score_method=score_method, one_hot_groups=[[5, 6, 7]]).fit(X)
    for rows in (X, X.astype(np.float32)):
        parts, recon = est.score_contributions_and_reconstruction(rows)
        assert parts.dtype == recon.dtype == np.float32
        np.testing.assert_array_equal(parts, est.score_contributions(rows))
        np.testing.assert_array_equal(
            recon, est.inverse_transform(est.transform(rows)).astype(np.float32)
        )


@pytest.mark.parametrize("threads", [1, 2])
def test_a_rows_results_do_not_depend_on_the_rows_scored_with_it(threads) -> None:
    """Scored alone, in small groups or in one large call, each row gets the
    same code, score, contributions and reconstruction, bit for bit: BLAS
    rounds a block of a few rows differently from a large one on some hosts
    (models/row_blocks.py), and Dask units and batch sizes cut rows anywhere."""
    from models.estimator import INFERENCE_BATCH

    rng = np.random.default_rng(5)
    n = INFERENCE_BATCH + 3
    X = np.hstack([_gaussian(n=n, d=5), np.eye(3)[rng.integers(0, 3, n)]])
    X = X.astype(np.float32)
    est = _small(one_hot_groups=[[5, 6, 7]]).fit(X[:2000])
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        code, score = est.encode_and_score(X)
        parts, recon = est.score_contributions_and_reconstruction(X)
        cuts = [0, 1, 3, 6, 11, 23, 300, n - 2, n]
        for a, b in itertools.pairwise(cuts):
            rows = X[a:b]
            got_code, got_score = est.encode_and_score(rows)
            got_parts, got_recon = est.score_contributions_and_reconstruction(rows)
            np.testing.assert_array_equal(got_code, code[a:b], err_msg=f"{a}:{b}")
            np.testing.assert_array_equal(got_score, score[a:b], err_msg=f"{a}:{b}")
            np.testing.assert_array_equal(got_parts, parts[a:b], err_msg=f"{a}:{b}")
            np.testing.assert_array_equal(got_recon, recon[a:b], err_msg=f"{a}:{b}")
            np.testing.assert_array_equal(
                est.inverse_transform(got_code), recon[a:b], err_msg=f"{a}:{b}"
            )
    finally:
        torch.set_num_threads(before)


def test_neighbour_term_is_the_mean_nearest_distance_across_blocks() -> None:
    """The neighbour term, computed in cache-sized blocks, equals its definition
    (mean over subsets of the distance to the nearest member) on every row, and
    a training row's own slot is masked wherever it was drawn."""
    from models.density import NEIGHBOUR_BLOCK, DensityScore

    gen = torch.Generator().manual_seed(0)
    scorer = DensityScore(n_features=4, latent_dim=2, n_sets=3, set_rows=5)
    refs = torch.randn(3, 5, 3, generator=gen)
    scorer.references.copy_(refs)
    n = 2 * NEIGHBOUR_BLOCK + 37  # three blocks, the last one partial
    emb = torch.randn(n, 3, generator=gen)
    dist = torch.cdist(emb.double(), refs.reshape(-1, 3).double()).view(n, 3, 5)
    expected = dist.amin(dim=2).mean(dim=1)
    with torch.inference_mode():
        got = scorer._neighbour(emb)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    # Rows 0..14 of a training chunk starting at row 0 are the members.
    members = np.arange(15).reshape(3, 5)
    scorer.references.copy_(emb[:15].reshape(3, 5, 3))
    dist = torch.cdist(emb.double(), emb[:15].double())
    dist[torch.arange(15), torch.arange(15)] = math.inf
    expected = dist.view(n, 3, 5).amin(dim=2).mean(dim=1)
    with torch.inference_mode():
        got = scorer._neighbour(emb, members=members, first_row=0)
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_density_score_finds_a_cluster_of_anomalies_the_reconstruction_misses() -> None:
    # Anomalies that sit on the data's own plane (so they reconstruct well) but
    # in an empty region of it, clustered so they vouch for each other.
    rng = np.random.default_rng(3)
    plane = rng.normal(size=(2, 8))
    inliers = rng.normal(size=(1500, 2)) @ plane
    cluster = (np.array([6.0, -6.0]) + 0.05 * rng.normal(size=(40, 2))) @ plane
    X = np.vstack([inliers, cluster]) + 0.05 * rng.normal(size=(1540, 8))
    y = np.r_[np.zeros(1500), np.ones(40)]
    common = {"latent_dim": 2, "hidden": (16,), "epochs": 30, "random_state": 0}
    density = AutoencoderReducer(**common).fit(X)
    recon = AutoencoderReducer(**common, score_method="reconstruction").fit(X)
    auc_density = roc_auc_score(y, density.decision_scores_)
    auc_recon = roc_auc_score(y, recon.decision_scores_)
    assert auc_density > 0.95 and auc_density > auc_recon + 0.1


def test_format_1_files_load_as_the_reconstruction_score(tmp_path: Path) -> None:
    X = _gaussian()
    est = _small(score_method="reconstruction").fit(X)
    path = est.save(tmp_path / "model")
    meta = json.loads((path / "estimator.json").read_text())
    # What version 1 wrote: no score_method, no scorer entry.
    del meta["params"]["score_method"], meta["scorer"]
    meta["format_version"] = 1
    (path / "estimator.json").write_text(json.dumps(meta))
    loaded = AutoencoderReducer.load(path)
    assert loaded.score_method == "reconstruction" and loaded.scorer_ is None
    np.testing.assert_array_equal(loaded.decision_function(X), est.decision_function(X))


def test_density_contributions_name_the_column_with_the_extreme_value() -> None:
    rng = np.random.default_rng(5)
    X = rng.normal(size=(2000, 6))
    X[:, 5] = rng.integers(0, 4, size=2000)  # a discrete column the code may skip
    est = _small(latent_dim=2).fit(X)
    row = X[:1].copy()
    row[0, 5] = 40.0
    assert est.decision_function(row)[0] > est.threshold_
    assert est.score_contributions(row)[0].argmax() == 5


def _hidden_label(n: int = 1500, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows whose label lives in a low-variance column: a code of 2 that
    follows the variance (PCA's, an unguided autoencoder's) misses it."""
    rng = np.random.default_rng(seed)
    loud = rng.normal(size=(n, 2)) @ rng.normal(size=(2, 6)) * 3.0
    quiet = rng.normal(size=(n, 1))
    X = np.hstack([loud, quiet, rng.normal(size=(n, 1))])
    # Standardised, as the pipeline's rows are: the label's column has as much
    # variance as any other, but six columns share the two loud directions.
    return StandardScaler().fit_transform(X), (quiet[:, 0] > 0).astype(float)


def _probe(z: np.ndarray, y: np.ndarray) -> float:
    from tasks.train import probe_auc

    half = len(y) // 2
    return probe_auc(z[:half], y[:half], z[half:], y[half:])


def test_label_weight_makes_the_code_keep_what_predicts_the_label() -> None:
    X, y = _hidden_label()
    settings = {"latent_dim": 2, "epochs": 40, "lr": 1e-2, "patience": None}
    plain = _small(**settings).fit(X, y)  # label_weight 0: y is ignored
    guided = _small(**settings, label_weight=0.5).fit(X, y)
    assert _probe(plain.transform(X), y) < 0.75
    assert _probe(guided.transform(X), y) > 0.9
    # Rows with an unknown label take no part: the same label, half unknown,
    # still guides the code.
    half_known = np.where(np.arange(len(y)) % 2 == 0, y, np.nan)
    partly = _small(**settings, label_weight=0.5).fit(X, half_known)
    assert _probe(partly.transform(X), y) > 0.9


def test_a_numeric_label_guides_the_code_too() -> None:
    X, _ = _hidden_label()
    target = X[:, 6] * 40.0 + 7.0  # any scale: the head reads it standardised
    settings = {"latent_dim": 2, "epochs": 40, "lr": 1e-2, "patience": None}
    guided = _small(**settings, label_weight=0.5).fit(X, target)
    z = guided.transform(X)
    fit = np.linalg.lstsq(np.c_[z, np.ones(len(z))], target, rcond=None)
    r2 = 1 - fit[1][0] / ((target - target.mean()) ** 2).sum()
    assert r2 > 0.8


def test_without_label_weight_y_changes_nothing() -> None:
    X, y = _hidden_label(400)
    a = _small().fit(X)
    b = _small().fit(X, y)
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    # Guided fits are reproducible too.
    c = _small(label_weight=0.3).fit(X, y)
    d = _small(label_weight=0.3).fit(X, y)
    np.testing.assert_array_equal(c.transform(X), d.transform(X))
    assert not np.array_equal(a.transform(X), c.transform(X))


@pytest.mark.parametrize(
    ("y", "match"),
    [
        (np.full(400, np.nan), "fewer than two distinct known values"),
        (np.ones(400), "fewer than two distinct known values"),
        (np.zeros(399), r"y must have shape \(400,\)"),
        (np.array(["a", "b"] * 200), "y must be numeric"),
    ],
)
def test_a_label_that_cannot_guide_is_a_one_line_error(
    y: np.ndarray, match: str
) -> None:
    X, _ = _hidden_label(400)
    with pytest.raises(ValueError, match=match) as exc:
        _small(label_weight=0.1).fit(X, y)
    assert "\n" not in str(exc.value)
