"""Reconciliation: stored memberships brought to what the definitions say, after a warehouse sync or a rebuild.

People with realtime state are evaluated one by one, and only those whose
warehouse parts now answer differently (a sync cannot move anyone else);
people without realtime state follow from the warehouse parts, vectorised.
These functions run inside the engine, on the writer thread.
"""

from __future__ import annotations

import numpy as np

from .changes import Cause, Direction, MembershipChange
from .warehouse_parts import changed


def after_sync(engine, txn, now_us: int) -> list[MembershipChange]:
    """A warehouse sync landed: recompute the warehouse parts; move people at once."""
    changes: list[MembershipChange] = []
    engine._fire_due(txn, now_us, changes)
    old_defaults = engine.defaults if engine.defaults is not None else engine._stored_defaults(txn)
    before = engine.warehouse
    engine.load_warehouse(txn)
    stored = dict(engine.store.state_people(txn))  # everyone with realtime state -> their person id
    moved = engine.warehouse.changed_since(before)  # person ids whose warehouse parts changed (None: anyone)
    if moved is None:
        keys = list(stored)
    else:
        by_pid = {pid: key for key, pid in stored.items() if pid is not None}  # the removed included
        keys = [k for k in (by_pid.get(pid) or engine.store.person_key(txn, pid) for pid in moved)
                if k is not None and engine._has_state(txn, k)]
    slots = [engine._slot(k, txn) for k in keys]
    changes += reconcile(engine, txn, now_us, Cause.WAREHOUSE_SYNC, old_defaults, slots)
    engine._persist(txn, changes)
    return changes


def reconcile(engine, txn, now_us: int, cause: Cause, old_defaults, slots) -> list[MembershipChange]:
    """Brings stored memberships to what the definitions say now.

    ``slots``: the people with realtime state whose answers may have
    moved; everyone else's follows from the warehouse parts, vectorised.
    """
    changes: list[MembershipChange] = []
    for slot in slots:
        if engine.slots.get(engine.keys[slot]) == slot:
            engine._evaluate(slot, now_us, range(len(engine.program_bits)), cause, "", changes)
            engine._schedule(txn, slot, now_us)
    defaults = engine.warehouse.defaults(engine.compiled, engine.warehouse.arrays)
    with_slot = np.zeros(len(engine.warehouse.alive), bool)  # people with realtime state decide for themselves
    for key, pid in engine.store.state_people(txn):
        if pid is not None and pid < len(with_slot):
            with_slot[pid] = True
    for slot in engine.slots.values():  # (and those loaded or not stored yet in this transaction)
        pid = engine.pids[slot]
        if pid is not None and pid < len(with_slot):
            with_slot[pid] = True
    for i, new in enumerate(defaults):
        bit = engine.program_bits[i]
        aid = engine.bits[bit]
        for pid in changed(new, old_defaults.get(aid), with_slot):
            key = engine.store.person_key(txn, pid)
            if key is None:
                continue
            bits = engine.store.membership(txn, key)
            if new[pid] and bit not in bits:
                bits[bit] = now_us
                changes.append(MembershipChange(aid, key, Direction.ENTER, now_us, cause))
            elif not new[pid] and bit in bits:
                del bits[bit]
                changes.append(MembershipChange(aid, key, Direction.EXIT, now_us, cause))
            else:
                continue
            engine.store.put_membership(txn, key, bits)
    engine.defaults = {engine.bits[engine.program_bits[i]]: arr for i, arr in enumerate(defaults)}
    return changes
