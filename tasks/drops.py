"""Date-templated inputs: each night reads its own drop.

A feed delivers a file or a folder per day. ``input`` names it with
``{run_date}`` (ISO date) or ``{run_date:FORMAT}`` (strftime), e.g.
``drops/{run_date}.csv`` or ``drops/{run_date:%Y/%m/%d}/*.parquet``; the run
renders it for its run date. Kept free of Prefect and pyarrow: the CLI and
the config use it before any engine starts.
"""

from __future__ import annotations

import re
from datetime import date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from tasks.errors import ConfigError, InputError, MissingDropError
from tasks.sources import resolve_sources

# ``{run_date}`` or ``{run_date:%Y/%m/%d}``; any other ``{...}`` is an error,
# so a typo never silently becomes a literal path.
_FIELD = re.compile(r"\{([^{}]*)\}")
_NAME = "run_date"
#: A backfill is for history, not for decades of it by a typo.
MAX_BACKFILL_DAYS = 3660


def is_template(text: str) -> bool:
    """Whether ``text`` holds a ``{run_date...}`` field."""
    return _FIELD.search(text) is not None


def render_input(template: str, run_date: date) -> str:
    """``template`` with each ``{run_date[:FORMAT]}`` replaced for ``run_date``."""

    def one(match: re.Match[str]) -> str:
        name, _, fmt = match.group(1).partition(":")
        if name != _NAME:
            raise ConfigError(
                f"input {template!r}: unknown field {{{match.group(1)}}};"
                " expected {run_date} or {run_date:FORMAT} (strftime)"
            )
        if not fmt:
            return run_date.isoformat()
        rendered = run_date.strftime(fmt)
        if rendered == fmt and "%" not in fmt:
            raise ConfigError(
                f"input {template!r}: {{run_date:{fmt}}} has no strftime code"
                " such as %Y, %m or %d"
            )
        return rendered

    return _FIELD.sub(one, template)


def template_stem(template: str) -> str:
    """The template's path before its first field or wildcard: what names the
    dataset (``drops/{run_date}.csv`` -> ``drops``)."""
    found = [i for i in (template.find("{"), template.find("*")) if i >= 0]
    cut = min(found, default=len(template))
    head = template[:cut].rstrip("/-_. ")
    return head or "data"


def check_drop(template: str, run_date: date) -> list[Path]:
    """The files of ``run_date``'s drop; :class:`MissingDropError` if there are none.

    Only the drop of the run date is ever looked for: a missing night never
    falls back to an older file.
    """
    expected = render_input(template, run_date)
    try:
        return resolve_sources(expected)
    except InputError:  # nothing there, or a folder without data files
        raise MissingDropError(
            f"no drop for {run_date}: expected {expected} (input template {template})",
            expected=expected,
        ) from None


def local_date(moment: datetime, timezone: str | None) -> date:
    """The calendar date of ``moment`` in ``timezone`` (None: the host's)."""
    if timezone is None:
        return moment.astimezone().date()
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"timezone {timezone!r} is not a known IANA zone") from None
    return moment.astimezone(zone).date()


def run_dates(start: date, end: date) -> list[date]:
    """Every date of a backfill from ``start`` to ``end``, both included."""
    if end < start:
        raise ConfigError(
            f"backfill range is empty: --to {end} is before --from {start}"
        )
    days = (end - start).days + 1
    if days > MAX_BACKFILL_DAYS:
        raise ConfigError(
            f"backfill of {days} days is more than {MAX_BACKFILL_DAYS}; split it"
        )
    return [start + timedelta(days=i) for i in range(days)]
