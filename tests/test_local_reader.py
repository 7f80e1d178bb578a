"""LocalReader against a real server: same answers as Get, snapshots, restarts, the layout check.

Every test runs ``qualify serve`` on a copy of the small demo warehouse and
reads its data directory from this process, as a co-located service would.
"""

from __future__ import annotations

import random
import shutil
import struct
import sys
import subprocess
import threading
import time
import uuid

import grpc
import lmdb
import pytest

from conftest import run_sql, write_realtime_project
from qualify.clients import Client, LayoutMismatchError, LocalReader, LocalReaderError, NotYetConsistentError
from qualify.server.domain.consistency import decode_token, encode_token
from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc

AUDIENCE = {"event": {"event_model": "page_views", "comparison": "COMPARISON_GE", "threshold": 1,
                      "scope": "SCOPE_EVER"}}
COLUMNS = ["user_id", "plan", "loyalty_tier", "ltv", "orders_count", "email_opt_in", "signup_date"]


def page_view(user: str) -> event_pb2.Event:
    ev = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, user_id=user, name="home")
    ev.properties.update({"path": "/home"})
    ev.timestamp.GetCurrentTime()
    return ev


@pytest.fixture
def project(tmp_path, demo_warehouse):
    warehouse = tmp_path / "warehouse.duckdb"
    shutil.copyfile(demo_warehouse, warehouse)
    return write_realtime_project(tmp_path, warehouse, '[server]\nsync_interval = "1s"\n'), warehouse


def start(server_factory, project, *args):
    server = server_factory("--project", str(project[0]), *args)
    with Client(server.address) as client:
        client.create_audience("viewed", AUDIENCE)
        client.wait_live("viewed")
    return server


def test_the_layout_names_agree_with_storage():
    from qualify.server.storage import eventlog, local, realtime

    assert local.AUDIENCE_MEMBERS == realtime.AUDIENCE_MEMBERS and local.EVENTS == eventlog.EVENTS


def test_importing_the_reader_does_not_import_grpc():
    code = "import sys; from qualify.clients import LocalReader; assert 'grpc' not in sys.modules, 'grpc'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_answers_equal_get_while_events_and_syncs_land(server_factory, project, tmp_path):
    run_sql(project[1], "UPDATE customers SET plan = 'v0'")
    server = start(server_factory, project)
    reader = LocalReader(tmp_path / "data")
    stop = threading.Event()
    syncs = []

    def ingest():
        with grpc.insecure_channel(server.address) as ch:
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            while not stop.is_set():
                stub.TrackBatch(ingest_pb2.TrackBatchRequest(
                    events=[page_view(f"user-{random.randrange(2000)}") for _ in range(20)]), timeout=10)

    def sync():  # every sync rewrites every person's plan to one version: a snapshot shows one version
        n = 0
        while not stop.is_set():
            n += 1
            run_sql(project[1], f"UPDATE customers SET plan = 'v{n}'")
            syncs.append(n)
            time.sleep(0.4)

    threads = [threading.Thread(target=ingest), threading.Thread(target=sync)]
    for t in threads:
        t.start()
    rng = random.Random(14)
    compared = 0
    try:
        with Client(server.address) as client:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                key = f"user-{rng.randrange(2100)}"  # some have no record
                fields = rng.choice([None, rng.sample(COLUMNS, rng.randint(1, 4))])
                before = reader.get(key, fields=fields)
                try:
                    remote = client.get(key, fields=fields)
                except Exception:  # noqa: BLE001 - NotFoundError: compared as None
                    remote = None
                after = reader.get(key, fields=fields)
                if before == after:  # writes only move forward: the RPC in between saw the same
                    assert remote == before, (key, fields)
                    compared += 1
                with reader.snapshot():
                    batch = reader.batch_get([f"user-{i}" for i in rng.sample(range(2000), 50)], fields=["plan"])
                assert len({r.fields["plan"] for r in batch.records}) == 1, "a snapshot mixed two syncs"
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert compared > 100
    assert len(syncs) >= 3
    assert client is not None and reader.get("user-1").fields["plan"].startswith("v")
    members = reader.members_of("viewed", page_size=100_000).person_keys
    assert members and all(reader.is_member(k, "viewed") for k in members[:50])
    with Client(server.address) as client:
        assert client.list_members("viewed", page_size=1000).person_keys == members[:1000]
        with pytest.raises(LocalReaderError) as err:
            reader.get("user-1", collection="nope")
        assert err.value.reason == "UNKNOWN_COLLECTION"
        with pytest.raises(LocalReaderError) as err:
            reader.get("user-1", fields=["nope"])
        assert err.value.reason == "UNKNOWN_FIELD"


def test_a_reader_lives_through_a_server_restart(server_factory, project, tmp_path):
    server = start(server_factory, project)
    reader = LocalReader(tmp_path / "data")
    first = reader.get("user-3")
    assert first is not None and not first.memberships
    assert server.stop() == 0
    assert reader.get("user-3") == first  # the file outlives the server
    server = server_factory("--project", str(project[0]))
    with grpc.insecure_channel(server.address) as ch:
        ack = ingest_pb2_grpc.IngestServiceStub(ch).Track(ingest_pb2.TrackRequest(event=page_view("user-3")), timeout=10)
    record = reader.get("user-3", min_token=ack.consistency_token)
    assert [m.audience_id for m in record.memberships] == ["viewed"]


def test_a_replaced_data_directory_is_reopened(server_factory, project, tmp_path):
    server = start(server_factory, project)
    reader = LocalReader(tmp_path / "data", recheck_interval=0)
    assert reader.get("user-3") is not None
    assert server.stop() == 0
    shutil.rmtree(tmp_path / "data")
    with pytest.raises(LocalReaderError) as err:
        reader.get("user-3")
    assert err.value.reason == "STORAGE_UNAVAILABLE"
    start(server_factory, project)
    assert reader.get("user-3") is not None and reader.get("user-3").memberships == []


def test_another_layout_version_is_refused(server_factory, project, tmp_path):
    server = start(server_factory, project)
    assert server.stop() == 0
    env = lmdb.open(str(tmp_path / "data" / "lmdb"), max_dbs=64)
    with env.begin(write=True) as txn:
        txn.put(b"layout", struct.pack("<I", 999), db=env.open_db(b"meta", txn=txn))
    env.close()
    reader = LocalReader(tmp_path / "data")
    with pytest.raises(LayoutMismatchError, match="layout 999"):
        reader.get("user-1")


# -- read-your-writes ----------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_every_read_path_sees_a_track_at_once_with_its_token(server_factory, project, tmp_path, workers):
    server = start(server_factory, project, "--workers", str(workers))
    reader = LocalReader(tmp_path / "data")
    # Track on one connection, read on others: with --workers they land on different processes.
    with grpc.insecure_channel(server.address) as ch, Client(server.address, connections=2) as client:
        track = ingest_pb2_grpc.IngestServiceStub(ch).Track
        tokens = []
        for i in range(1000):
            key = f"user-{i + 1}"
            token = track(ingest_pb2.TrackRequest(event=page_view(key)), timeout=10).consistency_token
            tokens.append(token)
            path = i % 4
            if path == 0:
                seen = [m.audience_id for m in client.get(key, min_token=token).memberships]
            elif path == 1:
                seen = [m.audience_id for m in client.batch_get([key], min_token=token).records[0].memberships]
            elif path == 2:
                seen = [m.audience_id for m in client.check_membership(key, ["viewed"], min_token=token)]
            else:
                seen = [m.audience_id for m in reader.get(key, min_token=token).memberships]
            assert seen == ["viewed"], (i, path)
    positions = [decode_token(t) for t in tokens]
    assert positions == sorted(positions) and len(set(positions)) == 1000


def test_a_token_from_the_future_is_not_yet_consistent(server_factory, project, tmp_path):
    from grpc_status import rpc_status
    from google.rpc import error_details_pb2

    from qualify.v1 import audience_pb2, audience_pb2_grpc, personalize_pb2, personalize_pb2_grpc

    server = start(server_factory, project)
    reader = LocalReader(tmp_path / "data")
    future = encode_token(reader.position() + 1_000_000)
    with grpc.insecure_channel(server.address) as ch:
        personalize = personalize_pb2_grpc.PersonalizeServiceStub(ch)
        calls = [
            lambda: personalize.Get(personalize_pb2.GetRequest(collection="customers", key="user-1",
                                                               min_token=future), timeout=0.3),
            lambda: personalize.BatchGet(personalize_pb2.BatchGetRequest(collection="customers", keys=["user-1"],
                                                                         min_token=future)),  # no deadline: 1 s
            lambda: audience_pb2_grpc.AudienceServiceStub(ch).CheckMembership(
                audience_pb2.CheckMembershipRequest(person_key="user-1", min_token=future), timeout=0.3),
        ]
        for call in calls:
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert time.monotonic() - t0 < 2
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            details = {}
            for d in rpc_status.from_call(err.value).details:
                for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
                    if d.Is(kind.DESCRIPTOR):
                        details[kind] = kind()
                        d.Unpack(details[kind])
            assert details[error_details_pb2.ErrorInfo].reason == "NOT_YET_CONSISTENT"
            assert details[error_details_pb2.RetryInfo].retry_delay.ToNanoseconds() > 0
        with pytest.raises(grpc.RpcError) as err:
            personalize.Get(personalize_pb2.GetRequest(collection="customers", key="user-1", min_token=b"junk"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(NotYetConsistentError):
        reader.get("user-1", min_token=future, max_wait=0.05)
    with reader.snapshot(), pytest.raises(NotYetConsistentError):
        reader.get("user-1", min_token=future)
