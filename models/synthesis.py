"""Generators of synthetic raw rows: the GAN, the VAE and the independent baseline.

A :class:`TableGenerator` is fitted on raw rows (a pyarrow table of the
dataset's feature columns and its label) and draws new raw rows
(:meth:`TableGenerator.draw`). All three kinds share the same preprocessed
space (:class:`models.preprocessing.TabularPreprocessor` over those columns)
and the same way back to raw rows (:class:`models.rawspace.RawSpace`):

``gan``
    :class:`models.tabgan.TabularGAN`, a CTGAN-like conditional GAN.
``vae``
    The ``vae`` model family (:mod:`models.families`), fitted on the same
    matrix; rows are decoded from ``z ~ N(0, I)`` (its ``sample``), missing
    indicators and categories drawn from the decoded probabilities.
``independent``
    The baseline: every column drawn from its own marginal (missing rate,
    quantiles, level frequencies), ignoring every other column.

For the two learnt generators each numeric column then goes through a fixed
monotone map, fitted once, that takes the generator's own quantiles to the
training data's (marginal calibration): the generator decides the order of
values, i.e. how columns move together, and the data decides their spread.
Without it, a few hundred GAN steps leave marginals visibly off, and a VAE's
decoded means are shrunk towards the centre.

:func:`generate` adds what every output needs: rows that break the dataset's
rules, and copies of training rows, are dropped and drawn again.

A saved generator is ``generator.json`` (everything but tensors),
``weights.pt`` (the GAN's state_dict), ``vae/`` (the family's own files),
``row_hashes.npy`` (hashes of the rows it must never emit) and
``manifest.json``, the SHA-256 of each: nothing is unpickled on load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from models.atomic import atomic_path, atomic_write_bytes
from models.errors import LatentflowError
from models.integrity import check_manifest, write_manifest
from models.preprocessing import MISSING, TabularPreprocessor, _as_float
from models.rawspace import RawSpace

GENERATOR_FORMAT = 1
GENERATOR_KINDS = ("gan", "vae", "independent")
#: Quantile levels kept per numeric column (marginals and calibration).
N_QUANTILES = 513
#: Rows drawn once after fitting to learn the generator's own quantiles.
CALIBRATION_ROWS = 20_000
#: Most rounds of draw-check-redraw before giving up on a request.
MAX_ROUNDS = 60

Keep = Callable[[pa.Table], np.ndarray]


class GenerationError(LatentflowError):
    """Too few rows passed the rules and the copy check (one-line message: the
    CLI shows it without a traceback and exits 2)."""


@dataclass
class GeneratorSettings:
    """How the learnt generators are trained; small enough for a CPU."""

    gan_steps: int = 500
    gan_batch_size: int = 500
    vae_epochs: int = 40
    vae_latent_dim: int = 8
    calibrate: bool = True
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class TableGenerator:
    """A fitted generator of raw rows (see the module doc)."""

    kind: str
    space: RawSpace
    settings: GeneratorSettings
    label: str | None = None
    model: Any = None  # TabularGAN | the vae family | None
    calibration: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    marginals: dict[str, Any] = field(default_factory=dict)
    forbidden: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    n_train_rows: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    #: The dataset's domain rules, kept with the generator so that its served
    #: rows pass them too (see tasks.synth_rules).
    rules: list[str] = field(default_factory=list)

    def kinds(self) -> dict[str, str]:
        """Each generated column's kind, as the rules see it."""
        pre = self.space.pre
        return {
            **{c: "numeric" for c in pre.numeric},
            **{c: "categorical" for c in pre.categorical},
        }

    # -- fitting ---------------------------------------------------------------
    @classmethod
    def fit(
        cls,
        kind: str,
        table: pa.Table,
        numeric: list[str],
        categorical: list[str],
        settings: GeneratorSettings,
        label: str | None = None,
        forbidden: np.ndarray | None = None,
        rules: list[str] | None = None,
    ) -> TableGenerator:
        """Fit on raw rows; ``forbidden`` are the row hashes never to emit
        (default: those of ``table``)."""
        if kind not in GENERATOR_KINDS:
            raise ValueError(f"unknown generator {kind!r}; known: {GENERATOR_KINDS}")
        pre = TabularPreprocessor(numeric, categorical, max_categories=256).fit(table)
        space = RawSpace.fit(table, pre)
        if forbidden is None:
            forbidden = space.row_hashes(table)
        self = cls(
            kind=kind,
            space=space,
            settings=settings,
            label=label,
            forbidden=np.unique(np.asarray(forbidden, np.uint64)),
            n_train_rows=table.num_rows,
            rules=list(rules or []),
        )
        self.marginals = _marginals(table, pre)
        if kind == "independent":
            return self
        x = pre.transform(table)
        from models.tabgan import one_thread

        if kind == "gan":
            self.model = _fit_gan(x, space, settings)
            self.history = dict(self.model.history_)
        else:
            with one_thread():
                self.model = _fit_vae(x, settings)
            self.history = dict(self.model.history_)
        if settings.calibrate:
            # A few times the training rows is enough to pin the quantiles.
            n_ref = min(CALIBRATION_ROWS, max(2000, 4 * table.num_rows))
            ref = self._draw_uncalibrated(n_ref, settings.seed + 1_000_003)
            self.calibration = {
                name: {
                    "generated": _quantiles(ref[name]),
                    "real": self.marginals[name]["quantiles"],
                }
                for name in pre.numeric
                if len(self.marginals[name]["quantiles"])
            }
        return self

    # -- drawing -----------------------------------------------------------------
    def _matrix(self, n: int, seed: int) -> np.ndarray:
        if self.kind == "gan":
            return self.model.sample(n, seed)
        from models.tabgan import one_thread

        with one_thread():
            return np.asarray(self.model.sample(n, random_state=seed), np.float32)

    def _draw_uncalibrated(self, n: int, seed: int) -> dict[str, np.ndarray]:
        """Raw-unit numeric values before clipping, rounding and calibration."""
        x = self._matrix(n, seed)
        pre = self.space.pre
        return {
            name: x[:, i].astype(np.float64) * pre.scales_[i] + pre.means_[i]
            for i, name in enumerate(pre.numeric)
        }

    def draw(self, n: int, seed: int) -> pa.Table:
        """``n`` raw rows (rules and copies not yet checked; see :func:`generate`)."""
        rng = np.random.default_rng([seed, 3])
        if self.kind == "independent":
            return self._draw_independent(n, rng)
        x = self._matrix(n, seed)
        space, pre = self.space, self.space.pre
        numeric = {}
        for i, r in enumerate(space.ranges):
            raw = x[:, i].astype(np.float64) * pre.scales_[i] + pre.means_[i]
            cal = self.calibration.get(r.name)
            if cal is not None:
                raw = np.interp(raw, cal["generated"], cal["real"])
            numeric[r.name] = space.finish(r, raw)
        missing = {}
        for name, j in space.indicator_index().items():
            p = x[:, j]
            if self.kind == "vae":  # decoded probabilities: draw, do not threshold
                missing[name] = rng.random(n) < np.clip(p, 0.0, 1.0)
            else:
                missing[name] = p > 0.5
        labels = {}
        for name, (j, levels) in space.category_blocks().items():
            block = x[:, j : j + len(levels) - 1]  # never __unknown__: no raw label
            if self.kind == "vae":
                p = np.clip(block.astype(np.float64), 0.0, None) + 1e-6
                idx = _draw_rows(p / p.sum(axis=1, keepdims=True), rng)
                labels[name] = np.asarray(levels, dtype=object)[idx]
            else:
                labels[name] = space.levels_of(block, [*levels[:-1], "_"])
        return space.to_table(numeric, missing, labels)

    def _draw_independent(self, n: int, rng: np.random.Generator) -> pa.Table:
        space = self.space
        numeric, missing, labels = {}, {}, {}
        for r in space.ranges:
            m = self.marginals[r.name]
            q = np.asarray(m["quantiles"], np.float64)
            if len(q):
                u = rng.random(n)
                raw = np.interp(u, np.linspace(0, 1, len(q)), q)
            else:
                raw = np.zeros(n)
            numeric[r.name] = space.finish(r, raw)
            missing[r.name] = rng.random(n) < m["missing_rate"]
        for name in space.pre.categorical:
            m = self.marginals[name]
            p = np.asarray(m["freq"], np.float64)
            labels[name] = np.asarray(m["levels"], dtype=object)[
                rng.choice(len(p), size=n, p=p / p.sum())
            ]
        return space.to_table(numeric, missing, labels)

    # -- persistence -------------------------------------------------------------
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the generator into directory ``path`` (created), atomically per
        file, the manifest last."""
        import torch

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        meta: dict[str, Any] = {
            "format": GENERATOR_FORMAT,
            "kind": self.kind,
            "label": self.label,
            "settings": self.settings.to_dict(),
            "space": self.space.to_dict(),
            "calibration": self.calibration,
            "marginals": self.marginals,
            "n_train_rows": self.n_train_rows,
            "rules": self.rules,
        }
        if self.kind == "gan":
            meta["gan"] = self.model.to_dict()
            with atomic_path(path / "weights.pt") as tmp:
                torch.save(self.model.state_dict(), tmp)
        elif self.kind == "vae":
            self.model.save(path / "vae")
        with atomic_path(path / "row_hashes.npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, self.forbidden.view(np.int64), allow_pickle=False)
        atomic_write_bytes(path / "generator.json", json.dumps(meta).encode())
        write_manifest(path)
        return path

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], expected_sha256: str | None = None
    ) -> TableGenerator:
        """Read what :meth:`save` wrote; every file is checked against the
        manifest (and the manifest against ``expected_sha256``) first.

        A missing, changed or malformed file raises a one-line ValueError.
        """
        import torch

        path = Path(path)
        check_manifest(path, expected_sha256)
        try:
            meta = json.loads((path / "generator.json").read_text())
            if meta.get("format") != GENERATOR_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            kind = meta["kind"]
            settings = GeneratorSettings(**meta["settings"])
            space = RawSpace.from_dict(meta["space"])
            with open(path / "row_hashes.npy", "rb") as fh:
                hashes = np.load(fh, allow_pickle=False).view(np.uint64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not a readable generator: {exc}") from None
        model: Any = None
        if kind == "gan":
            from models.tabgan import TabularGAN

            state = torch.load(path / "weights.pt", weights_only=True)
            model = TabularGAN.restore(meta["gan"], state)
        elif kind == "vae":
            from models.families import get_family

            model = get_family("vae").load(path / "vae")
        return cls(
            kind=kind,
            space=space,
            settings=settings,
            label=meta.get("label"),
            model=model,
            calibration=meta["calibration"],
            marginals=meta["marginals"],
            forbidden=hashes,
            n_train_rows=int(meta["n_train_rows"]),
            rules=list(meta.get("rules", [])),
        )


# -- fitting helpers --------------------------------------------------------------


def _quantiles(x: np.ndarray) -> list[float]:
    x = x[np.isfinite(x)]
    if not len(x):
        return []
    return np.quantile(x, np.linspace(0, 1, N_QUANTILES)).tolist()


def _marginals(table: pa.Table, pre: TabularPreprocessor) -> dict[str, Any]:
    """Each column on its own: missing rate and quantiles, or level frequencies."""
    out: dict[str, Any] = {}
    for name in pre.numeric:
        x = _as_float(table.column(name))
        out[name] = {
            "missing_rate": float(np.mean(np.isnan(x))) if len(x) else 0.0,
            "quantiles": _quantiles(x),
        }
    for name in pre.categorical:
        col = table.column(name).cast(pa.string()).to_pylist()
        counts: dict[str, int] = {}
        for v in col:
            key = MISSING if v is None else str(v).strip()
            counts[key] = counts.get(key, 0) + 1
        levels = sorted(counts, key=lambda k: (-counts[k], k))
        out[name] = {"levels": levels, "freq": [counts[k] for k in levels]}
    return out


def _fit_gan(x: np.ndarray, space: RawSpace, settings: GeneratorSettings) -> Any:
    from models.tabgan import TabularGAN, spans_of

    pre = space.pre
    ind = space.indicator_index()
    blocks = [(j, len(levels)) for j, levels in space.category_blocks().values()]
    spans = spans_of(len(pre.numeric), list(ind.values()), blocks)
    observed = {
        i: x[:, ind[name]] < 0.5 for i, name in enumerate(pre.numeric) if name in ind
    }
    gan = TabularGAN(
        spans,
        steps=settings.gan_steps,
        batch_size=settings.gan_batch_size,
        random_state=settings.seed,
    )
    return gan.fit(x, observed)


def _fit_vae(x: np.ndarray, settings: GeneratorSettings) -> Any:
    from models.families import get_family

    family = get_family("vae")
    params = {
        "kind": "vae",
        "latent_dim": settings.vae_latent_dim,
        "hidden": (128, 64),
        "epochs": settings.vae_epochs,
        "patience": None,
        "device": "cpu",
        "random_state": settings.seed,
    }
    return family.build(params).fit(x)


def _draw_rows(p: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One level per row from each row's probabilities."""
    u = rng.random((len(p), 1))
    return np.minimum((p.cumsum(axis=1) < u).sum(axis=1), p.shape[1] - 1)


# -- generation with checks ---------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    """Rows that passed, and how many draws were dropped and why."""

    table: pa.Table
    drawn: int
    broke_rules: int
    copies: int


def generate(
    gen: TableGenerator, n: int, seed: int, keep: Keep | None = None
) -> Generated:
    """``n`` rows that pass ``keep`` (the dataset's rules) and are not a
    training row nor a repeat of another output row.

    Rows are drawn in rounds seeded from ``seed`` (same seed, same rows); each
    round asks for what is missing plus a margin. GenerationError when
    MAX_ROUNDS rounds do not give ``n`` rows.
    """
    parts: list[pa.Table] = []
    seen: set[int] = set()
    have = drawn = broke = copies = 0
    for rnd in range(MAX_ROUNDS):
        if have >= n:
            break
        want = int((n - have) * 1.25) + 16
        t = gen.draw(want, seed * 1000 + rnd)
        drawn += t.num_rows
        ok = np.ones(t.num_rows, bool) if keep is None else np.asarray(keep(t), bool)
        broke += int((~ok).sum())
        h = gen.space.row_hashes(t)
        copy = np.isin(h, gen.forbidden)
        copies += int((copy & ok).sum())
        ok &= ~copy
        for i in np.flatnonzero(ok):  # a repeat within the output is a copy too
            if int(h[i]) in seen:
                ok[i] = False
            else:
                seen.add(int(h[i]))
        take = np.flatnonzero(ok)[: n - have]
        parts.append(t.take(pa.array(take)))
        have += len(take)
    if have < n:
        raise GenerationError(
            f"only {have} of {n} generated rows passed the dataset's rules and the"
            f" copy check after {drawn} draws ({broke} broke a rule, {copies} copied"
            " a training row)"
        )
    return Generated(pa.concat_tables(parts), drawn, broke, copies)
