"""Recovery: a start loads every person's stored state, or, when it cannot be used, rebuilds it from the log.

Stored states are valid for the program (and evaluator) they were dumped
under, whose fingerprint is stored beside them. ``restore`` loads them and
fires the timers that came due while no process ran, each at its own
instant; ``rebuild`` replays the retained log into fresh states (a new
program, an unreadable state, or a data folder from before states were
stored). These functions run inside the engine, on the writer thread.
"""

from __future__ import annotations

import hashlib

from .changes import Cause, MembershipChange
from .events import matching_models
from .reconcile import reconcile

STATE_LAYOUT = 2  # 2: a stored state carries the program generation it was dumped at (backfill.py)


def fingerprint(engine) -> bytes:
    """Stored states are valid for this program and this evaluator only."""
    what = repr((engine.compiled.program, type(engine.evaluator).__name__, STATE_LAYOUT))
    return hashlib.sha256(what.encode()).digest()


def restore(engine, txn, now_us: int) -> list[MembershipChange]:
    """Reads nothing per person but the timers that came due while no process ran.

    Each person's state is loaded the first time an event, a timer or a
    warehouse change needs it. Memberships were committed with their causes,
    so nothing else is stale: only time moved.
    """
    engine._reset_people()
    engine.aliases = engine.store.aliases(txn)
    changes: list[MembershipChange] = []
    engine._fire_due(txn, now_us, changes)  # each at its own instant, in time order
    engine._persist(txn, changes)
    return changes


def rebuild(engine, txn, now_us: int, old_defaults: dict) -> list[MembershipChange]:
    """Replays the retained log into fresh states, then reconciles everyone at now.

    Windows that lapsed while no process ran lapse at their own instants.
    """
    engine._reset_people()
    engine.store.clear_states(txn)
    engine.store.put_program(txn, fingerprint(engine))
    last = {}
    touched: dict[int, set[int]] = {}
    for event in engine.iter_events(txn):
        engine._observe(txn, event, matching_models(event, engine.models), event.received_us, touched, None)
        for slot in touched:
            last[slot] = event.received_us
        touched.clear()
    changes: list[MembershipChange] = []
    for slot, t0 in last.items():
        if engine.slots.get(engine.keys[slot]) != slot:
            continue
        t = engine.evaluator.next_change(engine.states[slot], t0)
        while t is not None and t <= now_us:
            engine._evaluate(slot, t, range(len(engine.program_bits)), Cause.WINDOW_LAPSE, "", changes)
            t = engine.evaluator.next_change(engine.states[slot], t)
    changes += reconcile(engine, txn, now_us, Cause.WINDOW_LAPSE, old_defaults, list(engine.slots.values()))
    engine._persist(txn, changes)
    return changes
