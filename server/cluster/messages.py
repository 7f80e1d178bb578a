"""What travels through the streams: events and control messages to owners, changes from them.

On ``qualify.events.<p>`` an event is the event log's own record
(storage/eventlog.py ``encode_event``: msgpack, with the receiving node's
``received_us``) and no ``Qualify-Kind`` header, so the common message
costs nothing extra. Control messages carry ``Qualify-Kind`` and a msgpack
body whose first field is the publisher's clock reading:

    tick      [time_us]                      time passed: due timers fire (their owner asks for it)
    sync      [time_us]                      sync the partition's slice of the warehouse now
    audience  [time_us, revision, op, record] an audience was put (record) or deleted (record None)
    handover  [time_us, user, source, link message id, [event records]]  a person's history moves here
    forward   [time_us, user, event record]  an anonymous event for the user it was linked to
    events    [time_us, [event records]]     several events of one ingest call ([cluster] batch_events), each
                                             record unpacked (nested in the message), or packed (before)

**Time comes from the stream.** An owner evaluates every message at
``max(partition time, the message's time)`` and fires timers only when a
tick (or any later message) says time has passed. So what a partition does
is a function of its stream alone: an owner that takes over replays the
stream from a snapshot and derives exactly the changes, with exactly the
same content and sequences, that the old owner derived. That is what makes
"no change emitted twice with different content" hold without fencing.

On ``qualify.changes.<p>`` a message is one committed transaction's
changes of one partition (at most MAX_CHANGES_PER_MESSAGE), msgpack
``[partition, first sequence, [[audience, person, direction, effective_us,
cause, message_id], ...]]``, with ``Nats-Msg-Id: <p>.<first>.<last>``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import msgpack

from ..domain.changes import Cause, Direction, MembershipChange
from ..domain.events import Event
from ..storage.eventlog import decode_event, encode_event, event_of_record

KIND = "Qualify-Kind"
MSG_ID = "Nats-Msg-Id"
MAX_CHANGES_PER_MESSAGE = 1000


class Kind(enum.IntEnum):
    EVENT = 0
    TICK = 1
    SYNC = 2
    AUDIENCE = 3
    HANDOVER = 4
    FORWARD = 5
    EVENTS = 6  # a batch of events: decoded into one EVENT item each, all with the message's sequence


_BY_NAME = {k.name.lower(): k for k in Kind}


@dataclass(slots=True)
class Item:
    """One message of a partition's stream, decoded."""

    seq: int  # the stream sequence
    kind: Kind
    time_us: int
    event: Event | None = None
    body: Any = None


def event_message(event: Event) -> bytes:
    return encode_event(event)


def control(kind: Kind, time_us: int, *fields) -> tuple[bytes, dict[str, str]]:
    """(payload, headers) of a control message."""
    return msgpack.packb([time_us, *fields]), {KIND: kind.name.lower()}


def decode(seq: int, data: bytes, headers: dict | None) -> list[Item]:
    """The items of one stream message (several for a batch of events)."""
    kind = _BY_NAME.get(headers.get(KIND, "")) if headers else None
    if kind is None:
        event = decode_event(0, data)
        return [Item(seq, Kind.EVENT, event.received_us, event)]
    body = msgpack.unpackb(data)
    if kind == Kind.EVENTS:  # the records nested as they are (one unpacking), or packed one by one (before)
        records = body[1]
        if records and isinstance(records[0], bytes):
            return [Item(seq, Kind.EVENT, e.received_us, e) for e in (decode_event(0, raw) for raw in records)]
        return [Item(seq, Kind.EVENT, e.received_us, e) for e in (event_of_record(0, r) for r in records)]
    return [_control(seq, kind, body)]


def _control(seq: int, kind: Kind, body: list) -> Item:
    if kind == Kind.FORWARD:  # [time, user, event record]
        return Item(seq, kind, body[0], decode_event(0, body[2]), body[1:2])
    return Item(seq, kind, body[0], None, body[1:])


def change_batch(partition: int, changes: list[MembershipChange]) -> tuple[bytes, dict[str, str]]:
    first, last = changes[0].sequence, changes[-1].sequence
    rows = [[c.audience_id, c.person_key, int(c.direction), c.effective_us, int(c.cause), c.message_id]
            for c in changes]
    return msgpack.packb([partition, first, rows]), {MSG_ID: f"{partition}.{first}.{last}"}


_DIRECTIONS = {int(d): d for d in Direction}
_CAUSES = {int(c): c for c in Cause}


def decode_changes(data: bytes) -> tuple[int, int, list[MembershipChange]]:
    """(partition, first sequence, changes with their partition sequences)."""
    partition, first, rows = msgpack.unpackb(data)
    return partition, first, [MembershipChange(a, p, _DIRECTIONS[d], t, _CAUSES[c], m, first + i)
                              for i, (a, p, d, t, c, m) in enumerate(rows)]


def change_rows(data: bytes) -> tuple[int, int, list[list]]:
    """(partition, first sequence, the rows): the read copy's form, whose rows are the changelog's own
    stored form (storage/realtime.py ``pack_change``), so it stores them without building changes first."""
    return msgpack.unpackb(data)


def change_of(row: list, sequence: int) -> MembershipChange:
    a, p, d, t, c, m = row
    return MembershipChange(a, p, _DIRECTIONS[d], t, _CAUSES[c], m, sequence)
