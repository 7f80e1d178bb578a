"""Warehouse-only conditions evaluated for all people at once, over column arrays.

The results are boolean arrays indexed by person id: the bitsets that make a
warehouse sub-condition one bit test at event time. Semantics are the
reference's (qualify.evaluator.reference.matches_predicate), which
tests/test_predicates.py holds this module to. String predicates are decided
by the compiled ``PredicateMatcher`` once per distinct word of the column's
dictionary and then looked up by code, so even CONTAINS costs one pass over
the words, not the people. Number and bool columns are compared here, by
numpy over the whole column: the one other implementation of predicate
semantics in production, because a per-person call into the matcher would
box every value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qualify.evaluator import PredicateMatcher, compare_value, match_predicate
from qualify.evaluator.program import Aggregation, Code, Op, SequenceLeaf

from .conditions import And, AttributeCondition, Condition, EventCondition, Not, Or
from .schema import ValueType


@dataclass(frozen=True)
class Column:
    """One attribute over all person ids: values, validity, and the words of string codes."""

    type: ValueType
    values: np.ndarray
    valid: np.ndarray  # uint8, 0 where missing
    words: tuple[str, ...] = ()

    def value(self, pid: int):
        """The plain value at one person id (None when missing)."""
        if pid >= len(self.valid) or not self.valid[pid]:
            return None
        v = self.values[pid]
        if self.type is ValueType.STRING:
            return self.words[v]
        if self.type is ValueType.BOOL:
            return bool(v)
        if self.type is ValueType.FLOAT:
            return float(v)
        return int(v)


def predicate_array(col: Column, op: Op, values: tuple, size: int) -> np.ndarray:
    valid = _fit(col.valid.astype(bool), size)
    matcher = PredicateMatcher(op, values, "")
    if col.type is ValueType.STRING:
        table = np.zeros(len(col.words) + 1, bool)  # the extra word stands for missing codes
        table[: len(col.words)] = np.frombuffer(matcher.table(col.words), np.uint8)
        codes = _fit(col.values, size)
        present = table[np.where(valid, codes, len(col.words))]
    else:
        vals = _fit(col.values, size)
        if col.type is ValueType.BOOL:
            vals = vals.astype(bool)
        present = _numeric(op, values, vals, col.type)
    return np.where(valid, present, matcher.matches(None))


def _fit(arr: np.ndarray, size: int) -> np.ndarray:
    if len(arr) >= size:
        return arr[:size]
    out = np.zeros(size, arr.dtype)
    out[: len(arr)] = arr
    return out


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_bool(x) -> bool:
    return isinstance(x, bool)


def _numeric(op: Op, values: tuple, vals: np.ndarray, vtype: ValueType) -> np.ndarray:
    n = len(vals)
    if op == Op.IS_SET:
        return np.ones(n, bool)
    if op == Op.IS_NOT_SET:
        return np.zeros(n, bool)
    # A literal of another kind than the column's never equals it and never orders
    # with it; booleans equal only booleans and do not order at all.
    same = _is_bool if vtype is ValueType.BOOL else _is_number
    if op in (Op.IN, Op.NOT_IN):
        hits = [v for v in values if same(v)]
        member = np.isin(vals, hits) if hits else np.zeros(n, bool)
        return member if op == Op.IN else ~member
    if not all(same(a) for a in values[: 2 if op == Op.BETWEEN else 1]):
        return np.full(n, op == Op.NE)
    a = values[0]
    if op == Op.EQ:
        return vals == a
    if op == Op.NE:
        return vals != a
    if vtype is ValueType.BOOL or op in (Op.CONTAINS, Op.STARTS_WITH):
        return np.zeros(n, bool)
    if op == Op.LT:
        return vals < a
    if op == Op.LE:
        return vals <= a
    if op == Op.GT:
        return vals > a
    if op == Op.GE:
        return vals >= a
    return (vals >= a) & (vals <= values[1])  # BETWEEN


def evaluate_static(condition: Condition, columns: dict[str, Column], size: int) -> np.ndarray:
    """A warehouse-only condition for person ids 0..size-1."""
    if isinstance(condition, AttributeCondition):
        p = condition.predicate
        col = columns.get(p.field)
        if col is None:  # attribute not synced yet: missing for everyone
            return np.full(size, match_predicate(p.op, p.values, None))
        return predicate_array(col, p.op, p.values, size)
    if isinstance(condition, And):
        out = np.ones(size, bool)
        for c in condition.children:
            out &= evaluate_static(c, columns, size)
        return out
    if isinstance(condition, Or):
        out = np.zeros(size, bool)
        for c in condition.children:
            out |= evaluate_static(c, columns, size)
        return out
    if isinstance(condition, Not):
        return ~evaluate_static(condition.child, columns, size)
    raise TypeError(f"not a warehouse-only condition: {type(condition).__name__}")


def evaluate_static_missing(condition: Condition) -> bool:
    """The value for someone the warehouse does not know (every attribute missing)."""
    if isinstance(condition, AttributeCondition):
        return match_predicate(condition.predicate.op, condition.predicate.values, None)
    if isinstance(condition, And):
        return all(evaluate_static_missing(c) for c in condition.children)
    if isinstance(condition, Or):
        return any(evaluate_static_missing(c) for c in condition.children)
    if isinstance(condition, Not):
        return not evaluate_static_missing(condition.child)
    raise TypeError(f"not a warehouse-only condition: {type(condition).__name__}")


def without_events(program, static_arrays: list[np.ndarray], size: int) -> list[np.ndarray]:
    """Each audience's value, per person id, for someone with no realtime events.

    The program runs over whole arrays: STATIC leaves are the precomputed
    warehouse arrays, EVENT leaves their value over an empty history (a count
    of 0; an aggregate over nothing is missing).
    """
    # (a sequence or an absence never holds over no events)
    empty = [False if isinstance(l, SequenceLeaf) else
             compare_value(l.comparison, 0.0 if l.aggregation == Aggregation.COUNT else None, l.threshold)
             for l in program.leaves]
    out = []
    for code in program.audiences:
        stack: list[np.ndarray] = []
        for op, arg in code:
            if op == Code.STATIC:
                stack.append(static_arrays[arg])
            elif op == Code.EVENT:
                stack.append(np.full(size, empty[arg]))
            elif op == Code.NOT:
                stack.append(~stack.pop())
            else:
                vals = stack[-arg:]
                del stack[-arg:]
                acc = vals[0].copy()
                for v in vals[1:]:
                    acc = acc & v if op == Code.AND else acc | v
                stack.append(acc)
        out.append(stack[0])
    return out


__all__ = ["Column", "EventCondition", "evaluate_static", "evaluate_static_missing", "predicate_array", "without_events"]
