"""What-if timelines: how a saved or draft audience would have moved over a span of the retained history.

The replay is live evaluation over again, for one audience: the retained
event log in log order, each event at the instant the server received it,
every timer fired at its own instant before the next event, identity links
merging histories as the engine does (domain/identity.py), a fresh
evaluator of just this audience's program, and the warehouse parts as they
are now. Changes before ``start_us`` only build the state; those in [start,
end) are counted per bucket, and a sample of people keeps theirs.

It reads one read snapshot (``txn``) and what the engine replaces whole (its
models and warehouse parts), so it runs on any thread beside the writer. It
calls ``pause()`` after each slice of ``slice_seconds`` of work, so that a
caller can give the interpreter back to ingest, and raises SimulationTooSlow
past ``deadline`` (time.monotonic).

What it cannot know: history older than the log's retention (missing here
as from a backfill), warehouse syncs during the span (the current attributes
hold throughout), and how long each batch queued (live, an event's changes
take effect when its batch commits, milliseconds after its received time).
"""

from __future__ import annotations

import heapq
import math
import time
from dataclasses import dataclass, field

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Scope

from .changes import Direction
from .compile import compile_audiences
from .conditions import Condition
from .errors import PreviewTooSlow
from .events import ANON, Event, EventType, matching_models

SLICE_SECONDS = 0.002


class SimulationTooSlow(PreviewTooSlow):
    """The replay did not finish within its deadline."""


@dataclass
class Bucket:
    start_us: int
    members: int = 0  # at the bucket's end
    enters: int = 0
    exits: int = 0


@dataclass
class Timeline:
    start_us: int
    end_us: int
    bucket_us: int
    buckets: list[Bucket]
    members_at_start: int
    sample: dict[str, list[tuple[Direction, int]]]
    events_replayed: int
    replayed_from_us: int | None  # the received time of the oldest event replayed


@dataclass
class _Person:
    state: object
    pid: int | None
    member: bool
    statics: list = field(default_factory=list)
    timer: int | None = None


class _Replay:
    """One simulation's state: the people it has seen, their timers, the counts."""

    def __init__(self, engine, txn, condition: Condition, start_us: int, end_us: int, bucket_us: int, sample: int):
        self.engine, self.txn = engine, txn
        self.start_us, self.end_us, self.bucket_us, self.sample_size = start_us, end_us, bucket_us, sample
        self.compiled = compile_audiences([("simulated", condition)], engine.model_index, engine.session_timeout_us)
        self.evaluator = make_evaluator(self.compiled.program, reference=engine.reference)
        warehouse = engine.warehouse  # one consistent set of columns, even if a sync lands meanwhile
        self.static_arrays, self.static_missing = warehouse.evaluate(self.compiled)
        self.default = warehouse.defaults(self.compiled, self.static_arrays)[0]
        self.members = int(self.default.sum())  # everyone is as the warehouse says until their first event
        self.models = engine.models
        self.used = self.compiled.models_used
        self.sessions = any(lf.scope == Scope.SESSION for lf in self.compiled.program.leaves)
        self.people: dict[str, _Person] = {}
        self.aliases: dict[str, str] = {}
        self.timers: list[tuple[int, str]] = []
        n = max(1, -(-(end_us - start_us) // bucket_us))
        self.buckets = [Bucket(start_us + i * bucket_us) for i in range(n)]
        self.members_at_start: int | None = None
        self.sample: dict[str, list[tuple[Direction, int]]] = {}
        self.next_bucket = 0  # buckets before it have their members count
        self.next_close = start_us  # the next instant at which advance() has something to do
        # An event of no model this program reads changes nobody when nothing counts sessions and
        # someone with no events and no warehouse row is not a member: the replay can skip it unread.
        alone = self.evaluator.evaluate(self.evaluator.new_state(), 0, list(self.static_missing))[0]
        self.skip_others = not self.sessions and not alone
        self._kept: dict[tuple[int, str], bool] = {}
        self.read = 0  # events read, kept or not, before the span's end
        self.first_us: int | None = None  # the first one's received time
        self.pause, self.deadline, self.slice_seconds = (lambda: None), math.inf, SLICE_SECONDS
        self.until = time.perf_counter() + self.slice_seconds

    def count(self, received_us: int) -> None:
        """The first event read, and every 128th: the slice's time is checked (pause, deadline)."""
        if self.first_us is None:
            self.first_us = received_us
        if time.perf_counter() > self.until:
            if time.monotonic() > self.deadline:
                raise SimulationTooSlow("the simulation did not finish in time; try a shorter span")
            self.pause()
            self.until = time.perf_counter() + self.slice_seconds

    def keep(self, kind: int, name: str, received_us: int) -> bool:
        """Whether an event of this type and name can matter (see skip_others); cached per (type, name).

        Every event from the span's end on is kept, so that the replay sees where to stop.
        """
        if received_us >= self.end_us:
            return True
        self.read += 1
        if self.read & 127 == 0 or self.first_us is None:
            self.count(received_us)
        hit = self._kept.get((kind, name))
        if hit is None:
            k = (kind, name)
            probe = Event(message_id="", type=EventType(kind), name=name)
            hit = self._kept[k] = (not self.skip_others or kind in (EventType.IDENTIFY, EventType.ALIAS)
                                   or any(m in self.used for m in self.models.candidates(probe)))
        return hit

    # -- time ---------------------------------------------------------------------------------------
    def advance(self, now_us: int) -> None:
        """Closes the buckets (and the start) that end at or before ``now_us``; nothing changes between."""
        if now_us < self.next_close:
            return
        if self.members_at_start is None:
            self.members_at_start = self.members
        while self.next_bucket < len(self.buckets) and self._end_of(self.next_bucket) <= now_us:
            self.buckets[self.next_bucket].members = self.members
            self.next_bucket += 1
        self.next_close = self._end_of(self.next_bucket) if self.next_bucket < len(self.buckets) else 2**63

    def _end_of(self, i: int) -> int:
        return min(self.end_us, self.buckets[i].start_us + self.bucket_us)

    def record(self, key: str, enter: bool, at_us: int) -> None:
        self.advance(at_us)  # changes at an instant belong to the bucket that starts there
        self.members += 1 if enter else -1
        if not self.start_us <= at_us < self.end_us:
            return
        b = self.buckets[(at_us - self.start_us) // self.bucket_us]
        if enter:
            b.enters += 1
        else:
            b.exits += 1
        if key in self.sample or len(self.sample) < self.sample_size:
            self.sample.setdefault(key, []).append((Direction.ENTER if enter else Direction.EXIT, at_us))

    def fire_due(self, now_us: int) -> None:
        """Every timer due by ``now_us``, each at its own instant (the engine's _fire_due)."""
        timers = self.timers
        while timers and timers[0][0] <= now_us:
            t, key = heapq.heappop(timers)
            p = self.people.get(key)
            if p is None or p.timer != t:
                continue  # rescheduled or merged away: a stale entry
            p.timer = None
            self.evaluate(key, p, t)

    # -- people -------------------------------------------------------------------------------------
    def person(self, key: str) -> tuple[_Person, bool]:
        p = self.people.get(key)
        if p is not None:
            return p, False
        pid = None if key.startswith(ANON) else self.engine.store.person_id(self.txn, key)
        default = pid is not None and pid < len(self.default) and bool(self.default[pid])
        statics = [bool(a[pid]) if pid is not None and pid < len(a) else m
                   for a, m in zip(self.static_arrays, self.static_missing)]
        p = self.people[key] = _Person(self.evaluator.new_state(), pid, default, statics)
        return p, True

    def evaluate(self, key: str, p: _Person, now_us: int) -> None:
        value = self.evaluator.evaluate(p.state, now_us, p.statics)[0]
        if value != p.member:
            p.member = value
            self.record(key, value, now_us)
        t = self.evaluator.next_change(p.state, now_us)
        if t != p.timer:
            p.timer = t
            if t is not None:
                heapq.heappush(self.timers, (t, key))

    def resolve(self, kind: str, ident: str) -> str:
        if kind == "anonymous":
            user = self.aliases.get(ident)
            return user if user is not None else ANON + ident
        return ident

    # -- events -------------------------------------------------------------------------------------
    def event(self, ev: Event) -> None:
        now = ev.received_us
        if self.timers and self.timers[0][0] <= now:
            self.fire_due(now)
        if now >= self.next_close:
            self.advance(now)
        if ev.type in (EventType.IDENTIFY, EventType.ALIAS):
            self.link(ev, now)
        touched: dict[str, _Person] = {}
        for model, (kind, ident) in matching_models(ev, self.models):
            key = self.resolve(kind, ident)
            p, created = self.person(key)
            if model in self.used or self.sessions:  # other models move nothing but sessions
                self.evaluator.observe(p.state, model, ev.timestamp_us, ev.properties, ev.session_id)
                touched[key] = p
            elif created:
                touched[key] = p  # someone new is evaluated once, as the engine does
        for key, p in touched.items():
            self.evaluate(key, p, now)

    def link(self, ev: Event, now_us: int) -> None:
        """domain/identity.link for this audience: the anonymous history joins the user's."""
        user = ev.user_id
        other = ev.anonymous_id if ev.type == EventType.IDENTIFY else ev.previous_id
        if not user or not other or self.aliases.get(other) == user:
            return
        self.aliases[other] = user
        for source in ((ANON + other,) if ev.type == EventType.IDENTIFY else (ANON + other, other)):
            if source != user and source in self.people:
                self.merge(source, user, ev.seq, now_us)

    def merge(self, source: str, into: str, upto: int, now_us: int) -> None:
        store, txn = self.engine.store, self.txn
        gone = self.people.pop(source)
        if gone.member:
            self.record(source, False, now_us)
        # The snapshot's index holds both histories under ``into`` (the live merge moved them there).
        seqs = sorted(set(store.person_seqs(txn, source, upto)) | set(store.person_seqs(txn, into, upto)))
        p, _ = self.person(into)
        p.state = self.evaluator.new_state()
        for seq in seqs:
            ev = self.engine.read_event(txn, seq)
            if ev is None:  # older than the log's retention
                continue
            for model, _ in matching_models(ev, self.models):
                self.evaluator.observe(p.state, model, ev.timestamp_us, ev.properties, ev.session_id)
        self.evaluate(into, p, now_us)


def simulate(engine, txn, condition: Condition, start_us: int, end_us: int, bucket_us: int, *, events,
             sample: int = 10, pause=lambda: None, deadline: float = math.inf,
             slice_seconds: float = SLICE_SECONDS) -> Timeline:
    """The audience's timeline over [start_us, end_us) in buckets of ``bucket_us``, from the retained log.

    ``events(keep)``: the log in ``txn``, in log order, without the events ``keep(type, name,
    received_us)`` refuses (ports.AudienceReads.events); ``keep`` counts every event it is shown.
    """
    replay = _Replay(engine, txn, condition, start_us, end_us, bucket_us, sample)
    replay.pause, replay.deadline, replay.slice_seconds = pause, deadline, slice_seconds
    for ev in events(replay.keep):
        if ev.received_us >= end_us:
            break
        replay.event(ev)
    replay.fire_due(end_us - 1)
    replay.advance(end_us)
    return Timeline(start_us, end_us, bucket_us, replay.buckets,
                    replay.members_at_start if replay.members_at_start is not None else replay.members,
                    replay.sample, replay.read, replay.first_us)
