"""The MLflow pyfunc, logged as "models from code".

MLflow stores this file with the model and runs it on load; the weights and
JSON travel as the ``model_dir`` artifact, so loading never unpickles. The
``models`` package itself is logged as ``code_paths``, so a registered model
loads in any environment with torch, pandas and pyarrow installed.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class LatentflowPyfunc(PythonModel):
    """Raw rows in (strings, missing values and all); latent_*, recon_error,
    is_anomaly out. Unseen categories map to unknown; a missing column the model
    needs raises a ValueError naming it."""

    def load_context(self, context: Any) -> None:
        from models.bundle import LatentModel

        self.model = LatentModel.load(context.artifacts["model_dir"])

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        return self.model.predict_frame(model_input)


mlflow.models.set_model(LatentflowPyfunc())
