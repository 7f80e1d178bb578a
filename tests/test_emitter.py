"""qualify.clients.EventEmitter against a real server: batching, rejections, and a crash mid-stream.

The crash test SIGKILLs ``qualify serve`` while events stream, restarts it on
the same port and data directory, and checks that every emitted event is in
the event log exactly once: unacknowledged batches were resent and the
server's message_id deduplication dropped what had already been committed.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter

import pytest

from conftest import QualifyServer, free_port, make_key, write_project
from qualify.clients import EventEmitter
from qualify.clients.emitter import make_event
from qualify.v1 import event_pb2
from test_ingest import EVENT_MODELS, duckdb_warehouse, logged_events, server_info


@pytest.fixture(scope="module")
def emitter_server(tmp_path_factory, demo_warehouse):
    folder = tmp_path_factory.mktemp("emitter")
    project = write_project(folder, duckdb_warehouse(demo_warehouse), extra=EVENT_MODELS)
    server = QualifyServer(folder, "--project", str(project)).start()
    yield server, folder
    assert server.stop() == 0, server.log()


def test_emitted_events_arrive_in_batches_and_rejections_reach_the_callback(emitter_server):
    server, folder = emitter_server
    before = server_info(server.address).events_logged
    rejected = []
    with EventEmitter(server.address, batch_size=100, max_delay=0.01,
                      on_rejection=lambda e, reason, text: rejected.append((e.message_id, reason))) as emitter:
        ids = []
        for i in range(1000):
            ids.append(emitter.track("Order Completed", user_id=f"user-{i % 50}", properties={"total": i, "items": 2}))
        ids.append(emitter.page("Pricing", anonymous_id="anon-1", properties={"path": "/pricing"}))
        ids.append(emitter.identify("user-1", anonymous_id="anon-1", traits={"plan": "free"}))
        ids.append(emitter.alias("user-1", "anon-1"))
        bad = make_event(event_pb2.EVENT_TYPE_TRACK, "Order Completed", user_id="u", properties={"total": "lots"})
        emitter.emit(bad)
        assert emitter.flush(timeout=30)
        assert (emitter.accepted, emitter.duplicates, emitter.rejected) == (1003, 0, 1)
        assert emitter.sent == 1004 and emitter.pending == 0
        duplicate = make_event(event_pb2.EVENT_TYPE_TRACK, "Again", user_id="u", message_id=ids[0])
        emitter.emit(duplicate)
    assert emitter.duplicates == 1 and emitter.acknowledged == 1004
    assert rejected == [(bad.message_id, "REJECTION_REASON_PROPERTY_TYPE")]
    assert server_info(server.address).events_logged == before + 1003
    counts = Counter(e.message_id for e in logged_events(folder))
    assert all(counts[m] == 1 for m in ids)


def poison(message_id: str | None = None) -> event_pb2.Event:
    """An event the server cannot store (today it fails its whole batch with INTERNAL)."""
    event = make_event(event_pb2.EVENT_TYPE_TRACK, "Button Clicked", user_id="user-1", message_id=message_id)
    event.timestamp.seconds = -9_300_000_000_000  # about year -292,000: outside RFC 3339
    return event


def test_a_poison_event_is_isolated_its_neighbours_are_acknowledged_and_close_is_bounded(emitter_server):
    server, folder = emitter_server
    rejected = []
    emitter = EventEmitter(server.address, batch_size=10, max_delay=0.01, close_timeout=5,
                           on_rejection=lambda e, reason, text: rejected.append((e.message_id, reason)))
    good = []
    for i in range(30):
        if i == 13:
            bad = poison()
            emitter.emit(bad)
        else:
            good.append(emitter.track("Button Clicked", user_id=f"user-{i}", properties={"i": i}))
    started = time.monotonic()
    assert emitter.close() is True
    assert time.monotonic() - started < 5
    assert emitter.acknowledged == 29 and emitter.rejected == 1 and emitter.unacknowledged == 0
    assert [m for m, _ in rejected] == [bad.message_id]  # reason: INTERNAL_ERROR today, a rejection reason later
    logged = Counter(e.message_id for e in logged_events(folder))
    assert all(logged[m] == 1 for m in good) and bad.message_id not in logged


def test_large_events_fit_the_servers_message_limit_with_default_settings(emitter_server):
    server, _ = emitter_server
    before = server_info(server.address).events_logged
    blob = "x" * 8000
    with EventEmitter(server.address, close_timeout=30) as emitter:  # batch_size 500: 12 MB uncapped
        for i in range(1000):
            emitter.track("Button Clicked", user_id=f"user-{i % 50}", properties={"a": blob, "b": blob, "c": blob, "i": i})
    assert emitter.acknowledged == 1000 and emitter.rejected == 0 and emitter.unacknowledged == 0
    assert emitter.max_batch_bytes < 4 << 20 and emitter.resent == 0  # no batch was refused
    assert server_info(server.address).events_logged == before + 1000


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory, demo_warehouse):
    """Auth on and a 64 KiB max_message_bytes: keys without the ingest scope and oversized events fail for good."""
    folder = tmp_path_factory.mktemp("emitter-strict")
    project = write_project(folder, duckdb_warehouse(demo_warehouse), auth=True,
                            extra=EVENT_MODELS + "\n[limits]\nmax_message_bytes = 65536\n")
    keys = {scope: make_key(folder / "data", scope) for scope in ("personalize", "ingest")}  # live at start
    server = QualifyServer(folder, "--project", str(project)).start()
    yield server, keys
    assert server.stop() == 0, server.log()


def test_a_key_without_the_ingest_scope_gives_up_reports_every_event_and_closes(strict_server):
    server, keys = strict_server
    key = keys["personalize"]
    rejected = []
    emitter = EventEmitter(server.address, api_key=key, batch_size=10, max_delay=0.01, close_timeout=5,
                           on_rejection=lambda e, reason, text: rejected.append((e.message_id, reason)))
    ids = [emitter.track("Button Clicked", user_id=f"user-{i}") for i in range(25)]
    started = time.monotonic()
    assert emitter.close() is True
    assert time.monotonic() - started < 5
    assert emitter.acknowledged == 0 and emitter.failed == emitter.rejected == 25
    assert sorted(rejected) == sorted((m, "PERMISSION_DENIED") for m in ids)


def test_an_unknown_smaller_message_limit_is_learned_and_an_oversized_event_is_dropped(strict_server):
    server, keys = strict_server
    key = keys["ingest"]  # no admin scope: GetServerInfo is refused, the default cap stays
    rejected = []
    blob = "y" * 8000
    # gRPC takes 0.1-0.6 s to refuse each oversized message: a roomy bound.
    emitter = EventEmitter(server.address, api_key=key, close_timeout=15,
                           on_rejection=lambda e, reason, text: rejected.append((e.message_id, reason)))
    assert emitter.flush(timeout=5)
    ids = [emitter.track("Button Clicked", user_id=f"user-{i}", properties={"a": blob}) for i in range(40)]
    huge = make_event(event_pb2.EVENT_TYPE_TRACK, "Button Clicked", user_id="user-1",
                      properties={f"p{i}": blob for i in range(10)})  # 80 KB: over the 64 KiB message limit
    emitter.emit(huge)
    ids += [emitter.track("Button Clicked", user_id=f"user-{i}", properties={"a": blob}) for i in range(40)]
    started = time.monotonic()
    assert emitter.close() is True
    assert time.monotonic() - started < 15
    assert emitter.acknowledged == 80 and rejected == [(huge.message_id, "RESOURCE_EXHAUSTED")]
    assert emitter.max_batch_bytes <= 65536


def test_a_full_queue_blocks_or_raises():
    # Nothing listens on this port: nothing is ever acknowledged.
    emitter = EventEmitter(f"127.0.0.1:{free_port()}", batch_size=10, max_queue=20)
    try:
        for i in range(20):
            emitter.track("x", user_id="u")
        with pytest.raises(queue.Full):
            emitter.track("x", user_id="u", block=False)
        started = time.monotonic()
        with pytest.raises(queue.Full):
            emitter.track("x", user_id="u", timeout=0.2)
        assert time.monotonic() - started >= 0.2
        assert emitter.pending == 20 and not emitter.flush(timeout=0.2)
    finally:
        assert emitter.close(timeout=0.2) is False
    assert emitter.accepted == 0
    with pytest.raises(RuntimeError):
        emitter.track("x", user_id="u")


def test_every_event_is_logged_exactly_once_across_a_server_crash(tmp_path, demo_warehouse):
    port = free_port()
    project = write_project(tmp_path, duckdb_warehouse(demo_warehouse), extra=EVENT_MODELS)
    server = QualifyServer(tmp_path, "--project", str(project), "--port", str(port)).start()
    address = f"127.0.0.1:{port}"
    total = 30_000
    emitter = EventEmitter(address, batch_size=250, max_delay=0.005)
    ids: list[str] = []
    produced = threading.Event()

    def produce():
        for i in range(total):
            ids.append(emitter.track("Button Clicked", user_id=f"user-{i % 500}", properties={"i": i}))
            if i % 500 == 0:
                time.sleep(0.001)  # a steady stream, not one burst
        produced.set()

    producer = threading.Thread(target=produce)
    producer.start()
    deadline = time.monotonic() + 30
    while emitter.acknowledged < total // 4 and time.monotonic() < deadline:
        time.sleep(0.002)
    server.kill()  # SIGKILL mid-stream: batches are in flight
    at_crash = emitter.acknowledged
    assert 0 < at_crash < total
    time.sleep(0.3)  # the emitter backs off while nobody listens
    restarted = QualifyServer(tmp_path, "--project", str(project), "--port", str(port)).start()
    try:
        producer.join(60)
        assert produced.is_set()
        assert emitter.flush(timeout=60), f"{emitter.pending} events never acknowledged"
        assert emitter.reconnects >= 1
        assert emitter.acknowledged == total and emitter.rejected == 0
        assert emitter.accepted + emitter.duplicates == total
        assert server_info(restarted.address).events_logged == total
    finally:
        emitter.close(timeout=5)
        assert restarted.stop() == 0, restarted.log()
    counts = Counter(e.message_id for e in logged_events(tmp_path))
    assert len(counts) == total and set(counts.values()) == {1}
    assert set(counts) == set(ids)
