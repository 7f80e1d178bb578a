"""What-if timelines: how a saved or draft audience would have moved over a span of the retained history.

The replay is live evaluation over again, for one audience: the retained
event log in log order, each event at the instant the server received it,
every timer fired at its own instant before the next event, identity links
merging histories as the engine does (domain/identity.py), a fresh
evaluator of just this audience's program, and the warehouse parts as they
are now. Changes before ``start_us`` only build the state; those in [start,
end) are counted per bucket, and a sample of people keeps theirs.

The server makes a ``ReplayPlan`` of what it holds in memory (the event
models, the warehouse parts evaluated for this audience) and hands it to a
process of its own (storage/replay_process.py), which replays one read
snapshot of the log (a ``History``) without the server's interpreter. It
calls ``pause()`` after each slice of ``slice_seconds`` of work (there: to
look for a cancellation), and raises SimulationTooSlow past ``deadline``
(time.monotonic, which every process on the machine shares).

What it cannot know: history older than the log's retention (missing here
as from a backfill), warehouse syncs during the span (the current attributes
hold throughout), and how long each batch queued (live, an event's changes
take effect when its batch commits, milliseconds after its received time).
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Scope

from .changes import Direction
from .compile import compile_audiences
from .conditions import Condition
from .errors import PreviewTooSlow
from .events import ANON, Event, EventModel, EventType, Identifier, compile_models, matching_models

SLICE_SECONDS = 0.002


_LINKS = (EventType.IDENTIFY, EventType.ALIAS)


class SimulationTooSlow(PreviewTooSlow):
    """The replay did not finish within its deadline."""


@dataclass
class Wanted:
    """Which events of the log a replay reads: those of a (type, name) in ``named``, or of a type in ``kinds``.

    The log is read up to the first event received at ``until_us`` or later;
    ``tick()`` is called after every 128 events read, wanted or not. The
    reader sets ``read`` (the events before that one) and ``first_us`` (the
    first one's received time) when it stops.
    """

    named: frozenset[tuple[int, str]]
    kinds: frozenset[int]
    everything: bool
    until_us: int
    tick: Callable[[], None]
    read: int = 0
    first_us: int | None = None


class History(Protocol):
    """One read snapshot of the retained log and the person index (storage/replay_process.py)."""

    def events(self, wanted: Wanted) -> Iterator[Event]:
        """The events ``wanted`` names, in log order, up to ``wanted.until_us`` (exclusive)."""

    def person_id(self, key: str) -> int | None: ...

    def person_seqs(self, key: str, upto: int) -> list[int]:
        """The log sequences of the person's events up to ``upto``, ascending."""

    def event(self, seq: int) -> Event | None:
        """The event ``seq`` (None: older than the retention)."""


@dataclass(frozen=True)
class ReplayPlan:
    """What a replay takes from the server's memory, made there once: plain values, so it can cross a pipe."""

    condition: Condition
    models: tuple[EventModel, ...]
    session_timeout_us: int
    reference: bool
    static_arrays: list[np.ndarray]  # the audience's warehouse subtrees per person id, as the engine has them now
    static_missing: list[bool]  # their values for someone the warehouse lacks
    default: np.ndarray  # per person id: a member without events
    start_us: int
    end_us: int
    bucket_us: int
    sample: int
    deadline: float = math.inf  # time.monotonic()
    slice_seconds: float = SLICE_SECONDS


def plan(engine, condition: Condition, start_us: int, end_us: int, bucket_us: int, sample: int,
         deadline: float = math.inf, slice_seconds: float = SLICE_SECONDS) -> ReplayPlan:
    """The plan of one simulation from the engine's parts that it replaces whole (any thread may read them)."""
    compiled = compile_audiences([("simulated", condition)], engine.model_index, engine.session_timeout_us)
    warehouse = engine.warehouse  # one consistent set of columns, even if a sync lands meanwhile
    arrays, missing = warehouse.evaluate(compiled)
    return ReplayPlan(condition, engine.models.models, engine.session_timeout_us, engine.reference, arrays, missing,
                      warehouse.defaults(compiled, arrays)[0], start_us, end_us, bucket_us, sample, deadline,
                      slice_seconds)


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

    def __init__(self, plan: ReplayPlan, history: History):
        self.history = history
        start_us, end_us, bucket_us = plan.start_us, plan.end_us, plan.bucket_us
        self.start_us, self.end_us, self.bucket_us, self.sample_size = start_us, end_us, bucket_us, plan.sample
        self.models = compile_models(plan.models)
        index = {m.name: i for i, m in enumerate(plan.models)}
        self.compiled = compile_audiences([("simulated", plan.condition)], index, plan.session_timeout_us)
        self.evaluator = make_evaluator(self.compiled.program, reference=plan.reference)
        self.static_arrays, self.static_missing, self.default = plan.static_arrays, plan.static_missing, plan.default
        self.members = int(self.default.sum())  # everyone is as the warehouse says until their first event
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
        self._routes: dict[tuple[int, str], int] = {}  # (type, name) -> see _route
        self.pause, self.deadline, self.slice_seconds = (lambda: None), plan.deadline, plan.slice_seconds
        self.until = time.perf_counter() + self.slice_seconds

    def tick(self) -> None:
        """Called every 128 events read: the slice's time is checked (pause, deadline)."""
        if time.perf_counter() > self.until:
            if time.monotonic() > self.deadline:
                raise SimulationTooSlow("the simulation did not finish in time; try a shorter span")
            self.pause()
            self.until = time.perf_counter() + self.slice_seconds

    def wanted(self) -> Wanted:
        """The events that can matter (see skip_others): those of the models the program reads, and the links."""
        named, kinds = set(), {int(EventType.IDENTIFY), int(EventType.ALIAS)}
        for i in self.used:
            m = self.models.models[i]
            if m.event_name:
                named.add((int(m.type), m.event_name))
            else:
                kinds.add(int(m.type))
        return Wanted(frozenset(named), frozenset(kinds), not self.skip_others, self.end_us, self.tick)

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
        pid = None if key.startswith(ANON) else self.history.person_id(key)
        default = pid is not None and pid < len(self.default) and bool(self.default[pid])
        statics = [bool(a[pid]) if pid is not None and pid < len(a) else m
                   for a, m in zip(self.static_arrays, self.static_missing)]
        p = self.people[key] = _Person(self.evaluator.new_state(), pid, default, statics)
        return p, True

    def evaluate(self, key: str, p: _Person, now_us: int) -> None:
        evaluator = self.evaluator
        value = evaluator.evaluate(p.state, now_us, p.statics)[0]
        if value != p.member:
            p.member = value
            self.record(key, value, now_us)
        t = evaluator.next_change(p.state, now_us)
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
        if ev.type in _LINKS:
            self.link(ev, now)
        model = self._routes.get((ev.type, ev.name))
        if model is None:
            model = self._route(ev)
        if model >= 0:  # most events: one model, no filter, identified by user id (else anonymous id)
            if ev.user_id:
                key = ev.user_id
            elif ev.anonymous_id:
                key = self.resolve("anonymous", ev.anonymous_id)
            else:
                return  # it identifies nobody: it matches no model
            p = self.people.get(key)
            created = p is None
            if created:
                p = self.person(key)[0]
            if model in self.used or self.sessions:
                self.evaluator.observe(p.state, model, ev.timestamp_us, ev.properties, ev.session_id)
            elif not created:
                return
            self.evaluate(key, p, now)
            return
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

    def _route(self, ev: Event) -> int:
        """The one model events of this type and name can match, when that is all matching does; else -1."""
        models = self.models
        found = models.candidates(ev)
        one = (len(found) == 1 and models.filters[found[0]] is None
               and models.models[found[0]].identifier is Identifier.USER_ID)
        self._routes[(ev.type, ev.name)] = route = found[0] if one else -1
        return route

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
        history = self.history
        gone = self.people.pop(source)
        if gone.member:
            self.record(source, False, now_us)
        # The snapshot's index holds both histories under ``into`` (the live merge moved them there).
        seqs = sorted(set(history.person_seqs(source, upto)) | set(history.person_seqs(into, upto)))
        p, _ = self.person(into)
        p.state = self.evaluator.new_state()
        for seq in seqs:
            ev = history.event(seq)
            if ev is None:  # older than the log's retention
                continue
            for model, _ in matching_models(ev, self.models):
                self.evaluator.observe(p.state, model, ev.timestamp_us, ev.properties, ev.session_id)
        self.evaluate(into, p, now_us)


def simulate(plan: ReplayPlan, history: History, pause=lambda: None) -> Timeline:
    """The plan's audience's timeline over [start_us, end_us) in buckets of ``bucket_us``, from ``history``."""
    if time.monotonic() > plan.deadline:  # it waited for the replay process that long
        raise SimulationTooSlow("the simulation did not start in time; try again later")
    replay = _Replay(plan, history)
    replay.pause = pause
    wanted = replay.wanted()
    for ev in history.events(wanted):
        replay.event(ev)
    replay.fire_due(plan.end_us - 1)
    replay.advance(plan.end_us)
    return Timeline(plan.start_us, plan.end_us, plan.bucket_us, replay.buckets,
                    replay.members_at_start if replay.members_at_start is not None else replay.members,
                    replay.sample, wanted.read, wanted.first_us)
