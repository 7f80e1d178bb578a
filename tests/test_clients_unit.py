"""qualify.clients against a real, tiny in-test gRPC server.

Each behaviour is written once and run against both clients (uvloop-style):
the `client` fixture is parametrized over Client and AsyncClient. The server
picks its behaviour from the requested key, and counts the calls per key so
the tests can see how many attempts the client made.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from qualify.clients import (
    AsyncClient,
    BatchResult,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    Membership,
    NotFoundError,
    QualifyError,
    Record,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from qualify.clients._call import Backoff
from qualify.clients._errors import error_from_rpc_error
from qualify.v1 import (
    diagnostics_pb2,
    diagnostics_pb2_grpc,
    membership_pb2,
    personalize_pb2,
    personalize_pb2_grpc,
)

ENTER_TIME = datetime(2024, 5, 1, 12, 30, 15, 250000, tzinfo=timezone.utc)
FIELDS = {
    "email": "ada@example.com",
    "age": 36,  # stored as the double 36.0: a Struct has only doubles
    "ltv": 1234.5,
    "vip": True,
    "nickname": None,
    "tags": ["a", 2, False],
    "address": {"city": "London", "zip": None},
}


# --- the server ------------------------------------------------------------------


def _abort(
    context: grpc.ServicerContext,
    code: int,
    message: str,
    reason: str,
    violations: tuple[tuple[str, str], ...] = (),
) -> None:
    status = status_pb2.Status(code=code, message=message)
    info = error_details_pb2.ErrorInfo(reason=reason, domain="qualify.dev", metadata={"collection": "customers"})
    status.details.add().Pack(info)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=f, description=d) for f, d in violations
            ]
        )
        status.details.add().Pack(bad)
    context.abort_with_status(rpc_status.to_status(status))


def _record(collection: str, key: str, fields: dict[str, Any] | None = None) -> personalize_pb2.Record:
    struct = struct_pb2.Struct()
    struct.update(FIELDS if fields is None else fields)
    enter = timestamp_pb2.Timestamp()
    enter.FromDatetime(ENTER_TIME)
    return personalize_pb2.Record(
        collection=collection,
        key=key,
        fields=struct,
        memberships=[
            membership_pb2.AudienceMembership(audience_id="vips", enter_time=enter),
            membership_pb2.AudienceMembership(audience_id="no-time"),
        ],
    )


class Personalize(personalize_pb2_grpc.PersonalizeServiceServicer):
    """Behaviour by key prefix: see `_lookup`."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self._lock = threading.Lock()

    def Get(self, request: personalize_pb2.GetRequest, context: grpc.ServicerContext) -> personalize_pb2.GetResponse:
        with self._lock:
            self.calls[request.key] += 1
            calls = self.calls[request.key]
        return personalize_pb2.GetResponse(record=self._lookup(request, calls, context))

    def BatchGet(
        self, request: personalize_pb2.BatchGetRequest, context: grpc.ServicerContext
    ) -> personalize_pb2.BatchGetResponse:
        if len(request.keys) > 3:
            _abort(
                context, code_pb2.INVALID_ARGUMENT, "too many keys", "BATCH_TOO_LARGE", (("keys", "at most 3 keys"),)
            )
        found = [k for k in request.keys if k.startswith("user")]
        return personalize_pb2.BatchGetResponse(
            records=[_record(request.collection, k) for k in found],
            missing_keys=[k for k in request.keys if k not in found],
        )

    def _lookup(
        self, request: personalize_pb2.GetRequest, calls: int, context: grpc.ServicerContext
    ) -> personalize_pb2.Record:
        kind, _, arg = request.key.partition(":")
        if kind == "missing":
            _abort(context, code_pb2.NOT_FOUND, f"no record under key {request.key!r}", "KEY_NOT_FOUND")
        if kind == "bad":
            _abort(
                context,
                code_pb2.INVALID_ARGUMENT,
                "the request is invalid",
                "INVALID_REQUEST",
                (("collection", "must not be empty"), ("read_mask.paths[0]", "unknown field")),
            )
        if kind == "unimplemented":
            _abort(context, code_pb2.UNIMPLEMENTED, "not yet", "NOT_IMPLEMENTED")
        if kind == "internal":  # a plain abort: no google.rpc.Status details
            context.abort(grpc.StatusCode.INTERNAL, "boom")
        if kind == "flaky" and calls <= int(arg.split(":")[0]):  # "flaky:N:tag" fails N times
            _abort(context, code_pb2.UNAVAILABLE, "warming up", "NOT_READY")
        if kind == "busy":
            _abort(context, code_pb2.RESOURCE_EXHAUSTED, "overloaded", "RESOURCE_EXHAUSTED")
        if kind == "slow":
            time.sleep(0.5)
        if kind == "slowflaky" and calls <= 2:  # each failing attempt takes 0.3 s
            time.sleep(0.3)
            _abort(context, code_pb2.UNAVAILABLE, "warming up", "NOT_READY")
        if kind == "echo":
            metadata = dict(context.invocation_metadata())
            return _record(
                request.collection,
                request.key,
                {
                    "has_mask": request.HasField("read_mask"),
                    "paths": list(request.read_mask.paths),
                    "tenant": metadata.get("x-tenant"),
                },
            )
        return _record(request.collection, request.key)


class Diagnostics(diagnostics_pb2_grpc.DiagnosticsServiceServicer):
    def Noop(self, request: diagnostics_pb2.NoopRequest, context: grpc.ServicerContext) -> diagnostics_pb2.NoopResponse:
        return diagnostics_pb2.NoopResponse()

    def GetServerInfo(
        self, request: diagnostics_pb2.GetServerInfoRequest, context: grpc.ServicerContext
    ) -> diagnostics_pb2.GetServerInfoResponse:
        return diagnostics_pb2.GetServerInfoResponse(
            version="0.1.0", sync_generation=2**60, collections=["customers", "orders"], people=3, worker_pid=77,
            events_logged=2**40, events_unmatched=5, max_message_bytes=4 << 20,
        )


@dataclass
class Server:
    address: str
    personalize: Personalize


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    personalize = Personalize()
    grpc_server = grpc.server(ThreadPoolExecutor(max_workers=8))
    personalize_pb2_grpc.add_PersonalizeServiceServicer_to_server(personalize, grpc_server)
    diagnostics_pb2_grpc.add_DiagnosticsServiceServicer_to_server(Diagnostics(), grpc_server)
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    yield Server(f"127.0.0.1:{port}", personalize)
    grpc_server.stop(None)


# --- one harness, two clients ----------------------------------------------------


@dataclass
class Harness:
    """Runs one client method on a fresh client: `run(options, "get", key)`."""

    kind: str
    address: str
    run_on: Callable[[str, dict[str, Any], str, tuple[Any, ...], dict[str, Any]], Any]

    def run(self, options: dict[str, Any], method: str, *args: Any, **kwargs: Any) -> Any:
        return self.run_on(self.address, options, method, args, kwargs)

    def key(self, name: str) -> str:
        """A key unique to this client kind, so call counts do not mix."""
        return f"{name}:{self.kind}"


def _run_blocking(address: str, options: dict[str, Any], method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    with Client(address, **options) as client:
        return getattr(client, method)(*args, **kwargs)


def _run_aio(address: str, options: dict[str, Any], method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    async def main() -> Any:
        async with AsyncClient(address, **options) as client:
            return await getattr(client, method)(*args, **kwargs)

    return asyncio.run(main())


@pytest.fixture(params=["blocking", "aio"])
def client(request: pytest.FixtureRequest, server: Server) -> Harness:
    run_on = _run_blocking if request.param == "blocking" else _run_aio
    return Harness(request.param, server.address, run_on)


# --- records ---------------------------------------------------------------------


def test_get_converts_the_record(client: Harness) -> None:
    record = client.run({}, "get", "user-1", collection="people")
    assert isinstance(record, Record)
    assert (record.collection, record.key) == ("people", "user-1")
    assert record.fields == {**FIELDS, "age": 36.0, "tags": ["a", 2.0, False]}
    assert isinstance(record.fields["age"], float)  # kept as the Struct sent it
    assert record.memberships == [Membership("vips", ENTER_TIME), Membership("no-time", None)]


def test_to_json_dict_is_json_with_rfc3339_times(client: Harness) -> None:
    record = client.run({}, "get", "user-1")
    out = record.to_json_dict()
    assert json.loads(json.dumps(out)) == out
    assert out["collection"] == "customers"
    assert out["memberships"] == [
        {"audience_id": "vips", "enter_time": "2024-05-01T12:30:15.250000Z"},
        {"audience_id": "no-time", "enter_time": None},
    ]
    out["fields"]["address"]["city"] = "Paris"
    assert record.fields["address"]["city"] == "London"  # a copy, not a view


def test_fields_become_a_read_mask_and_metadata_is_sent(client: Harness) -> None:
    options = {"metadata": [("x-tenant", "acme")]}
    masked = client.run(options, "get", "echo", fields=["email", "address.city"])
    assert masked.fields == {"has_mask": True, "paths": ["email", "address.city"], "tenant": "acme"}
    unmasked = client.run({}, "get", "echo")
    assert unmasked.fields == {"has_mask": False, "paths": [], "tenant": None}


def test_a_bare_string_is_refused_for_keys_and_fields(client: Harness) -> None:
    with pytest.raises(TypeError):
        client.run({}, "get", "user-1", fields="email")
    with pytest.raises(TypeError):
        client.run({}, "batch_get", "user-1")


def test_batch_get_splits_found_and_missing(client: Harness) -> None:
    result = client.run({}, "batch_get", ["user-1", "nobody", "user-2"])
    assert isinstance(result, BatchResult)
    assert [r.key for r in result.records] == ["user-1", "user-2"]
    assert result.missing_keys == ["nobody"]


def test_noop_and_server_info(client: Harness) -> None:
    assert client.run({}, "noop", b"x" * 100) is None
    assert client.run({}, "server_info") == {
        "version": "0.1.0",
        "sync_generation": 2**60,
        "collections": ["customers", "orders"],
        "people": 3,
        "worker_pid": 77,
        "events_logged": 2**40,
        "events_unmatched": 5,
        "max_message_bytes": 4 << 20,
    }
    # Every field of the response, so a field added later cannot be dropped silently.
    fields = {f.name for f in diagnostics_pb2.GetServerInfoResponse.DESCRIPTOR.fields}
    assert set(client.run({}, "server_info")) == fields


# --- errors ----------------------------------------------------------------------


def test_not_found_carries_the_error_info(client: Harness, server: Server) -> None:
    key = client.key("missing")
    with pytest.raises(NotFoundError) as caught:
        client.run({}, "get", key)
    err = caught.value
    assert err.code is grpc.StatusCode.NOT_FOUND
    assert err.reason == "KEY_NOT_FOUND"
    assert err.message == f"no record under key {key!r}"
    assert err.metadata == {"collection": "customers"}
    assert err.field_violations == []
    assert isinstance(err.__cause__, grpc.RpcError)
    assert str(err).startswith("NOT_FOUND (KEY_NOT_FOUND): no record")
    assert server.personalize.calls[key] == 1  # not retried


def test_invalid_argument_carries_field_violations(client: Harness) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.run({}, "get", "bad")
    assert caught.value.reason == "INVALID_REQUEST"
    assert caught.value.field_violations == [
        ("collection", "must not be empty"),
        ("read_mask.paths[0]", "unknown field"),
    ]


def test_batch_errors_are_mapped_too(client: Harness) -> None:
    with pytest.raises(InvalidArgumentError) as caught:
        client.run({}, "batch_get", ["a", "b", "c", "d"])
    assert caught.value.reason == "BATCH_TOO_LARGE"
    assert caught.value.field_violations == [("keys", "at most 3 keys")]


def test_unimplemented(client: Harness) -> None:
    with pytest.raises(UnimplementedError) as caught:
        client.run({}, "get", "unimplemented")
    assert caught.value.reason == "NOT_IMPLEMENTED"


def test_a_status_without_details_maps_to_the_base_class(client: Harness) -> None:
    with pytest.raises(QualifyError) as caught:
        client.run({}, "get", "internal")
    assert type(caught.value) is QualifyError
    assert (caught.value.code, caught.value.reason, caught.value.message) == (grpc.StatusCode.INTERNAL, "", "boom")


def test_deadline_exceeded_is_not_retried(client: Harness, server: Server) -> None:
    key = client.key("slow")
    with pytest.raises(DeadlineExceededError):
        client.run({"timeout": 0.1, "retries": 3}, "get", key)
    assert server.personalize.calls[key] == 1


def test_a_per_call_timeout_overrides_the_default(client: Harness) -> None:
    with pytest.raises(DeadlineExceededError):
        client.run({"timeout": 5.0}, "get", client.key("slow:override"), timeout=0.1)


# --- retries ---------------------------------------------------------------------


def test_unavailable_is_retried_until_success(client: Harness, server: Server) -> None:
    key = client.key("flaky:2")
    record = client.run({"retries": 3}, "get", key)
    assert record.key == key
    assert server.personalize.calls[key] == 3  # two failures, then the answer


def test_retries_stop_after_the_configured_number(client: Harness, server: Server) -> None:
    key = client.key("flaky:5")
    with pytest.raises(UnavailableError) as caught:
        client.run({"retries": 2}, "get", key)
    assert caught.value.reason == "NOT_READY"
    assert server.personalize.calls[key] == 3  # the first attempt and 2 retries


def test_retries_zero_makes_one_attempt(client: Harness, server: Server) -> None:
    key = client.key("flaky:1")
    with pytest.raises(UnavailableError):
        client.run({"retries": 0}, "get", key)
    assert server.personalize.calls[key] == 1


def test_resource_exhausted_is_retried(client: Harness, server: Server) -> None:
    key = client.key("busy")
    with pytest.raises(ResourceExhaustedError):
        client.run({"retries": 3}, "get", key)
    assert server.personalize.calls[key] == 4


def test_each_attempt_gets_its_own_deadline(client: Harness, server: Server) -> None:
    # Two attempts fail after 0.3 s each: under one deadline of 0.5 s for the
    # whole call (gRPC's built-in retry) the third attempt could never start.
    key = client.key("slowflaky")
    started = time.monotonic()
    record = client.run({"timeout": 0.5, "retries": 3}, "get", key)
    assert record.key == key
    assert server.personalize.calls[key] == 3
    assert time.monotonic() - started >= 0.6


def test_an_unreachable_server_is_unavailable(client: Harness) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UnavailableError):
        client.run_on(f"127.0.0.1:{port}", {"retries": 1, "timeout": 2.0}, "noop", (), {})


def test_secure_credentials_are_used(client: Harness) -> None:
    # TLS against a plaintext server cannot handshake, so the channel is secure.
    options = {"credentials": grpc.ssl_channel_credentials(), "retries": 0, "timeout": 2.0}
    with pytest.raises(UnavailableError):
        client.run(options, "noop")


# --- pieces, without a server ------------------------------------------------------


def test_backoff_is_exponential_capped_and_jittered() -> None:
    backoff = Backoff(base=0.05, cap=1.0)
    assert [backoff.delay(n, uniform=lambda: 1.0) for n in range(6)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert backoff.delay(30, uniform=lambda: 1.0) == 1.0
    assert backoff.delay(3, uniform=lambda: 0.0) == 0.0
    assert all(0.0 <= backoff.delay(2) <= 0.2 for _ in range(100))


class _FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str, trailers: tuple[tuple[str, Any], ...]) -> None:
        self._code, self._details, self._trailers = code, details, trailers

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[tuple[str, Any], ...]:
        return self._trailers


def test_a_status_whose_message_differs_still_maps() -> None:
    # grpc_status.rpc_status.from_call raises ValueError here; we keep the reason.
    status = status_pb2.Status(code=code_pb2.NOT_FOUND, message="original")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="AUDIENCE_NOT_FOUND"))
    trailers = (("grpc-status-details-bin", status.SerializeToString()),)
    err = error_from_rpc_error(_FakeRpcError(grpc.StatusCode.NOT_FOUND, "rewritten by a proxy", trailers))
    assert isinstance(err, NotFoundError)
    assert (err.reason, err.message) == ("AUDIENCE_NOT_FOUND", "rewritten by a proxy")


def test_undecodable_details_and_bare_errors_still_map() -> None:
    garbage = (("grpc-status-details-bin", b"\xff\xff\xff"),)
    err = error_from_rpc_error(_FakeRpcError(grpc.StatusCode.UNAVAILABLE, "down", garbage))
    assert isinstance(err, UnavailableError) and err.reason == ""
    bare = error_from_rpc_error(grpc.RpcError())
    assert type(bare) is QualifyError and bare.code is grpc.StatusCode.UNKNOWN
