"""Realtime syncs against real destinations: a signed-webhook receiver that
fails a share of requests and goes down for a while, and a real nats-server
with JetStream. What arrives is compared with the changelog read straight
from LMDB: every change of the sync's audiences, in order per person, and
duplicates only as redeliveries carrying the same sequence and content.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2

from conftest import QualifyServer, eventually, write_realtime_project
from qualify.clients._errors import error_from_rpc_error
from qualify.server.delivery.destinations import parse_retry_after, sign
from qualify.v1 import sync_pb2, sync_pb2_grpc
from receivers import NatsServer, WebhookReceiver, find_nats_server
from test_audiences import Api, changelog, ev, page

SECRET = "s3cret-s3cret-s3cret"
FAST_RETRIES = '[delivery]\nretry_initial = "20ms"\nretry_max = "200ms"\n'


def anon_views(n: int, tag: str = "") -> list:
    tag = tag or uuid.uuid4().hex[:8]
    return [page(anon=f"{tag}-{i:05d}", path="/") for i in range(n)]


def send_many(api: Api, events: list, per_call: int = 50) -> None:
    for i in range(0, len(events), per_call):
        api.send(*events[i:i + per_call])


def expected(lmdb_dir, audiences: set[str], after: int = 0) -> dict[int, tuple]:
    return {seq: (row[0], row[1], {1: "enter", 2: "exit"}[row[2]]) for seq, row in changelog(lmdb_dir, after)
            if row[0] in audiences}


def check_arrivals(accepted: list[dict], want: dict[int, tuple]) -> None:
    """Exactly the changelog; per person in order; repeats identical to the first arrival."""
    first: dict[int, dict] = {}
    for c in accepted:
        if c["sequence"] in first:
            assert c == first[c["sequence"]], "a redelivery differs from the first delivery"
        else:
            first[c["sequence"]] = c
    assert {s: (c["audience_id"], c["person_key"], c["direction"]) for s, c in first.items()} == want
    by_person: dict[str, list[int]] = {}
    for c in first.values():  # dicts keep first-arrival order
        by_person.setdefault(c["person_key"], []).append(c["sequence"])
    for person, seqs in by_person.items():
        assert seqs == sorted(seqs), f"{person}'s changes arrived out of order: {seqs}"


def webhook(url: str, **kw) -> sync_pb2.WebhookDestination:
    return sync_pb2.WebhookDestination(url=url, secret=SECRET, **kw)


class Server:
    def __init__(self, work, warehouse, extra: str = ""):
        self.work = work
        write_realtime_project(work, warehouse, FAST_RETRIES + extra)
        self.lmdb = work / "data" / "lmdb"
        self.start()

    def start(self):
        self.server = QualifyServer(self.work, "--project", str(self.work / "qualify.toml")).start()
        self.api = Api(self.server.address)
        self.syncs = sync_pb2_grpc.SyncServiceStub(self.api.channel)
        return self

    def stop(self):
        self.api.close()
        code = self.server.stop()
        assert code == 0, self.server.log()

    def status(self, sync_id: str) -> sync_pb2.SyncStatus:
        return self.syncs.GetSync(sync_pb2.GetSyncRequest(id=sync_id), timeout=10).sync.status

    def create(self, **kw) -> sync_pb2.Sync:
        return self.syncs.CreateSync(sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(**kw)), timeout=10).sync


@pytest.fixture
def server(tmp_path, demo_warehouse):
    s = Server(tmp_path, demo_warehouse)
    s.api.create("viewers", ev("page_views"))
    s.api.create("searchers", ev("searches"))
    yield s
    s.stop()


@pytest.fixture
def receiver():
    r = WebhookReceiver(SECRET)
    yield r
    r.close()


def error_of(call, *args, **kw):
    with pytest.raises(grpc.RpcError) as info:
        call(*args, **kw)
    return info.value.code(), error_from_rpc_error(info.value)


# ---------------------------------------------------------------- the API


def test_create_get_list_update_delete(server, receiver):
    created = server.create(id="crm", audience_ids=["viewers"], fields=["plan"],
                            webhook=webhook(receiver.url, max_batch_size=10))
    assert created.webhook.secret == "" and created.webhook.url == receiver.url  # the secret is input only
    assert created.webhook.max_batch_size == 10 and created.webhook.max_attempts == 10
    assert not created.managed_by_project
    server.create(id="bus", audience_ids=["searchers"], nats=sync_pb2.NatsDestination(url="nats://127.0.0.1:1", subject="q.{audience}"))
    listed = server.syncs.ListSyncs(sync_pb2.ListSyncsRequest(page_size=1), timeout=10)
    assert [s.id for s in listed.syncs] == ["bus"] and listed.next_page_token == "bus"
    rest = server.syncs.ListSyncs(sync_pb2.ListSyncsRequest(page_token="bus"), timeout=10)
    assert [s.id for s in rest.syncs] == ["crm"] and rest.next_page_token == ""

    updated = server.syncs.UpdateSync(sync_pb2.UpdateSyncRequest(
        sync=sync_pb2.Sync(id="crm", audience_ids=["viewers", "searchers"]),
        update_mask=field_mask_pb2.FieldMask(paths=["audience_ids"])), timeout=10).sync
    assert list(updated.audience_ids) == ["viewers", "searchers"] and list(updated.fields) == ["plan"]
    # A destination update without the secret keeps it: deliveries stay signed.
    server.syncs.UpdateSync(sync_pb2.UpdateSyncRequest(
        sync=sync_pb2.Sync(id="crm", webhook=sync_pb2.WebhookDestination(url=receiver.url)),
        update_mask=field_mask_pb2.FieldMask(paths=["webhook"])), timeout=10)
    send_many(server.api, anon_views(3))
    receiver.wait_for(set(expected(server.lmdb, {"viewers"})))
    assert receiver.bad_signatures == 0

    server.syncs.DeleteSync(sync_pb2.DeleteSyncRequest(id="crm"), timeout=10)
    code, err = error_of(server.syncs.GetSync, sync_pb2.GetSyncRequest(id="crm"), timeout=10)
    assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SYNC_NOT_FOUND")


@pytest.mark.parametrize("sync, field", [
    (dict(id="Bad Id", audience_ids=["viewers"]), "sync.id"),
    (dict(id="x", audience_ids=[]), "sync.audience_ids"),
    (dict(id="x", audience_ids=["nope"]), "sync.audience_ids[0]"),
    (dict(id="x", audience_ids=["viewers"], fields=["no_such_field"]), "sync.fields[0]"),
    (dict(id="x", audience_ids=["viewers"], fields=["nowhere.plan"]), "sync.fields[0]"),
    (dict(id="x", audience_ids=["viewers"], webhook=sync_pb2.WebhookDestination(url="ftp://x", secret=SECRET)), "sync.webhook.url"),
    (dict(id="x", audience_ids=["viewers"], webhook=sync_pb2.WebhookDestination(url="http://x", secret="short")), "sync.webhook.secret"),
    (dict(id="x", audience_ids=["viewers"], webhook=sync_pb2.WebhookDestination(url="http://x", secret=SECRET, max_batch_size=5000)),
     "sync.webhook.max_batch_size"),
    (dict(id="x", audience_ids=["viewers"], nats=sync_pb2.NatsDestination(url="nats://h:1", subject="a.*")), "sync.nats.subject"),
    (dict(id="x", audience_ids=["viewers"]), "sync.destination"),
])
def test_invalid_syncs_name_the_field(server, sync, field):
    if "webhook" not in sync and "nats" not in sync and field != "sync.destination":
        sync["webhook"] = webhook("http://127.0.0.1:9/hook")
    code, err = error_of(server.syncs.CreateSync, sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(**sync)), timeout=10)
    assert (code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
    assert field in [f for f, _ in err.field_violations], err.field_violations


def test_duplicate_and_unknown_ids(server, receiver):
    server.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url))
    code, err = error_of(server.create, id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url))
    assert (code, err.reason) == (grpc.StatusCode.ALREADY_EXISTS, "SYNC_ALREADY_EXISTS")
    for call, req in [(server.syncs.DeleteSync, sync_pb2.DeleteSyncRequest(id="nope")),
                      (server.syncs.ListDeadLetters, sync_pb2.ListDeadLettersRequest(id="nope")),
                      (server.syncs.ReplayDeadLetters, sync_pb2.ReplayDeadLettersRequest(id="nope"))]:
        code, err = error_of(call, req, timeout=10)
        assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "SYNC_NOT_FOUND")


# ---------------------------------------------------------------- webhook delivery


def test_changes_arrive_signed_with_person_fields(server, receiver):
    server.create(id="crm", audience_ids=["viewers"], fields=["plan", "ltv"], webhook=webhook(receiver.url))
    send_many(server.api, [page("user-1", "/"), page("user-2", "/")] + anon_views(1))
    want = expected(server.lmdb, {"viewers"})
    receiver.wait_for(set(want))
    check_arrivals(receiver.accepted, want)
    got = {c["person_key"]: c for c in receiver.accepted}
    assert set(got["user-1"]["fields"]) == {"plan", "ltv"}
    assert got["user-1"]["cause"] == "event" and got["user-1"]["message_id"]
    assert [k for k in got if k.startswith("anon:")] and all(
        got[k]["fields"] == {} for k in got if k.startswith("anon:"))
    eventually(lambda: server.status("crm").delivered == len(want), lambda: server.status("crm"))  # counted once the receiver's answer is in


@pytest.mark.parametrize("restart", ["sigterm", "sigkill"])
def test_outage_and_restart_lose_nothing(server, receiver, restart):
    """30% of requests fail; the receiver goes down; the server restarts (or is killed) during the outage."""
    receiver.fail_share = 0.3
    server.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url, max_batch_size=20))
    send_many(server.api, anon_views(200, "before"))
    receiver.down()
    send_many(server.api, anon_views(200, "during"))
    eventually(lambda: server.status("crm").last_error.startswith("ClientConnectorError"), lambda: server.status("crm"))
    status = server.status("crm")
    assert status.retries > 0 and status.lag.ToMilliseconds() > 0
    if restart == "sigkill":  # the cursor may be up to 200 ms old: redeliveries, never losses
        server.api.close()
        server.server.kill()
    else:
        server.stop()
    server.start()
    send_many(server.api, anon_views(100, "restarted"))
    receiver.up()
    want = expected(server.lmdb, {"viewers"})
    assert len(want) == 500
    receiver.wait_for(set(want))
    check_arrivals(receiver.accepted, want)
    eventually(lambda: server.status("crm").lag.ToMilliseconds() == 0, lambda: server.status("crm"))


def test_batches_respect_max_batch_size_and_wait_up_to_max_delay(server, receiver):
    server.create(id="small", audience_ids=["viewers"], webhook=webhook(receiver.url, max_batch_size=7))
    send_many(server.api, anon_views(100), per_call=100)  # 100 changes in one transaction
    receiver.wait_for(set(expected(server.lmdb, {"viewers"})))
    assert max(receiver.batches) == 7 and sum(receiver.batches) == 100
    server.syncs.DeleteSync(sync_pb2.DeleteSyncRequest(id="small"), timeout=10)
    receiver.batches.clear()
    head = max(expected(server.lmdb, {"viewers"}))
    delay = duration_pb2.Duration(nanos=400_000_000)
    server.create(id="lingers", audience_ids=["viewers"], webhook=webhook(receiver.url, max_delay=delay))
    for event in anon_views(3):  # three commits in a row, well inside max_delay: one request
        server.api.send(event)
    receiver.wait_for(set(expected(server.lmdb, {"viewers"}, head)))
    assert receiver.batches == [3]


def test_retry_after_is_honoured(server, receiver):
    receiver.status, receiver.retry_after = 503, "1"
    server.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url))
    send_many(server.api, anon_views(1))
    eventually(lambda: receiver.requests >= 1, lambda: "the first request never came")
    # The point of the test: a window, well inside Retry-After (1s) and well past the backoff's
    # first retries (0.1-0.2s, then 0.2-0.4s), in which no retry may come. Counted from the
    # first request, not from the send, so a slow first delivery cannot eat into it.
    time.sleep(0.5)
    assert receiver.requests == 1  # backoff alone would have retried several times by now
    receiver.status = None
    receiver.wait_for(set(expected(server.lmdb, {"viewers"})), timeout=5)
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0 and parse_retry_after("junk") is None


def test_dead_letters_after_max_attempts_then_replay(server, receiver):
    receiver.status = 500
    server.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url, max_attempts=3))
    send_many(server.api, anon_views(5))
    want = expected(server.lmdb, {"viewers"})
    eventually(lambda: server.status("crm").dead_lettered == 5, lambda: server.status("crm"), timeout=20)
    letters = server.syncs.ListDeadLetters(sync_pb2.ListDeadLettersRequest(id="crm", page_size=2), timeout=10)
    assert len(letters.dead_letters) == 2 and letters.next_page_token
    assert letters.dead_letters[0].attempts == 3 and "HTTP 500" in letters.dead_letters[0].error
    # Later changes are not held up by the dead ones.
    receiver.status = None
    send_many(server.api, anon_views(2, "later"))
    later = expected(server.lmdb, {"viewers"}, max(want))
    receiver.wait_for(set(later))
    # The CLI lists and replays them.
    out = subprocess.run([sys.executable, "-m", "qualify.server.cli", "syncs", "dead-letters", "crm",
                          "--address", server.server.address], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if "HTTP 500" in line]) == 5
    out = subprocess.run([sys.executable, "-m", "qualify.server.cli", "syncs", "replay", "crm",
                          "--address", server.server.address], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "5" in out.stdout, out.stderr
    receiver.wait_for(set(want))
    eventually(lambda: server.status("crm").dead_lettered == 0)
    assert not server.syncs.ListDeadLetters(sync_pb2.ListDeadLettersRequest(id="crm"), timeout=10).dead_letters


def test_a_rejected_batch_is_dead_lettered_at_once(server, receiver):
    receiver.status = 400
    server.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url))
    send_many(server.api, anon_views(1))
    eventually(lambda: server.status("crm").dead_lettered == 1)
    assert receiver.requests == 1 and server.status("crm").retries == 0


def test_signature_is_what_the_readme_documents():
    body = b'{"sync_id":"crm","changes":[]}'
    import hashlib
    import hmac
    assert sign(SECRET, "1700000000", body) == "v1=" + hmac.new(
        SECRET.encode(), b"1700000000." + body, hashlib.sha256).hexdigest()


# ---------------------------------------------------------------- the project file and the CLI


def test_syncs_declared_in_the_project_file(tmp_path, demo_warehouse, receiver):
    extra = f"""
[[syncs]]
id = "crm"
audiences = ["viewers"]
fields = ["plan"]
[syncs.webhook]
url = "{receiver.url}"
secret_env = "QUALIFY_TEST_SECRET"
max_batch_size = 50
"""
    import os
    os.environ["QUALIFY_TEST_SECRET"] = SECRET
    try:
        s = Server(tmp_path, demo_warehouse, extra)
    finally:
        del os.environ["QUALIFY_TEST_SECRET"]
    try:
        s.api.create("viewers", ev("page_views"))
        sync = s.syncs.GetSync(sync_pb2.GetSyncRequest(id="crm"), timeout=10).sync
        assert sync.managed_by_project and sync.webhook.max_batch_size == 50
        code, err = error_of(s.syncs.DeleteSync, sync_pb2.DeleteSyncRequest(id="crm"), timeout=10)
        assert (code, err.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "SYNC_MANAGED_BY_PROJECT")
        send_many(s.api, [page("user-3", "/")])
        receiver.wait_for(set(expected(s.lmdb, {"viewers"})))
        eventually(lambda: s.status("crm").delivered == 1, lambda: s.status("crm"))
        out = subprocess.run([sys.executable, "-m", "qualify.server.cli", "syncs", "--address", s.server.address],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        header, row = out.stdout.splitlines()[:2]
        assert header.split()[:3] == ["SYNC", "DESTINATION", "AUDIENCES"]
        assert row.split()[0] == "crm" and receiver.url in row
        listed = json.loads(subprocess.run([sys.executable, "-m", "qualify.server.cli", "syncs", "--json", "--address",
                                            s.server.address], capture_output=True, text=True, timeout=30).stdout)
        assert listed[0]["id"] == "crm" and listed[0]["status"]["delivered"] == "1"
    finally:
        s.stop()


# ---------------------------------------------------------------- NATS JetStream


@pytest.fixture
def nats_server(tmp_path):
    binary = find_nats_server()
    if binary is None:
        pytest.skip("nats-server not installed; .ci/run installs it with apt")
    store = tmp_path / "nats-store"
    store.mkdir()
    n = NatsServer(binary, store).start()
    asyncio.run(_add_stream(n.url))
    yield n
    n.stop()


async def _add_stream(url: str) -> None:
    import nats
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name="QUALIFY", subjects=["qualify.>"])
    await nc.close()


async def _stream_messages(url: str) -> list[tuple[str, str, dict]]:
    import nats
    nc = await nats.connect(url)
    js = nc.jetstream()
    info = await js.stream_info("QUALIFY")
    out = []
    for seq in range(1, info.state.last_seq + 1):
        msg = await js.get_msg("QUALIFY", seq)
        out.append((msg.subject, msg.headers["Nats-Msg-Id"], json.loads(msg.data)))
    await nc.close()
    return out


def test_nats_jetstream_through_an_outage_and_a_restart(tmp_path, demo_warehouse, nats_server):
    (tmp_path / "qualify").mkdir()
    s = Server(tmp_path / "qualify", demo_warehouse)
    try:
        s.api.create("viewers", ev("page_views"))
        s.create(id="bus", audience_ids=["viewers"], nats=sync_pb2.NatsDestination(url=nats_server.url, subject="qualify.{audience}"))
        send_many(s.api, anon_views(50, "before"))
        nats_server.stop()
        send_many(s.api, anon_views(50, "during"))
        eventually(lambda: s.status("bus").last_error, lambda: "the outage was never reported", timeout=15)
        s.stop()
        s.start()
        nats_server.start()
        send_many(s.api, anon_views(20, "after"))
        want = expected(s.lmdb, {"viewers"})
        deadline = time.monotonic() + 30
        while True:
            msgs = asyncio.run(_stream_messages(nats_server.url))
            if len(msgs) >= len(want) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(msgs) == len(want) == 120  # JetStream dropped any redelivery by its message id
        assert all(subject == "qualify.viewers" for subject, _, _ in msgs)
        assert all(mid == f"bus:{c['sequence']}" for _, mid, c in msgs)
        check_arrivals([c for _, _, c in msgs], want)
    finally:
        s.stop()


def test_sync_metrics_move(tmp_path, demo_warehouse, receiver):
    from conftest import free_port
    from test_security import scrape

    port = free_port()
    s = Server(tmp_path, demo_warehouse, f"[metrics]\nport = {port}\n")
    try:
        s.api.create("viewers", ev("page_views"))
        s.create(id="crm", audience_ids=["viewers"], webhook=webhook(receiver.url))
        receiver.status = 503
        send_many(s.api, anon_views(4))
        eventually(lambda: s.status("crm").retries >= 2)
        receiver.status = None
        receiver.wait_for(set(expected(s.lmdb, {"viewers"})))
        eventually(lambda: scrape(port).get('qualify_sync_delivered_total{sync="crm"}') == 4,
                   lambda: {k: v for k, v in scrape(port).items() if "sync" in k})
        m = scrape(port)
        assert m['qualify_sync_failures_total{sync="crm"}'] >= 2
        assert m['qualify_sync_lag_seconds{sync="crm"}'] > 0
    finally:
        s.stop()
