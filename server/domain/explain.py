"""ExplainMembership: every condition node's value for one person, and why."""

from __future__ import annotations

import math
from datetime import datetime, timezone

from qualify.evaluator import match_predicate
from qualify.evaluator.program import Aggregation, Comparison, Scope

from .conditions import And, AttributeCondition, Condition, EventCondition, Not, Or
from .sequences import AbsenceCondition, SequenceCondition
from .sequence_explain import sequence_summary


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _summary(c: EventCondition, holds: bool, count: int, flips_at: int | None) -> str:
    if flips_at is not None:
        reason = "a session ends" if c.scope == Scope.SESSION else "the window moves"
        return f"{'exits' if holds else 'qualifies'} at {_iso(flips_at)} when {reason}, unless more events arrive"
    if holds:
        return "holds; no change is due by itself"
    if c.aggregation == Aggregation.COUNT and c.comparison in (Comparison.GE, Comparison.GT, Comparison.EQ):
        need = math.floor(c.threshold) + (1 if c.comparison == Comparison.GT else 0) - count
        if need > 0:
            return f"qualifies after {need} more {c.event_model} event{'s' if need != 1 else ''}"
    return "does not hold"


def explain_tree(condition: Condition, evaluator, state, attr_value, leaf_index, now_us: int,
                 path: str = "condition") -> dict:
    """A nested dict per node: path, value, count, aggregate, changes_at, summary, children."""
    node = {"path": path, "value": False, "count": 0, "aggregate": None, "changes_at": None,
            "summary": "", "children": []}
    if isinstance(condition, (And, Or)):
        kind = "and" if isinstance(condition, And) else "or"
        kids = [explain_tree(c, evaluator, state, attr_value, leaf_index, now_us, f"{path}.{kind}.conditions[{i}]")
                for i, c in enumerate(condition.children)]
        node["children"] = kids
        node["value"] = all(k["value"] for k in kids) if kind == "and" else any(k["value"] for k in kids)
    elif isinstance(condition, Not):
        kid = explain_tree(condition.child, evaluator, state, attr_value, leaf_index, now_us, f"{path}.not.condition")
        node["children"] = [kid]
        node["value"] = not kid["value"]
    elif isinstance(condition, AttributeCondition):
        p = condition.predicate
        v = attr_value(p.field)
        node["value"] = match_predicate(p.op, p.values, v)
        node["summary"] = f"{p.field} is {'missing' if v is None else repr(v)}"
    elif isinstance(condition, (SequenceCondition, AbsenceCondition)):
        j = leaf_index(condition)
        leaf = evaluator.leaf(state, j, now_us)
        node.update(value=leaf.holds, count=leaf.count, changes_at=leaf.flips_at,
                    summary=sequence_summary(condition, leaf, evaluator.progress(state, j, now_us)))
    else:
        leaf = evaluator.leaf(state, leaf_index(condition), now_us)
        aggregate = None if condition.aggregation == Aggregation.COUNT else leaf.aggregate
        node.update(value=leaf.holds, count=leaf.count, aggregate=aggregate, changes_at=leaf.flips_at,
                    summary=_summary(condition, leaf.holds, leaf.count, leaf.flips_at))
    return node
