"""PreviewAudience and SimulateAudience on a cluster answer as one node fed the same events (cluster/queries.py).

One NATS server, 3 Qualify nodes with 8 partitions, and a single node beside,
read "now" from one test clock file and get the same events: two hours of
product views, cart adds and orders by warehouse users, and visitors who
identify half-way, some into a user of their own partition and some of
another (a handover through the stream). Most warehouse people never send an
event: a warehouse draft counts them from the partitions' slices. Every
preview and simulation, asked of each cluster node in turn, must equal the
single node's; the last test kills a node and expects UNAVAILABLE naming the
partitions nobody answers for, then the same answers once they moved.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from google.protobuf import json_format

from clusters import NATS_SERVER, NatsCluster, QualifyCluster, anon_for, changelog_rows, nats_json, per_person
from conftest import QualifyServer, write_realtime_project
from qualify.v1 import audience_pb2
from test_audiences import (CAUSE_MERGE, CLOCK_ENV, FREE, PRO, S, T0, Api, TestClock, and_, attr, cart_add, error_of, ev, fv,
                            identify, not_, product_view, track, wait_for, warehouse_keys)

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (apt install nats-server)")

PARTITIONS = 8
MIN = 60 * S
HOUR = 60 * MIN
AUDIENCES = {
    "q_abandoners": {"absence": {"after": {"event_model": "cart_adds"}, "absent": {"event_model": "orders"},
                                 "within": "1200s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "5400s"}},
    "q_recent_viewers": ev("product_views", "WITHIN", "600s", "GE", 2),
    "q_free_carts": and_(ev("cart_adds", "WITHIN", "1800s", "GE", 1), FREE),
}
DRAFTS = {
    "free": FREE,  # mostly warehouse-only people
    "pro_without_views": and_(PRO, not_(ev("product_views", "EVER", comparison="GE", threshold=1))),
    "carted_ever": ev("cart_adds", "EVER", comparison="GE", threshold=1),
    "rich_viewers": and_(ev("product_views", "EVER", comparison="GE", threshold=2), attr("ltv", "GT", fv(500.0))),
}


def order(user, ts_us, sku, **kw):
    return track("Order Completed", user, ts_us, sku=sku, total=10.0, **kw)


def cond(d: dict):
    c = audience_pb2.Audience().condition
    json_format.ParseDict(d, c)
    return c


class Fed:
    def __init__(self, cluster: QualifyCluster, single: QualifyServer, solo: Api, clock: TestClock, first: int,
                 last: int):
        self.cluster, self.single, self.solo, self.clock, self.first, self.last = (cluster, single, solo, clock,
                                                                                    first, last)


@pytest.fixture(scope="module")
def fed(tmp_path_factory, demo_warehouse):
    work = tmp_path_factory.mktemp("cluster-queries")
    nats = NatsCluster(work / "nats", 1).start()
    clock = TestClock(work / "clock", T0)
    single_dir = work / "single"
    single_dir.mkdir()
    single = QualifyServer(single_dir, "--project", str(write_realtime_project(single_dir, demo_warehouse)),
                           env={CLOCK_ENV: str(clock.path)}).start()
    try:
        cluster = QualifyCluster(work / "cluster", nats, demo_warehouse, 3, clock, partitions=PARTITIONS,
                                 replicas=1).start()
    except BaseException:
        single.kill()
        nats.stop()
        raise
    solo = Api(single.address)
    try:
        for aid, definition in AUDIENCES.items():
            cluster.api().create(aid, definition)
            solo.create(aid, definition)
        users = sorted(warehouse_keys(demo_warehouse, "TRUE"), key=lambda k: int(k.split("-")[1]))[:30]
        visitors = {anon_for(u, i, i % 2 == 0, PARTITIONS, "q"): u for i, u in enumerate(users[:6])}
        lonely = "q-never-identified"
        rnd = random.Random(16)
        start = clock.now + MIN
        t, linked, sent = start, False, 0
        while t < start + 2 * HOUR:
            clock.set(t)
            batch = []
            for _ in range(rnd.randint(1, 5)):
                sku = f"sku-{rnd.randint(1, 3)}"
                ts = t - rnd.choice([0, 0, 0, 30 * S, 4 * MIN])
                who = rnd.choice(users + list(visitors) + [lonely])
                user, anon = (who, "") if who in users else ("", who)
                kind = rnd.random()
                if kind < 0.4:
                    batch.append(product_view(user, ts, sku=sku, anon=anon))
                elif kind < 0.75:
                    batch.append(cart_add(user, ts, sku=sku, anon=anon))
                else:
                    batch.append(order(user, ts, sku=sku, anon=anon))
            if not linked and t > start + HOUR:
                batch.extend(identify(u, v, t) for v, u in visitors.items())
                # In the same call, after the links: on one node these count for the users already.
                batch.extend(product_view("", t, sku="sku-1", anon=v) for v in list(visitors)[:3])
                linked = True
            cluster.apis[sent % 3].send(*batch)
            solo.send(*batch)
            sent += 1
            t += rnd.choice([MIN, 3 * MIN, 7 * MIN])
        last = t
        clock.set(t + HOUR)  # every window lapses, live
        cluster.apis[0].send(product_view(users[1], t + HOUR))
        solo.send(product_view(users[1], t + HOUR))
        single_lmdb = single_dir / "data" / "lmdb"
        # Every partition has applied every event once the live changes agree: q_abandoners' included, whose
        # users merged across partitions enter at the merge, as on one node, only because the user's
        # partition holds them until the visitor's history arrives (cluster/holds.py).
        assert wait_for(lambda: per_person(changelog_rows(cluster.lmdb(0))) == per_person(changelog_rows(single_lmdb)),
                        30.0), _diff(changelog_rows(cluster.lmdb(0)), changelog_rows(single_lmdb))
        assert wait_for(lambda: caught_up(cluster), 30.0, interval=0.3), "the partitions did not catch up"
        assert any(r[4] == CAUSE_MERGE for _, r in changelog_rows(single_lmdb)), "no identity merge moved anyone"
        yield Fed(cluster, single, solo, clock, start, last)
    finally:
        solo.close()
        cluster.stop()
        single.stop()
        nats.stop()


def _diff(got_rows, want_rows) -> str:
    got, want = per_person(got_rows), per_person(want_rows)
    return "\n".join(f"{p}:\n  single  {want.get(p)}\n  cluster {got.get(p)}" for p in sorted(set(got) | set(want))
                     if got.get(p) != want.get(p))[:6000]


def caught_up(cluster: QualifyCluster) -> bool:
    """Whether every partition's owner has applied its whole stream (as its heartbeat says)."""
    import nats

    async def read() -> dict[int, int]:
        nc = await nats.connect(cluster.nats.urls[0])
        try:
            js = nc.jetstream()
            out = {}
            for p in range(PARTITIONS):
                try:
                    out[p] = (await js.get_last_msg("QUALIFY_EVENTS", f"qualify.events.{p}")).seq
                except Exception:  # noqa: BLE001 - nothing published there yet
                    out[p] = 0
            return out
        finally:
            await nc.close()

    last = asyncio.run(read())
    applied = {int(p): st["applied"] for hb in nats_json(cluster.nats.urls[0], "qualify-nodes").values()
               for p, st in hb.get("partitions", {}).items()}
    return all(applied.get(p, -1) >= seq for p, seq in last.items())


def preview(api: Api, sample: int = 100, **target) -> tuple[int, list[str]]:
    r = api.aud.PreviewAudience(audience_pb2.PreviewAudienceRequest(sample_size=sample, **target), timeout=30)
    return r.count, list(r.sample_keys)


def simulate(api: Api, start: int, end: int, bucket: int, sample: int = 100, **target):
    req = audience_pb2.SimulateAudienceRequest(sample_size=sample, **target)
    req.start_time.FromMicroseconds(start)
    req.end_time.FromMicroseconds(end)
    req.bucket.FromMicroseconds(bucket)
    r = api.aud.SimulateAudience(req, timeout=120)
    return {"buckets": [(b.start_time.ToMicroseconds(), b.members, b.enters, b.exits) for b in r.buckets],
            "members_at_start": r.members_at_start, "events_replayed": r.events_replayed,
            "replayed_from": r.replayed_from.ToMicroseconds() if r.HasField("replayed_from") else None,
            "sample": {p.person_key: [(c.direction, c.effective_time.ToMicroseconds()) for c in p.changes]
                       for p in r.sample}}


def test_preview_on_any_node_equals_the_single_node(fed):
    for name, draft in DRAFTS.items():
        want_count, want_keys = preview(fed.solo, condition=cond(draft))
        assert want_count > 0, name
        for i in range(3):
            count, keys = preview(fed.cluster.apis[i], condition=cond(draft))
            assert count == want_count, (name, i)
            if want_count <= 100:  # the whole membership: the same people
                assert sorted(keys) == sorted(want_keys), (name, i)
            else:  # a sample of members, as big
                assert len(keys) == len(want_keys) == 100, (name, i)
                assert len(set(keys)) == 100
    for aid in AUDIENCES:
        want = preview(fed.solo, id=aid)
        for i in range(3):
            got = preview(fed.cluster.apis[i], id=aid)
            assert (got[0], sorted(got[1])) == (want[0], sorted(want[1])), (aid, i)
    # A merged visitor counts once, as their user, wherever their anonymous id hashed.
    _, keys = preview(fed.cluster.apis[1], condition=cond(DRAFTS["carted_ever"]))
    assert not any(k.startswith("anon:q") and k != "anon:q-never-identified" for k in keys), keys
    # The sample is capped and merged in key order.
    count, keys = preview(fed.cluster.apis[2], sample=7, condition=cond(DRAFTS["free"]))
    assert len(keys) == 7 and keys == sorted(keys)


@pytest.mark.parametrize("span", ["all", "middle"])
def test_simulate_on_any_node_equals_the_single_node(fed, span):
    start, end = ((fed.first - MIN, fed.last + 2 * HOUR) if span == "all"
                  else (fed.first + 40 * MIN, fed.first + 90 * MIN))
    bucket = 10 * MIN
    targets = {aid: {"id": aid} for aid in AUDIENCES}
    targets["draft"] = {"condition": cond(DRAFTS["rich_viewers"])}
    moved = 0
    for name, target in targets.items():
        want = simulate(fed.solo, start, end, bucket, **target)
        assert len(want["sample"]) < 100, "the sample must hold everyone for the comparison"
        for i in range(3):
            got = simulate(fed.cluster.apis[i], start, end, bucket, **target)
            assert got == want, (name, i)
        moved += sum(b[2] + b[3] for b in want["buckets"])
    assert moved > 0, "the history moves nobody: the test is void"


def test_a_small_sample_is_the_earliest_changers(fed):
    start, end = fed.first - MIN, fed.last + 2 * HOUR
    fulls = {aid: simulate(fed.solo, start, end, 10 * MIN, id=aid)["sample"] for aid in AUDIENCES}
    aid = max(fulls, key=lambda a: len(fulls[a]))
    full = fulls[aid]
    assert len(full) > 3
    got = simulate(fed.cluster.apis[0], start, end, 10 * MIN, sample=3, id=aid)["sample"]
    assert len(got) == 3
    first = sorted((changes[0][1], key) for key, changes in full.items())
    assert sorted(got) == sorted(key for _, key in first[:3])
    for key, changes in got.items():
        assert full[key] == changes


@pytest.mark.parametrize("rpc,request_", [
    ("PreviewAudience", audience_pb2.PreviewAudienceRequest(condition=cond(FREE), sample_size=101)),
    ("PreviewAudience", audience_pb2.PreviewAudienceRequest()),
    ("PreviewAudience", audience_pb2.PreviewAudienceRequest(id="nope")),
    ("PreviewAudience", audience_pb2.PreviewAudienceRequest(condition=cond(ev("no_such_model")))),
    ("SimulateAudience", audience_pb2.SimulateAudienceRequest(id="nope")),
    ("SimulateAudience", audience_pb2.SimulateAudienceRequest(condition=cond(FREE), sample_size=-1)),
    ("SimulateAudience", audience_pb2.SimulateAudienceRequest(condition=cond(attr("no_such_attribute", "EQ")))),
    ("SimulateAudience", (lambda r: (r.bucket.FromMicroseconds(0), r)[1])(
        audience_pb2.SimulateAudienceRequest(condition=cond(FREE)))),
])
def test_bad_requests_are_refused_as_on_one_node(fed, rpc, request_):
    want_code, want = error_of(getattr(fed.solo.aud, rpc), request_, timeout=10)
    got_code, got = error_of(getattr(fed.cluster.apis[0].aud, rpc), request_, timeout=10)
    assert want_code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert (got_code, got.reason, got.field_violations) == (want_code, want.reason, want.field_violations)


def test_timings(fed):
    """Not an assertion: what a preview and a simulation take here, cluster and single node (the report's)."""
    start, end = fed.first - MIN, fed.last + 2 * HOUR
    for label, api in (("single", fed.solo), ("cluster", fed.cluster.apis[0])):
        t0 = time.perf_counter()
        for _ in range(5):
            preview(api, condition=cond(DRAFTS["rich_viewers"]))
        t1 = time.perf_counter()
        for _ in range(3):
            simulate(api, start, end, 10 * MIN, id="q_abandoners")
        t2 = time.perf_counter()
        print(f"{label}: preview {(t1 - t0) / 5 * 1000:.1f} ms, simulate {(t2 - t1) / 3 * 1000:.1f} ms")


def test_a_partition_without_owner_is_unavailable_with_the_partitions_named(fed):
    """Last: it kills a node. Its partitions answer again once the others took them over."""
    cluster = fed.cluster
    want = preview(fed.solo, condition=cond(DRAFTS["carted_ever"]))
    cluster.kill(2)
    code, err = error_of(cluster.apis[0].aud.PreviewAudience,
                         audience_pb2.PreviewAudienceRequest(condition=cond(DRAFTS["carted_ever"])), timeout=10)
    assert code == grpc.StatusCode.UNAVAILABLE, (code, err)
    assert err.reason == "STORAGE_UNAVAILABLE"
    missing = [int(p) for p in err.metadata["partitions"].split(",")]
    assert missing and set(missing) <= set(range(PARTITIONS)) and len(missing) < PARTITIONS
    req = audience_pb2.SimulateAudienceRequest(id="q_abandoners")
    code, err = error_of(cluster.apis[1].aud.SimulateAudience, req, timeout=10)
    assert code in (grpc.StatusCode.UNAVAILABLE,), (code, err)

    def answers():
        try:
            return preview(cluster.apis[0], condition=cond(DRAFTS["carted_ever"]))
        except grpc.RpcError:
            return None
    got = wait_for(answers, 30.0, interval=0.2)
    assert got is not None
    assert (got[0], sorted(got[1])) == (want[0], sorted(want[1]))
