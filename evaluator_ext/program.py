"""The evaluator's input: audiences compiled to flat programs, in plain data.

The domain compiles condition trees into a ``Program``; an evaluator (the
compiled one, or the pure-Python reference) runs it per person. Nothing here
knows about the server: operators and scopes are small integers, values are
str/int/float/bool (timestamps as integer microseconds), and each audience is
a postfix program over two kinds of leaves:

- ``STATIC k``: the k-th warehouse-only subtree, precomputed per person (a bit
  of a bitset over all people) and passed in at evaluation time;
- ``EVENT j``: the j-th event leaf, computed from the person's realtime state:
  an ``EventLeaf`` (a count or aggregate) or a ``SequenceLeaf`` (ordered steps,
  or an anchor followed by the absence of another event).

Semantics are those of ``qualify.evaluator.reference``, the executable
specification.
"""

from __future__ import annotations

import enum
import hashlib
import math
from dataclasses import dataclass


class Op(enum.IntEnum):
    """Predicate operators (numbers as qualify.v1.Operator)."""

    EQ = 1
    NE = 2
    LT = 3
    LE = 4
    GT = 5
    GE = 6
    IN = 7
    NOT_IN = 8
    BETWEEN = 9
    CONTAINS = 10
    STARTS_WITH = 11
    IS_SET = 12
    IS_NOT_SET = 13


class Scope(enum.IntEnum):
    WITHIN = 1
    SESSION = 2
    EVER = 3


class Aggregation(enum.IntEnum):
    COUNT = 1
    SUM = 2
    MIN = 3
    MAX = 4
    AVG = 5


class Comparison(enum.IntEnum):
    EQ = 1
    NE = 2
    LT = 3
    LE = 4
    GT = 5
    GE = 6


class Kind(enum.IntEnum):
    """What a SequenceLeaf asks of its steps."""

    SEQUENCE = 1  # the steps happen in order
    ABSENCE = 2  # steps[0] (A) happens, then no steps[1] (B) within ``within_us``


class Code(enum.IntEnum):
    """Postfix instructions; each is (code, argument)."""

    STATIC = 1  # push static[arg]
    EVENT = 2  # push the value of event leaf arg
    AND = 3  # pop arg values, push their conjunction
    OR = 4  # pop arg values, push their disjunction
    NOT = 5  # negate the top


@dataclass(frozen=True)
class Filter:
    """``property op values`` on an event's properties."""

    property: str
    op: Op
    values: tuple = ()


@dataclass(frozen=True)
class EventLeaf:
    """An event condition: matching events of ``model`` in a scope, compared."""

    model: int
    filters: tuple[Filter, ...]
    scope: Scope
    window_us: int
    aggregation: Aggregation
    property: str
    comparison: Comparison
    threshold: float

    @property
    def keep(self) -> int:
        """How many most recent timestamps a WITHIN count needs: min(count, keep) decides it."""
        return int(self.threshold) + 1


@dataclass(frozen=True)
class Step:
    """One step of a sequence: an event of ``model`` passing every filter."""

    model: int
    filters: tuple[Filter, ...] = ()


# Caps of a SequenceLeaf's bounded state (see SequenceLeaf, and reference.py for the rules).
REORDER = 4  # per value: the latest events kept as they are; later-arriving older ones beyond it are ignored
VALUES = 8  # per person and leaf: `same` values remembered; the one whose latest event is oldest goes first
PENDING = 4  # ABSENCE, per value: anchors older than the reorder buffer still waiting for their B, earliest kept


@dataclass(frozen=True)
class SequenceLeaf:
    """A sequence or absence condition over a person's events of several models.

    SEQUENCE: events e1 < e2 < ... < ek (by timestamp, then arrival), ei an
    event of ``steps[i]``, ``ek.ts - e1.ts <= within_us`` (0: no bound), all
    carrying equal values of every ``same`` property, all in ``scope``; holds
    while such a match is in scope. ABSENCE: an anchor A (``steps[0]``) with
    no B (``steps[1]``, equal ``same`` values) after it and at most
    ``within_us`` later; holds from ``A.ts + within_us`` while A is in scope.
    ``reorder``, ``values`` and ``pending`` bound the state (reference.py
    states the rules exactly).
    """

    kind: Kind
    steps: tuple[Step, ...]
    within_us: int
    same: tuple[str, ...]
    scope: Scope
    window_us: int
    reorder: int = REORDER
    values: int = VALUES
    pending: int = PENDING

    @property
    def models(self) -> tuple[int, ...]:
        return tuple(sorted({s.model for s in self.steps}))


@dataclass(frozen=True)
class SequenceProgress:
    """How far a sequence leaf's best match has got, for explanations.

    SEQUENCE: ``steps_done`` steps of the match with the most steps in scope
    (the latest-starting such match), whose first step was at ``started_us``;
    ABSENCE: 2 when it holds, 1 while an anchor in scope still waits (the
    earliest: ``started_us`` its timestamp), 0 otherwise. ``values`` are the
    match's ``same`` values, in the leaf's order.
    """

    steps_done: int
    started_us: int | None
    values: tuple = ()


def leaf_models(leaf) -> tuple[int, ...]:
    """The event models an event leaf reads."""
    return leaf.models if isinstance(leaf, SequenceLeaf) else (leaf.model,)


@dataclass(frozen=True)
class Program:
    """Everything an evaluator runs. Audience i is ``audiences[i]``, a postfix code."""

    leaves: tuple[EventLeaf | SequenceLeaf, ...]
    audiences: tuple[tuple[tuple[int, int], ...], ...]
    n_static: int
    session_timeout_us: int


@dataclass(frozen=True)
class LeafValue:
    """An event leaf's value for a person at an instant, with what decides it."""

    holds: bool
    count: int
    aggregate: float | None
    flips_at: int | None  # the first later instant at which ``holds`` changes with no new event


def _kept(threshold: float) -> str:
    # How many timestamps a WITHIN COUNT keeps, as the compiled evaluator decides it:
    # none for NaN or a threshold every count beats, all of them beyond any real count.
    if math.isnan(threshold) or threshold <= -1.0:
        return "0"
    if threshold >= 4.0e18:
        return "all"
    return str(int(threshold) + 1)


def state_key(leaf: EventLeaf | SequenceLeaf) -> bytes:
    """The identity of the state an event leaf keeps, as canonical bytes.

    Two leaves with equal keys keep identical state from identical events, so
    a dumped state section can be restored into either; leaves that keep
    different state have different keys. What a leaf keeps depends on its
    model, filters and scope; on the window for WITHIN; on ``keep`` for a
    WITHIN COUNT (and nothing else of the comparison); on the property and on
    the aggregate's family for the others (SUM and AVG keep the same exact sum,
    MIN and MAX the same extremes). The comparison and threshold otherwise only
    read the state. A sequence leaf's key is every field of it: all of them
    shape what it keeps.
    """
    if isinstance(leaf, SequenceLeaf):
        return _sequence_key(leaf)
    filters = _filters_key(leaf.filters)
    parts = [f"model={leaf.model!r}", f"filters={filters!r}", f"scope={int(leaf.scope)}"]
    if leaf.scope == Scope.WITHIN:
        parts.append(f"window={int(leaf.window_us)}")
    if leaf.aggregation == Aggregation.COUNT:
        parts.append("count" + (f" keep={_kept(float(leaf.threshold))}" if leaf.scope == Scope.WITHIN else ""))
    else:
        family = "sum" if leaf.aggregation in (Aggregation.SUM, Aggregation.AVG) else "minmax"
        parts.append(f"{family} property={leaf.property!r}")
    return "\x1f".join(parts).encode("utf-8", "surrogatepass")


def _filters_key(filters) -> list[str]:
    # A conjunction does not depend on the order of its filters. Values keep their type:
    # (1,), (1.0,) and (True,) are different filters.
    return sorted({repr((f.property, int(f.op), tuple((type(v).__name__, v) for v in f.values))) for f in filters})


def _sequence_key(leaf: SequenceLeaf) -> bytes:
    # Everything a sequence leaf keeps depends on: its kind, its steps in order, the bound,
    # the same properties in order (they make the value key), the scope and the caps.
    steps = [f"{s.model!r}:{_filters_key(s.filters)!r}" for s in leaf.steps]
    parts = [f"kind={int(leaf.kind)}", f"steps={steps!r}", f"within={int(leaf.within_us)}", f"same={list(leaf.same)!r}",
             f"scope={int(leaf.scope)}", f"reorder={int(leaf.reorder)}", f"values={int(leaf.values)}"]
    if leaf.scope == Scope.WITHIN:
        parts.append(f"window={int(leaf.window_us)}")
    if leaf.kind == Kind.ABSENCE:
        parts.append(f"pending={int(leaf.pending)}")
    return "\x1f".join(parts).encode("utf-8", "surrogatepass")


def state_key_hash(leaf: EventLeaf | SequenceLeaf) -> int:
    """``state_key`` as the unsigned 64-bit number a dumped state section is keyed by."""
    return int.from_bytes(hashlib.blake2b(state_key(leaf), digest_size=8).digest(), "little")
