"""Names of the columns latentflow writes: the one list of them.

The scorer (:func:`tasks.score.output_schema`), the pyfunc output
(:meth:`models.bundle.LatentModel.predict_frame`) and ingest's check of input
names all use these, so an input column can never shadow an output column.
"""

from __future__ import annotations

import re

ROW_ID = "_row_id"
RECON_ERROR = "recon_error"
#: The score's percentile among the model's training scores (0..1).
ANOMALY_SCORE = "anomaly_score"
#: Why a flagged row was flagged: up to three source columns (models.explain).
EXPLANATION = "explanation"
IS_ANOMALY = "is_anomaly"
CLUSTER = "cluster"
MODEL_NAME = "model_name"
MODEL_VERSION = "model_version"
#: The hive partition column of every output dataset (``run_date=<date>/``).
PARTITION = "run_date"
LATENT_PREFIX = "latent_"

#: Fixed names in the latent/ output besides the key columns and latent_<i>.
OUTPUT_COLUMNS: tuple[str, ...] = (
    ROW_ID,
    RECON_ERROR,
    ANOMALY_SCORE,
    IS_ANOMALY,
    CLUSTER,
    EXPLANATION,
    MODEL_NAME,
    MODEL_VERSION,
    PARTITION,
)
_LATENT_RE = re.compile(rf"{LATENT_PREFIX}\d+")


def latent_name(i: int) -> str:
    return f"{LATENT_PREFIX}{i}"


def latent_names(latent_dim: int) -> list[str]:
    """``latent_0 .. latent_<latent_dim - 1>``."""
    return [latent_name(i) for i in range(latent_dim)]


def score_columns(latent_dim: int, with_cluster: bool) -> list[str]:
    """The per-row outputs of scoring, in output order: ``latent_*``,
    ``recon_error``, ``anomaly_score``, ``is_anomaly`` and, with clusters,
    ``cluster`` (the ``explanation`` column follows them, see
    :data:`EXPLANATION`).

    The one definition of that order: the latent/ Parquet schema, the pyfunc
    output and the MLflow signature are all built from it.
    """
    return [
        *latent_names(latent_dim),
        RECON_ERROR,
        ANOMALY_SCORE,
        IS_ANOMALY,
        *([CLUSTER] if with_cluster else []),
    ]


def is_output_column(name: str) -> bool:
    """True for a name latentflow writes next to the key columns."""
    return name in OUTPUT_COLUMNS or _LATENT_RE.fullmatch(name) is not None


def describe_output_columns() -> str:
    """The reserved names, as an error message lists them."""
    return ", ".join([ROW_ID, f"{LATENT_PREFIX}<n>", *OUTPUT_COLUMNS[1:]])
