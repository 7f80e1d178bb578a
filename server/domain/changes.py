"""Membership changes: the one record that crosses every seam, from the engine to the webhook.

A ``MembershipChange`` is created by the engine, given its sequence when the
changelog stores it, published to the live feed after its transaction
commits, and read back by watches and realtime syncs. Only storage (msgpack
rows in LMDB) and transport (protobuf, JSON payloads) serialise it.

``Direction`` and ``Cause`` carry qualify.v1.Direction and
qualify.v1.ChangeCause numbers; tests/test_vocabulary.py holds the two
together.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Direction(enum.IntEnum):
    """qualify.v1.Direction."""

    ENTER = 1
    EXIT = 2


class Cause(enum.IntEnum):
    """qualify.v1.ChangeCause: what moved the person."""

    UNSPECIFIED = 0  # a snapshot's current members: no change, just the state
    EVENT = 1
    WAREHOUSE_SYNC = 2
    WINDOW_LAPSE = 3
    SESSION_END = 4
    IDENTITY_MERGE = 5
    AUDIENCE_CHANGE = 6


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """A person entered or left an audience at ``effective_us``.

    ``sequence`` is 0 until the changelog stores the change; a snapshot's
    current members are ENTERs with sequence 0 too.
    """

    audience_id: str
    person_key: str
    direction: Direction
    effective_us: int
    cause: Cause
    message_id: str = ""
    sequence: int = 0

    @property
    def entered(self) -> bool:
        return self.direction == Direction.ENTER
