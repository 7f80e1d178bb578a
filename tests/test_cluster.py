"""A Qualify cluster answers as one node: 3 NATS servers (replicas = 3), 3 Qualify nodes, one single node beside.

Every event goes to a cluster node in turn and, with the same message id,
to a single node; both read "now" from the same test clock file, which
only moves while both are idle. After every round the whole changelog of
every person (audience, direction, effective time, cause, message id) on a
random cluster node's read copy must equal the single node's, and at the
end every person's memberships, read from random nodes, must equal the
single node's and the pure-Python reference's (tests/test_realtime.py).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import defaultdict

import grpc
import pytest

from clusters import (NATS_SERVER, NatsCluster, QualifyCluster, anon_for, changelog_rows, fresh_nats, nats_json,
                      per_person)
from conftest import QualifyServer, write_realtime_project
from receivers import WebhookReceiver
from qualify.server.domain.conditions import parse_condition
from test_audiences import (CAUSE_AUDIENCE, CAUSE_EVENT, CAUSE_LAPSE, CAUSE_MERGE, CAUSE_SESSION_END, CLOCK_ENV, FREE, PRO, S, T0, Api, TestClock, and_, attr, cart_add, error_of, ev, fv, identify,
                            not_, page, path_is, product_view, wait_for, warehouse_rows)
from test_realtime import ATTR_TYPES, MODEL_PROPS, Reference
from qualify.v1 import audience_pb2

pytestmark = pytest.mark.skipif(NATS_SERVER is None, reason="nats-server is not installed (apt install nats-server)")

PARTITIONS = 16
SECRET = "cluster-equivalence"
AUDIENCES = {
    "pricing3": and_(ev("page_views", "WITHIN", "60s", "GE", 3, filters=[path_is("path", "/pricing")]), FREE),
    "cart_session": ev("cart_adds", "SESSION", comparison="GE", threshold=2),
    "big_spender": ev("cart_adds", "EVER", comparison="GE", threshold=30.0, aggregation="SUM", prop="price"),
    "quiet_pro": and_(ev("page_views", "WITHIN", "30s", "EQ", 0), PRO),
    "viewers": and_(ev("product_views", "WITHIN", "10s", "GE", 1), not_(attr("ltv", "GT", fv(2500.0)))),
    # A sequence (issue 15): compared with the single node, not with test_realtime's Reference (which has none).
    "viewed_then_added": {"sequence": {"steps": [{"event_model": "product_views"}, {"event_model": "cart_adds"}],
                                       "within": "600s", "same": ["sku"], "scope": "SCOPE_WITHIN", "window": "3600s"}},
}
REFERENCE_AUDIENCES = [a for a in AUDIENCES if a != "viewed_then_added"]


@pytest.fixture(scope="module")
def nats3(tmp_path_factory):
    cluster = NatsCluster(tmp_path_factory.mktemp("nats"), 3).start()
    yield cluster
    cluster.stop()


class Scenario:
    """Random rounds of events and clock moves, fed to the cluster and to the single node alike."""

    def __init__(self, cluster: QualifyCluster, single: Api, clock: TestClock, rows: dict, seed: int = 3):
        self.cluster, self.single, self.clock = cluster, single, clock
        self.rng = random.Random(seed)
        self.users = [f"user-{i}" for i in range(1, 41)]
        # Visitors who later identify: half hash to their user's partition (merged there, as on one
        # node), half elsewhere (handed over through the stream: cluster/handover.py).
        self.anons = {anon_for(u, i, i % 2 == 0, PARTITIONS, "v"): u for i, u in enumerate(self.users[:8])}
        self.unidentified = list(self.anons)
        self.ref = Reference(rows)
        self.sent = 0

    def event(self):
        r, now = self.rng, self.clock.now
        ts = now - r.randint(0, 20) * S
        who = r.choice(self.users + list(self.anons))
        user, anon = (who, "") if who.startswith("user-") else ("", who)
        kind = r.choice(["pricing", "page", "cart", "view"])
        session = r.choice(["", "", "s1", "s2"])
        if kind == "pricing":
            e = page(user, "/pricing", ts, anon=anon, session=session)
            return e, {"path": "/pricing", "title": "/pricing"}
        if kind == "page":
            e = page(user, "/home", ts, anon=anon, session=session)
            return e, {"path": "/home", "title": "/home"}
        if kind == "cart":
            price = float(r.randint(1, 20))
            return cart_add(user, ts, price=price, anon=anon, session=session), {"sku": "sku-0001", "price": price}
        return product_view(user, ts, anon=anon, session=session), {"sku": "sku-0001"}

    def send(self, batch) -> None:
        node = self.cluster.apis[self.sent % len(self.cluster.apis)]
        self.sent += 1
        node.send(*(e for e, _ in batch))
        self.single.send(*(e for e, _ in batch))
        for e, props in batch:
            self.ref.add(e, props)

    def round(self, n_events: int) -> None:
        batch = []
        for _ in range(n_events):
            batch.append(self.event())
            if len(batch) == 5:
                self.send(batch)
                batch = []
        if batch:
            self.send(batch)

    def identify(self, n: int) -> None:
        for _ in range(n):
            anon = self.unidentified.pop()
            self.send([(identify(self.anons[anon], anon, self.clock.now), {})])


def sync_toml(url: str) -> str:
    """A webhook sync of every audience: its deliveries are compared too."""
    return (f'\n[[syncs]]\nid = "all"\naudiences = {json.dumps(list(AUDIENCES))}\n[syncs.webhook]\nurl = "{url}"\n'
            'secret_env = "QUALIFY_TEST_SECRET"\nmax_batch_size = 100\n')


def delivered(receiver: WebhookReceiver) -> dict[str, list]:
    """Each person's delivered changes, once each, in sequence order."""
    out: dict[str, list] = defaultdict(list)
    for _, c in sorted(receiver.unique().items()):
        out[c["person_key"]].append((c["audience_id"], c["direction"], c["effective_time"], c["cause"],
                                     c.get("message_id", "")))
    return dict(out)


@pytest.mark.parametrize("batch", [False, True], ids=["event-per-message", "batch_events"])
def test_three_nodes_answer_as_one_node(tmp_path, nats3, demo_warehouse, batch):
    fresh_nats(nats3)
    clock = TestClock(tmp_path / "clock", T0)
    single_dir = tmp_path / "single"
    single_dir.mkdir()
    solo_rx, cluster_rx = WebhookReceiver(SECRET), WebhookReceiver(SECRET)
    env = {CLOCK_ENV: str(clock.path), "QUALIFY_TEST_SECRET": SECRET}
    single = QualifyServer(single_dir, "--project", str(write_realtime_project(
        single_dir, demo_warehouse, sync_toml(solo_rx.url))), env=env).start()
    try:
        cluster = QualifyCluster(tmp_path / "cluster", nats3, demo_warehouse, 3, clock, partitions=PARTITIONS,
                                 project_extra=sync_toml(cluster_rx.url), env={"QUALIFY_TEST_SECRET": SECRET},
                                 extra="" if batch else "batch_events = false").start()
    except BaseException:
        single.kill()
        raise
    solo = Api(single.address)
    try:
        for aid, definition in AUDIENCES.items():
            cluster.api().create(aid, definition)
            solo.create(aid, definition)
        # One node walks a new audience's members beside ingest (domain/backfill.py); a partition walks
        # them when it applies the change. Events go in once the single node's walks are done too.
        assert wait_for(lambda: all(solo.get(a).state == audience_pb2.Audience.LIVE for a in AUDIENCES), 30.0)
        sc = Scenario(cluster, solo, clock, warehouse_rows(demo_warehouse, "user_id, plan, ltv"))
        single_lmdb = single_dir / "data" / "lmdb"

        def converged() -> bool:
            node = cluster.rng.choice(cluster.live())
            return per_person(changelog_rows(cluster.lmdb(node))) == per_person(changelog_rows(single_lmdb))

        for step in range(8):
            sc.round(30)
            if step in (2, 5):
                sc.identify(4)
            assert wait_for(converged, 15.0), _diff(cluster, single_lmdb)
            clock.advance(sc.rng.choice([1, 5, 11, 31, 61, 1801]))
            assert wait_for(converged, 15.0), _diff(cluster, single_lmdb)
        rows = changelog_rows(single_lmdb)
        causes = {r[4] for _, r in rows}
        print(f"{len(rows)} changes, causes {sorted(causes)}, {sc.sent} batches")
        # Every cause a stream of events and time can have, so each path was compared.
        assert {CAUSE_AUDIENCE, CAUSE_EVENT, CAUSE_LAPSE, CAUSE_SESSION_END, CAUSE_MERGE} <= causes, causes
        assert any(r[0] == "viewed_then_added" for _, r in rows), "the sequence audience never moved"
        parsed = {a: parse_condition(AUDIENCES[a], ATTR_TYPES, MODEL_PROPS) for a in REFERENCE_AUDIENCES}
        people = sc.users + [f"anon:{a}" for a in sc.anons]
        for person in people:
            got = set(cluster.api().check(person, list(AUDIENCES)))
            assert got == set(solo.check(person, list(AUDIENCES))), person
            want = {a for a, c in parsed.items() if sc.ref.known(person) and sc.ref.holds(c, person, clock.now)}
            assert got & set(REFERENCE_AUDIENCES) == want, person
        assert cluster.api().get("quiet_pro").member_count == solo.get("quiet_pro").member_count
        # ExplainMembership on any node is the person's partition owner's answer, the one node's answer.
        for person in sc.users[:15]:
            for aid in AUDIENCES:
                assert cluster.api().explain(aid, person) == solo.explain(aid, person), (person, aid)
        code, err = error_of(cluster.api().aud.ExplainMembership,
                             audience_pb2.ExplainMembershipRequest(id="nope", person_key="user-1"), timeout=10)
        assert (code, err.reason) == (grpc.StatusCode.NOT_FOUND, "AUDIENCE_NOT_FOUND")
        # The realtime sync delivered the same changes (content and per-person order) from both.
        assert wait_for(lambda: len(solo_rx.unique()) == len(changelog_rows(single_lmdb)), 15.0)
        assert wait_for(lambda: delivered(cluster_rx) == delivered(solo_rx), 15.0), (
            len(cluster_rx.unique()), len(solo_rx.unique()))
        def owners() -> dict[str, int]:
            out: dict[str, int] = defaultdict(int)
            for key, lease in nats_json(nats3.urls[0], "qualify-leases").items():
                if key.startswith("p."):
                    out[lease["node"]] += 1
            return out

        # (A handover in flight leaves a partition unowned for a moment: the balance is checked once settled.)
        assert wait_for(lambda: sum(owners().values()) == PARTITIONS and len(owners()) == 3, 15.0), owners()
        assert max(owners().values()) / (PARTITIONS / 3) <= 1.25, owners()
        _check_status(cluster)
    finally:
        solo.close()
        codes = cluster.stop()
        solo_rx.close()
        cluster_rx.close()
        assert single.stop() == 0, single.log()
    assert codes == [0, 0, 0], cluster.logs()


def _check_status(cluster: QualifyCluster) -> None:
    """`qualify cluster status`, as an operator runs it, shows every node, owner, lag and snapshot."""
    project = str(cluster.node_dir(0) / "qualify.toml")
    run = lambda *a: subprocess.run([sys.executable, "-m", "qualify.server.cli", "cluster", "status", "--project",  # noqa: E731
                                     project, *a], capture_output=True, text=True, timeout=60,
                                    env={**os.environ, **cluster.env})  # the project's secret_env, set
    def settled(status) -> bool:
        return ([(n["node"], n["alive"]) for n in status["nodes"]] == [("n0", True), ("n1", True), ("n2", True)]
                and all(p["running_on"] == p["owner"] is not None for p in status["partitions"])
                and all(p["pending"] == 0 and p["applied"] <= p["stream_last"] for p in status["partitions"])
                and all(p["snapshot_age_s"] is not None for p in status["partitions"])
                and status["deliveries"]["node"] is not None and "all" in status["deliveries"]["syncs"])

    # Heartbeats (every second) carry what the table shows: it is read until they have caught up.
    status = wait_for(lambda: (lambda s: s if settled(s) else None)(json.loads(run("--json").stdout)), 15.0)
    assert status, run("--json").stdout
    assert status["deliveries"]["node"] in ("n0", "n1", "n2") and "all" in status["deliveries"]["syncs"], status
    shown = run()
    text = shown.stdout
    assert "16 partitions, 3 of 3 nodes alive, max/mean owned" in text and "QUALIFY_EVENTS" in text, \
        text + shown.stderr
    assert "realtime syncs delivered by n" in text, text


def _diff(cluster: QualifyCluster, single_lmdb) -> str:
    want = per_person(changelog_rows(single_lmdb))
    got = per_person(changelog_rows(cluster.lmdb(cluster.live()[0])))
    lines = []
    for p in sorted(set(want) | set(got)):
        if want.get(p) != got.get(p):
            lines.append(f"{p}:\n  single  {want.get(p)}\n  cluster {got.get(p)}")
    return "\n".join(lines[:10]) + "\n" + cluster.logs()[-6000:]


def test_a_node_with_workers_serves_and_forwards(tmp_path, nats3, demo_warehouse):
    """`--workers 2` on a cluster node: the serving processes read its read copy and forward writes to it."""
    fresh_nats(nats3)
    folder = tmp_path / "node"
    folder.mkdir()
    from clusters import cluster_toml

    project = write_realtime_project(folder, demo_warehouse, cluster_toml(nats3.urls, "w0", partitions=4))
    server = QualifyServer(folder, "--project", str(project), "--workers", "2").start()
    api = Api(server.address)
    try:
        api.create("viewers", ev("page_views"))
        api.send(*(page(f"user-{i}", "/") for i in range(1, 11)))
        assert wait_for(lambda: all(api.memberships(f"user-{i}").keys() == {"viewers"} for i in range(1, 11)), 15.0)
        assert api.get("viewers").member_count == 10
    finally:
        api.close()
        assert server.stop() == 0, server.log()
