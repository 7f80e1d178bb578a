"""The cluster bench's last phases: read staleness across nodes, partition balance, failover after kill -9."""

from __future__ import annotations

import asyncio
import time
import uuid

from ._stats import percentile


def _status(project):
    from qualify.server.cluster.status import gather
    from qualify.server.config import load_project

    return asyncio.run(gather(load_project(project).cluster))


def _probe_event(user: str):
    from qualify.v1 import event_pb2

    e = event_pb2.Event(message_id=str(uuid.uuid4()), type=event_pb2.EVENT_TYPE_PAGE, name="probe", user_id=user)
    e.properties.update({"path": "/probe"})
    e.timestamp.GetCurrentTime()
    return e


def _visible(stub, user: str, timeout: float = 30.0) -> float:
    """Seconds until CheckMembership on ``stub`` shows ``user`` in the probe audience."""
    from qualify.v1 import audience_pb2

    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        try:
            r = stub.aud.CheckMembership(audience_pb2.CheckMembershipRequest(person_key=user, audience_ids=["probe"]),
                                         timeout=5)
            if r.memberships:
                return time.perf_counter() - t0
        except Exception:  # noqa: BLE001 - a node that went away: asked again
            pass
        time.sleep(0.0005)
    raise RuntimeError(f"{user} never became visible")


def staleness(stubs, probes: int) -> dict:
    """A Track acknowledged on one node until CheckMembership on the next shows the change."""
    from qualify.v1 import ingest_pb2

    acked, visible = [], []
    for i in range(probes):
        user = f"probe-{uuid.uuid4().hex[:10]}"
        t0 = time.perf_counter()
        stubs[i % len(stubs)].ingest.Track(ingest_pb2.TrackRequest(event=_probe_event(user)), timeout=10)
        acked.append(time.perf_counter() - t0)
        visible.append(acked[-1] + _visible(stubs[(i + 1) % len(stubs)], user))
    ms = lambda xs, q: round(percentile([x * 1000 for x in xs], q), 2)  # noqa: E731
    return {"probes": probes, "ack_p50_ms": ms(acked, 0.5), "ack_p99_ms": ms(acked, 0.99),
            "visible_on_another_node_p50_ms": ms(visible, 0.5), "visible_on_another_node_p99_ms": ms(visible, 0.99),
            "visible_max_ms": round(max(visible) * 1000, 2)}


def balance(project) -> dict:
    s = _status(project)
    owned = [n["owned"] for n in s["nodes"] if n["alive"]]
    return {"owned_per_node": owned, "max_over_mean": round(max(owned) / (s["partitions_count"] / len(owned)), 3)}


def failover(nodes, stubs, project, people: int) -> dict:
    """kill -9 the last node; until its partitions run elsewhere, and until an event of one is visible."""
    from qualify.server.cluster.partitioning import partition_of
    from qualify.v1 import ingest_pb2

    s = _status(project)
    victim = nodes[-1]
    dead = f"n{len(nodes) - 1}"
    lost = {p["partition"] for p in s["partitions"] if p["running_on"] == dead}
    n = s["partitions_count"]
    user = next(f"probe-f{i}" for i in range(100_000) if partition_of(f"probe-f{i}", n) in lost)
    victim.kill()
    t0 = time.perf_counter()
    stubs[0].ingest.Track(ingest_pb2.TrackRequest(event=_probe_event(user)), timeout=30)
    acked = time.perf_counter() - t0
    seen = acked + _visible(stubs[0], user, timeout=60)
    while True:
        now = _status(project)
        if all(p["running_on"] not in (None, dead) for p in now["partitions"] if p["partition"] in lost):
            moved = time.perf_counter() - t0
            break
        time.sleep(0.1)
    return {"partitions_moved": len(lost), "served_again_s": round(moved, 2),
            "event_acked_s": round(acked, 3), "event_visible_s": round(seen, 2),
            "note": "lease TTL 2 s; the heartbeat that shows a moved partition comes every 1 s"}
