"""Hostile input against a real server: a few thousand malformed and nasty requests.

Random bytes, truncated protobuf, invalid UTF-8, huge strings, oversized
messages, deep and wide condition trees, out-of-range numbers (timestamps
outside RFC 3339, nanos outside [0, 1e9), NaN and infinite properties,
Durations and Timestamps in conditions that JSON cannot write), odd metadata
and unknown methods, sent to every method of every service, health and
reflection included, with and without a valid API key. The server must
answer each with a status a client can act on (never INTERNAL or UNKNOWN:
those are bugs), within ``MAX_CALL_SECONDS`` (a hang is a bug too), keep
serving, log no error, and not grow its heap beyond ``HEAP_GROWTH_BOUND``.

The sequence is seeded (``FUZZ_SEED``, default 6) so a failure replays. The
suite sends ``FUZZ_REQUESTS`` (default 3,000; half of it with --workers 2);
``FUZZ_REQUESTS=10000`` is the long run issue 12 asks for.
"""

from __future__ import annotations

import math
import os
import random
import time
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import QualifyServer, make_key, write_project
from qualify.v1 import (audience_pb2, condition_pb2, diagnostics_pb2, event_pb2, ingest_pb2, personalize_pb2,
                        personalize_pb2_grpc, sync_pb2)

MAX_CALL_SECONDS = 5.0

SEED = int(os.environ.get("FUZZ_SEED", "6"))
REQUESTS = int(os.environ.get("FUZZ_REQUESTS", "3000"))
# Anonymous memory (RssAnon: the heap, not the LMDB map's file pages) may grow
# this much between a warm-up round and the end. Measured with seed 6: +11 MiB
# over 2,700 requests, +15 MiB over 8,700 (before issue 12's inputs). With
# them (health, reflection, out-of-range times; hardening branch): one
# process +24 MiB over 2,700 and +31 MiB over 9,700, --workers 2 (four
# processes summed) +31-33 MiB over 1,200; the old inputs alone now measure
# +22/+23 MiB. It levels off (allocator arenas after the 5 MiB messages, the
# engine's state for the people whose events were accepted); a leak per
# request would grow with the count, which the 9,700-request run rules out.
HEAP_GROWTH_BOUND = 48 << 20

EXPECTED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
            grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.CANCELLED}

EVENT_MODELS = """
[event_models.page_views]
type = "page"
[event_models.page_views.properties]
path = "string"
[event_models.orders]
type = "track"
event = "Order Completed"
identifier = "property:customer"
[event_models.orders.properties]
total = "float"
items = "int"
placed_at = "timestamp"
customer = "string"
"""

# Every method of every service: (path, "uu" | "us" | "su" | "ss" for unary or streaming request and reply).
METHODS = [(f"/{service.full_name}/{m.name}", ("s" if m.client_streaming else "u") + ("s" if m.server_streaming else "u"))
           for module in (personalize_pb2, diagnostics_pb2, ingest_pb2, audience_pb2, sync_pb2)
           for service in module.DESCRIPTOR.services_by_name.values() for m in service.methods]
METHODS += [("/grpc.health.v1.Health/Check", "uu"), ("/grpc.health.v1.Health/List", "uu"),
            ("/grpc.health.v1.Health/Watch", "us"),
            ("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", "ss")]
# A watch stays open until cancelled: it gets a short deadline, and running into it is an answer.
WATCH_SECONDS = 0.1


def heap_bytes(pid: int) -> int:
    """RssAnon of the server and its child processes (the writer and serving processes of --workers)."""
    total = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            total += int(line.split()[1]) * 1024
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(heap_bytes(int(c)) for c in children)


class Hostile:
    """Generators of bad requests; each returns (method path, kind, payloads as raw bytes)."""

    def __init__(self, rng: random.Random):
        self.rng = rng

    def text(self, n: int | None = None) -> str:
        r = self.rng
        n = r.choice([0, 1, 8, 64, 600, 5000]) if n is None else n
        alphabet = r.choice(["abc-_0123", "user-\u00e9\u4e2d\U0001f600", "\x00\x01\n\t'\"\\{}[]%s%n$(",
                             "".join(chr(c) for c in range(32, 127))])
        return "".join(r.choices(alphabet, k=n))

    def number(self) -> float:
        return self.rng.choice([0.0, -1.0, 1e308, -1e308, 2.0**63, 2.0**64, 1e-320, math.inf, -math.inf, math.nan,
                                self.rng.uniform(-1e6, 1e6)])

    def value(self, depth: int = 0):
        r = self.rng
        kind = r.randrange(6 if depth < 4 else 4)
        return [lambda: self.text(), self.number, lambda: r.random() < 0.5, lambda: None,
                lambda: {self.text(8): self.value(depth + 1) for _ in range(r.randrange(4))},
                lambda: [self.value(depth + 1) for _ in range(r.randrange(4))]][kind]()

    def event(self) -> event_pb2.Event:
        r = self.rng
        e = event_pb2.Event(message_id=r.choice([str(uuid.uuid4()), "", self.text()]),
                            type=r.choice([0, 1, 2, 3, 4, 5, 6, 99, -1]),
                            name=r.choice(["Order Completed", "", self.text()]),
                            user_id=r.choice([f"user-{r.randrange(3000)}", "", self.text()]),
                            anonymous_id=r.choice(["", "anon-1", self.text()]),
                            session_id=r.choice(["", self.text()]), previous_id=r.choice(["", self.text()]))
        if r.random() < 0.8:
            e.timestamp.seconds = r.choice([int(time.time()), 0, -62135596800, 253402300799, int(time.time()) + 10**6,
                                            -9_300_000_000_000, -62135596800 - 2 * 366 * 86400, -2**63, 2**63 - 1])
            e.timestamp.nanos = r.choice([0, 999_999_999, 0, -1, 1_000_000_000, 2_000_000_000, -2**31])
        for field in ("properties", "traits", "context"):
            if r.random() < 0.5:
                try:
                    getattr(e, field).update({r.choice(["path", "total", "items", "placed_at", "customer",
                                                        self.text(8)]): self.value() for _ in range(r.randrange(6))})
                except (ValueError, TypeError):
                    pass  # e.g. NaN keys the client library refuses: not a server test
        return e

    def condition(self, depth: int) -> dict:
        r = self.rng
        if depth <= 0:
            if r.random() < 0.5:
                return {"attribute": {"attribute": r.choice(["plan", "ltv", "nope", self.text(5)]),
                                      "operator": r.randrange(0, 20),
                                      "value": r.choice([{"string_value": self.text(8)}, {"float_value": 1.5},
                                                         {"int_value": "9223372036854775807"}])}}
            return {"event": {"event_model": r.choice(["page_views", "orders", "nope"]), "scope": r.randrange(0, 5),
                              "window": r.choice(["0s", "600s", "315576000000s"]), "comparison": r.randrange(0, 9),
                              "threshold": r.choice([0, 1, -5, 2**62])}}
        kind = r.choice(["and", "or", "not"])
        if kind == "not":
            return {"not": {"condition": self.condition(depth - 1)}}
        branches = r.choice([1, 2]) if depth <= 5 else 1  # deep trees are chains, not 2**depth leaves
        return {kind: {"conditions": [self.condition(depth - 1) for _ in range(branches)]}}

    def audience_request(self) -> tuple[str, bytes]:
        r = self.rng
        audience = audience_pb2.Audience(id=r.choice(["fz", "FZ!", "", self.text(70), f"fz{r.randrange(50)}"]),
                                         display_name=self.text(), description=self.text())
        depth = r.choice([0, 1, 3, 10, 31, 33, 45])  # deeper: see deep_not (protobuf stops at 100 levels)
        try:
            json_format.ParseDict(self.condition(depth), audience.condition)
        except (json_format.ParseError, RecursionError):
            pass
        if r.random() < 0.3:  # wide: many leaves under one and
            json_format.ParseDict({"and": {"conditions": [self.condition(0) for _ in range(r.choice([10, 1200]))]}},
                                  audience.condition)
        if r.random() < 0.15:
            self.bad_time(audience.condition)
        method = r.choice(["CreateAudience", "UpdateAudience", "PreviewAudience"])
        if method == "CreateAudience":
            msg = audience_pb2.CreateAudienceRequest(audience=audience)
        elif method == "UpdateAudience":
            msg = audience_pb2.UpdateAudienceRequest(audience=audience)
            msg.update_mask.paths.extend(r.sample(["condition", "display_name", "nope", ""], r.randrange(3)))
        else:
            msg = audience_pb2.PreviewAudienceRequest(condition=audience.condition,
                                                      sample_size=r.choice([0, 5, 100, 101, -1, 2**31 - 1]))
        return f"/qualify.v1.AudienceService/{method}", msg.SerializeToString()

    def bad_time(self, c: condition_pb2.Condition) -> None:
        """A Duration or Timestamp the JSON mapping cannot write, in a window or a literal, maybe nested."""
        r = self.rng
        leaf = condition_pb2.Condition()
        if r.random() < 0.5:
            json_format.ParseDict({"event": {"event_model": "page_views", "scope": "SCOPE_WITHIN", "window": "60s",
                                             "comparison": "COMPARISON_GE", "threshold": 1}}, leaf)
            leaf.event.window.seconds, leaf.event.window.nanos = r.choice(
                [(2**63 - 1, 0), (60, 2_000_000_000), (60, -1), (-2**63, 0), (315576000001, 0)])
        else:
            json_format.ParseDict({"attribute": {"attribute": "signup_date", "operator": "OPERATOR_GT",
                                                 "value": {"timestamp_value": "2020-01-01T00:00:00Z"}}}, leaf)
            ts = leaf.attribute.value.timestamp_value
            ts.seconds, ts.nanos = r.choice([(2**62, 0), (-2**62, 0), (0, -1), (0, 1_000_000_000)])
        if r.random() < 0.5:
            c.CopyFrom(leaf)
        else:
            getattr(c, "and").conditions.extend([condition_pb2.Condition(), leaf])

    @staticmethod
    def deep_not(levels: int) -> bytes:
        """A Condition nested `levels` deep as raw bytes (past protobuf's own recursion limit if asked)."""
        raw = condition_pb2.Condition(attribute=condition_pb2.AttributeCondition(attribute="plan")).SerializeToString()
        for _ in range(levels):
            inner = raw  # Not { condition = raw } inside Condition.not (field 3)
            raw = b"\x0a" + _varint(len(inner)) + inner
            raw = b"\x1a" + _varint(len(raw)) + raw
        return raw

    def request(self) -> tuple[str, str, list[bytes]]:
        r = self.rng
        method, kind = r.choice(METHODS)
        roll = r.random()
        if roll < 0.2:  # random bytes
            payloads = [r.randbytes(r.choice([0, 1, 7, 100, 4000])) for _ in range(r.randrange(1, 4))]
        elif roll < 0.35:  # a valid message, truncated
            good = self.valid(method)
            payloads = [good[:r.randrange(0, max(1, len(good)))]]
        elif roll < 0.45:  # invalid UTF-8 in a string field (field 1, 2 or 3)
            payloads = [bytes([(r.randrange(1, 4) << 3) | 2, 3]) + r.choice([b"\xff\xfe\xfd", b"\xc3\x28a", b"\xed\xa0\x80"])]
        elif roll < 0.46:  # over the message size limit (4 MiB by default)
            payloads = [b"\x0a" + _varint(5 << 20) + b"k" * (5 << 20)]
        elif roll < 0.6:  # a deep condition, as the audience in CreateAudience
            method, kind = "/qualify.v1.AudienceService/CreateAudience", "uu"
            cond = self.deep_not(r.choice([20, 40, 99, 150, 400]))
            audience = b"\x0a\x02fz" + b"\x22" + _varint(len(cond)) + cond
            payloads = [b"\x0a" + _varint(len(audience)) + audience]
        elif roll < 0.7:
            method, kind = "/qualify.v1.AudienceService/" + r.choice(["CreateAudience", "UpdateAudience",
                                                                      "PreviewAudience"]), "uu"
            payloads = [self.audience_request()[1]]
        elif roll < 0.95:  # well-formed messages with hostile values
            payloads = [self.valid(method) for _ in range(r.randrange(1, 3))]
        else:  # an unknown method
            method, kind = r.choice(["/qualify.v1.PersonalizeService/Delete", "/qualify.v2.X/Y", "/", "//"]), "uu"
            payloads = [b""]
        return method, kind, payloads

    def valid(self, method: str) -> bytes:
        r = self.rng
        name = method.rsplit("/", 1)[1]
        if name == "Get":
            m = personalize_pb2.GetRequest(collection=r.choice(["customers", "", self.text()]),
                                           key=r.choice(["user-1", "", self.text(), "x" * 512]))
            if r.random() < 0.3:
                m.read_mask.paths.extend(self.text(5) for _ in range(r.randrange(4)))
            return m.SerializeToString()
        if name == "BatchGet":
            return personalize_pb2.BatchGetRequest(
                collection="customers", keys=[self.text(r.choice([0, 5, 600])) for _ in range(r.choice([0, 3, 1001]))]
            ).SerializeToString()
        if name == "Track":
            return ingest_pb2.TrackRequest(event=self.event()).SerializeToString()
        if name == "TrackBatch":
            n = r.choice([0, 1, 20, 1001])
            events = [self.event() for _ in range(min(n, 20))]
            return ingest_pb2.TrackBatchRequest(events=(events * 51)[:n]).SerializeToString()
        if name == "StreamEvents":
            return ingest_pb2.StreamEventsRequest(batch_number=r.choice([0, 1, 2**63 - 1]),
                                                  events=[self.event() for _ in range(r.randrange(5))]
                                                  ).SerializeToString()
        if name in ("CreateAudience", "UpdateAudience", "PreviewAudience"):
            return self.audience_request()[1]
        if name in ("ListAudiences", "ListMembers"):
            return audience_pb2.ListMembersRequest(id=r.choice(["fz", self.text()]), page_size=r.choice([-1, 0, 10**9]),
                                                   page_token=self.text()).SerializeToString()
        if name in ("GetAudience", "DeleteAudience", "ExplainMembership", "CheckMembership"):
            return audience_pb2.ExplainMembershipRequest(id=r.choice(["fz", self.text()]),
                                                         person_key=r.choice(["user-1", "", self.text()])
                                                         ).SerializeToString()
        if name in ("Check", "Watch"):
            return health_pb2.HealthCheckRequest(service=r.choice(["", "qualify.v1.IngestService", self.text()])
                                                 ).SerializeToString()
        if name == "Noop":
            return diagnostics_pb2.NoopRequest(payload=r.randbytes(r.choice([0, 10, 100_000]))).SerializeToString()
        return r.randbytes(r.randrange(0, 50))


def header_text(text: str) -> str:
    return "".join(c for c in text if " " <= c <= "~")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def send(ch: grpc.Channel, method: str, kind: str, payloads: list[bytes], metadata) -> tuple[grpc.StatusCode, str]:
    identity = dict(request_serializer=None, response_deserializer=None)
    if kind == "su":
        kind = "ss"  # no client-streaming-only method; a reflection stream is "ss" too
    try:
        if kind == "uu":
            ch.unary_unary(method, **identity)(payloads[0], metadata=metadata, timeout=20)
        elif kind == "us":
            list(ch.unary_stream(method, **identity)(payloads[0], metadata=metadata, timeout=WATCH_SECONDS))
        else:
            list(ch.stream_stream(method, **identity)(iter(payloads), metadata=metadata, timeout=20))
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details()


@pytest.fixture(params=[1, 2], ids=["one-process", "workers"])
def target(request, tmp_path_factory, demo_warehouse):
    """One process, or --workers 2 (hostile bytes then also cross the proxy to the writer)."""
    folder = tmp_path_factory.mktemp("fuzz")
    project = write_project(folder, f'type = "duckdb"\npath = "{demo_warehouse}"', extra=EVENT_MODELS, auth=True)
    server = QualifyServer(folder, "--project", str(project), "--workers", str(request.param)).start()
    server.requests = REQUESTS if request.param == 1 else REQUESTS // 2
    server.keys = {s: make_key(folder / "data", s) for s in ("admin", "personalize", "ingest")}
    time.sleep(0.5)
    yield server
    assert server.stop() == 0, server.log()


def test_hostile_requests_get_sane_statuses_and_the_server_keeps_serving(target):
    rng = random.Random(SEED)
    hostile = Hostile(rng)
    keys = list(target.keys.values())
    admin = (("authorization", f"Bearer {target.keys['admin']}"),)
    metadata_choices = [  # half the requests reach the handlers with an admin key
        lambda: admin, lambda: admin, lambda: admin, lambda: admin, lambda: admin, lambda: admin,
        lambda: (("authorization", f"Bearer {rng.choice(keys)}"),),
        lambda: (),
        # Header values a client can send at all (gRPC refuses anything outside printable ASCII before sending).
        lambda: (("authorization", "Bearer " + header_text(hostile.text(rng.choice([1, 60, 4000])))),),
        lambda: (("authorization", f"Bearer {target.keys['admin']}"),
                 ("x-request-id", rng.choice(["", "a" * 65, "ok-id", "../../etc", header_text(hostile.text(200))]))),
        lambda: (("authorization", f"Bearer {target.keys['admin']}"), ("authorization", "Bearer nope")),
        lambda: (("authorization-bin", rng.randbytes(20)), ("x-request-id-bin", rng.randbytes(8))),
    ]
    unexpected: list[tuple] = []
    slow: list[tuple] = []
    seen: dict[grpc.StatusCode, int] = {}
    with grpc.insecure_channel(target.address, options=[("grpc.max_send_message_length", 8 << 20)]) as ch:
        def one():
            method, kind, payloads = hostile.request()
            metadata = rng.choice(metadata_choices)()
            t0 = time.monotonic()
            try:
                code, details = send(ch, method, kind, payloads, metadata)
            except ValueError:  # metadata the client library itself refuses to send
                return
            took = time.monotonic() - t0
            if took > MAX_CALL_SECONDS:
                slow.append((round(took, 2), method, code))
            seen[code] = seen.get(code, 0) + 1
            if code not in EXPECTED and not (code == grpc.StatusCode.DEADLINE_EXCEEDED and kind == "us"):
                unexpected.append((code, details, method, [p[:80] for p in payloads], metadata))

        for _ in range(300):
            one()
        heap_before = heap_bytes(target.proc.pid)
        started = time.monotonic()
        for _ in range(target.requests - 300):
            one()
        elapsed = time.monotonic() - started
        heap_after = heap_bytes(target.proc.pid)

        assert not unexpected, f"{len(unexpected)} unexpected statuses, e.g. {unexpected[:5]}"
        assert not slow, f"{len(slow)} calls over {MAX_CALL_SECONDS}s, e.g. {slow[:5]}"
        # Enough got through to the handlers to mean something (not all refused at the gate).
        n = target.requests
        assert seen.get(grpc.StatusCode.OK, 0) > n // 30 and seen.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > n // 10, seen
        assert heap_after - heap_before < HEAP_GROWTH_BOUND, (heap_before, heap_after)
        # Still serving, and still right.
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        record = personalize_pb2_grpc.PersonalizeServiceStub(ch).Get(
            personalize_pb2.GetRequest(collection="customers", key="user-42"),
            metadata=(("authorization", f"Bearer {target.keys['personalize']}"),), timeout=5).record
        assert record.key == "user-42"
    assert target.proc.poll() is None
    errors = [line for line in target.log().splitlines() if '"level": "ERROR"' in line or "Traceback" in line]
    assert not errors, errors[:5]
    print(f"{target.requests} hostile requests in {elapsed:.1f}s; statuses {dict((c.name, n) for c, n in seen.items())}; "
          f"heap {heap_before >> 20} -> {heap_after >> 20} MiB")
