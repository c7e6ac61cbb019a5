"""Training plots logged with each model: loss curves, latent map, errors, recon.

Everything here is plain numpy + matplotlib and returns file paths, so the
train step can hand the PNGs to :func:`tasks.registry.log_and_register`
(``plots=``), which logs them under ``plots/`` on the MLflow run.

Rendering uses matplotlib's Agg canvas on a private ``Figure`` chosen inside
the function, never ``pyplot``: pyplot keeps global state (a current figure,
a process-wide backend) that is not thread-safe and would leak into a
notebook or a worker that imported us. The same inputs give byte-identical
PNGs (seeded subsampling, no timestamps in PNG metadata).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from models.family import is_anomaly
from tasks.storage import atomic_path

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LOSS_PNG = "loss.png"
LATENT_PNG = "latent.png"
LATENT_LABEL_PNG = "latent_label.png"
ERROR_HIST_PNG = "error_hist.png"
RECON_PNG = "recon.png"

_FIGSIZE = (8.0, 6.0)  # inches; at 100 dpi an 800 x 600 image
_WIDE_FIGSIZE = (12.0, 5.5)
_DPI = 100
_NORMAL = "#4C72B0"
_ANOMALY = "#DD3333"
_MAX_LABEL_CLASSES = 10


def render_training_plots(
    out_dir: Path,
    *,
    history: dict[str, list[float]],
    latent: np.ndarray,
    is_anomaly: np.ndarray,
    errors: np.ndarray,
    threshold: float,
    x: np.ndarray,
    x_recon: np.ndarray,
    feature_names: Sequence[str],
    label: np.ndarray | None = None,
    label_name: str | None = None,
    max_points: int = 20000,
    seed: int = 0,
) -> list[Path]:
    """Write the training plots of one model as PNGs under ``out_dir``.

    Parameters
    ----------
    out_dir
        Directory for the PNGs (created if missing); files are replaced atomically.
    history
        Per-epoch losses, e.g. ``{"train_loss": [...], "val_loss": [...]}``.
    latent
        Codes of the plotted rows, shape ``(n, latent_dim)``.
    is_anomaly, errors
        Per-row anomaly flag and reconstruction error, shape ``(n,)``.
    threshold
        The anomaly threshold on ``errors``.
    x, x_recon
        Model inputs (preprocessed) and their reconstructions, shape ``(n, d)``.
    feature_names
        Names of the ``d`` columns of ``x``.
    label, label_name
        Optional per-row label (e.g. ``RainTomorrow``); adds ``latent_label.png``.
    max_points
        Scatter plots show at most this many rows, a seeded uniform sample.
    seed
        Seed of that sample: the same inputs and seed give identical files.

    Returns
    -------
    list of Path
        ``loss.png``, ``latent.png``, [``latent_label.png``], ``error_hist.png``,
        ``recon.png``, in that order.
    """
    latent = _as_2d(np.asarray(latent, dtype=np.float64), "latent")
    x = _as_2d(np.asarray(x, dtype=np.float64), "x")
    x_recon = _as_2d(np.asarray(x_recon, dtype=np.float64), "x_recon")
    flags = np.asarray(is_anomaly).astype(bool).reshape(-1)
    errs = np.asarray(errors, dtype=np.float64).reshape(-1)
    n = latent.shape[0]
    if not (flags.shape[0] == errs.shape[0] == x.shape[0] == n):
        raise ValueError(
            "latent, is_anomaly, errors and x must have the same number of rows;"
            f" got {n}, {flags.shape[0]}, {errs.shape[0]}, {x.shape[0]}"
        )
    if x_recon.shape != x.shape:
        raise ValueError(f"x_recon has shape {x_recon.shape}, x has {x.shape}")
    if len(feature_names) != x.shape[1]:
        raise ValueError(
            f"{len(feature_names)} feature names for {x.shape[1]} columns of x"
        )
    labels = None
    if label is not None:
        labels = np.asarray(label).reshape(-1)
        if labels.shape[0] != n:
            raise ValueError(f"label has {labels.shape[0]} rows, expected {n}")
    if max_points < 1:
        raise ValueError("max_points must be at least 1")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = subsample_indices(n, max_points, seed)
    coords, axis_names = _latent_2d(latent)

    paths = [
        _save(_loss_figure(history), out_dir / LOSS_PNG),
        _save(
            _latent_figure(coords[idx], flags[idx], axis_names, n),
            out_dir / LATENT_PNG,
        ),
    ]
    if labels is not None:
        paths.append(
            _save(
                _latent_label_figure(
                    coords[idx], labels[idx], axis_names, label_name or "label"
                ),
                out_dir / LATENT_LABEL_PNG,
            )
        )
    paths.append(_save(_error_figure(errs, float(threshold)), out_dir / ERROR_HIST_PNG))
    paths.append(
        _save(
            _recon_figure(x[idx], x_recon[idx], flags[idx], list(feature_names)),
            out_dir / RECON_PNG,
        )
    )
    return paths


def subsample_indices(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted row indices of a seeded uniform sample of at most ``max_points``."""
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng([seed, 3])
    return np.sort(rng.choice(n, size=max_points, replace=False))


def _as_2d(a: np.ndarray, name: str) -> np.ndarray:
    if a.ndim == 1:
        return a.reshape(-1, 1)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 1-D or 2-D, got shape {a.shape}")
    return a


def _latent_2d(latent: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """Two plotting coordinates: the codes themselves, or their 2-D PCA."""
    k = latent.shape[1]
    if k == 1:
        # One code: spread it against the row order so the points do not overlap.
        rows = np.arange(len(latent), dtype=np.float64)
        return np.column_stack([latent[:, 0], rows]), ("latent_0", "row")
    if k == 2:
        return latent, ("latent_0", "latent_1")
    finite = np.isfinite(latent).all(axis=1)
    centred = latent - latent[finite].mean(axis=0)
    # SVD instead of sklearn: no extra import, and the sign is fixed below so the
    # picture does not flip between identical runs on different BLAS builds.
    _, s, vt = np.linalg.svd(centred[finite], full_matrices=False)
    comps = vt[:2]
    signs = np.sign(comps[np.arange(2), np.abs(comps).argmax(axis=1)])
    comps = comps * np.where(signs == 0, 1.0, signs)[:, None]
    var = s**2
    share = var[:2] / max(float(var.sum()), 1e-300)
    names = (f"PC1 ({share[0]:.0%} var)", f"PC2 ({share[1]:.0%} var)")
    return centred @ comps.T, names


def _new_figure(figsize: tuple[float, float] = _FIGSIZE) -> Figure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # attaches the Agg canvas; no global backend switch
    return fig


def _save(fig: Figure, path: Path) -> Path:
    with atomic_path(path) as tmp:
        # The temporary name has no .png suffix: the format must be explicit.
        fig.savefig(tmp, format="png", dpi=_DPI, metadata={"Software": None})
    return path


def _loss_figure(history: dict[str, list[float]]) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    drawn = False
    for key in sorted(history):
        values = np.asarray(history[key], dtype=np.float64)
        if values.size == 0 or not np.isfinite(values).any():
            continue
        epochs = np.arange(1, values.size + 1)
        ax.plot(epochs, values, marker="o", markersize=3, label=key)
        drawn = True
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("Training and validation loss")
    ax.grid(True, alpha=0.3)
    if drawn:
        ax.legend()
        positive = [
            v for vals in history.values() for v in vals if np.isfinite(v) and v > 0
        ]
        if positive and max(positive) / min(positive) > 50:
            ax.set_yscale("log")  # the first epochs would flatten the rest
    else:
        ax.text(0.5, 0.5, "no loss history", ha="center", va="center")
    return fig


def _latent_figure(
    coords: np.ndarray, flags: np.ndarray, names: tuple[str, str], n_total: int
) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    normal = ~flags
    ax.scatter(
        coords[normal, 0],
        coords[normal, 1],
        s=4,
        alpha=0.35,
        color=_NORMAL,
        linewidths=0,
        label=f"normal ({int(normal.sum()):,})",
        rasterized=True,
    )
    # Anomalies are few: drawn last and larger so they are not buried.
    ax.scatter(
        coords[flags, 0],
        coords[flags, 1],
        s=14,
        alpha=0.9,
        color=_ANOMALY,
        linewidths=0,
        label=f"anomaly ({int(flags.sum()):,})",
    )
    _latent_axes(ax, names)
    shown = f"{len(coords):,} of {n_total:,} rows" if len(coords) < n_total else ""
    ax.set_title("Latent space by anomaly flag" + (f" ({shown})" if shown else ""))
    ax.legend(loc="best", markerscale=2)
    return fig


def _latent_label_figure(
    coords: np.ndarray, labels: np.ndarray, names: tuple[str, str], label_name: str
) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    numeric = _numeric_labels(labels)
    if numeric is not None and len(np.unique(numeric[np.isfinite(numeric)])) > (
        _MAX_LABEL_CLASSES
    ):
        ok = np.isfinite(numeric)
        points = ax.scatter(
            coords[ok, 0],
            coords[ok, 1],
            c=numeric[ok],
            s=4,
            alpha=0.5,
            cmap="viridis",
            linewidths=0,
            rasterized=True,
        )
        fig.colorbar(points, ax=ax, label=label_name)
    else:
        text = _label_strings(labels)
        classes = sorted(set(text.tolist()) - {"(missing)"})
        if len(classes) > _MAX_LABEL_CLASSES:
            counts = {c: int((text == c).sum()) for c in classes}
            keep = sorted(classes, key=lambda c: (-counts[c], c))[:_MAX_LABEL_CLASSES]
            text = np.where(np.isin(text, keep), text, "(other)")
            classes = [*sorted(keep), "(other)"]
        if (text == "(missing)").any():
            classes.append("(missing)")
        colours = _class_colours(len(classes))
        for cls, colour in zip(classes, colours, strict=True):
            sel = text == cls
            ax.scatter(
                coords[sel, 0],
                coords[sel, 1],
                s=4,
                alpha=0.5,
                color=colour,
                linewidths=0,
                label=f"{cls} ({int(sel.sum()):,})",
                rasterized=True,
            )
        ax.legend(loc="best", markerscale=3, title=label_name)
    _latent_axes(ax, names)
    ax.set_title(f"Latent space by {label_name}")
    return fig


def _latent_axes(ax: Axes, names: tuple[str, str]) -> None:
    ax.set_xlabel(names[0])
    ax.set_ylabel(names[1])
    ax.grid(True, alpha=0.3)


def _numeric_labels(labels: np.ndarray) -> np.ndarray | None:
    if labels.dtype.kind in "biuf":
        return labels.astype(np.float64)
    return None


def _label_strings(labels: np.ndarray) -> np.ndarray:
    def one(v: Any) -> str:
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return "(missing)"
        return str(v)

    return np.array([one(v) for v in labels.tolist()], dtype=object)


def _class_colours(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(k)]


def _error_figure(errors: np.ndarray, threshold: float) -> Figure:
    fig = _new_figure()
    ax = fig.add_subplot()
    finite = errors[np.isfinite(errors)]
    if finite.size:
        hi = max(float(finite.max()), threshold) * 1.02
        lo = min(float(finite.min()), threshold, 0.0)
        ax.hist(finite, bins=100, range=(lo, hi), color=_NORMAL, alpha=0.85)
        ax.set_yscale("log")
    over = int(is_anomaly(finite, threshold).sum())
    ax.axvline(
        threshold,
        color=_ANOMALY,
        linestyle="--",
        linewidth=1.5,
        label=f"threshold {threshold:.4g} ({over:,} rows above)",
    )
    ax.set_xlabel("reconstruction error (mean squared, per row)")
    ax.set_ylabel("rows (log scale)")
    ax.set_title(f"Reconstruction error of {finite.size:,} rows")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right")
    return fig


def _recon_figure(
    x: np.ndarray, x_recon: np.ndarray, flags: np.ndarray, names: list[str]
) -> Figure:
    fig = _new_figure(_WIDE_FIGSIZE)
    # The two features that vary most carry most of what the model must rebuild.
    with np.errstate(invalid="ignore"):
        var = np.nanvar(np.where(np.isfinite(x), x, np.nan), axis=0)
    var = np.where(np.isfinite(var), var, -1.0)
    top = np.argsort(-var, kind="stable")[: min(2, x.shape[1])]
    axes = fig.subplots(1, len(top), squeeze=False)[0]
    for ax, j in zip(axes, top, strict=True):
        orig, rec = x[:, j], x_recon[:, j]
        ok = np.isfinite(orig) & np.isfinite(rec)
        ax.scatter(
            orig[ok & ~flags],
            rec[ok & ~flags],
            s=4,
            alpha=0.35,
            color=_NORMAL,
            linewidths=0,
            label="normal",
            rasterized=True,
        )
        ax.scatter(
            orig[ok & flags],
            rec[ok & flags],
            s=12,
            alpha=0.9,
            color=_ANOMALY,
            linewidths=0,
            label="anomaly",
        )
        if ok.any():
            lo = float(min(orig[ok].min(), rec[ok].min()))
            hi = float(max(orig[ok].max(), rec[ok].max()))
            ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, label="y = x")
            mse = float(np.mean((orig[ok] - rec[ok]) ** 2))
            ax.set_title(f"{names[j]} (MSE {mse:.4g})")
        else:
            ax.set_title(names[j])
        ax.set_xlabel("original (preprocessed)")
        ax.set_ylabel("reconstructed")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", markerscale=2)
    fig.suptitle("Original vs reconstructed, two highest-variance features")
    return fig
