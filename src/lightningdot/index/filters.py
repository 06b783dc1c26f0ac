"""Filters on what is known of each indexed image, in one small JSON syntax:

    {"folder": {"prefix": "holidays/"}, "taken": {"gte": "2024-01-01"}, "camera": "X100V"}

Each key names a field and every key's condition must hold. A condition is a value (equality)
or an object of operators, all of which must hold:

    eq, ne               equal, not equal
    in                   one of a list of values
    gt, gte, lt, lte     above, at least, below, at most (numbers and dates)
    prefix               text that starts with the given text

Date fields take ISO dates or times ("2024-01-01", "2024-06-01T18:30:00", read as UTC) or
Unix seconds. An item that lacks a field satisfies no condition on it, `ne` included, as SQL
treats NULL. A filter is checked against the fields an index knows before it is used, so that
a typo is an error naming the field rather than an empty answer.

`parse_filter` reads the JSON; `Filter.mask` evaluates it over `MetadataColumns` at once for
every row, which a search hands FAISS as an id selector; `Filter.expression` writes it as a
Milvus boolean expression over a JSON field of the same fields, with the same meaning.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from lightningdot.errors import DataError
from lightningdot.index.metadata import DATE, TEXT, MetadataColumns

COMPARISONS = {"gt": np.greater, "gte": np.greater_equal, "lt": np.less, "lte": np.less_equal}
OPERATORS = ("eq", "ne", "in", *COMPARISONS, "prefix")


class FilterError(DataError):
    """A filter that does not parse, or names a field or operator that does not exist."""


@dataclass(frozen=True)
class Condition:
    field: str
    op: str
    value: Any  # a number or text; a tuple of them for "in"


@dataclass(frozen=True)
class Filter:
    """Conditions that must all hold (none: every item passes)."""

    conditions: tuple[Condition, ...]

    def mask(self, columns: MetadataColumns) -> np.ndarray:
        """(rows,) True where the item passes."""
        out = np.ones(columns.rows, dtype=bool)
        for c in self.conditions:
            out &= _condition_mask(columns, c)
        return out

    def expression(self, columns: dict[str, str] | None = None) -> str:
        """The filter as a Milvus boolean expression: on the scalar column `columns` names
        for a field, else on the field's key in the JSON column `fields`."""
        columns = columns or {}
        return " and ".join(
            f"({_condition_expression(columns.get(c.field) or _json_key(c.field), c)})"
            for c in self.conditions
        )


def parse_filter(spec: str | dict | None, kinds: dict[str, str]) -> Filter | None:
    """A filter from its JSON text (or the parsed object), checked against the fields `kinds`
    names (field -> TEXT, NUMBER or DATE); None for no filter (None, "" or {}).

    Raises:
        FilterError: the text is not JSON, or names an unknown field or operator, or a value
            does not suit its field or operator (each message names which).
    """
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return None
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as e:
            raise FilterError(f"filter is not JSON: {e}") from None
    if not isinstance(spec, dict):
        raise FilterError('a filter is a JSON object of fields, e.g. {"folder": "trips/"}')
    conditions = []
    for name, cond in spec.items():
        if name not in kinds:
            known = ", ".join(sorted(kinds)) or "none"
            raise FilterError(f"unknown filter field {name!r} (fields of this index: {known})")
        ops = cond if isinstance(cond, dict) else {"eq": cond}
        if not ops:
            raise FilterError(f"filter field {name!r} has no condition")
        for op, value in ops.items():
            conditions.append(Condition(name, op, _operand(name, kinds[name], op, value)))
    return Filter(tuple(conditions)) if conditions else None


def _operand(name: str, kind: str, op: str, value: Any) -> Any:
    """The value of one condition, in the type its column holds."""
    if op not in OPERATORS:
        raise FilterError(f"unknown filter operator {op!r} on {name!r} (one of {OPERATORS})")
    if op == "in":
        if not isinstance(value, list) or not value:
            raise FilterError(f"{name!r}: 'in' takes a non-empty list of values")
        return tuple(_scalar(name, kind, v) for v in value)
    if op == "prefix" and kind != TEXT:
        raise FilterError(f"{name!r}: 'prefix' applies to text fields only")
    if op in COMPARISONS and kind == TEXT:
        raise FilterError(f"{name!r}: {op!r} applies to number and date fields only")
    return _scalar(name, kind, value)


def _scalar(name: str, kind: str, value: Any) -> float | str:
    if kind == TEXT:
        if not isinstance(value, str):
            raise FilterError(f"{name!r} is a text field: compare it with text, not {value!r}")
        return value
    if kind == DATE and isinstance(value, str):
        return _date_seconds(name, value)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise FilterError(f"{name!r} is a {kind} field: {value!r} is not a number")
    return float(value)


def _date_seconds(name: str, text: str) -> float:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise FilterError(f"{name!r}: {text!r} is not an ISO date (2024-01-31)") from None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _condition_mask(columns: MetadataColumns, c: Condition) -> np.ndarray:
    if columns.kinds.get(c.field) == TEXT:
        return _text_mask(columns, c)
    values = columns.numbers(c.field)  # NaN where missing: every comparison is False
    if c.op == "eq":
        return values == c.value
    if c.op == "ne":
        return ~np.isnan(values) & (values != c.value)
    if c.op == "in":
        return np.isin(values, np.asarray(c.value, dtype=np.float64))
    return COMPARISONS[c.op](values, c.value)


def _text_mask(columns: MetadataColumns, c: Condition) -> np.ndarray:
    """Text columns are categories: the condition is decided once per distinct value."""
    codes, categories = columns.texts(c.field)  # code -1 where missing
    if c.op == "prefix":
        chosen = np.char.startswith(categories.astype(str), c.value) if len(categories) else []
        hit = np.flatnonzero(chosen)
    else:
        wanted = c.value if c.op == "in" else (c.value,)
        hit = np.flatnonzero(np.isin(categories, np.asarray(wanted, dtype=object)))
    inside = np.isin(codes, hit)
    return (codes >= 0) & ~inside if c.op == "ne" else inside


MILVUS_COMPARISONS = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _json_key(name: str) -> str:
    return f"fields[{milvus_literal(name)}]"


def _condition_expression(key: str, c: Condition) -> str:
    """One condition on `key` (a column, or a key of a JSON column) in Milvus's expression
    language. A value an item lacks (NULL, or a key it does not have) makes every comparison
    on it false there, `!=` included, as `mask` treats it. `in` is written
    as equalities (Milvus's `in` does not reach into JSON values), and `prefix` as a range of
    text (its `like` has no escape for `%` and `_`)."""
    if c.op == "in":
        return " or ".join(f"{key} == {milvus_literal(v)}" for v in c.value)
    if c.op == "prefix":
        if not c.value:
            return f"exists {key}" if key.startswith("fields[") else f"{key} is not null"
        above = _successor(c.value)
        upper = f" and {key} < {milvus_literal(above)}" if above is not None else ""
        return f"{key} >= {milvus_literal(c.value)}{upper}"
    return f"{key} {MILVUS_COMPARISONS[c.op]} {milvus_literal(c.value)}"


def _successor(prefix: str) -> str | None:
    """The least text above every text that starts with `prefix` (None: there is none)."""
    while prefix and prefix[-1] == chr(0x10FFFF):
        prefix = prefix[:-1]
    return prefix[:-1] + chr(ord(prefix[-1]) + 1) if prefix else None


def milvus_literal(value: float | str) -> str:
    """A number or a quoted, escaped text, as Milvus expressions read it."""
    return json.dumps(value, ensure_ascii=False)
