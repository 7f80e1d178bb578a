"""Event ingestion: event models in the project file, IngestService, the event log, the writer.

The RPC tests run the real ``qualify serve`` (tests/conftest.py) on a project
with realtime event models, and read the LMDB event log directly from this
process (read-only, as any reader process would). The writer and the
streaming handler are also driven in-process, with a fake clock or a gated
fake writer, where a black-box test could not see what matters (group commit,
backpressure, how many requests a stream reads ahead).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
import pytest

from conftest import QualifyServer, write_project
from qualify.clients._errors import error_from_rpc_error
from qualify.evaluator.program import Op
from qualify.server.config import ProjectError, load_project
from qualify.server.domain.conditions import Predicate
from qualify.server.domain.errors import QualifyError
from qualify.server.clock import wall_clock_us
from qualify.server.domain.events import (Event, EventModel, EventType, Identifier, MatchedEvent, RejectionReason,
                                          matching_models, validate)
from qualify.server.domain.schema import ValueType
from qualify.server.storage.eventlog import EventLog
from qualify.server.storage.lmdb_store import data_path, open_env
from qualify.server.storage.writer import IngestResult, Writer
from qualify.server.services.ingest import IngestService
from qualify.server.transport.ingest import MAX_IN_FLIGHT, Ingest
from qualify.v1 import diagnostics_pb2, diagnostics_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc

EVENT_MODELS = """\
[event_models.pricing_views]
type = "page"
filters = [{ property = "path", operator = "eq", value = "/pricing" }]
[event_models.pricing_views.properties]
path = "string"

[event_models.orders]
type = "track"
event = "Order Completed"
[event_models.orders.properties]
total = "float"
items = "int"
gift = "bool"
placed_at = "timestamp"

[event_models.tickets]
type = "track"
event = "Ticket Opened"
identifier = "property:customer_id"
[event_models.tickets.properties]
customer_id = "string"

[realtime]
session_timeout = "10m"
"""

US = 1_000_000


def duckdb_warehouse(path: Path) -> str:
    return f'type = "duckdb"\npath = "{path}"'


def mid() -> str:
    return str(uuid.uuid4())


def event(message_id: str | None = None, type_: int = event_pb2.EVENT_TYPE_TRACK, name: str = "Button Clicked",
          user_id: str = "user-1", anonymous_id: str = "", properties: dict | None = None,
          timestamp: datetime | None = None) -> event_pb2.Event:
    e = event_pb2.Event(message_id=mid() if message_id is None else message_id, type=type_, name=name,
                        user_id=user_id, anonymous_id=anonymous_id)
    if properties:
        e.properties.update(properties)
    if timestamp is not None:
        e.timestamp.FromDatetime(timestamp)
    return e


def logged_events(folder: Path) -> list[Event]:
    """The whole event log of the project in ``folder``, read through a read-only environment."""
    env = open_env(data_path(folder / "data"), 1 << 30, readonly=True)
    try:
        log = EventLog(env)
        with env.begin() as txn:
            return list(log.read(txn))
    finally:
        env.close()


def server_info(address: str) -> diagnostics_pb2.GetServerInfoResponse:
    with grpc.insecure_channel(address) as ch:
        return diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(diagnostics_pb2.GetServerInfoRequest())


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory, demo_warehouse):
    folder = tmp_path_factory.mktemp("ingest")
    project = write_project(folder, duckdb_warehouse(demo_warehouse), extra=EVENT_MODELS)
    server = QualifyServer(folder, "--project", str(project)).start()
    yield server, folder
    assert server.stop() == 0, server.log()


@pytest.fixture
def stub(ingest_server):
    server, _ = ingest_server
    with grpc.insecure_channel(server.address) as ch:
        yield ingest_pb2_grpc.IngestServiceStub(ch)


# ---------------------------------------------------------------- Track


def test_track_is_acknowledged_once_and_logged_once(ingest_server, stub):
    server, folder = ingest_server
    before = server_info(server.address).events_logged
    e = event(type_=event_pb2.EVENT_TYPE_PAGE, name="Pricing", properties={"path": "/pricing"})
    assert stub.Track(ingest_pb2.TrackRequest(event=e)).duplicate is False
    assert stub.Track(ingest_pb2.TrackRequest(event=e)).duplicate is True
    assert server_info(server.address).events_logged == before + 1
    stored = [x for x in logged_events(folder) if x.message_id == e.message_id]
    assert len(stored) == 1
    got = stored[0]
    assert (got.type, got.name, got.user_id, got.properties) == (EventType.PAGE, "Pricing", "user-1", {"path": "/pricing"})
    assert got.seq > 0 and got.timestamp_us == got.received_us  # no timestamp: the receive time


def test_events_matching_no_model_are_stored_and_counted_as_unmatched(ingest_server, stub):
    server, folder = ingest_server
    before = server_info(server.address)
    stub.Track(ingest_pb2.TrackRequest(event=event(name="Nobody Models This")))
    stub.Track(ingest_pb2.TrackRequest(event=event(type_=event_pb2.EVENT_TYPE_PAGE, properties={"path": "/"})))  # filter fails
    stub.Track(ingest_pb2.TrackRequest(event=event(type_=event_pb2.EVENT_TYPE_PAGE, properties={"path": "/pricing"})))
    after = server_info(server.address)
    assert after.events_logged == before.events_logged + 3
    assert after.events_unmatched == before.events_unmatched + 2


REJECTED = {
    "MISSING_MESSAGE_ID": (lambda: event(message_id=""), "event.message_id"),
    "UNKNOWN_TYPE": (lambda: event(type_=event_pb2.EVENT_TYPE_UNSPECIFIED), "event.type"),
    "MISSING_IDENTITY": (lambda: event(user_id="", anonymous_id=""), "event.user_id"),
    "PROPERTY_TYPE": (lambda: event(name="Order Completed", properties={"total": "12.50"}), "event.properties.total"),
    "FUTURE_TIMESTAMP": (lambda: event(timestamp=datetime.now(timezone.utc) + timedelta(minutes=10)), "event.timestamp"),
    "TOO_LARGE": (lambda: event(properties={"blob": "x" * 33_000}), "event"),
    # Far enough back that the microseconds overflow int64 (the log's msgpack once failed the batch on it).
    "INVALID_TIMESTAMP": (lambda: raw_timestamp(-9_300_000_000_000), "event.timestamp"),
}

# Timestamps outside RFC 3339 (years 0001-9999, nanos in [0, 1e9)): each is rejected on its own.
YEAR_1 = -62135596800  # 0001-01-01T00:00:00Z, the first instant RFC 3339 can write
INVALID_TIMESTAMPS = {
    "seconds -9.3e12": (-9_300_000_000_000, 0),
    "int64 min": (-2**63, 0),
    "year -1": (YEAR_1 - 2 * 366 * 86400, 0),
    "just before year 1": (YEAR_1 - 1, 999_999_999),
    "nanos -1": (1_700_000_000, -1),
    "nanos 1e9": (1_700_000_000, 1_000_000_000),
    "nanos 2e9": (1_700_000_000, 2_000_000_000),
}


def raw_timestamp(seconds: int, nanos: int = 0, **kw) -> event_pb2.Event:
    """An event whose timestamp is set field by field (FromDatetime cannot write an invalid one)."""
    e = event(**kw)
    e.timestamp.seconds, e.timestamp.nanos = seconds, nanos
    return e


@pytest.mark.parametrize("reason", list(REJECTED))
def test_track_rejects_with_the_reason(ingest_server, stub, reason):
    make, field = REJECTED[reason]
    e = make()
    with pytest.raises(grpc.RpcError) as info:
        stub.Track(ingest_pb2.TrackRequest(event=e))
    err = error_from_rpc_error(info.value)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.reason == "EVENT_REJECTED"
    assert err.metadata["rejection"] == f"REJECTION_REASON_{reason}"
    assert [f for f, _ in err.field_violations] == [field]
    assert e.message_id == "" or e.message_id not in {x.message_id for x in logged_events(ingest_server[1])}


# ---------------------------------------------------------------- TrackBatch


def test_invalid_timestamps_are_rejected_one_by_one_and_neighbours_acknowledged(ingest_server, stub):
    server, folder = ingest_server
    batch = []
    for seconds, nanos in INVALID_TIMESTAMPS.values():
        batch += [event(), raw_timestamp(seconds, nanos)]
    year_1 = raw_timestamp(YEAR_1)  # old, but RFC 3339: stored and acknowledged, it changes nothing
    batch += [year_1, event()]
    response = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=batch))
    assert response.accepted == len(INVALID_TIMESTAMPS) + 2, response
    assert [r.index for r in response.rejections] == list(range(1, 2 * len(INVALID_TIMESTAMPS), 2))
    assert {r.reason for r in response.rejections} == {ingest_pb2.REJECTION_REASON_INVALID_TIMESTAMP}
    logged = {x.message_id: x for x in logged_events(folder)}
    assert logged[year_1.message_id].timestamp_us == YEAR_1 * US
    assert all((e.message_id in logged) == (i % 2 == 0 or i >= len(batch) - 2) for i, e in enumerate(batch))




def test_a_batch_accepts_good_neighbours_of_every_kind_of_bad_event(ingest_server, stub):
    server, folder = ingest_server
    before = server_info(server.address).events_logged
    batch, bad_at = [], {}
    for reason, (make, _) in REJECTED.items():
        batch.append(event())
        bad_at[len(batch)] = reason
        batch.append(make())
    batch.append(event(type_=9))  # an enum value from the future: UNKNOWN_TYPE too
    bad_at[len(batch) - 1] = "UNKNOWN_TYPE"
    batch.append(event())
    response = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=batch))
    assert response.accepted == len(batch) - len(bad_at)
    assert response.duplicates == 0
    got = {r.index: ingest_pb2.RejectionReason.Name(r.reason).removeprefix("REJECTION_REASON_")
           for r in response.rejections}
    assert got == bad_at
    assert all(r.message_id == batch[r.index].message_id and r.description for r in response.rejections)
    assert server_info(server.address).events_logged == before + response.accepted
    logged = {x.message_id for x in logged_events(folder)}
    for i, e in enumerate(batch):
        assert (e.message_id in logged) == (i not in bad_at) or e.message_id == ""


def test_duplicates_inside_a_batch_and_across_batches(ingest_server, stub):
    server, folder = ingest_server
    a, b = event(), event()
    first = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[a, b, a]))
    assert (first.accepted, first.duplicates) == (2, 1)
    again = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[b, a, event()]))
    assert (again.accepted, again.duplicates) == (1, 2)
    counts = Counter(x.message_id for x in logged_events(folder))
    assert counts[a.message_id] == counts[b.message_id] == 1


def test_properties_are_typed_by_the_matching_models(ingest_server, stub):
    _, folder = ingest_server
    good = event(name="Order Completed", properties={
        "total": 12, "items": 3.0, "gift": True, "placed_at": "2024-05-01T12:00:00.5+02:00",
        "note": "undeclared properties are kept as sent", "nested": {"a": [1, "b", None]}})
    bad = {
        "items": 2.5, "gift": "true", "placed_at": 1714557600, "total": True,
    }
    batch = [good] + [event(name="Order Completed", properties={k: v}) for k, v in bad.items()]
    # The same values are fine for an event no model declares them for.
    batch.append(event(name="Something Else", properties=dict(bad)))
    response = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=batch))
    assert sorted(r.index for r in response.rejections) == [1, 2, 3, 4]
    assert all(r.reason == ingest_pb2.REJECTION_REASON_PROPERTY_TYPE for r in response.rejections)
    stored = {x.message_id: x for x in logged_events(folder)}[good.message_id]
    placed = int(datetime(2024, 5, 1, 10, 0, 0, 500_000, tzinfo=timezone.utc).timestamp() * US)
    assert stored.properties["items"] == 3 and type(stored.properties["items"]) is int
    assert stored.properties["total"] == 12.0 and type(stored.properties["total"]) is float
    assert stored.properties["placed_at"] == placed
    assert stored.properties["note"] == "undeclared properties are kept as sent"
    assert stored.properties["nested"] == {"a": [1.0, "b", None]}


def test_an_oversized_batch_is_refused_whole(ingest_server, stub):
    server, _ = ingest_server
    before = server_info(server.address).events_logged
    with pytest.raises(grpc.RpcError) as info:
        stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[event() for _ in range(1001)]))
    err = error_from_rpc_error(info.value)
    assert (info.value.code(), err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "BATCH_TOO_LARGE")
    assert [f for f, _ in err.field_violations] == ["events"]
    assert server_info(server.address).events_logged == before
    assert stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[event() for _ in range(1000)])).accepted == 1000


@pytest.mark.parametrize("method,streaming", [("Track", False), ("TrackBatch", False), ("StreamEvents", True)])
def test_malformed_bytes_are_invalid_argument(ingest_server, method, streaming):
    server, _ = ingest_server
    path = f"/qualify.v1.IngestService/{method}"
    with grpc.insecure_channel(server.address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            if streaming:
                list(ch.stream_stream(path)(iter([b"\xff\xff\xff"]), timeout=5))
            else:
                ch.unary_unary(path)(b"\xff\xff\xff", timeout=5)
    err = error_from_rpc_error(info.value)
    assert (info.value.code(), err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")


# ---------------------------------------------------------------- StreamEvents


def test_stream_acknowledges_every_batch_in_order(ingest_server, stub):
    server, folder = ingest_server
    before = server_info(server.address).events_logged
    sent = []

    def batches():
        for n in range(1, 31):
            events = [event() for _ in range(50)]
            if n % 3 == 0:
                events[7] = event(user_id="")  # one bad event in every third batch
            if n % 5 == 0:
                events[9] = sent[-1][1][0]  # a duplicate of the previous batch's first event
            sent.append((n * 10, events))
            yield ingest_pb2.StreamEventsRequest(batch_number=n * 10, events=events)

    acks = list(stub.StreamEvents(batches(), timeout=30))
    assert [a.batch_number for a in acks] == [n for n, _ in sent]
    for ack, (n, _) in zip(acks, sent):
        k = n // 10
        bad, dup = k % 3 == 0, k % 5 == 0
        assert (ack.accepted, ack.duplicates) == (50 - bad - dup, int(dup))
        assert [(r.index, r.reason) for r in ack.rejections] == (
            [(7, ingest_pb2.REJECTION_REASON_MISSING_IDENTITY)] if bad else [])
    assert server_info(server.address).events_logged == before + sum(a.accepted for a in acks)


def test_stream_acknowledges_earlier_batches_then_refuses_an_oversized_one(ingest_server, stub):
    good = [event() for _ in range(10)]
    requests = [ingest_pb2.StreamEventsRequest(batch_number=1, events=good),
                ingest_pb2.StreamEventsRequest(batch_number=2, events=[event() for _ in range(1001)])]
    call = stub.StreamEvents(iter(requests), timeout=10)
    first = next(call)
    assert (first.batch_number, first.accepted) == (1, 10)
    with pytest.raises(grpc.RpcError) as info:
        next(call)
    assert error_from_rpc_error(info.value).reason == "BATCH_TOO_LARGE"


def test_workers_mode_forwards_ingest_to_the_writer(server_factory):
    # Serving processes of workers=N have a read-only environment: they forward to the writer.
    server = server_factory("--workers", "2", "--demo-people", "200")
    with server.channel() as ch:
        ingest_pb2_grpc.IngestServiceStub(ch).Track(ingest_pb2.TrackRequest(event=event()), timeout=5)
    assert server_info(server.address).events_logged == 1


class _GatedWriter:
    """A Writer stand-in whose ingest waits for a gate: nothing becomes durable until it opens."""

    def __init__(self):
        self.gate = asyncio.Event()
        self.calls = 0

    async def ingest(self, events):
        self.calls += 1
        await self.gate.wait()
        return IngestResult((False,) * len(events))


def test_a_stream_reads_at_most_a_few_batches_ahead_of_durability():
    async def main():
        writer = _GatedWriter()
        handler = Ingest(IngestService(writer, [], wall_clock_us))
        pulled = 0

        async def requests():
            nonlocal pulled
            for n in range(1, 21):
                pulled += 1
                yield ingest_pb2.StreamEventsRequest(batch_number=n, events=[event()])

        acks = handler.stream_events(requests(), context=None)
        first = asyncio.ensure_future(acks.__anext__())
        await asyncio.sleep(0.1)
        # Blocked on durability: the handler stopped reading, so gRPC's flow
        # control would stop the sender.
        assert pulled == MAX_IN_FLIGHT and not first.done()
        writer.gate.set()
        got = [(await first).batch_number] + [a.batch_number async for a in acks]
        assert got == list(range(1, 21)) and pulled == 20

    asyncio.run(main())


# ---------------------------------------------------------------- durability


def test_acknowledged_events_survive_kill_9(tmp_path, demo_warehouse):
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra=EVENT_MODELS)
    server = QualifyServer(tmp_path, "--project", str(project)).start()
    acked: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def pump(k: int) -> None:
        with grpc.insecure_channel(server.address) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            n = 0
            while not stop.is_set():
                batch = [event(message_id=f"{k}-{n}-{i}") for i in range(100)]
                n += 1
                try:
                    response = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=batch), timeout=10)
                except grpc.RpcError:
                    return
                assert response.accepted == 100
                with lock:
                    acked.extend(e.message_id for e in batch)

    threads = [threading.Thread(target=pump, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(acked) < 3000 and time.monotonic() < deadline:
        time.sleep(0.005)
    server.kill()  # SIGKILL, while batches are in flight
    stop.set()
    for t in threads:
        t.join()
    assert len(acked) >= 3000

    counts = Counter(e.message_id for e in logged_events(tmp_path))
    missing = [m for m in acked if counts[m] != 1]
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {missing[:3]}"
    assert max(counts.values()) == 1
    logged = len(counts)

    again = QualifyServer(tmp_path, "--project", str(project)).start()
    try:
        assert server_info(again.address).events_logged == logged
        with again.channel() as ch:  # resending is safe: all duplicates
            response = ingest_pb2_grpc.IngestServiceStub(ch).TrackBatch(
                ingest_pb2.TrackBatchRequest(events=[event(message_id=m) for m in acked[:1000]]))
        assert (response.accepted, response.duplicates) == (0, 1000)
        assert server_info(again.address).events_logged == logged
    finally:
        assert again.stop() == 0, again.log()


# ---------------------------------------------------------------- the writer, in-process


class Clock:
    def __init__(self, now_us: int = 1_700_000_000 * US):
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


@pytest.fixture
def env(tmp_path):
    env = open_env(tmp_path / "lmdb", 1 << 30, readonly=False)
    yield env
    env.close()


def plain(message_id: str, **kw) -> MatchedEvent:
    return MatchedEvent(Event(message_id=message_id, type=EventType.TRACK, user_id="u", **kw), ())


def test_group_commit_many_concurrent_batches_share_transactions(env):
    writer = Writer(env)
    writer.start()
    seen: list[list[int]] = []
    writer.on_events = lambda txn, events, now: seen.append([m.event.seq for m in events])

    async def main():
        return await asyncio.gather(*[writer.ingest([plain(f"{k}-{i}") for i in range(5)]) for k in range(300)])

    results = asyncio.run(main())
    writer.stop()
    assert all(r.accepted == 5 for r in results)
    assert writer.events_logged == 1500
    assert writer.transactions < 50, writer.transactions  # not one fsync per batch
    assert [s for batch in seen for s in batch] == list(range(1, 1501))  # the hook saw every event, in log order
    with env.begin() as txn:
        assert writer.log.count(txn) == writer.log.last_seq(txn) == 1500


def test_the_hook_sees_only_new_events_and_its_failure_acknowledges_nothing(env):
    writer = Writer(env)
    writer.start()
    calls = []

    def hook(txn, events, now):
        calls.append([m.event.message_id for m in events])
        if any(m.event.message_id == "poison" for m in events):
            raise RuntimeError("engine bug")

    writer.on_events = hook

    async def main():
        first = await writer.ingest([plain("a"), plain("b")])
        again = await writer.ingest([plain("a"), plain("c")])
        with pytest.raises(QualifyError):
            await writer.ingest([plain("d"), plain("poison")])
        after = await writer.ingest([plain("d")])  # the writer carries on; d was never committed
        return first, again, after

    first, again, after = asyncio.run(main())
    writer.stop()
    assert first.duplicate == (False, False) and again.duplicate == (True, False) and after.duplicate == (False,)
    assert calls == [["a", "b"], ["c"], ["d", "poison"], ["d"]]
    with env.begin() as txn:
        assert [e.message_id for e in writer.log.read(txn)] == ["a", "b", "c", "d"]


def test_ingest_that_queues_during_a_background_slice_shares_its_commit(env):
    """A slice alone ends when a batch waits, and the batch joins its transaction: one commit, not two."""
    writer = Writer(env)
    writer.start()
    db = writer.submit(lambda txn: env.open_db(b"scratch", txn=txn)).result()
    running, slices = threading.Event(), []

    def slice_(txn, waiting):
        running.set()
        deadline = time.monotonic() + 10
        while not waiting() and time.monotonic() < deadline:
            time.sleep(0.001)
        txn.put(b"slice-%d" % len(slices), b"", db=db)
        slices.append(waiting())
        return False

    def poison(txn, events, now):
        if any(m.event.message_id == "poison" for m in events):
            raise RuntimeError("engine bug")

    writer.on_events = poison
    writer.set_background(slice_)
    for k, ids in enumerate((["a", "b"], ["poison"])):
        running.clear()
        writer.wake_background()
        assert running.wait(5)
        before = env.info()["last_txnid"]
        ack = writer.ingest_blocking([plain(m) for m in ids])
        if ids == ["poison"]:  # the batch fails; the slice's work commits all the same
            with pytest.raises(QualifyError):
                ack.result(5)
        else:
            assert ack.result(5).accepted == 2
        assert env.info()["last_txnid"] == before + 1
        with env.begin() as txn:
            assert txn.get(b"slice-%d" % k, db=db) is not None
    writer.stop()
    assert slices == [True, True]  # each slice saw the batch waiting
    with env.begin() as txn:
        assert [e.message_id for e in writer.log.read(txn)] == ["a", "b"]


def test_message_ids_are_forgotten_after_24_hours_and_pruned(env):
    clock = Clock()
    writer = Writer(env, clock_us=clock, prune_min=10)
    writer.start()

    def ingest(*ids):
        return writer.ingest_blocking([plain(m) for m in ids]).result()

    assert ingest(*[f"old-{i}" for i in range(50)]).accepted == 50
    clock.now_us += 23 * 3600 * US
    assert ingest("old-0", "new").duplicate == (True, False)
    clock.now_us += 2 * 3600 * US  # old-* are now 25 h old, "new" 2 h
    assert ingest("old-1").duplicate == (False,)
    for i in range(10):  # each transaction sweeps a bounded number of entries
        ingest(f"later-{i}")
    with env.begin() as txn:
        assert writer.log.seen(txn, "new", clock.now_us)
        assert writer.log.seen(txn, "old-1", clock.now_us)
        assert not writer.log.seen(txn, "old-2", clock.now_us)
        remaining = txn.stat(writer.log.dedupe)["entries"]
    writer.stop()
    assert remaining == 1 + 1 + 10  # new, old-1 (accepted again), later-*


def test_ingest_waits_for_room_instead_of_buffering(env):
    writer = Writer(env, max_pending=100)
    writer.start()
    gate = threading.Event()
    writer.submit(lambda txn: gate.wait(5))  # holds the writer thread
    high = []

    async def main():
        tasks = [asyncio.ensure_future(writer.ingest([plain(f"{k}-{i}") for i in range(30)])) for k in range(10)]
        await asyncio.sleep(0.1)
        high.append(writer.pending)
        gate.set()
        return await asyncio.gather(*tasks)

    results = asyncio.run(main())
    writer.stop()
    assert high == [90]  # three batches of 30 admitted; the other seven wait for room
    assert sum(r.accepted for r in results) == 300


def test_submit_runs_in_order_with_ingest_and_reports_failures(env):
    writer = Writer(env)
    writer.start()
    db = writer.submit(lambda txn: env.open_db(b"scratch", txn=txn)).result()
    writer.submit(lambda txn: txn.put(b"k", b"v", db=db)).result()
    failed = writer.submit(lambda txn: (txn.put(b"k", b"changed", db=db), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        failed.result()
    gate, order = threading.Event(), []
    writer.on_events = lambda txn, events, now: order.append(events[0].event.message_id)
    writer.submit(lambda txn: gate.wait(5))  # holds the writer while the rest queues
    queued = [writer.ingest_blocking([plain("first")]), writer.submit(lambda txn: order.append("job")),
              writer.ingest_blocking([plain("second")])]
    gate.set()
    assert [f.result(5) is not None for f in queued] == [True, False, True]
    assert order == ["first", "job", "second"]
    writer.stop()
    with env.begin() as txn:
        assert txn.get(b"k", db=db) == b"v"  # the failed job was rolled back
    with pytest.raises(RuntimeError):
        writer.submit(lambda txn: None).result()


def test_a_storage_failure_is_storage_unavailable_and_the_writer_survives(tmp_path):
    env = open_env(tmp_path / "lmdb", 1 << 20, readonly=False)  # a 1 MiB map fills up quickly
    writer = Writer(env)
    writer.start()

    async def main():
        with pytest.raises(QualifyError) as info:
            await writer.ingest([plain(f"m{i}", properties={"blob": "x" * 1000}) for i in range(2000)])
        return info.value, await writer.ingest([plain("small")])

    err, after = asyncio.run(main())
    writer.stop()
    env.close()
    assert err.reason == "STORAGE_UNAVAILABLE" and after.accepted == 1


# ---------------------------------------------------------------- domain: validation and matching


MODELS = (
    EventModel("pricing", EventType.PAGE, "", (Predicate("path", Op.EQ, ("/pricing",)),), (("path", ValueType.STRING),)),
    EventModel("views", EventType.PAGE, "", (), (), Identifier.ANONYMOUS_ID),
    EventModel("orders", EventType.TRACK, "Order Completed", (Predicate("total", Op.GE, (10,)),),
               (("total", ValueType.FLOAT), ("customer", ValueType.INT)), Identifier.PROPERTY, "customer"),
)
NOW = 1_700_000_000 * US


def test_matching_resolves_people_by_each_models_identifier():
    page = Event("m", EventType.PAGE, user_id="u1", anonymous_id="a1", properties={"path": "/pricing"})
    assert validate(page, MODELS, NOW) is None
    assert matching_models(page, MODELS) == [(0, ("user", "u1")), (1, ("anonymous", "a1"))]
    anon = Event("m", EventType.PAGE, anonymous_id="a2", properties={"path": "/pricing"})
    assert matching_models(anon, MODELS) == [(0, ("anonymous", "a2")), (1, ("anonymous", "a2"))]
    known = Event("m", EventType.PAGE, user_id="u1", properties={"path": "/about"})
    assert matching_models(known, MODELS) == []  # filter fails; "views" needs an anonymous_id
    order = Event("m", EventType.TRACK, name="Order Completed", user_id="u9", properties={"total": 12.0, "customer": 42.0})
    assert validate(order, MODELS, NOW) is None and order.properties["customer"] == 42
    assert matching_models(order, MODELS) == [(2, ("user", "42"))]
    small = Event("m", EventType.TRACK, name="Order Completed", user_id="u9", properties={"total": 5.0, "customer": 1})
    assert matching_models(small, MODELS) == []
    other = Event("m", EventType.TRACK, name="Order Cancelled", user_id="u9", properties={"total": "free text"})
    assert validate(other, MODELS, NOW) is None and matching_models(other, MODELS) == []


def test_validation_order_and_timestamps():
    assert validate(Event("", 0), MODELS, NOW, encoded_size=40_000).reason is RejectionReason.TOO_LARGE
    assert validate(Event("", 0), MODELS, NOW).reason is RejectionReason.MISSING_MESSAGE_ID
    assert validate(Event("m", 0), MODELS, NOW).reason is RejectionReason.UNKNOWN_TYPE
    assert validate(Event("m", 99, user_id="u"), MODELS, NOW).reason is RejectionReason.UNKNOWN_TYPE
    assert validate(Event("m", 1), MODELS, NOW).reason is RejectionReason.MISSING_IDENTITY
    edge = Event("m", 1, user_id="u", timestamp_us=NOW + 300 * US)
    assert validate(edge, MODELS, NOW) is None  # exactly 5 minutes ahead is allowed
    ahead = Event("m", 1, user_id="u", timestamp_us=NOW + 300 * US + 1)
    assert validate(ahead, MODELS, NOW).reason is RejectionReason.FUTURE_TIMESTAMP
    old = Event("m", 1, user_id="u", timestamp_us=-5 * US)  # before 1970 is a valid time
    assert validate(old, MODELS, NOW) is None and old.timestamp_us == -5 * US
    none = Event("m", 1, user_id="u", received_us=NOW - 7)
    assert validate(none, MODELS, NOW) is None and none.timestamp_us == NOW - 7


# ---------------------------------------------------------------- the project file


def test_event_models_and_session_timeout_are_read(tmp_path, demo_warehouse):
    project = load_project(write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra=EVENT_MODELS))
    assert [m.name for m in project.event_models] == ["pricing_views", "orders", "tickets"]
    pricing = project.event_model("pricing_views")
    assert pricing == EventModel("pricing_views", EventType.PAGE, "", (Predicate("path", Op.EQ, ("/pricing",)),),
                                 (("path", ValueType.STRING),), Identifier.USER_ID, "")
    tickets = project.event_model("tickets")
    assert (tickets.identifier, tickets.identifier_property) == (Identifier.PROPERTY, "customer_id")
    assert project.session_timeout == 600.0
    default = load_project(write_project(tmp_path, duckdb_warehouse(demo_warehouse)))
    assert default.event_models == () and default.session_timeout == 1800.0


def test_event_model_problems_are_listed_with_key_value_and_reason(tmp_path, demo_warehouse):
    bad = """\
[event_models.clicks]
type = "click"
identifier = "property:who"
filters = [
  { property = "path", operator = "eq", value = "/x" },
  { property = "n", operator = "like", value = 1 },
  { property = "n", operator = "between", values = [1] },
  { property = "n", operator = "in", value = 1 },
  { property = "flag", operator = "gt", value = true },
  { property = "when", operator = "ge", value = "yesterday" },
  { property = "n", operator = "is_set", value = 3 },
]
[event_models.clicks.properties]
n = "int"
flag = "bool"
when = "timestamp"
money = "decimal"

[event_models.pages]
type = "page"
unknown = 1
[event_models.pages.properties]
path = "string"

[event_models.paths]
type = "page"
[event_models.paths.properties]
path = "int"

[event_models."bad name!"]
type = "page"

[realtime]
session_timeout = "soon"
"""
    with pytest.raises(ProjectError) as info:
        load_project(write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra=bad))
    got = [str(p) for p in info.value.problems]
    assert got == [
        "event_models.clicks.type = 'click': must be one of track, page, screen, identify, alias, group",
        "event_models.clicks.properties.money = 'decimal': must be one of string, int, float, bool, timestamp",
        "event_models.clicks.filters[0].property = 'path': is not a declared property of this model (declared: n, flag, when)",
        "event_models.clicks.filters[1].operator = 'like': must be one of eq, ne, lt, le, gt, ge, in, not_in, "
        "between, contains, starts_with, is_set, is_not_set",
        "event_models.clicks.filters[2].values = [1]: between needs exactly two values: the lower and upper bounds",
        "event_models.clicks.filters[3].value = 1: in takes a list: use values = [...]",
        "event_models.clicks.filters[4].operator = 'gt': does not apply to booleans; 'flag' is bool",
        "event_models.clicks.filters[5].value = 'yesterday': must be a date-time such as 2024-05-01T00:00:00Z "
        "(the property is timestamp)",
        "event_models.clicks.filters[6].value = 3: is_set takes no value",
        "event_models.clicks.identifier = 'property:who': the property 'who' must be declared under "
        "[event_models.clicks.properties] as string or int: it carries the person's user id",
        "event_models.pages.unknown: unknown key (known keys: type, event, filters, identifier, properties)",
        "event_models.bad name!: the model name must start with a letter and hold only letters, digits, _ and -",
        "event_models.paths.properties.path = 'int': event model 'pages' matches the same events and declares "
        "'path' as string",
        "realtime.session_timeout = 'soon': must be a duration such as '15m', '30s', '1h' or a number of seconds",
    ]
