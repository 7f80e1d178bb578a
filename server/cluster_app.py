"""Composition root of a cluster node: ``qualify serve`` with [cluster] in the project file.

The node serves the same gRPC and HTTP APIs as a single process, built from
the same services, over other parts:

- ingest publishes to JetStream (cluster/publish.py) instead of the LMDB
  writer, and acknowledges after the PubAck;
- the partitions this node owns run their engines (cluster/node.py);
- reads, watches and audience reads come from the node's read copy
  (cluster/readcopy.py), a single-node environment whose memberships are
  the whole cluster's changes and whose warehouse this node syncs itself;
- audience definitions go to the cluster's catalog (cluster/audiences.py).

With ``--workers N`` this is the supervisor's writer process: the serving
processes read the read copy's environment and forward writes here, as
they forward them to a single node's writer.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import time

import lmdb

from .app import (GRACE_SECONDS, VERSION, Writing, _health, _keys, _start_http, create_server, read_service,
                  stop_on_signals, write_ready_file)
from .clock import make_clock
from .cluster import jetstream
from .cluster.audiences import AudienceCatalog, repair
from .cluster.deliveries import DeliveryLeader
from .cluster.leases import Leases, Watched
from .cluster.node import Node
from .cluster.explain import Explainer
from .cluster.queries import Scatter
from .cluster.publish import EventPublisher
from .cluster.readcopy import ReadCopy
from .config import Project
from .delivery.runner import Deliveries
from .observability import metrics
from .services.cluster_audiences import ClusterAudienceService
from .services.cluster_simulate import ClusterSimulateService
from .services.deadlines import CALL_REMAINING
from .services.feed import ChangeFeed
from .services.ingest import IngestService
from .services.watch import WatchService
from .storage.lmdb_store import Reader, data_path, open_env
from .storage.realtime import RealtimeStore
from .storage.realtime_reads import AudienceReads, ChangelogView
from .storage.sync_tables import SyncTables
from .storage.warehouse_sync import Progress, SyncError, Syncer
from .storage.writer import Writer
from .transport.audience import Audiences
from .transport.ingest import Ingest
from .transport.simulate import Simulation
from .transport.watch import Watch

log = logging.getLogger(__name__)

REPAIR_EVERY = 5.0
# At most this long for the handover at shutdown (leader, partitions, read copy together): with a NATS
# server down or a stream still electing, a snapshot may not land, and the next owner replays a longer tail.
HANDOVER_SECONDS = 10.0
# A watch resumed here after a position another node handed out waits this long for this node's read copy
# to reach it (milliseconds on loopback; longer while a partition's consumer catches up after a failure).
WATCH_CATCH_UP = 10.0


async def _sync_reads(env, project: Project, writer: Writer, progress, on_first, on_fatal, reader) -> None:
    """This node's warehouse sync of its read copy: at start, then every ``sync_interval``."""
    first = True
    while True:
        try:
            report = await asyncio.wrap_future(writer.submit(
                lambda txn, shown=progress if first else None: Syncer(env, project).run(shown, txn=txn)))
            metrics.warehouse_sync(report.seconds, True, time.time())
            if first:
                gc.collect()
                gc.freeze()
                on_first(report)
        except (SyncError, lmdb.Error) as exc:
            metrics.warehouse_sync(None, False)
            log.error("warehouse sync failed, nothing changed: %s", exc)
            if first and reader.generation == 0:
                on_fatal()
                return
        first = False
        if not project.server.sync_interval:
            return
        await asyncio.sleep(project.server.sync_interval)


async def _warehouse_syncs(node: Node, project: Project) -> None:
    """Asks every owned partition to sync its slice of the warehouse every ``sync_interval``."""
    if not project.server.sync_interval:
        return
    while True:
        await asyncio.sleep(project.server.sync_interval)
        for p, (_, part) in list(node.owned.items()):
            try:
                await part.request_sync()
            except Exception as exc:  # noqa: BLE001 - the next interval asks again
                log.warning("partition %d: asking for a warehouse sync failed (%s)", p, exc)


async def _repair_audiences(node: Node, catalog: AudienceCatalog, res) -> None:
    watched = Watched(res.audiences, lambda e: (json.loads(e.value), e.revision,
                                                e.created.timestamp() if e.created else time.time()))
    watched.start()
    try:
        while True:
            await asyncio.sleep(REPAIR_EVERY)
            owned = {p: dict(part.applier.state.audiences) for p, (_, part) in node.owned.items()
                     if part.applier is not None and p not in node.starting}
            try:
                await repair(catalog, owned, dict(watched.entries))
            except Exception as exc:  # noqa: BLE001 - the next round repairs
                log.warning("repairing audiences failed (%s)", exc)
    finally:
        await watched.stop()


async def _compact_reads(env, writer: Writer, project: Project, clock) -> None:
    """The read copy's changelog keeps [realtime] changelog_retention, and what a sync has not delivered."""
    def open_tables(txn):
        return RealtimeStore(env, txn), SyncTables(env, txn)

    store, tables = await asyncio.wrap_future(writer.submit(open_tables))
    retention_us = int(project.changelog_retention * 1_000_000)

    def compact(txn) -> int:
        head, cursor = store.changelog_head(txn), tables.min_cursor(txn)
        return store.compact_changelog(txn, clock() - retention_us, head if cursor is None else min(head, cursor), 2000)

    while True:
        try:
            deleted = await asyncio.wrap_future(writer.submit(compact))
        except Exception:  # noqa: BLE001 - retried at the next tick; the log says why
            log.exception("compacting the read copy's changelog failed; retrying")
            deleted = 0
        await asyncio.sleep(0 if deleted else 1.0)


async def _deliveries(project: Project, env, writer: Writer, feed: ChangeFeed, reader, clock,
                      res) -> DeliveryLeader:
    """The realtime syncs, delivered by whichever node holds the deliveries lease (cluster/deliveries.py)."""
    tables = await asyncio.wrap_future(writer.submit(lambda txn: SyncTables(env, txn)))

    def make() -> Deliveries:
        return Deliveries(tables, writer, feed, ChangelogView(env), reader, project.parent_model.name, clock,
                          f"qualify/{VERSION}", project.retry_initial, project.retry_max,
                          int(project.changelog_retention * 1_000_000))

    settings = project.cluster
    return DeliveryLeader(res, Leases(res.leases, settings.node_id, settings.lease_ttl), make, list(project.syncs),
                          settings.lease_ttl)


def _with_deadline(handler):
    """The handler with the client's remaining time in CALL_REMAINING (services/deadlines.py)."""
    async def call(request, context):
        token = CALL_REMAINING.set(context.time_remaining())
        try:
            return await handler(request, context)
        finally:
            CALL_REMAINING.reset(token)
    return call


def _writing(project: Project, res, env, feed: ChangeFeed, clock) -> Writing:
    catalog = AudienceCatalog(res, clock)
    attribute_types = {a.name: a.type for a in project.parent_model.attributes}
    event_model_props = {m.name: dict(m.properties) for m in project.event_models}
    scatter = Scatter(res.nc, res.partitions)  # previews and simulations: every partition's owner answers
    audiences = ClusterAudienceService(
        catalog, AudienceReads(env), clock, attribute_types, event_model_props,
        int(project.event_retention * 1_000_000), explainer=Explainer(res.nc, res.partitions), scatter=scatter,
        preview_seconds=project.preview_timeout)
    simulations = ClusterSimulateService(scatter, AudienceReads(env), clock, attribute_types, event_model_props)
    watch = Watch(WatchService(feed, ChangelogView(env), project.watch_buffer, project.watch_max_lag,
                               catch_up=WATCH_CATCH_UP))
    servicer = Audiences(audiences, watch, Simulation(simulations))
    servicer.preview_audience = _with_deadline(servicer.preview_audience)
    servicer.simulate_audience = _with_deadline(servicer.simulate_audience)
    return Writing(ingest=Ingest(IngestService(EventPublisher(res), project.event_models, clock, project.ops.limits)),
                   audiences=servicer)


async def _open(project: Project):
    """The read copy's environment and writer, and the cluster on NATS (None: it cannot be joined)."""
    env = open_env(data_path(project.data_dir), project.map_size, readonly=False)
    writer = Writer(env, clock_us=make_clock()[0])
    writer.start()
    settings = project.cluster
    try:
        res = await jetstream.connect(settings, f"qualify/{settings.node_id}",
                                      changelog_retention=project.changelog_retention)
    except (ConnectionError, jetstream.ClusterMismatch, jetstream.JetStreamError) as exc:
        log.error("cannot join the cluster: %s", exc)
        await asyncio.get_running_loop().run_in_executor(None, writer.stop)
        env.close()
        return None
    return env, writer, res


async def _read_copy(env, writer: Writer, res) -> tuple[ReadCopy, ChangeFeed]:
    loop = asyncio.get_running_loop()
    feed_box: list[ChangeFeed] = []
    copy = ReadCopy(env, writer, res, lambda head, rows: loop.call_soon_threadsafe(feed_box[0].advance, head, rows))
    await copy.start()  # creates the tables the feed and the views read
    feed_box.append(ChangeFeed(ChangelogView(env).head()))
    return copy, feed_box[0]


async def serve_cluster(project: Project, *, ready_file: str | None = None, progress: Progress | None = None,
                        address: str | None = None) -> int:
    """One cluster node; returns an exit code (see the module docstring)."""
    opened = await _open(project)
    if opened is None:
        return 1
    env, writer, res = opened
    clock, test_clock = make_clock()
    reader = Reader(env)
    loop = asyncio.get_running_loop()
    copy, feed = await _read_copy(env, writer, res)
    writing = _writing(project, res, env, feed, clock)
    internal = address is not None
    if project.ops.metrics.port:
        metrics.setup()
    reads = read_service(reader, project.ops)
    host, port = project.server.host, project.server.port
    server, port, health_servicer, gate = await create_server(
        reader, host, port, writing=writing, address=address, ops=project.ops, keys=_keys(project),
        internal=internal, reads=reads)
    await server.start()
    http, http_port = (await _start_http(project, reads, gate, writing.ingest.service, writing.audiences.service)
                       if project.ops.http.enabled and not internal else (None, None))
    if internal:
        os.chmod(address.removeprefix("unix:"), 0o600)
    node = Node(project, res, clock, test_clock, address or f"{host}:{port}", lambda: copy.position)
    await node.start()
    leader = await _deliveries(project, env, writer, feed, reader, clock, res)
    leader.start()
    log.info("cluster node %s (v%s) on %s: %d partitions over NATS %s", project.cluster.node_id, VERSION,
             address or f"{host}:{port}", res.partitions, ", ".join(project.cluster.nats_urls))
    stop, failed = asyncio.Event(), []
    stop_on_signals(loop, stop)

    def fatal() -> None:
        failed.append(True)
        stop.set()

    tasks = [asyncio.create_task(c) for c in (
        _sync_reads(env, project, writer, progress, lambda report: write_ready_file(ready_file, host, port, 1, http_port),
                    fatal, reader),
        _health(reader, health_servicer, project), _warehouse_syncs(node, project),
        _repair_audiences(node, AudienceCatalog(res, clock), res), _compact_reads(env, writer, project, clock))]
    await stop.wait()
    log.info("shutting down: handing partitions over, then stopping (grace %.0fs)", GRACE_SECONDS)
    node.stopping = True  # from now on it claims no partition another node releases
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        await http.cleanup()
    gate.drain()
    writing.ingest.drain()
    await server.stop(GRACE_SECONDS)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    handover_by = loop.time() + HANDOVER_SECONDS
    for part in (leader, node, copy):
        try:  # bounded: with NATS gone, a handover cannot finish and the next owner replays a longer tail
            await asyncio.wait_for(part.stop(), max(1.0, handover_by - loop.time()))
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - logged, and the shutdown goes on
            log.warning("stopping %s did not finish cleanly", type(part).__name__)
    await res.close()
    await loop.run_in_executor(None, writer.stop)
    env.close()
    return 1 if failed else 0
