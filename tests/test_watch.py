"""AudienceService.WatchMemberships against a real server: from now, from a
sequence (across a restart), with a snapshot, filtered, and a consumer too
slow to keep up. What a watch delivers is compared with the changelog read
straight from LMDB: every change, in order, no gap, no repeat.
"""

from __future__ import annotations

import queue
import threading
import uuid

import grpc
import pytest

from conftest import QualifyServer, write_realtime_project
from qualify.clients._errors import error_from_rpc_error
from qualify.v1 import audience_pb2, audience_pb2_grpc
from test_audiences import ENTER, EXIT, Api, changelog, ev, page

NOW, SEQUENCE, SNAPSHOT = audience_pb2.WATCH_START_NOW, audience_pb2.WATCH_START_SEQUENCE, audience_pb2.WATCH_START_SNAPSHOT


def anon_views(n: int, tag: str = "") -> list:
    """n page views by n new anonymous people (each enters an 'ever viewed a page' audience)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [page(anon=f"{tag}-{i:06d}", path="/") for i in range(n)]


def send_many(api: Api, events: list) -> None:
    for i in range(0, len(events), 1000):
        api.send(*events[i:i + 1000])


def as_rows(changes) -> list[tuple]:
    return [(c.sequence, c.audience_id, c.person_key, c.direction) for c in changes]


def log_rows(lmdb_dir, after: int = 0, audiences: set | None = None) -> list[tuple]:
    return [(seq, r[0], r[1], r[2]) for seq, r in changelog(lmdb_dir, after) if audiences is None or r[0] in audiences]


class Marker(int):
    """The snapshot_end_sequence of the message that ends a snapshot."""


class Watcher:
    """A watch stream read on a thread into a queue: each change, a Marker, or the RpcError that ended it."""

    def __init__(self, channel, request: audience_pb2.WatchMembershipsRequest):
        self.call = audience_pb2_grpc.AudienceServiceStub(channel).WatchMemberships(request)
        self.items: queue.Queue = queue.Queue()
        self.messages = 0
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        try:
            for message in self.call:
                self.messages += 1
                for change in message.changes:
                    self.items.put(change)
                if message.HasField("snapshot_end_sequence"):
                    assert not message.changes
                    self.items.put(Marker(message.snapshot_end_sequence))
        except grpc.RpcError as err:
            self.items.put(err)

    def take(self, n: int, timeout: float = 20.0) -> list:
        out = []
        for _ in range(n):
            item = self.items.get(timeout=timeout)
            assert not isinstance(item, grpc.RpcError), item
            out.append(item)
        return out

    def changes(self, n: int, timeout: float = 20.0) -> list:
        got = self.take(n, timeout)
        assert not any(isinstance(c, Marker) for c in got), got
        return got

    def cancel(self):
        self.call.cancel()
        self.thread.join(5)


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_warehouse):
    work = tmp_path_factory.mktemp("watch")
    write_realtime_project(work, demo_warehouse)
    s = QualifyServer(work, "--project", str(work / "qualify.toml")).start()
    s.api = Api(s.address)
    s.lmdb = work / "data" / "lmdb"
    s.api.create("viewers", ev("page_views"))
    s.api.create("searchers", ev("searches"))
    yield s
    s.api.close()
    assert s.stop() == 0, s.log()


def test_from_now_delivers_each_change_as_it_commits(server):
    head = log_rows(server.lmdb)[-1][0] if log_rows(server.lmdb) else 0
    w = Watcher(server.api.channel, audience_pb2.WatchMembershipsRequest(start=NOW))
    try:
        send_many(server.api, anon_views(50))
        got = as_rows(w.changes(50))
        assert got == log_rows(server.lmdb, head)
        assert all(d == ENTER for _, _, _, d in got)
        assert w.items.empty()
    finally:
        w.cancel()


def test_resume_after_a_sequence_replays_the_log_then_goes_live(server):
    send_many(server.api, anon_views(30))
    rows = log_rows(server.lmdb)
    after = rows[-20][0]
    w = Watcher(server.api.channel, audience_pb2.WatchMembershipsRequest(start=SEQUENCE, after_sequence=after))
    try:
        assert as_rows(w.changes(19)) == rows[-19:]
        send_many(server.api, anon_views(5))
        assert as_rows(w.changes(5)) == log_rows(server.lmdb, rows[-1][0])
    finally:
        w.cancel()


def test_filtered_watch_sees_only_its_audiences(server):
    head = log_rows(server.lmdb)[-1][0]
    w = Watcher(server.api.channel, audience_pb2.WatchMembershipsRequest(start=NOW, audience_ids=["searchers"]))
    try:
        from test_audiences import track

        send_many(server.api, anon_views(10) + [track("Products Searched", anon=f"s-{i}", query="x") for i in range(3)])
        got = as_rows(w.changes(3))
        assert got == log_rows(server.lmdb, head, {"searchers"})
        assert {a for _, a, _, _ in got} == {"searchers"}
    finally:
        w.cancel()


def test_snapshot_lists_members_then_the_marker_then_live_changes(server):
    server.api.create("snap", ev("page_views"))
    send_many(server.api, anon_views(7, "snapshot"))
    w = Watcher(server.api.channel, audience_pb2.WatchMembershipsRequest(start=SNAPSHOT, audience_ids=["snap"]))
    try:
        members = set(server.api.aud.ListMembers(audience_pb2.ListMembersRequest(id="snap"), timeout=10).person_keys)
        items = w.take(len(members) + 1)
        snapshot, marker = items[:-1], items[-1]
        assert {c.person_key for c in snapshot} == members
        assert all(c.sequence == 0 and c.direction == ENTER for c in snapshot)
        assert isinstance(marker, Marker) and marker == log_rows(server.lmdb)[-1][0]
        send_many(server.api, anon_views(2, "after-snapshot"))
        assert as_rows(w.changes(2)) == log_rows(server.lmdb, marker, {"snap"})
    finally:
        w.cancel()


def test_bad_requests_are_answered_with_details(server):
    stub = audience_pb2_grpc.AudienceServiceStub(server.api.channel)
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.WatchMemberships(audience_pb2.WatchMembershipsRequest(audience_ids=["nope"]), timeout=5)))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_from_rpc_error(info.value).reason == "AUDIENCE_NOT_FOUND"
    with pytest.raises(grpc.RpcError) as info:
        next(iter(stub.WatchMemberships(audience_pb2.WatchMembershipsRequest(start=SEQUENCE, after_sequence=10**12), timeout=5)))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in error_from_rpc_error(info.value).field_violations] == ["after_sequence"]


def test_a_consumer_that_falls_behind_is_told_and_resumes_from_the_log(tmp_path, demo_warehouse):
    write_realtime_project(tmp_path, demo_warehouse, "[realtime]\nwatch_buffer = 100\nwatch_max_lag = 1000\n")
    s = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml")).start()
    api = Api(s.address)
    lmdb_dir = tmp_path / "data" / "lmdb"
    try:
        api.create("viewers", ev("page_views"))
        call = audience_pb2_grpc.AudienceServiceStub(api.channel).WatchMemberships(
            audience_pb2.WatchMembershipsRequest(start=NOW))
        # Long keys make the stream's bytes outgrow the transport's windows while nobody reads.
        send_many(api, anon_views(20_000, "slow-" + "x" * 200))
        received = []
        with pytest.raises(grpc.RpcError) as info:
            for message in call:
                received += message.changes
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        err = error_from_rpc_error(info.value)
        assert err.reason == "WATCH_FELL_BEHIND"
        last = int(err.metadata["last_sequence"])
        assert received and received[-1].sequence == last
        assert len(received) < 20_000
        # Resume from the log: together, exactly the changelog.
        w = Watcher(api.channel, audience_pb2.WatchMembershipsRequest(start=SEQUENCE, after_sequence=last))
        try:
            rest = w.changes(20_000 - len(received))
        finally:
            w.cancel()
        assert as_rows(received + rest) == log_rows(lmdb_dir)[-20_000:]
    finally:
        api.close()
        assert s.stop() == 0, s.log()


def test_resume_across_a_restart_has_no_gap(tmp_path, demo_warehouse):
    write_realtime_project(tmp_path, demo_warehouse)
    lmdb_dir = tmp_path / "data" / "lmdb"
    s = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml")).start()
    api = Api(s.address)
    api.create("viewers", ev("page_views"))
    w = Watcher(api.channel, audience_pb2.WatchMembershipsRequest(start=NOW))
    send_many(api, anon_views(10))
    seen = w.changes(10)
    api.close()
    assert s.stop() == 0, s.log()
    w.cancel()
    offline = log_rows(lmdb_dir)
    s = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml")).start()
    api = Api(s.address)
    try:
        send_many(api, anon_views(5))
        api.aud.DeleteAudience(audience_pb2.DeleteAudienceRequest(id="viewers"), timeout=30)
        w = Watcher(api.channel, audience_pb2.WatchMembershipsRequest(start=SEQUENCE, after_sequence=seen[-1].sequence))
        rest = w.changes(5 + 15)
        w.cancel()
        assert as_rows(seen + rest) == log_rows(lmdb_dir)
        assert as_rows(seen) == offline[-10:]
        assert [c.direction for c in rest[-15:]] == [EXIT] * 15
    finally:
        api.close()
        assert s.stop() == 0, s.log()


def test_a_resume_ahead_of_the_changelog_waits_for_it_when_told_to(tmp_path):
    """A cluster node's copy may trail a position another node handed out: it waits (catch_up), one node refuses."""
    import asyncio

    from qualify.server.domain.changes import Cause, Direction, MembershipChange
    from qualify.server.domain.errors import InvalidRequest
    from qualify.server.services.feed import ChangeFeed
    from qualify.server.services.watch import Start, WatchService
    from qualify.server.storage.lmdb_store import open_env
    from qualify.server.storage.realtime import RealtimeStore
    from qualify.server.storage.realtime_reads import ChangelogView

    env = open_env(tmp_path / "lmdb", 1 << 26, readonly=False)
    with env.begin(write=True) as txn:
        store = RealtimeStore(env, txn)
    change = MembershipChange("a", "user-1", Direction.ENTER, 1, Cause.EVENT)

    async def main():
        feed = ChangeFeed(0)
        with pytest.raises(InvalidRequest):  # one node: sequence 1 never existed
            await anext(WatchService(feed, ChangelogView(env), 100, 1000).watch([], Start.SEQUENCE, 1))
        watch = WatchService(feed, ChangelogView(env), 100, 1000, catch_up=5.0).watch([], Start.SEQUENCE, 1)
        first = asyncio.ensure_future(anext(watch))
        await asyncio.sleep(0.1)
        assert not first.done()  # waiting for sequence 1 to arrive here
        with env.begin(write=True) as txn:
            rows = store.append_changes(txn, [change, change])
        feed.publish(rows)
        batch = await asyncio.wait_for(first, 5)
        assert [c.sequence for c in batch] == [2]  # what follows the position, not the position again
        await watch.aclose()

    asyncio.run(main())
    env.close()
