"""Which partition a person belongs to: a stable hash of their person key.

The person key is the engine's (domain/engine.py): a known person's user id
(the parent model's primary key), an anonymous person's ``anon:<anonymous
id>``. Their partition is

    int.from_bytes(blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") % partitions

BLAKE2b from the standard library, never ``hash()``: the answer must be the
same in every process, on every machine and in every Python version, for as
long as the cluster lives (``partitions`` is fixed when it is created, and
every stream message is filed under the partition this function names). 64
bits modulo a partition count of at most 4096 is as even as it gets: the
bias is below 2^-52. Clients that route by partition may copy these lines.
"""

from __future__ import annotations

import functools
import hashlib

from ..domain.events import ANON, EventType, MatchedEvent

# Every event is hashed on the ingest node (its partitions) and again on its owner (whether it owns
# each person the event's models name): recent people are remembered, so a person active in a session
# costs one hash, not one per event and role. A cache hit costs about a third of a hash.
CACHED_KEYS = 1 << 16


@functools.lru_cache(maxsize=CACHED_KEYS)
def partition_of(person_key: str, partitions: int) -> int:
    """The partition of one person key (see the module docstring)."""
    digest = hashlib.blake2b(person_key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % partitions


def person_key(kind: str, ident: str) -> str:
    """The engine's key for a resolved identity: ("user", id) -> id, ("anonymous", id) -> anon:id."""
    return ANON + ident if kind == "anonymous" else ident


def primary_key(matched: MatchedEvent) -> str:
    """The key an event is filed under: its user id, else its anonymous id."""
    e = matched.event
    return e.user_id if e.user_id else ANON + e.anonymous_id


def partitions_of(matched: MatchedEvent, partitions: int) -> list[int]:
    """Every partition that must see the event, the primary (its user id, else anonymous id) first.

    A model may resolve the event to another person than the primary key
    (``identifier = "anonymous_id"`` on an event that also has a user id,
    or ``property:NAME``), and an identify or alias names the people it
    links: their partitions get the event too, and each owner evaluates
    only the people it owns (cluster/apply.py).
    """
    primary = primary_key(matched)
    out = [partition_of(primary, partitions)]
    for _, (kind, ident) in matched.matches:
        key = person_key(kind, ident)
        if key == primary:  # the common case: every model keyed by the same id (one hash, not one per model)
            continue
        p = partition_of(key, partitions)
        if p not in out:
            out.append(p)
    e = matched.event
    if e.type in (EventType.IDENTIFY, EventType.ALIAS) and e.user_id:
        linked = e.anonymous_id if e.type == EventType.IDENTIFY else e.previous_id
        if linked:
            sources = (ANON + linked,) if e.type == EventType.IDENTIFY else (ANON + linked, linked)
            for key in sources:
                p = partition_of(key, partitions)
                if p not in out:
                    out.append(p)
    return out
