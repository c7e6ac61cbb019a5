"""Type inference, row hashing and domain rules for ingestion: pure, vectorised helpers.

Cell parsing itself lives in :mod:`models.cells`, shared with the served model.

Everything here works on whole pyarrow arrays (one CSV block at a time); per-row
Python runs only to word the reasons of rejected rows.

Domain rules are a tiny grammar, parsed here (never ``eval``)::

    A <= B        A < B        A >= B        A > B        A == B        A != B
    lo <= A <= hi               (or hi >= A >= lo)
    A in {x, y, z}
    if <comparison or set test> then <comparison or set test>

Operands are column names (bare, or in backquotes when they contain spaces),
numbers, or quoted strings. A bare word that is not a column is a string literal
when compared with a categorical/text column (``RainToday == Yes``), otherwise it
is an unknown column. A row whose operands are missing passes the rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from models.cells import (
    _DATE_RE,
    _FLOAT_RE,
    _NULL_STR,
    _TIMESTAMP_RE,
    NULL_MARKERS,
    Parsed,
    _mask,
    clean_text,
    parse_date,
    parse_numeric,
    parse_text,
    parse_timestamp,
)
from tasks.errors import ConfigError


def timestamp_share(text: pa.Array) -> float:
    """Share of the non-null cells that are zoned ISO date-times (inference)."""
    n = len(text) - text.null_count
    if n == 0:
        return 0.0
    matching = pc.sum(pc.match_substring_regex(text, _TIMESTAMP_RE)).as_py() or 0
    if matching < _MIN_SHARE_FOR_CAST * n:
        return matching / n
    return (len(text) - parse_timestamp(text).values.null_count) / n


def numeric_share(text: pa.Array, decimal_comma: bool = False) -> float:
    """Share of the non-null cells that are finite numbers (for type inference).

    ``text`` is cleaned (stripped, markers as nulls). A clean numeric column
    takes one fast cast; a failing cast costs time per bad cell, so columns
    whose first cells are not numbers go straight to a pattern test.
    """
    n = len(text) - text.null_count
    if n == 0:
        return 0.0
    if decimal_comma:
        text = pc.replace_substring(text, ",", ".", max_replacements=1)
    head = text.slice(0, 64)
    looks_numeric = (
        pc.sum(pc.match_substring_regex(head, _FLOAT_RE)).as_py() or 0
    ) >= (len(head) - head.null_count) / 2
    if looks_numeric:
        try:
            values = pc.cast(text, pa.float64())
            return (pc.sum(pc.is_finite(values)).as_py() or 0) / n
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    ok = pc.match_substring_regex(text, _FLOAT_RE)
    matching = pc.sum(ok).as_py() or 0
    if matching < _MIN_SHARE_FOR_CAST * n:
        return matching / n
    values = pc.cast(pc.if_else(ok, text, _NULL_STR), pa.float64())
    return (pc.sum(pc.is_finite(values)).as_py() or 0) / n


def date_share(text: pa.Array) -> float:
    """Share of the non-null cells that are ISO dates (for type inference)."""
    n = len(text) - text.null_count
    if n == 0:
        return 0.0
    matching = pc.sum(pc.match_substring_regex(text, _DATE_RE)).as_py() or 0
    if matching < _MIN_SHARE_FOR_CAST * n:
        return matching / n
    return (len(text) - parse_date(text).values.null_count) / n


_MIN_SHARE_FOR_CAST = 0.5  # below this share of matching cells, skip exact parsing


# ------------------------------------------------------------------------- hashing

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_SEED = np.uint64(0x6C61746E74666C77)  # "latntflw"


def mix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised (uint64 arithmetic wraps by design)."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def hash_text(arr: pa.Array) -> np.ndarray:
    """A 64-bit hash of each string's UTF-8 bytes (nulls hash like "").

    Pure numpy over Arrow's buffers, so ids do not depend on a library's hash
    implementation: the bytes are read 8 at a time (little-endian words, the
    tail zero-padded) and folded with splitmix64, seeded with the length. Only
    the distinct values are hashed (a dictionary encode is cheap in Arrow), and
    work is proportional to their total bytes, even with one huge cell.
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if arr.type != pa.string():
        arr = arr.cast(pa.string())
    if arr.null_count:
        arr = pc.fill_null(arr, "")
    encoded = pc.dictionary_encode(arr)
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return _hash_distinct(encoded.dictionary)[indices]


def _hash_distinct(arr: pa.Array) -> np.ndarray:
    # Each 8-byte word is mixed with its position and the mixes are summed
    # (wrapping), so all words of all strings are hashed in one vectorised pass
    # with no Python loop, whatever the lengths.
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int32, count=n + 1, offset=arr.offset * 4)
    starts = offsets[:-1].astype(np.int64)
    lengths = np.diff(offsets).astype(np.int64)
    h = mix64(lengths.astype(np.uint64) ^ _SEED)
    if bufs[2] is None or not lengths.any():
        return mix64(h)
    data = np.frombuffer(bufs[2], dtype=np.uint8)
    padded = np.zeros(len(data) + 8, np.uint8)
    padded[: len(data)] = data
    # Every byte offset as the start of an (unaligned) little-endian 8-byte word.
    words = np.ndarray(shape=(len(data),), dtype="<u8", buffer=padded, strides=(1,))
    n_words = (lengths + 7) // 8
    row = np.repeat(np.arange(n), n_words)
    first = np.cumsum(n_words) - n_words
    j = np.arange(len(row), dtype=np.int64) - first[row]
    left = lengths[row] - 8 * j
    value = words[starts[row] + 8 * j]
    bits = (np.minimum(left, 8) * 8).astype(np.uint64)
    # Zero the bytes past the string's end (bits == 64 keeps the whole word).
    keep = np.where(
        bits >= 64, ~np.uint64(0), (np.uint64(1) << (bits & np.uint64(63))) - 1
    )
    mixed = mix64((value & keep) ^ mix64(j.astype(np.uint64) * _GOLDEN + _SEED))
    has = n_words > 0
    sums = np.zeros(n, np.uint64)
    sums[has] = np.add.reduceat(mixed, first[has])
    return mix64(h + sums)


def combine_hashes(hashes: Sequence[np.ndarray]) -> np.ndarray:
    """Fold per-column hashes into one per row (order matters)."""
    out = np.full(len(hashes[0]), _SEED, dtype=np.uint64)
    for h in hashes:
        out = mix64(out * _GOLDEN ^ h)
    return out


def occurrence_hash(base: np.ndarray, occurrence: np.ndarray) -> np.ndarray:
    """Distinct ids for the 2nd, 3rd... copy of an identical keyless row."""
    return mix64(base ^ mix64(occurrence.astype(np.uint64) * _GOLDEN + _SEED))


# --------------------------------------------------------------------------- rules

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<num>[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)(?![\w.])
      | (?P<str>'[^']*'|"[^"]*")
      | (?P<col>`[^`]+`)
      | (?P<op><=|>=|==|!=|<|>)
      | (?P<punct>[{},])
      | (?P<word>[A-Za-z_][\w.]*)
    )""",
    re.VERBOSE,
)
_PC_OP = {
    "<": pc.less,
    "<=": pc.less_equal,
    ">": pc.greater,
    ">=": pc.greater_equal,
    "==": pc.equal,
    "!=": pc.not_equal,
}


@dataclass(frozen=True)
class _Operand:
    kind: str  # "num" | "str" | "col" (backquoted) | "word"
    value: Any

    def show(self) -> str:
        return str(self.value) if self.kind != "str" else repr(self.value)


@dataclass(frozen=True)
class _Compare:
    terms: tuple[_Operand, ...]  # 2 terms, or 3 for a range
    ops: tuple[str, ...]


@dataclass(frozen=True)
class _InSet:
    operand: _Operand
    values: tuple[_Operand, ...]


_Cond = _Compare | _InSet


@dataclass(frozen=True)
class Rule:
    """A parsed domain rule: ``cond``, or ``if when then cond``."""

    text: str
    cond: _Cond
    when: _Cond | None = None


def parse_rule(text: str) -> Rule:
    """Parse one rule; malformed text raises :class:`ConfigError` naming it."""
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"rule {text!r} is empty or not a string")
    tokens: list[tuple[str, str]] = []
    pos = 0
    stripped = text.rstrip()
    while pos < len(stripped):
        m = _TOKEN_RE.match(stripped, pos)
        if not m or m.end() == pos:
            raise ConfigError(
                f"rule {text!r}: cannot read {stripped[pos:].strip()[:20]!r}; expected"
                " 'A <= B', 'lo <= A <= hi', 'A in {x, y}' or 'if A > x then B == y'"
            )
        kind = m.lastgroup or ""
        tokens.append((kind, m.group(kind)))
        pos = m.end()
    parser = _RuleParser(text, tokens)
    return parser.rule()


class _RuleParser:
    def __init__(self, text: str, tokens: list[tuple[str, str]]) -> None:
        self.text = text
        self.tokens = tokens
        self.i = 0

    def fail(self, why: str) -> ConfigError:
        return ConfigError(
            f"rule {self.text!r}: {why}; expected 'A <= B', 'lo <= A <= hi',"
            " 'A in {x, y}' or 'if A > x then B == y'"
        )

    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def take(self) -> tuple[str, str]:
        tok = self.peek()
        if tok is None:
            raise self.fail("it ends too early")
        self.i += 1
        return tok

    def is_word(self, word: str) -> bool:
        tok = self.peek()
        return tok is not None and tok[0] == "word" and tok[1].lower() == word

    def rule(self) -> Rule:
        when = None
        if self.is_word("if"):
            self.i += 1
            when = self.cond()
            if not self.is_word("then"):
                raise self.fail("'if' without 'then'")
            self.i += 1
        cond = self.cond()
        if self.peek() is not None:
            raise self.fail(f"unexpected {self.peek()[1]!r}")  # type: ignore[index]
        return Rule(text=self.text.strip(), cond=cond, when=when)

    def operand(self) -> _Operand:
        kind, value = self.take()
        if kind == "num":
            return _Operand("num", float(value))
        if kind == "str":
            return _Operand("str", value[1:-1])
        if kind == "col":
            return _Operand("col", value[1:-1])
        if kind == "word" and value.lower() not in ("if", "then", "in"):
            return _Operand("word", value)
        raise self.fail(f"expected a column, number or string, found {value!r}")

    def cond(self) -> _Cond:
        first = self.operand()
        if self.is_word("in"):
            self.i += 1
            if self.take() != ("punct", "{"):
                raise self.fail("'in' must be followed by '{'")
            values = [self.operand()]
            while True:
                kind, value = self.take()
                if (kind, value) == ("punct", "}"):
                    break
                if (kind, value) != ("punct", ","):
                    raise self.fail(f"expected ',' or '}}' in the set, found {value!r}")
                values.append(self.operand())
            return _InSet(first, tuple(values))
        terms, ops = [first], []
        while (tok := self.peek()) is not None and tok[0] == "op":
            ops.append(self.take()[1])
            terms.append(self.operand())
        if not ops:
            raise self.fail("no comparison operator")
        if len(ops) > 2:
            raise self.fail("at most a range 'lo <= A <= hi'")
        if len(ops) == 2 and not (set(ops) <= {"<", "<="} or set(ops) <= {">", ">="}):
            raise self.fail("a range needs both operators '<'/'<=' or both '>'/'>='")
        return _Compare(tuple(terms), tuple(ops))


@dataclass(frozen=True)
class _Bound:
    """An operand resolved against the schema: a column or a typed literal."""

    column: str | None
    literal: Any = None
    kind: str = ""  # the column kind, or the literal's ("numeric" | "text" | "date")


class CompiledRule:
    """A rule checked against the columns' kinds, ready to evaluate on blocks."""

    def __init__(self, rule: Rule, kinds: Mapping[str, str]) -> None:
        self.rule = rule
        self.text = rule.text
        self.when = self._resolve(rule.when, kinds) if rule.when else None
        self.cond = self._resolve(rule.cond, kinds)
        self.columns = list(dict.fromkeys(b.column for b in self._bounds() if b.column))

    def _bounds(self) -> list[_Bound]:
        out: list[_Bound] = []
        for c in (self.when, self.cond):
            if c is not None:
                out += [b for b in c[1] if isinstance(b, _Bound)]
        return out

    def _err(self, why: str) -> ConfigError:
        return ConfigError(f"rule {self.text!r}: {why}")

    def _column(self, op: _Operand, kinds: Mapping[str, str]) -> _Bound | None:
        if op.kind in ("col", "word") and op.value in kinds:
            if kinds[op.value] == "timestamp":
                raise self._err(
                    f"{op.value} is a timestamp: rules on timestamps are not supported"
                )
            return _Bound(op.value, kind=kinds[op.value])
        if op.kind == "col":
            raise self._err(f"unknown column {op.value!r}")
        return None

    def _literal(self, op: _Operand, against: _Bound) -> _Bound:
        kind = against.kind
        if kind == "numeric":
            if op.kind != "num":
                if op.kind == "word":
                    raise self._err(f"unknown column {op.value!r}")
                raise self._err(f"{against.column} is numeric but {op.show()} is not")
            return _Bound(None, op.value, "numeric")
        if kind == "date":
            try:
                return _Bound(None, date.fromisoformat(str(op.value)), "date")
            except ValueError:
                raise self._err(
                    f"{against.column} is a date but {op.show()} is not 'YYYY-MM-DD'"
                ) from None
        if op.kind == "num":
            value = op.value
            text = str(int(value)) if float(value).is_integer() else repr(value)
            return _Bound(None, text, "text")
        return _Bound(None, str(op.value), "text")

    def _resolve(self, cond: _Cond, kinds: Mapping[str, str]) -> tuple[str, list]:
        if isinstance(cond, _InSet):
            col = self._column(cond.operand, kinds)
            if col is None:
                raise self._err(f"unknown column {cond.operand.value!r}")
            return "in", [col, *[self._literal(v, col) for v in cond.values]]
        cols = [self._column(t, kinds) for t in cond.terms]
        anchor = next((c for c in cols if c is not None), None)
        if anchor is None:
            names = [t.value for t in cond.terms if t.kind in ("col", "word")]
            if names:
                raise self._err(f"unknown column {names[0]!r}")
            raise self._err("it compares no column")
        bound = [
            c if c is not None else self._literal(t, anchor)
            for c, t in zip(cols, cond.terms, strict=True)
        ]
        for b in bound:
            if _family(b.kind) != _family(anchor.kind):
                other = b.column or repr(b.literal)
                raise self._err(
                    f"cannot compare {anchor.column} ({anchor.kind}) with"
                    f" {other} ({b.kind})"
                )
        if _family(anchor.kind) == "text" and any(
            o not in ("==", "!=") for o in cond.ops
        ):
            raise self._err(f"{anchor.column} is {anchor.kind}: only == and != apply")
        return "cmp", [*bound, *cond.ops]

    @staticmethod
    def _value(b: _Bound, cols: Mapping[str, pa.Array]) -> Any:
        if b.column is not None:
            return cols[b.column]
        if b.kind == "date":
            return pa.scalar(b.literal, pa.date32())
        if b.kind == "numeric":
            return pa.scalar(b.literal, pa.float64())
        return pa.scalar(b.literal, pa.string())

    def _eval(self, resolved: tuple[str, list], cols: Mapping[str, pa.Array]) -> Any:
        """A boolean array: true/false, null where an operand is missing."""
        how, parts = resolved
        if how == "in":
            col, *values = parts
            arr = cols[col.column]
            value_set = pa.array([v.literal for v in values], arr.type)
            hit = pc.is_in(arr, value_set=value_set)
            return pc.if_else(pc.is_valid(arr), hit, pa.scalar(None, pa.bool_()))
        n_terms = (len(parts) + 1) // 2
        terms, ops = parts[:n_terms], parts[n_terms:]
        vals = [self._value(t, cols) for t in terms]
        out = _PC_OP[ops[0]](vals[0], vals[1])
        if len(ops) == 2:
            out = pc.and_kleene(out, _PC_OP[ops[1]](vals[1], vals[2]))
        return out

    def violations(self, cols: Mapping[str, pa.Array]) -> np.ndarray | None:
        """Rows breaking the rule (None: no row does).

        A missing operand is never a violation: nulls count as "holds".
        """
        broken = pc.fill_null(pc.invert(self._eval(self.cond, cols)), False)
        if self.when is not None:
            broken = pc.and_(broken, pc.fill_null(self._eval(self.when, cols), False))
        if not pc.any(broken).as_py():
            return None
        return _mask(broken)


def _family(kind: str) -> str:
    return kind if kind in ("numeric", "date") else "text"


def implied_kind(rules: Sequence[Rule], column: str, names: Sequence[str]) -> str:
    """The kind the rules treat ``column`` as: what a column that has no value
    to infer its kind from is typed as ("numeric" when no rule says more).

    A column compared with a number is numeric, with an ISO date a date, with
    any other word or string categorical (``RainTomorrow in {No, Yes}``).
    """
    known = set(names)

    def literal_kind(op: _Operand) -> str | None:
        if op.kind in ("col", "word") and op.value in known:
            return None  # another column
        if op.kind == "num":
            return "numeric"
        if re.fullmatch(_DATE_RE, str(op.value)):
            return "date"
        return "categorical"

    def is_it(op: _Operand) -> bool:
        return op.kind in ("col", "word") and op.value == column

    for rule in rules:
        for cond in (rule.when, rule.cond):
            if isinstance(cond, _InSet) and is_it(cond.operand):
                found = [literal_kind(v) for v in cond.values]
            elif isinstance(cond, _Compare) and any(is_it(t) for t in cond.terms):
                found = [literal_kind(t) for t in cond.terms if not is_it(t)]
            else:
                continue
            for kind in found:
                if kind is not None:
                    return kind
    return "numeric"


def compile_rules(
    rules: Sequence[Rule], kinds: Mapping[str, str]
) -> list[CompiledRule]:
    """Resolve parsed rules against column kinds (unknown column: ConfigError)."""
    return [CompiledRule(r, kinds) for r in rules]


__all__ = [
    "NULL_MARKERS",
    "CompiledRule",
    "Parsed",
    "Rule",
    "clean_text",
    "combine_hashes",
    "compile_rules",
    "date_share",
    "hash_text",
    "implied_kind",
    "mix64",
    "numeric_share",
    "occurrence_hash",
    "parse_date",
    "parse_numeric",
    "parse_rule",
    "parse_text",
    "parse_timestamp",
    "timestamp_share",
]
