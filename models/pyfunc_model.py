"""The MLflow pyfunc, logged as "models from code".

MLflow stores this file with the model and runs it on load; the weights and
JSON travel as the ``model_dir`` artifact, so loading never unpickles. The
``models`` package itself is logged as ``code_paths``, so a registered model
loads in any environment with torch, pandas and pyarrow installed.

Because MLflow *executes* this file and the code copied with it, load a
registered model with :func:`models.serving.load_model`, which checks every
file against the digest the registry recorded at registration before any of it
runs (see docs/serving.md).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LatentflowPyfunc(PythonModel):
    """Raw rows in (strings, missing values and all); latent_*, recon_error,
    is_anomaly and error out, row for row as the batch pipeline scores them.

    Cells are parsed by the ingest's rules: null markers ("NA", "", "-") are
    missing, unseen categories map to unknown, and a row batch would reject
    ("abc" in a numeric column) gets null outputs and its reason in ``error``.
    A missing column the model needs raises a ValueError naming it."""

    def load_context(self, context: Any) -> None:
        from models.bundle import LatentModel

        # The registry's digest of the bundle, when the verified loader passes it.
        config = getattr(context, "model_config", None) or {}
        self.model = LatentModel.load(
            context.artifacts["model_dir"],
            expected_sha256=config.get("latentflow.bundle_sha256") or None,
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.model.predict_raw(model_input)


mlflow.models.set_model(LatentflowPyfunc())
