"""Anomaly benchmark on real data: ``make bench-anomaly``.

Run ``python -m benchmarks.anomaly`` from the repository root. It reads the
eleven labelled data sets in ``../shared/data/anomaly/*.npz`` (ADBench's
"classical" collection; the repository never holds them) and, for each data set
and each seed in 0, 1, 2, follows one fixed protocol:

1. ``train_test_split(X, y, test_size=0.3, stratify=y, random_state=seed)``;
2. a ``StandardScaler`` fitted on the train split;
3. every detector fitted on the scaled train split without labels, its
   anomalies left in;
4. the ROC-AUC of ``decision_function`` on the scaled test split.

Means over seeds, then over data sets. The detectors, all measured in the same
run: scikit-learn's ``IsolationForest``, PyOD's ``AutoEncoder``, ``ECOD`` and
``PCA`` at their defaults, and ``AutoencoderReducer()`` at its defaults. The
table shows the ROC-AUC and the fit seconds of each, side by side; the results
go to ``benchmarks/results/anomaly.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    environment,
    format_table,
    set_threads,
    write_json,
)

ANOMALY_DIR = REPO_ROOT.parent / "shared" / "data" / "anomaly"
SEEDS = (0, 1, 2)
TEST_SIZE = 0.3
OURS = "AutoencoderReducer"

Echo = Callable[[str], None]
Detector = Callable[[int], Any]


def _echo(line: str) -> None:
    print(line, flush=True)


def detectors(pyod: bool = True) -> dict[str, Detector]:
    """Name -> factory(seed) of an unfitted detector with ``decision_function``."""
    from sklearn.ensemble import IsolationForest

    from models.estimator import AutoencoderReducer

    class SkIsolationForest(IsolationForest):
        """scikit-learn's forest with PyOD's sign: higher means more anomalous."""

        def decision_function(self, X: Any) -> np.ndarray:
            return -self.score_samples(X)

    made: dict[str, Detector] = {
        "IsolationForest": lambda seed: SkIsolationForest(random_state=seed)
    }
    if pyod:
        from pyod.models.auto_encoder import AutoEncoder
        from pyod.models.ecod import ECOD
        from pyod.models.pca import PCA

        made["PyOD AutoEncoder"] = lambda seed: AutoEncoder(
            random_state=seed, verbose=0
        )
        made["ECOD"] = lambda seed: ECOD()
        made["PCA"] = lambda seed: PCA(random_state=seed)
    made[OURS] = lambda seed: AutoencoderReducer(device="cpu", random_state=seed)
    return made


def _finite(scores: np.ndarray) -> tuple[np.ndarray, int]:
    """Scores with NaN/inf replaced by the largest float, and how many there were.

    PyOD's PCA divides by each component's explained variance; on data with
    collinear columns (cardiotocography) some are ~0 and the score overflows.
    Those rows rank as most anomalous, which is what an infinite score says.
    """
    bad = ~np.isfinite(scores)
    if not bad.any():
        return scores, 0
    big = np.finfo(np.float64).max
    return np.nan_to_num(scores, nan=big, posinf=big, neginf=-big), int(bad.sum())


def load_sets(root: Path, names: Sequence[str] | None = None) -> dict[str, Any]:
    """``{name: (X, y)}`` for every ``*.npz`` under ``root`` (or those named)."""
    out = {}
    for path in sorted(root.glob("*.npz")):
        if names and path.stem not in names:
            continue
        with np.load(path) as data:  # plain arrays only: no pickle
            out[path.stem] = (data["X"].astype(np.float64), data["y"].astype(int))
    return out


def evaluate(
    sets: dict[str, Any],
    made: dict[str, Detector],
    seeds: Sequence[int] = SEEDS,
    echo: Echo = _echo,
) -> dict[str, Any]:
    """Run the protocol; return per-set, per-detector AUC and fit seconds."""
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    per_set: dict[str, dict[str, Any]] = {}
    for name, (X, y) in sets.items():
        runs: dict[str, dict[str, list[float]]] = {
            d: {"roc_auc": [], "fit_seconds": [], "non_finite": []} for d in made
        }
        for seed in seeds:
            x_tr, x_te, _, y_te = train_test_split(
                X, y, test_size=TEST_SIZE, stratify=y, random_state=seed
            )
            scaler = StandardScaler().fit(x_tr)
            x_tr, x_te = scaler.transform(x_tr), scaler.transform(x_te)
            for det, factory in made.items():
                model = factory(seed)
                t0 = time.perf_counter()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model.fit(x_tr)
                seconds = time.perf_counter() - t0
                scores, bad = _finite(np.asarray(model.decision_function(x_te)))
                runs[det]["roc_auc"].append(float(roc_auc_score(y_te, scores)))
                runs[det]["fit_seconds"].append(seconds)
                runs[det]["non_finite"].append(bad)
        per_set[name] = {
            "n_rows": int(X.shape[0]),
            "n_features": int(X.shape[1]),
            "anomaly_share": float(y.mean()),
            "detectors": {
                d: {
                    "roc_auc": float(np.mean(r["roc_auc"])),
                    "roc_auc_per_seed": r["roc_auc"],
                    "fit_seconds": float(np.sum(r["fit_seconds"])),
                    "non_finite_scores": int(np.sum(r["non_finite"])),
                }
                for d, r in runs.items()
            },
        }
        echo(
            f"  {name}: "
            + ", ".join(
                f"{d} {v['roc_auc']:.3f} ({v['fit_seconds']:.1f}s)"
                for d, v in per_set[name]["detectors"].items()
            )
        )
    mean = {
        d: float(np.mean([s["detectors"][d]["roc_auc"] for s in per_set.values()]))
        for d in made
    }
    total = {
        d: float(sum(s["detectors"][d]["fit_seconds"] for s in per_set.values()))
        for d in made
    }
    return {"datasets": per_set, "mean_roc_auc": mean, "total_fit_seconds": total}


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Ours must beat every baseline on the mean and fit no slower than PyOD AE."""
    mean, total = result["mean_roc_auc"], result["total_fit_seconds"]
    out = []
    for det, auc in mean.items():
        if det == OURS:
            continue
        out.append(
            {
                "name": f"mean ROC-AUC > {det}",
                "value": f"{mean[OURS]:.4f}",
                "goal": f"> {auc:.4f}",
                "met": bool(mean[OURS] > auc),
            }
        )
    if "PyOD AutoEncoder" in total:
        theirs = total["PyOD AutoEncoder"]
        out.append(
            {
                "name": "total fit seconds <= PyOD AutoEncoder",
                "value": f"{total[OURS]:.1f}",
                "goal": f"<= {theirs:.1f}",
                "met": bool(total[OURS] <= theirs),
            }
        )
    return out


def report(result: dict[str, Any], echo: Echo = _echo) -> None:
    """Print the per-set table (AUC and fit seconds side by side) and targets."""
    dets = list(result["mean_roc_auc"])
    headers = ["data set", "rows", "feat"]
    for d in dets:
        headers += [d, "s"]
    rows = []
    for name, s in result["datasets"].items():
        row: list[Any] = [name, s["n_rows"], s["n_features"]]
        for d in dets:
            v = s["detectors"][d]
            row += [f"{v['roc_auc']:.4f}", f"{v['fit_seconds']:.1f}"]
        rows.append(row)
    mean_row: list[Any] = ["mean", "", ""]
    for d in dets:
        mean_row += [
            f"{result['mean_roc_auc'][d]:.4f}",
            f"{result['total_fit_seconds'][d]:.1f}",
        ]
    rows.append(mean_row)
    echo(
        f"\nROC-AUC on the test split (mean of seeds {list(SEEDS)}) and fit seconds "
        "(sum over seeds); mean row: mean ROC-AUC, total fit seconds"
    )
    echo(format_table(headers, rows))
    echo("\ntargets")
    echo(
        format_table(
            ["target", "value", "goal", "status"],
            [
                [t["name"], t["value"], t["goal"], "met" if t["met"] else "MISSED"]
                for t in result["targets"]
            ],
        )
    )


def run(
    root: Path,
    out: Path | None,
    *,
    names: Sequence[str] | None = None,
    seeds: Sequence[int] = SEEDS,
    pyod: bool = True,
    echo: Echo = _echo,
) -> dict[str, Any]:
    """Evaluate every detector on the data sets under ``root``; write ``out``."""
    env = environment()
    echo(
        f"torch {env['torch']}, {env['torch_threads']} threads, {env['cpu_count']} "
        f"cores; data {root}"
    )
    t0 = time.perf_counter()
    sets = load_sets(root, names)
    result = evaluate(sets, detectors(pyod), seeds, echo)
    result["targets"] = targets(result)
    result["seeds"] = list(seeds)
    result["environment"] = env
    result["environment"]["load_average_end"] = environment()["load_average"]
    result["wall_seconds"] = time.perf_counter() - t0
    report(result, echo)
    echo(f"\ntotal wall time {result['wall_seconds']:.0f}s")
    if out is not None:
        write_json(out, result)
        echo(f"wrote {out}")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.anomaly", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--data", type=Path, default=ANOMALY_DIR, help="*.npz directory")
    ap.add_argument(
        "--out", type=Path, default=RESULTS_DIR / "anomaly.json", help="JSON output"
    )
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--no-pyod", action="store_true", help="skip the PyOD detectors")
    args = ap.parse_args(argv)
    if not args.data.is_dir() or not any(args.data.glob("*.npz")):
        # Not an error: the data sets live outside the repository.
        print(
            f"skipped: no anomaly data sets (*.npz) at {args.data}; the benchmark "
            "reads ../shared/data/anomaly/ relative to the repository root (pass "
            "--data DIR for another copy)",
            file=sys.stderr,
        )
        return 0
    note = set_threads(args.threads)
    print(f"torch threads: {note}", flush=True)
    run(args.data, args.out, pyod=not args.no_pyod)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
