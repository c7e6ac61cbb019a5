"""Why a row is rejected, and how ingest words it.

Cell problems come from :mod:`models.cells` (shared with serving); rules and
duplicate keys use the same shape (:class:`Problem`: a row mask, a category
counted in ``IngestResult.reject_reasons``, and a per-row description for
``_reject_reason``). The one reject-share check of both ingest paths is
:func:`check_reject_share`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from models.cells import SHOW_CHARS, CellProblem, cell_problems
from models.cells import show as show
from models.schema import ColumnSpec
from tasks.errors import InputError
from tasks.validate import CompiledRule, Parsed

Problem = CellProblem


def first_line(exc: BaseException) -> str:
    """The first line of a library's message, capped: it may quote the input."""
    text = str(exc).strip().splitlines()
    if not text:
        return type(exc).__name__
    line = text[0]
    return line if len(line) <= SHOW_CHARS * 2 else line[: SHOW_CHARS * 2] + "..."


def clip(value: object, limit: int = SHOW_CHARS) -> str:
    """``str(value)`` cut to ``limit`` characters, for values in reject reasons."""
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show_names(names: Sequence[str], budget: int = 160) -> str:
    """Column names for "the header has: ..." messages, ``budget`` characters
    at most: plain ones as they are, others repr-escaped and capped."""

    def one(name: str) -> str:
        return name if name.isprintable() and len(name) <= 40 else show(name, 40)

    shown: list[str] = []
    used = 0
    for name in names:
        text = one(name)
        if used + len(text) > budget:
            return ", ".join(shown) + f" ... ({len(names)} columns)"
        shown.append(text)
        used += len(text) + 2
    return ", ".join(shown)


def header_mismatch(path: Path, names: list[str], first: Path, want: list[str]) -> str:
    """The message for a file whose columns differ from the first file's."""
    missing = [n for n in want if n not in names]
    extra = [n for n in names if n not in want]
    if not missing and not extra:
        return f"{path}: same columns as {first} but in a different order"
    parts = []
    if missing:
        parts.append(f"missing {show_names(missing)}")
    if extra:
        parts.append(f"extra {show_names(extra)}")
    return f"{path}: header differs from {first}: {'; '.join(parts)}"


def field_count_reason(width: int, found: int) -> str:
    """The reason (and category) of a CSV row with a wrong number of fields."""
    return f"expected {width} fields, found {found}"


def column_problems(spec: ColumnSpec, p: Parsed) -> list[Problem]:
    """Problems of one parsed column: junk cells, a missing key."""
    return cell_problems(spec.name, spec.kind, spec.role, p)


def rule_problem(
    rule: CompiledRule, broken: np.ndarray, parsed: Mapping[str, Parsed]
) -> Problem:
    """The rows that break ``rule``, each described with its values."""

    def describe(idx: np.ndarray) -> list[str]:
        take = pa.array(idx)
        vals = {c: parsed[c].text.take(take).to_pylist() for c in rule.columns}
        return [
            f"rule {rule.text!r} violated ("
            + ", ".join(f"{c}={clip(vals[c][j])}" for c in rule.columns)
            + ")"
            for j in range(len(idx))
        ]

    return Problem(broken, f"rule {rule.text!r}", describe)


def check_reject_share(
    source: str,
    rows_rejected: int,
    rows_in: int,
    reasons: Counter[str],
    max_reject_fraction: float,
) -> None:
    """Fail the run when more than ``max_reject_fraction`` of the rows are rejected.

    Raises
    ------
    InputError
        Naming the counts and the three most common reasons.
    """
    share = rows_rejected / rows_in
    if share > max_reject_fraction:
        top = "; ".join(f"{r} ({k})" for r, k in reasons.most_common(3))
        raise InputError(
            f"{source}: {rows_rejected} of {rows_in} rows rejected ({share:.1%}),"
            f" more than max_reject_fraction {max_reject_fraction:.1%}; top"
            f" reasons: {top}; nothing was written"
        )
