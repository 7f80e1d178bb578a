"""The reference evaluator: the executable specification of condition semantics.

It keeps every event a person ever had and evaluates from scratch, written
for clarity, not speed. The compiled evaluator must agree with it on every
audience value and never miss an instant at which a value changes by itself;
differential property tests hold it to that.

Semantics:

- Values are str, int, float, bool; timestamps are integer microseconds. None
  is a missing value.
- Predicates: a missing value satisfies only IS_NOT_SET, NE and NOT_IN.
  Otherwise EQ and NE compare (booleans equal only booleans), LT LE GT GE and
  BETWEEN (inclusive) order numbers with numbers and strings with strings and
  are false across kinds, IN and NOT_IN test membership, CONTAINS and
  STARTS_WITH are substring tests on strings, IS_SET holds.
- An event leaf takes the person's events of its model that pass its
  filters, in its scope:
  * WITHIN w: events with ``now - w < ts`` (an event leaves at ``ts + w``;
    timestamps ahead of now count at once);
  * SESSION: the events of the person's current session (below), none once
    it has ended;
  * EVER: all of them.
  Sequence and absence leaves (``SequenceLeaf``) are specified in
  ``_reference_sequences``, with the caps that bound their state.
  COUNT is their number; SUM MIN MAX AVG aggregate ``property`` over those
  events that have it as a number, and are missing when none has. The value is
  compared with the threshold; a missing aggregate satisfies only NE.
- Sessions, in arrival order: an event starts a new session when the person
  has none, when its timestamp is at least ``session_timeout`` after the
  latest timestamp of the current session, or when it carries a session_id
  other than the current session's; otherwise it joins the current session.
  A session ends ``session_timeout`` after its latest timestamp.
- Persisted state (``dump``/``load``): a loaded person answers exactly as if
  never dumped, except that a leaf whose state key (``program.state_key``)
  the dumping program lacked sees only the events observed after the load.
  The reference dumps every event it keeps (byte 0 is 0xF1, then JSON, then
  zlib's CRC-32): it is the specification of what a restored state answers,
  not of the compiled evaluator's bounded byte layout, which it cannot
  rebuild from a summary without becoming a second compiled evaluator.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

from . import _reference_sequences as _seq
from .program import (Aggregation, Code, Comparison, EventLeaf, LeafValue, Op, Program, Scope, SequenceLeaf,
                      SequenceProgress, state_key_hash)

REFERENCE_FORMAT = 0xF1  # byte 0 of the reference's dumps; the compiled format's is its version, 1


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _eq(v, a) -> bool:
    if isinstance(v, bool) or isinstance(a, bool):
        return isinstance(v, bool) and isinstance(a, bool) and v == a
    return v == a


def _ordered(v, a) -> bool:
    return (_is_number(v) and _is_number(a)) or (isinstance(v, str) and isinstance(a, str))


def matches_predicate(op: Op, values: tuple, v) -> bool:
    """Whether a value (None: missing) satisfies ``op values``."""
    if v is None:
        return op in (Op.IS_NOT_SET, Op.NE, Op.NOT_IN)
    if op == Op.IS_SET:
        return True
    if op == Op.IS_NOT_SET:
        return False
    if op == Op.IN:
        return any(_eq(v, a) for a in values)
    if op == Op.NOT_IN:
        return not any(_eq(v, a) for a in values)
    a = values[0]
    if op == Op.EQ:
        return _eq(v, a)
    if op == Op.NE:
        return not _eq(v, a)
    if op == Op.CONTAINS:
        return isinstance(v, str) and isinstance(a, str) and a in v
    if op == Op.STARTS_WITH:
        return isinstance(v, str) and isinstance(a, str) and v.startswith(a)
    if op == Op.BETWEEN:
        b = values[1]
        return _ordered(v, a) and _ordered(v, b) and a <= v <= b
    if not _ordered(v, a):
        return False
    if op == Op.LT:
        return v < a
    if op == Op.LE:
        return v <= a
    if op == Op.GT:
        return v > a
    return v >= a


def compare(comparison: Comparison, value: float | None, threshold: float) -> bool:
    """A count or aggregate against a threshold; a missing aggregate satisfies only NE."""
    if value is None:
        return comparison == Comparison.NE
    if comparison == Comparison.EQ:
        return value == threshold
    if comparison == Comparison.NE:
        return value != threshold
    if comparison == Comparison.LT:
        return value < threshold
    if comparison == Comparison.LE:
        return value <= threshold
    if comparison == Comparison.GT:
        return value > threshold
    return value >= threshold


def exact_sum(values: list[float]) -> float:
    """The correctly rounded sum; where that overflows, what IEEE arithmetic answers (±inf, nan)."""
    try:
        return math.fsum(values)
    except (OverflowError, ValueError):  # intermediate overflow, inf + -inf, an int beyond a double
        total = 0.0
        for v in values:
            total += _as_float(v)
        return total


def _as_float(v) -> float:
    """float(v), or ±inf for an int beyond a double (where float() raises)."""
    try:
        return float(v)
    except OverflowError:
        return math.inf if v > 0 else -math.inf


def aggregate(aggregation: Aggregation, values: list[float], count: int) -> float | None:
    if aggregation == Aggregation.COUNT:
        return float(count)
    if not values:
        return None
    if aggregation == Aggregation.SUM:
        return exact_sum(values)
    if aggregation == Aggregation.MIN:
        return _as_float(min(values))
    if aggregation == Aggregation.MAX:
        return _as_float(max(values))
    return exact_sum(values) / len(values)


def passes(leaf: EventLeaf, properties: dict) -> bool:
    return _passes(leaf.filters, properties)


def _passes(filters, properties: dict) -> bool:
    return all(matches_predicate(f.op, f.values, properties.get(f.property)) for f in filters)


@dataclass
class _Event:
    model: int
    ts: int
    properties: dict
    session: int
    seq: int = 0  # arrival number, from 1


@dataclass
class PersonState:
    """Everything the reference knows about one person."""

    events: list[_Event] = field(default_factory=list)
    session: int = -1
    session_id: str = ""
    session_last_ts: int = 0
    arrivals: int = 0
    # state key -> the arrival number up to which that key's leaves see nothing
    # (set by load for leaves the dumping program lacked)
    born: dict = field(default_factory=dict)


class ReferenceEvaluator:
    """Runs a Program over PersonStates; the specification the compiled evaluator matches."""

    def __init__(self, program: Program):
        self.program = program
        self.timeout = program.session_timeout_us
        self.keys = tuple(state_key_hash(lf) for lf in program.leaves)

    def new_state(self) -> PersonState:
        return PersonState()

    def observe(self, state: PersonState, model: int, ts_us: int, properties: dict, session_id: str = "") -> None:
        """Records one event of ``model`` (already matched to the model) for the person."""
        if (state.session < 0 or ts_us >= state.session_last_ts + self.timeout
                or (session_id and session_id != state.session_id)):
            state.session += 1
            state.session_id = session_id
            state.session_last_ts = ts_us
        else:
            state.session_last_ts = max(state.session_last_ts, ts_us)
        state.arrivals += 1
        state.events.append(_Event(model, ts_us, properties, state.session, state.arrivals))

    def _session_open(self, state: PersonState, now_us: int) -> bool:
        return state.session >= 0 and now_us < state.session_last_ts + self.timeout

    def _value(self, state: PersonState, leaf: EventLeaf, now_us: int, born: int = 0) -> tuple[bool, int, float | None]:
        scoped = [e for e in state.events if e.model == leaf.model and e.seq > born and passes(leaf, e.properties)]
        if leaf.scope == Scope.WITHIN:
            scoped = [e for e in scoped if now_us - leaf.window_us < e.ts]
        elif leaf.scope == Scope.SESSION:
            open_ = state.session >= 0 and now_us < state.session_last_ts + self.timeout
            scoped = [e for e in scoped if open_ and e.session == state.session]
        values = [e.properties[leaf.property] for e in scoped
                  if leaf.property and _is_number(e.properties.get(leaf.property))]
        value = aggregate(leaf.aggregation, values, len(scoped))
        return compare(leaf.comparison, value, leaf.threshold), len(scoped), value

    def _sequence(self, state: PersonState, j: int, now_us: int):
        return _seq.sequence_leaf(self.program.leaves[j], state, now_us, state.born.get(self.keys[j], 0),
                                  self.timeout, _passes)

    def progress(self, state: PersonState, j: int, now_us: int) -> SequenceProgress:
        """How far sequence leaf j's best match has got at ``now_us`` (for explanations)."""
        if not isinstance(self.program.leaves[j], SequenceLeaf):
            raise TypeError(f"leaf {j} is not a sequence leaf")
        return self._sequence(state, j, now_us)[1]

    def leaf(self, state: PersonState, j: int, now_us: int) -> LeafValue:
        """Event leaf j's value at ``now_us``, and when it next flips by itself.

        A sequence leaf's ``count`` is its progress's ``steps_done``; its aggregate is None.
        """
        leaf = self.program.leaves[j]
        if isinstance(leaf, SequenceLeaf):
            holds, progress, flips_at = self._sequence(state, j, now_us)
            return LeafValue(holds, progress.steps_done, None, flips_at)
        born = state.born.get(self.keys[j], 0)
        holds, count, value = self._value(state, leaf, now_us, born)
        # Only time passing changes anything: events leave windows, sessions end.
        if leaf.scope == Scope.WITHIN:
            candidates = sorted({e.ts + leaf.window_us for e in state.events
                                 if e.model == leaf.model and e.ts + leaf.window_us > now_us})
        elif leaf.scope == Scope.SESSION and state.session >= 0 and now_us < state.session_last_ts + self.timeout:
            candidates = [state.session_last_ts + self.timeout]
        else:
            candidates = []
        flips_at = next((t for t in candidates if self._value(state, leaf, t, born)[0] != holds), None)
        return LeafValue(holds, count, value, flips_at)

    # ------------------------------------------------------------ persisted state

    def dump(self, state: PersonState) -> bytes:
        """The person's whole state: every event, and which leaves were born late."""
        born = {}
        for k in self.keys:
            born[format(k, "016x")] = state.born.get(k, 0)
        body = [state.session, state.session_id, state.session_last_ts, state.arrivals, born,
                [[e.model, e.ts, e.properties, e.session, e.seq] for e in state.events]]
        raw = bytes([REFERENCE_FORMAT]) + json.dumps(body, separators=(",", ":")).encode()
        return raw + zlib.crc32(raw).to_bytes(4, "little")

    def load_with_missing(self, raw) -> tuple[PersonState, tuple[int, ...]]:
        """``(load(raw), missing_leaves(raw))``."""
        if raw is None or len(raw) == 0:
            return PersonState(), tuple(range(len(self.keys)))
        raw = bytes(raw)
        if raw[0] != REFERENCE_FORMAT:
            if raw[0] == 1:
                raise ValueError("evaluator state dumped by the compiled evaluator: "
                                 "the reference evaluator reads only its own format")
            raise ValueError(f"unknown evaluator state format version {raw[0]} (the reference reads only {REFERENCE_FORMAT:#x})")
        if len(raw) < 5 or zlib.crc32(raw[:-4]).to_bytes(4, "little") != raw[-4:]:
            raise ValueError("corrupt evaluator state: checksum mismatch")
        try:
            session, session_id, last_ts, arrivals, born, events = json.loads(raw[1:-4])
            state = PersonState(session=_int(session), session_id=_str(session_id),
                                session_last_ts=_int(last_ts), arrivals=_int(arrivals))
            for model, ts, props, sess, seq in events:
                if not isinstance(props, dict) or not all(
                        isinstance(v, (str, int, float, bool)) for v in props.values()):
                    raise ValueError("properties")
                state.events.append(_Event(_int(model), _int(ts), props, _int(sess), _int(seq)))
            had = {int(k, 16): _int(v) for k, v in born.items()}
        except (TypeError, ValueError, KeyError, AttributeError) as exc:
            raise ValueError(f"corrupt evaluator state: {exc}") from None
        missing = []
        for j, k in enumerate(self.keys):
            if k in had:
                if had[k]:
                    state.born[k] = had[k]
            else:
                state.born[k] = state.arrivals  # a new leaf sees only what comes next
                missing.append(j)
        return state, tuple(missing)

    def load(self, raw) -> PersonState:
        """A person's state from ``dump``'s bytes; None or b"" gives a new state."""
        return self.load_with_missing(raw)[0]

    def missing_leaves(self, raw) -> tuple[int, ...]:
        """Indices of this program's leaves whose state ``raw`` lacks (all of them for None or b"")."""
        return self.load_with_missing(raw)[1]

    def graft(self, state: PersonState, donor: PersonState, pairs) -> None:
        """Leaf j (of each ``(j, k)`` in ``pairs``) sees only the events the donor has seen: its latest arrivals.

        The donor saw the person's retained events, the latest of the
        state's; so the leaf counts events from the arrival that many before
        the state's last (what a backfill of a new leaf can know).
        """
        for j, _ in pairs:
            state.born[self.keys[j]] = max(0, state.arrivals - donor.arrivals)

    def evaluate(self, state: PersonState, now_us: int, static: Sequence[bool]) -> list[bool]:
        """Every audience's value for the person at ``now_us``."""
        leaves = [self.leaf(state, j, now_us).holds for j in range(len(self.program.leaves))]
        return [run(code, leaves, static) for code in self.program.audiences]

    def evaluate_bytes(self, state: PersonState, now_us: int, static: Sequence[bool]) -> bytes:
        """``evaluate`` as bytes of 0 and 1."""
        return bytes(self.evaluate(state, now_us, static))

    def next_change(self, state: PersonState, now_us: int) -> int | None:
        """The first instant after ``now_us`` at which some event leaf flips with no new event.

        Audience values can only change at such instants; the engine's timer
        index re-evaluates the person then.
        """
        times = [v.flips_at for j in range(len(self.program.leaves))
                 if (v := self.leaf(state, j, now_us)).flips_at is not None]
        return min(times) if times else None


def run(code: Sequence[tuple[int, int]], leaves: Sequence[bool], static: Sequence[bool]) -> bool:
    """Executes one audience's postfix code."""
    stack: list[bool] = []
    for op, arg in code:
        if op == Code.STATIC:
            stack.append(bool(static[arg]))
        elif op == Code.EVENT:
            stack.append(bool(leaves[arg]))
        elif op == Code.AND:
            vals = stack[-arg:]
            del stack[-arg:]
            stack.append(all(vals))
        elif op == Code.OR:
            vals = stack[-arg:]
            del stack[-arg:]
            stack.append(any(vals))
        elif op == Code.NOT:
            stack.append(not stack.pop())
        else:
            raise ValueError(f"unknown instruction {op}")
    if len(stack) != 1:
        raise ValueError("malformed program")
    return stack[0]


def _int(x) -> int:
    if type(x) is not int:
        raise ValueError(f"expected an integer, got {x!r}")
    return x


def _str(x) -> str:
    if type(x) is not str:
        raise ValueError(f"expected a string, got {x!r}")
    return x
