"""Kinds, keys and roles of the input's columns: pure functions of a sample.

* Kinds come from the first 10,000 rows: numeric if 95% of the non-null cells
  are finite numbers, date if 95% are ISO dates, timestamp likewise, else
  categorical (at most max(20, min(1000, rows / 2)) distinct values) or text
  (kept, not a feature). A column with no value in the sample takes the kind
  the rules compare it with, else numeric. Later junk cells reject their rows;
  the column is never retyped.
* Keys, unless given: the first date column plus the fewest categorical
  columns unique in the sample; none (whole-row ids) when there is no such
  combination.
* Roles: a key, the label, excluded, a feature as asked; unasked, every
  column that is not text or a (non-key) date is a feature.

Each function returns its warnings instead of collecting them in shared state.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from itertools import combinations
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models import columns as cols
from models.schema import ColumnSpec, Roles, TableSchema
from tasks.errors import ConfigError, InputError, SchemaError
from tasks.ingest.problems import show, show_names
from tasks.validate import (
    Rule,
    clean_text,
    combine_hashes,
    date_share,
    hash_text,
    implied_kind,
    numeric_share,
    timestamp_share,
)

SAMPLE_ROWS = 10_000  # rows used to infer kinds and keys
_PARSE_SHARE = 0.95  # share of non-null sample cells that must parse as numbers/dates
_CATEGORICAL_LIMIT = 1000
_MAX_KEY_TRIES = 5000
# Kinds that are never features unless asked for (keys or context columns).
_NOT_FEATURES = ("text", "date", "timestamp")


def check_required(
    names: Sequence[str], path: Path, roles: Roles, expected: TableSchema | None
) -> list[str]:
    """Check the asked-for columns against the header; return warnings.

    Raises
    ------
    SchemaError
        The expected schema's keys or features are not in the header.
    ConfigError
        The roles conflict with each other or with the expected schema.
    InputError
        A key, feature or label column is not in the header.
    """
    present = set(names)
    if expected is not None:
        missing = [c for c in expected.keys + expected.features if c not in present]
        if missing:
            raise SchemaError(
                f"{path} lacks columns the expected schema requires:"
                f" {', '.join(missing)}"
            )
        for arg, want, what in (
            (roles.keys, expected.keys, "keys"),
            (roles.features, expected.features, "features"),
        ):
            if arg is not None and list(arg) != want:
                raise ConfigError(
                    f"{what} {list(arg)} conflict with the expected schema's"
                    f" {what} {want}"
                )
        if roles.label is not None and roles.label != expected.label:
            raise ConfigError(
                f"label {roles.label!r} conflicts with the expected schema's"
                f" label {expected.label!r}"
            )
        return []
    shown = show_names(names)
    for what, asked in (
        ("key", roles.keys or ()),
        ("feature", roles.features or ()),
        ("label", (roles.label,) if roles.label else ()),
    ):
        for name in asked:
            if name not in present:
                raise InputError(
                    f"{path}: {what} column {show(name)} not found; the header"
                    f" has: {shown}"
                )
    counts = Counter(
        [
            *(roles.keys or ()),
            *(roles.features or ()),
            *roles.exclude,
            *((roles.label,) if roles.label else ()),
        ]
    )
    clash = [n for n, k in counts.items() if k > 1]
    if clash:
        raise ConfigError(
            f"column {show(clash[0])} is given more than one role (keys, features,"
            " exclude, label)"
        )
    unknown = [n for n in roles.exclude if n not in present]
    if unknown:
        return [f"exclude names columns not in the input: {', '.join(unknown)}"]
    return []


def build_schema(
    sample: Mapping[str, pa.Array],
    names: Sequence[str],
    path: Path,
    roles: Roles,
    expected: TableSchema | None,
    rules: Sequence[Rule],
    decimal_comma: bool,
) -> tuple[TableSchema, list[str]]:
    """The schema of the input (and warnings): ``expected``'s, else inferred."""
    if expected is not None:
        warnings = []
        extra = [n for n in names if n not in expected]
        if extra:
            warnings.append(
                f"{path}: columns not in the expected schema are ignored:"
                f" {', '.join(extra)}"
            )
        absent = [n for n in expected.names if n not in set(names)]
        if absent:
            warnings.append(
                f"{path}: optional schema columns are absent: {', '.join(absent)}"
            )
        schema = TableSchema(tuple(expected.column(n) for n in names if n in expected))
        return schema, warnings
    clean = {n: clean_text(a) for n, a in sample.items()}
    kinds = {
        n: infer_kind(clean[n], decimal_comma, implied_kind(rules, n, names))
        for n in names
    }
    warnings = []
    keys: Sequence[str] | None = roles.keys
    if keys is None:
        keys, warnings = infer_keys(clean, kinds, names, roles)
    return TableSchema(assign_roles(names, kinds, keys, roles)), warnings


def infer_kind(text: pa.Array, decimal_comma: bool, if_empty: str) -> str:
    """The kind of a column from its cleaned sample cells.

    ``if_empty`` is the kind of a column with no value in the sample (what the
    rules compare it with: nothing else to go by).
    """
    n = len(text) - text.null_count
    if n == 0:
        return if_empty
    if numeric_share(text, decimal_comma) >= _PARSE_SHARE:
        return "numeric"
    if date_share(text) >= _PARSE_SHARE:
        return "date"
    if timestamp_share(text) >= _PARSE_SHARE:
        return "timestamp"
    distinct = pc.count_distinct(text).as_py()
    limit = max(20, min(_CATEGORICAL_LIMIT, n // 2))
    return "categorical" if distinct <= limit else "text"


def infer_keys(
    clean: Mapping[str, pa.Array],
    kinds: Mapping[str, str],
    names: Sequence[str],
    roles: Roles,
) -> tuple[list[str], list[str]]:
    """Key columns unique in the sample (and a warning saying what was chosen)."""
    usable = [
        n
        for n in names
        if n not in roles.exclude
        and n != roles.label
        and clean[n].null_count == 0
        and len(clean[n])
    ]
    dates = [n for n in usable if kinds[n] in ("date", "timestamp")]
    rows = len(clean[names[0]])
    if not dates:
        return [], ["no key columns (no date column): _row_id hashes whole rows"]
    cats = [n for n in usable if kinds[n] == "categorical"]
    hashes = {n: hash_text(clean[n]) for n in [dates[0], *cats]}
    tries = 0
    for size in range(4):
        for combo in combinations(cats, size):
            tries += 1
            if tries > _MAX_KEY_TRIES:
                break
            h = combine_hashes([hashes[dates[0]], *[hashes[c] for c in combo]])
            if len(np.unique(h)) == len(h):
                keys = [dates[0], *combo]
                return keys, [
                    f"keys inferred from the first {rows} rows:"
                    f" ({', '.join(keys)}); pass keys=[...] to set them"
                ]
    return [], [
        f"no key columns: no date/categorical combination is unique in the first"
        f" {rows} rows; _row_id hashes whole rows"
    ]


def assign_roles(
    names: Sequence[str],
    kinds: Mapping[str, str],
    keys: Sequence[str],
    roles: Roles,
) -> list[ColumnSpec]:
    """Each column's spec: its kind and the role asked for or implied."""
    specs = []
    for name in names:
        kind = kinds[name]
        if name in keys:
            role = "key"
        elif name == roles.label:
            role = "label"
        elif name in roles.exclude:
            role = "excluded"
        elif roles.features is not None:
            role = "feature" if name in roles.features else "excluded"
            if role == "feature" and kind == "text":
                kind = "categorical"  # asked for as a feature: treat as one
        else:
            role = "excluded" if kind in _NOT_FEATURES else "feature"
        specs.append(ColumnSpec(name, kind, role))
    return specs


def check_output_names(schema: TableSchema, path: Path) -> None:
    """Key columns are copied into latent/, every column into ingested/: none
    may take the name of a column latentflow writes there."""
    for c in schema.columns:
        clash = c.name == cols.PARTITION or (
            c.role == "key" and cols.is_output_column(c.name)
        )
        if clash:
            what = "key column" if c.role == "key" else "column"
            raise InputError(
                f"{path}: {what} {show(c.name)} has the name of an output column;"
                f" reserved: {cols.describe_output_columns()}; rename it"
            )
