"""Identity merges across partitions: a person's history moves to the partition of the user it was linked to.

On one node an identify (or alias) that links ``anon:<id>`` to a user
replays both histories into one state, the anonymous person exits
everything, the user is evaluated for every audience, and later events
under the anonymous id count for the user (domain/identity.py). In a
cluster the two keys may hash to different partitions. The link event is
published to both (cluster/partitioning.py), and:

- the user's partition applies it as one node does: the engine records the
  alias (it has no state for the anonymous person to merge);
- the anonymous person's partition hands over: it records where the person
  went (``cluster_moved``: source key -> user, and the last log sequence that
  was theirs), makes the anonymous person exit every audience there (cause
  IDENTITY_MERGE, the link's message id, at the link's time, as on one node),
  and writes a HANDOVER message with the person's logged events to its
  outbox; later events under the anonymous id are written there as FORWARD
  messages instead of being evaluated. The outbox is a table committed with
  the state, published after the commit by the partition (cluster/partition.py)
  and again by a new owner after a failover; stream dedupe and the
  receiver's table of handovers received make repeats harmless;
- the user's partition, on HANDOVER, logs the events as the user's (their
  ``user_id`` set to the user, so any later replay of its log attributes
  them alike whatever arrived first), replays the user's whole history in
  the order the events were received into one state, and evaluates the
  user for every audience at the link's time (or later, if the partition
  has moved past it); on FORWARD it evaluates the event as the user's.

The source partition never replays a moved person's logged events again:
the engine's ``iter_events`` and ``read_event`` there skip them (see
``Handovers.visible``), so an audience change cannot bring them back.

Order across the two partitions: the user's partition holds the user from
the link until the handover is in (cluster/holds.py), so the merge is
evaluated at the link and the user's later events after it, as on one node.
"""

from __future__ import annotations

import json
import logging
import struct
from dataclasses import replace

import msgpack

from ..domain.changes import Cause, Direction, MembershipChange
from ..domain.events import ANON, Event, MatchedEvent, matching_models
from ..storage.eventlog import decode_event, encode_event
from ..storage.lmdb_store import delete_prefix
from .jetstream import events_subject
from .holds import replayed, sources
from .messages import MSG_ID, Item, Kind, control

log = logging.getLogger(__name__)

MOVED = b"cluster_moved"  # source key -> JSON [user, last log sequence of theirs]
RECEIVED = b"cluster_received"  # handover id -> u64 partition time it was applied
OUTBOX = b"cluster_outbox"  # u64 (big-endian) -> msgpack [subject, payload, headers]
KEY = struct.Struct(">Q")
U64 = struct.Struct("<Q")


def _hid(source: str, link_id: str) -> bytes:
    return f"{source}\x00{link_id}".encode()[:500]


class Handovers:
    """Runs on the partition's writer thread, inside ``Applier.apply``'s transaction."""

    def __init__(self, applier, txn):
        self.a = applier
        env = applier.env
        self.moved_db = env.open_db(MOVED, txn=txn)
        self.received_db = env.open_db(RECEIVED, txn=txn)
        self.outbox_db = env.open_db(OUTBOX, txn=txn)
        self.moved: dict[str, tuple[str, int]] = {
            k.decode(): tuple(json.loads(v)) for k, v in txn.cursor(db=self.moved_db)}
        with txn.cursor(db=self.outbox_db) as cur:
            self.next_out = KEY.unpack(cur.key())[0] + 1 if cur.last() else 1

    # -- what the engine may replay here -----------------------------------------------
    def visible(self, event: Event) -> bool:
        """False for an event of someone who moved to another partition (logged here before they did)."""
        if not self.moved:
            return True
        key = event.user_id or ANON + event.anonymous_id
        moved = self.moved.get(key)
        return moved is None or event.seq > moved[1]

    # -- the source side ------------------------------------------------------------------
    def hand_over(self, txn, event: Event, now: int) -> None:
        """An identify or alias links people of this partition to a user owned elsewhere."""
        user = event.user_id
        for source in sources(event):
            if source == user or not self.a.owns(source):
                continue
            merge = self.moved.get(source, ("",))[0] != user  # a repeated link merges nothing, as on one node
            if merge:
                upto = self.a.writer.log.last_seq(txn)
                self.moved[source] = (user, upto)
                txn.put(source.encode(), json.dumps([user, upto]).encode(), db=self.moved_db)
                merge = self.a.engine._has_state(txn, source)
            # Sent even when it merges nothing: the user's partition holds the user until it comes (cluster/holds.py).
            records = self._move_out(txn, source, event, now) if merge else []
            payload, headers = control(Kind.HANDOVER, now, user, source, event.message_id, records, merge)
            headers[MSG_ID] = f"ho.{self.a.partition}.{source}.{event.message_id}"[:250]
            self._out(txn, events_subject(self.a.partition_of(user)), payload, headers)

    def _move_out(self, txn, source: str, event: Event, now: int) -> list[bytes]:
        """The source's logged events, as they go; the source exits everything here, as on one node."""
        engine, store, log_ = self.a.engine, self.a.store, self.a.writer.log
        records = [encode_event(e) for e in (log_.get(txn, s) for s in store.person_seqs(txn, source))
                   if e is not None]
        slot = engine._slot(source, txn)
        changes = [MembershipChange(engine.bits[bit], source, Direction.EXIT, now, Cause.IDENTITY_MERGE,
                                    event.message_id) for bit, _ in sorted(engine.members[slot].items())]
        store.put_membership(txn, source, {})
        engine.members[slot] = {}
        engine.current[slot] = None
        engine._set_timer(txn, slot, None)
        engine.dirty.discard(slot)
        store.delete_state(txn, source)
        delete_prefix(txn, store.person_events, source.encode() + b"\x00")  # the events stay, for the others
        del engine.slots[source]
        engine.free_slot(slot)
        engine._persist(txn, changes)
        return records

    def forward(self, txn, event: Event, now: int) -> bool:
        """Whether ``event`` is an anonymous person's who moved away (then it goes to their partition)."""
        if not self.moved or event.user_id:
            return False
        moved = self.moved.get(ANON + event.anonymous_id)
        if moved is None:
            return False
        user = moved[0]
        payload, headers = control(Kind.FORWARD, now, user, encode_event(event))
        headers[MSG_ID] = f"fw.{event.message_id}"[:250]
        self._out(txn, events_subject(self.a.partition_of(user)), payload, headers)
        return True

    def _out(self, txn, subject: str, payload: bytes, headers: dict) -> None:
        txn.put(KEY.pack(self.next_out), msgpack.packb([subject, payload, headers]), db=self.outbox_db, append=True)
        self.next_out += 1
        self.a.notify()

    def outbox(self, txn, after: int, limit: int = 500) -> list[tuple[int, str, bytes, dict]]:
        """(number, subject, payload, headers) of the messages waiting after ``after`` (any thread, a read txn)."""
        out = []
        with txn.cursor(db=self.outbox_db) as cur:
            if cur.set_range(KEY.pack(after + 1)):
                for k, v in cur:
                    subject, payload, headers = msgpack.unpackb(v)
                    out.append((KEY.unpack(k)[0], subject, payload, headers))
                    if len(out) >= limit:
                        break
        return out

    def compact(self, txn, published: int) -> None:
        with txn.cursor(db=self.outbox_db) as cur:
            while cur.first() and KEY.unpack(cur.key())[0] <= published:
                cur.delete()

    # -- the user's side --------------------------------------------------------------------
    @staticmethod
    def forwarded(item: Item) -> Event:
        """A forwarded event, as the user's."""
        return replace(item.event, user_id=item.body[0])

    def received(self, txn, source: str, link_id: str) -> bool:
        return txn.get(_hid(source, link_id), db=self.received_db) is not None

    def receive(self, txn, item: Item, now: int) -> None:
        """A history handed over by another partition joins its user's here (see the module docstring)."""
        user, source, link_id, records, *rest = item.body
        merge = rest[0] if rest else True  # (a handover from before holds was sent only to merge)
        hid = _hid(source, link_id)
        if txn.get(hid, db=self.received_db) is not None:
            return
        txn.put(hid, U64.pack(now), db=self.received_db)
        engine, store, log_ = self.a.engine, self.a.store, self.a.writer.log
        events = [replace(decode_event(0, raw), user_id=user) for raw in records]
        matched = [MatchedEvent(e, tuple(matching_models(e, engine.models))) for e in events]
        accepted, _ = log_.append(txn, matched, now)
        for i in accepted:
            store.index_event(txn, user, matched[i].event.seq)
        moved = [matched[i].event.seq for i in accepted] if merge else None
        if self.a.holds.handed(txn, user, source, link_id, moved, now) or not merge:
            return
        # No hold waits for it: it came before its link (whose publish was retried). Merged at once.
        dst = engine._slot(user, txn)
        history = [e for e in (log_.get(txn, s) for s in store.person_seqs(txn, user)) if e is not None]
        engine.states[dst] = replayed(engine, history)
        engine.current[dst] = None
        engine.dirty.add(dst)
        changes: list[MembershipChange] = []
        engine._evaluate(dst, now, range(len(engine.program_bits)), Cause.IDENTITY_MERGE, link_id, changes)
        engine._schedule(txn, dst, now)
        engine._persist(txn, changes)
