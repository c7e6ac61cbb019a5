"""The computation that is "the model": torch networks, the scikit-learn-style
estimator, the model families, the preprocessor and the saved bundle. Imports
nothing from flows/ or tasks/."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.estimator import AutoencoderReducer

__all__ = ["AutoencoderReducer"]


def __getattr__(name: str) -> Any:
    # Imported on first use: naming the model families (models.families) must
    # not load torch, so the package itself imports nothing heavy.
    if name == "AutoencoderReducer":
        from models.estimator import AutoencoderReducer

        return AutoencoderReducer
    raise AttributeError(f"module 'models' has no attribute {name!r}")
