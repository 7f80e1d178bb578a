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
from .cluster.leases import Watched
from .cluster.node import Node
from .cluster.publish import EventPublisher
from .cluster.readcopy import ReadCopy
from .config import Project
from .observability import metrics
from .services.cluster_audiences import ClusterAudienceService
from .services.feed import ChangeFeed
from .services.ingest import IngestService
from .services.watch import WatchService
from .storage.lmdb_store import Reader, data_path, open_env
from .storage.realtime_reads import AudienceReads, ChangelogView
from .storage.warehouse_sync import Progress, SyncError, Syncer
from .storage.writer import Writer
from .transport.audience import Audiences
from .transport.ingest import Ingest
from .transport.watch import Watch

log = logging.getLogger(__name__)

REPAIR_EVERY = 5.0


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


def _writing(project: Project, res, env, feed: ChangeFeed, clock) -> Writing:
    catalog = AudienceCatalog(res, clock)
    audiences = ClusterAudienceService(
        catalog, AudienceReads(env), clock, {a.name: a.type for a in project.parent_model.attributes},
        {m.name: dict(m.properties) for m in project.event_models}, int(project.event_retention * 1_000_000))
    watch = Watch(WatchService(feed, ChangelogView(env), project.watch_buffer, project.watch_max_lag))
    return Writing(ingest=Ingest(IngestService(EventPublisher(res), project.event_models, clock, project.ops.limits)),
                   audiences=Audiences(audiences, watch))


async def serve_cluster(project: Project, *, ready_file: str | None = None, progress: Progress | None = None,
                        address: str | None = None) -> int:
    """One cluster node; returns an exit code (see the module docstring)."""
    settings = project.cluster
    env = open_env(data_path(project.data_dir), project.map_size, readonly=False)
    clock, test_clock = make_clock()
    writer = Writer(env, clock_us=clock)
    writer.start()
    reader = Reader(env)
    loop = asyncio.get_running_loop()
    try:
        res = await jetstream.connect(settings, f"qualify/{settings.node_id}",
                                      changelog_retention=project.changelog_retention)
    except (ConnectionError, jetstream.ClusterMismatch, jetstream.JetStreamError) as exc:
        log.error("cannot join the cluster: %s", exc)
        await loop.run_in_executor(None, writer.stop)
        env.close()
        return 1
    feed_box: list[ChangeFeed] = []
    copy = ReadCopy(env, writer, res, lambda changes: loop.call_soon_threadsafe(feed_box[0].publish, changes))
    await copy.start()
    feed = ChangeFeed(ChangelogView(env).head())
    feed_box.append(feed)
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
    node = Node(project, res, clock, test_clock, address or f"{host}:{port}")
    await node.start()
    log.info("cluster node %s (v%s) on %s: %d partitions over NATS %s", settings.node_id, VERSION,
             address or f"{host}:{port}", res.partitions, ", ".join(settings.nats_urls))
    stop, failed = asyncio.Event(), []
    stop_on_signals(loop, stop)

    def fatal() -> None:
        failed.append(True)
        stop.set()

    tasks = [asyncio.create_task(_sync_reads(env, project, writer, progress,
                                             lambda report: write_ready_file(ready_file, host, port, 1, http_port),
                                             fatal, reader)),
             asyncio.create_task(_health(reader, health_servicer, project)),
             asyncio.create_task(_warehouse_syncs(node, project)),
             asyncio.create_task(_repair_audiences(node, AudienceCatalog(res, clock), res))]
    await stop.wait()
    log.info("shutting down: handing partitions over, then stopping (grace %.0fs)", GRACE_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        await http.cleanup()
    gate.drain()
    writing.ingest.drain()
    await server.stop(GRACE_SECONDS)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await node.stop()
    await copy.stop()
    await res.close()
    await loop.run_in_executor(None, writer.stop)
    env.close()
    return 1 if failed else 0
