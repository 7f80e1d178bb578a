"""``qualify cluster status``: the nodes, who owns which partition, each partition's lag and snapshot age.

Read from NATS alone (any machine with the project file can run it): the
nodes' heartbeats (``qualify-nodes``, which carry each owned partition's
applied sequence, pending messages and last snapshot), the leases, the
snapshots' descriptions, and each partition subject's last message.
"""

from __future__ import annotations

import asyncio
import json
import time

import nats
from nats.js.errors import NotFoundError

from ..config.cluster import ClusterSettings
from . import snapshots
from .jetstream import CHANGES, EVENTS, LEASES_BUCKET, NODES_BUCKET, SNAPSHOTS_BUCKET, events_subject, lease_key


async def bucket_entries(js, bucket: str) -> dict[str, dict]:
    """The bucket's entries, its keys listed from the stream's subjects. (nats-py's ``keys()`` watches the
    bucket and can end before the first entry arrives when the server answers its consumer info first, a
    loaded server included: the table then showed a cluster of 0 nodes.)"""
    kv = await js.key_value(bucket)
    prefix = f"$KV.{bucket}."
    info = await js.stream_info(f"KV_{bucket}", subjects_filter=prefix + ">")
    out = {}
    for subject in sorted(info.state.subjects or ()):
        key = subject[len(prefix):]
        try:
            entry = await kv.get(key)
        except NotFoundError:  # deleted (a delete marker keeps its subject), or since the listing
            continue
        if entry.value:
            out[key] = json.loads(entry.value)
    return out


async def _last(js, partition: int):
    try:
        return await js.get_last_msg(EVENTS, events_subject(partition))
    except NotFoundError:
        return None


async def gather(settings: ClusterSettings, timeout: float = 5.0) -> dict:
    """Everything the status table shows, as plain data."""
    nc = await nats.connect(servers=list(settings.nats_urls), connect_timeout=timeout, max_reconnect_attempts=1,
                            name="qualify cluster status")
    try:
        js = nc.jetstream(timeout=timeout)
        now = time.time()
        ttl = max(settings.lease_ttl, 3.0)  # alive as the nodes count it (cluster/node.py)
        nodes = await bucket_entries(js, NODES_BUCKET)
        leases = await bucket_entries(js, LEASES_BUCKET)
        store = await js.object_store(SNAPSHOTS_BUCKET)
        n = (json.loads((await (await js.key_value("qualify-cluster")).get("config")).value))["partitions"]
        snaps, lasts = await asyncio.gather(asyncio.gather(*(snapshots.latest(store, p) for p in range(n))),
                                            asyncio.gather(*(_last(js, p) for p in range(n))))
        running = {int(p): (node, st) for node, beat in nodes.items()
                   if now - beat["heartbeat_us"] / 1e6 < ttl for p, st in beat["partitions"].items()}
        partitions = []
        for p in range(n):
            lease = leases.get(lease_key(p))
            node, st = running.get(p, (None, {}))
            last, snap = lasts[p], snaps[p]
            partitions.append({
                "partition": p, "owner": lease["node"] if lease and lease["expires_us"] / 1e6 > now else None,
                "running_on": node, "applied": st.get("applied"), "stream_last": last.seq if last else 0,
                "pending": st.get("pending"), "published": st.get("published"),
                "snapshot_seq": snap.applied if snap else None, "snapshot_bytes": snap.size if snap else None,
                "snapshot_age_s": round(now - snap.taken_at, 1) if snap else None})
        events, changes = await js.stream_info(EVENTS), await js.stream_info(CHANGES)
        cluster = await bucket_entries(js, "qualify-cluster")
        deliverer = leases.get("deliveries")
        return {
            "partitions_count": n, "nats": list(settings.nats_urls),
            "nodes": [{"node": k, "address": v.get("address", ""), "alive": now - v["heartbeat_us"] / 1e6 < ttl,
                       "heartbeat_age_s": round(now - v["heartbeat_us"] / 1e6, 1), "owned": len(v["partitions"]),
                       "read_position": v.get("read_position", 0),
                       "starting": len(v.get("starting", ()))} for k, v in sorted(nodes.items())],
            "partitions": partitions,
            "deliveries": {"node": deliverer["node"] if deliverer and deliverer["expires_us"] / 1e6 > now else None,
                           "syncs": {k[5:]: {"cursor": v.get("cursor", 0), "delivered": v.get("delivered", 0)}
                                     for k, v in sorted(cluster.items()) if k.startswith("sync.")}},
            "streams": {s.config.name: {"messages": s.state.messages, "bytes": s.state.bytes,
                                        "first_seq": s.state.first_seq, "last_seq": s.state.last_seq,
                                        "replicas": s.config.num_replicas} for s in (events, changes)},
        }
    finally:
        await nc.close()


def render(status: dict) -> str:
    """The table ``qualify cluster status`` prints."""
    alive = [n for n in status["nodes"] if n["alive"]]
    owned = [n["owned"] for n in alive]
    mean = status["partitions_count"] / max(1, len(alive))
    lines = [f"{status['partitions_count']} partitions, {len(alive)} of {len(status['nodes'])} nodes alive"
             + (f", max/mean owned {max(owned) / mean:.2f}" if owned else "")
             + f"; NATS {', '.join(status['nats'])}", "",
             f"{'NODE':<16} {'ADDRESS':<22} {'ALIVE':<6} {'OWNED':>5} {'HEARTBEAT':>9}"]
    for n in status["nodes"]:
        lines.append(f"{n['node']:<16} {n['address']:<22} {'yes' if n['alive'] else 'no':<6} {n['owned']:>5} "
                     f"{n['heartbeat_age_s']:>8}s")
    lines += ["", f"{'PART':>4} {'OWNER':<16} {'APPLIED':>9} {'PENDING':>7} {'SNAPSHOT':>9} {'AGE':>7} {'SIZE':>9}"]
    for p in status["partitions"]:
        owner = p["running_on"] or (f"({p['owner']})" if p["owner"] else "-")
        age = f"{p['snapshot_age_s']}s" if p["snapshot_age_s"] is not None else "-"
        lines.append(f"{p['partition']:>4} {owner:<16} {_n(p['applied']):>9} {_n(p['pending']):>7} "
                     f"{_n(p['snapshot_seq']):>9} {age:>7} {_n(p['snapshot_bytes']):>9}")
    d = status["deliveries"]
    if d["syncs"]:
        lines.append(f"\nrealtime syncs delivered by {d['node'] or '(nobody yet)'}: " + ", ".join(
            f"{sid} at {v['cursor']:,} ({v['delivered']:,} delivered)" for sid, v in d["syncs"].items()))
    for name, s in status["streams"].items():
        lines.append(f"\n{name}: {s['messages']:,} messages, {s['bytes']:,} bytes, sequences {s['first_seq']:,}"
                     f"-{s['last_seq']:,}, {s['replicas']} replicas")
    return "\n".join(lines)


def _n(v) -> str:
    return "-" if v is None else f"{v:,}"
