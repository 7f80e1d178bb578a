"""kill -9 of a real server, during ingest and during compaction: nothing acknowledged is lost, and
memberships and the changelog after the restart equal what the pure-Python reference computes.

Each test runs ``qualify serve`` on a project with a test clock
(QUALIFY_TEST_CLOCK_FILE) and a state cache of a few people, so people are
evicted and reloaded from their stored state all the time. Events go in over
real stubs; the server is killed with SIGKILL while batches are in flight.
After the restart the event log (read read-only from LMDB) says which events
the server applied and in which order, and ``Expected`` replays exactly those
through the reference (``qualify.evaluator.reference``, via
tests/test_realtime.py's ``Reference``), at the server clock of the moment
they were applied, with every lapse between two clock positions at its own
instant. Every (audience, person) pair's changes in the changelog (direction,
effective time, what caused it, the event that did) must equal the
reference's, and the changelog's head must count every change the reference
made, for all people, once.

Timers across a restart are covered in tests/test_realtime.py
(test_restart_after_kill_9_keeps_everything_and_fires_lapses_at_startup: a
lapse after the restart, one that came due while no process ran) and
tests/test_engine.py (restarts at random points); test_kill_9_during_ingest
below also advances the clock after the restart and checks every lapse.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter

import grpc
import lmdb
import pytest

from conftest import QualifyServer, eventually, write_realtime_project
from qualify.server.domain.conditions import EventCondition, Scope, parse_condition, walk
from qualify.server.storage.eventlog import SEQ
from qualify.v1 import event_pb2, ingest_pb2, ingest_pb2_grpc
from test_audiences import (CLOCK_ENV, ENTER, EXIT, FREE, PRO, S, T0, Api, TestClock, and_, cart_add, changelog, ev,
                            event, not_, page, path_is, warehouse_rows)
from test_ingest import logged_events
from test_realtime import ATTR_TYPES, MODEL_PROPS, SESSION_TIMEOUT, Reference

AUDIENCES = {
    "k_pricing": and_(ev("page_views", "WITHIN", "30s", "GE", 2, filters=[path_is("path", "/pricing")]), FREE),
    "k_ever": ev("cart_adds", "EVER", threshold=1),
    "k_spend": ev("cart_adds", "WITHIN", "60s", "GE", 20.0, aggregation="SUM", prop="price"),
    "k_quiet": and_(not_(ev("page_views", "WITHIN", "20s", "GE", 1)), PRO),  # every pro is a member at creation
    "k_session": ev("page_views", "SESSION", comparison="GE", threshold=3),
}
KIND = {1: "event", 3: "timer", 4: "timer", 6: "audience"}  # cause -> what the reference calls it
SMALL_CACHE = "state_cache = 8\n"  # most people are evicted and reloaded from LMDB all the time


class Expected:
    """Memberships and the changelog per (audience, person), from the reference over a timeline of steps."""

    def __init__(self, rows: dict[str, dict], audiences: dict[str, dict]):
        self.ref = Reference(rows)
        self.conditions = {a: parse_condition(d, ATTR_TYPES, MODEL_PROPS) for a, d in audiences.items()}
        self.windows = sorted({c.window_us for cond in self.conditions.values() for c in walk(cond)
                               if isinstance(c, EventCondition) and c.scope is Scope.WITHIN}) + [SESSION_TIMEOUT]
        self.member: dict[tuple[str, str], bool] = {}
        self.changes: dict[tuple[str, str], list[tuple]] = {}

    def _settle(self, person: str, now: int, kind: str, mid: str = "") -> None:
        for aid, c in self.conditions.items():
            holds = self.ref.known(person) and self.ref.holds(c, person, now)
            if holds != self.member.get((aid, person), False):
                self.member[(aid, person)] = holds
                self.changes.setdefault((aid, person), []).append((ENTER if holds else EXIT, now, kind, mid))

    def create(self, people, now: int) -> None:
        for p in people:
            self._settle(p, now, "audience")

    def event(self, e: event_pb2.Event, now: int) -> None:
        if e.name == "Button Clicked":  # matches no event model: logged, changes nothing
            return
        props = {k: v for k, v in e.properties.items()}
        self.ref.add(e, props)
        self._settle(e.user_id or "anon:" + e.anonymous_id, now, "event", e.message_id)

    def advance(self, after: int, upto: int) -> None:
        """Every lapse in (after, upto], at its own instant: values change only where an event leaves a window."""
        for person, events in self.ref.events.items():
            instants = sorted({ts + w for _, _, ts, _, _ in events for w in self.windows if after < ts + w <= upto})
            for t in instants:
                self._settle(person, t, "timer")

    def members(self, person: str) -> dict[str, int]:
        """{audience: enter time} now, the enter time being the last ENTER's."""
        return {aid: self.changes[(aid, p)][-1][1] for (aid, p), m in self.member.items() if p == person and m}

    def total(self) -> int:
        return sum(len(v) for v in self.changes.values())


def server_changes(lmdb_dir) -> tuple[list[int], dict[tuple[str, str], list[tuple]]]:
    rows = changelog(lmdb_dir)
    out: dict[tuple[str, str], list[tuple]] = {}
    for _, (aid, person, direction, eff, cause, mid) in rows:
        out.setdefault((aid, person), []).append((direction, eff, KIND.get(cause, f"cause {cause}"),
                                                  mid if cause == 1 else ""))
    return [seq for seq, _ in rows], out


def head(lmdb_dir) -> int:
    env = lmdb.open(str(lmdb_dir), readonly=True, lock=True, max_dbs=64)
    try:
        with env.begin() as txn:
            raw = txn.get(b"changelog_seq", db=env.open_db(b"meta", txn=txn, create=False))
        return int.from_bytes(raw, "little") if raw else 0
    finally:
        env.close()


class People:
    """Who sends events: warehouse people (free and pro), people the warehouse lacks, anonymous visitors."""

    def __init__(self, rows: dict[str, dict], rng: random.Random):
        free = sorted(k for k, r in rows.items() if r["plan"] == "free")[:30]
        pro = sorted(k for k, r in rows.items() if r["plan"] == "pro")[:20]
        self.users = free + pro + [f"ghost-{i}" for i in range(10)]
        self.anons = [f"crash-anon-{i}" for i in range(6)]
        self.rng = rng

    def keys(self) -> list[str]:
        return self.users + ["anon:" + a for a in self.anons]

    def event(self, now: int) -> event_pb2.Event:
        r = self.rng
        who = r.choice(self.users + self.anons)
        user, anon = (who, "") if who in self.users else ("", who)
        ts = now + r.randint(-20, 2) * S
        kind = r.random()
        if kind < 0.3:
            return event(event_pb2.EVENT_TYPE_TRACK, user or "u", ts_us=ts, name="Button Clicked")  # filler
        if kind < 0.75:
            return page(user, r.choice(["/pricing", "/pricing", "/home"]), ts, anon=anon,
                        session=r.choice(["", "", "", "s1"]))
        return cart_add(user, ts, price=float(r.randint(1, 9)), anon=anon)


def stream(address: str, make, sent: dict, acked: list, stop: threading.Event,
           go: threading.Event | None = None) -> threading.Thread:
    """StreamEvents, batches of 50 as fast as the server acknowledges them, from ``go`` until ``stop`` or a kill."""

    def requests():
        n = 0
        if go is not None:
            go.wait(30)
        while not stop.is_set():
            n += 1
            batch = [make() for _ in range(50)]
            sent[n] = batch
            yield ingest_pb2.StreamEventsRequest(batch_number=n, events=batch)

    def run():
        with grpc.insecure_channel(address) as ch:
            try:
                for ack in ingest_pb2_grpc.IngestServiceStub(ch).StreamEvents(requests(), timeout=60):
                    assert not ack.rejections and ack.accepted == len(sent[ack.batch_number]), ack
                    acked.extend(e.message_id for e in sent[ack.batch_number])
            except grpc.RpcError:
                pass  # killed

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def start(tmp_path, clock: TestClock) -> tuple[QualifyServer, Api]:
    server = QualifyServer(tmp_path, "--project", str(tmp_path / "qualify.toml"), env={CLOCK_ENV: str(clock.path)})
    server.start()
    return server, Api(server.address)


def assert_matches(api: Api, lmdb_dir, expected: Expected, people: People) -> None:
    for p in people.keys():
        assert api.check(p, list(AUDIENCES)) == expected.members(p), p
    _, got = server_changes(lmdb_dir)
    mine = {k: v for k, v in got.items() if k[1] in people.keys()}
    want = {k: v for k, v in expected.changes.items() if k[1] in people.keys()}
    assert mine == want, sorted(set(mine.items()) ^ set(want.items()))[:6]


class FirstSeq:
    """The event log's first sequence, read read-only from LMDB while the server compacts it."""

    def __init__(self, lmdb_dir):
        self.env = lmdb.open(str(lmdb_dir), map_size=0, readonly=True, lock=True, max_dbs=64)
        self.db = self.env.open_db(b"events", create=False)

    def __call__(self) -> int:
        try:
            with self.env.begin() as txn, txn.cursor(db=self.db) as cur:
                return SEQ.unpack(cur.key())[0] if cur.first() else 0
        except lmdb.MapResizedError:  # the writer grew the map: adopt its size
            self.env.set_mapsize(0)
            return self()

    def wait_between(self, low: int, high: int, until, timeout: float = 30.0) -> int:
        """Polls until low < first < high and ``until()``: compaction is under way, not done."""
        deadline = time.monotonic() + timeout
        while True:
            first = self()
            if until() and low < first < high:
                return first
            assert first < high, f"compaction finished before the kill (first seq {first}): nothing tested"
            assert time.monotonic() < deadline, f"no compaction seen: first seq {first}"
            time.sleep(0.001)

    def close(self) -> int:
        first = self()
        self.env.close()
        return first


def old_history(api: Api, people: People, rng: random.Random, now: int) -> list[event_pb2.Event]:
    """30,000 events, mostly ones that match no model (they fill the log; the reference skips them)."""
    old = []
    for _ in range(30):
        batch = [people.event(now) if rng.random() < 0.04 else
                 event(event_pb2.EVENT_TYPE_TRACK, "filler", ts_us=now, name="Button Clicked") for _ in range(1000)]
        assert api.send(*batch).accepted == 1000
        old += batch
    return old


def assert_compacted_changelog(lmdb_dir, expected: Expected, cutoff: int) -> None:
    """Contiguous sequences up to a head that counts every change; each pair keeps a suffix, all its young ones."""
    seqs, got = server_changes(lmdb_dir)
    total = expected.total()
    assert head(lmdb_dir) == total and seqs == list(range(seqs[0], total + 1)), (seqs[:3], seqs[-3:], total)
    for key, want in expected.changes.items():
        kept = got.pop(key, [])
        assert kept == want[len(want) - len(kept):], (key, kept, want)
        assert len(kept) >= sum(1 for c in want if c[1] >= cutoff), (key, kept, want)
    assert not got, f"changes the reference never made: {list(got.items())[:3]}"
    at_t0 = sum(1 for cs in expected.changes.values() for c in cs if c[1] == T0)  # all old, first in sequence
    assert seqs[0] > at_t0, "the changes of the old history were not compacted"


@pytest.fixture
def rows(demo_warehouse):
    return warehouse_rows(demo_warehouse, "user_id, plan, ltv")


def test_kill_9_during_ingest(tmp_path, demo_warehouse, rows):
    write_realtime_project(tmp_path, demo_warehouse, "[realtime]\n" + SMALL_CACHE)
    clock, lmdb_dir = TestClock(tmp_path / "clock", T0), tmp_path / "data" / "lmdb"
    people = People(rows, random.Random(11))
    expected = Expected(rows, AUDIENCES)
    server, api = start(tmp_path, clock)
    try:
        for aid, definition in AUDIENCES.items():
            api.create(aid, definition)
        expected.create(sorted(rows) + people.keys(), clock.now)

        sent: dict[int, list] = {}
        acked: list[str] = []
        stop = threading.Event()
        pump = stream(server.address, lambda: people.event(clock.now), sent, acked, stop)
        eventually(lambda: len(acked) >= 1500, lambda: f"only {len(acked)} events acknowledged", timeout=60)
        api.close()
        server.kill()  # SIGKILL, with batches in flight
        stop.set()
        pump.join(10)

        # (list(): one step in C, so grpc's thread, maybe still in the request generator, cannot change it meanwhile)
        by_id = {e.message_id: e for batch in list(sent.values()) for e in batch}
        log = logged_events(tmp_path)
        counts = Counter(e.message_id for e in log)
        assert not [m for m in acked if counts[m] != 1], "acknowledged events lost or logged twice"
        assert set(counts) <= set(by_id) and max(counts.values()) == 1
        for e in log:  # the order the server applied them in, at the (fixed) server clock
            expected.event(by_id[e.message_id], clock.now)

        server, api = start(tmp_path, clock)
        assert_matches(api, lmdb_dir, expected, people)
        assert head(lmdb_dir) == expected.total()  # no change lost or recorded twice, for anyone
        with server.channel() as ch:  # and resending what was acknowledged is safe
            again = ingest_pb2_grpc.IngestServiceStub(ch).TrackBatch(
                ingest_pb2.TrackBatchRequest(events=[by_id[m] for m in acked[:1000]]), timeout=30)
        assert (again.accepted, again.duplicates) == (0, 1000)

        # Timers after the crash: every window lapses at its own instant.
        before = clock.now
        clock.advance(100)
        expected.advance(before, clock.now)
        eventually(lambda: head(lmdb_dir) == expected.total(),
                   lambda: f"{head(lmdb_dir)} changes, the reference made {expected.total()}")
        assert_matches(api, lmdb_dir, expected, people)
        api.close()
        assert server.stop() == 0, server.log()
    finally:
        api.close()
        server.kill()


def test_kill_9_during_compaction(tmp_path, demo_warehouse, rows):
    """Retention of 60 s; 30,000 events age past it at once, and the server dies while slices delete them."""
    write_realtime_project(tmp_path, demo_warehouse,
                           '[realtime]\nevent_retention = "60s"\nchangelog_retention = "60s"\n' + SMALL_CACHE)
    clock, lmdb_dir = TestClock(tmp_path / "clock", T0), tmp_path / "data" / "lmdb"
    rng = random.Random(12)
    people = People(rows, rng)
    expected = Expected(rows, AUDIENCES)
    server, api = start(tmp_path, clock)
    try:
        for aid, definition in AUDIENCES.items():
            api.create(aid, definition)
        expected.create(sorted(rows) + people.keys(), clock.now)
        old = old_history(api, people, rng, clock.now)
        for e in old:
            expected.event(e, clock.now)

        log_head = FirstSeq(lmdb_dir)
        sent: dict[int, list] = {}
        acked: list[str] = []
        stop, go = threading.Event(), threading.Event()
        pump = stream(server.address, lambda: people.event(clock.now), sent, acked, stop, go)
        before = clock.now
        clock.advance(90)  # every old event and change is past its retention now; old windows have lapsed
        go.set()  # new events stream in at the new time, between compaction's slices
        first = log_head.wait_between(len(old) // 3, len(old), until=lambda: bool(acked))
        api.close()
        server.kill()
        stop.set()
        pump.join(10)
        left = log_head.close()
        assert left >= first > len(old) // 3, (left, first)
        expected.advance(before, clock.now)

        # (list(): one step in C, so grpc's thread, maybe still in the request generator, cannot change it meanwhile)
        by_id = {e.message_id: e for batch in list(sent.values()) for e in batch}
        log = logged_events(tmp_path)
        counts = Counter(e.message_id for e in log)
        assert [e.message_id for e in log if e.message_id not in by_id] == [e.message_id for e in old[left - 1:]]
        assert not [m for m in acked if counts[m] != 1], "acknowledged events lost or logged twice"
        new = [by_id[e.message_id] for e in log if e.message_id in by_id]
        for e in new:
            expected.event(e, clock.now)

        server, api = start(tmp_path, clock)
        for p in people.keys():  # (the changelog is still being compacted: it is compared below)
            assert api.check(p, list(AUDIENCES)) == expected.members(p), p
        # Compaction resumes where the kill left it: the log keeps exactly the events inside the retention.
        eventually(lambda: [e.message_id for e in logged_events(tmp_path)] == [e.message_id for e in new],
                   lambda: f"{len(logged_events(tmp_path))} events logged, {len(new)} inside the retention")
        cutoff = clock.now - 60 * S
        eventually(lambda: changelog(lmdb_dir)[0][1][3] >= cutoff,  # the oldest change kept is young
                   lambda: f"the changelog was not compacted: {changelog(lmdb_dir)[:2]}")
        assert_compacted_changelog(lmdb_dir, expected, cutoff)
        with server.channel() as ch:  # every acknowledged event is still known, compacted or not
            stub = ingest_pb2_grpc.IngestServiceStub(ch)
            for i in range(0, len(old), 1000):
                r = stub.TrackBatch(ingest_pb2.TrackBatchRequest(events=old[i:i + 1000]), timeout=30)
                assert (r.accepted, r.duplicates) == (0, 1000)
        api.close()
        assert server.stop() == 0, server.log()
    finally:
        api.close()
        server.kill()
