"""Backfill: a new or changed audience learns the retained history beside ingest, never in front of it.

CreateAudience and UpdateAudience switch the program at once: what they
cost is compiling it, not the history. The new event leaves then learn what
they missed, person by person:

- Every event leaf has an *epoch*, the program generation at which its state
  key joined the program, and every stored state the generation it was
  dumped at. A person's stored state lacks the leaves whose epoch is later
  (or holds a stale copy, from before the key last left the program).
- Whenever such a person is loaded (by an event, a timer, a sync, a merge or
  the walk below), those leaves are grafted from a replay of the person's own
  retained events (their event index, bounded by retention) through an
  evaluator of just those leaves; the person is then evaluated for every
  audience. Events that arrive meanwhile go to the switched program, so
  nothing is missed and nothing counted twice.
- A walk visits everyone with realtime state, in key order, a bounded slice
  per writer job between ingest batches; then the people without realtime
  state, whose memberships follow from the warehouse parts, in chunks of
  person ids. Enters and exits it finds are changes with cause
  AUDIENCE_CHANGE. Its progress commits with each slice, so a restart
  (kill -9 included) resumes it; a person's graft commits with their state.

While the walk runs, the audience is BACKFILLING: people the walk has not
reached yet still have the memberships of the old definition (none, for a new
audience). Once it ends the audience is LIVE.

These functions run inside the engine, on the writer thread.
"""

from __future__ import annotations

import time

import numpy as np

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Program

from .changes import Cause, Direction, MembershipChange
from .events import matching_models
from .warehouse_parts import changed

SLICE_SECONDS = 0.004  # a walk slice's work, at most (one person's replay may exceed it)
WAREHOUSE_CHUNK = 65536  # person ids per slice of the warehouse phase


def start(engine, txn, audience_ids: list[str], now_us: int) -> None:
    """Starts (or restarts, with more audiences) the walk: a new definition needs everyone evaluated."""
    progress = engine.store.backfill(txn) or {"audiences": [], "started_us": now_us}
    progress["audiences"] = sorted(set(progress["audiences"]) | set(audience_ids))
    progress.update(phase="people", after="", done=0, total=engine.store.state_count(txn), started_us=now_us)
    engine.store.put_backfill(txn, progress)
    engine.backfilling = progress


def forget(engine, txn, audience_id: str) -> None:
    """A deleted audience leaves the walk (which ends if it was the last)."""
    progress = engine.backfilling
    if progress is None or audience_id not in progress["audiences"]:
        return
    progress["audiences"].remove(audience_id)
    engine.backfilling = progress if progress["audiences"] else None
    engine.store.put_backfill(txn, engine.backfilling)


def fraction(progress: dict) -> float:
    """How far the walk is, from 0 to 1: people with realtime state first, then the warehouse's."""
    if progress["phase"] == "people":
        return 0.9 * min(1.0, progress["done"] / max(1, progress["total"]))
    return 0.9 + 0.1 * min(1.0, progress["after"] / max(1, progress.get("people", 1)))


def graft(engine, txn, key: str, state, generation: int) -> bool:
    """Gives a person's state the leaves that joined the program after ``generation``; True if it had any."""
    leaves = tuple(j for j, epoch in enumerate(engine.leaf_epochs) if epoch > generation)
    if not leaves:
        return False
    evaluator = engine.grafters.get(leaves)
    if evaluator is None:
        program = engine.compiled.program
        evaluator = engine.grafters[leaves] = make_evaluator(
            Program(tuple(program.leaves[j] for j in leaves), (), 0, program.session_timeout_us),
            reference=engine.reference)
    donor = evaluator.new_state()
    for seq in engine.store.person_seqs(txn, key):
        ev = engine.read_event(txn, seq)
        if ev is None:  # older than the log's retention
            continue
        for model, _ in matching_models(ev, engine.models):
            evaluator.observe(donor, model, ev.timestamp_us, ev.properties, ev.session_id)
    engine.evaluator.graft(state, donor, [(j, i) for i, j in enumerate(leaves)])
    return True


def step(engine, txn, now_us: int, seconds: float = SLICE_SECONDS, people: int | None = None) -> list[MembershipChange]:
    """One slice of the walk (a writer job of its own); the changes it made."""
    progress = engine.backfilling
    changes: list[MembershipChange] = []
    engine._fire_due(txn, now_us, changes)
    if progress is None:
        engine._persist(txn, changes)
        return changes
    until = time.perf_counter() + seconds
    if progress["phase"] == "people":
        _people(engine, txn, now_us, progress, until, people, changes)
    else:
        _warehouse(engine, txn, now_us, progress, until, changes)
    if progress["phase"] == "live":
        engine.backfilling = None
        engine.store.put_backfill(txn, None)
    else:
        engine.store.put_backfill(txn, progress)
    return changes


def _people(engine, txn, now_us: int, progress: dict, until: float, people: int | None,
            changes: list[MembershipChange]) -> None:
    everything = range(len(engine.program_bits))
    visited: list[str] = []
    while people is None or len(visited) < people:
        batch = engine.store.state_keys_after(txn, progress["after"], 64 if people is None else 1)
        if not batch:
            progress.update(phase="warehouse", after=0, people=len(engine.warehouse.alive))
            break
        for key in batch:
            if key not in engine.slots:
                visited.append(key)
            slot = engine._slot(key, txn)
            engine._evaluate(slot, now_us, everything, Cause.AUDIENCE_CHANGE, "", changes)
            engine._schedule(txn, slot, now_us)
            progress["after"] = key
            progress["done"] += 1
        if time.perf_counter() > until:
            break
    engine._persist(txn, changes)
    for key in visited:  # the walk does not push the people ingest needs out of the cache
        slot = engine.slots.pop(key, None)
        if slot is not None:
            engine.free_slot(slot)


def _warehouse(engine, txn, now_us: int, progress: dict, until: float, changes: list[MembershipChange]) -> None:
    """People without realtime state: their memberships follow from the warehouse parts, a slice of ids at a time."""
    if engine.defaults is None:
        engine.defaults = engine._stored_defaults(txn)
    lo = progress["after"]
    hi = min(lo + WAREHOUSE_CHUNK, len(engine.warehouse.alive))
    skip = np.ones(len(engine.warehouse.alive), bool)  # outside [lo, hi), and people with loaded realtime state
    skip[lo:hi] = False
    for pid in engine.pids:
        if pid is not None and lo <= pid < hi:
            skip[pid] = True
    new = engine.warehouse.defaults(engine.compiled, engine.warehouse.arrays)
    moves = []  # (person id, program audience index), in id order
    for i, arr in enumerate(new):
        if engine.bits[engine.program_bits[i]] in progress["audiences"]:
            moves += [(pid, i) for pid in changed(arr, _padded(engine.defaults.get(engine.bits[engine.program_bits[i]]),
                                                               len(arr)), skip)]
    moves.sort()
    end = hi
    for n, (pid, i) in enumerate(moves):
        if n % 64 == 0 and time.perf_counter() > until and n:
            end = pid  # the rest of the slice next time (this person included)
            break
        _move(engine, txn, pid, i, bool(new[i][pid]), now_us, changes)
    for i, arr in enumerate(new):
        aid = engine.bits[engine.program_bits[i]]
        if aid in progress["audiences"]:
            merged = _padded(engine.defaults.get(aid), len(arr))
            merged[lo:end] = arr[lo:end]
            engine.defaults[aid] = merged
    engine._persist(txn, changes)
    progress["after"] = end
    if end >= len(engine.warehouse.alive):
        progress["phase"] = "live"


def _padded(arr: np.ndarray | None, n: int) -> np.ndarray:
    out = np.zeros(n, bool)
    if arr is not None:
        out[:min(n, len(arr))] = arr[:n]
    return out


def _move(engine, txn, pid: int, i: int, member: bool, now_us: int, changes: list[MembershipChange]) -> None:
    """A person without realtime state enters (or exits) program audience i, as the warehouse says."""
    key = engine.store.person_key(txn, pid)
    if key is None or engine._has_state(txn, key):  # (people with realtime state were walked)
        return
    bit = engine.program_bits[i]
    aid = engine.bits[bit]
    bits = engine.store.membership(txn, key)
    if member and bit not in bits:
        bits[bit] = now_us
        changes.append(MembershipChange(aid, key, Direction.ENTER, now_us, Cause.AUDIENCE_CHANGE))
    elif not member and bit in bits:
        del bits[bit]
        changes.append(MembershipChange(aid, key, Direction.EXIT, now_us, Cause.AUDIENCE_CHANGE))
    else:
        return
    engine.store.put_membership(txn, key, bits)
