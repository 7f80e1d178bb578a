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

By default (``batch_events = true``) the events of one publishing round
that go to one partition travel as one message (kind ``events``), whose
``Nats-Msg-Id`` is a digest of their ids and the partition: the stream then
drops an identical retry within its window, the owner's event log drops any
other repeat (24 h), and the acknowledgement's duplicate flags count only
the former. Per-message costs (NATS and its client's) are paid once per
partition per round instead of once per event (13-17x a single node's CPU
per event became 1.4-2.6x, bench/RESULTS.md); a partition's group of one
event is sent as a plain event message, with its own id.

A round is the ingest calls that arrived while the previous round waited
for its PubAcks (group commit, as the single node's writer does it): an
idle node publishes a call at once, a busy one merges the calls that queue
meanwhile (up to ROUND_EVENTS events), so the messages per event fall as
load grows (35% fewer on cluster-1 in the bench, four calls in flight).
Rounds go out one after the other, each call's events in call order, so a
partition's stream holds a client's successive calls in order; a call is
acknowledged once every message holding its events is, and fails if its
round does.

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
from collections import deque
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

# A round holds at most this many events (unless one call brings more): a message stays far below NATS's
# max_payload (1 MB by default) at ~300 bytes an event, whichever partition gets most of them.
ROUND_EVENTS = 2000
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
        self._rounds: deque[_Round] = deque()  # batched calls' events, by publishing round (the first is sending)
        self._sender: asyncio.Task | None = None

    async def ingest(self, events: Sequence[MatchedEvent]) -> IngestResult:
        if self.batch and len(events) > 1:
            return await self._ingest_batched(events)
        n = self.res.partitions
        messages: list[tuple[str, bytes, dict]] = []
        primary: list[int] = []  # index in messages of each event's primary copy
        for i, m in enumerate(events):
            m.event.arrival = i
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
            e.arrival = i
            record, mid = event_record(e), e.message_id
            first, *others = partitions_of(m, n)
            group = groups.get(first)
            if group is None:
                group = groups[first] = []
            group.append((i, mid, record))
            for p in others:
                groups.setdefault(p, []).append((-1, mid, record))
        rounds = self._rounds
        if not rounds or rounds[-1].sealed or rounds[-1].size + len(events) > ROUND_EVENTS:
            rounds.append(_Round(events[0].event.received_us))
        joined = rounds[-1]
        joined.add(groups, len(events))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_rounds())
        duplicates = await asyncio.shield(joined.done)
        duplicate = [False] * len(events)
        for p, group in groups.items():
            if duplicates[p]:
                for i, _, _ in group:
                    if i >= 0:
                        duplicate[i] = True
        return IngestResult(tuple(duplicate), 0)

    async def _send_rounds(self) -> None:
        """Publishes the rounds in order, each once the previous one is acknowledged (or failed)."""
        rounds = self._rounds
        try:
            while rounds:
                rnd = rounds[0]
                partitions, messages = rnd.messages()
                try:
                    acks = await self._publish_all(messages)
                except Exception as exc:  # noqa: BLE001 - every call of the round fails alike
                    rnd.done.set_exception(exc)
                else:
                    self.published += len(messages)
                    rnd.done.set_result(dict(zip(partitions, acks)))
                rounds.popleft()
        finally:
            self._sender = None
            for rnd in rounds:  # only when cancelled (the node stops): nobody will send them
                if not rnd.done.done():
                    rnd.done.set_exception(StorageUnavailable("the node is stopping; nothing is lost by retrying"))
            rounds.clear()

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


class _Round:
    """The events of the ingest calls that arrived while the previous round was being published."""

    def __init__(self, time_us: int):
        self.time_us = time_us
        self.groups: dict[int, list[tuple[int, str, tuple]]] = {}
        self.size = 0
        self.sealed = False  # its messages are made: later calls wait for the next round
        self.done: asyncio.Future = asyncio.get_running_loop().create_future()
        self.done.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even with no waiter

    def add(self, groups: dict[int, list[tuple[int, str, tuple]]], n: int) -> None:
        for p, group in groups.items():
            mine = self.groups.get(p)
            if mine is None:
                self.groups[p] = list(group)
            else:
                mine.extend(group)
        self.size += n

    def messages(self) -> tuple[list[int], list[tuple[str, bytes, dict]]]:
        self.sealed = True
        partitions, messages = [], []
        for p, group in self.groups.items():
            partitions.append(p)
            if len(group) == 1:
                i, mid, record = group[0]
                messages.append((events_subject(p), packb(record),
                                 {MSG_ID: header_id(mid) if i >= 0 else f"{header_id(mid)}>{p}"}))
                continue
            ids = "\n".join([mid if i >= 0 else f"{mid}>{p}" for i, mid, _ in group])
            digest = hashlib.blake2b(ids.encode("utf-8", "surrogatepass"), digest_size=16,
                                     person=f"p{p}".encode()[:16]).hexdigest()
            # One packing of the group's records (not one per event, nested as bytes): the owner unpacks the
            # message in one call too (cluster/messages.py reads both forms).
            payload, headers = control(Kind.EVENTS, self.time_us, [r for _, _, r in group])
            messages.append((events_subject(p), payload, {**headers, MSG_ID: f"b:{digest}"}))
        return partitions, messages
