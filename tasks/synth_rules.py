"""The dataset's domain rules as a filter on generated rows.

Generated rows must pass the same rules ingest applies to real ones
(:mod:`tasks.validate`): a row that breaks one is dropped and drawn again. A
rule naming a column the generator does not write (a key such as ``Date``) is
left out: it says nothing about the generated columns.

Imports nothing but :mod:`tasks.validate`, so the served generator (which
ships ``tasks`` as code) can use it without Prefect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pyarrow as pa

from tasks.errors import ConfigError
from tasks.validate import CompiledRule, compile_rules, parse_rule


def applicable_rules(
    rules: Sequence[str], kinds: Mapping[str, str]
) -> list[CompiledRule]:
    """The rules over ``kinds``' columns only, compiled; a malformed rule is a
    ConfigError naming it."""
    out = []
    for text in rules:
        rule = parse_rule(text)
        try:
            (compiled,) = compile_rules([rule], kinds)
        except ConfigError:
            # Most often a column the generator does not write; a rule that is
            # wrong for another reason failed at ingest already.
            continue
        out.append(compiled)
    return out


def rule_filter(
    rules: Sequence[str], kinds: Mapping[str, str]
) -> Callable[[pa.Table], np.ndarray]:
    """``keep(table)``: True for each row that breaks none of the rules."""
    compiled = applicable_rules(rules, kinds)

    def keep(table: pa.Table) -> np.ndarray:
        ok = np.ones(table.num_rows, bool)
        cols = {c: table.column(c).combine_chunks() for c in kinds}
        for rule in compiled:
            broken = rule.violations(cols)
            if broken is not None:
                ok &= ~np.asarray(broken, bool)
        return ok

    return keep
