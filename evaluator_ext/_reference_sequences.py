"""The reference semantics of sequence and absence leaves: part of the executable specification.

Events are ordered by (timestamp, arrival): ``e < f``. Every rule below is
applied literally, over every event the reference keeps; the compiled
evaluator must give the same answers from bounded state.

Relevance. An event is relevant to a leaf when it is an event of some step's
model passing that step's filters (its *mask*: the steps it can fill), and
it carries every ``same`` property with a value. Its *value* is the tuple of
those properties, compared as predicates compare (booleans equal only
booleans, ``1 == 1.0``); a missing or NaN value never matches, so such an
event is not relevant at all (an A without it is never an absence anchor).

Matches.
- SEQUENCE: e1 < e2 < ... < ek of one value, ei filling step i (one event
  fills one step of a match), ``ek.ts - e1.ts <= within`` (0: unbounded).
  It holds at ``now`` while some match is in scope: WITHIN w, ``now - w <
  e1.ts`` (so it exits by itself at ``e1.ts + w``); SESSION, all in the current
  session while it is open; EVER, always.
- ABSENCE: an anchor A (steps[0]) is cancelled by a B (steps[1], same value)
  with ``A < B`` and ``B.ts <= A.ts + within`` (a B at exactly A + within
  cancels). It holds at ``now`` while some uncancelled anchor has ``A.ts +
  within <= now`` and is in scope (WITHIN w: ``now < A.ts + w``; SESSION:
  in the open current session; EVER: always). Late events count by their
  timestamp: a late B cancels on arrival, a late step can complete a match.

Caps: what the bounded state forgets, in the order events arrive. Per leaf,
a table maps values to what is remembered of them (SESSION: the table is
emptied when a relevant event of another session arrives).
1. VALUES: a relevant event of a value the table lacks, when it holds
   ``values`` values already, makes the table forget the value whose latest
   remembered event is the oldest (by timestamp, then arrival), and all of
   it; if that is the newcomer's own event, the event is forgotten instead.
2. REORDER: an event arriving when ``reorder`` remembered events of its value
   are later than it is ignored (too late to be put in its place).
3. PENDING (ABSENCE): of a value's remembered events, all but the latest
   ``reorder`` are *folded*, in order. Folding B cancels the pending anchors
   it cancels; folding any event at ts makes each pending anchor with
   ``A.ts + within < ts`` final (nothing kept can cancel it any more);
   folding an anchor makes it pending only while fewer than ``pending``
   anchors are: otherwise it is forgotten. Pending anchors are still
   cancelled by the B among the latest ``reorder`` events.
Below the caps (at most ``reorder`` relevant events per value and at most
``values`` values) nothing is forgotten: the answers are those of the
definitions above over every event, which tests/test_sequences.py checks
against a brute-force oracle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .program import Kind, Scope, SequenceLeaf, SequenceProgress


def canonical(v) -> tuple | None:
    """A ``same`` value as a key: equal keys exactly when the values are equal as predicates compare them."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    if isinstance(v, bool):
        return ("b", v)
    if isinstance(v, str):
        return ("s", v)
    return ("n", v)  # ints and floats: Python's == and hash already agree across them, exactly


def relevance(leaf: SequenceLeaf, model: int, properties: dict, passes) -> tuple[int, tuple] | None:
    """(mask, value key) of an event for the leaf, or None when it is not relevant."""
    mask = 0
    for i, step in enumerate(leaf.steps):
        if step.model == model and passes(step.filters, properties):
            mask |= 1 << i
    if not mask:
        return None
    key = tuple(canonical(properties.get(p)) for p in leaf.same)
    if any(k is None for k in key):
        return None
    return mask, key


@dataclass
class Remembered:
    """One value's remembered events (``(ts, seq, mask)``, in arrival order) and its latest."""

    key: tuple
    latest: tuple[int, int]
    events: list = field(default_factory=list)

    def ordered(self) -> list:
        return sorted(self.events)


def remember(leaf: SequenceLeaf, events, born: int, passes) -> tuple[dict, int]:
    """Caps 1 and 2 over the person's events in arrival order: value key -> Remembered, and their session."""
    table: dict[tuple, Remembered] = {}
    session = -1
    for e in events:
        if e.seq <= born:
            continue
        rel = relevance(leaf, e.model, e.properties, passes)
        if rel is None:
            continue
        mask, key = rel
        if leaf.scope == Scope.SESSION and e.session != session:
            table, session = {}, e.session
        at = (e.ts, e.seq)
        group = table.get(key)
        if group is None:
            if len(table) >= leaf.values:
                oldest = min(table.values(), key=lambda g: g.latest)
                if oldest.latest > at:
                    continue  # the newcomer is the oldest: forgotten at once
                del table[oldest.key]
            group = table[key] = Remembered(key, at)
        if sum(1 for x in group.events if x[:2] > at) >= leaf.reorder:
            continue  # too late
        group.events.append((e.ts, e.seq, mask))
        group.latest = max(group.latest, at)
    return table, session


# ---------------------------------------------------------------- SEQUENCE


def _depth(leaf: SequenceLeaf, evs: list, i: int) -> int:
    """How many steps a match starting with evs[i] (as step 1) fills: each next step the earliest that fits.

    Taking the earliest fitting event for each next step leaves the most room
    for the rest, so for a given first event no other choice gets further.
    """
    first_ts, cur, depth = evs[i][0], i, 1
    for s in range(1, len(leaf.steps)):
        cur = next((j for j in range(cur + 1, len(evs)) if evs[j][2] >> s & 1
                    and (not leaf.within_us or evs[j][0] - first_ts <= leaf.within_us)), None)
        if cur is None:
            break
        depth += 1
    return depth


def _sequence_at(leaf: SequenceLeaf, table: dict, in_scope, now: int) -> SequenceProgress:
    best = (0, 0, (0, 0))
    found = None
    for group in table.values():
        evs = group.ordered()
        for i, (ts, _, mask) in enumerate(evs):
            if mask & 1 and in_scope(ts, now):
                rank = (_depth(leaf, evs, i), ts, group.latest)
                if rank > best:
                    best, found = rank, group
    if found is None:
        return SequenceProgress(0, None, ())
    return SequenceProgress(best[0], best[1], _values(found.key))


# ---------------------------------------------------------------- ABSENCE


def _live_anchors(leaf: SequenceLeaf, group: Remembered) -> list[int]:
    """The timestamps of the value's anchors that nothing cancels, after cap 3."""
    a_bit, b_bit, within = 1, 2, leaf.within_us
    evs = group.ordered()
    cut = max(0, len(evs) - leaf.reorder)
    folded, latest = evs[:cut], evs[cut:]
    final: list[int] = []
    pending: list[int] = []
    for ts, _, mask in folded:
        if mask & b_bit:
            pending = [p for p in pending if ts > p + within]
        final += [p for p in pending if p + within < ts]
        pending = [p for p in pending if p + within >= ts]
        if mask & a_bit and len(pending) < leaf.pending:
            pending.append(ts)
    live = final + [p for p in pending if not any(m & b_bit and ts <= p + within for ts, _, m in latest)]
    for i, (a, _, mask) in enumerate(latest):
        if mask & a_bit and not any(m & b_bit and ts <= a + within for ts, _, m in latest[i + 1:]):
            live.append(a)
    return live


def _absence_at(leaf: SequenceLeaf, lives: list[tuple[Remembered, list[int]]], in_scope, now: int) -> SequenceProgress:
    within = leaf.within_us
    if any(a + within <= now and in_scope(a, now) for _, live in lives for a in live):
        return SequenceProgress(2, None, ())
    waiting = [(a, group.latest, group) for group, live in lives for a in live if now < a + within and in_scope(a, now)]
    if not waiting:
        return SequenceProgress(0, None, ())
    a, _, group = min(waiting, key=lambda w: (w[0], tuple(-x for x in w[1])))
    return SequenceProgress(1, a, _values(group.key))


# ---------------------------------------------------------------- both


def _values(key: tuple) -> tuple:
    return tuple(v for _, v in key)


def sequence_leaf(leaf: SequenceLeaf, state, now_us: int, born: int, timeout: int, passes):
    """(holds, progress, flips_at) of a sequence leaf for a person's ``state`` at ``now_us``."""
    table, session = remember(leaf, state.events, born, passes)

    def in_scope(ts: int, t: int) -> bool:
        if leaf.scope == Scope.WITHIN:
            return t - leaf.window_us < ts
        if leaf.scope == Scope.SESSION:
            return session == state.session and t < state.session_last_ts + timeout
        return True

    k = len(leaf.steps)
    if leaf.kind == Kind.SEQUENCE:
        def at(t: int) -> SequenceProgress:
            return _sequence_at(leaf, table, in_scope, t)

        def holds(p: SequenceProgress) -> bool:
            return p.steps_done == k
        candidates = {ts + leaf.window_us for g in table.values() for ts, _, _ in g.events} \
            if leaf.scope == Scope.WITHIN else set()
    else:
        lives = [(g, _live_anchors(leaf, g)) for g in table.values()]

        def at(t: int) -> SequenceProgress:
            return _absence_at(leaf, lives, in_scope, t)

        def holds(p: SequenceProgress) -> bool:
            return p.steps_done == 2
        candidates = {ts + leaf.within_us for g in table.values() for ts, _, _ in g.events}
        if leaf.scope == Scope.WITHIN:
            candidates |= {ts + leaf.window_us for g in table.values() for ts, _, _ in g.events}
    if leaf.scope == Scope.SESSION:
        candidates.add(state.session_last_ts + timeout)
    progress = at(now_us)
    now_holds = holds(progress)
    flips_at = next((t for t in sorted(candidates) if t > now_us and holds(at(t)) != now_holds), None)
    return now_holds, progress, flips_at
