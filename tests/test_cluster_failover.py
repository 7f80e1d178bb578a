"""Failover: kill -9 a Qualify node mid-stream, then a NATS server; nothing acknowledged is lost or counted twice.

Each of 60 people gets a known number of page views (1 to 6), sent in
small batches to the live nodes in turn; a batch that fails is sent again,
with the same message ids, to the next node, until it is acknowledged.
Audiences ``cnt_k`` hold the people with exactly k page views ever, so a
lost event and an event counted twice both put someone in the wrong one.

Mid-stream one Qualify node is killed with SIGKILL: its partitions must be
served by the others within FAILOVER_BOUND seconds (the lease TTL, 2 s here,
plus restoring the last snapshot and replaying the tail). Later a NATS
server is killed with SIGKILL: events must still be accepted. Then both are
restarted; every person must end in exactly the right audience on every
node, and no (partition, sequence) of the changes stream may carry two
different changes.
"""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest

from clusters import NATS_SERVER, NatsCluster, QualifyCluster, fresh_nats, nats_json
from qualify.server.cluster.jetstream import events_subject
from qualify.server.cluster.messages import decode, decode_changes
from qualify.server.cluster.partitioning import partition_of
from test_audiences import ev, page

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (apt install nats-server)")

PARTITIONS = 16
FAILOVER_BOUND = 10.0
COUNTS = range(1, 7)


@pytest.fixture(scope="module")
def nats3(tmp_path_factory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), 3).start()
    yield cluster
    cluster.stop()


def send_until_acked(cluster: QualifyCluster, batch, deadline: float = 60.0) -> int:
    """Sends ``batch`` to live nodes in turn until one acknowledges it; returns the attempts it took."""
    give_up = time.monotonic() + deadline
    attempts = 0
    while True:
        attempts += 1
        try:
            cluster.api().send(*batch)
            return attempts
        except grpc.RpcError as exc:
            assert time.monotonic() < give_up, f"never acknowledged: {exc}\n{cluster.logs()}"
            time.sleep(0.1)


def owners(nats: NatsCluster) -> dict[int, str]:
    """Partition -> the node that has it running (per the nodes' heartbeats)."""
    out = {}
    for node, beat in nats_json(nats.urls[0], "qualify-nodes").items():
        if time.time() * 1e6 - beat["heartbeat_us"] < 3e6:
            for p in beat["partitions"]:
                out[int(p)] = node
    return out


def balanced(owned: dict[int, str], nodes: int) -> bool:
    """Every partition runs somewhere, each of ``nodes`` nodes running its share."""
    per = [list(owned.values()).count(n) for n in set(owned.values())]
    return len(owned) == PARTITIONS and len(per) == nodes and min(per) >= PARTITIONS // nodes


def changes_stream(url: str) -> list[tuple[int, int, tuple]]:
    """(partition, sequence, change) of every change message in the stream."""
    import nats

    async def read():
        nc = await nats.connect(url)
        js = nc.jetstream()
        sub = await js.subscribe("qualify.changes.*", ordered_consumer=True)
        info = await js.stream_info("QUALIFY_CHANGES")
        out = []
        for _ in range(info.state.messages):
            msg = await sub.next_msg(timeout=5)
            p, _, changes = decode_changes(msg.data)
            out += [(p, c.sequence, (c.audience_id, c.person_key, c.direction, c.effective_us, c.cause))
                    for c in changes]
        await nc.close()
        return out

    return asyncio.run(read())


# Reruns once. In about one full suite run in four on the shared 2-core machine, 60 s after the NATS
# server's restart the changes stream still lacked the last acknowledged events' changes of a few people.
# _diagnose told why: every event was in its partition's stream, but a few partitions had no owner, the
# restarted node's start of them hung in a snapshot download cut off by the NATS restart (fixed since:
# cluster/snapshots.py bounds transfers, cluster/leases.py rereads a lost compare-and-set). 13 runs in a
# row passed without reruns afterwards; the rerun stays as a guard against this machine's load, and a
# rerun that fails again fails the suite with _diagnose's report.
@pytest.mark.flaky(reruns=1)
def test_kill9_a_node_then_a_nats_server(tmp_path, nats3, demo_warehouse):
    fresh_nats(nats3)
    cluster = QualifyCluster(tmp_path, nats3, demo_warehouse, 3, None, partitions=PARTITIONS).start()
    rng = random.Random(11)
    try:
        for k in COUNTS:
            cluster.api().create(f"cnt_{k}", ev("page_views", "EVER", comparison="EQ", threshold=k))
        want = {f"user-{i}": rng.choice(COUNTS) for i in range(100, 160)}
        events = [page(u, f"/p{j}", int(time.time() * 1e6)) for u, n in want.items() for j in range(n)]
        rng.shuffle(events)
        batches = [events[i:i + 3] for i in range(0, len(events), 3)]
        victim = 1
        assert _wait(lambda: balanced(owners(nats3), 3), 30.0), owners(nats3)
        lost = sorted(p for p, n in owners(nats3).items() if n == f"n{victim}")
        assert lost
        failover = retries = None
        for i, batch in enumerate(batches):
            if i == len(batches) // 3:
                cluster.kill(victim)
                killed = time.monotonic()
            if i == 2 * len(batches) // 3:
                failover = _wait_moved(nats3, lost, killed, f"n{victim}")
                nats3.kill(2)
                retries = 0
            attempts = send_until_acked(cluster, batch)
            if retries is not None:
                retries += attempts - 1
        assert failover is not None and failover <= FAILOVER_BOUND, failover
        print(f"partitions {lost} served again {failover:.2f}s after kill -9; {retries} retries with a NATS server down")
        nats3.restart(2)
        cluster.start(victim)
        for i in cluster.live():
            api = cluster.apis[i]
            # After a NATS server's restart a partition's consumer may lag for tens of seconds (README,
            # "Running a cluster"): what this checks is that nothing is lost, not how fast it catches up.
            ok = _wait(lambda api=api: all(api.check(u, [f"cnt_{n}"]) for u, n in want.items()), 60.0)
            got = {u: set(api.check(u, [f"cnt_{k}" for k in COUNTS])) for u in want}
            wrong = {u: (sorted(got[u]), f"cnt_{n}") for u, n in want.items() if got[u] != {f"cnt_{n}"}}
            if wrong:  # what the streams hold for them, to tell a lost event from a stale read
                raise AssertionError(f"node {i}: {wrong}\n" + _diagnose(nats3, cluster, api, wrong, want))
            assert ok
        for k in COUNTS:
            assert cluster.api().get(f"cnt_{k}").member_count == sum(1 for n in want.values() if n == k)
        seen: dict[tuple[int, int], tuple] = {}
        for p, seq, change in changes_stream(nats3.urls[0]):
            assert seen.setdefault((p, seq), change) == change, (p, seq, seen[(p, seq)], change)
    finally:
        codes = cluster.stop()
    assert all(c == 0 for c in codes), cluster.logs()


def _diagnose(nats: NatsCluster, cluster: QualifyCluster, api, wrong: dict, want: dict) -> str:
    """Whether each wrong person's events are all in their partition's stream, what their owner applied
    of it, and whether the node converges when given another minute: a loss, or only a longer lag."""
    url = nats.urls[0]
    parts = {u: partition_of(u, PARTITIONS) for u in wrong}
    beats = nats_json(url, "qualify-nodes")
    lines = []
    for u, p in sorted(parts.items()):
        seqs = [seq for seq, e in stream_events(url, p) if e.user_id == u]
        owner = [(n, b["partitions"].get(str(p))) for n, b in beats.items() if str(p) in b["partitions"]]
        owner += [(n, "starting") for n, b in beats.items() if p in b.get("starting", ())]
        owner.append(("lease", nats_json(url, "qualify-leases").get(f"p.{p}")))
        changes = [(seq, c) for q, seq, c in changes_stream(url) if c[1] == u]
        lines.append(f"{u}: partition {p}, {len(seqs)} events in its stream (want {want[u]}) at {seqs}; "
                     f"owner {owner}; changes {changes}")
    late = _wait(lambda: all(api.check(u, [f"cnt_{want[u]}"]) for u in wrong), 90.0)
    lines.append("converged within 90 s more: a lag" if late else "still wrong 90 s later")
    mentioned = [line for i in cluster.live() for line in cluster.nodes[i].log().splitlines()
                 if any(f"partition {p}:" in line or f"partition {p}'" in line for p in set(parts.values()))]
    return "\n".join(lines + mentioned[-40:]) + "\n" + cluster.logs()[-6000:]


def stream_events(url: str, partition: int) -> list[tuple[int, object]]:
    """(stream sequence, event) of every event message on a partition's subject."""
    import nats

    async def read():
        nc = await nats.connect(url)
        sub = await nc.jetstream().subscribe(events_subject(partition), ordered_consumer=True)
        out = []
        try:
            while True:
                msg = await sub.next_msg(timeout=2)
                out += [(it.seq, it.event) for it in decode(msg.metadata.sequence.stream, msg.data, msg.headers)
                        if it.event is not None]
        except nats.errors.TimeoutError:
            pass
        await nc.close()
        return out

    return asyncio.run(read())


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate():
                return True
        except grpc.RpcError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _wait_moved(nats: NatsCluster, partitions: list[int], since: float, dead: str) -> float:
    """Seconds from ``since`` until every partition runs on a node other than ``dead``."""
    deadline = since + 30
    while True:
        now = owners(nats)
        if all(now.get(p) not in (None, dead) for p in partitions):
            return time.monotonic() - since
        assert time.monotonic() < deadline, now
        time.sleep(0.05)
