"""Settings of known datasets, importable without the ingest's heavy modules.

The CLI validates a run's configuration (which applies these presets) before
Prefect, pyarrow or torch are imported.
"""

from __future__ import annotations

#: Domain rules that hold on every row of the real weatherAUS.csv (145,460 rows).
#: Rain: the BoM sets RainToday = Yes iff Rainfall > 1 mm (exactly 1.0 is "No").
#: Cloud is in oktas 0-8 with 9 = "sky obscured", so the range is 0-9.
WEATHERAUS_RULES: tuple[str, ...] = (
    "MinTemp <= MaxTemp",
    "0 <= Humidity9am <= 100",
    "0 <= Humidity3pm <= 100",
    "0 <= Cloud9am <= 9",
    "0 <= Cloud3pm <= 9",
    "Rainfall >= 0",
    "if Rainfall > 1 then RainToday == Yes",
    "if Rainfall <= 1 then RainToday == No",
    "RainToday in {No, Yes}",
    "RainTomorrow in {No, Yes}",
)
