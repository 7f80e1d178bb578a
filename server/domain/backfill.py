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
  audience. For the walk, another process makes most of these replays
  ahead of it (donors.py). Events that arrive meanwhile go to the switched program, so
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

import bisect
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from . import donors
from .changes import Cause, Direction, MembershipChange
from .events import ANON
from .warehouse_parts import changed

log = logging.getLogger(__name__)

SLICE_SECONDS = 0.05  # a walk slice's work, at most (one person's replay may exceed it)
# ... but once other work waits for the writer, no more than this. Each slice costs a commit (an fsync):
# at 2 ms a new window's walk over 1M events took 48.9 s, at 4 ms 20.2 s, with ack p99 2.6x and 2.0x quiet.
YIELD_AFTER = 0.004
# A slice that starts with work already waiting (most often one riding in an ingest batch's transaction,
# which waits to commit) does this much. Alternating with 4 ms over four graft walks at 1M events beside the
# steady stream: walks as fast (11.2 s on average both ways), ack p99 19.7-26.8 ms against 23.8-42.9 ms.
WAITED_SECONDS = 0.001
WAREHOUSE_CHUNK = 65536  # person ids per chunk of the warehouse phase
MEMBER_PAGE = 256  # member keys read at a time while a baseline is read from the member index


@dataclass
class Chunk:
    """A range of person ids of the warehouse phase: who moves in it, worked out once for all its slices."""
    compiled: object  # the program,
    warehouse: object  # the warehouse parts
    audiences: list[str]  # and the walked audiences it was worked out for
    lo: int
    hi: int
    walking: dict[int, str]  # program audience index -> audience id
    new: dict[int, np.ndarray]  # program audience index -> its default membership over [lo, hi)
    moves: list[tuple[int, int]]  # (person id, program audience index), in order

    def fits(self, engine, audiences: list[str], lo: int) -> bool:
        return (self.compiled is engine.compiled and self.warehouse is engine.warehouse
                and self.audiences == audiences and self.lo <= lo < self.hi)


@dataclass
class Walk:
    """What a walk keeps in memory between slices: a cache, rebuilt after a restart, never the only copy."""
    baseline: dict[str, np.ndarray] = field(default_factory=dict)  # see _baseline
    building: dict[str, tuple[np.ndarray, str]] = field(default_factory=dict)  # a baseline half read, and where
    stateful: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # person id -> walked with state
    chunk: Chunk | None = None
    ahead: donors.Ahead = field(default_factory=donors.Ahead)  # grafts replayed ahead of the people phase

    def mark(self, pid: int | None, size: int) -> None:
        """The people phase walked this person id, who has realtime state: the warehouse phase skips them."""
        if pid is None or pid >= size:
            return
        if len(self.stateful) < size:
            self.stateful = np.concatenate([self.stateful, np.zeros(size - len(self.stateful), bool)])
        self.stateful[pid] = True

    def walked(self, pid: int) -> bool:
        return pid < len(self.stateful) and bool(self.stateful[pid])

    def unmark(self, pid: int | None) -> None:
        """This person id no longer has realtime state (merged away)."""
        if pid is not None and pid < len(self.stateful):
            self.stateful[pid] = False


def start(engine, txn, audience_ids: list[str], now_us: int, new: bool = False) -> None:
    """Starts (or restarts, with more audiences) the walk: a new definition needs everyone evaluated.

    ``new``: the audiences were just created, so nobody without realtime
    state is a member yet (see _baseline).
    """
    progress = engine.store.backfill(txn) or {"audiences": [], "started_us": now_us}
    progress["audiences"] = sorted(set(progress["audiences"]) | set(audience_ids))
    fresh = set(progress.get("new", [])) | set(audience_ids) if new else set(progress.get("new", [])) - set(audience_ids)
    progress["new"] = sorted(fresh)
    progress.update(phase="people", after="", done=0, total=engine.store.state_count(txn), started_us=now_us)
    engine.store.put_backfill(txn, progress)
    engine.backfilling = progress
    engine.walk = Walk()
    log.info("backfill of %s: %d people with realtime state, then the warehouse's", ", ".join(progress["audiences"]),
             progress["total"])


def forget(engine, txn, audience_id: str) -> None:
    """A deleted audience leaves the walk (which ends if it was the last)."""
    progress = engine.backfilling
    if progress is None or audience_id not in progress["audiences"]:
        return
    progress["audiences"].remove(audience_id)
    progress["new"] = [a for a in progress.get("new", []) if a != audience_id]
    engine.backfilling = progress if progress["audiences"] else None
    engine.store.put_backfill(txn, engine.backfilling)


def fraction(progress: dict) -> float:
    """How far the walk is, from 0 to 1: people with realtime state first, then the warehouse's."""
    if progress["phase"] == "people":
        return 0.9 * min(1.0, progress["done"] / max(1, progress["total"]))
    return 0.9 + 0.1 * min(1.0, progress["after"] / max(1, progress.get("people", 1)))


def state_of(progress: dict | None, audience_id: str) -> tuple[bool, float]:
    """(backfilling, how far from 0 to 1) of an audience, per the walk's progress (None: no walk)."""
    if progress is None or audience_id not in progress["audiences"]:
        return False, 1.0
    return True, fraction(progress)


def graft(engine, txn, key: str, state, leaves: tuple[int, ...], into: tuple | None = None,
          grafters: dict | None = None, made: bytes | None = None) -> bool:
    """Gives a person's state these leaves of the program, from a replay of their retained events.

    ``into``: (the evaluator that made ``state``, its program), when not the
    engine's (a read beside the writer, which shares no cache with it; it
    may keep its own in ``grafters``). ``made``: that replay, made ahead
    (a donor's dump, donors.py).
    """
    if into is None:
        grafters = engine.grafters
    elif grafters is None:
        grafters = {}
    evaluator = grafters.get(leaves)
    if evaluator is None:
        program = engine.compiled.program if into is None else into[1]
        evaluator = grafters[leaves] = donors.grafter(tuple(program.leaves[j] for j in leaves),
                                                      program.session_timeout_us, engine.reference)
    if made is not None:
        donor = evaluator.load(made)
    else:
        fields = engine.read_fields
        donor = donors.replay(evaluator, engine.models, engine.store.person_seqs(txn, key),
                              None if fields is None else lambda seq: fields(txn, seq),
                              lambda seq: engine.read_event(txn, seq))
    (engine.evaluator if into is None else into[0]).graft(state, donor, [(j, i) for i, j in enumerate(leaves)])
    return True


def step(engine, txn, now_us: int, seconds: float = SLICE_SECONDS, people: int | None = None,
         waiting: Callable[[], bool] = lambda: False) -> list[MembershipChange]:
    """One slice of the walk (a transaction of its own); the changes it made.

    It ends after ``seconds``, or sooner once ``waiting()`` says other work
    waits for the writer (after YIELD_AFTER, or WAITED_SECONDS if it waited
    from the start): one commit per slice, and an acknowledgement waits a
    few milliseconds for it at most.
    """
    progress = engine.backfilling
    changes: list[MembershipChange] = []
    engine._fire_due(txn, now_us, changes)
    if progress is None:
        engine._persist(txn, changes)
        return changes
    start = time.perf_counter()
    yield_after = WAITED_SECONDS if waiting() else YIELD_AFTER

    def done() -> bool:
        elapsed = time.perf_counter() - start
        return elapsed > seconds or (elapsed > yield_after and waiting())
    if progress["phase"] == "people":
        _people(engine, txn, now_us, progress, done, people, changes)
    else:
        _warehouse(engine, txn, now_us, progress, done, changes)
    if progress["phase"] == "live":
        engine.backfilling = None
        engine.store.put_backfill(txn, None)
        log.info("backfill of %s done: %d people with realtime state in %.2fs (%d grafts made ahead); live",
                 ", ".join(progress["audiences"]), progress["done"], (now_us - progress["started_us"]) / 1e6,
                 engine.walk.ahead.used)
    else:
        engine.store.put_backfill(txn, progress)
    return changes


def _people(engine, txn, now_us: int, progress: dict, done: Callable[[], bool], people: int | None,
            changes: list[MembershipChange]) -> None:
    walked = [(i, bit, engine.bits[bit]) for i, bit in enumerate(engine.program_bits)
              if engine.bits[bit] in progress["audiences"]]
    visited: list[str] = []
    n, stop = 0, False
    while not stop:
        engine.walk.ahead.refill(engine, progress["after"])
        batch = engine.store.states_after(txn, progress["after"], 64 if people is None else 1)
        if not batch:
            progress.update(phase="warehouse", after=0, people=len(engine.warehouse.alive))
            break
        for key, stored in batch:
            if not _visit(engine, txn, key, stored, walked, now_us, changes):
                if key not in engine.slots:
                    visited.append(key)
                slot = engine._slot(key, txn)  # the whole way: graft, and every audience
                engine._evaluate(slot, now_us, range(len(engine.program_bits)), Cause.AUDIENCE_CHANGE, "", changes)
                engine._schedule(txn, slot, now_us)
            engine.walk.mark(stored[1], len(engine.warehouse.alive))
            progress["after"] = key
            progress["done"] += 1
            n += 1
            stop = n == people or done()  # (a graft replays the person's events: check after each)
            if stop:
                break
    engine._persist(txn, changes)
    for key in visited:  # the walk does not push the people ingest needs out of the cache
        slot = engine.slots.pop(key, None)
        if slot is not None:
            engine.free_slot(slot)


def _visit(engine, txn, key: str, stored: tuple, walked: list[tuple[int, int, str]], now_us: int,
           changes: list[MembershipChange]) -> bool:
    """The walk's way for most people: their stored state evaluated for the walked audiences alone.

    No slot is made, nothing else is evaluated (only walked audiences use
    leaves a graft brings), and only what moves is written: a membership,
    or the state and timer of someone grafted. False (nothing done) for a
    loaded person it cannot take (see ``_loaded``).
    """
    slot = engine.slots.get(key)
    pid = stored[1] if slot is None else engine.pids[slot]
    if pid is None and not key.startswith(ANON):
        pid = engine.store.person_id(txn, key)
    if slot is None:
        state = _unloaded(engine, txn, key, pid, stored, now_us)
    else:
        state = _loaded(engine, txn, slot, stored, now_us)
        if state is None:
            return False
    values = engine.evaluator.evaluate_bytes(state, now_us, engine.warehouse.statics(pid))
    for i, bit, aid in walked:
        if slot is not None:
            member = bit in engine.members[slot]
        else:
            member = engine.store.is_member(txn, aid, key)
        if values[i] == member:
            continue
        change = MembershipChange(aid, key, Direction.ENTER if values[i] else Direction.EXIT, now_us,
                                  Cause.AUDIENCE_CHANGE)
        changes.append(change)
        bits = engine.members[slot] if slot is not None else engine.store.membership(txn, key)
        if values[i]:
            bits[bit] = now_us
        else:
            del bits[bit]
        if slot is not None:
            engine.current[slot] = None  # (_record writes a loaded person's memberships)
        else:
            engine.store.put_membership(txn, key, bits)
    return True


def _unloaded(engine, txn, key: str, pid: int | None, stored: tuple, now_us: int):
    """Someone not loaded: their stored state, grafted if due; it and their timer written where they moved."""
    deadline, _, generation, raw = stored
    grafting = generation < engine.newest_epoch
    state = engine.evaluator.load(raw)
    if grafting:
        graft(engine, txn, key, state, engine.leaves_after(generation), made=engine.walk.ahead.take(key, generation))
    timer = engine.evaluator.next_change(state, now_us)
    if timer != deadline:
        engine.store.move_timer(txn, key, deadline, timer)
    if grafting or timer != deadline:
        engine.store.put_state(txn, key, timer, pid, engine.generation, engine.evaluator.dump(state))
    return state


def _loaded(engine, txn, slot: int, stored: tuple, now_us: int):
    """A loaded person's state for the walk; None where the slow way must take them.

    That is: their loaded state is newer than the stored one, or it is of
    an earlier program and their timer moves. Someone loaded before the
    program switched and unchanged since has the stored copy as their
    state: it is grafted and takes their slot.
    """
    generation, raw = stored[2], stored[3]
    current = engine.loaded_under[slot] == engine.program_no
    if slot in engine.dirty:
        return None
    if generation >= engine.newest_epoch:  # no graft due
        state = engine.states[slot] if current else engine.evaluator.load(raw)
        return state if engine.evaluator.next_change(state, now_us) == engine.deadlines[slot] else None
    if current:
        return None
    state = engine.evaluator.load(raw)
    key = engine.keys[slot]
    graft(engine, txn, key, state, engine.leaves_after(generation), made=engine.walk.ahead.take(key, generation))
    engine.states[slot], engine.loaded_under[slot], engine.current[slot] = state, engine.program_no, None
    engine._set_timer(txn, slot, engine.evaluator.next_change(state, now_us))
    engine.dirty.add(slot)  # (_persist writes their state)
    return state


def _warehouse(engine, txn, now_us: int, progress: dict, done: Callable[[], bool],
               changes: list[MembershipChange]) -> None:
    """People without realtime state: their memberships follow from the warehouse parts, a chunk of ids at a time."""
    lo = progress["after"]
    chunk = _chunk(engine, txn, progress, lo, done)
    if chunk is None:  # a baseline is still being read: the next slice goes on with it
        return
    end = chunk.hi
    first = bisect.bisect_left(chunk.moves, (lo, -1))
    for n in range(first, len(chunk.moves)):
        pid, i = chunk.moves[n]
        if n > first and (n - first) % 64 == 0 and done():
            end = pid  # the rest of the chunk next time (this person included)
            break
        _move(engine, txn, pid, i, bool(chunk.new[i][pid - chunk.lo]), now_us, changes)
    for i, aid in chunk.walking.items():
        base = _grown(engine.walk.baseline, aid, len(engine.warehouse.alive))
        base[lo:end] = chunk.new[i][lo - chunk.lo:end - chunk.lo]
        if engine.defaults is not None:
            engine.defaults[aid] = base  # (the walk's own copy: nothing else writes into it)
    engine._persist(txn, changes)
    progress["after"] = end
    if end >= len(engine.warehouse.alive):
        progress["phase"] = "live"


def _chunk(engine, txn, progress: dict, lo: int, done: Callable[[], bool]) -> Chunk | None:
    """The chunk of person ids from ``lo``: reused while the program and the warehouse stay, else worked out.

    It skips the people the walk knows to have realtime state (``_move``
    checks the others). None while a walked audience's baseline is still
    being read.
    """
    chunk = engine.walk.chunk
    if chunk is not None and chunk.fits(engine, progress["audiences"], lo):
        return chunk
    size = len(engine.warehouse.alive)
    defaults = engine.warehouse.defaults(engine.compiled, engine.warehouse.arrays)
    walking = {i: engine.bits[engine.program_bits[i]] for i in range(len(defaults))
               if engine.bits[engine.program_bits[i]] in progress["audiences"]}
    bases = {i: _baseline(engine, txn, aid, size, done) for i, aid in walking.items()}
    if any(base is None for base in bases.values()):
        return None
    hi = min(lo + WAREHOUSE_CHUNK, size)
    skip = np.zeros(hi - lo, bool)
    stateful = engine.walk.stateful[lo:hi]
    skip[:len(stateful)] = stateful
    for pid in engine.pids:  # (loaded people, some not stored yet)
        if pid is not None and lo <= pid < hi:
            skip[pid - lo] = True
    new, moves = {}, []
    for i in walking:
        new[i] = defaults[i][lo:hi].copy()
        moves += [(lo + d, i) for d in changed(new[i], bases[i][lo:hi], skip)]
    moves.sort()
    engine.walk.chunk = Chunk(engine.compiled, engine.warehouse, list(progress["audiences"]), lo, hi, walking, new,
                              moves)
    return engine.walk.chunk


def _baseline(engine, txn, aid: str, n: int, done: Callable[[], bool]) -> np.ndarray | None:
    """Who of the people without realtime state is a member now, as stored: what the walk moves them from.

    Taken from the engine's defaults; none for an audience created for this
    walk, at the start of the phase (only this phase moves people without
    state into it); or else (a changed audience, or either after a restart)
    read from the audience's member index, less the members with realtime
    state, a page at a time until ``done()``: what its members cost, in
    slices. None until it is read whole.
    """
    walk = engine.walk
    if aid in walk.baseline:
        return _grown(walk.baseline, aid, n)
    if engine.defaults is not None and aid in engine.defaults:  # (a sync landed: it reconciled everyone)
        walk.building.pop(aid, None)
        known = engine.defaults[aid]
        base = walk.baseline[aid] = np.zeros(n, bool)
        base[:min(n, len(known))] = known[:n]
        return base
    if aid in engine.backfilling.get("new", ()) and engine.backfilling["after"] == 0:
        walk.baseline[aid] = np.zeros(n, bool)
        return walk.baseline[aid]
    base, after = walk.building.pop(aid, (np.zeros(n, bool), ""))
    while True:
        keys, after = engine.store.list_members(txn, aid, after, MEMBER_PAGE)
        for key in keys:
            pid = engine.store.person_id(txn, key)
            if pid is not None and pid < len(base) and not walk.walked(pid) and not engine._has_state(txn, key):
                base[pid] = True
        if not after:
            walk.baseline[aid] = base
            return _grown(walk.baseline, aid, n)
        if done():
            walk.building[aid] = (base, after)
            return None


def _grown(baselines: dict[str, np.ndarray], aid: str, n: int) -> np.ndarray:
    """An audience's baseline, padded to ``n`` person ids when the warehouse grew meanwhile."""
    base = baselines[aid]
    if len(base) < n:
        base = baselines[aid] = np.concatenate([base, np.zeros(n - len(base), bool)])
    return base


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
