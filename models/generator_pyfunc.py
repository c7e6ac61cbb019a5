"""The generator's MLflow pyfunc, logged as "models from code".

Input: a frame with ``rows`` and ``seed`` (the first row is used). Output: that
many synthetic raw rows, passing the dataset's rules and never a copy of a
training row, the same for the same seed. The generator's files travel as the
``model_dir`` artifact (state_dict + JSON, checksummed): nothing is unpickled.
Load a registered version through :func:`models.serving.load_model`, which
verifies every file before MLflow runs this one (docs/serving.md).
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class GeneratorPyfunc(PythonModel):
    """``{"rows": n, "seed": s}`` in; n synthetic raw rows out."""

    def load_context(self, context: Any) -> None:
        from models.synthesis import TableGenerator

        config = getattr(context, "model_config", None) or {}
        self.generator = TableGenerator.load(
            context.artifacts["model_dir"],
            expected_sha256=config.get("latentflow.bundle_sha256") or None,
        )

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict | None = None
    ) -> pd.DataFrame:
        from models.synthesis import generate
        from tasks.synth_rules import rule_filter

        frame = pd.DataFrame(model_input)
        if frame.empty or "rows" not in frame:
            raise ValueError("the input needs a 'rows' column (and optionally 'seed')")
        rows = int(frame["rows"].iloc[0])
        seed = int(frame["seed"].iloc[0]) if "seed" in frame else 0
        if rows <= 0:
            raise ValueError(f"rows must be a positive integer, got {rows}")
        gen = self.generator
        keep = rule_filter(gen.rules, gen.kinds())
        return generate(gen, rows, seed, keep).table.to_pandas()


mlflow.models.set_model(GeneratorPyfunc())
