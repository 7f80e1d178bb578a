"""Building events for the emitter: make_event and new_message_id (UUIDv7).

Kept apart from EventEmitter because they need no connection: a producer
can build events (or ids for its own events) without the sending machinery.
qualify.clients.emitter re-exports both under their old names.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from qualify.v1 import event_pb2


def new_message_id() -> str:
    """A UUIDv7 (RFC 9562): 48 bits of Unix milliseconds, then 74 random bits.

    Time-ordered ids keep the server's deduplication index cheap: new keys
    land together at the end of its B-tree instead of one page write each
    (see qualify.server.storage.eventlog). Any unique string works; this is
    the fast kind.
    """
    ms = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = ((ms & 0xFFFF_FFFF_FFFF) << 80) | (0x7 << 76) | (((rand >> 62) & 0xFFF) << 64) \
        | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return str(uuid.UUID(int=value))


def make_event(
    type_: int,
    name: str = "",
    *,
    user_id: str = "",
    anonymous_id: str = "",
    properties: Mapping[str, Any] | None = None,
    traits: Mapping[str, Any] | None = None,
    context: Mapping[str, Any] | None = None,
    timestamp: datetime | float | None = None,
    session_id: str = "",
    previous_id: str = "",
    message_id: str | None = None,
) -> event_pb2.Event:
    """A qualify.v1.Event with a fresh message_id (UUIDv7) and, by default, the current time.

    ``timestamp`` is an aware datetime or seconds since the epoch.
    """
    event = event_pb2.Event(type=type_, name=name, user_id=user_id, anonymous_id=anonymous_id,
                            session_id=session_id, previous_id=previous_id,
                            message_id=message_id or new_message_id())
    if timestamp is None:
        event.timestamp.FromNanoseconds(time.time_ns())
    elif isinstance(timestamp, datetime):
        event.timestamp.FromDatetime(timestamp)
    else:
        event.timestamp.FromNanoseconds(int(timestamp * 1e9))
    if properties:
        event.properties.update(properties)
    if traits:
        event.traits.update(traits)
    if context:
        event.context.update(context)
    return event
