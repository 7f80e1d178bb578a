"""[cluster]: run this node as one of a Qualify cluster on NATS JetStream (see docs/scale-out.md).

Absent, the server is the single process it always was. Present::

```toml
[cluster]
nats_url = ["nats://10.0.0.1:4222", "nats://10.0.0.2:4222", "nats://10.0.0.3:4222"]  # or one string
node_id = "qualify-a"          # unique per node: letters, digits, _ and -
partitions = 64                # fixed when the cluster is first created; a node with another number refuses to start
replicas = 3                   # JetStream replicas of every stream, bucket and object store (1 in tests)
lease_ttl = "5s"               # an owner that stops refreshing loses its partitions after this
snapshot_interval = "60s"      # how often an owner snapshots each partition into the object store
event_retention = "24h"        # how long the event streams keep events (at least 4 snapshot intervals)
batch_events = true            # one stream message per partition per ingest call; false: one per event (cluster/publish.py)
```
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from .reader import MISSING, Reader

KEYS = ("nats_url", "node_id", "partitions", "replicas", "lease_ttl", "snapshot_interval", "event_retention",
        "batch_events")
DEFAULT_PARTITIONS = 64
DEFAULT_REPLICAS = 3
DEFAULT_LEASE_TTL = 5.0
DEFAULT_SNAPSHOT_INTERVAL = 60.0
DEFAULT_EVENT_RETENTION = 24 * 3600.0
MIN_SNAPSHOTS_RETAINED = 4
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_\-]{1,64}$")  # it is a JetStream KV key and a consumer name part
_URL_RE = re.compile(r"^(nats|tls)://[^\s/]+(:\d+)?/?$")


@dataclass(frozen=True)
class ClusterSettings:
    nats_urls: tuple[str, ...]
    node_id: str
    partitions: int = DEFAULT_PARTITIONS
    replicas: int = DEFAULT_REPLICAS
    lease_ttl: float = DEFAULT_LEASE_TTL  # seconds
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL  # seconds
    event_retention: float = DEFAULT_EVENT_RETENTION  # seconds the event streams keep
    batch_events: bool = True  # one message per partition per ingest call, rather than per event


def _default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9_\-]", "-", socket.gethostname())[:64]
    return name or "qualify"


def _urls(r: Reader, raw) -> tuple[str, ...]:
    urls = [raw] if isinstance(raw, str) else raw
    if raw is MISSING:
        r.problem("cluster.nats_url", MISSING, "is required (a nats:// URL, or a list of them for a NATS cluster)")
        return ()
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        r.problem("cluster.nats_url", raw, "must be a nats:// URL or a non-empty list of them")
        return ()
    bad = [u for u in urls if not _URL_RE.match(u.strip())]
    for u in bad:
        r.problem("cluster.nats_url", u, "must look like nats://host:4222 (or tls://host:4222)")
    return tuple(u.strip() for u in urls) if not bad else ()


def parse_cluster(r: Reader, raw: dict, present: bool) -> ClusterSettings | None:
    """[cluster] (``raw``, unknown keys already reported) as settings; None when the table is absent."""
    if not present:
        return None
    urls = _urls(r, raw.get("nats_url", MISSING))
    node_id = raw.get("node_id", MISSING)
    if node_id is MISSING:
        node_id = _default_node_id()
    elif not isinstance(node_id, str) or not NODE_ID_RE.match(node_id):
        r.problem("cluster.node_id", node_id, "must be 1 to 64 letters, digits, _ or - (unique per node)")
        node_id = _default_node_id()
    partitions = r.integer(raw, "cluster.partitions", DEFAULT_PARTITIONS, 1, 4096)
    replicas = r.integer(raw, "cluster.replicas", DEFAULT_REPLICAS, 1, 5)
    lease_ttl = r.duration(raw, "cluster.lease_ttl", DEFAULT_LEASE_TTL, positive=True)
    if lease_ttl < 1:
        r.problem("cluster.lease_ttl", raw["lease_ttl"], "must be at least 1s (owners refresh every third of it)")
        lease_ttl = DEFAULT_LEASE_TTL
    snapshots = r.duration(raw, "cluster.snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL, positive=True)
    retention = r.duration(raw, "cluster.event_retention", DEFAULT_EVENT_RETENTION, positive=True)
    if retention < MIN_SNAPSHOTS_RETAINED * snapshots:
        r.problem("cluster.event_retention", raw.get("event_retention", MISSING),
                  f"must cover at least {MIN_SNAPSHOTS_RETAINED} snapshot intervals ({MIN_SNAPSHOTS_RETAINED} x "
                  f"{snapshots:g}s): a partition that moves replays the stream from its last snapshot")
    batch = raw.get("batch_events", True)
    if not isinstance(batch, bool):
        r.problem("cluster.batch_events", batch, "must be true or false")
        batch = True
    if not urls:
        return None
    return ClusterSettings(nats_urls=urls, node_id=node_id, partitions=partitions, replicas=replicas,
                           lease_ttl=lease_ttl, snapshot_interval=snapshots, event_retention=retention,
                           batch_events=batch)
