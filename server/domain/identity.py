"""Identity merges: an identify (or alias) event links an anonymous id to a user, and the histories become one.

Anonymous activity is kept under ``anon:<anonymous id>``. When an event
links that id to a user id, the anonymous person's events and the user's
are replayed together, in log order, into one state (read from the
person's event index, bounded by the log's retention); the anonymous person
exits everything, and the merged person is evaluated for every audience.
These functions run inside the engine, on the writer thread.
"""

from __future__ import annotations

from .changes import Cause, Direction, MembershipChange
from .events import ANON, Event, EventType, matching_models


def link(engine, txn, event: Event, now_us: int, changes: list[MembershipChange] | None) -> None:
    user = event.user_id
    other = event.anonymous_id if event.type == EventType.IDENTIFY else event.previous_id
    if not user or not other or engine.aliases.get(other) == user:
        return
    engine.aliases[other] = user
    engine.store.put_alias(txn, other, user)
    # identify links an anonymous id; alias may also rename a known user.
    sources = (ANON + other,) if event.type == EventType.IDENTIFY else (ANON + other, other)
    for source in sources:
        if source != user and engine._has_state(txn, source):
            _merge(engine, txn, source, user, now_us, changes, event)


def _merge(engine, txn, source: str, into: str, now_us: int, changes: list[MembershipChange] | None,
           event: Event) -> None:
    """Moves source's history into ``into``: replays both from the log, in order, up to the linking event.

    (During a rebuild the index already holds later events: the bound keeps them out.)
    """
    message_id = event.message_id
    src = engine._slot(source, txn)
    del engine.slots[source]
    dst = engine._slot(into, txn)
    seqs = sorted(set(engine.store.person_seqs(txn, source, event.seq))
                  | set(engine.store.person_seqs(txn, into, event.seq)))
    state = engine.evaluator.new_state()
    for seq in seqs:
        ev = engine.read_event(txn, seq)
        if ev is None:  # older than the log's retention
            continue
        for model, _ in matching_models(ev, engine.models):
            engine.evaluator.observe(state, model, ev.timestamp_us, ev.properties, ev.session_id)
    engine.store.move_events(txn, source, into)
    engine.store.delete_state(txn, source)
    engine.walk.unmark(engine.pids[src])
    engine.states[dst] = state
    engine.states[src] = engine.evaluator.new_state()
    engine._set_timer(txn, src, None)
    engine.dirty.add(dst)
    engine.dirty.discard(src)
    if changes is not None:
        for bit, _ in sorted(engine.members[src].items()):
            changes.append(MembershipChange(engine.bits[bit], source, Direction.EXIT, now_us, Cause.IDENTITY_MERGE,
                                            message_id))
        engine.store.put_membership(txn, source, {})
        engine._evaluate(dst, now_us, range(len(engine.program_bits)), Cause.IDENTITY_MERGE, message_id, changes)
    engine.members[src] = {}
    engine.current[src] = engine.current[dst] = None
    engine._schedule(txn, dst, now_us)
    engine.free_slot(src)

