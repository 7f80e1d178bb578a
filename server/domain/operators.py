"""Predicate operators and literals: the rules every spelling of a predicate shares.

A predicate is spelled two ways: the JSON mapping of ``qualify.v1.Predicate``
(parsed in ``conditions``) and a filter table in the project file (``config.realtime``).
What an operator takes, which field types it applies to and how a literal
becomes a value are decided here once; each spelling words its own messages.
"""

from __future__ import annotations

import math
from datetime import date, datetime, time, timezone
from enum import Enum
from typing import Any, Union

from qualify.evaluator.program import Op

from .schema import ValueType

Value = Union[str, int, float, bool, None]
NUMERIC = (ValueType.INT, ValueType.FLOAT)


class Arity(Enum):
    """How many values an operator takes, and under which key (``value`` or ``values``)."""

    NONE = ("", 0, 0)  # IS_SET, IS_NOT_SET
    ONE = ("value", 1, 1)
    SOME = ("values", 1, None)  # IN, NOT_IN: one or more
    PAIR = ("values", 2, 2)  # BETWEEN: the lower and upper bounds

    def __init__(self, key: str, least: int, most: int | None):
        self.key, self.least, self.most = key, least, most

    def accepts(self, n: int) -> bool:
        return self.least <= n and (self.most is None or n <= self.most)


_ARITY = {Op.IS_SET: Arity.NONE, Op.IS_NOT_SET: Arity.NONE, Op.IN: Arity.SOME, Op.NOT_IN: Arity.SOME,
          Op.BETWEEN: Arity.PAIR}


def arity(op: Op) -> Arity:
    return _ARITY.get(op, Arity.ONE)


class Misfit(Enum):
    """Why an operator cannot apply to a field of some type."""

    STRINGS_ONLY = "applies to strings"  # CONTAINS, STARTS_WITH
    NOT_BOOLEANS = "does not apply to booleans"  # the orderings, BETWEEN


def misfit(op: Op, ftype: ValueType) -> Misfit | None:
    if op in (Op.CONTAINS, Op.STARTS_WITH) and ftype is not ValueType.STRING:
        return Misfit.STRINGS_ONLY
    if op in (Op.LT, Op.LE, Op.GT, Op.GE, Op.BETWEEN) and ftype is ValueType.BOOL:
        return Misfit.NOT_BOOLEANS
    return None


_OPS_LOWER = {o.name.lower(): o for o in Op}


def parse_operator(name: str, ignore_case: bool = False) -> Op | None:
    """``OPERATOR_EQ`` or ``EQ`` (any case when ``ignore_case``: ``eq``) -> Op; None if unknown."""
    if ignore_case:
        return _OPS_LOWER.get(name.lower().removeprefix("operator_"))
    return Op.__members__.get(name.removeprefix("OPERATOR_"))


def literal_fits(got: ValueType, want: ValueType) -> bool:
    """A ``got`` literal may be compared with a ``want`` field: the same type, or numbers of either kind."""
    return got == want or (got in NUMERIC and want in NUMERIC)


def coerce_literal(v: Any, got: ValueType) -> Value:
    """A literal spelled as a ``got`` value -> its domain value; ValueError when it is not one."""
    if got is ValueType.STRING and isinstance(v, str):
        return v
    if got is ValueType.INT and not isinstance(v, bool):
        return int(v)  # int64 arrives as a JSON string
    if got is ValueType.FLOAT and not isinstance(v, bool):
        f = float(v)
        if math.isnan(f):
            raise ValueError("not a number")
        return f
    if got is ValueType.BOOL and isinstance(v, bool):
        return v
    if got is ValueType.TIMESTAMP:
        return parse_timestamp(v)
    raise ValueError(f"not a {got.name.lower()} value")


def parse_timestamp(v: Any) -> int:
    """RFC 3339 text, a datetime or date (TOML's), or integer microseconds -> microseconds since the epoch.

    Without a zone (text or datetime) the time is UTC; a date is its midnight UTC.
    """
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, datetime):
        dt = v
    elif isinstance(v, date):
        dt = datetime.combine(v, time(), timezone.utc)
    elif isinstance(v, str):
        dt = datetime.fromisoformat(v.replace("Z", "+00:00").replace("z", "+00:00"))
    else:
        raise ValueError("not a timestamp")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86400 + delta.seconds) * 1_000_000 + delta.microseconds
