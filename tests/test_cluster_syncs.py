"""Watches and realtime syncs in a cluster: one position for the whole cluster, and delivery through a failover.

A watch on any node streams every partition's changes, numbered by the
cluster-wide position (cluster/readcopy.py); a watch resumed on another node
after a sequence seen on the first gets exactly what the first got after it.
A webhook sync is delivered by one node (the deliveries lease); killed with
SIGKILL, another node takes over from the mirrored cursor: every change
arrives at least once, in order per person, and nothing is missing.
"""

from __future__ import annotations

import time

import pytest

from clusters import NATS_SERVER, NatsCluster, QualifyCluster, changelog_rows, fresh_nats, nats_json
from receivers import WebhookReceiver
from test_audiences import ev, page
from test_watch import SEQUENCE, Watcher, as_rows
from qualify.v1 import audience_pb2

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (apt install nats-server)")

SECRET = "cluster-test-secret"


@pytest.fixture(scope="module")
def nats3(tmp_path_factory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), 3).start()
    yield cluster
    cluster.stop()


def sync_toml(url: str) -> str:
    return (f'\n[[syncs]]\nid = "crm"\naudiences = ["viewers", "buyers"]\n[syncs.webhook]\nurl = "{url}"\n'
            f'secret_env = "QUALIFY_TEST_SECRET"\nmax_batch_size = 20\n')


def test_watch_resumes_on_another_node_and_a_sync_survives_its_deliverer(tmp_path, nats3, demo_warehouse):
    fresh_nats(nats3)
    receiver = WebhookReceiver(SECRET)
    cluster = QualifyCluster(tmp_path, nats3, demo_warehouse, 3, project_extra=sync_toml(receiver.url),
                             env={"QUALIFY_TEST_SECRET": SECRET}, partitions=8)
    cluster.start()
    try:
        cluster.apis[0].create("viewers", ev("page_views"))
        cluster.apis[1].create("buyers", ev("cart_adds"))
        first = Watcher(cluster.apis[0].channel, audience_pb2.WatchMembershipsRequest(start=SEQUENCE))
        cluster.apis[2].send(*(page(f"user-{i}", "/") for i in range(1, 41)))
        seen = first.changes(40)
        assert {c.person_key for c in seen} == {f"user-{i}" for i in range(1, 41)}
        assert [c.sequence for c in seen] == sorted(c.sequence for c in seen)
        middle = seen[19].sequence
        second = Watcher(cluster.apis[1].channel, audience_pb2.WatchMembershipsRequest(start=SEQUENCE,
                                                                                       after_sequence=middle))
        assert as_rows(second.changes(20)) == as_rows(seen[20:])
        cluster.apis[0].send(*(page(f"user-{i}", "/") for i in range(41, 51)))
        assert as_rows(first.changes(10)) == as_rows(second.changes(10))
        first.cancel()
        second.cancel()

        deliverer = int(nats_json(nats3.urls[0], "qualify-leases")["deliveries"]["node"][1:])
        time.sleep(1.0)  # a mirrored cursor past the first changes
        cluster.kill(deliverer)
        for i in range(51, 91):
            cluster.api().send(page(f"user-{i}", "/"), *([] if i % 3 else [_cart(i)]))
        live = cluster.live()[0]
        _wait_all(receiver, cluster, live)
        got = receiver.unique()
        rows = changelog_rows(cluster.lmdb(live))
        want = {seq: (r[0], r[1]) for seq, r in rows if r[0] in ("viewers", "buyers")}
        assert {s: (c["audience_id"], c["person_key"]) for s, c in got.items()} == want
        per_person: dict[str, list[int]] = {}
        for c in receiver.accepted:  # arrival order, repeats included
            per_person.setdefault(c["person_key"], []).append(c["sequence"])
        for person, seqs in per_person.items():
            firsts = list(dict.fromkeys(seqs))
            assert firsts == sorted(firsts), (person, seqs)
        assert nats_json(nats3.urls[0], "qualify-leases")["deliveries"]["node"] != f"n{deliverer}"
        deadline = time.monotonic() + 5  # the cursor is mirrored every half second
        while nats_json(nats3.urls[0], "qualify-cluster")["sync.crm"]["cursor"] < max(want):
            assert time.monotonic() < deadline, nats_json(nats3.urls[0], "qualify-cluster")
            time.sleep(0.1)
    finally:
        codes = cluster.stop()
        receiver.close()
    assert all(c == 0 for c in codes), cluster.logs()


def _cart(i: int):
    from test_audiences import cart_add

    return cart_add(f"user-{i}", int(time.time() * 1e6))


def _wait_all(receiver: WebhookReceiver, cluster: QualifyCluster, node: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        rows = changelog_rows(cluster.lmdb(node))
        want = {seq for seq, r in rows if r[0] in ("viewers", "buyers")}
        if len(want) >= 90 + 13 and want <= set(receiver.unique()):
            return
        assert time.monotonic() < deadline, (len(want), len(receiver.unique()), cluster.logs()[-4000:])
        time.sleep(0.1)
