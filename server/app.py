"""Composition root: project -> storage -> engine -> services -> servicers -> grpc.aio server.

This is the one module that builds concrete storage and hands it, as the
domain's ports, to the services. Two shapes, one set of parts:

- one process (``workers=1``): the gRPC server and the writer share the
  process; every write (ingest batches, the warehouse sync, timers,
  audience changes) runs on the one writer thread (storage/writer.py);
- ``workers=N``: a supervisor (supervisor.py) forks one writer process (the
  single LMDB writer, on a Unix socket) and N serving processes that share
  the port, read the same memory-mapped environment and forward Ingest,
  Audience and Sync calls to the writer.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import logging
import os
import signal
import time
from dataclasses import dataclass, replace

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_reflection.v1alpha import reflection_pb2_grpc

from qualify.v1 import audience_pb2, diagnostics_pb2, ingest_pb2, personalize_pb2, sync_pb2

from .clock import make_clock
from .config import Project
from .delivery.runner import Deliveries
from .domain.engine import Engine
from .domain.errors import QualifyError
from .observability import metrics
from .config.operations import Operations
from .runtime import backfill, compact, fire_timers, sync_schedule
from .security.keys import KeyStore, keys_path
from .services.audiences import AudienceService
from .services.simulate import SimulateService
from .services.feed import ChangeFeed
from .services.ingest import IngestService
from .services.personalize import PersonalizeService
from .services.syncs import SyncService
from .services.watch import WatchService
from .storage.eventlog import EventLogView
from .storage.lmdb_store import Reader, data_path, open_env
from .storage.realtime import RealtimeStore
from .storage.realtime_reads import AudienceReads, ChangelogView
from .storage.replay_process import DonorProcess, ReplayProcess
from .storage.retention import Retention
from .storage.sync_tables import SyncTables
from .storage.warehouse_sync import Progress
from .storage.writer import Writer
from .transport.audience import Audiences
from .transport.diagnostics import Diagnostics
from .transport.gate import Gate, server_credentials
from .transport.handlers import handlers_for
from .transport.health import MapAlarm, watch_health, writer_probe
from .transport.http import HttpEdge, start_http
from .transport.http.forward import ForwardedIngest
from .transport.ingest import Ingest
from .transport.simulate import Simulation
from .transport.personalize import Personalize
from .transport.proxy import proxy_handler
from .transport.standard import add_standard
from .transport.syncs import Syncs
from .transport.watch import Watch

log = logging.getLogger(__name__)

try:
    VERSION = importlib.metadata.version("qualify")
except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a bare tree
    VERSION = "0.0.0"

PERSONALIZE = personalize_pb2.DESCRIPTOR.services_by_name["PersonalizeService"]
DIAGNOSTICS = diagnostics_pb2.DESCRIPTOR.services_by_name["DiagnosticsService"]
# Served by the process that writes; serving processes of workers=N forward them there.
INGEST = ingest_pb2.DESCRIPTOR.services_by_name["IngestService"]
AUDIENCE = audience_pb2.DESCRIPTOR.services_by_name["AudienceService"]
SYNC = sync_pb2.DESCRIPTOR.services_by_name["SyncService"]
WRITING = (INGEST, AUDIENCE, SYNC)
SERVICES = (PERSONALIZE, DIAGNOSTICS, *WRITING)
SERVICE_NAMES = [s.full_name for s in SERVICES]
GRACE_SECONDS = 5.0
MAX_MESSAGE_BYTES = 16 << 20


@dataclass
class Writing:
    """The servicers of the process that writes (None: that service answers UNIMPLEMENTED)."""

    ingest: Ingest | None = None
    audiences: Audiences | None = None
    syncs: Syncs | None = None
    simulations: SimulateService | None = None  # closed at shutdown: it ends its replay process
    donors: DonorProcess | None = None  # the backfill's donor process: closed once the writer stopped


async def create_server(reader: Reader, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False,
                        writing: Writing | None = None, writer_address: str | None = None, address: str | None = None,
                        ops: Operations | None = None, keys: KeyStore | None = None, internal: bool = False,
                        reads: PersonalizeService | None = None):
    """A configured, unstarted server: returns (server, bound port, health servicer, gate).

    ``writing`` (the writing process) serves IngestService, AudienceService
    and SyncService; a serving process given ``writer_address`` forwards
    them there. ``address`` (e.g. a ``unix:`` path) replaces host and port.
    Every call passes the gate (transport/gate.py): API ``keys`` (None: auth
    off) and ``ops.limits``; ``internal`` (the writer's socket behind the
    serving processes) checks keys again but neither limits nor measures, and
    never uses TLS.
    """
    ops = ops or Operations(auth=False)
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 1 if reuse_port else 0),
        ("grpc.max_receive_message_length", ops.limits.max_message_bytes),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ])
    reads = reads or read_service(reader, ops)
    handlers = [handlers_for(PERSONALIZE, Personalize(reads)), handlers_for(DIAGNOSTICS, Diagnostics(reads))]
    if writer_address is not None:
        channel = grpc.aio.insecure_channel(writer_address)
        handlers += [proxy_handler(channel, s) for s in WRITING]
    else:
        writing = writing or Writing()
        handlers += [handlers_for(INGEST, writing.ingest), handlers_for(AUDIENCE, writing.audiences),
                     handlers_for(SYNC, writing.syncs)]
    gate = Gate(handlers, list(SERVICES), keys=keys, limits=ops.limits, edge=not internal)
    server.add_generic_rpc_handlers([gate])
    health_servicer = health.aio.HealthServicer()
    # Both need no key: decoded leniently, so garbage is INVALID_ARGUMENT and not a traceback per call.
    add_standard(server, health_pb2_grpc.add_HealthServicer_to_server, health_servicer)
    add_standard(server, reflection_pb2_grpc.add_ServerReflectionServicer_to_server, reflection.aio.ReflectionServicer(
        SERVICE_NAMES + [health.SERVICE_NAME, reflection.SERVICE_NAME]))
    if ops.tls.enabled and not internal:
        bound = server.add_secure_port(address or f"{host}:{port}", server_credentials(ops.tls))
    else:
        bound = server.add_insecure_port(address or f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot listen on {address or f'{host}:{port}'} (address in use?)")
    for name in ["", *SERVICE_NAMES]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    return server, bound, health_servicer, gate


def read_service(reader: Reader, ops: Operations) -> PersonalizeService:
    return PersonalizeService(reader, EventLogView(reader.env), VERSION, ops.limits.max_message_bytes)


async def _start_http(project: Project, reads: PersonalizeService, gate: Gate, ingest, audiences=None,
                      port: int | None = None):
    """The HTTP API beside gRPC, checking keys and rates with the gate's own objects; (runner, port).

    ``port`` (a serving process of --workers N): the port the supervisor
    reserved, shared with SO_REUSEPORT like the gRPC one.
    """
    ops = project.ops
    settings = ops.http if port is None else replace(ops.http, port=port)
    edge = HttpEdge(reads, ingest, keys=gate.keys, rates=gate.rates, limits=ops.limits, settings=settings,
                    audiences=audiences)
    return await start_http(edge, settings, ops.tls, reuse_port=port is not None)


def _health(reader: Reader, health_servicer, project: Project, writer_address: str | None = None,
            alarm: MapAlarm | None = None):
    """Health turns SERVING once the first sync has landed (and, with ``writer_address``, the writer
    answers), and NOT_SERVING while the map is nearly full (or the writer stops answering)."""
    return watch_health(reader, health_servicer, ["", *SERVICE_NAMES], project.ops.limits.map_nearly_full,
                        writer=writer_probe(writer_address) if writer_address else None, alarm=alarm)


def _keys(project: Project) -> KeyStore | None:
    return KeyStore(keys_path(project.data_dir)) if project.ops.auth else None


def announce_auth(project: Project) -> None:
    if not project.ops.auth:
        log.warning("authentication is OFF: any caller may call every RPC "
                    "(the embedded demo, or [auth] enabled = false in the project file)")
    elif KeyStore(keys_path(project.data_dir)).count == 0:
        log.warning("authentication is on and no API key exists yet: every call is refused until "
                    "`qualify keys create` makes one")


def write_ready_file(path: str | None, host: str, port: int, workers: int, http_port: int | None = None) -> None:
    if not path:
        return
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"address": f"{host}:{port}", "port": port, "pid": os.getpid(), "workers": workers,
                   "http_port": http_port}, f)
    os.replace(tmp, path)


def stop_on_signals(loop, stop: asyncio.Event) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)


def _publisher(writer: Writer, feed: ChangeFeed, loop):
    """The engine's ``publish``: stored changes reach the live feed once their transaction committed."""
    def publish(changes) -> None:
        if changes:
            writer.after_commit(lambda: loop.call_soon_threadsafe(feed.publish, changes))
    return publish


async def _start_engine(store: RealtimeStore, writer: Writer, project: Project, clock, publish) -> Engine:
    """The realtime engine, rebuilt from LMDB on the writer thread and hooked to ingest."""
    log_ = writer.log
    engine = Engine(
        store, project.event_models, [(a.name, a.type) for a in project.parent_model.attributes],
        int(project.session_timeout * 1_000_000),
        read_event=log_.get, read_fields=log_.fields, iter_events=lambda txn: log_.read(txn, 1), publish=publish,
        retention_us=int(project.event_retention * 1_000_000), cache_people=project.state_cache)
    t0 = time.perf_counter()
    try:
        changes = await asyncio.wrap_future(writer.submit(lambda txn: engine.recover(txn, clock())))
    except QualifyError as exc:  # a stored audience the project no longer describes: say which, no traceback
        raise SystemExit(f"qualify serve: {exc}; fix the project file, or see `qualify check`") from None
    log.info("realtime state loaded in %.2fs (%d audiences, %d people, %d changes on the way)",
             time.perf_counter() - t0, len(engine.audiences), len(engine.slots), len(changes))
    writer.on_events = engine.apply
    return engine


async def _writing_parts(env, writer: Writer, reader: Reader, project: Project, clock, loop):
    """The engine, the change feed, deliveries and the writing servicers, wired to one writer."""
    def open_tables(txn):  # created in the writer's transaction; any process may read them after
        return RealtimeStore(env, txn), SyncTables(env, txn)

    store, tables = await asyncio.wrap_future(writer.submit(open_tables))
    changelog = ChangelogView(env)
    feed = ChangeFeed(changelog.head())
    engine = await _start_engine(store, writer, project, clock, _publisher(writer, feed, loop))
    deliveries = Deliveries(tables, writer, feed, changelog, reader, project.parent_model.name, clock,
                            f"qualify/{VERSION}", project.retry_initial, project.retry_max,
                            int(project.changelog_retention * 1_000_000))
    await deliveries.start(list(project.syncs))
    watch = Watch(WatchService(feed, changelog, project.watch_buffer, project.watch_max_lag))
    simulations = SimulateService(engine, ReplayProcess(env, data_path(project.data_dir), project.map_size), clock)
    engine.donors = DonorProcess(env, data_path(project.data_dir), project.map_size)
    writing = Writing(
        ingest=Ingest(IngestService(writer, project.event_models, clock, project.ops.limits)),
        audiences=Audiences(AudienceService(engine, writer, AudienceReads(env), clock, reader,
                                            project.preview_timeout), watch, Simulation(simulations)),
        syncs=Syncs(SyncService(deliveries, reader)), simulations=simulations, donors=engine.donors)
    retention = Retention(writer.log, store, tables, int(project.event_retention * 1_000_000),
                          int(project.changelog_retention * 1_000_000))
    return engine, deliveries, writing, retention


async def serve_single(project: Project, *, ready_file: str | None = None, progress: Progress | None = None,
                       address: str | None = None) -> int:
    """One process serving and syncing; returns an exit code.

    With ``address`` it is the writer of ``--workers N``, reached by the
    serving processes on that (Unix socket) address only. With [cluster]
    it is a cluster node (cluster_app.py).
    """
    if project.cluster is not None:
        from .cluster_app import serve_cluster

        return await serve_cluster(project, ready_file=ready_file, progress=progress, address=address)
    env = open_env(data_path(project.data_dir), project.map_size, readonly=False)
    clock, test_clock = make_clock()
    writer = Writer(env, clock_us=clock)  # every write (ingest, sync, timers) goes through its thread
    writer.start()
    reader = Reader(env)
    loop = asyncio.get_running_loop()
    engine, deliveries, writing, retention = await _writing_parts(env, writer, reader, project, clock, loop)
    wake = asyncio.Event()
    engine.on_deadline = lambda: loop.call_soon_threadsafe(wake.set)
    host, port = project.server.host, project.server.port
    internal = address is not None
    if project.ops.metrics.port:
        metrics.setup()
    reads = read_service(reader, project.ops)
    server, port, health_servicer, gate = await create_server(
        reader, host, port, writing=writing, address=address, ops=project.ops, keys=_keys(project),
        internal=internal, reads=reads)
    await server.start()
    # With --workers N the serving processes serve HTTP, as they serve gRPC (serve_reads).
    http, http_port = (await _start_http(project, reads, gate, writing.ingest.service, writing.audiences.service)
                       if project.ops.http.enabled and not internal else (None, None))
    if internal:  # the writer's socket is for the serving processes of this user only
        os.chmod(address.removeprefix("unix:"), 0o600)
    # A restart serves what it stored (the last sync's data, the realtime state) at once, as health says;
    # the first sync runs beside it. A new data folder has nothing to serve until its first sync lands.
    restarted = reader.generation > 0
    if restarted:
        write_ready_file(ready_file, host, port, 1, http_port)
    log.info("listening on %s (%s)", address or f"{host}:{port}",
             "serving the last sync's data while the first sync runs" if restarted
             else "NOT_SERVING until the first sync lands")
    stop, failed = asyncio.Event(), []
    stop_on_signals(loop, stop)
    alarm = MapAlarm(loop, project.ops.limits.map_nearly_full)
    writer.on_map_use = alarm  # health flips with the commit that fills the map

    def first_sync(report) -> None:
        if not restarted:
            write_ready_file(ready_file, host, port, 1, http_port)
        # The writer of --workers N listens on its socket only (add_insecure_port says 1 for it).
        log.info("%s %d people from %s on %s", "writing for" if internal else "serving", report.people,
                 ", ".join(c.name for c in project.collections), address or f"{host}:{port}")

    def fatal() -> None:
        failed.append(True)
        stop.set()

    tasks = [asyncio.create_task(sync_schedule(env, project, engine, writer, clock, progress, first_sync, fatal, reader)),
             asyncio.create_task(_health(reader, health_servicer, project, alarm=alarm)),
             asyncio.create_task(fire_timers(engine, writer, wake, clock, test_clock)),
             asyncio.create_task(compact(retention, writer, clock, 0.2 if test_clock else 1.0)),
             asyncio.create_task(backfill(engine, writer, clock))]
    await stop.wait()
    await _shut_down(loop, health_servicer, http, gate, writing, server, tasks, deliveries, writer)
    env.close()
    return 1 if failed else 0


async def _shut_down(loop, health_servicer, http, gate, writing, server, tasks, deliveries, writer) -> None:
    """A single node's parts stop in this order, so nothing acknowledged or in flight is lost."""
    log.info("shutting down (grace %.0fs for unary calls; streams end now)", GRACE_SECONDS)
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        await http.cleanup()  # in-flight requests finish (their events are durable) before the writer stops
    # Streams never end by themselves: watches end UNAVAILABLE now, event streams once what they
    # read is acknowledged, so shutdown lasts as long as the work in flight, not the grace period.
    gate.drain()
    writing.ingest.drain()
    await server.stop(GRACE_SECONDS)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await deliveries.close()  # cursors persisted: a restart resumes where delivery stopped
    await loop.run_in_executor(None, writing.simulations.close)
    # After the server stopped: whatever it queued is committed, then the thread ends.
    await loop.run_in_executor(None, writer.stop)
    writing.donors.close()


async def serve_reads(project: Project, port: int, writer_address: str, http_port: int | None = None) -> int:
    """A serving process of ``--workers N``: reads from the shared map, writes forwarded to the writer.

    ``http_port``: the HTTP API too, its events forwarded to the writer as TrackBatch calls.
    """
    env = open_env(data_path(project.data_dir), project.map_size, readonly=True)
    reader = Reader(env)
    if project.ops.metrics.port:
        metrics.setup()
    reads = read_service(reader, project.ops)
    server, _, health_servicer, gate = await create_server(reader, project.server.host, port, reuse_port=True,
                                                           writer_address=writer_address, ops=project.ops,
                                                           keys=_keys(project), reads=reads)
    await server.start()
    http = None
    if http_port is not None:
        forward = ForwardedIngest(grpc.aio.insecure_channel(writer_address), project.ops.limits, make_clock()[0])
        http, _ = await _start_http(project, reads, gate, forward, port=http_port)
    stop = asyncio.Event()
    stop_on_signals(asyncio.get_running_loop(), stop)
    ready = asyncio.create_task(_health(reader, health_servicer, project, writer_address))
    await stop.wait()
    await health_servicer.enter_graceful_shutdown()
    if http is not None:
        await http.cleanup()
    gate.drain()  # forwarded event streams end when the writer drains them
    await server.stop(GRACE_SECONDS)
    ready.cancel()
    env.close()
    return 0


def run_async(coro) -> int:
    """Runs the server's event loop, on uvloop when it is installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
