"""Where one run writes, fixed once before anything is read or written."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path


@dataclass(frozen=True)
class RunTarget:
    """The run's dataset, partition date, data dir and registered model name."""

    dataset: str
    run_date: date
    data_dir: Path
    model_name: str

    @property
    def tag(self) -> str:
        """The suffix of the run's task and subflow run names."""
        return f"{self.dataset}-{self.run_date}"

    @property
    def cache_dir(self) -> Path:
        """Where registered model versions are fetched to."""
        return self.data_dir / ".cache" / "models"
