"""The cluster's ingest port without NATS: calls merged into publishing rounds, in order, acked once stored."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from qualify.server.cluster.messages import decode
from qualify.server.cluster.partitioning import partition_of
from qualify.server.cluster.publish import EventPublisher
from qualify.server.domain.errors import StorageUnavailable
from qualify.server.domain.events import Event, EventType, MatchedEvent

PARTITIONS = 4


class FakeStream:
    """publish_async as JetStream answers it: a PubAck per message, a duplicate for an id seen before."""

    def __init__(self, fail: bool = False):
        self.messages: list[tuple[str, bytes, dict]] = []
        self.ids: set[str] = set()
        self.fail = fail
        self.gate: asyncio.Event | None = None  # set: PubAcks wait for it

    async def publish_async(self, subject, data, headers=None, wait_stall=None):
        loop = asyncio.get_running_loop()
        ack = loop.create_future()
        if self.fail:
            return ack  # never answered: the publisher gives up at its deadline
        mid = headers["Nats-Msg-Id"]
        duplicate = mid in self.ids
        self.ids.add(mid)
        if not duplicate:
            self.messages.append((subject, data, headers))

        async def answer():
            if self.gate is not None:
                await self.gate.wait()
            ack.set_result(SimpleNamespace(duplicate=duplicate))

        loop.create_task(answer())
        return ack


def publisher(stream: FakeStream, **kw) -> EventPublisher:
    res = SimpleNamespace(js=stream, partitions=PARTITIONS, settings=SimpleNamespace(batch_events=True))
    return EventPublisher(res, **kw)


def batch(tag: str, n: int) -> list[MatchedEvent]:
    return [MatchedEvent(Event(message_id=f"{tag}-{i}", type=EventType.TRACK, name="t", user_id=f"user-{i % 7}",
                               received_us=1), ())
            for i in range(n)]


def stored(stream: FakeStream) -> dict[int, list[str]]:
    """Each partition's message ids, in stream order."""
    out: dict[int, list[str]] = {}
    for seq, (subject, data, headers) in enumerate(stream.messages, 1):
        p = int(subject.rsplit(".", 1)[1])
        out.setdefault(p, []).extend(item.event.message_id for item in decode(seq, data, headers))
    return out


def test_calls_queued_behind_a_round_travel_together_in_call_order():
    async def main():
        stream = FakeStream()
        pub = publisher(stream)
        stream.gate = asyncio.Event()
        first = asyncio.create_task(pub.ingest(batch("a", 20)))
        await asyncio.sleep(0.01)  # the first round is out, waiting for its PubAcks
        later = [asyncio.create_task(pub.ingest(batch(tag, 20))) for tag in ("b", "c")]
        await asyncio.sleep(0.01)
        stream.gate.set()
        results = await asyncio.gather(first, *later)
        assert all(r.duplicates == 0 and len(r.duplicate) == 20 for r in results)
        return stream

    stream = asyncio.run(main())
    by_partition = stored(stream)
    assert len(stream.messages) == 2 * len(by_partition)  # round 1: the first call; round 2: the other two
    for p, ids in by_partition.items():
        want = [f"{tag}-{i}" for tag in "abc" for i in range(20) if partition_of(f"user-{i % 7}", PARTITIONS) == p]
        assert ids == want, p


def test_a_retried_call_is_flagged_duplicate_when_the_stream_has_its_messages():
    async def main():
        stream = FakeStream()
        pub = publisher(stream)
        events = batch("a", 10)
        first = await pub.ingest(events)
        again = await pub.ingest(events)
        return first, again, stream

    first, again, stream = asyncio.run(main())
    assert first.duplicates == 0 and again.duplicate == (True,) * 10
    assert sum(len(ids) for ids in stored(stream).values()) == 10


def test_a_round_that_is_not_acknowledged_fails_every_call_in_it():
    async def main():
        pub = publisher(FakeStream(fail=True), ack_timeout=0.05, deadline=0.2)
        calls = [asyncio.create_task(pub.ingest(batch(tag, 5))) for tag in ("a", "b")]
        for call in calls:
            with pytest.raises(StorageUnavailable):
                await call
        assert pub._sender is None and not pub._rounds

    asyncio.run(main())
