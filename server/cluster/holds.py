"""A user's evaluation held from a cross-partition link until its handover, so the merge lands at the link.

On one node an identify that links a visitor to a user merges the two at
the link's instant: the user is evaluated on the joint history then, and
every later event and lapse of theirs counts on it (domain/identity.py). In
a cluster the visitor's history comes later, in a HANDOVER message from the
visitor's partition (cluster/handover.py). Evaluating the user meanwhile on
their own history alone would publish changes one node never makes: an
absence that held for the visitor since before the link enters the user at
some later lapse, or not at all once the window has moved on.

So the user's partition holds them from the link on:

- the link is applied as one node does (the alias is recorded), and the
  user's timer is taken away;
- every later event of theirs is logged and indexed (acknowledged and
  durable as any) but not evaluated;
- when the handovers of every link it waits for are in, the hold is
  released: the user's own timers fire at their instants, each link merges
  the histories known at that point (the user's events logged up to it and
  the visitors' handed over) and evaluates the user at the link's instant,
  and each held event is observed and evaluated at the partition time it
  was applied at. The changes have one node's content, times included.

The visitor's partition sends a handover for every link whose visitor it
owns, an empty one when one node would merge nothing (a repeated link, a
visitor with no state), so every hold ends, normally within one round trip
through the stream. A hold lives in the ``cluster_held`` table, committed
with the state, so a replay or a new owner holds and releases alike.

What a hold does not cover: a warehouse sync or an audience change applied
while it lasts evaluates the user on the state they had at the link.
"""

from __future__ import annotations

import msgpack

from ..domain.changes import Cause, MembershipChange
from ..domain.events import ANON, Event, EventType, matching_models

HELD = b"cluster_held"  # user -> msgpack {"links": [[seq, time, source, link id, handed over, moved seqs]], "events": [[seq, time]]}


def sources(event: Event) -> tuple[str, ...]:
    """The person keys an identify or alias links to its user (domain/identity.py ``link``)."""
    other = event.anonymous_id if event.type == EventType.IDENTIFY else event.previous_id
    if not other or not event.user_id:
        return ()
    return (ANON + other,) if event.type == EventType.IDENTIFY else (ANON + other, other)


class Holds:
    """The users held on this partition; runs on its writer thread, inside ``Applier.apply``'s transaction."""

    def __init__(self, applier, txn):
        self.a = applier
        self.db = applier.env.open_db(HELD, txn=txn)
        self.held: dict[str, dict] = {k.decode(): msgpack.unpackb(v) for k, v in txn.cursor(db=self.db)}

    def _save(self, txn, user: str) -> None:
        txn.put(user.encode(), msgpack.packb(self.held[user]), db=self.db)

    def awaited(self, event: Event, received) -> list[str]:
        """The people a link names that another partition owns and has not handed over yet."""
        user = event.user_id
        return [s for s in sources(event) if s != user and not self.a.owns(s) and not received(s)]

    def expect(self, txn, event: Event, now: int, awaited: list[str]) -> None:
        """The link ``event`` (logged here as ``event.seq``) waits for the handovers of ``awaited``."""
        user = event.user_id
        hold = self.held.get(user)
        if hold is None:
            hold = self.held[user] = {"links": [], "events": []}
            engine = self.a.engine
            engine._set_timer(txn, engine._slot(user, txn), None)  # its lapses are replayed at release
        hold["links"] += [[event.seq, now, source, event.message_id, False, None] for source in awaited]
        self._save(txn, user)

    def hold(self, txn, user: str, seq: int, now: int) -> None:
        """An event of a held user, logged as ``seq``: indexed now, evaluated at release."""
        self.a.store.index_event(txn, user, seq)
        self.held[user]["events"].append([seq, now])
        self._save(txn, user)

    def handed(self, txn, user: str, source: str, link_id: str, moved: list[int] | None, now: int) -> bool:
        """A handover for ``user`` arrived (``moved``: the seqs its history was logged at here, None if it
        merges nothing); False if no hold waits for it. Releases the hold once nothing more is awaited."""
        hold = self.held.get(user)
        link = next((x for x in hold["links"] if x[2] == source and x[3] == link_id and not x[4]), None) \
            if hold is not None else None
        if link is None:
            return False
        link[4], link[5] = True, moved
        if all(x[4] for x in hold["links"]):
            del self.held[user]
            txn.delete(user.encode(), db=self.db)
            self._release(txn, user, hold, now)
        else:
            self._save(txn, user)
        return True

    def _release(self, txn, user: str, hold: dict, now: int) -> None:
        engine, log_ = self.a.engine, self.a.writer.log
        slot = engine._slot(user, txn)
        merges = {x[0]: x[3] for x in hold["links"] if x[5] is not None}  # link seq -> its message id
        moved_in = {s for x in hold["links"] if x[5] for s in x[5]}
        steps = sorted({(s, t) for s, t in hold["events"]})  # every link held is a held event too
        changes: list[MembershipChange] = []
        engine._schedule(txn, slot, steps[0][1])
        for seq, t in steps:
            self._lapses(txn, slot, t, changes)
            if seq in merges:  # one node merges here: both histories as they stand at the link
                merged = {s for x in hold["links"] if x[0] <= seq and x[5] for s in x[5]}
                history = [e for e in (log_.get(txn, s) for s in self.a.store.person_seqs(txn, user))
                           if e is not None and (e.seq in merged or (e.seq <= seq and e.seq not in moved_in))]
                engine.states[slot] = replayed(engine, history)
                engine._evaluate(slot, t, range(len(engine.program_bits)), Cause.IDENTITY_MERGE, merges[seq], changes)
                engine._schedule(txn, slot, t)
                continue
            e = log_.get(txn, seq)
            if e is None:
                continue
            models = [m for m, who in matching_models(e, engine.models) if engine._person(*who) == user]
            for m in models:
                engine.evaluator.observe(engine.states[slot], m, e.timestamp_us, e.properties, e.session_id)
            audiences = sorted({i for m in models for i in engine.by_model.get(m, ())})
            if audiences:
                engine._evaluate(slot, t, audiences, Cause.EVENT, e.message_id, changes)
            engine._schedule(txn, slot, t)
        self._lapses(txn, slot, now, changes)
        engine.dirty.add(slot)
        engine._persist(txn, changes)

    def _lapses(self, txn, slot: int, until: int, changes: list[MembershipChange]) -> None:
        """The held user's own timers due by ``until``, each at its instant (as ``Engine._fire_due``)."""
        engine = self.a.engine
        while (t := engine.deadlines[slot]) is not None and t <= until:
            engine._set_timer(txn, slot, None)
            engine.lapse(txn, slot, t, changes)


def replayed(engine, history: list[Event]):
    """One state from a person's events, in the order they were received across the partitions."""
    history.sort(key=lambda e: (e.received_us, e.arrival, e.seq))
    state = engine.evaluator.new_state()
    for e in history:
        for model, _ in matching_models(e, engine.models):
            engine.evaluator.observe(state, model, e.timestamp_us, e.properties, e.session_id)
    return state
