"""Ingest on any node: each event published to its partition's subject, acknowledged after JetStream's.

This is the cluster's ``EventWriter`` (domain/ports.py): IngestService
validates and matches as on one node, then hands the good events here
instead of to the LMDB writer. With ``[cluster] batch_events = false``
each event is one JetStream message on ``qualify.events.<partition>``
(cluster/partitioning.py) with ``Nats-Msg-Id`` set from its message id,
so JetStream drops a retried
event within its dedupe window (and the owner's event log, which keeps 24
hours of ids, drops it after that). The call resolves only once every
message has its PubAck, which JetStream sends after the stream's replicas
hold it: an acknowledged event is durable and replicated, whichever node
took it and whichever node owns its partition.

An event that concerns people on other partitions too (an identify that
links an anonymous id hashed elsewhere, a model keyed by another id) is
published to each of them, the extra copies with ``<message id>><partition>``
as their id; the client's duplicate flag is the primary copy's.

By default (``batch_events = true``) the events of one ingest call that
go to one partition travel as one message (kind ``events``), whose
``Nats-Msg-Id`` is a digest of their ids and the partition: the stream then
drops an identical retry within its window, the owner's event log drops any
other repeat (24 h), and the acknowledgement's duplicate flags count only
the former. Per-message costs (NATS and its client's) are paid once per
partition per call instead of once per event (13-17x a single node's CPU
per event became 1.4-2.6x, bench/RESULTS.md); a partition's group of one
event is sent as a plain event message, with its own id.

Publishes are pipelined (``publish_async``); acks that do not come within
``ack_timeout`` (a NATS server died, a stream is electing a leader) are
published again under the same ids, which dedupe makes safe, until
``deadline``; then the call fails UNAVAILABLE and the client retries.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import Sequence

import msgpack

from ..domain.errors import StorageUnavailable
from ..domain.events import MatchedEvent
from ..storage.eventlog import encode_event, event_record
from ..storage.writer import IngestResult
from .jetstream import Resources, events_subject
from .messages import MSG_ID, Kind, control
from .partitioning import partitions_of

log = logging.getLogger(__name__)
packb = msgpack.packb

_SAFE_ID = re.compile(r"^[\x21-\x7e]{1,200}$")  # what a NATS header value can carry as is


def header_id(message_id: str) -> str:
    """A message id as a header value: as is when printable ASCII, else a digest of it (stable)."""
    if _SAFE_ID.match(message_id):
        return message_id
    return "h:" + hashlib.blake2b(message_id.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


class EventPublisher:
    """The ingest port of a cluster node (see the module docstring)."""

    def __init__(self, resources: Resources, ack_timeout: float = 2.0, deadline: float = 15.0):
        self.res = resources
        self.batch = resources.settings.batch_events
        self.ack_timeout = ack_timeout
        self.deadline = deadline
        self.published = 0  # messages acknowledged (the bench reads it)

    async def ingest(self, events: Sequence[MatchedEvent]) -> IngestResult:
        if self.batch and len(events) > 1:
            return await self._ingest_batched(events)
        n = self.res.partitions
        messages: list[tuple[str, bytes, dict]] = []
        primary: list[int] = []  # index in messages of each event's primary copy
        for m in events:
            data = encode_event(m.event)
            mid = header_id(m.event.message_id)
            for i, p in enumerate(partitions_of(m, n)):
                if i == 0:
                    primary.append(len(messages))
                messages.append((events_subject(p), data, {MSG_ID: mid if i == 0 else f"{mid}>{p}"}))
        duplicates = await self._publish_all(messages)
        self.published += len(messages)
        return IngestResult(tuple(duplicates[i] for i in primary), 0)

    async def _ingest_batched(self, events: Sequence[MatchedEvent]) -> IngestResult:
        n = self.res.partitions
        # partition -> its events: (event index, or -1 for a copy for another person's partition; message id;
        # record). Ids enter the group's digest as sent (a copy's as "<id>><partition>"); only a group of one,
        # sent as a plain event message under its own id, needs its id as a header value.
        groups: dict[int, list[tuple[int, str, tuple]]] = {}
        for i, m in enumerate(events):
            e = m.event
            record, mid = event_record(e), e.message_id
            first, *others = partitions_of(m, n)
            group = groups.get(first)
            if group is None:
                group = groups[first] = []
            group.append((i, mid, record))
            for p in others:
                groups.setdefault(p, []).append((-1, mid, record))
        messages, members = [], []
        for p, group in groups.items():
            if len(group) == 1:
                i, mid, record = group[0]
                messages.append((events_subject(p), packb(record),
                                 {MSG_ID: header_id(mid) if i >= 0 else f"{header_id(mid)}>{p}"}))
            else:
                ids = "\n".join([mid if i >= 0 else f"{mid}>{p}" for i, mid, _ in group])
                digest = hashlib.blake2b(ids.encode("utf-8", "surrogatepass"), digest_size=16,
                                         person=f"p{p}".encode()[:16]).hexdigest()
                # One packing of the group's records (not one per event, nested as bytes): the owner unpacks
                # the message in one call too (cluster/messages.py reads both forms).
                payload, headers = control(Kind.EVENTS, events[0].event.received_us, [r for _, _, r in group])
                messages.append((events_subject(p), payload, {**headers, MSG_ID: f"b:{digest}"}))
            members.append([i for i, _, _ in group if i >= 0])
        duplicates = await self._publish_all(messages)
        self.published += len(messages)
        duplicate = [False] * len(events)
        for dup, indices in zip(duplicates, members):
            for i in indices:
                duplicate[i] = dup
        return IngestResult(tuple(duplicate), 0)

    async def _publish_all(self, messages: list[tuple[str, bytes, dict]]) -> list[bool]:
        """Publishes every message until acknowledged; whether each was a duplicate.

        A message sent again after its ack did not come may have been stored
        the first time: its duplicate ack then says nothing, and it counts as new.
        """
        js = self.res.js
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.deadline
        acks: list = [None] * len(messages)
        todo = list(range(len(messages)))
        retried: set[int] = set()
        while todo:
            futures = {}
            try:
                for i in todo:
                    subject, data, headers = messages[i]
                    futures[await js.publish_async(subject, data, headers=dict(headers), wait_stall=self.ack_timeout)] = i
            except Exception as exc:  # noqa: BLE001 - a stalled or closed connection: retried below
                log.warning("publishing events failed (%s); retrying", exc)
            if futures:
                done, pending = await asyncio.wait(futures, timeout=self.ack_timeout)
                for f in pending:
                    f.cancel()
                for f in done:
                    if not f.cancelled() and f.exception() is None:
                        acks[futures[f]] = f.result()
            todo = [i for i in range(len(messages)) if acks[i] is None]
            if todo and loop.time() > give_up:
                raise StorageUnavailable(f"the event stream did not acknowledge {len(todo)} of {len(messages)} "
                                         f"messages within {self.deadline:g}s; nothing is lost by retrying")
            if todo:
                retried.update(todo)
                await asyncio.sleep(0.05)
        return [bool(a.duplicate) and i not in retried for i, a in enumerate(acks)]
