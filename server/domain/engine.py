"""The realtime engine: events and time in, exact membership changes out.

Runs on the single writer thread. Every entry point takes the write
transaction its cause commits in (an ingest batch, a timer tick, a warehouse
sync, an audience change), so the changelog and the membership tables never
disagree with the event log. It holds:

- one evaluator state per person seen in events (a *slot*), bounded by what
  the conditions can observe, and the person's memberships;
- the warehouse parts of every audience as boolean arrays over person ids,
  and, for people with no realtime state, their membership computed
  vectorised from those arrays;
- a timer index: for each slot, the next instant at which one of its event
  leaves flips with no new event (a window lapses, a session ends).

Person keys: a known person's key is their user id (the parent model's
primary key); an anonymous person's is ``anon:<anonymous id>`` until an
identify or alias event links it to a user id, which merges its history.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from qualify.evaluator import make_evaluator
from qualify.evaluator.program import Scope, state_key_hash

from . import backfill, definitions
from .changes import Cause, Direction, MembershipChange
from .audiences import Audience, check_audience_id
from .compile import Compiled, audiences_by_model, compile_audiences
from .conditions import Condition
from .errors import AudienceNotFound, InvalidAudience
from .events import ANON, Event, EventModel, EventType, MatchedEvent, compile_models
from .identity import link
from .queries import explain, preview
from .reconcile import after_sync
from .recovery import fingerprint, rebuild, restore
from .schema import ValueType
from .warehouse_parts import WarehouseParts, stored_defaults

log = logging.getLogger(__name__)

RETIRED_PROGRAMS = 8  # earlier programs whose evaluators loaded people may still be of


class Engine:
    """Realtime audience membership; every method runs on the writer thread."""

    def __init__(self, store, models: list[EventModel], attributes: list[tuple[str, ValueType]],
                 session_timeout_us: int, read_event: Callable, iter_events: Callable, reference: bool = False,
                 publish: Callable[[list[MembershipChange]], None] = lambda changes: None,
                 retention_us: int = 30 * 86400 * 1_000_000, cache_people: int = 100_000,
                 read_fields: Callable | None = None):
        self.store = store
        self.cache_people = cache_people  # people whose state stays in memory between transactions, at most
        self.retention_us = retention_us  # the event log's history: no window may be longer
        self.publish = publish  # called in the transaction with its stored changes; delivers after the commit
        self.models = compile_models(models)
        self.model_index = {m.name: i for i, m in enumerate(self.models.models)}
        self.attributes = attributes
        self.attribute_types = dict(attributes)
        self.event_model_props = {m.name: dict(m.properties) for m in self.models.models}
        self.session_timeout_us = session_timeout_us
        self.read_event = read_event  # (txn, seq) -> Event
        self.read_fields = read_fields  # (txn, seq) -> (type, name, timestamp_us, properties, session_id) or None
        self.iter_events = iter_events  # (txn) -> Iterator[Event], in log order
        self.reference = reference
        self.on_deadline: Callable[[], None] | None = None  # called when an earlier timer appears
        self.audiences: dict[str, Audience] = {}
        self.bits: list[str | None] = []  # membership bit -> audience id
        self.counts: dict[str, int] = {}
        self.defaults: dict[str, np.ndarray] | None = None  # audience -> members without realtime state
        self.warehouse = WarehouseParts()
        self.generation = 0  # bumped whenever a state key joins the program
        self.epoch_keys: dict[str, int] = {}  # state key (hex) -> the generation it joined the program at
        self.backfilling: dict | None = None  # the walk's progress (see backfill.py), while one runs
        self.program_no = 0  # bumped by every program switch
        self.walk = backfill.Walk()  # what the running walk caches between slices
        self.on_backfill: Callable[[], None] | None = None  # called when a walk starts
        self.donors = None  # a Donors port (ports.py), set by the server: the walk's grafts made ahead (donors.py)
        self._reset_people()
        self._compile()

    # -- state ---------------------------------------------------------------------------
    def _reset_people(self) -> None:
        self.slots: OrderedDict[str, int] = OrderedDict()  # loaded people, least recently used first
        self.free: list[int] = []  # slots of people evicted (or merged away), to reuse
        self.created: set[int] = set()  # slots of people seen for the first time by the running event
        self.keys: list[str] = []
        self.states: list = []
        self.pids: list[int | None] = []
        self.members: list[dict[int, int]] = []  # slot -> {bit: enter_us}
        self.current: list[bytes | None] = []  # slot -> members as program values (a cache)
        self.statics_of: list[bytes | None] = []  # (bytes, not lists: the cyclic collector does not track them)
        self.loaded_under: list[int | None] = []  # slot -> the program number its state is of
        self.retired: dict[int, object] = {}  # program number -> its evaluator, while people loaded under it may remain
        self.deadlines: list[int | None] = []  # slot -> its pending timer (filed in the store's timer index)
        self.earliest: int | None = None  # the earliest pending timer of anyone, as of the last entry point
        self.aliases: dict[str, str] = {}
        self.dirty: set[int] = set()  # slots whose state or timer the running transaction changed
        self.grafted: set[int] = set()  # slots the running transaction grafted new leaves into (backfill.py)

    def _compile(self, txn=None) -> None:
        """Compiles the audiences; with ``txn``, files the epochs of the state keys that join the program."""
        active = sorted(self.audiences.values(), key=lambda a: self.bits.index(a.id))
        self.compiled: Compiled = compile_audiences([(a.id, a.condition) for a in active], self.model_index,
                                                    self.session_timeout_us)
        self.program_bits = [self.bits.index(a.id) for a in active]
        self.current = [None] * len(self.keys)  # program values are per program
        self.evaluator = make_evaluator(self.compiled.program, reference=self.reference)
        self.by_model = audiences_by_model(self.compiled.program, self.model_index.values())
        keys = [format(state_key_hash(leaf), "016x") for leaf in self.compiled.program.leaves]
        if txn is not None:
            if any(k not in self.epoch_keys for k in keys):
                self.generation += 1
            # A key that leaves the program is forgotten: if it comes back, states dumped before are stale.
            self.epoch_keys = {k: self.epoch_keys.get(k, self.generation) for k in keys}
            self.store.put_epochs(txn, {"generation": self.generation, "leaves": self.epoch_keys})
        self.leaf_epochs = [self.epoch_keys.get(k, 0) for k in keys]
        self.newest_epoch = max(self.leaf_epochs, default=0)
        self.grafters: dict[tuple[int, ...], object] = {}  # leaves to graft -> an evaluator of just those
        self.stale_leaves: dict[int, tuple[int, ...]] = {}  # see leaves_after

    def _switch(self, txn) -> None:
        """A new program, at once: loaded people move into it when next needed (``_migrate``)."""
        assert not self.dirty
        self.retired[self.program_no] = self.evaluator
        if len(self.retired) > RETIRED_PROGRAMS:  # many switches in a row: the loaded reload from the store
            aliases, earliest = self.aliases, self.earliest
            self._reset_people()
            self.aliases, self.earliest = aliases, earliest
        self.program_no += 1
        self._compile(txn)
        self.warehouse = self.warehouse.recompiled(self.compiled)  # (the columns stay: only the statics change)
        self.statics_of = [None] * len(self.keys)
        self.store.put_program(txn, fingerprint(self))

    def _slot(self, key: str, txn) -> int:
        """The person's slot, loading their stored state the first time they are needed."""
        slot = self.slots.get(key)
        if slot is not None:
            self.slots.move_to_end(key)
            if self.loaded_under[slot] != self.program_no:
                self._migrate(slot, txn)
            return slot
        stored = self.store.state(txn, key)
        # (A stored id stays the person's: ids are never reused. Without one, the warehouse may know them by now.)
        pid = stored[1] if stored and stored[1] is not None else (
            None if key.startswith(ANON) else self.store.person_id(txn, key))
        state = self.evaluator.load(stored[3]) if stored else self.evaluator.new_state()
        fields = (key, state, stored[0] if stored else None,
                  pid,
                  self.store.membership(txn, key), None, None, self.program_no)
        if self.free:
            slot = self.free.pop()
            for column, value in zip(self._columns(), fields):
                column[slot] = value
        else:
            slot = len(self.keys)
            for column, value in zip(self._columns(), fields):
                column.append(value)
        self.slots[key] = slot
        if stored is None:
            self.created.add(slot)
        elif stored[2] < self.newest_epoch:
            self._graft(slot, txn, self.leaves_after(stored[2]))
        return slot

    def leaves_after(self, generation: int) -> tuple[int, ...]:
        """The program's leaves that joined after ``generation``: a state dumped then lacks them."""
        leaves = self.stale_leaves.get(generation)
        if leaves is None:
            leaves = self.stale_leaves[generation] = tuple(j for j, e in enumerate(self.leaf_epochs) if e > generation)
        return leaves

    def _migrate(self, slot: int, txn) -> None:
        """A person loaded under an earlier program, into this one (the leaves it lacks are grafted)."""
        old = self.retired[self.loaded_under[slot]]
        self.states[slot], missing = self.evaluator.load_with_missing(old.dump(self.states[slot]))
        self.loaded_under[slot] = self.program_no
        self._graft(slot, txn, missing)

    def _graft(self, slot: int, txn, leaves: tuple[int, ...]) -> None:
        if leaves and backfill.graft(self, txn, self.keys[slot], self.states[slot], leaves):
            self.dirty.add(slot)  # leaves that joined the program since learned the person's history:
            self.created.add(slot)  # they are evaluated for every audience, like someone new
            self.grafted.add(slot)

    def _columns(self) -> tuple[list, ...]:
        return (self.keys, self.states, self.deadlines, self.pids, self.members, self.current, self.statics_of,
                self.loaded_under)

    def _evict(self) -> None:
        """Forgets the least recently used people beyond the cache: their state is stored, and reloads when needed."""
        while len(self.slots) > self.cache_people:
            self.free_slot(self.slots.popitem(last=False)[1])

    def free_slot(self, slot: int) -> None:
        """A slot nobody holds any more (evicted, or merged away) becomes reusable."""
        self.free.append(slot)
        for column in self._columns():
            column[slot] = None
        self.keys[slot] = ""

    def _has_state(self, txn, key: str) -> bool:
        return key in self.slots or self.store.has_state(txn, key)

    def _set_timer(self, txn, slot: int, t: int | None) -> None:
        old = self.deadlines[slot]
        if t != old:
            self.store.move_timer(txn, self.keys[slot], old, t)
            self.deadlines[slot] = t
            self.dirty.add(slot)

    def _statics(self, slot: int) -> bytes:
        st = self.statics_of[slot]
        if st is None:
            st = self.statics_of[slot] = self.warehouse.statics(self.pids[slot])
        return st

    def load_warehouse(self, txn) -> None:
        """Reads the synced attribute columns and recomputes every static subtree."""
        parts = WarehouseParts()  # replaced whole: a preview on another thread keeps the one it took
        parts.load(*self.store.columns(txn, self.attributes), self.compiled)
        self.warehouse = parts
        self.statics_of = [None] * len(self.keys)
        for key, slot in self.slots.items():  # people the warehouse has just learned about
            if self.pids[slot] is None and not key.startswith(ANON):
                self.pids[slot] = self.store.person_id(txn, key)

    # -- evaluation ------------------------------------------------------------------------
    def _evaluate(self, slot: int, now_us: int, audiences, cause: Cause, message_id: str,
                  out: list[MembershipChange]) -> None:
        values = self.evaluator.evaluate_bytes(self.states[slot], now_us, self._statics(slot))
        members = self.members[slot]
        # Most events change nothing: one comparison of bytes says so.
        current = self.current[slot]
        if current is None:
            current = self.current[slot] = bytes([bit in members for bit in self.program_bits])
        if values == current:
            return
        self.current[slot] = None  # recomputed from members next time
        walking = self.backfilling["audiences"] if self.backfilling is not None and slot in self.grafted else ()
        for i in audiences:
            bit = self.program_bits[i]
            if values[i] != (bit in members):
                aid = self.bits[bit]
                why = Cause.AUDIENCE_CHANGE if aid in walking else cause  # the backfill reached them
                if values[i]:
                    members[bit] = now_us
                    out.append(MembershipChange(aid, self.keys[slot], Direction.ENTER, now_us, why, message_id))
                else:
                    del members[bit]
                    out.append(MembershipChange(aid, self.keys[slot], Direction.EXIT, now_us, why, message_id))

    def _schedule(self, txn, slot: int, now_us: int) -> None:
        self._set_timer(txn, slot, self.evaluator.next_change(self.states[slot], now_us))

    def next_deadline(self) -> int | None:
        """The earliest pending timer as of the last committed entry point (read from any thread)."""
        return self.earliest

    def _file_earliest(self, txn) -> None:
        first = self.store.first_timer(txn)
        earliest = first[0] if first else None
        if earliest is not None and (self.earliest is None or earliest < self.earliest) \
                and self.on_deadline is not None:
            self.on_deadline()
        self.earliest = earliest

    # -- entry points ------------------------------------------------------------------------
    def apply(self, txn, events: list[MatchedEvent], now_us: int) -> list[MembershipChange]:
        """Evaluates durable events (the writer's hook); writes and returns the changes."""
        changes: list[MembershipChange] = []
        self._fire_due(txn, now_us, changes)
        touched: dict[int, set[int]] = {}
        everything = range(len(self.program_bits))
        for matched in events:
            event = matched.event
            self.created.clear()
            self._observe(txn, event, matched.matches, now_us, touched, changes)
            for slot, models in touched.items():
                # Someone new is evaluated for every audience: the warehouse-only ones included.
                if slot in self.created:
                    audiences = everything
                elif len(models) == 1:
                    audiences = self.by_model.get(next(iter(models)), ())
                else:
                    audiences = sorted({i for m in models for i in self.by_model.get(m, ())})
                if audiences:
                    self._evaluate(slot, now_us, audiences, Cause.EVENT, event.message_id, changes)
                self._schedule(txn, slot, now_us)
            touched.clear()
        self._persist(txn, changes)
        return changes

    def _person(self, kind: str, ident: str) -> str:
        if kind == "anonymous":
            user = self.aliases.get(ident)
            return user if user is not None else ANON + ident
        return ident

    def _observe(self, txn, event: Event, matches, now_us: int, touched: dict[int, set[int]],
                 changes: list[MembershipChange] | None, seq_record: bool = True) -> None:
        if event.type in (EventType.IDENTIFY, EventType.ALIAS):
            link(self, txn, event, now_us, changes)
        for model, (kind, ident) in matches:
            key = self._person(kind, ident)
            slot = self._slot(key, txn)
            self.evaluator.observe(self.states[slot], model, event.timestamp_us, event.properties, event.session_id)
            self.dirty.add(slot)
            if seq_record:
                self.store.index_event(txn, key, event.seq)
            touched.setdefault(slot, set()).add(model)

    def tick(self, txn, now_us: int) -> list[MembershipChange]:
        """Fires every timer due by ``now_us``, each at its own instant."""
        changes: list[MembershipChange] = []
        self._fire_due(txn, now_us, changes)
        self._persist(txn, changes)
        return changes

    def _fire_due(self, txn, now_us: int, changes: list[MembershipChange]) -> None:
        """Timers due by ``now_us`` fire before anything else happens at ``now_us``.

        Every entry point calls this first, so an event or a sync never
        swallows a lapse that was already due: the exit is recorded at its
        own instant, before what follows.
        """
        while (due := self.store.first_timer(txn)) is not None and due[0] <= now_us:
            t, key = due
            slot = self._slot(key, txn)
            self._set_timer(txn, slot, None)
            self.lapse(txn, slot, t, changes)

    def lapse(self, txn, slot: int, t: int, changes: list[MembershipChange]) -> None:
        """One person's timer fires at its instant ``t``: they are evaluated then, and their next one is set."""
        state = self.states[slot]
        flipped = [leaf.scope for j, leaf in enumerate(self.compiled.program.leaves)
                   if self.evaluator.leaf(state, j, t - 1).holds != self.evaluator.leaf(state, j, t).holds]
        cause = Cause.SESSION_END if flipped and all(s == Scope.SESSION for s in flipped) else Cause.WINDOW_LAPSE
        self._evaluate(slot, t, range(len(self.program_bits)), cause, "", changes)
        self._schedule(txn, slot, t)

    def after_sync(self, txn, now_us: int) -> list[MembershipChange]:
        """A warehouse sync landed: recompute the warehouse parts; move people at once."""
        return after_sync(self, txn, now_us)

    def _persist(self, txn, changes: list[MembershipChange]) -> None:
        """Writes realtime people's memberships, the member index, counts and the changelog.

        People without realtime state had their memberships written where
        they changed (see _reconcile and _merge). Everyone whose evaluator
        state or timer changed has it written too, so a restart reads it.
        """
        for slot in self.dirty:
            key = self.keys[slot]
            if self.slots.get(key) == slot:
                self.store.put_state(txn, key, self.deadlines[slot], self.pids[slot], self.generation,
                                     self.evaluator.dump(self.states[slot]))
        self.dirty.clear()
        self.grafted.clear()
        self._file_earliest(txn)
        if changes:
            self._record(txn, changes)
        self._evict()

    def _record(self, txn, changes: list[MembershipChange]) -> None:
        written = set()
        for c in changes:
            self.store.index_member(txn, c.audience_id, c.person_key, c.direction == Direction.ENTER)
            self.counts[c.audience_id] = self.counts.get(c.audience_id, 0) + (1 if c.direction == Direction.ENTER else -1)
            slot = self.slots.get(c.person_key)
            if slot is not None and c.person_key not in written:
                written.add(c.person_key)
                self.store.put_membership(txn, c.person_key, self.members[slot])
        self.store.put_counts(txn, self.counts)
        self.publish(self.store.append_changes(txn, changes))

    # -- recovery and audience changes ---------------------------------------------------------
    def recover(self, txn, now_us: int) -> list[MembershipChange]:
        """Loads the audiences; fires the timers that came due meanwhile; people load when needed.

        The log is replayed only when the stored states were dumped under
        another program (or none were, or they cannot be read). A walk that
        was under way resumes where it stood.
        """
        definitions.load(self, txn)
        self.counts = self.store.counts(txn)
        epochs = self.store.epochs(txn)
        self.generation, self.epoch_keys = epochs["generation"], epochs["leaves"]
        self.backfilling = self.store.backfill(txn)
        self._compile(txn)
        self.load_warehouse(txn)
        if self.store.program(txn) == fingerprint(self):
            try:
                return restore(self, txn, now_us)
            except ValueError as exc:  # a state this evaluator cannot read: the log still has everything
                log.warning("stored realtime state unreadable (%s): rebuilding it from the event log", exc)
        self.backfilling = None  # the rebuild evaluates everyone
        self.store.put_backfill(txn, None)
        return rebuild(self, txn, now_us, self._stored_defaults(txn))

    def _stored_defaults(self, txn) -> dict[str, np.ndarray]:
        with_state = set(self.slots) | set(self.store.state_keys(txn))
        return stored_defaults(self.store, txn, self.bits, len(self.warehouse.alive), with_state)

    def put_audience(self, txn, audience_id: str, display_name: str, description: str, definition: dict,
                     now_us: int, create: bool) -> tuple[Audience, list[MembershipChange]]:
        """Stores the audience and switches the program at once; a backfill then brings its members."""
        return definitions.put(self, txn, audience_id, display_name, description, definition, now_us, create)

    def backfill_step(self, txn, now_us: int, **limits) -> list[MembershipChange]:
        """One bounded slice of the backfill that brings new definitions their members."""
        return backfill.step(self, txn, now_us, **limits)

    def delete_audience(self, txn, audience_id: str, now_us: int) -> list[MembershipChange]:
        """Every member exits; the other audiences keep their state (no one's membership in them moves)."""
        return definitions.delete(self, txn, audience_id, now_us)

    def audience_state(self, audience_id: str) -> tuple[bool, float]:
        """(backfilling, the backfill's progress from 0 to 1)."""
        return backfill.state_of(self.backfilling, audience_id)

    # -- queries -------------------------------------------------------------------------
    def audience(self, audience_id: str) -> Audience:
        a = self.audiences.get(audience_id)
        if a is None:
            raise AudienceNotFound(f"no audience {audience_id!r}", metadata={"audience": audience_id})
        return a

    def preview(self, txn, condition: Condition, now_us: int, sample: int, deadline: float) -> tuple[int, list[str]]:
        """How many people qualify now under a draft condition, and some of their keys (any thread, a read txn)."""
        return preview(self, txn, condition, now_us, sample, deadline)

    def explain(self, txn, audience_id: str, person_key: str, now_us: int) -> tuple[bool, dict]:
        """Whether the person is a member now, and every node's value with what decides it."""
        return explain(self, txn, audience_id, person_key, now_us)


__all__ = ["ANON", "Audience", "Engine", "InvalidAudience", "check_audience_id"]
