"""Fit the preprocessor and the model family; measure them against PCA.

Memory is bounded by the sample (``max_train_rows``), not the partition: one
streaming pass over the ingested partition both draws the seeded sample and
accumulates the preprocessor's statistics over every row.

Every training run is compared, on the same held-out rows, with PCA at the same
latent size, and (when a label is configured) a logistic-regression probe on
the latent features is compared with one on PCA's.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
from prefect import task

from models.alignment import REFERENCE_ROWS, Alignment, fit_procrustes, new_space_id
from models.bundle import BundleInfo, LatentModel
from models.families import DEFAULT_FAMILY, UnknownFamilyError, get_family
from models.family import ModelFamily, Scores, reconstruction_mse, score_rows
from models.percentile import score_quantiles
from models.preprocessing import PreprocessorStats, Reopen, TabularPreprocessor
from models.schema import TableSchema
from tasks import progress as terminal_progress
from tasks.drift import build_reference
from tasks.errors import ConfigError, InputError
from tasks.faults import checkpoint
from tasks.policy import PLAIN
from tasks.sampling import iter_partition, read_training_rows


@dataclass
class TrainResult:
    """Small, JSON-able facts about a training run; the model itself is on disk."""

    bundle_dir: str
    metrics: dict[str, float]
    history: dict[str, list[float]]
    params: dict[str, Any]
    n_rows_total: int
    n_train: int
    n_holdout: int
    sample: pd.DataFrame = field(repr=False)
    plots: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _replay(table: pa.Table, _columns: Sequence[str]) -> list[pa.Table]:
    """The rows again, from memory (``reopen`` for a sample that is everything)."""
    return [table]


def _binary_label(values: pd.Series) -> tuple[np.ndarray, np.ndarray] | None:
    """(mask of usable rows, 0/1 targets) for a two-valued label, else None."""
    present = values.notna().to_numpy()
    classes = sorted(values[present].astype(str).unique())
    if len(classes) != 2:
        return None
    positive = "Yes" if "Yes" in classes else classes[1]
    return present, (values.astype(str) == positive).to_numpy().astype(int)


def label_guide(values: pd.Series, label: str) -> tuple[np.ndarray | None, str]:
    """The label as the code's guide (``fit``'s ``y``), or None and why not.

    A two-valued label becomes 0/1, a numeric one stays as it is; NaN where the
    label is unknown. A label of three or more text values does not guide the
    code (the guide is one linear read-out).
    """
    two = _binary_label(values)
    if two is not None:
        present, targets = two
        return np.where(present, targets, np.nan), ""
    dtype = values.dtype
    if pd.api.types.is_numeric_dtype(dtype) and not pd.api.types.is_bool_dtype(dtype):
        numbers = values.to_numpy(dtype=np.float64, na_value=np.nan)
        known = numbers[np.isfinite(numbers)]
        if known.size >= 2 and np.ptp(known) > 0:
            return numbers, ""
    elif (classes := values.dropna().astype(str).nunique()) > 2:
        return None, f"label {label!r} has {classes} classes"
    return None, f"label {label!r} has fewer than two distinct known values"


def probe_auc(
    z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray
) -> float:
    """ROC-AUC of a logistic-regression probe fitted on one split, tested on another."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(z_train)
    clf = LogisticRegression(max_iter=500).fit(scaler.transform(z_train), y_train)
    return float(roc_auc_score(y_test, clf.decision_function(scaler.transform(z_test))))


def train_model(
    ingested_dir: Path,
    schema: TableSchema | dict[str, Any],
    bundle_dir: Path,
    *,
    dataset: str,
    estimator_params: dict[str, Any],
    label: str | None = None,
    max_train_rows: int = 2_000_000,
    holdout_fraction: float = 0.2,
    n_clusters: int | None = None,
    champion_dir: Path | None = None,
    plots_dir: Path | None = None,
    epoch_callback: Callable[[int, float, float], None] | None = None,
    align_to: Path | None = None,
) -> TrainResult:
    """Fit a :class:`LatentModel` on the ingested partition and save it.

    What each part is fitted on:

    * the preprocessor's statistics (medians, means, scales, missing flags,
      category counts): ALL rows of the partition, accumulated in the same
      streaming pass that draws the sample (exact medians take a few more
      passes over the numeric columns only); memory per column, not per row;
    * the model (the family ``estimator_params["kind"]``), the threshold, the
      drift reference and the PCA baseline: a seeded uniform sample of about
      ``max_train_rows`` rows (all
      rows when there are fewer), split (seeded) into train and holdout; the
      reported val MSE and the PCA baseline are measured on the holdout in the
      same preprocessed space.

    With ``align_to`` (the previous champion's bundle) the codes are rotated
    onto the champion's axes (:mod:`models.alignment`) and keep its latent
    space id; without it, or when the two cannot be aligned, the model opens
    a new latent space.

    Same seed and partition, same sample, statistics and model.
    """
    schema = TableSchema.coerce(schema)
    numeric = schema.numeric_features
    categorical = schema.categorical_features
    if not numeric and not categorical:
        raise InputError(f"{ingested_dir}: no feature columns to train on")
    seed = int(estimator_params.get("random_state") or 0)
    kind = str(estimator_params.get("kind", DEFAULT_FAMILY))
    try:
        family = get_family(kind)
    except UnknownFamilyError as exc:
        raise ConfigError(str(exc)) from None
    est = family.build({**estimator_params, "kind": kind}, epoch_callback)
    # A family that scores rows in their series (kind sequence) also reads
    # each row's entity and time.
    context_columns = bind_context(est, schema)
    wanted = [*numeric, *categorical] + ([label] if label else [])
    wanted += [c for c in context_columns or () if c not in wanted]
    stats = PreprocessorStats(numeric, categorical)
    table, total = read_training_rows(
        ingested_dir, wanted, max_train_rows, seed, on_batch=stats.update
    )
    n = table.num_rows
    if n < 20:
        # The rows come from the training window's ingested partitions, not
        # from one file the user can point at: name the dataset.
        raise InputError(
            f"dataset {dataset!r}: {n} rows to train on, too few to train a model"
            " (need at least 20)"
        )
    order = np.random.default_rng([seed, 2]).permutation(n)
    n_hold = max(1, round(n * holdout_fraction))
    hold_idx, train_idx = np.sort(order[:n_hold]), np.sort(order[n_hold:])
    if n_clusters is not None and n_clusters > len(train_idx):
        # KMeans runs on the training rows' codes: checked before any training.
        raise ConfigError(
            f"n_clusters {n_clusters} is more than the {len(train_idx)} training"
            f" rows ({n} rows, {n_hold} held out); lower n_clusters or give"
            " more rows"
        )
    train_t, hold_t = table.take(train_idx), table.take(hold_idx)

    # Statistics over all rows, so they do not depend on which rows the sample
    # drew. The holdout rows are among them: they inform the imputation and
    # scaling (each column's location and scale, which categories exist), never
    # the network. A negligible leak into the holdout MSE, accepted on purpose.
    reopen: Reopen = (
        functools.partial(_replay, table)  # the sample is the partition
        if n == total
        else functools.partial(iter_partition, ingested_dir)
    )
    pre = TabularPreprocessor(numeric, categorical).fit_stats(stats, reopen)
    x_train, x_hold = pre.transform(train_t), pre.transform(hold_t)
    if "one_hot_groups" in family.settings:
        # Derived from the preprocessed layout, known only now (see
        # models.families.DERIVED_SETTINGS).
        est.set_params(one_hot_groups=pre.one_hot_groups())  # type: ignore[attr-defined]
    warnings: list[str] = []
    label_missing = bool(label) and table.column(label).null_count == n
    guide = None
    guided = context_columns is None and getattr(est, "label_weight", 0) > 0
    if label and not label_missing and guided:
        guide, why_not = label_guide(train_t.column(label).to_pandas(), label)
        if guide is None:
            # The config chose the guided code's defaults (no principal axes).
            warnings.append(
                f"{why_not}, so it does not guide the code (only a two-valued or"
                " numeric label can; label_weight 0 gives the unguided defaults,"
                " with principal axes)"
            )
    t0 = time.perf_counter()
    if context_columns is None:
        if guide is None:
            est.fit(x_train)
        else:
            est.fit(x_train, guide)
        fit_seconds = time.perf_counter() - t0
        fitted, held = score_rows(est, x_train), score_rows(est, x_hold)
    else:
        fitted, held = fit_in_context(est, pre, table, context_columns, train_idx)
        fit_seconds = time.perf_counter() - t0
    plots: list[str] = []
    if plots_dir is not None:
        plots = _plots(plots_dir, est, pre, hold_t, x_hold, held, label, seed)
    # Reconstruction errors, not anomaly scores: these are the figures compared
    # with PCA's and, on the holdout, with the champion's (the promotion gate).
    metrics: dict[str, float] = {
        "val_mse": reconstruction_mse(est, x_hold),
        "train_mse": reconstruction_mse(est, x_train),
        "threshold": float(est.threshold_),
        "fit_seconds": fit_seconds,
        "epochs_run": float(len(est.history_.get("train_loss", []))),
        "n_features_in": float(x_train.shape[1]),
    }
    metrics.update(_pca_baseline(x_train, x_hold, est.latent_dim, seed))
    if champion_dir is not None:
        # On the challenger's device: the gate compares both on the same rows.
        champion = LatentModel.load(champion_dir, device=getattr(est, "device", "cpu"))
        champion_mse = mse_in_space(champion, hold_t, pre, x_hold)
        if champion_mse is not None:
            metrics["champion_holdout_mse"] = champion_mse
    metrics["val_mse_vs_pca"] = metrics["val_mse"] / max(metrics["pca_val_mse"], 1e-12)
    if label_missing:
        # Nothing to probe with (and nothing guided the code): the run goes on.
        warnings.append(
            f"label {label!r} is entirely missing: no probe_auc for this model"
        )
    elif label:
        metrics.update(
            _probe_metrics(
                train_t,
                hold_t,
                label,
                fitted.latent,
                held.latent,
                x_train,
                x_hold,
                seed,
            )
        )

    centers = None
    if n_clusters:
        from sklearn.cluster import KMeans

        km = KMeans(n_clusters=n_clusters, n_init=4, random_state=seed)
        km.fit(fitted.latent)
        centers = km.cluster_centers_.astype(float).tolist()

    reference = train_t.slice(0, REFERENCE_ROWS)
    alignment, space_id = _align(
        align_to, reference, fitted.latent[:REFERENCE_ROWS], est.latent_dim
    )
    if alignment is None:
        space_id = new_space_id(dataset, fitted.latent[:REFERENCE_ROWS])
    else:
        metrics["alignment_residual"] = alignment.residual
        if centers is not None:
            # The centres follow the codes onto the aligned axes.
            centers = alignment.apply(np.asarray(centers)).astype(float).tolist()
    # The threshold's own scores (a training row is never its own neighbour),
    # so that the threshold sits at about 1 - contamination.
    train_scores = getattr(est, "decision_scores_", None)
    if train_scores is None:
        train_scores = fitted.score

    info = BundleInfo(
        dataset=dataset,
        input_schema=schema.to_dict(),
        keys=schema.keys,
        label=label,
        trained_at=datetime.now(UTC).isoformat(timespec="seconds"),
        n_train_rows=int(x_train.shape[0]),
        metrics=metrics,
        cluster_centers=centers,
        reference=build_reference(train_t, numeric, categorical, fitted.score),
        family=kind,
        score_quantiles=score_quantiles(np.asarray(train_scores)),
        alignment=None if alignment is None else alignment.to_dict(),
        latent_space_id=space_id,
    )
    LatentModel(pre, est, info).save(bundle_dir)
    sample = train_t.slice(0, 5).to_pandas()
    params = {
        **estimator_params,
        "max_train_rows": max_train_rows,
        "n_clusters": n_clusters,
    }
    return TrainResult(
        bundle_dir=str(bundle_dir),
        metrics=metrics,
        history={k: list(map(float, v)) for k, v in est.history_.items()},
        params=params,
        n_rows_total=total,
        n_train=int(x_train.shape[0]),
        n_holdout=int(x_hold.shape[0]),
        sample=sample,
        plots=plots,
        warnings=warnings,
    )


def _align(
    champion_dir: Path | None,
    reference: pa.Table,
    codes: np.ndarray,
    latent_dim: int,
) -> tuple[Alignment | None, str]:
    """The rotation onto the champion's axes and its latent space id, or
    ``(None, "")`` when alignment is impossible (no champion, another
    ``latent_dim``, a champion that cannot read the rows)."""
    if champion_dir is None or reference.num_rows < 2:
        return None, ""
    champion = LatentModel.load(champion_dir)
    if champion.latent_dim != latent_dim:
        return None, ""
    try:
        target = champion.score(reference).latent
    except ValueError:  # the champion lacks a column of the new data
        return None, ""
    aligned_to = f"{champion.info.dataset} {champion.info.trained_at}"
    alignment = fit_procrustes(codes, target, aligned_to=aligned_to)
    return alignment, champion.info.latent_space_id or new_space_id(
        champion.info.dataset, target
    )


def bind_context(est: ModelFamily, schema: TableSchema) -> tuple[str, str] | None:
    """The entity and time columns of a family that needs them, else None."""
    if not getattr(est, "needs_context", False):
        return None
    from models.sequence_windows import ContextColumnError

    kinds = {c.name: c.kind for c in schema.columns}
    try:
        columns = est.bind_context(schema.keys, kinds)  # type: ignore[attr-defined]
    except ContextColumnError as exc:
        raise ConfigError(str(exc)) from None
    absent = [c for c in columns if c not in kinds]
    if absent:
        raise ConfigError(
            f"the entity/time column(s) {', '.join(absent)} of the sequence model"
            " are not in the data"
        )
    return columns


def fit_in_context(
    est: ModelFamily,
    pre: TabularPreprocessor,
    table: pa.Table,
    columns: tuple[str, str],
    train_idx: np.ndarray,
) -> tuple[Scores, Scores]:
    """Fit a sequence family on the training rows, every sampled row serving
    as history, and score all rows in their series: ``(train, holdout)``."""
    from models.family import is_anomaly
    from models.sequence_windows import ContextColumnError, row_context

    try:
        ctx = row_context(table, *columns)
    except ContextColumnError as exc:
        raise InputError(f"training rows: {exc}") from None
    x_all = pre.transform(table)
    est.fit(x_all, context=ctx, train_rows=train_idx)  # type: ignore[call-arg]
    latent, score = est.encode_and_score(x_all, context=ctx)  # type: ignore[call-arg]
    flags = is_anomaly(score, est.threshold_)
    hold = np.setdiff1d(np.arange(len(score)), train_idx)
    return (
        Scores(latent[train_idx], score[train_idx], flags[train_idx]),
        Scores(latent[hold], score[hold], flags[hold]),
    )


def _plots(
    plots_dir: Path,
    est: ModelFamily,
    pre: TabularPreprocessor,
    hold_t: pa.Table,
    x_hold: np.ndarray,
    held: Scores,
    label: str | None,
    seed: int,
) -> list[str]:
    from tasks.plots import render_training_plots, subsample_indices

    idx = subsample_indices(len(x_hold), 20_000, seed)  # decode only what is drawn
    labels = (
        hold_t.column(label).take(pa.array(idx)).to_numpy(zero_copy_only=False)
        if label
        else None
    )
    paths = render_training_plots(
        plots_dir,
        history=est.history_,
        latent=held.latent[idx],
        is_anomaly=held.is_anomaly[idx],
        errors=held.score[idx],
        threshold=float(est.threshold_),
        x=x_hold[idx],
        x_recon=est.reconstruct(x_hold[idx]),
        feature_names=list(pre.feature_names_out_),
        label=labels,
        label_name=label,
        seed=seed,
    )
    return [str(p) for p in paths]


def mse_in_space(
    model: LatentModel,
    data: pa.Table,
    target: TabularPreprocessor,
    x_target: np.ndarray,
) -> float | None:
    """Reconstruction MSE of ``model`` on ``data``, measured in ``target``'s space.

    A champion and a challenger scale their inputs with different statistics, so
    their errors are only comparable after mapping the champion's reconstruction
    into the challenger's space: numeric columns are unscaled with the champion's
    statistics and rescaled with the target's; indicator and one-hot columns are
    matched by name (a column the champion never had is reconstructed as 0).
    Returns None when the champion cannot read ``data``.
    """
    src = model.preprocessor
    try:
        x_own = src.transform(data)
    except ValueError:
        return None
    r_own = np.asarray(model.estimator.reconstruct(x_own), dtype=np.float64)
    index = {n: i for i, n in enumerate(src.feature_names_out_)}
    own_stats = {c: (src.means_[i], src.scales_[i]) for i, c in enumerate(src.numeric)}
    tgt_stats = {
        c: (target.means_[i], target.scales_[i]) for i, c in enumerate(target.numeric)
    }
    recon = np.zeros(x_target.shape, dtype=np.float64)
    for j, name in enumerate(target.feature_names_out_):
        if name not in index:
            continue
        col = r_own[:, index[name]]
        if name in own_stats and name in tgt_stats:
            (m0, s0), (m1, s1) = own_stats[name], tgt_stats[name]
            col = (col * s0 + m0 - m1) / s1
        recon[:, j] = col
    return float(((recon - x_target.astype(np.float64)) ** 2).mean())


def _pca_baseline(
    x_train: np.ndarray, x_hold: np.ndarray, k: int, seed: int
) -> dict[str, float]:
    from sklearn.decomposition import PCA

    k = min(k, x_train.shape[1], x_train.shape[0])
    pca = PCA(n_components=k, random_state=seed).fit(x_train)
    recon = pca.inverse_transform(pca.transform(x_hold))
    return {"pca_val_mse": float(((recon - x_hold) ** 2).mean())}


def _probe_metrics(
    train_t: pa.Table,
    hold_t: pa.Table,
    label: str,
    z_train: np.ndarray,
    z_hold: np.ndarray,
    x_train: np.ndarray,
    x_hold: np.ndarray,
    seed: int,
) -> dict[str, float]:
    from sklearn.decomposition import PCA

    tr = _binary_label(train_t.column(label).to_pandas())
    ho = _binary_label(hold_t.column(label).to_pandas())
    if tr is None or ho is None or len(np.unique(ho[1][ho[0]])) < 2:
        return {}
    (mtr, ytr), (mho, yho) = tr, ho
    pca = PCA(n_components=z_train.shape[1], random_state=seed).fit(x_train)
    return {
        "probe_auc": probe_auc(z_train[mtr], ytr[mtr], z_hold[mho], yho[mho]),
        "pca_probe_auc": probe_auc(
            pca.transform(x_train)[mtr], ytr[mtr], pca.transform(x_hold)[mho], yho[mho]
        ),
    }


@task(name="train", **PLAIN)
def train_task(
    ingested_dir: Path,
    schema: dict[str, Any],
    bundle_dir: Path,
    *,
    dataset: str,
    estimator_params: dict[str, Any],
    label: str | None = None,
    max_train_rows: int = 2_000_000,
    holdout_fraction: float = 0.2,
    n_clusters: int | None = None,
    champion_dir: Path | None = None,
    plots_dir: Path | None = None,
    align_to: Path | None = None,
) -> TrainResult:
    """:func:`train_model`, with per-epoch logs and a progress artifact the UI
    updates live."""
    from prefect import get_run_logger
    from prefect.artifacts import create_progress_artifact, update_progress_artifact

    logger = get_run_logger()
    # A family that does not train in epochs reports no progress until done.
    epochs = int(estimator_params.get("epochs", 1))
    progress = create_progress_artifact(0.0, description="training epochs")
    shown = terminal_progress.current()  # the CLI's epoch display, if any

    def on_epoch(epoch: int, train_loss: float, val_loss: float) -> None:
        logger.info(
            "epoch %d: train_loss=%.5f val_loss=%.5f", epoch, train_loss, val_loss
        )
        update_progress_artifact(progress, min(100.0, 100.0 * (epoch + 1) / epochs))
        shown.epoch(epoch, epochs, train_loss, val_loss)
        checkpoint("train")

    result = train_model(
        ingested_dir,
        schema,
        bundle_dir,
        dataset=dataset,
        estimator_params=estimator_params,
        label=label,
        max_train_rows=max_train_rows,
        holdout_fraction=holdout_fraction,
        n_clusters=n_clusters,
        champion_dir=champion_dir,
        plots_dir=plots_dir,
        epoch_callback=on_epoch,
        align_to=align_to,
    )
    update_progress_artifact(progress, 100.0)
    for warning in result.warnings:
        logger.warning(warning)
    return result
