"""The cluster's JetStream resources: names, creation, and the one check that the cluster is this one.

Every node connects to the same NATS cluster and finds (or, the first
time, creates) these, with ``replicas`` copies each::

    QUALIFY_EVENTS    stream, subjects qualify.events.<partition>: every accepted event, and the
                      partition's control messages (time ticks, warehouse syncs, audience changes,
                      identity handovers); Nats-Msg-Id dedupes within DEDUPE_WINDOW; max_age is
                      [cluster] event_retention (it must cover a few snapshot intervals)
    QUALIFY_CHANGES   stream, subjects qualify.changes.<partition>: each owner's membership changes,
                      in its own per-partition sequence; max_age is [realtime] changelog_retention
    qualify-cluster   key-value: "config" -> {"partitions": N, ...} (written once, by the first node)
    qualify-leases    key-value: "p.<partition>" -> the owner's lease (revision compare-and-set)
    qualify-nodes     key-value: "<node id>" -> the node's heartbeat and what it owns
    qualify-audiences key-value: "<audience id>" -> the audience definition (the cluster's catalog)
    qualify-snapshots object store: "p.<partition>" -> the latest snapshot of the partition

``partitions`` is fixed when the cluster is created: a person's partition
is a hash modulo the count (cluster/partitioning.py), so a node configured
with another count would file people under the wrong partitions. It is
stored in qualify-cluster/config and a mismatch refuses to start.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

import nats
from nats.js import api
from nats.js.errors import BadRequestError, BucketNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.errors import Error as JetStreamError  # noqa: F401 - what callers catch besides ConnectionError

from ..config.cluster import ClusterSettings

log = logging.getLogger(__name__)

EVENTS = "QUALIFY_EVENTS"
CHANGES = "QUALIFY_CHANGES"
EVENTS_PREFIX = "qualify.events."
CHANGES_PREFIX = "qualify.changes."
CLUSTER_BUCKET = "qualify-cluster"
LEASES_BUCKET = "qualify-leases"
NODES_BUCKET = "qualify-nodes"
AUDIENCES_BUCKET = "qualify-audiences"
SNAPSHOTS_BUCKET = "qualify-snapshots"
DEDUPE_WINDOW = 120.0  # seconds: JetStream's own Nats-Msg-Id window (the owners' event logs keep 24 h)
NODES_TTL = 3600.0  # a node that stopped for good disappears from `qualify cluster status` after this


class ClusterMismatch(RuntimeError):
    """The NATS cluster holds a Qualify cluster this node's [cluster] settings contradict."""


def events_subject(partition: int) -> str:
    return f"{EVENTS_PREFIX}{partition}"


def changes_subject(partition: int) -> str:
    return f"{CHANGES_PREFIX}{partition}"


def lease_key(partition: int) -> str:
    return f"p.{partition}"


def snapshot_name(partition: int) -> str:
    return f"p.{partition}"


@dataclass
class Resources:
    """An open connection and handles to every resource of the cluster."""

    nc: nats.NATS
    js: object
    settings: ClusterSettings
    config: dict
    leases: object
    nodes: object
    audiences: object
    snapshots: object

    @property
    def partitions(self) -> int:
        return self.settings.partitions

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.drain(), 5)
        except Exception:  # noqa: BLE001 - closing a connection that NATS already dropped
            await self.nc.close()


async def connect(settings: ClusterSettings, name: str, *, changelog_retention: float,
                  connect_timeout: float = 30.0) -> Resources:
    """Connects (retrying until ``connect_timeout``), creates what is missing, checks the config."""
    nc = await _connect(settings, name, connect_timeout)
    js = nc.jetstream(timeout=10)
    r = settings.replicas
    await _stream(js, api.StreamConfig(
        name=EVENTS, subjects=[EVENTS_PREFIX + "*"], num_replicas=r, duplicate_window=DEDUPE_WINDOW,
        max_age=settings.event_retention, storage=api.StorageType.FILE, discard=api.DiscardPolicy.OLD))
    await _stream(js, api.StreamConfig(
        name=CHANGES, subjects=[CHANGES_PREFIX + "*"], num_replicas=r, duplicate_window=DEDUPE_WINDOW,
        max_age=changelog_retention, storage=api.StorageType.FILE, discard=api.DiscardPolicy.OLD))
    cluster = await _bucket(js, CLUSTER_BUCKET, r)
    config = await retry(lambda: _check_config(cluster, settings), "the cluster config")
    return Resources(nc=nc, js=js, settings=settings, config=config,
                     leases=await _bucket(js, LEASES_BUCKET, r),
                     nodes=await _bucket(js, NODES_BUCKET, r, ttl=NODES_TTL),
                     audiences=await _bucket(js, AUDIENCES_BUCKET, r, history=8),
                     snapshots=await _object_store(js, SNAPSHOTS_BUCKET, r))


async def _connect(settings: ClusterSettings, name: str, timeout: float) -> nats.NATS:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            # Reconnect forever once connected: a NATS server restarting is an outage to ride out.
            return await nats.connect(servers=list(settings.nats_urls), name=name, connect_timeout=2,
                                      max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                                      allow_reconnect=True, ping_interval=5, max_outstanding_pings=3)
        except Exception as exc:  # noqa: BLE001 - any failure to connect is retried until the deadline
            if loop.time() > deadline:
                raise ConnectionError(f"cannot reach NATS at {', '.join(settings.nats_urls)}: {exc}") from None
            log.warning("NATS not reachable yet (%s); retrying", exc)
            await asyncio.sleep(0.5)


async def retry(make, what: str, attempts: int = 40):
    """``make()`` until it succeeds: JetStream answers 'no leader' for a few seconds while a new cluster
    elects its meta leader, and nodes that start together race to create the same resources (one's
    create fails 'already in use', or its lookup 'not found' while the other's create propagates).
    Every ``make`` here looks up before it creates, so running it again is safe."""
    for i in range(attempts):
        try:
            return await make()
        except (asyncio.TimeoutError, nats.errors.TimeoutError, nats.errors.NoRespondersError,
                nats.js.errors.NoStreamResponseError, nats.js.errors.ServiceUnavailableError,
                nats.js.errors.ServerError, NotFoundError, BadRequestError) as exc:
            if i == attempts - 1:
                raise ConnectionError(f"JetStream did not answer while creating {what}: {exc!r}") from None
            await asyncio.sleep(0.25)


async def resubscribe(sub, subscribe, what: str) -> bool:
    """A stalled consumer, again: ``sub`` unsubscribed (it may be gone), ``subscribe()`` awaited; False if it failed."""
    log.warning("%s stalled; subscribing again", what)
    try:
        await sub.unsubscribe()
    except Exception:  # noqa: BLE001 - it may be gone already
        pass
    try:
        await subscribe()
    except Exception as exc:  # noqa: BLE001 - the caller's watchdog tries again next second
        log.warning("%s: subscribing again failed (%s)", what, exc)
        return False
    return True


async def _stream(js, config: api.StreamConfig) -> None:
    async def make():
        try:
            info = await js.stream_info(config.name)
        except NotFoundError:
            try:
                await js.add_stream(config)
            except BadRequestError as exc:  # another node created it first, with the same settings
                if "already in use" not in str(exc):
                    raise
            return
        if info.config.num_replicas != config.num_replicas:
            log.warning("stream %s has %d replicas, [cluster] replicas says %d: keeping the stream's",
                        config.name, info.config.num_replicas, config.num_replicas)
    await retry(make, f"stream {config.name}")


async def _bucket(js, name: str, replicas: int, ttl: float | None = None, history: int = 1):
    async def make():
        try:
            return await js.key_value(name)
        except BucketNotFoundError:
            return await js.create_key_value(bucket=name, history=history, replicas=replicas, ttl=ttl,
                                             storage=api.StorageType.FILE)
    return await retry(make, f"key-value bucket {name}")


async def _object_store(js, name: str, replicas: int):
    async def make():
        try:
            return await js.object_store(name)
        except (NotFoundError, BucketNotFoundError):
            return await js.create_object_store(bucket=name, replicas=replicas, storage=api.StorageType.FILE)
    return await retry(make, f"object store {name}")


async def _check_config(bucket, settings: ClusterSettings) -> dict:
    """The stored cluster config (created with this node's settings the first time); refuses a mismatch."""
    mine = {"partitions": settings.partitions, "format": 1}
    try:
        await bucket.create("config", json.dumps(mine).encode())
        log.info("created the Qualify cluster on NATS with %d partitions", settings.partitions)
        return mine
    except KeyWrongLastSequenceError:
        stored = json.loads((await bucket.get("config")).value)  # created by another node
    if stored.get("partitions") != settings.partitions:
        raise ClusterMismatch(
            f"the cluster on NATS was created with {stored.get('partitions')} partitions and [cluster] partitions "
            f"says {settings.partitions}; partitions are fixed when a cluster is created (set it to "
            f"{stored.get('partitions')}, or use another NATS cluster)")
    return stored
