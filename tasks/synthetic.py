"""A deterministic generator of weatherAUS-shaped data.

``make demo``, tests that must run without ``../shared`` and the benchmarks use
it. Rows have the real file's 23 columns, key layout (one row per Date and
Location), missing-value patterns (whole locations without Sunshine or
Evaporation, scattered gaps) and correlated weather, so an autoencoder has real
structure to learn and the output is the same for the same seed on any machine.
"""

from __future__ import annotations

from datetime import date
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from tasks.storage import atomic_path

LOCATIONS = [
    "Adelaide",
    "Albany",
    "Albury",
    "AliceSprings",
    "BadgerysCreek",
    "Ballarat",
    "Bendigo",
    "Brisbane",
    "Cairns",
    "Canberra",
    "Cobar",
    "CoffsHarbour",
    "Dartmoor",
    "Darwin",
    "GoldCoast",
    "Hobart",
    "Katherine",
    "Launceston",
    "Melbourne",
    "MelbourneAirport",
    "Mildura",
    "Moree",
    "MountGambier",
    "MountGinini",
    "Newcastle",
    "Nhil",
    "NorahHead",
    "NorfolkIsland",
    "Nuriootpa",
    "PearceRAAF",
    "Penrith",
    "Perth",
    "PerthAirport",
    "Portland",
    "Richmond",
    "Sale",
    "SalmonGums",
    "Sydney",
    "SydneyAirport",
    "Townsville",
    "Tuggeranong",
    "Uluru",
    "WaggaWagga",
    "Walpole",
    "Watsonia",
    "Williamtown",
    "Witchcliffe",
    "Wollongong",
    "Woomera",
]
COMPASS = [
    "N",
    "NNE",
    "NE",
    "ENE",
    "E",
    "ESE",
    "SE",
    "SSE",
    "S",
    "SSW",
    "SW",
    "WSW",
    "W",
    "WNW",
    "NW",
    "NNW",
]
COLUMNS = [
    "Date",
    "Location",
    "MinTemp",
    "MaxTemp",
    "Rainfall",
    "Evaporation",
    "Sunshine",
    "WindGustDir",
    "WindGustSpeed",
    "WindDir9am",
    "WindDir3pm",
    "WindSpeed9am",
    "WindSpeed3pm",
    "Humidity9am",
    "Humidity3pm",
    "Pressure9am",
    "Pressure3pm",
    "Cloud9am",
    "Cloud3pm",
    "Temp9am",
    "Temp3pm",
    "RainToday",
    "RainTomorrow",
]
START = date(2007, 11, 1)
_CHUNK = 100_000


def _location_profile(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 7])
    n = len(LOCATIONS)
    return {
        "base": rng.uniform(12.0, 26.0, n),
        "amp": rng.uniform(2.0, 9.0, n),
        "wet": rng.normal(0.0, 0.5, n),
        "wind_dir": rng.uniform(0, 16, n),
        "no_sun": rng.random(n) < 0.4,
        "no_cloud": rng.random(n) < 0.3,
    }


def _chunk(start_row: int, n: int, seed: int, prof: dict[str, np.ndarray]) -> pa.Table:
    rng = np.random.default_rng([seed, start_row])
    i = np.arange(start_row, start_row + n)
    n_loc = len(LOCATIONS)
    day, loc = np.divmod(i, n_loc)
    days = (np.datetime64(START, "D") + day).astype("datetime64[D]")
    doy = (days - days.astype("datetime64[Y]")).astype(np.int64)
    season = np.cos(2 * np.pi * (doy - 15) / 365.25)  # +1 in austral summer

    temp_anom = rng.normal(0, 1, n)
    moist = rng.normal(0, 1, n) + prof["wet"][loc]
    wind = rng.normal(0, 1, n)

    def noise(s: float) -> np.ndarray:
        return rng.normal(0, s, n)

    min_t = prof["base"][loc] - 7 + prof["amp"][loc] * season + 3 * temp_anom + noise(1)
    max_t = min_t + np.maximum(0.5, 10 - 2.5 * moist + 2 * season + noise(1.5))
    rain = np.where(moist > 0.4, np.expm1(np.clip(1.3 * moist + noise(0.5), 0, 6)), 0.0)
    humid9 = np.clip(68 + 12 * moist - 4 * season + noise(6), 1, 100)
    humid3 = np.clip(humid9 - 18 + 6 * moist + noise(6), 1, 100)
    cloud9 = np.clip(np.round(4 + 2.2 * moist + noise(1.2)), 0, 8)
    cloud3 = np.clip(np.round(cloud9 + noise(1.2)), 0, 8)
    sun = np.clip(8 + 3 * season - 2.5 * moist + noise(1.5), 0, 14)
    evap = np.clip(2 + 0.25 * max_t - 1.5 * moist + noise(1.5), 0, None)
    pres9 = 1017 - 4 * moist - 3 * wind - 3 * season + noise(3)
    pres3 = pres9 - 2.5 + noise(1.5)
    gust = np.clip(38 + 12 * wind + 3 * moist + noise(6), 6, None)
    ws9 = np.clip(np.round(13 + 6 * wind + noise(4)), 0, None)
    ws3 = np.clip(np.round(18 + 6 * wind + noise(4)), 0, None)
    temp9 = min_t + 0.45 * (max_t - min_t) + noise(1)
    temp3 = max_t - 1.0 + noise(0.8)
    rain_tomorrow = rng.random(n) < 1 / (1 + np.exp(-(1.6 * moist - 1.6)))

    def direction(shift: float) -> np.ndarray:
        k = np.floor(prof["wind_dir"][loc] + shift + 2.5 * wind + noise(2.0)) % 16
        return np.asarray(COMPASS, dtype=object)[k.astype(np.int64)]

    def with_gaps(
        x: np.ndarray, rate: float, extra: np.ndarray | None = None
    ) -> pa.Array:
        mask = rng.random(n) < rate
        if extra is not None:
            mask |= extra
        return pa.array(np.round(x, 1), mask=mask, type=pa.float64())

    no_sun = prof["no_sun"][loc]
    no_cloud = prof["no_cloud"][loc]
    rain_arr = with_gaps(rain, 0.02)
    rain_missing = np.asarray(rain_arr.is_null())
    # Decided on the rounded value that is written, as the BoM does (> 1 mm).
    yes_no = np.where(np.round(rain, 1) > 1.0, "Yes", "No").astype(object)
    tomorrow = np.where(rain_tomorrow, "Yes", "No").astype(object)
    cols = {
        "Date": pa.array(days, type=pa.date32()),
        "Location": pa.array(
            np.asarray(LOCATIONS, dtype=object)[loc], type=pa.string()
        ),
        "MinTemp": with_gaps(min_t, 0.01),
        "MaxTemp": with_gaps(max_t, 0.01),
        "Rainfall": rain_arr,
        "Evaporation": with_gaps(evap, 0.05, no_sun),
        "Sunshine": with_gaps(sun, 0.05, no_sun),
        "WindGustDir": pa.array(direction(0), mask=rng.random(n) < 0.06),
        "WindGustSpeed": with_gaps(np.round(gust), 0.06),
        "WindDir9am": pa.array(direction(-1), mask=rng.random(n) < 0.07),
        "WindDir3pm": pa.array(direction(1), mask=rng.random(n) < 0.03),
        "WindSpeed9am": with_gaps(ws9, 0.01),
        "WindSpeed3pm": with_gaps(ws3, 0.02),
        "Humidity9am": with_gaps(np.round(humid9), 0.02),
        "Humidity3pm": with_gaps(np.round(humid3), 0.03),
        "Pressure9am": with_gaps(pres9, 0.1),
        "Pressure3pm": with_gaps(pres3, 0.1),
        "Cloud9am": with_gaps(cloud9, 0.1, no_cloud),
        "Cloud3pm": with_gaps(cloud3, 0.1, no_cloud),
        "Temp9am": with_gaps(temp9, 0.01),
        "Temp3pm": with_gaps(temp3, 0.02),
        "RainToday": pa.array(yes_no, mask=rain_missing, type=pa.string()),
        "RainTomorrow": pa.array(tomorrow, mask=rng.random(n) < 0.02, type=pa.string()),
    }
    return pa.table(cols)


def weatheraus_like(n_rows: int, seed: int = 0) -> pa.Table:
    """Return ``n_rows`` of weatherAUS-shaped data as a typed Arrow table."""
    prof = _location_profile(seed)
    chunks = [
        _chunk(s, min(_CHUNK, n_rows - s), seed, prof) for s in range(0, n_rows, _CHUNK)
    ]
    return pa.concat_tables(chunks) if chunks else _chunk(0, 0, seed, prof)


def write_weatheraus_like_csv(path: Path, n_rows: int, seed: int = 0) -> Path:
    """Stream ``n_rows`` generated rows to a CSV at ``path`` (atomically).

    Memory stays flat at any size: rows are generated and written in chunks.
    Missing values are written as ``NA``, as in the Kaggle file.
    """
    prof = _location_profile(seed)
    with atomic_path(Path(path)) as tmp, open(tmp, "wb") as fh:
        fh.write((",".join(COLUMNS) + "\n").encode())
        opts = pacsv.WriteOptions(include_header=False, quoting_style="none")
        for s in range(0, n_rows, _CHUNK):
            t = _chunk(s, min(_CHUNK, n_rows - s), seed, prof)
            t = pa.table(
                {c: t[c].cast(pa.string()).fill_null("NA") for c in t.column_names}
            )
            pacsv.write_csv(t, fh, write_options=opts)
    return Path(path)
