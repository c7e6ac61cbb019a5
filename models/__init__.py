"""The computation that is "the model": torch networks, the scikit-learn-style
estimator, the preprocessor and the saved bundle. Imports nothing from flows/ or
tasks/."""

from models.estimator import AutoencoderReducer
from models.serving import load_model

__all__ = ["AutoencoderReducer", "load_model"]
