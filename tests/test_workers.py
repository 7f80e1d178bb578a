"""``qualify serve --workers N`` and warehouse changes picked up while serving.

With several workers a supervisor process syncs (the one LMDB writer) and
forks serving processes that bind the same port with SO_REUSEPORT. The kernel
spreads new TCP connections over them, so fresh connections (each channel
below has its own subchannel pool, hence its own connection) reach both.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import pytest

from conftest import run_sql, write_project
from qualify.v1 import diagnostics_pb2, diagnostics_pb2_grpc, personalize_pb2, personalize_pb2_grpc

PEOPLE = 2_000
# Without its own subchannel pool, a new channel to the same address reuses
# the process-wide connection and always reaches the same worker.
FRESH_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def ask(address: str):
    """GetServerInfo and one Get over a brand-new connection."""
    with grpc.insecure_channel(address, options=FRESH_CONNECTION) as ch:
        info = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(
            diagnostics_pb2.GetServerInfoRequest(), timeout=5)
        record = personalize_pb2_grpc.PersonalizeServiceStub(ch).Get(
            personalize_pb2.GetRequest(collection="customers", key="user-1234"), timeout=5).record
    return info, record


def workers_seen(address: str, want: int, attempts: int = 300, exclude: frozenset = frozenset()) -> dict:
    """worker pid -> (info, record), until `want` distinct pids (not in exclude) answered."""
    seen: dict = {}
    for _ in range(attempts):
        info, record = ask(address)
        if info.worker_pid not in exclude:
            seen.setdefault(info.worker_pid, (info, record))
        if len(seen) >= want:
            break
    return seen


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


def gone(pid: int, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_two_workers_share_the_port_and_stop_on_sigterm(server_factory):
    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    assert json.loads(server.ready_file.read_text())["workers"] == 2

    seen = workers_seen(server.address, 2)
    assert len(seen) == 2, f"300 fresh connections all reached worker(s) {sorted(seen)}"
    supervisor = server.proc.pid
    records = []
    for pid, (info, record) in seen.items():
        assert pid != supervisor
        assert parent_of(pid) == supervisor, f"worker {pid} is not a child of the supervisor {supervisor}"
        assert info.people == PEOPLE and info.sync_generation >= 1
        assert list(info.collections) == ["customers"]
        assert record.key == "user-1234" and record.fields.fields["user_id"].string_value == "user-1234"
        records.append(record)
    assert records[0] == records[1]  # both read the same LMDB environment

    assert server.stop() == 0, server.log()
    for pid in seen:
        assert gone(pid), f"worker {pid} still runs after the supervisor exited"


def test_a_worker_that_dies_is_replaced(server_factory):
    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    first = workers_seen(server.address, 2)
    assert len(first) == 2
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    assert gone(victim)

    # Two live serving processes again: the survivor and a new one.
    deadline = time.monotonic() + 10
    seen: dict = {}
    while len(seen) < 2 and time.monotonic() < deadline:
        try:
            seen.update(workers_seen(server.address, 2, attempts=50, exclude=frozenset({victim})))
        except grpc.RpcError:
            time.sleep(0.1)  # the replacement may still be starting
    assert len(seen) == 2, f"only {sorted(seen)} answered after worker {victim} was killed"
    assert all(parent_of(pid) == server.proc.pid for pid in seen)
    assert server.stop() == 0, server.log()
    assert all(gone(pid) for pid in seen)


@pytest.mark.parametrize("workers", [1, 2])
def test_sync_interval_picks_up_warehouse_changes(server_factory, demo_warehouse, tmp_path, workers):
    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copyfile(demo_warehouse, warehouse)
    project = write_project(tmp_path, f'type = "duckdb"\npath = "{warehouse}"', extra='[server]\nsync_interval = "1s"\n')
    server = server_factory("--project", str(project), "--workers", str(workers))

    with grpc.insecure_channel(server.address) as ch:
        stub = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        info_stub = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch)

        def get(key: str):
            try:
                return stub.Get(personalize_pb2.GetRequest(collection="customers", key=key), timeout=5).record
            except grpc.RpcError as err:
                assert err.code() == grpc.StatusCode.NOT_FOUND, err.details()
                return None

        before = get("user-7")
        assert before.fields.fields["plan"].string_value != "diamond"
        assert get("user-100").fields.fields["plan"].string_value != "diamond"
        assert get("user-2001") is None and get("user-8") is not None
        generation = info_stub.GetServerInfo(diagnostics_pb2.GetServerInfoRequest(), timeout=5).sync_generation

        run_sql(warehouse, """
            UPDATE customers SET plan = 'diamond', ltv = 12345.5 WHERE user_id = 'user-7';
            INSERT INTO customers SELECT * REPLACE ('user-2001' AS user_id) FROM customers WHERE user_id = 'user-1';
            DELETE FROM customers WHERE user_id = 'user-8';
            """)

        deadline = time.monotonic() + 15
        while True:
            after = get("user-7")
            if after.fields.fields["plan"].string_value == "diamond" or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert after.fields.fields["plan"].string_value == "diamond", server.log()
        assert after.fields.fields["ltv"].number_value == 12345.5
        # The same sync (one LMDB transaction) added and removed people.
        added = get("user-2001")
        assert added is not None and added.fields.fields["plan"] == get("user-1").fields.fields["plan"]
        assert get("user-8") is None
        assert get("user-100").fields.fields["plan"].string_value != "diamond"
        info = info_stub.GetServerInfo(diagnostics_pb2.GetServerInfoRequest(), timeout=5)
        assert info.sync_generation > generation
        assert info.people == PEOPLE


def test_workers_forward_ingest_and_audiences_to_the_writer(server_factory):
    """Every serving process takes events and audience calls and forwards them to the one writer;
    rich errors pass through unchanged, and memberships show in Get from any process."""
    import uuid

    from google.protobuf import json_format
    from grpc_status import rpc_status

    from qualify.v1 import audience_pb2, audience_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc

    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    condition = {"event": {"event_model": "page_views", "scope": "SCOPE_EVER",
                           "comparison": "COMPARISON_GE", "threshold": 2}}
    audience = audience_pb2.Audience(id="twice")
    json_format.ParseDict(condition, audience.condition)
    with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as ch:
        audience_pb2_grpc.AudienceServiceStub(ch).CreateAudience(
            audience_pb2.CreateAudienceRequest(audience=audience), timeout=30)
        bad = audience_pb2.Audience(id="bad")
        json_format.ParseDict({"event": {"event_model": "nope", "scope": "SCOPE_EVER"}}, bad.condition)
        with pytest.raises(grpc.RpcError) as err:
            audience_pb2_grpc.AudienceServiceStub(ch).CreateAudience(
                audience_pb2.CreateAudienceRequest(audience=bad), timeout=30)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status = rpc_status.from_call(err.value)
        assert status is not None and any(d.type_url.endswith("BadRequest") for d in status.details)
    # Two page views sent over two fresh connections (so, most likely, two processes).
    for _ in range(2):
        with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as ch:
            event = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, user_id="user-7")
            event.timestamp.GetCurrentTime()
            ingest_pb2_grpc.IngestServiceStub(ch).Track(ingest_pb2.TrackRequest(event=event), timeout=30)
    seen = set()
    for _ in range(20):  # every process reads the membership from the shared map
        with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as ch:
            record = personalize_pb2_grpc.PersonalizeServiceStub(ch).Get(
                personalize_pb2.GetRequest(collection="customers", key="user-7"), timeout=5).record
            info = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(
                diagnostics_pb2.GetServerInfoRequest(), timeout=5)
        assert [m.audience_id for m in record.memberships] == ["twice"]
        seen.add(info.worker_pid)
    assert len(seen) == 2
    assert server.stop() == 0


def test_workers_forward_event_streams(server_factory):
    """StreamEvents through a serving process: every batch acknowledged once durable in the writer's log."""
    from qualify.clients import EventEmitter

    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    with EventEmitter(server.address, batch_size=100, max_delay=0.01) as emitter:
        for i in range(1000):
            emitter.page("Home", user_id=f"user-{1 + i % PEOPLE}", properties={"path": "/home"})
    assert emitter.acknowledged == 1000
    with grpc.insecure_channel(server.address) as ch:
        info = diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(diagnostics_pb2.GetServerInfoRequest(), timeout=5)
    assert info.events_logged == 1000
    assert server.stop() == 0


def test_workers_forward_watches_and_syncs(server_factory):
    """WatchMemberships and SyncService through a serving process reach the writer's feed and runners."""
    import threading
    import uuid

    from google.protobuf import json_format

    from qualify.v1 import audience_pb2, audience_pb2_grpc, event_pb2, ingest_pb2, ingest_pb2_grpc, sync_pb2, sync_pb2_grpc

    server = server_factory("--workers", "2", "--demo-people", str(PEOPLE))
    audience = audience_pb2.Audience(id="viewers")
    json_format.ParseDict({"event": {"event_model": "page_views", "scope": "SCOPE_EVER", "comparison": "COMPARISON_GE",
                                     "threshold": 1}}, audience.condition)
    with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as ch:
        audience_pb2_grpc.AudienceServiceStub(ch).CreateAudience(audience_pb2.CreateAudienceRequest(audience=audience), timeout=30)
        syncs = sync_pb2_grpc.SyncServiceStub(ch)
        syncs.CreateSync(sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(
            id="bus", audience_ids=["viewers"], nats=sync_pb2.NatsDestination(url="nats://127.0.0.1:9", subject="q"))), timeout=30)
        assert [s.id for s in syncs.ListSyncs(sync_pb2.ListSyncsRequest(), timeout=30).syncs] == ["bus"]
    with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as ch:
        watch = audience_pb2_grpc.AudienceServiceStub(ch).WatchMemberships(audience_pb2.WatchMembershipsRequest(
            start=audience_pb2.WATCH_START_SEQUENCE, after_sequence=0))
        got = []
        reader = threading.Thread(target=lambda: got.append(next(iter(watch))), daemon=True)
        reader.start()
        for _ in range(2):
            with grpc.insecure_channel(server.address, options=FRESH_CONNECTION) as other:
                event = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, user_id="user-9")
                event.timestamp.GetCurrentTime()
                ingest_pb2_grpc.IngestServiceStub(other).Track(ingest_pb2.TrackRequest(event=event), timeout=30)
        reader.join(20)
        watch.cancel()
    assert got and got[0].changes[0].person_key == "user-9" and got[0].changes[0].audience_id == "viewers"
    assert server.stop() == 0


def test_serving_processes_are_not_serving_while_the_writer_does_not_answer(tmp_path, demo_warehouse):
    """On an existing data folder a serving process saw the last sync at once and said SERVING while the
    writer was still starting: Audience and Ingest calls in that gap failed with UNAVAILABLE. A stopped
    writer (SIGSTOP: its socket still accepts, nothing answers) is that gap made to last."""
    import subprocess

    from conftest import QualifyServer, free_port
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from qualify.v1 import audience_pb2, audience_pb2_grpc

    project = write_project(tmp_path, f'type = "duckdb"\npath = "{demo_warehouse}"')
    first = QualifyServer(tmp_path, "--project", str(project), "--workers", "2").start()
    assert first.stop() == 0, first.log()
    port = free_port()
    server = QualifyServer(tmp_path, "--project", str(project), "--workers", "2", "--port", str(port))
    # Not start(): it waits for the ready file; a balancer polls health from the moment the port answers.
    server._log = open(server.log_path, "wb")
    server.proc = subprocess.Popen(server.args, cwd=tmp_path, stdout=server._log, stderr=subprocess.STDOUT,
                                   env=server.env)
    try:
        failures, deadline = [], time.monotonic() + 30
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            health = health_pb2_grpc.HealthStub(ch)
            while time.monotonic() < deadline:
                try:
                    if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                        break
                except grpc.RpcError:
                    pass
                time.sleep(0.002)
            for _ in range(20):  # SERVING means every service answers, now
                try:
                    audience_pb2_grpc.AudienceServiceStub(ch).ListAudiences(audience_pb2.ListAudiencesRequest(),
                                                                             timeout=5)
                except grpc.RpcError as err:
                    failures.append((err.code(), err.details()))
            assert not failures, failures[:3]
            writer = [json.loads(line)["pid"] for line in server.log().splitlines()
                      if "realtime state loaded" in line][-1]

            def status():
                try:
                    return health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                except grpc.RpcError as err:
                    return err.code()

            os.kill(writer, signal.SIGSTOP)
            try:
                stopped = time.monotonic()
                while status() == 1:
                    assert time.monotonic() - stopped < 5, "still SERVING with the writer stopped"
                    time.sleep(0.05)
            finally:
                os.kill(writer, signal.SIGCONT)
            while status() != 1:
                assert time.monotonic() - stopped < 15, "not SERVING again after the writer came back"
                time.sleep(0.05)
    finally:
        assert server.stop() == 0, server.log()
    assert '127.0.0.1:1"' not in server.log(), server.log()  # the writer listens on its socket only
