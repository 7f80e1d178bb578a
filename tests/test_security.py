"""Security and operations against real servers: API keys and scopes, TLS and mutual TLS,
limits, request ids and logs, Prometheus metrics, health, and ``qualify keys`` / ``qualify check``.

Every server here is ``qualify serve`` on a project file, so auth is on by
default; keys are made in the server's data directory while it runs (the
server picks them up from the file, as it does for ``qualify keys``).
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc

from certs import make_ca, make_leaf
from conftest import QualifyServer, eventually, free_port, make_key, write_project
from qualify.clients import Client, UnauthenticatedError
from qualify.clients._errors import error_from_rpc_error, retry_info_delay
from qualify.v1 import (audience_pb2, audience_pb2_grpc, diagnostics_pb2, diagnostics_pb2_grpc, event_pb2,
                        ingest_pb2, ingest_pb2_grpc, personalize_pb2, personalize_pb2_grpc, sync_pb2)

EVENT_MODELS = """
[event_models.page_views]
type = "page"
[event_models.page_views.properties]
path = "string"
"""


def duckdb(path: Path) -> str:
    return f'type = "duckdb"\npath = "{path}"'


def start(folder: Path, warehouse: Path, extra: str = "", *args: str, **kw) -> QualifyServer:
    folder.mkdir(parents=True, exist_ok=True)
    project = write_project(folder, duckdb(warehouse), extra=EVENT_MODELS + extra, auth=True)
    server = QualifyServer(folder, "--project", str(project), *args, **kw)
    server.data_dir = folder / "data"  # where keys.json goes
    return server


def md(key: str | None, *extra: tuple[str, str]) -> tuple:
    return ((("authorization", f"Bearer {key}"),) if key else ()) + extra


def event(user: str = "user-1", **properties) -> event_pb2.Event:
    e = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, user_id=user)
    e.timestamp.GetCurrentTime()
    if properties:
        e.properties.update(properties)
    return e


# One call per service and kind of method, with what it answers when allowed.
def _unary(path, request, response_type):
    return lambda ch, metadata: ch.unary_unary(path, request_serializer=lambda m: m.SerializeToString(),
                                               response_deserializer=response_type.FromString)(
        request, metadata=metadata, timeout=10)


def _streaming(path, requests, response_type, client_streams=True):
    def call(ch, metadata):
        if client_streams:
            stub = ch.stream_stream(path, request_serializer=lambda m: m.SerializeToString(),
                                    response_deserializer=response_type.FromString)
            return list(stub(iter(requests), metadata=metadata, timeout=10))
        stub = ch.unary_stream(path, request_serializer=lambda m: m.SerializeToString(),
                               response_deserializer=response_type.FromString)
        replies = stub(requests[0], metadata=metadata, timeout=10)
        first = next(replies)  # a watch never ends by itself: its first reply is the answer
        replies.cancel()
        return first
    return call


CALLS = {
    "Get": ("personalize", grpc.StatusCode.OK, _unary(
        "/qualify.v1.PersonalizeService/Get", personalize_pb2.GetRequest(collection="customers", key="user-1"),
        personalize_pb2.GetResponse)),
    "Track": ("ingest", grpc.StatusCode.OK, lambda ch, m: _unary(
        "/qualify.v1.IngestService/Track", ingest_pb2.TrackRequest(event=event()), ingest_pb2.TrackResponse)(ch, m)),
    "StreamEvents": ("ingest", grpc.StatusCode.OK, lambda ch, m: _streaming(
        "/qualify.v1.IngestService/StreamEvents",
        [ingest_pb2.StreamEventsRequest(batch_number=1, events=[event()])], ingest_pb2.StreamEventsResponse)(ch, m)),
    "ListAudiences": ("audiences:read", grpc.StatusCode.OK, _unary(
        "/qualify.v1.AudienceService/ListAudiences", audience_pb2.ListAudiencesRequest(),
        audience_pb2.ListAudiencesResponse)),
    "WatchMemberships": ("audiences:read", grpc.StatusCode.OK, _streaming(
        "/qualify.v1.AudienceService/WatchMemberships",
        [audience_pb2.WatchMembershipsRequest(start=audience_pb2.WATCH_START_SNAPSHOT)],
        audience_pb2.WatchMembershipsResponse, client_streams=False)),
    "CreateAudience": ("audiences:write", grpc.StatusCode.INVALID_ARGUMENT, _unary(  # no condition: changes nothing
        "/qualify.v1.AudienceService/CreateAudience",
        audience_pb2.CreateAudienceRequest(audience=audience_pb2.Audience(id="nope")),
        audience_pb2.CreateAudienceResponse)),
    "ListSyncs": ("syncs:admin", grpc.StatusCode.OK, _unary(
        "/qualify.v1.SyncService/ListSyncs", sync_pb2.ListSyncsRequest(), sync_pb2.ListSyncsResponse)),
    "GetServerInfo": ("admin", grpc.StatusCode.OK, _unary(
        "/qualify.v1.DiagnosticsService/GetServerInfo", diagnostics_pb2.GetServerInfoRequest(),
        diagnostics_pb2.GetServerInfoResponse)),
    "Noop": (None, grpc.StatusCode.OK, _unary(
        "/qualify.v1.DiagnosticsService/Noop", diagnostics_pb2.NoopRequest(), diagnostics_pb2.NoopResponse)),
}
SCOPES = ["ingest", "personalize", "audiences:read", "audiences:write", "syncs:admin", "admin"]


def outcome(call, ch, metadata) -> tuple[grpc.StatusCode, grpc.RpcError | None]:
    try:
        call(ch, metadata)
        return grpc.StatusCode.OK, None
    except grpc.RpcError as err:
        return err.code(), err


def known(ch, key: str) -> bool:
    """Whether the process answering on ``ch`` has loaded ``key``: GetServerInfo (admin only) is
    UNAUTHENTICATED for a key it does not know, PERMISSION_DENIED or OK for one it does. The scope is
    checked before the key's token bucket, so for a key without admin the probe costs none of its rate."""
    return outcome(CALLS["GetServerInfo"][2], ch, md(key))[0] != grpc.StatusCode.UNAUTHENTICATED


def await_keys(server, *keys: str, timeout: float = 10.0) -> None:
    """Polls until the server has re-read keys.json (it stats it every keys.CHECK_SECONDS) and knows
    every one of ``keys``, rather than sleeping past CHECK_SECONDS and hoping."""
    with server.channel() as ch:
        eventually(lambda: all(known(ch, k) for k in keys),
                   lambda: "new keys were not picked up:\n" + server.log()[-2000:], timeout=timeout)


def scrape(port: int) -> dict[str, float]:
    """/metrics as {'name{labels}': value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


@pytest.fixture(scope="module")
def secured(tmp_path_factory, demo_warehouse):
    """Auth on (the project file's default), metrics on, requests logged at debug level."""
    folder = tmp_path_factory.mktemp("secured")
    port = free_port()
    server = start(folder, demo_warehouse, f"\n[metrics]\nport = {port}\n")
    server.args[3:3] = ["--log-level", "DEBUG"]  # a global option: before "serve"
    server.start()
    server.metrics_port = port
    yield server
    assert server.stop() == 0, server.log()


# -- keys and scopes -------------------------------------------------------------------------


def test_each_scope_against_each_service(secured):
    keys = {scope: make_key(secured.data_dir, scope, name=scope) for scope in SCOPES}  # made while it runs
    await_keys(secured, *keys.values())
    with secured.channel() as ch:
        for scope, key in keys.items():
            for name, (needed, allowed_code, call) in CALLS.items():
                code, err = outcome(call, ch, md(key))
                if needed is None or scope in (needed, "admin"):
                    assert code == allowed_code, (scope, name, err)
                else:
                    assert code == grpc.StatusCode.PERMISSION_DENIED, (scope, name, err)
                    info = error_from_rpc_error(err)
                    assert info.reason == "PERMISSION_DENIED" and info.metadata["scope"] == needed, (scope, name)


@pytest.mark.parametrize("header", [None, "Bearer qk_not-a-key-at-all-000000000000000000000000", "Basic dXNlcjpwYXNz",
                                    "qk_missing-the-bearer-word", "Bearer "])
def test_no_key_or_a_wrong_one_is_unauthenticated_everywhere(secured, header):
    metadata = (("authorization", header),) if header is not None else ()
    with secured.channel() as ch:
        for name, (_, _, call) in CALLS.items():
            code, err = outcome(call, ch, metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, err)
            assert error_from_rpc_error(err).reason == "UNAUTHENTICATED"


def test_refusals_reveal_neither_keys_nor_records(secured):
    ingest_key = make_key(secured.data_dir, "ingest")
    await_keys(secured, ingest_key)
    with secured.channel() as ch:
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        answers = []
        for key in (None, "qk_" + "x" * 43, ingest_key):
            for person in ("user-1", "nobody-at-all"):  # one record exists, one does not
                with pytest.raises(grpc.RpcError) as err:
                    stub.Get(personalize_pb2.GetRequest(collection="customers", key=person), metadata=md(key))
                answers.append((key is ingest_key, err.value.code(), err.value.details()))
    # Without a valid key: one answer whatever the key or the record; with a key lacking
    # the scope, PERMISSION_DENIED before the record is looked up.
    assert len({a for a in answers if not a[0]}) == 1 and answers[0][1] == grpc.StatusCode.UNAUTHENTICATED
    assert len({a for a in answers if a[0]}) == 1 and answers[-1][1] == grpc.StatusCode.PERMISSION_DENIED


def test_revoking_a_key_takes_effect_without_a_restart(secured):
    cli = [sys.executable, "-m", "qualify.server.cli", "keys", "--project", str(secured.workdir / "qualify.toml")]
    made = subprocess.run(cli + ["create", "--name", "checkout", "--scope", "personalize"],
                          capture_output=True, text=True, check=True)
    key, key_id = made.stdout.strip().split("\t")  # the key, then its id
    assert re.fullmatch(r"qk_[A-Za-z0-9_\-]{43}", key), made.stdout
    listed = json.loads(subprocess.run(cli + ["list", "--json"], capture_output=True, text=True, check=True).stdout)
    mine = [k for k in listed if k["name"] == "checkout"]
    assert len(mine) == 1 and mine[0]["revoked"] is None and key not in json.dumps(listed)
    assert mine[0]["id"] == key_id
    assert key not in (secured.data_dir / "keys.json").read_text()  # only its hash is stored

    with Client(secured.address, api_key=key, timeout=5, retries=0) as client:
        deadline = time.monotonic() + 5
        while True:  # created after the server started: picked up from the file
            try:
                assert client.get("user-1").key == "user-1"
                break
            except UnauthenticatedError:
                assert time.monotonic() < deadline, "a new key was not picked up"
                time.sleep(0.05)
        revoked = subprocess.run(cli + ["revoke", mine[0]["id"]], capture_output=True, text=True)
        assert revoked.returncode == 0 and "revoked" in revoked.stdout, revoked.stderr
        t0 = time.monotonic()
        with pytest.raises(UnauthenticatedError):
            while time.monotonic() - t0 < 5:
                client.get("user-1")
                time.sleep(0.02)
        assert time.monotonic() - t0 < 1.0, "revocation took longer than a second"
    assert secured.proc.poll() is None  # same process throughout


def test_revoking_a_key_ends_its_open_streams_within_a_second(secured):
    """StreamEvents and WatchMemberships opened before a revocation end UNAUTHENTICATED, even while idle."""
    import queue
    import threading

    from qualify.server.security.keys import KeyFile, keys_path

    record, key = KeyFile(keys_path(secured.data_dir)).create("streams", ["ingest", "audiences:read"])
    with grpc.insecure_channel(secured.address) as ch:
        eventually(lambda: _allowed(ch, key), lambda: "the new key was not picked up")
        batches: queue.Queue = queue.Queue()
        batches.put(ingest_pb2.StreamEventsRequest(batch_number=1, events=[event()]))
        stream = ingest_pb2_grpc.IngestServiceStub(ch).StreamEvents(iter(batches.get, None), metadata=md(key))
        watch = audience_pb2_grpc.AudienceServiceStub(ch).WatchMemberships(
            audience_pb2.WatchMembershipsRequest(start=audience_pb2.WATCH_START_NOW), metadata=md(key))
        assert next(stream).batch_number == 1  # open and working (the watch is open and idle)
        ended: dict[str, tuple[grpc.StatusCode, float]] = {}

        def drain(name, call):
            try:
                for _ in call:
                    pass
                ended[name] = (grpc.StatusCode.OK, time.monotonic())
            except grpc.RpcError as err:
                ended[name] = (err.code(), time.monotonic())

        threads = [threading.Thread(target=drain, args=a) for a in (("stream", stream), ("watch", watch))]
        for t in threads:
            t.start()
        time.sleep(0.3)
        assert not ended, ended
        t0 = time.monotonic()
        KeyFile(keys_path(secured.data_dir)).revoke(record.id)
        for t in threads:
            t.join(5)
        batches.put(None)
        stream.cancel(), watch.cancel()
        assert {name: code for name, (code, _) in ended.items()} == {
            "stream": grpc.StatusCode.UNAUTHENTICATED, "watch": grpc.StatusCode.UNAUTHENTICATED}, ended
        assert max(at for _, at in ended.values()) - t0 < 1.0, ended


def _allowed(ch, key: str) -> bool:
    try:
        ingest_pb2_grpc.IngestServiceStub(ch).TrackBatch(ingest_pb2.TrackBatchRequest(), metadata=md(key), timeout=5)
        return True
    except grpc.RpcError:
        return False


def test_keys_command_refuses_bad_input(secured):
    cli = [sys.executable, "-m", "qualify.server.cli", "keys", "--project", str(secured.workdir / "qualify.toml")]
    bad_scope = subprocess.run(cli + ["create", "--scope", "read-everything"], capture_output=True, text=True)
    assert bad_scope.returncode == 1 and "unknown scope(s) read-everything" in bad_scope.stderr
    unknown = subprocess.run(cli + ["revoke", "key_00000000"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "no key with id 'key_00000000'" in unknown.stderr
    assert stat.S_IMODE((secured.data_dir / "keys.json").stat().st_mode) == 0o600


def test_abandoned_watches_end_cleanly(secured):
    """A watch cancelled right after its first reply is finalized after gRPC released the call;
    the gate's bookkeeping then must not touch the call (it once crashed the server, at debug level)."""
    key = make_key(secured.data_dir, "audiences:read")
    await_keys(secured, key)
    _, _, watch = CALLS["WatchMemberships"]
    with secured.channel() as ch:
        for _ in range(30):
            watch(ch, md(key))
        time.sleep(0.2)  # kept: nothing to poll for; it gives a crash after the cancels time to happen
        assert outcome(CALLS["Noop"][2], ch, md(key))[0] == grpc.StatusCode.OK
    assert secured.proc.poll() is None


# -- request ids and logs ----------------------------------------------------------------------


def test_request_ids_come_back_and_tie_the_log_together(secured):
    key = make_key(secured.data_dir, "personalize")
    await_keys(secured, key)
    with secured.channel() as ch:
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        _, call = stub.Get.with_call(personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md(key))
        ok_id = dict(call.trailing_metadata())["x-request-id"]
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(personalize_pb2.GetRequest(collection="customers", key="nobody"), metadata=md(key))
        missing_id = dict(err.value.trailing_metadata())["x-request-id"]
        with pytest.raises(grpc.RpcError) as err:  # refused at the gate: still an id
            stub.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md("qk_wrong"))
        refused_id = dict(err.value.trailing_metadata())["x-request-id"]
        _, call = stub.Get.with_call(personalize_pb2.GetRequest(collection="customers", key="user-1"),
                                     metadata=md(key, ("x-request-id", "caller-chosen-42")))
        assert dict(call.trailing_metadata())["x-request-id"] == "caller-chosen-42"
    assert len({ok_id, missing_id, refused_id}) == 3
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in secured.log().splitlines() if line.startswith("{")]
        by_id = {rec.get("request_id"): rec for rec in lines if rec.get("logger", "").endswith("gate")}
        if all(i in by_id for i in (ok_id, missing_id, refused_id, "caller-chosen-42")) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert by_id[ok_id]["code"] == "OK" and by_id[ok_id]["method"] == "PersonalizeService.Get"
    assert by_id[missing_id]["code"] == "NOT_FOUND"
    assert by_id[refused_id]["code"] == "UNAUTHENTICATED" and by_id[refused_id]["key_id"] is None
    assert by_id[ok_id]["key_id"].startswith("key_") and by_id[ok_id]["duration_ms"] >= 0
    assert all({"time", "level", "logger", "message", "pid"} <= rec.keys() for rec in lines)


def test_no_key_is_ever_logged(secured):
    key = make_key(secured.data_dir, "admin")
    await_keys(secured, key)
    with secured.channel() as ch:
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        stub.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md(key))
        with pytest.raises(grpc.RpcError):  # a key sent where data goes, in a failing request
            stub.Get(personalize_pb2.GetRequest(collection=key, key=key), metadata=md(key))
        with pytest.raises(grpc.RpcError):
            stub.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md(key + "x"))
    time.sleep(0.3)  # kept: lets the gate log the calls above; what follows asserts an absence, nothing to poll
    log = secured.log()
    assert key[3:] not in log  # not even the random part
    assert "qk_" not in log.replace("qk_[redacted]", "")


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_move(secured):
    admin = make_key(secured.data_dir, "admin")
    await_keys(secured, admin)
    get_ok = 'qualify_rpc_duration_seconds_count{code="OK",method="PersonalizeService.Get"}'
    get_denied = 'qualify_rpc_duration_seconds_count{code="UNAUTHENTICATED",method="PersonalizeService.Get"}'
    rejected = 'qualify_events_rejected_total{reason="MISSING_IDENTITY"}'
    enter = 'qualify_membership_changes_total{audience="sec_viewers",direction="enter"}'
    audience = audience_pb2.Audience(id="sec_viewers")
    json_format.ParseDict({"event": {"event_model": "page_views", "scope": "SCOPE_EVER",
                                     "comparison": "COMPARISON_GE", "threshold": 1}}, audience.condition)
    with secured.channel() as ch:
        audience_pb2_grpc.AudienceServiceStub(ch).CreateAudience(
            audience_pb2.CreateAudienceRequest(audience=audience), metadata=md(admin), timeout=30)
        before = scrape(secured.metrics_port)  # after the people with earlier page views entered
        assert before["qualify_warehouse_sync_duration_seconds_count"] >= 1
        assert before["qualify_warehouse_sync_last_success_timestamp_seconds"] > time.time() - 600
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        for _ in range(5):
            stub.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md(admin))
        for _ in range(2):
            with pytest.raises(grpc.RpcError):
                stub.Get(personalize_pb2.GetRequest(collection="customers", key="user-1"))
        nobody = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE)  # no identity
        reply = ingest_pb2_grpc.IngestServiceStub(ch).TrackBatch(
            ingest_pb2.TrackBatchRequest(events=[event("user-77", path="/"), event("user-78", path="/"), nobody]),
            metadata=md(admin), timeout=10)
        assert reply.accepted == 2 and len(reply.rejections) == 1
    after = scrape(secured.metrics_port)
    assert after[get_ok] - before.get(get_ok, 0) == 5
    assert after[get_denied] - before.get(get_denied, 0) == 2
    assert after["qualify_events_accepted_total"] - before["qualify_events_accepted_total"] == 2
    assert after[rejected] - before.get(rejected, 0) == 1
    assert after[enter] - before.get(enter, 0) == 2
    assert after["qualify_evaluation_lag_seconds_count"] > before["qualify_evaluation_lag_seconds_count"]
    assert 0 < after["qualify_lmdb_map_used_bytes"] < after["qualify_lmdb_map_size_bytes"]
    bucket = 'qualify_rpc_duration_seconds_bucket{code="OK",le="+Inf",method="PersonalizeService.Get"}'
    assert after[bucket] == after[get_ok]


# -- defaults ----------------------------------------------------------------------------------


def test_auth_is_on_with_a_project_file_unless_disabled(tmp_path, demo_warehouse, demo_server):
    on = start(tmp_path / "on", demo_warehouse).start()
    off = QualifyServer(tmp_path, "--project", str(write_project(tmp_path, duckdb(demo_warehouse)))).start()
    try:
        with on.channel() as ch, pytest.raises(grpc.RpcError) as err:
            personalize_pb2_grpc.PersonalizeServiceStub(ch).Get(
                personalize_pb2.GetRequest(collection="customers", key="user-1"))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no API key exists yet" in on.log()
        with Client(off.address) as client:  # [auth] enabled = false
            assert client.get("user-1").key == "user-1"
        assert "authentication is OFF" in off.log()
    finally:
        assert on.stop() == 0 and off.stop() == 0
    assert "authentication is OFF" in demo_server.log()  # the embedded demo: off, and it says so


# -- limits ------------------------------------------------------------------------------------

LIMITS = """
[limits]
requests_per_second = 5
burst = 5
max_streams_per_key = 1
max_batch_events = 10
max_event_properties = 3
max_string_bytes = 64
max_message_bytes = 4096
"""


@pytest.fixture(scope="module")
def limited(tmp_path_factory, demo_warehouse):
    folder = tmp_path_factory.mktemp("limited")
    server = start(folder, demo_warehouse, LIMITS).start()
    yield server
    assert server.stop() == 0, server.log()


def fresh_keys(server, *scopes) -> list[str]:
    keys = [make_key(server.data_dir, s) for s in scopes]
    await_keys(server, *keys)
    return keys


def test_rate_limit_answers_resource_exhausted_with_retry_info(limited):
    key, other = fresh_keys(limited, "personalize", "personalize")
    request = personalize_pb2.GetRequest(collection="customers", key="user-1")
    with limited.channel() as ch:
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        for _ in range(5):  # the burst
            stub.Get(request, metadata=md(key))
        with pytest.raises(grpc.RpcError) as err:
            stub.Get(request, metadata=md(key))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_from_rpc_error(err.value).reason == "RATE_LIMITED"
        delay = retry_info_delay(err.value)
        assert delay is not None and 0 < delay <= 0.2 + 0.05  # one token at 5/s
        stub.Get(request, metadata=md(other))  # buckets are per key
        time.sleep(delay)  # kept: the point: waiting as long as RetryInfo said is enough
        stub.Get(request, metadata=md(key))  # when RetryInfo said
    # The client waits as long as RetryInfo asks, so a burst of reads all succeed.
    with Client(limited.address, api_key=key, retries=5, timeout=5) as client:
        started = time.monotonic()
        assert all(client.get("user-1").key == "user-1" for _ in range(8))
        assert time.monotonic() - started > 0.5  # 8 requests at 5/s from an empty bucket


def test_concurrent_streams_per_key(limited):
    key, = fresh_keys(limited, "ingest")
    with limited.channel() as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)
        hold = __import__("threading").Event()

        def requests():
            yield ingest_pb2.StreamEventsRequest(batch_number=1, events=[event()])
            hold.wait(10)

        first = stub.StreamEvents(requests(), metadata=md(key), timeout=15)
        assert next(first).batch_number == 1  # the first stream is open
        time.sleep(0.25)  # kept: the bucket refills (5/s), so the refusal below is for streams, not rate
        with pytest.raises(grpc.RpcError) as err:
            list(stub.StreamEvents(iter([ingest_pb2.StreamEventsRequest(batch_number=1)]), metadata=md(key), timeout=5))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_from_rpc_error(err.value).reason == "TOO_MANY_STREAMS"
        hold.set()
        assert list(first) == []
        time.sleep(0.25)  # kept: the bucket refills again, so only a slot that did not come back could refuse
        replies = list(stub.StreamEvents(iter([ingest_pb2.StreamEventsRequest(batch_number=2, events=[event()])]),
                                         metadata=md(key), timeout=5))
        assert [r.batch_number for r in replies] == [2]  # the slot came back


def test_event_and_message_limits(limited):
    key, = fresh_keys(limited, "ingest")
    with limited.channel() as ch:
        stub = ingest_pb2_grpc.IngestServiceStub(ch)

        def batch(*events):
            time.sleep(0.25)  # kept: stay under 5 requests/s, so each answer is about the batch, not the rate
            return stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=events), metadata=md(key), timeout=10)

        with pytest.raises(grpc.RpcError) as err:
            batch(*[event() for _ in range(11)])
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_from_rpc_error(err.value).reason == "BATCH_TOO_LARGE"
        reply = batch(event(a="1", b="2", c="3"), event(a="1", b="2", c="3", d="4"), event(path="x" * 65),
                      event(user="u" * 501), event(path="x" * 64))
        assert reply.accepted == 2
        why = {r.index: (ingest_pb2.RejectionReason.Name(r.reason), r.description) for r in reply.rejections}
        assert why[1] == ("REJECTION_REASON_TOO_LARGE", "properties has 4 keys; the limit is 3")
        assert why[2] == ("REJECTION_REASON_TOO_LARGE", "properties holds a string over 64 bytes")
        assert why[3] == ("REJECTION_REASON_TOO_LARGE", "user_id is over 500 bytes")
        with pytest.raises(grpc.RpcError) as err:  # over max_message_bytes: refused before decoding
            batch(event(path="y" * 5000))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


# -- TLS and mutual TLS ------------------------------------------------------------------------


def tls_project(server_pair, client_ca=None) -> str:
    extra = f'\n[tls]\ncert = "{server_pair.cert}"\nkey = "{server_pair.key}"\n'
    return extra + (f'client_ca = "{client_ca.cert}"\n' if client_ca else "")


def refused(address: str, credentials: grpc.ChannelCredentials | None) -> bool:
    """Whether a Noop over these credentials fails to connect (UNAVAILABLE: the handshake failed)."""
    ch = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with ch:
        try:
            diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).Noop(diagnostics_pb2.NoopRequest(), timeout=3)
        except grpc.RpcError as err:
            return err.code() == grpc.StatusCode.UNAVAILABLE
    return False


def test_tls_refuses_plain_text_and_the_wrong_ca(tmp_path, demo_warehouse):
    ca, rogue = make_ca(tmp_path / "pki"), make_ca(tmp_path / "pki", "rogue")
    pair = make_leaf(tmp_path / "pki", "server", ca)
    good = grpc.ssl_channel_credentials(ca.cert_bytes())
    server = start(tmp_path / "srv", demo_warehouse, tls_project(pair)
                   + "\n[auth]\nenabled = false\n", credentials=good).start()
    try:
        assert refused(server.address, None)  # plain text
        assert refused(server.address, grpc.ssl_channel_credentials(rogue.cert_bytes()))  # signed by someone else
        with Client(server.address, root_certificates=ca.cert, timeout=5) as client:
            assert client.get("user-1").key == "user-1"
    finally:
        assert server.stop() == 0, server.log()


def test_mutual_tls_refuses_clients_without_a_certificate_from_the_client_ca(tmp_path, demo_warehouse):
    pki = tmp_path / "pki"
    ca, clients_ca, rogue = make_ca(pki), make_ca(pki, "clients"), make_ca(pki, "rogue")
    pair = make_leaf(pki, "server", ca)
    alice, mallory = make_leaf(pki, "alice", clients_ca, server=False), make_leaf(pki, "mallory", rogue, server=False)
    good = grpc.ssl_channel_credentials(ca.cert_bytes(), alice.key_bytes(), alice.cert_bytes())
    server = start(tmp_path / "srv", demo_warehouse, tls_project(pair, clients_ca),
                   credentials=good).start()
    key = make_key(server.data_dir, "personalize")
    try:
        assert refused(server.address, None)
        assert refused(server.address, grpc.ssl_channel_credentials(ca.cert_bytes()))  # no client certificate
        assert refused(server.address, grpc.ssl_channel_credentials(ca.cert_bytes(), mallory.key_bytes(),
                                                                    mallory.cert_bytes()))
        await_keys(server, key)
        with Client(server.address, api_key=key, root_certificates=ca.cert, certificate_chain=alice.cert,
                    private_key=alice.key, timeout=5) as client:
            assert client.get("user-1").key == "user-1"  # the certificate and the key, both
        with Client(server.address, root_certificates=ca.cert, certificate_chain=alice.cert,
                    private_key=alice.key, timeout=5, retries=0) as client, pytest.raises(UnauthenticatedError):
            client.get("user-1")
    finally:
        assert server.stop() == 0, server.log()


def test_check_validates_certificates(tmp_path, demo_warehouse):
    pki = tmp_path / "pki"
    ca = make_ca(pki)
    good, old, other = make_leaf(pki, "server", ca), make_leaf(pki, "old", ca, expired=True), make_leaf(pki, "other", ca)
    cases = {
        "good": (f'cert = "{good.cert}"\nkey = "{good.key}"\nclient_ca = "{ca.cert}"', None),
        "expired": (f'cert = "{old.cert}"\nkey = "{old.key}"',
                    f"tls.cert = '{old.cert}': is not valid now: certificate has expired"),
        "mismatch": (f'cert = "{good.cert}"\nkey = "{other.key}"',
                     f"tls.key = '{other.key}': does not belong to the certificate in tls.cert"),
        "swapped": (f'cert = "{good.key}"\nkey = "{good.cert}"',
                    f"tls.cert = '{good.key}': is not a PEM certificate file"),
        "missing": (f'cert = "{good.cert}"\nkey = "nowhere.key"', "tls.key = 'nowhere.key': no such file"),
        "no key": (f'cert = "{good.cert}"', "tls.key: is required when [tls] is present"),
    }
    for name, (tls, expected) in cases.items():
        folder = tmp_path / name.replace(" ", "-")
        folder.mkdir()
        project = write_project(folder, duckdb(demo_warehouse), extra=f"\n[tls]\n{tls}\n")
        proc = subprocess.run([sys.executable, "-m", "qualify.server.cli", "check", "--project", str(project)],
                              capture_output=True, text=True, cwd=folder)
        out = proc.stdout + proc.stderr
        if expected is None:
            assert proc.returncode == 0, out
        else:
            assert proc.returncode == 1 and expected in out and "Traceback" not in out, (name, out)


# -- workers: one gate per process, and none to get around -------------------------------------


def test_workers_check_keys_at_the_edge_and_at_the_writer_and_combine_metrics(tmp_path, demo_warehouse):
    port = free_port()
    server = start(tmp_path, demo_warehouse, f"\n[metrics]\nport = {port}\n", "--workers", "2").start()
    try:
        personalize, ingest, admin = fresh_keys(server, "personalize", "ingest", "admin")
        sock = tmp_path / "data" / "writer.sock"

        def loaded_everywhere() -> bool:  # admin was made last: a process that knows it knows all three
            with grpc.insecure_channel(f"unix:{sock}") as ch:
                if not known(ch, admin):  # the writer checks forwarded calls' keys again
                    return False
            pids = set()
            for _ in range(20):  # fresh connections reach both serving processes
                with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                    try:
                        pids.add(diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(
                            diagnostics_pb2.GetServerInfoRequest(), metadata=md(admin), timeout=5).worker_pid)
                    except grpc.RpcError as err:
                        if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                            raise
                if len(pids) == 2:
                    return True
            return False

        eventually(loaded_everywhere, lambda: "not every process picked up the new keys:\n" + server.log()[-2000:])
        assert stat.S_IMODE(sock.stat().st_mode) == 0o600
        track = ingest_pb2.TrackRequest(event=event())
        for address in (server.address, f"unix:{sock}"):  # the public port, and the writer's own socket
            with grpc.insecure_channel(address) as ch:
                stub = ingest_pb2_grpc.IngestServiceStub(ch)
                for key, code in ((None, grpc.StatusCode.UNAUTHENTICATED),
                                  (personalize, grpc.StatusCode.PERMISSION_DENIED)):
                    with pytest.raises(grpc.RpcError) as err:
                        stub.Track(track, metadata=md(key), timeout=10)
                    assert err.value.code() == code, address
                stub.Track(ingest_pb2.TrackRequest(event=event()), metadata=md(ingest), timeout=10)
        pids = set()
        for _ in range(40):  # fresh connections: the kernel spreads them over both serving processes
            with grpc.insecure_channel(server.address, options=[("grpc.use_local_subchannel_pool", 1)]) as ch:
                personalize_pb2_grpc.PersonalizeServiceStub(ch).Get(
                    personalize_pb2.GetRequest(collection="customers", key="user-1"), metadata=md(personalize),
                    timeout=5)
                pids.add(diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(
                    diagnostics_pb2.GetServerInfoRequest(), metadata=md(admin), timeout=5).worker_pid)
        assert len(pids) == 2
        values = scrape(port)  # one endpoint, every process's calls
        assert values['qualify_rpc_duration_seconds_count{code="OK",method="PersonalizeService.Get"}'] == 40
        assert values['qualify_rpc_duration_seconds_count{code="OK",method="IngestService.Track"}'] == 1
        assert values["qualify_events_accepted_total"] == 2  # written by the writer process
        assert values["qualify_warehouse_sync_duration_seconds_count"] >= 1
    finally:
        assert server.stop() == 0, server.log()


# -- health ------------------------------------------------------------------------------------


def test_health_is_not_serving_while_the_map_is_nearly_full(tmp_path, demo_warehouse):
    extra = "\n[storage]\nmap_size_gb = 0.01\n[limits]\nmap_nearly_full = 0.25\n"
    server = start(tmp_path, demo_warehouse, extra).start()
    key, = fresh_keys(server, "ingest")
    try:
        with server.channel() as ch:
            health = health_pb2_grpc.HealthStub(ch)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            deadline = time.monotonic() + 60
            status = health_pb2.HealthCheckResponse.SERVING
            while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[event(path="z" * 8000) for _ in range(50)]),
                                metadata=md(key), timeout=30)
                polled = time.monotonic()
                while status == health_pb2.HealthCheckResponse.SERVING and time.monotonic() - polled < 1.2:
                    time.sleep(0.1)  # health polls the map every second: one batch at a time until it does
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.NOT_SERVING
            per_service = health.Check(health_pb2.HealthCheckRequest(service="qualify.v1.PersonalizeService"), timeout=5)
            assert per_service.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert "NOT_SERVING until storage.map_size_gb grows" in server.log()
    finally:
        assert server.stop() == 0, server.log()


def test_health_flips_with_the_commit_that_fills_the_map(tmp_path, demo_warehouse):
    """Health used to poll the map once a second: a fast fill wrote into MapFull while it still said SERVING."""
    from qualify.server.storage.lmdb_store import data_path, open_env

    extra = "\n[storage]\nmap_size_gb = 0.01\n[limits]\nmap_nearly_full = 0.25\n"
    server = start(tmp_path, demo_warehouse, extra).start()
    key, = fresh_keys(server, "ingest")
    env = open_env(data_path(server.data_dir), 1 << 30, readonly=True)
    try:
        with server.channel() as ch:
            health = health_pb2_grpc.HealthStub(ch)
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            for _ in range(200):
                stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=[event(path="z" * 8000) for _ in range(10)]),
                                metadata=md(key), timeout=30)
                used = (env.info()["last_pgno"] + 1) * env.stat()["psize"]  # what the acknowledged commit left
                if used >= 0.25 * int(0.01 * (1 << 30)):
                    break
            else:
                raise AssertionError("the map never filled")
            # At once: no poll interval between the commit and health.
            time.sleep(0.05)
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == \
                health_pb2.HealthCheckResponse.NOT_SERVING
    finally:
        env.close()
        assert server.stop() == 0, server.log()


def test_config_problems_in_the_new_sections(tmp_path, demo_warehouse):
    from qualify.server.config import ProjectError, load_project

    extra = ("\n[auth]\nenabled = \"yes\"\n[limits]\nburst = 0\nrequests_per_second = -1\nmap_nearly_full = 2\n"
             "[metrics]\nport = 70000\n")
    with pytest.raises(ProjectError) as err:
        load_project(write_project(tmp_path, duckdb(demo_warehouse), extra=extra))
    text = str(err.value)
    for line in ("auth.enabled = 'yes': must be true or false",
                 "limits.burst = 0: must be an integer from 1 to 2147483648",
                 "limits.requests_per_second = -1: must be a number >= 0 (0: unlimited)",
                 "limits.map_nearly_full = 2: must be a fraction above 0 and at most 1 (e.g. 0.95)",
                 "metrics.port = 70000: must be an integer from 0 (off) to 65535"):
        assert line in text, text
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None  # tests never switch the client's storage
