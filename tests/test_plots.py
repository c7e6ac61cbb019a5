"""tasks/plots.py: real PNGs, sensible sizes, deterministic, robust inputs."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from tasks.plots import render_training_plots, subsample_indices

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _png_size(path: Path) -> tuple[int, int]:
    """Width and height from the IHDR chunk (no PIL needed)."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC, f"{path.name} is not a PNG"
    return struct.unpack(">II", head[16:24])


def _inputs(n: int = 3000, d: int = 6, k: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) * np.linspace(0.5, 3.0, d)
    latent = rng.normal(size=(n, k)).astype(np.float32)
    x_recon = x + rng.normal(scale=0.3, size=x.shape)
    errors = ((x - x_recon) ** 2).mean(axis=1)
    threshold = float(np.quantile(errors, 0.99))
    label = np.where(rng.random(n) < 0.2, "Yes", "No").astype(object)
    label[::97] = None  # missing labels are a class of their own
    return {
        "history": {
            "train_loss": list(np.linspace(1.0, 0.2, 12)),
            "val_loss": list(np.linspace(1.1, 0.3, 12)),
        },
        "latent": latent,
        "is_anomaly": errors > threshold,
        "errors": errors,
        "threshold": threshold,
        "x": x,
        "x_recon": x_recon,
        "feature_names": [f"f{i}" for i in range(d)],
        "label": label,
        "label_name": "RainTomorrow",
    }


def test_writes_real_pngs_of_sensible_size(tmp_path):
    paths = render_training_plots(tmp_path, **_inputs())
    assert [p.name for p in paths] == [
        "loss.png",
        "latent.png",
        "latent_label.png",
        "error_hist.png",
        "recon.png",
    ]
    for p in paths:
        assert p.is_file() and p.parent == tmp_path
        width, height = _png_size(p)
        assert width >= 400 and height >= 300, (p.name, width, height)
        assert p.stat().st_size > 5_000, (p.name, p.stat().st_size)
    # No temporary files are left behind by the atomic writes.
    assert sorted(x.name for x in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_pil_opens_every_png(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    for p in render_training_plots(tmp_path, **_inputs(n=500)):
        with pil.open(p) as img:
            img.verify()
        with pil.open(p) as img:
            assert img.format == "PNG"
            assert img.size[0] >= 400
            # A plot, not a blank canvas: many distinct colours.
            assert len(img.convert("RGB").getcolors(maxcolors=1 << 20) or []) > 20


def test_same_inputs_same_bytes(tmp_path):
    a = render_training_plots(tmp_path / "a", **_inputs(n=5000), max_points=1000)
    b = render_training_plots(tmp_path / "b", **_inputs(n=5000), max_points=1000)
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name


def test_subsample_is_seeded_sorted_and_bounded():
    a = subsample_indices(100_000, 20_000, seed=0)
    assert len(a) == 20_000 and len(np.unique(a)) == 20_000
    assert np.all(np.diff(a) > 0)
    assert np.array_equal(a, subsample_indices(100_000, 20_000, seed=0))
    assert not np.array_equal(a, subsample_indices(100_000, 20_000, seed=1))
    assert np.array_equal(subsample_indices(50, 20_000, seed=0), np.arange(50))


@pytest.mark.parametrize("k", [1, 2, 5])
def test_any_latent_size_without_label(tmp_path, k):
    args = _inputs(n=400, k=k)
    args.update(label=None, label_name=None)
    paths = render_training_plots(tmp_path, **args)
    assert "latent_label.png" not in [p.name for p in paths]
    assert all(p.stat().st_size > 5_000 for p in paths)


def test_numeric_label_and_odd_values(tmp_path):
    args = _inputs(n=400)
    args["label"] = np.linspace(0, 1, 400)  # continuous: coloured by a colourmap
    args["errors"] = args["errors"].copy()
    args["errors"][:3] = np.nan  # non-finite values are skipped, not fatal
    args["history"] = {"train_loss": [0.5], "val_loss": []}
    paths = render_training_plots(tmp_path, **args)
    assert len(paths) == 5


def test_mismatched_shapes_are_refused(tmp_path):
    args = _inputs(n=100)
    args["errors"] = args["errors"][:-1]
    with pytest.raises(ValueError, match="same number of rows"):
        render_training_plots(tmp_path, **args)
    args = _inputs(n=100)
    args["feature_names"] = ["only-one"]
    with pytest.raises(ValueError, match="feature names"):
        render_training_plots(tmp_path, **args)
