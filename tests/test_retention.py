"""Retention: the event log and the changelog keep a bounded history; a stalled sync holds the changelog back.

Each test runs `qualify serve` on a project with short retentions and a test
clock, so history ages by moving the clock, not by sleeping.
"""

from __future__ import annotations

import grpc
import pytest

from conftest import QualifyServer, eventually, write_realtime_project
from qualify.v1 import audience_pb2, diagnostics_pb2, diagnostics_pb2_grpc, sync_pb2, sync_pb2_grpc
from receivers import WebhookReceiver
from test_audiences import CLOCK_ENV, T0, Api, TestClock, changelog, cond, ev, page

SECRET = "a-webhook-secret-of-some-length"
RETENTION = '[realtime]\nevent_retention = "60s"\nchangelog_retention = "120s"\n'
FAST_RETRIES = '[delivery]\nretry_initial = "20ms"\nretry_max = "50ms"\n'


@pytest.fixture
def served(tmp_path, demo_warehouse):
    clock = TestClock(tmp_path / "clock", T0)
    write_realtime_project(tmp_path, demo_warehouse, RETENTION + FAST_RETRIES)
    server = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml"), env={CLOCK_ENV: str(clock.path)})
    server.start()
    api = Api(server.address)
    yield server, api, clock, tmp_path / "data" / "lmdb"
    api.close()
    assert server.stop() == 0, server.log()


def events_logged(server) -> int:
    with server.channel() as ch:
        return diagnostics_pb2_grpc.DiagnosticsServiceStub(ch).GetServerInfo(
            diagnostics_pb2.GetServerInfoRequest(), timeout=5).events_logged


def test_a_window_longer_than_the_event_retention_is_refused(served):
    _, api, _, _ = served
    with pytest.raises(grpc.RpcError) as info:
        api.create("too_long", ev("page_views", scope="WITHIN", window="61s"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "event_retention" in info.value.details()
    api.create("fits", ev("page_views", scope="WITHIN", window="60s"))  # exactly the retention is fine


def test_the_event_log_keeps_its_retention_and_sequences_go_on(served):
    server, api, clock, _ = served
    api.create("ever_viewed", ev("page_views"))
    api.send(*[page(f"user-{i}", "/a", clock.now) for i in range(30)])
    assert events_logged(server) == 30
    clock.advance(30)
    api.send(page("user-100", "/b", clock.now))
    clock.advance(45)  # the first 30 are now 75 s old, the last 45 s
    eventually(lambda: events_logged(server) == 1, lambda: f"{events_logged(server)} events still logged")
    # "ever" keeps its meaning: the state is persisted, not rebuilt from the log.
    assert "ever_viewed" in api.memberships("user-3")
    api.send(page("user-101", "/c", clock.now))  # a new event is logged after the retained one
    assert events_logged(server) == 2


def test_a_stalled_sync_holds_the_changelog_back_until_it_delivers(served):
    server, api, clock, lmdb_dir = served
    receiver = WebhookReceiver(SECRET)
    receiver.down()
    try:
        api.create("viewers", ev("page_views"))
        syncs = sync_pb2_grpc.SyncServiceStub(api.channel)
        syncs.CreateSync(sync_pb2.CreateSyncRequest(sync=sync_pb2.Sync(
            id="hook", audience_ids=["viewers"],
            webhook=sync_pb2.WebhookDestination(url=receiver.url, secret=SECRET, max_attempts=1000))),
            timeout=10)
        api.send(*[page(f"user-{i}", "/a", clock.now) for i in range(5)])
        eventually(lambda: len(changelog(lmdb_dir)) == 5)
        clock.advance(300)  # past changelog_retention, but the sync has delivered nothing
        api.send(page("user-50", "/b", clock.now))  # and a change that is new
        eventually(lambda: len(changelog(lmdb_dir)) == 6)
        eventually(lambda: events_logged(server) == 1)  # a compaction slice has run since the clock moved
        assert [seq for seq, _ in changelog(lmdb_dir)] == [1, 2, 3, 4, 5, 6]  # held back for the sync
        status = lambda: syncs.GetSync(sync_pb2.GetSyncRequest(id="hook"), timeout=5).sync.status  # noqa: E731
        assert status().holds_changelog and status().lag.seconds >= 300  # and it says so
        receiver.up()
        receiver.wait_for({1, 2, 3, 4, 5, 6})
        eventually(lambda: not status().holds_changelog)
        eventually(lambda: [seq for seq, _ in changelog(lmdb_dir)] == [6],
                   lambda: f"changelog still holds {[seq for seq, _ in changelog(lmdb_dir)]}")
        # A watch cannot resume inside compacted history: it is told so, not handed a gap.
        stub = api.aud
        with pytest.raises(grpc.RpcError) as info:
            next(iter(stub.WatchMemberships(audience_pb2.WatchMembershipsRequest(
                start=audience_pb2.WATCH_START_SEQUENCE, after_sequence=2), timeout=5)))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "compacted" in info.value.details()
        first = next(iter(stub.WatchMemberships(audience_pb2.WatchMembershipsRequest(
            start=audience_pb2.WATCH_START_SEQUENCE, after_sequence=5), timeout=5)))
        assert [c.sequence for c in first.changes] == [6]
    finally:
        receiver.close()


def test_a_preview_past_its_deadline_answers_deadline_exceeded_and_ingest_goes_on(tmp_path, demo_warehouse):
    clock = TestClock(tmp_path / "clock", T0)
    write_realtime_project(tmp_path, demo_warehouse, '[realtime]\npreview_timeout = "1ms"\n')
    server = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml"), env={CLOCK_ENV: str(clock.path)})
    server.start()
    api = Api(server.address)
    try:
        api.send(*[page(f"user-{i}", "/a", clock.now) for i in range(600)])  # people to replay into the draft
        with pytest.raises(grpc.RpcError) as info:
            api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(
                condition=cond(ev("page_views")), sample_size=3), timeout=10)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "did not finish" in info.value.details()
        api.send(page("user-700", "/b", clock.now))  # the writer was never held
    finally:
        api.close()
        assert server.stop() == 0, server.log()
