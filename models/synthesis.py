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

Both learnt generators give each discrete column (missing indicator, category
block) as probabilities, and the draw is made here. Their outputs are then
calibrated to the training data's marginals, once, on a reference draw:

* each discrete column gets additive log-odds offsets (one per level) that
  bring the mean drawn rate of every level to its training rate, found by
  iterative proportional fitting;
* each numeric column goes through a fixed monotone map from the generator's
  own quantiles (over the rows it leaves observed) to the training data's.

The generator decides how columns move together, and the data decides each
column's rates and spread. Without it, a few thousand GAN steps leave
marginals visibly off, a VAE's decoded means are shrunk towards the centre, and
its missing rates come out low on columns missing for whole stations.

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

#: 2: discrete columns drawn from probabilities with calibration offsets.
GENERATOR_FORMAT = 2
GENERATOR_KINDS = ("gan", "vae", "independent")
#: Quantile levels kept per numeric column (marginals and calibration).
N_QUANTILES = 513
#: Rows drawn once after fitting to learn the generator's own quantiles.
CALIBRATION_ROWS = 20_000
#: Probabilities are kept inside [_P_MIN, 1 - _P_MIN] for log-odds.
_P_MIN = 1e-9
#: Most rounds of draw-check-redraw before giving up on a request.
MAX_ROUNDS = 60

Keep = Callable[[pa.Table], np.ndarray]


class GenerationError(LatentflowError):
    """Too few rows passed the rules and the copy check (one-line message: the
    CLI shows it without a traceback and exits 2)."""


@dataclass
class GeneratorSettings:
    """How the learnt generators are trained; small enough for a CPU."""

    gan_steps: int = 2000
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
    #: Log-odds offsets per discrete column: [offset] for a numeric column's
    #: missing indicator, one per level (``__unknown__`` excluded) for a block.
    offsets: dict[str, list[float]] = field(default_factory=dict)
    marginals: dict[str, Any] = field(default_factory=dict)
    forbidden: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint64))
    n_train_rows: int = 0
    history: dict[str, list[float]] = field(default_factory=dict)
    #: The dataset's domain rules, kept with the generator so that its served
    #: rows pass them too (see tasks.synth_rules).
    rules: list[str] = field(default_factory=list)

    def kinds(self) -> dict[str, str]:
        """Each generated column's kind, as the rules see it."""
        return column_kinds(self.space.pre.numeric, self.space.pre.categorical)

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
        keep: Keep | None = None,
    ) -> TableGenerator:
        """Fit on raw rows; ``forbidden`` are the row hashes never to emit
        (default: those of ``table``); ``keep`` is the rules' row filter, used
        to calibrate on the rows that will be written."""
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
                self.model = _fit_vae(x, space, settings)
            self.history = dict(self.model.history_)
        if settings.calibrate:
            self._calibrate(table.num_rows, keep)
        return self

    def _calibrate(self, n_train: int, keep: Keep | None) -> None:
        """Fit :attr:`offsets` and :attr:`calibration` on one reference draw."""
        # A few times the training rows is enough to pin rates and quantiles.
        n_ref = min(CALIBRATION_ROWS, max(2000, 4 * n_train))
        seed = self.settings.seed + 1_000_003
        x = self._matrix(n_ref, seed)
        self._fit_marginals(x, seed)
        if keep is None:
            return
        # Only rows that pass the rules are written, and rules drop rows
        # unevenly ("if Rainfall > 1 then RainToday == Yes" drops more wet
        # days): fitted again on the passing rows, the written rows keep the
        # data's rates and spread.
        passed = np.asarray(keep(self._table(x, seed)), bool)
        if passed.sum() >= min(1000, len(x) // 2):
            self._fit_marginals(x[passed], seed)

    def _fit_marginals(self, x: np.ndarray, seed: int) -> None:
        """Offsets, then quantile maps, that take ``x``'s draws to the data's."""
        space, pre = self.space, self.space.pre
        for name, j in space.indicator_index().items():
            self.offsets[name] = [
                _rate_offset(x[:, j], self.marginals[name]["missing_rate"])
            ]
        for name, (j, levels) in space.category_blocks().items():
            m = self.marginals[name]
            freq = dict(zip(m["levels"], m["freq"], strict=True))
            target = np.asarray([freq.get(k, 0) for k in levels[:-1]], np.float64)
            block = x[:, j : j + len(levels) - 1]
            self.offsets[name] = _level_offsets(block, target).tolist()
        missing = self._missing(x, np.random.default_rng([seed, 3]))
        for i, name in enumerate(pre.numeric):
            real = self.marginals[name]["quantiles"]
            if not len(real):
                continue
            raw = x[:, i].astype(np.float64) * pre.scales_[i] + pre.means_[i]
            kept = raw[~missing[name]] if name in missing else raw
            # Quantiles of the values the generator leaves observed: an
            # imputed value under a drawn null is never shown.
            generated = _quantiles(kept if len(kept) else raw)
            self.calibration[name] = {"generated": generated, "real": real}

    # -- drawing -----------------------------------------------------------------
    def _matrix(self, n: int, seed: int) -> np.ndarray:
        if self.kind == "gan":
            return self.model.sample(n, seed)
        from models.tabgan import one_thread

        with one_thread():
            return np.asarray(self.model.sample(n, random_state=seed), np.float32)

    def _missing(
        self, x: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Each gappy numeric column's drawn nulls, from its probabilities."""
        out = {}
        for name, j in self.space.indicator_index().items():
            (b,) = self.offsets.get(name, [0.0])
            out[name] = rng.random(len(x)) < _shifted(x[:, j], b)
        return out

    def _labels(self, x: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """Each category's drawn labels, from its block's probabilities."""
        out = {}
        for name, (j, levels) in self.space.category_blocks().items():
            k = len(levels) - 1  # never __unknown__: no raw label stands for it
            b = np.asarray(self.offsets.get(name, np.zeros(k)), np.float64)
            p = _reweighted(x[:, j : j + k], b)
            out[name] = np.asarray(levels[:-1], dtype=object)[_draw_rows(p, rng)]
        return out

    def draw(self, n: int, seed: int) -> pa.Table:
        """``n`` raw rows (rules and copies not yet checked; see :func:`generate`)."""
        if self.kind == "independent":
            return self._draw_independent(n, np.random.default_rng([seed, 3]))
        return self._table(self._matrix(n, seed), seed)

    def _table(self, x: np.ndarray, seed: int) -> pa.Table:
        """Raw rows from the generator's matrix: numbers calibrated, clipped
        and rounded; nulls and levels drawn from their offset probabilities."""
        rng = np.random.default_rng([seed, 3])
        space, pre = self.space, self.space.pre
        numeric = {}
        for i, r in enumerate(space.ranges):
            raw = x[:, i].astype(np.float64) * pre.scales_[i] + pre.means_[i]
            cal = self.calibration.get(r.name)
            if cal is not None:
                raw = np.interp(raw, cal["generated"], cal["real"])
            numeric[r.name] = space.finish(r, raw)
        missing = self._missing(x, rng)
        return space.to_table(numeric, missing, self._labels(x, rng))

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
            "offsets": self.offsets,
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
            offsets=meta["offsets"],
            marginals=meta["marginals"],
            forbidden=hashes,
            n_train_rows=int(meta["n_train_rows"]),
            rules=list(meta.get("rules", [])),
        )


def column_kinds(numeric: list[str], categorical: list[str]) -> dict[str, str]:
    """Each generated column's kind, as the rules see it."""
    return {
        **{c: "numeric" for c in numeric},
        **{c: "categorical" for c in categorical},
    }


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


def _fit_vae(x: np.ndarray, space: RawSpace, settings: GeneratorSettings) -> Any:
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
        # Softmax blocks: the decoded levels are probabilities to draw from.
        "one_hot_groups": [
            list(range(j, j + len(levels)))
            for j, levels in space.category_blocks().values()
        ]
        or None,
    }
    return family.build(params).fit(x)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), _P_MIN, 1.0 - _P_MIN)
    return np.log(p) - np.log1p(-p)


def _shifted(p: np.ndarray, offset: float) -> np.ndarray:
    """Probabilities ``p`` with ``offset`` added to their log-odds."""
    return 1.0 / (1.0 + np.exp(-(_logit(p) + offset)))


def _rate_offset(p: np.ndarray, rate: float) -> float:
    """The log-odds offset that makes ``mean(_shifted(p, offset))`` ``rate``
    (bisection: the mean is increasing in the offset)."""
    if len(p) == 0:
        return 0.0
    rate = float(np.clip(rate, _P_MIN, 1.0 - _P_MIN))
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _shifted(p, mid).mean() < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _reweighted(block: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Rows of level probabilities times ``exp(offsets)``, renormalised."""
    p = np.clip(np.asarray(block, np.float64), _P_MIN, None) * np.exp(offsets)
    return p / p.sum(axis=1, keepdims=True)


def _level_offsets(block: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Per-level log offsets that bring the block's mean probabilities to the
    level frequencies ``counts`` (iterative proportional fitting)."""
    k = block.shape[1]
    if len(block) == 0 or counts.sum() <= 0:
        return np.zeros(k)
    target = counts / counts.sum()
    # A level never seen in training is never drawn.
    offsets = np.where(target > 0, 0.0, -50.0)
    for _ in range(50):
        mean = _reweighted(block, offsets).mean(axis=0)
        step = np.log(np.maximum(target, _P_MIN) / np.maximum(mean, _P_MIN))
        offsets = np.where(target > 0, offsets + step, -50.0)
        if np.max(np.abs(step[target > 0])) < 1e-4:
            break
    return offsets - offsets[target > 0].max()


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
