"""Explanations of sequence and absence conditions: how far the person's best match has got, in words.

"step 2 of 3 done, from 2025-05-01T10:00:00Z; needs a cart_adds with sku = 'sku-9' before
2025-05-01T10:10:00Z" — from the evaluator's SequenceProgress (the match with the most steps
in scope, the latest-starting one) and the leaf's next flip.
"""

from __future__ import annotations

from datetime import datetime, timezone

from qualify.evaluator.program import Op, Scope

from .sequences import AbsenceCondition, SequenceCondition, Step

_SYMBOLS = {Op.EQ: "=", Op.NE: "!=", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">="}


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")


def _predicate(p) -> str:
    if p.op in _SYMBOLS:
        return f"{p.field} {_SYMBOLS[p.op]} {p.values[0]!r}"
    if p.op in (Op.IS_SET, Op.IS_NOT_SET):
        return f"{p.field} {'set' if p.op == Op.IS_SET else 'not set'}"
    if p.op == Op.BETWEEN:
        return f"{p.field} between {p.values[0]!r} and {p.values[1]!r}"
    return f"{p.field} {p.op.name.lower().replace('_', ' ')} {', '.join(repr(v) for v in p.values)}"


def _event(step: Step, same: tuple[str, ...] = (), values: tuple = ()) -> str:
    """'a cart_adds with sku = 'sku-9'': the step's model, its filters and the match's same values."""
    parts = [_predicate(p) for p in step.filters]
    parts += [f"{name} = {v!r}" for name, v in zip(same, values)]
    article = "an" if step.event_model[:1].lower() in "aeiou" else "a"
    return f"{article} {step.event_model}" + (f" with {' and '.join(parts)}" if parts else "")


def _scope_end(c) -> str:
    if c.scope == Scope.SESSION:
        return "when the session ends"
    return "when it leaves the window"


def sequence_summary(c: SequenceCondition | AbsenceCondition, leaf, progress) -> str:
    if isinstance(c, AbsenceCondition):
        return _absence(c, leaf, progress)
    k = len(c.steps)
    if leaf.holds:
        tail = f"; exits at {_iso(leaf.flips_at)} {_scope_end(c)}" if leaf.flips_at is not None else ""
        return f"holds: all {k} steps done, from {_iso(progress.started_us)}{tail}"
    done = progress.steps_done
    if done == 0:
        return f"needs {_event(c.steps[0])} to start"
    nxt = _event(c.steps[done], c.same, progress.values)
    by = f" before {_iso(progress.started_us + c.within_us)}" if c.within_us else ""
    return f"step {done} of {k} done, from {_iso(progress.started_us)}; needs {nxt}{by}"


def _absence(c: AbsenceCondition, leaf, progress) -> str:
    if leaf.holds:
        tail = f"; exits at {_iso(leaf.flips_at)} {_scope_end(c)}" if leaf.flips_at is not None else ""
        return f"holds: {_event(c.after)} with no {c.absent.event_model} after it{tail}"
    if progress.steps_done == 1:
        return (f"{_event(c.after, c.same, progress.values)} at {_iso(progress.started_us)}; qualifies at "
                f"{_iso(progress.started_us + c.within_us)} unless {_event(c.absent, c.same, progress.values)} "
                "arrives first")
    return f"needs {_event(c.after)}, then no {c.absent.event_model} for {c.within_us / 1e6:g}s"
