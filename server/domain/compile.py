"""Audiences -> one evaluator Program: event leaves shared, warehouse parts split off.

Each audience's condition tree becomes postfix code over two kinds of leaf.
Every maximal subtree that reads only warehouse attributes becomes a STATIC
leaf, evaluated for all people at once over the attribute columns whenever a
sync lands (see static.py); every event condition becomes an EVENT leaf,
shared by all audiences that use the same one; so does every sequence and
absence condition (a SequenceLeaf).
"""

from __future__ import annotations

from dataclasses import dataclass

from qualify.evaluator.program import Code, EventLeaf, Filter, Kind, Program, Scope, SequenceLeaf, Step, leaf_models

from .conditions import REALTIME, And, AttributeCondition, Condition, EventCondition, Not, Or, is_static
from .sequences import AbsenceCondition


@dataclass(frozen=True)
class Compiled:
    program: Program
    statics: tuple[Condition, ...]  # STATIC k is statics[k]
    audience_ids: tuple[str, ...]  # audience i of the program (bit i of a membership bitset)
    models_used: frozenset[int]  # event models some audience references


def compile_audiences(audiences: list[tuple[str, Condition]], model_index: dict[str, int],
                      session_timeout_us: int) -> Compiled:
    leaves: dict[EventLeaf, int] = {}
    statics: dict[Condition, int] = {}

    def leaf_of(c) -> int:
        return leaves.setdefault(leaf_for(c, model_index), len(leaves))

    def emit(c: Condition, code: list[tuple[int, int]]) -> None:
        if is_static(c):
            code.append((Code.STATIC, statics.setdefault(c, len(statics))))
        elif isinstance(c, REALTIME):
            code.append((Code.EVENT, leaf_of(c)))
        elif isinstance(c, Not):
            emit(c.child, code)
            code.append((Code.NOT, 0))
        elif isinstance(c, (And, Or)):
            for child in c.children:
                emit(child, code)
            code.append((Code.AND if isinstance(c, And) else Code.OR, len(c.children)))
        else:  # pragma: no cover - AttributeCondition is always static
            raise TypeError(type(c))

    codes = []
    for _, condition in audiences:
        code: list[tuple[int, int]] = []
        emit(condition, code)
        codes.append(tuple(code))
    ordered_leaves = tuple(sorted(leaves, key=leaves.__getitem__))
    program = Program(leaves=ordered_leaves, audiences=tuple(codes), n_static=len(statics),
                      session_timeout_us=session_timeout_us)
    return Compiled(program, tuple(sorted(statics, key=statics.__getitem__)),
                    tuple(a for a, _ in audiences), frozenset(m for l in ordered_leaves for m in leaf_models(l)))


def leaf_for(c, model_index: dict[str, int]) -> EventLeaf | SequenceLeaf:
    """The evaluator leaf of an event, sequence or absence condition."""
    if isinstance(c, EventCondition):
        return EventLeaf(model=model_index[c.event_model], filters=_filters(c.filters), scope=c.scope,
                         window_us=c.window_us, aggregation=c.aggregation, property=c.property,
                         comparison=c.comparison, threshold=c.threshold)
    steps = tuple(Step(model_index[s.event_model], _filters(s.filters)) for s in c.steps)
    return SequenceLeaf(Kind.ABSENCE if isinstance(c, AbsenceCondition) else Kind.SEQUENCE, steps, c.within_us,
                        tuple(c.same), c.scope, c.window_us)


def _filters(predicates) -> tuple[Filter, ...]:
    return tuple(Filter(p.field, p.op, p.values) for p in predicates)


__all__ = ["Compiled", "compile_audiences", "AttributeCondition"]


def audiences_by_model(program: Program, models) -> dict[int, list[int]]:
    """Event model -> the audiences an event of it re-evaluates.

    Those that use the model, and those with a session condition on any
    model: a person's session spans their models.
    """
    by_model: dict[int, list[int]] = {}
    session_audiences = set()
    for i, code in enumerate(program.audiences):
        leaves = [program.leaves[arg] for op, arg in code if op == Code.EVENT]
        for m in {m for leaf in leaves for m in leaf_models(leaf)}:
            by_model.setdefault(m, []).append(i)
        if any(leaf.scope == Scope.SESSION for leaf in leaves):
            session_audiences.add(i)
    return {m: sorted(set(by_model.get(m, ())) | session_audiences) for m in models}
