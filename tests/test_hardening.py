"""What an outside probe broke (issue 12), each against the real server.

Health and reflection need no key, so their answers to garbage must be as
sane and as quiet as every other service's; streams must notice a revoked
key; shutdown must not wait out its grace for open streams.
"""

from __future__ import annotations

import queue
import signal
import threading
import time
import uuid

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import QualifyServer, eventually, write_realtime_project
from qualify.v1 import (audience_pb2, audience_pb2_grpc, condition_pb2, event_pb2, ingest_pb2, ingest_pb2_grpc,
                        membership_pb2)

# The standard services, with the kind of each method ("uu", "us", "ss").
STANDARD_METHODS = [
    ("/grpc.health.v1.Health/Check", "uu"),
    ("/grpc.health.v1.Health/List", "uu"),
    ("/grpc.health.v1.Health/Watch", "us"),
    ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ss"),
]
GARBAGE = [b"\xff\xff\xff", b"\x0a\x05ab", b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80"]


def call_raw(ch: grpc.Channel, method: str, kind: str, payload: bytes) -> grpc.StatusCode:
    identity = dict(request_serializer=None, response_deserializer=None)
    try:
        if kind == "uu":
            ch.unary_unary(method, **identity)(payload, timeout=5)
        elif kind == "us":
            next(iter(ch.unary_stream(method, **identity)(payload, timeout=5)))
        else:
            next(iter(ch.stream_stream(method, **identity)(iter([payload]), timeout=5)))
        return grpc.StatusCode.OK
    except grpc.RpcError as err:
        return err.code()


def test_health_and_reflection_answer_garbage_with_invalid_argument_quietly(demo_server):
    before = demo_server.log()
    with demo_server.channel() as ch:
        for _ in range(20):
            for method, kind in STANDARD_METHODS:
                for payload in GARBAGE:
                    assert call_raw(ch, method, kind, payload) == grpc.StatusCode.INVALID_ARGUMENT, (method, payload)
        # Still answering real requests.
        assert health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
    new = demo_server.log()[len(before):].splitlines()
    assert not [line for line in new if "Traceback" in line or "ERROR" in line], new[:5]
    # 240 bad requests: at most a rate-limited warning or two.
    assert len([line for line in new if "undecodable" in line]) <= 2, new


# -- shutdown with streams open -------------------------------------------------------------


def _page(user: str) -> event_pb2.Event:
    e = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, user_id=user)
    e.timestamp.GetCurrentTime()
    e.properties.update({"path": "/"})
    return e


def test_sigterm_with_streams_open_exits_at_once_and_clients_resume_with_nothing_lost(tmp_path, demo_warehouse):
    project = write_realtime_project(tmp_path, demo_warehouse)
    server = QualifyServer(tmp_path, "--project", str(project)).start()
    with grpc.insecure_channel(server.address) as ch:
        audience_pb2_grpc.AudienceServiceStub(ch).CreateAudience(audience_pb2.CreateAudienceRequest(
            audience=audience_pb2.Audience(id="viewers", condition=json_format.ParseDict(
                {"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE",
                           "threshold": 1}}, condition_pb2.Condition()))), timeout=30)
        watch = audience_pb2_grpc.AudienceServiceStub(ch).WatchMemberships(
            audience_pb2.WatchMembershipsRequest(start=audience_pb2.WATCH_START_SEQUENCE, after_sequence=0))
        seen: list = []
        watch_end: list = []

        def read_watch():
            try:
                for reply in watch:
                    seen.extend(reply.changes)
            except grpc.RpcError as err:
                watch_end.append(err.code())

        reader = threading.Thread(target=read_watch)
        reader.start()
        batches = [[_page(f"user-{b * 10 + i}") for i in range(10)] for b in range(6)]
        outgoing: queue.Queue = queue.Queue()
        stream = ingest_pb2_grpc.IngestServiceStub(ch).StreamEvents(iter(outgoing.get, None))
        acked: set[int] = set()
        for n in (1, 2):
            outgoing.put(ingest_pb2.StreamEventsRequest(batch_number=n, events=batches[n - 1]))
            acked.add(next(stream).batch_number)
        eventually(lambda: len(seen) >= 20, lambda: f"{len(seen)} changes watched")
        for n in (3, 4):  # in flight when the signal arrives
            outgoing.put(ingest_pb2.StreamEventsRequest(batch_number=n, events=batches[n - 1]))
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        stream_end = None
        try:
            for reply in stream:
                acked.add(reply.batch_number)
        except grpc.RpcError as err:
            stream_end = err.code()
        code = server.proc.wait(10)
        elapsed = time.monotonic() - t0
        reader.join(5)
        outgoing.put(None)
    assert code == 0, server.log()
    print(f"shutdown took {elapsed:.3f}s")
    assert elapsed < 1.0, f"shutdown took {elapsed:.2f}s\n{server.log()}"
    assert watch_end == [grpc.StatusCode.UNAVAILABLE], watch_end
    assert stream_end in (None, grpc.StatusCode.UNAVAILABLE), stream_end
    assert {1, 2} <= acked

    # The clients resume on the restarted server: unacknowledged batches resent, the watch from its last sequence.
    server = QualifyServer(tmp_path, "--project", str(project)).start()
    try:
        with grpc.insecure_channel(server.address) as ch:
            resend = [ingest_pb2.StreamEventsRequest(batch_number=n, events=batches[n - 1])
                      for n in range(1, 7) if n not in acked]
            replies = list(ingest_pb2_grpc.IngestServiceStub(ch).StreamEvents(iter(resend), timeout=30))
            assert [r.batch_number for r in replies] == [r.batch_number for r in resend]
            after = max((c.sequence for c in seen), default=0)
            watch = audience_pb2_grpc.AudienceServiceStub(ch).WatchMemberships(
                audience_pb2.WatchMembershipsRequest(start=audience_pb2.WATCH_START_SEQUENCE, after_sequence=after),
                timeout=3)
            try:
                for reply in watch:
                    seen.extend(reply.changes)
                    if len({c.person_key for c in seen}) == 60:
                        break
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            watch.cancel()
    finally:
        assert server.stop() == 0, server.log()
    entered = [c.person_key for c in seen if c.direction == membership_pb2.DIRECTION_ENTER]
    assert sorted(entered) == sorted(f"user-{i}" for i in range(60)), "a change was lost or repeated"
